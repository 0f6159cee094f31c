"""Per-architecture prediction intervals: adaptive width, coverage, persistence and measure_uncertain."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from nas.search import LatencyEstimate, SearchError, SearchObjective, create_sampler
from nas.spaces import LayerSpec, create_space, load_space_config
from nas.spaces.base import Arch, SearchSpace
from predictors.conformal import conformal_bounds
from predictors.features import HardwareFacts
from predictors.xgb import LatencyPredictor, PredictorError, XGBParams
from tests.conftest import synthetic_records

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
HW = HardwareFacts(device="cpu", simd_width=16, threads=2)
# Log-space noise of one measurement: deep subnets (6 or 7 blocks, a third of the space) are noisy.
QUIET_NOISE, NOISY_NOISE = 0.01, 0.08
# Between the median widths of quiet and noisy subnets, so a search measures only the noisy ones.
UNCERTAINTY_THRESHOLD = 0.12


def is_noisy(arch: Arch) -> bool:
    return sum(arch.depths) >= 6  # type: ignore[attr-defined]


def heteroscedastic_records(
    space: SearchSpace, n_subnets: int, seed: int, passes: int, exclude: Collection[str] = ()
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], np.ndarray]:
    """Layer records, subnet records and each subnet's noisy flag, with noise that depends on depth."""
    layer_records, subnets = synthetic_records(
        space, n_subnets, seed, noise=lambda arch: NOISY_NOISE if is_noisy(arch) else QUIET_NOISE, passes=passes,
        exclude=exclude,
    )
    noisy = [is_noisy(space.arch_from_dict(record["arch"])) for record in subnets[::passes]]
    return layer_records, subnets, np.array(noisy)


@pytest.fixture(scope="module")
def space() -> SearchSpace:
    return create_space(load_space_config(ROOT / "conf/space/resnet.yaml"))


@pytest.fixture(scope="module")
def predictor(space: SearchSpace) -> LatencyPredictor:
    layer_records, subnet_records, _ = heteroscedastic_records(space, 300, seed=0, passes=2)
    model = LatencyPredictor(XGBParams(n_estimators=200, max_depth=6), XGBParams(n_estimators=150, max_depth=3), seed=0)
    return model.fit(layer_records, subnet_records, HW, batch_size=1)


@pytest.fixture(scope="module")
def held_out(space: SearchSpace, predictor: LatencyPredictor) -> dict[str, Any]:
    """Predictions for 1,000 subnets outside the training set, with one measurement each."""
    _, training, _ = heteroscedastic_records(space, 300, seed=0, passes=2)
    _, records, noisy = heteroscedastic_records(space, 1000, seed=100, passes=1, exclude={r["key"] for r in training})
    prediction = predictor.predict([[LayerSpec.from_dict(d) for d in r["layers"]] for r in records])
    measured = np.array([r["latency_ms"] for r in records])
    covered = (measured >= prediction.low_ms) & (measured <= prediction.high_ms)
    return {"prediction": prediction, "noisy": noisy, "covered": covered}


def test_widths_differ_between_archs(held_out: dict[str, Any]) -> None:
    width = held_out["prediction"].relative_width
    assert np.ptp(width) > 0.1
    assert len(np.unique(np.round(width, 4))) > 10


def test_wide_intervals_on_noisy_archs(held_out: dict[str, Any]) -> None:
    width = held_out["prediction"].relative_width
    noisy = held_out["noisy"]
    assert np.median(width[noisy]) > 3 * np.median(width[~noisy])
    assert np.median(width[~noisy]) < UNCERTAINTY_THRESHOLD < np.median(width[noisy])


def test_coverage_near_nominal_on_held_out(held_out: dict[str, Any]) -> None:
    covered, noisy = held_out["covered"], held_out["noisy"]
    assert 0.85 <= covered.mean() <= 0.95
    # One interval width for all subnets covers about 71% of the noisy ones on this data.
    assert covered[noisy].mean() >= 0.78


def test_interval_contains_mean(held_out: dict[str, Any]) -> None:
    prediction = held_out["prediction"]
    assert np.all(prediction.low_ms < prediction.mean_ms)
    assert np.all(prediction.mean_ms < prediction.high_ms)


def test_round_trip_keeps_intervals(space: SearchSpace, predictor: LatencyPredictor, tmp_path: Path) -> None:
    path = tmp_path / "predictor.json"
    predictor.save(path)
    loaded = LatencyPredictor.load(path)

    rng = np.random.default_rng(5)
    layer_lists = [space.layers(space.sample(rng)) for _ in range(50)]
    before, after = predictor.predict(layer_lists), loaded.predict(layer_lists)
    np.testing.assert_allclose(after.low_ms, before.low_ms, rtol=1e-6)
    np.testing.assert_allclose(after.high_ms, before.high_ms, rtol=1e-6)
    assert loaded.score_bounds == predictor.score_bounds
    assert np.ptp(after.relative_width) > 0


