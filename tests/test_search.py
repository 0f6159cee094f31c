import json
from pathlib import Path

import optuna
import pytest

from nas.search import (
    LatencyEstimate,
    SearchError,
    SearchObjective,
    check_budget,
    check_resume,
    check_run_length,
    create_or_load_study,
    create_sampler,
    knee_index,
    sampler_seed,
    latest_study_name,
    pareto_trials,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def fake_latency(space):
    def latency(arch):
        ms = space.macs(arch) / 1e7
        return LatencyEstimate(ms, 0.9 * ms, 1.1 * ms)

    return latency


def fake_accuracy(space):
    largest = space.macs(space.largest())
    return lambda arch: 0.5 + 0.4 * space.macs(arch) / largest


def run_study(space, sampler_name, tmp_path, budget=None, n_trials=24, name="s", seed=0):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    sampler = create_sampler(sampler_name, seed=seed, population_size=8)
    study, _ = create_or_load_study(storage, name, sampler, {"space": space.raw_config})
    objective = SearchObjective(space, fake_accuracy(space), fake_latency(space), latency_budget_ms=budget)
    study.optimize(objective, n_trials=n_trials)
    return study, storage


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "random"])
def test_budget_holds_for_every_sampler(resnet_space, tmp_path, sampler):
    budget = fake_latency(resnet_space)(resnet_space.largest()).latency_ms / 3
    study, _ = run_study(resnet_space, sampler, tmp_path, budget=budget)
    front = pareto_trials(study)
    assert front
    assert all(t.user_attrs["predicted_latency_ms"] <= budget for t in front)
    over = [t for t in study.trials if t.user_attrs["predicted_latency_ms"] > budget]
    assert all(t.user_attrs.get("accuracy_skipped") for t in over)


def test_pareto_front_is_non_dominated(resnet_space, tmp_path):
    study, _ = run_study(resnet_space, "random", tmp_path)
    front = pareto_trials(study)
    for t in front:
        for other in study.trials:
            strictly_better = other.values[0] > t.values[0] and other.values[1] < t.values[1]
            assert not strictly_better
    latencies = [t.values[1] for t in front]
    assert latencies == sorted(latencies)


def test_unknown_sampler_lists_choices():
    with pytest.raises(SearchError, match="Unknown search.sampler='cma'; available samplers are \\['nsga2', 'tpe', 'random'\\]"):
        create_sampler("cma", seed=0)


@pytest.mark.parametrize("budget", [-1, 0, "abc", True, float("nan")])
def test_invalid_budget_rejected(resnet_space, budget):
    with pytest.raises(SearchError, match=f"must be a positive number of milliseconds or null, but got {budget!r}"):
        SearchObjective(resnet_space, fake_accuracy(resnet_space), fake_latency(resnet_space), latency_budget_ms=budget)


def test_budget_accepts_numbers_and_null():
    assert check_budget(None) is None
    assert check_budget(2) == 2.0


def test_study_maximises_accuracy_and_minimises_latency(tmp_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    study, resumed = create_or_load_study(storage, "directions", create_sampler("nsga2", 0), {})
    assert not resumed
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]


def test_study_resumes_by_name(resnet_space, tmp_path):
    study, storage = run_study(resnet_space, "nsga2", tmp_path, n_trials=5, name="resume-me")
    again, resumed = create_or_load_study(storage, "resume-me", create_sampler("nsga2", 0), {"space": resnet_space.raw_config})
    assert resumed
    assert len(again.trials) == 5
    assert latest_study_name(storage) == "resume-me"


def test_resume_with_other_space_rejected(resnet_space, tmp_path):
    _, storage = run_study(resnet_space, "random", tmp_path, n_trials=2, name="x")
    with pytest.raises(SearchError, match="exists in .* and was searched with other settings: space"):
        create_or_load_study(storage, "x", create_sampler("random", 0), {"space": {"family": "other"}})


SCORING = {"space_config": {"family": "resnet"}, "supernet_key": "resnet-aaa", "device_fingerprint_id": "cpu1",
           "hardware": {"device": "cpu", "batch_size": 1, "threads": 1}, "latency_budget_ms": None,
           "threads_used": 2, "run_dir": "outputs/first"}


