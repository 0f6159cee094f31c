"""Fine-tune a subnet that a study chose: ``python train.py`` (latest study, knee subnet).

The subnet is extracted from the study's supernet with its inherited weights, its BatchNorm
statistics are recalibrated, it is fine-tuned with Lightning, tested, and measured on the device.
Outputs in Hydra's run directory: ``subnet.pt`` (checkpoint), ``subnet.pt2`` (torch.export program)
and ``finetune.json``. ``subnet.pt`` and ``finetune.json`` are first written right after
fine-tuning, with ``"complete": false`` until every later stage has run.
"""

from __future__ import annotations

from nas.startup import exit_quietly_on_interrupt, restore_interrupt

if __name__ == "__main__":
    exit_quietly_on_interrupt()  # the imports below take seconds

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from nas.cli import (
    StageTimer,
    UsageError,
    check_group_settings,
    default_storage,
    import_user_modules,
    module_list,
    run_cli,
    to_container,
    warn_added_keys,
)
from nas.data import build_datamodule
from nas.export import FINETUNE_FORMAT_VERSION
from nas.report import atomic_write_text
from nas.search import (
    SearchError,
    check_budget,
    knee_index,
    latest_study_name,
    optuna_storage,
    pareto_trials,
    stored_measurements,
)
from nas.spaces import Arch, SearchSpace, create_space
from nas.supernet.cache import load_supernet
from nas.supernet.dynamic import recalibrate_batchnorm
from nas.tracking import create_tracker
from nas.training import (
    FinetuneModule,
    HoldInterruptUntilSaved,
    asks_for_several_processes,
    ddp_launch_problem,
    end_secondary_rank,
    fit_or_interrupt,
    model_accuracy,
    ranks_started_outside,
    resize_to_arch,
    run_test_or_interrupt,
    started_as_secondary_rank,
    trained_as_secondary_rank,
)

log = logging.getLogger("tailnas.train")

PICKS = ("knee", "most_accurate_under_budget", "most_accurate")
# Earlier name of pick=most_accurate_under_budget, still accepted.
PICK_ALIASES = {"fastest_under_budget": "most_accurate_under_budget"}
TEACHERS = ("none", "largest")


def load_study(cfg: DictConfig) -> optuna.Study:
    if not cfg.search.get("storage"):
        database = Path(cfg.paths.work_dir) / "studies.db"
        # Opening a missing SQLite file would create an empty one and then report no studies.
        if not database.is_file():
            raise SearchError(f"No TailNAS study found: no study database at {database}. Run `python search.py "
                              "+space=resnet` first, or set paths.work_dir to the work directory of the search "
                              "(or search.storage to its database URL).")
    storage = default_storage(cfg)
    name = cfg.search.study_name or latest_study_name(storage)
    names = optuna.get_all_study_names(storage=optuna_storage(storage))
    if name not in names:
        raise SearchError(f"search.study_name={name!r} not found in {storage}; studies there: {sorted(names)}.")
    study = optuna.load_study(study_name=name, storage=optuna_storage(storage))
    if "space" not in study.user_attrs:
        raise SearchError(f"Study {name!r} was not written by search.py (it has no recorded space).")
    log.info("Study %r from %s", name, storage)
    return study


def _latency(trial: optuna.trial.FrozenTrial, measured: dict[int, float]) -> float:
    return measured.get(trial.number, trial.user_attrs["predicted_latency_ms"])


def pick_trial(study: optuna.Study, cfg: DictConfig) -> optuna.trial.FrozenTrial:
    """Return the trial that ``trial=N`` or ``pick=...`` selects; latencies are the measured ones where known."""
    if cfg.trial is not None:
        front_numbers = [t.number for t in pareto_trials(study)]
        if isinstance(cfg.trial, bool) or not isinstance(cfg.trial, int):
            raise UsageError(f"trial must be a trial number of study {study.study_name!r}, but got {cfg.trial!r}; "
                             f"its Pareto trials are {front_numbers}.")
        matches = [t for t in study.trials if t.number == cfg.trial]
        if not matches or matches[0].state != optuna.trial.TrialState.COMPLETE:
            raise UsageError(f"trial={cfg.trial} is not a finished trial of study {study.study_name!r}; its Pareto "
                             f"trials are {front_numbers}.")
        if matches[0].user_attrs.get("accuracy_skipped"):
            raise UsageError(f"trial={cfg.trial} exceeded the latency budget, so its accuracy was never measured.")
        return matches[0]
    front = pareto_trials(study)
    if not front:
        raise SearchError(f"Study {study.study_name!r} has no feasible finished trial to pick from. Name a study "
                          "with a Pareto front with search.study_name=NAME (python -m nas.compare --all lists them).")
    measured = stored_measurements(study, front)
    pick = PICK_ALIASES.get(cfg.pick, cfg.pick)
    if pick != cfg.pick:
        log.info("pick=%s is the earlier name of pick=%s, which takes the most accurate Pareto subnet within the "
                 "budget.", cfg.pick, pick)
    if cfg.budget_ms is not None and pick != "most_accurate_under_budget":
        log.warning("budget_ms=%s applies only to pick=most_accurate_under_budget, so pick=%s ignores it.",
                    cfg.budget_ms, cfg.pick)
    if pick == "most_accurate":
        return max(front, key=lambda t: (t.values[0], -_latency(t, measured)))
    if pick == "knee":
        return front[knee_index([t.values[0] for t in front], [_latency(t, measured) for t in front])]
    budget = check_budget(cfg.budget_ms, "budget_ms")
    if budget is None:
        budget = study.user_attrs.get("latency_budget_ms")
    if budget is None:
        raise UsageError(f"pick={cfg.pick} needs budget_ms=<milliseconds> (the study has no latency budget).")
    within = [t for t in front if _latency(t, measured) <= budget]
    if not within:
        fastest = min(_latency(t, measured) for t in front)
        raise UsageError(f"No Pareto subnet runs within budget_ms={budget}; the fastest takes {fastest:.3f} ms.")
    # The front is built on predicted latency; measured latencies can reorder it, so rank by accuracy.
    return max(within, key=lambda t: (t.values[0], -_latency(t, measured)))


