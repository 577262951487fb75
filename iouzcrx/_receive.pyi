import socket
from collections.abc import Callable, Iterator
from typing import Any

from iouzcrx._area import BufferOwner, PinAccount
from iouzcrx._ring import Request, Ring

class ReceiveQueue(BufferOwner):
    """What the receive backends (``ZcrxQueue``, ``BufRingQueue``) share: the
    area, the buffer returns waiting to be published to the kernel, and the
    statistics."""

    ring: Ring
    """The ring the queue receives on."""
    refills: int
    """Batches of returned buffers published to the kernel."""
    rearms: int
    """Multishot receives started again after the kernel ended one."""
    starvations: int
    """Receives the kernel ended for want of free buffers."""
    rearms_held: int
    """Starved receives kept waiting although buffers looked free, because
    none had reached the kernel since they were last started (each would
    have ended again at once)."""
    return_epoch: int
    """Advances each time returned buffers reach the kernel."""
    closed: bool
    """Whether ``close()`` was called."""
    def add_close_listener(self, listener: Callable[[], object]) -> None:
        """Call ``listener()`` once when the queue closes (``close()`` or its
        ring closing); ValueError if it is closed already."""
    def remove_close_listener(self, listener: Callable[[], object]) -> None:
        """Forget ``listener``; nothing if it was not added."""
    @property
    def buffers_pending_return(self) -> int:
        """Buffers released by the program but not yet handed to the kernel."""
    def recv_multishot(
        self,
        sock: Any,
        *,
        on_data: Callable[[memoryview], object] | None = None,
        on_end: Callable[[BaseException | None], object] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
        account: PinAccount | None = None,
    ) -> Receiver:
        """Start a multishot receive on the connected TCP socket ``sock``.

        Returns a ``Receiver``: iterate it for memoryviews (blocking, on the
        ring's thread), or pass ``on_data(view)`` / ``on_end(exc_or_None)``
        callbacks that the ring calls while it drains. An exception raised by
        ``on_data`` goes to ``on_error(exc)`` if given (KeyboardInterrupt and
        SystemExit excepted), else to the ring's error handling.

        With ``account`` (see ``pin_account``) the receive stops while the
        views it counts pin their share of the area, and starts again once
        enough of them are gone.
        """
    def pin_account(self) -> PinAccount:
        """A new ``PinAccount`` for one connection: its receives may pin a
        quarter of this queue's buffers (at least 2, at most all of them)."""
    def stats(self) -> dict[str, Any]:
        """Counters since creation, as a dict: ``mode``, ``bytes``, ``chunks``
        (kernel completions), ``deliveries`` (views handed out),
        ``total_buffers``, ``buffers_in_use``, ``buffers_returned``,
        ``buffers_pending_return``, ``refills``, ``rearms``, ``starvations``
        and ``rearms_held``, plus what the backend adds."""
    def close(self) -> None:
        """Stop using this queue: cancel its receives (they end with no error,
        keeping the views they queued), detach it from the ring and give its
        kernel registration back once nothing is armed on it.

        The area stays mapped until the last view over it is released. Only
        the ring's owner thread may close a queue (``WrongThread`` otherwise,
        and the queue is left as it was); closing twice is harmless. A queue
        that is dropped without ``close()`` is released when it is collected.
        In a process forked from the owner it only marks this copy closed, as
        ``Ring.close`` does there: the parent's receives go on. An exception
        from an ``on_end`` it calls is raised once every receive is cancelled.
        """

