"""create_zcrx_server, transports and protocols, on the stock loop and on
uvloop (tests/conftest.py runs each test on both), in every mode the kernel
can run."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import resource
import socket

import pytest
from conftest import SERVER_MODES, Pattern, Verifier

import iouzcrx

pytestmark = pytest.mark.parametrize("mode", SERVER_MODES)

TIMEOUT = 60


class Recorder(iouzcrx.ZeroCopyProtocol):
    """Verifies the stream against a pattern; keeps views if asked to."""

    def __init__(self, seed: int = 1, keep: bool = False) -> None:
        self.verifier = Verifier(seed)
        self.keep = keep
        self.views: list[memoryview] = []
        self.transport: asyncio.Transport | None = None
        self.eof = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def view_received(self, view: memoryview) -> None:
        assert view.readonly
        self.verifier.feed(view)
        if self.keep:
            self.views.append(view)

    def eof_received(self) -> None:
        self.eof.set_result(self.verifier.pos)

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        if not self.lost.done():
            self.lost.set_result(exc)


async def start(mode: str, factory, **kwargs) -> iouzcrx.ZcrxServer:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    return await loop.create_zcrx_server(factory, "127.0.0.1", 0, mode=mode, **kwargs)


async def first(protocols: list):  # type: ignore[no-untyped-def, type-arg]
    """The first connection's protocol, once the server has accepted it."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not protocols:
        assert asyncio.get_running_loop().time() < deadline, "no connection was accepted"
        await asyncio.sleep(0.01)
    return protocols[0]


def port_of(server: iouzcrx.ZcrxServer) -> int:
    return int(server.sockets[0].getsockname()[1])


async def send_pattern(port: int, seed: int, total: int, *, eof: bool = True):  # type: ignore[no-untyped-def]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for chunk in Pattern(seed).chunks(total):
        writer.write(chunk)
        await writer.drain()
    if eof:
        writer.write_eof()
    return reader, writer


async def test_server_lifecycle_and_async_with(mode):
    server = await start(mode, Recorder)
    assert server.is_serving() and server.mode == mode
    assert len(server.sockets) == 1 and server.get_loop() is asyncio.get_running_loop()
    async with server:
        _, writer = await send_pattern(port_of(server), 1, 1000)
        writer.close()
    assert not server.is_serving() and server.sockets == ()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)


async def test_a_zero_copy_protocol_receives_every_byte_as_views(mode):
    protocols: list[Recorder] = []

    def factory() -> Recorder:
        protocols.append(Recorder(seed=3))
        return protocols[-1]

    async with await start(mode, factory) as server:
        total = 24 << 20
        _, writer = await send_pattern(port_of(server), 3, total)
        assert await asyncio.wait_for((await first(protocols)).eof, TIMEOUT) == total
        transport = protocols[0].transport
        assert transport is not None
        assert transport.get_extra_info("zcrx_mode") == mode
        assert transport.get_extra_info("peername") == writer.get_extra_info("sockname")
        writer.close()
        await asyncio.wait_for(protocols[0].lost, TIMEOUT)
        assert server.backend.buffers_in_use == 0


class BytesProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes
        self.chunks.append(data)

    def eof_received(self) -> None:
        self.done.set_result(b"".join(self.chunks))


class CopyingBufferedProtocol(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buffer = bytearray(10_000)  # smaller than a chunk: several copies each
        self.data = bytearray()
        self.done = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.buffer[:nbytes]

    def eof_received(self) -> None:
        self.done.set_result(bytes(self.data))


@pytest.mark.parametrize("kind", [BytesProtocol, CopyingBufferedProtocol])
async def test_stock_protocols_get_copies_and_buffers_return_at_once(mode, kind):
    protocols: list = []

    def factory():  # type: ignore[no-untyped-def]
        protocols.append(kind())
        return protocols[-1]

    async with await start(mode, factory) as server:
        total = 4 << 20
        _, writer = await send_pattern(port_of(server), 4, total)
        data = await asyncio.wait_for((await first(protocols)).done, TIMEOUT)
        assert data == b"".join(bytes(c) for c in Pattern(4).chunks(total))
        assert server.backend.buffers_in_use == 0
        writer.close()


class Echo(iouzcrx.ZeroCopyProtocol):
    def __init__(self, high: int | None = None) -> None:
        self.high = high
        self.pauses = 0
        self.resumes = 0

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        if self.high is not None:
            transport.set_write_buffer_limits(high=self.high)
            # Small kernel buffers, so the echo backs up in the transport.
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)

    def view_received(self, view: memoryview) -> None:
        self.transport.write(view)

    def eof_received(self) -> bool:
        self.transport.write_eof()
        self.transport.close()  # after the queued echo has gone out
        return True

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        self.resumes += 1


