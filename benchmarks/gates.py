"""Sweep a gated subnet's keep ratio against static subnets on the MNIST subset and print one JSON line.

Usage: python benchmarks/gates.py [--arch JSON] [--epochs E] [--finetune-epochs F] [--ratios R ...]
       [--placement measure|table|all] [--gates KEY=VALUE ...] [--calibration-images I] [--static N]
       [--static-recipe finetune|scratch] [--threads T] [--repeats R] [--split TRAIN VAL TEST]
       [--seed S] [--seeds N] [--out DIR]

Trains one subnet of ``conf/space/resnet.yaml`` (1x28x28, 10 classes) on the bundled MNIST subset
with a plain loop. Then it gates the subnet (``conf/gates/feature.yaml`` with the flags overriding
it) and fine-tunes the gated copy with the keep-ratio schedule of ``KeepRatioSchedule``, targeted
dropout and distillation from the ungated subnet, then estimates BatchNorm statistics per keep
ratio (``calibrate_keep_ratios``, on the grid of ``calibration_ratios`` plus the swept ratios).
:func:`sweep_keep_ratios` then measures, per keep ratio:

- ``accuracy`` on the test split with its 95% Wilson interval (``accuracy_low``, ``accuracy_high``);
- ``macs``: MACs per image that run at batch 1 (``executed_macs``, gates included);
- ``latency_b1_ms`` and ``latency_b32_ms``: latency per batch of 1 and 32 test images, BatchNorm
  folded, from ``predictors.profiling.measure_module``: the smallest median over ``--rounds`` rounds
  that time all models in alternating order.

``baseline`` is the ungated subnet after the same fine-tuning epochs without gates and without
distillation (``accuracy_before_finetuning`` is its accuracy when the gates were placed). Its
fine-tuning draws from the same random streams before the gates are built, so runs from before
it existed do not reproduce with the same command. ``static`` lists
subnets of the space whose batch-1 latency falls in the sweep's range, trained for as many
epochs as the gated one had in total. With ``--static-recipe finetune`` (the default) they follow
the baseline's recipe: ``--epochs`` at ``--lr``, then ``--finetune-epochs`` at half of it. That
mirrors ``train.py``, which fine-tunes a static pick after the supernet. With ``scratch`` they get
one cosine schedule over all epochs at ``--lr``, a different recipe from the gated network's and
the baseline's.
``targets`` checks the goals (:func:`evaluate_targets`): per keep ratio the MACs and batch-1
latency cuts and a paired test of accuracy against the ungated subnet, and the share of the gated
curve that is at least as accurate as the static subnets.
With ``--seeds N`` all of this is trained and timed N times with training seeds ``seed`` to
``seed + N - 1`` on one data split, and each figure is the mean over the seeds
(:func:`average_seed_runs`): on the MNIST subset two trainings of one subnet that differ only in
their seed can score 0.7 points apart, as much as the gaps being compared. The static subnets
are picked once, by the first seed's latency range. The paired test takes each test image once,
with its predictions from every seed, and ``targets_per_seed`` repeats the verdict for each seed
alone.
Writes ``gates_accuracy_latency.png`` (accuracy against batch-1 latency) and ``gates.json`` to
``--out``. Latencies are only as quiet as the machine: run it alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nas.data import build_datamodule  # noqa: E402
from nas.gates import (  # noqa: E402
    GatedNetwork,
    KeepRatioSchedule,
    apply_gates,
    calibrate_keep_ratios,
    calibration_ratios,
    describe_layers,
    executed_macs,
    find_block_sites,
    full_keep_logits,
    parse_gate_config,
)
from nas.gates.timing import fastest_medians  # noqa: E402
from nas.spaces import create_space, load_space_config  # noqa: E402
from nas.report import atomic_write_text, save_figure  # noqa: E402
from nas.spaces.base import SearchSpace  # noqa: E402
from predictors.modules import build_layer_module, fold_batchnorm, layer_input_shape  # noqa: E402
from predictors.profiling import measure_module  # noqa: E402
from predictors.protocol import MeasurementProtocol  # noqa: E402

log = logging.getLogger("benchmarks.gates")

DEFAULT_ARCH = {"depths": [1, 2, 2], "widths": [32, 48, 96], "expand_ratios": [], "resolution": 28}
# Images whose batch-1 MACs are averaged: top-k keeps a fixed count, so MACs barely vary by image.
MACS_IMAGES = 8
# Figures of a point that are averaged over training seeds.
MEAN_KEYS = ("accuracy", "macs", "latency_b1_ms", "latency_b32_ms", "accuracy_before_finetuning")
# z of a two-sided 95% interval.
Z_95 = 1.959963984540054


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", type=json.loads, default=DEFAULT_ARCH, help="subnet to gate, as arch JSON")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of the ungated subnet")
    parser.add_argument("--finetune-epochs", type=int, default=8,
                        help="fine-tuning epochs of the gated subnet, and of the ungated baseline")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.25],
                        help="keep ratios to sweep, inside gates.keep_ratio_range")
    parser.add_argument("--keep-ratio", type=float, default=None,
                        help="gates.keep_ratio; %(default)s keeps the keep_ratio of conf/gates/feature.yaml")
    parser.add_argument("--placement", default="measure", help="gates.placement: measure, table or all")
    parser.add_argument("--gates", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more conf/gates/feature.yaml overrides, values in YAML (spatial=false)")
    parser.add_argument("--calibration-images", type=int, default=512,
                        help="training images per keep ratio for BatchNorm calibration (0: none)")
    parser.add_argument("--static", type=int, default=3, help="static subnets to train for comparison")
    parser.add_argument("--static-recipe", choices=("finetune", "scratch"), default="finetune",
                        help="finetune: the baseline's recipe, --epochs at --lr then --finetune-epochs at half of it; "
                             "scratch: one schedule of both counts of epochs at --lr")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while timing")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes per latency at batch 1 (a third at 32)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the fastest median counts")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and of the first training run")
    parser.add_argument("--seeds", type=int, default=1,
                        help="training runs, with seeds seed, seed+1, ...; figures are their means")
    parser.add_argument("--split", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"),
                        help="shares of the 5,000 MNIST images; a larger test share narrows the accuracy intervals")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/gates"), help="output folder")
    return parser.parse_args()


# -- statistics and measurement ---------------------------------------------------------------


def wilson_interval(correct: float, total: int, z: float = Z_95) -> tuple[float, float]:
    """Return the Wilson score interval of a binomial proportion ``correct / total``.

    ``correct`` may be a mean count, such as an accuracy averaged over seeds times ``total``.
    """
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def correct_predictions(model: nn.Module, loader: DataLoader) -> np.ndarray:
    """Return whether ``model`` in eval mode classifies each image of ``loader`` correctly, in loader order."""
    model.eval()
    return np.concatenate([(model(x).argmax(dim=1) == y).numpy() for x, y in loader])


def mcnemar_p_worse(reference: np.ndarray, other: np.ndarray) -> float:
    """Return the one-sided exact p-value that ``other`` is less accurate than ``reference``.

    Both are per-image correctness on the same test images: arrays of (images,), or of
    (seeds, images) for one training per seed, the rows of both paired seed by seed. The image is
    the unit: per image, the count of seeds where ``reference`` is correct minus that of ``other``.
    Under equal accuracy, each image with a difference favours ``reference`` with probability
    1/2. The p-value of this sign test is the chance that at least as many images favour
    ``reference`` as observed. With one seed this is the exact McNemar test. Counting each seed's
    prediction on an image as one more pair would treat the same test images as new ones, so the
    p-value would shrink with every seed.
    """
    reference, other = np.atleast_2d(reference), np.atleast_2d(other)
    if reference.shape != other.shape:
        raise ValueError(f"mcnemar_p_worse needs hits of one shape, but got {reference.shape} and {other.shape}.")
    difference = reference.sum(axis=0, dtype=np.int64) - other.sum(axis=0, dtype=np.int64)
    only_reference = int(np.sum(difference > 0))
    discordant = only_reference + int(np.sum(difference < 0))
    return sum(math.comb(discordant, k) for k in range(only_reference, discordant + 1)) / 2**discordant


def folded_copy(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with BatchNorm folded into the convolutions, as deployed."""
    folded = copy.deepcopy(model).eval()
    fold_batchnorm(folded)
    return folded


