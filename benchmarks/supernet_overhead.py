"""Training-step time of the supernet with its largest subnet active against the same network as a plain model.

Usage:
    python benchmarks/supernet_overhead.py [--space resnet] [--batch-size 64] [--steps 30] [--warmup 5]
        [--threads N] [--seed 0]

The plain model is ``supernet.extract(space.largest())``: the same layers and weights without
slicing. A training step is one forward pass on a fixed random batch, cross-entropy on random
labels, the backward pass and an AdamW step over the model's parameters. The supernet's AdamW
updates all its parameters, the ones the largest subnet does not use (kernel-transform matrices,
a ResNet stage's spare projection) included, because supernet training pays for them too. Steps of
the two models alternate, so a slow spell on the machine hits both. After ``--warmup`` untimed
steps each, ``--steps`` steps of each are timed.

Prints one JSON line: ``ratio`` (supernet median over plain median; the target is <= 1.3),
``supernet_step_ms`` and ``static_step_ms`` (medians), their interquartile ranges, the settings and
the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nas.spaces import create_space, load_space_config  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--space", default="resnet", help="space variant (conf/space/NAME.yaml)")
    parser.add_argument("--in-channels", type=int, default=1,
                        help="input channels where the space YAML takes them from the data (MNIST: 1)")
    parser.add_argument("--num-classes", type=int, default=10,
                        help="classes where the space YAML takes them from the data (MNIST: 10)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per training step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each model before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; %(default)s keeps torch's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, batch and labels")
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}.")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, but got {args.warmup}.")
    return args


def load_space(name: str, in_channels: int, num_classes: int) -> Any:
    path = ROOT / "conf" / "space" / f"{name}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"Space variant {name!r} not found at {path}; available variants are {available}.")
    return create_space(load_space_config(path, {"in_channels": in_channels, "num_classes": num_classes}))


class StepTimer:
    """One model with its optimizer; :meth:`step` runs and times one training step in milliseconds."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model = model.train()
        self.x, self.y = x, y
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
        self.times: list[float] = []

    def step(self, record: bool) -> None:
        start = time.perf_counter()
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if record:
            self.times.append((time.perf_counter() - start) * 1e3)


def summary(times: list[float]) -> tuple[float, float]:
    """Return the median and the interquartile range of ``times``, in milliseconds."""
    p25, p50, p75 = np.percentile(times, [25, 50, 75])
    return float(p50), float(p75 - p25)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    space = load_space(args.space, args.in_channels, args.num_classes)
    largest = space.largest()

    supernet = space.build_supernet()
    supernet.set_active(largest)
    static = supernet.extract(largest)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn((args.batch_size, *space.input_shape(largest)), generator=generator)
    y = torch.randint(0, space.cfg.num_classes, (args.batch_size,), generator=generator)
    timers = [StepTimer(supernet, x, y), StepTimer(static, x, y)]

    started = time.perf_counter()
    load_start = _load_average()
    for index in range(args.warmup + args.steps):
        for timer in timers:
            timer.step(record=index >= args.warmup)

    (supernet_ms, supernet_iqr), (static_ms, static_iqr) = (summary(timer.times) for timer in timers)
    result = {
        "benchmark": "supernet_overhead",
        "ratio": round(supernet_ms / static_ms, 4),
        "supernet_step_ms": round(supernet_ms, 3),
        "static_step_ms": round(static_ms, 3),
        "supernet_step_iqr_ms": round(supernet_iqr, 3),
        "static_step_iqr_ms": round(static_iqr, 3),
        "space": space.name,
        "arch": largest.to_dict(),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": _load_average(),
    }
    print(json.dumps(result))


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


if __name__ == "__main__":
    main(sys.argv[1:])
