"""Build the latency predictor for space=resnet from nothing on this CPU and print one JSON line.

Usage: python benchmarks/predictor.py [--n-subnets N] [--passes P] [--warmup W] [--repeats R] [--threads T]

Uses a fresh temporary work directory, ``conf/space/resnet.yaml`` (1x28x28 inputs, 10 classes),
``conf/hardware/cpu.yaml`` and ``conf/predictor/xgb.yaml``, with the flags overriding them. Keys:

- held-out accuracy of the predictor: ``within_10pct``, ``within_5pct``, ``kendall_tau``, ``mape``
  (percent), ``interval_coverage_90``, and ``n_train``/``n_test`` subnets;
- ``noise_floor_within_10pct``/``noise_floor_kendall_tau``: agreement of two measurement passes;
- ``macs_within_10pct``/``macs_kendall_tau``: the MACs-linear baseline on the same split;
- ``profile_s``, ``fit_s``, ``build_s``: seconds of profiling, training and the whole build;
- ``predictions_per_s``: architectures per second of one ``predict`` call on 50,000 sampled
  architectures whose layers the predictor has already seen (``predictions_per_s_first_call`` for
  the first call on them, which fills the per-layer cache). Building the layer lists is not timed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nas.spaces import create_space, load_space_config  # noqa: E402
from predictors.build import load_or_build_predictor  # noqa: E402
from predictors.protocol import MeasurementProtocol  # noqa: E402

N_PREDICT = 50_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-subnets", type=int, default=None, help="subnets to profile (default: predictor config)")
    parser.add_argument("--passes", type=int, default=None, help="measurement passes (default: predictor config)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per measurement (default: hardware config)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default: hardware config)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: hardware config)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, split and models (default: %(default)s)")
    return parser.parse_args()


def load_configs(args: argparse.Namespace) -> tuple[dict, dict, dict]:
    space_cfg = load_space_config(ROOT / "conf/space/resnet.yaml")
    hardware_cfg = yaml.safe_load((ROOT / "conf/hardware/cpu.yaml").read_text())
    predictor_cfg = yaml.safe_load((ROOT / "conf/predictor/xgb.yaml").read_text())
    for key, value in (("warmup", args.warmup), ("repeats", args.repeats), ("threads", args.threads)):
        if value is not None:
            hardware_cfg[key] = value
    for key, value in (("n_subnets", args.n_subnets), ("passes", args.passes)):
        if value is not None:
            predictor_cfg[key] = value
    return space_cfg, hardware_cfg, predictor_cfg


def predictions_per_second(space: object, predictor: object, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng([seed, 3])
    layer_lists = [space.layers(space.sample(rng)) for _ in range(N_PREDICT)]  # type: ignore[attr-defined]
    rates = []
    for _ in range(2):
        start = time.perf_counter()
        predictor.predict(layer_lists)  # type: ignore[attr-defined]
        rates.append(N_PREDICT / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    space_cfg, hardware_cfg, predictor_cfg = load_configs(args)
    space = create_space(space_cfg)
    protocol = MeasurementProtocol.from_config(hardware_cfg)
    with tempfile.TemporaryDirectory(prefix="tailnas-predictor-") as work_dir:
        predictor, report, _ = load_or_build_predictor(space, protocol, predictor_cfg, work_dir, args.seed, progress=False)
    first, warm = predictions_per_second(space, predictor, args.seed)

    noise = report.get("noise_floor") or {}
    keys = ("within_10pct", "within_5pct", "kendall_tau", "mape", "interval_coverage_90", "n_train", "n_test",
            "macs_within_10pct", "macs_kendall_tau", "profile_s", "fit_s", "build_s")
    result = {key: report.get(key) for key in keys}
    result.update(
        noise_floor_within_10pct=noise.get("within_10pct"),
        noise_floor_kendall_tau=noise.get("kendall_tau"),
        predictions_per_s=round(warm),
        predictions_per_s_first_call=round(first),
        protocol=protocol.to_dict(),
        n_subnets=predictor_cfg["n_subnets"],
        passes=predictor_cfg["passes"],
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
