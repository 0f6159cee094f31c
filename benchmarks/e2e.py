"""Run the default main job from nothing and print the wall time of each stage as one JSON line.

Usage: python benchmarks/e2e.py [--keep DIR] [extra Hydra overrides...]

A fresh work directory is used, so the supernet, profiles and predictor are all built: a temporary
one, or with ``--keep DIR`` the new folder DIR (work directory and run directory inside it), which
stays so that ``python train.py paths.work_dir=DIR/work`` can fine-tune the knee afterwards.
Keys: data_s, supernet_s, profile_s, predictor_s, search_s, remeasure_s, total_s (seconds), plus the
process wall time (process_s, including Python start-up and imports) and the number of Pareto subnets.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("data_s", "supernet_s", "profile_s", "predictor_s", "search_s", "remeasure_s", "total_s")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, default=None, help="new folder to keep the work and run directories in")
    args, overrides = parser.parse_known_args(argv)
    if args.keep is not None:
        if args.keep.exists():
            raise SystemExit(f"--keep {args.keep} already exists. Name a new folder: the benchmark builds everything from nothing.")
        args.keep.mkdir(parents=True)
        folder = contextlib.nullcontext(str(args.keep.resolve()))
    else:
        folder = tempfile.TemporaryDirectory(prefix="tailnas-e2e-")
    with folder as tmp:
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
