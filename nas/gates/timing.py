"""Measured gate placement: time each block with and without gates on this machine, keep what pays.

A profile table times convolutions, not the gates' own pooling, top-k and index copies, which
dominate small blocks at batch 1. Timing the gated block itself includes them. Each option is
timed with :func:`predictors.profiling.measure_module` (BatchNorm folded, eval mode, median of
repeats) at every batch size of ``gates.measure_batch_sizes``, in two rounds of alternating order,
and the smaller of each option's two medians counts. :func:`choose_gate_options` then decides for
all blocks together, so that the network, not each block, keeps within ``max_slowdown`` at the
larger batch sizes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from nas.gates.batchpath import BatchPathCosts
from nas.gates.blocks import GateRuntime, block_layout, gated_block_class
from nas.gates.config import GateConfig
from nas.gates.modules import keep_count
from nas.gates.planning import (
    BlockSite,
    MeasuredDecision,
    MeasuredPlacement,
    default_channel_steps,
    low_keep_channels,
)
from predictors.modules import fold_batchnorm
from predictors.profiling import MeasurementProtocol, measure_module

__all__ = [
    "BlockTimer",
    "GATE_OPTIONS",
    "batch_path_modules",
    "choose_gate_options",
    "fastest_medians",
    "grouped_limit",
    "make_block_timer",
    "make_measured_placement",
    "measured_steps",
    "option_module",
    "time_batch_paths",
    "time_channel_counts",
]

log = logging.getLogger(__name__)

# Gate options a block can take: name -> (channel gate, column gate).
GATE_OPTIONS: dict[str, tuple[bool, bool]] = {
    "none": (False, False),
    "channel": (True, False),
    "column": (False, True),
    "channel+column": (True, True),
}

# A block timer maps a block and its channel steps to {option: {batch size: latency ms}}.
BlockTimer = Callable[[nn.Module, BlockSite, list[int]], dict[str, dict[int, float]]]


def option_module(block: nn.Module, site: BlockSite, option: str, config: GateConfig, steps: list[int],
                  skip_max_share: float, channels: int | None = None, grouped: bool = False,
                  columns: int | None = None) -> nn.Module:
    """Return a folded eval copy of ``block`` with ``option``'s gates, keeping ``channels`` (default:
    the low end of ``keep_ratio_range``, snapped up to ``steps``) and ``columns`` (default: that
    keep ratio's share), on the grouped path if ``grouped``."""
    module = copy.deepcopy(block).eval()
    channel, spatial = GATE_OPTIONS[option]
    if channel or spatial:
        runtime = GateRuntime(mode="skip", skip_max_share=skip_max_share)
        gated_class = gated_block_class(block)
        module = gated_class(module, block_layout(block), site.in_channels, site.in_size, channel, spatial,
                             runtime).eval()
        low = config.keep_ratio_range[0]
        if channels is None:
            channels = low_keep_channels(site, config, steps)
        module.set_keep(channels, keep_count(low, site.inner_size) if columns is None else columns)
        if grouped:
            module.grouped_max_channels = module.inner_channels
    fold_batchnorm(module)
    return module


def fastest_medians(modules: Mapping[Any, nn.Module], shape: tuple[int, ...], protocol: MeasurementProtocol,
                    rounds: int = 2, inputs: torch.Tensor | None = None) -> dict[Any, float]:
    """Return each module's latency (ms): the smallest median of ``rounds`` rounds that time all modules
    in alternating order, on ``inputs`` if given (else random input)."""
    names = list(modules)
    latency: dict[Any, float] = {}
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            median = measure_module(modules[name], shape, protocol, record_operators=False, inputs=inputs).median_ms
            latency[name] = min(median, latency.get(name, float("inf")))
    return latency


def make_block_timer(config: GateConfig, protocol: MeasurementProtocol) -> BlockTimer:
    """Return a timer of the enabled gate options at the low end of ``keep_ratio_range``.

    The smallest batch size is timed on the path the runtime takes at that keep ratio, larger ones
    on the dense masked path.

    ``protocol`` sets device, threads, dtype, warm-up and repeats; its batch size is replaced by
    each of ``config.measure_batch_sizes``.
    """
    options = [name for name, (channel, spatial) in GATE_OPTIONS.items()
               if (not channel or config.channel) and (not spatial or config.spatial)]

    def time_block(block: nn.Module, site: BlockSite, steps: list[int]) -> dict[str, dict[int, float]]:
        shape = (site.in_channels, site.in_size, site.in_size)
        # A gate that keeps every feature at the low keep ratio never runs. Timing it would let noise
        # decide, so such options are left out.
        low = config.keep_ratio_range[0]
        channels = low_keep_channels(site, config, steps)
        drops = {"channel": channels < site.inner_channels, "column": keep_count(low, site.inner_size) < site.inner_size}
        available = [name for name in options
                     if name == "none" or all(drops[part] for part in name.split("+"))]
        latency: dict[str, dict[int, float]] = {name: {} for name in available}
        smallest = min(config.measure_batch_sizes)
        for batch_size in config.measure_batch_sizes:
            # Untrained gates pick similar features for every image, so the union of a batch's
            # selections is smaller than after training. Larger batches are therefore timed on the
            # dense masked path, the slowest one the runtime can take.
            share = config.skip_max_share if batch_size == smallest else 0.0
            modules = {name: option_module(block, site, name, config, steps, share) for name in available}
            batch_protocol = dataclasses.replace(protocol, batch_size=batch_size)
            for name, ms in fastest_medians(modules, shape, batch_protocol).items():
                latency[name][batch_size] = ms
        return latency

    return time_block


def _summary(latency: Mapping[str, Mapping[int, float]]) -> str:
    batches = "/".join(str(b) for b in sorted(latency["none"]))
    times = ", ".join(f"{name} " + "/".join(f"{t[b]:.3f}" for b in sorted(t)) for name, t in latency.items())
    return f"ms at batch {batches}: {times}"


def time_channel_counts(block: nn.Module, site: BlockSite, counts: list[int], config: GateConfig,
                        protocol: MeasurementProtocol, batch_size: int, grouped: bool = False) -> dict[int, float]:
    """Return the block's latency (ms) at ``batch_size`` per kept-channel count.

    Counts below the block's channels run its channel gate, on the grouped path if ``grouped``.
    The full count runs the ungated block, because a gate that keeps everything is not run. Two
    rounds in alternating order, the smaller median counts.
    """
    batch_protocol = dataclasses.replace(protocol, batch_size=batch_size)
    shape = (site.in_channels, site.in_size, site.in_size)
    modules = {count: option_module(block, site, "channel" if count < site.inner_channels else "none", config,
                                     counts, config.skip_max_share, channels=count, grouped=grouped)
               for count in counts}
    return fastest_medians(modules, shape, batch_protocol)


def _same_selection(module: nn.Module) -> nn.Module:
    """Make ``module``'s channel gate select the same channels for every image, in place, and return it."""
    fc = module.channel_gate.fc
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.copy_(torch.arange(fc.bias.numel(), 0, -1, dtype=fc.bias.dtype))
    return module


def batch_path_modules(block: nn.Module, site: BlockSite, counts: list[int],
                       config: GateConfig) -> dict[tuple[str, int], nn.Module]:
    """Return folded eval copies of a channel-gated ``block`` on each of its paths at batches above 1.

    Keys are ``("grouped", count)`` for each kept count of ``counts`` (all below the block's
    channels) and ``("gathered", width)`` for each multiple of 8 from the smallest count up to the
    block's channels. A gathered copy has a gate that gives every image the same ``width``
    channels, so a batch's union has exactly that width. At all channels it is the dense masked path.
    """
    channels = site.inner_channels
    if not counts or max(counts) >= channels:
        raise ValueError(f"counts must be kept-channel counts below the block's {channels} channels, but got {counts!r}.")
    widths = [width for width in default_channel_steps(channels) if min(counts) <= width < channels]
    modules: dict[tuple[str, int], nn.Module] = {}
    for count in counts:
        modules["grouped", count] = option_module(block, site, "channel", config, counts, config.skip_max_share,
                                                  channels=count, grouped=True)
    for width in widths:
        modules["gathered", width] = _same_selection(option_module(block, site, "channel", config, counts, 1.0,
                                                                   channels=width))
    modules["gathered", channels] = option_module(block, site, "channel", config, counts, 0.0, channels=min(counts))
    return modules


def time_batch_paths(block: nn.Module, site: BlockSite, counts: list[int], config: GateConfig,
                     protocol: MeasurementProtocol, batch_size: int) -> BatchPathCosts:
    """Time a channel-gated block's paths at ``batch_size`` (:func:`batch_path_modules`); return them as costs.

    All modules are timed in the same alternating rounds, so their times compare. The grouped
    copies do not compute a batch's union. At run time a block computes it unless grouping beats
    every union (:meth:`BatchPathCosts.always_grouped`), which costs a scatter, a max and a nonzero
    more than timed here.
    """
    modules = batch_path_modules(block, site, counts, config)
    batch_protocol = dataclasses.replace(protocol, batch_size=batch_size)
    latency = fastest_medians(modules, (site.in_channels, site.in_size, site.in_size), batch_protocol)
    return BatchPathCosts(batch_size, {count: ms for (path, count), ms in latency.items() if path == "grouped"},
                          {width: ms for (path, width), ms in latency.items() if path == "gathered"})


def grouped_limit(grouped_ms: Mapping[int, float], masked_ms: float) -> int:
    """Return the largest kept count up to which the grouped path was measured no slower than masking (0: none)."""
    limit = 0
    for count in sorted(grouped_ms):
        if grouped_ms[count] > masked_ms:
            break
        limit = count
    return limit


def measured_steps(latency: Mapping[int, float], tolerance: float) -> list[int]:
    """Return the kept-channel counts worth keeping from measured latency per count (the largest is all channels).

    A count is a step top when every larger count is more than ``tolerance`` (relative) slower.
    So channels that cost nothing extra are kept, and a gated count that is no faster than keeping
    more, or than the ungated block, is rounded up past it.
    """
    counts = sorted(latency)
    steps = [c for i, c in enumerate(counts)
             if all(latency[larger] > latency[c] * (1.0 + tolerance) for larger in counts[i + 1 :])]
    return steps


def choose_gate_options(latencies: Mapping[str, Mapping[str, Mapping[int, float]]],
                        config: GateConfig) -> dict[str, tuple[str, str]]:
    """Choose a gate option per block from measured latencies; return ``{block: (option, reason)}``.

    ``latencies`` maps each block to ``{option: {batch size: ms}}`` with a "none" entry. An option
    pays on its block when it is at least ``min_saving`` faster than "none" at the smallest batch
    size. At every larger batch size the gated blocks together may be at most ``max_slowdown``
    slower than ungated, a budget shared by all blocks: a gate that saves at large batches makes
    room for gates that cost a little there. Channel gates are timed there on the dense masked
    path, which is what they cost at every keep ratio. The grouped path is chosen afterwards only
    where it is faster, so it can only lower that.

    The choice starts from "none" everywhere and makes one change at a time while the budget
    holds. First come changes that save time at the smallest batch size without costing any at
    the larger ones, the largest saving first. Then come those that only save at the larger ones.
    Then each step takes the change with the most saving per share of budget it uses. The choice
    stops when no change helps.
    """
    if not latencies:
        return {}
    batches = sorted(next(iter(latencies.values()))["none"])
    smallest, larger = batches[0], batches[1:]
    ungated = {b: sum(latency["none"][b] for latency in latencies.values()) for b in larger}
    paying = {
        block: [name for name, times in latency.items()
                if name != "none" and times[smallest] <= latency["none"][smallest] * (1.0 - config.min_saving)]
        for block, latency in latencies.items()
    }
    choice = {block: "none" for block in latencies}
    extra = {b: 0.0 for b in larger}  # chosen minus ungated latency of all blocks, ms
    while True:
        best: tuple[tuple[float, ...], str, str] | None = None
        for block, options in paying.items():
            current = latencies[block][choice[block]]
            for option in options:
                times = latencies[block][option]
                gain = current[smallest] - times[smallest]
                delta = {b: times[b] - current[b] for b in larger}
                cost = sum(delta[b] / ungated[b] for b in larger)
                if gain < 0 or (gain == 0 and cost >= 0):
                    continue
                if any(extra[b] + delta[b] > config.max_slowdown * ungated[b] for b in larger):
                    continue
                rank = (0.0, -gain, cost) if cost <= 0 else (1.0, -gain / cost, 0.0)
                if best is None or rank < best[0]:
                    best = (rank, block, option)
        if best is None:
            break
        _, block, option = best
        for b in larger:
            extra[b] += latencies[block][option][b] - latencies[block][choice[block]][b]
        choice[block] = option

    decisions = {}
    for block, option in choice.items():
        summary = _summary(latencies[block])
        if option != "none":
            reason = f"measured {option} pays: {summary}"
        elif paying[block]:
            reason = (f"no gate: {', '.join(paying[block])} saves at batch {smallest}, but would take the gated "
                      f"blocks past max_slowdown {config.max_slowdown:.0%} at a larger batch: {summary}")
        else:
            reason = f"no gate pays: measured {summary}"
        decisions[block] = (option, reason)
    for b in larger:
        log.info("gates: gateable blocks at batch %d: %.3f ms gated against %.3f ms ungated (%+.1f%%, budget %+.1f%%)",
                 b, ungated[b] + extra[b], ungated[b], 100 * extra[b] / ungated[b], 100 * config.max_slowdown)
    return decisions


def column_alone_pays(latency: Mapping[str, Mapping[int, float]], chosen: str, config: GateConfig) -> bool:
    """Return whether a block's column gate alone pays where ``chosen`` (with a channel gate) was placed.

    It pays when it is at least ``min_saving`` faster than no gate at the smallest batch size, and
    no slower than ``chosen`` at every larger one, so that the shared batch budget still holds.
    """
    column, none = latency.get("column"), latency["none"]
    if column is None:
        return False
    batches = sorted(none)
    if column[batches[0]] > none[batches[0]] * (1.0 - config.min_saving):
        return False
    return all(column[b] <= latency[chosen][b] for b in batches[1:])


# Kept counts whose times a placement log line lists in full; longer lists show the steps only.
LOGGED_COUNTS = 16


def format_count_times(count_ms: Mapping[int, float], steps: Sequence[int]) -> str:
    """Return ``count: ms`` pairs for a log line: every count, or only ``steps`` when there are many."""
    listed_counts = sorted(count_ms) if len(count_ms) <= LOGGED_COUNTS else [c for c in steps if c in count_ms]
    text = ", ".join(f"{count}: {count_ms[count]:.3f}" for count in listed_counts)
    if len(listed_counts) < len(count_ms):
        text += f"; {len(count_ms)} counts timed, the steps shown, all in the gate record's latency_ms"
    return text


def make_measured_placement(model: nn.Module, config: GateConfig, protocol: MeasurementProtocol) -> MeasuredPlacement:
    """Return a placement function for :func:`nas.gates.planning.plan_blocks` that times blocks of ``model``.

    The function times every block's options and decides with :func:`choose_gate_options`. Each
    channel-gated block is then timed at every kept-channel count of its steps at the smallest
    batch size, which gives its measured steps (:func:`measured_steps`). Without a column gate its
    batch paths are also timed at the largest batch size (:func:`time_batch_paths`), which gives
    its ``batch_costs`` and ``grouped_max_channels`` (:func:`grouped_limit`). Returns per block
    (channel gate, column gate, grouped_max_channels, channel steps, measured ms per count, reason,
    measured ms per option and batch size, batch path costs or None).
    """
    timer = make_block_timer(config, protocol)

    def place(sites: Sequence[BlockSite], steps: Sequence[list[int]]) -> list[MeasuredDecision]:
        latencies = {}
        for site, site_steps in zip(tqdm(sites, desc="timing gate options", unit="block", leave=False), steps):
            latencies[site.name] = timer(model.get_submodule(site.name), site, site_steps)
        decisions = choose_gate_options(latencies, config)
        smallest, largest = min(config.measure_batch_sizes), max(config.measure_batch_sizes)
        result = []
        for site, site_steps in zip(sites, steps):
            option, reason = decisions[site.name]
            channel, spatial = GATE_OPTIONS[option]
            block = model.get_submodule(site.name)
            count_ms: dict[int, float] = {}
            grouped_max, batch_costs = 0, None
            if channel:
                # Gathering most of a block's weights can cost more than the channels it skips, so
                # kept counts snap to the measured steps, not to the default multiples.
                # NOTE: each block is timed alone, with its weights in cache. Inside the network, counts
                # near the full width saved less than these times show (docs/benchmarks.md).
                count_ms = time_channel_counts(block, site, site_steps, config, protocol, smallest)
                site_steps = measured_steps(count_ms, config.step_tolerance)
                counts = format_count_times(count_ms, site_steps)
                low_keep_count = low_keep_channels(site, config, site_steps)
                if low_keep_count >= site.inner_channels:
                    channel = False
                    if site_steps == [site.inner_channels]:
                        cause = "no kept count was measured faster than keeping more"
                    else:
                        # The low end of keep_ratio_range rounds up past every faster step, so the gate
                        # would keep every channel at every ratio that set_keep_ratio accepts.
                        cause = (f"keep ratio {config.keep_ratio_range[0]} rounds up to all {site.inner_channels} "
                                 f"channels at the measured steps {'/'.join(map(str, site_steps))}")
                    reason = f"no channel gate: {cause} (ms per count at batch {smallest}: {counts}); {reason}"
                    if spatial and not column_alone_pays(latencies[site.name], option, config):
                        spatial = False
                        reason = f"no column gate either: measured alone it does not pay; {reason}"
                else:
                    reason += (f"; kept channels snap to measured steps {'/'.join(map(str, site_steps))} "
                               f"(ms per count at batch {smallest}: {counts})")
            grouped_possible = gated_block_class(block).supports_channel_path(block_layout(block))
            if channel and not spatial and largest > 1 and grouped_possible:
                gated_counts = [count for count in site_steps if count < site.inner_channels]
                batch_costs = time_batch_paths(block, site, gated_counts, config, protocol, largest)
                grouped_max = grouped_limit(batch_costs.grouped, batch_costs.gathered[site.inner_channels])
                reason += (f"; batches above 1 take the cheaper path (ms at batch {largest}, grouped per "
                           "kept count: " + ", ".join(f"{c}: {ms:.3f}" for c, ms in batch_costs.grouped.items())
                           + "; gathered per union width: "
                           + ", ".join(f"{w}: {ms:.3f}" for w, ms in batch_costs.gathered.items()) + ")")
            result.append((channel, spatial, grouped_max, list(site_steps), count_ms, reason, latencies[site.name],
                           batch_costs))
        return result

    return place
