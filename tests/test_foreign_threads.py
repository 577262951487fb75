"""Public objects used from a thread or process that does not own the loop's
rings (they are SINGLE_ISSUER: only the thread that made them may submit):
each such call either is handed to the loop's thread, or fails once with a
clear error, and never leaves a reader that fires for ever, a fd that names
another file, or a half-done close behind. Real kernel, both loops."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from typing import Any

import pytest
from isolation import TESTS, child_env

import iouzcrx
from iouzcrx.errors import WrongThread

LOOPS = ["asyncio", "uvloop"]
TIMEOUT = 60


class Sink(asyncio.Protocol):
    """Counts what arrives; ``lost`` is set by connection_lost."""

    last: Sink | None = None

    def __init__(self) -> None:
        self.received = 0
        self.lost = threading.Event()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        Sink.last = self

    def data_received(self, data: bytes) -> None:
        self.received += len(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set()


def new_loop(loop_name: str) -> asyncio.AbstractEventLoop:
    return iouzcrx.new_event_loop(use_uvloop=loop_name == "uvloop")


def sink_server(loop: asyncio.AbstractEventLoop) -> Any:
    """The coroutine that makes a bufring server of Sinks on ``loop``."""
    return loop.create_zcrx_server(Sink, "127.0.0.1", 0, mode="bufring")  # type: ignore[attr-defined]


def serve(loop: asyncio.AbstractEventLoop) -> Any:
    return loop.run_until_complete(sink_server(loop))


@contextlib.contextmanager
def served_from_loop_thread(loop_name: str) -> Iterator[tuple[asyncio.AbstractEventLoop, Any]]:
    """A loop running on a thread of its own, and a server that thread made
    (so it owns the rings); both closed at the end."""
    loop = new_loop(loop_name)
    thread = on_loop_thread(loop)
    server = asyncio.run_coroutine_threadsafe(sink_server(loop), loop).result(TIMEOUT)
    try:
        yield loop, server
    finally:
        loop.call_soon_threadsafe(server.close)
        stop(loop, thread)
        loop.close()


def port_of(server: Any) -> int:
    return int(server.sockets[0].getsockname()[1])


def errors_of(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    return errors


def on_loop_thread(loop: asyncio.AbstractEventLoop) -> threading.Thread:
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return thread


def stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    loop.call_soon_threadsafe(loop.stop)
    thread.join(TIMEOUT)
    assert not thread.is_alive()


def wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_loop_run_by_another_thread_reports_once_instead_of_spinning(loop_name: str) -> None:
    # The server is made on this thread, the loop then runs on another. Its
    # ring fd turns readable and stays so: a reader that only raised would be
    # called again at once, for ever.
    loop = new_loop(loop_name)
    errors = errors_of(loop)
    server = serve(loop)
    thread = on_loop_thread(loop)
    try:
        with socket.create_connection(("127.0.0.1", port_of(server))) as client:
            client.sendall(b"hello")
            wait_until(lambda: errors, "the error was reported")
            time.sleep(0.3)  # a spinning reader would report thousands by now
            assert len(errors) == 1, errors[:3]
            assert isinstance(errors[0]["exception"], WrongThread)
            assert "another thread" in errors[0]["message"]
    finally:
        stop(loop, thread)
        loop.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_closing_a_loop_from_another_thread_closes_its_rings(loop_name: str) -> None:
    # The loop ran on a worker thread, which made the rings; the main thread
    # closes it. The ring's accept must stop with the ring, or it would take
    # connections into fds that nobody serves or closes.
    loop = new_loop(loop_name)
    with ThreadPoolExecutor(1) as worker:
        server = worker.submit(serve, loop).result()
        port = port_of(server)
        rings = [server._reactor.ring]
        loop.close()
        assert all(ring.closed for ring in rings)
        before = len(os.listdir("/proc/self/fd"))
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        time.sleep(0.2)
        try:
            assert len(os.listdir("/proc/self/fd")) == before + len(clients)
        finally:
            for client in clients:
                client.close()
        # The server outlived its loop: its close has no accept left to
        # cancel, and closes the listener.
        server.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port)).close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_ring_closed_by_hand_stops_being_watched_before_its_fds_go(loop_name: str) -> None:
    # Ring.close() from another thread: the owner closes the ring at its
    # next drain, and the loop's readers of the ring's fds go first. A plain
    # asyncio server on a socket that reuses the ring's fd number must work.
    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        server = await loop.create_zcrx_server(Sink, "127.0.0.1", 0, mode="bufring")  # type: ignore[attr-defined]
        ring = server._reactor.ring
        old_fds = {ring.fd, ring.eventfd}
        closer = threading.Thread(target=ring.close)
        closer.start()
        closer.join()
        while not ring.closed:
            await asyncio.sleep(0.01)
        listener = socket.create_server(("127.0.0.1", 0))
        assert listener.fileno() in old_fds

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()

        plain = await asyncio.start_server(echo, sock=listener)
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        writer.write(b"ping")
        answer = await asyncio.wait_for(reader.read(100), TIMEOUT)
        writer.close()
        plain.close()
        server.close()
        return answer

    loop = new_loop(loop_name)
    try:
        assert loop.run_until_complete(main()) == b"ping"
    finally:
        loop.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_transport_closed_from_another_thread_closes_on_the_loops(loop_name: str) -> None:
    Sink.last = None
    with (
        served_from_loop_thread(loop_name) as (_loop, server),
        socket.create_connection(("127.0.0.1", port_of(server))) as client,
    ):
        client.sendall(b"a" * 10)
        wait_until(lambda: getattr(Sink, "last", None) and Sink.last.received == 10, "data")
        protocol = Sink.last
        protocol.transport.close()  # this thread does not run the loop
        assert protocol.lost.wait(TIMEOUT)
        client.settimeout(TIMEOUT)
        assert client.recv(10) == b""  # the peer sees the close
        assert protocol.received == 10


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_server_closed_from_another_thread_closes_its_listener(loop_name: str) -> None:
    with served_from_loop_thread(loop_name) as (loop, server):
        port = port_of(server)
        forever = asyncio.run_coroutine_threadsafe(server.serve_forever(), loop)
        wait_until(lambda: server._serving_forever is not None, "serve_forever started")
        server.close()  # this thread does not run the loop
        with pytest.raises(CancelledError):  # by the close, on the loop's thread
            forever.result(TIMEOUT)
        wait_until(lambda: not server._accepts, "the accept ended")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port)).close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_closed_servers_accept_never_takes_a_connection_of_a_listener_reusing_its_fd(
    loop_name: str,
) -> None:
    # serve_forever queues the accept; the close comes before a drain has
    # submitted it, and a new listener takes the closed one's fd number.
    async def main() -> tuple[int, int, bool, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_zcrx_server(  # type: ignore[attr-defined]
            Sink, "127.0.0.1", 0, mode="bufring", start_serving=False
        )
        old_fd = server.sockets[0].fileno()
        made: dict[str, Any] = {}

        def close_and_listen() -> None:
            server.close()
            made["listener"] = listener = socket.create_server(("127.0.0.1", 0))
            made["client"] = socket.create_connection(listener.getsockname())

        forever = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0)  # serve_forever queued its accept
        loop.call_soon(close_and_listen)
        await asyncio.sleep(0.3)
        listener = made["listener"]
        listener.setblocking(False)
        try:
            conn, _ = listener.accept()
            conn.close()
            accepted = True
        except BlockingIOError:
            accepted = False
        finally:
            made["client"].close()
            forever.cancel()
        return old_fd, listener.fileno(), accepted, len(server._connections)

    loop = new_loop(loop_name)
    try:
        old_fd, new_fd, accepted, served = loop.run_until_complete(main())
    finally:
        loop.close()
    assert accepted, (old_fd, new_fd)  # the connection stayed with its listener
    assert served == 0


def run_child(code: str, *args: str) -> tuple[int, str, str]:
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=TESTS,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return child.returncode, child.stdout, child.stderr


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_forked_childs_server_close_leaves_the_parents_listener(loop_name: str) -> None:
    code = """
        import asyncio, os, socket, sys
        import iouzcrx

        async def main():
            loop = asyncio.get_running_loop()
            server = await loop.create_zcrx_server(
                asyncio.Protocol, "127.0.0.1", 0, mode="bufring")
            port = server.sockets[0].getsockname()[1]
            pid = os.fork()
            if pid == 0:
                server.close()
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            print("listening")
            server.close()

        iouzcrx.run(main(), use_uvloop=sys.argv[1] == "uvloop")
    """
    code_, out, err = run_child(code, loop_name)
    assert code_ == 0, err
    assert out.split() == ["listening"]


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_forked_child_running_its_parents_loop_is_stopped_with_the_reason(
    loop_name: str,
) -> None:
    # The child runs the loop it inherited: the rings are the parent's, and so
    # is the loop's epoll instance. The child's loop stops and says why.
    code = """
        import asyncio, os, socket, sys, time
        import iouzcrx

        loop = iouzcrx.new_event_loop(use_uvloop=sys.argv[1] == "uvloop")
        server = loop.run_until_complete(
            loop.create_zcrx_server(asyncio.Protocol, "127.0.0.1", 0, mode="bufring"))
        pid = os.fork()
        if pid == 0:
            errors = []
            loop.set_exception_handler(lambda _l, context: errors.append(context))
            client = socket.create_connection(server.sockets[0].getsockname())
            try:
                loop.run_until_complete(asyncio.sleep(30))
            except RuntimeError as exc:
                print("stopped:", "Event loop stopped" in str(exc))
            # One per ring fd at most: both may be ready in the iteration
            # that stops the loop.
            print("errors:", 1 <= len(errors) <= 2)
            print("parent:", all("parent" in error["message"] for error in errors))
            sys.stdout.flush()  # os._exit does not
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child:", os.waitstatus_to_exitcode(status))
        server.close()
        loop.close()
    """
    code_, out, err = run_child(code, loop_name)
    assert code_ == 0, err
    assert out.split("\n")[:4] == ["stopped: True", "errors: True", "parent: True", "child: 0"], (
        out,
        err,
    )
