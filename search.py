"""Hardware-aware architecture search: ``python search.py +space=resnet``.

Stages: data, profiling and latency predictor (cached per device), supernet (trained once and
cached), an Optuna study, re-measurement of the Pareto front on the device, and the outputs
(pareto.csv, pareto.png, manifest.json, timings.json) in Hydra's run directory.
"""

from __future__ import annotations

from nas.startup import FirstInterruptHeld, exit_quietly_on_interrupt, restore_interrupt

if __name__ == "__main__":
    exit_quietly_on_interrupt()  # the imports below take seconds

import contextlib
import json
import logging
import os
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import optuna
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm.auto import tqdm

from nas.cli import (
    StageTimer,
    absolute_root,
    check_group_settings,
    default_storage,
    import_user_modules,
    module_list,
    python_command,
    require_space,
    resolve_data_root,
    run_cli,
    script_path,
    to_container,
    warn_added_keys,
)
from nas.data import build_datamodule
from nas.files import exclusive_lock
from nas.progressive import ProgressiveError, check_supernet_config, create_supernet_module
from nas.report import plot_pareto, write_manifest, write_pareto_csv
from nas.search import (
    LatencyEstimate,
    SearchError,
    SearchObjective,
    check_budget,
    check_resume,
    check_run_length,
    check_storage_opens,
    complete_trials,
    create_or_load_study,
    create_sampler,
    existing_study,
    knee_index,
    pareto_trials,
    predictor_record,
    sampler_seed,
    stored_measurements,
)
from nas.spaces import SearchSpace, create_space
from nas.supernet.cache import load_supernet, save_supernet, supernet_key
from nas.tracking import create_tracker
from nas.training import (
    SubnetEvaluator,
    ddp_launch_problem,
    end_secondary_rank,
    fit_or_interrupt,
    ranks_started_outside,
    started_as_secondary_rank,
    trained_as_secondary_rank,
)

log = logging.getLogger("tailnas.search")


class StopOnInterrupt(FirstInterruptHeld):
    """While active, a first Ctrl-C stops the study after its running trials; a second one stops at once.

    Stopping between trials keeps the study's last trial complete. A signal handler also catches a
    Ctrl-C that lands in a garbage-collection callback, where a raised KeyboardInterrupt is only printed.
    """

    def __init__(self, study: optuna.Study) -> None:
        super().__init__()
        self.study = study

    @property
    def stopped(self) -> bool:
        """Whether a Ctrl-C asked the study to stop."""
        return self.pressed

    def on_first_interrupt(self) -> None:
        log.warning("Ctrl-C: the search stops after the running trial; press Ctrl-C again to stop at once.")
        try:
            self.study.stop()
        except RuntimeError:  # outside the optimisation loop: nothing runs that could finish first
            raise KeyboardInterrupt from None

    def __enter__(self) -> StopOnInterrupt:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


