"""python -m nas.compare on small studies built with Optuna directly, with the attributes search.py stores."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import optuna
import pytest

from nas.compare import hypervolume, main
from nas.search import CONSTRAINT_KEY

# Hand-computed with the shared reference 1.1 * 3.0 ms (the slowest Pareto latency, in study "tail"):
# plain: 0.80 * (3.3 - 1.2) + (0.90 - 0.80) * (3.3 - 2.2) = 1.79
# tail:  0.70 * (3.3 - 0.5) + (0.75 - 0.70) * (3.3 - 0.9) + (0.95 - 0.75) * (3.3 - 3.0) = 2.14
REFERENCE_MS = 3.3
PLAIN_HYPERVOLUME = 1.79
TAIL_HYPERVOLUME = 2.14


def add_trial(study: optuna.Study, accuracy: float, latency_ms: float, width: int, feasible: bool = True,
              source: str = "predicted", system_attrs: dict | None = None) -> None:
    """Add a finished trial with the user attributes that SearchObjective sets."""
    study.add_trial(optuna.trial.create_trial(
        values=[accuracy, latency_ms],
        user_attrs={"arch": {"widths": [width]}, "predicted_latency_ms": latency_ms,
                    "latency_interval_ms": [latency_ms, latency_ms], "latency_source": source,
                    "macs": 1000 * width, "params": 10 * width},
        system_attrs=dict(system_attrs or {}),
        constraints={CONSTRAINT_KEY: 0.0 if feasible else 1.0},
    ))


def create_search_study(storage: str, name: str, run_dir: Path | None = None) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"])
    study.set_user_attr("tailnas_format_version", 1)
    study.set_user_attr("space", {"name": "resnet", "family": "resnet"})
    study.set_user_attr("space_name", "resnet")
    study.set_user_attr("latency_budget_ms", None)
    study.set_user_attr("run_dir", str(run_dir) if run_dir else "/nonexistent/run")
    return study


@pytest.fixture
def storage(tmp_path: Path) -> str:
    """A SQLite storage with the studies plain (TPE, re-measured), tail (NSGA-II, predicted), empty and foreign."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    run_dir = tmp_path / "plain-run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("search:\n  sampler: tpe\n  n_trials: 4\n")
    plain = create_search_study(url, "plain", run_dir)
    add_trial(plain, 0.80, 1.0, 8)
    add_trial(plain, 0.90, 2.0, 16)
    add_trial(plain, 0.85, 2.5, 24)  # dominated by trial 1
    add_trial(plain, 0.0, 0.5, 4, feasible=False)
    plain.set_user_attr("measured_latency_ms", {"0": 1.2, "1": 2.2})

    tail = create_search_study(url, "tail")
    tail.set_user_attr("space", {"name": "resnet", "family": "resnet", "tail_aware": True})
    nsga2 = {"NSGAIISampler:generation": 0}
    add_trial(tail, 0.70, 0.5, 8, system_attrs=nsga2)
    add_trial(tail, 0.95, 3.0, 32, system_attrs=nsga2)
    add_trial(tail, 0.60, 0.8, 16, system_attrs=nsga2)  # dominated by trial 0
    add_trial(tail, 0.75, 0.9, 24, source="measured", system_attrs=nsga2)

    empty = create_search_study(url, "empty")
    empty.set_user_attr("sampler", "random")  # recorded by search.py; wins over the run directory
    add_trial(empty, 0.0, 5.0, 8, feasible=False)

    foreign = optuna.create_study(storage=url, study_name="foreign", directions=["maximize", "minimize"])
    foreign.add_trial(optuna.trial.create_trial(values=[0.99, 0.1]))
    return url


def run_compare(storage: str, out: Path, *args: str) -> int:
    return main(["--storage", storage, "--out", str(out), *args])


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_hypervolume_hand_computed():
    assert hypervolume([(0.5, 1.0)], 3.0) == pytest.approx(1.0)
    assert hypervolume([(0.5, 1.0), (0.4, 2.0)], 3.0) == pytest.approx(1.0)  # dominated point adds nothing
    assert hypervolume([(0.5, 1.0), (0.9, 3.0)], 3.0) == pytest.approx(1.0)  # at the reference adds nothing
    assert hypervolume([(0.5, 1.0), (0.8, 2.0)], 3.0) == pytest.approx(1.0 + 0.3)
    assert hypervolume([], 3.0) == 0.0


