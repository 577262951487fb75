"""Streams over zero-copy receive: ``start_server`` and ``open_connection``.

The reader hands out what arrived without copying where it can:
``async for view in reader`` yields the area views themselves, and
``read(n)``, ``readexactly(n)`` and ``readuntil(sep)`` return a slice of one
view when the answer lies inside it, copying into ``bytes`` only when it spans
chunks. Results are bytes-like either way (``memoryview`` or ``bytes``).
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from iouzcrx._reader import DEFAULT_LIMIT, ZcrxStreamReader, check_limit
from iouzcrx.modes import ModeSelection, select_mode
from iouzcrx.reactor import Reactor
from iouzcrx.server import (
    ZcrxServer,
    attach_connection,
    check_callable,
    check_host,
    check_port,
    create_zcrx_server,
)
from iouzcrx.socket_transport import wire_wakeups

__all__ = ["ZcrxStreamReader", "ZcrxStreamWriter", "open_connection", "start_server"]


class _StreamProtocol(asyncio.BaseProtocol):
    """Feeds a ZcrxStreamReader and lets the writer wait for drain.

    A zero-copy protocol by duck typing, not by subclassing ZeroCopyProtocol:
    its ``view_received`` is the reader's own bound ``feed_view``, looked up
    once per connection, so each view goes to the reader with no Python frame
    in between.
    """

    view_received: Callable[[memoryview], None]
    # The reader takes any view: a request/response connection in bufring
    # mode may then be read by readiness, into views over copies
    # (iouzcrx._readiness).
    _views_may_be_copies = True

    def __init__(
        self,
        reader: ZcrxStreamReader,
        client_connected_cb: Callable[[ZcrxStreamReader, ZcrxStreamWriter], Any] | None = None,
    ) -> None:
        self._reader = reader
        self.view_received = reader.feed_view
        self._client_connected_cb = client_connected_cb
        self._loop = asyncio.get_running_loop()
        self._paused = False
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = self._loop.create_future()
        self._task: asyncio.Task[Any] | None = None
        self.writer: ZcrxStreamWriter | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._reader.set_transport(transport)
        self.writer = ZcrxStreamWriter(transport, self, self._reader)  # type: ignore[arg-type]
        if self._client_connected_cb is not None:
            result = self._client_connected_cb(self._reader, self.writer)
            if asyncio.iscoroutine(result):
                self._task = self._loop.create_task(result)
                self._task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        # A handler that raised would otherwise leave its connection open
        # for ever, the error unseen (the task stays referenced, so it is
        # never even reported at collection): report it, close the
        # connection, as asyncio's own streams do.
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        writer = self.writer
        self._loop.call_exception_handler(
            {
                "message": "Unhandled exception in client_connected_cb",
                "exception": exc,
                "transport": writer.transport if writer is not None else None,
            }
        )
        if writer is not None:
            writer.close()

    def eof_received(self) -> bool:
        self._reader.feed_eof()
        return True  # keep the transport open for the writer (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._reader._release_area()
        if exc is None:
            self._reader.feed_eof()
        else:
            self._reader.set_exception(exc)
        if not self._closed.done():
            if exc is None:
                self._closed.set_result(None)
            else:
                self._closed.set_exception(exc)
                self._closed.exception()  # retrieved: nobody may wait_closed()
        self._paused = False
        self._release_drain_waiters(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._release_drain_waiters(None)

    def _release_drain_waiters(self, exc: Exception | None) -> None:
        while self._drain_waiters:
            waiter = self._drain_waiters.popleft()
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

    async def drain_helper(self) -> None:
        if not self._paused:
            return
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter


class ZcrxStreamWriter:
    """The writing half, shaped like ``asyncio.StreamWriter``."""

    def __init__(
        self, transport: asyncio.Transport, protocol: _StreamProtocol, reader: ZcrxStreamReader
    ) -> None:
        self._transport = transport
        self._protocol = protocol
        self._reader = reader

    @property
    def transport(self) -> asyncio.Transport:
        """The connection's transport."""
        return self._transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for sending (see ``drain()``)."""
        self._transport.write(data)

    def writelines(self, data: Any) -> None:
        """Queue each buffer of ``data`` for sending."""
        self._transport.writelines(data)

    def write_eof(self) -> None:
        """Close the sending side once what is queued is sent."""
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        """Whether the transport can close its sending side alone."""
        return self._transport.can_write_eof()

    def close(self) -> None:
        """Close the connection, after the data queued so far."""
        self._transport.close()

    def is_closing(self) -> bool:
        """Whether the connection is closing or closed."""
        return self._transport.is_closing()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        await self._protocol._closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The transport's ``get_extra_info(name, default)``."""
        return self._transport.get_extra_info(name, default)

    async def drain(self) -> None:
        """Wait until the write buffer is below its high-water mark; raises the
        connection's error, if any."""
        exc = self._reader.exception()
        if exc is not None:
            raise exc
        if self._transport.is_closing():
            await asyncio.sleep(0)  # let connection_lost run, as asyncio does
        await self._protocol.drain_helper()


async def start_server(
    client_connected_cb: Callable[[ZcrxStreamReader, ZcrxStreamWriter], Awaitable[None] | None],
    host: Any = None,
    port: int | None = None,
    *,
    limit: int = DEFAULT_LIMIT,
    **kwargs: Any,
) -> ZcrxServer:
    """``asyncio.start_server`` with zero-copy receive (options of
    ``create_zcrx_server``)."""
    loop = asyncio.get_running_loop()
    check_callable("client_connected_cb", client_connected_cb)
    check_limit(limit)

    def factory() -> _StreamProtocol:
        return _StreamProtocol(ZcrxStreamReader(limit), client_connected_cb)

    return await create_zcrx_server(loop, factory, host, port, **kwargs)


async def open_connection(
    host: str,
    port: int,
    *,
    limit: int = DEFAULT_LIMIT,
    mode: str = "auto",
    area_size: int = 16 << 20,
    **mode_options: Any,
) -> tuple[ZcrxStreamReader, ZcrxStreamWriter]:
    """``asyncio.open_connection`` receiving through zero-copy receive.

    The connections a loop opens share one receive backend per mode, made
    on first use with ``area_size`` and ``mode_options``.
    """
    loop = asyncio.get_running_loop()
    check_host(host, accept_bytes=True)
    check_port(port)
    check_limit(limit)
    reactor = Reactor.for_loop(loop)
    selection = _client_backend(reactor, mode, area_size, mode_options)
    if selection.mode == "socket":
        wire_wakeups(selection.backend, loop)  # servers wire their own
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, socktype, proto, _name, address in infos:
        sock = socket.socket(family, socktype, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        break
    else:
        raise error or OSError(f"could not connect to {host}:{port}")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = ZcrxStreamReader(limit)
    protocol = _StreamProtocol(reader)
    connected: asyncio.Future[None] = loop.create_future()
    attach_connection(reactor, selection, sock, protocol, waiter=connected)
    await connected
    await asyncio.sleep(0)  # connection_made runs before the waiter is resolved
    assert protocol.writer is not None
    return reader, protocol.writer


def _client_backend(
    reactor: Reactor, mode: str, area_size: int, options: dict[str, Any]
) -> ModeSelection:
    backends = reactor.client_backends
    selection: ModeSelection | None = backends.get(mode)
    if selection is None:
        selection = backends[mode] = select_mode(
            reactor.ring,
            mode=mode,
            area_size=area_size,
            ring_error=reactor.ring_error,
            zcrx_ring=reactor.zcrx_ring,
            **options,
        )
    return selection