@pytest.mark.parametrize(("change", "message"), [
    ({"supernet_key": "resnet-bbb"}, r"the supernet: data\.\*, supernet\.\* and seed\. Its trials"),
    ({"hardware": {"device": "cpu", "batch_size": 8, "threads": 1}}, r"hardware\.\* \(differs in batch_size\)"),
    ({"latency_budget_ms": 0.5}, r"search\.latency_budget_ms \(null before, 0\.5 now\)"),
    ({"device_fingerprint_id": "gpu7"}, r"the device\. "),
    ({"threads_used": 1}, r"torch's CPU thread count with hardware\.threads null .* \(2 before, 1 now\)"),
])
def test_resume_with_other_scoring_rejected(change, message):
    with pytest.raises(SearchError, match=message):
        check_resume(SCORING, {**SCORING, **change}, "s", "sqlite:///x.db")


def test_resume_names_supernet_settings():
    settings = {"data": {"name": "mnist", "num_workers": 0}, "supernet": {"epochs": 5, "trainer": {}}, "seed": 0}
    stored = {**SCORING, **settings}
    changed = {**SCORING, "supernet_key": "resnet-bbb", "data": {"name": "mnist", "num_workers": 4},
               "supernet": {"epochs": 2, "trainer": {"devices": 2}}, "seed": 1}
    with pytest.raises(SearchError, match=r"and seed \(supernet.epochs \(5 before, 2 now\), seed \(0 before, 1 now\)\)\. Its"):
        check_resume(stored, changed, "s", "sqlite:///x.db")


def test_resume_space_change_named_once():
    changed = {**SCORING, "space_config": {"family": "resnet", "tail_aware": True}, "supernet_key": "resnet-bbb"}
    with pytest.raises(SearchError, match=r"other settings: space\.\* \(differs in tail_aware\)\. Its") as raised:
        check_resume(SCORING, changed, "s", "sqlite:///x.db")
    assert "the supernet" not in str(raised.value)


@pytest.mark.parametrize(("change", "message"), [
    ({"predictor": {"n_subnets": 20, "passes": 2}}, r"the latency predictor: predictor\.\* or predictor\.path "
                                                    r"\(differs in n_subnets\)"),
    ({"calibration_images": 16}, r"search\.calibration_images \(64 before, 16 now\)"),
])
def test_resume_with_other_predictor_rejected(change, message):
    stored = {**SCORING, "predictor": {"n_subnets": 16, "passes": 2}, "calibration_images": 64}
    with pytest.raises(SearchError, match=message):
        check_resume(stored, {**stored, **change}, "s", "sqlite:///x.db")


def test_stored_measurements_of_front_trials():
    from nas.search import stored_measurements

    study = optuna.create_study(directions=["maximize", "minimize"])
    for accuracy in (0.5, 0.6, 0.7):
        study.add_trial(optuna.trial.create_trial(values=[accuracy, accuracy]))
    study.set_user_attr("measured_latency_ms", {"0": 0.55, "2": 0.75, "9": 1.0})
    trials = study.get_trials()
    # Trial 1 was never measured, and trial 9 is not among the trials asked for.
    assert stored_measurements(study, trials) == {0: 0.55, 2: 0.75}
    assert stored_measurements(study, trials[1:2]) == {}


def test_resume_tail_aware_old_key():
    stored = {**SCORING, "supernet_key": "resnet-old"}
    check_resume(stored, {**SCORING, "supernet_key": "resnet-new", "supernet_key_before_sharing": "resnet-old"},
                 "s", "sqlite:///x.db")
    with pytest.raises(SearchError, match="the supernet"):
        check_resume(stored, {**SCORING, "supernet_key": "resnet-new", "supernet_key_before_sharing": "resnet-other"},
                     "s", "sqlite:///x.db")


