"""Load Once-for-All's published MobileNetV3 supernet weights into :class:`ElasticMobileNetV3`.

OFA publishes ``ofa_mbv3_d234_e346_k357_w1.0`` and ``..._w1.2`` as a ``torch.save`` file holding
``{"state_dict": ...}``. Its key layout (OFA's ``OFAMobileNetV3`` module names) maps one to one onto
this supernet's names. The mapping below is explicit, so a key that is not in it is an error
rather than a silent skip. Files are read with ``weights_only=True``: no foreign code is unpickled.

OFA key layout, with ``N = 1 + stage * max_depth + index`` for the elastic blocks::

    first_conv.conv.weight, first_conv.bn.*                      -> conv_stem.weight, bn1.*
    blocks.0.conv.depth_conv.conv.weight, ...depth_conv.bn.*      -> blocks.0.0.conv_dw.weight, blocks.0.0.bn1.*
    blocks.0.conv.point_linear.conv.weight, ...point_linear.bn.*  -> blocks.0.0.conv_pw.weight, blocks.0.0.bn2.*
    blocks.N.conv.inverted_bottleneck.conv.conv.weight, .bn.bn.*  -> blocks.<stage+1>.<index>.conv_pw.weight, bn1.*
    blocks.N.conv.depth_conv.conv.conv.weight, .bn.bn.*           -> ...conv_dw.weight, bn2.*
    blocks.N.conv.depth_conv.conv.7to5_matrix, 5to3_matrix        -> ...conv_dw.transform_7to5, transform_5to3
    blocks.N.conv.depth_conv.se.fc.reduce.*, .fc.expand.*         -> ...se.conv_reduce.*, se.conv_expand.*
    blocks.N.conv.point_linear.conv.conv.weight, .bn.bn.*         -> ...conv_pwl.weight, bn3.*
    final_expand_layer.conv.weight, final_expand_layer.bn.*       -> blocks.6.0.conv.weight, blocks.6.0.bn1.*
    feature_mix_layer.conv.weight                                 -> conv_head.weight
    classifier.linear.weight, classifier.linear.bias              -> classifier.weight, classifier.bias

OFA's own loader also accepts older spellings of the same keys (``mobile_inverted_conv`` for ``conv``,
and the static ``.bn.``/``.conv.weight``/``.linear.`` forms for the dynamic ``.bn.bn.``/``.conv.conv.weight``/
``.linear.linear.`` ones); :func:`convert_ofa_state_dict` accepts them too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from nas.spaces.mobilenet import NUM_STAGES, STAGE_SE
from nas.supernet.mobilenet import ElasticMobileNetV3

__all__ = ["OFACheckpointError", "ofa_key_map", "convert_ofa_state_dict", "load_ofa_checkpoint"]

log = logging.getLogger(__name__)

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# Spellings OFA's loader treats as the same key: (found in a file, key in the mapping).
_ALIASES = (
    (".bn.", ".bn.bn."),
    (".bn.bn.", ".bn."),
    (".conv.weight", ".conv.conv.weight"),
    (".conv.conv.weight", ".conv.weight"),
    (".linear.", ".linear.linear."),
    (".linear.linear.", ".linear."),
)


class OFACheckpointError(ValueError):
    """An OFA checkpoint that does not match the supernet (unknown, missing or mis-shaped tensors)."""


def _bn(ofa_prefix: str, prefix: str) -> dict[str, str]:
    return {f"{ofa_prefix}.{t}": f"{prefix}.{t}" for t in _BN_TENSORS}


def ofa_key_map(supernet: ElasticMobileNetV3) -> dict[str, str]:
    """Return OFA's state-dict key for every tensor of ``supernet``, as {OFA key: supernet key}."""
    space = supernet.space
    keys = {"first_conv.conv.weight": "conv_stem.weight", **_bn("first_conv.bn", "bn1")}
    keys["blocks.0.conv.depth_conv.conv.weight"] = "blocks.0.0.conv_dw.weight"
    keys.update(_bn("blocks.0.conv.depth_conv.bn", "blocks.0.0.bn1"))
    keys["blocks.0.conv.point_linear.conv.weight"] = "blocks.0.0.conv_pw.weight"
    keys.update(_bn("blocks.0.conv.point_linear.bn", "blocks.0.0.bn2"))

    sizes = sorted(space.cfg.kernel_sizes)
    for stage in range(NUM_STAGES):
        for index in range(space.max_depth):
            ofa = f"blocks.{1 + stage * space.max_depth + index}.conv"
            ours = f"blocks.{stage + 1}.{index}"
            keys[f"{ofa}.inverted_bottleneck.conv.conv.weight"] = f"{ours}.conv_pw.weight"
            keys.update(_bn(f"{ofa}.inverted_bottleneck.bn.bn", f"{ours}.bn1"))
            keys[f"{ofa}.depth_conv.conv.conv.weight"] = f"{ours}.conv_dw.weight"
            for larger, smaller in zip(sizes[1:], sizes[:-1]):
                keys[f"{ofa}.depth_conv.conv.{larger}to{smaller}_matrix"] = f"{ours}.conv_dw.transform_{larger}to{smaller}"
            keys.update(_bn(f"{ofa}.depth_conv.bn.bn", f"{ours}.bn2"))
            if STAGE_SE[stage]:
                for ofa_name, name in (("reduce", "conv_reduce"), ("expand", "conv_expand")):
                    keys[f"{ofa}.depth_conv.se.fc.{ofa_name}.weight"] = f"{ours}.se.{name}.weight"
                    keys[f"{ofa}.depth_conv.se.fc.{ofa_name}.bias"] = f"{ours}.se.{name}.bias"
            keys[f"{ofa}.point_linear.conv.conv.weight"] = f"{ours}.conv_pwl.weight"
            keys.update(_bn(f"{ofa}.point_linear.bn.bn", f"{ours}.bn3"))

    keys["final_expand_layer.conv.weight"] = "blocks.6.0.conv.weight"
    keys.update(_bn("final_expand_layer.bn", "blocks.6.0.bn1"))
    keys["feature_mix_layer.conv.weight"] = "conv_head.weight"
    keys["classifier.linear.weight"] = "classifier.weight"
    keys["classifier.linear.bias"] = "classifier.bias"
    return keys


def _resolve(key: str, known: Mapping[str, str]) -> str | None:
    """Return the mapped OFA key that ``key`` spells, trying OFA's alternative spellings.

    A ``module.`` prefix (from ``nn.DataParallel``) is dropped first.
    """
    key = key.removeprefix("module.").replace(".mobile_inverted_conv.", ".conv.")
    if key in known:
        return key
    for found, replacement in _ALIASES:
        candidate = key.replace(found, replacement, 1)
        if found in key and candidate in known:
            return candidate
    return None


def convert_ofa_state_dict(state: Mapping[str, torch.Tensor], supernet: ElasticMobileNetV3) -> dict[str, torch.Tensor]:
    """Rename an OFA MobileNetV3 state dict to ``supernet``'s names, checking every key and shape.

    Raises:
        OFACheckpointError: listing the unknown keys, the missing keys and the shape mismatches.
            A missing ``num_batches_tracked`` is allowed (files from PyTorch before 0.4.1 lack it)
            and keeps the supernet's value.
    """
    mapping = ofa_key_map(supernet)
    target = supernet.state_dict()
    out: dict[str, torch.Tensor] = {}
    unknown, mismatched = [], []
    for key, tensor in state.items():
        resolved = _resolve(key, mapping)
        if resolved is None or not isinstance(tensor, torch.Tensor):
            unknown.append(key)
            continue
        name = mapping[resolved]
        if tuple(tensor.shape) != tuple(target[name].shape):
            mismatched.append(f"{key}: file {tuple(tensor.shape)}, supernet {tuple(target[name].shape)}")
            continue
        out[name] = tensor

    missing = [ofa for ofa, name in mapping.items() if name not in out and not name.endswith("num_batches_tracked")]
    if unknown or missing or mismatched:
        raise OFACheckpointError(
            f"The OFA checkpoint does not match space {supernet.space.name!r} "
            f"(width_mult={supernet.space.cfg.width_mult}, kernel_sizes={supernet.space.cfg.kernel_sizes}, "
            f"depths={supernet.space.cfg.depths}): {len(unknown)} unknown keys {unknown[:10]}, "
            f"{len(missing)} missing keys {missing[:10]}, {len(mismatched)} shape mismatches {mismatched[:10]}. "
            "Use the space YAML that matches the file, for example mobilenet_imagenet_w1.2 for "
            "ofa_mbv3_d234_e346_k357_w1.2."
        )
    for name, tensor in target.items():
        if name not in out:
            out[name] = tensor
    return out


def load_ofa_checkpoint(supernet: ElasticMobileNetV3, path: str | os.PathLike[str]) -> None:
    """Load an OFA MobileNetV3 supernet checkpoint file (a download of OFA's published weights) into ``supernet``.

    The file may hold the state dict itself or ``{"state_dict": ...}`` as OFA publishes it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OFA checkpoint {str(path)!r} not found; download the file and pass its local path.")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else None
    if not isinstance(state, Mapping):
        raise OFACheckpointError(
            f"{str(path)!r} contains a {type(loaded).__name__}, but an OFA checkpoint is a state dict or a "
            "mapping with a 'state_dict' key; pass the file OFA published."
        )
    supernet.load_state_dict(convert_ofa_state_dict(state, supernet))
    log.info("Loaded OFA checkpoint %s into space %s (%d tensors).", path, supernet.space.name, len(state))
