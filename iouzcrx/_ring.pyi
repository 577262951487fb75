from collections.abc import Callable
from typing import Any

from _typeshed import ReadableBuffer, WriteableBuffer

CQE_F_MORE: int

_Fd = int | Any  # an int or anything with fileno()

class Request:
    """Base of every operation in flight. While a request may still post
    completions the ring holds a reference to it."""

    @property
    def ring(self) -> Ring | None:
        """The ring the request was queued on."""

class RingClient: ...

class Completion(Request):
    """A request whose completions are collected, or passed to a callback.

    ``results`` holds ``(res, flags)`` for every completion the callback did
    not take; ``done`` turns true with the last one (the one without
    ``IORING_CQE_F_MORE``).
    """

    @property
    def results(self) -> list[tuple[int, int]]:
        """``(res, flags)`` of each completion so far."""
    @property
    def done(self) -> bool:
        """Whether the last completion has arrived."""
    def wait(self, timeout: float | None = None) -> int:
        """Drive the ring until the last completion arrives; return its ``res``.

        A negative ``res`` is raised as ``OSError``; ``TimeoutError`` if the
        request is still running after ``timeout`` seconds.
        """
    def cancel(self) -> None:
        """Ask the kernel to cancel this request (its last completion says
        ``-ECANCELED``). Nothing on a closed ring: closing it ended every
        request."""

