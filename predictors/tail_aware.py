"""Tail-aware width choices: move each channel count to the right edge of its latency step.

On a device whose latency rises in steps of output channels (SIMD blocks on a CPU, tiles and waves
on a GPU), a width inside a step pays for the whole step. Moving the choice to the widest channel
count with the same latency buys capacity for free. For each width decision this module varies
that decision alone in the space's largest architecture, sums the latency of the convolutions
whose output channels it sets, and moves every choice ``w`` to the largest ``c >= w`` whose latency, and that of every
grid point between them, stays within ``tolerance`` of the latency at ``w``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from functools import reduce
from typing import Any

import numpy as np

from nas.spaces.base import SearchSpace
from nas.spaces.layers import LayerSpec

__all__ = ["DEFAULT_TOLERANCE", "snap_to_step_edges", "tail_aware_plan", "tail_aware_widths", "width_latency_curve"]

logger = logging.getLogger(__name__)

# Relative latency rise that still counts as "the same step": above the typical pass-to-pass
# difference of a quiet CPU measurement, below one SIMD block of a small layer.
DEFAULT_TOLERANCE = 0.03


def _width_grid(choices: Sequence[int]) -> list[int]:
    """Return the candidate widths: multiples of the choices' greatest common divisor up to the widest, and the choices."""
    step = reduce(math.gcd, choices)
    return sorted(set(range(step, max(choices) + 1, step)) | set(choices))


def _layers_per_width(space: SearchSpace, key: str, grid: Sequence[int]) -> dict[int, list[LayerSpec]]:
    """Return the largest architecture's layers with decision ``key`` set to each width of ``grid``."""
    dense = space.with_width_choices({key: list(grid)})
    values = {name: max(options) for name, options in space.choices().items()}
    out = {}
    for width in grid:
        values[key] = width
        out[width] = dense.layers(dense.arch_from_choices(values))
    return out


def _input_shape(layer: LayerSpec) -> tuple[Any, ...]:
    return (layer.op, layer.groups, layer.in_channels, layer.in_size, layer.kernel_size, layer.stride, layer.act)


def _swept_layers(per_width: Mapping[int, list[LayerSpec]]) -> dict[int, list[LayerSpec]]:
    """Return, per width, the changed layers that a width sweep measures.

    Changed layers are those not shared by every width (compared as multisets). Of them, this keeps
    the ungrouped convolutions whose output channels are the width, grouped by input side (op,
    channels, size, kernel, stride, activation). Each input side keeps, at every width, at most
    the median over all widths of its count there. That drops a convolution whose input channels
    are the width too and match a fixed input side at one width only by coincidence.
    """
    counts = {width: Counter(layers) for width, layers in per_width.items()}
    common = reduce(lambda a, b: a & b, counts.values())
    by_input: dict[int, dict[tuple[Any, ...], list[LayerSpec]]] = {}
    for width, count in counts.items():
        by_input[width] = {}
        for layer in (count - common).elements():
            if layer.op == "conv" and layer.groups == 1 and layer.out_channels == width:
                by_input[width].setdefault(_input_shape(layer), []).append(layer)

    shapes = {shape for groups in by_input.values() for shape in groups}
    limits = {shape: int(np.median([len(by_input[w].get(shape, [])) for w in by_input])) for shape in shapes}
    return {
        width: [layer for shape, layers in groups.items() for layer in layers[: limits[shape]]]
        for width, groups in by_input.items()
    }


def width_latency_curve(
    space: SearchSpace, key: str, latency_of: Callable[[list[LayerSpec]], np.ndarray]
) -> dict[int, float]:
    """Return the summed latency in ms, per width, of the swept layers that decision ``key`` changes.

    ``latency_of`` returns per-layer latencies in ms, NaN where unknown; widths where a judged
    layer has no latency are left out of the curve. See :func:`_swept_layers` for the layers judged.
    """
    grid = _width_grid(space.width_choices()[key])
    changed = _swept_layers(_layers_per_width(space, key, grid))
    if not any(changed.values()):
        return {}

    curve = {}
    for width in grid:
        latencies = latency_of(changed[width]) if changed[width] else np.zeros(0)
        if not np.any(np.isnan(latencies)):
            curve[width] = float(np.sum(latencies))
    return curve


