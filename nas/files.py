"""Atomic file writes: a file appears whole under its final name, or not at all.

Each write goes to a temporary file in the target's folder and is renamed over the target. The
temporary file gets the mode a plain ``open`` would create (0o666 less the umask), so outputs and
caches in a shared ``paths.work_dir`` stay readable to the group that shares it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write_text", "write_json_atomic"]


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