class Ring:
    """An io_uring instance set up for zero-copy receive.

    One ring per thread: it belongs to the thread that created it (the
    kernel enforces ``SINGLE_ISSUER``), and so does everything on it. Set up
    with ``SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG | SUBMIT_ALL |
    CQSIZE``, plus ``CQE_MIXED`` (Linux 6.18+) or else ``CQE32``, and
    ``NO_SQARRAY`` where the kernel has it. An eventfd is registered so that
    an event loop can watch it: with ``DEFER_TASKRUN``, polling the ring fd
    itself does not wake before Linux 7.3.2.

    ``defer_taskrun=False`` leaves out ``DEFER_TASKRUN`` and
    ``TASKRUN_FLAG``: the kernel runs a receive's work as soon as the socket
    has data and posts its completion itself, so a drain needs no system
    call. Such a ring is watched through ``fd`` (``on_ring_readable()``);
    its eventfd is only written by ``wake()``. Zero-copy receive cannot be
    registered on it.

    A context manager: leaving the ``with`` block closes the ring.
    """

    fd: int
    """The ring's file descriptor."""
    eventfd: int
    """The fd an event loop watches; call ``on_eventfd_readable()`` when it
    is readable."""
    setup_flags: int
    """The ``IORING_SETUP_*`` flags the ring was set up with."""
    features: int
    """The ``IORING_FEAT_*`` flags the kernel reported."""
    sq_entries: int
    """Submission queue size."""
    cq_entries: int
    """Completion queue size."""
    cqe_mixed: bool
    """Whether the completion queue mixes 16- and 32-byte entries."""
    defer_taskrun: bool
    """Whether the ring was set up with ``DEFER_TASKRUN`` (the default)."""
    closed: bool
    """Whether the ring is closed."""
    closing: bool
    """Whether a close was requested and waits for a safe point."""
    owner_thread: int
    """The identifier of the thread that created the ring."""
    owner_pid: int
    """The process that created the ring."""
    enters: int
    """``io_uring_enter`` calls made so far."""
    drains: int
    """Drains (``drain()``, ``on_eventfd_readable()``, ...) finished so far."""
    cqes_reaped: int
    """Completions reaped so far."""
    stale_taskrun_flags: int
    """Drains that stopped trusting the kernel's ``SQ_TASKRUN`` hint after
    three enters that posted nothing."""
    error_handler: Callable[[Exception], object] | None
    """Called with an exception raised by a completion handler; without it
    the exception is re-raised by ``drain()``."""
    more_work_handler: Callable[[], object] | None
    """Called by ``on_eventfd_readable()`` when work is left after its drain
    (to schedule another drain)."""
    awaiting_returns_handler: Callable[[], object] | None
    """Called, on free-threaded builds only, when a receive starts waiting
    for buffers that views still hold: an event loop must then wake now and
    then (see ``iouzcrx._freethreading``)."""
    closing_handler: Callable[[Ring], object] | None
    """Called with the ring once, as it closes, before its fds are closed
    (an event loop removes its readers of ``fd`` and ``eventfd`` there)."""
    refused_reader_handler: Callable[[Ring, Exception], object] | None
    """Called by ``on_ring_readable()`` and ``on_eventfd_readable()`` with
    the ring and the error, in place of raising it, when they run where the
    ring may not be drained: closed, on another thread, or in a forked
    child. The handler should stop watching, or the readable fd calls again."""
    @property
    def awaits_returns(self) -> bool:
        """Whether a receive waits for buffers that views still hold."""
    def __init__(
        self, sq_entries: int = 256, cq_entries: int = 8192, *, defer_taskrun: bool = True
    ) -> None: ...
    @property
    def in_flight(self) -> int:
        """Number of requests that may still post completions."""
    @property
    def unsubmitted(self) -> int:
        """Number of queued requests the kernel has not taken yet (a submit
        it refused for a full CQ leaves them queued)."""
    @property
    def setup_flag_names(self) -> list[str]:
        """The setup flags by name."""
    def submit(self) -> int:
        """Hand every queued submission to the kernel; returns how many it took."""
    def drain(self) -> bool:
        """Submit, run the kernel's deferred work and dispatch every completion.

        Returns True if work is still pending (call again). An exception raised
        by a completion handler goes to ``error_handler(exc)`` if set (an event
        loop's exception handler, say), else is re-raised here after the
        completion queue was drained.
        """
    def on_ring_readable(self) -> bool:
        """For event loops watching ``fd`` of a ring made with
        ``defer_taskrun=False``: drain; as ``on_eventfd_readable()``, call
        ``more_work_handler()`` and return True when work is left."""
    def on_eventfd_readable(self) -> bool:
        """For event loops watching ``eventfd``: drain, then consume the wake-up.

        The wake-up is read after the drain, so that the signal the drain's
        own completions raise does not wake the loop a second time; work, or
        a wake-up from another thread, that came after the drain's last look
        gets a second drain.
        Meant to be the reader callback itself: when work is left after the
        drain, it calls ``more_work_handler()`` if set, and returns True.
        """
    watches_sockets: bool
    """Whether a blocking wait (``wait()``, ``Receiver.get()``) also watches
    the sockets of armed receives; by default where the kernel signals the
    eventfd late (``kernel_features().eventfd_prompt`` false)."""
    kernel_signals_eventfd: bool
    """Whether the kernel signals ``eventfd`` when work arrives."""
    def wait(self, timeout: float | None = None) -> bool:
        """Drain, then sleep until the kernel signals new work or ``timeout``
        seconds pass, then drain again. Returns True if woken by the kernel.
        ``timeout`` None waits for ever; NaN or negative raises ValueError."""
    def wait_for(self, predicate: Callable[[], object], timeout: float | None = None) -> None:
        """Drive the ring until ``predicate()`` is true; TimeoutError after
        ``timeout`` seconds (None: no limit; NaN or negative: ValueError)."""
    def _raise_stale_taskrun_flag(self) -> None: ...
    def _buffer_group_registered(self, group: int) -> bool: ...
    def probe_opcodes(self) -> set[int]:
        """The set of ``IORING_OP_*`` numbers this kernel supports."""
    def nop(self) -> Completion:
        """Queue a no-op; its completion has res 0."""
    def read(self, fd: _Fd, buffer: WriteableBuffer) -> Completion:
        """Queue a read into ``buffer`` (a writable buffer) from ``fd``; both
        are kept alive until the read completes."""
    def send(
        self,
        sock: _Fd,
        data: ReadableBuffer,
        *,
        callback: Callable[[int, int], object] | None = None,
        flags: int = 0,
    ) -> Completion:
        """Queue a send of ``data`` (any buffer); ``data`` and ``sock`` are
        kept alive until the send completes, so the fd it names stays open.
        ``callback(res, flags)``, if given, takes each completion."""
    def accept(
        self,
        sock: _Fd,
        *,
        multishot: bool = True,
        callback: Callable[[int, int], object] | None = None,
    ) -> Completion:
        """Queue an accept (multishot by default): each completion's res is a
        new fd. ``sock`` is kept alive until the accept's last completion."""
    def poll(
        self, sock: _Fd, events: int, *, callback: Callable[[int, int], object] | None = None
    ) -> Completion:
        """Queue a one-shot poll of ``sock`` for ``events`` (the kernel adds
        POLLERR and POLLHUP); res is the events that were ready."""
    def shutdown(self, sock: _Fd, how: int = ...) -> Completion:
        """Queue ``shutdown(2)``; ``SHUT_RD`` ends pending receives with res 0.
        ``sock`` is kept alive (its fd open) until the shutdown completes."""
    def cancel(self, target: Request) -> Completion:
        """Queue a cancel of ``target``; the target's last completion says
        ``-ECANCELED``."""
    def cancel_fd(self, sock: _Fd) -> Completion:
        """Queue a cancel of every request on ``sock`` (kept alive until the
        cancel completes)."""
    def close(self, timeout: float | None = 1.0) -> None:
        """Cancel everything in flight, wait (up to ``timeout`` seconds) for
        the cancellations to complete, then unmap the rings and close the fds.

        Close is a request that takes effect when nothing walks the rings:
        called from a completion callback it takes effect when that drain has
        dispatched its batch; called from a thread other than the owner it
        only records the request and wakes the eventfd, and the owner closes
        at its next drain. In a process forked from the owner it submits
        nothing: it only releases the child's copies of the mappings and fds.
        Closing twice is harmless.

        The kernel reclaims zcrx buffers still held by the program when the
        ring goes; memoryviews over the area stay readable.
        """
    def close_from_any_thread(self) -> None:
        """Close now, from any thread of the owner process, a ring its owner
        will never walk again (its event loop closed while not running):
        nothing is submitted, closing the fd makes the kernel cancel what is
        in flight. RuntimeError while a drain runs."""
    def __enter__(self) -> Ring: ...
    def __exit__(self, *exc_info: object) -> None: ...
