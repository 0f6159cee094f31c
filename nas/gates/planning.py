"""Profile-guided gate placement: latency staircases, kept-channel snapping and keep ratios for a budget.

A profile table maps ``LayerSpec.key()`` to a measured latency in ms at one batch size, as
``predictors.store.ProfileStore.layer_table(batch_size)`` returns it. From the table the planner
reads each block's staircase: the latency of its producer and consumer convolutions as a function
of the kept inner channels. Kept counts are rounded up to the top of their step, because channels
that cost nothing extra should be kept, and a channel gate is placed only where the staircase
predicts a saving.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nas.gates.batchpath import BatchPathCosts
from nas.gates.blocks import BlockLayout, block_layout
from nas.gates.config import GateConfig, GateConfigError
from nas.gates.modules import keep_count
from nas.spaces.layers import LayerSpec

__all__ = [
    "BlockPlan",
    "BlockSite",
    "MeasuredDecision",
    "MeasuredPlacement",
    "activation_name",
    "channel_staircase",
    "conv_spec",
    "default_channel_steps",
    "describe_layers",
    "find_block_sites",
    "low_keep_channels",
    "plan_blocks",
    "snap_up",
]

log = logging.getLogger(__name__)

# Without a profile table kept counts round up to multiples of 8: AVX2 holds 8 float32 lanes, and
# CPU and GPU convolution kernels commonly block channels by 8 or more.
DEFAULT_CHANNEL_STEP = 8


def activation_name(module: nn.Module | None) -> str:
    """Return the ``LayerSpec.act`` name of an activation module ("relu", "hswish" or "none")."""
    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.Hardswish):
        return "hswish"
    return "none"


def snap_up(steps: Sequence[int], requested: int, total: int) -> int:
    """Return the smallest of ``steps`` that is at least ``requested``, or ``total`` if none is."""
    return min((step for step in steps if step >= requested), default=total)


def low_keep_channels(site: BlockSite, config: GateConfig, steps: Sequence[int]) -> int:
    """Return the channels kept at the low end of ``keep_ratio_range``, rounded up to ``steps``."""
    return snap_up(steps, keep_count(config.keep_ratio_range[0], site.inner_channels), site.inner_channels)


@dataclasses.dataclass(frozen=True)
class BlockSite:
    """A gateable residual block of a model and the layers a gate on it would shrink.

    Attributes:
        name: module path of the block, for example ``"layer1.0"``.
        in_channels: channels of the block input.
        in_size: height and width of the block input in pixels (square maps only).
        producer: the producer convolution with all inner channels.
        consumer: the consumer convolution with all inner channels.
        producer_path: module path of the producer convolution.
        consumer_path: module path of the consumer convolution.
    """

    name: str
    in_channels: int
    in_size: int
    producer: LayerSpec
    consumer: LayerSpec
    producer_path: str
    consumer_path: str

    @property
    def inner_channels(self) -> int:
        return self.producer.out_channels

    @property
    def inner_size(self) -> int:
        """Height and width of the gated map in pixels: the consumer's input."""
        return self.consumer.in_size

    def gated_layers(self, channels: int) -> tuple[LayerSpec, LayerSpec]:
        """Return the producer and consumer with ``channels`` inner channels kept."""
        return (dataclasses.replace(self.producer, out_channels=channels),
                dataclasses.replace(self.consumer, in_channels=channels))


# A measured placement maps all blocks and their channel steps to one decision per block: (channel
# gate, column gate, grouped_max_channels, channel steps, measured latency in ms per kept-channel
# count, reason, measured latency in ms per gate option and batch size, measured batch path costs
# or None).
MeasuredDecision = tuple[bool, bool, int, list[int], dict[int, float], str, dict[str, dict[int, float]],
                         BatchPathCosts | None]
MeasuredPlacement = Callable[[Sequence[BlockSite], Sequence[list[int]]], list[MeasuredDecision]]


