"""Elastic MobileNetV3 supernet (Once-for-All's scheme) and the static subnet it exports.

Elastic kernel: each depthwise convolution keeps a 7x7 filter, smaller kernels are centre crops
passed through learned transforms (:class:`~nas.supernet.dynamic.DynamicDepthwiseConv2d`).
Elastic expand ratio: a block runs the leading ``mid`` channels of its widest expansion. Elastic
depth: a stage runs its first ``d`` blocks.

Module names follow timm's ``MobileNetV3`` (``conv_stem``, ``bn1``, ``blocks.<stage>.<block>.conv_pw``,
``conv_dw``, ``se.conv_reduce``, ``conv_pwl``, ``blocks.6.0.conv``, ``conv_head``, ``classifier``),
so an extracted subnet's state dict loads into the matching timm model unchanged and extraction
is a name-by-name slice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nas.spaces.mobilenet import NUM_STAGES, SE_REDUCTION, STAGE_ACTS, STAGE_SE, MobileNetV3Arch, MobileNetV3Space
from nas.spaces.mobilenet import make_divisible
from nas.supernet.base import Supernet
from nas.supernet.dynamic import DynamicBatchNorm2d, DynamicConv2d, DynamicDepthwiseConv2d, DynamicSqueezeExcite

__all__ = [
    "ElasticMobileNetV3",
    "MobileNetV3Subnet",
    "InvertedResidual",
    "DepthwiseSeparable",
    "SqueezeExcite",
]


def _activation(name: str) -> nn.Module:
    return nn.Hardswish() if name == "hswish" else nn.ReLU()


class SqueezeExcite(nn.Module):
    """Static squeeze-and-excitation: pool, 1x1 reduce (bias), ReLU, 1x1 expand (bias), hard sigmoid, scale."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act1 = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True)))
        return x * self.gate(self.conv_expand(scale))