def test_format_1_file_rejected_with_rebuild_hint(predictor: LatencyPredictor, tmp_path: Path) -> None:
    path = tmp_path / "old-predictor.json"
    predictor.save(path)
    document = json.loads(path.read_text())
    # Format 1 stored one pair of log-residual bounds and no scale model.
    document["format_version"] = 1
    document["residual_bounds"] = document.pop("score_bounds")
    del document["scale_model"], document["scale_params"]
    path.write_text(json.dumps(document))

    with pytest.raises(PredictorError) as raised:
        LatencyPredictor.load(path)
    message = str(raised.value)
    assert str(path) in message
    assert f"format_version 1, but this TailNAS reads version {LatencyPredictor.format_version}" in message
    assert "scale model" in message
    assert "predictor.rebuild=true" in message


def _one_pass_each(scores: np.ndarray) -> list[np.ndarray]:
    return [np.array([score]) for score in scores]


def test_conformal_bounds_ranks() -> None:
    scores = _one_pass_each(np.arange(1.0, 20.0))
    # n = 19, 90%: lower rank floor(20 * 0.05) = 1, upper rank ceil(20 * 0.95) = 19.
    assert conformal_bounds(scores, 0.9) == (1.0, 19.0)
    # 50%: lower rank floor(20 * 0.25) = 5, upper rank ceil(20 * 0.75) = 15.
    assert conformal_bounds(scores, 0.5) == (5.0, 15.0)
    # The finite-sample n + 1 moves the ranks here: n = 50 at 80% gives ceil(51 * 0.9) = 46 (45 with n),
    # and n = 39 at 50% gives floor(40 * 0.25) = 10 (9 with n).
    assert conformal_bounds(_one_pass_each(np.arange(1.0, 51.0)), 0.8) == (5.0, 46.0)
    assert conformal_bounds(_one_pass_each(np.arange(1.0, 40.0)), 0.5) == (10.0, 30.0)


def test_conformal_bounds_weigh_subnets_not_passes() -> None:
    # 19 subnets with two passes each: 90% needs a cumulative weight of 19 / 20, every subnet's passes.
    scores = [np.array([i, i + 0.5]) for i in range(1, 20)]
    assert conformal_bounds(scores, 0.9) == (1.0, 19.5)
    # 50% needs 15 / 20 in each direction: subnet 15's second pass above, subnet 5's first pass below.
    assert conformal_bounds(scores, 0.5) == (5.0, 15.5)
    # One subnet with 100 passes weighs as much as one with a single pass. Pooled as 109 scores, its
    # passes would fill both 25% tails, and the interval would reach 10.
    heavy = [np.array([0.0])] * 9 + [np.full(100, 10.0)]
    assert conformal_bounds(heavy, 0.5) == (0.0, 0.0)


def test_too_few_scores_warned(caplog) -> None:
    with caplog.at_level("WARNING", logger="predictors.conformal"):
        conformal_bounds(_one_pass_each(np.arange(1.0, 40.0)), 0.9)
    assert caplog.text == ""
    with caplog.at_level("WARNING", logger="predictors.conformal"):
        assert conformal_bounds(_one_pass_each(np.arange(1.0, 11.0)), 0.9) == (1.0, 10.0)
    assert "10 calibration subnets are too few for a 90% interval" in caplog.text
    # Many passes of 10 subnets are still 10 subnets.
    with caplog.at_level("WARNING", logger="predictors.conformal"):
        conformal_bounds([np.arange(5.0) + i for i in range(10)], 0.9)
    assert caplog.text.count("too few") == 2


def test_measure_uncertain_measures_wide_only(space: SearchSpace, predictor: LatencyPredictor) -> None:
    measured: list[Arch] = []

    def predict(arch: Arch) -> LatencyEstimate:
        prediction = predictor.predict([space.layers(arch)])
        return LatencyEstimate(float(prediction.mean_ms[0]), float(prediction.low_ms[0]), float(prediction.high_ms[0]))

    def measure(arch: Arch) -> float:
        measured.append(arch)
        return 1.0

    objective = SearchObjective(
        space, lambda arch: 0.5, predict, measure_fn=measure, uncertainty_threshold=UNCERTAINTY_THRESHOLD
    )
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=create_sampler("random", seed=0))
    study.optimize(objective, n_trials=30)

    sources = [t.user_attrs["latency_source"] for t in study.trials]
    assert 0 < len(measured) < len(study.trials)
    assert sources.count("measured") == len(measured)
    for trial in study.trials:
        arch = space.arch_from_dict(trial.user_attrs["arch"])
        wide = predict(arch).relative_width > UNCERTAINTY_THRESHOLD
        assert (trial.user_attrs["latency_source"] == "measured") == wide


def test_nonpositive_threshold_rejected(space: SearchSpace) -> None:
    def predict(arch: Arch) -> LatencyEstimate:
        return LatencyEstimate(1.0, 0.9, 1.1)

    with pytest.raises(SearchError, match=r"uncertainty_threshold must be a positive share.*but got 0"):
        SearchObjective(space, lambda arch: 0.5, predict, measure_fn=lambda arch: 1.0, uncertainty_threshold=0)
