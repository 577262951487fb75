"""Plain asyncio protocols on a zcrx server: ``data_received(bytes)`` and
``get_buffer``/``buffer_updated`` get copies made straight from the area (in
the ring modes by the receiver itself), byte-exact through runs of adjacent
chunks, with every buffer back at once; misuse from the protocol and calls
back into the transport from each callback keep the stream in order.
The server tests run on both loops (tests/conftest.py) in every mode here."""

from __future__ import annotations

import asyncio
import mmap
from typing import Any

import pytest
from conftest import RECEIVE_MODES, SCALE, SERVER_MODES, Pattern, connect_pair, make_queue

import iouzcrx
from iouzcrx._area import PinAccount
from iouzcrx._readiness import BULK_READ

server_modes = pytest.mark.parametrize("mode", SERVER_MODES)
# The copy mode delivers through the same Receiver code as bufring; in the VM
# (emulated, slow) it runs the byte-exact and buffer-return tests, and the
# matrices of misbehaving protocols run on the host only.
host_modes = pytest.mark.parametrize(
    "mode",
    [p for p in SERVER_MODES if p.values[0] != "copy"],  # type: ignore[union-attr]
)

TIMEOUT = 60


def expected(seed: int, total: int) -> bytes:
    return b"".join(bytes(c) for c in Pattern(seed).chunks(total))


