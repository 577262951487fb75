"""Lifetimes on the real kernel, in every mode the machine can run: closing
anything from inside any callback, from another thread and twice; fork; and
many servers and connections with fds, mappings and memory back to where
they started.

Cases that could crash the interpreter run in a child process, which must
exit cleanly. Timeouts are failure conditions, never measurements.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import IN_VM, RECEIVE_MODES, SERVER_MODES, connect_pair, make_queue
from isolation import TESTS, child_env

import iouzcrx

TIMEOUT = 60
# A child under the VM's emulated CPU takes seconds just to start.
CHILD_TIMEOUT = TIMEOUT * (3 if IN_VM else 1)

# The VM emulates its CPU: the same checks with fewer rounds.
SERVER_CYCLES = 100 if IN_VM else 1000
CONNECTIONS = 1000 if IN_VM else 10_000
BATCH = 200  # connections at once: well inside the default 1024 fds

# Back to baseline, with room for allocator and interpreter noise only.
FD_SLACK = 0
MAPS_SLACK = 16
RSS_SLACK = 48 << 20
# A leak stops the loop early, long before it could exhaust the machine.
RSS_ABORT = 512 << 20


def run_child(code: str, *args: str, timeout: float = CHILD_TIMEOUT) -> list[str]:
    """Run ``code`` in a fresh interpreter; it must exit 0 and print "ok"
    last. Returns its stdout lines."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=TESTS,
        env=child_env(),
    )
    assert result.returncode == 0, (
        f"child exited with {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    lines = result.stdout.splitlines()
    assert lines and lines[-1] == "ok", result.stdout[-3000:] + result.stderr[-3000:]
    return lines


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Usage:
    """fds, mappings and RSS now; ``check()`` compares a later reading."""

    def __init__(self) -> None:
        gc.collect()
        self.fds, self.maps, self.rss = open_fds(), mappings(), rss()

    def grown(self) -> str | None:
        gc.collect()
        fds, maps, mem = open_fds(), mappings(), rss()
        problems = []
        if fds > self.fds + FD_SLACK:
            problems.append(f"fds {self.fds} -> {fds}")
        if maps > self.maps + MAPS_SLACK:
            problems.append(f"mappings {self.maps} -> {maps}")
        if mem > self.rss + RSS_SLACK:
            problems.append(f"RSS {self.rss >> 20} MiB -> {mem >> 20} MiB")
        return ", ".join(problems) or None

    def runaway(self) -> bool:
        return rss() > self.rss + RSS_ABORT


# -- the engine: close from its callbacks, from another thread, twice -------------

ENGINE_CHILD = """
import socket, sys, time
import iouzcrx
from conftest import make_queue

mode, what, where = sys.argv[1:4]
ring = iouzcrx.Ring()
queue = make_queue(ring, mode, area_size=1 << 20, buffer_size=64 << 10)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
client = socket.create_connection(listener.getsockname())
server, _ = listener.accept()
client.sendall(bytes(range(256)) * 1000)
client.close()

views = []
closed_in = []
receiver = None

def close_it(callback):
    if closed_in:
        return
    closed_in.append(callback)
    {"ring": ring, "queue": queue, "receiver": receiver}[what].close()

def on_data(view):
    views.append(view)
    if where == "on_data":
        close_it("on_data")

def on_end(exc):
    if where == "on_end":
        close_it("on_end")

receiver = queue.recv_multishot(server, on_data=on_data, on_end=on_end)
deadline = time.monotonic() + 30
while not ring.closed and not receiver.finished and time.monotonic() < deadline:
    ring.wait(0.1)
if not ring.closed:
    # A close requested inside a callback may take effect after the drain.
    ring.wait(0.1)
assert closed_in == [where], f"the close never ran: {closed_in}"
if what == "ring":
    assert ring.closed, "Ring.close() inside a callback never took effect"
elif what == "queue":
    assert queue.closed, "the queue's close() inside a callback never took effect"
else:
    assert receiver.finished, "a receiver closed inside a callback never finished"
# What was delivered stays readable, whatever was closed.
data = b"".join(v.tobytes() for v in views)
assert data == (bytes(range(256)) * 1000)[: len(data)], "a delivered view changed"
views.clear()
ring.close()
print("ok")
"""


@pytest.mark.parametrize("mode", RECEIVE_MODES)
@pytest.mark.parametrize("where", ["on_data", "on_end"])
@pytest.mark.parametrize("what", ["ring", "queue", "receiver"])
def test_closing_the_engine_inside_a_completion_callback_takes_effect_safely(
    mode: str, where: str, what: str
) -> None:
    run_child(ENGINE_CHILD, mode, what, where)


THREAD_CLOSE_CHILD = """
import socket, sys, threading, time
import iouzcrx
from conftest import make_queue

mode = sys.argv[1]
raced = []
for attempt in range(15):
    ring = iouzcrx.Ring()
    queue = make_queue(ring, mode, area_size=1 << 20, buffer_size=64 << 10)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    client.settimeout(10)
    server, _ = listener.accept()
    stop = threading.Event()

    def send():
        try:
            while not stop.is_set():
                client.sendall(b"x" * 65536)
        except OSError:
            pass

    sender = threading.Thread(target=send)
    sender.start()
    received = []
    receiver = queue.recv_multishot(server, on_data=lambda v: received.append(sum(v[::512])))
    outcome = []

    def close_elsewhere():
        time.sleep(0.001 * attempt)
        try:
            ring.close()
            outcome.append("closed")
        except iouzcrx.WrongThread:
            outcome.append("refused")

    closer = threading.Thread(target=close_elsewhere)
    closer.start()
    deadline = time.monotonic() + 10
    # The owner keeps draining, with a Python on_data, while the other
    # thread closes: a refusal, or a close deferred to the owner, is fine.
    while time.monotonic() < deadline and not ring.closed:
        if outcome == ["refused"]:
            break
        try:
            ring.wait(0.01)
        except Exception as exc:
            # The close ran under the owner instead of being refused or
            # left to it: the owner was walking a ring that went away.
            raced.append(f"attempt {attempt}: the owner's wait raised {exc!r}")
            break
    closer.join(10)
    stop.set()
    try:
        client.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sender.join(10)
    if not ring.closed:
        ring.close()
    server.close()
    client.close()
    listener.close()
assert not raced, raced
print("ok")
"""


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_a_ring_closed_from_another_thread_is_refused_or_left_to_its_owner(
    mode: str,
) -> None:
    run_child(THREAD_CLOSE_CHILD, mode, timeout=CHILD_TIMEOUT * 2)


@pytest.mark.parametrize("mode", RECEIVE_MODES)
@pytest.mark.parametrize("method", ["cancel", "close"])
def test_a_receiver_call_refused_on_another_thread_changes_nothing(
    ring: iouzcrx.Ring, listener: socket.socket, mode: str, method: str
) -> None:
    queue = make_queue(ring, mode, area_size=1 << 20, buffer_size=64 << 10)
    client, server = connect_pair(listener)
    receiver = queue.recv_multishot(server)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            getattr(receiver, method)()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(TIMEOUT)
    assert len(errors) == 1 and isinstance(errors[0], iouzcrx.WrongThread), errors
    assert not receiver.cancelling and not receiver.discarding
    # Everything sent afterwards still arrives...
    client.sendall(b"still here")
    view = receiver.get(TIMEOUT)
    assert view is not None and view.tobytes() == b"still here"
    view.release()
    # ...and the owner's own call still works.
    getattr(receiver, method)()
    ring.wait_for(lambda: receiver.finished, TIMEOUT)
    client.close()
    server.close()


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_closing_ring_and_receiver_twice_is_harmless(listener: socket.socket, mode: str) -> None:
    ring = iouzcrx.Ring()
    queue = make_queue(ring, mode, area_size=1 << 20, buffer_size=64 << 10)
    client, server = connect_pair(listener)
    receiver = queue.recv_multishot(server)
    client.sendall(b"abc")
    view = receiver.get(TIMEOUT)
    assert view is not None
    receiver.close()
    receiver.close()
    ring.close()
    ring.close()
    receiver.close()
    assert view.tobytes() == b"abc"
    client.close()
    server.close()


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_closing_a_queue_twice_gives_its_buffers_back_and_is_harmless(mode: str) -> None:
    with iouzcrx.Ring() as ring:
        queue = make_queue(ring, mode, area_size=1 << 20, buffer_size=64 << 10)
        queue.close()  # type: ignore[attr-defined]
        queue.close()  # type: ignore[attr-defined]
        assert queue.closed


# -- asyncio: close from every protocol callback -----------------------------------

CALLBACKS = ["connection_made", "received", "eof_received", "connection_lost"]


class Closer(iouzcrx.ZeroCopyProtocol):
    """Closes ``what`` from inside callback ``where`` once."""

    def __init__(self, server_box: list[iouzcrx.ZcrxServer], what: str, where: str) -> None:
        self.server_box = server_box
        self.what = what
        self.where = where
        self.transport: asyncio.Transport | None = None
        self.done = asyncio.get_running_loop().create_future()
        self.closed_in: list[str] = []
        self.views: list[bytes] = []

    def _maybe_close(self, where: str) -> None:
        if where != self.where or self.closed_in:
            return
        self.closed_in.append(where)
        if self.what == "transport":
            assert self.transport is not None
            self.transport.close()
        elif self.what == "server":
            self.server_box[0].close()

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport
        self._maybe_close("connection_made")

    def view_received(self, view: memoryview) -> None:
        self.views.append(view.tobytes())
        self._maybe_close("received")

    def eof_received(self) -> None:
        self._maybe_close("eof_received")

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        self._maybe_close("connection_lost")
        if not self.done.done():
            self.done.set_result(exc)


@pytest.mark.parametrize("mode", SERVER_MODES)
@pytest.mark.parametrize("where", CALLBACKS)
@pytest.mark.parametrize("what", ["transport", "server"])
async def test_closing_transport_or_server_inside_a_protocol_callback_ends_cleanly(
    mode: str, where: str, what: str
) -> None:
    loop = asyncio.get_running_loop()
    box: list[iouzcrx.ZcrxServer] = []
    protocols: list[Closer] = []

    def factory() -> Closer:
        protocols.append(Closer(box, what, where))
        return protocols[-1]

    server = await loop.create_zcrx_server(factory, "127.0.0.1", 0, mode=mode)  # type: ignore[attr-defined]
    box.append(server)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # The exchange ends the connection either way: data, then EOF, on which
    # the protocol's transport closes (eof_received returns None).
    try:
        writer.write(b"hello")
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(), TIMEOUT)
    except OSError:
        pass  # a transport closed in connection_made resets or ends it early
    while not protocols:
        await asyncio.sleep(0.01)
    protocol = protocols[0]
    await asyncio.wait_for(protocol.done, TIMEOUT)
    assert protocol.closed_in == [where]
    if where in ("received", "eof_received", "connection_lost"):
        assert protocol.views and b"".join(protocol.views) == b"hello"
    writer.close()
    server.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    if what == "server":
        # A server closed from a callback no longer accepts.
        with pytest.raises(OSError):
            _, late = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
            late.close()