def test_resume_with_study_predictor_file_allowed(tmp_path):
    built = tmp_path / "predictors" / "p.json"
    stored = {**SCORING, "predictor": {"n_subnets": 16}, "predictor_path": str(built)}
    check_resume(stored, {**SCORING, "predictor": {"path": str(built)}}, "s", "sqlite:///x.db")
    with pytest.raises(SearchError, match="the latency predictor"):
        check_resume(stored, {**SCORING, "predictor": {"path": str(tmp_path / "other.json")}}, "s", "sqlite:///x.db")


def test_predictor_record_ignores_rebuild(tmp_path):
    from nas.search import predictor_record

    settings = {"n_subnets": 16, "rebuild": False, "path": None, "allow_fingerprint_mismatch": False}
    assert predictor_record(settings) == predictor_record({**settings, "rebuild": True}) == {"n_subnets": 16}
    threads = {**settings, "layer_model": {"max_depth": 6, "nthread": 1}}
    assert predictor_record(threads) == predictor_record({**threads, "layer_model": {"max_depth": 6, "nthread": 2}})
    assert predictor_record(threads)["layer_model"] == {"max_depth": 6}
    from_file = predictor_record({**settings, "path": str(tmp_path / "sub" / ".." / "p.json")})
    assert from_file == {"path": str(tmp_path / "p.json")}


def test_resumed_study_records_every_sampler(resnet_space, tmp_path, caplog):
    _, storage = run_study(resnet_space, "nsga2", tmp_path, n_trials=2, name="mixed")
    record = {"space": resnet_space.raw_config}
    study, _ = create_or_load_study(storage, "mixed", create_sampler("nsga2", 0), {**record, "sampler": "nsga2"})
    assert study.user_attrs["sampler"] == "nsga2"
    with caplog.at_level("WARNING", logger="nas.search"):
        study, _ = create_or_load_study(storage, "mixed", create_sampler("tpe", 0), {**record, "sampler": "tpe"})
    assert study.user_attrs["sampler"] == "nsga2+tpe"
    assert "this run adds trials drawn by tpe" in caplog.text
    study, _ = create_or_load_study(storage, "mixed", create_sampler("nsga2", 0), {**record, "sampler": "nsga2"})
    assert study.user_attrs["sampler"] == "nsga2+tpe"


def test_resume_with_same_scoring_allowed():
    # The sampler, the run folder and the worker count may change between runs of one study.
    check_resume(SCORING, {**SCORING, "run_dir": "outputs/second", "sampler": "tpe"}, "s", "sqlite:///x.db")


def test_resume_of_tail_aware_study():
    # The study records the configured space and the searched one, whose widths the tail-aware step moved.
    stored = {**SCORING, "space": {"family": "resnet", "widths": [12]}}
    check_resume(stored, SCORING, "s", "sqlite:///x.db")  # before the search: only the configured space is known
    check_resume(stored, {**SCORING, "space": {"family": "resnet", "widths": [12]}}, "s", "sqlite:///x.db")
    with pytest.raises(SearchError, match=r"other settings: space\.\* \(differs in widths\)"):
        check_resume(stored, {**SCORING, "space_config": {"family": "resnet", "widths": [8]}}, "s", "sqlite:///x.db")


def test_resume_of_old_study_compares_checkpoint_folder():
    old = {key: value for key, value in SCORING.items() if key != "supernet_key"}
    old["supernet_checkpoint"] = "/work/supernets/resnet-aaa/supernet.pt"
    check_resume(old, SCORING, "s", "sqlite:///x.db")
    with pytest.raises(SearchError, match="the supernet"):
        check_resume(old, {**SCORING, "supernet_key": "resnet-bbb"}, "s", "sqlite:///x.db")


def test_uncertain_candidates_are_measured(resnet_space, tmp_path):
    measured = []

    def wide(arch):
        return LatencyEstimate(1.0, 0.2, 2.0)

    def measure(arch):
        measured.append(arch)
        return 0.75

    objective = SearchObjective(resnet_space, fake_accuracy(resnet_space), wide, measure_fn=measure, uncertainty_threshold=0.5)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.optimize(objective, n_trials=3)
    assert len(measured) == 3
    assert all(t.user_attrs["latency_source"] == "measured" for t in study.trials)
    assert all(t.values[1] == 0.75 for t in study.trials)


