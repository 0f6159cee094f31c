"""Run outputs: pareto.csv, the Pareto plot, the run manifest and atomic file writes."""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from nas.files import atomic_path, atomic_write_text

__all__ = [
    "PARETO_COLUMNS",
    "MANIFEST_FORMAT_VERSION",
    "atomic_write_text",
    "save_figure",
    "print_table",
    "write_pareto_csv",
    "read_pareto_csv",
    "plot_pareto",
    "write_manifest",
    "package_versions",
    "git_commit",
]

log = logging.getLogger(__name__)

# latency_source names where predicted_latency_ms comes from: "predicted", or "measured" during the
# search (search.measure_uncertain=true measures subnets whose prediction interval is wide).
PARETO_COLUMNS = ("trial", "arch", "accuracy", "predicted_latency_ms", "measured_latency_ms", "macs", "params",
                  "latency_source")
MANIFEST_FORMAT_VERSION = 1
_PACKAGES = ("torch", "torchvision", "lightning", "optuna", "hydra-core", "xgboost", "timm", "numpy", "tailnas")


def print_table(table: Any) -> None:
    """Print a rich table in full: numbers wrap instead of being cut, and a pipe or log file gets 200 columns."""
    from rich.console import Console

    for column in table.columns:
        column.overflow = "fold"
    console = Console()
    (console if console.is_terminal else Console(width=200)).print(table)


def save_figure(fig: Any, path: Path, **savefig_kwargs: Any) -> None:
    """Save a matplotlib figure as PNG through a temporary file, then close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", **savefig_kwargs)
    finally:
        plt.close(fig)


def write_pareto_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write one row per Pareto subnet with :data:`PARETO_COLUMNS`; ``arch`` is stored as JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=PARETO_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {key: row.get(key) for key in PARETO_COLUMNS}
        out["arch"] = json.dumps(row["arch"], separators=(",", ":"))
        out["measured_latency_ms"] = "" if row.get("measured_latency_ms") is None else row["measured_latency_ms"]
        out["latency_source"] = row.get("latency_source") or "predicted"
        writer.writerow(out)
    atomic_write_text(path, buffer.getvalue())


def read_pareto_csv(path: Path) -> list[dict[str, Any]]:
    """Read a ``pareto.csv`` back, with numbers as numbers and ``arch`` as a dict."""
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rows.append(
                {
                    "trial": int(row["trial"]),
                    "arch": json.loads(row["arch"]),
                    "accuracy": float(row["accuracy"]),
                    "predicted_latency_ms": float(row["predicted_latency_ms"]),
                    "measured_latency_ms": float(row["measured_latency_ms"]) if row["measured_latency_ms"] else None,
                    "macs": int(row["macs"]),
                    "params": int(row["params"]),
                    "latency_source": row.get("latency_source") or "predicted",
                }
            )
    return rows


def nondominated(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Return the (latency, accuracy) points that no other point beats on both, fastest first."""
    front: list[tuple[float, float]] = []
    for latency, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((latency, accuracy))
    return front


def plot_pareto(path: Path, all_points: Sequence[tuple[float, float]], rows: Sequence[Mapping[str, Any]],
                knee: int | None, title: str, budget_ms: float | None = None, over_budget: int = 0) -> None:
    """Plot every trial, the front at predicted latency, and the front re-measured on the device.

    ``budget_ms`` draws the latency budget; ``over_budget`` trials beyond it have no accuracy and
    are not plotted, and the budget's legend entry counts them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    if all_points:
        ax.scatter([p[1] for p in all_points], [100 * p[0] for p in all_points], s=10, c="0.75", label="all feasible trials")
    predicted = [r["predicted_latency_ms"] for r in rows]
    accuracy = [100 * r["accuracy"] for r in rows]
    ax.plot(predicted, accuracy, "o-", color="tab:blue", label="Pareto front, predicted latency")
    measured = [(r["measured_latency_ms"], 100 * r["accuracy"]) for r in rows if r.get("measured_latency_ms") is not None]
    if measured:
        for r in rows:
            if r.get("measured_latency_ms") is not None:
                ax.plot([r["predicted_latency_ms"], r["measured_latency_ms"]], [100 * r["accuracy"]] * 2, color="0.6", lw=0.8)
        ax.scatter([m[0] for m in measured], [m[1] for m in measured], marker="s", color="tab:orange", zorder=4,
                   label="the same subnets, measured latency")
        # Measurements can reorder the front: the line joins the subnets that no other beats once measured.
        measured_front = nondominated(measured)
        ax.plot([m[0] for m in measured_front], [m[1] for m in measured_front], "--", color="tab:orange",
                label="their front at measured latency")
    if budget_ms is not None:
        unplotted = f", {over_budget} trials beyond it not plotted" if over_budget else ""
        plotted_latencies = [p[1] for p in all_points] + predicted + [m[0] for m in measured]
        if plotted_latencies and budget_ms > 1.5 * max(plotted_latencies):
            # A line far right of every point would squeeze them into the left of the plot.
            ax.plot([], [], color="tab:red", ls=":", lw=1,
                    label=f"latency budget {budget_ms:g} ms (right of the plot){unplotted}")
        else:
            ax.axvline(budget_ms, color="tab:red", ls=":", lw=1, label=f"latency budget {budget_ms:g} ms{unplotted}")
    if knee is not None and rows:
        # search.py picks the knee on measured latency where it has one.
        latency = rows[knee].get("measured_latency_ms") or rows[knee]["predicted_latency_ms"]
        ax.scatter([latency], [100 * rows[knee]["accuracy"]], s=120, facecolors="none",
                   edgecolors="tab:red", linewidths=2, label="knee", zorder=5)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def package_versions() -> dict[str, str | None]:
    """Return installed versions of the packages that shape results."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(cwd: Path | None = None) -> str | None:
    """Return the commit of the repository at ``cwd`` (with ``+dirty`` for local changes), or None outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def write_manifest(path: Path, config: Mapping[str, Any], fingerprint: Mapping[str, Any] | None, seed: int,
                   extra: Mapping[str, Any]) -> None:
    """Write the run manifest: resolved config, package versions, git commit, device fingerprint, seed."""
    manifest = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "command": " ".join(sys.argv),
        "config": config,
        "packages": package_versions(),
        "git_commit": git_commit(Path(__file__).resolve().parent.parent),
        "device_fingerprint": fingerprint,
        "seed": seed,
        **extra,
    }
    atomic_write_text(path, json.dumps(manifest, indent=2, default=str) + "\n")