class _InterruptWithoutTraceback(logging.Filter):
    """Drop the traceback from Optuna's "Trial N failed" warning when the failure is Ctrl-C."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


# Optuna logs a failed trial on this logger, with the exception's traceback.
logging.getLogger("optuna.study._optimize").addFilter(_InterruptWithoutTraceback())


def build_space(cfg: DictConfig, datamodule: Any) -> SearchSpace:
    """Build the space, filling channels and classes the data decides (for example ImageFolder's classes)."""
    import_user_modules(to_container(cfg.get("imports")))
    space_cfg = to_container(cfg.space)
    if space_cfg.get("in_channels") is None:
        space_cfg["in_channels"] = datamodule.in_channels
    if space_cfg.get("num_classes") is None:
        space_cfg["num_classes"] = datamodule.num_classes
    return create_space(space_cfg)


def training_device(trainer_cfg: DictConfig) -> str:
    """Return where subnet evaluation runs: the GPU when the trainer may use one and it exists."""
    wants_gpu = trainer_cfg.accelerator in ("gpu", "cuda", "auto")
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def supernet_path(cfg: DictConfig, space: SearchSpace, datamodule: Any, space_config: Any = None) -> Path:
    """Return where the supernet of this space, data, training setup and seed is cached.

    ``space_config`` replaces the space's cache configuration in the key (see :func:`supernet_key`).
    """
    training = {k: v for k, v in to_container(cfg.supernet).items() if k != "trainer"}
    key = supernet_key(space, datamodule.describe(), training, cfg.seed, space_config)
    return Path(cfg.paths.work_dir) / "supernets" / f"{space.name}-{key}" / "supernet.pt"


def train_or_load_supernet(cfg: DictConfig, space: SearchSpace, datamodule: Any, tracker: Any) -> tuple[Any, Path]:
    """Return the supernet for this space, data and training setup, training it only when no checkpoint exists.

    ``supernet.schedule`` picks the training: "sandwich" or "progressive" (see ``nas.progressive``).
    """
    path = supernet_path(cfg, space, datamodule)
    if not path.is_file():
        # Workers that share paths.work_dir train one supernet: the first trains, the others wait
        # for its checkpoint. DDP ranks take no lock, because torchrun and SLURM start them all at
        # once, and Lightning starts ranks 1 and up while rank 0 holds the lock.
        lock = (contextlib.nullcontext() if ranks_started_outside(cfg.supernet.trainer)
                else exclusive_lock(path.with_name("training.lock"), "training this supernet"))
        with lock:
            if not path.is_file():
                return _train_supernet(cfg, space, datamodule, tracker, path), path
    log.info("Reusing supernet checkpoint %s", path)
    supernet, _ = load_supernet(path, space)
    return supernet, path


def _train_supernet(cfg: DictConfig, space: SearchSpace, datamodule: Any, tracker: Any, path: Path) -> Any:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    training = to_container(cfg.supernet)
    key = path.parent.name.removeprefix(f"{space.name}-")

    pl.seed_everything(cfg.seed, workers=True)
    supernet = space.build_supernet()
    try:
        module, epochs = create_supernet_module(supernet, training, seed=cfg.seed)
    except ProgressiveError as err:
        raise SearchError(str(err)) from err
    # Each finished epoch is kept in resume.ckpt, so an interrupted training resumes where it stopped.
    resume = path.with_name(f"{RESUME_NAME}.ckpt")
    keep_epochs = ModelCheckpoint(dirpath=path.parent, filename=RESUME_NAME, save_top_k=1, every_n_epochs=1,
                                  enable_version_counter=False)
    trainer_cfg = training["trainer"]
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator=trainer_cfg["accelerator"], devices=trainer_cfg["devices"],
        strategy=trainer_cfg["strategy"], precision=trainer_cfg["precision"], logger=tracker.lightning_logger(),
        callbacks=[keep_epochs], enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else cfg.paths.work_dir,
    )
    finished = _finished_epochs(resume)
    ckpt_path = str(resume) if finished is not None else None
    if ckpt_path is not None:
        log.info("Resuming supernet training after %d of %d epochs from %s", finished, epochs, resume)
    try:
        with warnings.catch_warnings():
            # The folder contains resume.ckpt from the interrupted run, which is expected.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            fit_or_interrupt(trainer, module, train_dataloaders=datamodule.train_dataloader(), ckpt_path=ckpt_path)
    except KeyboardInterrupt:
        done = _finished_epochs(resume) or 0
        log.warning("Supernet training interrupted after %d of %d epochs; %s", done, epochs,
                    f"they are in {resume}, and the next run with these settings resumes from them."
                    if done else "the next run starts again.")
        raise
    if trainer.is_global_zero:
        save_supernet(supernet.cpu(), path, {"key": key, "data": datamodule.describe(), "training": training})
        resume.unlink(missing_ok=True)
    return supernet


RESUME_NAME = "resume"


