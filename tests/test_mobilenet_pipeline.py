"""The MobileNetV3 space through the whole main job: search.py with progressive shrinking, then train.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nas.export import load_program
from nas.report import read_pareto_csv
from nas.spaces import MobileNetV3Arch, create_space
from tests.conftest import FAST_SEARCH, load_space_config

ROOT = Path(__file__).resolve().parent.parent

# OFA's block structure with narrow layers, so profiling and training take seconds.
TINY = [
    "+space=mobilenet",
    "space.base_widths=[8,8,8,16,16,24,32,64,64]",
    "data=synthetic",
    "data.num_samples=96",
    "supernet=progressive",
    "supernet.phases.full=1",
    "supernet.phases.kernel=1",
    "supernet.phases.depth=1",
    "supernet.phases.width=1",
    *FAST_SEARCH,
]


def run(script: str, args: list[str]) -> subprocess.CompletedProcess:
    # One intra-op thread: on a machine shared with other work, torch's spinning worker threads can
    # make these small models ten times slower.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Run search.py once and train.py on its knee subnet; return the folder and both processes."""
    tmp = tmp_path_factory.mktemp("mobilenet-pipeline")
    work = f"paths.work_dir={tmp / 'work'}"
    search = run("search.py", [*TINY, "search.study_name=mb", work, f"hydra.run.dir={tmp / 'search-run'}"])
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
    train = run("train.py", ["search.study_name=mb", "finetune.epochs=1", "compare_scratch=false", work,
                             f"hydra.run.dir={tmp / 'train-run'}"])
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    return tmp, search, train


def test_pareto_rows_use_ofa_encoding(pipeline):
    tmp, _, _ = pipeline
    rows = read_pareto_csv(tmp / "search-run" / "pareto.csv")
    assert rows
    config = load_space_config("mobilenet")
    config["base_widths"] = [8, 8, 8, 16, 16, 24, 32, 64, 64]
    space = create_space(config)
    for row in rows:
        assert set(row["arch"]) == {"ks", "e", "d", "r"}
        arch = space.arch_from_dict(row["arch"])
        assert isinstance(arch, MobileNetV3Arch)
        assert row["macs"] == space.macs(arch)
        assert row["params"] == space.params(arch)
        assert row["measured_latency_ms"] > 0


def test_search_ran_every_progressive_phase(pipeline):
    _, search, _ = pipeline
    log = search.stdout + search.stderr
    for phase in ("full", "kernel", "depth", "width"):
        assert f"Progressive shrinking: {phase} phase" in log
    assert "Knee subnet:" in search.stdout


def test_manifest_records_schedule(pipeline):
    tmp, _, _ = pipeline
    manifest = json.loads((tmp / "search-run" / "manifest.json").read_text())
    assert manifest["config"]["supernet"]["schedule"] == "progressive"
    assert manifest["config"]["space"]["name"] == "mobilenet"
    checkpoints = list((tmp / "work" / "supernets").glob("mobilenet-*/supernet.pt"))
    assert len(checkpoints) == 1


def test_train_writes_loadable_subnet(pipeline):
    tmp, _, train = pipeline
    run_dir = tmp / "train-run"
    report = json.loads((run_dir / "finetune.json").read_text())
    assert report["study"] == "mb"
    assert set(report["arch"]) == {"ks", "e", "d", "r"}
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert report["measured_latency_ms"] > 0

    program = load_program(run_dir / "subnet.pt2")
    output = program.module()(torch.randn(2, 1, 28, 28))
    assert output.shape == (2, 10)


def test_schedule_change_trains_new_supernet(pipeline):
    tmp, _, _ = pipeline
    args = [*TINY, "search.study_name=mb-sandwich", "supernet=sandwich", "supernet.epochs=1",
            f"paths.work_dir={tmp / 'work'}", f"hydra.run.dir={tmp / 'search-run-2'}"]
    args.remove("supernet=progressive")
    args = [a for a in args if not a.startswith("supernet.phases")]
    result = run("search.py", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Reusing supernet checkpoint" not in result.stdout + result.stderr
    assert "Progressive shrinking" not in result.stdout + result.stderr
    assert len(list((tmp / "work" / "supernets").glob("mobilenet-*/supernet.pt"))) == 2
