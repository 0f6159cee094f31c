"""Which process of a distributed run counts as rank 0, read from the launchers' environment variables."""

import pytest

from nas.training import is_secondary_rank, ranks_started_outside

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("variables, secondary, outside", [
    ({}, False, False),
    # Lightning's launcher: rank 0 gets WORLD_SIZE when it starts the others, which get LOCAL_RANK.
    ({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, False, True),
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, True, True),
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, True, False),
    # torchrun
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, False, True),
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, True, True),
    # SLURM: a job of one task (a submitit worker) is no distributed run, whatever its PROCID.
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False, False),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, True, True),
])
def test_ranks_from_environment(clean_env, variables, secondary, outside):
    for name, value in variables.items():
        clean_env.setenv(name, value)
    assert is_secondary_rank() is secondary
    assert ranks_started_outside() is outside
