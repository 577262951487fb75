"""What one accepted connection costs, as guarantees: the library does not
ask the kernel again what the sockets it accepted itself are, while a socket
a program passes in is always checked; a connection the ring accepted is
started from the accept's own drain, scheduling no drain of its own; its
addresses are kept as the kernel gives them and still answer after the
socket closed; and a connection that ended is freed by reference counting,
not left to the cyclic GC. Each runs on the stock loop and on uvloop
(tests/conftest.py)."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import RECEIVE_MODES
from isolation import child_env, run_python

import iouzcrx
from iouzcrx import _checks
from iouzcrx import _transport as transport_module
from iouzcrx._receive import AcceptedFd
from iouzcrx.reactor import Reactor

# Every ring mode; the benchmark script's test runs in bufring mode only (the
# accept path is the same in every mode, and strace under the VM's TCG makes
# it take minutes).
each_mode = pytest.mark.parametrize("mode", RECEIVE_MODES)

TIMEOUT = 60
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
# getsockopt(2) on x86_64: the filter below names the syscall by number.
GETSOCKOPT_X86_64 = 55


class Held(iouzcrx.ZeroCopyProtocol):
    """Holds its transport, as most protocols do (a reference cycle)."""

    def __init__(self, seen: list[Held]) -> None:
        seen.append(self)
        self.transport: asyncio.BaseTransport | None = None
        self.bytes = 0
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def view_received(self, view: memoryview) -> None:
        self.bytes += len(view)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


async def serve_one(mode: str, seen: list[Held]) -> int:
    """Serve one connection that sends 64 KiB and closes; its byte count."""
    server = await asyncio.get_running_loop().create_zcrx_server(
        lambda: Held(seen), "127.0.0.1", 0, mode=mode
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x" * (64 << 10))
        writer.write_eof()
        while not seen:
            await asyncio.sleep(0.01)
        await asyncio.wait_for(seen[0].lost, TIMEOUT)
        writer.close()
    return seen[0].bytes


@each_mode
async def test_an_ended_connection_is_freed_by_reference_counting_alone(mode):
    seen: list[Held] = []
    gc.collect()
    gc.disable()
    try:
        assert await serve_one(mode, seen) == 64 << 10
        protocol = weakref.ref(seen[0])
        transport = weakref.ref(seen[0].transport)
        sock = weakref.ref(seen[0].transport.get_extra_info("socket"))
        seen.clear()
        for _ in range(3):  # the loop's handles of the last callbacks go
            await asyncio.sleep(0)
        assert protocol() is None, "the protocol waits for the cyclic GC"
        assert transport() is None, "the transport waits for the cyclic GC"
        assert sock() is None, "the socket waits for the cyclic GC"
    finally:
        gc.enable()


@each_mode
async def test_a_closed_server_is_freed_by_reference_counting_alone(mode):
    """Its accept completions hold the server while an accept is in the
    ring; once closed, nothing holds it in a cycle."""
    seen: list[Held] = []
    gc.collect()
    gc.disable()
    try:
        server = await asyncio.get_running_loop().create_zcrx_server(
            lambda: Held(seen), "127.0.0.1", 0, mode=mode
        )
        server.close()
        await server.wait_closed()
        for _ in range(5):  # the accept's cancellation completes
            await asyncio.sleep(0.01)
        freed = weakref.ref(server)
        del server
        assert freed() is None, "the server waits for the cyclic GC"
    finally:
        gc.enable()


@each_mode
async def test_a_connection_refused_at_set_up_is_freed_by_reference_counting_alone(mode):
    """A protocol the transport cannot deliver to (no data method): the
    connection is closed and reported, and its protocol, transport and core
    go at once."""
    alive: weakref.WeakSet[Any] = weakref.WeakSet()
    reported: list[dict[str, Any]] = []

    class NoDataMethod:
        def __init__(self) -> None:
            alive.add(self)

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    gc.collect()
    gc.disable()
    try:
        server = await loop.create_zcrx_server(NoDataMethod, "127.0.0.1", 0, mode=mode)
        async with server:
            port = server.sockets[0].getsockname()[1]
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # closed
                writer.close()
        assert len(reported) == 3 and all(
            isinstance(context["exception"], TypeError) for context in reported
        )
        assert len(alive) == 0, "refused protocols wait for the cyclic GC"
    finally:
        gc.enable()
        loop.set_exception_handler(None)


@each_mode
async def test_the_sockets_the_server_accepts_are_known_to_be_connected_streams(mode):
    seen: list[Held] = []
    assert await serve_one(mode, seen) == 64 << 10
    accepted = seen[0].transport.get_extra_info("socket")
    assert type(accepted) is _checks.AcceptedSocket
    assert isinstance(accepted, socket.socket) and accepted.fileno() == -1  # closed with it
    # Closed, it gets the full check, which names what is wrong.
    with pytest.raises(ValueError, match="closed"):
        _checks.stream_socket_fd("sock", accepted)


@each_mode
async def test_a_socket_a_program_passes_in_is_still_checked(mode):
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        with pytest.raises(ValueError, match="listening socket"):
            _checks.stream_socket_fd("sock", listener)
        plain = socket.socket(fileno=listener.fileno())
        try:
            with pytest.raises(ValueError, match="listening socket"):
                _checks.stream_socket_fd("sock", plain)
        finally:
            plain.detach()
    finally:
        listener.close()


@each_mode
@pytest.mark.skipif(
    platform.machine() != "x86_64",
    reason=f"the seccomp filter names getsockopt by its x86_64 number, not {platform.machine()}'s",
)
def test_an_accepted_connection_is_served_without_asking_the_kernel_what_its_socket_is(mode):
    """With getsockopt refused by a seccomp filter, a served connection
    still receives every byte (nothing asks what its socket is), and a
    socket passed in by the program is still refused by the check."""
    lines = run_python(
        f"""
        import asyncio, errno, socket, threading
        import isolation
        import iouzcrx

        class Count(iouzcrx.ZeroCopyProtocol):
            def __init__(self):
                self.bytes = 0
                self.lost = asyncio.get_running_loop().create_future()
            def view_received(self, view):
                self.bytes += len(view)
            def connection_lost(self, exc):
                self.lost.set_result(exc)

        def client(port):
            # A blocking client: asyncio's connect would ask SO_ERROR.
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"y" * 100000)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)

        async def main():
            loop = asyncio.get_running_loop()
            protocols = []
            server = await iouzcrx.create_zcrx_server(
                lambda: protocols.append(Count()) or protocols[-1],
                "127.0.0.1", 0, mode={mode!r})
            isolation.block_io_uring(errno.EPERM, {GETSOCKOPT_X86_64}, {GETSOCKOPT_X86_64})
            port = server.sockets[0].getsockname()[1]
            thread = threading.Thread(target=client, args=(port,))
            thread.start()
            while not protocols:
                await asyncio.sleep(0.01)
            print("lost", await asyncio.wait_for(protocols[0].lost, 30))
            print("bytes", protocols[0].bytes)
            other, peer = socket.socketpair()
            try:
                server.backend.recv_multishot(other)
            except ValueError as exc:
                print("refused", "not a usable socket" in str(exc))
            other.close()
            peer.close()
            server.close()
            await server.wait_closed()
            await loop.run_in_executor(None, thread.join)

        asyncio.run(main())
        """
    )
    assert lines == ["lost None", "bytes 100000", "refused True"], lines


class Sequence(iouzcrx.ZeroCopyProtocol):
    """Records what reaches it, in order; ``fail`` makes connection_made
    raise that exception."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.events: list[str] = []
        self.bytes = 0
        self.fail = fail
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.events.append("made")
        if self.fail is not None:
            raise self.fail

    def view_received(self, view: memoryview) -> None:
        if self.events[-1] != "data":
            self.events.append("data")
        self.bytes += len(view)

    def eof_received(self) -> None:
        self.events.append("eof")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


