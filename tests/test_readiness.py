"""Buffer-ring connections read when their socket is readable
(iouzcrx._readiness). By default a connection moves there from the multishot
receive once requests alternate with responses; most tests here start it
there (IOUZCRX_READINESS=1; here by setting what the transport read from
it): request/response traffic stays on the readiness receive, a stream moves
to the multishot receive, and pausing,
closing, a protocol swap or a socket object the program closes leave no
reader behind.  Real kernel, both loops (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
from typing import Any

import pytest
from isolation import TESTS, child_env

import iouzcrx
from iouzcrx import _transport as transport_module
from iouzcrx.reactor import Reactor

TIMEOUT = 60


@pytest.fixture(autouse=True)
def _readiness_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "_READINESS", "1")


@pytest.fixture
def _readiness_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "_READINESS", "auto")


class Echo(asyncio.Protocol):
    """Answers every chunk with itself; keeps what it saw."""

    instances: list[Echo] = []

    def __init__(self) -> None:
        self.transport: Any = None
        self.readings: list[str | None] = []
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.after_lost = 0
        Echo.instances.append(self)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.lost.done():
            self.after_lost += 1
        self.readings.append(self.transport.get_extra_info("zcrx_reading"))
        self.transport.write(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class BufferedEcho(asyncio.BufferedProtocol):
    instances: list[BufferedEcho] = []

    def __init__(self) -> None:
        self.transport: Any = None
        self.memory = bytearray(256 << 10)  # as asyncio's stock readers offer
        self.readings: list[str | None] = []
        BufferedEcho.instances.append(self)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.memory

    def buffer_updated(self, nbytes: int) -> None:
        self.readings.append(self.transport.get_extra_info("zcrx_reading"))
        self.transport.write(bytes(self.memory[:nbytes]))


async def serve(factory: Any) -> tuple[Any, int]:
    server = await iouzcrx.create_zcrx_server(factory, "127.0.0.1", 0, mode="bufring")
    return server, server.sockets[0].getsockname()[1]


async def close(server: Any) -> None:
    server.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)


async def request(reader: Any, writer: Any, payload: bytes) -> bytes:
    writer.write(payload)
    return bytes(await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT))


async def first_request(factory: Any, payload: bytes) -> tuple[Any, int, Any, Any, Any]:
    """A server of ``factory`` (an Echo or BufferedEcho), a client connection
    to it that had ``payload`` echoed, and the connection's protocol."""
    instances = factory.instances
    instances.clear()
    server, port = await serve(factory)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await request(reader, writer, payload) == payload
    (protocol,) = instances
    return server, port, reader, writer, protocol


@pytest.mark.asyncio
@pytest.mark.parametrize("factory", [Echo, BufferedEcho], ids=["protocol", "buffered"])
async def test_requests_are_read_by_readiness(factory: Any) -> None:
    factory.instances.clear()
    server, port = await serve(factory)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(50):
        payload = bytes([i]) * (100 + 300 * i)
        assert await request(reader, writer, payload) == payload
    (protocol,) = factory.instances
    assert set(protocol.readings) == {"readiness"}
    writer.close()
    await close(server)


@pytest.mark.asyncio
@pytest.mark.usefixtures("_readiness_auto")
@pytest.mark.parametrize("factory", [Echo, BufferedEcho], ids=["protocol", "buffered"])
async def test_by_default_requests_answered_in_a_row_move_to_readiness_in_order(
    factory: Any,
) -> None:
    """The multishot receive reads the first requests; the second answered
    in a row cancels it, and reading by readiness starts after its last
    completion. Requests the client sends while the move is under way (a
    burst of pipelined ones right after that answer) come back whole and in
    order."""
    server, port, reader, writer, protocol = await first_request(factory, b"one")
    assert protocol.transport.get_extra_info("zcrx_reading") == "multishot"
    assert await request(reader, writer, b"two") == b"two"
    # Under BULK_READ (two full reads in a row would move it back).
    burst = b"".join(struct.pack("!I", i) * 16 for i in range(600))
    writer.write(burst)
    echoed = await asyncio.wait_for(reader.readexactly(len(burst)), TIMEOUT)
    assert echoed == burst
    for i in range(20):
        payload = bytes([i]) * (100 + 300 * i)
        assert await request(reader, writer, payload) == payload
    assert protocol.readings[:2] == ["multishot", "multishot"]
    assert protocol.readings[-1] == "readiness"
    assert protocol.transport.get_extra_info("zcrx_reading") == "readiness"
    writer.close()
    await close(server)


@pytest.mark.asyncio
@pytest.mark.usefixtures("_readiness_auto")
async def test_by_default_a_connection_that_answers_once_stays_on_the_multishot_receive() -> None:
    """One request, one response, then the client's EOF: the move would
    cost more than it saves, and is not made."""
    Echo.instances.clear()
    server, port = await serve(Echo)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await request(reader, writer, b"only") == b"only"
    (protocol,) = Echo.instances
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
    assert protocol.readings == ["multishot"]
    writer.close()
    await close(server)


class HeaderThenBody(Echo):
    """Answers in two writes, as a protocol sending a header and a body does."""

    def data_received(self, data: bytes) -> None:
        self.readings.append(self.transport.get_extra_info("zcrx_reading"))
        self.transport.write(b"<")
        self.transport.write(data)


class AnswersFromAThread(Echo):
    """Writes its answers from a thread of its own, as a program handing
    work to a pool might: the rings' thread alone may make the move."""

    def data_received(self, data: bytes) -> None:
        self.readings.append(self.transport.get_extra_info("zcrx_reading"))
        writer = threading.Thread(target=self.transport.write, args=(data,))
        writer.start()
        writer.join()


@pytest.mark.asyncio
@pytest.mark.usefixtures("_readiness_auto")
async def test_by_default_answers_in_several_writes_move_to_readiness() -> None:
    Echo.instances.clear()
    server, port = await serve(HeaderThenBody)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(5):
        payload = b"request %d" % i
        writer.write(payload)
        got = await asyncio.wait_for(reader.readexactly(len(payload) + 1), TIMEOUT)
        assert got == b"<" + payload
    (protocol,) = Echo.instances
    assert protocol.readings[0] == "multishot"
    assert protocol.transport.get_extra_info("zcrx_reading") == "readiness"
    writer.close()
    await close(server)


@pytest.mark.asyncio
@pytest.mark.usefixtures("_readiness_auto")
async def test_by_default_answers_written_from_another_thread_all_arrive(
    exception_handler_calls: list[dict[str, Any]],
) -> None:
    server, port, reader, writer, protocol = await first_request(AnswersFromAThread, b"zero")
    for i in range(5):
        payload = b"request %d" % i
        assert await request(reader, writer, payload) == payload
    assert protocol.transport.get_extra_info("zcrx_reading") == "multishot"
    assert exception_handler_calls == []
    writer.close()
    await close(server)


@pytest.mark.asyncio
@pytest.mark.parametrize("factory", [Echo, BufferedEcho], ids=["protocol", "buffered"])
async def test_a_stream_moves_to_the_multishot_receive_in_order(factory: Any) -> None:
    server, port, reader, writer, protocol = await first_request(factory, b"hello")
    assert protocol.transport.get_extra_info("zcrx_reading") == "readiness"
    # Several MiB written at once (two full reads in a row move it), then
    # small requests again: all of it comes back, in order, whichever
    # receive read it.
    stream = os.urandom(6 << 20)
    writer.write(stream)
    echoed = await asyncio.wait_for(reader.readexactly(len(stream)), TIMEOUT)
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(stream).digest()
    assert protocol.transport.get_extra_info("zcrx_reading") == "multishot"
    assert await request(reader, writer, b"after") == b"after"
    writer.close()
    await close(server)


@pytest.mark.asyncio
async def test_pause_stops_reading_and_resume_delivers_the_rest() -> None:
    server, port, reader, writer, protocol = await first_request(Echo, b"a")
    protocol.transport.pause_reading()
    assert protocol.transport.get_extra_info("zcrx_reading") is None
    writer.write(b"while paused")
    await writer.drain()
    # No echo may come while paused: the peer would see it first.
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.read(1), 0.2)
    protocol.transport.resume_reading()
    assert await asyncio.wait_for(reader.readexactly(12), TIMEOUT) == b"while paused"
    assert protocol.transport.get_extra_info("zcrx_reading") == "readiness"
    writer.close()
    await close(server)


class ClosesOnFirst(Echo):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.transport.close()


@pytest.mark.asyncio
async def test_close_inside_data_received_ends_reading() -> None:
    Echo.instances.clear()
    server, port = await serve(ClosesOnFirst)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"first")
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"first"  # then EOF
    (protocol,) = Echo.instances
    assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
    writer.write(b"ignored")
    await asyncio.sleep(0.05)
    assert len(protocol.readings) == 1
    assert protocol.after_lost == 0
    writer.close()
    await close(server)


class KeepsOpenAtEof(Echo):
    def eof_received(self) -> bool:
        self.transport.write(b"bye")
        return True


@pytest.mark.asyncio
async def test_eof_is_delivered_and_the_connection_may_still_write() -> None:
    Echo.instances.clear()
    server, port = await serve(KeepsOpenAtEof)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await request(reader, writer, b"x") == b"x"
    writer.write_eof()
    assert await asyncio.wait_for(reader.readexactly(3), TIMEOUT) == b"bye"
    (protocol,) = Echo.instances
    assert protocol.transport.get_extra_info("zcrx_reading") is None
    protocol.transport.close()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    await close(server)


class ZeroCopyEcho(iouzcrx.ZeroCopyProtocol):
    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.views = 0

    def view_received(self, view: memoryview) -> None:
        self.views += 1
        self.transport.write(bytes(view))
        view.release()


@pytest.mark.asyncio
async def test_a_protocol_wanting_views_moves_to_the_multishot_receive() -> None:
    server, port, reader, writer, protocol = await first_request(Echo, b"bytes")
    transport = protocol.transport
    views = ZeroCopyEcho(transport)
    transport.set_protocol(views)
    assert transport.get_extra_info("zcrx_reading") == "multishot"
    assert await request(reader, writer, b"views") == b"views"
    assert views.views >= 1
    writer.close()
    await close(server)


@pytest.mark.asyncio
async def test_closing_the_socket_object_removes_the_reader_first() -> None:
    """The program closes the socket it was given while the loop watches its
    fd: the reader goes first, so the number is free in the loop as well as
    in the kernel, and a new connection is served normally."""
    Echo.instances.clear()
    server, port = await serve(Echo)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await request(reader, writer, b"one") == b"one"
    (first,) = Echo.instances
    sock = first.transport.get_extra_info("socket")
    number = sock.fileno()
    sock.close()
    assert first.transport.get_extra_info("zcrx_reading") is None
    # The number, made to name another readable socket, can be watched anew:
    # a reader left behind would keep the loop from registering it.
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    os.dup2(left.fileno(), number)
    fired = loop.create_future()
    loop.add_reader(number, lambda: fired.done() or fired.set_result(True))
    right.send(b"!")
    try:
        assert await asyncio.wait_for(fired, TIMEOUT)
    finally:
        loop.remove_reader(number)
        if left.fileno() != number:  # else the pair took the freed number itself
            os.close(number)
        left.close()
        right.close()
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
    assert await request(reader2, writer2, b"two") == b"two"
    second = Echo.instances[1]
    assert second.readings == ["readiness"]
    assert first.readings == ["readiness"]
    first.transport.abort()
    writer.close()
    writer2.close()
    await close(server)


class BadBuffer(asyncio.BufferedProtocol):
    lost: asyncio.Future[BaseException | None]

    def connection_made(self, transport: Any) -> None:
        BadBuffer.lost = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> bytes:
        return b"read-only"

    def buffer_updated(self, nbytes: int) -> None:
        raise AssertionError("nothing can have been written")

    def connection_lost(self, exc: BaseException | None) -> None:
        BadBuffer.lost.set_result(exc)


@pytest.mark.asyncio
async def test_a_read_only_buffer_fails_the_connection_clearly(
    exception_handler_calls: list[dict[str, Any]],
) -> None:
    server, port = await serve(BadBuffer)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"data")
    exc = await asyncio.wait_for(BadBuffer.lost, TIMEOUT)
    assert isinstance(exc, TypeError)
    assert "get_buffer(65536) returned 'bytes'" in str(exc)
    assert any(call.get("exception") is exc for call in exception_handler_calls)
    # Closed with the data unread: the peer sees EOF or, as here, a reset.
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    await close(server)


@pytest.mark.asyncio
async def test_readiness_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "_READINESS", "0")
    Echo.instances.clear()
    server, port = await serve(Echo)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await request(reader, writer, b"ring") == b"ring"
    assert Echo.instances[0].readings == ["multishot"]
    writer.close()
    await close(server)


@pytest.mark.asyncio
async def test_a_reset_peer_ends_the_connection() -> None:
    Echo.instances.clear()
    server, port = await serve(Echo)
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"hi")
    client.setblocking(False)
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(client, 2), TIMEOUT) == b"hi"
    (protocol,) = Echo.instances
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # RST
    exc = await asyncio.wait_for(protocol.lost, TIMEOUT)
    assert exc is None or isinstance(exc, ConnectionResetError)
    await close(server)


@pytest.mark.asyncio
async def test_requests_read_by_readiness_take_no_ring_operation() -> None:
    loop = asyncio.get_running_loop()
    Echo.instances.clear()
    server, port = await serve(Echo)
    ring = Reactor.for_loop(loop).ring
    assert ring is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await request(reader, writer, b"warm") == b"warm"
    reaped = ring.cqes_reaped
    for i in range(200):
        assert await request(reader, writer, b"%d" % i) == b"%d" % i
    # Answers leave by the inline send: a completion here would be a send
    # the socket did not take at once.
    assert ring.cqes_reaped - reaped < 10
    assert server.backend.stats()["bytes"] >= 4 + sum(len(b"%d" % i) for i in range(200))
    writer.close()
    await close(server)


@pytest.mark.asyncio
async def test_a_connection_reading_by_readiness_ends_when_its_queue_closes() -> None:
    """As the multishot receives of the queue end when it closes (or its ring
    does, with the loop), so does a connection the loop reads for it."""
    server, port, reader, writer, protocol = await first_request(Echo, b"idle")
    server.backend.close()
    exc = await asyncio.wait_for(protocol.lost, TIMEOUT)
    assert isinstance(exc, ConnectionAbortedError)
    assert protocol.transport.get_extra_info("zcrx_reading") is None
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    await close(server)


@pytest.mark.asyncio
async def test_streams_read_requests_by_readiness_and_a_stream_by_the_ring() -> None:
    """The streams' reader takes any view: its requests come by readiness, as
    views over copies, and a stream moves to the multishot receive."""
    readings: list[str | None] = []
    stream = os.urandom(3 << 20)

    async def handle(reader: Any, writer: Any) -> None:
        while True:
            line = await reader.readline()
            if not line:
                break
            readings.append(writer.transport.get_extra_info("zcrx_reading"))
            if line == b"stream\n":
                got = await reader.readexactly(len(stream))
                writer.write(hashlib.sha256(got).digest())
            else:
                writer.write(bytes(line))
        writer.close()

    server = await iouzcrx.start_server(handle, "127.0.0.1", 0, mode="bufring")
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(20):
        line = b"request %d\n" % i
        assert await request(reader, writer, line) == line
    assert readings == ["readiness"] * 20
    writer.write(b"stream\n" + stream)
    digest = await asyncio.wait_for(reader.readexactly(32), TIMEOUT)
    assert digest == hashlib.sha256(stream).digest()
    assert await request(reader, writer, b"after\n") == b"after\n"
    assert readings[-1] == "multishot"
    writer.close()
    await close(server)


class FailsAfter(Echo):
    """Calls the transport, then raises: the failure is still reported."""

    action = "close"

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if FailsAfter.action == "close":
            self.transport.close()
        else:
            self.transport.pause_reading()
        raise ValueError("the protocol failed")


@pytest.mark.asyncio
@pytest.mark.parametrize("action", ["close", "pause"])
async def test_a_protocol_that_raises_after_closing_or_pausing_is_reported(
    action: str, exception_handler_calls: list[dict[str, Any]]
) -> None:
    FailsAfter.action = action
    Echo.instances.clear()
    server, port = await serve(FailsAfter)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"data")
    for _ in range(100):
        if Echo.instances:
            break
        await asyncio.sleep(0.01)
    (protocol,) = Echo.instances
    await asyncio.wait_for(protocol.lost, TIMEOUT)
    assert any(isinstance(call.get("exception"), ValueError) for call in exception_handler_calls)
    writer.close()
    await close(server)


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["loop", "thread"])
async def test_a_connection_whose_socket_the_program_closes_ends(where: str) -> None:
    """Closed on the loop's thread or another: the reader goes before the fd
    number is free, and the connection ends (EBADF) instead of hanging."""
    loop = asyncio.get_running_loop()
    server, port, reader, writer, protocol = await first_request(Echo, b"one")
    sock = protocol.transport.get_extra_info("socket")
    if where == "loop":
        sock.close()
    else:
        await loop.run_in_executor(None, sock.close)
    exc = await asyncio.wait_for(protocol.lost, TIMEOUT)
    assert isinstance(exc, OSError) and exc.errno == errno.EBADF
    assert sock.fileno() == -1
    # Connections accepted after it, on whatever numbers, are served.
    for i in range(3):
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
        assert await request(reader2, writer2, b"next %d" % i) == b"next %d" % i
        writer2.close()
    writer.close()
    await close(server)


class Keeps(asyncio.Protocol):
    """Keeps what arrives (it never writes)."""

    last: Keeps

    def __init__(self) -> None:
        self.data = bytearray()
        self.arrived = asyncio.Event()
        self.lost = asyncio.get_running_loop().create_future()
        Keeps.last = self

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["loop", "thread"])
async def test_a_connection_whose_socket_the_program_detaches_ends_and_leaves_it_the_fd(
    where: str,
) -> None:
    """The program owns the fd from then on (from another thread, a
    duplicate: the loop still names the number until it removed its
    reader): the connection ends with EBADF, and what the peer sends next
    is the program's to read."""
    loop = asyncio.get_running_loop()
    server, port = await serve(Keeps)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"one")
    while not hasattr(Keeps, "last") or bytes(Keeps.last.data) != b"one":
        await asyncio.sleep(0.01)
    protocol = Keeps.last
    assert protocol.transport.get_extra_info("zcrx_reading") == "readiness"
    sock = protocol.transport.get_extra_info("socket")
    fd = sock.detach() if where == "loop" else await loop.run_in_executor(None, sock.detach)
    with socket.socket(fileno=fd) as owned:
        exc = await asyncio.wait_for(protocol.lost, TIMEOUT)
        assert isinstance(exc, OSError) and exc.errno == errno.EBADF
        assert protocol.transport.get_extra_info("zcrx_reading") is None
        writer.write(b"two")
        owned.settimeout(TIMEOUT)
        assert await loop.run_in_executor(None, owned.recv, 100) == b"two"
        assert bytes(protocol.data) == b"one"
    writer.close()
    await close(server)


@pytest.mark.asyncio
@pytest.mark.parametrize("gap", [0.0, 0.05])
async def test_a_peer_that_resets_right_after_sending_ends_its_connection(gap: float) -> None:
    """Data then a reset: on uvloop the loop drops a reader whose socket
    reports an error without calling it, so the ring watches for errors."""
    loop = asyncio.get_running_loop()
    Echo.instances.clear()
    server, port = await serve(Echo)
    for _ in range(10):
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, ("127.0.0.1", port))
        await loop.sock_sendall(client, b"z")
        if gap:
            await asyncio.sleep(gap)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
    for _ in range(100):
        if len(Echo.instances) == 10:
            break
        await asyncio.sleep(0.01)
    assert len(Echo.instances) == 10
    for protocol in Echo.instances:
        exc = await asyncio.wait_for(protocol.lost, TIMEOUT)
        assert exc is None or isinstance(exc, ConnectionResetError)
    await close(server)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_forked_child_running_its_parents_loop_reads_none_of_its_connections(
    loop_name: str,
) -> None:
    """The child runs the loop it inherited, whose connections are the
    parent's: it reads none of their data (its loop stops, saying why), and
    the parent gets all of it."""
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")
    code = """
        import asyncio, os, socket, sys
        import iouzcrx

        readers = []

        class Echo(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                readers.append(os.getpid())
                self.transport.write(data)

        loop = iouzcrx.new_event_loop(use_uvloop=sys.argv[1] == "uvloop")
        server = loop.run_until_complete(
            loop.create_zcrx_server(Echo, "127.0.0.1", 0, mode="bufring"))
        client = socket.create_connection(server.sockets[0].getsockname())
        client.sendall(b"warm")
        while True:
            loop.run_until_complete(asyncio.sleep(0.01))
            if readers:
                break
        assert client.recv(4) == b"warm"
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            errors = []
            loop.set_exception_handler(lambda _l, context: errors.append(context))
            client.sendall(b"for the parent")
            try:
                loop.run_until_complete(asyncio.sleep(5))
            except RuntimeError:
                pass
            print("child read:", sum(1 for p in readers if p != parent))
            print("told:", any("parent" in error["message"] for error in errors))
            sys.stdout.flush()  # os._exit does not
            os._exit(0)
        os.waitpid(pid, 0)
        loop.run_until_complete(asyncio.sleep(0.2))
        client.settimeout(10)
        got = b""
        while len(got) < len(b"for the parent"):
            got += client.recv(100)
        print("parent got:", got.decode())
        client.close()
        server.close()
        loop.close()
    """
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), loop_name],
        cwd=TESTS,
        env=child_env(IOUZCRX_READINESS="1"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines() == [
        "child read: 0",
        "told: True",
        "parent got: for the parent",
    ], (child.stdout, child.stderr)