def _finished_epochs(path: Path) -> int | None:
    """Return how many epochs the Lightning checkpoint ``path`` finished, or None without a readable one.

    An unreadable checkpoint is moved aside with a warning.
    """
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return int(checkpoint["epoch"]) + 1
    except Exception as err:  # noqa: BLE001 - any failure to read means: train from the start
        aside = path.with_suffix(".unreadable")
        path.replace(aside)
        log.warning("Cannot read %s (%s); moved it to %s and training the supernet from the start.", path, err, aside)
        return None


def calibration_batches(datamodule: Any, images: int, seed: int) -> list[torch.Tensor]:
    """Return a fixed set of training images, in batches, for BatchNorm recalibration."""
    if images < 1:
        raise SearchError(f"search.calibration_images must be >= 1, but got {images}.")
    dataset = datamodule.train_set
    order = np.random.default_rng(seed).permutation(len(dataset))[:images]
    batch_size = min(256, images)
    batches = []
    for start in range(0, len(order), batch_size):
        batches.append(torch.stack([dataset[int(i)][0] for i in order[start : start + batch_size]]))
    return batches


def tail_aware_space(space: SearchSpace, store: Any, protocol: Any, supernet: Any, predictor: Any,
                     run_dir: Path) -> SearchSpace:
    """Move each width choice to the right edge of its latency step on this device.

    Writes staircase.png (one layer's measured steps) and width_moves.png (each width decision's
    latency curve with its choices before and after).
    """
    from predictors.plots import plot_width_moves, write_staircase
    from predictors.profiling import enumerate_layers
    from predictors.tail_aware import tail_aware_plan

    write_staircase(run_dir / "staircase.png", predictor, store.layer_table(protocol.batch_size),
                    layers=enumerate_layers(space, seed=0))
    # tail_aware_plan logs each decision's change with the latencies behind it.
    plan = tail_aware_plan(space, store, protocol)
    plot_width_moves(run_dir / "width_moves.png", space.width_choices(), plan)
    new_space = space.with_width_choices({key: widths for key, (_, widths) in plan.items()})
    supernet.space = new_space  # the widest widths are unchanged, so the same supernet serves the new space
    return new_space


def record_measurement(store: Any, space: SearchSpace, arch: Any, measurement: Any, failures: list[OSError]) -> None:
    """Add a search-time measurement to the profile store; a store that refuses the write gets one warning.

    The measurement serves the run either way, so a read-only or full store does not cost a
    finished search its outputs. ``failures`` collects the refused writes of this run.
    """
    try:
        store.add_subnet(space.name, space.config_hash(), arch.to_dict(), space.layers(arch), measurement,
                         pass_index=0, source="search")
    except OSError as err:
        if not failures:
            log.warning("Cannot add measurements to the profile store %s (%s); this run uses them without "
                        "storing them.", store.directory, err)
        failures.append(err)


def log_input_resize(space: SearchSpace, data_resolution: int) -> None:
    """Say when subnets run at other resolutions than the data's, so that every batch is resized for them."""
    sizes = sorted({space.input_shape(space.smallest())[1], space.input_shape(space.largest())[1]})
    # Data at the largest subnet resolution is the usual setup: only smaller subnets see resized batches.
    if data_resolution == sizes[-1]:
        return
    sizes_text = "/".join(map(str, sizes))
    message = ("Subnets run at %s pixels and the data at %d: the search resizes every batch to the subnet's resolution "
               "(bilinear, without antialiasing). Set data.resolution to the largest subnet resolution to load images "
               "at that size instead.")
    # Shrinking by more than half without antialiasing drops detail that the data loader's resize would keep.
    level = logging.WARNING if data_resolution > 2 * sizes[-1] else logging.INFO
    log.log(level, message, sizes_text, data_resolution)


def remeasure_front(front: list[optuna.trial.FrozenTrial], measure: Any) -> dict[int, float]:
    """Measure every Pareto subnet on the device; returns trial number -> median latency in ms."""
    measured = {}
    for trial in tqdm(front, desc="re-measure Pareto front", unit="subnet"):
        measured[trial.number] = measure(trial.user_attrs["arch"])
    return measured