async def test_the_write_path_echoes_with_write_flow_control(mode):
    echoes: list[Echo] = []

    def factory() -> Echo:
        echoes.append(Echo(high=16 << 10))
        return echoes[-1]

    async with await start(mode, factory) as server:
        total = 8 << 20
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)

        async def feed() -> None:
            for chunk in Pattern(5).chunks(total):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        # Send everything before reading any of it back, so the echo's writes
        # pile up in the server's transport and cross the high-water mark.
        await asyncio.wait_for(feed(), TIMEOUT)
        verifier = Verifier(5)
        while chunk := await asyncio.wait_for(reader.read(1 << 20), TIMEOUT):
            verifier.feed(memoryview(chunk))
        assert verifier.pos == total
        assert echoes[0].pauses >= 1 and echoes[0].resumes == echoes[0].pauses
        writer.close()


async def test_write_refuses_what_is_not_bytes_and_the_connection_goes_on(mode):
    """As asyncio's transports: TypeError, and nothing sent (bytes(3) would
    send three NULs, and a list its items), whether the socket takes writes
    at once or they queue behind one it did not take."""
    made: list[asyncio.Transport] = []

    class Keeps(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            made.append(transport)

    async with await start(mode, Keeps) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        transport = await first(made)
        for queued in (b"", b"q" * (8 << 20)):
            transport.write(queued)
            for bad in ("text", 3, [66, 67], None):
                with pytest.raises(TypeError, match="bytes-like"):
                    transport.write(bad)  # type: ignore[arg-type]
            transport.write(b"END")
            expected = queued + b"END"
            got = await asyncio.wait_for(reader.readexactly(len(expected)), TIMEOUT)
            assert got == expected
        assert not transport.is_closing()
        writer.close()


@pytest.mark.parametrize(
    "view",
    [
        lambda data: memoryview(data).cast("I"),
        lambda data: memoryview(data).cast("B", (4, len(data) // 4)),
        lambda data: memoryview(data).cast("Q")[::2],
    ],
    ids=["wide-items", "two-dimensions", "strided"],
)
async def test_write_sends_a_view_of_wider_items_whole(mode, view):
    """A view's len counts items: a partial send of one must go on from the
    byte the socket stopped at, not from that many items in; a view with
    gaps sends its items' bytes, in order."""
    made: list[asyncio.Transport] = []

    class Keeps(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            made.append(transport)

    data = os.urandom(16 << 20)
    expected = view(data).tobytes() + b"END"
    async with await start(mode, Keeps) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        transport = await first(made)
        transport.write(view(data))  # more than the socket takes at once
        transport.write(b"END")
        got = await asyncio.wait_for(reader.readexactly(len(expected)), TIMEOUT)
        assert got == expected
        writer.close()


async def test_pause_reading_stops_delivery_until_resumed(mode):
    protocols: list[Recorder] = []

    class PausingOnce(Recorder):
        paused_once = False

        def view_received(self, view: memoryview) -> None:
            super().view_received(view)
            if self.verifier.pos >= 64 << 10 and not self.paused_once:
                self.paused_once = True
                self.transport.pause_reading()  # type: ignore[union-attr]

    def factory() -> Recorder:
        protocols.append(PausingOnce(seed=6))
        return protocols[-1]

    async with await start(mode, factory) as server:
        total = 2 << 20
        _, writer = await send_pattern(port_of(server), 6, total)
        while not protocols or not protocols[0].paused_once:  # type: ignore[attr-defined]
            await asyncio.sleep(0.01)
        transport = protocols[0].transport
        assert transport is not None and not transport.is_reading()
        paused_at = protocols[0].verifier.pos
        await asyncio.sleep(0.5)
        assert protocols[0].verifier.pos == paused_at < total  # nothing while paused
        transport.resume_reading()
        assert transport.is_reading()
        assert await asyncio.wait_for((await first(protocols)).eof, TIMEOUT) == total
        writer.close()


async def test_pausing_inside_a_coalesced_batch_holds_back_the_rest_without_loss(mode):
    """4 KiB buffers: one CQE batch holds many adjacent chunks. Pausing from
    view_received holds back the rest of the batch (runs not yet delivered
    included) until resume_reading, then delivers it in order."""
    protocols: list[Recorder] = []

    class PausingOften(Recorder):
        paused = False
        pauses = 0

        def view_received(self, view: memoryview) -> None:
            assert not self.paused, "a view arrived while reading was paused"
            super().view_received(view)
            if self.pauses < 50:
                self.pauses += 1
                self.paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]
                asyncio.get_running_loop().call_later(0.002, self.resume)

        def resume(self) -> None:
            self.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def factory() -> Recorder:
        protocols.append(PausingOften(seed=15))
        return protocols[-1]

    async with await start(mode, factory, buffer_size=4096, area_size=1 << 20) as server:
        total = 8 << 20
        _, writer = await send_pattern(port_of(server), 15, total)
        assert await asyncio.wait_for((await first(protocols)).eof, TIMEOUT) == total
        assert protocols[0].pauses >= 2  # type: ignore[attr-defined]
        writer.close()
        await asyncio.wait_for(protocols[0].lost, TIMEOUT)
        assert server.backend.buffers_in_use == 0


async def test_half_close_lets_the_server_answer_after_eof(mode):
    class Answer(iouzcrx.ZeroCopyProtocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.transport = transport
            self.size = 0

        def view_received(self, view: memoryview) -> None:
            self.size += len(view)

        def eof_received(self) -> bool:
            self.transport.write(f"got {self.size}".encode())
            self.transport.close()
            return True

    async with await start(mode, Answer) as server:
        reader, writer = await send_pattern(port_of(server), 7, 300_000)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b"got 300000"
        writer.close()


async def test_a_thousand_connections_each_receive_exactly_their_own_bytes(mode):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"needs 4096 file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    results: dict[int, bytes] = {}

    class ByConnection(iouzcrx.ZeroCopyProtocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.parts: list[bytes] = []

        def view_received(self, view: memoryview) -> None:
            self.parts.append(view.tobytes())

        def eof_received(self) -> None:
            data = b"".join(self.parts)
            results[int.from_bytes(data[:4], "little")] = data

    count, size = 1000, 3000
    async with await start(mode, ByConnection, backlog=1024) as server:

        async def client(i: int) -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(i.to_bytes(4, "little") + Pattern(i).expected(0, size))
            writer.write_eof()
            await writer.drain()
            writer.close()

        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(count))), TIMEOUT)
        while len(results) < count:
            await asyncio.sleep(0.05)
    assert sorted(results) == list(range(count))
    for i, data in results.items():
        assert data[4:] == Pattern(i).expected(0, size)


async def test_closing_the_server_while_views_are_held_keeps_them_readable(mode):
    protocols: list[Recorder] = []

    def factory() -> Recorder:
        protocols.append(Recorder(seed=8, keep=True))
        return protocols[-1]

    server = await start(mode, factory)
    backend = server.backend
    _, writer = await send_pattern(port_of(server), 8, 1 << 20)
    await asyncio.wait_for((await first(protocols)).eof, TIMEOUT)
    server.close()
    server.abort_clients()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    writer.close()
    views = protocols[0].views
    assert backend.buffers_in_use >= 1
    check = Verifier(8)
    for view in views:
        check.feed(view)  # still mapped, still the right bytes
    assert check.pos == 1 << 20
    del view
    views.clear()
    gc.collect()
    assert backend.buffers_in_use == 0


async def test_an_exception_in_user_code_goes_to_the_loop_handler(mode):
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    class Faulty(Recorder):
        def view_received(self, view: memoryview) -> None:
            raise ValueError("boom in user code")

    protocols: list[Recorder] = []
    faulty = True  # the first connection's protocol fails, the next one's not

    def factory() -> Recorder:
        protocols.append(Faulty(seed=9) if faulty else Recorder(seed=10))
        return protocols[-1]

    async with await start(mode, factory) as server:
        _, writer = await send_pattern(port_of(server), 9, 100_000, eof=False)
        while not reported:
            await asyncio.sleep(0.01)
        assert isinstance(reported[0]["exception"], ValueError)
        writer.close()
        # The server, and the reactor under it, still serve the next client.
        loop.set_exception_handler(None)
        protocols.clear()
        faulty = False
        _, writer = await send_pattern(port_of(server), 10, 100_000)
        assert await asyncio.wait_for((await first(protocols)).eof, TIMEOUT) == 100_000
        writer.close()


async def test_an_exception_in_view_received_is_a_fatal_error_of_its_transport(mode):
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    protocols: list[Recorder] = []

    class FailsOnSecondView(Recorder):
        calls = 0

        def view_received(self, view: memoryview) -> None:
            self.calls += 1
            if self.calls == 2:
                raise KeyError("second view")
            super().view_received(view)

    def factory() -> Recorder:
        protocols.append(FailsOnSecondView(seed=11))
        return protocols[-1]

    try:
        async with await start(mode, factory) as server:
            # Written without waiting for drain: the server resets the
            # connection while the data is still going out.
            _, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            for chunk in Pattern(11).chunks(1 << 20):
                writer.write(chunk)
            protocol = await first(protocols)
            lost = await asyncio.wait_for(protocol.lost, TIMEOUT)
            # The transport's fatal-error path: reported with the transport,
            # closed, and the protocol told why.
            assert isinstance(lost, KeyError)
            assert protocol.transport is not None and protocol.transport.is_closing()
            (context,) = [c for c in reported if c.get("exception") is lost]
            if mode != "socket":  # socket mode: the loop's own transport reports
                assert context["transport"] is protocol.transport
                assert context["protocol"] is protocol
            assert protocol.calls == 2  # nothing delivered after the failure
            writer.close()
            # The traceback holds the failing call's frame, and its view.
            lost.__traceback__ = None
            gc.collect()
            deadline = loop.time() + TIMEOUT
            while server.backend.buffers_in_use and loop.time() < deadline:
                await asyncio.sleep(0.01)
            assert server.backend.buffers_in_use == 0
    finally:
        loop.set_exception_handler(None)


async def test_ssl_is_refused_with_the_reason(mode):
    with pytest.raises(ValueError, match="ssl= is not supported"):
        await start(mode, Recorder, ssl=object())


async def test_views_released_on_another_thread_resume_a_starved_connection(mode):
    """Holding every buffer it may (its share of the area in the ring modes,
    all of it in socket mode) stops reading (TCP holds the sender);
    releasing them on another thread resumes it, and nothing is lost."""
    import threading

    protocols: list[Recorder] = []

    def factory() -> Recorder:
        protocols.append(Recorder(seed=12, keep=True))
        return protocols[-1]

    server = await start(mode, factory, area_size=1 << 20, buffer_size=64 << 10)
    async with server:
        total = 16 << 20
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)

        async def feed() -> None:
            for chunk in Pattern(12).chunks(total):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()

        feeding = asyncio.ensure_future(feed())
        protocol = await first(protocols)
        backend = server.backend
        assert protocol.transport is not None
        pins = protocol.transport.get_extra_info("pin_account")

        def holding_all_it_may() -> bool:
            if pins is not None:
                return bool(pins.stalled)
            return bool(backend.buffers_in_use == backend.total_buffers)

        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while not holding_all_it_may():
            assert asyncio.get_running_loop().time() < deadline, "reading never stopped"
            await asyncio.sleep(0.01)
        held_at = protocol.verifier.pos
        await asyncio.sleep(0.3)
        assert protocol.verifier.pos == held_at < total  # starved: nothing arrives
        assert not feeding.done()  # and the sender is held back

        protocol.keep = False
        views, protocol.views = protocol.views, []
        releaser = threading.Thread(target=views.clear)
        releaser.start()
        del views
        releaser.join()
        assert await asyncio.wait_for(protocol.eof, TIMEOUT) == total
        await feeding
        writer.close()


async def test_closing_the_loops_ring_aborts_its_connections(mode):
    if mode == "socket":
        pytest.skip("socket mode has no ring")
    protocols: list[Recorder] = []

    def factory() -> Recorder:
        protocols.append(Recorder(seed=13))
        return protocols[-1]

    server = await start(mode, factory)
    _, writer = await send_pattern(port_of(server), 13, 100_000, eof=False)
    protocol = await first(protocols)
    while protocol.verifier.pos < 100_000:
        await asyncio.sleep(0.01)
    iouzcrx.reactor.Reactor.for_loop().close()
    lost = await asyncio.wait_for(protocol.lost, TIMEOUT)
    assert isinstance(lost, ConnectionAbortedError)
    assert not protocol.eof.done()  # an abort, not an end of stream
    server.close()
    writer.close()


async def test_watched_sockets_wake_the_loop_when_the_ring_eventfd_does_not(mode):
    """Where the kernel signals the ring's eventfd late (Linux 7.3), the loop
    also watches the sockets: with the eventfd not watched at all, a server
    still accepts, answers every request, sees the end of the stream and
    closes without an error reported."""
    if mode == "socket":
        pytest.skip("socket mode has no ring")
    if mode == "bufring":
        pytest.skip(
            "bufring receives run on the ring without DEFER_TASKRUN: the kernel completes "
            "them itself, leaving no deferred work for a socket hint to run"
        )
    from iouzcrx.reactor import Reactor

    loop = asyncio.get_running_loop()
    errors: list[dict] = []  # type: ignore[type-arg]
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    ring = Reactor.for_loop(loop).zcrx_ring()  # the server's queue registers on it
    hints = ring.watches_sockets
    ring.watches_sockets = True
    try:
        server = await start(mode, Echo)
        # The ring's eventfd stays silent, as a late-signalling kernel's.
        loop.remove_reader(ring.eventfd)
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
        for i in range(50):
            request = b"%04d" % i * (1 + i * 13)
            writer.write(request)
            # Without the socket hints nothing would drain the ring: this waits out its timeout.
            assert await asyncio.wait_for(reader.readexactly(len(request)), 10) == request
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the server closed
        writer.close()
        server.close()
        await server.wait_closed()
    finally:
        loop.add_reader(ring.eventfd, ring.on_eventfd_readable)
        ring.watches_sockets = hints
    deadline = loop.time() + 10
    while ring.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert ring.in_flight == 0
    assert errors == []


# Socket mode: asyncio's own accept loop reports EMFILE to the handler.
@pytest.mark.allow_exception_handler
async def test_a_server_out_of_file_descriptors_accepts_again_once_they_return(mode, caplog):
    """accept() failing with EMFILE is logged and retried after a pause; the
    waiting connection is served once descriptors are free again. (Socket
    mode accepts through the loop's own server, whose policy may drop the
    waiting connection, as libuv's does: there a new one must be served.)"""
    loop = asyncio.get_running_loop()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []
    # The client's socket exists before the descriptors run out; connecting
    # it needs none.
    late = socket.socket()
    late.setblocking(False)
    try:
        # Lowered before the server arms its accept: io_uring takes the limit
        # when the request is prepared.
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 64, hard))
        async with await start(mode, Echo) as server:
            with pytest.raises(OSError) as exhausted:
                while True:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
            assert exhausted.value.errno == errno.EMFILE
            await loop.sock_connect(late, ("127.0.0.1", port_of(server)))
            await asyncio.sleep(0.2)  # the accept fails meanwhile
            for fd in fillers:
                os.close(fd)
            fillers.clear()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            if mode == "socket":
                late.close()
                late = await asyncio.to_thread(
                    socket.create_connection, ("127.0.0.1", port_of(server))
                )
                late.setblocking(False)
            await loop.sock_sendall(late, b"still here")
            got = await asyncio.wait_for(loop.sock_recv(late, 100), TIMEOUT)
            assert got == b"still here"
            late.close()
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        late.close()
    if mode != "socket":
        assert "accept failed (EMFILE)" in caplog.text


