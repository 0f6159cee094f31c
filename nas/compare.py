"""Side-by-side comparison of studies: ``python -m nas.compare STUDY [STUDY ...]`` or ``--all``.

Each study that search.py wrote gets one row: sampler, space, finished trials, Pareto size, best
accuracy, fastest Pareto latency, hypervolume and, for each ``--budgets-ms`` value, the best
accuracy within that latency. The Pareto front is the one search.py and train.py use
(:func:`nas.search.pareto_trials`). Each Pareto subnet's latency is the measured one where the
study stores a measurement (search.py's re-measurement, or a measurement during the search when
the prediction was uncertain), else the predicted one, and the outputs name the source.

Hypervolume, in accuracy x ms: the area that a front dominates in the (latency, accuracy) plane,
above accuracy 0 and left of one reference latency. It is the union of the rectangles
[latency, reference) x [0, accuracy] over the Pareto subnets. All compared studies share one
reference: ``--reference-ms``, else 1.1 times the slowest Pareto latency among them, so the
slowest subnet still adds a strip. Subnets at or beyond the reference add nothing. The values of
two runs of this command are comparable only with the same reference.

A study without a recorded space was not written by search.py. It is skipped with a warning, so
``--all`` works on a storage that other programs share, and the command fails only when no study
is left. A study without a feasible finished trial has an empty front: its row shows no accuracy
or latency and a hypervolume of 0.

Outputs in ``--out`` (default ``outputs/compare/<date>_<time>``): ``compare.csv`` (the table),
``fronts.csv`` (every Pareto subnet of every study) and ``fronts.png`` (the fronts overlaid).
``--wandb`` logs them as one Weights & Biases run with job type "compare".
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml

from nas.compare_output import budget_column, log_to_wandb, plot_fronts, print_table, write_csv
from nas.search import complete_trials, optuna_storage, pareto_trials, stored_measurements

__all__ = [
    "COMPARE_COLUMNS",
    "FRONT_COLUMNS",
    "CompareError",
    "FrontPoint",
    "StudySummary",
    "hypervolume",
    "default_storage_url",
    "select_study_names",
    "summarize_study",
    "shared_reference_latency",
    "comparison_rows",
    "main",
]

log = logging.getLogger("tailnas.compare")

COMPARE_COLUMNS = (
    "study", "sampler", "space", "trials_finished", "pareto_size", "best_accuracy", "fastest_latency_ms",
    "fastest_latency_source", "front_latency_source", "hypervolume", "reference_latency_ms",
)
FRONT_COLUMNS = ("study", "trial", "arch", "accuracy", "predicted_latency_ms", "measured_latency_ms", "macs", "params")
REFERENCE_FACTOR = 1.1
# Optuna's GA samplers store each trial's generation under "<sampler class>:generation" (Optuna 5.1).
NSGA2_GENERATION_KEY = "NSGAIISampler:generation"


class CompareError(ValueError):
    """A comparison that cannot run as requested. The message names the value and the fix."""


@dataclass(frozen=True)
class FrontPoint:
    """One Pareto subnet of a study, with latencies in ms and accuracy in [0, 1]."""

    study: str
    trial: int
    arch: Any
    accuracy: float
    predicted_latency_ms: float | None
    measured_latency_ms: float | None
    macs: int | None
    params: int | None

    @property
    def latency_ms(self) -> float:
        """Latency the comparison uses: the measured one where it exists."""
        if self.measured_latency_ms is not None:
            return self.measured_latency_ms
        return self.predicted_latency_ms  # type: ignore[return-value]

    @property
    def latency_source(self) -> str:
        return "measured" if self.measured_latency_ms is not None else "predicted"


@dataclass(frozen=True)
class StudySummary:
    """A study's sampler, space, finished-trial count and Pareto front (fastest first)."""

    name: str
    sampler: str
    space: str
    trials_finished: int
    front: tuple[FrontPoint, ...]
    # The space as configured, without its tail_aware switch: the part that comparable studies share.
    space_config: str = ""
    # The hardware.* settings that change a latency (device, runtime, batch size, threads, dtype), as recorded.
    timing: str = ""
    # The dataset the accuracies come from: data.name, and data.root where it has one.
    data: str = ""

    @property
    def best_accuracy(self) -> float | None:
        return max((p.accuracy for p in self.front), default=None)

    @property
    def fastest(self) -> FrontPoint | None:
        return min(self.front, key=lambda p: (p.latency_ms, -p.accuracy), default=None)

    @property
    def latency_source(self) -> str | None:
        """Latency source of the front: "measured" or "predicted" when every subnet has it, else "mixed".

        None for an empty front.
        """
        sources = {p.latency_source for p in self.front}
        if not sources:
            return None
        return sources.pop() if len(sources) == 1 else "mixed"

    def best_accuracy_within(self, budget_ms: float) -> float | None:
        return max((p.accuracy for p in self.front if p.latency_ms <= budget_ms), default=None)


