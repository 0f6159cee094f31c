"""Which process of a distributed run counts as rank 0, and when its ranks were started outside Lightning."""

import pytest

from nas.training import (
    asks_for_several_processes,
    ranks_started_outside,
    started_as_secondary_rank,
    trained_as_secondary_rank,
)

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "SUBMITIT_EXECUTOR")
ONE_DEVICE = {"strategy": "auto", "devices": 1}
TWO_DEVICES = {"strategy": "ddp", "devices": 2}


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("variables, secondary, outside_two, outside_one", [
    ({}, False, False, False),
    # Lightning's launcher: rank 0 gets WORLD_SIZE when it starts the others, which get LOCAL_RANK.
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, True, True, False),
    # torchrun
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, False, True, False),
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}, True, True, False),
    # A SLURM step of several tasks: DDP ranks when the trainer requests several devices, else workers.
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1"}, False, True, False),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, False, False, False),
    # Variables that a scheduler exports to a plain job do not make it a rank.
    ({"RANK": "2", "NODE_RANK": "1"}, False, False, False),
    ({"LOCAL_RANK": ""}, False, False, False),
])
def test_ranks_from_environment(clean_env, variables, secondary, outside_two, outside_one):
    for name, value in variables.items():
        clean_env.setenv(name, value)
    assert started_as_secondary_rank() is secondary
    assert ranks_started_outside(TWO_DEVICES) is outside_two
    assert ranks_started_outside(ONE_DEVICE) is outside_one
    # Without an initialised process group, a process trained alone.
    assert trained_as_secondary_rank() is False


@pytest.mark.parametrize("trainer, several", [
    ({"devices": 1}, False), ({"devices": "1"}, False), ({"devices": 2}, True), ({"devices": "auto"}, True),
    ({"devices": [0, 1]}, True), ({"devices": 1, "num_nodes": 2}, True),
])
def test_several_processes_from_trainer_settings(trainer, several):
    assert asks_for_several_processes(trainer) is several


def test_ddp_inside_submitit_needs_slurm_ranks(clean_env):
    from nas.training import ddp_launch_problem

    assert ddp_launch_problem(TWO_DEVICES, "supernet.trainer") is None
    clean_env.setenv("SUBMITIT_EXECUTOR", "local")
    problem = ddp_launch_problem(TWO_DEVICES, "supernet.trainer")
    assert problem.startswith("supernet.trainer.devices=2 inside a job of Hydra's submitit launcher")
    assert ddp_launch_problem(ONE_DEVICE, "supernet.trainer") is None
    # SLURM started the ranks: several tasks in the step.
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("SLURM_PROCID", "0")
    assert ddp_launch_problem(TWO_DEVICES, "supernet.trainer") is None


def test_fit_restores_torch_threads() -> None:
    import torch

    from nas.training import fit_or_interrupt

    class ThreadSettingTrainer:
        # Lightning's DDP launchers on CPUs set rank 0's thread count to the cores per rank.
        interrupted = False

        def fit(self, *args, **kwargs) -> None:
            torch.set_num_threads(1 if before != 1 else 2)

    before = torch.get_num_threads()
    try:
        fit_or_interrupt(ThreadSettingTrainer())
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