def describe_pick(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """Return one line on ``trial``: its accuracy and the latency that :func:`pick_trial` ranks it by.

    That latency is the measured one where the study stores a measurement, else the predicted one.
    """
    predicted = trial.user_attrs["predicted_latency_ms"]
    measured = stored_measurements(study, [trial]).get(trial.number)
    latency = (f"predicted {predicted:.3f} ms" if measured is None
               else f"measured {measured:.3f} ms (predicted {predicted:.3f} ms)")
    return f"trial {trial.number}: accuracy {100 * trial.values[0]:.2f}%, {latency}"


def interrupted_message(run_dir: Path | None = None) -> str:
    """Say what an interrupted train.py run kept in ``run_dir`` (default: Hydra's run folder)."""
    run_dir = Path(HydraConfig.get().runtime.output_dir) if run_dir is None else run_dir
    if (run_dir / "subnet.pt").is_file():
        return (f"Interrupted. The fine-tuned network is in {run_dir / 'subnet.pt'} (finetune.json has \"complete\": "
                "false); the comparison, checks or measurement that were running are lost.")
    return (f"Interrupted before the fine-tuned network was saved, so {run_dir} holds no network; run the command "
            "again to fine-tune from the start.")


# DDP strategies of Lightning that have a variant with find_unused_parameters=True.
DDP_STRATEGIES = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def gated_strategy(trainer_cfg: DictConfig) -> Any:
    """Return the Lightning strategy for fine-tuning a gated network under ``finetune.trainer`` settings.

    A gated network leaves the parameters of skipped work without gradients in some steps, which
    DDP rejects unless it looks for unused parameters. So ``ddp`` and its variants, and ``auto``
    on several devices (where Lightning would choose ``ddp``), become their ``find_unused_parameters_true`` form.
    """
    strategy = trainer_cfg.strategy
    if strategy == "auto" and asks_for_several_processes(trainer_cfg):
        strategy = "ddp"
    if strategy in DDP_STRATEGIES:
        log.info("A gated network leaves parameters unused in the steps where its gates skip their work, so DDP "
                 "runs with find_unused_parameters. PyTorch warns when the first steps, near keep ratio 1, use all.")
        return f"{strategy}_find_unused_parameters_true"
    return strategy


def finetune(model: torch.nn.Module, datamodule: Any, cfg: DictConfig, tracker: Any, tag: str,
             teacher: torch.nn.Module | None = None, kd_weight: float = 0.0, callbacks: list | None = None,
             lr: float | None = None, full_keep_weight: float = 0.0) -> float:
    """Fine-tune ``model`` with Lightning and return its test accuracy in [0, 1]."""
    import lightning.pytorch as pl

    ft = cfg.finetune
    pl.seed_everything(cfg.seed, workers=True)
    module = FinetuneModule(model, lr=ft.lr if lr is None else lr, weight_decay=ft.weight_decay,
                            label_smoothing=ft.label_smoothing, teacher=teacher, kd_weight=kd_weight,
                            temperature=ft.temperature, full_keep_weight=full_keep_weight)
    strategy = gated_strategy(ft.trainer) if hasattr(model, "set_keep_ratio") else ft.trainer.strategy
    trainer = pl.Trainer(
        max_epochs=ft.epochs, accelerator=ft.trainer.accelerator, devices=ft.trainer.devices,
        strategy=strategy, precision=ft.trainer.precision, logger=tracker.lightning_logger(tag),
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks or [],
        default_root_dir=str(Path(HydraConfig.get().runtime.output_dir) / tag),
    )
    distilled = f", distilling with weight {kd_weight:g}" if teacher is not None and kd_weight > 0 else ""
    log.info("Fine-tuning (%s) for %d epoch%s%s", tag, ft.epochs, "" if ft.epochs == 1 else "s", distilled)
    with warnings.catch_warnings():
        if teacher is not None:
            # The distillation teacher stays in eval mode on purpose; Lightning would warn about its modules.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        fit_or_interrupt(trainer, module, train_dataloaders=datamodule.train_dataloader(),
                         val_dataloaders=datamodule.val_dataloader())
    if trainer.world_size > 1:
        # Lightning's distributed sampler pads the ranks' shares with repeated images, so every rank
        # tests the whole split itself.
        accuracy = model_accuracy(module.model, datamodule.test_dataloader())
    else:
        results = run_test_or_interrupt(trainer, module, dataloaders=datamodule.test_dataloader(), verbose=False)
        # Lightning logs the metric in float32; six decimals keep the figure without its noise.
        accuracy = round(float(results[0]["test/accuracy"]), 6)
    log.info("Test accuracy (%s): %.2f%%", tag, 100 * accuracy)
    return accuracy


def check_recorded_data(data_config: dict[str, Any], study_name: str) -> None:
    """Raise UsageError when the data folder that the study recorded is gone, with how to fix that."""
    root = data_config.get("root")
    if root in (None, "", "???") or Path(root).expanduser().is_dir():
        return
    raise UsageError(f"Study {study_name!r} was searched on data.root={root!r}, which does not exist or is not a "
                     "folder now. train.py takes the data from the study, so put the data back at that path (a "
                     "symlink will do), or run search.py again with data.root set to where the data is now.")


