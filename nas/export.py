"""Export a chosen subnet: PyTorch weights, a timm model, a ``torch.export`` program, ONNX.

Every writer writes a temporary file in the destination folder and moves it onto the final name
with ``os.replace``, so a crash never leaves a half-written file under that name. Each file carries
``EXPORT_FORMAT_VERSION`` (safetensors metadata, a ``torch.export`` extra file, ONNX metadata).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nas.files import atomic_path
from nas.spaces.base import Arch, SearchSpace, create_space, list_families

__all__ = [
    "EXPORT_FORMAT_VERSION",
    "FINETUNE_FORMAT_VERSION",
    "ExportError",
    "export_torch",
    "load_finetuned",
    "load_torch",
    "export_program",
    "load_program",
    "export_onnx",
    "to_timm",
]

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
_VERSION_KEY = "tailnas_format_version"
# Version of train.py's subnet.pt and finetune.json.
FINETUNE_FORMAT_VERSION = 1


class ExportError(RuntimeError):
    """A subnet that cannot be exported in the requested form, or an export whose check failed."""


# -- (a) plain PyTorch weights ----------------------------------------------------------------
def export_torch(model: nn.Module, path: str | os.PathLike[str], space: SearchSpace | None = None,
                 arch: Arch | None = None) -> Path:
    """Write ``model``'s state dict (for example from ``supernet.extract(arch)``) as a safetensors file.

    With ``space`` and ``arch`` the file also records the space configuration and the
    architecture, so :func:`load_torch` can rebuild the module without other inputs.
    """
    from safetensors.torch import save_file

    metadata = {_VERSION_KEY: str(EXPORT_FORMAT_VERSION), "module": type(model).__name__}
    if (space is None) != (arch is None):
        raise ExportError("Pass both space and arch (to make the file self-describing) or neither.")
    if space is not None and arch is not None:
        space.validate(arch)
        metadata["space"] = json.dumps(space.raw_config, sort_keys=True, default=_plain)
        metadata["arch"] = arch.to_json()
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    log.info("Wrote %d tensors of %s to %s.", len(tensors), type(model).__name__, path)
    return Path(path)


def _plain(value: Any) -> Any:
    """Turn OmegaConf containers (and other sequences) into JSON values."""
    if hasattr(value, "items"):
        return dict(value.items())
    return list(value)


def load_torch(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load a file from :func:`export_torch` into ``model``, or rebuild the module from the recorded space and arch."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    version = metadata.get(_VERSION_KEY)
    if version != str(EXPORT_FORMAT_VERSION):
        raise ExportError(
            f"{str(path)!r} has export format version {version!r}; this TailNAS reads version {EXPORT_FORMAT_VERSION}."
        )
    if model is None:
        if "space" not in metadata:
            raise ExportError(f"{str(path)!r} records no space and arch; pass the module to load into as `model`.")
        space = create_space(json.loads(metadata["space"]))
        arch = space.arch_from_json(metadata["arch"])
        model = space.build_supernet().build_static(arch)
    model.load_state_dict(load_file(str(path)))
    return model.eval()


def load_finetuned(path: str | os.PathLike[str]) -> nn.Module:
    """Load the ``subnet.pt`` that ``train.py`` writes, in eval mode.

    The file contains the space, the arch, the state dict and, for a network fine-tuned with gates,
    the gate record (:meth:`nas.gates.GatedNetwork.describe`). A gated network comes back as a
    ``GatedNetwork`` at its recorded keep ratio and mode (skip when the record has none).
    Spaces from user modules need those modules imported first; the error names the modules that
    the study imported.

    Raises:
        ExportError: if the file is missing, is a ``.pt2`` program or not a ``train.py`` checkpoint,
            has another format version or a space family that is not registered. Also if its gate
            record does not rebuild, or its weights do not fit the network that its arch and gate
            record describe.
    """
    path = Path(path)
    if path.is_dir() and (path / "subnet.pt").is_file():
        raise ExportError(f"{str(path)!r} is a directory; pass the checkpoint in it, {str(path / 'subnet.pt')!r}.")
    if not path.is_file():
        raise ExportError(f"{str(path)!r} not found; pass the subnet.pt in a train.py run directory "
                          "(outputs/train/<date>_<time>/subnet.pt).")
    if path.suffix == ".pt2":
        raise ExportError(f"{str(path)!r} is a torch.export program; load it with nas.export.load_program(path), "
                          "or pass the subnet.pt next to it to load_finetuned.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError) as error:
        # torch's unpickling message suggests weights_only=False, which would run code from the file.
        if isinstance(error, pickle.UnpicklingError):
            reason = "not a file of tensors"
        else:
            reason = str(error).split("\n")[0]
        raise ExportError(f"{str(path)!r} is not a train.py checkpoint or is damaged: torch.load failed "
                          f"({type(error).__name__}: {reason}). Pass the subnet.pt that train.py wrote.") from error
    if not isinstance(payload, dict) or not {"space", "arch", "state_dict"} <= set(payload):
        raise ExportError(f"{str(path)!r} is not a train.py checkpoint: it needs the keys space, arch and state_dict.")
    if payload.get("format_version") != FINETUNE_FORMAT_VERSION:
        raise ExportError(f"{str(path)!r} has format version {payload.get('format_version')!r}; this TailNAS "
                          f"reads version {FINETUNE_FORMAT_VERSION}.")
    family = payload["space"].get("family") if isinstance(payload["space"], dict) else None
    if family is not None and family not in list_families():
        imports = payload.get("imports") or []
        where = (f"import {', '.join(map(str, imports))} first" if imports else
                 "import the module that registers it first")
        raise ExportError(f"{str(path)!r} contains a subnet of space family {family!r}, which is not registered here "
                          f"(registered: {list_families()}); {where}.")
    space = create_space(payload["space"])
    arch = space.arch_from_dict(payload["arch"])
    model = space.build_supernet().build_static(arch)
    gates = payload.get("gates")
    if gates is not None:
        from nas.gates import GateConfigError, apply_gates

        try:
            model = apply_gates(model, gates["config"], input_shape=space.input_shape(arch), plan=gates)
            model.set_mode(gates.get("mode", "skip"))
        except (GateConfigError, KeyError, TypeError) as error:
            raise ExportError(f"{str(path)!r} has a gate record that does not rebuild ({type(error).__name__}: "
                              f"{error}). The file was changed after train.py wrote it; load an unchanged subnet.pt "
                              "or run train.py again.") from error
    _check_weights(path, model, payload["state_dict"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def _check_weights(path: Path, model: nn.Module, state: Any) -> None:
    """Raise ExportError naming the tensors that ``state`` and ``model`` do not share or hold in different shapes."""
    if not isinstance(state, dict):
        raise ExportError(f"{str(path)!r} is not a train.py checkpoint: its state_dict is a {type(state).__name__}.")
    expected = model.state_dict()
    problems = {
        "missing": sorted(set(expected) - set(state)),
        "unexpected": sorted(set(state) - set(expected)),
        "of another shape": sorted(key for key in set(expected) & set(state)
                                   if getattr(state[key], "shape", None) != expected[key].shape),
    }
    found = [f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
             for kind, keys in problems.items() if keys]
    if found:
        raise ExportError(f"{str(path)!r}: the weights do not fit the network that its arch and gate record describe: "
                          f"{'; '.join(found)}. The file was changed after train.py wrote it; load an unchanged "
                          "subnet.pt or run train.py again.")


# -- (c) torch.export ---------------------------------------------------------------------------
def _trace_input(example_input: torch.Tensor, dynamic_batch: bool) -> torch.Tensor:
    # torch.export specialises a dimension of size 1, so a batch-independent export traces batch 2.
    if dynamic_batch and example_input.shape[0] == 1:
        return torch.cat([example_input, example_input])
    return example_input


def _batch_dim(dynamic_batch: bool) -> tuple[dict[int, Any]] | None:
    return ({0: torch.export.Dim("batch")},) if dynamic_batch else None


def export_program(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike[str],
                   dynamic_batch: bool = True) -> torch.export.ExportedProgram:
    """Export ``model`` in eval mode with ``torch.export.export`` and save the program to ``path`` (``.pt2``).

    ``example_input`` is one input batch (N, C, H, W); with ``dynamic_batch`` the program accepts
    any batch size, otherwise only N. The program is frozen: a gated network's folded weights are
    constants in it, so export again after changing the model's weights.
    """
    model = model.eval()
    trace = _trace_input(example_input, dynamic_batch)
    with torch.no_grad():
        # One eager pass first fills the modules' caches (a gated block's BatchNorm-folded weights
        # and gate plan). The trace then keeps them as constants; traced cold, the program would
        # recompute them from the parameters on every call.
        model(trace)
        program = torch.export.export(model, (trace,), dynamic_shapes=_batch_dim(dynamic_batch))
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp), extra_files={_VERSION_KEY: str(EXPORT_FORMAT_VERSION)})
    log.info("Wrote torch.export program of %s to %s.", type(model).__name__, path)
    return program


def _archive_entries(path: Path) -> set[str] | None:
    """Return the entry names below the zip archive's top folder, or None if ``path`` is not a zip archive."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        return {name.split("/", 1)[1] for name in archive.namelist() if "/" in name}


def _check_program_file(path: Path) -> None:
    """Raise ExportError for a ``path`` that cannot be a torch.export program, before torch logs a traceback for it."""
    if path.is_dir():
        raise ExportError(f"{str(path)!r} is a directory; pass the .pt2 file in it that export_program wrote.")
    if not path.is_file():
        raise ExportError(f"{str(path)!r} not found; pass the .pt2 file that export_program wrote "
                          "(train.py writes subnet.pt2 next to subnet.pt).")
    entries = _archive_entries(path)
    # torch.save writes a zip archive with data.pkl; a torch.export program has archive_format instead.
    if path.suffix == ".pt" or (entries is not None and "data.pkl" in entries and "archive_format" not in entries):
        raise ExportError(f"{str(path)!r} is a checkpoint (.pt, torch.save), not a torch.export program; use "
                          "nas.export.load_finetuned(path) for the subnet.pt that train.py writes, or pass the "
                          ".pt2 file next to it to load_program.")
    if entries is None:
        raise ExportError(f"{str(path)!r} is not a torch.export program (not a zip archive); pass the .pt2 file "
                          "that export_program wrote.")


def load_program(path: str | os.PathLike[str]) -> torch.export.ExportedProgram:
    """Load a program written by :func:`export_program`, checking its format version.

    Raises:
        ExportError: if ``path`` is missing, a directory, a ``torch.save`` checkpoint such as
            ``subnet.pt`` (load that with :func:`load_finetuned`), not a program that torch can
            read, or has another format version.
    """
    path = Path(path)
    _check_program_file(path)
    extra = {_VERSION_KEY: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as error:
        reason = str(error).split("\n")[0]
        raise ExportError(f"{str(path)!r} is not a torch.export program that this torch can read "
                          f"({type(error).__name__}: {reason}). Pass the .pt2 file that export_program wrote.") from error
    if extra[_VERSION_KEY] != str(EXPORT_FORMAT_VERSION):
        raise ExportError(
            f"{str(path)!r} has export format version {extra[_VERSION_KEY]!r}; "
            f"this TailNAS reads version {EXPORT_FORMAT_VERSION}."
        )
    return program


# -- (d) ONNX -----------------------------------------------------------------------------------
def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike[str], check: bool = True,
                dynamic_batch: bool = True, dynamo: bool = True, opset: int = 18, atol: float = 1e-4,
                rtol: float = 1e-4) -> float:
    """Export ``model`` in eval mode to ONNX and return the max absolute output difference to PyTorch.

    ``dynamo=True`` uses the ``torch.export``-based exporter, ``False`` the TorchScript one. With
    ``check`` the file is run in ONNX Runtime (CPU) on ``example_input`` and compared with PyTorch.

    Raises:
        ExportError: if the difference exceeds ``atol + rtol * max|reference|``; the file is kept
            for inspection.
    """
    import onnx

    model = model.eval()
    trace = _trace_input(example_input, dynamic_batch)
    with atomic_path(path) as tmp:
        kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"], "opset_version": opset}
        if dynamo:
            kwargs["dynamic_shapes"] = _batch_dim(dynamic_batch)
        elif dynamic_batch:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
        with torch.no_grad():
            torch.onnx.export(model, (trace,), str(tmp), dynamo=dynamo, **kwargs)
        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {_VERSION_KEY: str(EXPORT_FORMAT_VERSION)})
        onnx.save(proto, str(tmp))
    log.debug("Wrote ONNX model of %s to %s.", type(model).__name__, path)
    if not check:
        return float("nan")

    difference, scale = _onnx_difference(model, example_input, Path(path))
    if difference > atol + rtol * scale:
        raise ExportError(
            f"ONNX Runtime output of {str(path)!r} differs from PyTorch by {difference:.3g} (outputs up to "
            f"{scale:.3g}, allowed {atol + rtol * scale:.3g}); inspect the file or retry with dynamo={not dynamo}."
        )
    return difference