def measure_latency_ms(model: nn.Module, input_shape: Sequence[int], batch_size: int, threads: int,
                       repeats: int) -> float:
    """Return the median latency (ms per batch) of a BatchNorm-folded copy of ``model`` on random input."""
    protocol = MeasurementProtocol(device="cpu", batch_size=batch_size, threads=threads, warmup=10, repeats=repeats)
    return measure_module(folded_copy(model), tuple(input_shape), protocol, record_operators=False).median_ms


def measure_latencies(models: dict[str, nn.Module], input_shape: Sequence[int], batch_size: int,
                      args: argparse.Namespace, images: torch.Tensor | None = None) -> dict[str, float]:
    """Return each model's latency (ms per batch): the smallest median over ``args.rounds`` rounds.

    Each model is folded once (:func:`folded_copy`). Rounds alternate the order of the models
    (:func:`nas.gates.timing.fastest_medians`), so a change of load on a shared machine hits all of
    them alike instead of whichever model happened to run then. With ``images``, every model runs
    on the first ``batch_size`` of them instead of random input.
    """
    repeats = args.repeats if batch_size == 1 else max(5, args.repeats // 3)
    inputs = None
    if images is not None:
        if len(images) < batch_size:
            raise ValueError(f"measure_latencies needs at least {batch_size} images, but got {len(images)}.")
        inputs = images[:batch_size]
    protocol = MeasurementProtocol(device="cpu", batch_size=batch_size, threads=args.threads, warmup=10, repeats=repeats)
    folded = {name: folded_copy(model) for name, model in models.items()}
    return fastest_medians(folded, tuple(input_shape), protocol, args.rounds, inputs)


def describe_quality(model: nn.Module, loader: DataLoader, images: torch.Tensor) -> tuple[dict[str, Any], np.ndarray]:
    """Return test accuracy with its 95% Wilson interval and the MACs per image run at batch 1,
    and the per-image correctness."""
    hits = correct_predictions(model, loader)
    correct, total = int(hits.sum()), len(hits)
    low, high = wilson_interval(correct, total)
    macs = [executed_macs(model, images[i : i + 1]) for i in range(len(images))]
    return {"accuracy": correct / total, "accuracy_low": low, "accuracy_high": high, "test_images": total,
            "macs": int(round(float(np.mean(macs))))}, hits


def sweep_keep_ratios(network: GatedNetwork, loader: DataLoader, ratios: Sequence[float], images: torch.Tensor
                      ) -> tuple[list[dict[str, Any]], dict[str, nn.Module], list[np.ndarray]]:
    """Return accuracy and MACs of ``network`` in skip mode per keep ratio, a copy set to each ratio,
    and the per-image correctness at each ratio."""
    original = network.keep_ratio
    network.set_mode("skip")
    points, copies, hits = [], {}, []
    for ratio in ratios:
        network.set_keep_ratio(ratio)
        quality, ratio_hits = describe_quality(network, loader, images)
        points.append({"keep_ratio": ratio, **quality})
        hits.append(ratio_hits)
        copies[f"gated@{ratio}"] = copy.deepcopy(network)
        log.info("keep ratio %.2f: %s", ratio, points[-1])
    network.set_keep_ratio(original)
    return points, copies, hits


def evaluate_targets(points: list[dict[str, Any]], hits: list[np.ndarray], baseline: dict[str, Any],
                     baseline_hits: np.ndarray, static: list[dict[str, Any]]) -> dict[str, Any]:
    """Check the gates' targets on the sweep; return per-point cuts and tests, and the curve comparison.

    Per keep ratio: ``macs_cut`` and ``latency_b1_cut`` against the ungated subnet, and
    ``p_worse``, the one-sided McNemar p-value that the gated network is less accurate. Below 0.05
    it is significantly worse. A point meets the targets with a MACs cut of at least 40%, a batch-1
    latency cut of at least 20% and ``p_worse`` of at least 0.05. With keep ratio 1.0 in the sweep,
    ``latency_b1_cut_vs_full_keep`` gives the cut against the gated network keeping everything: its
    blocks run the same lean eval path as at lower ratios, which alone runs a few percent faster
    than the ungated subnet's modules, so this cut is what the skipping itself saves. ``static_share`` is the share of
    the gated curve's batch-1 latency range (accuracy interpolated linearly between points) where
    the gated network is at least as accurate as the best static subnet of equal or lower latency.
    """
    full_keep = next((p for p in points if p["keep_ratio"] == 1.0), None)
    checks = []
    for point, point_hits in zip(points, hits):
        check = {"keep_ratio": point["keep_ratio"],
                 "macs_cut": 1.0 - point["macs"] / baseline["macs"],
                 "latency_b1_cut": 1.0 - point["latency_b1_ms"] / baseline["latency_b1_ms"],
                 "p_worse": mcnemar_p_worse(baseline_hits, point_hits)}
        if full_keep is not None:
            check["latency_b1_cut_vs_full_keep"] = 1.0 - point["latency_b1_ms"] / full_keep["latency_b1_ms"]
        check["meets"] = check["macs_cut"] >= 0.4 and check["latency_b1_cut"] >= 0.2 and check["p_worse"] >= 0.05
        checks.append(check)

    curve = sorted((p["latency_b1_ms"], p["accuracy"]) for p in points)
    grid = np.linspace(curve[0][0], curve[-1][0], 201)
    gated = np.interp(grid, [c[0] for c in curve], [c[1] for c in curve])
    best_static = np.array([max((s["accuracy"] for s in static if s["latency_b1_ms"] <= t), default=-1.0)
                            for t in grid])
    return {"points": checks, "meeting": [c["keep_ratio"] for c in checks if c["meets"]],
            "static_share": float(np.mean(gated >= best_static))}


# -- training ---------------------------------------------------------------------------------


def train_epochs(model: nn.Module, loader: DataLoader, epochs: int, lr: float,
                 on_epoch: Callable[[int, float], None] | None = None, teacher: nn.Module | None = None,
                 kd_weight: float = 0.0, full_keep_weight: float = 0.0) -> None:
    """Train with AdamW and a cosine schedule; ``on_epoch(epoch, fraction)`` runs before every step.

    ``full_keep_weight`` adds a cross-entropy term at the top of a gated network's keep-ratio range,
    as ``gates.full_keep_weight`` does in ``train.py``.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = max(1, epochs * len(loader))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for epoch in range(epochs):
        for index, (x, y) in enumerate(loader):
            if on_epoch is not None:
                on_epoch(epoch, index / len(loader))
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None and kd_weight > 0:
                with torch.no_grad():
                    target = F.softmax(teacher(x), dim=1)
                loss = loss + kd_weight * F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
            if full_keep_weight > 0:
                full = full_keep_logits(model, x)
                if full is not None:
                    loss = loss + full_keep_weight * F.cross_entropy(full, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        log.info("epoch %d/%d: last loss %.4f", epoch + 1, epochs, loss.item())
    model.eval()


def build_profile_table(subnet: nn.Module, input_shape: Sequence[int], args: argparse.Namespace) -> dict[str, float]:
    """Time every layer of ``subnet`` and every kept-channel count of its gateable blocks at batch 1.

    Returns ``{LayerSpec.key(): median ms}``, the form of ``ProfileStore.layer_table``, measured here
    with ``build_layer_module`` (BatchNorm folded) so the benchmark needs no profile store.
    """
    specs = {layer.key(): layer for _, layer in describe_layers(subnet, input_shape)}
    for site in find_block_sites(subnet, input_shape):
        for channels in range(1, site.inner_channels + 1):
            specs.update((layer.key(), layer) for layer in site.gated_layers(channels))
    protocol = MeasurementProtocol(device="cpu", batch_size=1, threads=args.threads, warmup=5, repeats=args.repeats)
    table = {}
    for key, spec in specs.items():
        module = build_layer_module(spec)
        table[key] = measure_module(module, layer_input_shape(spec), protocol, record_operators=False).median_ms
    log.info("profile table: %d layers timed at batch 1", len(table))
    return table


def build_gated(subnet: nn.Module, input_shape: Sequence[int], loader: DataLoader, seed: int,
                args: argparse.Namespace) -> GatedNetwork:
    """Gate ``subnet`` and fine-tune the gated copy with the keep-ratio schedule and distillation."""
    gates_cfg = yaml.safe_load((ROOT / "conf/gates/feature.yaml").read_text())
    gates_cfg.update(seed=seed, placement=args.placement)
    if args.keep_ratio is not None:
        gates_cfg["keep_ratio"] = args.keep_ratio
    for override in args.gates:
        key, separator, value = override.partition("=")
        if not separator:
            raise SystemExit(f"--gates takes KEY=VALUE pairs, but got {override!r}; for example spatial=false.")
        gates_cfg[key] = yaml.safe_load(value)
    config = parse_gate_config(gates_cfg)
    protocol = MeasurementProtocol(device="cpu", threads=args.threads, warmup=5, repeats=15)
    table = None
    if config.placement == "table":
        table = build_profile_table(subnet, input_shape, args)
    network = apply_gates(subnet, config, profile_table=table, protocol=protocol)

    schedule = KeepRatioSchedule.from_config(config)

    def on_step(epoch: int, fraction: float) -> None:
        network.set_keep_ratio(schedule.next_ratio(epoch + fraction))

    teacher = copy.deepcopy(subnet).eval()
    train_epochs(network, loader, args.finetune_epochs, args.lr / 2, on_step, teacher, config.kd_weight,
                 config.full_keep_weight)
    network.set_keep_ratio(config.keep_ratio)
    if args.calibration_images > 0:
        ratios = sorted(set(calibration_ratios(config)) | {float(r) for r in args.ratios})
        max_batches = max(1, math.ceil(args.calibration_images / loader.batch_size))
        calibrate_keep_ratios(network, loader, max_batches, ratios)
    return network


# -- static subnets ---------------------------------------------------------------------------


def _label_groups(points: Sequence[Mapping[str, Any]]) -> dict[tuple[float, float], list[str]]:
    """Return the keep ratios to write at each plotted point, one label for ratios at the same place.

    Keep ratios that snap to the same kept counts run the same network, so their points coincide.
    Points within 2% of the latency (timing noise) and 0.05 points of accuracy count as one place.
    """
    groups: dict[tuple[float, float], list[str]] = {}
    for p in points:
        latency, accuracy = p["latency_b1_ms"], 100 * p["accuracy"]
        place = next((key for key in groups if abs(key[0] - latency) <= 0.02 * latency
                      and abs(key[1] - accuracy) <= 0.05), (latency, accuracy))
        groups.setdefault(place, []).append(f"{p['keep_ratio']:g}")
    return groups


def pick_static_archs(space: SearchSpace, low_ms: float, high_ms: float, count: int,
                      args: argparse.Namespace) -> list[tuple[Any, float]]:
    """Return ``count`` sampled architectures with batch-1 latency in [low, high], spread over the range.

    It times the smallest subnet and 39 random ones. When fewer than ``count`` of them fall in the
    range, as for a range near the smallest subnet's latency, it times 40 more random subnets at a
    time, up to 400 in all, until ``count`` do.
    """
    rng = np.random.default_rng(args.seed)
    supernet = space.build_supernet().eval()

    def distinct_archs() -> Iterator[Any]:
        yield space.smallest()
        seen = {space.smallest().to_json()}
        misses = 0
        while misses < 200:  # the space has no subnet left to draw
            arch = space.sample(rng)
            if arch.to_json() in seen:
                misses += 1
                continue
            seen.add(arch.to_json())
            yield arch

    timed = []
    for index, arch in enumerate(distinct_archs()):
        if index == 400 or (index % 40 == 0 and index > 0 and len(timed) >= count):
            break
        latency = measure_latency_ms(supernet.extract(arch), space.input_shape(arch), 1, args.threads, args.repeats)
        if low_ms <= latency <= high_ms:
            timed.append((arch, latency))
    timed.sort(key=lambda item: item[1])
    if len(timed) <= count:
        return timed
    picks = np.linspace(0, len(timed) - 1, count).round().astype(int)
    return [timed[i] for i in sorted(set(picks.tolist()))]


def train_static(space: SearchSpace, archs: Sequence[Any], loader: DataLoader, test_loader: DataLoader,
                 images: torch.Tensor, seed: int, args: argparse.Namespace
                 ) -> tuple[list[dict[str, Any]], dict[str, nn.Module]]:
    """Train the static subnets ``archs`` from scratch; return their quality and models."""
    points, models = [], {}
    for index, arch in enumerate(archs):
        torch.manual_seed(seed)
        model = space.build_supernet().build_static(arch)
        if args.static_recipe == "scratch":
            train_epochs(model, loader, args.epochs + args.finetune_epochs, args.lr)
        else:
            train_epochs(model, loader, args.epochs, args.lr)
            train_epochs(model, loader, args.finetune_epochs, args.lr / 2)
        points.append({"arch": arch.to_dict(), **describe_quality(model, test_loader, images)[0]})
        models[f"static{index}"] = model
        log.info("seed %d, static %s: %s", seed, arch.to_json(), points[-1])
    return points, models


# -- output -----------------------------------------------------------------------------------


def plot(points: list[dict[str, Any]], baseline: dict[str, Any], static: list[dict[str, Any]], path: Path) -> None:
    """Write accuracy against batch-1 latency for gated, ungated and static networks to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for series, style, label in ((points, "o-", "gated (keep ratio sweep)"), (static, "s", "static subnets"),
                                 ([baseline], "*", "ungated subnet")):
        if not series:
            continue
        x = [p["latency_b1_ms"] for p in series]
        y = [100 * p["accuracy"] for p in series]
        errors = [[100 * (p["accuracy"] - p["accuracy_low"]) for p in series],
                  [100 * (p["accuracy_high"] - p["accuracy"]) for p in series]]
        axes.errorbar(x, y, yerr=errors, fmt=style, capsize=3, label=label, markersize=8 if style == "*" else 5)
    for (latency, accuracy), ratios in _label_groups(points).items():
        axes.annotate(", ".join(ratios), (latency, accuracy), fontsize=7, textcoords="offset points", xytext=(4, 4))
    axes.set_xlabel("latency at batch 1 (ms, BatchNorm folded)")
    axes.set_ylabel("test accuracy (%, 95% Wilson interval)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)


def train_seed_run(seed: int, space: SearchSpace, arch: Any, data: Any, test_loader: DataLoader,
                   static_archs: list[Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """Train, gate, sweep and time everything of one training seed; return its points and per-image hits.

    The data split is the same for every seed; ``seed`` sets the weights, the order of the training
    batches and the gates' sampling. ``static_archs`` are the static subnets to train; ``None`` picks
    them from the latency range of this seed's sweep (:func:`pick_static_archs`).
    """
    torch.manual_seed(seed)
    loader = data.train_dataloader()
    if loader.generator is not None:
        loader.generator.manual_seed(seed)
    input_shape = space.input_shape(arch)
    subnet = space.build_supernet().build_static(arch)
    train_epochs(subnet, loader, args.epochs, args.lr)
    # Gated networks are timed on real test images: at batches above 1, what each block computes
    # depends on the union of the images' selections, which random input makes narrower.
    timing_images = next(iter(test_loader))[0]
    images = timing_images[:MACS_IMAGES]
    start = describe_quality(subnet, test_loader, images)[0]
    log.info("seed %d, ungated before fine-tuning: %s", seed, start)
    # The baseline gets the gated network's fine-tuning epochs without gates, as train.py with
    # gates=none would give it, so the gates are compared with as much training as they had.
    ungated = copy.deepcopy(subnet)
    train_epochs(ungated, loader, args.finetune_epochs, args.lr / 2)
    quality, baseline_hits = describe_quality(ungated, test_loader, images)
    baseline = {"arch": arch.to_dict(), **quality, "accuracy_before_finetuning": start["accuracy"]}
    log.info("seed %d, ungated: %s", seed, baseline)

    network = build_gated(subnet, input_shape, loader, seed, args)
    points, models, hits = sweep_keep_ratios(network, test_loader, args.ratios, images)
    models["baseline"] = ungated
    if static_archs is None:
        first = measure_latencies(models, input_shape, 1, args, timing_images)
        static_archs = [a for a, _ in pick_static_archs(space, 0.8 * min(first.values()), 1.2 * max(first.values()),
                                                        args.static, args)]
    static, static_models = train_static(space, static_archs, loader, test_loader, images, seed, args)
    models.update(static_models)

    # Every model is timed in the same interleaved rounds, so their latencies compare.
    for batch_size in (1, 32):
        latency = measure_latencies(models, input_shape, batch_size, args, timing_images)
        for name, point in zip([*[f"gated@{p['keep_ratio']}" for p in points], "baseline",
                                *[f"static{i}" for i in range(len(static))]], [*points, baseline, *static]):
            point[f"latency_b{batch_size}_ms"] = latency[name]
    return {"seed": seed, "points": points, "hits": hits, "baseline": baseline, "baseline_hits": baseline_hits,
            "static": static, "static_archs": static_archs, "gates": network.describe()}


def _average_point(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return one point whose figures are the mean over ``runs`` (the same point of every seed).

    ``accuracy_low`` and ``accuracy_high`` are the Wilson interval of the mean accuracy on one
    seed's count of test images: every seed tests the same images, so more seeds narrow the
    training noise but not the test set's. ``accuracy_per_seed`` shows the training noise.
    """
    merged = {key: value for key, value in runs[0].items() if key not in MEAN_KEYS}
    for key in MEAN_KEYS:
        if key in runs[0]:
            merged[key] = float(np.mean([run[key] for run in runs]))
    merged["macs"] = int(round(merged["macs"]))
    images = runs[0]["test_images"]
    merged["accuracy_low"], merged["accuracy_high"] = wilson_interval(merged["accuracy"] * images, images)
    merged["accuracy_per_seed"] = [run["accuracy"] for run in runs]
    return merged


def average_seed_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Merge the runs of :func:`train_seed_run` into mean points and per-image hits of every seed.

    Accuracy, MACs and latencies are averaged over seeds. The hits of each keep ratio, and the
    baseline's, are stacked into (seeds, images) arrays in the order of ``runs``, so
    :func:`mcnemar_p_worse` pairs each seed's gated network with that seed's baseline and counts
    each test image once.
    """
    if not runs:
        raise ValueError("average_seed_runs needs at least one run.")
    ratios = [[p["keep_ratio"] for p in run["points"]] for run in runs]
    if any(r != ratios[0] for r in ratios):
        raise ValueError(f"Every seed must sweep the same keep ratios, but got {ratios}.")
    if len({len(run["static"]) for run in runs}) != 1:
        raise ValueError("Every seed must train the same static subnets.")
    if len({run["baseline"]["test_images"] for run in runs}) != 1:
        raise ValueError("Every seed must test on the same images.")
    return {
        "points": [_average_point([run["points"][i] for run in runs]) for i in range(len(ratios[0]))],
        "hits": [np.stack([run["hits"][i] for run in runs]) for i in range(len(ratios[0]))],
        "baseline": _average_point([run["baseline"] for run in runs]),
        "baseline_hits": np.stack([run["baseline_hits"] for run in runs]),
        "static": [_average_point([run["static"][i] for run in runs]) for i in range(len(runs[0]["static"]))],
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, but got {args.seeds}.")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    space_cfg = load_space_config(ROOT / "conf/space/resnet.yaml")
    space = create_space(space_cfg)
    arch = space.arch_from_dict(args.arch)
    data = build_datamodule({"name": "mnist", "seed": args.seed, "batch_size": 64, "eval_batch_size": 500,
                             "split": args.split})
    data.setup()
    test_loader = data.test_dataloader()

    runs: list[dict[str, Any]] = []
    for seed in range(args.seed, args.seed + args.seeds):
        runs.append(train_seed_run(seed, space, arch, data, test_loader, runs[0]["static_archs"] if runs else None,
                                   args))
    merged = average_seed_runs(runs)
    points, baseline, static = merged["points"], merged["baseline"], merged["static"]

    plot(points, baseline, static, args.out / "gates_accuracy_latency.png")
    result = {
        "points": points,
        "baseline": baseline,
        "static": static,
        "targets": evaluate_targets(points, merged["hits"], baseline, merged["baseline_hits"], static),
        "gates": runs[0]["gates"],
        "seeds": [run["seed"] for run in runs],
        "threads": args.threads,
        "rounds": args.rounds,
        "epochs": args.epochs,
        "finetune_epochs": args.finetune_epochs,
        "static_recipe": args.static_recipe,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if len(runs) > 1:
        result["targets_per_seed"] = [
            {"seed": run["seed"], **{key: value for key, value in evaluate_targets(
                run["points"], run["hits"], run["baseline"], run["baseline_hits"], run["static"]).items()
                if key in ("meeting", "static_share")}}
            for run in runs]
        result["gates_per_seed"] = [run["gates"] for run in runs]
    atomic_write_text(args.out / "gates.json", json.dumps(result, indent=2) + "\n")
    summary = {key: result[key] for key in ("points", "baseline", "static", "targets", "seeds", "static_recipe",
                                            "threads", "seconds")}
    if "targets_per_seed" in result:
        summary["targets_per_seed"] = result["targets_per_seed"]
    summary["gated_blocks"] = {p["name"]: [p["channel"], p["spatial"]] for p in result["gates"]["blocks"]}
    print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
    main()