@dataclasses.dataclass
class BlockPlan:
    """The gate decision for one block, kept with the network so a checkpoint can be rebuilt.

    Attributes:
        name: module path of the block.
        channel: whether a channel gate is placed.
        spatial: whether a column gate is placed.
        channel_steps: ascending kept-channel counts a request is rounded up to; the last is all channels.
        reason: the decision in words, for logs and reports.
        latency_ms: latency (ms) per kept-channel count: with ``placement: measure``, of the
            channel-gated block, measured at each count of the default steps (the ungated block at
            all channels); otherwise of the producer plus consumer per count in ``channel_steps``,
            predicted from the profile table; empty without either.
        measured_ms: measured block latency (ms) per gate option and batch size with
            ``placement: measure``; empty otherwise.
        grouped_max_channels: largest kept count at which batches above 1 run each image's channels
            as one grouped convolution (``GatedResidualBlock.grouped_max_channels``); 0 for never.
            ``placement: measure`` sets it where that was measured faster than masking.
        batch_costs: measured costs of the grouped and gathered paths at the largest measured batch
            size (``GatedResidualBlock.batch_costs``), which then choose the path per batch
            instead of ``grouped_max_channels``; None without them.
    """

    name: str
    channel: bool
    spatial: bool
    channel_steps: list[int]
    reason: str
    latency_ms: dict[int, float] = dataclasses.field(default_factory=dict)
    measured_ms: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    grouped_max_channels: int = 0
    batch_costs: BatchPathCosts | None = None

    @property
    def gated(self) -> bool:
        """Whether the block gets any gate."""
        return self.channel or self.spatial

    def snap_channels(self, requested: int) -> int:
        """Round a requested kept-channel count up to the next step top."""
        return snap_up(self.channel_steps, requested, self.channel_steps[-1])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["latency_ms"] = {str(k): v for k, v in self.latency_ms.items()}
        data["measured_ms"] = {
            option: {str(b): v for b, v in times.items()} for option, times in self.measured_ms.items()
        }
        data["batch_costs"] = self.batch_costs.to_dict() if self.batch_costs is not None else None
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlockPlan:
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        # Records written before the grouped path existed lack "grouped_max_channels": 0, never grouped.
        # Records written before measured path costs lack "batch_costs": the limit alone decides.
        missing = sorted(set(names) - set(data) - {"grouped_max_channels", "batch_costs"})
        if unknown or missing:
            raise GateConfigError(f"Invalid block plan {dict(data)!r}: unknown keys {unknown}, missing keys {missing}.")
        values = dict(data)
        name = values.get("name")
        for key in ("channel", "spatial"):
            if not isinstance(values[key], bool):
                raise GateConfigError(f"Invalid block plan for {name!r}: {key} must be true or false, "
                                      f"but got {values[key]!r}.")
        steps = values["channel_steps"]
        if (not isinstance(steps, list) or not steps
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in steps)
                or steps != sorted(set(steps))):
            raise GateConfigError(f"Invalid block plan for {name!r}: channel_steps must be a non-empty ascending "
                                  f"list of channel counts >= 1, but got {steps!r}.")
        try:
            values["latency_ms"] = {int(k): _positive_ms(v) for k, v in values["latency_ms"].items()}
            values["measured_ms"] = {option: {int(b): _positive_ms(v) for b, v in times.items()}
                                     for option, times in values["measured_ms"].items()}
        except (AttributeError, TypeError, ValueError):
            raise GateConfigError(f"Invalid block plan for {name!r}: latency_ms and measured_ms must map counts to "
                                  f"milliseconds > 0, but got {values['latency_ms']!r} and "
                                  f"{values['measured_ms']!r}.") from None
        grouped = values.setdefault("grouped_max_channels", 0)
        if not isinstance(grouped, int) or isinstance(grouped, bool) or grouped < 0:
            raise GateConfigError(f"Invalid block plan {dict(data)!r}: grouped_max_channels must be an integer >= 0.")
        costs = values.get("batch_costs")
        if costs is not None:
            try:
                values["batch_costs"] = BatchPathCosts.from_dict(costs)
            except ValueError as error:
                raise GateConfigError(f"Invalid block plan for {values.get('name')!r}: {error}") from None
        return cls(**values)