def snap_to_step_edges(choices: Sequence[int], curve: Mapping[int, float], tolerance: float) -> list[int]:
    """Move each choice to the widest grid width whose latency stays within ``tolerance`` of its own.

    Walks right from each choice ``w`` over the widths in ``curve`` and stops before the first whose
    latency exceeds ``curve[w] * (1 + tolerance)``. A choice missing from ``curve`` stays as it is.
    Returns the sorted distinct results, so two choices on the same step merge into one.
    """
    grid = sorted(curve)
    out = set()
    for width in choices:
        if width not in curve:
            out.add(width)
            continue
        limit = curve[width] * (1.0 + tolerance)
        edge = width
        for candidate in grid[grid.index(width) + 1 :]:
            if curve[candidate] > limit:
                break
            edge = candidate
        out.add(edge)
    return sorted(out)


def _latency_function(source: Any, protocol: Any) -> Callable[[list[LayerSpec]], np.ndarray]:
    """Return per-layer latencies from a LatencyPredictor (measured or modelled) or a ProfileStore (measured)."""
    if hasattr(source, "predict_layers"):
        return lambda layers: source.predict_layers(layers, use_lut=True)
    if hasattr(source, "layer_table"):
        table = source.layer_table(protocol.batch_size)
        return lambda layers: np.array([table.get(layer.key(), np.nan) for layer in layers])
    raise TypeError(f"tail_aware_widths needs a ProfileStore or a LatencyPredictor, but got {type(source).__name__}.")


def tail_aware_widths(
    space: SearchSpace, store_or_predictor: Any, protocol: Any, tolerance: float = DEFAULT_TOLERANCE
) -> dict[str, list[int]]:
    """Return new choices for every width decision of ``space``, for ``space.with_width_choices``.

    Args:
        space: a space with width decisions (``space.width_choices()``); none gives ``{}``.
        store_or_predictor: a :class:`~predictors.store.ProfileStore` (judges from the measured
            width sweeps) or a :class:`~predictors.xgb.LatencyPredictor` (judges from measured or
            modelled layer latencies).
        protocol: the measurement protocol; its ``batch_size`` selects the store's records.
        tolerance: relative latency rise that still counts as the same step.

    Choices never move beyond the widest choice, so the supernet still contains every subnet.

    NOTE: layers that read the width as input channels (the next convolution, the residual add)
    also get slower as it grows. Only the output-side staircase is judged, as width sweeps measure it.
    """
    return {key: widths for key, (_, widths) in tail_aware_plan(space, store_or_predictor, protocol, tolerance).items()}


def tail_aware_plan(
    space: SearchSpace, store_or_predictor: Any, protocol: Any, tolerance: float = DEFAULT_TOLERANCE
) -> dict[str, tuple[dict[int, float], list[int]]]:
    """Return, per width decision, the latency curve in ms that it is judged on and its new choices.

    The arguments are those of :func:`tail_aware_widths`. A decision that no measured width sweep
    covers gets an empty curve and keeps its choices.
    """
    latency_of = _latency_function(store_or_predictor, protocol)
    out = {}
    for key, choices in space.width_choices().items():
        curve = width_latency_curve(space, key, latency_of)
        if not curve:
            logger.warning("No measured width sweep covers %s; keeping its choices %s.", key, choices)
            out[key] = ({}, sorted(choices))
            continue
        widths = snap_to_step_edges(choices, curve, tolerance)
        logger.info("Tail-aware %s: %s -> %s (latency in ms by width: %s).", key, sorted(choices), widths,
                    {w: round(ms, 4) for w, ms in sorted(curve.items())})
        out[key] = (curve, widths)
    return out
