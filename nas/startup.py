"""Ctrl-C handling of the entry points: quiet exits while starting, and a first Ctrl-C that is held.

The entry points call :func:`exit_quietly_on_interrupt` before their imports, which take seconds
(PyTorch, Lightning), and :func:`restore_interrupt` once their body runs, where ``run_cli`` turns
KeyboardInterrupt into its own message. :class:`FirstInterruptHeld` lets work finish after a first
Ctrl-C (the search's running trial, the save of a fine-tuned network) while a second one stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

__all__ = ["FirstInterruptHeld", "exit_quietly_on_interrupt", "restore_interrupt"]

# The saved handler of a FirstInterruptHeld that has not installed its own; None is a valid handler.
_NOT_SAVED = object()


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


class FirstInterruptHeld:
    """A SIGINT handler that notes a first Ctrl-C and raises KeyboardInterrupt on the second.

    :meth:`install` puts the handler in place (again, after a library has replaced it) and
    :meth:`restore` puts back the handler that was there before the first install. Both do
    nothing outside the main thread, where signals cannot be handled. Subclasses define what a
    first Ctrl-C does in :meth:`on_first_interrupt`.
    """

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = _NOT_SAVED

    @property
    def installed(self) -> bool:
        """Whether the handler was installed and not yet restored."""
        return self._previous is not _NOT_SAVED

    def install(self) -> None:
        """Install the handler, or install it again after a library has replaced it."""
        if threading.current_thread() is not threading.main_thread():
            return
        if not self.installed:
            self._previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        """Put back the handler that was in place before the first install."""
        if self.installed:
            # A handler that was not installed from Python reads as None and cannot be put back.
            signal.signal(signal.SIGINT, signal.default_int_handler if self._previous is None else self._previous)
            self._previous = _NOT_SAVED

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        self.on_first_interrupt()

    def on_first_interrupt(self) -> None:
        """React to the first Ctrl-C. The default only notes it in ``pressed``."""
