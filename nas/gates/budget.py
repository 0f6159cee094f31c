"""Keep ratios for a latency budget, predicted from the device's layer profiles."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from nas.gates.config import GateConfig, GateConfigError
from nas.gates.modules import keep_count
from nas.gates.planning import BlockPlan, BlockSite
from nas.spaces.layers import LayerSpec

__all__ = ["choose_keep_ratio", "predict_latency_ms"]

log = logging.getLogger(__name__)

# Candidate keep ratios are this far apart. Finer steps rarely change a kept count, because the
# inner maps that the gates act on are small (8 to 128 channels, 7 to 28 columns).
RATIO_STEP = 0.01


def _lookup(table: Mapping[str, float], layer: LayerSpec, where: str) -> float:
    key = layer.key()
    if key not in table:
        raise GateConfigError(
            f"The profile table has no latency for {where} {key}; profile this subnet's layers on the device "
            "(its ProfileStore) or set gates.latency_budget_ms: null."
        )
    return float(table[key])


def predict_latency_ms(layers: Sequence[tuple[str, LayerSpec]], sites: Sequence[BlockSite],
                       plans: Sequence[BlockPlan], ratio: float, table: Mapping[str, float]) -> float:
    """Predict the network latency (ms, at the table's batch size) at keep ratio ``ratio``.

    Ungated layers cost their table entry. A gated block's producer and consumer cost their entries
    at the snapped kept channel count, times the kept share of columns when a column gate is placed.

    NOTE: the column share is a proportional estimate, because the table times square maps only.
    The gates' own cost is not in the table either, so measure the gated network to confirm a budget.
    """
    plan_by_name = {plan.name: plan for plan in plans}
    gated_paths: set[str] = set()
    total = 0.0
    for site in sites:
        plan = plan_by_name[site.name]
        if not (plan.channel or plan.spatial):
            continue
        gated_paths.update((site.producer_path, site.consumer_path))
        channels = plan.snap_channels(keep_count(ratio, site.inner_channels)) if plan.channel else site.inner_channels
        columns = keep_count(ratio, site.inner_size) if plan.spatial else site.inner_size
        producer, consumer = site.gated_layers(channels)
        block = _lookup(table, producer, site.producer_path) + _lookup(table, consumer, site.consumer_path)
        total += block * columns / site.inner_size
    for path, layer in layers:
        if path not in gated_paths:
            total += _lookup(table, layer, path)
    return total


def choose_keep_ratio(layers: Sequence[tuple[str, LayerSpec]], sites: Sequence[BlockSite],
                      plans: Sequence[BlockPlan], config: GateConfig, table: Mapping[str, float]) -> float:
    """Return the largest keep ratio in ``keep_ratio_range`` whose predicted latency fits the budget.

    Raises:
        GateConfigError: when even the low end of the range is predicted over budget.
    """
    budget = config.latency_budget_ms
    low, high = config.keep_ratio_range
    ratios = np.round(np.arange(high, low - 1e-9, -RATIO_STEP), 6)
    if ratios.size == 0 or ratios[-1] > low:
        ratios = np.append(ratios, low)
    latency = float("nan")
    for ratio in ratios:
        latency = predict_latency_ms(layers, sites, plans, float(ratio), table)
        if latency <= budget:
            log.info("gates: keep ratio %.2f, predicted %.4f ms within latency_budget_ms %.4f", ratio, latency, budget)
            return float(ratio)
    raise GateConfigError(
        f"gates.latency_budget_ms={budget} is below the predicted {latency:.4f} ms at the lowest keep ratio {low}; "
        "raise the budget, lower keep_ratio_range[0] and fine-tune again, or pick a smaller subnet."
    )
