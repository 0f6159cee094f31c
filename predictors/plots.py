"""Plots of predictor quality: predicted against measured latency, and a layer's latency staircase."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nas.spaces.layers import LayerSpec

__all__ = ["plot_predicted_vs_measured", "plot_staircase", "staircase_from_table"]

logger = logging.getLogger(__name__)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_predicted_vs_measured(
    path: str | Path,
    measured_ms: Sequence[float] | np.ndarray,
    predicted_ms: Sequence[float] | np.ndarray,
    low_ms: Sequence[float] | np.ndarray | None = None,
    high_ms: Sequence[float] | np.ndarray | None = None,
    title: str = "Predicted vs measured latency",
    baseline_ms: Sequence[float] | np.ndarray | None = None,
    baseline_label: str = "MACs-linear",
) -> Path:
    """Write a log-log scatter of predicted against measured latency (ms) with the y = x line and a ±10% band.

    ``low_ms``/``high_ms`` draw each prediction's interval as an error bar; ``baseline_ms`` adds a
    second series (for example the MACs-linear fit) in grey. Returns the written path.
    """
    plt = _pyplot()
    measured = np.asarray(measured_ms, dtype=float)
    predicted = np.asarray(predicted_ms, dtype=float)
    fig, ax = plt.subplots(figsize=(5.5, 5.0))

    if baseline_ms is not None:
        ax.scatter(measured, np.asarray(baseline_ms, dtype=float), s=10, color="0.65", label=baseline_label, zorder=1)
    if low_ms is not None and high_ms is not None:
        errors = np.vstack([predicted - np.asarray(low_ms, dtype=float), np.asarray(high_ms, dtype=float) - predicted])
        ax.errorbar(measured, predicted, yerr=errors, fmt="none", ecolor="tab:blue", alpha=0.3, zorder=2)
    ax.scatter(measured, predicted, s=12, color="tab:blue", label="predictor", zorder=3)

    lo = float(min(measured.min(), predicted.min())) * 0.9
    hi = float(max(measured.max(), predicted.max())) * 1.1
    line = np.array([lo, hi])
    ax.plot(line, line, color="black", linewidth=1, label="y = x")
    ax.fill_between(line, line * 0.9, line * 1.1, color="tab:green", alpha=0.12, label="±10%")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured latency (ms)",
           ylabel="predicted latency (ms)", title=title)
    # Plain numbers at 1, 2 and 5 times each power of ten, so a range under a decade still gets
    # several labels. Over a narrow range the other minor ticks get labels too.
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(FormatStrFormatter("%g") if hi / lo < 3 else NullFormatter())
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, plt, path)


def staircase_from_table(table: Mapping[str, float], min_points: int = 4,
                         layers: Iterable[LayerSpec] | None = None) -> tuple[LayerSpec, dict[int, float]] | None:
    """Pick the representative staircase of a layer table: the ungrouped conv shape whose steps show most plainly.

    Args:
        table: ``LayerSpec.key()`` to measured latency in ms (a profile store's ``layer_table``).
        min_points: the fewest widths a staircase needs.
        layers: when given, only conv shapes (input channels, size, kernel, stride) of these layers
            count, so that a store shared by several spaces plots a layer of the space at hand.

    Returns:
        The widest layer of that shape and its latency per output-channel count, or ``None`` when no
        shape has ``min_points`` widths. Shapes are ranked by :func:`_step_score`, then by their
        number of widths, then by MACs.
    """
    shapes: dict[tuple[Any, ...], dict[int, float]] = {}
    widest: dict[tuple[Any, ...], LayerSpec] = {}
    shapes_of_layers = None if layers is None else {_shape(layer) for layer in layers}
    for key, latency in table.items():
        layer = LayerSpec.from_dict(json.loads(key))
        if layer.op != "conv" or layer.groups != 1:
            continue
        shape = _shape(layer)
        if shapes_of_layers is not None and shape not in shapes_of_layers:
            continue
        shapes.setdefault(shape, {})[layer.out_channels] = latency
        if shape not in widest or layer.out_channels > widest[shape].out_channels:
            widest[shape] = layer
    candidates = [s for s in shapes if len(shapes[s]) >= min_points]
    if not candidates:
        return None
    best = max(candidates, key=lambda s: (_step_score(shapes[s]), len(shapes[s]), widest[s].macs))
    return widest[best], dict(sorted(shapes[best].items()))


def _shape(layer: LayerSpec) -> tuple[Any, ...]:
    return (layer.in_channels, layer.in_size, layer.kernel_size, layer.stride, layer.act)


# Between neighbouring widths, a latency change below FLAT is a step's tread, one above RISE its riser.
FLAT, RISE = 0.03, 0.08


def _step_score(latency_by_width: Mapping[int, float]) -> int:
    """Return how plainly a curve is a staircase: the smaller of its count of treads and of risers.

    A straight ramp has no treads and a flat curve no risers, so both score 0.
    """
    latencies = [latency_by_width[w] for w in sorted(latency_by_width)]
    changes = [b / a - 1.0 for a, b in zip(latencies, latencies[1:]) if a > 0]
    treads = sum(abs(change) < FLAT for change in changes)
    risers = sum(change > RISE for change in changes)
    return min(treads, risers)


def plot_staircase(
    path: str | Path,
    layer: LayerSpec,
    measured_ms: Mapping[int, float],
    predicted_ms: Mapping[int, float] | None = None,
    title: str | None = None,
) -> Path:
    """Write latency against output channels for one layer shape: measured, predicted and MACs-scaled.

    The MACs-scaled line is the measured latency at the widest width times MACs(c) / MACs(widest),
    which is what a FLOPs-proportional model assumes. Returns the written path.
    """
    plt = _pyplot()
    widths = np.array(sorted(measured_ms))
    measured = np.array([measured_ms[w] for w in widths])
    fig, ax = plt.subplots(figsize=(6.0, 4.0))

    ax.step(widths, measured, where="mid", color="tab:blue", alpha=0.35)
    ax.plot(widths, measured, "o", color="tab:blue", label="measured")
    if predicted_ms:
        predicted_widths = np.array(sorted(predicted_ms))
        ax.plot(predicted_widths, [predicted_ms[w] for w in predicted_widths], "x-", color="tab:orange", label="predicted (layer model)")
    ax.plot(widths, measured[-1] * widths / widths[-1], "--", color="0.4", label="MACs-scaled")

    shape = f"conv {layer.kernel_size}x{layer.kernel_size}, {layer.in_channels} in, {layer.in_size}x{layer.in_size}, stride {layer.stride}"
    ax.set(xlabel="output channels", ylabel="latency (ms)", title=title or f"Latency staircase: {shape}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_width_moves(
    path: str | Path,
    before: Mapping[str, Sequence[int]],
    plan: Mapping[str, tuple[Mapping[int, float], Sequence[int]]],
) -> Path | None:
    """Write one panel per width decision of a tail-aware run: its latency by width and its choices.

    ``plan`` is :func:`predictors.tail_aware.tail_aware_plan`'s result and ``before`` the choices it
    started from. Each panel shows the summed latency of the layers that the decision sets, the
    choices before (open circles) and after (filled). Returns the written path, or ``None`` when no
    decision has a curve.
    """
    keys = [key for key, (curve, _) in plan.items() if curve]
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        curve, after = plan[key]
        widths = sorted(curve)
        ax.step(widths, [curve[w] for w in widths], where="mid", color="tab:blue", alpha=0.35)
        ax.plot(widths, [curve[w] for w in widths], ".", color="tab:blue", label="latency of its layers")
        old = sorted(w for w in before[key] if w in curve)
        new = sorted(w for w in after if w in curve)
        ax.plot(old, [curve[w] for w in old], "o", mfc="none", mec="tab:red", ms=11, label="choices before")
        ax.plot(new, [curve[w] for w in new], "o", color="tab:green", ms=6, label="choices after")
        ax.set_title(f"{key}: {sorted(before[key])}\n-> {sorted(after)}", fontsize=8)
        ax.set(xlabel="channels", ylabel="latency (ms)")
        ax.set_ylim(bottom=0)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Tail-aware width choices: each moves to the widest width of its latency step", fontsize=9)
    return _save(fig, plt, path)


def write_staircase(path: str | Path, predictor: Any, table: Mapping[str, float],
                    layers: Iterable[LayerSpec] | None = None) -> Path | None:
    """Plot the representative staircase of ``table`` with the predictor's layer model beside it.

    ``layers`` limits the choice to conv shapes of these layers (:func:`staircase_from_table`).
    Returns the written path, or ``None`` (with a warning) when the table has no width sweep.
    """
    staircase = staircase_from_table(table, layers=layers)
    if staircase is None:
        logger.warning("The profile store has no width sweep with 4 or more widths, so %s is not written.", path)
        return None
    layer, measured_by_width = staircase
    sweep = [LayerSpec(**{**layer.to_dict(), "out_channels": w}) for w in measured_by_width]
    predicted = predictor.predict_layers(sweep, use_lut=False) if getattr(predictor, "layer_model", None) is not None else None
    predicted_by_width = None if predicted is None else dict(zip(measured_by_width, predicted))
    return plot_staircase(path, layer, measured_by_width, predicted_by_width)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    logger.info("Wrote %s.", target)
    return target