def test_compare_table_values(storage, tmp_path):
    out = tmp_path / "out"
    assert run_compare(storage, out, "plain", "tail", "--budgets-ms", "1", "2.5") == 0

    rows = {row["study"]: row for row in read_csv(out / "compare.csv")}
    assert list(rows) == ["plain", "tail"]
    plain, tail = rows["plain"], rows["tail"]
    assert plain["sampler"] == "tpe"
    assert tail["sampler"] == "nsga2"
    assert plain["space"] == "resnet"
    assert tail["space"] == "resnet (tail-aware)"
    assert plain["trials_finished"] == "4"
    assert plain["pareto_size"] == "2"
    assert tail["pareto_size"] == "3"
    assert float(plain["best_accuracy"]) == pytest.approx(0.90)
    assert float(tail["best_accuracy"]) == pytest.approx(0.95)
    assert float(plain["reference_latency_ms"]) == pytest.approx(REFERENCE_MS)
    assert float(plain["hypervolume"]) == pytest.approx(PLAIN_HYPERVOLUME)
    assert float(tail["hypervolume"]) == pytest.approx(TAIL_HYPERVOLUME)


def test_measured_latency_preferred(storage, tmp_path):
    out = tmp_path / "out"
    assert run_compare(storage, out, "plain", "tail", "--budgets-ms", "1", "2.5") == 0

    rows = {row["study"]: row for row in read_csv(out / "compare.csv")}
    plain, tail = rows["plain"], rows["tail"]
    # Trial 0 of plain was predicted at 1.0 ms and re-measured at 1.2 ms.
    assert float(plain["fastest_latency_ms"]) == pytest.approx(1.2)
    assert plain["fastest_latency_source"] == "measured"
    assert plain["front_latency_source"] == "measured"
    assert plain["best_accuracy_within_1ms"] == ""
    assert float(plain["best_accuracy_within_2.5ms"]) == pytest.approx(0.90)
    assert float(tail["fastest_latency_ms"]) == pytest.approx(0.5)
    assert tail["fastest_latency_source"] == "predicted"
    assert tail["front_latency_source"] == "mixed"
    assert float(tail["best_accuracy_within_1ms"]) == pytest.approx(0.75)


def test_compare_writes_three_files(storage, tmp_path):
    out = tmp_path / "out"
    assert run_compare(storage, out, "plain", "tail") == 0

    fronts = read_csv(out / "fronts.csv")
    assert [(r["study"], int(r["trial"])) for r in fronts] == [
        ("plain", 0), ("plain", 1), ("tail", 0), ("tail", 3), ("tail", 1)
    ]
    by_key = {(r["study"], int(r["trial"])): r for r in fronts}
    assert json.loads(by_key[("plain", 1)]["arch"]) == {"widths": [16]}
    assert float(by_key[("plain", 0)]["predicted_latency_ms"]) == pytest.approx(1.0)
    assert float(by_key[("plain", 0)]["measured_latency_ms"]) == pytest.approx(1.2)
    assert by_key[("tail", 0)]["measured_latency_ms"] == ""
    # Measured during the search: the study stores no prediction for it.
    assert by_key[("tail", 3)]["predicted_latency_ms"] == ""
    assert float(by_key[("tail", 3)]["measured_latency_ms"]) == pytest.approx(0.9)
    assert int(by_key[("tail", 1)]["macs"]) == 32000
    assert (out / "fronts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))


def test_all_skips_foreign_and_reports_empty(storage, tmp_path, caplog, capsys):
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="tailnas.compare"):
        assert run_compare(storage, out, "--all") == 0

    rows = {row["study"]: row for row in read_csv(out / "compare.csv")}
    assert list(rows) == ["plain", "tail", "empty"]
    assert rows["empty"]["pareto_size"] == "0"
    assert rows["empty"]["sampler"] == "random"
    assert rows["empty"]["best_accuracy"] == ""
    assert float(rows["empty"]["hypervolume"]) == 0.0
    assert "Skipping study 'foreign'" in caplog.text
    assert "'empty' has no feasible finished trial" in caplog.text
    assert "Empty Pareto fronts (no feasible finished trial): empty." in capsys.readouterr().out


