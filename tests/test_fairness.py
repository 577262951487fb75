"""One connection may not take the shared area from the others: small chunks
are copied out, a connection's views pin at most its share of the buffers
(over it, its receive alone waits), and every such stall ends when its cause
goes. Engine-level tests run in every receive mode the kernel can run;
server tests on both loops, in the ring modes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import importlib.util
import os
import socket
import time

import pytest
from conftest import RECEIVE_MODES, SCALE, Pattern, Sender, Verifier, connect_pair, make_queue

import iouzcrx

TIMEOUT = 60

# Ring modes of the asyncio layer (socket mode has no shared area to pin).
RING_SERVER_MODES = RECEIVE_MODES
# Modes whose connection waits when its area runs out: all of them.
STALLING_SERVER_MODES = [*RECEIVE_MODES, pytest.param("socket", id="socket")]

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_area(mode: str) -> int:
    """An area of a few dozen buffers: 256 KiB each in bufring, 4 KiB chunks
    in copy mode."""
    return 8 << 20 if mode == "bufring" else 1 << 20


async def wait_until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` on the loop; a failure (not a timing assertion)
    after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"still waiting for {what} after {TIMEOUT} s")
        await asyncio.sleep(0.01)


async def request(host: str, port: int, bodies: list[bytes]) -> list[bytes]:
    """The streams example's protocol: 'SIZE n' + body, answered 'OK sha'."""
    reader, writer = await asyncio.open_connection(host, port)
    answers = []
    try:
        for body in bodies:
            writer.write(b"SIZE %d\n" % len(body) + body)
            answers.append(await reader.readline())
    finally:
        writer.close()
    return answers


def expected(bodies: list[bytes]) -> list[bytes]:
    return [f"OK {hashlib.sha256(body).hexdigest()}\n".encode() for body in bodies]


async def hostile_client(host: str, port: int, segments: int, size: int, sent):  # type: ignore[no-untyped-def]
    """Sends ``segments`` separate TCP segments of ``size`` bytes and no
    newline (or fewer, if the server drops the connection for a line over
    its limit), then holds the connection open until cancelled."""
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        with contextlib.suppress(ConnectionError):
            for _ in range(segments):
                writer.write(b"x" * size)
                await writer.drain()
                # Let the server receive it before the next one: separate chunks.
                await asyncio.sleep(0.002)
        sent.set_result(None)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the server gives up, or the test cancels
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def aborting(server, *tasks):  # type: ignore[no-untyped-def]
    """On the way out (a failure included) cancel ``tasks`` and abort the
    connections left, so that closing the server does not wait on them."""
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        server.abort_clients()


async def run_hostile_scenario(mode: str, segment_size: int, extra_segments: int) -> None:
    example = load_example("streams_server")
    countdown = example.Countdown(None)

    async def handle(reader, writer):  # type: ignore[no-untyped-def]
        await example.handle(countdown, reader, writer)

    server = await iouzcrx.start_server(
        handle, "127.0.0.1", 0, mode=mode, area_size=small_area(mode)
    )
    assert server.mode == mode
    host, port = server.sockets[0].getsockname()
    backend = server.backend
    sent = asyncio.get_running_loop().create_future()
    # More segments than the area has buffers: each one used to pin a buffer,
    # and the area went to this one peer.
    hostile = asyncio.ensure_future(
        hostile_client(host, port, backend.total_buffers + extra_segments, segment_size, sent)
    )
    async with server, aborting(server, hostile):
        await asyncio.wait_for(asyncio.shield(sent), TIMEOUT)
        bodies = [Pattern(60 + i).chunks(300_000).__next__().tobytes() for i in range(4)]
        for _round in range(3):
            answers = await asyncio.wait_for(
                asyncio.gather(*(request(host, port, bodies) for _ in range(4))), TIMEOUT
            )
            assert answers == [expected(bodies)] * 4
        hostile.cancel()  # if the server has not dropped it already
        with contextlib.suppress(asyncio.CancelledError):
            await hostile
        await wait_until(lambda: backend.buffers_in_use == 0, "every buffer to come back")
        # Service goes on after the peer left.
        assert await asyncio.wait_for(request(host, port, bodies), TIMEOUT) == expected(bodies)


@pytest.mark.parametrize("mode", RING_SERVER_MODES)
async def test_tiny_segments_from_one_peer_do_not_stall_the_other_clients(mode):
    """A few hundred one-byte segments without a newline (each used to pin a
    whole buffer) leave every other client served."""
    await run_hostile_scenario(mode, 1, 64)


@pytest.mark.parametrize("mode", RING_SERVER_MODES)
async def test_a_peer_whose_views_are_held_pins_only_its_share(mode):
    """Segments too large to be copied out, held by a reader looking for a
    newline: the connection pauses at its share of the area (and its reader
    copies out what it holds), the other clients are served."""
    size = 40 << 10 if mode == "bufring" else 1000
    await run_hostile_scenario(mode, size, 16)


@pytest.mark.parametrize("mode", RING_SERVER_MODES)
async def test_a_consumer_holding_its_last_view_while_it_waits_keeps_receiving(mode):
    """``async for`` holds the previous view while it awaits the next: no
    view may pin so much of the connection's share that the receive cannot
    resume while the program holds it. A consumer that is away now and then
    lets data pile up in the socket, which then arrives in views of many
    adjacent buffers."""
    totals: asyncio.Queue[int] = asyncio.Queue()
    total = (32 << 20) // SCALE

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        received = 0
        async for view in reader:
            received += len(view)
            if received % (1 << 20) < len(view):
                await asyncio.sleep(0.002)
        totals.put_nowait(received)
        writer.close()

    server = await iouzcrx.start_server(handler, "127.0.0.1", 0, mode=mode, area_size=4 << 20)
    async with server, aborting(server):
        port = server.sockets[0].getsockname()[1]
        for _ in range(16):
            sender = Sender(socket.create_connection(("127.0.0.1", port)), seed=65, total=total)
            sender.start()
            assert await asyncio.wait_for(totals.get(), TIMEOUT) == total
            sender.join(TIMEOUT)
            assert sender.error is None


