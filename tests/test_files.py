import json
import os
import stat
from pathlib import Path

import pytest

from nas.files import HELD_LOCKS_ENV, atomic_path, atomic_write_text, exclusive_lock, write_json_atomic
from tests.conftest import run_in_threads


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_atomic_write_follows_umask(tmp_path, umask_027):
    target = tmp_path / "out" / "manifest.json"
    write_json_atomic(target, {"a": 1}, sync=True, indent=2)
    assert json.loads(target.read_text()) == {"a": 1}
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # what open() creates under this umask, not 0o600


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "pareto.csv"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.csv"]


def test_temporary_name_keeps_suffix(tmp_path):
    with atomic_path(tmp_path / "subnet.pt2") as tmp:
        assert tmp.suffix == ".pt2"
        assert tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "subnet.pt2").read_bytes() == b"x"


def _hold_lock(path):
    import fcntl

    handle = open(path, "a")
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX only")
def test_exclusive_lock_waits_for_holder(tmp_path, caplog):
    import threading

    lock = tmp_path / "cache.lock"
    holder = _hold_lock(lock)
    entered = threading.Event()

    def worker():
        with exclusive_lock(lock, "building the cache") as locked:
            assert locked
            entered.set()

    thread = threading.Thread(target=worker)
    with caplog.at_level("INFO", logger="nas.files"):
        thread.start()
        assert not entered.wait(0.5)
        holder.close()  # closing the file drops the lock
        thread.join(10)
    assert entered.is_set()
    assert "Waiting for another run that is building the cache" in caplog.text
    assert HELD_LOCKS_ENV not in os.environ


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX only")
def test_stage_timer_lock_wait(tmp_path):
    import json
    import threading

    from nas.cli import StageTimer

    lock = tmp_path / "cache.lock"
    holder = _hold_lock(lock)
    threading.Timer(0.6, holder.close).start()
    timer = StageTimer()
    with timer.stage("profile"), exclusive_lock(lock, "building the cache"):
        pass
    with timer.stage("search"), exclusive_lock(lock, "building the cache"):
        pass  # free now: no wait
    timer.write(tmp_path / "timings.json")
    timings = json.loads((tmp_path / "timings.json").read_text())
    # The wait's length depends on the scheduler; only that there was one, within the stage, is certain.
    assert 0 < timings["profile_lock_wait_s"] <= timings["profile_s"]
    assert "search_lock_wait_s" not in timings


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX only")
def test_exclusive_lock_threads_and_children(tmp_path):
    import subprocess
    import sys
    import threading

    lock = tmp_path / "cache.lock"
    inside = []
    overlaps = []

    def worker():
        with exclusive_lock(lock, "building the cache"):
            if inside:
                overlaps.append(True)
            inside.append(True)
            threading.Event().wait(0.2)
            inside.pop()

    assert not run_in_threads(worker, 3, timeout_s=10)
    assert not overlaps

    # A process started while the lock is held (a DDP rank, say) does not wait for it.
    child = ("import sys; from nas.files import exclusive_lock\n"
             "with exclusive_lock(sys.argv[1], 'x') as locked: print(locked)")
    root = str(Path(__file__).resolve().parent.parent)
    with exclusive_lock(lock, "building the cache"):
        assert str(lock) in os.environ[HELD_LOCKS_ENV]
        done = subprocess.run([sys.executable, "-c", child, str(lock)], capture_output=True, text=True, timeout=60,
                              cwd=root)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert HELD_LOCKS_ENV not in os.environ


def test_exclusive_lock_unopenable_runs_unlocked(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with caplog.at_level("WARNING", logger="nas.files"):
        with exclusive_lock(blocker / "cache.lock", "building the cache") as locked:
            assert locked is False
    assert "Cannot lock" in caplog.text
    assert HELD_LOCKS_ENV not in os.environ


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX only")
def test_waiting_run_names_holder_and_logs_again(tmp_path, caplog, monkeypatch):
    import threading

    import nas.files

    monkeypatch.setattr(nas.files, "WAIT_LOG_INTERVAL_S", 0.3)
    lock = tmp_path / "cache.lock"
    holding = threading.Event()
    release = threading.Event()

    def holder():
        with exclusive_lock(lock, "building the cache"):
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert holding.wait(10)
    timer = threading.Timer(1.0, release.set)
    timer.start()
    with caplog.at_level("INFO", logger="nas.files"):
        with exclusive_lock(lock, "building the cache") as locked:
            assert locked
    thread.join(10)
    assert f"building the cache (held by process {os.getpid()} on " in caplog.text
    assert "Still waiting after" in caplog.text
    assert lock.read_text() == ""  # emptied when the last holder left
