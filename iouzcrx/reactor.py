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

Lifetimes: the reactor holds its loop weakly and closes with it. Our loops
close it from ``close()``; any other loop gets ``close`` wrapped on first use;
a loop closed without either gives its ring back at the next look-up, a loop
collected unclosed when it goes. A forked child inherits the parent's ring and the epoll instance
the loop registered on, both shared with the parent: there the reactor never
enters the ring nor adds or removes a reader, it only lets its copies go.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from typing import Any

from iouzcrx import _freethreading
from iouzcrx._probe import kernel_features
from iouzcrx._ring import Ring

__all__ = ["Reactor"]

log = logging.getLogger("iouzcrx")

# Keyed by id(loop): the reactor holds its loop weakly, so an entry cannot keep
# the loop alive, and the loop's weak-reference callback removes the entry.
_reactors: dict[int, Reactor] = {}
# Closed reactors whose ring closes from a loop callback (Reactor.close).
_closing: set[Reactor] = set()


class Reactor:
    """Owns the ring of one event loop. Get it with ``Reactor.for_loop(loop)``
    from the loop's thread (the ring is SINGLE_ISSUER)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        key = id(loop)
        self._loop_ref = weakref.ref(loop, lambda _ref: _loop_collected(key, self))
        self.pid = _pid
        self.thread = threading.get_ident()
        self.ring: Ring | None = None
        self.ring_error: OSError | None = None
        self.closed = False
        self._drain_scheduled = False
        # The ring's enter count when the pending drain was scheduled; None
        # when that drain must run whatever ran since (see _scheduled_drain).
        self._enters_when_scheduled: int | None = None
        self._watching_eventfd = False
        # While a receive waits for buffers, on a free-threaded build.
        self._wake_ups = _freethreading.WakeUps(self._ring_awaits_returns)
        # Receive backends of client connections (open_connection), per mode.
        self.client_backends: dict[str, Any] = {}
        # Idle zcrx queues of closed servers, by their parameters: the kernel
        # frees an ifq only with its ring, so the loop's next server with the
        # same parameters takes one instead of registering another.
        self.idle_queues: dict[tuple[Any, ...], list[Any]] = {}
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
        self.ring.more_work_handler = self._drain_again
        if _freethreading.FREE_THREADED:
            self.ring.awaiting_returns_handler = self._watch_deferred_frees
        # As the ring's own blocking waits do (Ring.watches_sockets).
        self.socket_hints = self.ring.watches_sockets
        # The ring's method is the reader callback itself: no Python frame
        # between the loop and the drain on the receive path.
        loop.add_reader(self.ring.eventfd, self.ring.on_eventfd_readable)
        self._watching_eventfd = True

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop | None = None) -> Reactor:
        loop = loop or asyncio.get_running_loop()
        _close_reactors_of_closed_loops()
        reactor = _reactors.get(id(loop))
        if reactor is None or reactor.closed or reactor.inherited:
            if loop.is_closed():
                raise RuntimeError("Event loop is closed")
            if _inherited(loop):
                raise RuntimeError(
                    f"{loop!r} was created by the parent of this forked process and "
                    "shares its epoll instance with it: create a new event loop here"
                )
            reactor = _reactors[id(loop)] = cls(loop)
            _close_with(loop)
        return reactor

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop_ref()
        if loop is None:
            raise RuntimeError("the event loop of this iouzcrx reactor was collected")
        return loop

    @property
    def inherited(self) -> bool:
        """True in a forked child: the ring and the loop's epoll instance are
        the parent's, shared, and not ours to touch."""
        return _pid != self.pid

    def schedule(self) -> None:
        """Drain (submit and reap) once before the loop next waits: called
        whenever SQEs were queued outside a drain."""
        # ``inherited`` spelled out: this runs for every operation queued.
        if not self._drain_scheduled and not self.closed and self.pid == _pid:
            loop = self._loop_ref()  # the ``loop`` property, without its frame
            if loop is None:
                raise RuntimeError("the event loop of this iouzcrx reactor was collected")
            self._drain_scheduled = True
            self._enters_when_scheduled = None if self.ring is None else self.ring.enters
            loop.call_soon(self._scheduled_drain)

    def _drain_again(self) -> None:
        """A drain stopped with work left: the next one runs, whatever ran
        in between."""
        self.schedule()
        self._enters_when_scheduled = None

    def _scheduled_drain(self) -> None:
        ring = self.ring
        since = self._enters_when_scheduled
        if (
            since is not None
            and ring is not None
            and not ring.closed
            and ring.enters != since
            and not self.closed
            and self.pid == _pid
            and ring.submit() == 0
        ):
            # A drain ran since this one was scheduled (the eventfd's, in the
            # same loop iteration, typically) and left the ring idle, and
            # nothing was queued after it (submit() then makes no system
            # call): another enter would find nothing. Work the kernel
            # queues from now on signals the eventfd.
            self._drain_scheduled = False
            return
        self.drain_now()

    def drain_now(self) -> None:
        """Submit and reap at once: a scheduled drain, and the reader callback
        of a watched socket."""
        self._drain_scheduled = False
        ring = self.ring
        if ring is None or ring.closed or self.closed or self.pid != _pid:
            return
        try:
            more = ring.drain()
        except Exception as exc:
            self._report(exc)
            more = False
        if more:
            self._drain_again()

    def _watch_deferred_frees(self) -> None:
        """A receive waits for buffers (free-threaded builds only): wake the
        loop now and then until it stops waiting (iouzcrx._freethreading)."""
        if not self.closed and self.pid == _pid:
            loop = self._loop_ref()
            if loop is not None and not loop.is_closed():
                self._wake_ups.start(loop)

    def _ring_awaits_returns(self) -> bool:
        ring = self.ring
        return ring is not None and not ring.closed and ring.awaits_returns

    def _report(self, exc: BaseException) -> None:
        loop = self._loop_ref()
        if loop is not None and not loop.is_closed():
            loop.call_exception_handler(
                {"message": "exception in an iouzcrx completion callback", "exception": exc}
            )

    def watch(self, fd: int, callback: Any) -> None:
        """``loop.add_reader`` for a socket hint; nothing in a forked child,
        whose loop shares its epoll instance with the parent."""
        if not self.inherited:
            self.loop.add_reader(fd, callback)

    def unwatch(self, fd: int) -> None:
        """``loop.remove_reader`` for a socket hint; nothing in a forked child
        (it would delete the parent's registration)."""
        if self.inherited:
            return
        loop = self._loop_ref()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(fd)

    def park_idle_queue(self, key: tuple[Any, ...] | None, selection: Any) -> None:
        """Keep the zcrx queue of a closed server (``selection``) for the next
        server of this loop asking for the same parameters (``key``)."""
        if key is not None and not self.closed and not self.inherited:
            self.idle_queues.setdefault(key, []).append(selection)  # hashed by take_idle_queue

    def take_idle_queue(self, key: tuple[Any, ...]) -> Any:
        """A parked selection for ``key``, or None."""
        try:
            parked = self.idle_queues.get(key)
        except TypeError:  # an unhashable option: select_mode names it
            return None
        if not parked:
            return None
        selection = parked.pop()
        if not parked:
            del self.idle_queues[key]
        return selection

    def close(self) -> None:
        """Cancel everything in flight and close the ring (views stay valid).

        Idempotent. Called while the loop runs (from a completion callback,
        say), the ring closes from a callback of its own, once nothing walks
        it; a loop closed before that closes it then.
        """
        loop = self._loop_ref()
        if loop is not None and loop.is_running() and threading.get_ident() != self.thread:
            # The loop's readers and the ring are its thread's to touch.
            loop.call_soon_threadsafe(self.close)
            return
        if not self.closed:
            self.closed = True
            if loop is not None and _reactors.get(id(loop)) is self:
                del _reactors[id(loop)]
            self.client_backends.clear()
            self.idle_queues.clear()
            self._unwatch_eventfd()
            self._wake_ups.cancel()
        ring = self.ring
        if ring is None or ring.closed:
            return
        if self.inherited:
            # The ring's memory and requests are the parent's: let the copies
            # go with this process, never submit a cancel for the parent's work.
            self.ring = None
            return
        if loop is None or not loop.is_running():
            self._close_ring()
        else:
            _closing.add(self)  # until then, the loop's close() closes it
            loop.call_soon(self._close_ring)

    def _unwatch_eventfd(self) -> None:
        if not self._watching_eventfd or self.ring is None:
            return
        self._watching_eventfd = False
        if self.inherited:
            return
        loop = self._loop_ref()
        if loop is None or loop.is_closed():
            return
        try:
            loop.remove_reader(self.ring.eventfd)
        except (RuntimeError, ValueError):
            pass  # the loop is closing

    def _close_ring(self) -> None:
        _closing.discard(self)
        ring = self.ring
        if ring is None or ring.closed or self.inherited:
            return
        try:
            ring.close()
        except Exception:
            loop = self._loop_ref()
            if loop is not None and not loop.is_closed():
                raise
            # Found closed (or collected) later: the connections' callbacks
            # cannot reach their loop any more, and nobody is left to tell.
            log.debug("iouzcrx: closing the ring of a closed loop", exc_info=True)