def front_rows(front: list[optuna.trial.FrozenTrial], measured: dict[int, float]) -> list[dict[str, Any]]:
    return [
        {
            "trial": t.number,
            "arch": t.user_attrs["arch"],
            "accuracy": round(t.values[0], 6),
            "predicted_latency_ms": round(t.user_attrs["predicted_latency_ms"], 6),
            "measured_latency_ms": round(measured[t.number], 6) if t.number in measured else None,
            "macs": t.user_attrs["macs"],
            "params": t.user_attrs["params"],
            "latency_source": t.user_attrs.get("latency_source", "predicted"),
        }
        for t in front
    ]


def print_front(rows: list[dict[str, Any]], knee: int, study_name: str) -> None:
    from nas.report import print_table
    from rich.table import Table

    table = Table(title=f"Pareto front of study {study_name!r}")
    for column in ("trial", "accuracy %", "predicted ms", "measured ms", "MMACs", "params"):
        table.add_column(column, justify="right")
    for i, r in enumerate(rows):
        measured = f"{r['measured_latency_ms']:.3f}" if r["measured_latency_ms"] is not None else "-"
        marker = " (knee)" if i == knee else ""
        table.add_row(f"{r['trial']}{marker}", f"{100 * r['accuracy']:.2f}", f"{r['predicted_latency_ms']:.3f}", measured,
                      f"{r['macs'] / 1e6:.2f}", f"{r['params']:,}")
    print_table(table)
    print(f"Knee architecture: {json.dumps(rows[knee]['arch'], separators=(',', ':'))}")


