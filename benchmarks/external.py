"""Train the predictor on external GPU latencies and print held-out accuracy as one JSON line.

Usage: python benchmarks/external.py [--csv PATH] [--n-train 1000] [--seed 0] [--max-test N]

Reads a CSV of measured subnets (columns arch, latency_ms, device, batch_size; see
``predictors/external.py``), trains on ``--n-train`` rows per device and evaluates on the rest,
next to a MACs-linear fit on the same rows. The default CSV is the Once-for-All MobileNetV3 data
set at ``../shared/data/ofa_mbv3_w1.0_gpu_b64.csv`` beside the repository, when it is there.

Keys of the JSON line: ``devices`` maps each device to ``within_10pct``, ``within_5pct`` and
``kendall_tau`` of the predictor, the same under ``macs_linear``, and ``n_train``/``n_test``;
``seconds`` is the wall time of parsing, training and evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nas.spaces import create_space  # noqa: E402
from predictors.external import evaluate_external, read_external_csv  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "ofa_mbv3_w1.0_gpu_b64.csv"
DEFAULT_SPACE = ROOT / "conf" / "space" / "mobilenet_imagenet.yaml"
KEYS = ("within_10pct", "within_5pct", "kendall_tau")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="external latency CSV (default: %(default)s)")
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="space YAML whose encoding the arch column uses")
    parser.add_argument("--n-train", type=int, default=1000, help="training rows per device (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the models (default: %(default)s)")
    parser.add_argument("--max-test", type=int, default=None, help="evaluate on at most this many rows per device")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.csv.is_file():
        raise SystemExit(
            f"External latency CSV {args.csv} not found. Pass --csv PATH with columns arch, latency_ms, device "
            "and batch_size (for example the Once-for-All MobileNetV3 data set ofa_mbv3_w1.0_gpu_b64.csv)."
        )
    start = time.perf_counter()
    space = create_space(yaml.safe_load(args.space.read_text()))
    results = evaluate_external(space, read_external_csv(args.csv), args.n_train, args.seed, max_test=args.max_test)
    devices = {}
    for result in results:
        devices[result.device] = {
            **{key: result.predictor[key] for key in KEYS},
            "macs_linear": {key: result.macs_linear[key] for key in KEYS},
            "n_train": result.n_train,
            "n_test": result.n_test,
        }
    print(json.dumps({"csv": str(args.csv), "devices": devices, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
