"""Elastic MobileNetV3 in Once-for-All's encoding: per-block kernel size and expand ratio, per-stage depth.

With ImageNet settings (``conf/space/mobilenet_imagenet.yaml``) this is the space of Once-for-All's
``ofa_mbv3_d234_e346_k357_w1.0`` network (``..._w1.2`` with ``width_mult: 1.2``): a subnet has the
layer shapes and parameter count of OFA's own subnet in that configuration. The structural facts
below come from OFA's public code (mit-han-lab/once-for-all, ``ofa_mbv3.py``, ``dynamic_layers.py``,
``pytorch_modules.py``):

- stem: 3x3 convolution with stride 2, BatchNorm and h-swish, then one depthwise-separable block
  (3x3 depthwise, ReLU, 1x1 projection) with a residual when its input and output widths match;
- five elastic stages of 16/24/40/80/112/160 base widths (stem, first block, then one per stage),
  strides 2, 2, 2, 1, 2, ReLU in the first two stages and h-swish after, squeeze-and-excitation
  in stages 2, 4 and 5; the first block of a stage carries the stride, the others have residuals;
- an inverted-residual block expands to ``make_divisible(in_channels * e, 8)`` channels and its
  squeeze-and-excitation reduces to ``make_divisible(mid // 4, 8)`` channels;
- head: 1x1 "final expand" convolution to 960 channels (BatchNorm, h-swish), global average pooling,
  1x1 "feature mix" convolution to 1280 channels without BatchNorm or bias (h-swish), dropout and a
  linear classifier;
- every width is ``make_divisible(base * width_mult, 8)``.

Architectures use OFA's keys: ``ks`` and ``e`` hold one entry per block slot (stage ``i`` uses slots
``i * max_depth .. i * max_depth + d[i] - 1``; the rest are ignored but still validated), ``d`` one
depth per stage and ``r`` the input resolution in pixels.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from nas.spaces.base import Arch, SearchSpace, SpaceError, dataclass_from_mapping, register_space
from nas.spaces.layers import LayerSpec, conv_out_size

__all__ = [
    "MobileNetV3Arch",
    "MobileNetV3Space",
    "BlockPlan",
    "make_divisible",
    "OFA_BASE_WIDTHS",
    "OFA_STRIDES",
    "NUM_STAGES",
]

# Stem, first block, five elastic stages, final expand, feature mix (OFA's MobileNetV3 at w1.0).
OFA_BASE_WIDTHS = (16, 16, 24, 40, 80, 112, 160, 960, 1280)
# First block, then the five elastic stages.
OFA_STRIDES = (1, 2, 2, 2, 1, 2)
STAGE_ACTS = ("relu", "relu", "hswish", "hswish", "hswish")
STAGE_SE = (False, True, False, True, True)
NUM_STAGES = 5
CHANNEL_DIVISOR = 8
SE_REDUCTION = 4


def make_divisible(value: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` (at least ``divisor``).

    The result is raised by one ``divisor`` when plain rounding would lose more than 10% of
    ``value``. This is the rounding rule of the TensorFlow MobileNet reference that OFA and timm use.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclasses.dataclass
class MobileNetV3SpaceConfig:
    """Fields of a ``family: mobilenet`` space YAML; see ``conf/space/mobilenet_imagenet.yaml``."""

    name: str
    family: str
    in_channels: int
    num_classes: int
    resolutions: list[int]
    width_mult: float = 1.0
    base_widths: list[int] = dataclasses.field(default_factory=lambda: list(OFA_BASE_WIDTHS))
    stem_stride: int = 2
    strides: list[int] = dataclasses.field(default_factory=lambda: list(OFA_STRIDES))
    kernel_sizes: list[int] = dataclasses.field(default_factory=lambda: [3, 5, 7])
    expand_ratios: list[int] = dataclasses.field(default_factory=lambda: [3, 4, 6])
    depths: list[int] = dataclasses.field(default_factory=lambda: [2, 3, 4])
    dropout_rate: float = 0.1


def _as_int(value: Any, where: str) -> int:
    """Return ``value`` as an int, accepting integral floats (JSON may write 4.0) and rejecting the rest."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise SpaceError(f"{where} must be an integer, but got {value!r}.")
    return int(value)


def _int_tuple(values: Any, where: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise SpaceError(f"{where} must be a list of integers, but got {values!r}.")
    return tuple(_as_int(v, f"{where}[{i}]") for i, v in enumerate(values))


@dataclasses.dataclass(frozen=True)
class MobileNetV3Arch(Arch):
    """One elastic-MobileNetV3 subnet in Once-for-All's encoding.

    ``ks[slot]`` and ``e[slot]`` are the depthwise kernel size and expand ratio of each block slot,
    ``d[i]`` the number of active blocks of stage ``i`` (its first ``d[i]`` slots), and ``r`` the
    input height and width in pixels.
    """

    ks: tuple[int, ...]
    e: tuple[int, ...]
    d: tuple[int, ...]
    r: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MobileNetV3Arch:
        """Build an architecture from OFA's encoding.

        Besides ``{"ks", "e", "d", "r"}`` this accepts the forms OFA's own tools write: ``r`` as a
        one-element list (``"r": [224]``), ``image_size`` in place of ``r``, and ``"wid": null``
        (OFA's MobileNetV3 has no elastic width, so any other ``wid`` is rejected).
        """
        if not isinstance(data, Mapping):
            raise SpaceError(f"A MobileNetV3 architecture must be a mapping, but got {type(data).__name__}: {data!r}.")
        values = dict(data)
        if "wid" in values:
            wid = values.pop("wid")
            if wid is not None:
                raise SpaceError(f"arch.wid must be null for MobileNetV3 (no elastic width), but got {wid!r}.")
        if "image_size" in values:
            if "r" in values:
                raise SpaceError("Architecture has both 'r' and 'image_size'; keep one of them (they mean the same).")
            values["r"] = values.pop("image_size")
        resolution = values.get("r")
        if isinstance(resolution, (list, tuple)):
            if len(resolution) != 1:
                raise SpaceError(f"arch.r must be one resolution, but got the list {list(resolution)}.")
            values["r"] = resolution[0]

        arch = super().from_dict(values)
        assert isinstance(arch, MobileNetV3Arch)
        return cls(
            ks=_int_tuple(arch.ks, "arch.ks"),
            e=_int_tuple(arch.e, "arch.e"),
            d=_int_tuple(arch.d, "arch.d"),
            r=_as_int(arch.r, "arch.r"),
        )


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """One active inverted-residual block: channels, kernel, stride and input size in pixels."""

    stage: int
    index: int
    slot: int
    in_channels: int
    mid_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    act: str
    se_channels: int  # 0 when the block has no squeeze-and-excitation
    in_size: int

    @property
    def out_size(self) -> int:
        return conv_out_size(self.in_size, self.kernel_size, self.stride)

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


@functools.lru_cache(maxsize=8192)
def _block_layers(b: BlockPlan) -> tuple[LayerSpec, ...]:
    """Return the units of one inverted-residual block; cached because subnets share most blocks."""
    layers = [
        LayerSpec("conv", b.in_channels, b.mid_channels, b.in_size, 1, 1, act=b.act),
        LayerSpec("conv", b.mid_channels, b.mid_channels, b.in_size, b.kernel_size, b.stride,
                  groups=b.mid_channels, act=b.act),
    ]
    if b.se_channels:
        layers.append(LayerSpec("se", b.mid_channels, b.se_channels, b.out_size))
    layers.append(LayerSpec("conv", b.mid_channels, b.out_channels, b.out_size, 1, 1, act="none"))
    if b.residual:
        layers.append(LayerSpec("add", b.out_channels, b.out_channels, b.out_size))
    return tuple(layers)


def _check_options(values: Any, where: str, allowed: Sequence[int] | None = None) -> list[int]:
    """Validate a list of allowed values from the space YAML and return it as plain ints."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise SpaceError(f"{where} must be a non-empty list, but got {values!r}.")
    out = [_as_int(v, where) for v in values]
    if len(set(out)) != len(out):
        raise SpaceError(f"{where} must not repeat values, but got {out}.")
    if any(v < 1 for v in out):
        raise SpaceError(f"{where} must contain positive values, but got {out}.")
    if allowed is not None and any(v not in allowed for v in out):
        raise SpaceError(f"{where} values must be among {list(allowed)}, but got {out}.")
    return out


@register_space("mobilenet")
class MobileNetV3Space(SearchSpace):
    """Elastic MobileNetV3 space (Once-for-All's); see ``conf/space/mobilenet_imagenet.yaml`` for the fields."""

    arch_type = MobileNetV3Arch

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        cfg = dataclass_from_mapping(MobileNetV3SpaceConfig, config, "space")
        cfg.resolutions = _check_options(cfg.resolutions, "space.resolutions")
        cfg.kernel_sizes = _check_options(cfg.kernel_sizes, "space.kernel_sizes", allowed=(1, 3, 5, 7, 9))
        cfg.expand_ratios = _check_options(cfg.expand_ratios, "space.expand_ratios")
        cfg.depths = _check_options(cfg.depths, "space.depths")
        cfg.base_widths = _int_tuple(cfg.base_widths, "space.base_widths")  # type: ignore[assignment]
        cfg.strides = _int_tuple(cfg.strides, "space.strides")  # type: ignore[assignment]
        self.cfg = cfg
        self._check_config()

        self.widths = tuple(make_divisible(w * cfg.width_mult) for w in cfg.base_widths)
        self.max_depth = max(cfg.depths)
        self.num_slots = NUM_STAGES * self.max_depth

    def _check_config(self) -> None:
        cfg = self.cfg
        if len(cfg.base_widths) != 9 or min(cfg.base_widths) < 1:
            raise SpaceError(
                "space.base_widths must be 9 positive widths (stem, first block, five stages, final expand, "
                f"feature mix), for example {list(OFA_BASE_WIDTHS)}, but got {list(cfg.base_widths)}."
            )
        if len(cfg.strides) != 6 or any(s not in (1, 2) for s in cfg.strides):
            raise SpaceError(
                "space.strides must be 6 strides of 1 or 2 (first block, then the five stages), for example "
                f"{list(OFA_STRIDES)}, but got {list(cfg.strides)}."
            )
        if cfg.stem_stride not in (1, 2):
            raise SpaceError(f"space.stem_stride must be 1 or 2, but got {cfg.stem_stride!r}.")
        if not isinstance(cfg.width_mult, (int, float)) or cfg.width_mult <= 0:
            raise SpaceError(f"space.width_mult must be a positive number such as 1.0 or 1.2, but got {cfg.width_mult!r}.")
        if not 0.0 <= cfg.dropout_rate < 1.0:
            raise SpaceError(f"space.dropout_rate must be in [0, 1), but got {cfg.dropout_rate!r}.")
        if cfg.in_channels < 1 or cfg.num_classes < 2:
            raise SpaceError(
                f"space.in_channels must be >= 1 and space.num_classes >= 2, but got {cfg.in_channels} and {cfg.num_classes}."
            )

    # -- decisions ---------------------------------------------------------------------------
    def choices(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"r": sorted(self.cfg.resolutions)}
        for i in range(NUM_STAGES):
            out[f"d_{i}"] = sorted(self.cfg.depths)
        for slot in range(self.num_slots):
            out[f"ks_{slot}"] = sorted(self.cfg.kernel_sizes)
        for slot in range(self.num_slots):
            out[f"e_{slot}"] = sorted(self.cfg.expand_ratios)
        return out

    def arch_from_choices(self, values: Mapping[str, Any]) -> MobileNetV3Arch:
        missing = [key for key in self.choices() if key not in values]
        if missing:
            raise SpaceError(f"Decision values are missing {missing[:5]}{'...' if len(missing) > 5 else ''}.")
        arch = MobileNetV3Arch(
            ks=tuple(int(values[f"ks_{slot}"]) for slot in range(self.num_slots)),
            e=tuple(int(values[f"e_{slot}"]) for slot in range(self.num_slots)),
            d=tuple(int(values[f"d_{i}"]) for i in range(NUM_STAGES)),
            r=int(values["r"]),
        )
        self.validate(arch)
        return arch

    def _pick(self, pick_max: bool) -> MobileNetV3Arch:
        select = max if pick_max else min
        return self.arch_from_choices({key: select(options) for key, options in self.choices().items()})

    def largest(self) -> MobileNetV3Arch:
        return self._pick(True)

    def smallest(self) -> MobileNetV3Arch:
        return self._pick(False)

    def validate(self, arch: Arch) -> None:
        if not isinstance(arch, MobileNetV3Arch):
            raise SpaceError(f"Expected a MobileNetV3Arch for space {self.name!r}, but got {type(arch).__name__}.")
        for field, expected in (("ks", self.num_slots), ("e", self.num_slots), ("d", NUM_STAGES)):
            if len(getattr(arch, field)) != expected:
                raise SpaceError(
                    f"arch.{field} must have {expected} entries for space {self.name!r}, "
                    f"but got {len(getattr(arch, field))}: {list(getattr(arch, field))}."
                )
        if arch.r not in self.cfg.resolutions:
            raise SpaceError(f"arch.r={arch.r} is not allowed; allowed values are {sorted(self.cfg.resolutions)}.")
        for field, allowed in (("d", self.cfg.depths), ("ks", self.cfg.kernel_sizes), ("e", self.cfg.expand_ratios)):
            for i, value in enumerate(getattr(arch, field)):
                if value not in allowed:
                    raise SpaceError(f"arch.{field}[{i}]={value} is not allowed; allowed values are {sorted(allowed)}.")

    def canonical(self, arch: MobileNetV3Arch) -> MobileNetV3Arch:
        """Return ``arch`` with the ignored slots (beyond each stage's depth) set to the smallest values.

        Two architectures that build the same network have the same canonical form, so it suits
        de-duplication and cache keys; OFA's own encoding keeps whatever the ignored slots hold.
        """
        self.validate(arch)
        ks, e = list(arch.ks), list(arch.e)
        for stage, depth in enumerate(arch.d):
            for slot in range(stage * self.max_depth + depth, (stage + 1) * self.max_depth):
                ks[slot] = min(self.cfg.kernel_sizes)
                e[slot] = min(self.cfg.expand_ratios)
        return MobileNetV3Arch(ks=tuple(ks), e=tuple(e), d=arch.d, r=arch.r)

    # -- what the device runs ----------------------------------------------------------------
    def input_shape(self, arch: Arch) -> tuple[int, int, int]:
        assert isinstance(arch, MobileNetV3Arch)
        return (self.cfg.in_channels, arch.r, arch.r)

    def stem_size(self, resolution: int) -> int:
        """Feature-map height and width in pixels after the stem convolution."""
        return conv_out_size(resolution, 3, self.cfg.stem_stride)

    def block_plan(self, arch: MobileNetV3Arch) -> list[BlockPlan]:
        """Return the active inverted-residual blocks of ``arch`` (not the fixed first block), in order."""
        size = conv_out_size(self.stem_size(arch.r), 3, self.cfg.strides[0])
        channels = self.widths[1]
        plan = []
        for stage in range(NUM_STAGES):
            out_channels = self.widths[stage + 2]
            for index in range(arch.d[stage]):
                slot = stage * self.max_depth + index
                mid = make_divisible(round(channels * arch.e[slot]))
                block = BlockPlan(
                    stage=stage,
                    index=index,
                    slot=slot,
                    in_channels=channels,
                    mid_channels=mid,
                    out_channels=out_channels,
                    kernel_size=arch.ks[slot],
                    stride=self.cfg.strides[stage + 1] if index == 0 else 1,
                    act=STAGE_ACTS[stage],
                    se_channels=make_divisible(mid // SE_REDUCTION) if STAGE_SE[stage] else 0,
                    in_size=size,
                )
                plan.append(block)
                size = block.out_size
                channels = out_channels
        return plan

    def layers(self, arch: Arch) -> list[LayerSpec]:
        assert isinstance(arch, MobileNetV3Arch)
        self.validate(arch)
        stem, first, final_expand, feature_mix = self.widths[0], self.widths[1], self.widths[7], self.widths[8]
        size = self.stem_size(arch.r)
        out = [LayerSpec("conv", self.cfg.in_channels, stem, arch.r, 3, self.cfg.stem_stride, act="hswish")]

        first_stride = self.cfg.strides[0]
        out.append(LayerSpec("conv", stem, stem, size, 3, first_stride, groups=stem, act="relu"))
        size = conv_out_size(size, 3, first_stride)
        out.append(LayerSpec("conv", stem, first, size, 1, 1, act="none"))
        if first_stride == 1 and stem == first:
            out.append(LayerSpec("add", first, first, size))

        for block in self.block_plan(arch):
            out.extend(_block_layers(block))
            size = block.out_size

        last = self.widths[6]
        out.append(LayerSpec("conv", last, final_expand, size, 1, 1, act="hswish"))
        out.append(LayerSpec("gap", final_expand, final_expand, size))
        # The feature-mix 1x1 convolution has no BatchNorm and no bias. It runs on the pooled 1x1 map,
        # so it is a matrix multiply.
        out.append(LayerSpec("linear", final_expand, feature_mix, 1, act="hswish", bias=False))
        out.append(LayerSpec("linear", feature_mix, self.cfg.num_classes, 1))
        return out

    # -- models ------------------------------------------------------------------------------
    def build_supernet(self) -> Any:
        from nas.supernet.mobilenet import ElasticMobileNetV3

        return ElasticMobileNetV3(self)
