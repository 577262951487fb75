"""Lifetimes of the per-loop reactor: what a closed loop, a closed server and a
forked child give back or leave alone, measured on the real kernel (fds,
/proc/self/maps entries and RSS; never timings)."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import SERVER_MODES
from isolation import TESTS, child_env

import iouzcrx
from iouzcrx._receive import ReceiveQueue
from iouzcrx.reactor import Reactor

TIMEOUT = 60
# Each runs on both loops, as tests/conftest.py does for the async tests.
LOOPS = ["asyncio", "uvloop"]


def mappings() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def run_child(code: str, *args: str) -> subprocess.Popen[bytes]:
    """``code`` in a fresh interpreter that imports this checkout's iouzcrx."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=TESTS,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(child: subprocess.Popen[bytes]) -> tuple[int, str]:
    try:
        _, err = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"the child hung; stderr:\n{err.decode(errors='replace')}")
    return child.returncode, err.decode(errors="replace")


# -- fork ------------------------------------------------------------------------

# An echo server that forks when told to: the child lets go of the inherited
# loop (stops it, closes it), serves on a loop of its own and exits normally;
# the parent tells the client how the child exited and goes on serving.
FORKING_SERVER = """
    import asyncio, os, sys
    import iouzcrx
    from iouzcrx.reactor import Reactor

    use_uvloop, mode = sys.argv[1] == "uvloop", sys.argv[2]
    parent = os.getpid()
    loop = iouzcrx.new_event_loop(use_uvloop=use_uvloop)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            data = bytes(data)
            if data == b"fork":
                loop.call_soon(self.fork)
            elif data == b"quit":
                loop.stop()
            else:
                self.transport.write(data)

        def fork(self):
            pid = os.fork()
            if pid == 0:
                loop.stop()
                return
            self.reap(pid)

        def reap(self, pid):
            # Polled: the child's exit must not depend on a wake-up of ours.
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                loop.call_later(0.01, self.reap, pid)
                return
            self.transport.write(b"child exited %d" % os.waitstatus_to_exitcode(status))

    server = loop.run_until_complete(
        loop.create_zcrx_server(
            Echo, "127.0.0.1", 0, mode=mode, area_size=4 << 20, buffer_size=64 << 10
        )
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    loop.run_forever()
    if os.getpid() != parent:
        try:
            Reactor.for_loop(loop)
        except RuntimeError as exc:
            assert "forked" in str(exc), exc
        else:
            raise AssertionError("the parent's loop gave the child a reactor")
        loop.close()

        async def own_loop():
            # The child's own loop gets its own ring and serves.
            own = await iouzcrx.create_zcrx_server(
                Echo, "127.0.0.1", 0, mode=mode, area_size=4 << 20, buffer_size=64 << 10
            )
            reader, writer = await asyncio.open_connection(*own.sockets[0].getsockname())
            writer.write(b"child")
            assert await asyncio.wait_for(reader.readexactly(5), 30) == b"child"
            writer.close()
            own.close()
            own.abort_clients()

        loop = None
        iouzcrx.run(own_loop(), use_uvloop=use_uvloop)
        sys.exit(0)
    server.close()
    server.abort_clients()
    loop.run_until_complete(server.wait_closed())
    loop.close()
"""


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(len(data) - len(got))
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("mode", SERVER_MODES)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_forked_child_closing_its_loop_leaves_the_parents_connections_served(
    loop_name: str, mode: str
) -> None:
    server = run_child(FORKING_SERVER, loop_name, mode)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline() or b"0")
        assert port, finish(server)[1]
        existing = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT / 4)
        assert echo(existing, b"before") == b"before"
        existing.sendall(b"fork")
        assert existing.recv(100) == b"child exited 0"
        # The parent's ring and epoll registrations are intact: the existing
        # connection and a new one are served.
        assert echo(existing, b"existing") == b"existing"
        new = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT / 4)
        assert echo(new, b"new") == b"new"
        existing.sendall(b"quit")
        new.close()
        existing.close()
        returncode, err = finish(server)
        assert returncode == 0, err
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


# -- a closed loop gives its ring and areas back -------------------------------------


