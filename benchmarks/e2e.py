"""Run the default main job from nothing and print the wall time of each stage as one JSON line.

Usage: python benchmarks/e2e.py [extra Hydra overrides...]

A fresh temporary work directory is used, so the supernet, profiles and predictor are all built.
Keys: data_s, supernet_s, profile_s, predictor_s, search_s, remeasure_s, total_s (seconds), plus the
process wall time (process_s, including Python start-up and imports) and the number of Pareto subnets.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("data_s", "supernet_s", "profile_s", "predictor_s", "search_s", "remeasure_s", "total_s")


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="tailnas-e2e-") as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, str(ROOT / "search.py"), "+space=resnet", f"paths.work_dir={tmp}/work",
                   f"hydra.run.dir={run_dir}", *overrides]
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        process_s = time.perf_counter() - start
        if completed.returncode != 0:
            sys.stderr.write(completed.stdout[-4000:] + completed.stderr[-4000:])
            raise SystemExit(f"search.py failed with exit code {completed.returncode}")
        timings = json.loads((run_dir / "timings.json").read_text())
        with open(run_dir / "pareto.csv", newline="") as handle:
            pareto_rows = sum(1 for _ in csv.DictReader(handle))
    result = {key: timings.get(key) for key in KEYS}
    result["process_s"] = round(process_s, 1)
    result["pareto_subnets"] = pareto_rows
    result["overrides"] = overrides
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
