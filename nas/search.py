"""Optuna multi-objective studies over a search space: accuracy up, latency down, latency budget as a constraint."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from nas.spaces.base import Arch, SearchSpace

__all__ = [
    "SAMPLERS",
    "STUDY_FORMAT_VERSION",
    "LatencyEstimate",
    "SearchObjective",
    "create_sampler",
    "create_or_load_study",
    "complete_trials",
    "check_budget",
    "check_run_length",
    "check_storage_opens",
    "optuna_storage",
    "predictor_record",
    "stored_measurements",
    "check_resume",
    "existing_study",
    "sampler_seed",
    "pareto_trials",
    "knee_index",
    "latest_study_name",
    "SearchError",
]

log = logging.getLogger(__name__)

SAMPLERS = ("nsga2", "tpe", "random")
STUDY_FORMAT_VERSION = 1
CONSTRAINT_KEY = "latency_over_budget_ms"


class SearchError(ValueError):
    """An invalid search setting or a study that cannot be used."""


@dataclass(frozen=True)
class LatencyEstimate:
    """A latency in milliseconds with its interval; ``source`` is "predicted" or "measured"."""

    latency_ms: float
    low_ms: float
    high_ms: float
    source: str = "predicted"

    @property
    def relative_width(self) -> float:
        """Interval width as a share of the latency."""
        return (self.high_ms - self.low_ms) / max(self.latency_ms, 1e-12)


def _constraints(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    # Optuna treats a value <= 0 as satisfied; a trial without constraint values counts as infeasible.
    return list(trial.constraints.values()) or [1.0]


def _whole_number(value: Any, minimum: int) -> bool:
    """Return whether ``value`` is an int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def create_sampler(name: str, seed: int, population_size: int = 20) -> optuna.samplers.BaseSampler:
    """Build the sampler called ``name`` (one of :data:`SAMPLERS`), seeded.

    NSGA-II and TPE read the trials' constraint values and steer away from infeasible regions; the
    random sampler does not, so for it the budget is enforced by the Pareto extraction alone.
    """
    if name == "nsga2":
        if not _whole_number(population_size, 2):
            raise SearchError(f"search.population_size must be a whole number >= 2, but got {population_size!r}.")
        return optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise SearchError(f"Unknown search.sampler={name!r}; available samplers are {list(SAMPLERS)}.")


def check_run_length(n_trials: Any, timeout_s: Any) -> None:
    """Raise SearchError unless ``n_trials`` is a whole number >= 1 and ``timeout_s`` a positive number, each or null."""
    if n_trials is not None and not _whole_number(n_trials, 1):
        raise SearchError(f"search.n_trials must be a whole number >= 1 or null (no limit), but got {n_trials!r}.")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                  or not timeout_s > 0):
        raise SearchError(f"search.timeout_s must be a positive number of seconds or null (no limit), but got "
                          f"{timeout_s!r}.")
    if n_trials is None and timeout_s is None:
        raise SearchError("search.n_trials and search.timeout_s are both null, so the search would never end; "
                          "set at least one of them.")


