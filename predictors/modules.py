"""Runnable modules for single :class:`LayerSpec` units, and BatchNorm folding for whole subnets.

The layer microbenchmarks time each unit the way a subnet runs it at inference: a "conv" unit is
one convolution whose bias contains the folded BatchNorm, followed by its activation.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from nas.spaces.layers import LayerSpec

__all__ = ["build_layer_module", "layer_input_shape", "fold_batchnorm"]

logger = logging.getLogger(__name__)


class AddUnit(nn.Module):
    """Residual addition of the input to itself, then the activation: ``act(x + x)``.

    Adding a tensor to itself reads the same bytes as adding two tensors of that shape, and keeps
    the module a single-input module like every other unit.
    """

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + x)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: pool, 1x1 reduce (in -> out), ReLU, 1x1 expand (out -> in), hard sigmoid, scale."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.act(self.reduce(self.pool(x)))
        scale = self.gate(self.expand(scale))
        return x * scale


class GlobalAvgPool(nn.Module):
    """Global average pooling that returns ``(N, C)``, as a classifier head consumes it."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(x), 1)


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "hswish":
        return nn.Hardswish(inplace=True)
    return nn.Identity()


def build_layer_module(spec: LayerSpec) -> nn.Module:
    """Build a module with random weights that runs ``spec`` as a subnet runs it at inference.

    Input and output shapes, without the batch dimension: ``layer_input_shape(spec)`` in, and
    ``(out_channels, out_size, out_size)`` out, except "add" and "se" (output shape equals the
    input shape), "gap" (``(in_channels,)``) and "linear" (``(out_channels,)``).
    """
    act = _activation(spec.act)
    if spec.op == "conv":
        # BatchNorm folded into the convolution leaves a conv with a bias, which is what runs.
        conv = nn.Conv2d(
            spec.in_channels,
            spec.out_channels,
            spec.kernel_size,
            spec.stride,
            padding=spec.kernel_size // 2,
            groups=spec.groups,
            bias=True,
        )
        return nn.Sequential(conv, act)
    if spec.op == "add":
        return AddUnit(act)
    if spec.op == "se":
        return SqueezeExcite(spec.in_channels, spec.out_channels)
    if spec.op == "maxpool":
        return nn.MaxPool2d(spec.kernel_size, spec.stride, padding=spec.kernel_size // 2)
    if spec.op == "gap":
        return GlobalAvgPool()
    if spec.op == "linear":
        return nn.Sequential(nn.Linear(spec.in_channels, spec.out_channels, bias=spec.bias), act)
    raise ValueError(f"No module builder for LayerSpec.op={spec.op!r}; add one to predictors/modules.py.")


def layer_input_shape(spec: LayerSpec) -> tuple[int, ...]:
    """Return the input shape of one image for ``spec``: ``(C,)`` for "linear", else ``(C, H, W)``."""
    if spec.op == "linear":
        return (spec.in_channels,)
    return (spec.in_channels, spec.in_size, spec.in_size)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm2d into the Conv2d before it, in place, and return the number folded.

    Three patterns are recognised among the children of one module: a ``Conv2d`` directly
    followed by a ``BatchNorm2d`` inside an ``nn.Sequential``; sibling attributes named
    ``conv<suffix>`` and ``bn<suffix>`` (timm's ResNet naming, also used by
    :mod:`nas.supernet.resnet`); and a ``Conv2d`` child registered right before a ``BatchNorm2d``
    child (the MobileNetV3 blocks of :mod:`nas.supernet.mobilenet`, named as timm names them:
    ``conv_pw`` then ``bn1``, ``conv_dw`` then ``bn2``). Only the exact classes ``nn.Conv2d`` and
    ``nn.BatchNorm2d`` are folded, so timm's own ``BatchNormAct2d`` and the supernets' sliceable
    layers stay as they are. The folded BatchNorm becomes an ``nn.Identity``. The sibling patterns
    trust that the BatchNorm consumes that convolution's output. Callers that cannot be sure should
    compare outputs before and after, as :func:`predictors.profiling.fold_batchnorm_checked` does.

    Raises:
        ValueError: if ``model`` is in training mode, because folding uses the running statistics.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode; call model.eval() first.")

    folded = 0
    for parent in list(model.modules()):
        for conv_name, bn_name in _conv_bn_pairs(parent):
            conv = getattr(parent, conv_name)
            bn = getattr(parent, bn_name)
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    logger.debug("Folded %d BatchNorm layers into convolutions.", folded)
    return folded


def _conv_bn_pairs(parent: nn.Module) -> list[tuple[str, str]]:
    """Return ``(conv_name, bn_name)`` child pairs of ``parent`` that can be folded."""
    children = dict(parent.named_children())
    names = list(children)
    # Registration order: in an nn.Sequential it is the order of the calls.
    pairs = list(zip(names[:-1], names[1:]))
    if not isinstance(parent, nn.Sequential):
        pairs = [(name, "bn" + name[len("conv"):]) for name in names if name.startswith("conv")] + pairs
    chosen: list[tuple[str, str]] = []
    used: set[str] = set()
    for conv_name, bn_name in pairs:
        if conv_name in used or bn_name in used or not _foldable(children.get(conv_name), children.get(bn_name)):
            continue
        chosen.append((conv_name, bn_name))
        used.update((conv_name, bn_name))
    return chosen


def _foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
    # Exact classes only: subclasses can change forward, as timm's BatchNormAct2d adds an activation
    # and the supernet's sliceable convolutions drop the bias that folding adds.
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )
