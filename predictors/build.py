"""Profile a space on this device, train the latency predictor, evaluate it and cache it on disk.

The predictor for a space, device, protocol and predictor config lives at
``<work_dir>/predictors/<fingerprint_id>/<space.name>-<space.config_hash()>-b<batch_size>-<settings>.json``
(:func:`predictor_path`), with its evaluation report beside it (same name, ``.report.json``). A
seeded share of the measured subnets (``predictor.holdout_fraction``) is held out: it is never used
in training, and the report compares the predictor and the baselines on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nas.files import write_json_atomic
from nas.spaces.base import SearchSpace
from predictors.evaluate import group_subnet_records, holdout_report
from predictors.features import HardwareFacts
from predictors.protocol import TIMING_KEYS, timing_value
from predictors.xgb import (
    MIN_TRAIN_SUBNETS,
    REBUILD_HINT,
    LatencyPredictor,
    PredictorError,
    PredictorNotFoundError,
    PredictorVersionError,
    XGBParams,
)

__all__ = [
    "NON_MODEL_KEYS",
    "PredictorConfig",
    "REPORT_FORMAT_VERSION",
    "hardware_facts_from_fingerprint",
    "load_or_build_predictor",
    "predictor_path",
    "split_holdout",
]

logger = logging.getLogger(__name__)

REPORT_FORMAT_VERSION = 1
# Below this share of pass-to-pass agreement within 10%, the build warns that measurements are too noisy.
NOISY_WITHIN_10PCT = 0.9


# PredictorConfig keys that choose how a predictor is found or trusted, not the model it trains.
NON_MODEL_KEYS = ("rebuild", "path", "allow_fingerprint_mismatch")


@dataclass(frozen=True)
class PredictorConfig:
    """The ``predictor`` config group (``conf/predictor/xgb.yaml``); see that file for each key."""

    name: str = "xgb"
    n_subnets: int = 240
    passes: int = 2
    width_step: int = 8
    holdout_fraction: float = 0.25
    interval: float = 0.9
    conformal_folds: int = 5
    rebuild: bool = False
    path: str | None = None
    allow_fingerprint_mismatch: bool = False
    layer_model: dict[str, Any] = field(default_factory=dict)
    network_model: dict[str, Any] = field(default_factory=lambda: {"n_estimators": 300, "max_depth": 3})

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PredictorConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise PredictorError(f"Unknown keys {unknown} in predictor config; allowed keys are {names}.")
        config = cls(**dict(data))
        if config.name != "xgb":
            raise PredictorError(f"predictor.name must be 'xgb', the only predictor, but got {config.name!r}.")
        if not 0.0 < config.holdout_fraction < 1.0:
            raise PredictorError(f"predictor.holdout_fraction must be in (0, 1), for example 0.25, but got {config.holdout_fraction}.")
        smallest = smallest_n_subnets(config.holdout_fraction)
        if isinstance(config.n_subnets, bool) or not isinstance(config.n_subnets, int) or config.n_subnets < smallest:
            raise PredictorError(
                f"predictor.n_subnets must be a whole number >= {smallest}, so that {MIN_TRAIN_SUBNETS} subnets train "
                f"the predictor after predictor.holdout_fraction={config.holdout_fraction} is held out, but got "
                f"{config.n_subnets!r}."
            )
        if not 0.0 < config.interval < 1.0:
            raise PredictorError(f"predictor.interval must be in (0, 1), for example 0.9, but got {config.interval}.")
        XGBParams.from_mapping(config.layer_model, "predictor.layer_model")
        XGBParams.from_mapping(config.network_model, "predictor.network_model")
        return config

    def training_hash(self) -> str:
        """Return a hash of the keys that change the trained model (not ``rebuild``, ``path`` or the override)."""
        relevant = {k: v for k, v in dataclasses.asdict(self).items() if k not in NON_MODEL_KEYS}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def smallest_n_subnets(holdout_fraction: float) -> int:
    """Return the fewest subnets that leave MIN_TRAIN_SUBNETS for training after :func:`split_holdout`."""
    n = MIN_TRAIN_SUBNETS + 1
    while n - min(n - 1, max(1, int(round(holdout_fraction * n)))) < MIN_TRAIN_SUBNETS:
        n += 1
    return n


def hardware_facts_from_fingerprint(fingerprint: Mapping[str, Any]) -> HardwareFacts:
    """Return the feature facts of a device fingerprint (:func:`predictors.fingerprint.device_fingerprint`)."""
    from predictors.fingerprint import simd_width_floats

    if fingerprint.get("device_type") == "cuda":
        return HardwareFacts(device="cuda", sm_count=int(fingerprint["gpu_sm_count"]))
    return HardwareFacts(device="cpu", simd_width=simd_width_floats(dict(fingerprint)), threads=int(fingerprint.get("threads") or 1))


def predictor_path(work_dir: Path, fingerprint_id: str, space: SearchSpace, protocol: Any,
                   config: PredictorConfig, threads_used: int | None = None) -> Path:
    """Return where the predictor for ``space`` under ``protocol``, built with ``config``, is cached.

    The name ends with a hash of the measurement settings and the training settings, so
    predictors built with other settings sit side by side instead of replacing each other. With
    ``hardware.threads`` null, torch's thread count at the time (``threads_used``) counts as a
    setting too on the CPU: it follows ``OMP_NUM_THREADS`` and CPU quotas, and it changes every latency.
    """
    described: dict[str, Any] = {"protocol": protocol.to_dict(), "training": config.training_hash()}
    if protocol.uses_torch_threads:
        described["threads_used"] = threads_used
    settings = json.dumps(described, sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:8]
    name = f"{space.name}-{space.config_hash()}-b{protocol.batch_size}-{digest}.json"
    return Path(work_dir) / "predictors" / fingerprint_id / name


def _report_path(path: Path) -> Path:
    return path.with_name(path.stem + ".report.json")


def split_holdout(keys: list[str], fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Split subnet keys into (train, held out) with a seeded permutation; at least one subnet is held out."""
    ordered = sorted(keys)
    n_test = min(len(ordered) - 1, max(1, int(round(fraction * len(ordered)))))
    permutation = np.random.default_rng([seed, 2]).permutation(len(ordered))
    test = {ordered[i] for i in permutation[:n_test]}
    return set(ordered) - test, test


def _load_cached(
    path: Path, fingerprint: Mapping[str, Any], config: PredictorConfig, space: SearchSpace, protocol: Any,
    quiet: bool = False,
) -> tuple[LatencyPredictor, dict[str, Any]] | None:
    """Return the cached predictor and report when both exist and were built with this configuration.

    ``quiet`` leaves out the log lines about a rebuild, for a second look after waiting for the lock.
    """
    if not path.is_file() or config.rebuild:
        return None
    try:
        predictor = LatencyPredictor.load(path, fingerprint, config.allow_fingerprint_mismatch)
    except PredictorVersionError as err:
        if not isinstance(err.found, int) or err.found >= LatencyPredictor.format_version:
            raise
        # An older format in the work directory is derived data: the profile store it came from is kept,
        # so rebuilding costs a training run, not a profiling run.
        if not quiet:
            logger.warning("Rebuilding %s: it has predictor format_version %d, this TailNAS writes %d.",
                           path, err.found, LatencyPredictor.format_version)
        return None
    training = predictor.metadata.get("training", {})
    stale = {
        "space_hash": (predictor.metadata.get("space_hash"), space.config_hash()),
        "protocol": (predictor.metadata.get("protocol"), protocol.to_dict()),
        "config_hash": (training.get("config_hash"), config.training_hash()),
    }
    if protocol.device == "cpu":
        stale["threads used"] = (_threads_used(predictor.metadata), fingerprint.get("threads"))
    changed = [name for name, (stored, current) in stale.items() if stored != current]
    if changed:
        if not quiet:
            logger.info("Rebuilding %s because %s changed since it was built.", path, changed)
        return None
    report_path = _report_path(path)
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    logger.info("Reusing latency predictor %s.", path)
    return predictor, report


def _threads_used(metadata: Mapping[str, Any]) -> int | None:
    """Return the CPU thread count a predictor's measurements ran with, from its stored fingerprint."""
    fingerprint = metadata.get("fingerprint")
    return fingerprint.get("threads") if isinstance(fingerprint, Mapping) else None


# The fix for a broken file given as predictor.path. Rebuilding never touches that file.
PATH_HINT = "unset predictor.path to build or reuse this space's own predictor, or name a valid file"


def _load_given(path: Path, fingerprint: Mapping[str, Any], config: PredictorConfig, space: SearchSpace,
                protocol: Any) -> LatencyPredictor:
    """Load the file named by ``predictor.path`` and check that it predicts under this measurement protocol.

    A predictor of other :data:`predictors.protocol.TIMING_KEYS` (device type, runtime, batch size,
    threads, dtype) predicts other latencies, so that is an error. One built for another space can
    still predict this space's layers, so that is only a warning.
    """
    try:
        predictor = LatencyPredictor.load(path, fingerprint, config.allow_fingerprint_mismatch)
    except PredictorNotFoundError:
        raise
    except PredictorVersionError as err:
        raise PredictorVersionError(str(err).replace(REBUILD_HINT, PATH_HINT), err.found) from err
    except PredictorError as err:
        raise PredictorError(str(err).replace(REBUILD_HINT, PATH_HINT)) from err
    stored = predictor.metadata.get("protocol")
    current = protocol.to_dict()
    differing = [] if not isinstance(stored, Mapping) else [
        key for key in TIMING_KEYS if timing_value(stored, key) != timing_value(current, key)
    ]
    if differing:
        raise PredictorError(
            f"predictor.path={str(path)!r} was built for other measurement settings: "
            + ", ".join(f"hardware.{key} {stored.get(key)!r} there, {current.get(key)!r} here" for key in differing)
            + f". Run with those settings, or {PATH_HINT}."
        )
    built_threads = _threads_used(predictor.metadata)
    if protocol.device == "cpu" and built_threads is not None and built_threads != fingerprint.get("threads"):
        raise PredictorError(
            f"predictor.path={str(path)!r} was built with {built_threads} CPU threads, and torch uses "
            f"{fingerprint.get('threads')} here (hardware.threads={protocol.threads!r}). Set hardware.threads="
            f"{built_threads}, or {PATH_HINT}."
        )
    if predictor.metadata.get("space_hash") not in (None, space.config_hash()):
        logger.warning("predictor.path=%s was built for space %r with another configuration than this %r space; "
                       "it predicts this space's layers, but was checked on its own subnets only.", path,
                       predictor.metadata.get("space"), space.name)
    return predictor


def load_or_build_predictor(
    space: SearchSpace,
    protocol: Any,
    predictor_cfg: Mapping[str, Any],
    work_dir: str | Path,
    seed: int,
    progress: bool = True,
) -> tuple[LatencyPredictor, dict[str, Any], Path]:
    """Return a latency predictor for ``space`` under ``protocol``, with its report and file path.

    Order: ``predictor.path`` when set (loaded, fingerprint-checked); else the cached file when it
    matches the space, protocol and predictor config and ``predictor.rebuild`` is false; else
    profile (resuming the profile store), train, evaluate on held-out subnets and save.

    Args:
        space: the search space.
        protocol: a :class:`predictors.protocol.MeasurementProtocol`.
        predictor_cfg: the ``predictor`` config node as a plain mapping.
        work_dir: holds ``profiles/`` and ``predictors/``.
        seed: seeds subnet sampling, the held-out split and the models.
        progress: show progress bars while profiling.

    Returns:
        ``(predictor, report, path)``. The report has the held-out metrics of the predictor at the
        top level (``within_10pct``, ``within_5pct``, ``mape``, ``kendall_tau``,
        ``interval_coverage_90``), ``baselines``, ``noise_floor``, ``n_train``, ``n_test``,
        ``profile_s``, ``fit_s`` and ``build_s`` (seconds). A reused predictor returns its stored
        report with ``reused`` true: its times are those of the run that built it.
    """
    from predictors.fingerprint import device_fingerprint, fingerprint_id
    from predictors.store import ProfileStore

    config = PredictorConfig.from_mapping(predictor_cfg)
    fingerprint = device_fingerprint(protocol)
    if config.path is not None:
        path = Path(config.path)
        predictor = _load_given(path, fingerprint, config, space, protocol)
        report_path = _report_path(path)
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        return predictor, {**report, "reused": True}, path

    path = predictor_path(Path(work_dir), fingerprint_id(fingerprint), space, protocol, config,
                          fingerprint.get("threads"))
    cached = _load_cached(path, fingerprint, config, space, protocol)
    if cached is not None:
        return cached[0], {**cached[1], "reused": True}, path
    # One run at a time profiles a device: two at once would time each other's work. A run that
    # waited looks for the predictor again, which the run before it may have built.
    with ProfileStore(Path(work_dir) / "profiles", dict(fingerprint)).profiling_lock():
        cached = _load_cached(path, fingerprint, config, space, protocol, quiet=True)
        if cached is not None:
            return cached[0], {**cached[1], "reused": True}, path
        predictor, report = build_predictor(space, protocol, config, Path(work_dir), fingerprint, seed, progress)
        predictor.save(path)
        write_json_atomic(_report_path(path), {"format_version": REPORT_FORMAT_VERSION, **report})
    return predictor, report, path


