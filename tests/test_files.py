import json
import os
import stat

import pytest

from nas.files import atomic_path, atomic_write_text, write_json_atomic


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
