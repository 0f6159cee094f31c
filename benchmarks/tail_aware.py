"""Run the default search twice, plain and with tail-aware widths, and compare the fronts' hypervolumes.

Usage: python benchmarks/tail_aware.py [--work-dir DIR] [extra Hydra overrides...]

Both runs share one work directory, so the supernet, profiles and predictor are built once. The
hypervolume is taken on (accuracy, measured latency): the area that the front dominates above
accuracy 0 and left of a reference latency (1.1 times the slowest measured Pareto subnet of either
run). Prints one JSON line with ``plain_hypervolume``, ``tail_aware_hypervolume`` and both fronts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nas.compare import hypervolume  # noqa: E402
from nas.report import read_pareto_csv  # noqa: E402


def run_search(work_dir: Path, run_dir: Path, tail_aware: bool, overrides: list[str]) -> list[dict]:
    command = [sys.executable, str(ROOT / "search.py"), "+space=resnet", f"space.tail_aware={str(tail_aware).lower()}",
               f"paths.work_dir={work_dir}", f"hydra.run.dir={run_dir}", *overrides]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-3000:])
        raise SystemExit(f"search.py (tail_aware={tail_aware}) failed with exit code {completed.returncode}")
    return read_pareto_csv(run_dir / "pareto.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="work directory to reuse (default: a new temporary one)")
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="tailnas-tail-") as tmp:
        work_dir = args.work_dir or Path(tmp) / "work"
        plain = run_search(work_dir, Path(tmp) / "plain", False, overrides)
        tail = run_search(work_dir, Path(tmp) / "tail", True, overrides)
    fronts = {"plain": plain, "tail_aware": tail}
    measured = [r["measured_latency_ms"] for rows in fronts.values() for r in rows if r["measured_latency_ms"]]
    reference = 1.1 * max(measured)
    result = {"reference_latency_ms": round(reference, 4)}
    for name, rows in fronts.items():
        points = [(r["accuracy"], r["measured_latency_ms"]) for r in rows if r["measured_latency_ms"]]
        result[f"{name}_hypervolume"] = round(hypervolume(points, reference), 6)
        result[f"{name}_front"] = [
            {"accuracy": r["accuracy"], "measured_latency_ms": r["measured_latency_ms"], "macs": r["macs"]} for r in rows
        ]
    result["overrides"] = overrides
    print(json.dumps(result))


if __name__ == "__main__":
    main()