class Collector:
    """What every test protocol shares: the data so far, the transport, and
    futures for EOF and the end of the connection."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.transport: Any = None
        loop = asyncio.get_running_loop()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.saw_eof = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def eof_received(self) -> None:
        self.saw_eof = True
        if not self.eof.done():
            self.eof.set_result(bytes(self.data))

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.eof.done():
            self.eof.set_result(bytes(self.data))
        if not self.lost.done():
            self.lost.set_result(exc)


class BytesCollector(Collector, asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes
        self.data += data


class ViewCollector(Collector, iouzcrx.ZeroCopyProtocol):
    def view_received(self, view: memoryview) -> None:
        self.data += view


class BufferedCollector(Collector, asyncio.BufferedProtocol):
    def __init__(self, size: int = 64 << 10, view: bool = False, page_offset: int = -1) -> None:
        super().__init__()
        self.buffer: Any = bytearray(size)
        if page_offset >= 0:
            # Memory that starts page_offset bytes into a page, while area
            # buffers start on one: the pairs the receiver copies in pieces.
            self.buffer = memoryview(mmap.mmap(-1, size + 4096))[page_offset : page_offset + size]
        self.target: Any = memoryview(self.buffer) if view else self.buffer
        self.hints: list[int] = []

    def get_buffer(self, sizehint: int) -> Any:
        self.hints.append(sizehint)
        return self.target

    def buffer_updated(self, nbytes: int) -> None:
        assert 0 < nbytes <= len(self.buffer)
        self.data += self.buffer[:nbytes]


async def serve(mode: str, make: Any) -> tuple[iouzcrx.ZcrxServer, list[Any]]:
    protocols: list[Any] = []

    def factory() -> Any:
        protocols.append(make())
        return protocols[-1]

    loop = asyncio.get_running_loop()
    server = await loop.create_zcrx_server(factory, "127.0.0.1", 0, mode=mode)
    return server, protocols


async def first(protocols: list[Any]) -> Any:
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not protocols:
        assert asyncio.get_running_loop().time() < deadline, "no connection was accepted"
        await asyncio.sleep(0.01)
    return protocols[0]


async def send(server: iouzcrx.ZcrxServer, seed: int, total: int, *, eof: bool = True) -> Any:
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for chunk in Pattern(seed).chunks(total):
        writer.write(chunk)
        await writer.drain()
    if eof:
        writer.write_eof()
    return writer


def assert_buffers_back(server: iouzcrx.ZcrxServer) -> None:
    stats = server.backend.stats()
    assert stats["buffers_in_use"] == 0, stats


@server_modes
@pytest.mark.parametrize(
    ("make", "total"),
    [
        pytest.param(BytesCollector, 8 << 20, id="bytes"),
        pytest.param(BufferedCollector, 8 << 20, id="buffered-64k"),
        pytest.param(lambda: BufferedCollector(256 << 10, view=True), 8 << 20, id="memoryview"),
        pytest.param(lambda: BufferedCollector(4095), 2 << 20, id="buffered-4095"),
        pytest.param(
            lambda: BufferedCollector(64 << 10, page_offset=16), 8 << 20, id="buffered-page+16"
        ),
        pytest.param(
            lambda: BufferedCollector(10_007, page_offset=63), 2 << 20, id="buffered-page+63"
        ),
        pytest.param(lambda: BufferedCollector(10_007), 2 << 20, id="buffered-10007"),
        pytest.param(lambda: BufferedCollector(1), 48 << 10, id="buffered-1-byte"),
    ],
)
async def test_copies_are_byte_exact_and_buffers_go_back(mode, make, total):
    total //= SCALE  # the VM moves less
    server, protocols = await serve(mode, make)
    async with server:
        writer = await send(server, 7, total)
        protocol = await first(protocols)
        data = await asyncio.wait_for(protocol.eof, TIMEOUT)
        assert data == expected(7, total)
        if isinstance(protocol, BufferedCollector):
            # The data at hand, or the readiness receive's fixed hint.
            assert all(0 < h <= max(total, BULK_READ) for h in protocol.hints)
        assert_buffers_back(server)
        stats = server.backend.stats()
        if mode != "socket":
            # Runs of adjacent chunks arrive as one copy.
            assert stats["deliveries"] <= stats["chunks"]
        writer.close()
        await asyncio.wait_for(protocol.lost, TIMEOUT)


class ReadOnlyBuffer(BufferedCollector):
    def get_buffer(self, sizehint: int) -> Any:
        return b"\0" * 100


class EmptyBuffer(BufferedCollector):
    def get_buffer(self, sizehint: int) -> Any:
        return bytearray()


class NotABuffer(BufferedCollector):
    def get_buffer(self, sizehint: int) -> Any:
        return 42


@host_modes
@pytest.mark.parametrize(
    ("make", "error", "text"),
    [
        pytest.param(ReadOnlyBuffer, TypeError, "not writable", id="read-only"),
        pytest.param(NotABuffer, TypeError, "not writable", id="not-a-buffer"),
        pytest.param(EmptyBuffer, RuntimeError, "returned an empty buffer", id="empty"),
    ],
)
async def test_a_bad_get_buffer_fails_the_connection_clearly(
    mode, make, error, text, exception_handler_calls
):
    server, protocols = await serve(mode, make)
    async with server:
        writer = await send(server, 3, 64 << 10, eof=False)
        protocol = await first(protocols)
        exc = await asyncio.wait_for(protocol.lost, TIMEOUT)
        assert isinstance(exc, error), exc
        assert text in str(exc)
        assert protocol.data == b""
        assert any(c.get("exception") is exc for c in exception_handler_calls)
        assert_buffers_back(server)
        writer.close()


class Raising(BufferedCollector):
    """Raises from one of its callbacks, the ``after``-th time it is called."""

    def __init__(self, where: str, after: int = 3) -> None:
        super().__init__(4096)
        self.where = where
        self.calls = 0
        self.after = after

    def maybe_raise(self, where: str) -> None:
        if where == self.where:
            self.calls += 1
            if self.calls == self.after:
                raise ValueError(f"raised in {where}")

    def get_buffer(self, sizehint: int) -> Any:
        self.maybe_raise("get_buffer")
        return super().get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.maybe_raise("buffer_updated")
        super().buffer_updated(nbytes)


class RaisingBytes(BytesCollector):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def data_received(self, data: bytes) -> None:
        self.calls += 1
        if self.calls == 2:
            raise ValueError("raised in data_received")
        super().data_received(data)


@server_modes
@pytest.mark.parametrize("where", ["data_received", "get_buffer", "buffer_updated"])
async def test_an_exception_from_the_protocol_fails_the_connection(
    mode, where, exception_handler_calls
):
    make = RaisingBytes if where == "data_received" else (lambda: Raising(where))
    server, protocols = await serve(mode, make)
    async with server:
        total = (4 << 20) // SCALE
        writer = await send(server, 5, total, eof=False)
        protocol = await first(protocols)
        exc = await asyncio.wait_for(protocol.lost, TIMEOUT)
        assert isinstance(exc, ValueError) and str(exc) == f"raised in {where}"
        assert any(c.get("exception") is exc for c in exception_handler_calls)
        # What came before the failure is in order and nothing after it.
        assert 0 < len(protocol.data) < total
        assert bytes(protocol.data) == expected(5, total)[: len(protocol.data)]
        assert_buffers_back(server)
        writer.close()


class CallsBack(BufferedCollector):
    """Calls ``action`` on its transport from inside ``where``, once, after
    ``after`` bytes arrived; a bytes protocol when ``where`` is data_received."""

    def __init__(self, where: str, action: str, after: int = 100_000) -> None:
        super().__init__(3000)
        self.where = where
        self.action = action
        self.after = after
        self.done = False
        self.successor: Any = None
        # Deliveries begun while this protocol should get none (closed,
        # paused, handed over): each get_buffer or data_received call.
        self.quiet = False
        self.late = 0

    def act(self, where: str) -> None:
        if self.done or where != self.where or len(self.data) < self.after:
            return
        self.done = True
        self.quiet = True
        transport = self.transport
        if self.action == "close":
            transport.close()
        elif self.action == "pause":
            transport.pause_reading()

            def resume() -> None:
                self.quiet = False
                transport.resume_reading()

            asyncio.get_running_loop().call_later(0.05, resume)
        else:
            # Hand over to a protocol of another kind, sharing the data.
            successor: Any
            if self.action == "to_views":
                successor = ViewCollector()
            elif self.where == "data_received":
                successor = BufferedCollector(777)
            else:
                successor = BytesCollector()
            successor.data = self.data
            successor.eof, successor.lost = self.eof, self.lost
            successor.transport = transport
            self.successor = successor
            transport.set_protocol(successor)

    def get_buffer(self, sizehint: int) -> Any:
        self.late += self.quiet
        self.act("get_buffer")
        return super().get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        self.act("buffer_updated")


class CallsBackBytes(CallsBack):
    # Only data_received: no get_buffer, so delivered as bytes.
    get_buffer = None  # type: ignore[assignment]
    buffer_updated = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.late += self.quiet
        self.data += data
        self.act("data_received")


@host_modes
@pytest.mark.parametrize("where", ["data_received", "get_buffer", "buffer_updated"])
@pytest.mark.parametrize("action", ["close", "pause", "set_protocol", "to_views"])
async def test_calling_the_transport_from_each_callback(mode, where, action):
    def make() -> CallsBack:
        kind = CallsBackBytes if where == "data_received" else CallsBack
        return kind(where, action)

    server, protocols = await serve(mode, make)
    async with server:
        total = (2 << 20) // SCALE
        writer = await send(server, 9, total, eof=action != "close")
        protocol = await first(protocols)
        if action == "close":
            assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
            assert protocol.done
            # Nothing is delivered after close(), and what came is in order.
            assert bytes(protocol.data) == expected(9, total)[: len(protocol.data)]
        else:
            data = await asyncio.wait_for(protocol.eof, TIMEOUT)
            assert protocol.done
            assert data == expected(9, total)
            if action in ("set_protocol", "to_views"):
                # The end went to the protocol the connection was handed to
                # (which, once the transport closed, it no longer names).
                assert protocol.successor.saw_eof and not protocol.saw_eof
        if mode != "socket":
            # The ring transports look at the delivery again after each
            # callback; socket mode copies one received view to the end.
            assert protocol.late == 0
        assert_buffers_back(server)
        writer.close()
        await asyncio.wait_for(protocol.lost, TIMEOUT)


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_the_receiver_chooses_its_delivery_by_duck_typing(mode, ring, listener):
    queue = make_queue(ring, mode)
    client, conn = connect_pair(listener)
    with client, conn:
        # A one-buffer pin limit: a view held for a moment would throttle
        # the receive, copies pin nothing and never do.
        account = PinAccount(1)
        receiver = queue.recv_multishot(conn, account=account)
        assert receiver.delivery == "views"
        chunks: list[bytes] = []

        class Bytes:
            data_received = chunks.append

        assert receiver.set_protocol_delivery(Bytes()) == "bytes"
        assert receiver.delivery == "bytes" and receiver.on_data is None
        payload = expected(2, 1 << 20)
        client.sendall(payload[: 1 << 19])
        ring.wait_for(lambda: sum(map(len, chunks)) >= 1 << 19, timeout=TIMEOUT)
        assert all(type(c) is bytes for c in chunks)

        target = bytearray(1000)
        filled = bytearray()

        class Buffered:
            def get_buffer(self, sizehint: int) -> bytearray:
                return target

            def buffer_updated(self, nbytes: int) -> None:
                filled.extend(target[:nbytes])

        assert receiver.set_protocol_delivery(Buffered()) == "buffered"
        with pytest.raises(TypeError, match="cannot take received data"):
            receiver.set_protocol_delivery(object())
        assert receiver.delivery == "buffered"  # unchanged by the refusal
        client.sendall(payload[1 << 19 :])
        ring.wait_for(lambda: len(filled) >= 1 << 19, timeout=TIMEOUT)
        assert b"".join(chunks) + filled == payload
        assert queue.buffers_in_use == 0  # the copies pin nothing
        assert account.pinned == 0 and not account.stalled and not receiver.throttled
        assert receiver.queued == 0

        receiver.on_data = len
        assert receiver.delivery == "views" and receiver.on_data is len
        receiver.close()
        ring.wait_for(lambda: receiver.finished, timeout=TIMEOUT)
    queue.close()
