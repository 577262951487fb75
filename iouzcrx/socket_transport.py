"""socket mode: the event loop's own transport reads into area buffers.

Where io_uring is missing or blocked, the loop's socket transport does the
I/O: an ``asyncio.BufferedProtocol`` adapter lends it area buffers for
``recv_into``, and the user's protocol gets the same read-only views as in
the ring modes. Writing, flow control and closing are the loop's own.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, cast

from iouzcrx import _freethreading
from iouzcrx._checks import byte_buffer
from iouzcrx._socket_pool import SocketBufferPool
from iouzcrx.protocols import delivery_for

__all__ = [
    "SocketModeTransport",
    "AreaReadingProtocol",
    "RefusedConnection",
    "wake_starved_readers",
    "wire_wakeups",
]


class SocketModeTransport(asyncio.Transport):
    """The user's view of a socket-mode connection: the loop's transport, with
    reading also paused while the area has no free buffer."""

    def __init__(self, inner: asyncio.Transport, reader: AreaReadingProtocol) -> None:
        super().__init__(
            {
                "zcrx_mode": "socket",
                "interface": None,
                "queue": None,
                "pin_account": reader.stall,
            }
        )
        self._extra: dict[str, Any]  # set by asyncio.BaseTransport
        # Made in connection_made, on the loop: its stream reader's waits use it.
        self._loop = asyncio.get_running_loop()
        self._inner = inner
        self._reader = reader

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in self._extra:
            return self._extra[name]
        return self._inner.get_extra_info(name, default)

    def is_reading(self) -> bool:
        return not self._reader.user_paused and not self.is_closing()

    def pause_reading(self) -> None:
        self._reader.user_paused = True
        self._reader.update_reading()

    def resume_reading(self) -> None:
        self._reader.user_paused = False
        self._reader.update_reading()

    def write(self, data: Any) -> None:
        # Checked here as in the ring modes: a view of wider items is sent
        # as its bytes, which the stock transports may cut short.
        self._inner.write(byte_buffer(data))

    def writelines(self, list_of_data: Any) -> None:
        self._inner.writelines([byte_buffer(data) for data in list_of_data])

    def write_eof(self) -> None:
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._reader.protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._reader.set_user_protocol(protocol)


class StallSignal:
    """The ring modes' PinAccount as far as a reader needs it: ``stalled``
    while the connection waits for an area buffer, ``on_stall`` called when
    that starts. A reader waiting for more bytes then copies out the views
    it holds, or every buffer could stay with it and nothing arrive."""

    __slots__ = ("stalled", "on_stall")

    def __init__(self) -> None:
        self.stalled = False
        self.on_stall: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"<StallSignal{' stalled' if self.stalled else ''}>"


class AreaReadingProtocol(asyncio.BufferedProtocol):
    """Lends area buffers to the loop's transport and passes the filled views
    on to the user's protocol."""

    def __init__(
        self,
        pool: SocketBufferPool,
        protocol: asyncio.BaseProtocol,
        on_closed: Callable[[AreaReadingProtocol], None] | None = None,
    ) -> None:
        self.pool = pool
        self.protocol = protocol
        self._deliver = delivery_for(protocol)
        self._on_closed = on_closed
        self.user_paused = False
        self.starved = False
        self.stall = StallSignal()
        self._inner: asyncio.Transport | None = None
        self.transport: SocketModeTransport | None = None
        self._filling: int | None = None
        self._filling_slot: Any = None
        # While starved, on a free-threaded build: views dropped on other
        # threads go back only once this thread runs Python code, which a
        # loop asleep waiting for them would never do.
        self._wake_ups = (
            _freethreading.WakeUps(self._starved_and_open) if _freethreading.FREE_THREADED else None
        )

    def set_user_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        deliver = delivery_for(protocol)  # a protocol it refuses changes nothing
        self.protocol = protocol
        self._deliver = deliver

    def update_reading(self) -> None:
        """The loop's transport reads only while the user wants data and the
        area has a free buffer."""
        inner = self._inner
        if inner is None or inner.is_closing():
            return
        if self.user_paused or self.starved:
            inner.pause_reading()
        else:
            inner.resume_reading()

    def on_buffers_available(self) -> None:
        if self.starved and self.pool.free_buffers:
            self.starved = False
            self.stall.stalled = False
            self.pool.starved_readers.discard(self)
            self.update_reading()

    # -- asyncio.BufferedProtocol -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self._inner = cast(asyncio.Transport, transport)
        self.transport = SocketModeTransport(self._inner, self)
        self.protocol.connection_made(self.transport)

    def get_buffer(self, sizehint: int) -> Any:
        if self._filling is not None:
            # The buffer lent last time was not filled (the read found nothing
            # and the loop asks again): lend the same one, or it would leak.
            return self._filling_slot
        taken = self.pool.take()
        if taken is None:
            # Only between the last buffer going and reading being paused.
            # The pool's one spare serves every connection: the loop fills
            # it and calls buffer_updated() before it reads another socket.
            self._filling = None
            return self.pool.spare
        self._filling, self._filling_slot = taken
        return self._filling_slot

    def buffer_updated(self, nbytes: int) -> None:
        index, self._filling, self._filling_slot = self._filling, None, None
        if index is None:
            view = memoryview(memoryview(self.pool.spare)[:nbytes].tobytes())
        else:
            view = self.pool.filled(index, nbytes)
        if not self.pool.free_buffers:
            self.starved = True
            self.pool.starved_readers.add(self)
            self.update_reading()
            if self._wake_ups is not None:
                self._wake_ups.start(asyncio.get_running_loop())
            self._signal_stall()
        self._deliver(view)

    def eof_received(self) -> bool | None:
        self._put_back_unfilled()
        return self.protocol.eof_received()  # type: ignore[attr-defined, no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self._put_back_unfilled()
        self.pool.starved_readers.discard(self)
        if self._wake_ups is not None:
            self._wake_ups.cancel()
        try:
            self.protocol.connection_lost(exc)
        finally:
            if self._on_closed is not None:
                self._on_closed(self)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def _signal_stall(self) -> None:
        self.stall.stalled = True
        on_stall = self.stall.on_stall
        if on_stall is not None:
            on_stall()

    def _starved_and_open(self) -> bool:
        inner = self._inner
        return self.starved and inner is not None and not inner.is_closing()

    def _put_back_unfilled(self) -> None:
        if self._filling is not None:
            self.pool.put_back(self._filling)
            self._filling = self._filling_slot = None


def wake_starved_readers(pool: SocketBufferPool) -> None:
    """Resume the connections of ``pool`` that paused for want of a buffer."""
    for reader in list(pool.starved_readers):
        reader.on_buffers_available()


def wire_wakeups(pool: SocketBufferPool, loop: asyncio.AbstractEventLoop) -> None:
    """Have a buffer coming back to the empty ``pool`` resume its starved
    connections on ``loop`` (a view may be released on any thread)."""
    if pool.on_available is None:
        pool.on_available = functools.partial(loop.call_soon_threadsafe, wake_starved_readers, pool)


class RefusedConnection(asyncio.Protocol):
    """Stands in for a protocol that could not be made: the loop's accept
    path would otherwise leave the accepted socket to the GC. It closes the
    connection as soon as the loop has made its transport."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass
