import asyncio
import socket
from typing import Any

from iouzcrx._receive import AcceptedFd, ReceiveQueue
from iouzcrx.reactor import Reactor

def owned_fd(sock: socket.socket) -> AcceptedFd:
    """A socket of the library's own making held as its fd alone, as an
    accepted one is; ``sock`` is detached."""

class TransportCore:
    """What one connection of a ``ZcrxTransport`` is and does; the
    transport's public methods call it."""

    def start_accepted(self) -> None: ...
    def describe(self) -> str: ...
    def replace_on_closed(self, on_closed: Any) -> None:
        """Tell ``on_closed`` instead when the connection is lost, unless
        nobody was to be told."""

class Acceptor:
    """The completion of a listening socket's multishot accept: each
    connection is made a ``ZcrxTransport`` and started, with no Python
    frame. Made by the server."""

    listener: socket.socket
    closed: bool
    direct: bool
    failures: int

    def __init__(
        self,
        server: Any,
        listener: socket.socket,
        reactor: Reactor,
        queue: ReceiveQueue,
        factory: Any,
        connections: set[Any],
        transport_type: type[ZcrxTransport] = ...,
    ) -> None: ...
    def __call__(self, res: int, flags: int) -> None: ...

class ZcrxTransport(asyncio.Transport):
    """One TCP connection served by the ring's receive queue.

    Made by the server for each connection (in ``copy``, ``zerocopy`` and
    ``bufring`` modes), not constructed directly. ``get_extra_info`` knows
    ``"zcrx_mode"``, ``"socket"``, ``"peername"``, ``"sockname"``,
    ``"interface"``, ``"queue"`` and ``"zcrx_reading"`` (how it reads now:
    ``"multishot"``, ``"readiness"`` or None while not reading). When the
    views the program holds leave the area empty, reading pauses by itself
    and resumes as they are released.
    """

    _core: TransportCore
    def __init__(
        self,
        reactor: Reactor,
        queue: ReceiveQueue,
        sock: socket.socket | AcceptedFd,
        protocol: asyncio.BaseProtocol,
        extra: dict[str, Any] | None = None,
        waiter: asyncio.Future[None] | None = None,
        on_closed: Any = None,
        *,
        start: bool = True,
    ) -> None: ...
    def start_accepted(self) -> None:
        """Start a connection made with ``start=False`` from the completion
        of the ring's accept that made it: ``connection_made``, then reading."""
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """What asyncio's transports answer, and more (see the class
        docstring)."""
    def is_reading(self) -> bool:
        """Whether the transport receives (not paused, not closing)."""
    def pause_reading(self) -> None:
        """Stop delivering data to the protocol until ``resume_reading()``; what
        already arrived is kept for then."""
    def resume_reading(self) -> None:
        """Deliver again, starting with what arrived while paused."""
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data``: at once on the socket where it takes it, the rest through
        ring ``SEND``s. The protocol's ``pause_writing()`` is called above the
        high-water mark and ``resume_writing()`` below the low one."""
    def writelines(self, list_of_data: Any) -> None:
        """``write()`` each buffer of ``list_of_data``."""
    def can_write_eof(self) -> bool:
        """True: TCP can close its sending side alone."""
    def write_eof(self) -> None:
        """Close the sending side once the data queued so far is sent."""
    def get_write_buffer_size(self) -> int:
        """Bytes queued and not yet sent."""
    def get_write_buffer_limits(self) -> tuple[int, int]:
        """The ``(low, high)`` water marks of the write buffer."""
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Set the write buffer's water marks, as asyncio's transports do."""
    def is_closing(self) -> bool:
        """Whether the transport is closing or closed."""
    def close(self) -> None:
        """Stop reading, send what is queued, then close the socket."""
    def abort(self) -> None:
        """Close at once: queued data is dropped, and the protocol's
        ``connection_lost(None)`` follows."""
    def get_protocol(self) -> asyncio.BaseProtocol:
        """The protocol that gets the data."""
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the connection to another protocol."""
