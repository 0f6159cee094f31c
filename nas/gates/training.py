"""Fine-tuning support for gated networks: the keep-ratio schedule and per-ratio BatchNorm calibration.

Targeted dropout runs inside the gated blocks in training mode (see :class:`nas.gates.config.TargetedDropoutConfig`).
Distillation from the ungated subnet is the fine-tuning module's ``teacher`` and ``kd_weight``:
pass the model that went into :func:`nas.gates.apply_gates`, which that function leaves unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from typing_extensions import override

from nas.gates.batchnorm import BatchNormBank, batchnorm_layers
from nas.gates.blocks import GatedResidualBlock
from nas.gates.config import GateConfig, GateConfigError, parse_gate_config
from nas.gates.network import GatedNetwork

__all__ = [
    "BatchNormCalibration",
    "KeepRatioSchedule",
    "calibrate_keep_ratios",
    "calibration_ratios",
    "find_gated_network",
    "full_keep_logits",
]

# Spacing of the default calibration grid. Kept counts change every 1/channels of a ratio, but
# BatchNorm statistics drift slowly with the ratio, so 0.1 apart serves the range.
CALIBRATION_STEP = 0.1
# Seed of the training images that BatchNormCalibration draws before each validation.
CALIBRATION_SEED = 0

log = logging.getLogger(__name__)


def find_gated_network(module: Any) -> GatedNetwork:
    """Return the first :class:`GatedNetwork` inside ``module`` (which may be one itself)."""
    for child in module.modules():
        if isinstance(child, GatedNetwork):
            return child
    raise ValueError(
        f"{type(module).__name__} contains no GatedNetwork; build the model with nas.gates.apply_gates "
        "or remove the KeepRatioSchedule callback."
    )


class KeepRatioSchedule(pl.Callback):
    """Lowers the gated network's keep ratio from ``start`` to ``target``, then trains the whole range.

    The ratio moves every training step: linearly during the first ``epochs`` epochs (fractions
    count), then, with ``sample_range``, each step draws its ratio uniformly from that range, and
    without it the ratio stays at ``target``. Training one fixed ratio leaves the features it drops
    untrained, so accuracy falls at higher ratios. Drawing ratios trains every feature and keeps
    ``set_keep_ratio`` useful across the range. With ``epochs=0`` the ramp is skipped. Validation
    runs at ``target``, the ratio the network will be deployed at.

    Args:
        target: the keep ratio at the end of the ramp and during validation.
        epochs: epochs over which the ratio falls.
        start: the first keep ratio, usually 1.0 (every feature kept).
        sample_range: (low, high) range that ratios are drawn from after the ramp, or None.
        seed: seed of the ratio draws.
    """

    def __init__(self, target: float, epochs: int, start: float = 1.0,
                 sample_range: tuple[float, float] | None = None, seed: int = 0) -> None:
        if epochs < 0:
            raise ValueError(f"KeepRatioSchedule epochs must be >= 0, but got {epochs}.")
        if sample_range is not None and not 0 < sample_range[0] <= sample_range[1] <= 1:
            raise ValueError(f"KeepRatioSchedule sample_range must satisfy 0 < low <= high <= 1, "
                             f"but got {sample_range}.")
        self.target = float(target)
        self.epochs = int(epochs)
        self.start = float(start)
        self.sample_range = tuple(float(v) for v in sample_range) if sample_range is not None else None
        self.rng = np.random.default_rng(seed)
        self.current = self.start if self.epochs > 0 else self.target

    @classmethod
    def from_config(cls, cfg: Any) -> KeepRatioSchedule:
        """Build the schedule from a ``conf/gates`` node.

        The ramp runs from the top of ``keep_ratio_range`` to ``keep_ratio`` over ``schedule_epochs``,
        and ``sample_range_after_ramp`` decides whether the whole range is drawn from afterwards.
        """
        config: GateConfig = parse_gate_config(cfg)
        sample_range = config.keep_ratio_range if config.sample_range_after_ramp else None
        return cls(config.keep_ratio, config.schedule_epochs, start=config.keep_ratio_range[1],
                   sample_range=sample_range, seed=config.seed)

    def ratio_at(self, epochs_done: float) -> float:
        """Return the ramp's keep ratio after ``epochs_done`` epochs of training (``target`` after the ramp)."""
        if self.epochs == 0:
            return self.target
        progress = min(1.0, max(0.0, epochs_done / self.epochs))
        return self.start + (self.target - self.start) * progress

    def next_ratio(self, epochs_done: float) -> float:
        """Return the keep ratio of the next training step: on the ramp, else drawn or ``target``."""
        if epochs_done < self.epochs or self.sample_range is None:
            return self.ratio_at(epochs_done)
        return float(self.rng.uniform(*self.sample_range))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        batches = trainer.num_training_batches
        # num_training_batches is inf for iterable datasets without a length: move once per epoch then.
        fraction = batch_idx / batches if 0 < batches < math.inf else 0.0
        self.current = self.next_ratio(trainer.current_epoch + fraction)
        find_gated_network(pl_module).set_keep_ratio(self.current)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pl_module.log("gates/keep_ratio", self.current)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        find_gated_network(pl_module).set_keep_ratio(self.target)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        find_gated_network(pl_module).set_keep_ratio(self.target)
        log.info("gates: training ended, keep ratio set to %.2f", self.target)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target, "epochs": self.epochs, "start": self.start,
                "sample_range": list(self.sample_range) if self.sample_range is not None else None,
                "rng": self.rng.bit_generator.state, "current": self.current}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.target = float(state_dict["target"])
        self.epochs = int(state_dict["epochs"])
        self.start = float(state_dict["start"])
        sample_range = state_dict["sample_range"]
        self.sample_range = tuple(float(v) for v in sample_range) if sample_range is not None else None
        self.rng.bit_generator.state = state_dict["rng"]
        self.current = float(state_dict["current"])


