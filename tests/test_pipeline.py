"""A tiny end-to-end run: search.py on synthetic data, then train.py on the study it wrote."""

import json
import subprocess
import sys
from types import SimpleNamespace
from pathlib import Path

import pytest

from nas.report import PARETO_COLUMNS, read_pareto_csv
from tests.conftest import FAST_SEARCH

ROOT = Path(__file__).resolve().parent.parent

# Two stages of up to two blocks with three widths each: 36 subnets and few distinct layer shapes,
# so profiling takes seconds.
TINY_STAGES = "[{depths:[1,2],widths:[8,16,24],stride:1},{depths:[1,2],widths:[16,24,32],stride:2}]"

TINY = [
    "+space=resnet",
    f"space.stages={TINY_STAGES}",
    "data=synthetic",
    "data.num_samples=96",
    "supernet.epochs=1",
    *FAST_SEARCH,
    "search.study_name=tiny",
]


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    return result


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    run_dir = tmp / "search-run"
    result = run("search.py", [*TINY, f"paths.work_dir={tmp / 'work'}", f"hydra.run.dir={run_dir}"], tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp, run_dir, result


def test_search_writes_valid_pareto_csv(searched):
    tmp, run_dir, _ = searched
    header = (run_dir / "pareto.csv").read_text().splitlines()[0]
    assert header == ",".join(PARETO_COLUMNS)
    rows = read_pareto_csv(run_dir / "pareto.csv")
    assert rows
    import yaml

    from nas.spaces import create_space
    from tests.conftest import load_space_config

    config = load_space_config("resnet")
    config["stages"] = yaml.safe_load(TINY_STAGES.replace(":", ": "))
    space = create_space(config)
    for row in rows:
        arch = space.arch_from_dict(row["arch"])
        assert row["macs"] == space.macs(arch)
        assert row["params"] == space.params(arch)
        assert 0.0 <= row["accuracy"] <= 1.0
        assert row["predicted_latency_ms"] > 0
        assert row["measured_latency_ms"] is not None and row["measured_latency_ms"] > 0
    latencies = [r["predicted_latency_ms"] for r in rows]
    assert latencies == sorted(latencies)


def test_search_writes_manifest_plot_and_train_command(searched):
    tmp, run_dir, result = searched
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("config", "packages", "git_commit", "device_fingerprint", "seed", "study_name"):
        assert key in manifest
    assert manifest["config"]["space"]["name"] == "resnet"
    assert (run_dir / "pareto.png").stat().st_size > 1000
    timings = json.loads((run_dir / "timings.json").read_text())
    for key in ("data_s", "supernet_s", "profile_s", "predictor_s", "search_s", "remeasure_s", "total_s"):
        assert key in timings
    command = result.stdout.strip().splitlines()[-1]
    assert f"python train.py search.study_name=tiny paths.work_dir='{tmp / 'work'}' trial=" in command


def test_second_search_reuses_supernet_and_predictor(searched):
    tmp, _, _ = searched
    run_dir = tmp / "search-run-2"
    result = run("search.py", [*TINY[:-1], "search.study_name=tiny-2", f"paths.work_dir={tmp / 'work'}",
                               f"hydra.run.dir={run_dir}"], tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Reusing supernet checkpoint" in result.stderr + result.stdout
    assert len(list((tmp / "work" / "supernets").iterdir())) == 1
    # The reused predictor's profiling belongs to the first run.
    timings = json.loads((run_dir / "timings.json").read_text())
    assert timings["profile_s"] == 0.0
    assert 0.0 <= timings["predictor_s"] <= timings["profile_predictor_s"]


def test_train_finetunes_knee_of_latest_study(searched):
    tmp, _, _ = searched
    run_dir = tmp / "train-run"
    # The distillation teacher is the supernet's largest subnet.
    result = run("train.py", ["search.study_name=tiny", "finetune.epochs=1", "compare_scratch=false",
                              "finetune.teacher=largest", f"paths.work_dir={tmp / 'work'}", f"hydra.run.dir={run_dir}"], tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "distilling with weight 1" in result.stdout + result.stderr
    report = json.loads((run_dir / "finetune.json").read_text())
    for key in ("study", "trial", "arch", "test_accuracy", "measured_latency_ms", "scratch_test_accuracy"):
        assert key in report
    assert report["study"] == "tiny"
    assert report["complete"] is True
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert report["measured_latency_ms"] > 0
    assert (run_dir / "subnet.pt").is_file()
    assert (run_dir / "subnet.pt2").is_file()
    assert not (run_dir / "subnet_b1.pt2").exists()

    import torch

    from nas.export import ExportError, load_finetuned, load_program

    loaded = load_finetuned(run_dir / "subnet.pt")
    assert loaded.arch.to_dict() == report["arch"]
    x = torch.randn(2, 1, 28, 28)
    program = load_program(run_dir / "subnet.pt2")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), program.module()(x), atol=1e-4, rtol=1e-4)
    # The program runs the network as it was timed: BatchNorm folded into the convolutions.
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert any("conv2d" in t for t in targets)
    assert not any("batch_norm" in t for t in targets)
    assert {"channels", "resolution", "pixels", "mean", "std"} <= set(report["input"])
    # data.num_samples=96 with the synthetic data's split of a quarter for testing: 24 test images.
    assert report["test_images"] == 24
    assert report["teacher"] == {"name": "largest", "kd_weight": 1.0}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["study_name"] == "tiny"
    assert manifest["search_run_dir"]
    assert {"torch", "tailnas"} <= set(manifest["packages"])
    with pytest.raises(ExportError, match="not found"):
        load_finetuned(run_dir / "missing.pt")
    with pytest.raises(ExportError, match="is not a train.py checkpoint"):
        load_finetuned(run_dir / "finetune.json")


def test_corrupt_predictor_names_file(searched, tmp_path):
    tmp, _, _ = searched
    broken = tmp_path / "predictor.json"
    broken.write_text("{not json")
    result = run("search.py", [*TINY[:-1], "search.study_name=tiny-3", f"predictor.path={broken}",
                               f"paths.work_dir={tmp / 'work'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp)
    assert result.returncode == 1
    assert str(broken) in result.stderr
    assert "Traceback" not in result.stderr


def test_search_unknown_sampler_stops_early(tmp_path):
    work = tmp_path / "work"
    result = run("search.py", ["+space=resnet", "search.sampler=foo", f"paths.work_dir={work}",
                               f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 1
    assert "Unknown search.sampler='foo'; available samplers are ['nsga2', 'tpe', 'random']" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (work / "supernets").exists()


def test_train_gate_settings_without_gates(tmp_path):
    result = run("train.py", ["+gates.keep_ratio=0.3", f"paths.work_dir={tmp_path / 'work'}",
                              f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 1
    assert "gates.keep_ratio set, but gates=none" in result.stderr
    assert "Add gates=feature" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_without_study_database_names_it(tmp_path):
    work = tmp_path / "empty-work"
    result = run("train.py", [f"paths.work_dir={work}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 1
    assert f"no study database at {work / 'studies.db'}" in result.stderr
    assert "python search.py +space=resnet" in result.stderr
    assert not (work / "studies.db").exists()
    assert "Traceback" not in result.stderr


def test_train_with_gates_records_them(searched):
    tmp, _, _ = searched
    run_dir = tmp / "train-gates"
    # Trial 1 (widths 16/32) comes from the seeded first population, so it is the same subnet on
    # every machine. The knee can be a 16/16 subnet, whose 16 channels no gate can cut where 8 cost
    # as much as 16, and measured placement can leave every block ungated on a busy machine.
    result = run("train.py", ["search.study_name=tiny", "trial=1", "finetune.epochs=1", "compare_scratch=false",
                              "gates=feature", "gates.placement=all", "gates.spatial=false",
                              f"paths.work_dir={tmp / 'work'}", f"hydra.run.dir={run_dir}"], tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((run_dir / "finetune.json").read_text())
    assert report["gates"]["config"]["keep_ratio"] == 0.4
    assert (run_dir / "subnet.pt2").is_file()
    assert "gates.schedule_epochs=2 is not below finetune.epochs=1" in result.stdout + result.stderr
    # Accuracy at every ratio of the calibration grid, the deployed one included.
    sweep = {row["keep_ratio"]: row for row in report["keep_ratio_accuracy"]}
    assert {0.25, 0.4, 1.0} <= set(sweep)
    assert all(0.0 <= row["val_accuracy"] <= 1.0 and 0.0 <= row["test_accuracy"] <= 1.0 for row in sweep.values())
    assert sweep[0.4]["test_accuracy"] == pytest.approx(report["test_accuracy"], abs=1e-6)
    assert set(report["keep_ratio_latency_ms"]) == {f"{ratio:g}" for ratio in sweep}
    assert all(ms > 0 for ms in report["keep_ratio_latency_ms"].values())
    import torch

    from nas.export import load_finetuned, load_program
    from nas.gates import GatedNetwork

    single = load_program(run_dir / "subnet_b1.pt2").module()
    batched = load_program(run_dir / "subnet.pt2").module()
    loaded = load_finetuned(run_dir / "subnet.pt")
    assert isinstance(loaded, GatedNetwork)
    assert loaded.keep_ratio == 0.4
    x = torch.randn(1, 1, 28, 28)
    torch.testing.assert_close(single(x), batched(x), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), single(x), atol=1e-4, rtol=1e-4)
    [batch_check] = report["gates_batch_slowdown"]
    assert batch_check["batch_size"] == 32
    # Keyed as keep_ratio_latency_ms is, so that one key reads both.
    assert "0.4" in batch_check["gated_ms"]
    assert "1" in batch_check["gated_ms"]
    assert set(batch_check["gated_ms"]) <= set(report["keep_ratio_latency_ms"])
    assert batch_check["ungated_ms"] > 0
    assert report["ungated_latency_ms"] > 0
    assert "ungated " in result.stdout


def test_train_with_gate_budget_profiles_blocks(searched):
    tmp, _, _ = searched
    run_dir = tmp / "train-budget"
    result = run("train.py", ["search.study_name=tiny", "finetune.epochs=1", "compare_scratch=false", "gates=feature",
                              "gates.placement=all", "gates.latency_budget_ms=1000", "hardware.repeats=3",
                              "gates.batch_check=false",
                              f"paths.work_dir={tmp / 'work'}", f"hydra.run.dir={run_dir}"], tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((run_dir / "finetune.json").read_text())
    assert report["gates"]["keep_ratio"] == 1.0  # 1000 ms fits every keep ratio, so the largest is chosen
    assert report["latency_budget_ms"] == 1000
    assert "gates_batch_slowdown" not in report
    assert "(budget 1000 ms; ungated " in result.stdout
    stores = list((tmp / "work" / "profiles").glob("*/gated_blocks.jsonl"))
    assert len(stores) == 1
    records = [json.loads(line) for line in stores[0].read_text().splitlines()]
    assert records and {r["source"] for r in records} == {"train"}


def test_profile_cli_times_gated_blocks(tmp_path):
    args = ["+space=resnet", f"space.stages={TINY_STAGES}", "data=synthetic", "profile.n_subnets=2",
            "profile.gate_subnets=2", "profile.passes=1", "profile.progress=false", "hardware.warmup=0",
            "hardware.repeats=1", f"paths.work_dir={tmp_path / 'work'}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-m", "predictors.profile", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Gated blocks:" in result.stdout
    assert list((tmp_path / "work" / "profiles").glob("*/gated_blocks.jsonl"))
    bad = subprocess.run([sys.executable, "-m", "predictors.profile", *args[:-2], "profile.gate_subnets=-1",
                          f"paths.work_dir={tmp_path / 'work'}", f"hydra.run.dir={tmp_path / 'run2'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0
    assert "profile.gate_subnets must be 0 or more" in bad.stderr
    compiled = subprocess.run([sys.executable, "-m", "predictors.profile", *args[:-2], "hardware.runtime=compile",
                               f"paths.work_dir={tmp_path / 'work'}", f"hydra.run.dir={tmp_path / 'run3'}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    assert compiled.returncode != 0
    assert "hardware.runtime=eager only" in compiled.stderr


class SplitStub:
    """A datamodule whose validation and test loaders yield the given image batches."""

    def __init__(self, val: list, test: list) -> None:
        self.val, self.test = val, test

    def val_dataloader(self) -> list:
        return [(x, None) for x in self.val]

    def test_dataloader(self) -> list:
        return [(x, None) for x in self.test]


def test_timing_images_from_validation_then_test():
    import torch

    from train import timing_images

    val = [torch.full((2, 1, 4, 4), 1.0), torch.full((1, 1, 4, 4), 2.0)]
    test = [torch.full((5, 1, 4, 4), 3.0)]

    two = timing_images(SplitStub(val, test), 2)
    assert two.shape == (2, 1, 4, 4)
    assert torch.equal(two, val[0])

    repeated = timing_images(SplitStub(val, test), 7)
    assert repeated.shape == (7, 1, 4, 4)
    assert repeated[:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0, 1.0, 1.0, 2.0, 1.0]

    from_test = timing_images(SplitStub([], test), 3)
    assert torch.equal(from_test, test[0][:3])

    assert timing_images(SplitStub([], []), 3) is None


def test_checkpoint_after_finetuning_loads(resnet_space, tmp_path):
    import torch

    import train
    from nas.export import load_finetuned

    arch = resnet_space.smallest()
    model = resnet_space.build_supernet().build_static(arch)
    train.save_checkpoint(tmp_path, model, resnet_space, arch, {"test_accuracy": 0.5, "complete": False})
    report = json.loads((tmp_path / "finetune.json").read_text())
    assert report == {"test_accuracy": 0.5, "complete": False}
    assert model.training  # the model itself is left as it was
    loaded = load_finetuned(tmp_path / "subnet.pt")
    x = torch.randn(2, *resnet_space.input_shape(arch))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))


def test_checkpoint_unregistered_family(resnet_space, tmp_path):
    import torch

    import train
    from nas.export import ExportError, load_finetuned

    arch = resnet_space.smallest()
    model = resnet_space.build_supernet().build_static(arch)
    # One module name as a string, as imports=my_lab.spaces on the command line gives it.
    train.save_checkpoint(tmp_path, model, resnet_space, arch, {"complete": True}, imports="my_lab.spaces")
    payload = torch.load(tmp_path / "subnet.pt", weights_only=True)
    payload["space"] = {**payload["space"], "family": "lab_family"}
    torch.save(payload, tmp_path / "subnet.pt")
    with pytest.raises(ExportError, match=r"space family 'lab_family', which is not registered here .*; "
                                          r"import my_lab.spaces first"):
        load_finetuned(tmp_path / "subnet.pt")


def test_checkpoint_mismatched_weights_named(resnet_space, tmp_path):
    import torch

    import train
    from nas.export import ExportError, load_finetuned

    arch = resnet_space.smallest()
    model = resnet_space.build_supernet().build_static(arch)
    train.save_checkpoint(tmp_path, model, resnet_space, arch, {"complete": True})
    payload = torch.load(tmp_path / "subnet.pt", weights_only=True)
    name = next(key for key in payload["state_dict"] if key.endswith("weight"))
    payload["state_dict"][name] = payload["state_dict"][name][:1]
    payload["state_dict"]["extra.weight"] = torch.zeros(1)
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ExportError, match=rf"1 unexpected \(extra.weight\); 1 of another shape \({name}\)"):
        load_finetuned(tmp_path / "edited.pt")


def test_batch_check_noise_gauge():
    from nas.gates import timing_noise

    record = {"ungated_ms": 10.0, "ungated_spread": 0.01, "gated_ms": {0.4: 10.7, 1.0: 10.4}}
    assert timing_noise(record) == pytest.approx(0.04)  # keep 1.0 measured 4% off
    record["gated_ms"][1.0] = 9.8
    assert timing_noise(record) == pytest.approx(0.02)  # off in either direction
    del record["gated_ms"][1.0]
    assert timing_noise(record) == pytest.approx(0.01)


def test_checkpoint_changed_gate_record_named(resnet_space, tmp_path):
    import torch

    import train
    from nas.export import ExportError, load_finetuned
    from nas.gates import apply_gates

    arch = resnet_space.smallest()
    model = apply_gates(resnet_space.build_supernet().build_static(arch), {"name": "feature", "placement": "all"})
    train.save_checkpoint(tmp_path, model, resnet_space, arch, {"complete": True, "gates": model.describe()})
    assert load_finetuned(tmp_path / "subnet.pt").keep_ratio == model.keep_ratio
    payload = torch.load(tmp_path / "subnet.pt", weights_only=True)
    payload["gates"]["config"]["keep_ratio"] = 2.0
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(ExportError, match="edited.pt' has a gate record that does not rebuild .*keep_ratio"):
        load_finetuned(tmp_path / "edited.pt")
    (tmp_path / "subnet.pt2").write_bytes(b"not a program")
    with pytest.raises(ExportError, match="is a torch.export program; load it with nas.export.load_program"):
        load_finetuned(tmp_path / "subnet.pt2")


@pytest.mark.parametrize(("gated_ms", "spread", "expected"), [
    ({0.4: 10.3, 1.0: 10.1}, 0.01, "every keep ratio ran within 5%"),
    ({0.4: 10.8, 1.0: 10.1}, 0.01, "Within the bound: keep ratios [1.0]"),
    ({0.4: 10.6, 1.0: 10.1}, 0.02, "noise can explain it"),
])
def test_batch_check_warnings(subnet, monkeypatch, caplog, gated_ms, spread, expected):
    import logging

    import nas.gates
    import train
    from nas.gates import apply_gates, timing_noise

    network = apply_gates(subnet, {"name": "feature", "placement": "all", "measure_batch_sizes": [1, 32]})
    record = {"batch_size": 32, "ungated_ms": 10.0, "gated_ms": gated_ms, "ungated_spread": spread,
              "max_slowdown": 0.05}
    worst = max(gated_ms, key=gated_ms.get)
    record.update(worst_ratio=worst, worst_slowdown=gated_ms[worst] / 10.0 - 1.0)
    record["timing_noise"] = timing_noise(record)
    monkeypatch.setattr(nas.gates, "measure_batch_slowdown", lambda *args, **kwargs: [dict(record)])
    monkeypatch.setattr(train, "timing_images", lambda datamodule, count: None)
    space = SimpleNamespace(input_shape=lambda arch: [1, 28, 28])
    with caplog.at_level(logging.INFO, logger="tailnas.train"):
        [saved] = train.check_gate_batches(network, subnet, space, None, None, {"device": "cpu"})
    assert expected in caplog.text
    assert saved["gated_ms"] == {f"{ratio:g}": ms for ratio, ms in gated_ms.items()}


def test_two_workers_through_submitit_share_one_study(searched):
    import shutil

    import optuna

    import fcntl
    import threading
    import time

    tmp, _, _ = searched
    # The workers start on a new work folder with the fixture's measurements: no study database,
    # no predictor and no supernet, so both start by wanting to build each.
    work = tmp / "workers-work"
    shutil.copytree(tmp / "work" / "profiles", work / "profiles")
    [device] = [folder for folder in (work / "profiles").iterdir() if folder.is_dir()]
    logs = [tmp / "workers" / job / "search.log" for job in ("0", "1")]
    waiting = "Waiting for another run that is profiling this device"
    # The test holds the device's profiling lock until both workers wait for it.
    holder = open(device / "profiling.lock", "a")
    fcntl.flock(holder, fcntl.LOCK_EX)

    def release_when_both_wait():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(log.is_file() and waiting in log.read_text() for log in logs):
                break
            time.sleep(0.2)
        holder.close()

    releaser = threading.Thread(target=release_when_both_wait)
    releaser.start()
    args = ["-m", *TINY[:-1], "search.study_name=tiny-workers", f"paths.work_dir={work}",
            "hydra/launcher=submitit_local", "search.worker=0,1", "search.sampler=random",
            f"hydra.sweep.dir={tmp / 'workers'}"]
    try:
        result = run("search.py", args, tmp)
    finally:
        releaser.join()
        holder.close()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp / "workers" / job / "pareto.csv").is_file()
    texts = [log.read_text() for log in logs]
    assert all(waiting in text for text in texts)
    # One worker built the predictor and trained the supernet; the other waited and reused them.
    assert sum("Reusing latency predictor" in text for text in texts) == 1, texts
    assert sum("Reusing supernet checkpoint" in text for text in texts) == 1, texts
    assert len(list((work / "supernets").iterdir())) == 1
    study = optuna.load_study(study_name="tiny-workers", storage=f"sqlite:///{work / 'studies.db'}")
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 12  # search.n_trials=6 from each worker
    draws = {worker: [json.dumps(t.user_attrs["arch"], sort_keys=True) for t in study.trials
                      if t.user_attrs["worker"] == worker] for worker in (0, 1)}
    assert len(draws[0]) == len(draws[1]) == 6
    assert draws[0] != draws[1]  # a seeded random sampler repeats its draws unless each worker has its own seed


DDP = ["supernet.trainer.strategy=ddp", "supernet.trainer.devices=2", "supernet.trainer.accelerator=cpu"]


def test_ddp_search_runs_in_rank_zero(searched):
    import shutil

    import optuna

    tmp, _, _ = searched
    work = tmp / "ddp-work"
    for cached in ("profiles", "predictors"):
        shutil.copytree(tmp / "work" / cached, work / cached)
    run_dir = tmp / "ddp-run"
    result = run("search.py", [*TINY[:-1], *DDP, "search.study_name=tiny-ddp", f"paths.work_dir={work}",
                               f"hydra.run.dir={run_dir}"], tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Lightning names the Hydra job of rank 1 train_ddp_process_1, in search.py too.
    rank_one = (run_dir / "train_ddp_process_1.log").read_text()
    # Rank 1 did not wait for the training lock that rank 0 held, trained, and left the search to rank 0.
    assert "Waiting for another run" not in rank_one
    assert "This process is a DDP rank other than 0" in rank_one
    study = optuna.load_study(study_name="tiny-ddp", storage=f"sqlite:///{work / 'studies.db'}")
    assert len(study.trials) == 6  # search.n_trials, from rank 0 alone
    assert len(list((work / "supernets").iterdir())) == 1


def test_ddp_gated_finetuning_shares_gates(searched):
    tmp, _, _ = searched
    run_dir = tmp / "ddp-train"
    args = ["search.study_name=tiny", "finetune.epochs=2", "compare_scratch=false", "gates=feature",
            "gates.schedule_epochs=1", "finetune.trainer.strategy=ddp", "finetune.trainer.devices=2",
            "finetune.trainer.accelerator=cpu", f"paths.work_dir={tmp / 'work'}", f"hydra.run.dir={run_dir}"]
    result = run("train.py", args, tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank_zero = (run_dir / "train.log").read_text()
    rank_one = (run_dir / "train_ddp_process_1.log").read_text()
    # Rank 1 built rank 0's gates from gate_plan.json instead of timing a placement of its own.
    timed = "gates: gateable blocks at batch"
    assert timed in rank_zero
    assert timed not in rank_one
    plan = json.loads((run_dir / "gate_plan.json").read_text())
    report = json.loads((run_dir / "finetune.json").read_text())
    assert report["complete"] is True
    assert [b["kept"] for b in report["gates"]["blocks"]] == [b["kept"] for b in plan["blocks"]]
    assert "rank other than 0" in rank_one
    assert "measured_latency" not in rank_one
    # The reported test accuracy, averaged over the ranks' shares of the test images, is that of
    # the saved network on the whole test split.
    import optuna
    import torch

    from nas.data import build_datamodule
    from nas.export import load_finetuned

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp / 'work' / 'studies.db'}")
    datamodule = build_datamodule(study.user_attrs["data"])
    datamodule.setup()
    network = load_finetuned(run_dir / "subnet.pt").eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in datamodule.test_dataloader():
            correct += int((network(x).argmax(dim=1) == y).sum())
            total += len(y)
    assert report["test_accuracy"] == pytest.approx(correct / total, abs=1e-6)


def test_tail_aware_study_records_searched_space(searched):
    import re

    import optuna

    tmp, _, _ = searched
    result = run("search.py", [*TINY[:-1], "search.study_name=tiny-tail", "space.tail_aware=true",
                               f"paths.work_dir={tmp / 'work'}", f"hydra.run.dir={tmp / 'tail-run'}"], tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    moved = re.findall(r"Tail-aware width_(\d): \[[\d, ]+\] -> \[([\d, ]+)\] \(latency in ms by width", result.stdout + result.stderr)
    assert moved
    # Logged once per decision, and the plain study's supernet and predictor are reused.
    assert len(moved) == len({stage for stage, _ in moved})
    assert "Reusing supernet checkpoint" in result.stdout + result.stderr
    assert (tmp / "tail-run" / "width_moves.png").is_file()
    study = optuna.load_study(study_name="tiny-tail", storage=f"sqlite:///{tmp / 'work' / 'studies.db'}")
    searched_stages = study.user_attrs["space"]["stages"]
    configured_stages = study.user_attrs["space_config"]["stages"]
    for stage, widths in moved:
        assert searched_stages[int(stage)]["widths"] == [int(w) for w in widths.split(", ")]
        assert configured_stages[int(stage)]["widths"] == [[8, 16, 24], [16, 24, 32]][int(stage)]  # TINY_STAGES


def test_impossible_budget_stops_before_supernet(tmp_path):
    result = run("search.py", [*TINY[:-1], "search.study_name=too-fast", "search.latency_budget_ms=0.0001",
                               f"paths.work_dir={tmp_path / 'work'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "search.latency_budget_ms=0.0001 is below the predicted latency of the smallest subnet" in output
    assert "Stage supernet" not in output
    assert not (tmp_path / "work" / "supernets").exists()


def test_journal_file_storage(searched):
    tmp, _, _ = searched
    journal = tmp / "journal" / "studies.log"
    storage = f"search.storage=journal://{journal}"
    result = run("search.py", [*TINY[:-1], "search.study_name=tiny-journal", storage, f"paths.work_dir={tmp / 'work'}",
                               f"hydra.run.dir={tmp / 'journal-run'}"], tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert journal.is_file()
    assert f"train.py search.study_name=tiny-journal search.storage='journal://{journal}'" in result.stdout
    compared = subprocess.run([sys.executable, "-m", "nas.compare", "--storage", f"journal://{journal}", "--all",
                               "--out", str(tmp / "journal-compare")], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "tiny-journal" in compared.stdout


def test_search_worker_checked_before_data(tmp_path):
    result = run("search.py", [*TINY[:-1], "search.study_name=w", "search.worker=abc",
                               f"paths.work_dir={tmp_path / 'work'}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 1
    assert "search.worker must be a whole number >= 0, one per worker on a study, but got 'abc'" in result.stderr
    assert "Stage data" not in result.stdout + result.stderr


def test_over_budget_advice_names_ratio():
    from train import over_budget_advice

    result = {
        "keep_ratio_latency_ms": {"1": 1.2, "0.6": 0.9, "0.4": 0.8, "0.25": 0.7},
        "keep_ratio_accuracy": [
            {"keep_ratio": 1.0, "val_accuracy": 0.98, "test_accuracy": 0.97},
            {"keep_ratio": 0.6, "val_accuracy": 0.97, "test_accuracy": 0.97},
            {"keep_ratio": 0.4, "val_accuracy": 0.975, "test_accuracy": 0.96},
            {"keep_ratio": 0.25, "val_accuracy": 0.95, "test_accuracy": 0.95},
        ],
    }
    # Within 0.9 ms: 0.6, 0.4 and 0.25; 0.4 has the best validation accuracy.
    advice = over_budget_advice(result, 0.9)
    assert "Keep ratio 0.4 measured 0.800 ms, validation accuracy 97.50%" in advice
    assert "model.set_keep_ratio(0.4)" in advice
    # Gates that slow every ratio past the budget: no ratio to suggest.
    advice = over_budget_advice(result, 0.5)
    assert "No calibrated keep ratio measured within it (the fastest, 0.25, measured 0.700 ms)" in advice
    assert "set_keep_ratio" not in advice


def test_keep_all_spread_warning():
    from train import keep_all_spread_warning

    noisy = keep_all_spread_warning({"keep_ratio_latency_ms": {"1": 4.70, "0.4": 4.49}, "ungated_latency_ms": 8.74})
    assert noisy is not None
    assert "measured 4.700 ms and the ungated subnet 8.740 ms, 46% apart" in noisy
    assert keep_all_spread_warning({"keep_ratio_latency_ms": {"1": 0.96, "0.4": 0.8}, "ungated_latency_ms": 1.0}) is None
    # A range that stops below 1 has no keep-1.0 timing to compare.
    assert keep_all_spread_warning({"keep_ratio_latency_ms": {"0.9": 4.7}, "ungated_latency_ms": 8.74}) is None
    assert keep_all_spread_warning({}) is None


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime"])
def test_outputs_include_onnx_when_timed_so(resnet_space, tmp_path, runtime):
    import numpy as np
    import onnxruntime as ort
    import torch

    import train

    arch = resnet_space.smallest()
    model = resnet_space.build_supernet().build_static(arch).eval()
    hardware = {"device": "cpu", "runtime": runtime, "batch_size": 2}
    train.save_outputs(tmp_path, model, resnet_space, arch, {"hardware": hardware})
    assert (tmp_path / "subnet.pt2").is_file()
    if runtime == "eager":
        assert not (tmp_path / "subnet.onnx").exists()
        return
    # The ONNX file runs at the timing batch size and gives the network's outputs.
    session = ort.InferenceSession(str(tmp_path / "subnet.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(2, *resnet_space.input_shape(arch))
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-4, rtol=1e-4)


def test_resume_without_remeasure_reports_stored(searched, tmp_path):
    import shutil

    import optuna

    tmp, _, _ = searched
    work = tmp_path / "work"
    shutil.copytree(tmp / "work", work)
    run_dir = tmp_path / "resumed"
    result = run("search.py", [*TINY, "search.n_trials=1", "search.remeasure=false", f"paths.work_dir={work}",
                               f"hydra.run.dir={run_dir}"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{work / 'studies.db'}")
    stored = study.user_attrs["measured_latency_ms"]
    rows = read_pareto_csv(run_dir / "pareto.csv")
    assert rows
    # A front subnet that an earlier run measured keeps that measurement; a new one has none.
    for row in rows:
        if str(row["trial"]) in stored:
            assert row["measured_latency_ms"] == pytest.approx(stored[str(row["trial"])], abs=1e-6)
        else:
            assert row["measured_latency_ms"] is None


def test_gated_from_scratch_has_no_teacher(searched, tmp_path):
    tmp, _, _ = searched
    run_dir = tmp_path / "train-gates-scratch"
    result = run("train.py", ["search.study_name=tiny", "finetune.epochs=1", "gates=feature", "from_scratch=true",
                              "gates.schedule_epochs=0", "gates.batch_check=false",
                              f"paths.work_dir={tmp / 'work'}", f"hydra.run.dir={run_dir}"], tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The untrained ungated subnet would only teach noise.
    report = json.loads((run_dir / "finetune.json").read_text())
    assert report["teacher"] == {"name": "none", "kd_weight": 0.0}
    assert "distilling" not in result.stdout + result.stderr