def _onnx_difference(model: nn.Module, example_input: torch.Tensor, path: Path) -> tuple[float, float]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    (output,) = session.run(None, {input_name: example_input.detach().cpu().numpy()})
    with torch.no_grad():
        reference = model(example_input).detach().cpu().numpy()
    if output.shape != reference.shape:
        raise ExportError(f"ONNX output shape {output.shape} differs from PyTorch's {reference.shape} for {str(path)!r}.")
    return float(np.abs(output - reference).max()), float(np.abs(reference).max())


# -- (b) timm -----------------------------------------------------------------------------------
def to_timm(space: SearchSpace, arch: Arch, model: nn.Module) -> nn.Module:
    """Return the timm model that matches subnet ``arch``, carrying ``model``'s weights (from ``extract``).

    A ``resnet`` space maps to ``timm.models.resnet.ResNet`` when it has timm's ImageNet stem (7x7
    stride-2 convolution and max pooling) and stage strides 1, 2, 2, 2, with basic blocks or with
    bottlenecks whose inner width is a quarter of the output width. A ``mobilenet`` space maps to
    ``timm.models.mobilenetv3.MobileNetV3`` when its stem has stride 2 and its total stride is at
    most 32.

    Raises:
        ExportError: naming what does not fit timm's classes.
    """
    space.validate(arch)
    builders: dict[str, Callable[[Any, Any], nn.Module]] = {"resnet": _timm_resnet, "mobilenet": _timm_mobilenet}
    if space.family not in builders:
        raise ExportError(
            f"Space family {space.family!r} has no timm counterpart; timm export supports {sorted(builders)}. "
            "Use export_torch, export_program or export_onnx instead."
        )
    timm_model = builders[space.family](space, arch)
    try:
        timm_model.load_state_dict(model.state_dict(), strict=True)
    except RuntimeError as err:
        raise ExportError(f"The subnet's weights do not fit timm's {type(timm_model).__name__}: {err}") from err
    return timm_model.train(model.training)