async def serve_and_connect(mode: str) -> None:
    """A server and an open_connection client, left open when the loop closes."""
    server = await iouzcrx.create_zcrx_server(
        asyncio.Protocol, "127.0.0.1", 0, mode=mode, area_size=16 << 20
    )
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await iouzcrx.open_connection(
        "127.0.0.1", port, mode=mode, area_size=16 << 20
    )
    writer.write(b"hello")
    await writer.drain()


def stock_loop(loop_name: str) -> asyncio.AbstractEventLoop:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.SelectorEventLoop()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is Python 3.11+")
@pytest.mark.parametrize("mode", ["bufring", "socket"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_closed_stock_loop_frees_its_ring_areas_and_client_backends(
    loop_name: str, mode: str
) -> None:
    """asyncio.run() ten times, each with a server and an open_connection
    client on a loop that is not iouzcrx's: no fds, mappings or area memory
    stay behind once each loop is closed."""

    def one_run() -> None:
        with asyncio.Runner(loop_factory=lambda: stock_loop(loop_name)) as runner:
            runner.run(serve_and_connect(mode))
        gc.collect()

    one_run()  # imports and one-time allocations
    fds, maps, memory = open_fds(), mappings(), rss()
    for _ in range(10):
        one_run()
    assert open_fds() == fds
    # Ten leaked runs would add 20 areas (320 MiB) and at least 20 mappings.
    assert mappings() <= maps + 5
    assert rss() - memory < 16 << 20


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_closed_iouzcrx_loop_frees_its_ring(loop_name: str) -> None:
    def one_run() -> None:
        iouzcrx.run(serve_and_connect("bufring"), use_uvloop=loop_name == "uvloop")
        gc.collect()

    one_run()
    fds, maps = open_fds(), mappings()
    for _ in range(10):
        one_run()
    assert open_fds() == fds
    assert mappings() <= maps + 5


# -- closing the reactor ---------------------------------------------------------------

RING_CALLBACK_CLOSE = """
    import asyncio, sys
    import iouzcrx
    from iouzcrx.reactor import Reactor

    async def main():
        loop = asyncio.get_running_loop()
        lost = loop.create_future()

        class CloseTheReactor(asyncio.Protocol):
            def data_received(self, data):
                # Inside the ring's drain: the close must wait for its end.
                reactor = Reactor.for_loop(loop)
                reactor.close()
                reactor.close()

            def connection_lost(self, exc):
                lost.set_result(exc)

        server = await iouzcrx.create_zcrx_server(
            CloseTheReactor, "127.0.0.1", 0, mode="bufring", area_size=4 << 20,
            buffer_size=64 << 10,
        )
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"close it")
        exc = await asyncio.wait_for(lost, 30)
        assert isinstance(exc, ConnectionAbortedError), exc
        # The next server of the loop gets a new reactor and is served.
        echo = await iouzcrx.create_zcrx_server(
            asyncio.Protocol, "127.0.0.1", 0, mode="bufring", area_size=4 << 20,
            buffer_size=64 << 10,
        )
        assert Reactor.for_loop(loop).ring is not None
        echo.close()
        server.close()
        writer.close()

    iouzcrx.run(main(), use_uvloop=sys.argv[1] == "uvloop")
    print("ok")
"""


@pytest.mark.parametrize("loop_name", LOOPS)
def test_reactor_close_from_a_completion_callback_is_idempotent_and_takes_effect_after_the_drain(
    loop_name: str,
) -> None:
    returncode, err = finish(run_child(RING_CALLBACK_CLOSE, loop_name))
    assert returncode == 0, err


# -- a closed server gives its memory back ---------------------------------------------------

CYCLE_MODES = [
    pytest.param(
        "bufring",
        id="bufring",
        marks=pytest.mark.skipif(
            not hasattr(ReceiveQueue, "close"),
            reason="a buffer ring is unregistered by ReceiveQueue.close()",
        ),
    ),
    pytest.param("socket", id="socket"),
    *[p for p in SERVER_MODES if p.values == ("copy",)],
]


@pytest.mark.parametrize("mode", CYCLE_MODES)
async def test_server_create_close_cycles_give_the_memory_back(mode: str) -> None:
    """200 servers made and closed one after the other on one loop: mappings
    and RSS end where they started (each server would otherwise keep its area)."""
    loop = asyncio.get_running_loop()

    async def cycle(serve: bool) -> None:
        server = await loop.create_zcrx_server(
            asyncio.Protocol, "127.0.0.1", 0, mode=mode, area_size=1 << 20, buffer_size=64 << 10
        )
        if serve:
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            writer.write(b"x")
            await writer.drain()
            writer.close()
            await writer.wait_closed()
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)

    await cycle(serve=True)
    gc.collect()
    maps, memory = mappings(), rss()
    for i in range(200):
        await cycle(serve=i % 20 == 0)
    gc.collect()
    # 200 kept areas would add at least 200 mappings and 200 MiB.
    assert mappings() <= maps + 10
    assert rss() - memory < 32 << 20


@pytest.mark.parametrize("ours", [True, False], ids=["iouzcrx-loop", "stock-loop"])
@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_reactor_closed_while_its_loop_runs_has_its_ring_closed_by_the_loops_close(
    loop_name: str, ours: bool
) -> None:
    loop = (
        iouzcrx.new_event_loop(use_uvloop=loop_name == "uvloop") if ours else stock_loop(loop_name)
    )
    try:
        reactor = Reactor.for_loop(loop)
        ring = reactor.ring
        assert ring is not None

        def close_and_stop() -> None:
            reactor.close()
            reactor.close()
            # The ring's close was deferred to a callback this run never reaches.
            loop.stop()

        loop.call_soon(close_and_stop)
        loop.run_forever()
        assert reactor.closed
        assert Reactor.for_loop(loop) is not reactor
    finally:
        loop.close()
    assert ring.closed


# -- Ctrl-C ----------------------------------------------------------------------

# An idle loop under iouzcrx.run; a helper thread sends itself SIGINT, so the
# signal lands on a thread other than the loop's, which sleeps in the selector
# and is not interrupted: only the wakeup fd can wake it.
CTRL_C_ELSEWHERE = """
    import asyncio, signal, threading
    import iouzcrx

    async def main():
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def interrupt():
            loop.call_soon_threadsafe(ready.set)
            threading.Event().wait(0.5)  # the loop is asleep in the selector by then
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)

        threading.Thread(target=interrupt, daemon=True).start()
        await ready.wait()
        await loop.create_future()  # idle until cancelled

    try:
        iouzcrx.run(main(), use_uvloop=False)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def test_ctrl_c_on_another_thread_wakes_an_idle_selector_loop() -> None:
    """asyncio.Runner's Ctrl-C handler runs only when the loop's thread runs
    Python code: a SIGINT that does not interrupt the selector (it landed on
    another thread, or just before the selector blocked) must still wake the
    loop, through the self-pipe set as the signal wakeup fd."""
    child = run_child(CTRL_C_ELSEWHERE)
    try:
        out, err = child.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail("the loop slept through the SIGINT")
    assert child.returncode == 0, err.decode(errors="replace")
    assert out.decode().strip() == "interrupted"


def test_the_selector_loop_sets_the_wakeup_fd_only_while_it_runs_and_leaves_anothers() -> None:
    """Its self-pipe is the wakeup fd while it runs (main thread), and not
    after: a closed loop's fd number must never receive a signal byte. A
    wakeup fd set by someone else is left as it was throughout."""
    import signal

    def wakeup_now() -> int:
        current = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(current)
        return current

    async def seen() -> int:
        return wakeup_now()

    assert wakeup_now() == -1
    loop = iouzcrx.new_event_loop(use_uvloop=False)
    try:
        assert loop.run_until_complete(seen()) == loop._csock.fileno()  # type: ignore[attr-defined]
        assert wakeup_now() == -1
        other_read, other_write = socket.socketpair()
        with other_read, other_write:
            other_write.setblocking(False)
            signal.set_wakeup_fd(other_write.fileno())
            try:
                assert loop.run_until_complete(seen()) == other_write.fileno()
                assert wakeup_now() == other_write.fileno()
            finally:
                signal.set_wakeup_fd(-1)
    finally:
        loop.close()
    assert wakeup_now() == -1