def load_data(data_config: dict[str, Any], space: SearchSpace, arch: Arch) -> Any:
    """Build and set up the study's data module, with every batch resized to the resolution of ``arch``."""
    datamodule = build_datamodule(data_config)
    datamodule.setup()
    datamodule.log_summary()
    # The search scored the subnet at its own resolution, so every batch is resized to it here too.
    _, height, width = space.input_shape(arch)
    datamodule.resize_inputs(height, width)
    if datamodule.input_size is not None:
        log.info("Inputs resized from %dx%d to the subnet's %dx%d for calibration, fine-tuning and tests",
                 datamodule.resolution, datamodule.resolution, height, width)
    return datamodule


def extract_subnet(supernet: Any, arch: Arch, datamodule: Any, images: int) -> torch.nn.Module:
    """Extract ``arch`` with its inherited weights and recalibrate its BatchNorm statistics."""
    model = supernet.extract(arch)
    loader = datamodule.train_dataloader()
    batches = max(1, images // loader.batch_size)
    recalibrate_batchnorm(model, iter(loader), max_batches=batches)
    return model


def distillation_teacher(supernet: Any, datamodule: Any, images: int, teacher: str) -> torch.nn.Module | None:
    """Return the frozen teacher that ``finetune.teacher`` names (``largest``), or None for ``none``."""
    if teacher == "none":
        return None
    return extract_subnet(supernet, supernet.space.largest(), datamodule, images).eval()


def timing_images(datamodule: Any, count: int) -> torch.Tensor | None:
    """Return ``count`` validation images (test images without a validation split), repeated when
    there are fewer, or None when neither split has any."""
    for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        batches, total = [], 0
        for x, _ in loader:
            batches.append(x)
            total += len(x)
            if total >= count:
                break
        if total:
            images = torch.cat(batches)
            return images.repeat(-(-count // total), *([1] * (images.dim() - 1)))[:count]
    return None


def measure(model: torch.nn.Module, space: SearchSpace, arch: Arch, hardware: dict[str, Any],
            datamodule: Any = None) -> float:
    """Return the median latency (ms) of ``model`` with BatchNorm folded, on images of ``datamodule``
    (see :func:`timing_images`) if given, else on random input."""
    from predictors import MeasurementProtocol, measure_module
    from predictors.profiling import fold_batchnorm_checked

    protocol = MeasurementProtocol.from_config(hardware)
    images = timing_images(datamodule, protocol.batch_size) if datamodule is not None else None
    if images is not None:
        images = resize_to_arch(images, space, arch)
    input_shape = space.input_shape(arch)
    # Timed as search.py's re-measurement times subnets: BatchNorm folded into the convolutions.
    deployed = fold_batchnorm_checked(model.cpu().eval(), input_shape)
    return measure_module(deployed, input_shape, protocol, inputs=images).median_ms


def at_calibrated_ratios(network: Any, gate_config: Any, evaluate: Callable[[], Any]) -> list[tuple[float, Any]]:
    """Return ``(ratio, evaluate())`` at each keep ratio of ``network``'s calibration grid, then restore its ratio.

    The grid's ratios are those with BatchNorm statistics of their own.
    """
    from nas.gates import calibration_ratios

    original = network.keep_ratio
    results = []
    try:
        for ratio in calibration_ratios(gate_config):
            network.set_keep_ratio(ratio)
            results.append((ratio, evaluate()))
    finally:
        network.set_keep_ratio(original)
    return results


def ratio_key(ratio: float) -> str:
    """Return a keep ratio as finetune.json's keys spell it: "1" for 1.0, "0.4" for 0.4."""
    return f"{ratio:g}"


def keep_ratio_accuracy(network: Any, gate_config: Any, datamodule: Any) -> list[dict[str, float]]:
    """Return the validation and test accuracy of ``network`` at each keep ratio of its calibration grid.

    Pick a deployed ratio on the validation figures; the test figures are for reporting.
    """
    def accuracies() -> tuple[float, float]:
        return (model_accuracy(network, datamodule.val_dataloader()),
                model_accuracy(network, datamodule.test_dataloader()))

    rows = [{"keep_ratio": ratio, "val_accuracy": val, "test_accuracy": test}
            for ratio, (val, test) in at_calibrated_ratios(network, gate_config, accuracies)]
    log.info("gates: accuracy per keep ratio (validation / test): %s",
             ", ".join(f"{r['keep_ratio']:g}: {100 * r['val_accuracy']:.2f}% / {100 * r['test_accuracy']:.2f}%"
                       for r in rows))
    return rows


def keep_ratio_latency(network: Any, gate_config: Any, space: SearchSpace, arch: Arch, hardware: dict[str, Any],
                       datamodule: Any) -> dict[str, float]:
    """Return the measured latency (ms) of ``network`` at each keep ratio of its calibration grid, by ratio.

    Each ratio is timed as ``measured_latency_ms`` is (:func:`measure`).
    """
    timed = at_calibrated_ratios(network, gate_config, lambda: measure(network, space, arch, hardware, datamodule))
    return {ratio_key(ratio): ms for ratio, ms in timed}


# Share by which the gated network at keep ratio 1.0 may measure apart from the ungated subnet before
# the batch-1 comparison is called noisy. The two compute the same convolutions, and the lean
# channel path ran 2% to 8% faster in the runs of docs/benchmarks.md.
KEEP_ALL_SPREAD = 0.10


def keep_all_spread_warning(result: dict[str, Any]) -> str | None:
    """Return a warning when the keep-1.0 and ungated timings in ``result`` differ by more than KEEP_ALL_SPREAD.

    At keep ratio 1.0 no gate drops anything, so a large difference points to timing noise in the run.
    Returns None when it is within KEEP_ALL_SPREAD or ``result`` lacks either timing.
    """
    keep_all = (result.get("keep_ratio_latency_ms") or {}).get(ratio_key(1.0))
    ungated = result.get("ungated_latency_ms")
    if keep_all is None or not ungated:
        return None
    spread = abs(keep_all - ungated) / ungated
    if spread <= KEEP_ALL_SPREAD:
        return None
    return (f"gates: at keep ratio 1, where no gate drops anything, the gated network measured {keep_all:.3f} ms "
            f"and the ungated subnet {ungated:.3f} ms, {100 * spread:.0f}% apart. Differences of that size between "
            "this run's latencies can come from timing noise alone. Time again on a quiet machine, or with more "
            "hardware.warmup and hardware.repeats.")


def over_budget_advice(result: dict[str, Any], budget_ms: float) -> str:
    """Return what to do when a gated network measured over ``budget_ms``, from the ratios timed in ``result``.

    ``result`` contains ``keep_ratio_latency_ms`` and ``keep_ratio_accuracy`` as train.py writes them.
    The advice names the calibrated keep ratio with the best validation accuracy among those that
    measured within the budget, or states that none did.
    """
    latency = result.get("keep_ratio_latency_ms") or {}
    accuracy = {ratio_key(row["keep_ratio"]): row["val_accuracy"] for row in result.get("keep_ratio_accuracy") or []}
    within = [ratio for ratio, ms in latency.items() if ms <= budget_ms]
    if within:
        best = max(within, key=lambda ratio: (accuracy.get(ratio, -1.0), float(ratio)))
        accuracy_note = f", validation accuracy {100 * accuracy[best]:.2f}%" if best in accuracy else ""
        return (f"Keep ratio {best} measured {latency[best]:.3f} ms{accuracy_note}, within the budget: deploy it with "
                f"model.set_keep_ratio({best}) (keep_ratio_latency_ms in finetune.json lists every ratio), or lower "
                "the budget slightly for a margin.")
    if latency:
        fastest = min(latency, key=latency.__getitem__)
        return (f"No calibrated keep ratio measured within it (the fastest, {fastest}, measured "
                f"{latency[fastest]:.3f} ms): raise the budget or pick a smaller subnet.")
    return "Lower the budget slightly for a margin, or pick a lower keep ratio with set_keep_ratio."


def check_gate_batches(gated: Any, ungated: torch.nn.Module, space: SearchSpace, arch: Arch, datamodule: Any,
                       hardware: dict[str, Any]) -> list[dict[str, Any]]:
    """Time the gated network against ``ungated`` at the larger batch sizes of ``gates.measure_batch_sizes``.

    Every ratio of the calibration grid and the deployed keep ratio is timed on validation images
    (:func:`nas.gates.measure_batch_slowdown`). A ratio that runs more than ``gates.max_slowdown``
    slower than ungated is logged as a warning. Returns the records for ``finetune.json``.
    """
    import dataclasses

    from nas.gates import calibration_ratios, measure_batch_slowdown
    from predictors import MeasurementProtocol

    sizes = sorted(gated.config.measure_batch_sizes)[1:]
    if not sizes:
        return []
    protocol = MeasurementProtocol.from_config(hardware)
    # A pass at batch 32 does 32 times the work of one at batch 1, so fewer passes give a stable median.
    protocol = dataclasses.replace(protocol, warmup=min(protocol.warmup, 5), repeats=max(5, protocol.repeats // 3))
    images = timing_images(datamodule, max(sizes))
    if images is not None:
        images = resize_to_arch(images, space, arch)
    ratios = sorted(set(calibration_ratios(gated.config)) | {gated.keep_ratio})
    records = measure_batch_slowdown(gated.cpu(), ungated.cpu(), tuple(space.input_shape(arch)), images, ratios,
                                     protocol)
    for record in records:
        worst, bound = record["worst_slowdown"], record["max_slowdown"]
        noise = record["timing_noise"]
        times = {r: round(ms, 3) for r, ms in record["gated_ms"].items()}
        if worst > bound and (record["worst_ratio"] >= 1.0 or worst - bound <= noise):
            # At keep 1.0 no gate drops anything, and this machine's timing cannot resolve an excess within its noise.
            log.warning("gates: at batch %d the gated network ran %.1f%% slower than ungated at keep ratio %.2f "
                        "(gates.max_slowdown %.0f%%), but this machine's timing noise reached %.1f%% in the same "
                        "check (two timings of the ungated subnet, and the gated network at keep 1.0, where no "
                        "gate drops anything, against ungated), so noise can explain it. Rerun the check on a "
                        "quiet machine before acting: %s", record["batch_size"], 100 * worst, record["worst_ratio"],
                        100 * bound, 100 * noise, times)
        elif worst > bound:
            within = [r for r, ms in record["gated_ms"].items() if ms / record["ungated_ms"] - 1.0 <= bound]
            log.warning("gates: at batch %d the gated network ran %.1f%% slower than ungated (%.3f ms) at keep ratio "
                        "%.2f (gates.max_slowdown %.0f%%). Within the bound: keep ratios %s. Deploy at one of them "
                        "(load_finetuned(path).set_keep_ratio(R)), or lower gates.max_slowdown and fine-tune again "
                        "to drop the costliest gates. ms per keep ratio: %s", record["batch_size"], 100 * worst,
                        record["ungated_ms"], record["worst_ratio"], 100 * bound, within or "none", times)
        else:
            log.info("gates: at batch %d every keep ratio ran within %.0f%% of ungated (worst %+.1f%% at %.2f)",
                     record["batch_size"], 100 * bound, 100 * worst, record["worst_ratio"])
    return [{**r, "gated_ms": {ratio_key(ratio): ms for ratio, ms in r["gated_ms"].items()}} for r in records]


def save_checkpoint(run_dir: Path, model: torch.nn.Module, space: SearchSpace, arch: Arch,
                    result: dict[str, Any], imports: list[str] | None = None) -> None:
    """Write ``subnet.pt`` and ``finetune.json`` (``complete`` false until every stage has run).

    It runs right after fine-tuning too, so stopping a later stage keeps the fine-tuned network.
    The model stays on its device. ``imports`` (the study's user modules) is recorded so that
    :func:`nas.export.load_finetuned` can name them when the space's family is not registered.
    """
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    payload = {"format_version": FINETUNE_FORMAT_VERSION, "space": space.raw_config, "arch": arch.to_dict(),
               "gates": result.get("gates"), "imports": module_list(imports), "input": result.get("input"),
               "state_dict": state}
    tmp = run_dir / ".subnet.pt.tmp"
    torch.save(payload, tmp)
    tmp.replace(run_dir / "subnet.pt")
    atomic_write_text(run_dir / "finetune.json", json.dumps(result, indent=2) + "\n")


def save_outputs(run_dir: Path, model: torch.nn.Module, space: SearchSpace, arch: Arch, result: dict[str, Any]) -> None:
    """Write the torch.export programs, ``subnet.onnx`` for the onnxruntime runtime, and the final ``finetune.json``.

    ``subnet.pt`` was written by :func:`save_checkpoint` after fine-tuning, and the later stages
    leave the network's state as it was.
    """
    from nas.export import export_onnx, export_program
    from predictors.profiling import fold_batchnorm_checked

    # The programs run the network as it was timed: with BatchNorm folded into the convolutions.
    shape = tuple(space.input_shape(arch))
    deployed = fold_batchnorm_checked(model.cpu().eval(), shape)
    example = torch.randn(1, *shape)
    export_program(deployed, example, run_dir / "subnet.pt2")
    if result.get("gates") is not None:
        # A dynamic batch is traced on the masked path, which computes every channel. Only a program
        # traced at a static batch of 1 skips what the gates drop.
        export_program(deployed, example, run_dir / "subnet_b1.pt2", dynamic_batch=False)
    hardware = result.get("hardware") or {}
    if hardware.get("runtime") == "onnxruntime":
        # The file that was timed: the TorchScript exporter at the timing batch size, as the runtime exports it.
        batch = torch.randn(int(hardware.get("batch_size") or 1), *shape)
        export_onnx(deployed, batch, run_dir / "subnet.onnx", dynamic_batch=False, dynamo=False)
    atomic_write_text(run_dir / "finetune.json", json.dumps({**result, "complete": True}, indent=2) + "\n")


def write_train_manifest(run_dir: Path, cfg: DictConfig, study_name: str, trial: int, record: dict[str, Any]) -> None:
    """Write ``manifest.json``: package versions, git commit and device of this run, and the search run it comes from."""
    from nas.report import write_manifest
    from predictors import MeasurementProtocol, device_fingerprint

    fingerprint = device_fingerprint(MeasurementProtocol.from_config(to_container(cfg.hardware)))
    write_manifest(run_dir / "manifest.json", to_container(cfg), fingerprint, cfg.seed,
                   {"study_name": study_name, "trial": trial, "search_run_dir": record.get("run_dir")})


def gate_subnet(model: torch.nn.Module, space: SearchSpace, arch: Arch, cfg: DictConfig) -> tuple[Any, Any]:
    """Wrap ``model`` with the gates that ``gates=...`` selects; returns (gated network, gate config).

    The device's layer profiles (if this device was profiled) set the channel steps with
    ``gates.placement=table``. With ``gates.latency_budget_ms``, the blocks that placement gated
    are timed with gates at each kept count (runs the profile store lacks, stored for later runs
    too), and the gated-block latency model fitted on the store picks the keep ratio.
    """
    from nas.gates import apply_gates, parse_gate_config
    from predictors import MeasurementProtocol, ProfileStore, device_fingerprint

    if started_as_secondary_rank():
        return _gates_of_rank_zero(model, space, arch)
    config = parse_gate_config(to_container(cfg.gates))
    protocol = MeasurementProtocol.from_config(to_container(cfg.hardware))
    store_root = Path(cfg.paths.work_dir) / "profiles"
    table = None
    if store_root.is_dir():
        table = ProfileStore(store_root, device_fingerprint(protocol)).layer_table(protocol.batch_size) or None
    if table is None and config.enabled and config.placement == "table":
        log.warning("No layer profiles of this device in %s; gates snap to multiples of 8 channels.", store_root)
    block_latency = None
    if config.enabled and config.latency_budget_ms is not None:
        from predictors.gated import fit_for_model

        store = ProfileStore(store_root, device_fingerprint(protocol))

        def block_latency(model: torch.nn.Module, input_shape: Any, names: list[str]) -> Any:
            # It times the gated blocks that the store lacks, so it waits for other profiling runs.
            with store.profiling_lock():
                return fit_for_model(model, input_shape, store, protocol, names=names)

    gated = apply_gates(model, config, profile_table=table, input_shape=space.input_shape(arch), protocol=protocol,
                        block_latency=block_latency)
    if asks_for_several_processes(cfg.finetune.trainer):
        # DDP ranks that Lightning starts run this script again. They build rank 0's gates from this
        # file, because a placement timed in each rank could differ.
        plan_path = Path(HydraConfig.get().runtime.output_dir) / "gate_plan.json"
        atomic_write_text(plan_path, json.dumps(gated.describe()) + "\n")
        os.environ[GATE_PLAN_ENV] = str(plan_path)
    # With a latency budget, the network's config carries the keep ratio the budget chose.
    return gated, gated.config


def finetune_gated(teacher: torch.nn.Module, space: SearchSpace, arch: Arch, datamodule: Any, cfg: DictConfig,
                   tracker: Any, tag: str, hold: HoldInterruptUntilSaved) -> tuple[Any, Any, dict[str, Any]]:
    """Gate ``teacher`` (the ungated subnet) and fine-tune the gated copy, distilling from ``teacher``.

    Returns the gated network, its gate config and the entries of ``finetune.json`` it sets.
    """
    from lightning.pytorch import seed_everything

    from nas.gates import BatchNormCalibration, KeepRatioSchedule

    if cfg.finetune.teacher != "none":
        log.warning("finetune.teacher=%s does not apply with gates=feature: the gated network distils from the "
                    "ungated subnet, with weight gates.kd_weight (%s).", cfg.finetune.teacher, cfg.gates.get("kd_weight"))
    # The gates' own layers draw their initial weights from torch's global generator.
    seed_everything(cfg.seed, workers=True)
    model, gate_config = gate_subnet(teacher, space, arch, cfg)
    ramps = gate_config.keep_ratio < gate_config.keep_ratio_range[1]
    if ramps and gate_config.schedule_epochs >= cfg.finetune.epochs:
        log.warning("gates.schedule_epochs=%d is not below finetune.epochs=%d, so the keep ratio reaches %.2f only "
                    "when training ends and the network is never trained there; expect a low test accuracy. Set "
                    "finetune.epochs above gates.schedule_epochs (benchmarks/gates.py fine-tunes 8 epochs with a "
                    "2-epoch ramp).", gate_config.schedule_epochs, cfg.finetune.epochs, gate_config.keep_ratio)
    # Per-keep-ratio BatchNorm statistics are estimated after training and before the test.
    callbacks = [KeepRatioSchedule.from_config(gate_config),
                 BatchNormCalibration(images=cfg.finetune.calibration_images)]
    # From scratch, the ungated subnet is as untrained as the gated one, so it teaches nothing.
    kd_weight = 0.0 if cfg.from_scratch else gate_config.kd_weight
    accuracy = finetune(model, datamodule, cfg, tracker, tag, teacher=None if cfg.from_scratch else teacher,
                        kd_weight=kd_weight, callbacks=[hold, *callbacks], full_keep_weight=gate_config.full_keep_weight,
                        lr=None if cfg.from_scratch else cfg.finetune.inherited_lr)
    return model, gate_config, {
        "test_accuracy": accuracy, "gates": model.describe(),
        "teacher": {"name": "none" if cfg.from_scratch else "ungated subnet", "kd_weight": kd_weight}}


GATE_PLAN_ENV = "TAILNAS_GATE_PLAN"


def _gates_of_rank_zero(model: torch.nn.Module, space: SearchSpace, arch: Arch) -> tuple[Any, Any]:
    from nas.gates import apply_gates

    plan_path = os.environ.get(GATE_PLAN_ENV)
    if not plan_path:
        raise UsageError("gates=feature in a DDP rank other than 0 needs rank 0's gate placement, which the ranks "
                         "that Lightning starts read from gate_plan.json. This rank has none, so Lightning did not "
                         "start it. Start train.py once and let Lightning start the ranks "
                         "(finetune.trainer.strategy=ddp finetune.trainer.devices=N), or fine-tune the gated "
                         "network on one device.")
    record = json.loads(Path(plan_path).read_text())
    gated = apply_gates(model, record["config"], input_shape=space.input_shape(arch), plan=record)
    return gated, gated.config


# Settings that train.py reads from the study record, never from its own config.
STUDY_KEYS = ("space", "data", "supernet", "predictor", "imports")


def hardware_chosen(overrides: list[str]) -> bool:
    """Return whether the command line ``overrides`` set the ``hardware`` group or a ``hardware.*`` key."""
    return any(_override_key(o).split(".")[0] == "hardware" for o in overrides)


def _override_key(override: str) -> str:
    return override.lstrip("+~").split("=")[0]


def measurement_hardware(cfg: DictConfig, recorded: dict[str, Any] | None, overrides: list[str]) -> dict[str, Any]:
    """Return the ``hardware.*`` settings to time the fine-tuned network with, checked.

    These are the study's own settings, so that the latency compares with the search's. Keys set
    on the command line (``overrides``, such as ``hardware.repeats=50``) replace the study's values.
    A ``hardware=NAME`` group there replaces all of them. A timing setting that then differs from
    the study's gets a warning.
    """
    from predictors import MeasurementProtocol
    from predictors.protocol import TIMING_KEYS, DeviceUnavailableError

    own = to_container(cfg.hardware)
    deleted = [o for o in overrides if o.startswith("~hardware")]
    if deleted:
        raise UsageError(f"{deleted[0]} is not supported: train.py times with the study's hardware settings. Set the "
                         "value instead (hardware.KEY=VALUE), or choose a group (hardware=cpu).")
    if recorded is None or any(_override_key(o) == "hardware" for o in overrides):
        chosen = own
    else:
        keys = {_override_key(o).split(".", 1)[1] for o in overrides if _override_key(o).startswith("hardware.")}
        chosen = {**recorded, **{key: own[key] for key in keys if key in own}}
    differ = {k: (recorded.get(k), chosen.get(k)) for k in TIMING_KEYS if recorded and recorded.get(k) != chosen.get(k)}
    if differ:
        log.warning("Timing with hardware settings other than the study's (%s), so the latencies do not compare "
                    "with its Pareto front.", ", ".join(f"{k}: {a!r} in the study, {b!r} now" for k, (a, b) in differ.items()))
    elif recorded is not None:
        log.info("Timing with the study's hardware settings (%s); set hardware.* to time otherwise.",
                 ", ".join(f"{k}={chosen.get(k)!r}" for k in TIMING_KEYS))
    try:
        MeasurementProtocol.from_config(chosen)
    except DeviceUnavailableError as err:
        if chosen is own:
            raise
        raise UsageError(f"The study timed latency on device {chosen.get('device')!r}, which this machine cannot "
                         f"use ({err}). Pass hardware=cpu (or other hardware.* settings) to time on this machine; "
                         "the latencies then do not compare with the study's.") from err
    return dict(chosen)


def check_settings(cfg: DictConfig) -> None:
    """Raise UsageError for settings train.py cannot run with, before it loads anything."""
    recorded = [key for key in STUDY_KEYS if key in cfg]
    if recorded:
        raise UsageError(f"train.py takes {', '.join(recorded)} from the study, so the command line cannot set "
                         f"{'it' if len(recorded) == 1 else 'them'}: drop the +{recorded[0]}... settings. To "
                         "fine-tune with other settings, run search.py with them first.")
    if cfg.trial is None and cfg.pick not in PICKS and cfg.pick not in PICK_ALIASES:
        raise UsageError(f"Unknown pick={cfg.pick!r}; choose one of {list(PICKS)} or set trial=N.")
    epochs = cfg.finetune.epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UsageError(f"finetune.epochs must be a whole number of epochs >= 1, but got {epochs!r}.")
    if cfg.gates.get("name", "none") == "none" and set(cfg.gates) - {"name"}:
        keys = ", ".join(f"gates.{key}" for key in sorted(set(cfg.gates) - {"name"}))
        raise UsageError(f"{keys} set, but gates=none, which fine-tunes without gates. Add gates=feature to "
                         "fine-tune with dynamic gates, or drop those settings.")
    if cfg.finetune.teacher not in TEACHERS:
        raise UsageError(f"Unknown finetune.teacher={cfg.finetune.teacher!r}; choose one of {list(TEACHERS)}.")
    launch_problem = ddp_launch_problem(cfg.finetune.trainer, "finetune.trainer")
    if launch_problem:
        raise UsageError(launch_problem)
    if (cfg.gates.get("name", "none") != "none" and ranks_started_outside(cfg.finetune.trainer)
            and not os.environ.get(GATE_PLAN_ENV)):
        # Checked in every rank before any work, so that no rank waits for the others in vain.
        raise UsageError("gates=feature with DDP ranks that torchrun or SLURM started: each rank would time a gate "
                         "placement of its own, and the ranks could train different networks. Start train.py once "
                         "and let Lightning start the ranks (finetune.trainer.strategy=ddp "
                         "finetune.trainer.devices=N), or fine-tune the gated network on one device.")


def run(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    timer = StageTimer()
    check_settings(cfg)
    # The hardware is checked before training, so a missing device cannot fail the run at its last stage.
    # Hardware chosen on the command line is checked before anything else.
    overrides = list(HydraConfig.get().overrides.task)
    if hardware_chosen(overrides):
        from predictors import MeasurementProtocol

        MeasurementProtocol.from_config(to_container(cfg.hardware))
    study = load_study(cfg)
    trial = pick_trial(study, cfg)
    record = study.user_attrs
    check_recorded_data(record["data"], study.study_name)
    cfg.hardware = measurement_hardware(cfg, record.get("hardware"), overrides)
    import_user_modules(record.get("imports"))
    space = create_space(record["space"])
    arch = space.arch_from_dict(trial.user_attrs["arch"])
    log.info("Picked %s, arch %s", describe_pick(study, trial), arch.to_json())
    # DDP ranks other than 0 log nothing: Lightning logs their training through rank 0.
    logger_cfg = {"name": "none"} if started_as_secondary_rank() else to_container(cfg.logger)
    tracker = create_tracker(logger_cfg, {**to_container(cfg), "study": study.study_name, "trial": trial.number},
                             "train", str(run_dir), default_group=study.study_name)

    with timer.stage("data"):
        datamodule = load_data(record["data"], space, arch)

    result: dict[str, Any] = {"format_version": FINETUNE_FORMAT_VERSION, "study": study.study_name,
                              "trial": trial.number, "arch": arch.to_dict(), "search_accuracy": trial.values[0],
                              "hardware": to_container(cfg.hardware), "input": datamodule.input_description(),
                              "test_images": len(datamodule.test_set)}
    gates_on = cfg.gates.get("name", "none") != "none"
    # A Ctrl-C after the last epoch waits until subnet.pt is written.
    with HoldInterruptUntilSaved() as hold:
        with timer.stage("finetune"):
            if cfg.from_scratch:
                model = space.build_supernet().build_static(arch)
            else:
                supernet, _ = load_supernet(Path(record["supernet_checkpoint"]), space)
                model = extract_subnet(supernet, arch, datamodule, cfg.finetune.calibration_images)
            tag = "scratch" if cfg.from_scratch else "inherited"
            if gates_on:
                teacher = model
                model, gate_config, entries = finetune_gated(teacher, space, arch, datamodule, cfg, tracker, tag, hold)
                result.update(entries)
            elif cfg.from_scratch:
                result["teacher"] = {"name": "none", "kd_weight": 0.0}
                result["test_accuracy"] = finetune(model, datamodule, cfg, tracker, tag, callbacks=[hold])
            else:
                ft = cfg.finetune
                teacher = distillation_teacher(supernet, datamodule, ft.calibration_images, ft.teacher)
                kd_weight = ft.kd_weight if teacher is not None else 0.0
                result["teacher"] = {"name": ft.teacher, "kd_weight": kd_weight}
                result["test_accuracy"] = finetune(model, datamodule, cfg, tracker, tag, teacher=teacher,
                                                   kd_weight=kd_weight, lr=ft.inherited_lr, callbacks=[hold])
        # The ranks that Lightning started have their copy of the environment, gate plan included.
        os.environ.pop(GATE_PLAN_ENV, None)
        result["from_scratch"] = bool(cfg.from_scratch)
        secondary = trained_as_secondary_rank()
        if not secondary:
            save_checkpoint(run_dir, model, space, arch, {**result, "complete": False}, record.get("imports"))
            follows = ("stopping, as Ctrl-C was pressed" if hold.pressed
                       else "the comparison, checks and measurement follow")
            log.info("Saved the fine-tuned network to %s; %s.", run_dir / "subnet.pt", follows)
    if secondary and hold.pressed:
        end_secondary_rank("training", "saves the fine-tuned network and stops the run")
        return

    if cfg.from_scratch:
        result["scratch_test_accuracy"] = result["test_accuracy"]
    elif cfg.compare_scratch:
        with timer.stage("scratch"):
            scratch = space.build_supernet().build_static(arch)
            result["scratch_test_accuracy"] = finetune(scratch, datamodule, cfg, tracker, "scratch")
    else:
        result["scratch_test_accuracy"] = None
    if secondary:
        end_secondary_rank("training", "checks, measures and writes the results")
        return

    if gates_on and model.gated_blocks():
        with timer.stage("gates_keep_ratios"):
            result["keep_ratio_accuracy"] = keep_ratio_accuracy(model, gate_config, datamodule)
    if gates_on and gate_config.batch_check and model.gated_blocks():
        with timer.stage("gates_batch_check"):
            result["gates_batch_slowdown"] = check_gate_batches(model, teacher, space, arch, datamodule,
                                                                to_container(cfg.hardware))

    with timer.stage("measure"):
        # A gated network's work at batches above 1 depends on the images, so it is timed on real ones.
        result["measured_latency_ms"] = measure(model, space, arch, to_container(cfg.hardware),
                                                datamodule if gates_on else None)
        if gates_on:
            # The ungated subnet on the same images, so that the run shows what the gates saved.
            result["ungated_latency_ms"] = measure(teacher, space, arch, to_container(cfg.hardware), datamodule)
        if gates_on and model.gated_blocks():
            # The latency at every calibrated ratio, beside keep_ratio_accuracy, for choosing one to deploy.
            result["keep_ratio_latency_ms"] = keep_ratio_latency(model, gate_config, space, arch,
                                                                 to_container(cfg.hardware), datamodule)
            noisy = keep_all_spread_warning(result)
            if noisy:
                log.warning(noisy)
    budget = gate_config.latency_budget_ms if gates_on else None
    if budget is not None:
        result["latency_budget_ms"] = budget
        if result["measured_latency_ms"] > budget:
            log.warning("gates: the fine-tuned network measured %.3f ms, over gates.latency_budget_ms=%s. The "
                        "budget check before fine-tuning measured it within, but a second measurement on a busy "
                        "machine can differ by a few percent, and at batch sizes above 1 the trained gates on "
                        "real images select wider unions than the untrained gates did on random input. %s",
                        result["measured_latency_ms"], budget, over_budget_advice(result, budget))
    result["stage_seconds"] = {k: round(v, 2) for k, v in timer.seconds.items()}
    save_outputs(run_dir, model, space, arch, result)
    write_train_manifest(run_dir, cfg, study.study_name, trial.number, record)
    summary = {k: v for k, v in result.items() if isinstance(v, (int, float))}
    if gates_on:
        # Training logs each step's sampled ratio under this key; the summary keeps the deployed one.
        summary["gates/keep_ratio"] = model.keep_ratio
    tracker.summary(summary)
    tracker.finish()

    trained = "trained from scratch" if cfg.from_scratch else "fine-tuned"
    print(f"Trial {trial.number} of study {study.study_name!r}, {trained}: test accuracy "
          f"{100 * result['test_accuracy']:.2f}%", end="")
    if result["scratch_test_accuracy"] is not None and not cfg.from_scratch:
        print(f" (from scratch with the same budget: {100 * result['scratch_test_accuracy']:.2f}%)", end="")
    notes = [f"budget {budget} ms"] if budget is not None else []
    if gates_on and model.gated_blocks():
        notes.append(f"ungated {result['ungated_latency_ms']:.3f} ms, keep ratio {model.keep_ratio:g}")
    elif gates_on:
        notes.append(f"ungated {result['ungated_latency_ms']:.3f} ms; no block got a gate")
    note = f" ({'; '.join(notes)})" if notes else ""
    print(f", measured latency {result['measured_latency_ms']:.3f} ms{note}.")
    names = ("finetune.json", "manifest.json", "subnet.pt", "subnet.pt2", "subnet_b1.pt2", "subnet.onnx")
    written = [run_dir / name for name in names if (run_dir / name).is_file()]
    print(f"Wrote {', '.join(str(path) for path in written[:-1])} and {written[-1]}.")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    restore_interrupt()
    run_cli(run, cfg, interrupted=interrupted_message)


if __name__ == "__main__":
    check_group_settings(sys.argv[1:], "python train.py", {"gates": "feature", "logger": "wandb"})
    warn_added_keys(sys.argv[1:], "python train.py", "train", rejected=STUDY_KEYS)
    main()