def run(cfg: DictConfig) -> None:
    require_space(cfg, "python search.py")
    resolve_data_root(cfg)
    from predictors import MeasurementProtocol, ProfileStore, device_fingerprint, fingerprint_id, measure_arch
    from predictors.build import load_or_build_predictor

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    work_dir = Path(cfg.paths.work_dir)
    timer = StageTimer()
    protocol = MeasurementProtocol.from_config(to_container(cfg.hardware))
    # Settings are checked before any stage runs, so a wrong value stops the run at once.
    sampler = create_sampler(cfg.search.sampler, cfg.seed, cfg.search.population_size)
    check_run_length(cfg.search.n_trials, cfg.search.timeout_s)
    launch_problem = ddp_launch_problem(cfg.supernet.trainer, "supernet.trainer")
    if launch_problem:
        raise SearchError(launch_problem)
    budget = check_budget(cfg.search.latency_budget_ms)
    worker = cfg.search.get("worker", 0)
    sampler_seed(cfg.seed, worker)  # checks the worker index
    if worker and not cfg.search.study_name:
        raise SearchError(f"search.worker={worker} needs search.study_name=NAME, the same for every worker, so "
                          "that the workers share one study.")
    storage = default_storage(cfg)
    check_storage_opens(storage)

    with timer.stage("data"):
        datamodule = build_datamodule(to_container(cfg.data))
        datamodule.setup()
        datamodule.log_summary()
    # The space takes its input channels, classes and resolution from the data.
    space = build_space(cfg, datamodule)
    log_input_resize(space, datamodule.resolution)
    check_supernet_config(space, to_container(cfg.supernet))
    log.info("Space %s: %d decisions, largest %.2f MMACs, smallest %.2f MMACs", space.name, len(space.choices()),
             space.macs(space.largest()) / 1e6, space.macs(space.smallest()) / 1e6)
    # The study name is set before the tracker starts because it is the run's default W&B group.
    study_name = cfg.search.study_name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    fingerprint = device_fingerprint(protocol)
    # With hardware.threads null on the CPU, the thread count torch uses picks the cached predictor.
    threads_used = fingerprint.get("threads") if protocol.uses_torch_threads else None
    scoring = {"space_config": space.raw_config, "supernet_key": supernet_path(cfg, space, datamodule).parent.name,
               "device_fingerprint_id": fingerprint_id(fingerprint), "hardware": protocol.to_dict(),
               "threads_used": threads_used, "latency_budget_ms": budget,
               "predictor": predictor_record(to_container(cfg.predictor)),
               "calibration_images": cfg.search.calibration_images}
    if space.raw_config.get("tail_aware"):
        # Tail-aware studies recorded a supernet key of their own before they shared the plain run's
        # supernet. The same settings train the same supernet under either key, so both resume.
        scoring["supernet_key_before_sharing"] = supernet_path(cfg, space, datamodule, space.raw_config).parent.name
    stored = existing_study(storage, study_name)
    if stored is not None:
        # Checked before the supernet trains, so a mismatch costs nothing.
        settings = {"data": to_container(cfg.data), "supernet": to_container(cfg.supernet), "seed": cfg.seed}
        _check_recorded_root(stored.user_attrs, cfg, study_name)
        check_resume(stored.user_attrs, {**scoring, **settings}, study_name, storage)
    trials_before = len(stored.trials) if stored is not None else 0
    seed = sampler_seed(cfg.seed, worker, trials_before)
    if seed != cfg.seed:
        log.info("Sampler seed %d (from seed %d, search.worker %s and the study's %d earlier trials, finished or not)",
                 seed, cfg.seed, worker, trials_before)
        sampler = create_sampler(cfg.search.sampler, seed, cfg.search.population_size)
    # DDP ranks other than 0 log nothing: Lightning logs their training through rank 0.
    logger_cfg = {"name": "none"} if started_as_secondary_rank() else to_container(cfg.logger)
    tracker = create_tracker(logger_cfg, to_container(cfg), "search", str(run_dir),
                             default_group=study_name)

    # The predictor comes before the supernet: it does not need it, and an impossible latency budget
    # then stops the run before the long training.
    store = ProfileStore(work_dir / "profiles", fingerprint)
    with timer.stage("profile_predictor"):
        predictor, report, predictor_path = load_or_build_predictor(
            space, protocol, to_container(cfg.predictor), work_dir, seed=cfg.seed, progress=True
        )
    # A reused predictor's report contains the times of the run that built it.
    timer.seconds["profile"] = 0.0 if report.get("reused") else report.get("profile_s", 0.0)
    timer.seconds["predictor"] = max(0.0, timer.seconds["profile_predictor"] - timer.seconds["profile"])
    log.info("Predictor %s: %s", predictor_path, {k: v for k, v in report.items() if not isinstance(v, (dict, list))})
    tracker.summary({f"predictor/{k}": v for k, v in report.items() if isinstance(v, (int, float))})
    if not cfg.space.get("tail_aware", False):
        _check_budget_feasible(space, lambda arch: _predict(predictor, space, arch), budget)

    with timer.stage("supernet"):
        supernet, checkpoint = train_or_load_supernet(cfg, space, datamodule, tracker)
    if trained_as_secondary_rank():
        end_secondary_rank("supernet training", "runs the search")
        return

    if cfg.space.get("tail_aware", False):
        space = tail_aware_space(space, store, protocol, supernet, predictor, run_dir)

    unstored: list[OSError] = []

    def measure(arch_dict: dict[str, Any]) -> float:
        arch = space.arch_from_dict(arch_dict)
        # The supernet stays where the search scores accuracy; measure_arch copies the subnet out of it.
        measurement = measure_arch(space, arch, protocol, supernet=supernet)
        record_measurement(store, space, arch, measurement, unstored)
        return measurement.median_ms

    def predict(arch: Any) -> LatencyEstimate:
        return _predict(predictor, space, arch)

    search_cfg = cfg.search
    device = training_device(cfg.supernet.trainer)
    with timer.stage("search"):
        evaluator = SubnetEvaluator(
            supernet, calibration_batches(datamodule, search_cfg.calibration_images, cfg.seed),
            datamodule.val_dataloader(), device=device,
        )
        objective = SearchObjective(
            space, evaluator.accuracy, predict, latency_budget_ms=budget,
            measure_fn=(lambda arch: measure(arch.to_dict())) if search_cfg.measure_uncertain else None,
            uncertainty_threshold=search_cfg.uncertainty_threshold if search_cfg.measure_uncertain else None,
            worker=worker,
        )
        record = {
            **scoring, "space": space.raw_config, "space_name": space.name,
            "imports": module_list(to_container(cfg.get("imports"))),
            "data": to_container(cfg.data), "supernet_checkpoint": str(checkpoint),
            "supernet": to_container(cfg.supernet), "predictor_path": str(predictor_path), "seed": cfg.seed,
            "run_dir": str(run_dir), "sampler": search_cfg.sampler,
        }
        if cfg.space.get("tail_aware", False):
            # The tail-aware widths are known only now. Checked before the study is created, so an
            # impossible budget leaves no empty study behind.
            _check_budget_feasible(space, predict, budget)
        study, _ = create_or_load_study(storage, study_name, sampler, record)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        interrupted = False
        try:
            with StopOnInterrupt(study) as stopper:
                study.optimize(objective, n_trials=search_cfg.n_trials, timeout=search_cfg.timeout_s,
                               show_progress_bar=True, gc_after_trial=False)
            interrupted = stopper.stopped
        except KeyboardInterrupt:
            interrupted = True
        finished = complete_trials(study)
        if interrupted:
            log.warning("Search interrupted; writing the results of the %d finished trials. Add search.study_name=%s "
                        "to resume the study.", len(finished), study_name)
        _log_trial_counts(finished)
        supernet.cpu()

    front = pareto_trials(study)
    if not front:
        raise SearchError(
            f"Study {study_name!r} has no feasible finished trial among its {len(finished)}, so there is no Pareto "
            f"front. Add trials with search.study_name={study_name} (up to search.n_trials="
            f"{search_cfg.n_trials} per run, within search.timeout_s={search_cfg.timeout_s}), or start a study "
            f"under a new search.study_name with a higher search.latency_budget_ms (now {budget}): a study keeps "
            "the budget its trials were scored with."
        )
    measured = stored_measurements(study, front)
    with timer.stage("remeasure"):
        if search_cfg.remeasure:
            new = remeasure_front(front, measure)
            measured.update(new)
            # Read again: another worker may have stored measurements while this one measured.
            latest = study.user_attrs.get("measured_latency_ms", {})
            study.set_user_attr("measured_latency_ms", {**latest, **{str(k): v for k, v in new.items()}})

    rows = front_rows(front, measured)
    latencies = [r["measured_latency_ms"] if r["measured_latency_ms"] is not None else r["predicted_latency_ms"] for r in rows]
    knee = knee_index([r["accuracy"] for r in rows], latencies)
    write_outputs(run_dir, cfg, study, rows, knee, fingerprint, report, timer, storage)
    tracker.log_table("pareto", rows)
    tracker.log_image("pareto_plot", str(run_dir / "pareto.png"))
    tracker.summary({f"time/{k}": v for k, v in timer.seconds.items()})
    tracker.finish()

    print_front(rows, knee, study_name)
    print(f"Wrote {run_dir / 'pareto.csv'}, {run_dir / 'pareto.png'}, {run_dir / 'manifest.json'} and "
          f"{run_dir / 'timings.json'}.")
    location_arg = f" search.storage='{storage}'" if cfg.search.storage else _work_dir_arg(cfg)
    print(f"Knee subnet: trial {rows[knee]['trial']}, accuracy {100 * rows[knee]['accuracy']:.2f}%, "
          f"{latencies[knee]:.3f} ms. Fine-tune it with:")
    study_arg = shlex.quote(f"search.study_name={study_name}")
    print(f"  {python_command()} {script_path('train.py')} {study_arg}{location_arg} trial={rows[knee]['trial']}")
    if interrupted:
        # The outputs are written. Exit status 130 lets a calling script see that the search was cut short.
        raise KeyboardInterrupt


