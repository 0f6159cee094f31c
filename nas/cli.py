"""Shared plumbing of the Hydra entry points: error handling, stage timing, storage and space lookup."""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nas.files import lock_wait_s, write_json_atomic

__all__ = [
    "UsageError",
    "check_group_settings",
    "warn_added_keys",
    "StageTimer",
    "available_spaces",
    "require_space",
    "default_storage",
    "check_storage_url",
    "import_user_modules",
    "profiled_space_config",
    "python_command",
    "run_cli",
    "to_container",
]

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class UsageError(ValueError):
    """A command line that cannot run as given; the message says what to type instead."""


def available_spaces() -> list[str]:
    """Return the space variants, one per ``conf/space/*.yaml``."""
    return sorted(p.stem for p in (CONF_DIR / "space").glob("*.yaml"))


def require_space(cfg: DictConfig, command: str) -> None:
    """Stop with the list of spaces when no ``+space=...`` was given."""
    if cfg.get("space") is None:
        spaces = ", ".join(available_spaces())
        raise UsageError(
            f"No search space chosen. Run `{command} +space=resnet` (or another space). Available spaces: {spaces}."
        )


def python_command() -> str:
    """Return how to call this interpreter in a printed command: ``python`` when that finds it, else its path.

    After ``make search`` without an activated environment, ``python`` on the PATH is another
    interpreter without TailNAS's packages, so the printed command names ``.venv/bin/python``.
    """
    import shutil

    found = shutil.which("python")
    current = Path(os.path.abspath(sys.executable))
    # Compared without resolving links: a virtual environment's python links to the system's.
    if found and Path(os.path.abspath(found)) == current:
        return "python"
    return _printed_path(current, Path.cwd())


def script_path(name: str) -> str:
    """Return how to name the entry point ``name`` (``train.py``) in a printed command run from the current folder."""
    return _printed_path(CONF_DIR.parent / name, Path.cwd().resolve())


def _printed_path(path: Path, folder: Path) -> str:
    """Return ``path`` relative to ``folder`` where it lies below it, else as it is, quoted for a POSIX shell."""
    try:
        return shlex.quote(str(path.relative_to(folder)))
    except ValueError:
        return shlex.quote(str(path))


def profiled_space_config(cfg: DictConfig, command: str) -> dict[str, Any]:
    """Return ``cfg.space`` as a dict; raise UsageError when the data leaves its channels or classes null.

    The profiling entry points build the space without loading the data, so ``data.in_channels``
    and ``data.num_classes`` must be set where the data module would find them (image folders).
    """
    space_cfg = to_container(cfg.space)
    for name in ("in_channels", "num_classes"):
        if space_cfg.get(name) is None:
            raise UsageError(
                f"space.{name} is null because data.{name} is null for data={cfg.data.name}; set it on the "
                f"command line, for example `{command} +space=resnet data={cfg.data.name} data.{name}=10`, with "
                "the data settings of the search."
            )
    return space_cfg


def check_group_settings(argv: list[str], command: str, empty_defaults: dict[str, str]) -> None:
    """Exit with status 2 when ``argv`` sets a key of a config group whose default option has no keys.

    ``empty_defaults`` maps each such group to the option that has the keys, for example
    ``{"gates": "feature"}`` where the default is ``gates: none``. Without this check, Hydra rejects
    ``gates.keep_ratio=0.5`` as "not in struct" and suggests ``+gates.keep_ratio=0.5``, which the
    entry point then rejects. The message repeats the command with the option added.
    """
    import shlex

    chosen = {arg.split("=", 1)[0].lstrip("+~") for arg in argv if "=" in arg and not arg.startswith("-")}
    missing: dict[str, str] = {}  # option to add -> the first key that needs it
    first = None
    for index, arg in enumerate(argv):
        key = arg.split("=", 1)[0]
        group = key.split(".", 1)[0]
        if arg.startswith(("-", "+", "~")) or "." not in key or group not in empty_defaults or group in chosen:
            continue
        missing.setdefault(f"{group}={empty_defaults[group]}", key)
        first = index if first is None else first
    if first is None:
        return
    for option, key in missing.items():
        group = option.split("=", 1)[0]
        print(f"{key} is a setting of {option}, and the default {group} option has no settings.", file=sys.stderr)
    fixed = shlex.join([*argv[:first], *missing, *argv[first:]])
    print(f"Add {' and '.join(missing)}: {command} {fixed}", file=sys.stderr)
    raise SystemExit(2)


