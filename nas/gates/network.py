"""The gated network and :func:`apply_gates`, which builds one from a fine-tunable subnet."""

from __future__ import annotations

import copy
import dataclasses
import logging
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from nas.gates.batchnorm import BatchNormBank, batchnorm_layers
from nas.gates.blocks import GatedResidualBlock, GateRuntime, block_layout, gated_block_class
from nas.gates.budget import RATIO_STEP, choose_keep_ratio, no_gate_message, ratio_grid
from nas.gates.config import GATE_MODES, GateConfig, GateConfigError, parse_gate_config
from nas.gates.layouts import registered_block_types
from nas.gates.modules import keep_count
from nas.gates.planning import (
    BlockPlan,
    BlockSite,
    MeasuredPlacement,
    find_block_sites,
    plan_blocks,
)

__all__ = ["FORMAT_VERSION", "GatedNetwork", "apply_gates", "confirm_budget", "measure_batch_slowdown"]

log = logging.getLogger(__name__)

# Version of the dictionary that GatedNetwork.describe() returns and apply_gates(plan=...) reads.
# Version 2 added "batchnorm_stats"; version 1 records still load, without per-ratio statistics.
# Version 3 added each block's "grouped_max_channels"; older records load with 0 (never grouped).
# Version 4 added each block's "batch_costs"; older records load without them.
FORMAT_VERSION = 4
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3, 4)


class GatedNetwork(nn.Module):
    """A subnet whose residual blocks carry channel and column gates.

    ``forward`` is the subnet's forward. The wrapped model keeps its module names, so its state
    dict is the ungated subnet's (under ``model.``) plus the gates' weights and, once calibrated,
    the per-keep-ratio BatchNorm statistics (under ``batchnorm_bank.``).

    Args:
        model: the subnet with gated blocks already in place.
        config: the gate settings.
        plans: one decision per gateable block.
        runtime: the settings object the gated blocks share.
        keep_ratio: initial keep ratio, inside ``config.keep_ratio_range``.
    """

    def __init__(self, model: nn.Module, config: GateConfig, plans: Sequence[BlockPlan], runtime: GateRuntime,
                 keep_ratio: float) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.plans = list(plans)
        self.runtime = runtime
        self._plan_by_name = {plan.name: plan for plan in self.plans}
        self._keep_ratio = 1.0
        self.batchnorm_bank: BatchNormBank | None = None
        self.set_keep_ratio(keep_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def keep_ratio(self) -> float:
        """Share of each gate's channels or columns kept, before channel counts snap up to steps."""
        return self._keep_ratio

    @property
    def mode(self) -> str:
        """Eval-time path: "skip" (dropped work is not computed) or "mask" (dense, then masked)."""
        return self.runtime.mode

    def set_mode(self, mode: str) -> None:
        """Choose the eval-time path; training always masks."""
        if mode not in GATE_MODES:
            raise GateConfigError(f"Gate mode must be one of {GATE_MODES}, but got {mode!r}.")
        self.runtime.mode = mode

    def gated_blocks(self) -> dict[str, GatedResidualBlock]:
        """Return the gated blocks by module path inside :attr:`model`."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, GatedResidualBlock)}

    def set_keep_ratio(self, ratio: float) -> None:
        """Keep ``ratio`` of each gate's features: any value in ``keep_ratio_range``, no retraining needed.

        Kept channels are ``ceil(ratio * channels)`` rounded up to the block's next latency step;
        kept columns are ``ceil(ratio * columns)``. With a BatchNorm bank (after
        :func:`nas.gates.calibrate_keep_ratios`), the BatchNorm layers that depend on the ratio get
        the running statistics of the nearest grid ratio, so call this before folding BatchNorm.

        Raises:
            GateConfigError: if ``ratio`` is outside ``keep_ratio_range``.
        """
        # NumPy scalars and one-element tensors count as the number they contain.
        one_element = isinstance(ratio, torch.Tensor) and ratio.numel() == 1
        if one_element or (isinstance(ratio, numbers.Real) and not isinstance(ratio, bool)):
            ratio = float(ratio)
        self.config.check_keep_ratio(ratio)
        # The statistics come first: a folded model raises there, before any kept count changes.
        if self.batchnorm_bank is not None:
            self.batchnorm_bank.load(self.batchnorm_bank.nearest(ratio), self.model)
        for name, block in self.gated_blocks().items():
            block.set_keep(*self._requested_counts(name, block, ratio))
        self._keep_ratio = float(ratio)

    def _requested_counts(self, name: str, block: GatedResidualBlock, ratio: float) -> tuple[int, int]:
        """Return the (channels, columns) that keep ratio ``ratio`` sets for the gated block ``name``.

        Channels round up to the block's latency steps. ``block.set_keep`` keeps every channel or
        column of a block without that gate.
        """
        channels = self._plan_by_name[name].snap_channels(keep_count(ratio, block.inner_channels))
        return channels, keep_count(ratio, block.inner_width)

    def set_batchnorm_bank(self, bank: BatchNormBank | None) -> None:
        """Attach per-keep-ratio BatchNorm statistics (None detaches them) and load the current ratio's."""
        self.batchnorm_bank = bank
        if bank is not None:
            bank.to(next(self.model.buffers()).device)
            bank.load(bank.nearest(self._keep_ratio), self.model)

    def highest_dropping_ratio(self) -> float | None:
        """Return the highest keep ratio at which a gate drops a channel or column, or None if none does.

        The ratios are those of :func:`ratio_grid` over ``keep_ratio_range``. Kept channel counts snap
        up to each block's latency steps, so a ratio below 1 can keep every channel.
        """
        low, high = self.config.keep_ratio_range
        blocks = self.gated_blocks()
        for ratio in ratio_grid(low, high):
            for name, block in blocks.items():
                channels, columns = self._requested_counts(name, block, ratio)
                if block.channel_gate is not None and channels < block.inner_channels:
                    return ratio
                if block.column_gate is not None and columns < block.inner_width:
                    return ratio
        return None

    def keep_counts(self) -> dict[str, tuple[int, int]]:
        """Return (kept channels, kept columns) per gated block at the current keep ratio."""
        return {name: (b.kept_channels, b.kept_columns) for name, b in self.gated_blocks().items()}

    def auxiliary_loss(self) -> torch.Tensor:
        """Return the gates' extra training loss: a zero scalar.

        Top-k selection fixes the kept share, so no sparsity term is needed. The value is a tensor
        on the model's device so a training step can always add it.
        """
        parameter = next(self.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        return torch.zeros((), device=device)

    def describe(self) -> dict[str, Any]:
        """Return a JSON-serialisable record of the settings, the per-block plans and the kept counts.

        ``batchnorm_stats`` describes the BatchNorm bank (grid ratios, layer paths, channels), or is None.
        """
        counts = self.keep_counts()
        gated = self.gated_blocks()
        blocks = []
        for plan in self.plans:
            block = gated.get(plan.name)
            if block is not None and isinstance(block, GatedResidualBlock):
                # Values set on the blocks after apply_gates are what runs, so they are recorded.
                plan = dataclasses.replace(plan, grouped_max_channels=block.grouped_max_channels,
                                           batch_costs=block.batch_costs)
            entry = plan.to_dict()
            entry["kept"] = list(counts[plan.name]) if plan.name in counts else None
            blocks.append(entry)
        config = dataclasses.asdict(self.config)
        config["keep_ratio_range"] = list(config["keep_ratio_range"])
        bank = self.batchnorm_bank.to_record() if self.batchnorm_bank is not None else None
        return {"format_version": FORMAT_VERSION, "config": config, "keep_ratio": self.keep_ratio, "mode": self.mode,
                "blocks": blocks, "batchnorm_stats": bank}


def _infer_input_shape(model: nn.Module) -> tuple[int, int, int]:
    arch = getattr(model, "arch", None)
    # ResNet archs name the input size "resolution", MobileNetV3 archs (Once-for-All's encoding) "r".
    resolution = getattr(arch, "resolution", getattr(arch, "r", None))
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if resolution is None or first_conv is None:
        raise GateConfigError(
            f"Cannot infer the input shape of {type(model).__name__}: it has no arch.resolution or arch.r; "
            "pass input_shape=(channels, height, width)."
        )
    return first_conv.in_channels, int(resolution), int(resolution)


def _plans_from_record(record: Mapping[str, Any], sites: Sequence[BlockSite]) -> tuple[list[BlockPlan], float]:
    if record.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise GateConfigError(
            f"Gate plan format_version {record.get('format_version')!r} is not supported; expected one of "
            f"{SUPPORTED_FORMAT_VERSIONS}. Rebuild the plan with this version of TailNAS."
        )
    missing = [key for key in ("blocks", "keep_ratio") if key not in record]
    if missing or not isinstance(record["blocks"], list) or not all(isinstance(e, Mapping) for e in record["blocks"]):
        raise GateConfigError(f"The gate plan needs a list of block entries under 'blocks' and a 'keep_ratio', but "
                              f"{'misses ' + str(missing) if missing else 'has blocks ' + repr(record['blocks'])}; "
                              "pass a record from GatedNetwork.describe().")
    plans = []
    for entry in record["blocks"]:
        data = {k: v for k, v in entry.items() if k != "kept"}
        plans.append(BlockPlan.from_dict(data))
    site_names = [site.name for site in sites]
    plan_names = [plan.name for plan in plans]
    if plan_names != site_names:
        raise GateConfigError(f"The gate plan covers blocks {plan_names}, but the model has {site_names}; "
                              "rebuild the gates for this subnet.")
    for site, plan in zip(sites, plans):
        costs = plan.batch_costs
        if costs is None:
            continue
        if not plan.channel:
            raise GateConfigError(f"The gate plan for {site.name} has batch_costs but no channel gate; remove "
                                  "batch_costs from that block or rebuild the gates.")
        if costs.channels != site.inner_channels:
            raise GateConfigError(f"The gate plan's batch_costs for {site.name} time {costs.channels} inner channels, "
                                  f"but the block has {site.inner_channels}; rebuild the gates for this subnet.")
        too_many = [count for count in costs.grouped if count >= site.inner_channels]
        if too_many:
            raise GateConfigError(f"The gate plan's batch_costs for {site.name} time grouping at kept counts "
                                  f"{too_many}, but grouping needs fewer than the block's {site.inner_channels} "
                                  "channels; rebuild the gates for this subnet.")
    return plans, float(record["keep_ratio"])


def _install_gates(model: nn.Module, sites: Sequence[BlockSite], plans: Sequence[BlockPlan],
                   runtime: GateRuntime) -> None:
    for site, plan in zip(sites, plans):
        if not plan.gated:
            continue
        block = model.get_submodule(site.name)
        parent_name, _, leaf = site.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        gated = gated_block_class(block)(block, block_layout(block), site.in_channels, site.in_size, plan.channel,
                                         plan.spatial, runtime)
        gated.grouped_max_channels = plan.grouped_max_channels
        if plan.batch_costs is not None:
            gated.batch_costs = plan.batch_costs
        parameter = next(block.parameters())
        setattr(parent, leaf, gated.to(device=parameter.device, dtype=parameter.dtype))


def _default_protocol(model: nn.Module, protocol: Any) -> Any:
    from predictors.protocol import MeasurementProtocol

    if protocol is not None:
        return protocol
    parameter = next(model.parameters())
    # Fewer repeats than a profile pass: a placement compares options that differ by 5% or more.
    return MeasurementProtocol(device=str(parameter.device), warmup=5, repeats=15)


def _measured_placement(model: nn.Module, config: GateConfig, protocol: Any) -> MeasuredPlacement:
    from nas.gates.timing import make_measured_placement

    protocol = _default_protocol(model, protocol)
    if protocol.runtime != "eager":
        # Gates choose their path in Python per input, which a compiled or exported graph fixes once.
        log.warning("gates: placement times gated blocks with the eager runtime, not hardware.runtime=%s, because "
                    "the gates pick their path per input in Python; deploy the gated network eagerly.",
                    protocol.runtime)
        protocol = dataclasses.replace(protocol, runtime="eager")
    return make_measured_placement(model, config, protocol)


def _budget_keep_ratio(model: nn.Module, shape: tuple[int, ...], sites: Sequence[BlockSite],
                       plans: Sequence[BlockPlan], config: GateConfig, block_latency: Any, protocol: Any) -> float:
    """Measure the ungated ``model`` and return the keep ratio that ``config.latency_budget_ms`` allows."""
    from predictors.gated import block_signature

    protocol = _default_protocol(model, protocol)
    base_ms = _measure_ms(model, shape, protocol)
    gated = [site.name for site, plan in zip(sites, plans) if plan.gated]
    if not gated:
        return choose_keep_ratio(base_ms, sites, plans, {}, config, None)
    if block_latency is None:
        raise GateConfigError(
            "gates.latency_budget_ms needs gated-block latency of this device; pass block_latency "
            "(predictors.gated.GatedBlockLatency fitted on ProfileStore.gated_block_records), which train.py "
            "builds itself, or set latency_budget_ms: null."
        )
    if not hasattr(block_latency, "delta_ms"):
        block_latency = block_latency(model, shape, gated)
    if protocol.batch_size != block_latency.batch_size:
        raise GateConfigError(
            f"The gated-block latency model was fitted at batch size {block_latency.batch_size}, but the budget is "
            f"measured at batch size {protocol.batch_size}; fit it on records of batch size {protocol.batch_size}."
        )
    signatures = {site.name: block_signature(model.get_submodule(site.name), site) for site in sites
                  if site.name in gated}
    return choose_keep_ratio(base_ms, sites, plans, signatures, config, block_latency)


def _measure_ms(model: nn.Module, shape: tuple[int, ...], protocol: Any, rounds: int = 3) -> float:
    """Return the latency (ms) of an eval, BatchNorm-folded copy of ``model``: the smallest median of ``rounds``.

    One median can land in a slow moment of a shared machine, and a budget decision rests on it.
    """
    from predictors.modules import fold_batchnorm
    from predictors.profiling import measure_module

    folded = copy.deepcopy(model).eval()
    fold_batchnorm(folded)
    return min(measure_module(folded, shape, protocol, record_operators=False).median_ms for _ in range(rounds))


def measure_batch_slowdown(network: GatedNetwork, ungated: nn.Module, shape: tuple[int, ...],
                           images: torch.Tensor | None, ratios: Sequence[float], protocol: Any = None,
                           rounds: int = 5) -> list[dict[str, Any]]:
    """Measure how much slower than ``ungated`` the network runs at each larger batch size, per keep ratio.

    The larger batch sizes are those of ``config.measure_batch_sizes`` above the smallest. Each is
    timed on the first images of ``images`` (random input when None), with ``protocol``'s device,
    threads, warm-up and repeats. Every model is timed in ``rounds`` rounds of alternating order,
    and the smallest median counts. A burst of load on a shared machine can slow a whole round of a
    few milliseconds per model: on the 2-core development VM, two rounds once measured a 4 ms
    subnet 28% slower at one keep ratio, where three checks of five rounds each then measured
    every ratio within 4.3%. When a ratio still measures over ``config.max_slowdown``, every model
    is timed again in as many rounds and keeps its faster time. The network's keep ratio is
    restored afterwards.

    Returns one record per batch size: ``batch_size``, ``ungated_ms``, ``gated_ms`` (keep ratio to
    ms), ``worst_ratio``, ``worst_slowdown`` (the largest relative slowdown, negative when every
    ratio ran faster), ``max_slowdown`` (the configured bound) and ``ungated_spread``: the ungated
    subnet is timed as two copies, and this is how much slower the slower copy measured.
    ``ungated_ms`` is the faster copy's time. ``timing_noise`` is the machine's timing noise in the
    same check (:func:`timing_noise`).

    Raises:
        ValueError: if ``ratios`` is empty, ``rounds`` is below 1, or ``images`` contains fewer
            images than a batch size needs.
        GateConfigError: if a ratio lies outside ``keep_ratio_range``.
    """
    if not ratios:
        raise ValueError("measure_batch_slowdown needs at least one keep ratio, but got none.")
    if rounds < 1:
        raise ValueError(f"measure_batch_slowdown needs rounds >= 1, but got {rounds}.")
    for ratio in ratios:
        network.config.check_keep_ratio(ratio)
    from nas.gates.timing import fastest_medians
    from predictors.modules import fold_batchnorm

    protocol = _default_protocol(ungated, protocol)
    batch_sizes = sorted(network.config.measure_batch_sizes)[1:]
    original = network.keep_ratio
    # The ungated subnet is timed twice, as two copies, so the record shows the timing spread.
    folded: dict[Any, nn.Module] = {"ungated": copy.deepcopy(ungated).eval(), "ungated again": copy.deepcopy(ungated).eval()}
    try:
        for ratio in ratios:
            network.set_keep_ratio(ratio)
            folded[float(ratio)] = copy.deepcopy(network).eval()
    finally:
        network.set_keep_ratio(original)
    for model in folded.values():
        fold_batchnorm(model)

    records = []
    for batch_size in batch_sizes:
        inputs = None
        if images is not None:
            if len(images) < batch_size:
                raise ValueError(f"measure_batch_slowdown needs {batch_size} images for batch size {batch_size}, "
                                 f"but got {len(images)}.")
            inputs = images[:batch_size]
        batch_protocol = dataclasses.replace(protocol, batch_size=batch_size)
        latency = fastest_medians(folded, shape, batch_protocol, rounds, inputs)
        base = min(latency["ungated"], latency["ungated again"])
        slowest = max(ms for name, ms in latency.items() if not isinstance(name, str))  # keep ratios are floats
        if slowest / base - 1.0 > network.config.max_slowdown:
            # A ratio over the bound is timed again with every model: a real slowdown persists, a
            # noisy moment does not, and each model keeps its faster time.
            log.info("gates: a keep ratio measured over max_slowdown at batch %d; timing every model again",
                     batch_size)
            again = fastest_medians(folded, shape, batch_protocol, rounds, inputs)
            latency = {name: min(ms, again[name]) for name, ms in latency.items()}
        first, second = latency.pop("ungated"), latency.pop("ungated again")
        base = min(first, second)
        worst_ratio = max(latency, key=latency.get)
        record = {"batch_size": batch_size, "ungated_ms": base, "gated_ms": latency, "worst_ratio": worst_ratio,
                  "worst_slowdown": latency[worst_ratio] / base - 1.0, "max_slowdown": network.config.max_slowdown,
                  "ungated_spread": max(first, second) / base - 1.0}
        record["timing_noise"] = timing_noise(record)
        records.append(record)
    return records


def timing_noise(record: dict[str, Any]) -> float:
    """Return the timing noise that a batch-check record shows, as a share of the ungated latency.

    The larger of ``ungated_spread`` (two timings of the ungated subnet) and how far the gated
    network at keep ratio 1.0, where no gate runs, measured from ungated in either direction.
    """
    full_keep = record["gated_ms"].get(1.0)
    at_full_keep = abs(full_keep / record["ungated_ms"] - 1.0) if full_keep is not None else 0.0
    return max(record["ungated_spread"], at_full_keep)


# Measurements per keep ratio in confirm_budget; their median counts.
CONFIRM_ROUNDS = 3


def _next_counts(network: GatedNetwork, ratio: float, direction: int, bound: float) -> float | None:
    """Step the keep ratio from ``ratio`` towards ``bound`` until a kept count changes and set it.

    Returns the new ratio, or None (with ``ratio`` set again) when ``bound`` comes first.
    """
    counts, moved = network.keep_counts(), ratio
    while network.keep_counts() == counts and (bound - moved) * direction > 0:
        moved = round(moved + direction * RATIO_STEP, 6)
        moved = min(moved, bound) if direction > 0 else max(moved, bound)
        network.set_keep_ratio(moved)
    if network.keep_counts() == counts:
        network.set_keep_ratio(ratio)
        return None
    return moved


def confirm_budget(network: GatedNetwork, shape: tuple[int, ...], protocol: Any = None) -> float:
    """Move ``network``'s keep ratio, from where it is, to the highest that measures within the budget.

    The budget is ``config.latency_budget_ms``. ``apply_gates`` calls it after choosing the ratio
    from predictions. ``shape`` is one input's
    (C, H, W) and ``protocol`` the ``MeasurementProtocol`` (default: the model's device, batch 1).

    Blocks timed alone save slightly more than in the network, so a prediction just under the
    budget can measure a few percent over it; a pessimistic prediction leaves budget unused. Each
    step moves the ratio until a kept count changes. Over the budget, the ratio goes down until it
    measures within. Within it, the ratio goes up while the next step still measures within, up
    to the top of ``keep_ratio_range``. Each measurement is the median of three. Returns the ratio.

    NOTE: a later measurement of the same network can still differ by the machine's noise (a few
    percent on a shared 2-core VM), so a budget at the edge may be exceeded there. At batch sizes
    above 1 the measurement runs on random input with gates not yet trained. Their selections
    differ less between images than after fine-tuning on real ones. So the batch's union of kept
    channels, and with it the latency, can come out lower than in deployment.

    Raises:
        GateConfigError: when the network measures over budget at the low end of the range too.
    """
    budget = network.config.latency_budget_ms
    if budget is None:
        raise GateConfigError("confirm_budget needs gates.latency_budget_ms in the network's config, but it is null.")
    low, high = network.config.keep_ratio_range
    protocol = _default_protocol(network, protocol)

    def measure() -> float:
        # The median of three measurements: one alone varies by a few percent between calls.
        return float(np.median([_measure_ms(network, shape, protocol, rounds=1) for _ in range(CONFIRM_ROUNDS)]))

    ratio = network.keep_ratio
    measured = measure()
    while measured <= budget and network.gated_blocks():
        higher = _next_counts(network, ratio, +1, high)
        if higher is None:
            break
        trial = measure()
        if trial > budget:
            network.set_keep_ratio(ratio)
            log.info("gates: keep ratio %.2f measured %.4f ms, over latency_budget_ms %.4f; keeping %.2f", higher,
                     trial, budget, ratio)
            break
        log.info("gates: keep ratio %.2f measured %.4f ms, within latency_budget_ms %.4f as well", higher, trial,
                 budget)
        ratio, measured = higher, trial
    while measured > budget:
        if not network.gated_blocks():
            raise GateConfigError(no_gate_message(budget, measured))
        previous, lower = ratio, _next_counts(network, ratio, -1, low)
        if lower is None:
            raise GateConfigError(
                f"gates.latency_budget_ms={budget} is below the measured {measured:.4f} ms at the lowest keep ratio "
                f"{low}; raise the budget, lower gates.keep_ratio_range[0], or pick a smaller subnet."
            )
        log.info("gates: keep ratio %.2f measured %.4f ms, over latency_budget_ms %.4f; trying %.2f", previous,
                 measured, budget, lower)
        ratio, measured = lower, measure()
    log.info("gates: keep ratio %.2f measured %.4f ms within latency_budget_ms %.4f", ratio, measured, budget)
    return ratio


def apply_gates(model: nn.Module, cfg: Mapping[str, Any] | GateConfig,
                profile_table: Mapping[str, float] | None = None, input_shape: Sequence[int] | None = None,
                plan: Mapping[str, Any] | None = None, protocol: Any = None,
                block_latency: Any = None) -> GatedNetwork:
    """Return a gated copy of ``model``; ``model`` itself is unchanged and can serve as the distillation teacher.

    Args:
        model: a subnet built from gateable residual blocks, such as ``ResNetSubnet``.
        cfg: a ``conf/gates`` node. With ``name: none`` the network carries no gate and runs as ``model``.
        profile_table: ``{LayerSpec.key(): latency_ms}`` for the device at one batch size. It sets the
            channel steps with ``placement: table`` and the channel-gate placement.
        input_shape: (C, H, W) of one input image; inferred from ``model.arch.resolution`` when omitted.
        plan: a :meth:`GatedNetwork.describe` record to rebuild the same gates (for loading a
            fine-tuned checkpoint); nothing is measured and the table is not consulted. A record
            with ``batchnorm_stats`` also gets an empty BatchNorm bank of the recorded shape, which
            ``load_state_dict`` then fills.
        protocol: the ``predictors.protocol.MeasurementProtocol`` for ``placement: measure`` (device,
            threads, warm-up, repeats; the batch sizes come from ``measure_batch_sizes``), and for
            measuring the ungated model against ``latency_budget_ms`` at its batch size. Defaults to
            the model's device, batch size 1, 5 warm-up passes and 15 timed ones.
        block_latency: a ``predictors.gated.GatedBlockLatency`` of this device at the protocol's
            batch size, or a function ``(model, input_shape, gated block names) -> GatedBlockLatency``
            that is called only once placement has put gates on some blocks (``train.py`` passes
            one that profiles just those blocks). Required by ``latency_budget_ms``.

    Raises:
        GateConfigError: on an invalid configuration, a plan that does not fit the model, or a latency
            budget that no keep ratio in the range meets.
    """
    config = parse_gate_config(cfg)
    if config.enabled and not (config.channel or config.spatial):
        log.warning("gates: gates.channel and gates.spatial are both false, so no gate is placed and the network "
                    "runs as the ungated subnet; use gates=none for that.")
    if config.enabled and config.mode == "mask" and config.placement == "measure" and plan is None:
        log.warning("gates: gates.mode=mask computes every channel and column and masks them, so the gates only add "
                    "time there; placement times the skip path. Use gates.mode=skip to deploy, mask to compare.")
    shape = tuple(input_shape) if input_shape is not None else _infer_input_shape(model)
    gated_model = copy.deepcopy(model)
    sites = find_block_sites(gated_model, shape)
    if config.enabled and not sites:
        log.warning("gates: %s has no block of a gateable type (registered: %s), so no gate is placed and the "
                    "network runs as the ungated subnet. Make your block class gateable with "
                    "nas.gates.register_block_layout, in a module that your study imports (docs/gates.md, "
                    "'Adding a block type').", type(model).__name__, ", ".join(registered_block_types()))

    if plan is not None:
        plans, ratio = _plans_from_record(plan, sites)
        recorded = plan.get("config") if isinstance(plan.get("config"), Mapping) else {}
        conflicts = {key: (recorded[key], getattr(config, key)) for key in ("name", "mode")
                     if key in recorded and recorded[key] != getattr(config, key)}
        if conflicts:
            log.warning("gates: the gate plan was recorded with %s, but cfg sets %s; the plan's blocks are rebuilt "
                        "and cfg's settings apply. Pass the record's config as cfg to rebuild it as recorded.",
                        {k: v[0] for k, v in conflicts.items()}, {k: v[1] for k, v in conflicts.items()})
    else:
        measure = None
        if config.enabled and config.placement == "measure":
            measure = _measured_placement(gated_model, config, protocol)
        plans = plan_blocks(sites, config, profile_table, measure)
        ratio = config.keep_ratio
        if config.enabled and config.latency_budget_ms is not None:
            ratio = _budget_keep_ratio(model, shape, sites, plans, config, block_latency, protocol)
            # The budget's ratio replaces keep_ratio as the target of fine-tuning and calibration.
            config = dataclasses.replace(config, keep_ratio=ratio)

    runtime = GateRuntime(mode=config.mode, skip_max_share=config.skip_max_share,
                          dropout_fraction=config.targeted_dropout.fraction,
                          dropout_rate=config.targeted_dropout.rate, seed=config.seed)
    _install_gates(gated_model, sites, plans, runtime)
    network = GatedNetwork(gated_model, config, plans, runtime, ratio)
    if plan is None and config.enabled and config.latency_budget_ms is not None:
        ratio = confirm_budget(network, shape, protocol)
        network.config = dataclasses.replace(config, keep_ratio=ratio)
    if plan is not None and plan.get("batchnorm_stats") is not None:
        # The bank is attached without loading its rows: load_state_dict fills both it and the layers.
        bank = BatchNormBank.from_record(plan["batchnorm_stats"])
        layers = batchnorm_layers(network.model)
        for path, stats in zip(bank.paths, bank.stats):
            channels = stats.running_mean.shape[1]
            if path not in layers or layers[path].num_features != channels:
                found = f"{layers[path].num_features} channels" if path in layers else "no BatchNorm layer"
                raise GateConfigError(f"The gate record's batchnorm_stats name the BatchNorm {path!r} with {channels} "
                                      f"channels, but the model has {found} there; pass the record saved with "
                                      "these weights, or rebuild the gates.")
        network.batchnorm_bank = bank
    network.train(model.training)
    gated_blocks = network.gated_blocks()
    log.info("gates: %d of %d blocks gated, keep ratio %.2f, kept (channels, columns) %s", len(gated_blocks),
             len(sites), ratio, network.keep_counts())
    # Only a chosen ratio below 1.0 can keep everything by rounding up. A latency budget picks its ratio by
    # measurement, and a record rebuilt with plan= keeps the ratio it was saved at.
    if (plan is None and config.latency_budget_ms is None and ratio < 1.0 and gated_blocks
            and all(block.keeps_all for block in gated_blocks.values())):
        highest = network.highest_dropping_ratio()
        advice = ("No ratio of gates.keep_ratio_range drops anything: use gates=none." if highest is None else
                  f"The highest ratio at which a gate drops something is {highest:g}: set gates.keep_ratio to it "
                  "or lower.")
        log.warning("gates: at keep ratio %g every gated block keeps all its channels and columns, because kept "
                    "counts round up (channel counts to the blocks' latency steps), so the network computes as much "
                    "as the ungated subnet. %s", ratio, advice)
    if plan is None and config.enabled and sites and not gated_blocks:
        # placement=all gates every block where the low end of keep_ratio_range drops something.
        advice = ("a lower gates.keep_ratio_range start, so that a gate drops channels"
                  if config.placement == "all" else "gates.placement=all to gate every block anyway")
        log.warning("gates: placement=%s put no gate on any of the %d blocks (the reasons are logged above), so the "
                    "network runs as the ungated subnet at every keep ratio. Use gates=none, or %s.",
                    config.placement, len(sites), advice)
    return network
