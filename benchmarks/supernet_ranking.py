"""Rank correlation between inherited-weight and standalone accuracy of subnets; prints one JSON line.

Usage:
    python benchmarks/supernet_ranking.py [--space resnet] [--schedule sandwich] [--epochs 5] [--subnets 16]
        [--data mnist | --data cifar10 --root PATH] [--work-dir DIR] [--seed 0] [--threads N] [hydra overrides...]

Steps:

1. The supernet comes from the work directory's cache when search.py (or an earlier run of this
   script) trained one with the same space, data, supernet settings and seed. Otherwise it is
   trained the way search.py trains it and stored in the cache.
2. ``--subnets`` subnets are spread evenly over the space's MACs range: the largest and smallest,
   and between them the sampled subnets nearest to evenly spaced MACs targets.
3. Inherited accuracy: each subnet's supernet weights after BatchNorm recalibration on
   ``search.calibration_images`` training images (``nas.training.SubnetEvaluator``), on the
   validation and test splits (``--eval-split val`` for validation only). Neither split trains
   anything here, and with 1,000 MNIST images instead of 500 the binomial noise of one accuracy
   falls from about 0.8 to 0.6 points, which matters because most subnets score within a point
   of each other.
4. Standalone accuracy: each subnet built from scratch (fresh initialisation) and trained alone
   with the same budget, then recalibrated on the same images and measured on the same images;
   with ``--seeds N`` the mean of N runs with consecutive seeds.

"Same budget" means the same number of epochs over the same training batches in the same order
(the data seed is shared), with the supernet's optimizer and recipe: AdamW with its learning rate
and weight decay, warm-up then cosine decay over all steps, and its label smoothing, with no
distillation. That is one training pass per batch, the share that each subnet slot of a supernet
step gets. A sandwich step trains ``2 + num_random`` such slots.

Output keys: ``kendall_tau`` between the two accuracy lists, ``kendall_tau_low`` and
``kendall_tau_high`` (the 2.5th and 97.5th percentiles of the tau over ``--bootstrap`` resamples
of the subnets, drawn with ``numpy.random.default_rng(seed)``), ``n``, ``seconds`` (wall time of
the whole run), the stage times, both accuracy lists, the subnets' MACs and the settings.

Runtime: with the defaults (search.py's default supernet: resnet space, sandwich rule, 5 epochs on
the 4,000 MNIST training images at batch 128; 16 subnets, 2 standalone runs each), 45 minutes on
the 2-core development CPU with the supernet cached, while other jobs shared the machine for part
of the time (load average 1.1 to 3.7). Standalone training is nearly all of it, and its time grows
linearly with ``--epochs``, ``--subnets`` and ``--seeds``. With ``--seeds 1`` it took 12 minutes,
but the standalone accuracies of the larger subnets, which lie within one point of each other,
then rank mostly by noise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau
from torch import nn
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nas.cli import to_container  # noqa: E402
from nas.data import build_datamodule  # noqa: E402
from nas.training import FinetuneModule, SubnetEvaluator, _cosine_schedule, model_accuracy  # noqa: E402
from nas.supernet.dynamic import recalibrate_batchnorm  # noqa: E402
from nas.tracking import Tracker  # noqa: E402

log = logging.getLogger("tailnas.benchmarks.supernet_ranking")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--space", default="resnet", help="space variant, as in +space=NAME (conf/space/NAME.yaml)")
    parser.add_argument("--schedule", default="sandwich", choices=["sandwich", "progressive"],
                        help="supernet training schedule (conf/supernet/NAME.yaml)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="supernet epochs, and so standalone epochs; %(default)s keeps supernet.epochs of the "
                             "config (5). Sandwich only: for progressive set supernet.phases.* overrides, and the "
                             "standalone runs take their sum")
    parser.add_argument("--subnets", type=int, default=16, help="subnets to compare, at least 4")
    parser.add_argument("--data", default="mnist", choices=["mnist", "cifar10"], help="dataset (conf/data/NAME.yaml)")
    parser.add_argument("--root", default=None, help="with --data cifar10: the folder that contains cifar-10-batches-py/")
    parser.add_argument("--work-dir", default=os.environ.get("TAILNAS_WORK_DIR", str(ROOT / "work")),
                        help="work directory whose supernet cache is read and filled: $TAILNAS_WORK_DIR when set, "
                             "else work/ in the repository. search.py uses work/ in the folder it runs from, so "
                             "without the variable the two share a cache only when search.py runs from the "
                             "repository root")
    parser.add_argument("--seed", type=int, default=0, help="seed of training, subnet choice and the bootstrap")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads; %(default)s keeps torch's")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the tau interval")
    parser.add_argument("--eval-split", default="val+test", choices=["val", "val+test"],
                        help="images both accuracies are measured on; val+test has twice the images of val")
    parser.add_argument("--seeds", type=int, default=2,
                        help="standalone runs per subnet, seeds seed..seed+N-1; their mean accuracy counts")
    parser.add_argument("--candidates", type=int, default=2000,
                        help="sampled architectures from which the MACs-spread subnets are chosen")
    args, overrides = parser.parse_known_args(argv)

    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, but got {args.seeds}.")
    if args.subnets < 4:
        parser.error(f"--subnets must be >= 4 for a meaningful rank correlation, but got {args.subnets}.")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be >= 1, but got {args.epochs}.")
    if args.epochs is not None and args.schedule == "progressive":
        parser.error("--epochs applies to the sandwich schedule; set supernet.phases.full=N (and kernel, depth, width).")
    if args.data == "cifar10" and not args.root:
        parser.error("--data cifar10 needs --root PATH, the folder that contains cifar-10-batches-py/.")

    unknown = [item for item in overrides if item.startswith("--")]
    if unknown:
        parser.error(f"unknown options {unknown}; Hydra overrides are written key=value.")
    return args, overrides


def compose_config(args: argparse.Namespace, overrides: list[str]) -> Any:
    """Compose search.py's config with the benchmark's settings, so the supernet cache key matches search.py's."""
    from hydra import compose, initialize_config_dir

    settings = [f"+space={args.space}", f"data={args.data}", f"supernet={args.schedule}", f"seed={args.seed}",
                f"paths.work_dir={args.work_dir}"]
    if args.epochs is not None:
        settings.append(f"supernet.epochs={args.epochs}")
    if args.root:
        settings.append(f"data.root={args.root}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="search", overrides=settings + overrides)


def spread_subnets(space: Any, count: int, candidates: int, seed: int) -> list[Any]:
    """Return ``count`` distinct subnets spread evenly over the MACs range, smallest first.

    Architectures that build the same network (MobileNetV3 slots beyond a stage's depth) count once.
    """
    rng = np.random.default_rng(seed)
    pool = {}
    for arch in [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(candidates)]:
        arch = space.canonical(arch)
        pool.setdefault(arch.to_json(), arch)
    archs = sorted(pool.values(), key=space.macs)
    macs = np.array([space.macs(arch) for arch in archs], dtype=float)
    if len(archs) < count:
        raise SystemExit(
            f"Space {space.name!r} gave only {len(archs)} distinct subnets; set --subnets {len(archs)} or lower."
        )

    chosen: list[int] = []
    for target in np.linspace(macs[0], macs[-1], count):
        free = [i for i in range(len(archs)) if i not in chosen]
        chosen.append(min(free, key=lambda i: abs(macs[i] - target)))
    return [archs[i] for i in sorted(chosen)]


class Resized(nn.Module):
    """Resize inputs to the subnet's resolution (as the supernet's evaluation does) before the subnet."""

    def __init__(self, model: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.model(x)


class StandaloneModule(FinetuneModule):
    """Fine-tuning without a teacher, with the supernet module's warm-up rule (min(50, steps // 10))."""

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        return _cosine_schedule(optimizer, total, warmup_steps=min(50, total // 10))


def train_standalone(space: Any, supernet: Any, arch: Any, datamodule: Any, training: dict[str, Any], epochs: int,
                     seed: int, calibration: list[torch.Tensor], validation: list[tuple[torch.Tensor, torch.Tensor]],
                     root: Path) -> float:
    """Train ``arch`` from scratch with the supernet's recipe for ``epochs`` epochs and return its validation accuracy.

    BatchNorm statistics are recomputed on the calibration images before the evaluation, as for
    the inherited weights, because a short run leaves the running averages close to their start.
    """
    import lightning.pytorch as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    _, height, width = space.input_shape(arch)
    model = Resized(supernet.build_static(arch), (height, width))
    module = StandaloneModule(model, lr=training["lr"], weight_decay=training["weight_decay"],
                              label_smoothing=training["label_smoothing"])
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         limit_val_batches=0, default_root_dir=str(root))
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    recalibrate_batchnorm(model, calibration, max_batches=len(calibration))
    return model_accuracy(model, validation)


def bootstrap_tau(first: np.ndarray, second: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """Return the 2.5th and 97.5th percentiles of Kendall's tau over resamples of the pairs (with replacement)."""
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(resamples):
        index = rng.integers(len(first), size=len(first))
        tau = kendalltau(first[index], second[index]).statistic
        if np.isfinite(tau):
            taus.append(tau)
    if not taus:
        return float("nan"), float("nan")
    low, high = np.percentile(taus, [2.5, 97.5])
    return float(low), float(high)


def _rounded(value: float) -> float | None:
    """Round to 4 decimals; NaN (a constant accuracy list has no tau) becomes JSON null."""
    return round(value, 4) if np.isfinite(value) else None


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def main(argv: list[str]) -> None:
    args, overrides = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = _load_average()

    from search import build_space, calibration_batches, train_or_load_supernet

    cfg = compose_config(args, overrides)
    datamodule = build_datamodule(to_container(cfg.data))
    datamodule.setup()
    space = build_space(cfg, datamodule)
    training = to_container(cfg.supernet)

    stage = time.perf_counter()
    cached = set((Path(args.work_dir) / "supernets").glob("*/supernet.pt"))
    supernet, checkpoint = train_or_load_supernet(cfg, space, datamodule, Tracker())
    supernet_s = time.perf_counter() - stage
    epochs = training.get("epochs")
    if args.schedule == "progressive":
        from nas.progressive import plan_epochs

        epochs = plan_epochs(space, training["phases"])

    archs = spread_subnets(space, args.subnets, args.candidates, args.seed)
    validation = [(x, y) for x, y in datamodule.val_dataloader()]
    if args.eval_split == "val+test":
        validation += [(x, y) for x, y in datamodule.test_dataloader()]
    stage = time.perf_counter()
    calibration = calibration_batches(datamodule, cfg.search.calibration_images, args.seed)
    evaluator = SubnetEvaluator(supernet, calibration, validation, device="cpu")
    inherited = [evaluator.accuracy(arch) for arch in tqdm(archs, desc="inherited accuracy", unit="subnet")]
    inherited_s = time.perf_counter() - stage

    stage = time.perf_counter()
    root = Path(args.work_dir) / "benchmarks"
    standalone = [
        float(np.mean([train_standalone(space, supernet, arch, datamodule, training, epochs, args.seed + k,
                                        calibration, validation, root) for k in range(args.seeds)]))
        for arch in tqdm(archs, desc="standalone training", unit="subnet")
    ]
    standalone_s = time.perf_counter() - stage

    first, second = np.array(inherited), np.array(standalone)
    tau = float(kendalltau(first, second).statistic)
    low, high = bootstrap_tau(first, second, args.bootstrap, args.seed)
    result = {
        "benchmark": "supernet_ranking",
        "kendall_tau": _rounded(tau),
        "kendall_tau_low": _rounded(low),
        "kendall_tau_high": _rounded(high),
        "n": len(archs),
        "seconds": round(time.perf_counter() - started, 1),
        "supernet_s": round(supernet_s, 1),
        "supernet_reused": Path(checkpoint) in cached,
        "inherited_s": round(inherited_s, 1),
        "standalone_s": round(standalone_s, 1),
        "inherited_accuracy": [round(a, 4) for a in inherited],
        "standalone_accuracy": [round(a, 4) for a in standalone],
        "macs": [space.macs(arch) for arch in archs],
        "space": space.name,
        "data": str(cfg.data.name),
        "schedule": args.schedule,
        "epochs": epochs,
        "seed": args.seed,
        "seeds": args.seeds,
        "eval_split": args.eval_split,
        "eval_images": sum(len(y) for _, y in validation),
        "overrides": overrides,
        "supernet_checkpoint": str(checkpoint),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": _load_average(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
