"""Ctrl-C while an entry point loads its libraries: exit status 130 and one line, not a traceback.

The entry points call :func:`exit_quietly_on_interrupt` before their imports, which take seconds
(PyTorch, Lightning), and :func:`restore_interrupt` once their body runs, where ``run_cli`` turns
KeyboardInterrupt into its own message.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

__all__ = ["exit_quietly_on_interrupt", "restore_interrupt"]


def _exit(signum: int, frame: Any) -> None:
    print("Interrupted while starting; nothing was run.", file=sys.stderr)
    raise SystemExit(130)


def exit_quietly_on_interrupt() -> None:
    """Make Ctrl-C end the process with exit status 130 and one line, until :func:`restore_interrupt`."""
    try:
        signal.signal(signal.SIGINT, _exit)
    except ValueError:
        pass  # only the main thread may set signal handlers


def restore_interrupt() -> None:
    """Give Ctrl-C back to Python's handler, which raises KeyboardInterrupt."""
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:
        pass