def test_unknown_study_lists_studies(storage, tmp_path, capsys):
    assert run_compare(storage, tmp_path / "out", "plain", "nope") == 1
    err = capsys.readouterr().err
    assert "Study 'nope' not found" in err
    assert "['empty', 'foreign', 'plain', 'tail']" in err
    assert not (tmp_path / "out").exists()


def test_foreign_study_alone_rejected(storage, tmp_path, capsys):
    assert run_compare(storage, tmp_path / "out", "foreign") == 1
    assert "was written by search.py" in capsys.readouterr().err


def test_missing_storage_file(tmp_path, capsys):
    missing = tmp_path / "none.db"
    assert run_compare(f"sqlite:///{missing}", tmp_path / "out", "plain") == 1
    assert f"No Optuna storage at {missing}" in capsys.readouterr().err
    assert not missing.exists()


def test_names_and_all_conflict(storage, tmp_path, capsys):
    assert run_compare(storage, tmp_path / "out", "plain", "--all") == 1
    assert "not both" in capsys.readouterr().err


def test_negative_budget_rejected(storage, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run_compare(storage, tmp_path / "out", "plain", "--budgets-ms", "-1")
    assert exc.value.code == 2
    assert "expected a positive latency in ms, but got '-1'" in capsys.readouterr().err


def test_wandb_offline_run(storage, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    init_calls = []
    real_init = wandb.init

    def recording_init(*args, **kwargs):
        init_calls.append(kwargs)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", recording_init)
    out = tmp_path / "out"
    assert run_compare(storage, out, "plain", "tail", "--wandb") == 0

    assert len(init_calls) == 1
    assert init_calls[0]["job_type"] == "compare"
    assert init_calls[0]["mode"] == "offline"
    assert init_calls[0]["config"]["studies"] == ["plain", "tail"]
    run_dirs = list(tmp_path.rglob("offline-run-*"))
    assert len(run_dirs) == 1
    assert list(run_dirs[0].glob("run-*.wandb"))
    assert list(run_dirs[0].glob("files/media/images/fronts_plot_*.png"))
    tables = list(run_dirs[0].glob("files/media/table/compare_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert [row[table["columns"].index("study")] for row in table["data"]] == ["plain", "tail"]


def test_tracker_group_defaults_to_study(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed")
    from nas.tracking import create_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = create_tracker({"name": "wandb", "group": None}, {}, "search", str(tmp_path), default_group="study-a")
    group = tracker.run.group
    tracker.finish()
    assert group == "study-a"

    tracker = create_tracker({"name": "wandb", "group": "mine"}, {}, "train", str(tmp_path), default_group="study-a")
    group = tracker.run.group
    tracker.finish()
    assert group == "mine"


def test_wandb_missing_clean_error(storage, tmp_path, monkeypatch, capsys):
    import nas.compare

    def missing_wandb(*args, **kwargs):
        raise ImportError("No module named 'wandb'")

    monkeypatch.setattr(nas.compare, "log_to_wandb", missing_wandb)
    out = tmp_path / "out"
    assert run_compare(storage, out, "plain", "--wandb") == 1
    assert "--wandb requires the wandb package" in capsys.readouterr().err
    assert (out / "compare.csv").is_file()  # the files written before the W&B step stay


def test_hydra_override_as_study_name_gets_hint(storage, tmp_path, capsys):
    assert run_compare(storage, tmp_path / "out", "plain", "logger=wandb") == 1
    assert "not Hydra overrides like search.py's" in capsys.readouterr().err


def test_reference_left_of_fronts_warned(storage, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tailnas.compare"):
        assert run_compare(storage, tmp_path / "out", "plain", "tail", "--reference-ms", "0.001") == 0
    assert "lies left of every front" in caplog.text


def test_tail_aware_study_same_space(storage, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tailnas.compare"):
        assert run_compare(storage, tmp_path / "out", "plain", "tail") == 0
    assert "different spaces" not in caplog.text


def test_other_spaces_warned(storage, tmp_path, caplog):
    study = optuna.load_study(study_name="tail", storage=storage)
    study.set_user_attr("space_name", "mobilenet")
    with caplog.at_level(logging.WARNING, logger="tailnas.compare"):
        assert run_compare(storage, tmp_path / "out", "plain", "tail") == 0
    assert "searched different spaces (plain: resnet, tail: mobilenet)" in caplog.text


def test_other_timing_settings_warned(storage, tmp_path, caplog):
    hardware = {"device": "cpu", "runtime": "eager", "batch_size": 1, "threads": 1, "dtype": "float32", "warmup": 10}
    optuna.load_study(study_name="plain", storage=storage).set_user_attr("hardware", hardware)
    tail = optuna.load_study(study_name="tail", storage=storage)
    tail.set_user_attr("hardware", {**hardware, "warmup": 3})  # noise only: no warning
    with caplog.at_level(logging.WARNING, logger="tailnas.compare"):
        assert run_compare(storage, tmp_path / "out", "plain", "tail") == 0
    assert "different hardware settings" not in caplog.text
    tail.set_user_attr("hardware", {**hardware, "runtime": "onnxruntime"})
    with caplog.at_level(logging.WARNING, logger="tailnas.compare"):
        assert run_compare(storage, tmp_path / "out2", "plain", "tail") == 0
    assert "timed latency with different hardware settings (plain: device=cpu, runtime=eager" in caplog.text
    assert "tail: device=cpu, runtime=onnxruntime" in caplog.text


def test_other_data_warned(storage, tmp_path, caplog):
    optuna.load_study(study_name="plain", storage=storage).set_user_attr("data", {"name": "mnist", "root": None})
    optuna.load_study(study_name="tail", storage=storage).set_user_attr("data", {"name": "synthetic"})
    with caplog.at_level(logging.WARNING, logger="tailnas.compare"):
        assert run_compare(storage, tmp_path / "out", "plain", "tail") == 0
    assert "searched on different data (plain: mnist; tail: synthetic)" in caplog.text


def test_other_space_settings_warned(storage, tmp_path, caplog):
    study = optuna.load_study(study_name="tail", storage=storage)
    study.set_user_attr("space", {"name": "resnet", "family": "resnet", "resolutions": [32]})
    with caplog.at_level(logging.WARNING, logger="tailnas.compare"):
        assert run_compare(storage, tmp_path / "out", "plain", "tail") == 0
    assert "searched the resnet space with different settings" in caplog.text


def test_finetune_metric_prefixes(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed")
    from nas.tracking import create_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = create_tracker({"name": "wandb", "mode": "offline"}, {}, "train", str(tmp_path))
    try:
        for tag, accuracy in (("inherited", 0.9), ("scratch", 0.5)):
            tracker.lightning_logger(tag).log_metrics({"test/accuracy": accuracy}, step=0)
        assert tracker.run.summary["inherited-test/accuracy"] == 0.9
        assert tracker.run.summary["scratch-test/accuracy"] == 0.5
    finally:
        tracker.finish()


def test_wandb_online_only_with_its_credentials(tmp_path, monkeypatch):
    from nas.tracking import wandb_mode

    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert wandb_mode(None) == "offline"
    # Credentials for another host only, as git over HTTPS writes them.
    netrc_file.write_text("machine github.com login me password token\n")
    netrc_file.chmod(0o600)
    assert wandb_mode(None) == "offline"
    netrc_file.write_text("machine github.com login me password token\nmachine api.wandb.ai login user password key\n")
    assert wandb_mode(None) == "online"
    # A self-hosted server named by WANDB_BASE_URL.
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode(None) == "offline"
    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.example.org:8080")
    netrc_file.write_text("machine wandb.example.org:8080 login user password key\n")
    assert wandb_mode(None) == "online"
    assert wandb_mode("disabled") == "disabled"
