"""Train the predictor on external GPU latencies and print held-out accuracy as one JSON line.

Usage: python benchmarks/external.py [--csv PATH] [--space YAML] [--n-train 1000] [--seed 0] [--max-test N]
                                     [--imports MODULE ...] [--sm-counts DEVICE=SMS ...]
       python benchmarks/external.py --csv tests/data/ofa_mbv3_sample.csv --n-train 150

Reads a CSV of measured subnets (columns arch, latency_ms, device, batch_size; see
``predictors/external.py``), trains on ``--n-train`` rows per device and evaluates on the rest,
next to a MACs-linear fit on the same rows.

The full data set, Once-for-All MobileNetV3 latencies of 10,000 subnets measured on two GPUs at
batch 64, is not shipped with the repository. Download it from the public repository
RhythmSyed/NAS_PerformanceEstimation (files
``tutorial/latency_predictor/datasets/{RTX_2080_Ti_GPU,Tesla_P40_GPU}/*_ofa.csv``, Apache-2.0;
``tests/data/README.md`` names the commit), write it as one CSV with the columns above, and pass
that file with ``--csv``. Without ``--csv`` the script reads
``shared/data/ofa_mbv3_w1.0_gpu_b64.csv`` in the folder that contains the repository, and it
stops with an error that names the sample command when that file is missing.

The bundled sample ``tests/data/ofa_mbv3_sample.csv`` has 200 rows per device, so ``--n-train``
must be below 200 with it, as in the second usage line (11 s on a 2-core CPU). In the space YAML,
``${data.in_channels}``, ``${data.num_classes}`` and ``${data.resolution}`` take ImageNet's
values (:data:`SPACE_DATA`). A space of your own family needs ``--imports`` with the module that
registers it. The devices must be GPUs: the predictor's features for them need the SM count, which
the script has for the GPUs of the full data set and takes from ``--sm-counts`` for others.
Unusable input ends the script with one ``error:`` line and exit status 1.

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
from typing import Any, NoReturn

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nas.cli import UsageError, import_user_modules  # noqa: E402
from nas.spaces import SearchSpace, SpaceError, create_space, load_space_config  # noqa: E402
from predictors.external import (  # noqa: E402
    KNOWN_GPU_SM_COUNTS,
    ExternalDataError,
    evaluate_external,
    read_external_csv,
)

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "ofa_mbv3_w1.0_gpu_b64.csv"
DEFAULT_SPACE = ROOT / "conf" / "space" / "mobilenet_imagenet.yaml"
SAMPLE_COMMAND = "python benchmarks/external.py --csv tests/data/ofa_mbv3_sample.csv --n-train 150"
# Values for a space YAML's ${data.*} keys. They are ImageNet's because external latency data sets,
# such as Once-for-All's MobileNetV3 measurements, time networks built for ImageNet.
SPACE_DATA = {"in_channels": 3, "num_classes": 1000, "resolution": 224}
KEYS = ("within_10pct", "within_5pct", "kendall_tau")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="external latency CSV (default: %(default)s)")
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE,
                        help="space YAML whose encoding the arch column uses (default: %(default)s)")
    parser.add_argument("--n-train", type=int, default=1000,
                        help="training rows per device, below the device's row count (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the models (default: %(default)s)")
    parser.add_argument("--max-test", type=int, default=None,
                        help="evaluate on at most this many rows per device (default: all held-out rows)")
    parser.add_argument("--imports", nargs="+", default=[], metavar="MODULE",
                        help="modules to import first, such as the one that registers your space family "
                             "(default: none)")
    parser.add_argument("--sm-counts", nargs="+", default=[], metavar="DEVICE=SMS",
                        help="streaming multiprocessors of GPUs the script does not know, such as "
                             "'NVIDIA A100-SXM4-80GB=108' (default: none)")
    return parser.parse_args(argv)


def parse_sm_counts(pairs: list[str]) -> dict[str, int]:
    """Return ``{device: SM count}`` from ``DEVICE=SMS`` strings."""
    counts = {}
    for pair in pairs:
        device, _, value = pair.rpartition("=")
        if not device or not value.isdigit() or int(value) < 1:
            fail(f"--sm-counts takes DEVICE=SMS with a whole number of SMs >= 1, such as "
                 f"'NVIDIA A100-SXM4-80GB=108', but got {pair!r}.")
        counts[device] = int(value)
    return counts


def fail(message: str) -> NoReturn:
    """End the script with one ``error:`` line on stderr and exit status 1."""
    raise SystemExit(f"error: {message}")


def missing_csv_message(path: Path) -> str:
    if path == DEFAULT_CSV:
        return (f"the default external latency CSV {path} is not there. Pass --csv PATH, or run on the bundled "
                f"sample (200 subnets per GPU) from the repository root: {SAMPLE_COMMAND}")
    return (f"external latency CSV {path} not found. Pass --csv PATH with columns arch, latency_ms, device and "
            f"batch_size, for example the bundled sample: {SAMPLE_COMMAND}")


def load_space(path: Path) -> SearchSpace:
    """Build the space of a YAML, filling its ``${data.*}`` keys from :data:`SPACE_DATA`."""
    try:
        config: dict[str, Any] = load_space_config(path, SPACE_DATA)
    except SpaceError as err:
        cause = err.__cause__
        if cause is None:
            fail(str(err))
        filled = ", ".join(f"data.{key}={value}" for key, value in SPACE_DATA.items())
        fail(f"space YAML {path} has a key that cannot be resolved: {str(cause).splitlines()[0]} "
             f"(at {getattr(cause, 'key', '?')}). This script fills only {filled}; pass a space YAML whose "
             "other keys are literal values.")
    try:
        return create_space(config)
    except ValueError as err:
        fail(f"space YAML {path} does not build a space: {err}")


def check_n_train(frame: pd.DataFrame, n_train: int, csv: Path) -> None:
    """Stop with the range of ``--n-train`` that the device with the fewest rows allows."""
    rows = frame.groupby("device", sort=False).size()
    device, count = rows.idxmin(), int(rows.min())
    # With 10 rows or fewer no value fits, so evaluate_external raises its own error.
    if count > 10 and not 10 <= n_train < count:
        fail(f"--n-train {n_train} does not fit {csv}: device {device!r} has {count} rows, so --n-train must be "
             f"in [10, {count - 1}] to leave rows for testing.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.csv.is_file():
        fail(missing_csv_message(args.csv))
    start = time.perf_counter()
    sm_counts = parse_sm_counts(args.sm_counts)
    try:
        import_user_modules(args.imports)
    except UsageError as err:
        fail(str(err))
    space = load_space(args.space)
    try:
        frame = read_external_csv(args.csv)
        check_n_train(frame, args.n_train, args.csv)
        unknown = sorted(set(frame["device"].astype(str)) - set(KNOWN_GPU_SM_COUNTS) - set(sm_counts))
        if unknown:
            fail(f"the SM count of device {unknown[0]!r} is unknown; known devices are {sorted(KNOWN_GPU_SM_COUNTS)}. "
                 f"Pass each other device's streaming multiprocessors with --sm-counts, such as "
                 f"--sm-counts {' '.join(repr(device + '=SMS') for device in unknown)}.")
        results = evaluate_external(space, frame, args.n_train, args.seed, sm_counts=sm_counts,
                                    max_test=args.max_test)
    except ExternalDataError as err:
        fail(str(err))
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
