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
from tests.conftest import load_benchmark

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


# -- benchmarks/external.py: its space loading and its one-line errors ---------------------------
@pytest.fixture(scope="module")
def external_bench():
    return load_benchmark("external")


def bench_error(module, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as excinfo:
        module.main(argv)
    assert isinstance(excinfo.value.code, str), excinfo.value.code
    return excinfo.value.code


@pytest.mark.parametrize("variant", ["mobilenet", "resnet"])
def test_bench_fills_space_data_keys(external_bench, variant: str) -> None:
    space = external_bench.load_space(ROOT / f"conf/space/{variant}.yaml")
    assert space.name == variant
    assert space.raw_config["in_channels"] == 3
    assert space.raw_config["num_classes"] == 1000
    assert space.input_shape(space.largest())[0] == 3


def test_bench_wrong_space_encoding(external_bench) -> None:
    message = bench_error(external_bench, ["--csv", str(SAMPLE), "--space", str(ROOT / "conf/space/mobilenet.yaml"),
                                           "--n-train", "50"])
    assert message.startswith("error: Row 0: arch ")
    assert "arch.r=224 is not allowed; allowed values are [28]. Pass the space whose encoding the arch column uses." in message


def test_bench_unresolvable_space_key_named(external_bench, tmp_path: Path) -> None:
    space = tmp_path / "odd.yaml"
    space.write_text("name: odd\nfamily: resnet\nwidth: ${data.width}\n")
    message = bench_error(external_bench, ["--csv", str(SAMPLE), "--space", str(space)])
    assert message == (f"error: space YAML {space} has a key that cannot be resolved: Interpolation key 'data.width' "
                       "not found (at width). This script fills only data.in_channels=3, data.num_classes=1000, "
                       "data.resolution=224; pass a space YAML whose other keys are literal values.")


def test_bench_n_train_too_large(external_bench) -> None:
    message = bench_error(external_bench, ["--csv", str(SAMPLE)])
    assert message == (f"error: --n-train 1000 does not fit {SAMPLE}: device 'NVIDIA GeForce RTX 2080 Ti' has 200 rows, "
                       "so --n-train must be in [10, 199] to leave rows for testing.")


def test_bench_missing_default_csv(external_bench, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(external_bench, "DEFAULT_CSV", tmp_path / "absent.csv")
    message = bench_error(external_bench, [])
    assert message.startswith(f"error: the default external latency CSV {tmp_path / 'absent.csv'} is not there.")
    assert message.endswith("python benchmarks/external.py --csv tests/data/ofa_mbv3_sample.csv --n-train 150")


def test_bench_sample_command_is_valid(external_bench) -> None:
    args = external_bench.parse_args(external_bench.SAMPLE_COMMAND.split()[2:])
    assert (ROOT / args.csv).is_file()
    assert 10 <= args.n_train < len(read_external_csv(ROOT / args.csv).query("device == 'NVIDIA Tesla P40'"))


def test_header_only_csv_rejected(external_bench, tmp_path: Path) -> None:
    path = tmp_path / "header.csv"
    path.write_text("device,batch_size,arch,latency_ms\n")
    with pytest.raises(ExternalDataError, match="has a header but no rows; add one row per measured subnet"):
        read_external_csv(path)
    assert bench_error(external_bench, ["--csv", str(path)]) == (
        f"error: {path} has a header but no rows; add one row per measured subnet.")


def test_empty_csv_rejected(external_bench, tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    expected = (f"{path} is empty; expected a header with columns ['arch', 'latency_ms', 'device', 'batch_size'] "
                "and one row per measured subnet.")
    with pytest.raises(ExternalDataError) as excinfo:
        read_external_csv(path)
    assert str(excinfo.value) == expected
    assert bench_error(external_bench, ["--csv", str(path)]) == f"error: {expected}"


def test_empty_frame_rejected() -> None:
    frame = pd.DataFrame(columns=["device", "batch_size", "arch", "latency_ms"])
    with pytest.raises(ExternalDataError, match="frame has no rows"):
        evaluate_external(resnet_space(), frame, n_train=10)


def test_bench_sm_counts_for_unknown_gpu(external_bench, tmp_path: Path, capsys) -> None:
    path = tmp_path / "fake.csv"
    synthetic_csv(path, 40, seed=2)
    # The rows are subnets of resnet_space(), whose data keys take their defaults, not ImageNet's.
    space_yaml = tmp_path / "resnet28.yaml"
    space_yaml.write_text(yaml.safe_dump(resnet_space().raw_config))
    space = ["--space", str(space_yaml)]
    message = bench_error(external_bench, ["--csv", str(path), *space, "--n-train", "30"])
    assert "SM count of device 'Fake GPU' is unknown" in message
    assert "--sm-counts 'Fake GPU=SMS'" in message
    external_bench.main(["--csv", str(path), *space, "--n-train", "30", "--max-test", "5", "--sm-counts", "Fake GPU=20"])
    line = json.loads(capsys.readouterr().out)
    assert line["devices"]["Fake GPU"]["n_train"] == 30
    assert bench_error(external_bench, ["--csv", str(path), "--sm-counts", "Fake GPU"]) == (
        "error: --sm-counts takes DEVICE=SMS with a whole number of SMs >= 1, such as 'NVIDIA A100-SXM4-80GB=108', "
        "but got 'Fake GPU'.")


def test_bench_imports_user_family(external_bench, tmp_path: Path) -> None:
    from example_space import EXAMPLE_CONFIG

    space = tmp_path / "separable.yaml"
    space.write_text(yaml.safe_dump(EXAMPLE_CONFIG))
    header = tmp_path / "header.csv"
    header.write_text("device,batch_size,arch,latency_ms\n")
    # The space loads once its module is imported, so the run gets as far as the empty CSV.
    message = bench_error(external_bench, ["--csv", str(header), "--space", str(space), "--imports", "example_space"])
    assert message == f"error: {header} has a header but no rows; add one row per measured subnet."
    message = bench_error(external_bench, ["--csv", str(header), "--imports", "no_such_module"])
    assert message.startswith("error: imports: cannot import 'no_such_module'")