@pytest.mark.parametrize("mode", STALLING_SERVER_MODES)
async def test_readexactly_larger_than_the_area_returns_every_byte(mode):
    """readexactly(4 MiB) through a 1 MiB area: the reader copies out the
    views it cannot keep and goes on instead of holding every buffer."""
    got = asyncio.get_running_loop().create_future()
    total = 4 << 20

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        try:
            data = await reader.readexactly(total)
            got.set_result(bytes(data))
        finally:
            writer.close()

    server = await iouzcrx.start_server(handler, "127.0.0.1", 0, mode=mode, area_size=1 << 20)
    async with server, aborting(server):
        _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        for chunk in Pattern(61).chunks(total):
            writer.write(chunk)
        data = await asyncio.wait_for(got, TIMEOUT)
        assert data == b"".join(bytes(c) for c in Pattern(61).chunks(total))
        writer.close()
        await wait_until(lambda: server.backend.buffers_in_use == 0, "every buffer to come back")


@pytest.mark.parametrize("mode", STALLING_SERVER_MODES)
async def test_readuntil_a_line_longer_than_the_area_finds_its_separator(mode):
    got = asyncio.get_running_loop().create_future()
    size = 3 << 20

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        try:
            got.set_result(bytes(await reader.readuntil(b"\n")))
        finally:
            writer.close()

    server = await iouzcrx.start_server(
        handler, "127.0.0.1", 0, mode=mode, area_size=1 << 20, limit=8 << 20
    )
    async with server, aborting(server):
        _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        line = b"y" * size + b"\n"
        writer.write(line)
        assert await asyncio.wait_for(got, TIMEOUT) == line
        writer.close()


# -- the engine --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_views_garbage_only_in_cycles_do_not_stall_the_receive(ring, listener, mode):
    """With the GC disabled, views dropped inside reference cycles come back
    once the area runs out: 8 MiB pass through a 1 MiB area."""
    client, server = connect_pair(listener)
    queue = make_queue(ring, mode, area_size=1 << 20)
    receiver = queue.recv_multishot(server)
    total = 8 << 20
    sender = Sender(client, seed=62, total=total)
    verifier = Verifier(62)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        sender.start()
        while True:
            view = receiver.get(TIMEOUT)  # TimeoutError: the receive stalled
            if view is None:
                break
            verifier.feed(view)
            cycle: list[object] = [view]
            cycle.append(cycle)
            del view, cycle
    finally:
        if was_enabled:
            gc.enable()
    assert verifier.pos == total
    sender.join(TIMEOUT)
    assert sender.error is None
    receiver.close()
    server.close()
    gc.collect()
    ring.drain()
    assert queue.buffers_in_use == 0


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_small_chunks_are_copied_and_their_buffers_return_at_once(ring, listener, mode):
    client, server = connect_pair(listener)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    queue = make_queue(ring, mode)
    receiver = queue.recv_multishot(server)
    views = []
    for i in range(20):
        client.send(bytes([65 + i]))
        view = receiver.get(TIMEOUT)
        assert view is not None
        views.append(view)
    assert b"".join(bytes(v) for v in views) == bytes(range(65, 85))
    assert all(v.readonly for v in views)
    assert queue.buffers_in_use == 0  # the views hold copies, not buffers
    client.close()
    assert receiver.get(TIMEOUT) is None
    server.close()


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_a_receive_over_its_pin_share_waits_alone_and_resumes_when_its_views_go(
    ring, listener, mode
):
    """One receive's views are all held: it stops at about its share while
    another receive on the same area gets everything; releasing the views
    resumes it, and every byte arrives."""
    queue = make_queue(ring, mode, area_size=8 << 20)
    total = 6 << 20
    hog_client, hog_server = connect_pair(listener)
    other_client, other_server = connect_pair(listener)
    account = queue.pin_account()
    assert 1 <= account.limit < queue.total_buffers
    held: list[memoryview] = []
    hog = queue.recv_multishot(hog_server, on_data=held.append, account=account)
    other = queue.recv_multishot(other_server)
    hog_sender = Sender(hog_client, seed=63, total=total)
    other_sender = Sender(other_client, seed=64, total=total)
    hog_sender.start()
    # The hog stops at its share of the area, not at its end.
    ring.wait_for(lambda: hog.throttled and hog.starved, TIMEOUT)
    assert account.stalled
    assert queue.buffers_in_use < queue.total_buffers
    other_sender.start()
    verifier = Verifier(64)
    while (view := other.get(TIMEOUT)) is not None:
        verifier.feed(view)
        view.release()
    assert verifier.pos == total
    assert not hog.finished  # still waiting for its views to go
    hog_verifier = Verifier(63)
    while not hog.finished:
        while held:
            view = held.pop(0)
            hog_verifier.feed(view)
            view.release()
        ring.wait_for(lambda: held or hog.finished, TIMEOUT)
    for view in held:
        hog_verifier.feed(view)
    held.clear()
    del view
    assert hog.eof and hog_verifier.pos == total
    assert account.pinned == 0
    hog_sender.join(TIMEOUT)
    other_sender.join(TIMEOUT)
    hog_server.close()
    other_server.close()
    ring.drain()
    assert queue.buffers_in_use == 0


def test_a_pin_account_needs_a_positive_limit():
    with pytest.raises(ValueError, match="pin limit of 0"):
        iouzcrx._area.PinAccount(0)  # type: ignore[attr-defined]