async def test_a_bound_socket_that_is_not_listening_is_listened_on_as_asyncio_does(mode):
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    async with await loop.create_zcrx_server(Echo, sock=sock, mode=mode) as server:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port_of(server)), TIMEOUT
        )
        writer.write(b"served")
        assert await asyncio.wait_for(reader.readexactly(6), TIMEOUT) == b"served"
        writer.close()
        server.close_clients()


async def test_an_accept_error_that_repeats_backs_off_instead_of_spinning(mode, caplog):
    if mode == "socket":
        pytest.skip("the loop's own server accepts in socket mode")
    server = await start(mode, Echo)
    arms = 0
    arm = server._arm_accept

    def counting_arm(sock: socket.socket) -> None:
        nonlocal arms
        arms += 1
        arm(sock)

    server._arm_accept = counting_arm  # type: ignore[method-assign]
    # A listener shut down under the server fails every accept with EINVAL.
    server.sockets[0].shutdown(socket.SHUT_RD)
    for _ in range(500):
        await asyncio.sleep(0)
    # One immediate retry (the error might have been one connection's), then
    # a pause: a hot loop would have re-armed on every iteration.
    assert arms <= 2
    assert "accept failed (EINVAL" in caplog.text
    server.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)


async def test_after_close_returns_the_port_refuses_connections(mode):
    server = await start(mode, Echo)
    port = port_of(server)
    server.close()
    probe = socket.socket()
    probe.settimeout(TIMEOUT)
    try:
        with pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))
    finally:
        probe.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