def _positive_ms(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{value!r} is not a time in milliseconds > 0")
    return float(value)


def _probe_inputs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Run one zero image through ``model`` in eval mode and return each module's input shape.

    Entries are in the order the modules finish, so a block comes after its children.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        def record(mod: nn.Module, args: tuple[Any, ...], output: Any, name: str = name) -> None:
            if args and isinstance(args[0], torch.Tensor):
                shapes.setdefault(name, tuple(args[0].shape))
        handles.append(module.register_forward_hook(record))
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


def conv_spec(conv: nn.Conv2d, in_size: int, act: str) -> LayerSpec:
    """Return the ``LayerSpec`` of ``conv`` on a square input ``in_size`` pixels wide, with activation ``act``."""
    return LayerSpec("conv", conv.in_channels, conv.out_channels, in_size, conv.kernel_size[0], conv.stride[0],
                     conv.groups, act)


def _site(name: str, block: nn.Module, layout: BlockLayout, shapes: Mapping[str, tuple[int, ...]]) -> BlockSite:
    _, in_channels, height, width = shapes[name]
    if height != width:
        raise GateConfigError(f"Block {name} gets a {height}x{width} input; gate planning needs square maps.")
    specs, paths = [], []
    for index in (layout.producer, len(layout.stages) - 1):
        conv_name, _, act_name = layout.stages[index]
        act = activation_name(getattr(block, act_name)) if act_name is not None else "none"
        paths.append(f"{name}.{conv_name}")
        specs.append(conv_spec(getattr(block, conv_name), shapes[paths[-1]][2], act))
    return BlockSite(name, in_channels, height, specs[0], specs[1], paths[0], paths[1])


def find_block_sites(model: nn.Module, input_shape: Sequence[int]) -> list[BlockSite]:
    """Return every gateable residual block of ``model`` that runs on an input of ``input_shape`` (C, H, W)."""
    shapes = _probe_inputs(model, input_shape)
    sites = []
    for name, module in model.named_modules():
        layout = block_layout(module)
        if layout is not None and name in shapes:
            sites.append(_site(name, module, layout, shapes))
    return sites


def describe_layers(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, LayerSpec]]:
    """Return (module path, LayerSpec) for every layer of an ungated model, in the order the layers finish.

    These are the layers a profile table times. Supports models built from gateable residual blocks with timm-style stems (``conv1``/``act1``),
    ``nn.MaxPool2d``, ``nn.AdaptiveAvgPool2d`` and ``nn.Linear``. Convolutions take the activation of a
    sibling ``actN`` for ``convN`` outside blocks, the block layout's inside them, and "none" otherwise.
    """
    shapes = _probe_inputs(model, input_shape)
    modules = dict(model.named_modules())
    acts: dict[str, str] = {}
    adds: dict[str, LayerSpec] = {}
    for name, module in modules.items():
        layout = block_layout(module)
        if layout is None or name not in shapes:
            continue
        for conv_name, _, act_name in layout.stages:
            acts[f"{name}.{conv_name}"] = activation_name(getattr(module, act_name)) if act_name else "none"
        consumer = getattr(module, layout.stages[-1][0])
        out_size = shapes[f"{name}.{layout.stages[-1][0]}"][2]
        final_act = activation_name(getattr(module, layout.final_act)) if layout.final_act else "none"
        if layout.final_act is not None or getattr(module, "residual", False):
            adds[name] = LayerSpec("add", consumer.out_channels, consumer.out_channels, out_size, act=final_act)

    layers = []
    for name, shape in shapes.items():
        module = modules[name]
        if isinstance(module, nn.Conv2d):
            parent, _, leaf = name.rpartition(".")
            sibling = f"{parent}.act{leaf[4:]}" if parent else f"act{leaf[4:]}"
            act = acts.get(name, activation_name(modules.get(sibling)) if leaf.startswith("conv") else "none")
            layers.append((name, conv_spec(module, shape[2], act)))
        elif isinstance(module, nn.MaxPool2d):
            kernel, stride = (v if isinstance(v, int) else v[0] for v in (module.kernel_size, module.stride))
            layers.append((name, LayerSpec("maxpool", shape[1], shape[1], shape[2], kernel, stride)))
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            layers.append((name, LayerSpec("gap", shape[1], shape[1], shape[2])))
        elif isinstance(module, nn.Linear):
            layers.append((name, LayerSpec("linear", module.in_features, module.out_features, 1,
                                           bias=module.bias is not None)))
        if name in adds:
            layers.append((f"{name}.add", adds[name]))
    return layers