def test_knee_of_convex_front():
    accuracy = [0.80, 0.95, 0.97, 0.975]
    latency = [1.0, 1.5, 3.0, 6.0]
    assert knee_index(accuracy, latency) == 1


def test_knee_of_short_front_is_most_accurate():
    assert knee_index([0.9, 0.95], [1.0, 2.0]) == 1
    with pytest.raises(SearchError, match="empty"):
        knee_index([], [])


@pytest.mark.parametrize(("accuracy", "latency", "knee"), [
    # Three points at one latency: the most accurate, as with two.
    ([0.80, 0.90, 0.95], [1.0, 1.0, 1.0], 2),
    # Three points of one accuracy: the fastest.
    ([0.90, 0.90, 0.90], [3.0, 1.0, 2.0], 1),
    # A dominated point at the fastest latency does not start the chord.
    ([0.70, 0.80, 0.95, 0.96], [1.0, 1.0, 1.5, 4.0], 2),
    # No point above the chord: the fastest end.
    ([0.80, 0.81, 0.83, 0.90], [0.3, 0.5, 0.7, 0.9], 0),
    # A straight front whose middle points lie 1e-17 above the chord by float rounding: the fastest end.
    ([0.5847076843044646, 0.9821237420342983, 2.3076114128675775, 2.8394593132081747, 2.8419740329518706,
      3.387606252979221],
     [3.09586961914913, 3.569745212561251, 5.150245658780181, 5.78441666037122, 5.787415191224795,
      6.438022500670771], 0),
])
def test_knee_ties_pick_dominating_point(accuracy, latency, knee):
    assert knee_index(accuracy, latency) == knee


def _study_with_front():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for number, (accuracy, latency) in enumerate([(0.9, 1.0), (0.8, 0.5), (0.7, 0.9)]):
        trial = optuna.trial.create_trial(values=[accuracy, latency],
                                          user_attrs={"arch": {"n": number}, "predicted_latency_ms": latency},
                                          system_attrs={"constraints": [0.0]})
        study.add_trial(trial)
    return study


@pytest.mark.parametrize(("trial", "message"), [
    ("abc", r"trial must be a trial number of study .*, but got 'abc'; its Pareto trials are \[1, 0\]"),
    (99, r"trial=99 is not a finished trial of study .*; its Pareto trials are \[1, 0\]"),
])
def test_train_pick_names_pareto_trials(trial, message):
    from omegaconf import OmegaConf

    import train
    from nas.cli import UsageError

    cfg = OmegaConf.create({"trial": trial, "pick": "knee", "budget_ms": None})
    with pytest.raises(UsageError, match=message):
        train.pick_trial(_study_with_front(), cfg)
    assert train.pick_trial(_study_with_front(), OmegaConf.create({**cfg, "trial": 2})).number == 2


@pytest.mark.parametrize("worker", [0, 1])
def test_resumed_or_second_worker_draws_new_architectures(resnet_space, tmp_path, worker):
    first, _ = run_study(resnet_space, "random", tmp_path, n_trials=4, name="shared")
    before = len(first.trials) if worker == 0 else 0  # worker 1 starts at the same time as worker 0
    again, _ = run_study(resnet_space, "random", tmp_path, n_trials=4, name="shared", seed=sampler_seed(0, worker, before))
    archs = [json.dumps(t.user_attrs["arch"], sort_keys=True) for t in again.trials]
    assert not set(archs[4:]) & set(archs[:4])


def test_sampler_seed():
    assert sampler_seed(7) == 7  # a new study's first worker keeps the seed, as before workers counted
    assert len({sampler_seed(7, 0, 4), sampler_seed(7, 1, 0), sampler_seed(7, 1, 4)}) == 3
    with pytest.raises(SearchError, match="search.worker must be a whole number >= 0, .* but got -1"):
        sampler_seed(7, -1)


