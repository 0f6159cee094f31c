"""Several workers share one Optuna study through PostgreSQL (RDB storage).

Runs when TAILNAS_TEST_POSTGRES_URL points at a server (``.ci/run`` starts one); skipped otherwise.
"""

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parent.parent
URL = os.environ.get("TAILNAS_TEST_POSTGRES_URL")

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not URL, reason="TAILNAS_TEST_POSTGRES_URL is not set; .ci/run starts PostgreSQL and sets it"),
]

WORKER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {tests!r})
    from conftest import load_space_config
    from nas.search import LatencyEstimate, SearchObjective, create_or_load_study, create_sampler
    from nas.spaces import create_space

    space = create_space(load_space_config("resnet"))
    seed = int(sys.argv[1])
    study, _ = create_or_load_study({url!r}, {name!r}, create_sampler("nsga2", seed, 4), {{"space": space.raw_config}})
    largest = space.macs(space.largest())
    objective = SearchObjective(
        space,
        lambda arch: space.macs(arch) / largest,
        lambda arch: LatencyEstimate(space.macs(arch) / 1e7, space.macs(arch) / 1.1e7, space.macs(arch) / 0.9e7),
    )
    study.optimize(objective, n_trials=6)
    """
)


def test_two_workers_share_one_study(tmp_path):
    name = f"shared-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), url=URL, name=name))
    # Optuna creates its tables on first use; two workers racing to do that on an empty database
    # can collide, so the schema is created here first, as a launcher would before starting workers.
    optuna.storages.RDBStorage(URL)
    workers = [subprocess.Popen([sys.executable, str(script), str(seed)], stderr=subprocess.PIPE, text=True)
               for seed in (1, 2)]
    for worker in workers:
        _, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, err[-2000:]

    study = optuna.load_study(study_name=name, storage=URL)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 12
    assert study.user_attrs["tailnas_format_version"] == 1
    optuna.delete_study(study_name=name, storage=URL)