def send_and_close(port: int, size: int) -> None:
    """A blocking client (on a thread): it never runs on the server's loop."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(b"z" * size)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)  # until the server closes


async def serve_from_thread(mode: str, protocol: Sequence) -> int:
    """Serve one connection from a blocking client; how many drains the
    connection scheduled on the loop (Reactor.schedule) from its accept to
    its connection_lost."""
    loop = asyncio.get_running_loop()
    server = await iouzcrx.create_zcrx_server(lambda: protocol, "127.0.0.1", 0, mode=mode)
    reactor = Reactor.for_loop(loop)
    schedule = reactor.schedule
    scheduled = 0

    def counting() -> None:
        nonlocal scheduled
        scheduled += 1
        schedule()

    async with server:
        port = server.sockets[0].getsockname()[1]
        reactor.schedule = counting  # type: ignore[method-assign]
        try:
            client = loop.run_in_executor(None, send_and_close, port, 100000)
            assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
            await asyncio.wait_for(client, TIMEOUT)
        finally:
            del reactor.schedule
    return scheduled


@each_mode
async def test_a_connection_the_ring_accepted_is_started_by_the_accept_s_drain(mode):
    """connection_made runs from the accept's completion and the receive it
    arms goes out in that same drain: the connection schedules no drain (a
    loop callback and an enter) of its own to start, and the protocol still
    sees connection_made first and every byte."""
    protocol = Sequence()
    assert await serve_from_thread(mode, protocol) == 0
    assert protocol.events == ["made", "data", "eof", "lost"]
    assert protocol.bytes == 100000


@each_mode
async def test_connection_made_raising_is_reported_and_the_connection_served(
    mode, exception_handler_calls
):
    """As from a loop callback: the loop's handler gets the exception, and
    the connection is served even so."""
    error = RuntimeError("connection_made failed on purpose")
    protocol = Sequence(fail=error)
    await serve_from_thread(mode, protocol)
    assert protocol.events == ["made", "data", "eof", "lost"]
    assert protocol.bytes == 100000
    assert any(c.get("exception") is error for c in exception_handler_calls)


def ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@each_mode
@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        pytest.param(
            "::1",
            marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback address here"),
        ),
    ],
)
async def test_the_addresses_are_the_socket_module_s_and_known_after_close(mode, host):
    """Read when the connection is accepted, as asyncio's transports do, but
    made into Python objects only when asked for: they equal what the
    socket module says, before and after the socket is closed."""
    loop = asyncio.get_running_loop()
    protocol = Sequence()
    transports: list[asyncio.BaseTransport] = []
    protocol.connection_made = transports.append  # type: ignore[method-assign,assignment]
    server = await iouzcrx.create_zcrx_server(lambda: protocol, host, 0, mode=mode)
    async with server:
        port = server.sockets[0].getsockname()[1]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        client = socket.socket(family, socket.SOCK_STREAM)
        try:
            client.setblocking(False)
            await loop.sock_connect(client, (host, port))
            while not transports:
                await asyncio.sleep(0.01)
            transport = transports[0]
            sock = transport.get_extra_info("socket")
            server_end, client_end = client.getpeername(), client.getsockname()
            assert sock.getsockname() == server_end
            assert sock.getpeername() == client_end
            client.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
            assert sock.fileno() == -1  # closed: only what was kept answers
            assert transport.get_extra_info("sockname") == server_end
            assert transport.get_extra_info("peername") == client_end
        finally:
            client.close()


@each_mode
@pytest.mark.parametrize(
    "listen, connect",
    [
        ("0.0.0.0", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        pytest.param(
            "::",
            "::1",
            marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback address here"),
        ),
    ],
)
async def test_each_accepted_connection_knows_its_own_local_address_and_has_no_delay(
    mode, listen, connect
):
    """A listener on a wildcard address accepts connections to several
    local addresses: each is asked for its own. Every accepted socket, the
    first and the later ones, has TCP_NODELAY, as asyncio sets it."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []

    class Keeps(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)

    server = await iouzcrx.create_zcrx_server(Keeps, listen, 0, mode=mode)
    async with server:
        port = server.sockets[0].getsockname()[1]
        family = socket.AF_INET6 if ":" in connect else socket.AF_INET
        clients = []
        try:
            for count in range(1, 4):
                client = socket.socket(family, socket.SOCK_STREAM)
                clients.append(client)
                client.setblocking(False)
                await loop.sock_connect(client, (connect, port))
                for _ in range(3000):
                    if len(transports) == count:
                        break
                    await asyncio.sleep(0.01)
                transport = transports[-1]
                assert transport.get_extra_info("sockname") == client.getpeername()
                assert transport.get_extra_info("peername") == client.getsockname()
                sock = transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            for client in clients:
                client.close()
            for transport in transports:
                transport.close()


