"""Bad input to the entry points ends with a clear message and exit code 1 or 2, never a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_entry(script: str, *overrides: str, tmp_path: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / script), f"paths.work_dir={tmp_path / 'work'}",
               f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_search_without_space_lists_spaces(tmp_path):
    result = run_entry("search.py", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "python search.py +space=resnet" in result.stderr
    assert "Available spaces:" in result.stderr
    assert "resnet_basic_imagenet" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_space_is_rejected(tmp_path):
    result = run_entry("search.py", "+space=alexnet", tmp_path=tmp_path)
    assert result.returncode != 0
    assert "space/alexnet" in result.stderr or "alexnet" in result.stderr


def test_missing_data_root_names_path(tmp_path):
    missing = tmp_path / "no-such-cifar"
    result = run_entry("search.py", "+space=resnet", "data=cifar10", f"data.root={missing}", tmp_path=tmp_path)
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "does not exist" in result.stderr


def test_bad_space_value_is_not_a_data_failure(tmp_path):
    result = run_entry("search.py", "+space=resnet", "data=synthetic", "space.resolutions=[abc]", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "resolutions" in result.stderr
    assert "abc" in result.stderr
    # The data loaded; the space failed after it.
    assert "Stage data: finished" in result.stdout + result.stderr
    assert "Stage data: failed" not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("module", ["predictors.profile", "predictors.evaluate"])
def test_profile_and_evaluate_need_class_count(module, tmp_path):
    command = [sys.executable, "-m", module, "+space=resnet", "data=imagefolder", f"data.root={tmp_path}",
               f"paths.work_dir={tmp_path / 'work'}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "space.num_classes is null because data.num_classes is null for data=imagefolder" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("module", ["predictors.profile", "predictors.evaluate"])
def test_profile_and_evaluate_read_imports(module, tmp_path):
    command = [sys.executable, "-m", module, "+space=resnet", "imports=[no_such_lab.spaces]",
               f"paths.work_dir={tmp_path / 'work'}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "imports: cannot import 'no_such_lab.spaces'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cuda_without_gpu_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so hardware=cuda is valid here")
    result = run_entry("search.py", "+space=resnet", "hardware=cuda", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "hardware.device='cuda' needs CUDA" in result.stderr
    assert "hardware=cpu" in result.stderr


def test_train_without_study_says_what_to_run(tmp_path):
    result = run_entry("train.py", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "No TailNAS study found" in result.stderr
    assert "python search.py +space=resnet" in result.stderr


def test_train_with_unknown_pick(tmp_path):
    result = run_entry("train.py", "pick=best", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "Unknown pick='best'; choose one of ['knee', 'most_accurate_under_budget', 'most_accurate']" in result.stderr


def test_train_with_unknown_teacher(tmp_path):
    result = run_entry("train.py", "finetune.teacher=biggest", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "Unknown finetune.teacher='biggest'; choose one of ['none', 'largest']" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_train_checks_hardware_before_training(tmp_path):
    result = run_entry("train.py", "hardware=cuda", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "needs CUDA, but torch.cuda.is_available() is False" in result.stderr
    assert "No TailNAS study found" not in result.stderr
    assert "Traceback" not in result.stderr


def test_interrupt_ends_without_traceback(capsys):
    from nas.cli import run_cli

    def body(cfg):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        run_cli(body, None)
    assert exited.value.code == 130
    assert "a rerun with the same settings (and search.study_name) picks them up" in capsys.readouterr().err


def test_usage_error_printed_once(tmp_path, capsys):
    import logging
    import sys

    from nas.cli import UsageError, run_cli

    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    log_file = logging.FileHandler(tmp_path / "run.log")
    root.addHandler(console)
    root.addHandler(log_file)

    def body(cfg):
        raise UsageError("search.n_trials=-1 must be positive")

    try:
        with pytest.raises(SystemExit) as exited:
            run_cli(body, None)
    finally:
        root.removeHandler(console)
        root.removeHandler(log_file)
        log_file.close()
    assert exited.value.code == 1
    assert capsys.readouterr().err.count("search.n_trials=-1 must be positive") == 1
    assert "search.n_trials=-1 must be positive" in (tmp_path / "run.log").read_text()


def test_unwritable_file_ends_with_one_line(capsys):
    import errno

    from nas.cli import run_cli

    def read_only(cfg):
        raise OSError(errno.EROFS, "Read-only file system", "/shared/work/studies.db")

    with pytest.raises(SystemExit) as exited:
        run_cli(read_only, None)
    assert exited.value.code == 1
    assert "Cannot write /shared/work/studies.db (Read-only file system). Set paths.work_dir" in capsys.readouterr().err

    def missing(cfg):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/missing")

    with pytest.raises(FileNotFoundError):
        run_cli(missing, None)


@pytest.mark.parametrize("url", ["foo://bar", "/data/studies.db", "journal2:///data/journal.log"])
def test_storage_url_checked(url):
    from nas.cli import UsageError, check_storage_url

    with pytest.raises(UsageError, match=f"search.storage='{url}' is not a database URL .*; use sqlite:////"):
        check_storage_url(url)


def test_sqlite_storage_folder_created(tmp_path):
    from nas.cli import check_storage_url

    url = f"sqlite:///{tmp_path / 'new' / 'studies.db'}"
    assert check_storage_url(url) == url
    assert (tmp_path / "new").is_dir()


def test_optuna_interrupt_warning_without_traceback():
    import logging

    import search

    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        interrupted = logging.LogRecord("optuna.study._optimize", logging.WARNING, __file__, 1, "Trial 1 failed",
                                        None, sys.exc_info())
    try:
        raise ValueError("bug")
    except ValueError:
        failed = logging.LogRecord("optuna.study._optimize", logging.WARNING, __file__, 1, "Trial 2 failed", None,
                                   sys.exc_info())
    drop = search._InterruptWithoutTraceback()
    assert drop.filter(interrupted)
    assert interrupted.exc_info is None
    assert drop.filter(failed)
    assert failed.exc_info is not None  # other failures keep their traceback


def test_journal_storage_needs_absolute_path():
    from nas.cli import UsageError, check_storage_url

    with pytest.raises(UsageError, match="a journal file needs an absolute path"):
        check_storage_url("journal://relative/studies.log")


def test_resolve_data_root_makes_path_absolute(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from nas.cli import resolve_data_root

    monkeypatch.chdir(tmp_path)
    cfg = OmegaConf.create({"data": {"name": "imagefolder", "root": "images"}})
    OmegaConf.set_struct(cfg, True)
    resolve_data_root(cfg)
    assert cfg.data.root == str(tmp_path / "images")
    # Two spellings of one folder record the same root.
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    cfg.data.root = "../images"
    resolve_data_root(cfg)
    assert cfg.data.root == str(tmp_path / "images")
    # A root left unset stays missing, for the data module's own message; data without a root is untouched.
    missing = OmegaConf.create({"data": {"name": "cifar10", "root": "???"}})
    resolve_data_root(missing)
    assert OmegaConf.is_missing(missing.data, "root")
    synthetic = OmegaConf.create({"data": {"name": "synthetic"}})
    OmegaConf.set_struct(synthetic, True)
    resolve_data_root(synthetic)
    assert "root" not in synthetic.data


@pytest.mark.parametrize("argv, message", [
    (["gates.keep_ratio=0.5"], "Add gates=feature: python train.py gates=feature gates.keep_ratio=0.5"),
    (["gates.keep_ratio=0.5", "logger.project=x"],
     "Add gates=feature and logger=wandb: python train.py gates=feature logger=wandb gates.keep_ratio=0.5 logger.project=x"),
    (["trial=3", "logger.project=my project"],
     "Add logger=wandb: python train.py trial=3 logger=wandb 'logger.project=my project'"),
])
def test_group_settings_without_group_exit(argv, message, capsys):
    from nas.cli import check_group_settings

    with pytest.raises(SystemExit) as exit_info:
        check_group_settings(argv, "python train.py", {"gates": "feature", "logger": "wandb"})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["gates=feature", "gates.keep_ratio=0.5"],
    ["gates.keep_ratio=0.5", "gates=feature"],
    ["-m", "gates=none,feature", "gates.keep_ratio=0.5"],
    ["+gates.keep_ratio=0.5"],
    ["finetune.epochs=2", "--cfg", "job"],
])
def test_group_settings_with_group_pass(argv):
    from nas.cli import check_group_settings

    check_group_settings(argv, "python train.py", {"gates": "feature", "logger": "wandb"})


@pytest.mark.parametrize("script", ["search.py", "train.py"])
def test_interrupt_while_starting_ends_quietly(script, tmp_path):
    import signal
    import time

    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen([sys.executable, str(root / script), f"paths.work_dir={tmp_path / 'work'}",
                                f"hydra.run.dir={tmp_path / 'run'}"], cwd=root, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # inside the imports, which take seconds
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in err
    assert "Interrupted" in err


def test_imports_string_and_taken_family(tmp_path, monkeypatch):
    from nas.cli import UsageError, import_user_modules

    (tmp_path / "lab_taken_family.py").write_text(
        "from nas.spaces import register_space\n"
        "from nas.spaces.resnet import ResNetSpace\n"
        "@register_space('resnet')\n"
        "class Mine(ResNetSpace):\n"
        "    pass\n")
    (tmp_path / "lab_fine.py").write_text("LOADED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_user_modules("lab_fine")  # one name, not split into letters
    import sys

    assert sys.modules["lab_fine"].LOADED
    with pytest.raises(UsageError, match="imports: importing 'lab_taken_family' failed: Space family 'resnet' is "
                                         "already registered by ResNetSpace"):
        import_user_modules(["lab_taken_family"])


def test_train_rejects_study_settings(tmp_path):
    result = run_entry("train.py", "+data=cifar10", tmp_path=tmp_path)
    assert result.returncode == 1
    assert "train.py takes data from the study, so the command line cannot set it" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_help_groups():
    import re

    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = dict(re.findall(r"^(\w+): (.+)$", groups, flags=re.MULTILINE))
    assert set(listed) == {"hardware", "gates", "logger"}
    for group, options in listed.items():
        assert set(options.split(", ")) == {p.stem for p in (ROOT / "conf" / group).glob("*.yaml")}


def test_printed_script_path_from_any_folder(tmp_path, monkeypatch):
    from nas.cli import script_path

    monkeypatch.chdir(ROOT)
    assert script_path("train.py") == "train.py"
    monkeypatch.chdir(ROOT / "conf")
    assert script_path("train.py") == str(ROOT / "train.py")
    monkeypatch.chdir(ROOT.parent)
    assert script_path("train.py") == str((ROOT / "train.py").relative_to(ROOT.parent))
    monkeypatch.chdir(tmp_path)
    assert script_path("train.py") == str(ROOT / "train.py")


def test_printed_command_quotes_paths_with_spaces(tmp_path, monkeypatch):
    import shlex
    import shutil

    import nas.cli
    from nas.cli import python_command, script_path

    repo = tmp_path / "my repo"
    monkeypatch.setattr(nas.cli, "CONF_DIR", repo / "conf")
    monkeypatch.setattr(sys, "executable", str(repo / ".venv" / "bin" / "python"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    for folder in (tmp_path, tmp_path / "elsewhere"):
        folder.mkdir(exist_ok=True)
        monkeypatch.chdir(folder)
        # The shell must read each path as one word.
        words = shlex.split(f"{python_command()} {script_path('train.py')} trial=0")
        assert [Path(words[0]).resolve(), Path(words[1]).resolve()] == [repo / ".venv" / "bin" / "python",
                                                                        repo / "train.py"]


def test_printed_python_names_this_interpreter(tmp_path, monkeypatch):
    import shutil

    from nas.cli import python_command

    venv_python = tmp_path / ".venv" / "bin" / "python"
    monkeypatch.setattr(sys, "executable", str(venv_python))
    monkeypatch.chdir(tmp_path)
    # An activated environment: python on the PATH is this interpreter.
    monkeypatch.setattr(shutil, "which", lambda name: str(venv_python))
    assert python_command() == "python"
    # Not activated: python on the PATH is another interpreter, or there is none.
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/python")
    assert python_command() == ".venv/bin/python"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert python_command() == ".venv/bin/python"


@pytest.mark.parametrize(("argv", "config", "expected"), [
    (["+pik=knee"], "train", "+pik=knee adds pik, which the settings of python x do not have, so it is ignored "
                             "unless your own code reads it. Did you mean pick?"),
    (["+space=resnet", "+profile.n_subnets=12"], "search", "Did you mean predictor.n_subnets?"),
    (["+space=resnet", "+space.stem.chanels=8"], "search", "Did you mean space.stem.channels?"),
], ids=["top-level", "missing-parent", "nested"])
def test_unknown_added_key_warned(argv, config, expected, capsys):
    from hydra.core.global_hydra import GlobalHydra

    from nas.cli import warn_added_keys

    GlobalHydra.instance().clear()
    warn_added_keys(argv, "python x", config)
    assert expected in capsys.readouterr().err


def test_known_added_keys_not_warned(capsys):
    from hydra.core.global_hydra import GlobalHydra

    from nas.cli import warn_added_keys

    GlobalHydra.instance().clear()
    warn_added_keys(["+space=resnet", "search.n_trials=4", "+hydra.job.env_set.X=1"], "python search.py", "search")
    assert capsys.readouterr().err == ""


def test_rejected_added_keys_not_warned(capsys):
    from hydra.core.global_hydra import GlobalHydra

    from nas.cli import warn_added_keys

    GlobalHydra.instance().clear()
    warn_added_keys(["+data.root=/elsewhere"], "python train.py", "train", rejected=("data",))
    assert capsys.readouterr().err == ""
    warn_added_keys(["+data.root=/elsewhere"], "python train.py", "train")
    assert "+data.root=/elsewhere adds data.root" in capsys.readouterr().err


def test_moved_data_folder_names_fix(tmp_path):
    from nas.cli import UsageError
    from train import check_recorded_data

    check_recorded_data({"name": "mnist"}, "s")
    check_recorded_data({"name": "imagefolder", "root": str(tmp_path)}, "s")
    with pytest.raises(UsageError, match=r"Study 's' was searched on data.root='.*gone', which does not exist"):
        check_recorded_data({"name": "imagefolder", "root": str(tmp_path / "gone")}, "s")
