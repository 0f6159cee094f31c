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
import numpy as np
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
