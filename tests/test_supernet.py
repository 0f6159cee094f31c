import numpy as np
import pytest
import torch

from nas.supernet import recalibrate_batchnorm


def test_extracted_subnet_equals_supernet(resnet_space):
    supernet = resnet_space.build_supernet()
    x = torch.randn(3, 1, 28, 28)
    supernet.train()
    for arch in [resnet_space.largest(), resnet_space.smallest()]:
        supernet.set_active(arch)
        supernet(x)  # move BatchNorm statistics away from their initial values
    supernet.eval()
    rng = np.random.default_rng(1)
    archs = [resnet_space.largest(), resnet_space.smallest()] + [resnet_space.sample(rng) for _ in range(6)]
    for arch in archs:
        supernet.set_active(arch)
        with torch.no_grad():
            expected = supernet(x)
            actual = supernet.extract(arch).eval()(x)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_extracted_subnet_is_independent(resnet_space):
    supernet = resnet_space.build_supernet()
    arch = resnet_space.smallest()
    subnet = supernet.extract(arch)
    with torch.no_grad():
        next(subnet.parameters()).add_(1.0)
    assert not torch.equal(next(subnet.parameters()), next(supernet.parameters())[: next(subnet.parameters()).shape[0]])


def test_subnet_weights_are_supernet_slices(resnet_space):
    supernet = resnet_space.build_supernet()
    arch = resnet_space.smallest()
    subnet = supernet.extract(arch)
    width = arch.widths[0]
    torch.testing.assert_close(subnet.layer1[0].conv1.weight, supernet.layer1[0].conv1.weight[:width, :16])


def test_recalibration_replaces_statistics(resnet_space):
    supernet = resnet_space.build_supernet()
    supernet.set_active(resnet_space.largest())
    batches = [torch.randn(8, 1, 28, 28) * 3 + 5 for _ in range(2)]
    recalibrate_batchnorm(supernet, batches, max_batches=2)
    mean = supernet.bn1.running_mean.clone()
    assert mean.abs().sum() > 0
    assert supernet.bn1.momentum == 0.1  # restored after recalibration
    recalibrate_batchnorm(supernet, batches, max_batches=2)
    torch.testing.assert_close(supernet.bn1.running_mean, mean)


def test_supernet_cache_key_follows_schedule_version(resnet_space, monkeypatch):
    from nas.supernet import cache

    data = {"name": "synthetic"}
    sandwich = cache.supernet_key(resnet_space, data, {"schedule": "sandwich", "epochs": 1}, seed=0)
    progressive = cache.supernet_key(resnet_space, data, {"schedule": "progressive", "epochs": 1}, seed=0)
    assert sandwich != progressive
    monkeypatch.setitem(cache.SCHEDULE_VERSIONS, "progressive", cache.SCHEDULE_VERSIONS["progressive"] + 1)
    assert cache.supernet_key(resnet_space, data, {"schedule": "progressive", "epochs": 1}, seed=0) != progressive
    assert cache.supernet_key(resnet_space, data, {"schedule": "sandwich", "epochs": 1}, seed=0) == sandwich


def test_interrupted_supernet_training_resumes(tmp_path, monkeypatch, caplog):
    import logging
    import signal
    from pathlib import Path
    from types import SimpleNamespace

    import lightning.pytorch as pl
    import yaml
    from omegaconf import OmegaConf

    import search
    from nas.data import build_datamodule
    from nas.spaces import create_space
    from tests.conftest import load_space_config

    config = load_space_config("resnet")
    config["stages"] = [{"depths": [1], "widths": [8], "stride": 1}, {"depths": [1], "widths": [8, 16], "stride": 2}]
    space = create_space(config)
    conf = Path(search.__file__).resolve().parent / "conf"
    training = yaml.safe_load((conf / "supernet" / "sandwich.yaml").read_text())
    cfg = OmegaConf.create({"seed": 0, "paths": {"work_dir": str(tmp_path)}, "supernet": {**training, "epochs": 3}})
    datamodule = build_datamodule({"name": "synthetic", "num_samples": 40, "batch_size": 8})
    datamodule.setup()
    tracker = SimpleNamespace(lightning_logger=lambda: False)

    class StopInSecondEpoch(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    original_trainer = pl.Trainer

    def trainer_with_stop(*args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), StopInSecondEpoch()]
        return original_trainer(*args, **kwargs)

    monkeypatch.setattr(pl, "Trainer", trainer_with_stop)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            search.train_or_load_supernet(cfg, space, datamodule, tracker)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C from its shutdown on
    path = search.supernet_path(cfg, space, datamodule)
    assert (path.parent / "resume.ckpt").is_file()
    assert not path.is_file()

    monkeypatch.setattr(pl, "Trainer", original_trainer)
    with caplog.at_level(logging.INFO, logger="tailnas.search"):
        search.train_or_load_supernet(cfg, space, datamodule, tracker)
    assert "Resuming supernet training after 1 of 3 epochs from" in caplog.text
    assert path.is_file()
    assert not (path.parent / "resume.ckpt").exists()


