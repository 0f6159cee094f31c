"""Elastic ResNet: per-stage depth and width, basic or bottleneck blocks, optional elastic expand ratio.

Block type is a property of the space variant. With ImageNet settings (7x7 stem with max pooling,
stages of 64/128/256/512 basic blocks or 256/512/1024/2048 bottlenecks with expand ratio 0.25)
a subnet has the layer shapes and parameter count of timm's ``resnet18``/``resnet50`` family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from nas.spaces.base import Arch, SearchSpace, SpaceError, dataclass_from_mapping, register_space
from nas.spaces.layers import LayerSpec, conv_out_size

__all__ = ["ResNetArch", "ResNetSpace", "bottleneck_mid_channels"]


@dataclasses.dataclass
class StemConfig:
    channels: int
    kernel_size: int = 3
    stride: int = 1
    max_pool: bool = False


@dataclasses.dataclass
class StageConfig:
    depths: list[int]
    widths: list[int]
    stride: int = 1


@dataclasses.dataclass
class ResNetSpaceConfig:
    name: str
    family: str
    block: str
    in_channels: int
    num_classes: int
    resolutions: list[int]
    stem: StemConfig
    stages: list[StageConfig]
    expand_ratios: list[float] | None = None
    tail_aware: bool = False


@dataclasses.dataclass(frozen=True)
class ResNetArch(Arch):
    """One elastic-ResNet subnet.

    ``depths[i]`` and ``widths[i]`` are the block count and output channels of stage ``i``;
    ``expand_ratios[i]`` (bottleneck spaces only, empty otherwise) sets the inner width of stage
    ``i`` as a share of its output width; ``resolution`` is the input height and width in pixels.
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    expand_ratios: tuple[float, ...]
    resolution: int


def bottleneck_mid_channels(width: int, expand_ratio: float) -> int:
    """Inner channels of a bottleneck: ``width * expand_ratio`` rounded to a multiple of 8 (at least 8)."""
    return max(8, int(round(width * expand_ratio / 8.0)) * 8)


def _check_choices(values: Sequence[Any], where: str, positive: bool = True, integer: bool = True) -> None:
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0:
        raise SpaceError(f"{where} must be a non-empty list, but got {values!r}.")
    kinds = (int,) if integer else (int, float)
    if any(isinstance(v, bool) or not isinstance(v, kinds) for v in values):
        kind = "whole numbers" if integer else "numbers"
        raise SpaceError(f"{where} must contain {kind}, but got {list(values)}.")
    if positive and any(v <= 0 for v in values):
        raise SpaceError(f"{where} must contain positive values, but got {list(values)}.")
    if len(set(values)) != len(values):
        raise SpaceError(f"{where} must not repeat values, but got {list(values)}.")