@each_mode
async def test_accepted_sockets_get_no_delay_whatever_the_program_does_to_its_listener(mode):
    """TCP_NODELAY is set on each accepted socket, as asyncio does: not
    taken from the listener the program passed in, which keeps its own
    options (here: cleared after the first connection)."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []

    class Keeps(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)

    listener = socket.create_server(("127.0.0.1", 0))
    server = await iouzcrx.create_zcrx_server(Keeps, sock=listener, mode=mode)
    async with server:
        assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        port = listener.getsockname()[1]
        clients = []
        try:
            for count in range(1, 4):
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                clients.append(client)
                client.setblocking(False)
                await loop.sock_connect(client, ("127.0.0.1", port))
                for _ in range(3000):
                    if len(transports) == count:
                        break
                    await asyncio.sleep(0.01)
                sock = transports[-1].get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
                listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        finally:
            for client in clients:
                client.close()
            for transport in transports:
                transport.close()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_benchmarks_connections_counts_no_socket_probe_per_accepted_connection(tmp_path):
    """benchmarks/connections.py runs, and its system call counts show what
    the accept path no longer asks (getsockopt, fstat)."""
    name = "iouzcrx-bufring-zerocopy-asyncio"
    out = tmp_path / "connections.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "connections.py"), "--receivers", name,
         "--connections", "20,60", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=child_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    calls = json.loads(out.read_text())[name]["syscalls"]
    assert calls.get("close", 0) >= 1, calls  # each connection was served and closed
    for probe in ("getsockopt", "fstat", "newfstatat"):
        assert probe not in calls, calls
    # The transport's own read of the addresses; no socket object's check.
    # (Not the listener's address instead: with TPROXY or a BPF socket
    # lookup a socket may accept connections to other addresses.)
    assert calls.get("getsockname", 0) <= 1, calls


class Asking(Sequence):
    """A Sequence that asks its transport for the socket, as a program
    setting an option would, and keeps it."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.sock = transport.get_extra_info("socket")
        self.fileno = self.sock.fileno()


