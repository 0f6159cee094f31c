"""Time a gated subnet as eager PyTorch and as torch.export programs on this CPU; print one JSON line.

Usage: python benchmarks/gated_export.py [--arch JSON] [--keep-ratio R] [--placement measure|all]
       [--threads T] [--repeats R] [--rounds K]

Builds the ``--arch`` subnet of ``conf/space/resnet.yaml`` with random weights. At batch 1 a gate
keeps a fixed count per image, so latency does not depend on what the weights select. At batch
32 it does: random weights on random input select alike, so the batch's union is narrow. It gates the
subnet (``gates.placement`` from ``--placement``, keep ratio ``--keep-ratio``) and folds BatchNorm
in both networks. Then it times, at batch 1 and 32:

- ``eager_ungated_ms`` and ``eager_gated_ms``: the modules themselves;
- ``export_ungated_ms`` and ``export_gated_dynamic_ms``: ``nas.export.export_program`` with a
  dynamic batch, as ``train.py`` writes ``subnet.pt2``, run through ``ExportedProgram.module()``;
- ``export_gated_b1_ms`` (batch 1 only): the same with a static batch of 1, whose trace takes the
  skip path.

Each figure is the smallest median of ``--rounds`` rounds that time all programs in alternating
order. Latencies are only as quiet as the machine: run it alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.gates import DEFAULT_ARCH  # noqa: E402
from nas.export import export_program  # noqa: E402
from nas.gates import apply_gates  # noqa: E402
from nas.spaces import create_space, load_space_config  # noqa: E402
from predictors.modules import fold_batchnorm  # noqa: E402
from predictors.protocol import MeasurementProtocol  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", type=json.loads, default=DEFAULT_ARCH, help="subnet to gate, as arch JSON")
    parser.add_argument("--keep-ratio", type=float, default=0.4, help="keep ratio of the gated network")
    parser.add_argument("--placement", default="measure", help="gates.placement: measure (as train.py) or all")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while timing")
    parser.add_argument("--repeats", type=int, default=50, help="timed passes per median at batch 1 (a fifth at 32)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the fastest median counts")
    return parser.parse_args()


def median_ms(run: Callable[[], object], warmup: int, repeats: int) -> float:
    """Return the median wall time (ms) of ``repeats`` calls of ``run`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    space = create_space(load_space_config(ROOT / "conf/space/resnet.yaml"))
    arch = space.arch_from_dict(args.arch)
    shape = tuple(space.input_shape(arch))
    subnet = space.build_supernet().build_static(arch).eval()
    protocol = MeasurementProtocol(device="cpu", threads=args.threads, warmup=5, repeats=15)
    gated = apply_gates(subnet, {"name": "feature", "placement": args.placement, "keep_ratio": args.keep_ratio},
                        protocol=protocol).eval()
    gated.set_mode("skip")
    ungated = copy.deepcopy(subnet).eval()
    for model in (ungated, gated):
        fold_batchnorm(model)

    single_image = torch.randn(1, *shape)
    with tempfile.TemporaryDirectory() as folder:
        programs = {
            "export_ungated_ms": export_program(ungated, single_image, Path(folder) / "ungated.pt2").module(),
            "export_gated_dynamic_ms": export_program(gated, single_image, Path(folder) / "gated.pt2").module(),
            "export_gated_b1_ms": export_program(gated, single_image, Path(folder) / "gated_b1.pt2",
                                                 dynamic_batch=False).module(),
        }
    runners = {"eager_ungated_ms": ungated, "eager_gated_ms": gated, **programs}

    result: dict[str, object] = {}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        for batch_size in (1, 32):
            x = torch.randn(batch_size, *shape)
            names = [name for name in runners if batch_size == 1 or name != "export_gated_b1_ms"]
            repeats = args.repeats if batch_size == 1 else max(5, args.repeats // 5)
            latency: dict[str, float] = {}
            with torch.inference_mode():
                for index in range(args.rounds):
                    for name in names if index % 2 == 0 else names[::-1]:
                        ms = median_ms(lambda: runners[name](x), 5, repeats)
                        latency[name] = min(ms, latency.get(name, float("inf")))
            result[f"batch_{batch_size}"] = {name: round(ms, 4) for name, ms in latency.items()}
    finally:
        torch.set_num_threads(previous_threads)

    result.update(arch=arch.to_dict(), keep_ratio=args.keep_ratio, placement=args.placement,
                  gated_blocks=sorted(gated.gated_blocks()), keep_counts=gated.keep_counts(), threads=args.threads,
                  torch=torch.__version__, seconds=round(time.perf_counter() - started, 1))
    print(json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
