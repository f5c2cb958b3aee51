"""Clean stops for the long-running commands (``demo``, ``broker``) and their children.

Python turns SIGINT into ``KeyboardInterrupt`` but lets SIGTERM kill the process
on the spot, without ``finally`` blocks: the children it started (the Tansu
broker runs in its own session, so it never sees the signal) were left running.
:func:`stop_on_signals` makes both signals set an event the command waits on,
and :func:`die_with_parent` makes a child follow its parent even on SIGKILL.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """Within the block, SIGINT and SIGTERM set ``stop``; yields the signals received.

    Must be entered from the main thread (Python delivers signals there).
    """
    received: list[int] = []

    def handler(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when its parent dies.

    Covers the case no handler can: the parent killed with SIGKILL. Linux
    sends it when the *thread* that started the child exits, so start such
    children from the main thread. None elsewhere (no such facility).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec
