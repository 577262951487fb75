"""Transports own their socket: every ring operation naming it completes
before the fd is closed, aborts are quiet, any protocol asyncio accepts is
served, and an accepted socket is never left to the GC."""

from __future__ import annotations

import asyncio
import errno
import functools
import importlib.util
import os
import socket
import threading
from typing import Any

import pytest
from conftest import SERVER_MODES, Pattern, Verifier

import iouzcrx

TIMEOUT = 60
# The modes whose transports send and receive through the ring.
RING_MODES = [p for p in SERVER_MODES if p.values[0] != "socket"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", name))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record_exception_handler_calls() -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: calls.append(context))
    return calls


def port_of(server: iouzcrx.ZcrxServer) -> int:
    return int(server.sockets[0].getsockname()[1])


async def until(ready: Any) -> None:
    """Wait, up to TIMEOUT, until ``ready()`` is true."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not ready():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


async def echo_client(port: int, seed: int, total: int) -> int:
    """Sends ``total`` pattern bytes, half-closes, and checks the echo is
    exactly what was sent; returns the bytes echoed."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    verifier = Verifier(seed)

    async def feed() -> None:
        for chunk in Pattern(seed).chunks(total, 64 << 10):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()

    feeding = asyncio.ensure_future(feed())
    try:
        while data := await reader.read(1 << 20):
            verifier.feed(memoryview(data))
        await feeding
    finally:
        feeding.cancel()
        writer.close()
    return verifier.pos


def size(seed: int) -> int:
    # Clients ending at different times, so that fds are freed and reused
    # while others are still being served.
    return 1000 + (seed % 8) * 37_000


@pytest.mark.parametrize("mode", SERVER_MODES)
async def test_the_echo_example_serves_every_concurrent_client_in_full(mode, capsys):
    echo = load_example("echo_server.py")
    calls = record_exception_handler_calls()
    loop = asyncio.get_running_loop()
    clients, rounds = 8, 8
    countdown = echo.Countdown(clients * rounds)
    server = await loop.create_zcrx_server(lambda: echo.Echo(countdown), "127.0.0.1", 0, mode=mode)

    async def client(first_seed: int) -> list[int]:
        # One after the other: each connection may get the fd number of one
        # the server has just closed.
        seeds = range(first_seed, first_seed + rounds)
        return [await echo_client(port_of(server), seed, size(seed)) for seed in seeds]

    async with server:
        echoed = await asyncio.wait_for(
            asyncio.gather(*(client(n * rounds) for n in range(clients))), TIMEOUT
        )
        assert echoed == [
            [size(seed) for seed in range(n * rounds, (n + 1) * rounds)] for n in range(clients)
        ]
        await asyncio.wait_for(countdown.done, TIMEOUT)
    assert calls == []
    assert "Broken pipe" not in capsys.readouterr().out


class HalfCloseThenClose(asyncio.Protocol):
    """Answers the first data with write_eof() and close()."""

    def __init__(self, lost: asyncio.Future[None]) -> None:
        self.lost = lost

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write_eof()
        self.transport.close()

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        self.lost.set_result(None)


@pytest.mark.parametrize("mode", RING_MODES)
async def test_a_connection_reusing_the_fd_of_one_closed_after_write_eof_keeps_its_write_side(
    mode,
):
    loop = asyncio.get_running_loop()
    calls = record_exception_handler_calls()
    for _ in range(20):
        lost = loop.create_future()
        server = await loop.create_zcrx_server(
            functools.partial(HalfCloseThenClose, lost), "127.0.0.1", 0, mode=mode
        )
        async with server:
            first = socket.create_connection(("127.0.0.1", port_of(server)))
            first.sendall(b"x")
            await asyncio.wait_for(lost, TIMEOUT)
            # The lowest free fd: the one the server's transport just gave up,
            # if it did close it.
            a, b = socket.socketpair()
            try:
                await asyncio.sleep(0.01)  # let anything still naming the fd run
                a.sendall(b"still writable")
                assert b.recv(100) == b"still writable"
                b.sendall(b"and readable")
                assert a.recv(100) == b"and readable"
            finally:
                a.close()
                b.close()
                first.close()
    assert calls == []


class WritesThenLetsGoOfItsSocket(asyncio.Protocol):
    """Writes more than the socket takes at once, so that a ring SEND is
    queued, then closes or detaches the socket object under its transport
    (``how``), on the loop's thread or another, and connects a socket of its
    own, which the kernel gives the lowest free number: on the loop's
    thread, the one the SEND was queued with."""

    def __init__(
        self, how: str, sink: socket.socket, lost: asyncio.Future[BaseException | None]
    ) -> None:
        self.how = how
        self.sink = sink.getsockname()
        self.lost = lost
        self.numbers: list[int] = []
        self.other: socket.socket | None = None

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.write(b"x" * (4 << 20))
        assert transport.get_write_buffer_size() > 0  # a SEND is queued
        self.numbers.append(sock.fileno())
        where, what = self.how.split("-", 1)

        def let_go() -> None:
            if what == "detach":
                os.close(sock.detach())
            else:
                for _ in range(2 if what == "close-twice" else 1):
                    sock.close()

        if where == "loop":
            let_go()
        else:
            thread = threading.Thread(target=let_go)
            thread.start()
            thread.join()
            if what == "close-then-loop-close":
                sock.close()
        self.other = socket.create_connection(self.sink)
        self.numbers.append(self.other.fileno())

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        self.lost.set_result(exc)


@pytest.mark.parametrize("mode", RING_MODES)
@pytest.mark.parametrize(
    "how",
    [
        "loop-close",
        "loop-detach",
        "thread-close",
        "thread-close-twice",
        "thread-close-then-loop-close",
        "thread-detach",
    ],
)
async def test_what_was_queued_to_send_never_reaches_the_next_owner_of_the_fd_number(mode, how):
    """The program closes or detaches get_extra_info("socket") with a SEND
    queued: the SEND goes to the kernel while the number still names the
    connection, and the connection ends with EBADF; the program's next
    socket gets none of it, on the same number (on the loop's thread) or
    once the loop let go of the old one (from another thread)."""
    loop = asyncio.get_running_loop()
    calls = record_exception_handler_calls()
    with socket.create_server(("127.0.0.1", 0)) as sink:
        lost: asyncio.Future[BaseException | None] = loop.create_future()
        protocol = WritesThenLetsGoOfItsSocket(how, sink, lost)
        server = await loop.create_zcrx_server(lambda: protocol, "127.0.0.1", 0, mode=mode)
        async with server:
            with socket.create_connection(("127.0.0.1", port_of(server))) as client:
                exc = await asyncio.wait_for(lost, TIMEOUT)
                assert isinstance(exc, OSError) and exc.errno == errno.EBADF, exc
                if how.startswith("loop"):
                    assert protocol.numbers[0] == protocol.numbers[1]  # reused
                other = protocol.other
                assert other is not None
                other.close()
                accepted, _ = sink.accept()
                with accepted:
                    accepted.settimeout(TIMEOUT)
                    assert accepted.recv(1 << 20) == b""  # nothing of the old connection
                # What the kernel took before the close reached the client.
                client.settimeout(TIMEOUT)
                assert client.recv(1 << 20).startswith(b"x")
    assert calls == []


@pytest.mark.parametrize("where", ["loop", "thread"])
async def test_a_client_connection_s_queued_send_never_reaches_the_next_owner_of_its_number(
    where,
):
    """As above, on a connection iouzcrx.open_connection made: its socket
    is the library's own too, and closing what get_extra_info("socket")
    returns lets the queued SEND go while the number still names it."""
    loop = asyncio.get_running_loop()
    calls = record_exception_handler_calls()
    with (
        socket.create_server(("127.0.0.1", 0)) as peer,
        socket.create_server(("127.0.0.1", 0)) as sink,
    ):
        reader, writer = await iouzcrx.open_connection(*peer.getsockname(), mode="bufring")
        accepted, _ = peer.accept()
        with accepted:
            sock = writer.get_extra_info("socket")
            assert sock.gettimeout() == 0.0  # non-blocking, as the transport left it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            writer.write(b"x" * (4 << 20))
            assert writer.transport.get_write_buffer_size() > 0  # a SEND is queued
            number = sock.fileno()
            if where == "loop":
                sock.close()
            else:
                await loop.run_in_executor(None, sock.close)
            with socket.create_connection(sink.getsockname()) as other:
                if where == "loop":
                    assert other.fileno() == number  # the kernel reused it
                with pytest.raises(OSError) as raised:
                    await asyncio.wait_for(reader.read(), TIMEOUT)
                assert raised.value.errno == errno.EBADF
            unrelated, _ = sink.accept()
            with unrelated:
                unrelated.settimeout(TIMEOUT)
                assert unrelated.recv(1 << 20) == b""  # nothing of the old connection
            accepted.settimeout(TIMEOUT)
            assert accepted.recv(1 << 20).startswith(b"x")
    assert calls == []


async def test_pause_then_resume_from_another_thread_leaves_the_transport_reading():
    """Both calls are handed to the loop; the resume must not be dropped
    for finding the transport not yet paused."""
    loop = asyncio.get_running_loop()
    received: list[bytes] = []
    made: asyncio.Future[asyncio.Transport] = loop.create_future()
    got = asyncio.Event()

    class Keeps(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            made.set_result(transport)

        def data_received(self, data: bytes) -> None:
            received.append(data)
            got.set()

    server = await loop.create_zcrx_server(Keeps, "127.0.0.1", 0)
    async with server:
        with socket.create_connection(("127.0.0.1", port_of(server))) as client:
            transport = await asyncio.wait_for(made, TIMEOUT)

            def pause_then_resume() -> None:
                transport.pause_reading()
                transport.resume_reading()

            await loop.run_in_executor(None, pause_then_resume)
            client.sendall(b"after resume")
            await asyncio.wait_for(got.wait(), TIMEOUT)
            assert transport.is_reading()
            assert b"".join(received) == b"after resume"


class FloodThenAbort(asyncio.Protocol):
    """Writes more than the socket takes (a ring SEND is left in flight),
    then aborts."""

    def __init__(
        self, lost: asyncio.Future[BaseException | None], made: list[FloodThenAbort]
    ) -> None:
        made.append(self)
        self.lost = lost
        self.buffered_at_abort = 0
        self.sock: socket.socket | None = None

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.sock = transport.get_extra_info("socket")
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.set_write_buffer_limits(high=64 << 20)
        transport.write(b"x" * (8 << 20))
        self.buffered_at_abort = transport.get_write_buffer_size()
        asyncio.get_running_loop().call_soon(transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        self.lost.set_result(exc)


@pytest.mark.parametrize("mode", RING_MODES)
async def test_abort_with_a_send_in_flight_is_quiet_and_ends_the_connection_cleanly(mode):
    loop = asyncio.get_running_loop()
    calls = record_exception_handler_calls()
    for _ in range(5):
        lost: asyncio.Future[BaseException | None] = loop.create_future()
        protocols: list[FloodThenAbort] = []
        factory = functools.partial(FloodThenAbort, lost, protocols)
        server = await loop.create_zcrx_server(factory, "127.0.0.1", 0, mode=mode)
        async with server:
            client = socket.create_connection(("127.0.0.1", port_of(server)))
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with client:
                assert await asyncio.wait_for(lost, TIMEOUT) is None
                assert protocols[0].buffered_at_abort > 0  # a SEND was in flight
                sock = protocols[0].sock
                assert sock is not None
                for _ in range(1000):  # the cancelled SEND completes, then the fd goes
                    if sock.fileno() == -1:
                        break
                    await asyncio.sleep(0.01)
                assert sock.fileno() == -1
                assert server.backend.buffers_in_use == 0
    assert calls == []


class ViewDuck:
    """No base class: zero-copy delivery because it has view_received."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()
        self.kinds: set[type] = set()

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def view_received(self, view: memoryview) -> None:
        self.kinds.add(type(view))
        self.data += view

    def eof_received(self) -> None:
        self.done.set_result(bytes(self.data))

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        pass


class BufferedDuck(ViewDuck):
    view_received = None  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> bytearray:
        self.buffer = bytearray(3000)
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.kinds.add(bytearray)
        self.data += self.buffer[:nbytes]


class BytesDuck(ViewDuck):
    view_received = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.kinds.add(type(data))
        self.data += data


@pytest.mark.parametrize("mode", ["bufring", "socket"])
@pytest.mark.parametrize(
    ("kind", "delivered"), [(ViewDuck, memoryview), (BufferedDuck, bytearray), (BytesDuck, bytes)]
)
async def test_protocols_are_served_by_the_methods_they_have_not_their_base_class(
    mode, kind, delivered
):
    calls = record_exception_handler_calls()
    protocols: list[ViewDuck] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_zcrx_server(
        lambda: protocols.append(kind()) or protocols[-1], "127.0.0.1", 0, mode=mode
    )
    async with server:
        payload = b"".join(bytes(c) for c in Pattern(7).chunks(1 << 20))
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(payload)
        writer.write_eof()
        while not protocols:
            await asyncio.sleep(0.01)
        assert await asyncio.wait_for(protocols[0].done, TIMEOUT) == payload
        assert protocols[0].kinds == {delivered}
        protocols[0].transport.close()
        writer.close()
    assert calls == []


class Mute:
    """Has no way to take data."""

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        pass


def failing_factory() -> Any:
    raise RuntimeError("no protocol today")


@pytest.mark.parametrize("mode", ["bufring", "socket"])
@pytest.mark.parametrize("factory", [Mute, failing_factory], ids=["unusable", "failing"])
async def test_a_connection_that_cannot_be_served_is_closed_and_reported(mode, factory):
    calls = record_exception_handler_calls()
    loop = asyncio.get_running_loop()
    server = await loop.create_zcrx_server(factory, "127.0.0.1", 0, mode=mode)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        # Closed by the server, not left to the GC (the reported exception
        # keeps the frame that made the socket alive).
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        while not calls:
            await asyncio.sleep(0.01)
    assert len(calls) == 1
    exc = calls[0]["exception"]
    if factory is Mute:
        assert isinstance(exc, TypeError) and "view_received" in str(exc)
        assert "Mute" in str(exc)
    else:
        assert isinstance(exc, RuntimeError)


async def test_set_protocol_refuses_a_protocol_that_cannot_take_data_and_changes_nothing():
    protocols: list[ViewDuck] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_zcrx_server(
        lambda: protocols.append(ViewDuck()) or protocols[-1], "127.0.0.1", 0, mode="bufring"
    )
    async with server:
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        while not protocols:
            await asyncio.sleep(0.01)
        transport = protocols[0].transport
        with pytest.raises(TypeError, match="Mute"):
            transport.set_protocol(Mute())
        assert transport.get_protocol() is protocols[0]
        writer.write(b"still served")
        writer.write_eof()
        assert await asyncio.wait_for(protocols[0].done, TIMEOUT) == b"still served"
        transport.close()
        writer.close()


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_a_socket_object_kept_past_its_loop_closes_quietly(use_uvloop: bool) -> None:
    """The program keeps get_extra_info("socket") and closes it after the
    server and the loop are gone: the fd closes, nothing raises."""
    kept: list[socket.socket] = []

    class Keeps(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            kept.append(transport.get_extra_info("socket"))

    async def serve() -> tuple[iouzcrx.ZcrxServer, socket.socket]:
        server = await iouzcrx.create_zcrx_server(Keeps, "127.0.0.1", 0, mode="bufring")
        client = socket.create_connection(("127.0.0.1", port_of(server)))
        while not kept:
            await asyncio.sleep(0.01)
        return server, client

    loop = iouzcrx.new_event_loop(use_uvloop=use_uvloop)
    try:
        server, client = loop.run_until_complete(serve())
        server.close()
    finally:
        loop.close()
    with client:
        (sock,) = kept
        fd = sock.fileno()
        assert os.path.exists(f"/proc/self/fd/{fd}")
        sock.close()
        assert sock.fileno() == -1
        assert not os.path.exists(f"/proc/self/fd/{fd}")


@pytest.mark.parametrize("side", ["server", "client"])
def test_a_socket_the_program_made_blocking_never_blocks_the_loop(side):
    """setblocking(True) on get_extra_info("socket"), then a write larger
    than the socket takes and a peer that reads only later: write() returns
    at once and the rest goes by ring SENDs. In a child: a blocking send
    would hang the loop for good."""
    from isolation import run_python

    lines = run_python(
        f"""
        import asyncio, socket, threading
        import iouzcrx

        PAYLOAD = bytes(range(256)) * (64 << 12)  # 64 MiB

        async def main():
            loop = asyncio.get_running_loop()
            if {side!r} == "server":
                made = loop.create_future()

                class Writes(asyncio.Protocol):
                    def connection_made(self, transport):
                        made.set_result(transport)

                server = await loop.create_zcrx_server(Writes, "127.0.0.1", 0, mode="bufring")
                peer = socket.create_connection(server.sockets[0].getsockname())
                transport = await made
            else:
                listener = socket.create_server(("127.0.0.1", 0))
                _, writer = await iouzcrx.open_connection(
                    *listener.getsockname(), mode="bufring"
                )
                peer, _ = listener.accept()
                transport = writer.transport
            transport.get_extra_info("socket").setblocking(True)
            transport.write(PAYLOAD)
            print("write returned", flush=True)
            received = bytearray()

            def read_all():
                while len(received) < len(PAYLOAD):
                    received.extend(peer.recv(1 << 20))

            await loop.run_in_executor(None, read_all)
            print("intact", bytes(received) == PAYLOAD)

        iouzcrx.install()
        asyncio.run(main())
        """,
        timeout=60,
    )
    assert lines == ["write returned", "intact True"]


def test_a_transport_whose_core_was_replaced_refuses_instead_of_crashing():
    """The transport's state lives in its TransportCore (iouzcrx._transport):
    a program that replaces ``_core`` gets TypeError from every method, not
    the C methods run on another object. In a child: a crash is its exit."""
    from isolation import run_python

    lines = run_python(
        """
        import asyncio, socket
        import iouzcrx

        async def main():
            made = asyncio.get_running_loop().create_future()

            class Keeps(asyncio.Protocol):
                def connection_made(self, transport):
                    made.set_result(transport)

            server = await iouzcrx.create_zcrx_server(Keeps, "127.0.0.1", 0, mode="bufring")
            client = socket.create_connection(server.sockets[0].getsockname())
            transport = await made
            core = transport._core
            for replacement in (None, object(), 7):
                transport._core = replacement
                for call in (
                    transport.close, transport.is_closing, transport.pause_reading,
                    transport.get_write_buffer_size, lambda: transport.write(b"x"),
                    lambda: repr(transport), lambda: transport.get_extra_info("peername"),
                ):
                    try:
                        call()
                    except TypeError as exc:
                        assert "_core" in str(exc), exc
                    else:
                        print("no TypeError from", call)
            transport._core = core
            transport.close()
            client.close()
            server.close()
            await server.wait_closed()
            print("refused every call")

        asyncio.run(main())
        """
    )
    assert lines == ["refused every call"]


@pytest.mark.asyncio
async def test_a_transport_subclass_gets_its_own_write_and_close_called(monkeypatch):
    """writelines() writes through write(), and an eof_received() that
    returns false closes through close(), as asyncio's transports do: a
    subclass's overrides are called."""
    import iouzcrx.server

    seen: list[Any] = []

    class Watched(iouzcrx.ZcrxTransport):
        def write(self, data):  # type: ignore[no-untyped-def]
            seen.append(bytes(data))
            super().write(data)

        def close(self):  # type: ignore[no-untyped-def]
            seen.append("close")
            super().close()

    monkeypatch.setattr(iouzcrx.server, "ZcrxTransport", Watched)
    lost = asyncio.get_running_loop().create_future()

    class Answers(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.transport = transport

        def data_received(self, data):  # type: ignore[no-untyped-def]
            self.transport.writelines([data, b"!"])

        def connection_lost(self, exc):  # type: ignore[no-untyped-def]
            lost.set_result(exc)

    server = await iouzcrx.create_zcrx_server(Answers, "127.0.0.1", 0, mode="bufring")
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(3), 30) == b"hi!"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 30) == b""
        assert await asyncio.wait_for(lost, 30) is None
        writer.close()
    assert seen == [b"hi", b"!", "close"]


@pytest.mark.asyncio
async def test_a_connection_cannot_be_started_twice():
    """start_accepted() on a connection already started (by the server)
    raises: a second connection_made and a second reader would follow."""
    made: list[Any] = []

    class Counts(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            made.append(transport)

    server = await iouzcrx.create_zcrx_server(Counts, "127.0.0.1", 0, mode="bufring")
    async with server:
        client = socket.create_connection(("127.0.0.1", port_of(server)))
        with client:
            await until(lambda: made)
            with pytest.raises(RuntimeError, match="started already"):
                made[0].start_accepted()
            await asyncio.sleep(0.05)
            assert len(made) == 1
            made[0].close()


@pytest.mark.asyncio
async def test_a_program_may_keep_its_own_attributes_on_a_transport():
    """As on asyncio's transports: an attribute the program sets stays (the
    transport keeps its own state in a slot, so the dict is made only then)."""
    made: list[Any] = []

    class Tags(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            made.append(transport)
            transport.tag = "mine"

    server = await iouzcrx.create_zcrx_server(Tags, "127.0.0.1", 0, mode="bufring")
    async with server:
        client = socket.create_connection(("127.0.0.1", port_of(server)))
        with client:
            await until(lambda: made)
            assert made[0].tag == "mine" and vars(made[0]) == {"tag": "mine"}
            made[0].close()


@pytest.mark.asyncio
async def test_a_steer_set_while_the_server_serves_sees_the_next_connection():
    """The accept completions serve each connection in C until a steer (or
    a router) is set; set later, it is asked about the next one."""
    steered: list[socket.socket] = []

    def steer(sock: socket.socket) -> bool:
        steered.append(sock)  # taken: this test closes it
        return True

    made: list[Any] = []

    class Made(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            made.append(transport)
            transport.close()

    server = await iouzcrx.create_zcrx_server(Made, "127.0.0.1", 0, mode="bufring")
    async with server:
        port = port_of(server)
        with socket.create_connection(("127.0.0.1", port)):
            await until(lambda: made)
        server._steer = steer  # type: ignore[attr-defined]
        with socket.create_connection(("127.0.0.1", port)):
            await until(lambda: steered)
        assert len(steered) == 1 and len(made) == 1
        for sock in steered:
            sock.close()


def test_a_core_given_a_wrong_queue_refuses_instead_of_crashing():
    """A TransportCore made with something that is not a receive queue, or
    made by __new__ and never set up: starting it reports TypeError (the
    loop's handler) instead of C code reading a queue that is not one. In a
    child: a crash is its exit."""
    from isolation import run_python

    lines = run_python(
        """
        import asyncio, socket
        from iouzcrx.reactor import Reactor
        from iouzcrx._transport import TransportCore

        class NotAQueue:
            mode = "bufring"

            def __init__(self, ring):
                self.ring = ring

            def pin_account(self):
                return None

        async def main():
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(
                lambda _loop, context: print(type(context["exception"]).__name__))
            reactor = Reactor.for_loop(loop)
            ours, peer = socket.socketpair()
            core = TransportCore(None, reactor, NotAQueue(reactor.ring), ours,
                                 asyncio.Protocol(), {}, None, None, False)
            core.start_accepted()
            bare = TransportCore.__new__(TransportCore)
            for call in (bare.start_accepted, lambda: bare.get_extra_info("zcrx_mode")):
                try:
                    call()
                except Exception as exc:
                    print(type(exc).__name__)
            peer.close()

        asyncio.run(main())
        """
    )
    assert lines == ["TypeError", "AttributeError", "AttributeError"], lines


@pytest.mark.asyncio
async def test_a_protocol_switched_to_views_is_no_longer_held_by_the_receive():
    """set_protocol() from a bytes protocol to a zero-copy one mid-stream:
    the receive lets go of the old protocol's data_received at once, and
    every byte arrives, in order, at one or the other."""
    import gc
    import weakref

    got = bytearray()
    done = asyncio.get_running_loop().create_future()

    class Views(iouzcrx.ZeroCopyProtocol):
        def view_received(self, view: memoryview) -> None:
            got.extend(view)

        def eof_received(self) -> None:
            done.set_result(None)

    class Bytes(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            got.extend(data)
            if len(got) >= 1 << 20 and isinstance(self.transport.get_protocol(), Bytes):
                self.transport.set_protocol(Views())
                old.append(weakref.ref(self))

    old: list[Any] = []
    server = await iouzcrx.create_zcrx_server(Bytes, "127.0.0.1", 0, mode="bufring")
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        total = 8 << 20
        for chunk in Pattern(3).chunks(total, 1 << 20):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(done, TIMEOUT)
        verifier = Verifier(3)
        verifier.feed(memoryview(got))
        assert len(got) == total
        gc.collect()
        assert old and old[0]() is None, "the receive still holds the old protocol"
        writer.close()