def check_budget(value: Any, key: str = "search.latency_budget_ms") -> float | None:
    """Return ``value`` as a latency budget in ms, or None; raise SearchError unless it is a positive number or null."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SearchError(f"{key} must be a positive number of milliseconds or null, but got {value!r}.")
    return float(value)


# The record keys that decide a trial's scores, with the settings behind them. A resumed study keeps
# them, so that every trial of its front is scored the same way.
RESUME_KEYS = {
    "space_config": "space.*",
    "supernet_key": "the supernet: data.*, supernet.* and seed",
    "device_fingerprint_id": "the device",
    "hardware": "hardware.*",
    "threads_used": "torch's CPU thread count with hardware.threads null (OMP_NUM_THREADS, CPU quota)",
    "latency_budget_ms": "search.latency_budget_ms",
    "predictor": "the latency predictor: predictor.* or predictor.path",
    "calibration_images": "search.calibration_images",
}


def predictor_record(predictor_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Return the ``predictor`` settings that change a trial's predicted latency, for :data:`RESUME_KEYS`.

    A file given as ``predictor.path`` is recorded by its absolute path alone. Otherwise every key
    counts except ``rebuild``, ``allow_fingerprint_mismatch`` and the models' ``nthread``: a rebuild
    from the same profiles with the same settings trains the same models.
    """
    from predictors.build import NON_MODEL_KEYS

    if predictor_cfg.get("path"):
        return {"path": str(Path(str(predictor_cfg["path"])).expanduser().resolve())}
    record = {k: v for k, v in predictor_cfg.items() if k not in NON_MODEL_KEYS}
    # XGBoost's training thread count changes how fast the models train, not what they predict.
    for key in ("layer_model", "network_model"):
        if isinstance(record.get(key), Mapping):
            record[key] = {k: v for k, v in record[key].items() if k != "nthread"}
    return record


def optuna_storage(storage: str) -> Any:
    """Return what Optuna's functions take for the URL ``storage``: a JournalStorage for ``journal:///PATH``.

    Any other URL is passed on as it is, for Optuna's RDB storage.
    """
    if storage.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        return JournalStorage(JournalFileBackend(storage.removeprefix("journal://")))
    return storage


# Parts of the SQLite and PostgreSQL errors raised when another process has just created the table
# or the schema-version row that this one tries to create.
SCHEMA_RACE_ERRORS = ("already exists", "UNIQUE constraint failed", "duplicate key value")


def check_storage_opens(storage: str) -> None:
    """Open ``storage`` once, so that an unreachable server or a missing driver stops a run before any work."""
    import sqlalchemy
    from sqlalchemy.engine import make_url

    if storage.startswith("journal:"):
        try:
            optuna.get_all_study_names(storage=optuna_storage(storage))
        except OSError as err:
            raise SearchError(f"search.storage={storage!r} cannot be opened ({err}); use a file in a folder you "
                              "can write.") from err
        return
    url = make_url(storage)
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            raise SearchError(f"search.storage={storage!r} is an in-memory database, which keeps no study after "
                              "the run; use sqlite:////ABSOLUTE/PATH.db or leave search.storage null.")
        # Made here, because SQLite creates a new file with mode 0644 whatever the umask, which would
        # keep a group that shares paths.work_dir from writing the study.
        Path(url.database).expanduser().touch(exist_ok=True)
    # Workers that start together on a new database all create Optuna's tables. All but the first
    # then fail on a table or row that the first made, and another try finds them made.
    for attempt in range(5):
        try:
            optuna.get_all_study_names(storage=optuna_storage(storage))
            return
        except sqlalchemy.exc.SQLAlchemyError as err:
            if any(sign in str(err) for sign in SCHEMA_RACE_ERRORS) and attempt < 4:
                time.sleep(0.5 + random.random())
                continue
            _raise_storage_error(storage, err)
        except (ImportError, OSError) as err:
            _raise_storage_error(storage, err)


def _raise_storage_error(storage: str, err: Exception) -> None:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    raise SearchError(f"search.storage={storage!r} cannot be opened ({type(err).__name__}: {reason}); check "
                      "the URL, that the database server runs and accepts this user, and that its Python "
                      "driver is installed.") from err


def existing_study(storage: str, study_name: str) -> optuna.Study | None:
    """Return the study ``study_name`` in ``storage``, or None when there is no such study."""
    if study_name not in optuna.get_all_study_names(storage=optuna_storage(storage)):
        return None
    return optuna.load_study(study_name=study_name, storage=optuna_storage(storage))


