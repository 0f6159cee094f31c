"""Fine-tuning support for gated networks: the keep-ratio schedule callback.

Targeted dropout runs inside the gated blocks in training mode (see :class:`nas.gates.config.TargetedDropoutConfig`).
Distillation from the ungated subnet is the fine-tuning module's ``teacher`` and ``kd_weight``:
pass the model that went into :func:`nas.gates.apply_gates`, which that function leaves unchanged.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from nas.gates.config import GateConfig, parse_gate_config
from nas.gates.network import GatedNetwork

__all__ = ["KeepRatioSchedule", "find_gated_network"]

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
    """Lowers the gated network's keep ratio linearly from ``start`` to ``target`` during training.

    The ratio moves every training step: after ``epochs`` epochs (fractions count) it stays at
    ``target``, and with ``epochs=0`` it is ``target`` from the first step. Validation runs at
    ``target``, the ratio the network will be deployed at.

    Args:
        target: the final keep ratio.
        epochs: epochs over which the ratio falls.
        start: the first keep ratio, usually 1.0 (every feature kept).
    """

    def __init__(self, target: float, epochs: int, start: float = 1.0) -> None:
        if epochs < 0:
            raise ValueError(f"KeepRatioSchedule epochs must be >= 0, but got {epochs}.")
        self.target = float(target)
        self.epochs = int(epochs)
        self.start = float(start)
        self.current = self.start if self.epochs > 0 else self.target

    @classmethod
    def from_config(cls, cfg: Any) -> KeepRatioSchedule:
        """Build the schedule from a ``conf/gates`` node: ``keep_ratio``, ``schedule_epochs``, range high end."""
        config: GateConfig = parse_gate_config(cfg)
        return cls(config.keep_ratio, config.schedule_epochs, start=config.keep_ratio_range[1])

    def ratio_at(self, epochs_done: float) -> float:
        """Return the keep ratio after ``epochs_done`` epochs of training."""
        if self.epochs == 0:
            return self.target
        progress = min(1.0, max(0.0, epochs_done / self.epochs))
        return self.start + (self.target - self.start) * progress

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        batches = trainer.num_training_batches
        # num_training_batches is inf for iterable datasets without a length: move once per epoch then.
        fraction = batch_idx / batches if 0 < batches < math.inf else 0.0
        self.current = self.ratio_at(trainer.current_epoch + fraction)
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
        return {"target": self.target, "epochs": self.epochs, "start": self.start, "current": self.current}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.target = float(state_dict["target"])
        self.epochs = int(state_dict["epochs"])
        self.start = float(state_dict["start"])
        self.current = float(state_dict["current"])
