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
then to run ``run_deferred_frees``: Ring.wait_readable in its own blocking
waits, a timer of the Reactor under an event loop.
"""

from __future__ import annotations

import sysconfig

__all__ = ["FREE_THREADED", "WAKE_INTERVAL", "run_deferred_frees"]

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

# Seconds between those wake-ups: how late, at worst, a view dropped on
# another thread goes back while a receive waits for it.
WAKE_INTERVAL = 0.01


def run_deferred_frees() -> None:
    """Nothing, in Python bytecode: entering a Python function is where the
    interpreter frees what other threads queued for this one, which compiled
    code never does."""