def test_finetune_teacher_stays_in_eval_mode():
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from nas.training import FinetuneModule

    def network() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3))

    torch.manual_seed(0)
    teacher = network()
    before = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    module = FinetuneModule(network(), teacher=teacher, kd_weight=1.0)
    # Lightning 2.6 keeps each submodule's mode through fit; a module.train() call must not undo the teacher's.
    module.train()
    assert module.model.training
    assert not module.teacher.training
    seen = []

    class RecordTeacherMode(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.teacher.training)

    data = DataLoader(TensorDataset(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))), batch_size=8)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordTeacherMode()],
                         num_sanity_val_steps=0)
    # Validation between the epochs switches the module to eval mode and back.
    trainer.fit(module, train_dataloaders=data, val_dataloaders=data)
    assert seen == [False] * 4
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.fixture
def default_sigint():
    """Run the test with Python's own Ctrl-C handler, whatever an earlier test left, and put that back after."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_hold_waits_for_save(default_sigint):
    import os
    import signal
    from types import SimpleNamespace

    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from nas.training import FinetuneModule, HoldInterruptUntilSaved, fit_or_interrupt

    class CtrlCWhileCalibrating(pl.Callback):
        def __init__(self, press):
            self.press = press

        def on_train_end(self, trainer, pl_module):
            if self.press:
                os.kill(os.getpid(), signal.SIGINT)
            pl_module.calibrated = True  # the rest of this hook still runs

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))), batch_size=8)
    handler = signal.getsignal(signal.SIGINT)
    saved = []
    # Ctrl-C in a later callback's on_train_end, then Ctrl-C while testing, after Lightning's
    # teardown has put back the signal handlers that it found when fit started.
    for press_while_calibrating in (True, False):
        module = FinetuneModule(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)))
        hold = HoldInterruptUntilSaved()
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             callbacks=[hold, CtrlCWhileCalibrating(press_while_calibrating)])
        with pytest.raises(KeyboardInterrupt):
            with hold:
                fit_or_interrupt(trainer, module, train_dataloaders=data)
                if not press_while_calibrating:
                    os.kill(os.getpid(), signal.SIGINT)
                trainer.test(module, dataloaders=data, verbose=False)
                saved.append(module.calibrated)
        assert signal.getsignal(signal.SIGINT) is handler
    assert saved == [True, True]

    # A second Ctrl-C stops at once, before the save.
    with pytest.raises(KeyboardInterrupt):
        with HoldInterruptUntilSaved() as hold:
            hold.on_train_end(trainer, module)
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            saved.append("second")
    assert signal.getsignal(signal.SIGINT) is handler

    # Before the end of training a Ctrl-C is not held, and without one nothing is raised.
    with pytest.raises(KeyboardInterrupt):
        with HoldInterruptUntilSaved():
            os.kill(os.getpid(), signal.SIGINT)
            saved.append("during training")
    with HoldInterruptUntilSaved() as hold:
        hold.on_train_end(trainer, module)
    assert saved == [True, True]

    # A DDP rank other than 0 leaves the stop to rank 0. It does not raise, and its caller ends it on pressed.
    with HoldInterruptUntilSaved() as hold:
        hold.on_train_end(SimpleNamespace(is_global_zero=False), module)
        os.kill(os.getpid(), signal.SIGINT)
    assert hold.pressed
    assert signal.getsignal(signal.SIGINT) is handler


def _interrupting_trainer(*callbacks):
    import lightning.pytorch as pl

    return pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=list(callbacks))


def test_hold_covers_fit_teardown(default_sigint):
    import os
    import signal

    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from nas.training import FinetuneModule, HoldInterruptUntilSaved, fit_or_interrupt

    class CtrlCInTeardown(pl.Callback):
        # Lightning runs the teardown hooks and the loggers' finalize after it has put back the
        # signal handlers that fit started with.
        def teardown(self, trainer, pl_module, stage):
            os.kill(os.getpid(), signal.SIGINT)

    data = DataLoader(TensorDataset(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))), batch_size=8)
    module = FinetuneModule(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)))
    handler = signal.getsignal(signal.SIGINT)
    hold = HoldInterruptUntilSaved()
    saved = []
    with pytest.raises(KeyboardInterrupt):
        with hold:
            fit_or_interrupt(_interrupting_trainer(hold, CtrlCInTeardown()), module, train_dataloaders=data)
            saved.append(True)
    assert saved == [True]
    assert signal.getsignal(signal.SIGINT) is handler


def test_interrupted_test_raises_interrupt(default_sigint):
    import os
    import signal

    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from nas.training import FinetuneModule, HoldInterruptUntilSaved, fit_or_interrupt, run_test_or_interrupt

    class CtrlCWhileTesting(pl.Callback):
        def __init__(self, presses):
            self.presses = presses

        def on_test_batch_start(self, *args):
            presses, self.presses = self.presses, 0
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)

    data = DataLoader(TensorDataset(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))), batch_size=8)
    module = FinetuneModule(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)))
    handler = signal.getsignal(signal.SIGINT)
    try:
        # Not held: Lightning ends the test with SystemExit(1), which run_cli would not report.
        with pytest.raises(KeyboardInterrupt):
            run_test_or_interrupt(_interrupting_trainer(CtrlCWhileTesting(1)), module, dataloaders=data, verbose=False)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores Ctrl-C from its shutdown on
    # Held after training: the second Ctrl-C stops the test at once.
    hold = HoldInterruptUntilSaved()
    saved = []
    with pytest.raises(KeyboardInterrupt):
        with hold:
            fit_or_interrupt(_interrupting_trainer(hold), module, train_dataloaders=data)
            run_test_or_interrupt(_interrupting_trainer(CtrlCWhileTesting(2)), module, dataloaders=data, verbose=False)
            saved.append(True)
    assert saved == []
    assert signal.getsignal(signal.SIGINT) is handler
