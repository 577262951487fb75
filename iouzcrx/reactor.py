"""The Reactor: the io_uring rings of one event loop, driven by the loop.

Two kinds of ring, each watched with ``loop.add_reader`` (works on the stock
selector loop and on uvloop alike):

- ``ring``, set up without DEFER_TASKRUN, for accepts, buffer-ring receives
  and sends. The kernel runs a receive as soon as its socket has data and
  posts the completion itself, so the ring fd turns readable and the drain
  reaps it without a system call: a request costs the loop's wait, the
  reply and nothing else. Its eventfd carries only ``wake()``.
- ``zcrx_ring()``, made the first time a zero-copy (or copy-mode) queue is
  asked for: zero-copy receive registers only on a DEFER_TASKRUN ring, whose
  work runs when the drain enters it. Before Linux 7.3.2 polling such a
  ring's fd does not wake; its registered eventfd does, and is watched.

SQEs queued during one loop iteration are submitted together by one
``schedule()``d drain of both.

Where the kernel signals the zero-copy ring's eventfd late (Linux 7.3 defers
it to an RCU callback when a socket wake-up queues the work: milliseconds),
the transports on that ring also watch their sockets (``Ring.watches_sockets``): a
socket turning readable drains the ring at once, and the eventfd stays as the
backstop. Watching that ring's fd instead would not help: on 7.3.4 its
pollers are woken from the same callback, as late (measured: 15-25 ms under
the test VM). The other ring needs no hints: its receives complete without a
drain, and take the data before the socket could turn readable.

Lifetimes: the reactor holds its loop weakly and closes with it. Our loops
close it from ``close()``; any other loop gets ``close`` wrapped on first use;
a loop closed without either gives its rings back at the next look-up, a loop
collected unclosed when it goes. A forked child inherits the parent's rings and the epoll instance
the loop registered on, both shared with the parent: there the reactor never
enters a ring nor adds or removes a reader, it only lets its copies go.

Threads: the rings are SINGLE_ISSUER, the thread that made them is the only
one that may drain them. A reader callback that runs anywhere else (the loop
moved to another thread, or a forked child runs it) is refused by the ring
and reported here once, and the reader goes (in a child, the loop stops), so
a readable fd never calls a failing reader for ever. A ring that closes
tells the reactor first, which removes its readers while the fd numbers are
still the ring's.
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
from iouzcrx.errors import WrongThread

__all__ = ["Reactor"]

log = logging.getLogger("iouzcrx")

# Keyed by id(loop): the reactor holds its loop weakly, so an entry cannot keep
# the loop alive, and the loop's weak-reference callback removes the entry.
_reactors: dict[int, Reactor] = {}
# Closed reactors whose ring closes from a loop callback (Reactor.close).
_closing: set[Reactor] = set()


class Reactor:
    """Owns the rings of one event loop. Get it with ``Reactor.for_loop(loop)``
    from the loop's thread (the rings are SINGLE_ISSUER)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        key = id(loop)
        self._loop_ref = weakref.ref(loop, lambda _ref: _loop_collected(key, self))
        self.pid = _pid
        self.thread = threading.get_ident()
        self.ring: Ring | None = None
        self.ring_error: OSError | None = None
        self._zcrx_ring: Ring | None = None
        self.closed = False
        self._drain_scheduled = False
        # Each ring's drain count when the pending drain was scheduled; a
        # ring missing from it (or the whole of it None) is drained whatever
        # ran since (see _scheduled_drain).
        self._drains_when_scheduled: dict[Ring, int] | None = None
        # The fds given to loop.add_reader, per ring.
        self._watched: dict[Ring, list[int]] = {}
        # While a receive waits for buffers, on a free-threaded build.
        self._wake_ups = _freethreading.WakeUps(self._ring_awaits_returns)
        # Receive backends of client connections (open_connection), per mode.
        self.client_backends: dict[str, Any] = {}
        # Idle zcrx queues of closed servers, by their parameters: the kernel
        # frees an ifq only with its ring, so the loop's next server with the
        # same parameters takes one instead of registering another.
        self.idle_queues: dict[tuple[Any, ...], list[Any]] = {}
        # libuv stops a poll handle on POLLERR without calling its reader, and
        # uvloop then drops the reader: a socket the peer reset would never
        # be read again. Transports reading by readiness there also have the
        # ring poll for errors (ZcrxTransport._watch_errors).
        self.readers_miss_errors = any(
            cls.__module__.partition(".")[0] == "uvloop" for cls in type(loop).__mro__
        )
        try:
            ring = Ring(defer_taskrun=False)
        except OSError as exc:
            self.ring_error = exc  # the socket mode still works
            return
        features = kernel_features()
        if not features.io_uring:
            # Set up, but io_uring_enter is refused (seccomp): every drain
            # would fail. Nothing is in flight, so closing does not enter.
            ring.close()
            self.ring_error = features.io_uring_error
            return
        self.ring = ring
        self._adopt(ring, loop)

    def _adopt(self, ring: Ring, loop: asyncio.AbstractEventLoop) -> None:
        ring.error_handler = self._report
        ring.more_work_handler = self._drain_again
        ring.closing_handler = self._unwatch_ring
        ring.refused_reader_handler = self._reader_refused
        if _freethreading.FREE_THREADED:
            ring.awaiting_returns_handler = self._watch_deferred_frees
        # The ring's methods are the reader callbacks themselves: no Python
        # frame between the loop and the drain on the receive path.
        fds = self._watched[ring] = []
        if not ring.defer_taskrun:
            loop.add_reader(ring.fd, ring.on_ring_readable)
            fds.append(ring.fd)
        loop.add_reader(ring.eventfd, ring.on_eventfd_readable)
        fds.append(ring.eventfd)

    def zcrx_ring(self) -> Ring:
        """The loop's DEFER_TASKRUN ring, which zero-copy receive needs: made
        on the first call (OSError when it cannot be)."""
        ring = self._zcrx_ring
        if ring is None:
            if self.closed or self.inherited:
                raise RuntimeError("this iouzcrx reactor is closed: its loop is closing")
            if threading.get_ident() != self.thread:
                raise WrongThread(
                    "a zero-copy queue must be set up on its event loop's thread "
                    "(the loop's rings belong to it)"
                )
            loop = self.loop
            ring = Ring()
            try:
                self._adopt(ring, loop)
            except BaseException:
                ring.close()
                raise
            self._zcrx_ring = ring
        return ring

    def _rings(self) -> list[Ring]:
        """The open rings, the zero-copy one first."""
        return [r for r in (self._zcrx_ring, self.ring) if r is not None and not r.closed]

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
            self._drains_when_scheduled = {ring: ring.drains for ring in self._rings()}
            loop.call_soon(self._scheduled_drain)

    def handed_to_owner(self, callback: Any) -> bool:
        """For a public method that touches the rings (a close, say): True
        when called on a thread that may not, with ``callback`` (the same
        call) handed to the loop to run on the rings' thread. The method
        returns at once then, before it changed anything: half done, its
        state would claim what the ring never did.

        False, to go on here: on the rings' thread; on a thread that runs
        the loop without owning the rings (handing the call to the loop
        would only bring it back here; see _reader_refused); in a forked
        child; or once the loop is closed, with the rings."""
        if threading.get_ident() == self.thread or self.pid != _pid:
            return False
        loop = self._loop_ref()
        if loop is None or loop.is_closed() or asyncio._get_running_loop() is loop:
            return False
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:
            return False  # closed meanwhile
        return True

    def _drain_again(self) -> None:
        """A drain stopped with work left: the next one runs, whatever ran
        in between."""
        self.schedule()
        self._drains_when_scheduled = None

    def _scheduled_drain(self) -> None:
        self._drain_scheduled = False
        since = self._drains_when_scheduled or {}
        for ring in self._rings():
            self._drain_unless_idle(ring, since.get(ring))

    def _drain_unless_idle(self, ring: Ring, since: int | None) -> None:
        if ring.closed or self.closed or self.pid != _pid:
            return  # closed by the drain of the ring before it
        if since is not None and ring.drains != since and not ring.unsubmitted:
            # A drain ran since this one was scheduled (the reader's, in the
            # same loop iteration, typically) and left the ring idle, and
            # nothing was queued after it: another drain would find nothing.
            # Work the kernel posts from now on makes the watched fd
            # readable. (Anything queued, even left by a submit the kernel
            # refused for a full CQ, takes the whole drain, which reaps.)
            return
        self._drain(ring)

    def drain_now(self) -> None:
        """Submit and reap at once: a scheduled drain, and the reader callback
        of a watched socket."""
        self._drain_scheduled = False
        for ring in self._rings():
            self._drain_unless_idle(ring, None)

    def _drain(self, ring: Ring) -> None:
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
        return any(ring.awaits_returns for ring in self._rings())

    def _reader_refused(self, ring: Ring, exc: Exception) -> None:
        """A ring's reader callback ran where the ring may not be drained
        (Ring.reader_may_drain): stop it from being called again and again."""
        loop = self._loop_ref()
        if loop is None or loop.is_closed():
            return
        if self.inherited:
            self.refuse_in_child(exc)
            return
        if not isinstance(exc, WrongThread):
            self._unwatch_ring(ring)  # closed: its fds are gone
            return
        self._unwatch_rings()
        loop.call_exception_handler(
            {
                "message": "this event loop runs on another thread than the one that "
                "created its iouzcrx rings, which only that thread may use "
                "(SINGLE_ISSUER): its iouzcrx servers and connections stop here. Create "
                "them from a coroutine or callback that the loop's own thread runs",
                "exception": exc,
            }
        )

    def refuse_in_child(self, exc: Exception) -> None:
        """A reader of the parent's (a ring's, or a connection's read by
        readiness) ran in a forked child running the parent's loop: report
        it and stop the loop. That loop's epoll instance is the parent's too,
        and removing the reader would remove the parent's."""
        loop = self._loop_ref()
        if loop is not None and not loop.is_closed():
            loop.call_exception_handler(
                {
                    "message": "this event loop was made in the parent of this forked "
                    "process, and its iouzcrx rings are the parent's: create a new event "
                    "loop in the child (the loop is stopped)",
                    "exception": exc,
                }
            )
            loop.stop()

    def _report(self, exc: BaseException) -> None:
        loop = self._loop_ref()
        if loop is not None and not loop.is_closed():
            loop.call_exception_handler(
                {"message": "exception in an iouzcrx completion callback", "exception": exc}
            )

    def watch(self, fd: int, callback: Any) -> None:
        """``loop.add_reader`` for a socket of ours; nothing in a forked child,
        whose loop shares its epoll instance with the parent."""
        if not self.inherited:
            loop = self.loop
            # A reader left on the number by a socket that a program closed
            # behind its owner would keep the loop from watching this one
            # (asyncio's selector only swaps the callback of its stale key).
            loop.remove_reader(fd)
            loop.add_reader(fd, callback)

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
        """Cancel everything in flight and close the rings (views stay valid).

        Idempotent. Called while the loop runs (from a completion callback,
        say), the rings close from a callback of their own, once nothing
        walks them; a loop closed before that closes them then.
        """
        loop = self._loop_ref()
        if loop is not None and loop.is_running() and asyncio._get_running_loop() is not loop:
            # The loop's readers are the thread's that runs it to touch.
            loop.call_soon_threadsafe(self.close)
            return
        if not self.closed:
            self.closed = True
            if loop is not None and _reactors.get(id(loop)) is self:
                del _reactors[id(loop)]
            self.client_backends.clear()
            self.idle_queues.clear()
            self._unwatch_rings()
            self._wake_ups.cancel()
        if not self._rings():
            return
        if self.inherited:
            # The rings' memory and requests are the parent's: let the copies
            # go with this process, never submit a cancel for the parent's work.
            self.ring = self._zcrx_ring = None
            return
        if loop is None or not loop.is_running():
            self._close_ring()
        else:
            _closing.add(self)  # until then, the loop's close() closes it
            loop.call_soon(self._close_ring)

    def _unwatch_rings(self) -> None:
        for ring in list(self._watched):
            self._unwatch_ring(ring)

    def _unwatch_ring(self, ring: Ring) -> None:
        """Remove the loop's readers of ``ring`` (its closing_handler: the
        ring calls it before it closes the fds, whose numbers could name
        other files after)."""
        fds = self._watched.pop(ring, None)
        if not fds or self.inherited:
            return
        loop = self._loop_ref()
        if loop is None or loop.is_closed():
            return
        for fd in fds:
            try:
                loop.remove_reader(fd)
            except (RuntimeError, ValueError):
                pass  # the loop is closing

    def _close_ring(self) -> None:
        _closing.discard(self)
        if self.inherited:
            return
        error: Exception | None = None
        owner = threading.get_ident() == self.thread
        for ring in self._rings():
            try:
                if owner:
                    ring.close()
                else:
                    # The loop closes, or runs, on another thread than the one
                    # that made the rings: close() would only ask that thread
                    # to, and it never drains them again.
                    ring.close_from_any_thread()
            except Exception as exc:
                error = error or exc
        if error is not None:
            loop = self._loop_ref()
            if loop is not None and not loop.is_closed():
                raise error
            # Found closed (or collected) later: the connections' callbacks
            # cannot reach their loop any more, and nobody is left to tell.
            log.debug(
                "iouzcrx: closing the rings of a closed loop",
                exc_info=(type(error), error, error.__traceback__),
            )


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