def default_channel_steps(channels: int) -> list[int]:
    """Return the kept-channel steps without a profile table: multiples of 8 below ``channels``, then ``channels``."""
    return [*range(DEFAULT_CHANNEL_STEP, channels, DEFAULT_CHANNEL_STEP), channels]


def _block_latency(site: BlockSite, channels: int, table: Mapping[str, float]) -> float | None:
    keys = [layer.key() for layer in site.gated_layers(channels)]
    if not all(key in table for key in keys):
        return None
    return float(sum(table[key] for key in keys))


def channel_staircase(site: BlockSite, table: Mapping[str, float], tolerance: float) -> tuple[list[int], dict[int, float]]:
    """Return a block's step tops and their latencies (ms) from a profile table.

    Starting from the smallest profiled count, a step extends to the largest profiled count whose
    latency is within ``tolerance`` (relative) of the step's first count. The next step starts at
    the next profiled count. Returns ``([], {})`` when the table lacks the block at full width, or
    has it at no other count, so that its steps are unknown.
    """
    latencies = {}
    for channels in range(1, site.inner_channels + 1):
        latency = _block_latency(site, channels, table)
        if latency is not None:
            latencies[channels] = latency
    if site.inner_channels not in latencies or len(latencies) == 1:
        return [], {}

    candidates = sorted(latencies)
    steps: list[int] = []
    start = 0
    while start < len(candidates):
        limit = latencies[candidates[start]] * (1.0 + tolerance)
        top = max(c for c in candidates[start:] if latencies[c] <= limit)
        steps.append(top)
        start = candidates.index(top) + 1
    return steps, {step: latencies[step] for step in steps}


def _decide_channel(site: BlockSite, config: GateConfig, steps: list[int], latency: dict[int, float],
                    profiled: bool) -> tuple[bool, str]:
    if not config.channel:
        return False, "channel gate disabled"
    low = config.keep_ratio_range[0]
    kept = low_keep_channels(site, config, steps)
    if kept >= site.inner_channels:
        return False, f"no channel gate: keep ratio {low} rounds up to all {site.inner_channels} channels"
    if not profiled:
        return True, (f"channel gate without profiles ({kept}/{site.inner_channels} channels at keep ratio {low}, "
                      f"counts rounded up to multiples of {DEFAULT_CHANNEL_STEP})")
    full = latency[site.inner_channels]
    saving = 1.0 - latency[kept] / full if full > 0 else 0.0
    summary = (f"{kept}/{site.inner_channels} channels at keep ratio {low}: predicted {latency[kept]:.4f} ms "
               f"instead of {full:.4f} ms ({saving:.0%} saving)")
    if saving < config.min_saving:
        return False, f"no channel gate: {summary}, below min_saving {config.min_saving:.0%}"
    return True, f"channel gate: {summary}"


def _decide_spatial(site: BlockSite, config: GateConfig) -> tuple[bool, str]:
    if not config.spatial:
        return False, "column gate disabled"
    if site.inner_size < config.spatial_min_size:
        return False, f"no column gate: {site.inner_size} columns < spatial_min_size {config.spatial_min_size}"
    kept = keep_count(config.keep_ratio_range[0], site.inner_size)
    if kept >= site.inner_size:
        return False, f"no column gate: keep ratio {config.keep_ratio_range[0]} keeps all {site.inner_size} columns"
    return True, f"column gate: {kept}/{site.inner_size} columns at keep ratio {config.keep_ratio_range[0]}"


def _decide_all(site: BlockSite, config: GateConfig, steps: list[int]) -> tuple[bool, bool, str]:
    low = config.keep_ratio_range[0]
    channels = low_keep_channels(site, config, steps)
    columns = keep_count(low, site.inner_size)
    channel = config.channel and channels < site.inner_channels
    spatial = config.spatial and columns < site.inner_size
    reason = (f"placement=all: channel gate {'on' if channel else 'off'} ({channels}/{site.inner_channels} channels), "
              f"column gate {'on' if spatial else 'off'} ({columns}/{site.inner_size} columns) at keep ratio {low}")
    return channel, spatial, reason


def _decide_table(site: BlockSite, config: GateConfig, steps: list[int], latency: dict[int, float],
                  table_given: bool) -> tuple[bool, bool, str]:
    profiled = bool(latency)
    channel, channel_reason = _decide_channel(site, config, steps, latency, profiled)
    spatial, spatial_reason = _decide_spatial(site, config)
    if table_given and not profiled and channel:
        channel_reason += "; the table lacks this block's convolutions"
    return channel, spatial, f"{channel_reason}; {spatial_reason}"


def plan_blocks(sites: Sequence[BlockSite], config: GateConfig, profile_table: Mapping[str, float] | None,
                measure: MeasuredPlacement | None = None) -> list[BlockPlan]:
    """Decide, per block, whether to place a channel gate and a column gate, and how counts snap.

    Channel counts snap to the table's staircase steps, or to multiples of 8 without profiles.
    Decisions use the low end of ``keep_ratio_range``, the largest saving the gates will be asked
    for. With ``placement: measure``, ``measure`` times every block at the multiples of 8, decides
    for all blocks together (:func:`nas.gates.timing.choose_gate_options`) and sets the steps from
    its own timings; the table is not consulted. With
    ``placement: table``, a channel gate needs a predicted saving of at least ``min_saving`` where
    the table profiles the block, and is placed wherever the low keep ratio drops a channel where it
    does not, with a warning. Column gates are placed on maps at least ``spatial_min_size`` wide,
    because the table times square maps only and cannot predict column savings.

    Raises:
        GateConfigError: with ``placement: measure`` and no ``measure`` function.
    """
    if config.enabled and config.placement == "measure" and measure is None:
        raise GateConfigError("gates.placement=measure needs a measure function; use apply_gates, or set "
                              "gates.placement to table or all.")
    if profile_table is None and config.enabled and config.channel and config.placement == "table":
        log.warning("gates: no profile table given, so kept channel counts round up to multiples of %d and "
                    "channel gates are placed without checking that they pay on this device.", DEFAULT_CHANNEL_STEP)
    staircases = []
    for site in sites:
        # Measured placement times the default steps itself; a table's coarser staircase would hide counts.
        use_table = profile_table is not None and config.placement != "measure"
        steps, latency = channel_staircase(site, profile_table, config.step_tolerance) if use_table else ([], {})
        staircases.append((steps or default_channel_steps(site.inner_channels), latency))
    decisions = None
    if config.enabled and config.placement == "measure":
        decisions = measure(sites, [steps for steps, _ in staircases])

    plans = []
    for index, (site, (steps, latency)) in enumerate(zip(sites, staircases)):
        measured: dict[str, dict[int, float]] = {}
        grouped_max, batch_costs = 0, None
        if not config.enabled:
            reason = "gates.name=none" if config.name == "none" else "gates.channel and gates.spatial are both false"
            channel, spatial = False, False
        elif decisions is not None:
            (channel, spatial, grouped_max, measured_steps, measured_latency, reason, measured,
             batch_costs) = decisions[index]
            if channel:
                steps, latency = measured_steps, measured_latency
            else:
                # A channel gate dropped after its counts were timed keeps the times that its reason cites.
                latency = measured_latency
        elif config.placement == "table":
            channel, spatial, reason = _decide_table(site, config, steps, latency, profile_table is not None)
        else:
            channel, spatial, reason = _decide_all(site, config, steps)
        plan = BlockPlan(site.name, channel, spatial, steps, reason, latency, measured, grouped_max, batch_costs)
        log.info("gates: %s: %s", site.name, plan.reason)
        plans.append(plan)
    return plans