@register_space("resnet")
class ResNetSpace(SearchSpace):
    """Elastic ResNet space; see ``conf/space/resnet.yaml`` for the fields."""

    arch_type = ResNetArch

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        cfg = dataclass_from_mapping(ResNetSpaceConfig, config, "space")
        cfg.stem = dataclass_from_mapping(StemConfig, cfg.stem, "space.stem")  # type: ignore[arg-type]
        if not isinstance(cfg.stages, Sequence) or not cfg.stages:
            raise SpaceError(f"space.stages must be a non-empty list of stages, but got {cfg.stages!r}.")
        cfg.stages = [
            dataclass_from_mapping(StageConfig, stage, f"space.stages[{i}]")  # type: ignore[arg-type]
            for i, stage in enumerate(cfg.stages)
        ]
        self.cfg = cfg
        self._check_config()

    def _check_config(self) -> None:
        cfg = self.cfg
        if cfg.block not in ("basic", "bottleneck"):
            raise SpaceError(f"space.block must be 'basic' or 'bottleneck', but got {cfg.block!r}.")
        for key in ("channels", "kernel_size", "stride"):
            value = getattr(cfg.stem, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpaceError(f"space.stem.{key} must be a whole number >= 1, but got {value!r}.")
        if not isinstance(cfg.stem.max_pool, bool):
            raise SpaceError(f"space.stem.max_pool must be true or false, but got {cfg.stem.max_pool!r}.")
        if not isinstance(cfg.tail_aware, bool):
            # Hydra's override parser reads only true and false as booleans, so "no" stays a string,
            # and Python counts a non-empty string as true.
            raise SpaceError(f"space.tail_aware must be true or false, but got {cfg.tail_aware!r}.")
        _check_choices(cfg.resolutions, "space.resolutions")
        for i, stage in enumerate(cfg.stages):
            _check_choices(stage.depths, f"space.stages[{i}].depths")
            _check_choices(stage.widths, f"space.stages[{i}].widths")
            if stage.stride not in (1, 2):
                raise SpaceError(f"space.stages[{i}].stride must be 1 or 2, but got {stage.stride}.")
        if cfg.block == "bottleneck":
            _check_choices(cfg.expand_ratios, "space.expand_ratios", integer=False)
        elif cfg.expand_ratios:
            raise SpaceError(
                f"space.expand_ratios={list(cfg.expand_ratios)} is only valid with block: bottleneck; "
                "remove it or set block: bottleneck."
            )
        if cfg.in_channels < 1 or cfg.num_classes < 2:
            raise SpaceError(
                f"space.in_channels must be >= 1 and space.num_classes >= 2, but got "
                f"{cfg.in_channels} and {cfg.num_classes}."
            )

    # -- decisions ---------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.cfg.stages)

    @property
    def expand_options(self) -> list[float]:
        return list(self.cfg.expand_ratios or [])

    def choices(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"resolution": sorted(self.cfg.resolutions)}
        for i, stage in enumerate(self.cfg.stages):
            out[f"depth_{i}"] = sorted(stage.depths)
            out[f"width_{i}"] = sorted(stage.widths)
            if self.cfg.block == "bottleneck":
                out[f"expand_{i}"] = sorted(self.expand_options)
        return out

    def canonical(self, arch: ResNetArch) -> ResNetArch:
        """Return ``arch`` with each expand ratio replaced by the smallest one that gives the same inner width.

        Inner widths are rounded to multiples of 8, so at a narrow stage width two ratios can build
        the same bottleneck (0.25 and 0.5 of 16 channels are both 8).
        """
        self.validate(arch)
        if not arch.expand_ratios:
            return arch
        ratios = tuple(
            min((r for r in self.expand_options
                 if bottleneck_mid_channels(width, r) == bottleneck_mid_channels(width, ratio)), default=ratio)
            for width, ratio in zip(arch.widths, arch.expand_ratios)
        )
        return dataclasses.replace(arch, expand_ratios=ratios)

    def arch_from_choices(self, values: Mapping[str, Any]) -> ResNetArch:
        n = self.num_stages
        arch = ResNetArch(
            depths=tuple(int(values[f"depth_{i}"]) for i in range(n)),
            widths=tuple(int(values[f"width_{i}"]) for i in range(n)),
            expand_ratios=tuple(float(values[f"expand_{i}"]) for i in range(n))
            if self.cfg.block == "bottleneck"
            else (),
            resolution=int(values["resolution"]),
        )
        self.validate(arch)
        return arch

    def _pick(self, pick_max: bool) -> ResNetArch:
        select = max if pick_max else min
        return self.arch_from_choices({key: select(options) for key, options in self.choices().items()})

    def largest(self) -> ResNetArch:
        return self._pick(True)

    def smallest(self) -> ResNetArch:
        return self._pick(False)

    def validate(self, arch: Arch) -> None:
        if not isinstance(arch, ResNetArch):
            raise SpaceError(f"Expected a ResNetArch for space {self.name!r}, but got {type(arch).__name__}.")
        n = self.num_stages
        expected_expand = n if self.cfg.block == "bottleneck" else 0
        for field, expected in (("depths", n), ("widths", n), ("expand_ratios", expected_expand)):
            if len(getattr(arch, field)) != expected:
                raise SpaceError(
                    f"arch.{field} must have {expected} entries for space {self.name!r}, "
                    f"but got {list(getattr(arch, field))}."
                )
        if arch.resolution not in self.cfg.resolutions:
            raise SpaceError(f"arch.resolution={arch.resolution} is not allowed; allowed values are {self.cfg.resolutions}.")
        for i, stage in enumerate(self.cfg.stages):
            if arch.depths[i] not in stage.depths:
                raise SpaceError(f"arch.depths[{i}]={arch.depths[i]} is not allowed; allowed values are {stage.depths}.")
            if arch.widths[i] not in stage.widths:
                raise SpaceError(f"arch.widths[{i}]={arch.widths[i]} is not allowed; allowed values are {stage.widths}.")
            if expected_expand and arch.expand_ratios[i] not in self.expand_options:
                raise SpaceError(
                    f"arch.expand_ratios[{i}]={arch.expand_ratios[i]} is not allowed; "
                    f"allowed values are {self.expand_options}."
                )

    # -- what the device runs ----------------------------------------------------------------
    def input_shape(self, arch: Arch) -> tuple[int, int, int]:
        assert isinstance(arch, ResNetArch)
        return (self.cfg.in_channels, arch.resolution, arch.resolution)

    def block_plan(self, arch: ResNetArch) -> list[dict[str, int]]:
        """Return one dict per active block: in/mid/out channels, stride, input size, stage and index."""
        size = conv_out_size(arch.resolution, self.cfg.stem.kernel_size, self.cfg.stem.stride)
        if self.cfg.stem.max_pool:
            size = conv_out_size(size, 3, 2)
        channels = self.cfg.stem.channels
        plan = []
        for i, stage in enumerate(self.cfg.stages):
            width = arch.widths[i]
            mid = bottleneck_mid_channels(width, arch.expand_ratios[i]) if self.cfg.block == "bottleneck" else width
            for j in range(arch.depths[i]):
                stride = stage.stride if j == 0 else 1
                plan.append(
                    {"stage": i, "index": j, "in": channels, "mid": mid, "out": width, "stride": stride, "size": size}
                )
                size = conv_out_size(size, 3, stride)
                channels = width
        return plan

    def layers(self, arch: Arch) -> list[LayerSpec]:
        assert isinstance(arch, ResNetArch)
        self.validate(arch)
        stem = self.cfg.stem
        out = [
            LayerSpec("conv", self.cfg.in_channels, stem.channels, arch.resolution, stem.kernel_size, stem.stride, act="relu")
        ]
        if stem.max_pool:
            size = conv_out_size(arch.resolution, stem.kernel_size, stem.stride)
            out.append(LayerSpec("maxpool", stem.channels, stem.channels, size, 3, 2))
        for block in self.block_plan(arch):
            out.extend(self._block_layers(block))
        last = arch.widths[-1]
        final_size = out[-1].out_size
        out.append(LayerSpec("gap", last, last, final_size))
        out.append(LayerSpec("linear", last, self.cfg.num_classes, 1))
        return out

    def _block_layers(self, b: Mapping[str, int]) -> list[LayerSpec]:
        size, stride = b["size"], b["stride"]
        out_size = conv_out_size(size, 3, stride)
        if self.cfg.block == "basic":
            layers = [
                LayerSpec("conv", b["in"], b["out"], size, 3, stride, act="relu"),
                LayerSpec("conv", b["out"], b["out"], out_size, 3, 1, act="none"),
            ]
        else:
            layers = [
                LayerSpec("conv", b["in"], b["mid"], size, 1, 1, act="relu"),
                LayerSpec("conv", b["mid"], b["mid"], size, 3, stride, act="relu"),
                LayerSpec("conv", b["mid"], b["out"], out_size, 1, 1, act="none"),
            ]
        if stride != 1 or b["in"] != b["out"]:
            layers.append(LayerSpec("conv", b["in"], b["out"], size, 1, stride, act="none"))
        layers.append(LayerSpec("add", b["out"], b["out"], out_size, act="relu"))
        return layers

    # -- models ------------------------------------------------------------------------------
    def build_supernet(self) -> Any:
        from nas.supernet.resnet import ElasticResNet

        return ElasticResNet(self)

    def width_choices(self) -> dict[str, list[int]]:
        return {f"width_{i}": sorted(stage.widths) for i, stage in enumerate(self.cfg.stages)}

    def with_width_choices(self, widths: Mapping[str, Sequence[int]]) -> ResNetSpace:
        config = {**self.raw_config, "stages": [dict(dataclasses.asdict(s)) for s in self.cfg.stages]}
        for key, values in widths.items():
            index = int(key.split("_")[1])
            if max(values) > max(self.cfg.stages[index].widths):
                raise SpaceError(
                    f"{key} values {sorted(values)} exceed the supernet's widest {max(self.cfg.stages[index].widths)}."
                )
            config["stages"][index]["widths"] = sorted(set(int(v) for v in values))
        return ResNetSpace(config)