@pytest.mark.parametrize(("n_trials", "timeout_s", "message"), [
    (0, 120, r"search.n_trials must be a whole number >= 1 or null \(no limit\), but got 0"),
    ("abc", 120, r"search.n_trials must be .* but got 'abc'"),
    (10, 0, r"search.timeout_s must be a positive number of seconds or null \(no limit\), but got 0"),
    (None, None, "both null, so the search would never end"),
])
def test_run_length_checked(n_trials, timeout_s, message):
    with pytest.raises(SearchError, match=message):
        check_run_length(n_trials, timeout_s)
    check_run_length(10, None)


def test_population_size_checked():
    with pytest.raises(SearchError, match="search.population_size must be a whole number >= 2, but got 1"):
        create_sampler("nsga2", seed=0, population_size=1)


def test_train_budget_checked():
    from omegaconf import OmegaConf

    import train

    cfg = OmegaConf.create({"trial": None, "pick": "fastest_under_budget", "budget_ms": "abc"})
    with pytest.raises(SearchError, match="budget_ms must be a positive number of milliseconds or null, but got 'abc'"):
        train.pick_trial(_study_with_front(), cfg)


def test_pick_message_names_measured_latency():
    from omegaconf import OmegaConf

    import train

    study = _study_with_front()
    study.set_user_attr("measured_latency_ms", {"0": 0.8})
    cfg = OmegaConf.create({"trial": None, "pick": "most_accurate_under_budget", "budget_ms": 0.85})
    picked = train.pick_trial(study, cfg)
    assert picked.number == 0  # predicted 1.0 ms, but measured 0.8 ms fits the budget
    assert train.describe_pick(study, picked) == "trial 0: accuracy 90.00%, measured 0.800 ms (predicted 1.000 ms)"
    assert train.describe_pick(study, study.trials[1]) == "trial 1: accuracy 80.00%, predicted 0.500 ms"


def test_ctrl_c_stops_study_after_running_trial():
    import os
    import signal

    import search

    study = optuna.create_study(directions=["maximize", "minimize"])

    def objective(trial):
        if trial.number == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while this trial runs
        return 0.5, 1.0

    handler = signal.getsignal(signal.SIGINT)
    with search.StopOnInterrupt(study) as stopper:
        study.optimize(objective, n_trials=10)
    assert stopper.stopped
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.parametrize(("url", "message"), [
    ("sqlite://", "is an in-memory database, which keeps no study"),
    ("postgresql+psycopg2://user:secret@127.0.0.1:1/db", r"cannot be opened \(OperationalError"),
])
def test_storage_must_open(url, message):
    from nas.search import check_storage_opens

    with pytest.raises(SearchError, match=message):
        check_storage_opens(url)