def warn_added_keys(argv: list[str], command: str, config_name: str, rejected: Sequence[str] = ()) -> None:
    """Print a warning for each ``+key=value`` of ``argv`` that adds a key the entry point's config lacks.

    Hydra's error for a misspelt key suggests appending it with ``+``, which then runs and is
    ignored. Config group choices (``+space=resnet``), ``hydra.*`` keys and keys under the
    top-level sections ``rejected`` (which the entry point stops on with an error of its own) are
    not checked. A user module (``imports``) may read keys of its own, so this warns instead of stopping.
    """
    import difflib

    added = {}
    for arg in argv:
        if not arg.startswith("+") or arg.startswith("++") or "=" not in arg:
            continue
        key = arg[1:].split("=", 1)[0]
        is_group_choice = "." not in key and (CONF_DIR / key).is_dir()
        if not is_group_choice and not key.startswith("hydra.") and key.split(".", 1)[0] not in rejected:
            added[arg] = key
    if not added:
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return
    base_overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-") and arg not in added]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            base = compose(config_name, overrides=base_overrides)
    except Exception:  # noqa: BLE001 - Hydra reports a bad command line itself when the run starts
        return
    paths = _key_paths(OmegaConf.to_container(base, resolve=False))
    for arg, key in added.items():
        parts = key.split(".")
        for depth, part in enumerate(parts):
            prefix = ".".join(parts[:depth])
            node = OmegaConf.select(base, prefix, throw_on_resolution_failure=False) if prefix else base
            if not isinstance(node, DictConfig) or part in node:
                continue
            # A misspelling sits in the first part of the key that the config lacks. Without a close
            # name there, the last part may name a setting of another section (predictor.n_subnets).
            close = difflib.get_close_matches(part, [str(name) for name in node.keys()], n=1)
            elsewhere = [path for path in paths if path.rsplit(".", 1)[-1] == parts[-1]]
            if close:
                hint = f" Did you mean {prefix + '.' if prefix else ''}{close[0]}?"
            elif elsewhere:
                hint = f" Did you mean {' or '.join(elsewhere[:2])}?"
            else:
                hint = ""
            print(f"Warning: {arg} adds {key}, which the settings of {command} do not have, so it is ignored "
                  f"unless your own code reads it.{hint}", file=sys.stderr)
            break


def _key_paths(container: Any, prefix: str = "") -> list[str]:
    """Return the dotted paths of every key in a nested dict, depth first."""
    paths = []
    if isinstance(container, dict):
        for name, value in container.items():
            path = f"{prefix}{name}"
            paths.append(path)
            paths.extend(_key_paths(value, f"{path}."))
    return paths


def module_list(modules: Any) -> list[str]:
    """Return the ``imports`` setting as a list of module names: a list as it is, one name as a list of one."""
    if modules is None:
        return []
    return [modules] if isinstance(modules, str) else [str(name) for name in modules]


def import_user_modules(modules: list[str] | str | None) -> None:
    """Import the modules in ``imports`` (a list, or one module name) so that user-defined space families register themselves."""
    for name in module_list(modules):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UsageError(f"imports: cannot import {name!r} ({err}); check the module name and PYTHONPATH.") from err
        except ValueError as err:  # register_space rejects a family name that is taken, for one
            raise UsageError(f"imports: importing {name!r} failed: {err}") from err


