"""The Reactor: one io_uring ring per event loop, driven by the loop.

It watches the ring's eventfd with ``loop.add_reader`` (works on the stock
selector loop and on uvloop alike): with DEFER_TASKRUN, polling the ring fd
itself does not wake before Linux 7.3.2, the eventfd does. SQEs queued during
one loop iteration are submitted together by one ``schedule()``d drain.

Where the kernel signals that eventfd late (Linux 7.3 defers it to an RCU
callback when a socket wake-up queues the work: milliseconds), the transports
and servers also watch their sockets (``socket_hints``): a socket turning
readable drains the ring at once, and the eventfd stays as the backstop.
Watching the ring fd instead would not help: on 7.3.4 its pollers are woken
from the same callback, as late (measured: 15-25 ms under the test VM).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from iouzcrx._probe import kernel_features
from iouzcrx._ring import Ring

__all__ = ["Reactor"]

_reactors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Reactor] = (
    weakref.WeakKeyDictionary()
)


class Reactor:
    """Owns the ring of one event loop. Get it with ``Reactor.for_loop(loop)``
    from the loop's thread (the ring is SINGLE_ISSUER)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ring: Ring | None = None
        self.ring_error: OSError | None = None
        self._drain_scheduled = False
        # Receive backends of client connections (open_connection), per mode.
        self.client_backends: dict[str, Any] = {}
        # Watch sockets as well as the eventfd (see the module docstring).
        self.socket_hints = False
        try:
            self.ring = Ring()
        except OSError as exc:
            self.ring_error = exc  # the socket mode still works
            return
        features = kernel_features()
        if not features.io_uring:
            # Set up, but io_uring_enter is refused (seccomp): every drain
            # would fail. Nothing is in flight, so closing does not enter.
            self.ring.close()
            self.ring, self.ring_error = None, features.io_uring_error
            return
        self.ring.error_handler = self._report
        self.ring.more_work_handler = self.schedule
        # As the ring's own blocking waits do (Ring.watches_sockets).
        self.socket_hints = self.ring.watches_sockets
        # The ring's method is the reader callback itself: no Python frame
        # between the loop and the drain on the receive path.
        loop.add_reader(self.ring.eventfd, self.ring.on_eventfd_readable)

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop | None = None) -> Reactor:
        loop = loop or asyncio.get_running_loop()
        reactor = _reactors.get(loop)
        if reactor is None or (reactor.ring is not None and reactor.ring.closed):
            reactor = _reactors[loop] = cls(loop)
        return reactor

    def schedule(self) -> None:
        """Drain (submit and reap) once before the loop next waits: called
        whenever SQEs were queued outside a drain."""
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon(self.drain_now)

    def drain_now(self) -> None:
        """Submit and reap at once: a scheduled drain, and the reader callback
        of a watched socket."""
        self._drain_scheduled = False
        if self.ring is None or self.ring.closed:
            return
        try:
            more = self.ring.drain()
        except Exception as exc:
            self._report(exc)
            more = False
        if more:
            self.schedule()  # it stopped with work left

    def _report(self, exc: BaseException) -> None:
        self.loop.call_exception_handler(
            {"message": "exception in an iouzcrx completion callback", "exception": exc}
        )

    def close(self) -> None:
        """Cancel everything in flight and close the ring (views stay valid)."""
        if self.ring is None or self.ring.closed:
            return
        try:
            self.loop.remove_reader(self.ring.eventfd)
        except (RuntimeError, ValueError):
            pass  # the loop is already closed
        self.ring.close()
        if _reactors.get(self.loop) is self:
            del _reactors[self.loop]
