"""LightningModules for supernet training (sandwich rule with in-place distillation) and subnet fine-tuning."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nas.data.base import resize_images
from nas.spaces.base import Arch, SearchSpace
from nas.startup import FirstInterruptHeld
from nas.supernet.base import Supernet
from nas.supernet.dynamic import recalibrate_batchnorm

__all__ = [
    "SupernetModule",
    "FinetuneModule",
    "distillation_loss",
    "inplace_distillation_loss",
    "resize_to_arch",
    "SubnetEvaluator",
    "SUPERNET_SCHEDULES",
    "fit_or_interrupt",
    "run_test_or_interrupt",
    "HoldInterruptUntilSaved",
    "model_accuracy",
    "asks_for_several_processes",
    "ddp_launch_problem",
    "end_secondary_rank",
    "ranks_started_outside",
    "started_as_secondary_rank",
    "trained_as_secondary_rank",
]

log = logging.getLogger(__name__)


def fit_or_interrupt(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
    """Run ``trainer.fit(*args, **kwargs)``, raising KeyboardInterrupt when Ctrl-C stopped it.

    On Ctrl-C, Lightning shuts the fit down and raises SystemExit. The entry points turn
    KeyboardInterrupt into a line on what was kept (:func:`nas.cli.run_cli`).

    Lightning's DDP launchers on CPUs set torch's intra-op thread count to the cores per rank, in
    rank 0 too, and leave it there. This process's count is restored afterwards, so that latency
    measured after training with ``hardware.threads`` null runs at the count the predictor was
    built with.
    """
    threads = torch.get_num_threads()
    try:
        _interruptible(trainer, trainer.fit, *args, **kwargs)
    finally:
        if torch.get_num_threads() != threads:
            log.debug("Restoring torch's intra-op thread count from %d to %d after training",
                      torch.get_num_threads(), threads)
            torch.set_num_threads(threads)


def run_test_or_interrupt(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> list[dict[str, float]]:
    """Run ``trainer.test(*args, **kwargs)`` and return its results. Raise KeyboardInterrupt when Ctrl-C stopped it."""
    return _interruptible(trainer, trainer.test, *args, **kwargs)


def _interruptible(trainer: pl.Trainer, method: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a Trainer ``method``, turning the SystemExit that Lightning raises on Ctrl-C into KeyboardInterrupt."""
    try:
        return method(*args, **kwargs)
    except SystemExit:
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise


class HoldInterruptUntilSaved(FirstInterruptHeld, pl.Callback):
    """Hold a first Ctrl-C from the end of training until the trained network is saved.

    Used as a context manager around fitting, testing and saving, and passed to the Trainer
    first among its callbacks. From ``on_train_end`` on (before the other callbacks' end-of-training
    work, such as BatchNorm calibration), a first Ctrl-C is noted and logged instead of stopping
    the run, and a second one stops it at once. Leaving the block restores the previous handler.
    In rank 0 it then raises KeyboardInterrupt when a Ctrl-C was held, so the run stops with its
    network saved. A DDP rank other than 0 does not raise. Its caller checks ``pressed`` and ends
    the rank without an error, because Lightning's launcher in rank 0 takes an error exit for a
    failed rank and stops rank 0, possibly before it saves. Ctrl-C during the training epochs
    stops at once, as without this callback.
    """

    def __init__(self, network_name: str = "the fine-tuned network") -> None:
        super().__init__()
        self.network_name = network_name
        self.rank_zero = True

    def __enter__(self) -> HoldInterruptUntilSaved:
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.restore()
        if kind is None and self.pressed and self.rank_zero:
            self.pressed = False
            raise KeyboardInterrupt

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rank_zero = trainer.is_global_zero
        self.install()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning's teardown has just put back the handler that fit started with, and its
        # teardown hooks and the loggers' finalize still follow.
        if self.installed:
            self.install()

    def on_first_interrupt(self) -> None:
        if self.rank_zero:
            log.warning("Ctrl-C: training has ended, so the run stops once %s is tested and saved. Press Ctrl-C "
                        "again to stop now without saving it.", self.network_name)