def default_storage(cfg: DictConfig) -> str:
    """Return ``search.storage``, or the SQLite file in the work directory when it is null."""
    storage = cfg.search.get("storage")
    if storage:
        return check_storage_url(str(storage))
    work_dir = Path(cfg.paths.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{work_dir / 'studies.db'}"


def check_storage_url(url: str) -> str:
    """Return ``url`` when it names an Optuna storage that can open, creating a SQLite or journal file's folder.

    ``journal:////ABSOLUTE/PATH.log`` names Optuna's journal file storage, for workers on a shared
    file system without a database server; any other URL is an RDB storage.

    Raises:
        UsageError: for text that is not a database URL, or a database driver that is not installed.
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url

    forms = ("sqlite:////ABSOLUTE/PATH.db, postgresql+psycopg2://USER:PASSWORD@HOST/DB or "
             "journal:////ABSOLUTE/PATH.log")
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal://"))
        if not url.startswith("journal:///") or not path.is_absolute():
            raise UsageError(f"search.storage={url!r}: a journal file needs an absolute path, as in "
                             "journal:////ABSOLUTE/PATH.log (three slashes, then the path's own).")
        _make_folder(url, path.parent)
        return url
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except sqlalchemy.exc.ArgumentError as err:
        raise UsageError(f"search.storage={url!r} is not a database URL ({err}); use {forms}.") from err
    except sqlalchemy.exc.NoSuchModuleError as err:
        raise UsageError(f"search.storage={url!r} names a database this installation cannot open ({err}); use "
                         f"{forms}.") from err
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        _make_folder(url, Path(parsed.database).expanduser().parent)
    return url


def _make_folder(url: str, folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"search.storage={url!r}: cannot create the folder {str(folder)!r} ({err}); use a "
                         "path in a folder you can write.") from err


def absolute_root(root: Any) -> str:
    """Return ``root`` as an absolute path with ``~`` expanded and ``..`` removed, as ``data.root`` is recorded."""
    return os.path.abspath(os.path.expanduser(str(root)))


def resolve_data_root(cfg: DictConfig) -> None:
    """Make ``data.root`` an absolute path in place, when it is set.

    The study records the data settings, and ``train.py`` reads the data from that record, so a
    relative root would name another folder when it runs from another working directory. The
    supernet cache key includes the root too.
    """
    root = cfg.data.get("root") if "data" in cfg else None
    if root:
        cfg.data.root = absolute_root(root)


def to_container(node: Any) -> Any:
    """Resolve a config node into plain dicts and lists."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


class StageTimer:
    """Logs the start and wall time of each named stage and keeps the times in seconds.

    A stage's wall time includes any wait for a lock that another run held (see
    :func:`nas.files.exclusive_lock`); that wait is also kept on its own, as ``waits``.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.waits: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("Stage %s: started", name)
        start = time.perf_counter()
        waited_before = lock_wait_s()
        outcome = "finished"
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            # Lightning turns Ctrl-C during fit into SystemExit.
            outcome = "interrupted"
            raise
        except BaseException:
            outcome = "failed"
            raise
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            waited = lock_wait_s() - waited_before
            if waited > 0:
                self.waits[name] = self.waits.get(name, 0.0) + waited
            log.info("Stage %s: %s after %.1f s", name, outcome, elapsed)

    def total(self) -> float:
        return time.perf_counter() - self._start

    def write(self, path: Path) -> None:
        data = {f"{k}_s": round(v, 3) for k, v in self.seconds.items()}
        data.update({f"{k}_lock_wait_s": round(v, 3) for k, v in self.waits.items()})
        data["total_s"] = round(self.total(), 3)
        write_json_atomic(path, data)


def _known_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [UsageError]
    candidates = [
        ("nas.spaces.base", "SpaceError"),
        ("nas.data", "DataError"),
        ("nas.search", "SearchError"),
        ("nas.progressive", "ProgressiveError"),
        ("nas.gates", "GateConfigError"),
        ("nas.supernet.cache", "CheckpointError"),
        ("predictors.xgb", "PredictorError"),
        ("predictors.profiler_records", "ProfilingError"),
        ("predictors.protocol", "HardwareConfigError"),
        ("predictors.store", "StoreError"),
        ("predictors.gated", "GatedLatencyError"),
    ]
    for module, name in candidates:
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


# Error numbers of a write that the file system refuses: no permission, read-only, full disk or quota.
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}

# The line run_cli prints on Ctrl-C unless the entry point gives its own text.
INTERRUPTED = ("Interrupted. What finished is kept in paths.work_dir: the profile store, cached supernets and "
               "predictors, a supernet's finished epochs and a study's finished trials, so a rerun with the same "
               "settings (and search.study_name) picks them up.")


def _fail(message: str) -> None:
    """Print ``message`` once as ``Error: ...`` on stderr, record it in the run's log files, and exit with 1.

    Hydra's console handler would print a logged error a second time, so the record goes to the
    root logger's file handlers only.
    """
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (message,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(1)


def run_cli(body: Callable[[DictConfig], Any], cfg: DictConfig,
            interrupted: str | Callable[[], str] = INTERRUPTED) -> Any:
    """Run an entry point's body; known TailNAS errors end the program with their message and exit code 1.

    So does a write that the file system refuses (permission, read-only, full disk), with the path.

    Ctrl-C ends it with exit code 130 and ``interrupted`` (or what it returns, when it is a
    function), a line on what is kept, instead of a traceback. Entry points turn Lightning's own
    exit on Ctrl-C into KeyboardInterrupt for this.
    """
    try:
        return body(cfg)
    except _known_errors() as err:
        _fail(str(err))
    except OSError as err:
        if err.errno not in UNWRITABLE:
            raise
        _fail(f"Cannot write {err.filename or 'a file'} ({err.strerror}). Set paths.work_dir (and "
              "search.storage, hydra.run.dir) to a folder you can write, on a disk with free space.")
    except KeyboardInterrupt:
        # Every store and cache in paths.work_dir is written run by run or atomically.
        log.warning("Interrupted")
        print(interrupted() if callable(interrupted) else interrupted, file=sys.stderr)
        sys.exit(130)
