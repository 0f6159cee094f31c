"""Keep ratios for a latency budget, predicted from gated-block profiles of the device.

The prediction at keep ratio ``r`` is the ungated network's measured latency plus, for each gated
block, the predicted latency of that block with its gates keeping ``r`` minus the block's
predicted ungated latency. The block model (``predictors.gated.GatedBlockLatency``) learned from
blocks timed with their gates, so the gates' own cost, the gathers and the channel staircase are
in it, which a table of convolution latencies cannot hold.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nas.gates.config import GateConfig, GateConfigError
from nas.gates.modules import keep_count
from nas.gates.planning import BlockPlan, BlockSite

__all__ = ["choose_keep_ratio", "gated_runs", "no_gate_message", "predict_latency_ms", "ratio_grid"]

log = logging.getLogger(__name__)

# Candidate keep ratios are this far apart. Finer steps rarely change a kept count, because the
# inner maps that the gates act on are small (8 to 128 channels, 7 to 28 columns).
RATIO_STEP = 0.01


def ratio_grid(low: float, high: float) -> list[float]:
    """Return the keep ratios from ``high`` down to ``low`` in steps of RATIO_STEP, ``low`` included."""
    ratios = np.round(np.arange(high, low - 1e-9, -RATIO_STEP), 6).tolist()
    if not ratios or ratios[-1] > low:
        ratios.append(float(low))
    return ratios


def gated_runs(sites: Sequence[BlockSite], plans: Sequence[BlockPlan], ratio: float,
               batch_size: int) -> list[tuple[str, dict[str, Any]]]:
    """Return (block name, run) for each gated block at keep ratio ``ratio``, as the runtime runs it.

    A run (see ``predictors.gated.block_runs``) holds the gate option, the kept channels (snapped
    to the plan's steps) and columns, and whether a batch of ``batch_size`` takes the grouped path.
    For a block with measured ``batch_costs``, the run takes the path chosen for a union of every
    channel. The runtime may gather a narrower union when that was measured faster.
    """
    runs = []
    for site, plan in zip(sites, plans):
        if not plan.gated:
            continue
        channels = plan.snap_channels(keep_count(ratio, site.inner_channels)) if plan.channel else site.inner_channels
        columns = keep_count(ratio, site.inner_size) if plan.spatial else site.inner_size
        option = "+".join(name for name, on in (("channel", plan.channel), ("column", plan.spatial)) if on)
        if channels == site.inner_channels and columns == site.inner_size:
            option = "none"  # a gate that keeps everything is not run
        grouped = batch_size > 1 and option == "channel"
        if grouped and plan.batch_costs is not None:
            # The runtime chooses per batch. A batch of differing images has a wide union, so the
            # prediction takes the choice for a union of every channel.
            grouped = plan.batch_costs.choose(channels, site.inner_channels) == "grouped"
        elif grouped:
            grouped = channels <= plan.grouped_max_channels
        runs.append((site.name, {"option": option, "channels": channels, "columns": columns, "grouped": grouped}))
    return runs


def predict_latency_ms(base_ms: float, sites: Sequence[BlockSite], plans: Sequence[BlockPlan],
                       signatures: Mapping[str, Mapping[str, Any]], ratio: float, block_latency: Any) -> float:
    """Predict the gated network's latency (ms per batch of the model's batch size) at keep ratio ``ratio``.

    Args:
        base_ms: the ungated network's measured latency.
        signatures: ``predictors.gated.block_signature`` of each block, by block name.
        block_latency: a fitted ``predictors.gated.GatedBlockLatency``.
    """
    runs = gated_runs(sites, plans, ratio, block_latency.batch_size)
    if not runs:
        return base_ms
    delta = block_latency.delta_ms([signatures[name] for name, _ in runs], [run for _, run in runs])
    return float(base_ms + np.sum(delta))


def no_gate_message(budget: float, measured_ms: float) -> str:
    """Return the error for a budget that a subnet without gates misses."""
    return (f"gates.latency_budget_ms={budget} is below the measured {measured_ms:.4f} ms of this subnet, and "
            "placement put no gate on it (none pays on this device), so no keep ratio runs faster; raise the "
            "budget or pick a smaller subnet.")


def choose_keep_ratio(base_ms: float, sites: Sequence[BlockSite], plans: Sequence[BlockPlan],
                      signatures: Mapping[str, Mapping[str, Any]], config: GateConfig, block_latency: Any) -> float:
    """Return the largest keep ratio in ``keep_ratio_range`` whose predicted latency fits the budget.

    Without any gated block the ratio changes nothing, so the top of the range is returned when
    ``base_ms`` fits.

    Raises:
        GateConfigError: when even the low end of the range is predicted over budget.
    """
    budget = config.latency_budget_ms
    low, high = config.keep_ratio_range
    if not any(plan.gated for plan in plans):
        if base_ms > budget:
            raise GateConfigError(no_gate_message(budget, base_ms))
        return float(high)
    ratios = ratio_grid(low, high)
    latency = float("nan")
    for ratio in ratios:
        latency = predict_latency_ms(base_ms, sites, plans, signatures, float(ratio), block_latency)
        if latency <= budget:
            log.info("gates: keep ratio %.2f, predicted %.4f ms within latency_budget_ms %.4f (ungated %.4f ms)",
                     ratio, latency, budget, base_ms)
            return float(ratio)
    if latency >= base_ms:
        raise GateConfigError(
            f"gates.latency_budget_ms={budget} is below the predicted {latency:.4f} ms at the lowest keep ratio "
            f"{low}, and the gates are predicted to slow this subnet down (ungated {base_ms:.4f} ms) at every "
            f"ratio, so no keep ratio can meet a budget below {base_ms:.4f} ms. Use gates.placement=measure, "
            "which places a gate only where it pays, or pick a smaller subnet."
        )
    raise GateConfigError(
        f"gates.latency_budget_ms={budget} is below the predicted {latency:.4f} ms at the lowest keep ratio {low} "
        f"(ungated {base_ms:.4f} ms); raise the budget, lower gates.keep_ratio_range[0], or pick a "
        "smaller subnet."
    )