def build_predictor(
    space: SearchSpace,
    protocol: Any,
    config: PredictorConfig,
    work_dir: Path,
    fingerprint: Mapping[str, Any],
    seed: int,
    progress: bool = True,
) -> tuple[LatencyPredictor, dict[str, Any]]:
    """Profile ``space`` into ``work_dir/profiles``, train on the training subnets and evaluate on the held-out ones."""
    from predictors.profiling import profile_space, sample_subnets
    from predictors.store import ProfileStore, arch_key

    started = time.perf_counter()
    store = ProfileStore(work_dir / "profiles", dict(fingerprint))
    summary = profile_space(space, store, protocol, config.n_subnets, seed, config.passes, config.width_step, progress)
    profile_s = time.perf_counter() - started

    batch_size = protocol.batch_size
    # The subnets of this n_subnets and seed only, so that the predictor does not depend on what
    # other runs left in the store.
    sampled = {arch_key(arch.to_dict()) for arch in sample_subnets(space, config.n_subnets, seed)}
    subnet_records = [r for r in store.subnet_records(space.config_hash(), batch_size, source="profile")
                      if r["key"] in sampled]
    train_keys, test_keys = split_holdout(sorted({r["key"] for r in subnet_records}), config.holdout_fraction, seed)
    metadata = {
        "fingerprint": dict(fingerprint),
        "protocol": protocol.to_dict(),
        "space": space.name,
        "space_hash": space.config_hash(),
        "training": {"config_hash": config.training_hash(), "config": dataclasses.asdict(config), "seed": seed,
                     "holdout_keys": sorted(test_keys), "train_keys": sorted(train_keys)},
    }
    predictor = LatencyPredictor(
        XGBParams.from_mapping(config.layer_model, "predictor.layer_model"),
        XGBParams.from_mapping(config.network_model, "predictor.network_model"),
        config.interval, config.conformal_folds, seed, metadata,
    )
    fit_started = time.perf_counter()
    layer_records = store.layer_records(batch_size)
    predictor.fit(layer_records, [r for r in subnet_records if r["key"] in train_keys], hardware_facts_from_fingerprint(fingerprint), batch_size)
    fit_s = time.perf_counter() - fit_started

    grouped = group_subnet_records(subnet_records)
    report = holdout_report(
        predictor,
        [s for s in grouped if s["key"] in train_keys],
        [s for s in grouped if s["key"] in test_keys],
        store.layer_table(batch_size),
        store.noise_floor(space.config_hash(), batch_size),
    )
    report.update(
        profile_s=round(profile_s, 2), fit_s=round(fit_s, 2), build_s=round(time.perf_counter() - started, 2),
        n_layers=len({r["key"] for r in layer_records}), profile=summary.to_dict(),
    )
    noise = report.get("noise_floor") or {}
    if noise.get("within_10pct") is not None and noise["within_10pct"] < NOISY_WITHIN_10PCT:
        threads_fix = "" if protocol.threads == 1 else ", or set hardware.threads=1 when other processes share the CPU"
        logger.warning(
            "Only %.0f%% of the subnets measured twice agree within 10%% between passes, so latency on this "
            "device is too noisy for an accurate predictor. Profile on a quiet machine%s, then rebuild with "
            "predictor.rebuild=true.",
            100 * noise["within_10pct"], threads_fix,
        )
    logger.info(
        "Latency predictor for %s: within 10%% %.3f, within 5%% %.3f, Kendall tau %s on %d held-out subnets "
        "(MACs-linear within 10%% %.3f); built in %.1f s.",
        space.name, report["within_10pct"], report["within_5pct"],
        "-" if report["kendall_tau"] is None else f"{report['kendall_tau']:.3f}", report["n_test"],
        report["macs_within_10pct"], report["build_s"],
    )
    return predictor, report