def test_new_sqlite_storage_follows_umask(tmp_path):
    import os
    import stat

    from nas.search import check_storage_opens

    previous = os.umask(0o002)
    try:
        check_storage_opens(f"sqlite:///{tmp_path / 'studies.db'}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "studies.db").stat().st_mode) == 0o664


def test_budget_pick_takes_most_accurate():
    from omegaconf import OmegaConf

    import train

    # The front is on predicted latency: 0.8 at 0.5 ms and 0.9 at 1.0 ms. The measurements reorder it,
    # because trial 0, the more accurate, runs in 0.70 ms and trial 1 in 0.80 ms, both within 0.85 ms.
    study = _study_with_front()
    study.set_user_attr("measured_latency_ms", {"0": 0.70, "1": 0.80})
    cfg = OmegaConf.create({"trial": None, "pick": "most_accurate_under_budget", "budget_ms": 0.85})
    assert train.pick_trial(study, cfg).number == 0
    # The earlier name picks the same subnet.
    assert train.pick_trial(study, OmegaConf.create({**cfg, "pick": "fastest_under_budget"})).number == 0
    cfg = OmegaConf.create({**cfg, "budget_ms": 0.75})
    assert train.pick_trial(study, cfg).number == 0
    cfg = OmegaConf.create({**cfg, "budget_ms": 0.6})
    with pytest.raises(Exception, match="No Pareto subnet runs within budget_ms=0.6; the fastest takes 0.700 ms"):
        train.pick_trial(study, cfg)


def test_train_budget_without_its_pick_warned(caplog):
    import logging

    from omegaconf import OmegaConf

    import train

    cfg = OmegaConf.create({"trial": None, "pick": "knee", "budget_ms": 0.1})
    with caplog.at_level(logging.WARNING, logger="tailnas.train"):
        train.pick_trial(_study_with_front(), cfg)
    assert "budget_ms=0.1 applies only to pick=most_accurate_under_budget" in caplog.text


def test_repeated_architecture_reuses_scores(tmp_path):
    from nas.spaces import create_space
    from tests.conftest import load_space_config

    # Two stages of one block with two widths: four architectures, so 12 trials repeat some.
    config = {**load_space_config("resnet"), "in_channels": 1, "num_classes": 10,
              "stages": [{"depths": [1], "widths": [8, 16], "stride": 1}, {"depths": [1], "widths": [16, 24], "stride": 2}]}
    space = create_space(config)
    scored = []
    accuracy = fake_accuracy(space)

    def counted(arch):
        scored.append(arch.to_json())
        return accuracy(arch)

    objective = SearchObjective(space, counted, fake_latency(space), latency_budget_ms=1e6, worker=1)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=create_sampler("random", seed=0))
    study.optimize(objective, n_trials=12)
    assert len(scored) == len(set(scored)) <= 4
    repeats = [t for t in study.trials if "repeat_of" in t.user_attrs]
    assert len(repeats) == 12 - len(scored)
    for trial in repeats:
        earlier = study.trials[trial.user_attrs["repeat_of"]]
        assert trial.user_attrs["arch"] == earlier.user_attrs["arch"]
        assert trial.values == earlier.values
        assert trial.user_attrs["worker"] == 1
        assert trial.constraints == earlier.constraints
    assert len(pareto_trials(study)) <= len(scored)


def test_ignored_slots_scored_once():
    import yaml

    from nas.spaces import create_space

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "space" / "mobilenet.yaml").read_text())
    config.update(in_channels=1, num_classes=4, resolutions=[16], depths=[1, 2], kernel_sizes=[3, 5], expand_ratios=[3],
                  base_widths=[8, 8, 8, 8, 16, 16, 16, 32, 32])
    space = create_space(config)
    scored = []
    accuracy = fake_accuracy(space)

    def counted(arch):
        scored.append(arch)
        return accuracy(arch)

    # Stage 0 has depth 1, so its second slot (ks_1) is ignored: both draws build one network.
    params = {key: options[0] for key, options in space.choices().items()}
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.enqueue_trial({**params, "ks_1": 5})
    study.enqueue_trial({**params, "ks_1": 3})
    study.optimize(SearchObjective(space, counted, fake_latency(space)), n_trials=2)
    assert scored == [space.canonical(space.arch_from_choices(params))]
    assert study.trials[1].user_attrs["repeat_of"] == 0
    assert study.trials[0].user_attrs["arch"]["ks"][1] == 3
    assert [t.number for t in pareto_trials(study)] == [0]


def test_storage_open_retries_table_race(tmp_path, monkeypatch):
    import sqlalchemy

    from nas import search

    calls = []

    def racing(storage):
        calls.append(storage)
        if len(calls) == 1:
            raise sqlalchemy.exc.OperationalError("CREATE TABLE", {}, Exception("table study_directions already exists"))
        return []

    monkeypatch.setattr(search.optuna, "get_all_study_names", racing)
    monkeypatch.setattr(search.time, "sleep", lambda seconds: None)
    search.check_storage_opens(f"sqlite:///{tmp_path / 'new.db'}")
    assert len(calls) == 2

    def locked(storage):
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("database is locked"))

    monkeypatch.setattr(search.optuna, "get_all_study_names", locked)
    with pytest.raises(SearchError, match="cannot be opened .*database is locked"):
        search.check_storage_opens(f"sqlite:///{tmp_path / 'new.db'}")


