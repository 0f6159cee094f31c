"""Check the latency predictor and tail-aware widths on one device, within a time budget, and print one JSON line.

Usage: python benchmarks/gpu_checks.py [--device cuda|cpu] [--space NAME] [--resolution PX] [--batch-sizes B ...]
       [--n-subnets N] [--tail-archs N] [--tail-batch-size B] [--budget-s S] [--out DIR] [flags of --help]

Parts, each run on its own so that one that fails is reported as an error and the others keep their figures:

- ``predictor_b<B>`` for each batch size B: profile the space into a fresh work directory
  (``<out>/b<B>/work``) and build the XGBoost latency predictor from nothing. Its figures on the
  held-out subnets are the shares within 10% and 5%, Kendall tau, MAPE and interval coverage,
  beside the MACs-linear baseline and the noise floor (two passes over every subnet). Writes
  ``<out>/b<B>/predicted_vs_measured.png`` and ``<out>/b<B>/staircase.png``.
- ``tail_aware_b<B>`` at ``--tail-batch-size`` (default 64): tail-aware widths from that batch
  size's width sweeps, as ``search.py`` computes them for ``space.tail_aware=true``. Sweep
  layers that this judgement needs and the store lacks are measured first. For
  ``--tail-archs`` random architectures of the plain space, the tail-aware counterpart takes the
  same choices with each width moved to its snapped value, and both are measured on the device,
  one after the other. Reports the mean MACs and latency ratios (tail-aware over plain) and the
  share of architectures whose tail-aware latency is at most 2% higher. Per-architecture rows go
  to ``<out>/tail_aware_archs.csv``.

The space's resolutions are replaced by ``--resolution`` alone. Targets: within 10% >= 0.99 at
every batch size; mean MACs ratio >= 1.10 at a mean latency ratio <= 1.02; all parts within 300 s.
The JSON (``<out>/gpu_checks.json``, rewritten after each part, and the printed line) contains every
figure, the device (GPU name, SM count, torch, CUDA and cuDNN versions), each part's seconds and
whether each target was met (``null`` where its part failed).

Budget: each part gets a share of the time left in ``--budget-s``. Layer profiling takes the
width step and pass count whose estimated time fits half of its part's share, estimated from a
few timed layers. Subnets are measured in chunks until ``--n-subnets`` or the part's share is
reached, always enough of them to train the predictor. The tail-aware part stops adding
architectures when its share is spent, after at least ``MIN_TAIL_ARCHS``. A part that overruns
its share shortens the ones after it.

NOTE: this script has run on CPU only. The default ``--n-subnets 96`` comes from an estimate, not
a measurement, of an H200 at 224x224: about 0.5 s per batch-64 subnet measurement, extraction and
the profiled pass included. The budget stops earlier when measurements take longer.

On a machine with an NVIDIA GPU, in the project's environment with a CUDA build of torch, run:

    python benchmarks/gpu_checks.py --warmup 10 --repeats 50 --out DIR

``--device cuda`` is the default. ``--warmup 10 --repeats 50`` halve the passes of
``conf/hardware/cuda.yaml`` (20 and 100), so the timed loop of each measurement takes about half
as long and more subnets fit in the default ``--budget-s 270``. ``DIR`` must be new or empty,
and the script writes the JSON, the profile stores and the plots there.

``total_s`` counts from the start of ``main``, after the imports. To rerun only the batch-1
predictor and the tail-aware part, pass ``--batch-sizes 1``: the tail-aware part then measures
the batch-64 sweep layers it needs itself.

CPU smoke run (41 s and 44 s in two runs on a shared 2-core Xeon, one thread):

    python benchmarks/gpu_checks.py --device cpu --resolution 64 --n-subnets 16 --tail-archs 4 \
        --batch-sizes 1 --tail-batch-size 1 --budget-s 120
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nas.spaces import SearchSpace, create_space, load_space_config  # noqa: E402
from predictors.build import load_or_build_predictor, split_holdout  # noqa: E402
from predictors.evaluate import store_split, write_plots  # noqa: E402
from predictors.fingerprint import device_fingerprint, fingerprint_id  # noqa: E402
from predictors.modules import build_layer_module, layer_input_shape  # noqa: E402
from predictors.profiling import (  # noqa: E402
    enumerate_layers,
    fold_batchnorm_checked,
    measure_arch,
    measure_module,
    profile_space,
    sample_subnets,
    width_sweep,
)
from predictors.protocol import MeasurementProtocol  # noqa: E402
from predictors.store import ProfileStore, arch_key  # noqa: E402
from predictors.tail_aware import DEFAULT_TOLERANCE, snap_to_step_edges, tail_aware_widths, width_latency_curve  # noqa: E402
from predictors.xgb import MIN_TRAIN_SUBNETS, write_json_atomic  # noqa: E402

logger = logging.getLogger("tailnas.gpu_checks")

PREDICTOR_CONFIG = ROOT / "conf" / "predictor" / "xgb.yaml"

TARGET_WITHIN_10PCT = 0.99
TARGET_MACS_RATIO = 1.10
TARGET_LATENCY_RATIO = 1.02
TARGET_TOTAL_S = 300.0

# Seconds kept free at the end of a predictor part for training, evaluation and plots. An estimate:
# with the default XGBoost settings, training on 632 layers and 12 subnets took 1.2 s and the whole
# build 2.0 s on one thread of a shared 2-core Xeon.
FIT_RESERVE_S = 10.0
# Share of a predictor part's profiling time that the layer microbenchmarks may take.
LAYER_SHARE = 0.5
# Layers timed to estimate the cost of one layer run. The first one pays for CUDA and profiler
# start-up, so the estimate leaves it out.
CALIBRATION_LAYERS = 7
SUBNET_CHUNK = 8
MIN_TAIL_ARCHS = 10
# Relative weights of the parts when the time left is shared out.
PART_WEIGHTS = {"predictor": 1.0, "tail_aware": 0.6}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="device to measure on (default: %(default)s)")
    parser.add_argument("--space", default="resnet_basic_imagenet", help="space variant in conf/space/ (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=224, help="input height and width in pixels (default: %(default)s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="predictor batch sizes (default: 1 64)")
    parser.add_argument("--n-subnets", type=int, default=96,
                        help="subnets to profile per batch size, fewer when the budget runs out (default: %(default)s)")
    parser.add_argument("--tail-archs", type=int, default=50, help="random architectures of the tail-aware part (default: %(default)s)")
    parser.add_argument("--tail-batch-size", type=int, default=64, help="batch size of the tail-aware part (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="seconds after which no part adds measurements (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="new or empty folder for the JSON, profile stores and plots (default: outputs/gpu_checks-<time>)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed passes per measurement (default: conf/hardware/<device>.yaml)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per measurement (default: conf/hardware/<device>.yaml)")
    parser.add_argument("--passes", type=int, default=2, help="measurements of every subnet, 2 or more for the noise floor (default: %(default)s)")
    parser.add_argument("--width-step", type=int, default=16,
                        help="finest output-channel step of the width sweeps; 2x and 4x are used if it does not fit (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sampling, split and models (default: %(default)s)")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Exit with a message naming the flag and the fix on an invalid setting or a missing GPU."""
    for name in ("resolution", "n_subnets", "tail_archs", "tail_batch_size", "passes", "width_step"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, but got {getattr(args, name)}.")
    if min(args.batch_sizes) < 1 or args.budget_s <= 0:
        raise SystemExit(f"--batch-sizes must be >= 1 and --budget-s > 0, but got {args.batch_sizes} and {args.budget_s}.")
    if args.n_subnets < minimum_subnets():
        raise SystemExit(f"--n-subnets must be >= {minimum_subnets()} to train the predictor and hold out subnets, "
                         f"but got {args.n_subnets}.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda was requested, but torch.cuda.is_available() is False (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda}). Run on a machine with an NVIDIA GPU, or pass --device cpu with small settings: "
            "--device cpu --resolution 64 --n-subnets 16 --tail-archs 4 --batch-sizes 1 --tail-batch-size 1 --budget-s 120."
        )


def minimum_subnets() -> int:
    """Return the fewest profiled subnets that leave ``MIN_TRAIN_SUBNETS`` for training after the held-out split."""
    holdout_fraction = float(yaml.safe_load(PREDICTOR_CONFIG.read_text())["holdout_fraction"])
    n = MIN_TRAIN_SUBNETS + 1
    while len(split_holdout([str(i) for i in range(n)], holdout_fraction, 0)[0]) < MIN_TRAIN_SUBNETS:
        n += 1
    return n


def prepare_out_dir(out: Path | None) -> Path:
    if out is None:
        out = ROOT / "outputs" / f"gpu_checks-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty; every run builds its predictors from nothing, so pass a new folder.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_space(name: str, resolution: int) -> SearchSpace:
    """Build space ``conf/space/<name>.yaml`` with ``resolution`` as its only input size."""
    config = load_space_config(ROOT / "conf" / "space" / f"{name}.yaml",
                               {"in_channels": 3, "num_classes": 1000, "resolution": resolution})
    if "resolutions" not in config:
        raise SystemExit(f"Space {name!r} has no 'resolutions' key, so --resolution cannot set its input size.")
    config["resolutions"] = [resolution]
    return create_space(config)


def make_protocol(args: argparse.Namespace, batch_size: int) -> MeasurementProtocol:
    hardware = yaml.safe_load((ROOT / "conf" / "hardware" / f"{args.device}.yaml").read_text())
    hardware["batch_size"] = batch_size
    for key in ("warmup", "repeats"):
        if getattr(args, key) is not None:
            hardware[key] = getattr(args, key)
    return MeasurementProtocol.from_config(hardware)


class Budget:
    """Time budget of the run: the seconds left in ``total_s``, shared between the parts still to run by their weights."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def deadline(self, weight: float, weight_left: float) -> float:
        """Return the ``time.perf_counter()`` value by which a part of ``weight`` should end."""
        left = max(0.0, self.total_s - self.elapsed())
        return time.perf_counter() + left * weight / weight_left


# -- profiling within a deadline ------------------------------------------------------------


def warm_up_device(device: str, seconds: float = 2.0) -> None:
    """Run matrix products on a CUDA device for ``seconds`` before calibration, because an idle GPU runs at low clocks."""
    if not device.startswith("cuda"):
        return
    x = torch.randn(4096, 4096, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            x @ x
        torch.cuda.synchronize(device)


def measure_layer_runs(store: ProfileStore, protocol: MeasurementProtocol, layers: Sequence[Any],
                       record_operators: bool = True) -> list[float]:
    """Measure each layer once as pass 0 into ``store``; return the seconds that each run took."""
    seconds = []
    for spec in layers:
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            module = build_layer_module(spec)
        store.add_layer(spec, measure_module(module, layer_input_shape(spec), protocol, record_operators), 0)
        seconds.append(time.perf_counter() - started)
    return seconds


def profile_layers(space: SearchSpace, store: ProfileStore, protocol: MeasurementProtocol, width_step: int,
                   passes: int, seed: int, time_s: float) -> dict[str, Any]:
    """Profile the space's layers and width sweeps with the finest step and most passes estimated to fit ``time_s``.

    Tries ``(width_step, passes)``, ``(width_step, 1)``, ``(2 * width_step, 1)`` and ``(4 * width_step, 1)``
    in that order and takes the last one when none fits. The estimate times ``CALIBRATION_LAYERS`` random
    layers of the finest plan, which stay in the store.
    """
    layers = enumerate_layers(space, seed)
    finest = layers + width_sweep(layers, width_step)
    rng = np.random.default_rng([seed, 7])
    sample = [finest[i] for i in rng.choice(len(finest), size=min(len(finest), CALIBRATION_LAYERS), replace=False)]
    seconds = measure_layer_runs(store, protocol, sample)
    per_run_s = float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))

    plans = list(dict.fromkeys([(width_step, passes), (width_step, 1), (2 * width_step, 1), (4 * width_step, 1)]))
    for step, layer_passes in plans:
        runs = (len(layers) + len(width_sweep(layers, step))) * layer_passes
        if runs * per_run_s <= time_s:
            break
    else:
        logger.warning("Layer profiling is estimated at %.0f s, over its %.0f s share, even with width step %d and one "
                       "pass; running it anyway.", runs * per_run_s, time_s, step)
    logger.info("Profiling %d layer runs (width step %d, %d passes), estimated %.3f s each.", runs, step, layer_passes, per_run_s)

    started = time.perf_counter()
    profile_space(space, store, protocol, 0, seed, layer_passes, step, progress=True)
    return {"width_step": step, "layer_passes": layer_passes, "layer_runs": runs, "layer_run_estimate_s": round(per_run_s, 4),
            "layers_s": round(time.perf_counter() - started, 2)}


def profile_subnets(space: SearchSpace, store: ProfileStore, protocol: MeasurementProtocol, n_target: int,
                    passes: int, seed: int, deadline: float) -> int:
    """Measure subnets in chunks, ``passes`` times each, until ``n_target`` or ``deadline``; return the count measured.

    The subnets are :func:`predictors.profiling.sample_subnets`'s, so a predictor config with
    ``n_subnets`` set to the count finds them all stored. At least :func:`minimum_subnets` are
    measured whatever the deadline. Each chunk's second pass runs in a shuffled order.
    """
    archs = sample_subnets(space, n_target, seed)
    n_min = minimum_subnets()
    with torch.random.fork_rng(devices=[]):
        supernet = space.build_supernet()
    rng = np.random.default_rng([seed, 8])
    run_seconds: list[float] = []
    done = 0
    with tqdm(total=len(archs) * passes, desc=f"subnets b{protocol.batch_size}", unit="run") as bar:
        while done < len(archs):
            chunk = archs[done : done + SUBNET_CHUNK]
            estimate = 0.0
            if run_seconds:
                estimate = len(chunk) * passes * float(np.mean(run_seconds[-2 * SUBNET_CHUNK :]))
            if done >= n_min and time.perf_counter() + estimate > deadline:
                logger.info("Stopping at %d of %d subnets: the next chunk would end after the part's share of the budget.",
                            done, len(archs))
                break
            for pass_index in range(passes):
                order = rng.permutation(len(chunk)) if pass_index else range(len(chunk))
                for i in order:
                    started = time.perf_counter()
                    m = measure_arch(space, chunk[i], protocol, supernet=supernet)
                    store.add_subnet(space.name, space.config_hash(), chunk[i].to_dict(), space.layers(chunk[i]), m,
                                     pass_index, source="profile")
                    run_seconds.append(time.perf_counter() - started)
                    bar.update()
            done += len(chunk)
    return done


# -- parts -------------------------------------------------------------------------------------


def predictor_part(args: argparse.Namespace, space: SearchSpace, batch_size: int, out: Path, deadline: float) -> dict[str, Any]:
    """Profile, build and evaluate the predictor at ``batch_size`` in ``out/b<batch_size>``; return its figures."""
    protocol = make_protocol(args, batch_size)
    part_dir = out / f"b{batch_size}"
    work_dir = part_dir / "work"
    store = ProfileStore(work_dir / "profiles", device_fingerprint(protocol))

    profiling_s = max(0.0, deadline - time.perf_counter() - FIT_RESERVE_S)
    layers = profile_layers(space, store, protocol, args.width_step, args.passes, args.seed, LAYER_SHARE * profiling_s)
    started = time.perf_counter()
    n_subnets = profile_subnets(space, store, protocol, args.n_subnets, args.passes, args.seed, deadline - FIT_RESERVE_S)
    subnets_s = time.perf_counter() - started

    predictor_cfg = yaml.safe_load(PREDICTOR_CONFIG.read_text())
    predictor_cfg.update(n_subnets=n_subnets, passes=layers["layer_passes"], width_step=layers["width_step"])
    predictor, report, _ = load_or_build_predictor(space, protocol, predictor_cfg, work_dir, args.seed, progress=True)

    noise = report.get("noise_floor") or {}
    figures = {key: report.get(key) for key in ("within_10pct", "within_5pct", "kendall_tau", "mape", "rmse_ms",
                                                "interval_coverage_90", "interval_width_median", "n_train", "n_test",
                                                "macs_within_10pct", "macs_kendall_tau", "fit_s")}
    figures.update(
        batch_size=batch_size, n_subnets=n_subnets, n_subnets_requested=args.n_subnets, subnet_passes=args.passes,
        noise_floor_within_10pct=noise.get("within_10pct"), noise_floor_kendall_tau=noise.get("kendall_tau"),
        noise_floor_n=noise.get("n"), subnets_s=round(subnets_s, 2), **layers,
        **extreme_latencies(space, store, batch_size),
    )
    try:
        train, test = store_split(predictor, store, space, batch_size)
        written = write_plots(part_dir, predictor, train, test, store.layer_table(batch_size))
        figures["plots"] = [str(path.relative_to(out)) for path in written]
    except Exception as err:  # noqa: BLE001 - the figures above stay valid without the plots
        logger.exception("Plots for batch size %d failed.", batch_size)
        figures["plot_error"] = f"{type(err).__name__}: {err}"
    return figures


def extreme_latencies(space: SearchSpace, store: ProfileStore, batch_size: int) -> dict[str, float | None]:
    """Return the median measured latency in ms of the largest and smallest subnet (``None`` if not measured)."""
    by_key: dict[str, list[float]] = {}
    for record in store.subnet_records(space.config_hash(), batch_size, source="profile"):
        by_key.setdefault(record["key"], []).append(float(record["latency_ms"]))
    out = {}
    for name, arch in (("largest", space.largest()), ("smallest", space.smallest())):
        values = by_key.get(arch_key(arch.to_dict()))
        out[f"{name}_ms"] = round(float(np.median(values)), 4) if values else None
    return out


def measure_missing_sweeps(space: SearchSpace, store: ProfileStore, protocol: MeasurementProtocol) -> int:
    """Measure the width-sweep layers that tail-aware widths are judged from and ``store`` lacks; return their count.

    These are the layers of :func:`predictors.tail_aware.width_latency_curve` at every width of its
    grid, so the tail-aware widths do not depend on the width step that layer profiling took.
    """
    table = store.layer_table(protocol.batch_size)
    missing: dict[str, Any] = {}

    def collect(layers: list[Any]) -> np.ndarray:
        for layer in layers:
            if layer.key() not in table:
                missing[layer.key()] = layer
        return np.zeros(len(layers))

    for key in space.width_choices():
        width_latency_curve(space, key, collect)
    # Only latencies matter here, so these runs skip the profiled pass and need no working CUDA profiler.
    measure_layer_runs(store, protocol, [missing[key] for key in sorted(missing)], record_operators=False)
    return len(missing)


def snapped_width_maps(space: SearchSpace, store: ProfileStore, batch_size: int) -> dict[str, dict[int, int]]:
    """Map each width choice of ``space`` to its tail-aware value, decision by decision.

    The set of values of each map equals what :func:`predictors.tail_aware.tail_aware_widths`
    returns for that decision. Two choices on the same latency step map to the same value.
    """
    table = store.layer_table(batch_size)

    def latency_of(layers: list[Any]) -> np.ndarray:
        return np.array([table.get(layer.key(), np.nan) for layer in layers])

    maps = {}
    for key, choices in space.width_choices().items():
        curve = width_latency_curve(space, key, latency_of)
        maps[key] = {w: snap_to_step_edges([w], curve, DEFAULT_TOLERANCE)[0] for w in choices}
    return maps


def tail_aware_part(args: argparse.Namespace, space: SearchSpace, out: Path, deadline: float,
                    interim: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Compare random architectures with their tail-aware counterparts at ``--tail-batch-size``; return the figures."""
    batch_size = args.tail_batch_size
    protocol = make_protocol(args, batch_size)
    store = ProfileStore(out / f"b{batch_size}" / "work" / "profiles", device_fingerprint(protocol))
    figures: dict[str, Any] = {"batch_size": batch_size, "n_archs_requested": args.tail_archs}
    figures["sweep_layers_measured"] = measure_missing_sweeps(space, store, protocol)

    widths = tail_aware_widths(space, store, protocol)
    if not widths:
        raise ValueError(f"Space {space.name!r} has no width decisions, so it has no tail-aware widths to check.")
    maps = snapped_width_maps(space, store, batch_size)
    for key, values in widths.items():
        if sorted(set(maps[key].values())) != values:
            raise RuntimeError(f"Per-choice snapping of {key} gives {maps[key]}, but tail_aware_widths gives {values}.")
    tail_space = space.with_width_choices(widths)
    figures.update(widths_plain=space.width_choices(), widths_tail_aware=widths)

    rows = measure_pairs(space, tail_space, maps, protocol, args, deadline, lambda rows: interim({**figures, **summarize_pairs(rows)}))
    write_rows(out / "tail_aware_archs.csv", rows)
    figures.update(summarize_pairs(rows))
    figures["rows_file"] = "tail_aware_archs.csv"
    return figures


def measure_pairs(space: SearchSpace, tail_space: SearchSpace, maps: Mapping[str, Mapping[int, int]],
                  protocol: MeasurementProtocol, args: argparse.Namespace, deadline: float,
                  interim: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Measure random plain architectures and their tail-aware counterparts, alternating which goes first."""
    with torch.random.fork_rng(devices=[]):
        supernets = {"plain": space.build_supernet(), "tail_aware": tail_space.build_supernet()}
    rng = np.random.default_rng([args.seed, 9])
    choices = space.choices()
    rows: list[dict[str, Any]] = []
    pair_seconds: list[float] = []
    for index in tqdm(range(args.tail_archs), desc=f"tail-aware pairs b{protocol.batch_size}", unit="pair"):
        if index >= MIN_TAIL_ARCHS and pair_seconds and time.perf_counter() + pair_seconds[-1] > deadline:
            logger.info("Stopping at %d of %d tail-aware pairs: the budget share is spent.", index, args.tail_archs)
            break
        started = time.perf_counter()
        values = {key: options[rng.integers(len(options))] for key, options in choices.items()}
        archs = {"plain": space.arch_from_choices(values),
                 "tail_aware": tail_space.arch_from_choices({**values, **{k: maps[k][values[k]] for k in maps}})}
        spaces = {"plain": space, "tail_aware": tail_space}
        order = ("plain", "tail_aware") if index % 2 == 0 else ("tail_aware", "plain")
        latency = {name: measure_subnet(spaces[name], supernets[name], archs[name], protocol) for name in order}
        rows.append({
            "arch": archs["plain"].to_json(), "tail_aware_arch": archs["tail_aware"].to_json(),
            "plain_macs": space.macs(archs["plain"]), "tail_aware_macs": tail_space.macs(archs["tail_aware"]),
            "plain_ms": latency["plain"], "tail_aware_ms": latency["tail_aware"],
        })
        pair_seconds.append(time.perf_counter() - started)
        if len(rows) % 10 == 0:
            interim(rows)
    return rows


def measure_subnet(space: SearchSpace, supernet: Any, arch: Any, protocol: MeasurementProtocol) -> float:
    """Return the median latency in ms of ``arch``, extracted and BatchNorm-folded as profiling times it."""
    model = supernet.extract(arch).eval()
    input_shape = tuple(space.input_shape(arch))
    model = fold_batchnorm_checked(model, input_shape)
    return measure_module(model, input_shape, protocol, record_operators=False).median_ms


def summarize_pairs(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {"n_archs": 0}
    macs = np.array([r["tail_aware_macs"] / r["plain_macs"] for r in rows])
    latency = np.array([r["tail_aware_ms"] / r["plain_ms"] for r in rows])
    return {
        "n_archs": len(rows),
        "mean_macs_ratio": round(float(macs.mean()), 4),
        "mean_latency_ratio": round(float(latency.mean()), 4),
        "median_latency_ratio": round(float(np.median(latency)), 4),
        "max_latency_ratio": round(float(latency.max()), 4),
        "share_latency_within_2pct": round(float(np.mean(latency <= TARGET_LATENCY_RATIO)), 4),
        "share_changed": round(float(np.mean(macs > 1.0)), 4),
    }


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` as CSV through a temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["arch"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


# -- the run -----------------------------------------------------------------------------------


def device_info(args: argparse.Namespace) -> dict[str, Any]:
    fingerprint = device_fingerprint(make_protocol(args, 1))
    keys = ("name", "gpu_name", "gpu_sm_count", "gpu_compute_capability", "gpu_memory_bytes", "gpu_driver_version",
            "cuda_version", "cudnn_version", "torch_version", "cpu_model", "logical_cores", "threads")
    return {**{key: fingerprint.get(key) for key in keys}, "fingerprint_id": fingerprint_id(fingerprint)}


def targets(result: Mapping[str, Any], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Return each target with its value and whether it was met (``None`` where the value is missing)."""

    def check(value: float | None, bound: float, at_least: bool) -> dict[str, Any]:
        met = None
        if value is not None:
            met = value >= bound if at_least else value <= bound
        return {"value": value, "target": f"{'>=' if at_least else '<='} {bound}", "met": met}

    parts = result["parts"]
    out = {}
    for batch_size in args.batch_sizes:
        part = parts.get(f"predictor_b{batch_size}", {})
        out[f"predictor_b{batch_size}_within_10pct"] = check(part.get("within_10pct"), TARGET_WITHIN_10PCT, True)
    tail = parts.get(f"tail_aware_b{args.tail_batch_size}", {})
    out["tail_aware_mean_macs_ratio"] = check(tail.get("mean_macs_ratio"), TARGET_MACS_RATIO, True)
    out["tail_aware_mean_latency_ratio"] = check(tail.get("mean_latency_ratio"), TARGET_LATENCY_RATIO, False)
    out["total_s"] = check(result.get("total_s"), TARGET_TOTAL_S, False)
    return out


def part_order(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """Return (part name, kind, batch size): the tail-aware batch size's predictor first, then the tail-aware part."""
    batch_sizes = list(dict.fromkeys(args.batch_sizes))
    if args.tail_batch_size in batch_sizes:
        batch_sizes.remove(args.tail_batch_size)
        batch_sizes.insert(0, args.tail_batch_size)
    parts = [(f"predictor_b{b}", "predictor", b) for b in batch_sizes]
    position = 1 if args.tail_batch_size in args.batch_sizes else 0
    parts.insert(position, (f"tail_aware_b{args.tail_batch_size}", "tail_aware", args.tail_batch_size))
    return parts


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every part, write ``<out>/gpu_checks.json`` after each, print the final JSON line and return it."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    check_args(args)
    out = prepare_out_dir(args.out)
    space = load_space(args.space, args.resolution)
    budget = Budget(args.budget_s)
    protocol = make_protocol(args, 1)
    if args.device == "cpu" and protocol.threads is not None:
        # Extraction and the BatchNorm-folding check run outside the timed block. With more threads
        # than idle cores, their OpenMP barriers stall: 8 ms per 28x28 convolution on a busy 2-core machine.
        torch.set_num_threads(protocol.threads)
    result: dict[str, Any] = {
        "check": "gpu_checks", "complete": False, "device": device_info(args),
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "warmup": protocol.warmup, "repeats": protocol.repeats, "out": str(out)},
        "parts": {},
    }

    def save() -> None:
        result["total_s"] = round(budget.elapsed(), 2)
        result["targets"] = targets(result, args)
        write_json_atomic(out / "gpu_checks.json", result)

    def save_interim(name: str, figures: dict[str, Any]) -> None:
        result["parts"][name] = {**figures, "interim": True}
        save()

    warm_up_device(protocol.device)
    parts = part_order(args)
    for index, (name, kind, batch_size) in enumerate(parts):
        weight_left = sum(PART_WEIGHTS[k] for _, k, _ in parts[index:])
        deadline = budget.deadline(PART_WEIGHTS[kind], weight_left)
        logger.info("Part %s starts at %.1f s with %.1f s to use.", name, budget.elapsed(), deadline - time.perf_counter())
        started = time.perf_counter()
        try:
            if kind == "predictor":
                figures = predictor_part(args, space, batch_size, out, deadline)
            else:
                figures = tail_aware_part(args, space, out, deadline, functools.partial(save_interim, name))
        except Exception as err:  # noqa: BLE001 - one part's failure must not lose the others' figures
            logger.exception("Part %s failed; continuing with the next part.", name)
            figures = {"error": f"{type(err).__name__}: {err}"}
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        figures["seconds"] = round(time.perf_counter() - started, 2)
        result["parts"][name] = figures
        save()

    result["complete"] = True
    save()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