def sampler_seed(seed: int, worker: Any = 0, trials_before: int = 0) -> int:
    """Return the sampler seed of a run: ``seed`` for worker 0 of a new study, otherwise one drawn from all three.

    A seeded sampler draws the same architectures in every run. So a run that resumes a study
    (``trials_before`` > 0) or a second worker on it (another ``worker`` index) gets a seed of its
    own, and explores new architectures instead of repeating the first run's.
    """
    if not _whole_number(worker, 0):
        raise SearchError(f"search.worker must be a whole number >= 0, one per worker on a study, but got {worker!r}.")
    if worker == 0 and trials_before == 0:
        return seed
    return int(np.random.SeedSequence([seed, worker, trials_before]).generate_state(1)[0])


def _normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _yaml_value(value: Any) -> str:
    return "null" if value is None else repr(value)


def _differing(old: Mapping[str, Any], new: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    return sorted(k for k in set(old) | set(new) if k not in ignore and old.get(k) != new.get(k))


# Settings that do not enter the supernet's key, left out when a changed key is explained.
_NOT_IN_SUPERNET_KEY = {"data": ("num_workers", "eval_batch_size"), "supernet": ("trainer",)}


def _supernet_change(stored: Mapping[str, Any], record: Mapping[str, Any]) -> str:
    """Name what changed the supernet key: data.X, supernet.X or seed, from the records' settings where both have them."""
    named = []
    for group in ("data", "supernet"):
        old, new = stored.get(group), record.get(group)
        if isinstance(old, dict) and isinstance(new, dict):
            named += [_with_values(f"{group}.{key}", old.get(key), new.get(key))
                      for key in _differing(old, new, _NOT_IN_SUPERNET_KEY[group])]
    if "seed" in stored and "seed" in record and stored["seed"] != record["seed"]:
        named.append(f"seed ({_yaml_value(stored['seed'])} before, {_yaml_value(record['seed'])} now)")
    return f"{RESUME_KEYS['supernet_key']} ({', '.join(named)})" if named else RESUME_KEYS["supernet_key"]


def _with_values(name: str, old: Any, new: Any) -> str:
    """Return ``name`` with its two values when both are plain values, else ``name`` alone."""
    plain = (str, int, float, bool, type(None))
    if isinstance(old, plain) and isinstance(new, plain):
        return f"{name} ({_yaml_value(old)} before, {_yaml_value(new)} now)"
    return name


def _describe_change(key: str, old: Any, new: Any) -> str:
    label = RESUME_KEYS.get(key, "space.*")  # "space": the searched space of older studies
    if isinstance(old, dict) and isinstance(new, dict):
        return f"{label} (differs in {', '.join(_differing(old, new))})"
    if key in ("space", "space_config", "device_fingerprint_id"):
        return label
    return f"{label} ({_yaml_value(old)} before, {_yaml_value(new)} now)"


def _same_predictor_file(stored: Mapping[str, Any], predictor: Mapping[str, Any]) -> bool:
    """Return whether ``predictor.path`` names the file that the study's trials were scored with."""
    requested, used = predictor.get("path"), stored.get("predictor_path")
    if not requested or not used:
        return False
    return Path(str(requested)).expanduser().resolve() == Path(str(used)).expanduser().resolve()


def check_resume(stored: Mapping[str, Any], record: Mapping[str, Any], study_name: str, storage: str) -> None:
    """Raise SearchError when ``record`` differs from the study's ``stored`` record in a setting that scores trials.

    ``space_config`` is the space as configured, before ``space.tail_aware`` moves its widths.
    ``data``, ``supernet`` and ``seed``, where both records have them, name what changed the
    supernet's key.
    Studies written before ``supernet_key`` or ``space_config`` were recorded are compared by their
    checkpoint's folder and by the searched space. A key missing from either side is not compared.
    """
    stored = dict(stored)
    if "supernet_key" not in stored and stored.get("supernet_checkpoint"):
        stored["supernet_key"] = Path(stored["supernet_checkpoint"]).parent.name
    keys = list(RESUME_KEYS)
    if "space_config" not in stored:
        # Older studies recorded only the searched space, which the tail-aware step may have changed.
        keys = ["space" if key == "space_config" else key for key in keys]
    changed_keys = [key for key in keys
                    if key in stored and key in record and _normalised(stored[key]) != _normalised(record[key])]
    if "predictor" in changed_keys and _same_predictor_file(stored, record["predictor"]):
        changed_keys.remove("predictor")
    if "supernet_key" in changed_keys and stored.get("supernet_key") == record.get("supernet_key_before_sharing"):
        changed_keys.remove("supernet_key")
    if "supernet_key" in changed_keys and {"space", "space_config"} & set(changed_keys):
        changed_keys.remove("supernet_key")  # the supernet's key contains the space
    changed = [_supernet_change(stored, record) if key == "supernet_key"
               else _describe_change(key, stored[key], record[key]) for key in changed_keys]
    if changed:
        where = f" (its last run: {stored['run_dir']})" if stored.get("run_dir") else ""
        raise SearchError(
            f"search.study_name={study_name!r} exists in {storage} and was searched with other settings: "
            f"{'; '.join(changed)}. Its trials were scored with those, so new trials would not compare with them. "
            f"Choose a new search.study_name, or resume with the settings of its manifest.json{where}."
        )


def _samplers_used(stored: Any, new: Any, study_name: str) -> Any:
    """Return the study's ``sampler`` record after a run with sampler ``new``: every sampler used, joined by "+"."""
    if not stored or not new:
        return new or stored
    used = str(stored).split("+")
    if str(new) in used:
        return stored
    log.warning("Study %r was searched with search.sampler=%s; this run adds trials drawn by %s, so the study "
                "records both (%s).", study_name, stored, new, "+".join([*used, str(new)]))
    return "+".join([*used, str(new)])


def create_or_load_study(
    storage: str, study_name: str, sampler: optuna.samplers.BaseSampler, record: Mapping[str, Any]
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it to resume when ``study_name`` exists.

    ``record`` (space, data, supernet checkpoint, ...) is stored as study user attributes so that
    ``train.py`` needs only the study. A resumed study must have been made with the same settings
    in :data:`RESUME_KEYS` (:func:`check_resume`). Returns the study and whether it was resumed.
    """
    existing = set(optuna.get_all_study_names(storage=optuna_storage(storage)))
    resumed = study_name in existing
    study = optuna.create_study(
        storage=optuna_storage(storage),
        study_name=study_name,
        sampler=sampler,
        directions=["maximize", "minimize"],
        load_if_exists=True,
    )
    # A worker that started at the same moment may have created the study after the names were read.
    resumed = resumed or "tailnas_format_version" in study.user_attrs
    if resumed:
        check_resume(study.user_attrs, record, study_name, storage)
        log.info("Resuming study %r with %d finished trials", study_name, len(complete_trials(study)))
        record = {**record, "sampler": _samplers_used(study.user_attrs.get("sampler"), record.get("sampler"),
                                                      study_name)}
    study.set_user_attr("tailnas_format_version", STUDY_FORMAT_VERSION)
    for key, value in record.items():
        study.set_user_attr(key, json.loads(json.dumps(value, default=str)))
    return study, resumed


class SearchObjective:
    """The Optuna objective: suggest an architecture, estimate its latency, then judge its accuracy.

    Args:
        space: the search space; its ``choices()`` become categorical parameters.
        accuracy_fn: validation accuracy in [0, 1] of an architecture (supernet slice + BN recalibration).
        latency_fn: latency estimate of an architecture (the predictor).
        latency_budget_ms: if set, trials whose latency exceeds it are infeasible (constraint > 0),
            their accuracy is not computed (reported as 0.0) and they never enter the Pareto front.
        measure_fn: measures an architecture on the device; used when ``uncertainty_threshold`` is set.
        uncertainty_threshold: a candidate whose interval is wider than this share of its latency
            (:attr:`LatencyEstimate.relative_width`) is measured, and the measurement replaces the
            prediction for that trial. The predictor's interval widths differ per architecture, so
            a threshold inside their range measures only the least certain candidates.
        worker: when set, stored as each trial's ``worker`` attribute (``search.worker``).
    """

    def __init__(
        self,
        space: SearchSpace,
        accuracy_fn: Callable[[Arch], float],
        latency_fn: Callable[[Arch], LatencyEstimate],
        latency_budget_ms: float | None = None,
        measure_fn: Callable[[Arch], float] | None = None,
        uncertainty_threshold: float | None = None,
        worker: int | None = None,
    ) -> None:
        latency_budget_ms = check_budget(latency_budget_ms)
        if uncertainty_threshold is not None and measure_fn is None:
            raise SearchError("search.measure_uncertain=true needs a measurement function.")
        if uncertainty_threshold is not None and not uncertainty_threshold > 0:
            raise SearchError(
                f"search.uncertainty_threshold must be a positive share of the latency, for example 0.2, "
                f"but got {uncertainty_threshold}."
            )
        self.space = space
        self.choices = space.choices()
        self.accuracy_fn = accuracy_fn
        self.latency_fn = latency_fn
        self.latency_budget_ms = latency_budget_ms
        self.measure_fn = measure_fn
        self.uncertainty_threshold = uncertainty_threshold
        self.worker = worker

    def suggest_arch(self, trial: optuna.Trial) -> Arch:
        values = {key: trial.suggest_categorical(key, options) for key, options in self.choices.items()}
        # Draws that differ only in values the network ignores are one architecture: recorded once, scored once.
        return self.space.canonical(self.space.arch_from_choices(values))

    def estimate_latency(self, arch: Arch) -> LatencyEstimate:
        estimate = self.latency_fn(arch)
        if self.uncertainty_threshold is not None and estimate.relative_width > self.uncertainty_threshold:
            measured = self.measure_fn(arch)  # type: ignore[misc]
            log.info(
                "Measured %s: interval width %.0f%% > %.0f%%, %.3f ms predicted, %.3f ms measured",
                arch.to_json(), 100 * estimate.relative_width, 100 * self.uncertainty_threshold,
                estimate.latency_ms, measured,
            )
            return LatencyEstimate(measured, measured, measured, "measured")
        return estimate

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        arch = self.suggest_arch(trial)
        earlier = _finished_trial_of(trial.study, arch)
        if earlier is not None:
            return self._repeat(trial, earlier)
        estimate = self.estimate_latency(arch)
        trial.set_user_attr("arch", arch.to_dict())
        trial.set_user_attr("predicted_latency_ms", estimate.latency_ms)
        trial.set_user_attr("latency_interval_ms", [estimate.low_ms, estimate.high_ms])
        trial.set_user_attr("latency_source", estimate.source)
        trial.set_user_attr("macs", self.space.macs(arch))
        trial.set_user_attr("params", self.space.params(arch))
        if self.worker is not None:
            trial.set_user_attr("worker", self.worker)

        excess = 0.0 if self.latency_budget_ms is None else estimate.latency_ms - self.latency_budget_ms
        trial.set_constraint(CONSTRAINT_KEY, excess)
        if excess > 0:
            trial.set_user_attr("accuracy_skipped", True)
            return 0.0, estimate.latency_ms
        return self.accuracy_fn(arch), estimate.latency_ms


    def _repeat(self, trial: optuna.Trial, earlier: optuna.trial.FrozenTrial) -> tuple[float, float]:
        # Samplers redraw architectures they have tried, NSGA-II often in small spaces. The earlier
        # trial's scores are reused: the supernet and the predictor that gave them are the same.
        for key, value in earlier.user_attrs.items():
            if key != "worker":
                trial.set_user_attr(key, value)
        if self.worker is not None:
            trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("repeat_of", earlier.number)
        latency = float(earlier.values[1])
        excess = 0.0 if self.latency_budget_ms is None else latency - self.latency_budget_ms
        trial.set_constraint(CONSTRAINT_KEY, excess)
        return float(earlier.values[0]), latency


def _finished_trial_of(study: optuna.Study, arch: Arch) -> optuna.trial.FrozenTrial | None:
    """Return the first complete trial of ``study`` that scored ``arch``, or None."""
    target = arch.to_dict()
    for earlier in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if earlier.user_attrs.get("arch") == target and earlier.user_attrs.get("repeat_of") is None:
            return earlier
    return None


def stored_measurements(study: optuna.Study, trials: Sequence[optuna.trial.FrozenTrial]) -> dict[int, float]:
    """Return the measured latency (ms) by trial number that earlier runs stored for ``trials``.

    search.py keeps re-measured latencies in the study attribute ``measured_latency_ms``, which
    train.py and nas.compare read too.
    """
    stored = study.user_attrs.get("measured_latency_ms", {})
    return {t.number: float(stored[str(t.number)]) for t in trials if str(t.number) in stored}


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Return the study's finished trials, without copying them."""
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def _feasible_complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    trials = complete_trials(study)
    return [t for t in trials if all(c <= 0 for c in _constraints(t))]


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Return the feasible, non-dominated complete trials (accuracy up, latency down), fastest first.

    Trials with the same architecture count once (the earliest).
    """
    seen: set[str] = set()
    candidates = []
    for trial in _feasible_complete(study):
        key = json.dumps(trial.user_attrs.get("arch"), sort_keys=True)
        if key not in seen:
            seen.add(key)
            candidates.append(trial)

    front = []
    for t in candidates:
        acc, lat = t.values
        dominated = any(
            (o.values[0] >= acc and o.values[1] <= lat) and (o.values[0] > acc or o.values[1] < lat) for o in candidates
        )
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: (t.values[1], -t.values[0]))


# Decimal digits of the knee's distances on the [0, 1]-scaled axes; closer points tie.
KNEE_DIGITS = 9


def knee_index(accuracy: Sequence[float], latency: Sequence[float]) -> int:
    """Return the index of the knee of a front: the point farthest from the line joining its two ends.

    Both axes are scaled to [0, 1] first. With fewer than three points, the most accurate one is returned.
    """
    n = len(accuracy)
    if n == 0:
        raise SearchError("The Pareto front is empty, so it has no knee.")
    if n < 3:
        return max(range(n), key=lambda i: (accuracy[i], -latency[i]))
    a_lo, a_hi = min(accuracy), max(accuracy)
    l_lo, l_hi = min(latency), max(latency)
    xs = [(lat - l_lo) / ((l_hi - l_lo) or 1.0) for lat in latency]
    ys = [(acc - a_lo) / ((a_hi - a_lo) or 1.0) for acc in accuracy]
    # The chord's ends: the most accurate of the fastest points and the most accurate of the slowest.
    first = min(range(n), key=lambda i: (xs[i], -ys[i]))
    last = max(range(n), key=lambda i: (xs[i], ys[i]))
    dx, dy = xs[last] - xs[first], ys[last] - ys[first]
    norm = math.hypot(dx, dy) or 1.0
    # Distance above the chord: the knee gains the most accuracy per unit of latency. Among equal
    # distances the faster point wins, then the more accurate. So a front with no point above the
    # chord gets its fastest end, and a front at one latency its most accurate point. Distances are
    # rounded first, so that float rounding on a straight front does not pick a point in its middle.
    distances = [round((dx * (ys[i] - ys[first]) - dy * (xs[i] - xs[first])) / norm, KNEE_DIGITS) for i in range(n)]
    return max(range(n), key=lambda i: (distances[i], -latency[i], accuracy[i]))


def latest_study_name(storage: str) -> str:
    """Return the name of the most recently started TailNAS study in ``storage``."""
    summaries = optuna.get_all_study_summaries(storage=optuna_storage(storage), include_best_trial=False)
    ours = [s for s in summaries if "tailnas_format_version" in s.user_attrs and s.datetime_start is not None]
    if not ours:
        raise SearchError(f"No TailNAS study found in {storage}; run `python search.py +space=resnet` first.")
    return max(ours, key=lambda s: s.datetime_start).study_name
