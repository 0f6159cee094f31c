"""Training and evaluating the predictor on latencies measured elsewhere (external CSVs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from nas.spaces import SearchSpace, create_space, list_families, load_space_config
from predictors.external import (
    ExternalDataError,
    evaluate_external,
    hardware_facts_for,
    layer_lists_for,
    read_external_csv,
)
from predictors.features import gemm_shape, gpu_tile_waves
from predictors.xgb import XGBParams

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "tests/data/ofa_mbv3_sample.csv"
SMALL_PARAMS = XGBParams(n_estimators=200, max_depth=4, learning_rate=0.08)


def resnet_space() -> SearchSpace:
    return create_space(load_space_config(ROOT / "conf/space/resnet.yaml"))


def mobilenet_space() -> SearchSpace:
    if "mobilenet" not in list_families():
        pytest.skip("the mobilenet space family is not registered in nas.spaces")
    return create_space(yaml.safe_load((ROOT / "conf/space/mobilenet_imagenet.yaml").read_text()))


def synthetic_csv(path: Path, n_rows: int, seed: int) -> pd.DataFrame:
    """Rows of the resnet space on an imaginary 20-SM GPU whose layers cost one unit per 128x64 wave."""
    space = resnet_space()
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        arch = space.sample(rng)
        waves = 0
        for layer in space.layers(arch):
            m, n, k, gemms = gemm_shape(layer, 32)
            waves += gpu_tile_waves(m, n, gemms, (128, 64), 20)[1] * max(k, 1) + 1
        latency = 0.002 * waves * math.exp(rng.normal(0.0, 0.01))
        rows.append({"device": "Fake GPU", "batch_size": 32, "arch": arch.to_json(), "latency_ms": latency})
    frame = pd.DataFrame(rows)
    frame.to_csv(path, index=False)
    return frame


def test_synthetic_resnet_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "fake.csv"
    synthetic_csv(path, 150, seed=0)
    frame = read_external_csv(path)
    results = evaluate_external(resnet_space(), frame, n_train=100, seed=0, sm_counts={"Fake GPU": 20}, network_params=SMALL_PARAMS)

    assert [r.device for r in results] == ["Fake GPU"]
    result = results[0]
    assert result.n_train == 100
    assert result.n_test == 50
    assert result.predictor["within_10pct"] >= 0.95
    assert result.predictor["mape"] < result.macs_linear["mape"]
    assert set(result.to_dict()) == {"device", "n_train", "n_test", "predictor", "macs_linear"}


def test_sample_beats_macs_linear_per_gpu() -> None:
    space = mobilenet_space()
    frame = read_external_csv(SAMPLE)
    results = evaluate_external(space, frame, n_train=150, seed=0)

    assert sorted(r.device for r in results) == ["NVIDIA GeForce RTX 2080 Ti", "NVIDIA Tesla P40"]
    for result in results:
        assert result.n_test == 50
        assert result.predictor["within_10pct"] >= 0.96, result.device
        assert result.predictor["within_5pct"] >= 0.9, result.device
        assert result.predictor["mape"] < result.macs_linear["mape"], result.device


def test_sample_archs_parse_in_ofa_encoding() -> None:
    space = mobilenet_space()
    frame = read_external_csv(SAMPLE)
    layers = layer_lists_for(space, frame["arch"].tolist()[:5])
    assert len(layers) == 5
    first = json.loads(frame["arch"].iloc[0])
    assert layers[0][0].in_size == first["r"]


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    pd.DataFrame({"arch": ["{}"], "latency_ms": [1.0]}).to_csv(path, index=False)
    with pytest.raises(ExternalDataError, match=r"missing columns \['device', 'batch_size'\]"):
        read_external_csv(path)


def test_non_positive_latency_rows_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    pd.DataFrame(
        {"arch": ["{}", "{}"], "latency_ms": [1.0, -2.0], "device": ["x", "x"], "batch_size": [1, 1]}
    ).to_csv(path, index=False)
    with pytest.raises(ExternalDataError, match=r"rows \[1\]"):
        read_external_csv(path)


def test_missing_csv_names_path(tmp_path: Path) -> None:
    with pytest.raises(ExternalDataError, match="nowhere.csv not found"):
        read_external_csv(tmp_path / "nowhere.csv")


def test_unknown_gpu_needs_sm_count() -> None:
    with pytest.raises(ExternalDataError, match="Pass sm_counts"):
        hardware_facts_for("Mystery GPU")
    assert hardware_facts_for("Mystery GPU", {"Mystery GPU": 12}).sm_count == 12
    assert hardware_facts_for("NVIDIA Tesla P40").sm_count == 30


def test_invalid_arch_row_is_reported() -> None:
    with pytest.raises(ExternalDataError, match="Row 1"):
        layer_lists_for(resnet_space(), [resnet_space().largest().to_json(), '{"depths": [9]}'])


def test_n_train_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "fake.csv"
    synthetic_csv(path, 20, seed=1)
    with pytest.raises(ExternalDataError, match="n_train must be in"):
        evaluate_external(resnet_space(), read_external_csv(path), n_train=20, sm_counts={"Fake GPU": 20})