LOOP_CLOSE_CHILD = """
import asyncio, sys
import iouzcrx

mode, where, use_uvloop = sys.argv[1], sys.argv[2], sys.argv[3] == "uvloop"
refused = []
served = []

class Echo(iouzcrx.ZeroCopyProtocol):
    def connection_made(self, transport):
        self.transport = transport
        self.maybe_close("connection_made")
    def view_received(self, view):
        self.maybe_close("received")
        self.transport.write(bytes(view))
    def eof_received(self):
        self.maybe_close("eof_received")
    def connection_lost(self, exc):
        self.maybe_close("connection_lost")
    def maybe_close(self, here):
        if here == where and not refused:
            try:
                asyncio.get_running_loop().close()
            except RuntimeError:
                refused.append(here)

async def main():
    loop = asyncio.get_running_loop()
    server = await iouzcrx.create_zcrx_server(Echo, "127.0.0.1", 0, mode=mode)
    port = server.sockets[0].getsockname()[1]
    for n in range(2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 30)
        assert got == b"ping", f"connection {n} got {got!r}"
        writer.close()
        await asyncio.sleep(0.05)
        served.append(n)
    server.close()
    await asyncio.wait_for(server.wait_closed(), 30)

iouzcrx.run(main(), use_uvloop=use_uvloop)
# asyncio refuses to close a running loop; the refusal must change nothing.
assert refused == [where], refused
assert served == [0, 1], served
print("ok")
"""


