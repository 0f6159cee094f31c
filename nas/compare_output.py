"""Outputs of ``python -m nas.compare``: the CSV files, the overlaid fronts, the W&B run and the printed table."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.report import atomic_write_text, nondominated, save_figure

if TYPE_CHECKING:
    from nas.compare import StudySummary

__all__ = ["budget_column", "log_to_wandb", "plot_fronts", "print_table", "write_csv"]


def budget_column(budget_ms: float) -> str:
    """Return the name of the column with the best accuracy within ``budget_ms``."""
    return f"best_accuracy_within_{budget_ms:g}ms"


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return value


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Write ``rows`` with ``columns`` through a temporary file. None becomes an empty cell, dicts and lists JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({column: _csv_value(row.get(column)) for column in columns})
    atomic_write_text(path, buffer.getvalue())


def plot_fronts(path: Path, summaries: Sequence[StudySummary], reference_ms: float | None,
                budgets_ms: Sequence[float] = ()) -> None:
    """Plot the fronts overlaid, one colour per study: filled markers measured, hollow markers predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    colours = plt.get_cmap("tab10")
    for i, summary in enumerate(summaries):
        colour = colours(i % 10)
        points = summary.front
        if not points:
            ax.plot([], [], color=colour, label=f"{summary.name} ({summary.sampler}, empty front)")
            continue
        # The line joins the subnets that no other beats at the latencies shown, as pareto.png does.
        joined = nondominated([(p.latency_ms, p.accuracy) for p in points])
        ax.plot([lat for lat, _ in joined], [100 * acc for _, acc in joined], "-", color=colour, lw=1.2,
                label=f"{summary.name} ({summary.sampler})")
        measured = [p for p in points if p.latency_source == "measured"]
        predicted = [p for p in points if p.latency_source == "predicted"]
        ax.scatter([p.latency_ms for p in measured], [100 * p.accuracy for p in measured], s=30, color=colour, zorder=3)
        ax.scatter([p.latency_ms for p in predicted], [100 * p.accuracy for p in predicted], s=30, facecolors="white",
                   edgecolors=colour, linewidths=1.2, zorder=3)

    ax.scatter([], [], s=30, color="0.35", label="measured latency")
    ax.scatter([], [], s=30, facecolors="white", edgecolors="0.35", label="predicted latency")
    if reference_ms is not None:
        ax.axvline(reference_ms, color="0.5", ls=":", lw=1, label=f"hypervolume reference ({reference_ms:.3g} ms)")
    for i, budget in enumerate(budgets_ms):
        ax.axvline(budget, color="0.7", ls="--", lw=0.8, label="latency budgets" if i == 0 else None)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Pareto fronts")
    ax.grid(alpha=0.3)
    # Outside the axes, so that the legend covers no point of any front.
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def log_to_wandb(out_dir: Path, rows: list[dict[str, Any]], fronts: list[dict[str, Any]], run_config: dict[str, Any],
                 project: str) -> None:
    """Log one W&B run (job type "compare"): both tables, the plot and a per-study summary.

    Raises:
        ImportError: when the wandb package cannot be imported.
    """
    from nas.tracking import create_tracker

    tracker = create_tracker({"name": "wandb", "project": project}, run_config, "compare", str(out_dir))
    tracker.log_table("compare", rows)
    tracker.log_table("fronts", fronts)
    tracker.log_image("fronts_plot", str(out_dir / "fronts.png"))
    summary = {}
    for row in rows:
        for key, value in row.items():
            if key != "study" and value is not None:
                summary[f"{row['study']}/{key}"] = value
    tracker.summary(summary)
    tracker.finish()


def print_table(rows: Sequence[Mapping[str, Any]], budgets_ms: Sequence[float], reference_ms: float | None) -> None:
    from nas.report import print_table
    from rich.table import Table

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    table = Table(title="Studies side by side")
    headers = ("study", "sampler", "space", "trials", "Pareto", "best acc %", "fastest ms", "source", "hypervolume")
    for column in headers:
        table.add_column(column, justify="left" if column in ("study", "sampler", "space", "source") else "right")
    for budget in budgets_ms:
        table.add_column(f"acc % <= {budget:g} ms", justify="right")
    for r in rows:
        fastest = "-" if r["fastest_latency_ms"] is None else f"{r['fastest_latency_ms']:.3f}"
        area = "-" if r["hypervolume"] is None else f"{r['hypervolume']:.4f}"
        table.add_row(r["study"], r["sampler"], r["space"], str(r["trials_finished"]), str(r["pareto_size"]),
                      percent(r["best_accuracy"]), fastest, r["fastest_latency_source"] or "-", area,
                      *(percent(r[budget_column(b)]) for b in budgets_ms))
    print_table(table)
    if reference_ms is not None:
        print(f"Hypervolume: area in accuracy x ms above accuracy 0 and left of {reference_ms:.4g} ms, "
              "the same reference for every study.")