def _loop_collected(key: int, reactor: Reactor) -> None:
    # The loop is gone without closing its reactor (a stock loop collected
    # unclosed, or its close not wrapped): give the ring back now.
    if _reactors.get(key) is reactor:
        del _reactors[key]
    reactor.close()


def _close_reactors_of_closed_loops() -> None:
    for reactor in [*_reactors.values(), *_closing]:
        loop = reactor._loop_ref()
        if loop is None or loop.is_closed() or reactor.inherited:
            reactor.close()


def _close_with(loop: asyncio.AbstractEventLoop) -> None:
    """Make ``loop.close()`` close the loop's reactor first (while the loop can
    still remove the eventfd reader). iouzcrx's loops do it themselves."""
    if getattr(type(loop), "closes_zcrx_reactor", False):
        return
    if "close" in getattr(loop, "__dict__", {}):
        return  # wrapped already (or by its user): the sweep and the weak reference remain
    loop_ref = weakref.ref(loop)  # the wrapper must not keep the loop alive
    close_loop = type(loop).close

    def close() -> None:
        loop = loop_ref()
        if loop is not None:
            # A refused close changes nothing: the reactor of a running loop stays.
            if loop.is_running():
                raise RuntimeError("Cannot close a running event loop")
            close_loop_reactor(loop)
            close_loop(loop)

    try:
        loop.close = close  # type: ignore[method-assign]
    except (AttributeError, TypeError):
        pass  # no instance attributes: the look-up sweep and the weak reference remain


def close_loop_reactor(loop: asyncio.AbstractEventLoop) -> None:
    """Close the reactor of ``loop``, if it has one (from ``loop.close()``)."""
    reactor = _reactors.get(id(loop))
    if reactor is not None and reactor._loop_ref() is loop:
        reactor.close()
    for reactor in list(_closing):
        if reactor._loop_ref() is loop:
            reactor._close_ring()


# Loops that had a reactor when this process was forked from their own.
_inherited_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _inherited(loop: asyncio.AbstractEventLoop) -> bool:
    pid = getattr(loop, "_zcrx_pid", None)  # set by iouzcrx's loops
    return (pid is not None and pid != os.getpid()) or loop in _inherited_loops


# This process's pid, refreshed in a forked child: ``inherited`` is asked on
# every drain, and os.getpid() is a system call.
_pid = os.getpid()


def _forget_parent_reactors() -> None:
    global _pid
    _pid = os.getpid()
    # In a forked child: the parent's reactors must never be handed out here
    # (for_loop makes new ones only for loops the child creates); they stay
    # reachable from the transports that hold them, which see ``inherited``.
    for reactor in _reactors.values():
        loop = reactor._loop_ref()
        if loop is not None:
            _inherited_loops.add(loop)
    _reactors.clear()
    _closing.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_reactors)