def test_relative_recorded_root_stops_resume(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    import search

    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({"data": {"name": "imagefolder", "root": str(tmp_path / "images")}})
    with pytest.raises(SearchError, match="recorded the relative data.root='images'"):
        search._check_recorded_root({"data": {"name": "imagefolder", "root": "images"}}, cfg, "old")
    # Absolute records, other roots and data without a root pass on to check_resume.
    search._check_recorded_root({"data": {"name": "imagefolder", "root": str(tmp_path / "images")}}, cfg, "new")
    search._check_recorded_root({"data": {"name": "imagefolder", "root": "elsewhere"}}, cfg, "other")
    search._check_recorded_root({"data": {"name": "mnist"}}, cfg, "mnist")


def test_refused_store_write_warns_once(resnet_space, caplog):
    import errno
    from types import SimpleNamespace

    import search

    class ReadOnlyStore:
        directory = "/shared/work/profiles/abc"

        def add_subnet(self, *args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

    failures = []
    measurement = SimpleNamespace(median_ms=1.0)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            search.record_measurement(ReadOnlyStore(), resnet_space, resnet_space.smallest(), measurement, failures)
    assert len(failures) == 3
    assert caplog.text.count("Cannot add measurements to the profile store /shared/work/profiles/abc") == 1


def test_repeats_logged_with_hint(caplog):
    from types import SimpleNamespace

    import search

    trials = [SimpleNamespace(user_attrs={"repeat_of": 0} if i % 3 else {}) for i in range(6)]
    with caplog.at_level("INFO"):
        search._log_trial_counts(trials)
    assert "4 of the study's 6 finished trials redrew a scored architecture" in caplog.text
    assert "the space may be too small" in caplog.text


def test_study_created_meanwhile_is_checked(resnet_space, tmp_path, monkeypatch):
    from nas import search

    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    record = {**SCORING, "space": resnet_space.raw_config}
    create_or_load_study(storage, "race", create_sampler("random", 0), record)
    # The second worker read the study names before the first created it.
    monkeypatch.setattr(search.optuna, "get_all_study_names", lambda storage: [])
    with pytest.raises(SearchError, match=r"search\.latency_budget_ms \(null before, 0\.5 now\)"):
        create_or_load_study(storage, "race", create_sampler("random", 0), {**record, "latency_budget_ms": 0.5})


def _hardware_cfg(**overrides):
    import yaml
    from omegaconf import OmegaConf

    hardware = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "hardware" / "cpu.yaml").read_text())
    return OmegaConf.create({"hardware": {**hardware, **overrides}})


def test_train_uses_study_hardware(caplog):
    import logging

    import train

    recorded = {**_hardware_cfg().hardware, "runtime": "onnxruntime", "threads": 2}
    # Nothing on the command line: the study's settings.
    assert train.measurement_hardware(_hardware_cfg(), recorded, ["trial=3"]) == recorded
    # A hardware.* key on the command line replaces the study's value of that key only.
    assert train.measurement_hardware(_hardware_cfg(repeats=50), recorded, ["hardware.repeats=50"]) == {
        **recorded, "repeats": 50}
    assert "in the study" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="tailnas.train"):
        chosen = train.measurement_hardware(_hardware_cfg(threads=1), recorded, ["hardware.threads=1"])
    assert chosen == {**recorded, "threads": 1}
    assert "(threads: 2 in the study, 1 now)" in caplog.text
    # hardware=NAME replaces them all, with a warning naming what differs.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tailnas.train"):
        chosen = train.measurement_hardware(_hardware_cfg(threads=1), recorded, ["hardware=cpu"])
    assert chosen["runtime"] == "eager"
    assert "runtime: 'onnxruntime' in the study, 'eager' now" in caplog.text
    assert "threads: 2 in the study, 1 now" in caplog.text
    # A study from before the record: the command line's settings, without a warning.
    assert train.measurement_hardware(_hardware_cfg(), None, [])["runtime"] == "eager"


def test_train_rejects_deleted_hardware_keys():
    import train
    from nas.cli import UsageError

    with pytest.raises(UsageError, match=r"~hardware.threads is not supported"):
        train.measurement_hardware(_hardware_cfg(), dict(_hardware_cfg().hardware), ["~hardware.threads"])