def _log_trial_counts(trials: list[optuna.trial.FrozenTrial]) -> None:
    """Log how many finished trials were over the latency budget, and how many redrew a scored architecture."""
    over = sum(bool(trial.user_attrs.get("accuracy_skipped")) for trial in trials)
    if over:
        log.info("%d of the study's %d finished trials were predicted over search.latency_budget_ms, so their accuracy "
                 "was not scored; pareto.png leaves them out.", over, len(trials))
    repeats = sum("repeat_of" in trial.user_attrs for trial in trials)
    if not repeats:
        return
    hint = ("; the space may be too small for this many trials (search.n_trials)"
            if 2 * repeats >= len(trials) else "")
    log.info("%d of the study's %d finished trials redrew a scored architecture and reused its scores%s.", repeats,
             len(trials), hint)


def _check_recorded_root(record: dict[str, Any], cfg: DictConfig, study_name: str) -> None:
    """Stop the resume of a study whose data.root was recorded relative, by TailNAS versions that kept it so."""
    recorded = (record.get("data") or {}).get("root")
    if not recorded or Path(str(recorded)).expanduser().is_absolute():
        return
    if cfg.data.get("root") == absolute_root(recorded):
        raise SearchError(
            f"Study {study_name!r} recorded the relative data.root={recorded!r}. search.py now records "
            f"data.root as an absolute path ({cfg.data.root}), and the supernet key includes it, so this study "
            "cannot be resumed. Start a new search.study_name; the profiles and the predictor are reused."
        )


