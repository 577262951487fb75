"""What a free-threaded build of Python (3.13t) changes for buffer returns.

There an object is freed by the thread that made it: another thread that
lets go of its last reference only queues it for that thread, which frees
it the next time it enters Python code (biased reference counting).  The
views (and the exporters behind them) are made on the ring's owner thread,
so a view dropped on another thread goes back only when the owner next runs
Python code, and an owner asleep waiting for those very buffers would sleep
for ever.  A view *released* on another thread (``view.release()``, a
``with`` block) is not affected: its buffers go back there and then.

So while a receive waits for buffers, a free-threaded owner wakes now and
then to run Python code: Ring.wait_readable calls ``run_deferred_frees`` in
its own blocking waits; under an event loop, a ``WakeUps`` timer (of the
Reactor, and of each starved socket-mode connection).
"""

from __future__ import annotations

import asyncio
import sysconfig
from collections.abc import Callable

__all__ = ["FREE_THREADED", "WAKE_INTERVAL", "WakeUps", "run_deferred_frees"]

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

# Seconds between those wake-ups: how late, at worst, a view dropped on
# another thread goes back while a receive waits for it.
WAKE_INTERVAL = 0.01


def run_deferred_frees() -> None:
    """Nothing, in Python bytecode: entering a Python function is where the
    interpreter frees what other threads queued for this one, which compiled
    code never does."""


class WakeUps:
    """A loop timer that fires every WAKE_INTERVAL while ``waiting()`` is
    true: each firing is a Python call, which frees what other threads
    queued for the loop's thread (a view among them gives its buffers back
    and wakes what waits for them)."""

    def __init__(self, waiting: Callable[[], bool]) -> None:
        self._waiting = waiting
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fire on ``loop`` from now on; nothing if already started."""
        if self._handle is None:
            self._handle = loop.call_later(WAKE_INTERVAL, self._fire, loop)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._handle = None
        if self._waiting():
            self.start(loop)
