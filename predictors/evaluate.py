"""Accuracy of latency predictions against measurements, with the baselines a predictor must beat.

Metrics (see :func:`evaluate_predictions`): the share of subnets predicted within 5% and 10% of the
measured latency, mean absolute percentage error, RMSE in ms, Kendall's tau of the ranking, and
the share of measurements inside the predicted interval. Baselines use the same held-out split:

- ``macs_linear``: latency = a * MACs + b, least squares on the training subnets;
- ``lut_calibrated``: latency = a * (sum of measured layer latencies) + b, fitted the same way;
- ``lut_sum``: the plain sum of measured layer latencies.

Run ``python -m predictors.evaluate +space=resnet hardware=cpu`` to build or load the predictor
for a space, print the comparison and write ``predicted_vs_measured.png`` and ``staircase.png``
into the run directory.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from nas.files import write_json_atomic
from nas.spaces.layers import LayerSpec
from predictors.xgb import PredictorError

__all__ = [
    "evaluate_predictions",
    "fit_linear",
    "fit_macs_linear",
    "group_subnet_records",
    "holdout_report",
]

logger = logging.getLogger(__name__)

# Minimum number of training subnets for fitting the linear baselines.
MIN_BASELINE_TRAIN = 3


def evaluate_predictions(
    measured: Sequence[float] | np.ndarray,
    predicted: Sequence[float] | np.ndarray,
    low: Sequence[float] | np.ndarray | None = None,
    high: Sequence[float] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Compare predicted with measured latencies (both in ms, one entry per subnet).

    Returns:
        ``n``; ``within_5pct`` and ``within_10pct`` (share with |predicted / measured - 1| at most
        0.05 and 0.10); ``mape`` (mean absolute percentage error, in percent); ``rmse_ms``;
        ``kendall_tau`` (``None`` for fewer than 2 subnets); ``interval_coverage_90`` (share of
        measurements inside [low, high], ``None`` without bounds; the name follows the predictor's
        default 90% interval).
    """
    y = np.asarray(measured, dtype=np.float64)
    p = np.asarray(predicted, dtype=np.float64)
    if y.shape != p.shape:
        raise ValueError(f"measured and predicted must have the same length, but got {y.shape} and {p.shape}.")
    if len(y) == 0:
        raise ValueError("evaluate_predictions needs at least one measurement, but got none.")
    if np.any(y <= 0):
        raise ValueError(f"Measured latencies must be positive, but the minimum is {y.min()}.")

    relative = np.abs(p / y - 1.0)
    tau = None
    if len(y) >= 2:
        statistic = stats.kendalltau(y, p).statistic
        tau = None if np.isnan(statistic) else float(statistic)
    coverage = None
    if low is not None and high is not None:
        lo, hi = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        coverage = float(np.mean((y >= lo) & (y <= hi)))
    return {
        "n": int(len(y)),
        "within_5pct": float(np.mean(relative <= 0.05)),
        "within_10pct": float(np.mean(relative <= 0.10)),
        "mape": float(100.0 * np.mean(relative)),
        "rmse_ms": float(np.sqrt(np.mean((p - y) ** 2))),
        "kendall_tau": tau,
        "interval_coverage_90": coverage,
    }


def fit_linear(x: np.ndarray, y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Fit ``y = x @ w + b`` by least squares and return the fitted function of a new ``x``.

    ``x`` is (n,) or (n, features); the returned function takes the same shape.
    """
    design = np.asarray(x, dtype=np.float64)
    design = design.reshape(len(design), -1)
    if len(design) < design.shape[1] + 1:
        raise ValueError(f"A linear fit with {design.shape[1]} features needs at least {design.shape[1] + 1} rows, but got {len(design)}.")
    scale = np.maximum(np.abs(design).max(axis=0), 1e-12)
    augmented = np.hstack([design / scale, np.ones((len(design), 1))])
    solution, *_ = np.linalg.lstsq(augmented, np.asarray(y, dtype=np.float64), rcond=None)
    weights, intercept = solution[:-1] / scale, solution[-1]

    def predict(new_x: np.ndarray) -> np.ndarray:
        values = np.asarray(new_x, dtype=np.float64)
        return values.reshape(len(values), -1) @ weights + intercept

    return predict


def fit_macs_linear(macs: np.ndarray, latency_ms: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Fit the MACs-linear baseline ``latency_ms = a * macs + b`` (least squares with intercept)."""
    return fit_linear(np.asarray(macs, dtype=np.float64), latency_ms)


def group_subnet_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group subnet records by ``key``: one entry per subnet with its layers and per-pass latencies in ms.

    Each entry has ``key``, ``arch`` (when the records have one), ``layers`` (LayerSpec objects),
    ``passes_ms`` (array) and ``latency_ms`` (median over passes). Sorted by key.
    """
    groups: dict[str, dict[str, Any]] = {}
    for record in records:
        entry = groups.setdefault(
            record["key"],
            {"key": record["key"], "arch": record.get("arch"), "layers": [LayerSpec.from_dict(d) for d in record["layers"]], "passes_ms": []},
        )
        entry["passes_ms"].append(float(record["latency_ms"]))
    out = []
    for key in sorted(groups):
        entry = groups[key]
        entry["passes_ms"] = np.asarray(entry["passes_ms"])
        entry["latency_ms"] = float(np.median(entry["passes_ms"]))
        out.append(entry)
    return out


def _lut_sums(subnets: Sequence[Mapping[str, Any]], lut: Mapping[str, float]) -> np.ndarray:
    """Sum of measured layer latencies per subnet in ms; NaN where a layer was never measured."""
    sums = []
    for subnet in subnets:
        values = [lut.get(layer.key()) for layer in subnet["layers"]]
        sums.append(np.nan if any(v is None for v in values) else float(sum(values)))  # type: ignore[arg-type]
    return np.asarray(sums)


def baseline_metrics(
    train: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]], lut: Mapping[str, float] | None
) -> dict[str, dict[str, Any]]:
    """Evaluate the baselines on ``test`` after fitting them on ``train`` (entries of :func:`group_subnet_records`).

    ``lut`` maps ``LayerSpec.key()`` to the measured latency in ms; without it only ``macs_linear``
    is computed. LUT baselines use only subnets whose layers were all measured, and ``n`` gives their count.
    """
    train_ms = np.array([s["latency_ms"] for s in train])
    test_ms = np.array([s["latency_ms"] for s in test])
    macs = [np.array([sum(layer.macs for layer in s["layers"]) for s in group], dtype=np.float64) for group in (train, test)]
    out = {"macs_linear": evaluate_predictions(test_ms, fit_macs_linear(macs[0], train_ms)(macs[1]))}
    if not lut:
        return out

    train_sum, test_sum = _lut_sums(train, lut), _lut_sums(test, lut)
    train_ok, test_ok = ~np.isnan(train_sum), ~np.isnan(test_sum)
    if test_ok.sum() == 0 or train_ok.sum() < 2:
        logger.warning("Too few subnets with every layer measured for the lookup-table baselines; skipping them.")
        return out
    calibrated = fit_linear(train_sum[train_ok], train_ms[train_ok])(test_sum[test_ok])
    out["lut_calibrated"] = evaluate_predictions(test_ms[test_ok], calibrated)
    out["lut_sum"] = evaluate_predictions(test_ms[test_ok], test_sum[test_ok])
    return out


def holdout_report(
    predictor: Any,
    train: Sequence[Mapping[str, Any]],
    test: Sequence[Mapping[str, Any]],
    lut: Mapping[str, float] | None,
    noise_floor: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``predictor`` (a :class:`~predictors.xgb.LatencyPredictor`) and the baselines on ``test``.

    ``train`` and ``test`` are entries of :func:`group_subnet_records`. Accuracy metrics compare the
    prediction with each subnet's median over passes; ``interval_coverage_90`` counts every pass,
    because the interval is meant for one new measurement.

    Returns:
        The predictor's metrics at the top level, plus ``n_train``, ``n_test``, ``baselines``
        (:func:`baseline_metrics`, empty with fewer than ``MIN_BASELINE_TRAIN`` training subnets),
        ``noise_floor``, ``macs_within_10pct``/``macs_kendall_tau`` (``None`` without baselines),
        ``interval`` (nominal coverage), ``interval_method``, and ``interval_width_p10``,
        ``interval_width_median`` and ``interval_width_p90``: percentiles over the held-out subnets
        of the interval width as a share of the predicted latency, the quantity that
        ``search.uncertainty_threshold`` is compared with.
    """
    if not test:
        raise ValueError("holdout_report needs at least one held-out subnet; raise predictor.holdout_fraction.")
    prediction = predictor.predict([s["layers"] for s in test])
    report = evaluate_predictions([s["latency_ms"] for s in test], prediction.mean_ms)

    repeats = [len(s["passes_ms"]) for s in test]
    passes = np.concatenate([s["passes_ms"] for s in test])
    report["interval_coverage_90"] = evaluate_predictions(
        passes, np.repeat(prediction.mean_ms, repeats), np.repeat(prediction.low_ms, repeats), np.repeat(prediction.high_ms, repeats)
    )["interval_coverage_90"]
    report.pop("n")
    width = prediction.relative_width
    report["interval"], report["interval_method"] = predictor.interval, predictor.interval_method
    report["interval_width_p10"], report["interval_width_median"], report["interval_width_p90"] = (
        float(value) for value in np.percentile(width, [10, 50, 90])
    )
    report["n_train"], report["n_test"] = len(train), len(test)
    report["baselines"] = baseline_metrics(train, test, lut) if len(train) >= MIN_BASELINE_TRAIN else {}
    macs = report["baselines"].get("macs_linear", {})
    report["macs_within_10pct"] = macs.get("within_10pct")
    report["macs_kendall_tau"] = macs.get("kendall_tau")
    report["noise_floor"] = dict(noise_floor) if noise_floor is not None else None
    return report


# -- command line ----------------------------------------------------------------------------------


def store_split(predictor: Any, store: Any, space: Any, batch_size: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split the store's subnets of ``space`` into the predictor's training subnets and the others.

    Test subnets are those the predictor held out at build time plus any measured during searches
    (``source="search"``) and never trained on. A predictor without held-out keys (built elsewhere)
    is tested on every subnet of the space in the store.
    """
    records = store.subnet_records(space.config_hash(), batch_size)
    training = predictor.metadata.get("training", {})
    holdout = set(training.get("holdout_keys") or [])
    if not holdout:
        return [], group_subnet_records(records)
    profiled = {r["key"] for r in records if r.get("source") == "profile"}
    # Predictors that list their training subnets use only those; older ones trained on every
    # profiled subnet outside the held-out set.
    trained = set(training["train_keys"]) if "train_keys" in training else profiled - holdout
    grouped = group_subnet_records(records)
    return [s for s in grouped if s["key"] in trained], [s for s in grouped if s["key"] not in trained]


def _format(value: Any, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def print_report(report: Mapping[str, Any], title: str) -> None:
    """Print the predictor, the baselines and the noise floor as one table."""
    from rich.table import Table

    from nas.report import print_table

    table = Table(title=title)
    for column in ("model", "within 10%", "within 5%", "MAPE %", "Kendall tau", "interval coverage", "subnets"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=column == "model")
    rows = [("XGBoost predictor", report), *report.get("baselines", {}).items()]
    noise = report.get("noise_floor") or {}
    for name, metrics in rows:
        table.add_row(
            name, _format(metrics.get("within_10pct"), True), _format(metrics.get("within_5pct"), True),
            _format(metrics.get("mape"), False), _format(metrics.get("kendall_tau"), False),
            _format(metrics.get("interval_coverage_90"), True), str(metrics.get("n", report.get("n_test"))),
        )
    table.add_row(
        "noise floor (pass vs pass)", _format(noise.get("within_10pct"), True), _format(noise.get("within_5pct"), True),
        "-", _format(noise.get("kendall_tau"), False), "-", str(noise.get("n", "-")),
    )
    print_table(table)
    if report.get("interval_width_median") is not None:
        widths = [_format(report[f"interval_width_{name}"], True) for name in ("p10", "median", "p90")]
        print(
            f"Intervals: nominal {_format(report.get('interval'), True)}, {report.get('interval_method')}. Width as a "
            f"share of the predicted latency on held-out subnets: p10 {widths[0]}, median {widths[1]}, p90 {widths[2]}."
        )


def write_plots(run_dir: Path, predictor: Any, train: Sequence[Mapping[str, Any]], test: Sequence[Mapping[str, Any]], table: Mapping[str, float]) -> list[Path]:
    """Write ``predicted_vs_measured.png`` and, when the store has a width sweep, ``staircase.png``."""
    from predictors.plots import plot_predicted_vs_measured, write_staircase

    written = []
    measured = np.array([s["latency_ms"] for s in test])
    prediction = predictor.predict([s["layers"] for s in test])
    baseline = None
    if len(train) >= MIN_BASELINE_TRAIN:
        macs = [np.array([sum(l.macs for l in s["layers"]) for s in group], dtype=np.float64) for group in (train, test)]
        baseline = fit_macs_linear(macs[0], np.array([s["latency_ms"] for s in train]))(macs[1])
    written.append(plot_predicted_vs_measured(
        run_dir / "predicted_vs_measured.png", measured, prediction.mean_ms, prediction.low_ms, prediction.high_ms,
        title=f"Held-out subnets ({len(test)})", baseline_ms=baseline,
    ))

    # The store may hold other spaces' layers too; the plot shows one of this space's.
    layers = [layer for subnet in (*train, *test) for layer in subnet["layers"]]
    staircase = write_staircase(run_dir / "staircase.png", predictor, table, layers=layers)
    if staircase is not None:
        written.append(staircase)
    return written


def run(cfg: Any) -> dict[str, Any]:
    """Build or load the predictor for ``cfg.space``, evaluate it on held-out subnets, print and plot."""
    from hydra.core.hydra_config import HydraConfig

    from nas.cli import import_user_modules, profiled_space_config, require_space, to_container
    from nas.spaces import create_space
    from predictors.build import load_or_build_predictor
    from predictors.fingerprint import device_fingerprint
    from predictors.protocol import MeasurementProtocol
    from predictors.store import ProfileStore

    require_space(cfg, "python -m predictors.evaluate")
    space_cfg = profiled_space_config(cfg, "python -m predictors.evaluate")
    import_user_modules(to_container(cfg.get("imports")))
    space = create_space(space_cfg)
    protocol = MeasurementProtocol.from_config(to_container(cfg.hardware))
    work_dir = Path(cfg.paths.work_dir)
    predictor, build_report, path = load_or_build_predictor(space, protocol, to_container(cfg.predictor), work_dir, int(cfg.seed))

    store = ProfileStore(work_dir / "profiles", device_fingerprint(protocol))
    train, test = store_split(predictor, store, space, protocol.batch_size)
    if not test:
        raise PredictorError(
            f"The profile store {store.directory} has no measured subnet of space {space.name!r} outside the "
            f"predictor's training set to evaluate on. Profile the space first (python -m predictors.profile "
            f"with this command's +space and space.* overrides), or unset predictor.path to build a predictor "
            f"for it."
        )
    table = store.layer_table(protocol.batch_size)
    report = holdout_report(predictor, train, test, table, store.noise_floor(space.config_hash(), protocol.batch_size))

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    print_report(report, f"Latency predictor {path.name} on {len(test)} held-out subnets")
    warn_if_miscalibrated(report)
    if not report["baselines"]:
        print(f"No baselines: they are fitted on the predictor's training subnets of this space in the store, and "
              f"{len(train)} are there (at least {MIN_BASELINE_TRAIN} needed).")
    metrics = {"predictor": str(path), "space": space.name, "space_hash": space.config_hash(),
               "protocol": protocol.to_dict(), "predictor_config": predictor.metadata.get("training", {}).get("config"),
               **report}
    write_json_atomic(run_dir / "metrics.json", metrics, indent=2, default=str)
    for written in [run_dir / "metrics.json", *write_plots(run_dir, predictor, train, test, table)]:
        print(f"Wrote {written}")
    if build_report.get("build_s") is not None:
        when = "Reused {name}; building it took" if build_report.get("reused") else "Building {name} took"
        print(f"{when.format(name=path.name)} {build_report['build_s']:.1f} s, "
              f"{build_report.get('profile_s', 0.0):.1f} s of it profiling.")
    return report


# How far the held-out interval coverage may fall below its nominal level before the report warns.
COVERAGE_SLACK = 0.1


def warn_if_miscalibrated(report: Mapping[str, Any]) -> None:
    """Print a warning when the held-out interval coverage lies well below nominal, or a baseline beats the predictor."""
    coverage, nominal = report.get("interval_coverage_90"), report.get("interval")
    if coverage is not None and nominal is not None and coverage < nominal - COVERAGE_SLACK:
        print(f"Warning: the intervals covered {100 * coverage:.0f}% of held-out measurements, against a nominal "
              f"{100 * nominal:.0f}%. On a busy machine measurements spread more than in profiling: profile on a "
              "quiet machine and rebuild with predictor.rebuild=true.")
    ours = report.get("within_10pct")
    for name, metrics in (report.get("baselines") or {}).items():
        if not isinstance(metrics, Mapping):
            continue
        theirs = metrics.get("within_10pct")
        if ours is not None and theirs is not None and theirs > ours:
            print(f"Warning: the {name} baseline predicts more held-out subnets within 10% ({100 * theirs:.0f}%) "
                  f"than the predictor ({100 * ours:.0f}%).")
        elif _beats_on_error_and_order(metrics, report):
            print(f"Warning: the {name} baseline has a lower mean error (MAPE {metrics['mape']:.2f}% against "
                  f"{report['mape']:.2f}%) and ranks the held-out subnets at least as well (Kendall tau "
                  f"{metrics['kendall_tau']:.3f} against {report['kendall_tau']:.3f}) as the predictor. The measured "
                  "layers already explain these subnets; the predictor's network model pays for subnets whose layers "
                  "were not measured.")


def _beats_on_error_and_order(baseline: Mapping[str, Any], report: Mapping[str, Any]) -> bool:
    """Return whether ``baseline`` has a lower MAPE and a Kendall tau at least as high as the predictor's."""
    values = (baseline.get("mape"), report.get("mape"), baseline.get("kendall_tau"), report.get("kendall_tau"))
    if any(value is None for value in values):
        return False
    their_mape, our_mape, their_tau, our_tau = values
    return their_mape < our_mape and their_tau >= our_tau


def main() -> None:
    import hydra

    from nas.cli import run_cli

    @hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
    def entry(cfg: Any) -> None:
        run_cli(run, cfg, interrupted="Interrupted. Every finished profiling run is kept in the profile store, so "
                                      "the same command resumes where it stopped.")

    entry()


if __name__ == "__main__":
    sys.exit(main())
