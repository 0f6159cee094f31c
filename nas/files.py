"""Atomic file writes, and locks that let one run build a cache while others wait for it.

Each write goes to a temporary file in the target's folder and is renamed over the target, so a
file appears whole under its final name, or not at all. The temporary file gets the mode a plain
``open`` would create (0o666 less the umask), so outputs and caches in a shared
``paths.work_dir`` stay readable to the group that shares it.

:func:`exclusive_lock` holds an advisory ``flock`` on a lock file. The kernel drops it when the
holding process ends, so a crashed run leaves no stale lock behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["HELD_LOCKS_ENV", "atomic_path", "atomic_write_text", "exclusive_lock", "write_json_atomic"]

log = logging.getLogger(__name__)

# Lock files held by this process, for the processes it starts: Lightning's DDP ranks rerun the
# entry point and must not wait for the lock that their own rank 0 holds.
HELD_LOCKS_ENV = "TAILNAS_HELD_LOCKS"
# Lock files held by this process, which another thread of it still has to wait for. _STATE
# guards this set and the environment variable, so that threads see both change together.
_HELD_HERE: set[str] = set()
_STATE = threading.Lock()
# Seconds this process has waited for locks held by other runs, over all locks.
_WAITED_S = 0.0


def _umask() -> int:
    # Linux shows the umask in /proc; elsewhere os.umask reads it only by setting it, which another
    # thread creating a file at that moment would see.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _default_mode() -> int:
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` when the block ends, or delete it if it raises.

    The temporary name ends with ``path``'s suffix, for writers that check it (``torch.export.save``).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        try:
            os.chmod(tmp, _default_mode())
        except OSError:
            pass  # file systems such as FAT fix modes at mount time; the file keeps the one it has
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str, sync: bool = False) -> None:
    """Write ``text`` to ``path`` as UTF-8; with ``sync`` the data reaches the disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())


def write_json_atomic(path: str | os.PathLike[str], document: Mapping[str, Any], sync: bool = False,
                      **dumps_options: Any) -> None:
    """Write ``document`` as JSON (``json.dumps`` options pass through) and a final newline."""
    atomic_write_text(path, json.dumps(document, **dumps_options) + "\n", sync=sync)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], purpose: str) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``path`` for the block; wait, with a log line, while another process holds it.

    Runs that share a ``paths.work_dir`` take the lock before they build a cache, and look for the
    cache again once they hold it: the first run builds, the others wait and then reuse its file.
    ``purpose`` completes the log line "Waiting for another run that is {purpose}".

    A process started inside the block inherits the lock (through the ``TAILNAS_HELD_LOCKS``
    environment variable) and does not wait for it. Where ``flock`` is missing or the file system
    refuses it, the block runs without a lock, after a warning.

    Yields:
        True when the lock is held by this process or its parent, False when the block runs without one.
    """
    lock_path = Path(path).absolute()
    with _STATE:
        inherited = str(lock_path) in _held_locks() and str(lock_path) not in _HELD_HERE
    if inherited:
        yield True  # the lock belongs to the parent process
        return
    try:
        import fcntl
    except ImportError:  # Windows has no flock
        log.warning("No file locks on this platform; runs sharing %s must not build it at once.", lock_path.parent)
        yield False
        return
    handle, lock_error = _open_lock_file(lock_path)
    if handle is not None:
        try:
            waited = _wait_for_lock(handle, lock_path, purpose, fcntl)
            _add_wait(waited)
        except OSError as err:
            lock_error = err
        except BaseException:
            handle.close()
            raise
    if lock_error is not None:
        if handle is not None:
            handle.close()
        log.warning("Cannot lock %s (%s); runs sharing this folder must not build it at once.", lock_path, lock_error)
        yield False
        return
    assert handle is not None
    with handle:
        _write_holder(handle, purpose)
        with _STATE:
            _HELD_HERE.add(str(lock_path))
            _set_held(_held_locks() | {str(lock_path)})
        try:
            yield True
        finally:
            with _STATE:
                _set_held(_held_locks() - {str(lock_path)})
                _HELD_HERE.discard(str(lock_path))
            _write_holder(handle, None)
            fcntl.flock(handle, fcntl.LOCK_UN)


# Seconds between the log lines of a run that waits for a lock.
WAIT_LOG_INTERVAL_S = 60.0


def lock_wait_s() -> float:
    """Seconds this process has waited so far for locks that other runs held."""
    with _STATE:
        return _WAITED_S


def _add_wait(seconds: float) -> None:
    global _WAITED_S
    with _STATE:
        _WAITED_S += seconds


def _wait_for_lock(handle: Any, lock_path: Path, purpose: str, fcntl: Any) -> float:
    """Take the flock on ``handle``, logging who holds it and how long this run has waited; returns the wait in seconds."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0.0
    except BlockingIOError:
        pass
    log.info("Waiting for another run that is %s (%s; lock file %s)", purpose, _holder(lock_path), lock_path)
    started = time.monotonic()
    next_log = started + WAIT_LOG_INTERVAL_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = time.monotonic() - started
            log.info("Took the lock %s after waiting %.1f s", lock_path, waited)
            return waited
        except BlockingIOError:
            if time.monotonic() >= next_log:
                log.info("Still waiting after %.0f s for the run that is %s (%s)", time.monotonic() - started,
                         purpose, _holder(lock_path))
                next_log += WAIT_LOG_INTERVAL_S
            time.sleep(0.2)


def _write_holder(handle: Any, purpose: str | None) -> None:
    """Write who holds the lock into its file for the runs that wait, or empty it (``purpose`` None).

    A lock file opened read-only stays as it is.
    """
    try:
        handle.truncate(0)
        if purpose is not None:
            handle.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}, "
                         f"{purpose}\n")
        handle.flush()
    except (OSError, ValueError):
        pass


def _holder(lock_path: Path) -> str:
    try:
        text = lock_path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return f"held by {text}" if text else "holder unknown"


def _open_lock_file(lock_path: Path) -> tuple[Any, OSError | None]:
    """Open ``lock_path`` for flock, created if missing; a file of another user is opened read-only."""
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return open(lock_path, "a"), None
    except OSError as err:
        try:
            return open(lock_path, "r"), None
        except OSError:
            return None, err


def _held_locks() -> set[str]:
    return {p for p in os.environ.get(HELD_LOCKS_ENV, "").split(os.pathsep) if p}


def _set_held(paths: set[str]) -> None:
    if paths:
        os.environ[HELD_LOCKS_ENV] = os.pathsep.join(sorted(paths))
    else:
        os.environ.pop(HELD_LOCKS_ENV, None)
