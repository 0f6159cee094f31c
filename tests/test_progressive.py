"""Progressive shrinking: the phase plan, config checks, and one short run of each supernet schedule."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from nas.progressive import (
    ProgressiveError,
    ProgressiveShrinkingModule,
    build_plan,
    check_supernet_config,
    create_supernet_module,
    decision_dimensions,
    plan_epochs,
)
from nas.spaces import create_space
from nas.training import SupernetModule
from tests.conftest import load_space_config

PHASES = {"full": 1, "kernel": 1, "depth": 1, "width": 1}
SUBNETS = {"kernel": 1, "depth": 1, "width": 2}
COMMON = {"lr": 0.002, "weight_decay": 0.0005, "kd_weight": 1.0, "temperature": 1.0, "label_smoothing": 0.0,
          "trainer": {"accelerator": "cpu"}}


@pytest.fixture(scope="module")
def mobilenet():
    # OFA's block structure with narrow layers and 16x16 inputs, so a training step takes well under a second.
    config = load_space_config("mobilenet")
    config.update(resolutions=[12, 16], base_widths=[8, 8, 8, 8, 16, 16, 16, 32, 32], dropout_rate=0.0)
    return create_space(config)


@pytest.fixture(scope="module")
def resnet():
    config = load_space_config("resnet")
    config["stages"] = [{"depths": [1, 2], "widths": [8, 16], "stride": 1}, {"depths": [1, 2, 3], "widths": [8, 16, 24], "stride": 2}]
    return create_space(config)


def loader(resolution: int = 16, batches: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8 * batches, 1, resolution, resolution, generator=generator)
    y = torch.randint(0, 10, (8 * batches,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def fit(module: pl.LightningModule, epochs: int, data: DataLoader) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(module, train_dataloaders=data)
    return trainer


# -- plan ---------------------------------------------------------------------------------------
def test_dimensions_of_builtin_spaces(mobilenet, resnet):
    dims = decision_dimensions(mobilenet)
    assert dims["r"] == "resolution"
    assert dims["ks_0"] == "kernel"
    assert dims["d_4"] == "depth"
    assert dims["e_19"] == "width"
    dims = decision_dimensions(resnet)
    assert dims == {"resolution": "resolution", "depth_0": "depth", "width_0": "width", "depth_1": "depth",
                    "width_1": "width"}


def test_mobilenet_plan_follows_ofa(mobilenet):
    plan = build_plan(mobilenet, {"full": 1, "kernel": 1, "depth": 2, "width": 2}, steps_per_epoch=10)
    phases = [stage.phase for stage in plan.stages]
    assert phases == ["full", "kernel", "depth", "depth", "width", "width"]
    assert plan.epochs == 6
    assert [(s.start_step, s.end_step) for s in plan.stages] == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 50),
                                                                 (50, 60)]
    full, kernel, depth1, depth2, width1, width2 = plan.stages
    assert full.options["ks_0"] == [7]
    assert full.options["d_0"] == [4]
    assert full.options["e_0"] == [6]
    assert full.options["r"] == [12, 16]
    assert kernel.options["ks_3"] == [3, 5, 7]
    assert kernel.options["d_2"] == [4]
    assert kernel.options["e_3"] == [6]
    assert depth1.options["d_2"] == [3, 4]
    assert depth1.options["ks_3"] == [3, 5, 7]
    assert depth1.options["e_0"] == [6]
    assert depth2.options["d_2"] == [2, 3, 4]
    assert width1.options["e_5"] == [4, 6]
    assert width1.options["d_1"] == [2, 3, 4]
    assert width2.options["e_5"] == [3, 4, 6]
    assert [s.expand_stage for s in plan.stages] == [None, None, None, None, 0, 1]


def test_resnet_plan_skips_kernel(resnet):
    plan = build_plan(resnet, PHASES, steps_per_epoch=4)
    assert [stage.phase for stage in plan.stages] == ["full", "depth", "depth", "width", "width"]
    assert plan_epochs(resnet, PHASES) == plan.epochs == 3
    depth1 = plan.stages[1]
    # Stage 0 has two depths, so it opens fully at once. Stage 1 opens {2, 3} first.
    assert depth1.options["depth_0"] == [1, 2]
    assert depth1.options["depth_1"] == [2, 3]
    assert depth1.options["width_1"] == [24]
    assert plan.stages[-1].options == {key: sorted(v) for key, v in resnet.choices().items()}


def test_zero_epoch_phase_is_skipped(mobilenet):
    plan = build_plan(mobilenet, {**PHASES, "kernel": 0}, steps_per_epoch=2)
    assert "kernel" not in [stage.phase for stage in plan.stages]
    # The kernel dimension still opens for the later phases.
    assert plan.stages[1].options["ks_0"] == [3, 5, 7]


def test_short_phase_drops_empty_substages(mobilenet):
    plan = build_plan(mobilenet, PHASES, steps_per_epoch=1)
    assert [stage.phase for stage in plan.stages] == ["full", "kernel", "depth", "width"]
    assert plan.stage_at(3).options["e_0"] == [3, 4, 6]
    assert plan.stage_at(100) is plan.stages[-1]


@pytest.mark.parametrize(
    ("phases", "message"),
    [
        ({"full": 1, "kernel": 1, "depth": 1}, "missing keys ['width']"),
        ({**PHASES, "resolution": 1}, "unknown keys ['resolution']"),
        ({**PHASES, "depth": -1}, "supernet.phases.depth must be an integer >= 0"),
        ({"full": 0, "kernel": 0, "depth": 0, "width": 0}, "gives no training"),
    ],
)
def test_invalid_phases_rejected(mobilenet, phases, message):
    with pytest.raises(ProgressiveError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_plan(mobilenet, phases, steps_per_epoch=1)


def test_unknown_decision_named(mobilenet, monkeypatch):
    monkeypatch.setattr(mobilenet, "choices", lambda: {"r": [16], "ops_0": ["a", "b"]})
    with pytest.raises(ProgressiveError, match=r"\['ops_0'\].*elastic_dimensions"):
        decision_dimensions(mobilenet)


# -- config ---------------------------------------------------------------------------------------
def test_config_unknown_key_rejected(mobilenet):
    config = {"schedule": "progressive", "phases": PHASES, "subnets_per_step": SUBNETS, "epochs": 3, **COMMON}
    with pytest.raises(ProgressiveError, match=r"unknown keys \['epochs'\]"):
        create_supernet_module(mobilenet.build_supernet(), config, seed=0)


def test_config_unknown_schedule_rejected(mobilenet):
    with pytest.raises(ProgressiveError, match=r"'cyclic'.*\['sandwich', 'progressive'\]"):
        create_supernet_module(mobilenet.build_supernet(), {"schedule": "cyclic"}, seed=0)


def test_config_subnets_per_step_checked(mobilenet):
    config = {"schedule": "progressive", "phases": PHASES, "subnets_per_step": {**SUBNETS, "width": 0}, **COMMON}
    with pytest.raises(ProgressiveError, match="subnets_per_step.width must be an integer >= 1"):
        create_supernet_module(mobilenet.build_supernet(), config, seed=0)


def test_config_checked_without_building(mobilenet, monkeypatch):
    import yaml

    from tests.conftest import ROOT

    config = yaml.safe_load((ROOT / "conf" / "supernet" / "progressive.yaml").read_text())
    check_supernet_config(mobilenet, config)
    monkeypatch.setattr(mobilenet, "build_supernet", lambda: pytest.fail("the check must not build the supernet"))
    monkeypatch.setattr(mobilenet, "choices", lambda: {"r": [16], "ops_0": ["a", "b"]})
    with pytest.raises(ProgressiveError, match=r"\['ops_0'\].*elastic_dimensions"):
        check_supernet_config(mobilenet, config)
    with pytest.raises(ProgressiveError, match="phases.depth must be an integer >= 0"):
        check_supernet_config(mobilenet, {**config, "phases": {**config["phases"], "depth": -1}})


@pytest.mark.parametrize(("key", "value", "least"), [("epochs", 0, 1), ("num_random", -1, 0), ("epochs", 1.5, 1)])
def test_sandwich_counts_checked(mobilenet, key, value, least):
    import yaml

    from tests.conftest import ROOT

    config = yaml.safe_load((ROOT / "conf" / "supernet" / "sandwich.yaml").read_text())
    check_supernet_config(mobilenet, config)
    with pytest.raises(ProgressiveError, match=f"supernet.{key} must be a whole number >= {least}, but got {value!r}"):
        check_supernet_config(mobilenet, {**config, key: value})


def test_config_files_build_modules(mobilenet):
    import yaml

    from tests.conftest import ROOT

    for name, expected in (("sandwich", SupernetModule), ("progressive", ProgressiveShrinkingModule)):
        config = yaml.safe_load((ROOT / "conf" / "supernet" / f"{name}.yaml").read_text())
        module, epochs = create_supernet_module(mobilenet.build_supernet(), config, seed=0)
        assert isinstance(module, expected)
        assert epochs >= 1


# -- training -----------------------------------------------------------------------------------
def test_sandwich_runs_one_step(resnet):
    torch.manual_seed(0)
    config = {"schedule": "sandwich", "epochs": 1, "num_random": 1, **COMMON}
    module, epochs = create_supernet_module(resnet.build_supernet(), config, seed=0)
    before = {k: v.clone() for k, v in module.supernet.state_dict().items()}
    trainer = fit(module, epochs, loader(28, batches=1))
    assert trainer.global_step == 1
    changed = [k for k, v in module.supernet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def test_progressive_runs_every_phase(mobilenet, monkeypatch):
    torch.manual_seed(0)
    config = {"schedule": "progressive", "phases": PHASES, "subnets_per_step": SUBNETS, **COMMON}
    module, epochs = create_supernet_module(mobilenet.build_supernet(), config, seed=0)
    assert epochs == 4
    sorts = []
    original = module.supernet.sort_expanded_channels
    monkeypatch.setattr(module.supernet, "sort_expanded_channels", lambda stage: (sorts.append(stage), original(stage)))
    trainer = fit(module, epochs, loader(16, batches=1))
    assert trainer.global_step == 4
    assert [stage.phase for stage in module.plan.stages] == ["full", "kernel", "depth", "width"]
    assert module.current_stage == 3
    # One width step leaves no step for the {4, 6} sub-stage, so only the sort before {3, 4, 6} runs.
    assert sorts == [1]
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_progressive_step_archs_follow_stage(mobilenet):
    module = ProgressiveShrinkingModule(mobilenet.build_supernet(), PHASES, SUBNETS, seed=3)
    module.plan = build_plan(mobilenet, PHASES, steps_per_epoch=1)
    largest = mobilenet.largest()
    (full,) = module.step_archs(0)
    assert (full.ks, full.e, full.d) == (largest.ks, largest.e, largest.d)
    teacher, student = module.step_archs(1)
    assert teacher == largest
    assert student.d == largest.d
    assert student.e == largest.e
    archs = module.step_archs(3)
    assert archs[0] == largest
    assert len(archs) == 1 + SUBNETS["width"]
    assert module.step_archs(3) == archs


def test_progressive_wrong_max_epochs_rejected(mobilenet):
    module = ProgressiveShrinkingModule(mobilenet.build_supernet(), PHASES, SUBNETS)
    with pytest.raises(ProgressiveError, match="pass max_epochs=4"):
        fit(module, 2, loader(16, batches=1))


def test_progressive_sorts_resnet_channels(resnet, caplog, monkeypatch):
    torch.manual_seed(0)
    config = {"schedule": "progressive", "phases": PHASES, "subnets_per_step": SUBNETS, **COMMON}
    module, epochs = create_supernet_module(resnet.build_supernet(), config, seed=0)
    sorts = []
    original = module.supernet.sort_expanded_channels
    monkeypatch.setattr(module.supernet, "sort_expanded_channels", lambda stage: (sorts.append(stage), original(stage)))
    with caplog.at_level("INFO", logger="nas.progressive"):
        trainer = fit(module, epochs, loader(28, batches=1))
    assert trainer.global_step == 3
    # Widths [8, 16, 24] give two width sub-stages, and one width step leaves a step only for the second.
    assert sorts == [1]
    assert "cannot sort its channels" not in caplog.text
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
