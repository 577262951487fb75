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
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from iouzcrx.modes import ModeSelection, select_mode
from iouzcrx.protocols import ZeroCopyProtocol
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

DEFAULT_LIMIT = 1 << 20  # buffered bytes before the reader pauses the transport

Chunk = memoryview | bytes | bytearray


def _check_limit(limit: Any) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be a positive int (bytes), not {limit!r}")
    if limit <= 0:
        raise ValueError(f"limit must be a positive int (bytes), not {limit}")


class ZcrxStreamReader:
    """Buffered views of one connection, consumed by coroutines.

    Shaped like ``asyncio.StreamReader``; ``async for view in reader``
    yields the received views themselves. ``read``, ``readexactly``,
    ``readuntil`` and ``readline`` return a ``memoryview`` slice when the
    answer lies inside one received chunk, and copy into ``bytes`` only when
    it spans chunks. More than twice ``limit`` bytes buffered pause the
    transport until reads take them.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        _check_limit(limit)
        self._limit = limit
        # Views in arrival order; the first may be a bytearray holding a copy
        # of views given up while the connection's receive was stalled.
        self._views: collections.deque[memoryview | bytearray] = collections.deque()
        self._size = 0
        self._eof = False
        self._exception: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._pins: Any = None  # the transport's PinAccount, if it has one
        self._paused = False

    def __repr__(self) -> str:
        return f"<ZcrxStreamReader {self._size} bytes{' eof' if self._eof else ''}>"

    # -- fed by the protocol ---------------------------------------------------------

    def set_transport(self, transport: asyncio.Transport) -> None:
        """Called by the connection's protocol with its transport."""
        self._transport = transport
        pins = transport.get_extra_info("pin_account")
        if pins is not None:
            # A stall (this connection's views at their share of the area,
            # or the area exhausted) wakes a waiting read, which then gives
            # up its views so that the receive can go on.
            pins.on_stall = self._wake
            self._pins = pins

    def feed_view(self, view: memoryview) -> None:
        """Called by the connection's protocol with each received view."""
        self._views.append(view)
        self._size += len(view)
        self._wake()
        # Views hold area buffers: stop reading rather than hoard the area.
        if not self._paused and self._transport is not None and self._size > 2 * self._limit:
            self._paused = True
            self._transport.pause_reading()

    def feed_eof(self) -> None:
        """Called by the connection's protocol when the peer closed its side."""
        self._eof = True
        self._wake()

    def _release_area(self) -> None:
        """The connection is gone: what is still buffered stays readable,
        but as a copy, so that its buffers go back to the shared area now
        (not when the program, or the GC, drops this reader)."""
        if self._pins is not None:
            self._pins.on_stall = None
            self._pins = None
        if self._views:
            self._spill()

    def set_exception(self, exc: BaseException) -> None:
        """Make waiting and later reads raise ``exc``."""
        self._exception = exc
        self._wake()

    def exception(self) -> BaseException | None:
        """The exception reads raise, if any."""
        return self._exception

    def at_eof(self) -> bool:
        """Whether the peer closed its side and everything was read."""
        return self._eof and not self._views

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        if self._exception is not None:
            raise self._exception
        if self._paused and self._transport is not None:
            # The caller needs more than is buffered (readexactly of more than
            # the limit, say): reading must go on or this waits forever.
            self._paused = False
            self._transport.resume_reading()
        if self._pins is not None and self._pins.stalled and self._views:
            # The read needs more than the views this connection may pin (or
            # than the area has left): copy them out, so that their buffers
            # go back and the receive resumes, rather than wait for ever.
            self._spill()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _consumed(self, n: int) -> None:
        self._size -= n
        if self._paused and self._size <= self._limit and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _spill(self) -> None:
        """Replace every buffered view by one bytearray holding their bytes."""
        views = self._views
        first = views[0]
        spilled = first if isinstance(first, bytearray) and len(views) > 1 else None
        if spilled is None:
            if isinstance(first, bytearray):
                return  # nothing else buffered
            spilled = bytearray()
            spilled += views.popleft()
        else:
            views.popleft()
        while views:
            spilled += views.popleft()
        views.append(spilled)

    def _take(self, n: int) -> Chunk:
        """Remove the first ``n`` buffered bytes (n <= buffered): a slice of
        the first view if it holds them all, else a copy."""
        first = self._views[0]
        if len(first) >= n:
            if len(first) == n:
                self._views.popleft()
                self._consumed(n)
                return first
            if isinstance(first, bytearray):
                # Our own copy: cut the front off in place (bytearray drops
                # a prefix without moving the rest).
                head = first[:n]
                del first[:n]
                self._consumed(n)
                return head
            self._views[0] = first[n:]
            self._consumed(n)
            return first[:n]
        parts = []
        remaining = n
        while remaining:
            view = self._views[0]
            if len(view) <= remaining:
                parts.append(self._views.popleft())
                remaining -= len(view)
            else:
                parts.append(view[:remaining])
                if isinstance(view, bytearray):
                    del view[:remaining]
                else:
                    self._views[0] = view[remaining:]
                remaining = 0
        self._consumed(n)
        return b"".join(parts)

    # -- the coroutine API ---------------------------------------------------------------

    def __aiter__(self) -> ZcrxStreamReader:
        return self

    async def __anext__(self) -> memoryview:
        while not self._views:
            if self._eof:
                raise StopAsyncIteration
            await self._wait()
        view = self._views.popleft()
        self._consumed(len(view))
        return view if isinstance(view, memoryview) else memoryview(view)

    async def read(self, n: int = -1) -> Chunk:
        """Up to ``n`` bytes (all until EOF if ``n < 0``); empty at EOF."""
        if n == 0:
            return b""
        if n < 0:
            while not self._eof:
                await self._wait()
            return self._take(self._size) if self._size else b""
        while not self._views:
            if self._eof:
                return b""
            await self._wait()
        return self._take(min(n, len(self._views[0])))

    async def readexactly(self, n: int) -> Chunk:
        """Exactly ``n`` bytes: a slice of one view when they lie in one, else a
        copy. ``asyncio.IncompleteReadError`` if EOF comes first."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        while self._size < n:
            if self._eof:
                partial = self._take(self._size) if self._size else b""
                raise asyncio.IncompleteReadError(bytes(partial), n)
            await self._wait()
        return self._take(n) if n else b""

    async def readuntil(self, separator: bytes = b"\n") -> Chunk:
        """The bytes up to and including ``separator``: a slice of one view when
        they lie in one, else a copy. ``asyncio.LimitOverrunError`` past the
        reader's limit, ``asyncio.IncompleteReadError`` if EOF comes first."""
        if not separator:
            raise ValueError("Separator should be at least one-byte string")
        while True:
            end = self._find(separator)
            if end >= 0:
                return self._take(end)
            if self._size > self._limit:
                raise asyncio.LimitOverrunError(
                    "Separator is not found, and chunk exceed the limit", self._size
                )
            if self._eof:
                partial = self._take(self._size) if self._size else b""
                raise asyncio.IncompleteReadError(bytes(partial), None)
            await self._wait()

    async def readline(self) -> Chunk:
        """One line, ending with the newline unless EOF came first."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial

    def _find(self, separator: bytes) -> int:
        """Bytes up to and including the first ``separator``, or -1.

        Each view is searched in place (re reads the buffer without copying);
        only the few bytes around a seam between views are copied, so a
        separator split across chunks is still found.
        """
        pattern = re.compile(re.escape(separator))
        width = len(separator) - 1
        offset = 0
        carry = b""  # the last `width` bytes before the current view
        for view in self._views:
            if carry:
                seam = carry + bytes(view[:width])
                index = seam.find(separator)
                if index >= 0:
                    return offset - len(carry) + index + len(separator)
            match = pattern.search(view)
            if match is not None:
                return offset + match.end()
            if width:
                carry = (carry + bytes(view[-width:]))[-width:]
            offset += len(view)
        return -1


class _StreamProtocol(ZeroCopyProtocol):
    """Feeds a ZcrxStreamReader and lets the writer wait for drain."""

    def __init__(
        self,
        reader: ZcrxStreamReader,
        client_connected_cb: Callable[[ZcrxStreamReader, ZcrxStreamWriter], Any] | None = None,
    ) -> None:
        self._reader = reader
        self._client_connected_cb = client_connected_cb
        self._loop = asyncio.get_running_loop()
        self._paused = False
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = self._loop.create_future()
        self._task: asyncio.Task[Any] | None = None
        self.writer: ZcrxStreamWriter | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._reader.set_transport(transport)  # type: ignore[arg-type]
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

    def view_received(self, view: memoryview) -> None:
        self._reader.feed_view(view)

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
    _check_limit(limit)

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
    _check_limit(limit)
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
            reactor.ring, mode=mode, area_size=area_size, ring_error=reactor.ring_error, **options
        )
    return selection