@each_mode
async def test_an_accepted_connection_makes_no_socket_object_unless_asked(mode, monkeypatch):
    """The server holds each connection it accepted as its fd alone: no
    socket.socket is made (each costs a getsockname and an object) until
    get_extra_info("socket") asks for it. The socket made then owns the fd
    and is closed with the connection."""
    made: list[tuple[Any, ...]] = []
    init = _checks.AcceptedSocket.__init__

    def counting(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        made.append(args)
        init(self, *args, **kwargs)

    monkeypatch.setattr(_checks.AcceptedSocket, "__init__", counting)
    for _ in range(2):
        protocol = Sequence()
        await serve_from_thread(mode, protocol)
        assert protocol.events == ["made", "data", "eof", "lost"]
        assert protocol.bytes == 100000
    assert made == []
    asking = Asking()
    await serve_from_thread(mode, asking)
    assert asking.events == ["made", "data", "eof", "lost"]
    assert asking.bytes == 100000
    assert len(made) == 1
    assert type(asking.sock) is _checks.AcceptedSocket and asking.fileno >= 0
    assert asking.sock.fileno() == -1  # closed with the connection, through the socket


def accepted_pair() -> tuple[AcceptedFd, socket.socket]:
    """An AcceptedFd over one end of a connected pair, and the other end."""
    mine, peer = socket.socketpair()
    peer.settimeout(TIMEOUT)
    return AcceptedFd(mine.family, mine.type, mine.proto, mine.detach()), peer


def test_an_accepted_fd_sends_shuts_down_and_closes_once():
    conn, peer = accepted_pair()
    with peer:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        assert conn.send(b"hello") == 5
        assert conn.send(memoryview(b"abc")[1:]) == 2
        assert peer.recv(16) == b"hellobc"
        conn.shutdown(socket.SHUT_WR)
        assert peer.recv(16) == b""  # EOF
        fd = conn.fileno()
        assert fd >= 0 and repr(conn) == f"<AcceptedFd fd={fd}>"
        conn.close()
        conn.close()  # twice: nothing
        assert conn.fileno() == -1
        for call in (lambda: conn.send(b"x"), lambda: conn.shutdown(socket.SHUT_RDWR)):
            with pytest.raises(OSError) as raised:
                call()
            assert raised.value.errno == errno.EBADF  # never a reused fd number
        closed = conn.socket()  # asked for after close: a closed socket
        assert type(closed) is _checks.AcceptedSocket
        assert closed.fileno() == -1 and closed.family == socket.AF_UNIX
        assert conn.socket() is closed


def test_an_accepted_fd_refuses_a_buffer_it_cannot_send():
    conn, peer = accepted_pair()
    with peer:
        with pytest.raises(TypeError):
            conn.send("text")  # type: ignore[arg-type]
        conn.close()


def test_an_accepted_fd_dropped_open_closes_its_connection():
    conn, peer = accepted_pair()
    with peer:
        del conn
        gc.collect()
        assert peer.recv(16) == b""  # the fd was closed: the peer sees EOF


def test_an_accepted_fd_hands_its_fd_to_the_socket_it_makes():
    """Once the socket object exists it owns the fd: the AcceptedFd acts
    through it, so a program that closes that socket leaves no fd number
    behind for the AcceptedFd to use."""
    conn, peer = accepted_pair()
    with peer:
        fd = conn.fileno()
        sock = conn.socket()
        assert conn.socket() is sock and sock.fileno() == fd == conn.fileno()
        assert conn.send(b"via") == 3
        assert peer.recv(16) == b"via"
        sock.close()  # the program closes it
        assert conn.fileno() == -1
        with pytest.raises(OSError) as raised:
            conn.send(b"x")
        assert raised.value.errno == errno.EBADF
        conn.close()  # nothing left to close


def test_an_accepted_fd_whose_socket_was_detached_sends_nothing():
    # The fd is read from the socket object itself (not through fileno()):
    # a detach, which leaves the number to the program, must show there too.
    conn, peer = accepted_pair()
    with peer:
        sock = conn.socket()
        assert conn.send(b"one") == 3 and peer.recv(16) == b"one"
        number = sock.detach()
        try:
            assert conn.fileno() == -1
            with pytest.raises(OSError) as raised:
                conn.send(b"x")
            assert raised.value.errno == errno.EBADF
        finally:
            os.close(number)
        assert peer.recv(16) == b""  # the program's close ended it, not a send


def test_an_accepted_fd_never_sends_to_the_fd_that_replaced_its_closed_socket():
    # The send asks the socket object for its fd at each call rather than
    # going through socket.send (or keeping the number): once the program
    # closed that socket, the number belongs to whoever opens next.
    conn, peer = accepted_pair()
    with peer:
        sock = conn.socket()
        sock.settimeout(TIMEOUT)  # a timeout makes no send of this object wait
        assert conn.send(b"first") == 5
        assert peer.recv(16) == b"first"
        number = sock.fileno()
        sock.close()
        other, other_peer = socket.socketpair()
        with other, other_peer:
            if other.fileno() != number and other_peer.fileno() != number:
                pytest.skip("the closed fd number was not reused by the next socketpair")
            with pytest.raises(OSError) as raised:
                conn.send(b"stray")
            assert raised.value.errno == errno.EBADF
            for end in (other, other_peer):
                end.setblocking(False)
                with pytest.raises(BlockingIOError):
                    end.recv(16)  # nothing reached the replacement


def test_an_accepted_fd_sends_through_its_socket_without_waiting():
    conn, peer = accepted_pair()
    with peer:
        sock = conn.socket()
        sock.settimeout(TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sent = 0
        with pytest.raises(BlockingIOError):
            while True:  # fills the peer's buffer, then says so at once
                sent += conn.send(b"x" * 65536)
        got = 0
        while got < sent:
            got += len(peer.recv(1 << 20))
        assert got == sent
        conn.close()


def test_an_accepted_fd_closed_in_a_forked_child_stays_open_in_the_parent():
    conn, peer = accepted_pair()
    with peer:
        pid = os.fork()
        if pid == 0:  # the child closes its copy only
            try:
                conn.close()
                conn.close()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert conn.send(b"still") == 5
        assert peer.recv(16) == b"still"
        conn.close()
        assert peer.recv(16) == b""


# The library's Python frames one served connection runs, from its accept to
# its connection_lost: none. The accept's completion (Acceptor), the
# transport's life (iouzcrx._transport) and the delivery are Cython, as is the
# socket the transport watches where the ring's eventfd wakes the loop late.
LIBRARY_FRAMES: dict[str, int] = {}
LIBRARY_FILES = ("server.py", "transport.py", "protocols.py", "streams.py")
# Of the reactor's, what a connection would call itself (its close asks
# whether it runs on the rings' thread); the drains are the loop's, and in
# copy mode (DEFER_TASKRUN) how many run depends on timing.
CONNECTION_REACTOR_FRAMES = {"Reactor.handed_to_owner"}


@each_mode
async def test_a_connection_runs_few_python_frames_of_the_library(mode):
    """Set-up and teardown of a connection the ring accepted take no
    Python frame of the library's (LIBRARY_FRAMES): none to accept it,
    none per delivery, none of the transport's."""
    files = tuple(f"{os.sep}iouzcrx{os.sep}{name}" for name in LIBRARY_FILES)
    reactor_file = f"{os.sep}iouzcrx{os.sep}reactor.py"
    calls: Counter[str] = Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event != "call":
            return
        code = frame.f_code
        if code.co_filename.endswith(files) or (
            code.co_filename.endswith(reactor_file)
            and code.co_qualname in CONNECTION_REACTOR_FRAMES
        ):
            calls[code.co_qualname] += 1

    loop = asyncio.get_running_loop()
    protocol = Sequence()
    server = await iouzcrx.create_zcrx_server(lambda: protocol, "127.0.0.1", 0, mode=mode)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = loop.run_in_executor(None, send_and_close, port, 100000)
        sys.setprofile(profile)  # this thread only: the client's is not counted
        try:
            assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
        finally:
            sys.setprofile(None)
        await asyncio.wait_for(client, TIMEOUT)
    assert protocol.events == ["made", "data", "eof", "lost"]
    assert dict(calls) == LIBRARY_FRAMES


@pytest.mark.skipif(
    sys.version_info < (3, 12), reason="a Python class exports a buffer (__buffer__) from 3.12 on"
)
def test_a_send_whose_buffer_closes_the_connection_never_reaches_the_fd_that_replaced_it():
    """The data's own export closes the connection and puts another one on
    the same fd number: the send fails with EBADF instead of writing to the
    connection that now holds that number."""
    conn, peer = accepted_pair()
    fd = conn.fileno()
    intruder: list[socket.socket] = []

    class Sneaky:
        def __buffer__(self, flags: int) -> memoryview:
            conn.close()
            other, other_peer = socket.socketpair()
            os.dup2(other.fileno(), fd)  # the number now names another connection
            intruder.extend([other, other_peer])
            return memoryview(b"for the first connection only")

    with peer:
        with pytest.raises(OSError) as raised:
            conn.send(Sneaky())  # type: ignore[arg-type]
        assert raised.value.errno == errno.EBADF
        other, other_peer = intruder
        with other, other_peer:
            other_peer.setblocking(False)
            with pytest.raises(BlockingIOError):
                other_peer.recv(64)  # nothing reached the other connection
            if other.fileno() != fd:
                os.close(fd)  # the dup2'd copy (socketpair may have taken fd itself)


class EchoRequests(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def exchange_requests(port: int, count: int, size: int) -> None:
    """``count`` requests of ``size`` bytes, each answered before the next."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            sock.sendall(b"r" * size)
            got = 0
            while got < size:
                chunk = sock.recv(size)
                assert chunk, "the server closed"
                got += len(chunk)


async def test_a_bufring_request_is_received_without_entering_the_ring(monkeypatch):
    """The loop's ring for buffer-ring receives has no DEFER_TASKRUN: the
    kernel runs each receive as its data arrives, and the drain that the
    ring fd's readiness calls reaps it with no io_uring_enter. One enter
    per request (the deferred-work ring's way) would show as hundreds.
    (Reading by readiness, where requests alternate with responses, would
    take them off the ring: it stays off here.)"""
    monkeypatch.setattr(transport_module, "_READINESS", "0")
    loop = asyncio.get_running_loop()
    server = await iouzcrx.create_zcrx_server(EchoRequests, "127.0.0.1", 0, mode="bufring")
    async with server:
        reactor = Reactor.for_loop(loop)
        ring = reactor.ring
        assert ring is not None and not ring.defer_taskrun
        port = server.sockets[0].getsockname()[1]
        await loop.run_in_executor(None, exchange_requests, port, 5, 1024)  # connected, warm
        enters, reaped = ring.enters, ring.cqes_reaped
        await asyncio.wait_for(
            loop.run_in_executor(None, exchange_requests, port, 400, 1024), TIMEOUT
        )
        assert ring.cqes_reaped - reaped >= 400  # every request was a completion here
        # The new connection's accept and first receive are submitted; the
        # rest need none (a few more where a full CQ ends a multishot).
        assert ring.enters - enters <= 20
        # No zero-copy queue was asked for: no deferred-work ring was made.
        assert reactor._zcrx_ring is None
