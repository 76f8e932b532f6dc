"""SIGINT and SIGTERM for commands that run rows: the first asks for a clean stop at the
next safe point, the second ends the process at once.

A handler that raised at any bytecode could cut a Redis pipeline or a staged upload in
half; so the handler only notes the signal, and the command's loops (reading the
manifest, waiting for the batch) call ``check()`` between rows and polls, where stopping
leaves nothing half done.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


class Interrupts:
    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            # The second one: the user means it. No cleanup, no traceback; the embedded
            # redis-server follows (its parent-death signal), rows go back on resume.
            os.write(2, b"interrupted again: exiting now\n")
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, b"\nstopping: handing rows back (Ctrl-C again to exit at once)\n")

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextmanager
def interrupts() -> Iterator[Interrupts]:
    """Install the handlers for the block (the main thread only: Python's rule)."""
    state = Interrupts()
    previous = {s: signal.signal(s, state._handle) for s in SIGNALS}
    try:
        yield state
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