@pytest.mark.parametrize("mode", SERVER_MODES)
@pytest.mark.parametrize("where", CALLBACKS)
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_closing_the_running_loop_inside_a_protocol_callback_is_refused_and_changes_nothing(
    mode: str, where: str, loop_kind: str
) -> None:
    run_child(LOOP_CLOSE_CHILD, mode, where, loop_kind)


@pytest.mark.parametrize("mode", SERVER_MODES)
async def test_closing_server_and_transport_twice_is_harmless(mode: str) -> None:
    loop = asyncio.get_running_loop()
    protocols: list[Closer] = []

    def factory() -> Closer:
        protocols.append(Closer([], "nothing", "nowhere"))
        return protocols[-1]

    server = await loop.create_zcrx_server(factory, "127.0.0.1", 0, mode=mode)  # type: ignore[attr-defined]
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while not protocols:
        await asyncio.sleep(0.01)
    transport = protocols[0].transport
    assert transport is not None
    transport.close()
    transport.close()
    transport.abort()
    await asyncio.wait_for(protocols[0].done, TIMEOUT)
    await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    server.close()
    server.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    server.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_closing_a_loop_with_a_server_twice_is_harmless(loop_kind: str) -> None:
    loop = iouzcrx.new_event_loop(use_uvloop=loop_kind == "uvloop")
    fds = open_fds()
    try:

        async def serve() -> None:
            await iouzcrx.create_zcrx_server(asyncio.Protocol, "127.0.0.1", 0, mode="auto")

        loop.run_until_complete(serve())
    finally:
        loop.close()
        loop.close()
    gc.collect()
    assert open_fds() <= fds


