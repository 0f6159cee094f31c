"""Once-for-All's progressive shrinking, and the factory that builds either supernet schedule from its config.

Progressive shrinking trains the full network first and then opens one elastic dimension at a time:
kernel size, then depth, then width (expand ratio or channel count). Each elastic phase samples
subnets from the dimensions opened so far and trains them on the labels plus distillation from the
full network's detached logits. The facts below follow Once-for-All's public training script
(mit-han-lab/once-for-all, ``train_ofa_net.py``):

- the kernel phase opens every kernel size at once and trains 1 subnet per step;
- the depth phase first allows the two largest depths ({3, 4}), then all ({2, 3, 4}), 2 subnets per step;
- the expand phase first allows the two largest ratios ({4, 6}), then all ({3, 4, 6}), 4 subnets per step,
  and sorts the expanded channels by importance before each of its sub-stages;
- resolution is elastic in every phase.

Differences from OFA: the distillation target is the supernet's own largest subnet, trained on the
labels in the same step (as the sandwich rule does), not a separately trained frozen copy. One
Lightning run covers all phases, and the learning rate restarts its warm-up and cosine decay at
every sub-stage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from nas.spaces.base import Arch, SearchSpace
from nas.supernet.base import Supernet
from nas.training import SUPERNET_SCHEDULES, SupernetModule, inplace_distillation_loss

__all__ = [
    "PHASES",
    "ProgressiveError",
    "ProgressiveStage",
    "ProgressivePlan",
    "ProgressiveShrinkingModule",
    "decision_dimensions",
    "build_plan",
    "plan_epochs",
    "check_supernet_config",
    "create_supernet_module",
]

log = logging.getLogger(__name__)

# Training phases in order; every phase after "full" opens the dimension of its name.
PHASES = ("full", "kernel", "depth", "width")

# Decision names of each dimension: exact names for resolution, prefixes for the others. They cover
# the built-in families (mobilenet: r, ks_*, d_*, e_*; resnet: resolution, depth_*, width_*, expand_*).
_RESOLUTION_NAMES = ("r", "resolution")
_DIMENSION_PREFIXES = {"kernel": ("ks_", "kernel_"), "depth": ("d_", "depth_"), "width": ("e_", "expand_", "width_")}

_SANDWICH_KEYS = ("schedule", "epochs", "lr", "weight_decay", "num_random", "kd_weight", "temperature",
                  "label_smoothing", "trainer")
_PROGRESSIVE_KEYS = ("schedule", "phases", "subnets_per_step", "lr", "weight_decay", "kd_weight", "temperature",
                     "label_smoothing", "trainer")


class ProgressiveError(ValueError):
    """An invalid progressive-shrinking setting, or a space whose decisions it cannot classify."""


def decision_dimensions(space: SearchSpace) -> dict[str, str]:
    """Map each decision of ``space.choices()`` to "resolution", "kernel", "depth" or "width".

    A space may define ``elastic_dimensions()`` that returns this mapping itself; otherwise decisions
    are classified by name (see ``_DIMENSION_PREFIXES``).

    Raises:
        ProgressiveError: naming the decisions that match no dimension.
    """
    custom = getattr(space, "elastic_dimensions", None)
    if callable(custom):
        return dict(custom())

    out: dict[str, str] = {}
    unknown = []
    for name in space.choices():
        if name in _RESOLUTION_NAMES:
            out[name] = "resolution"
            continue
        matches = [dim for dim, prefixes in _DIMENSION_PREFIXES.items() if name.startswith(prefixes)]
        if matches:
            out[name] = matches[0]
        else:
            unknown.append(name)
    if unknown:
        raise ProgressiveError(
            f"Progressive shrinking cannot tell which dimension the decisions {unknown} of space {space.name!r} "
            f"belong to; known names are {list(_RESOLUTION_NAMES)} and the prefixes {_DIMENSION_PREFIXES}. "
            "Give the space an elastic_dimensions() method that maps each decision to 'resolution', 'kernel', "
            "'depth' or 'width', or use supernet=sandwich."
        )
    return out


@dataclass(frozen=True)
class ProgressiveStage:
    """One sub-stage of a phase: training steps ``[start_step, end_step)`` and the values each decision may take.

    ``expand_stage`` is set for sub-stages of the width phase: before the first step the supernet's
    expanded channels are sorted by importance, keeping the ``expand_stage`` smaller ratios'
    channels in place (``sort_expanded_channels(expand_stage)``).
    """

    phase: str
    index: int
    start_step: int
    end_step: int
    options: dict[str, list[Any]]
    expand_stage: int | None = None

    @property
    def steps(self) -> int:
        return self.end_step - self.start_step


@dataclass(frozen=True)
class ProgressivePlan:
    """The sub-stages of a whole progressive-shrinking run, in step order, and its length in epochs."""

    stages: tuple[ProgressiveStage, ...]
    epochs: int
    steps_per_epoch: int

    def stage_at(self, step: int) -> ProgressiveStage:
        """Return the sub-stage that contains training step ``step`` (the last one for steps past the end)."""
        for stage in self.stages:
            if step < stage.end_step:
                return stage
        return self.stages[-1]


def _top(options: Sequence[Any], count: int) -> list[Any]:
    return sorted(options)[-count:]


def _phase_substages(phase: str, choices: Mapping[str, list[Any]], dims: Mapping[str, str],
                     opened: set[str]) -> list[dict[str, list[Any]]]:
    """Return the options of each sub-stage of ``phase``, or an empty list if the space has nothing to open there.

    ``opened`` contains the dimensions opened by earlier phases. Depth and width open gradually: the
    two largest values first, then one more value per sub-stage. Kernel size opens at once.
    """
    names = [n for n, d in dims.items() if d == phase]
    widest = max((len(choices[n]) for n in names), default=1)
    if phase != "full" and widest < 2:
        return []

    def options(extra: dict[str, int]) -> dict[str, list[Any]]:
        out = {}
        for name, values in choices.items():
            dim = dims[name]
            if dim == "resolution" or dim in opened:
                out[name] = sorted(values)
            elif name in extra:
                out[name] = _top(values, extra[name])
            else:
                out[name] = _top(values, 1)
        return out

    if phase in ("full", "kernel"):
        return [options({n: len(choices[n]) for n in names})]
    return [options({n: count for n in names}) for count in range(2, widest + 1)]


def _phase_options(space: SearchSpace, phase_epochs: Mapping[str, int]) -> list[tuple[str, list[dict[str, list[Any]]]]]:
    """Return each phase in order with the options of its sub-stages; a skipped phase has none.

    A phase is skipped when it has 0 epochs or the space lacks its dimension. A skipped phase's
    dimension still opens for the later phases.
    """
    _check_phase_epochs(phase_epochs)
    choices = space.choices()
    dims = decision_dimensions(space)
    opened: set[str] = set()
    out = []
    for phase in PHASES:
        substages = _phase_substages(phase, choices, dims, opened)
        if phase != "full":
            opened.add(phase)
        out.append((phase, substages if phase_epochs[phase] else []))
    return out


def plan_epochs(space: SearchSpace, phase_epochs: Mapping[str, int]) -> int:
    """Return the epochs a progressive-shrinking run of ``space`` takes: the sum over the phases it does not skip."""
    return sum(phase_epochs[phase] for phase, substages in _phase_options(space, phase_epochs) if substages)


def build_plan(space: SearchSpace, phase_epochs: Mapping[str, int], steps_per_epoch: int) -> ProgressivePlan:
    """Lay out the sub-stages of progressive shrinking over :func:`plan_epochs` epochs.

    Phases with 0 epochs, and phases whose dimension the space lacks (for example the kernel
    phase of a ResNet space), are skipped. A skipped phase's dimension still opens for the later
    phases. A phase's steps are split evenly over its sub-stages. Sub-stages left with no step
    are dropped, the earlier ones first.

    Raises:
        ProgressiveError: if ``phase_epochs`` is invalid or no phase has a step.
    """
    if steps_per_epoch < 1:
        raise ProgressiveError(f"steps_per_epoch must be >= 1, but got {steps_per_epoch}; is the training set empty?")
    stages: list[ProgressiveStage] = []
    step = epochs = 0
    for phase, substages in _phase_options(space, phase_epochs):
        if not substages:
            if phase_epochs[phase]:
                log.info("Skipping the %s phase: space %s has no elastic %s.", phase, space.name, phase)
            continue
        epochs += phase_epochs[phase]
        total = phase_epochs[phase] * steps_per_epoch
        # Rounding down gives any spare steps to the later sub-stages, which cover more of the space.
        bounds = [step + total * i // len(substages) for i in range(len(substages) + 1)]
        for i, options in enumerate(substages):
            if bounds[i + 1] > bounds[i]:
                stage = ProgressiveStage(phase, len(stages), bounds[i], bounds[i + 1], options,
                                         expand_stage=i if phase == "width" else None)
                stages.append(stage)
        step += total
    if not stages:
        raise ProgressiveError(f"supernet.phases={dict(phase_epochs)} gives no training step; give a phase >= 1 epoch.")

    choices = space.choices()
    narrowed = sorted(name for name, values in stages[-1].options.items() if len(values) < len(choices[name]))
    if narrowed:
        log.warning("The last progressive-shrinking phase (%s) never varies %s, so subnets that change them are "
                    "untrained; give the later phases epochs in supernet.phases.", stages[-1].phase, narrowed[:6])
    return ProgressivePlan(tuple(stages), epochs, steps_per_epoch)


def _check_phase_epochs(phase_epochs: Mapping[str, int]) -> None:
    if not isinstance(phase_epochs, Mapping):
        raise ProgressiveError(f"supernet.phases must map {list(PHASES)} to epochs, but got {phase_epochs!r}.")
    unknown = sorted(set(phase_epochs) - set(PHASES))
    missing = [p for p in PHASES if p not in phase_epochs]
    if unknown or missing:
        raise ProgressiveError(
            f"supernet.phases has unknown keys {unknown} and missing keys {missing}; it needs exactly {list(PHASES)}."
        )
    for phase, epochs in phase_epochs.items():
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ProgressiveError(f"supernet.phases.{phase} must be an integer >= 0 (epochs), but got {epochs!r}.")


class ProgressiveShrinkingModule(pl.LightningModule):
    """Trains a weight-sharing supernet with Once-for-All's progressive shrinking.

    The full phase trains the largest subnet on the labels, at a resolution drawn from the space.
    Each step of an elastic phase trains the largest subnet on the labels at the largest
    resolution, then ``subnets_per_step[phase]`` subnets drawn from the sub-stage's options on the
    labels plus distillation from the largest subnet's detached logits. All losses of a step are
    summed before one backward pass. The Trainer's ``max_epochs`` must equal :attr:`epochs`.

    Args:
        supernet: the model to train.
        phases: epochs of each phase in :data:`PHASES`.
        subnets_per_step: sampled subnets per step in the "kernel", "depth" and "width" phases.
        lr: peak learning rate of AdamW; every sub-stage restarts the warm-up and cosine decay.
        weight_decay: AdamW weight decay.
        kd_weight: weight of the distillation term.
        temperature: softmax temperature of the distillation term.
        seed: seed of the per-step subnet sampling (step ``i`` uses ``default_rng([seed, i])``).
        label_smoothing: label smoothing of the cross-entropy terms.
    """

    def __init__(self, supernet: Supernet, phases: Mapping[str, int], subnets_per_step: Mapping[str, int],
                 lr: float = 2e-3, weight_decay: float = 5e-4, kd_weight: float = 1.0, temperature: float = 1.0,
                 seed: int = 0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        _check_phase_epochs(phases)
        _check_subnets_per_step(subnets_per_step)
        self.supernet = supernet
        self.space = supernet.space
        self.phases = dict(phases)
        self.subnets_per_step = dict(subnets_per_step)
        self.lr = lr
        self.weight_decay = weight_decay
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.seed = seed
        self.label_smoothing = label_smoothing
        self.dimensions = decision_dimensions(self.space)
        self.plan: ProgressivePlan | None = None
        self.current_stage = -1
        self.epochs = plan_epochs(self.space, self.phases)
        if self.epochs == 0:
            raise ProgressiveError(f"supernet.phases={self.phases} gives no training epoch for space {self.space.name!r}.")

    def step_archs(self, step: int) -> list[Arch]:
        """Return the subnets trained at ``step``: the largest first, then the sampled ones."""
        assert self.plan is not None, "step_archs needs the plan that configure_optimizers builds"
        stage = self.plan.stage_at(step)
        rng = np.random.default_rng([self.seed, step])
        if stage.phase == "full":
            return [self._draw(stage, rng)]
        return [self.space.largest()] + [self._draw(stage, rng) for _ in range(self.subnets_per_step[stage.phase])]

    def _draw(self, stage: ProgressiveStage, rng: np.random.Generator) -> Arch:
        values = {name: options[int(rng.integers(len(options)))] for name, options in stage.options.items()}
        return self.space.arch_from_choices(values)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        assert self.plan is not None
        stage = self.plan.stage_at(self.global_step)
        if stage.index == self.current_stage:
            return
        log.info("Progressive shrinking: %s phase, sub-stage %d (steps %d-%d), options %s", stage.phase, stage.index,
                 stage.start_step, stage.end_step - 1, _describe_options(stage.options, self.dimensions))
        if stage.expand_stage is not None:
            self._sort_channels(stage.expand_stage)
        self.current_stage = stage.index

    def _sort_channels(self, expand_stage: int) -> None:
        sort = getattr(self.supernet, "sort_expanded_channels", None)
        if not callable(sort):
            # Both built-in supernets sort their channels. A supernet of another family may lack the
            # method, and then the width phase trains the leading channels in their initial order.
            log.info("%s cannot sort its channels by importance; the width phase keeps their order.",
                     type(self.supernet).__name__)
            return
        sort(expand_stage)
        # The permutation moved the weights but not AdamW's moment estimates, so those restart.
        for optimizer in self.trainer.optimizers:
            optimizer.state.clear()

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        archs = self.step_archs(self.global_step)
        loss, _ = inplace_distillation_loss(
            self.supernet, x, y, archs, self.label_smoothing, self.kd_weight, self.temperature
        )
        self.supernet.set_active(self.space.largest())
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/stage", float(self.current_stage))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        max_epochs = self.trainer.max_epochs
        if max_epochs != self.epochs:
            raise ProgressiveError(
                f"The Trainer runs max_epochs={max_epochs}, but supernet.phases={self.phases} adds up to "
                f"{self.epochs} epochs for space {self.space.name!r}; pass max_epochs={self.epochs}."
            )
        steps_per_epoch = max(1, int(self.trainer.estimated_stepping_batches) // self.epochs)
        self.plan = build_plan(self.space, self.phases, steps_per_epoch)
        optimizer = torch.optim.AdamW(self.supernet.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        plan = self.plan

        def factor(step: int) -> float:
            stage = plan.stage_at(step)
            local = step - stage.start_step
            warmup = min(50, stage.steps // 10)
            if local < warmup:
                return (local + 1) / warmup
            progress = (local - warmup) / max(1, stage.steps - warmup)
            return 0.5 * (1.0 + float(np.cos(np.pi * min(1.0, progress))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["progressive_stage"] = self.current_stage

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resumed run must not sort again the channels of a sub-stage it has already started.
        self.current_stage = int(checkpoint.get("progressive_stage", -1))


def _describe_options(options: Mapping[str, list[Any]], dims: Mapping[str, str]) -> dict[str, Any]:
    """Return the options per decision, or per dimension (its distinct option lists) when there are many decisions."""
    if len(options) <= 12:
        return dict(options)
    out: dict[str, list[list[Any]]] = {}
    for name, values in options.items():
        distinct = out.setdefault(dims[name], [])
        if values not in distinct:
            distinct.append(values)
    return out


def _check_subnets_per_step(subnets_per_step: Mapping[str, int]) -> None:
    phases = list(PHASES[1:])
    if not isinstance(subnets_per_step, Mapping) or sorted(subnets_per_step) != sorted(phases):
        raise ProgressiveError(
            f"supernet.subnets_per_step must map exactly {phases} to subnet counts, but got {subnets_per_step!r}."
        )
    for phase, count in subnets_per_step.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ProgressiveError(f"supernet.subnets_per_step.{phase} must be an integer >= 1, but got {count!r}.")


def _check_keys(config: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(config) - set(allowed))
    missing = [key for key in allowed if key not in config]
    if unknown or missing:
        raise ProgressiveError(
            f"supernet config for schedule {config.get('schedule')!r} has unknown keys {unknown} and missing keys "
            f"{missing}; allowed keys are {list(allowed)} (see conf/supernet/{config.get('schedule')}.yaml)."
        )


def check_supernet_config(space: SearchSpace, config: Mapping[str, Any]) -> None:
    """Check a ``conf/supernet`` node against ``space`` without building anything, so a run can stop at start.

    Raises:
        ProgressiveError: on an unknown schedule, unknown or missing keys, sandwich epochs or random
            subnets that are not whole numbers (at least 1 and 0), invalid phases or subnets per
            step, decisions that progressive shrinking cannot classify, or phases that give no epoch.
    """
    schedule = config.get("schedule")
    if schedule not in SUPERNET_SCHEDULES:
        raise ProgressiveError(
            f"Unknown supernet.schedule={schedule!r}; available schedules are {list(SUPERNET_SCHEDULES)}."
        )
    _check_keys(config, _SANDWICH_KEYS if schedule == "sandwich" else _PROGRESSIVE_KEYS)
    if schedule == "sandwich":
        for key, least in (("epochs", 1), ("num_random", 0)):
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ProgressiveError(f"supernet.{key} must be a whole number >= {least}, but got {value!r}.")
    if schedule == "progressive":
        phases = dict(config["phases"])
        _check_phase_epochs(phases)
        _check_subnets_per_step(dict(config["subnets_per_step"]))
        decision_dimensions(space)
        if plan_epochs(space, phases) == 0:
            raise ProgressiveError(f"supernet.phases={phases} gives no training epoch for space {space.name!r}.")


def create_supernet_module(supernet: Supernet, config: Mapping[str, Any], seed: int) -> tuple[pl.LightningModule, int]:
    """Build the LightningModule of ``config["schedule"]`` from a ``conf/supernet`` node.

    Returns:
        The module and the number of epochs the Trainer must run.

    Raises:
        ProgressiveError: on an unknown schedule, or unknown or missing keys for the schedule.
    """
    check_supernet_config(supernet.space, config)
    schedule = config["schedule"]
    common = {key: config[key] for key in ("lr", "weight_decay", "kd_weight", "temperature", "label_smoothing")}
    if schedule == "sandwich":
        module = SupernetModule(supernet, num_random=config["num_random"], seed=seed, **common)
        return module, int(config["epochs"])

    progressive = ProgressiveShrinkingModule(
        supernet, phases=dict(config["phases"]), subnets_per_step=dict(config["subnets_per_step"]), seed=seed, **common
    )
    return progressive, progressive.epochs