def hypervolume(points: Iterable[tuple[float, float]], reference_latency: float) -> float:
    """Return the area that (accuracy, latency) points dominate above accuracy 0 and left of ``reference_latency``."""
    area = 0.0
    best_accuracy = 0.0
    for latency, accuracy in sorted((lat, acc) for acc, lat in points if lat < reference_latency):
        # Sweep from fast to slow; each point adds the strip between it and the reference latency
        # that the faster points do not already cover.
        if accuracy > best_accuracy:
            area += (accuracy - best_accuracy) * (reference_latency - latency)
            best_accuracy = accuracy
    return area


# -- storage and studies -----------------------------------------------------------------------


def default_storage_url() -> str:
    """Return search.py's default storage: ``studies.db`` in ``$TAILNAS_WORK_DIR``, else in ``./work``."""
    work_dir = Path(os.environ.get("TAILNAS_WORK_DIR") or Path.cwd() / "work")
    return f"sqlite:///{work_dir / 'studies.db'}"


def display_url(storage: str) -> str:
    """Return ``storage`` with any password replaced by ``***``, for messages and run configs."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except ArgumentError:
        return storage


def _check_sqlite_file(storage: str) -> None:
    # SQLAlchemy and Optuna's journal storage create a missing file, which would turn a wrong path into
    # an empty storage.
    if storage.startswith("journal:///"):
        path = storage.removeprefix("journal://")
    elif storage.startswith("sqlite:///"):
        path = storage[len("sqlite:///"):].split("?", 1)[0]
    else:
        return
    if path and path != ":memory:" and not Path(path).is_file():
        raise CompareError(
            f"No Optuna storage at {path}: the file does not exist. Run `python search.py +space=resnet` "
            "first, or pass --storage URL (the search.storage of your searches)."
        )


def select_study_names(storage: str, names: Sequence[str], all_studies: bool) -> list[str]:
    """Return the studies to compare, in the order given, or with ``all_studies`` every study in storage order.

    Raises:
        CompareError: a name is not in the storage (the message lists the studies there), or the
            storage cannot be opened or has no study.
    """
    _check_sqlite_file(storage)
    from sqlalchemy.exc import SQLAlchemyError

    try:
        existing = optuna.get_all_study_names(storage=optuna_storage(storage))
    except SQLAlchemyError as err:
        raise CompareError(
            f"Failed to open the Optuna storage {display_url(storage)}: {err}. Check the --storage URL."
        ) from err
    if not existing:
        raise CompareError(
            f"The storage {display_url(storage)} has no study. Run `python search.py +space=resnet` first."
        )
    if all_studies:
        return list(existing)

    unknown = [name for name in names if name not in existing]
    if unknown:
        hint = ""
        if "=" in unknown[0]:
            hint = (" nas.compare takes study names and options such as --storage and --wandb, not Hydra "
                    "overrides like search.py's.")
        raise CompareError(
            f"Study {unknown[0]!r} not found in {display_url(storage)}. Studies there: {sorted(existing)}.{hint}"
        )
    return list(dict.fromkeys(names))


def study_sampler(study: optuna.Study) -> str:
    """Return the name of the sampler that search.py used for ``study``, or "unknown".

    search.py records the sampler in the study (user attribute ``sampler``). For studies written
    before it did, the name comes from the Hydra config in the study's run directory
    (``<run_dir>/.hydra/config.yaml``, key ``search.sampler``), and for a resumed study that is the
    latest run. Without that file, the generation numbers that NSGA-II stores on trials identify it,
    but TPE and random sampling leave no such mark.
    """
    if study.user_attrs.get("sampler"):
        return str(study.user_attrs["sampler"])
    run_dir = study.user_attrs.get("run_dir")
    config_path = Path(run_dir) / ".hydra" / "config.yaml" if run_dir else None
    if config_path is not None and config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
            sampler = (config.get("search") or {}).get("sampler")
        except (OSError, yaml.YAMLError, AttributeError) as err:
            log.warning("Failed to read the sampler of study %r from %s: %s", study.study_name, config_path, err)
            sampler = None
        if sampler:
            return str(sampler)

    if any(NSGA2_GENERATION_KEY in t.system_attrs for t in study.get_trials(deepcopy=False)):
        return "nsga2"
    return "unknown"


# Added to the space name of a study searched with space.tail_aware=true.
TAIL_AWARE_SUFFIX = " (tail-aware)"


def _space_name(record: Mapping[str, Any]) -> str:
    space = record.get("space") or {}
    name = str(record.get("space_name") or space.get("name") or space.get("family") or "unknown")
    return f"{name}{TAIL_AWARE_SUFFIX}" if space.get("tail_aware") else name


def _front_point(study: optuna.Study, trial: optuna.trial.FrozenTrial, remeasured: Mapping[int, float]) -> FrontPoint:
    attrs = trial.user_attrs
    searched_ms = float(trial.values[1])
    # With search.measure_uncertain, the search measured this subnet in place of a prediction.
    if attrs.get("latency_source") == "measured":
        predicted, measured = None, searched_ms
    else:
        predicted, measured = searched_ms, None
    if trial.number in remeasured:
        measured = remeasured[trial.number]
    return FrontPoint(
        study=study.study_name, trial=trial.number, arch=attrs.get("arch"), accuracy=float(trial.values[0]),
        predicted_latency_ms=predicted, measured_latency_ms=measured, macs=attrs.get("macs"),
        params=attrs.get("params"),
    )


def summarize_study(study: optuna.Study) -> StudySummary | None:
    """Summarize a study that search.py wrote. Returns None, with a warning, for a study without a recorded space."""
    record = study.user_attrs
    if "space" not in record:
        log.warning("Skipping study %r: it has no recorded space, so search.py did not write it.", study.study_name)
        return None

    trials = pareto_trials(study)
    remeasured = stored_measurements(study, trials)
    front = [_front_point(study, t, remeasured) for t in trials]
    if not front:
        log.warning("Study %r has no feasible finished trial, so its Pareto front is empty.", study.study_name)
    finished = complete_trials(study)
    return StudySummary(
        name=study.study_name, sampler=study_sampler(study), space=_space_name(record),
        trials_finished=len(finished), front=tuple(sorted(front, key=lambda p: (p.latency_ms, -p.accuracy))),
        space_config=_space_config_key(record), timing=_timing_key(record), data=_data_key(record),
    )


def _timing_key(record: dict[str, Any]) -> str:
    from predictors.protocol import TIMING_KEYS, timing_value

    hardware = record.get("hardware")
    if not isinstance(hardware, dict):
        return ""
    return ", ".join(f"{key}={timing_value(hardware, key)}" for key in TIMING_KEYS)


def _data_key(record: Mapping[str, Any]) -> str:
    data = record.get("data")
    if not isinstance(data, Mapping):
        return ""
    return f"{data.get('name')} at {data['root']}" if data.get("root") else str(data.get("name"))


def _space_config_key(record: Mapping[str, Any]) -> str:
    config = record.get("space_config", record.get("space"))
    if not isinstance(config, Mapping):
        return ""
    return json.dumps({k: v for k, v in config.items() if k != "tail_aware"}, sort_keys=True, default=str)


def load_summaries(storage: str, names: Sequence[str]) -> list[StudySummary]:
    """Load and summarize each named study, leaving out those that search.py did not write."""
    summaries = []
    for name in names:
        summary = summarize_study(optuna.load_study(study_name=name, storage=optuna_storage(storage)))
        if summary is not None:
            summaries.append(summary)
    if not summaries:
        raise CompareError(
            f"None of the studies {list(names)} was written by search.py (none has a recorded space), "
            "so there is nothing to compare."
        )
    return summaries


# -- the table ---------------------------------------------------------------------------------


def shared_reference_latency(summaries: Sequence[StudySummary], requested_ms: float | None = None) -> float | None:
    """Return ``requested_ms``, else 1.1 times the slowest Pareto latency of all studies.

    None when no reference was requested and every front is empty.
    """
    if requested_ms is not None:
        return requested_ms
    latencies = [p.latency_ms for s in summaries for p in s.front]
    return REFERENCE_FACTOR * max(latencies) if latencies else None


def comparison_rows(summaries: Sequence[StudySummary], reference_ms: float | None,
                    budgets_ms: Sequence[float] = ()) -> list[dict[str, Any]]:
    """Return one row per study with :data:`COMPARE_COLUMNS` and one ``best_accuracy_within_<B>ms`` per budget."""
    rows = []
    for s in summaries:
        fastest = s.fastest
        area = None
        if reference_ms is not None:
            area = hypervolume([(p.accuracy, p.latency_ms) for p in s.front], reference_ms)
        row = {
            "study": s.name, "sampler": s.sampler, "space": s.space, "trials_finished": s.trials_finished,
            "pareto_size": len(s.front), "best_accuracy": s.best_accuracy,
            "fastest_latency_ms": fastest.latency_ms if fastest else None,
            "fastest_latency_source": fastest.latency_source if fastest else None,
            "front_latency_source": s.latency_source, "hypervolume": area, "reference_latency_ms": reference_ms,
        }
        for budget in budgets_ms:
            row[budget_column(budget)] = s.best_accuracy_within(budget)
        rows.append(row)
    return rows


def front_rows(summaries: Sequence[StudySummary]) -> list[dict[str, Any]]:
    """Return every Pareto subnet of every study as a row with :data:`FRONT_COLUMNS`."""
    return [{column: getattr(p, column) for column in FRONT_COLUMNS} for s in summaries for p in s.front]


def warn_mixed_sources(summaries: Sequence[StudySummary]) -> None:
    """Warn when the compared fronts do not all use the same latency source."""
    sources = {s.name: s.latency_source for s in summaries if s.latency_source is not None}
    if len(set(sources.values())) > 1:
        log.warning(
            "The fronts use different latency sources (%s), so their hypervolumes compare measured with predicted "
            "latency. Studies searched with search.remeasure=true have measured fronts.",
            ", ".join(f"{name}: {source}" for name, source in sources.items()),
        )


def warn_incomparable(summaries: Sequence[StudySummary], reference_ms: float | None) -> None:
    """Warn when the studies searched different spaces or data, timed with different hardware settings, or the
    reference lies left of every front."""
    # A tail-aware search of a space searches that space too.
    spaces = {s.name: s.space.removesuffix(TAIL_AWARE_SUFFIX) for s in summaries}
    if len(set(spaces.values())) > 1:
        log.warning("The studies searched different spaces (%s), so their accuracies and latencies belong to "
                    "different networks; compare studies of one space to compare search settings.",
                    ", ".join(f"{name}: {space}" for name, space in spaces.items()))
    elif len({s.space_config for s in summaries if s.space_config}) > 1:
        log.warning("The studies searched the %s space with different settings (stages, resolutions or others "
                    "besides tail_aware), so their fronts cover different networks.", summaries[0].space)
    datasets = {s.name: s.data for s in summaries if s.data}
    if len(set(datasets.values())) > 1:
        log.warning("The studies searched on different data (%s), so their accuracies do not compare.",
                    "; ".join(f"{name}: {data}" for name, data in datasets.items()))
    timings = {s.name: s.timing for s in summaries if s.timing}
    if len(set(timings.values())) > 1:
        log.warning("The studies timed latency with different hardware settings (%s), so their latencies and "
                    "hypervolumes compare the settings as well as the searches.",
                    "; ".join(f"{name}: {timing}" for name, timing in timings.items()))
    fastest = [s.fastest.latency_ms for s in summaries if s.fastest is not None]
    if reference_ms is not None and fastest and reference_ms <= min(fastest):
        log.warning("The hypervolume reference of %.4f ms lies left of every front (fastest subnet %.4f ms), so "
                    "every hypervolume is 0. Raise --reference-ms or leave it out.", reference_ms, min(fastest))


# -- command line ------------------------------------------------------------------------------


def _positive_ms(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a latency in ms, but got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive latency in ms, but got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nas.compare",
        description="Compare TailNAS studies side by side: a table, compare.csv, fronts.csv and fronts.png.",
    )
    parser.add_argument("studies", nargs="*", metavar="STUDY", help="study names to compare")
    parser.add_argument("--all", action="store_true", help="compare every study in the storage")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna storage URL (default: sqlite:///<work dir>/studies.db, where the work dir is "
                             "$TAILNAS_WORK_DIR or ./work, as in search.py)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="output folder (default: outputs/compare/<date>_<time>)")
    parser.add_argument("--budgets-ms", type=_positive_ms, nargs="+", default=[], metavar="MS",
                        help="latency budgets in ms; the table gets a column with the best accuracy within each")
    parser.add_argument("--reference-ms", type=_positive_ms, default=None, metavar="MS",
                        help="hypervolume reference latency in ms (default: 1.1 x the slowest Pareto latency)")
    parser.add_argument("--wandb", action="store_true",
                        help="log the comparison as one Weights & Biases run (offline unless you are logged in)")
    parser.add_argument("--wandb-project", default="tailnas", metavar="NAME", help="W&B project (default: tailnas)")
    return parser


def run(args: argparse.Namespace) -> Path:
    """Compare the studies that ``args`` names, print the table and write the outputs. Returns the output folder."""
    if args.all and args.studies:
        raise CompareError("Pass study names or --all, not both.")
    if not args.all and not args.studies:
        raise CompareError("No study given. Pass study names (python -m nas.compare STUDY [STUDY ...]) or --all.")
    storage = args.storage or default_storage_url()
    budgets_ms = list(dict.fromkeys(args.budgets_ms))
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    names = select_study_names(storage, args.studies, args.all)
    summaries = load_summaries(storage, names)
    reference_ms = shared_reference_latency(summaries, args.reference_ms)
    warn_mixed_sources(summaries)
    warn_incomparable(summaries, reference_ms)
    rows = comparison_rows(summaries, reference_ms, budgets_ms)
    fronts = front_rows(summaries)

    out_dir = args.out or Path("outputs") / "compare" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "compare.csv", rows, [*COMPARE_COLUMNS, *(budget_column(b) for b in budgets_ms)])
    write_csv(out_dir / "fronts.csv", fronts, FRONT_COLUMNS)
    plot_fronts(out_dir / "fronts.png", summaries, reference_ms, budgets_ms)
    if args.wandb:
        reference = None if reference_ms is None else round(reference_ms, 6)
        run_config = {"studies": [s.name for s in summaries], "storage": display_url(storage),
                      "reference_latency_ms": reference, "budgets_ms": budgets_ms, "out_dir": str(out_dir)}
        try:
            log_to_wandb(out_dir, rows, fronts, run_config, args.wandb_project)
        except ImportError as err:
            raise CompareError(f"--wandb requires the wandb package, which failed to import ({err}). "
                               "Install it with `pip install wandb`.") from err

    print_table(rows, budgets_ms, reference_ms)
    empty = [s.name for s in summaries if not s.front]
    if empty:
        print(f"Empty Pareto fronts (no feasible finished trial): {', '.join(empty)}.")
    print(f"Wrote {out_dir / 'compare.csv'}, {out_dir / 'fronts.csv'} and {out_dir / 'fronts.png'}.")
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit code: 0, or 1 with a message on stderr for bad input."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        run(args)
    except CompareError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