@torch.no_grad()
def model_accuracy(model: nn.Module, batches: Iterable[Sequence[torch.Tensor]]) -> float:
    """Return the top-1 accuracy of ``model`` in eval mode over ``(inputs, targets)`` batches, on the model's device."""
    device = next(model.parameters()).device
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x.to(device)).argmax(dim=1) == y.to(device)).sum())
        total += len(y)
    return correct / total


def trained_as_secondary_rank() -> bool:
    """Return True after training in a process that was a DDP rank other than 0.

    It reads the rank from ``torch.distributed``, which Lightning's DDP strategies leave initialised after
    ``fit`` and ``test``. So a process that trained alone, whatever its launcher's environment
    variables, counts as rank 0.
    """
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def ddp_launch_problem(trainer_cfg: Any, key: str) -> str | None:
    """Return why Lightning cannot start the DDP ranks that ``trainer_cfg`` requests here, or None when it can.

    Lightning starts ranks 1 and up by running the process's command line again. Inside a
    submitit job that command line is submitit's own, so there SLURM must start the ranks.
    ``key`` names the settings in the message, such as ``supernet.trainer``.
    """
    if "SUBMITIT_EXECUTOR" not in os.environ or not asks_for_several_processes(trainer_cfg):
        return None
    if ranks_started_outside(trainer_cfg):
        return None
    return (f"{key}.devices={trainer_cfg.get('devices')} inside a job of Hydra's submitit launcher: Lightning "
            "would start the other DDP ranks by running the job's command line again, which is submitit's "
            f"own. Set {key}.devices=1 in submitit jobs, or on SLURM let SLURM start the ranks "
            f"(hydra/launcher=submitit_slurm with hydra.launcher.tasks_per_node equal to {key}.devices).")


def end_secondary_rank(done: str, rank_zero: str) -> None:
    """Log that this DDP rank other than 0 has done ``done`` and leaves ``rank_zero`` to rank 0; close its process group.

    Lightning's launcher in rank 0 takes a rank that aborts at exit for a failed rank and stops rank 0.
    NOTE: without this close, rank 1 aborted at exit ("terminate called without an active exception")
    in 2 of 17 gated fine-tunings on two CPU ranks, and with it in none of 12; a rare abort may remain.
    """
    import torch.distributed as dist

    log.info("This process is a DDP rank other than 0: its part of the %s is done, and rank 0 %s.", done, rank_zero)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def started_as_secondary_rank() -> bool:
    """Return True, before training, in a process that Lightning or torchrun started as local rank 1 or up.

    Both set ``LOCAL_RANK``; SLURM does not, so a process of a several-task SLURM step counts as
    rank 0 here. :func:`trained_as_secondary_rank` gives the rank that training used.
    """
    return os.environ.get("LOCAL_RANK", "0").strip() not in ("", "0")


def asks_for_several_processes(trainer_cfg: Any) -> bool:
    """Return True when Lightning ``trainer`` settings may run training in several processes (devices or nodes)."""
    devices = trainer_cfg.get("devices", 1)
    nodes = trainer_cfg.get("num_nodes", 1)
    return devices not in (1, "1") or nodes not in (1, "1", None)


def ranks_started_outside(trainer_cfg: Any) -> bool:
    """Return True when torchrun or SLURM started every rank of a several-process training at once.

    That needs both a launcher's environment (``WORLD_SIZE`` above 1, or a SLURM step of several
    tasks) and ``trainer_cfg`` settings that ask for several processes: the tasks of one SLURM step
    may also be independent workers that each train alone. Call it before training starts, because
    Lightning's own launcher sets ``WORLD_SIZE`` in rank 0 when it starts the other ranks.
    """
    environ = os.environ
    launched = int(environ.get("WORLD_SIZE", "1") or 1) > 1 or int(environ.get("SLURM_NTASKS", "1") or 1) > 1
    return launched and asks_for_several_processes(trainer_cfg)