class Receiver(Request):
    """A multishot receive on one socket, from ``ReceiveQueue.recv_multishot``.

    Iterating it yields the received views until EOF and raises the receive's
    error; with callbacks, views go to ``on_data`` (whose exceptions go to
    ``on_error``). The end (EOF, error, cancel) is reported once.
    """

    queue: ReceiveQueue
    """The queue whose area the views are over."""
    sock: Any
    """The socket, kept open until the receive's last completion."""
    fd: int
    """The socket's file descriptor."""
    on_data: Callable[[memoryview], object] | None
    """Called with each view, instead of queueing it. Setting it (None
    included: queue them) switches the delivery back to ``"views"``."""
    on_end: Callable[[BaseException | None], object] | None
    """Called once at the end, with the error or None."""
    on_error: Callable[[BaseException], object] | None
    """Called with an exception raised by ``on_data``."""
    armed: bool
    """Whether a multishot receive is in the kernel now."""
    starved: bool
    """Whether the receive waits for the area to have a free buffer."""
    throttled: bool
    """Whether the receive waits for its connection's views to pin less."""
    account: PinAccount | None
    """The connection's pin account, if any."""
    finished: bool
    """Whether the end was reported."""
    eof: bool
    """Whether the peer closed its side."""
    cancelling: bool
    """Whether a cancel is in flight."""
    discarding: bool
    """Whether views are dropped on arrival (after ``close()``)."""
    error: BaseException | None
    """The error that ended the receive, if any."""
    bytes_received: int
    """Bytes received on this socket."""
    chunks_received: int
    """Kernel completions that carried data for this socket."""
    deliveries: int
    """Times received data was handed on (a run of completions is one)."""
    rearms: int
    """Times the multishot receive was started again."""
    @property
    def delivery(self) -> str:
        """How received data leaves: ``"views"`` (to ``on_data``, or queued for
        ``get()``), ``"bytes"`` or ``"buffered"`` (``set_protocol_delivery``)."""
    def set_protocol_delivery(
        self, protocol: Any, methods: tuple[str, Any, Any] | None = None
    ) -> str:
        """Deliver straight to ``protocol``'s own methods, looked up now and
        chosen as ``iouzcrx.protocols.delivery_methods`` chooses:
        ``view_received(view)`` gets the views (as ``on_data`` would);
        else ``get_buffer(n)`` with ``buffer_updated(n)`` gets the data copied
        from the area into the memory ``get_buffer`` returns (writable, else
        TypeError; empty: RuntimeError), as many times as the data needs;
        else ``data_received(data)`` gets it as ``bytes``. A chunk, or a run
        of adjacent chunks, is copied in one go and its buffers go back at
        once: copies pin nothing and never throttle the receive. Exceptions
        from these methods go to ``on_error``. After each call the delivery
        is looked at again, so a callback that switches it (this method, or
        setting ``on_data``) or closes the receiver sends the rest of a run
        where that says. TypeError, with nothing changed, if ``protocol``
        has none of these methods. Returns the kind chosen, as
        ``delivery`` names it."""
    def __iter__(self) -> Iterator[memoryview]: ...
    def __next__(self) -> memoryview: ...
    def get(self, timeout: float | None = None) -> memoryview | None:
        """The next received view; None at EOF or after cancel. Raises the
        receive's error, or TimeoutError after ``timeout`` seconds (None: no
        limit; NaN or negative: ValueError)."""
    @property
    def queued(self) -> int:
        """Views received but not yet taken with ``get()`` or iteration."""
    def cancel(self) -> None:
        """Stop receiving: the multishot is cancelled, queued views stay.
        Owner thread only: from another thread it raises ``WrongThread`` and
        changes nothing."""
    def close(self) -> None:
        """Cancel, and drop the views not yet taken and any that arrive before
        the cancel completes (their buffers go back). Owner thread only: from
        another thread it raises ``WrongThread`` and changes nothing. In a
        process forked from the owner it drops only this copy's queued views
        (the receive is the parent's)."""

def delivery_methods(
    protocol: Any,
) -> tuple[str, Callable[..., Any], Callable[..., Any] | None]: ...
def socket_addresses(fd: int) -> tuple[int, bytes | None, bytes | None]:
    """``(family, local, peer)``: the address family of the socket ``fd``
    (-1 if the kernel will not say) and its local and peer addresses as the
    kernel gives them (``struct sockaddr`` bytes), each None where it
    refuses."""

class AcceptedFd:
    """A connection the server's ring accepted, held as its fd alone;
    ``socket()`` makes its ``socket.socket`` on demand, which then owns the
    fd (every method here acts through it; ``send`` asks it for its fd at
    each call and never waits, whatever its timeout)."""

    family: int
    kind: int
    proto: int
    def __init__(self, family: int, kind: int, proto: int, fd: int) -> None: ...
    def fileno(self) -> int: ...
    def socket(self) -> socket.socket: ...
    def close(self) -> None: ...
    def send(self, data: bytes | bytearray | memoryview) -> int: ...
    def shutdown(self, how: int) -> None: ...
    def setsockopt(self, level: int, name: int, value: int) -> None: ...
