"""Typed gate settings, parsed from a ``conf/gates/*.yaml`` node with unknown keys rejected."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "GATE_MODES",
    "GATE_NAMES",
    "GATE_PLACEMENTS",
    "GateConfig",
    "GateConfigError",
    "TargetedDropoutConfig",
    "parse_gate_config",
]

GATE_NAMES = ("none", "feature")
GATE_MODES = ("mask", "skip")
GATE_PLACEMENTS = ("measure", "table", "all")


class GateConfigError(ValueError):
    """A gate configuration with an unknown key or a value outside its allowed range."""


@dataclasses.dataclass(frozen=True)
class TargetedDropoutConfig:
    """Targeted dropout during fine-tuning.

    Attributes:
        fraction: share of each gate's features, taken from the lowest scores up, that are
            candidates for dropping. ``1 - keep_ratio_range[0]`` trains the network to work with
            any keep ratio down to the low end of the range.
        rate: probability that a candidate feature is dropped for one image in one step.
    """

    fraction: float = 0.75
    rate: float = 0.5


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """Settings of the channel and column gates; see ``conf/gates/feature.yaml`` for each key.

    Attributes:
        name: "none" (no gates) or "feature" (channel and column gates on inner feature maps).
        keep_ratio: share of each gate's channels or columns kept at inference.
        keep_ratio_range: lowest and highest keep ratio that ``set_keep_ratio`` accepts.
        latency_budget_ms: when set, the keep ratio is the largest one whose latency fits this budget
            (ms per batch of ``hardware.batch_size``): the ungated subnet's measured latency plus
            each gated block's change, predicted from the device's gated-block profiles.
        channel: allow channel gates.
        spatial: allow column gates.
        mode: eval-time path, "skip" (gathered channels and columns, nothing dropped is computed) or
            "mask" (dense computation multiplied by a 0/1 mask). Training always masks.
        targeted_dropout: see :class:`TargetedDropoutConfig`.
        schedule_epochs: epochs over which the keep ratio falls from 1.0 to ``keep_ratio``.
        sample_range_after_ramp: after the ramp, draw each training step's keep ratio uniformly from
            ``keep_ratio_range``, so that every ratio in the range is trained.
        kd_weight: weight of distillation from the ungated subnet during fine-tuning.
        full_keep_weight: weight of a second cross-entropy term per training step, computed at the
            top of ``keep_ratio_range``, so the widest setting trains every step; 0 turns it off.
            It adds one forward and backward pass per step.
        placement: how gates are placed. "measure" times each block on this machine with and
            without gates and keeps the fastest options that pay (see
            :func:`nas.gates.timing.choose_gate_options`). "table" places channel gates
            where the profile table predicts a saving and column gates on maps at least
            ``spatial_min_size`` wide. "all" places every enabled gate that drops a feature.
        measure_batch_sizes: batch sizes at which "measure" times blocks; the smallest must show
            the saving.
        batch_check: after fine-tuning, ``train.py`` times the gated network against the ungated
            subnet at every larger batch size of ``measure_batch_sizes`` and warns about ratios
            over ``max_slowdown`` (:func:`nas.gates.measure_batch_slowdown`).
        max_slowdown: with "measure", the gated blocks together may be at most this much slower
            than ungated (share of their ungated latency) at every larger batch size of
            ``measure_batch_sizes``.
        min_saving: the saving a gate must bring at the low end of ``keep_ratio_range``, as a share
            of the block's latency. With "measure" it is the block's measured latency at the smallest
            batch size. With "table" it is the predicted latency of the producer and consumer.
        step_tolerance: two latencies within this relative difference count as one staircase step.
        spatial_min_size: with "table", column gates are placed only on inner maps at least this many
            pixels wide.
        skip_max_share: in skip mode at batches above 1 off the grouped path, a block gathers the
            union of the images' selected channels only when the share of its inner-convolution
            MACs still to run is at most this. Above it, the block masks densely because that is
            cheaper. A single image always computes only what it keeps.
        seed: seed of the targeted-dropout generator.
    """

    name: str = "feature"
    keep_ratio: float = 0.4
    keep_ratio_range: tuple[float, float] = (0.25, 1.0)
    latency_budget_ms: float | None = None
    channel: bool = True
    spatial: bool = True
    mode: str = "skip"
    targeted_dropout: TargetedDropoutConfig = dataclasses.field(default_factory=TargetedDropoutConfig)
    schedule_epochs: int = 2
    sample_range_after_ramp: bool = True
    kd_weight: float = 1.0
    full_keep_weight: float = 0.0
    placement: str = "measure"
    measure_batch_sizes: tuple[int, ...] = (1, 32)
    batch_check: bool = True
    max_slowdown: float = 0.05
    min_saving: float = 0.05
    step_tolerance: float = 0.05
    spatial_min_size: int = 14
    skip_max_share: float = 0.75
    seed: int = 0

    @property
    def enabled(self) -> bool:
        """Whether any gate may be placed."""
        return self.name != "none" and (self.channel or self.spatial)

    def check_keep_ratio(self, ratio: float, key: str = "keep_ratio") -> None:
        """Raise :class:`GateConfigError` unless ``ratio`` lies in ``keep_ratio_range``; ``key`` names it in the message."""
        low, high = self.keep_ratio_range
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
            raise GateConfigError(f"{key} must be a number in gates.keep_ratio_range [{low}, {high}], but got {ratio!r}.")
        if low - 1e-9 <= ratio <= high + 1e-9:
            return
        if not 0 < ratio <= 1:
            fix = f"keep ratios are shares of the features, in (0, 1], so pick a value in [{low}, {high}]"
        else:
            fix = "pick a value in the range, or widen the range and fine-tune again"
        raise GateConfigError(f"{key}={ratio!r} is outside gates.keep_ratio_range [{low}, {high}]; {fix}.")


def _reject_unknown(data: Mapping[str, Any], cls: type, where: str) -> None:
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise GateConfigError(f"Unknown keys {unknown} in {where}; allowed keys are {names}.")


def _check_share(value: Any, where: str, allow_zero: bool = False) -> float:
    # The type is checked first, because comparing a string with a number raises TypeError.
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not (0 <= value <= 1) or (value == 0 and not allow_zero):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise GateConfigError(f"{where} must be a number in {bound}, but got {value!r}.")
    return float(value)


def _parse_range(value: Any) -> tuple[float, float]:
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise GateConfigError(f"gates.keep_ratio_range must be a list [low, high], but got {value!r}.")
    low = _check_share(value[0], "gates.keep_ratio_range[0]")
    high = _check_share(value[1], "gates.keep_ratio_range[1]")
    if low > high:
        raise GateConfigError(f"gates.keep_ratio_range must have low <= high, but got [{low}, {high}].")
    return low, high


def _parse_batch_sizes(value: Any) -> tuple[int, ...]:
    valid = isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
    if not valid or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in value):
        raise GateConfigError(f"gates.measure_batch_sizes must be a non-empty list of integers >= 1, but got {value!r}.")
    return tuple(sorted(set(value)))


def _parse_dropout(value: Any) -> TargetedDropoutConfig:
    if not isinstance(value, Mapping):
        raise GateConfigError(
            f"gates.targeted_dropout must be a mapping with keys fraction and rate, but got {value!r}."
        )
    _reject_unknown(value, TargetedDropoutConfig, "gates.targeted_dropout")
    default = TargetedDropoutConfig()
    fraction = _check_share(value.get("fraction", default.fraction), "gates.targeted_dropout.fraction", True)
    rate = _check_share(value.get("rate", default.rate), "gates.targeted_dropout.rate", True)
    return TargetedDropoutConfig(fraction=fraction, rate=rate)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_numbers(cfg: GateConfig) -> None:
    cfg.check_keep_ratio(cfg.keep_ratio, "gates.keep_ratio")
    if cfg.mode not in GATE_MODES:
        raise GateConfigError(f"gates.mode must be one of {GATE_MODES}, but got {cfg.mode!r}.")
    if cfg.placement not in GATE_PLACEMENTS:
        raise GateConfigError(f"gates.placement must be one of {GATE_PLACEMENTS}, but got {cfg.placement!r}.")
    budget = cfg.latency_budget_ms
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not math.isfinite(budget) or budget <= 0):
        raise GateConfigError(f"gates.latency_budget_ms must be a positive number of milliseconds or null, "
                              f"but got {budget!r}.")
    if not _is_integer(cfg.schedule_epochs) or cfg.schedule_epochs < 0:
        raise GateConfigError(f"gates.schedule_epochs must be an integer >= 0, but got {cfg.schedule_epochs!r}.")
    if not _is_integer(cfg.spatial_min_size) or cfg.spatial_min_size < 1:
        raise GateConfigError(f"gates.spatial_min_size must be an integer >= 1, but got {cfg.spatial_min_size!r}.")
    if not _is_integer(cfg.seed):
        raise GateConfigError(f"gates.seed must be an integer, but got {cfg.seed!r}.")
    if isinstance(cfg.kd_weight, bool) or not isinstance(cfg.kd_weight, (int, float)) or cfg.kd_weight < 0:
        raise GateConfigError(f"gates.kd_weight must be a number >= 0, but got {cfg.kd_weight!r}.")
    weight = cfg.full_keep_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise GateConfigError(f"gates.full_keep_weight must be a number >= 0, but got {weight!r}.")
    for key in ("min_saving", "step_tolerance", "skip_max_share", "max_slowdown"):
        _check_share(getattr(cfg, key), f"gates.{key}", allow_zero=True)


def parse_gate_config(data: Mapping[str, Any] | GateConfig) -> GateConfig:
    """Build a :class:`GateConfig` from a ``conf/gates`` node (a dict or an OmegaConf ``DictConfig``).

    ``name: none`` accepts no other key. Missing keys of ``name: feature`` take the defaults of
    :class:`GateConfig`.

    Raises:
        GateConfigError: on an unknown name or key, or a value outside its range; the message
            names the key and the allowed values.
    """
    if isinstance(data, GateConfig):
        return data
    if not isinstance(data, Mapping):
        raise GateConfigError(f"gates must be a mapping, but got {type(data).__name__}: {data!r}.")
    name = data.get("name")
    if name not in GATE_NAMES:
        raise GateConfigError(f"Unknown gates.name={name!r}; allowed names are {list(GATE_NAMES)}.")
    if name == "none":
        extra = sorted(set(data) - {"name"})
        if extra:
            raise GateConfigError(f"gates.name=none takes no other keys, but got {extra}; remove them.")
        return GateConfig(name="none", channel=False, spatial=False, kd_weight=0.0)

    _reject_unknown(data, GateConfig, "gates")
    values = dict(data)
    if "keep_ratio_range" in values:
        values["keep_ratio_range"] = _parse_range(values["keep_ratio_range"])
    if "measure_batch_sizes" in values:
        values["measure_batch_sizes"] = _parse_batch_sizes(values["measure_batch_sizes"])
    if "targeted_dropout" in values:
        values["targeted_dropout"] = _parse_dropout(values["targeted_dropout"])
    for key in ("channel", "spatial", "sample_range_after_ramp", "batch_check"):
        if key in values and not isinstance(values[key], bool):
            raise GateConfigError(f"gates.{key} must be true or false, but got {values[key]!r}.")
    cfg = GateConfig(**values)
    _check_numbers(cfg)
    return cfg
