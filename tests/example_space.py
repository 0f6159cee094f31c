"""A complete small search-space family with its own block: elastic depth and width of separable convolutions.

docs/spaces.md shows this file, and the contract tests run it like the built-in families.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from nas.spaces import Arch, LayerSpec, SearchSpace, SpaceError, dataclass_from_mapping, register_space
from nas.spaces.layers import conv_out_size
from nas.supernet import DynamicBatchNorm2d, DynamicConv2d, DynamicLinear, Supernet


# A layer class: the plain torch.nn one for subnets, the sliceable one from nas.supernet for the supernet.
LayerFactory = Callable[..., nn.Module]


@dataclasses.dataclass
class StageConfig:
    depths: list[int]
    widths: list[int]


@dataclasses.dataclass
class SeparableSpaceConfig:
    name: str
    family: str
    in_channels: int
    num_classes: int
    resolutions: list[int]
    stages: list[StageConfig]


@dataclasses.dataclass(frozen=True)
class SeparableArch(Arch):
    """``depths[i]`` blocks of ``widths[i]`` channels in stage ``i``, for inputs of ``resolution`` pixels."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    resolution: int


class SeparableBlock(nn.Module):
    """3x3 depthwise convolution (BatchNorm, ReLU), then 1x1 pointwise convolution (BatchNorm, ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, conv: LayerFactory = nn.Conv2d,
                 bn: LayerFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv_dw = conv(in_channels, in_channels, 3, stride, padding=1, groups=in_channels, bias=False)
        self.bn1 = bn(in_channels)
        self.conv_pw = conv(in_channels, out_channels, 1, bias=False)
        self.bn2 = bn(out_channels)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv_dw(x)))
        return self.act(self.bn2(self.conv_pw(x)))


@register_space("separable")
class SeparableSpace(SearchSpace):
    """Stages of separable blocks. Every stage after the first halves the resolution in its first block."""

    arch_type = SeparableArch

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        self.cfg = dataclass_from_mapping(SeparableSpaceConfig, config, "space")
        self.cfg.stages = [
            dataclass_from_mapping(StageConfig, stage, f"space.stages[{i}]")  # type: ignore[arg-type]
            for i, stage in enumerate(self.cfg.stages)
        ]

    def choices(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"resolution": sorted(self.cfg.resolutions)}
        for i, stage in enumerate(self.cfg.stages):
            out[f"depth_{i}"] = sorted(stage.depths)
            out[f"width_{i}"] = sorted(stage.widths)
        return out

    def arch_from_choices(self, values: Mapping[str, Any]) -> SeparableArch:
        n = len(self.cfg.stages)
        arch = SeparableArch(
            depths=tuple(int(values[f"depth_{i}"]) for i in range(n)),
            widths=tuple(int(values[f"width_{i}"]) for i in range(n)),
            resolution=int(values["resolution"]),
        )
        self.validate(arch)
        return arch

    def largest(self) -> SeparableArch:
        return self.arch_from_choices({key: max(options) for key, options in self.choices().items()})

    def smallest(self) -> SeparableArch:
        return self.arch_from_choices({key: min(options) for key, options in self.choices().items()})

    def validate(self, arch: Arch) -> None:
        if not isinstance(arch, SeparableArch):
            raise SpaceError(f"Expected a SeparableArch for space {self.name!r}, but got {type(arch).__name__}.")
        n = len(self.cfg.stages)
        if len(arch.depths) != n or len(arch.widths) != n:
            raise SpaceError(f"arch.depths and arch.widths must have {n} entries, but got {arch.depths} and {arch.widths}.")
        if arch.resolution not in self.cfg.resolutions:
            raise SpaceError(f"arch.resolution={arch.resolution} is not allowed; allowed values are {self.cfg.resolutions}.")
        for i, stage in enumerate(self.cfg.stages):
            if arch.depths[i] not in stage.depths:
                raise SpaceError(f"arch.depths[{i}]={arch.depths[i]} is not allowed; allowed values are {stage.depths}.")
            if arch.widths[i] not in stage.widths:
                raise SpaceError(f"arch.widths[{i}]={arch.widths[i]} is not allowed; allowed values are {stage.widths}.")

    def input_shape(self, arch: Arch) -> tuple[int, int, int]:
        assert isinstance(arch, SeparableArch)
        return (self.cfg.in_channels, arch.resolution, arch.resolution)

    def block_plan(self, arch: SeparableArch) -> list[tuple[int, int, int, int, int]]:
        """Return (stage, index, in_channels, out_channels, stride) for each active block."""
        channels, plan = self.cfg.in_channels, []
        for i in range(len(self.cfg.stages)):
            for j in range(arch.depths[i]):
                plan.append((i, j, channels, arch.widths[i], 2 if i > 0 and j == 0 else 1))
                channels = arch.widths[i]
        return plan

    def layers(self, arch: Arch) -> list[LayerSpec]:
        assert isinstance(arch, SeparableArch)
        self.validate(arch)
        size, out = arch.resolution, []
        for _, _, cin, cout, stride in self.block_plan(arch):
            out.append(LayerSpec("conv", cin, cin, size, 3, stride, groups=cin, act="relu"))
            size = conv_out_size(size, 3, stride)
            out.append(LayerSpec("conv", cin, cout, size, 1, 1, act="relu"))
        out.append(LayerSpec("gap", arch.widths[-1], arch.widths[-1], size))
        out.append(LayerSpec("linear", arch.widths[-1], self.cfg.num_classes, 1))
        return out

    def build_supernet(self) -> ElasticSeparableNet:
        return ElasticSeparableNet(self)


def build_layers(net: nn.Module, space: SeparableSpace, arch: SeparableArch, conv: LayerFactory = nn.Conv2d,
                 bn: LayerFactory = nn.BatchNorm2d, linear: LayerFactory = nn.Linear) -> None:
    """Add the stages and the classifier of ``arch`` to ``net``, with the given layer classes."""
    net.stages = nn.ModuleList(nn.Sequential() for _ in space.cfg.stages)
    for stage, _, cin, cout, stride in space.block_plan(arch):
        net.stages[stage].append(SeparableBlock(cin, cout, stride, conv, bn))
    net.classifier = linear(arch.widths[-1], space.cfg.num_classes)


class SeparableSubnet(nn.Module):
    """The plain network of one architecture; module names match the supernet's, so extraction is a slice."""

    def __init__(self, space: SeparableSpace, arch: SeparableArch) -> None:
        super().__init__()
        build_layers(self, space, arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.classifier(x.mean((2, 3)))


class ElasticSeparableNet(Supernet):
    """The largest architecture built from sliceable layers. ``forward`` runs the active subnet."""

    def __init__(self, space: SeparableSpace) -> None:
        super().__init__(space)
        build_layers(self, space, space.largest(), DynamicConv2d, DynamicBatchNorm2d, DynamicLinear)
        self.set_active(space.largest())

    def set_active(self, arch: SeparableArch) -> None:
        self.space.validate(arch)
        for stage, index, _, cout, _ in self.space.block_plan(arch):
            self.stages[stage][index].conv_pw.active_out = cout
        self.active_arch = arch

    def build_static(self, arch: SeparableArch) -> SeparableSubnet:
        return SeparableSubnet(self.space, arch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage, depth in zip(self.stages, self.active_arch.depths):
            for block in stage[:depth]:
                x = block(x)
        return self.classifier(x.mean((2, 3)))


# The configuration that a YAML file under conf/space/ would contain, with MNIST's channels and classes.
EXAMPLE_CONFIG: dict[str, Any] = {
    "name": "separable_example",
    "family": "separable",
    "in_channels": 1,
    "num_classes": 10,
    "resolutions": [24, 28],
    "stages": [
        {"depths": [1, 2], "widths": [8, 16]},
        {"depths": [1, 2], "widths": [16, 24, 32]},
    ],
}