def _timm_resnet(space: Any, arch: Any) -> nn.Module:
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    from nas.spaces.resnet import bottleneck_mid_channels

    cfg = space.cfg
    stem = cfg.stem
    if (stem.kernel_size, stem.stride, stem.max_pool) != (7, 2, True):
        raise ExportError(
            f"timm's ResNet has a 7x7 stride-2 stem with max pooling, but space {space.name!r} has "
            f"kernel_size={stem.kernel_size}, stride={stem.stride}, max_pool={stem.max_pool}."
        )
    strides = [stage.stride for stage in cfg.stages]
    if len(strides) > 4 or strides != [1, 2, 2, 2][: len(strides)]:
        raise ExportError(f"timm's ResNet has at most 4 stages with strides [1, 2, 2, 2], but space {space.name!r} has {strides}.")
    if cfg.block == "basic":
        return ResNet(BasicBlock, list(arch.depths), num_classes=cfg.num_classes, in_chans=cfg.in_channels,
                      stem_width=stem.channels, channels=tuple(arch.widths))

    planes = []
    for i, (width, ratio) in enumerate(zip(arch.widths, arch.expand_ratios)):
        mid = bottleneck_mid_channels(width, ratio)
        if mid * 4 != width:
            raise ExportError(
                f"timm's Bottleneck has inner width = output width / 4, but stage {i} of arch has width {width} "
                f"and inner width {mid} (expand ratio {ratio}); only expand ratio 0.25 with widths divisible by 32 fits."
            )
        planes.append(mid)
    return ResNet(Bottleneck, list(arch.depths), num_classes=cfg.num_classes, in_chans=cfg.in_channels,
                  stem_width=stem.channels, channels=tuple(planes))


def _timm_mobilenet(space: Any, arch: Any) -> nn.Module:
    from timm.layers import get_act_layer
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.mobilenetv3 import MobileNetV3

    cfg, widths = space.cfg, space.widths
    total_stride = cfg.stem_stride * int(np.prod(cfg.strides))
    if cfg.stem_stride != 2 or total_stride > 32:
        raise ExportError(
            f"timm's MobileNetV3 has a stride-2 stem and a total stride of at most 32, but space {space.name!r} "
            f"has stem_stride={cfg.stem_stride} and a total stride of {total_stride}."
        )
    stages = [[f"ds_r1_k3_s{cfg.strides[0]}_e1_c{widths[1]}_nre"]]
    stage_blocks: list[list[str]] = [[] for _ in range(len(arch.d))]
    for b in space.block_plan(arch):
        text = f"ir_r1_k{b.kernel_size}_s{b.stride}_e{arch.e[b.slot]}_c{b.out_channels}"
        text += "_se0.25" if b.se_channels else ""
        text += "_nre" if b.act == "relu" else ""
        stage_blocks[b.stage].append(text)
    stages += stage_blocks + [[f"cn_r1_k1_s1_c{widths[7]}"]]

    se_layer = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    return MobileNetV3(
        decode_arch_def(stages), num_classes=cfg.num_classes, in_chans=cfg.in_channels, stem_size=widths[0],
        fix_stem=True, num_features=widths[8], head_bias=False, act_layer=get_act_layer("hard_swish"),
        se_layer=se_layer, round_chs_fn=lambda channels: channels, drop_rate=cfg.dropout_rate,
    )