def calibration_ratios(config: GateConfig, step: float = CALIBRATION_STEP) -> list[float]:
    """Return the default calibration grid: ``keep_ratio_range`` every ``step``, both ends and ``keep_ratio``."""
    low, high = config.keep_ratio_range
    grid = np.arange(low, high + 1e-9, step).tolist() + [high, config.keep_ratio]
    return sorted({round(float(r), 6) for r in grid})


def _inputs(batches: Iterable[Any], max_batches: int, device: torch.device) -> list[torch.Tensor]:
    inputs = []
    for batch in itertools.islice(batches, max_batches):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        inputs.append(x.to(device))
    if not inputs:
        raise ValueError("calibrate_keep_ratios got no batch; pass the training loader (inputs or (inputs, targets)).")
    return inputs


@torch.no_grad()
def _recalibrate_at(network: GatedNetwork, ratio: float, inputs: Sequence[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's statistics at ``ratio`` as a plain average over ``inputs``.

    Gated blocks run their training path, which calls the BatchNorm modules on the masked maps
    (the eval paths fold BatchNorm and never call them), with the inference selection: top-k
    without targeted dropout. Everything else runs in eval mode.
    """
    network.set_keep_ratio(ratio)
    network.eval()
    for module in network.modules():
        if isinstance(module, GatedResidualBlock):
            module.training = True
    for norm in batchnorm_layers(network.model).values():
        norm.reset_running_stats()
        norm.momentum = None
        norm.training = True
    for x in inputs:
        network(x)


@contextlib.contextmanager
def _calibrating(network: GatedNetwork) -> Iterator[None]:
    """Run calibration passes without targeted dropout, then restore keep ratio, momenta, dropout and mode."""
    norms = batchnorm_layers(network.model)
    runtime, original, was_training = network.runtime, network.keep_ratio, network.training
    momenta = {name: norm.momentum for name, norm in norms.items()}
    dropout = runtime.dropout_rate
    runtime.dropout_rate = 0.0
    try:
        yield
    finally:
        runtime.dropout_rate = dropout
        for name, norm in norms.items():
            norm.momentum = momenta[name]
        network.train(was_training)
        network.set_keep_ratio(original)


def calibrate_keep_ratios(network: GatedNetwork, batches: Iterable[Any], max_batches: int,
                          ratios: Sequence[float] | None = None) -> BatchNormBank:
    """Re-estimate BatchNorm statistics at each ratio of a grid and attach them to ``network``.

    Every BatchNorm layer is recalibrated from scratch on the same ``max_batches`` batches at each
    ratio. The layers whose statistics differ between ratios go into the bank, because the
    gates change their inputs. The others (before the first gate, or shortcut branches that read
    an ungated input) get the same statistics at every ratio and keep one set. Afterwards
    ``network.set_keep_ratio(r)`` loads the statistics of the grid ratio nearest to ``r``. Call it
    after fine-tuning, because training updates only the statistics of the ratio in use.

    Args:
        network: the fine-tuned gated network; its keep ratio and training mode are restored.
        batches: training batches, inputs or (inputs, targets) pairs; they are moved to the
            network's device.
        max_batches: number of batches averaged at each ratio.
        ratios: the grid, inside ``keep_ratio_range``; defaults to :func:`calibration_ratios`.

    Returns:
        The bank, also attached as ``network.batchnorm_bank``.
    """
    grid = sorted({float(r) for r in (ratios if ratios is not None else calibration_ratios(network.config))})
    for ratio in grid:
        network.config.check_keep_ratio(ratio)
    norms = batchnorm_layers(network.model)
    if not norms:
        raise GateConfigError(f"{type(network.model).__name__} has no BatchNorm layer to calibrate per keep ratio.")
    device = next(network.parameters()).device
    inputs = _inputs(batches, max_batches, device)

    network.set_batchnorm_bank(None)
    per_ratio = []
    with _calibrating(network):
        for ratio in grid:
            _recalibrate_at(network, ratio, inputs)
            per_ratio.append({name: (n.running_mean.clone(), n.running_var.clone()) for name, n in norms.items()})

    varying = [name for name in norms if any(
        not torch.equal(stats[name][0], per_ratio[0][name][0]) or not torch.equal(stats[name][1], per_ratio[0][name][1])
        for stats in per_ratio[1:])]
    bank = BatchNormBank(varying, [norms[name].num_features for name in varying], grid).to(device)
    for index, stats in enumerate(per_ratio):
        for path, row in zip(bank.paths, bank.stats):
            row.running_mean[index].copy_(stats[path][0])
            row.running_var[index].copy_(stats[path][1])
    network.set_batchnorm_bank(bank)
    network.set_keep_ratio(network.keep_ratio)  # loads the bank's statistics for the current ratio
    log.info("gates: BatchNorm statistics of %d of %d layers stored at keep ratios %s (%d batches each)",
             len(varying), len(norms), grid, len(inputs))
    return bank


class BatchNormCalibration(pl.Callback):
    """Runs :func:`calibrate_keep_ratios` on the training loader when training ends, before testing.

    During training the BatchNorm layers keep one set of running statistics for every keep ratio
    the schedule and the full-keep term ran, so a validation with them reads far below what the
    network scores once calibrated. Before each validation that runs during training, the callback
    therefore re-estimates the statistics at the current keep ratio on ``images`` training images,
    the same fixed random draw each time (:func:`_calibration_loader`), and puts the training
    statistics back afterwards, also when validation fails: ``val/accuracy`` is the network as it
    would be deployed at that ratio.

    Args:
        images: training images averaged at each ratio (rounded up to whole batches).
        ratios: the calibration grid; defaults to :func:`calibration_ratios` of the network's config.
    """

    def __init__(self, images: int, ratios: Sequence[float] | None = None) -> None:
        if images < 1:
            raise ValueError(f"BatchNormCalibration images must be >= 1, but got {images}.")
        self.images = int(images)
        self.ratios = list(ratios) if ratios is not None else None
        self._training_stats: dict[str, tuple[torch.Tensor, ...]] | None = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        batch_size = getattr(loader, "batch_size", None) or 1
        max_batches = max(1, math.ceil(self.images / batch_size))
        calibrate_keep_ratios(find_gated_network(pl_module), iter(loader), max_batches, self.ratios)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training_stats = None
        network = find_gated_network(pl_module)
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        # After training, the bank contains calibrated statistics per ratio. Without a training set
        # (a bare trainer.validate, or the sanity check) there is nothing to calibrate on.
        if network.batchnorm_bank is not None or dataset is None:
            return
        norms = batchnorm_layers(network.model)
        self._training_stats = {name: (n.running_mean.clone(), n.running_var.clone(), n.num_batches_tracked.clone())
                                for name, n in norms.items()}
        batch_size = getattr(loader, "batch_size", None) or 1
        # Augmentations draw from torch's global generator, so forking it keeps the training's
        # draws the same however often validation runs.
        with torch.random.fork_rng(devices=[]):
            inputs = _inputs(_calibration_loader(loader, dataset, self.images, batch_size),
                             max(1, math.ceil(self.images / batch_size)), next(network.parameters()).device)
        with _calibrating(network):
            _recalibrate_at(network, network.keep_ratio, inputs)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_training_stats(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_training_stats(pl_module)

    def _restore_training_stats(self, pl_module: pl.LightningModule) -> None:
        if self._training_stats is None:
            return
        norms = batchnorm_layers(find_gated_network(pl_module).model)
        for name, (mean, var, tracked) in self._training_stats.items():
            norms[name].running_mean.copy_(mean)
            norms[name].running_var.copy_(var)
            norms[name].num_batches_tracked.copy_(tracked)
        self._training_stats = None


def _calibration_loader(loader: Any, dataset: Any, images: int, batch_size: int) -> torch.utils.data.DataLoader:
    """Return a loader of ``images`` training images drawn once with a fixed seed, in batches of ``batch_size``.

    A fixed random draw rather than the dataset's first images: folder datasets are sorted by
    class, and statistics of one class misrepresent the data. The loader has its own generator,
    so the training shuffle is not disturbed. An iterable dataset gives its first images.
    """
    collate = getattr(loader, "collate_fn", None)
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    chosen = torch.randperm(len(dataset), generator=generator)[:images].tolist()
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, chosen), batch_size=batch_size,
                                       shuffle=False, collate_fn=collate, generator=generator)


def full_keep_logits(network: GatedNetwork, x: torch.Tensor) -> torch.Tensor | None:
    """Return ``network``'s logits at the top of its keep-ratio range, or None when it runs there already.

    The current keep ratio is restored afterwards. At keep ratio 1.0 the gates do not run, so this
    trains the ungated path that shares every weight with the gated ones.
    """
    current, top = network.keep_ratio, network.config.keep_ratio_range[1]
    if current >= top:
        return None
    network.set_keep_ratio(top)
    try:
        return network(x)
    finally:
        network.set_keep_ratio(current)