def test_train_study_gpu_missing_here():
    import torch

    import train
    from nas.cli import UsageError

    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so the study's cuda settings are valid here")
    recorded = {**_hardware_cfg().hardware, "device": "cuda"}
    with pytest.raises(UsageError, match="The study timed latency on device 'cuda'.*Pass hardware=cpu"):
        train.measurement_hardware(_hardware_cfg(), recorded, [])


def test_plot_measured_front(tmp_path):
    from nas.report import nondominated, plot_pareto

    # Measured in predicted order: 0.87, 1.24, 1.16, 1.13 ms; the 1.24 ms subnet is beaten once measured.
    measured = [(0.873, 10.0), (1.241, 12.5), (1.164, 16.7), (1.126, 16.7)]
    assert nondominated(measured) == [(0.873, 10.0), (1.126, 16.7)]
    assert nondominated([]) == []
    rows = [{"predicted_latency_ms": p, "measured_latency_ms": m, "accuracy": a / 100}
            for p, (m, a) in zip([0.8, 1.0, 1.1, 1.2], measured)]
    plot_pareto(tmp_path / "pareto.png", [(0.05, 0.9)], rows, knee=3, title="t")
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_plot_draws_budget(tmp_path, monkeypatch):
    import nas.report as report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig))
    rows = [{"predicted_latency_ms": 1.0, "measured_latency_ms": None, "accuracy": 0.9}]
    report.plot_pareto(tmp_path / "pareto.png", [(0.9, 1.0)], rows, knee=0, title="t", budget_ms=1.5, over_budget=7)
    labels = [text.get_text() for text in figures[0].axes[0].get_legend().get_texts()]
    assert "latency budget 1.5 ms, 7 trials beyond it not plotted" in labels
    # A budget far right of every point is named, not drawn, so the points keep the plot's width.
    report.plot_pareto(tmp_path / "pareto.png", [(0.9, 1.0)], rows, knee=0, title="t", budget_ms=50.0)
    axes = figures[1].axes[0]
    assert "latency budget 50 ms (right of the plot)" in [text.get_text() for text in axes.get_legend().get_texts()]
    assert axes.get_xlim()[1] < 5


def test_pareto_csv_latency_source(tmp_path):
    from nas.report import read_pareto_csv, write_pareto_csv

    common = {"arch": {"n": 1}, "accuracy": 0.9, "measured_latency_ms": None, "macs": 10, "params": 5}
    write_pareto_csv(tmp_path / "pareto.csv", [{**common, "trial": 0, "predicted_latency_ms": 1.0},
                                               {**common, "trial": 1, "predicted_latency_ms": 0.7,
                                                "latency_source": "measured"}])
    rows = read_pareto_csv(tmp_path / "pareto.csv")
    assert [r["latency_source"] for r in rows] == ["predicted", "measured"]


def test_train_interrupt_message(tmp_path):
    import train

    assert "holds no network; run the command again" in train.interrupted_message(tmp_path)
    (tmp_path / "subnet.pt").write_bytes(b"")
    assert f"The fine-tuned network is in {tmp_path / 'subnet.pt'}" in train.interrupted_message(tmp_path)


def test_resize_of_data_logged(resnet_space, caplog):
    import search
    from nas.spaces import create_space

    def logged(space, data_resolution):
        caplog.clear()
        with caplog.at_level("INFO", logger="tailnas.search"):
            search.log_input_resize(space, data_resolution)
        return [(record.levelname, record.getMessage()) for record in caplog.records]

    # resnet_space runs at 28 pixels.
    assert logged(resnet_space, 28) == []
    [(level, message)] = logged(resnet_space, 32)
    assert level == "INFO"
    assert "Subnets run at 28 pixels and the data at 32" in message
    [(level, _)] = logged(resnet_space, 224)
    assert level == "WARNING"
    # Data at the smallest of several resolutions: the larger subnets get enlarged batches.
    multi = create_space({**resnet_space.raw_config, "resolutions": [24, 28]})
    assert logged(multi, 28) == []
    [(_, message)] = logged(multi, 24)
    assert "Subnets run at 24/28 pixels and the data at 24" in message