def _work_dir_arg(cfg: DictConfig) -> str:
    """Return the ``paths.work_dir`` override train.py needs to find this run's studies ("" for the default)."""
    default = os.environ.get("TAILNAS_WORK_DIR") or str(Path(HydraConfig.get().runtime.cwd) / "work")
    work_dir = str(cfg.paths.work_dir)
    return "" if Path(work_dir).resolve() == Path(default).resolve() else f" paths.work_dir='{work_dir}'"


def _predict(predictor: Any, space: SearchSpace, arch: Any) -> LatencyEstimate:
    prediction = predictor.predict([space.layers(arch)])
    return LatencyEstimate(float(prediction.mean_ms[0]), float(prediction.low_ms[0]), float(prediction.high_ms[0]))


def _check_budget_feasible(space: SearchSpace, predict: Any, budget: float | None) -> None:
    if budget is None:
        return
    smallest = predict(space.smallest()).latency_ms
    if smallest > budget:
        raise SearchError(
            f"search.latency_budget_ms={budget} is below the predicted latency of the smallest subnet "
            f"({smallest:.3f} ms), so no architecture can meet it. Raise the budget above {smallest:.3f} ms."
        )


def write_outputs(run_dir: Path, cfg: DictConfig, study: optuna.Study, rows: list[dict[str, Any]], knee: int,
                  fingerprint: dict[str, Any], report: dict[str, Any], timer: StageTimer, storage: str) -> None:
    write_pareto_csv(run_dir / "pareto.csv", rows)
    finished = complete_trials(study)
    feasible = [(t.values[0], t.user_attrs["predicted_latency_ms"]) for t in finished
                if not t.user_attrs.get("accuracy_skipped")]
    over_budget = len(finished) - len(feasible)
    plot_pareto(run_dir / "pareto.png", feasible, rows, knee, f"{study.study_name} on {fingerprint.get('name', 'device')}",
                budget_ms=study.user_attrs.get("latency_budget_ms"), over_budget=over_budget)
    timer.write(run_dir / "timings.json")
    write_manifest(
        run_dir / "manifest.json", to_container(cfg), fingerprint, cfg.seed,
        {"study_name": study.study_name, "storage": storage, "trials": len(study.trials), "knee_trial": rows[knee]["trial"],
         "predictor_report": report, "stage_seconds": timer.seconds},
    )


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
def main(cfg: DictConfig) -> None:
    restore_interrupt()
    run_cli(run, cfg)


if __name__ == "__main__":
    check_group_settings(sys.argv[1:], "python search.py", {"logger": "wandb"})
    warn_added_keys(sys.argv[1:], "python search.py", "search")
    main()
