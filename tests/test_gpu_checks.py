"""benchmarks/gpu_checks.py on CPU with a tiny space: the JSON it writes, and a failing part that keeps the others."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent

TINY_ARGS = [
    "--device", "cpu", "--space", "resnet_tiny_custom", "--resolution", "28", "--batch-sizes", "1",
    "--tail-batch-size", "1", "--n-subnets", "14", "--tail-archs", "2", "--warmup", "0", "--repeats", "2",
    "--budget-s", "60",
]


@pytest.fixture
def gpu_checks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ModuleType]:
    """Load the script as a module, with small XGBoost models and no minimum of tail-aware pairs.

    ``main`` sets torch's thread count on CPU; the fixture restores it.
    """
    spec = importlib.util.spec_from_file_location("gpu_checks_under_test", ROOT / "benchmarks" / "gpu_checks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)

    config = yaml.safe_load((ROOT / "conf" / "predictor" / "xgb.yaml").read_text())
    config["layer_model"]["n_estimators"] = 30
    config["network_model"]["n_estimators"] = 30
    small = tmp_path / "xgb_small.yaml"
    small.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(module, "PREDICTOR_CONFIG", small)
    monkeypatch.setattr(module, "MIN_TAIL_ARCHS", 1)
    monkeypatch.setattr(module, "FIT_RESERVE_S", 5.0)
    threads = module.torch.get_num_threads()
    yield module
    module.torch.set_num_threads(threads)


def test_cpu_run_writes_every_figure(gpu_checks: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    result = gpu_checks.main([*TINY_ARGS, "--out", str(out)])

    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    assert json.loads((out / "gpu_checks.json").read_text()) == result
    assert result["complete"] is True
    assert set(result) >= {"device", "settings", "parts", "targets", "total_s"}
    assert set(result["device"]) >= {"gpu_name", "gpu_sm_count", "torch_version", "cuda_version", "fingerprint_id"}
    assert list(result["parts"]) == ["predictor_b1", "tail_aware_b1"]

    predictor = result["parts"]["predictor_b1"]
    assert "error" not in predictor
    for key in ("within_10pct", "within_5pct", "kendall_tau", "mape", "interval_coverage_90", "macs_within_10pct",
                "noise_floor_within_10pct", "layers_s", "subnets_s", "fit_s", "seconds", "width_step"):
        assert predictor[key] is not None, key
    assert predictor["n_subnets"] == 14
    assert predictor["n_train"] + predictor["n_test"] == 14
    assert predictor["noise_floor_n"] == 14
    assert predictor["plots"] == ["b1/predicted_vs_measured.png", "b1/staircase.png"]
    assert (out / "b1" / "predicted_vs_measured.png").is_file()

    tail = result["parts"]["tail_aware_b1"]
    assert "error" not in tail
    assert tail["n_archs"] == 2
    assert tail["sweep_layers_measured"] >= 0
    assert tail["mean_macs_ratio"] >= 1.0
    assert tail["mean_latency_ratio"] > 0
    assert set(tail["widths_tail_aware"]) == set(tail["widths_plain"]) == {"width_0", "width_1"}
    assert len((out / "tail_aware_archs.csv").read_text().splitlines()) == 3

    assert set(result["targets"]) == {"predictor_b1_within_10pct", "tail_aware_mean_macs_ratio",
                                      "tail_aware_mean_latency_ratio", "total_s"}
    assert result["targets"]["predictor_b1_within_10pct"]["value"] == predictor["within_10pct"]
    assert all(target["met"] in (True, False) for target in result["targets"].values())


def test_failing_part_keeps_other_figures(gpu_checks: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fail(*args: object, **kwargs: object) -> dict:
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(gpu_checks, "predictor_part", fail)
    out = tmp_path / "out"
    # Ten pairs also pass the interim save that the tail-aware part makes every ten pairs.
    result = gpu_checks.main([*TINY_ARGS, "--tail-archs", "10", "--out", str(out)])

    predictor = result["parts"]["predictor_b1"]
    assert predictor["error"] == "RuntimeError: simulated out of memory"
    assert predictor["seconds"] >= 0
    assert result["targets"]["predictor_b1_within_10pct"]["met"] is None

    # Without the predictor part's store, the tail-aware part measures the width sweeps it judges from.
    tail = result["parts"]["tail_aware_b1"]
    assert "error" not in tail
    assert "interim" not in tail
    assert tail["n_archs"] == 10
    assert tail["sweep_layers_measured"] > 0
    assert result["targets"]["tail_aware_mean_macs_ratio"]["met"] in (True, False)
    assert json.loads((out / "gpu_checks.json").read_text())["complete"] is True


def test_cuda_without_gpu_names_cpu_flag(gpu_checks: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(gpu_checks.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cpu"):
        gpu_checks.main(["--device", "cuda", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_non_empty_out_rejected(gpu_checks: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(SystemExit, match="not empty"):
        gpu_checks.main([*TINY_ARGS, "--out", str(tmp_path)])


def test_too_few_subnets_rejected(gpu_checks: ModuleType, tmp_path: Path) -> None:
    assert gpu_checks.minimum_subnets() == 13
    with pytest.raises(SystemExit, match="--n-subnets must be >= 13"):
        gpu_checks.main([*TINY_ARGS[:-2], "--n-subnets", "12", "--out", str(tmp_path / "out")])


def test_tail_part_follows_its_predictor(gpu_checks: ModuleType) -> None:
    args = gpu_checks.parse_args(["--batch-sizes", "1", "64", "--tail-batch-size", "64"])
    assert [name for name, _, _ in gpu_checks.part_order(args)] == ["predictor_b64", "tail_aware_b64", "predictor_b1"]
    args = gpu_checks.parse_args(["--batch-sizes", "1", "--tail-batch-size", "8"])
    assert [name for name, _, _ in gpu_checks.part_order(args)] == ["tail_aware_b8", "predictor_b1"]
