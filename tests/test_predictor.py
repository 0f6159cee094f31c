"""LatencyPredictor: staircases, intervals, column order, persistence and fingerprint checks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nas.spaces import LayerSpec, create_space, load_space_config
from nas.spaces.base import SearchSpace
from predictors.evaluate import evaluate_predictions, fit_macs_linear
from predictors.features import HardwareFacts
from predictors.plots import plot_predicted_vs_measured, plot_staircase, plot_width_moves, staircase_from_table
from predictors.tail_aware import snap_to_step_edges, tail_aware_widths, width_latency_curve
from predictors.xgb import LatencyPredictor, PredictorError, PredictorNotFoundError, XGBParams
from tests.conftest import run_in_threads, staircase_ms, synthetic_records

ROOT = Path(__file__).resolve().parents[1]
HW = HardwareFacts(device="cpu", simd_width=16, threads=2)
FINGERPRINT = {"device_type": "cpu", "cpu_model": "Test CPU 1", "simd_flags": ["avx2", "avx512f"], "threads": 2}


def small_space() -> SearchSpace:
    return create_space(load_space_config(ROOT / "conf/space/resnet.yaml"))


def fast_predictor(**metadata: Any) -> LatencyPredictor:
    return LatencyPredictor(
        XGBParams(n_estimators=200, max_depth=6), XGBParams(n_estimators=150, max_depth=3), metadata=metadata
    )


@pytest.fixture(scope="module")
def trained() -> tuple[SearchSpace, LatencyPredictor]:
    space = small_space()
    layer_records, subnet_records = synthetic_records(space, 150, seed=0)
    predictor = fast_predictor(fingerprint=FINGERPRINT, protocol={"batch_size": 1, "threads": 2})
    predictor.fit(layer_records, subnet_records, HW)
    return space, predictor


def sweep(out_channels: list[int]) -> list[LayerSpec]:
    return [
        LayerSpec("conv", c_in, c_out, size, kernel_size=3, act="relu")
        for c_in in (16, 32, 64)
        for size in (7, 14, 28)
        for c_out in out_channels
    ]


def test_layer_model_learns_staircase_macs_linear_does_not() -> None:
    train = sweep([c for c in range(8, 129, 8) if c % 32 != 24])
    held_out = sweep([24, 56, 88, 120])
    layer_records = [{"key": s.key(), "layer": s.to_dict(), "latency_ms": staircase_ms(s)} for s in train]
    _, subnet_records = synthetic_records(small_space(), 20, seed=1)
    predictor = fast_predictor().fit(layer_records, subnet_records, HW, batch_size=1)

    truth = np.array([staircase_ms(s) for s in held_out])
    predicted = predictor.predict_layers(held_out, use_lut=False)
    assert np.max(np.abs(predicted / truth - 1)) < 0.02

    macs_fit = fit_macs_linear(np.array([s.macs for s in train], dtype=float), np.array([staircase_ms(s) for s in train]))
    linear = macs_fit(np.array([s.macs for s in held_out], dtype=float))
    assert np.max(np.abs(linear / truth - 1)) > 0.05


def test_interval_coverage_near_nominal(trained: tuple[SearchSpace, LatencyPredictor]) -> None:
    space, predictor = trained
    _, training = synthetic_records(space, 150, seed=0)
    _, test_records = synthetic_records(space, 400, seed=7, passes=1, exclude={r["key"] for r in training})
    measured = np.array([r["latency_ms"] for r in test_records])
    prediction = predictor.predict([[LayerSpec.from_dict(d) for d in r["layers"]] for r in test_records])

    covered = (measured >= prediction.low_ms) & (measured <= prediction.high_ms)
    assert 0.82 <= covered.mean() <= 0.97
    assert np.all(prediction.low_ms <= prediction.mean_ms)
    assert np.all(prediction.mean_ms <= prediction.high_ms)
    metrics = evaluate_predictions(measured, prediction.mean_ms, prediction.low_ms, prediction.high_ms)
    assert metrics["within_10pct"] > 0.95


def test_predict_ignores_feature_column_order(trained: tuple[SearchSpace, LatencyPredictor]) -> None:
    space, predictor = trained
    rng = np.random.default_rng(3)
    frame = predictor.network_features([space.layers(space.sample(rng)) for _ in range(50)])
    shuffled = frame[list(rng.permutation(frame.columns))]
    assert list(shuffled.columns) != list(frame.columns)
    np.testing.assert_array_equal(predictor.predict_features(frame).mean_ms, predictor.predict_features(shuffled).mean_ms)


def test_predict_batch_matches_single_calls(trained: tuple[SearchSpace, LatencyPredictor]) -> None:
    space, predictor = trained
    rng = np.random.default_rng(4)
    layer_lists = [space.layers(space.sample(rng)) for _ in range(20)]
    batch = predictor.predict(layer_lists).mean_ms
    single = np.array([predictor.predict([layers]).mean_ms[0] for layers in layer_lists])
    np.testing.assert_allclose(batch, single, rtol=1e-6)
    assert len(predictor.predict([])) == 0


def test_save_load_round_trip(trained: tuple[SearchSpace, LatencyPredictor], tmp_path: Path) -> None:
    space, predictor = trained
    path = tmp_path / "nested" / "predictor.json"
    predictor.save(path)

    document = json.loads(path.read_text())
    assert document["format_version"] == LatencyPredictor.format_version
    assert document["fingerprint"] == FINGERPRINT
    assert document["protocol"]["batch_size"] == 1
    assert document["network_feature_names"] == sorted(document["network_feature_names"])
    assert [p.name for p in path.parent.iterdir()] == ["predictor.json"]

    loaded = LatencyPredictor.load(path, fingerprint=FINGERPRINT)
    layer_lists = [space.layers(space.sample(np.random.default_rng(5))) for _ in range(10)]
    before, after = predictor.predict(layer_lists), loaded.predict(layer_lists)
    np.testing.assert_allclose(before.mean_ms, after.mean_ms, rtol=1e-6)
    np.testing.assert_allclose(before.high_ms, after.high_ms, rtol=1e-6)


def test_load_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(PredictorNotFoundError, match="absent.json"):
        LatencyPredictor.load(path)


def test_load_corrupt_file_says_how_to_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "predictor.json"
    path.write_text('{"kind": "tailnas.latency_pred')
    with pytest.raises(PredictorError, match=r"predictor\.json is not valid JSON.*predictor\.rebuild=true"):
        LatencyPredictor.load(path)


def test_load_rejects_other_format_version(trained: tuple[SearchSpace, LatencyPredictor], tmp_path: Path) -> None:
    _, predictor = trained
    path = tmp_path / "predictor.json"
    predictor.save(path)
    document = json.loads(path.read_text())
    document["format_version"] = 99
    path.write_text(json.dumps(document))
    with pytest.raises(PredictorError, match="format_version 99"):
        LatencyPredictor.load(path)


def test_load_rejects_truncated_model(trained: tuple[SearchSpace, LatencyPredictor], tmp_path: Path) -> None:
    _, predictor = trained
    path = tmp_path / "predictor.json"
    predictor.save(path)
    document = json.loads(path.read_text())
    del document["network_model"]
    path.write_text(json.dumps(document))
    with pytest.raises(PredictorError, match="incomplete or corrupt"):
        LatencyPredictor.load(path)


def test_fingerprint_mismatch_and_override(
    trained: tuple[SearchSpace, LatencyPredictor], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, predictor = trained
    path = tmp_path / "predictor.json"
    predictor.save(path)
    other = {**FINGERPRINT, "cpu_model": "Other CPU"}

    with pytest.raises(PredictorError, match=r"\['cpu_model'\].*allow_fingerprint_mismatch=true"):
        LatencyPredictor.load(path, fingerprint=other)

    with caplog.at_level(logging.WARNING, logger="predictors.xgb"):
        loaded = LatencyPredictor.load(path, fingerprint=other, allow_mismatch=True)
    assert loaded.network_model is not None
    assert "cpu_model" in caplog.text


def test_fit_rejects_too_few_subnets() -> None:
    layer_records, subnet_records = synthetic_records(small_space(), 4, seed=2)
    with pytest.raises(PredictorError, match="at least 10 measured subnets, but got 4"):
        fast_predictor().fit(layer_records, subnet_records, HW, batch_size=1)


def test_predict_before_fit_is_an_error() -> None:
    with pytest.raises(PredictorError, match="not trained"):
        LatencyPredictor().predict([[LayerSpec("conv", 3, 8, 8, 3)]])


def test_unknown_metadata_and_params_rejected() -> None:
    with pytest.raises(PredictorError, match="Unknown predictor metadata keys"):
        LatencyPredictor(metadata={"colour": "red"})
    with pytest.raises(PredictorError, match="Unknown keys"):
        XGBParams.from_mapping({"n_estimators": 10, "depth": 3}, "predictor.layer_model")


class StaircaseLayers:
    """Per-layer latencies of the synthetic staircase device, in the shape of LatencyPredictor.predict_layers."""

    def predict_layers(self, layers: list[LayerSpec], use_lut: bool = True) -> np.ndarray:
        return np.array([staircase_ms(layer) for layer in layers])


class StaircaseStore:
    """A profile-store stand-in whose layer table stores the staircase latency of ``layers``."""

    def __init__(self, layers: list[LayerSpec]) -> None:
        self.table = {layer.key(): staircase_ms(layer) for layer in layers}

    def layer_table(self, batch_size: int) -> dict[str, float]:
        return self.table


def test_tail_aware_moves_widths_to_step_edges() -> None:
    space = small_space()
    widths = tail_aware_widths(space, StaircaseLayers(), protocol=None)

    # Stage 0 choices 8..40: 24 shares the 17-32 step with 32, and 8 costs more than 16 because
    # a stage narrower than the 16-channel stem needs a downsampling shortcut.
    assert widths["width_0"] == [16, 32, 40]
    assert widths["width_1"] == [16, 32, 48, 64]
    # Stage 2 choices are multiples of 16 already, each at the right edge of its step.
    assert widths["width_2"] == [32, 48, 64, 96, 128]
    for key, values in widths.items():
        assert max(values) <= max(space.width_choices()[key])
    assert space.with_width_choices(widths).width_choices() == widths


def test_tail_aware_from_store_matches_predictor() -> None:
    space = small_space()
    swept = [
        LayerSpec("conv", c_in, c_out, size, kernel_size=k, stride=s, act=act)
        for c_in, size, s in ((16, 28, 1), (40, 28, 2), (64, 14, 2))
        for k, act in ((3, "relu"), (1, "none"))
        for c_out in range(8, 129, 8)
    ]
    store = StaircaseStore(swept)

    class Protocol:
        batch_size = 1

    assert tail_aware_widths(space, store, Protocol()) == tail_aware_widths(space, StaircaseLayers(), None)


def test_snap_respects_tolerance() -> None:
    curve = {8: 1.0, 16: 1.02, 24: 1.5, 32: 1.52, 40: 2.0}
    assert snap_to_step_edges([8, 24, 40], curve, tolerance=0.03) == [16, 32, 40]
    assert snap_to_step_edges([8, 24, 40], curve, tolerance=0.01) == [8, 24, 40]
    # A choice the curve lacks stays, and a later cheaper width beyond a rise is not reached.
    assert snap_to_step_edges([12], curve, tolerance=0.03) == [12]
    assert snap_to_step_edges([8], {8: 1.0, 16: 1.2, 24: 0.9}, tolerance=0.03) == [8]


def test_width_curve_sums_swept_convs() -> None:
    curve = width_latency_curve(small_space(), "width_1", StaircaseLayers().predict_layers)
    assert sorted(curve) == list(range(8, 65, 8))
    assert curve[8] == pytest.approx(curve[16])
    assert curve[24] > curve[16] * 1.5


def test_plots_are_written(trained: tuple[SearchSpace, LatencyPredictor], tmp_path: Path) -> None:
    space, predictor = trained
    layer_lists = [space.layers(space.sample(np.random.default_rng(6))) for _ in range(20)]
    prediction = predictor.predict(layer_lists)
    scatter = plot_predicted_vs_measured(
        tmp_path / "scatter.png", prediction.mean_ms * 1.02, prediction.mean_ms, prediction.low_ms, prediction.high_ms
    )
    assert scatter.stat().st_size > 1000

    table = {layer.key(): staircase_ms(layer) for layer in sweep(list(range(8, 129, 8)))}
    picked = staircase_from_table(table)
    assert picked is not None
    layer, measured = picked
    assert (layer.in_channels, layer.in_size, layer.out_channels) == (64, 28, 128)
    assert sorted(measured) == list(range(8, 129, 8))
    staircase = plot_staircase(tmp_path / "staircase.png", layer, measured)
    assert staircase.stat().st_size > 1000

    curve = {8: 0.10, 16: 0.10, 24: 0.16, 32: 0.16}
    plan = {"width_0": (curve, [16, 32]), "width_1": ({}, [8])}
    moves = plot_width_moves(tmp_path / "width_moves.png", {"width_0": [8, 16, 24], "width_1": [8]}, plan)
    assert moves.stat().st_size > 1000
    assert plot_width_moves(tmp_path / "none.png", {"width_1": [8]}, {"width_1": ({}, [8])}) is None
    assert not (tmp_path / "none.png").exists()


TINY_SPACE = {
    "name": "resnet_tiny",
    "family": "resnet",
    "block": "basic",
    "in_channels": 1,
    "num_classes": 4,
    "resolutions": [8],
    "stem": {"channels": 8, "kernel_size": 3, "stride": 1, "max_pool": False},
    "stages": [{"depths": [1, 2], "widths": [8, 16, 24], "stride": 1}, {"depths": [1, 2], "widths": [8, 16, 24], "stride": 2}],
    "expand_ratios": None,
    "tail_aware": False,
}
TINY_PREDICTOR = {
    "n_subnets": 16,
    "passes": 2,
    "width_step": 8,
    "holdout_fraction": 0.25,
    "layer_model": {"n_estimators": 50},
    "network_model": {"n_estimators": 50},
}


def test_build_caches_and_reuses_predictor(tmp_path: Path) -> None:
    from predictors.build import load_or_build_predictor
    from predictors.protocol import MeasurementProtocol

    space = create_space(TINY_SPACE)
    protocol = MeasurementProtocol.from_config(
        {"device": "cpu", "runtime": "eager", "batch_size": 1, "threads": 1, "dtype": "float32", "warmup": 1, "repeats": 3}
    )
    fitted_keys = []
    real_fit = LatencyPredictor.fit

    def recording_fit(self, layer_records, subnet_records, *args, **kwargs):
        subnet_records = list(subnet_records)
        fitted_keys.extend(r["key"] for r in subnet_records)
        return real_fit(self, layer_records, subnet_records, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LatencyPredictor, "fit", recording_fit)
        predictor, report, path = load_or_build_predictor(space, protocol, TINY_PREDICTOR, tmp_path, seed=0,
                                                          progress=False)
    # The held-out subnets reach neither the models nor the conformal calibration.
    training = predictor.metadata["training"]
    assert fitted_keys and set(fitted_keys) == set(training["train_keys"])
    assert not set(fitted_keys) & set(training["holdout_keys"])

    assert path.parent.parent == tmp_path / "predictors"
    assert path.name.startswith(f"resnet_tiny-{space.config_hash()}-b1-")
    assert path.with_name(path.stem + ".report.json").is_file()
    assert report["n_train"] == 12
    assert report["n_test"] == 4
    assert set(report["baselines"]) == {"macs_linear", "lut_calibrated", "lut_sum"}
    holdout = set(predictor.metadata["training"]["holdout_keys"])
    assert len(holdout) == 4

    modified = path.stat().st_mtime_ns
    again, again_report, again_path = load_or_build_predictor(space, protocol, TINY_PREDICTOR, tmp_path, seed=0, progress=False)
    assert again_path == path
    assert path.stat().st_mtime_ns == modified
    assert again_report["within_10pct"] == report["within_10pct"]
    layers = [space.layers(space.largest())]
    np.testing.assert_allclose(again.predict(layers).mean_ms, predictor.predict(layers).mean_ms, rtol=1e-6)

    loaded, _, loaded_path = load_or_build_predictor(
        space, protocol, {**TINY_PREDICTOR, "path": str(path)}, tmp_path / "elsewhere", seed=0, progress=False
    )
    assert loaded_path == path
    assert loaded.metadata["training"]["holdout_keys"] == sorted(holdout)

    with pytest.raises(PredictorError, match=r"Unknown keys \['n_subnet'\]"):
        load_or_build_predictor(space, protocol, {"n_subnet": 3}, tmp_path, seed=0)

    # A cached file of an older format is rebuilt from the kept profile store; one given by path is refused.
    document = json.loads(path.read_text())
    document["format_version"] = LatencyPredictor.format_version - 1
    path.write_text(json.dumps(document))
    rebuilt, _, rebuilt_path = load_or_build_predictor(space, protocol, TINY_PREDICTOR, tmp_path, seed=0, progress=False)
    assert rebuilt_path == path
    assert json.loads(path.read_text())["format_version"] == LatencyPredictor.format_version
    document["format_version"] = LatencyPredictor.format_version + 1
    path.write_text(json.dumps(document))
    with pytest.raises(PredictorError, match="format_version"):
        load_or_build_predictor(space, protocol, TINY_PREDICTOR, tmp_path, seed=0, progress=False)


def test_predictor_cache_keyed_by_threads(tmp_path: Path) -> None:
    import torch

    import predictors.build as build
    from predictors.fingerprint import device_fingerprint
    from predictors.protocol import MeasurementProtocol

    space = create_space(TINY_SPACE)
    protocol = MeasurementProtocol.from_config(
        {"device": "cpu", "runtime": "eager", "batch_size": 1, "threads": None, "dtype": "float32", "warmup": 1,
         "repeats": 3}
    )
    config = build.PredictorConfig.from_mapping(TINY_PREDICTOR)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _, _, one_thread_path = build.load_or_build_predictor(space, protocol, TINY_PREDICTOR, tmp_path, seed=0,
                                                              progress=False)
        torch.set_num_threads(2)
        two_threads = device_fingerprint(protocol)
        assert two_threads["threads"] == 2
        # Another file for two threads, and the one-thread file counts as stale for them.
        assert build.predictor_path(tmp_path, one_thread_path.parent.name, space, protocol, config, 2) != one_thread_path
        assert build._load_cached(one_thread_path, two_threads, config, space, protocol) is None
        with pytest.raises(PredictorError, match="built with 1 CPU threads, and torch uses 2 here"):
            build.load_or_build_predictor(space, protocol, {**TINY_PREDICTOR, "path": str(one_thread_path)}, tmp_path,
                                          seed=0)
    finally:
        torch.set_num_threads(before)


def test_runs_sharing_a_work_dir_build_one_predictor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import predictors.build as build
    from predictors.protocol import MeasurementProtocol

    space = create_space(TINY_SPACE)
    protocol = MeasurementProtocol.from_config(
        {"device": "cpu", "runtime": "eager", "batch_size": 1, "threads": 1, "dtype": "float32", "warmup": 1, "repeats": 3}
    )
    builds = []
    real_build = build.build_predictor

    def counted(*args, **kwargs):
        builds.append(threading.get_ident())
        return real_build(*args, **kwargs)

    monkeypatch.setattr(build, "build_predictor", counted)
    paths = []

    def run():
        paths.append(build.load_or_build_predictor(space, protocol, TINY_PREDICTOR, tmp_path, seed=0,
                                                   progress=False)[2])

    assert not run_in_threads(run, 2, timeout_s=120)
    # The second run waited for the first one's lock and then loaded its predictor.
    assert len(builds) == 1
    assert len(paths) == 2
    assert paths[0] == paths[1]


def test_given_predictor_checked_against_protocol_and_space(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from predictors.build import load_or_build_predictor
    from predictors.protocol import MeasurementProtocol

    space = create_space(TINY_SPACE)
    settings = {"device": "cpu", "runtime": "eager", "batch_size": 1, "threads": 1, "dtype": "float32", "warmup": 1,
                "repeats": 3}
    protocol = MeasurementProtocol.from_config(settings)
    # The store has more subnets than this build uses: the predictor trains on its own 14 only.
    load_or_build_predictor(space, protocol, {**TINY_PREDICTOR, "n_subnets": 20}, tmp_path, seed=0, progress=False)
    predictor, report, path = load_or_build_predictor(space, protocol, {**TINY_PREDICTOR, "n_subnets": 14}, tmp_path,
                                                      seed=0, progress=False)
    assert (report["n_train"], report["n_test"]) == (10, 4)
    assert len(predictor.metadata["training"]["train_keys"]) == 10

    path_config = {**TINY_PREDICTOR, "path": str(path)}
    batch8 = MeasurementProtocol.from_config({**settings, "batch_size": 8})
    with pytest.raises(PredictorError, match=r"built for other measurement settings: hardware.batch_size 1 there, 8 here"):
        load_or_build_predictor(space, batch8, path_config, tmp_path, seed=0)

    # Warm-up and repeat counts do not change what a latency is, so they may differ.
    steadier = MeasurementProtocol.from_config({**settings, "warmup": 5, "repeats": 50})
    load_or_build_predictor(space, steadier, path_config, tmp_path, seed=0)

    other = create_space({**TINY_SPACE, "num_classes": 5})
    with caplog.at_level(logging.WARNING, logger="predictors.build"):
        load_or_build_predictor(other, protocol, path_config, tmp_path, seed=0)
    assert "was built for space 'resnet_tiny' with another configuration" in caplog.text

    path.write_text('{"kind": "tailnas.latency_pred')
    hint = "not valid JSON .*; unset predictor.path to build or reuse this space.s own predictor, or name a valid file"
    with pytest.raises(PredictorError, match=hint) as raised:
        load_or_build_predictor(space, protocol, path_config, tmp_path, seed=0)
    assert "predictor.rebuild" not in str(raised.value)


def test_interval_checked_before_profiling(tmp_path: Path) -> None:
    from predictors.build import PredictorConfig

    with pytest.raises(PredictorError, match=r"predictor.interval must be in \(0, 1\), for example 0.9, but got 1.5"):
        PredictorConfig.from_mapping({"interval": 1.5})


def test_evaluate_warns_on_low_coverage_and_better_baseline(capsys: pytest.CaptureFixture) -> None:
    from predictors.evaluate import warn_if_miscalibrated

    warn_if_miscalibrated({"interval_coverage_90": 0.85, "interval": 0.9, "within_10pct": 0.9,
                           "baselines": {"lut_sum": {"within_10pct": 0.8}}})
    assert capsys.readouterr().out == ""
    warn_if_miscalibrated({"interval_coverage_90": 0.62, "interval": 0.9, "within_10pct": 0.6,
                           "baselines": {"lut_calibrated": {"within_10pct": 0.72}}})
    out = capsys.readouterr().out
    assert "covered 62% of held-out measurements, against a nominal 90%" in out
    assert "the lut_calibrated baseline predicts more held-out subnets within 10% (72%)" in out
    # Level within 10%, but a lower error and an equal or better order.
    tied = {"within_10pct": 1.0, "mape": 1.55, "kendall_tau": 0.975}
    warn_if_miscalibrated({**tied, "baselines": {"lut_calibrated": {"within_10pct": 1.0, "mape": 1.38,
                                                                    "kendall_tau": 0.981}}})
    assert "lut_calibrated baseline has a lower mean error (MAPE 1.38% against 1.55%)" in capsys.readouterr().out
    warn_if_miscalibrated({**tied, "baselines": {"lut_calibrated": {"within_10pct": 1.0, "mape": 1.38,
                                                                    "kendall_tau": 0.95}}})
    assert capsys.readouterr().out == ""


def test_staircase_plot_prefers_steps_to_ramp() -> None:
    from nas.spaces.layers import LayerSpec
    from predictors.plots import staircase_from_table

    def conv(cin: int, cout: int) -> str:
        return LayerSpec(op="conv", in_channels=cin, out_channels=cout, in_size=28, kernel_size=3, stride=1,
                         groups=1, act="relu", bias=True).key()

    table = {conv(128, c): 0.01 * c for c in range(8, 129, 8)}  # a ramp with 16 widths
    table.update({conv(64, c): 0.1 * (1 + (c - 1) // 16) for c in range(8, 65, 8)})  # steps of 16, 8 widths
    layer, measured = staircase_from_table(table)
    assert layer.in_channels == 64
    assert sorted(measured) == list(range(8, 65, 8))


def test_staircase_plot_limited_to_given_layers() -> None:
    from nas.spaces.layers import LayerSpec
    from predictors.plots import staircase_from_table

    def conv(cin: int, cout: int) -> LayerSpec:
        return LayerSpec(op="conv", in_channels=cin, out_channels=cout, in_size=28, kernel_size=3, stride=1,
                         groups=1, act="relu", bias=True)

    table = {conv(64, c).key(): 0.1 * (1 + (c - 1) // 16) for c in range(8, 65, 8)}  # another space's staircase
    table.update({conv(32, c).key(): 0.01 * c for c in range(8, 33, 8)})
    layer, _ = staircase_from_table(table, layers=[conv(32, 16)])
    assert layer.in_channels == 32


@pytest.mark.parametrize("training", [
    {"holdout_keys": ["c"]},  # files written before train_keys: every other profiled subnet trained it
    {"holdout_keys": ["c"], "train_keys": ["a"]},
])
def test_store_split_old_and_new_predictor_files(training: dict) -> None:
    from types import SimpleNamespace

    from predictors.evaluate import store_split

    layer = {"op": "conv", "in_channels": 8, "out_channels": 8, "in_size": 8, "kernel_size": 3, "stride": 1,
             "groups": 1, "act": "relu", "bias": True}
    records = [{"key": key, "layers": [layer], "latency_ms": 1.0, "source": source}
               for key, source in (("a", "profile"), ("b", "profile"), ("c", "profile"), ("d", "search"))]
    store = SimpleNamespace(subnet_records=lambda space_hash, batch_size: records)
    space = SimpleNamespace(config_hash=lambda: "h")
    predictor = SimpleNamespace(metadata={"training": training})
    train, test = store_split(predictor, store, space, 1)
    expected_train = training.get("train_keys", ["a", "b"])
    assert [s["key"] for s in train] == expected_train
    assert [s["key"] for s in test] == sorted({"a", "b", "c", "d"} - set(expected_train))


@pytest.mark.parametrize("n_subnets", [12, "abc"])
def test_n_subnets_names_smallest_working_value(n_subnets) -> None:
    from predictors.build import PredictorConfig

    with pytest.raises(PredictorError, match=r"predictor.n_subnets must be a whole number >= 13, so that 10 subnets"):
        PredictorConfig.from_mapping({"n_subnets": n_subnets})
    PredictorConfig.from_mapping({"n_subnets": 13})


def test_hardware_facts_from_fingerprint() -> None:
    from predictors.build import hardware_facts_from_fingerprint

    for flags, lanes in ((["avx512f", "avx2"], 16), (["avx2", "fma"], 8), (["neon"], 4), ([], 1)):
        facts = hardware_facts_from_fingerprint({"device_type": "cpu", "simd_flags": flags, "threads": 3})
        assert (facts.device, facts.simd_width, facts.threads) == ("cpu", lanes, 3)
    cuda = hardware_facts_from_fingerprint({"device_type": "cuda", "gpu_sm_count": 132})
    assert (cuda.device, cuda.sm_count) == ("cuda", 132)


def test_baselines_fit_on_training_subnets_only() -> None:
    from nas.spaces.layers import LayerSpec
    from predictors.evaluate import baseline_metrics

    def subnet(in_channels: int, out_channels: int, ms: float) -> dict:
        return {"layers": [LayerSpec("conv", in_channels, out_channels, 8, kernel_size=1)], "latency_ms": ms}

    # Training subnets: 8 * c * 64 MACs in c / 8 ms. Test subnets: 9 * c * 64 MACs in c / 4 ms.
    train = [subnet(8, c, c / 8) for c in (8, 16, 24, 32)]
    test = [subnet(9, c, c / 4) for c in (8, 16, 32)]
    # The lookup table contains the training latencies, and half of the test ones.
    lut = {s["layers"][0].key(): s["latency_ms"] for s in train}
    lut.update({s["layers"][0].key(): s["latency_ms"] / 2 for s in test})
    baselines = baseline_metrics(train, test, lut)
    # Fitted on the training subnets, the MACs line predicts 9 / 16 of each test latency.
    assert baselines["macs_linear"]["mape"] == pytest.approx(100 * 7 / 16)
    # Fitted to the training latencies, the calibration of the table's sums is the identity. So it
    # keeps the table's halved test latencies. Fitted on the test subnets, it would be exact.
    assert baselines["lut_calibrated"]["mape"] == pytest.approx(50.0)
    assert baselines["lut_sum"]["mape"] == pytest.approx(50.0)