class DepthwiseSeparable(nn.Module):
    """The fixed first block: 3x3 depthwise convolution (BatchNorm, ReLU), then a 1x1 projection with BatchNorm."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(in_channels, in_channels, 3, stride, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = nn.ReLU()
        self.conv_pw = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_dw(x)))
        out = self.bn2(self.conv_pw(out))
        return out + x if self.residual else out


class InvertedResidual(nn.Module):
    """1x1 expansion, kxk depthwise (with the stride), optional squeeze-and-excitation, 1x1 projection.

    With ``elastic=True`` every layer stores the widest weights, and ``set_active`` chooses the expanded
    width, the kernel size and the squeeze-and-excitation width. Otherwise the block is a plain
    module with ``kernel_sizes == [k]``. A residual is added when ``stride == 1`` and the input and
    output widths match, and the sum has no activation.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, kernel_sizes: list[int], stride: int,
                 act: str, se_channels: int, elastic: bool) -> None:
        super().__init__()
        if elastic:
            self.conv_pw: nn.Module = DynamicConv2d(in_channels, mid_channels, 1, bias=False)
            self.bn1: nn.Module = DynamicBatchNorm2d(mid_channels)
            self.conv_dw: nn.Module = DynamicDepthwiseConv2d(mid_channels, kernel_sizes, stride)
            self.bn2: nn.Module = DynamicBatchNorm2d(mid_channels)
        else:
            (kernel,) = kernel_sizes
            self.conv_pw = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(mid_channels)
            self.conv_dw = nn.Conv2d(mid_channels, mid_channels, kernel, stride, kernel // 2, groups=mid_channels, bias=False)
            self.bn2 = nn.BatchNorm2d(mid_channels)
        self.act1 = _activation(act)
        self.act2 = _activation(act)

        self.se: nn.Module = nn.Identity()
        if se_channels:
            self.se = DynamicSqueezeExcite(mid_channels, se_channels) if elastic else SqueezeExcite(mid_channels, se_channels)

        self.conv_pwl: nn.Module = (DynamicConv2d if elastic else nn.Conv2d)(mid_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def set_active(self, mid_channels: int, kernel_size: int, se_channels: int) -> None:
        """Choose the expanded width, the depthwise kernel size and the squeeze-and-excitation width (elastic only)."""
        self.conv_pw.active_out = mid_channels
        self.conv_dw.active_kernel = kernel_size
        if isinstance(self.se, DynamicSqueezeExcite):
            self.se.active_reduced = se_channels

    @torch.no_grad()
    def sort_channels(self, tiers: list[int]) -> None:
        """Reorder the expanded channels by importance, most important first (elastic only).

        Importance is the L1 norm of each channel's projection weights. ``tiers`` are the widths
        that already serve smaller expand ratios. Channels never move across such a width, so
        subnets trained before keep their channels. The squeeze-and-excitation hidden channels
        follow the same rule at their own widths. The widest subnet computes the same function
        before and after.
        """
        order = _tiered_order(self.conv_pwl.weight.abs().sum(dim=(0, 2, 3)), tiers)
        self.conv_pwl.weight.copy_(self.conv_pwl.weight[:, order])
        self.conv_dw.weight.copy_(self.conv_dw.weight[order])
        self.conv_pw.weight.copy_(self.conv_pw.weight[order])
        _permute_batchnorm(self.bn1, order)
        _permute_batchnorm(self.bn2, order)
        if isinstance(self.se, DynamicSqueezeExcite):
            _sort_squeeze_excite(self.se, order, [make_divisible(width // SE_REDUCTION) for width in tiers])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv_pw(x)))
        out = self.act2(self.bn2(self.conv_dw(out)))
        out = self.se(out)
        out = self.bn3(self.conv_pwl(out))
        return out + x if self.residual else out


def _permute_batchnorm(norm: nn.BatchNorm2d, order: torch.Tensor) -> None:
    for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
        tensor.copy_(tensor[order])


def _tiered_order(importance: torch.Tensor, tiers: list[int]) -> torch.Tensor:
    """Return the channel order by descending ``importance`` in which no channel crosses a width in ``tiers``."""
    tier = torch.zeros_like(importance)
    for width in sorted(tiers):
        tier[width:] += 1
    return torch.argsort(tier * (importance.max() + 1) * 2 - importance, stable=True)


def _sort_squeeze_excite(se: DynamicSqueezeExcite, order: torch.Tensor, tiers: list[int]) -> None:
    """Follow the expanded channels' new ``order``, then sort the hidden channels by importance within ``tiers``.

    ``tiers`` are the hidden widths of the expand ratios already trained. Once-for-All sorts the
    hidden channels freely, which changes the subnets trained at those ratios; here they keep them.
    """
    se.conv_reduce.weight.copy_(se.conv_reduce.weight[:, order])
    se.conv_expand.weight.copy_(se.conv_expand.weight[order])
    se.conv_expand.bias.copy_(se.conv_expand.bias[order])

    hidden = _tiered_order(se.conv_expand.weight.abs().sum(dim=(0, 2, 3)), tiers)
    se.conv_expand.weight.copy_(se.conv_expand.weight[:, hidden])
    se.conv_reduce.weight.copy_(se.conv_reduce.weight[hidden])
    se.conv_reduce.bias.copy_(se.conv_reduce.bias[hidden])


class ConvBnAct(nn.Module):
    """1x1 convolution, BatchNorm, h-swish: the final expand layer (timm's ``ConvBnAct`` names)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn1(self.conv(x)))


class _MobileNetV3Body(nn.Module):
    """Stem, first block, final expand and head; shared by the supernet and the static subnet.

    ``blocks`` contains seven stages: the first block, the five elastic stages and the final expand.
    """

    def _build_fixed(self, space: MobileNetV3Space, stages: list[nn.Sequential]) -> None:
        widths = space.widths
        self.conv_stem = nn.Conv2d(space.cfg.in_channels, widths[0], 3, space.cfg.stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.Hardswish()
        first = nn.Sequential(DepthwiseSeparable(widths[0], widths[1], space.cfg.strides[0]))
        final = nn.Sequential(ConvBnAct(widths[6], widths[7]))
        self.blocks = nn.Sequential(first, *stages, final)
        self.conv_head = nn.Conv2d(widths[7], widths[8], 1, bias=False)
        self.act2 = nn.Hardswish()
        self.dropout = nn.Dropout(space.cfg.dropout_rate)
        self.classifier = nn.Linear(widths[8], space.cfg.num_classes)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[-1](x)
        x = self.act2(self.conv_head(x.mean((2, 3), keepdim=True)))
        return self.classifier(self.dropout(torch.flatten(x, 1)))

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](self.act1(self.bn1(self.conv_stem(x))))


def _init_weights(model: nn.Module) -> None:
    """He (fan-out) normal convolutions, unit BatchNorm, zero biases: the initialisation OFA uses."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)


class MobileNetV3Subnet(_MobileNetV3Body):
    """A plain MobileNetV3 for one architecture of a :class:`MobileNetV3Space`; input (N, C, r, r), output (N, classes)."""

    def __init__(self, space: MobileNetV3Space, arch: MobileNetV3Arch) -> None:
        super().__init__()
        space.validate(arch)
        self.arch = arch
        stages: list[list[nn.Module]] = [[] for _ in range(NUM_STAGES)]
        for b in space.block_plan(arch):
            stages[b.stage].append(
                InvertedResidual(b.in_channels, b.mid_channels, b.out_channels, [b.kernel_size], b.stride, b.act,
                                 b.se_channels, elastic=False)
            )
        self._build_fixed(space, [nn.Sequential(*blocks) for blocks in stages])
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for stage in self.blocks[1:-1]:
            x = stage(x)
        return self.forward_head(x)


class ElasticMobileNetV3(_MobileNetV3Body, Supernet):
    """The weight-sharing supernet of a :class:`MobileNetV3Space`: deepest stages, widest expansion, 7x7 kernels."""

    def __init__(self, space: MobileNetV3Space) -> None:
        Supernet.__init__(self, space)
        cfg, widths = space.cfg, space.widths
        stages = []
        for stage in range(NUM_STAGES):
            blocks = []
            for index in range(space.max_depth):
                in_channels = widths[stage + 1] if index == 0 else widths[stage + 2]
                mid = make_divisible(round(in_channels * max(cfg.expand_ratios)))
                se_channels = make_divisible(mid // SE_REDUCTION) if STAGE_SE[stage] else 0
                stride = cfg.strides[stage + 1] if index == 0 else 1
                blocks.append(
                    InvertedResidual(in_channels, mid, widths[stage + 2], cfg.kernel_sizes, stride, STAGE_ACTS[stage],
                                     se_channels, elastic=True)
                )
            stages.append(nn.Sequential(*blocks))
        self._build_fixed(space, stages)
        _init_weights(self)
        self.set_active(space.largest())

    def set_active(self, arch: MobileNetV3Arch) -> None:
        self.space.validate(arch)
        for b in self.space.block_plan(arch):
            self.blocks[b.stage + 1][b.index].set_active(b.mid_channels, b.kernel_size, b.se_channels)
        self.active_arch = arch

    def build_static(self, arch: MobileNetV3Arch) -> MobileNetV3Subnet:
        return MobileNetV3Subnet(self.space, arch)

    def sort_expanded_channels(self, expand_stage: int = 0) -> None:
        """Put each block's most important expanded channels first, as OFA does before elastic-expand training.

        ``expand_stage`` counts the smaller expand ratios already trained: with ratios [3, 4, 6] and
        ``expand_stage=1`` the channels of ratio 4 stay within its width, while stage 0 sorts freely.
        OFA separates the tiers by adding large offsets to float32 importances, which rounds them, so
        its order of nearly equal channels can differ from this exact sort.
        """
        ratios = sorted(self.space.cfg.expand_ratios, reverse=True)
        if not 0 <= expand_stage < len(ratios):
            raise ValueError(f"expand_stage must be in [0, {len(ratios) - 1}], but got {expand_stage}.")
        for stage in range(NUM_STAGES):
            for block in self.blocks[stage + 1]:
                in_channels = block.conv_pw.in_channels
                tiers = [make_divisible(round(in_channels * ratio)) for ratio in ratios[1 : expand_stage + 1]]
                block.sort_channels(tiers)

    def kernel_transforms(self, arch: MobileNetV3Arch) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Map each active depthwise weight to its kernel transform (centre crops through the learned matrices)."""
        transforms: dict[str, Any] = {}
        for b in self.space.block_plan(arch):
            conv = self.blocks[b.stage + 1][b.index].conv_dw
            transforms[f"blocks.{b.stage + 1}.{b.index}.conv_dw.weight"] = _kernel_transform(conv, b.kernel_size)
        return transforms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for stage, depth in enumerate(self.active_arch.d):
            blocks = self.blocks[stage + 1]
            for index in range(depth):
                x = blocks[index](x)
        return self.forward_head(x)


def _kernel_transform(conv: DynamicDepthwiseConv2d, kernel_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    @torch.no_grad()
    def transform(weight: torch.Tensor) -> torch.Tensor:
        return conv.transform_kernel(weight, kernel_size)

    return transform
