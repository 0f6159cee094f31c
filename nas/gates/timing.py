"""Measured gate placement: time each block with and without gates on this machine, keep what pays.

A profile table times convolutions, not the gates' own pooling, top-k and index copies, which
dominate small blocks at batch 1. Timing the gated block itself includes them. Each option is
timed with :func:`predictors.profiling.measure_module` (BatchNorm folded, eval mode, median of
repeats) at every batch size of ``gates.measure_batch_sizes``, in two rounds of alternating order,
and the smaller of each option's two medians counts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable

from torch import nn

from nas.gates.blocks import GateRuntime, block_layout, gated_block_class
from nas.gates.config import GateConfig
from nas.gates.modules import keep_count
from nas.gates.planning import BlockSite
from predictors.modules import fold_batchnorm
from predictors.profiling import MeasurementProtocol, measure_module

__all__ = ["BlockTimer", "GATE_OPTIONS", "choose_gate_option", "make_block_timer", "make_measured_placement"]

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


def _option_module(block: nn.Module, site: BlockSite, option: str, config: GateConfig, steps: list[int],
                   skip_max_share: float) -> nn.Module:
    module = copy.deepcopy(block).eval()
    channel, spatial = GATE_OPTIONS[option]
    gated_class = gated_block_class(block)
    # fold_batchnorm folds only conv<suffix>/bn<suffix> pairs, so blocks named otherwise (MobileNetV3's
    # conv_pw, bn1) are timed as gated blocks without gates, which fold BatchNorm themselves.
    if channel or spatial or not gated_class.folds_by_name:
        runtime = GateRuntime(mode="skip", skip_max_share=skip_max_share)
        module = gated_class(module, block_layout(block), site.in_channels, site.in_size, channel, spatial,
                             runtime).eval()
        low = config.keep_ratio_range[0]
        requested = keep_count(low, site.inner_channels)
        channels = min((s for s in steps if s >= requested), default=site.inner_channels)
        module.set_keep(channels, keep_count(low, site.inner_size))
    fold_batchnorm(module)
    return module


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
        channels = min((s for s in steps if s >= keep_count(low, site.inner_channels)), default=site.inner_channels)
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
            modules = {name: _option_module(block, site, name, config, steps, share) for name in available}
            batch_protocol = dataclasses.replace(protocol, batch_size=batch_size)
            for order in (available, available[::-1]):
                for name in order:
                    median = measure_module(modules[name], shape, batch_protocol, record_operators=False).median_ms
                    latency[name][batch_size] = min(median, latency[name].get(batch_size, float("inf")))
        return latency

    return time_block


def choose_gate_option(latency: dict[str, dict[int, float]], config: GateConfig) -> tuple[str, str]:
    """Return the fastest gate option that pays, and the decision in words.

    An option pays when, at the smallest batch size, it is at least ``min_saving`` faster than the
    ungated block, and at every batch size at most ``max_slowdown`` slower.
    """
    base = latency["none"]
    smallest = min(base)
    paying = []
    for name, times in latency.items():
        if name == "none":
            continue
        saves = times[smallest] <= base[smallest] * (1.0 - config.min_saving)
        bounded = all(times[b] <= base[b] * (1.0 + config.max_slowdown) for b in base)
        if saves and bounded:
            paying.append(name)

    summary = ", ".join(
        f"{name} " + "/".join(f"{times[b]:.3f}" for b in sorted(times)) for name, times in latency.items()
    )
    batches = "/".join(str(b) for b in sorted(base))
    if not paying:
        return "none", f"no gate pays: measured ms at batch {batches}: {summary}"
    best = min(paying, key=lambda name: latency[name][smallest])
    return best, f"measured {best} pays: ms at batch {batches}: {summary}"


def make_measured_placement(model: nn.Module, config: GateConfig,
                            protocol: MeasurementProtocol) -> Callable[[BlockSite, list[int]], tuple[bool, bool, str,
                                                                                                        dict]]:
    """Return a placement function for :func:`nas.gates.planning.plan_blocks` that times blocks of ``model``.

    The function maps a block site and its channel steps to (channel gate, column gate, reason,
    measured ms per option and batch size).
    """
    timer = make_block_timer(config, protocol)

    def place(site: BlockSite, steps: list[int]) -> tuple[bool, bool, str, dict]:
        latency = timer(model.get_submodule(site.name), site, steps)
        option, reason = choose_gate_option(latency, config)
        channel, spatial = GATE_OPTIONS[option]
        return channel, spatial, reason, latency

    return place
