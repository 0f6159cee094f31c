"""Latency of one convolution against its output channels on this CPU: the staircase the README describes.

Usage:
    python benchmarks/staircase.py [--in-channels 64] [--size 28] [--kernel 3] [--widths 8:129:8]
        [--threads 1 2] [--rounds 5] [--warmup 10] [--repeats 30] [--out DIR]

Times a ``kernel`` x ``kernel`` convolution with ``in-channels`` input channels on a ``size`` x
``size`` feature map at batch 1, for each output width and each intra-op thread count. The
convolution has stride 1, same padding and a bias, as a convolution with folded BatchNorm runs.
The widths are timed
in ``rounds`` interleaved rounds (every width once per round, in turn), so that a slow spell of the
machine hits all widths alike, and each width's figure is the median of its round medians.

Prints one JSON line with the machine and, per thread count, three figures. ``latency_ms`` gives
the latency by width. ``pairs`` gives the latency ratio of each width to the next one up, where
1.0 means the extra channels cost nothing. ``macs_linear_error_pct`` is the mean absolute error of
a latency proportional to MACs, scaled at the widest width. Writes ``staircase_t<threads>.png`` per
thread count to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nas.spaces.layers import LayerSpec  # noqa: E402
from predictors.fingerprint import device_fingerprint  # noqa: E402
from predictors.measurement import load_average, measure_module  # noqa: E402
from predictors.plots import plot_staircase  # noqa: E402
from predictors.protocol import MeasurementProtocol  # noqa: E402


def parse_widths(text: str) -> list[int]:
    """Parse ``start:stop:step`` (stop excluded, as in ``range``) or a comma-separated list."""
    try:
        if ":" in text:
            start, stop, step = (int(part) for part in text.split(":"))
            widths = list(range(start, stop, step))
        else:
            widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--widths must be start:stop:step or a comma-separated list, but got "
                                         f"{text!r}.") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"--widths must give positive widths, but got {text!r}.")
    return sorted(set(widths))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-channels", type=int, default=64, help="input channels (default: %(default)s)")
    parser.add_argument("--size", type=int, default=28, help="feature map height and width (default: %(default)s)")
    parser.add_argument("--kernel", type=int, default=3, help="kernel size (default: %(default)s)")
    parser.add_argument("--widths", type=parse_widths, default=parse_widths("8:129:8"),
                        help="output widths, start:stop:step or a list (default: 8:129:8)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="intra-op thread counts to time (default: 1 2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the widths (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed passes per timing (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per timing (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/staircase"),
                        help="folder for the plots (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("in_channels", "size", "kernel", "rounds", "warmup", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, but got {getattr(args, name)}.")
    if min(args.threads) < 1:
        parser.error(f"--threads must be at least 1, but got {args.threads}.")
    return args


def time_widths(args: argparse.Namespace, threads: int) -> dict[int, float]:
    """Return each width's median over ``args.rounds`` interleaved round medians, in ms."""
    protocol = MeasurementProtocol(device="cpu", runtime="eager", batch_size=1, threads=threads,
                                   warmup=args.warmup, repeats=args.repeats)
    torch.manual_seed(0)
    convs = {width: nn.Conv2d(args.in_channels, width, args.kernel, padding=args.kernel // 2)
             for width in args.widths}
    rounds: dict[int, list[float]] = {width: [] for width in args.widths}
    steps = [(r, width) for r in range(args.rounds) for width in args.widths]
    for _, width in tqdm(steps, desc=f"{threads} thread(s)", unit="timing", leave=False):
        measured = measure_module(convs[width], (args.in_channels, args.size, args.size), protocol,
                                  record_operators=False)
        rounds[width].append(measured.median_ms)
    return {width: float(np.median(values)) for width, values in rounds.items()}


def summarise(latency: dict[int, float]) -> dict[str, object]:
    """Return the pair ratios and the MACs-linear error of one thread count's latencies."""
    widths = sorted(latency)
    pairs = {f"{a}->{b}": round(latency[b] / latency[a], 3) for a, b in zip(widths, widths[1:])}
    widest = widths[-1]
    linear = {w: latency[widest] * w / widest for w in widths}
    error = float(np.mean([abs(linear[w] - latency[w]) / latency[w] for w in widths])) * 100
    return {"latency_ms": {str(w): round(latency[w], 4) for w in widths}, "pairs": pairs,
            "macs_linear_error_pct": round(error, 1)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    load_start = load_average()
    layer = LayerSpec("conv", args.in_channels, max(args.widths), args.size, kernel_size=args.kernel)
    results = {}
    for threads in args.threads:
        latency = time_widths(args, threads)
        results[str(threads)] = summarise(latency)
        # plot_staircase logs the path it writes.
        plot_staircase(args.out / f"staircase_t{threads}.png", layer, latency,
                       title=f"conv {args.kernel}x{args.kernel}, {args.in_channels} in, {args.size}x{args.size}, "
                             f"batch 1, {threads} thread(s)")
    fingerprint = device_fingerprint(MeasurementProtocol(device="cpu", threads=max(args.threads)))
    print(json.dumps({
        "benchmark": "staircase",
        "layer": {"in_channels": args.in_channels, "size": args.size, "kernel": args.kernel, "batch_size": 1},
        "threads": results,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "cpu_model": fingerprint.get("cpu_model"),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": load_average(),
    }))


if __name__ == "__main__":
    main()