# -- fork ---------------------------------------------------------------------------

FORK_CHILD = """
import asyncio, os, socket, sys
import iouzcrx

mode, use_uvloop = sys.argv[1], sys.argv[2] == "uvloop"

class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        self.transport.write(data)
    def eof_received(self):
        self.transport.close()

async def echo_once(port, payload):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    return got

async def main():
    # No name lookups before the fork: the child must not inherit executor
    # threads that asyncio would wait for at exit.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    server = await iouzcrx.create_zcrx_server(Echo, sock=listener, mode=mode)
    port = server.sockets[0].getsockname()[1]
    assert await echo_once(port, b"before") == b"before"
    pid = os.fork()
    if pid == 0:
        # The child leaves as a program normally does: its loop closes.
        raise SystemExit(0)
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        await asyncio.sleep(0.01)
    for n in range(3):
        got = await echo_once(port, b"after %d" % n)
        assert got == b"after %d" % n, f"after the child exited: {got!r}"
    server.close()
    await asyncio.wait_for(server.wait_closed(), 20)

iouzcrx.run(main(), use_uvloop=use_uvloop)
print("ok")
"""


# The stock loop only: uvloop itself does not survive this (a child's libuv
# loop deregisters the parent's sockets from the epoll instance they share),
# with or without iouzcrx.
@pytest.mark.parametrize("mode", SERVER_MODES)
def test_a_forked_child_that_exits_leaves_the_parent_serving(mode: str) -> None:
    run_child(FORK_CHILD, mode, "asyncio")


# -- many servers, many connections ------------------------------------------------


@pytest.mark.parametrize("mode", SERVER_MODES)
async def test_a_thousand_servers_created_and_closed_leave_fds_mappings_and_memory_as_they_were(
    mode: str,
) -> None:
    loop = asyncio.get_running_loop()
    options = {"mode": mode, "area_size": 1 << 20, "buffer_size": 64 << 10}

    async def cycle() -> None:
        server = await loop.create_zcrx_server(asyncio.Protocol, "127.0.0.1", 0, **options)  # type: ignore[attr-defined]
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)

    for _ in range(5):  # the loop's ring and first allocations
        await cycle()
    before = Usage()
    for n in range(SERVER_CYCLES):
        await cycle()
        if n % 50 == 0 and before.runaway():
            break
    after = before.grown()
    assert after is None, f"after {n + 1} server cycles: {after}"


class Drop(asyncio.Protocol):
    """Answers one byte and closes."""

    def connection_made(self, transport):  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"!")
        self.transport.close()


@pytest.mark.parametrize("mode", SERVER_MODES)
async def test_ten_thousand_connections_leave_fds_mappings_and_memory_as_they_were(
    mode: str,
) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_zcrx_server(  # type: ignore[attr-defined]
        Drop, "127.0.0.1", 0, mode=mode, area_size=1 << 20, buffer_size=64 << 10, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]

    async def one(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if n % 2:
            # Half are a flood of connect-and-close, which find the area
            # momentarily empty while the others hold buffers.
            writer.close()
        else:
            writer.write(b"?")
            assert await reader.read() == b"!"
            writer.close()
        await writer.wait_closed()

    async def batch(n: int) -> None:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), TIMEOUT)

    await batch(BATCH)
    before = Usage()
    done = 0
    while done < CONNECTIONS:
        await batch(BATCH)
        done += BATCH
        if done % 1000 == 0 and before.runaway():
            break
    server.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    after = before.grown()
    assert after is None, f"after {done} connections: {after}"
