"""Ctrl-C for long commands: the first one asks the work to stop after its current step, the second stops
at once.

The second interrupt leaves through ``os._exit`` after flushing the standard streams: unwinding the
interpreter while PyTorch worker threads are inside a kernel can end in a C++ ``std::terminate``
(exit 134, "terminate called without an active exception").  Everything a command wants to keep must
therefore already be on disk when the second interrupt comes; the commands write their results as they go.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import NoReturn

from .common import err_console

__all__ = ["EXIT_INTERRUPTED", "exit_interrupted", "graceful_interrupt"]

EXIT_INTERRUPTED = 130
"""128 + SIGINT: what a shell reports for a command stopped by Ctrl-C."""


def exit_interrupted() -> NoReturn:
    """Flush the standard streams and leave with status 130 now, skipping the interpreter's teardown
    (where a further Ctrl-C, or torch's threads, could still turn the exit into a signal or an abort)."""
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()
    os._exit(EXIT_INTERRUPTED)


@contextmanager
def graceful_interrupt(what: str = "the current round") -> Iterator[threading.Event]:
    """Within the block, SIGINT (and SIGTERM) set the yielded event and print one line; a second one
    prints a line and exits the process with status 130 at once.  After the block the previous handlers
    apply again, unless an interrupt came: then every further one exits at once.  Outside the main
    thread nothing is installed."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            err_console.print(
                f"[yellow]interrupted[/]: stopping after {what}; finished rounds are kept (Ctrl-C again to stop at once)"
            )
            return
        err_console.print("[yellow]interrupted again[/]: stopping now; results written so far are kept")
        exit_interrupted()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        if not stop.is_set():
            for sig, old in previous.items():
                signal.signal(sig, old)
        # Once interrupted, the handler stays: a later Ctrl-C (while the command writes its results or the
        # interpreter shuts down) exits at once, rather than raising KeyboardInterrupt into the teardown.