# Values of supernet.schedule; nas.progressive.create_supernet_module builds the module of each.
SUPERNET_SCHEDULES = ("sandwich", "progressive")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL divergence from the teacher's softened distribution to the student's, scaled by T^2."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean"
    ) * (t * t)


def resize_to_arch(x: torch.Tensor, space: SearchSpace, arch: Arch) -> torch.Tensor:
    """Resize a batch to the architecture's input resolution when it differs from the data's."""
    _, height, width = space.input_shape(arch)
    return resize_images(x, (height, width))


def inplace_distillation_loss(
    supernet: Supernet, x: torch.Tensor, y: torch.Tensor, archs: Sequence[Arch], label_smoothing: float = 0.0,
    kd_weight: float = 1.0, temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the losses of ``archs`` on one batch; the first one teaches the others.

    The first architecture is trained on the labels; every other one on the labels plus
    ``kd_weight`` times distillation from the first one's detached logits. The supernet is left
    with the first architecture active. Returns (total loss, the first architecture's loss).
    """
    space = supernet.space
    supernet.set_active(archs[0])
    teacher_logits = supernet(resize_to_arch(x, space, archs[0]))
    teacher_loss = F.cross_entropy(teacher_logits, y, label_smoothing=label_smoothing)
    teacher = teacher_logits.detach()

    loss = teacher_loss
    for arch in archs[1:]:
        supernet.set_active(arch)
        logits = supernet(resize_to_arch(x, space, arch))
        sub_loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if kd_weight > 0:
            sub_loss = sub_loss + kd_weight * distillation_loss(logits, teacher, temperature)
        loss = loss + sub_loss

    supernet.set_active(archs[0])
    return loss, teacher_loss


def _cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int) -> dict[str, Any]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + float(np.cos(np.pi * min(1.0, progress))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class SupernetModule(pl.LightningModule):
    """Trains a weight-sharing supernet with the sandwich rule.

    Each step trains the largest subnet on the labels, then the smallest and ``num_random``
    random subnets on the labels plus in-place distillation from the largest subnet's detached
    logits. All losses are summed before one backward pass.

    Args:
        supernet: the model to train.
        lr: peak learning rate of AdamW (cosine decay after a short warm-up).
        weight_decay: AdamW weight decay.
        num_random: random subnets per step besides the largest and smallest.
        kd_weight: weight of the distillation term for the non-largest subnets.
        temperature: softmax temperature of the distillation term.
        seed: seed of the per-step subnet sampling (step ``i`` uses ``seed + i``).
        label_smoothing: label smoothing of the cross-entropy terms.
    """

    def __init__(
        self,
        supernet: Supernet,
        lr: float = 2e-3,
        weight_decay: float = 5e-4,
        num_random: int = 2,
        kd_weight: float = 1.0,
        temperature: float = 1.0,
        seed: int = 0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if num_random < 0:
            raise ValueError(f"supernet.num_random must be >= 0, but got {num_random}.")
        self.supernet = supernet
        self.space = supernet.space
        self.lr = lr
        self.weight_decay = weight_decay
        self.num_random = num_random
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.seed = seed
        self.label_smoothing = label_smoothing

    def step_archs(self, step: int) -> list[Arch]:
        """Return the subnets trained at ``step``: largest first, then smallest, then random ones."""
        rng = np.random.default_rng(self.seed + step)
        return [self.space.largest(), self.space.smallest()] + [self.space.sample(rng) for _ in range(self.num_random)]

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss, largest_loss = inplace_distillation_loss(
            self.supernet, x, y, self.step_archs(self.global_step), self.label_smoothing, self.kd_weight, self.temperature
        )
        self.log("train/loss_largest", largest_loss, prog_bar=True)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.supernet.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        return _cosine_schedule(optimizer, total, warmup_steps=min(50, total // 10))


class FinetuneModule(pl.LightningModule):
    """Fine-tunes one static subnet on labels, optionally distilling from a teacher.

    Args:
        model: the subnet (a plain module, or a gated network exposing ``auxiliary_loss()``).
        lr: peak learning rate of AdamW (cosine decay after a short warm-up).
        weight_decay: AdamW weight decay.
        teacher: a frozen network whose logits the model imitates when ``kd_weight > 0``.
        kd_weight: weight of the distillation term.
        temperature: softmax temperature of the distillation term.
        label_smoothing: label smoothing of the cross-entropy term.
        full_keep_weight: for a gated network, weight of a second cross-entropy term computed at
            the top of its keep-ratio range (``nas.gates.full_keep_logits``); 0 turns it off.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        teacher: nn.Module | None = None,
        kd_weight: float = 0.0,
        temperature: float = 1.0,
        label_smoothing: float = 0.0,
        full_keep_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.lr = lr
        self.weight_decay = weight_decay
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.full_keep_weight = full_keep_weight

    def train(self, mode: bool = True) -> FinetuneModule:
        """Set the model's mode; the teacher stays in eval mode, with its BatchNorm running statistics.

        Lightning 2.6 keeps each submodule's mode through fitting, but a ``train()`` call on the
        whole module, by a caller or another Lightning version, would otherwise give the teacher's
        BatchNorm layers batch statistics and update their running statistics.
        """
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.teacher is not None and self.kd_weight > 0:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            loss = loss + self.kd_weight * distillation_loss(logits, teacher_logits, self.temperature)
        auxiliary = getattr(self.model, "auxiliary_loss", None)
        if callable(auxiliary):
            loss = loss + auxiliary()
        if self.full_keep_weight > 0:
            from nas.gates import full_keep_logits

            full = full_keep_logits(self.model, x)
            if full is not None:
                loss = loss + self.full_keep_weight * F.cross_entropy(full, y, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _accuracy_step(self, batch: Sequence[torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self.model(x)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        # sync_dist averages over DDP ranks, because each rank evaluates its own share of the images.
        self.log(f"{stage}/accuracy", accuracy, prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), batch_size=len(y), sync_dist=True)

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._accuracy_step(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        self._accuracy_step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        return _cosine_schedule(optimizer, total, warmup_steps=min(20, total // 10))


class SubnetEvaluator:
    """Accuracy of supernet subnets after BatchNorm recalibration, for the search objective.

    The calibration and validation batches are materialised once, so every architecture is judged
    on the same images. Results are cached by architecture JSON.

    Args:
        supernet: the trained supernet.
        calibration_batches: training batches (inputs, or (inputs, targets) pairs) for recalibration.
        validation_batches: (inputs, targets) pairs the accuracy is measured on.
        device: where the forward passes run.
    """

    def __init__(
        self,
        supernet: Supernet,
        calibration_batches: Iterable[Any],
        validation_batches: Iterable[Sequence[torch.Tensor]],
        device: str | torch.device = "cpu",
    ) -> None:
        self.supernet = supernet.to(device)
        self.space = supernet.space
        self.device = torch.device(device)
        self.calibration = [self._inputs(b).to(self.device) for b in calibration_batches]
        self.validation = [(x.to(self.device), y.to(self.device)) for x, y in validation_batches]
        if not self.calibration or not self.validation:
            raise ValueError("SubnetEvaluator needs at least one calibration batch and one validation batch.")
        self.cache: dict[str, float] = {}

    @staticmethod
    def _inputs(batch: Any) -> torch.Tensor:
        return batch[0] if isinstance(batch, (list, tuple)) else batch

    @torch.no_grad()
    def accuracy(self, arch: Arch) -> float:
        """Return top-1 validation accuracy in [0, 1] of ``arch`` with inherited, recalibrated weights."""
        key = arch.to_json()
        if key in self.cache:
            return self.cache[key]
        self.supernet.set_active(arch)
        resized = [resize_to_arch(x, self.space, arch) for x in self.calibration]
        recalibrate_batchnorm(self.supernet, resized, max_batches=len(resized))
        self.supernet.eval()
        correct = total = 0
        for x, y in self.validation:
            logits = self.supernet(resize_to_arch(x, self.space, arch))
            correct += int((logits.argmax(dim=1) == y).sum())
            total += len(y)
        self.cache[key] = correct / total
        return self.cache[key]
