"""The per-chunk delivery paths under hostile use, on the host kernel in
bufring mode (classic and incremental rings): error handlers that raise,
protocols handing back odd memory, views over parts of buffers outliving
their connection. Every test checks that the data still arrives byte-exact
and that every buffer goes back."""

from __future__ import annotations

import array
import asyncio
import gc
import os
import socket
import threading
import time
from typing import Any

import pytest
from conftest import Pattern, connect_pair

import iouzcrx
from iouzcrx._area import PinAccount

KIB = 1024
TIMEOUT = 30

ring_kinds = pytest.mark.parametrize("incremental", [False, True], ids=["classic", "incremental"])


def bufring_queue(ring: iouzcrx.Ring, incremental: bool, **kw: int) -> iouzcrx.BufRingQueue:
    kw.setdefault("area_size", 1 << 20)
    kw.setdefault("buffer_size", 16 * KIB)
    queue = iouzcrx.BufRingQueue(ring, incremental=incremental, **kw)
    if incremental and not queue.incremental:
        queue.close()
        pytest.skip(str(queue.incremental_refused))
    return queue


def drain_until(ring: iouzcrx.Ring, done: Any, errors: list[BaseException]) -> None:
    """Drain as an event loop would, keeping what the drains raise, until
    ``done()`` or TIMEOUT (then the assertion names what was missing)."""
    deadline = time.monotonic() + TIMEOUT
    while not done() and time.monotonic() < deadline:
        try:
            ring.wait(0.01)
        except Exception as exc:  # the error handler's own failure
            errors.append(exc)


@ring_kinds
def test_an_error_handler_that_raises_does_not_strand_other_connections(
    ring, listener, incremental
):
    """One connection's callback raises and so does the ring's error
    handler: the drain still delivers every other connection's data of the
    same batch (runs of full buffers wait for the end of the batch), and
    the handler's failure comes out of the drain."""
    queue = bufring_queue(ring, incremental)
    handled: list[BaseException] = []

    def handler(exc: BaseException) -> None:
        handled.append(exc)
        raise RuntimeError("the error handler fails")

    ring.error_handler = handler
    pairs = [connect_pair(listener) for _ in range(4)]
    got = [bytearray() for _ in pairs]

    def refuse(view: memoryview) -> None:
        raise ValueError("on_data refuses")

    receivers = [
        queue.recv_multishot(conn, on_data=refuse if i == 0 else got[i].extend)
        for i, (_, conn) in enumerate(pairs)
    ]
    ring.submit()
    # Whole buffers: each connection's data waits in a run until the batch ends.
    payloads = [Pattern(i).doubled[: 32 * KIB] for i in range(len(pairs))]
    for (client, _), payload in zip(pairs, payloads, strict=True):
        client.sendall(payload)
    raised: list[BaseException] = []
    drain_until(ring, lambda: all(len(g) == 32 * KIB for g in got[1:]), raised)
    assert [len(g) for g in got[1:]] == [32 * KIB] * 3
    assert [bytes(g) for g in got[1:]] == payloads[1:]
    assert raised and all(str(e) == "the error handler fails" for e in raised)
    assert all(isinstance(e, ValueError) for e in handled)
    for receiver in receivers:
        receiver.close()
    for client, conn in pairs:
        client.close()
        conn.close()
    drain_until(ring, lambda: all(r.finished for r in receivers), raised)
    # The refused views live on in the tracebacks until these go.
    handled.clear()
    raised.clear()
    assert queue.buffers_in_use == 0, queue.stats()
    queue.close()


def test_a_keyboard_interrupt_is_not_hidden_by_an_error_handlers_failure(ring, listener):
    """A drain raises one of the exceptions its callbacks left: a
    KeyboardInterrupt from one connection's callback wins over an error
    handler's failure for another, whichever came first in the batch."""
    queue = bufring_queue(ring, False)

    def handler(exc: BaseException) -> None:
        raise RuntimeError("the error handler fails")

    ring.error_handler = handler
    pairs = [connect_pair(listener) for _ in range(2)]

    def refuse(view: memoryview) -> None:
        raise ValueError("on_data refuses")

    def interrupt(view: memoryview) -> None:
        raise KeyboardInterrupt

    receivers = [
        queue.recv_multishot(pairs[0][1], on_data=refuse),
        queue.recv_multishot(pairs[1][1], on_data=interrupt),
    ]
    ring.submit()
    for client, _ in pairs:  # the failing handler's connection first
        client.sendall(b"x" * 100)
        time.sleep(0.05)
    raised: list[BaseException] = []
    deadline = time.monotonic() + TIMEOUT
    while not any(isinstance(e, KeyboardInterrupt) for e in raised):
        assert time.monotonic() < deadline, f"the interrupt was lost: {raised}"
        try:
            ring.wait(0.01)
        except (Exception, KeyboardInterrupt) as exc:
            raised.append(exc)
    raised.clear()
    for receiver in receivers:
        receiver.close()
    ring.error_handler = None
    ring.wait_for(lambda: all(r.finished for r in receivers), TIMEOUT)
    for client, conn in pairs:
        client.close()
        conn.close()
    queue.close()


# -- get_buffer() handing back odd memory, in the ring and socket modes ------------

server_modes = pytest.mark.parametrize("mode", ["bufring", "socket"])


class OddBuffer:
    """A BufferedProtocol whose get_buffer() returns what ``make(state)``
    makes; ``read(state, nbytes)`` says what was written into it."""

    def __init__(self, make: Any, read: Any = None, updated: Any = None) -> None:
        self.make, self.read, self.updated = make, read, updated
        self.state: dict[str, Any] = {"calls": 0}
        self.data = bytearray()
        loop = asyncio.get_running_loop()
        self.eof = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> Any:
        self.state["calls"] += 1
        self.state["memory"] = self.make(self.state)
        return self.state["memory"]

    def buffer_updated(self, nbytes: int) -> None:
        memory = self.state["memory"]
        read = self.read or (lambda state, n: bytes(memoryview(memory).cast("B")[:n]))
        self.data += read(self.state, nbytes)
        if self.updated is not None:
            self.updated(self.state)

    def eof_received(self) -> None:
        if not self.eof.done():
            self.eof.set_result(bytes(self.data))

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.eof.done():
            self.eof.set_result(bytes(self.data))
        if not self.lost.done():
            self.lost.set_result(exc)


async def serve_one(mode: str, make: Any) -> tuple[iouzcrx.ZcrxServer, list[Any]]:
    protocols: list[Any] = []

    def factory() -> Any:
        protocols.append(make())
        return protocols[-1]

    server = await iouzcrx.create_zcrx_server(factory, "127.0.0.1", 0, mode=mode)
    return server, protocols


async def send_pattern(server: iouzcrx.ZcrxServer, seed: int, total: int, eof: bool) -> Any:
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(Pattern(seed).doubled[:total])
    if eof:
        writer.write_eof()
    return writer


async def accepted(protocols: list[Any]) -> Any:
    async with asyncio.timeout(TIMEOUT):
        while not protocols:
            await asyncio.sleep(0.01)
    return protocols[0]


def _resize(state: dict[str, Any]) -> None:
    # The protocol grows and shrinks the very bytearray it hands out.
    if state["calls"] % 2:
        state["memory"].extend(bytes(1000))
    else:
        del state["memory"][:700]


SHARED = bytearray(4096)

ODD_BUT_WRITABLE = {
    "array-of-ints": (lambda s: array.array("i", bytes(4000)), None, None),
    "2d-memoryview": (lambda s: memoryview(bytearray(4096)).cast("B", (64, 64)), None, None),
    "2d-int-memoryview": (lambda s: memoryview(bytearray(4096)).cast("i", (32, 32)), None, None),
    "same-buffer-each-time": (lambda s: SHARED, None, None),
    "size-changes-every-call": (lambda s: bytearray(1 + s["calls"] * 7919 % 70_000), None, None),
    "resized-in-buffer_updated": (
        lambda s: s.setdefault("buffer", bytearray(5000)),
        lambda s, n: bytes(s["buffer"][:n]),
        _resize,
    ),
    "huge": (lambda s: s.setdefault("buffer", bytearray(64 << 20)), None, None),
}


@server_modes
@pytest.mark.parametrize("kind", list(ODD_BUT_WRITABLE))
async def test_odd_but_writable_memory_from_get_buffer_takes_the_stream_byte_exact(mode, kind):
    make, read, updated = ODD_BUT_WRITABLE[kind]
    total = 2 << 20
    server, protocols = await serve_one(mode, lambda: OddBuffer(make, read, updated))
    async with server:
        writer = await send_pattern(server, 11, total, eof=True)
        protocol = await accepted(protocols)
        data = await asyncio.wait_for(protocol.eof, TIMEOUT)
        assert len(data) == total and data == Pattern(11).doubled[:total]
        assert server.backend.stats()["buffers_in_use"] == 0
        writer.close()
        await asyncio.wait_for(protocol.lost, TIMEOUT)


NOT_WRITABLE = {
    "bytes": lambda s: b"\0" * 100,
    "read-only-memoryview": lambda s: memoryview(bytearray(100)).toreadonly(),
    "non-contiguous-memoryview": lambda s: memoryview(bytearray(200))[::2],
    "not-a-buffer": lambda s: object(),
}


@server_modes
@pytest.mark.parametrize("kind", list(NOT_WRITABLE))
async def test_memory_that_cannot_be_written_fails_the_connection_naming_it(
    mode, kind, exception_handler_calls
):
    """The socket mode (and a resumed transport's held data) copies in
    Python: its error says the same as the ring modes' copy in Cython."""
    make = NOT_WRITABLE[kind]
    server, protocols = await serve_one(mode, lambda: OddBuffer(make))
    async with server:
        writer = await send_pattern(server, 12, 64 * KIB, eof=False)
        protocol = await accepted(protocols)
        exc = await asyncio.wait_for(protocol.lost, TIMEOUT)
        name = type(make({})).__name__
        assert isinstance(exc, TypeError), exc
        assert f"returned {name!r}, which is not writable contiguous memory" in str(exc)
        assert "return a bytearray" in str(exc)
        assert protocol.data == b""
        assert any(c.get("exception") is exc for c in exception_handler_calls)
        assert server.backend.stats()["buffers_in_use"] == 0
        writer.close()


# -- views over parts of incremental buffers; many peers -----------------------------


def send_in_pieces(client: socket.socket, data: bytes, sizes: list[int]) -> None:
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pos = i = 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        client.sendall(data[pos : pos + n])
        pos += n
        i += 1
    client.shutdown(socket.SHUT_WR)


def test_views_over_parts_released_in_a_forked_child_leave_the_parent_receiving(ring, listener):
    """The child inherits views over parts of the parent's buffers and
    releases them: it returns nothing to the parent's ring, whose queue
    still counts those buffers as lent until the parent releases its own
    copies of the views; the parent then receives on, byte-exact."""
    queue = bufring_queue(ring, True, area_size=64 * KIB)
    client, conn = connect_pair(listener)
    receiver = queue.recv_multishot(conn)
    views = []
    for i in range(5):
        client.sendall(bytes([65 + i]) * 10)
        views.append(receiver.get(TIMEOUT))
    lent = queue.buffers_in_use
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 0
        try:
            views.clear()
            gc.collect()
            code = 0 if queue.buffers_in_use == 0 and queue.buffers_pending_return == 0 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [bytes(v) for v in views] == [bytes([65 + i]) * 10 for i in range(5)]
    assert queue.buffers_in_use == lent
    payload = Pattern(3).doubled[: 256 * KIB]
    sender = threading.Thread(target=send_in_pieces, args=(client, payload, [3000, 7, 20_000]))
    sender.start()
    got = bytearray()
    for view in receiver:
        got += view
        view.release()
    sender.join(TIMEOUT)
    assert got == payload
    views.clear()
    assert queue.buffers_in_use == 0, queue.stats()
    client.close()
    conn.close()
    queue.close()


@ring_kinds
def test_tiny_views_held_by_one_connection_throttle_it_alone(ring, listener, incremental):
    """Every view, over a part of a buffer too, counts as a pinned buffer:
    a connection that holds its tiny messages is stopped at its share of
    the area while another connection's data goes on arriving, and
    resumes, byte-exact, once it lets go."""
    queue = bufring_queue(ring, incremental, area_size=256 * KIB)  # 16 buffers, 4 per account
    (hog_client, hog_conn), (other_client, other_conn) = (
        connect_pair(listener),
        connect_pair(listener),
    )
    hog_account = queue.pin_account()
    held: list[memoryview] = []
    hog = queue.recv_multishot(hog_conn, on_data=held.append, account=hog_account)
    other_data = bytearray()
    other = queue.recv_multishot(other_conn, on_data=other_data.extend, account=queue.pin_account())
    # Less than the area: the receive stops after the completions already
    # on their way, which may take a fast sender's whole socket buffer (and
    # a whole small area) past the limit.
    hog_payload = Pattern(4).doubled[: 96 * KIB]
    other_payload = Pattern(5).doubled[: 1 << 20]
    hog_sender = threading.Thread(
        target=send_in_pieces, args=(hog_client, hog_payload, [10, 10, 10, 5000])
    )
    hog_sender.start()
    raised: list[BaseException] = []
    drain_until(ring, lambda: hog.throttled, raised)
    assert hog_account.pinned >= hog_account.limit
    other_sender = threading.Thread(
        target=send_in_pieces, args=(other_client, other_payload, [500])
    )
    other_sender.start()
    drain_until(ring, lambda: other.finished, raised)
    assert bytes(other_data) == other_payload
    got = bytearray()

    def take(view: memoryview) -> None:
        got.extend(view)

    got += b"".join(held)
    held.clear()
    hog.on_data = take
    drain_until(ring, lambda: hog.finished, raised)
    hog_sender.join(TIMEOUT)
    other_sender.join(TIMEOUT)
    assert not raised
    assert got == hog_payload
    assert queue.buffers_in_use == 0, queue.stats()
    assert hog_account.pinned == 0
    assert queue.stats()["peak_buffers_in_use"] <= queue.total_buffers
    for sock in (hog_client, hog_conn, other_client, other_conn):
        sock.close()
    queue.close()


@ring_kinds
@pytest.mark.parametrize("delivery", ["views", "bytes", "buffered", "mixed"])
def test_many_peers_of_tiny_and_large_messages_in_a_small_area(
    ring, listener, incremental, delivery
):
    """Twelve connections share eight buffers, each sending 1 B to 20 KiB
    messages: every stream arrives byte-exact to its kind of delivery
    (views held until the next one comes, bytes, or copies into a small
    get_buffer()), no connection is left starved, and every buffer goes
    back."""
    peers, total = 12, 200_000
    queue = bufring_queue(ring, incremental, area_size=128 * KIB)
    pairs = [connect_pair(listener) for _ in range(peers)]
    got = [bytearray() for _ in range(peers)]
    held: list[list[memoryview]] = [[] for _ in range(peers)]
    receivers = []
    for i, (_, conn) in enumerate(pairs):
        kind = delivery if delivery != "mixed" else ("views", "bytes", "buffered")[i % 3]
        account = queue.pin_account()
        receiver = queue.recv_multishot(conn, account=account)
        if kind == "views":

            def keep_last(view: memoryview, i: int = i) -> None:
                got[i].extend(view)
                held[i][:] = [view]  # the one before goes back now

            receiver.on_data = keep_last
            receiver.on_end = lambda error, i=i: held[i].clear()
            # As a stream reader does: when the receive stalls (the views
            # held by all twelve can take every one of the eight buffers),
            # the view waiting for its successor is given up.
            account.on_stall = lambda i=i: held[i].clear()
        elif kind == "bytes":
            receiver.set_protocol_delivery(type("Bytes", (), {"data_received": got[i].extend}))
        else:
            memory = bytearray(777)

            class Buffered:
                def get_buffer(self, sizehint: int, memory: bytearray = memory) -> bytearray:
                    return memory

                def buffer_updated(self, n: int, memory: bytearray = memory, i: int = i) -> None:
                    got[i].extend(memory[:n])

            receiver.set_protocol_delivery(Buffered())
        receivers.append(receiver)
    sizes = [1, 7, 100, 500, 3000, 20_000, 13, 1]
    senders = [
        threading.Thread(
            target=send_in_pieces,
            args=(client, Pattern(i).doubled[:total], sizes[i % 3 :] + sizes[: i % 3]),
        )
        for i, (client, _) in enumerate(pairs)
    ]
    for sender in senders:
        sender.start()
    raised: list[BaseException] = []
    drain_until(ring, lambda: all(r.finished for r in receivers), raised)
    for sender in senders:
        sender.join(TIMEOUT)
    assert not raised
    assert [r.finished and r.eof for r in receivers] == [True] * peers
    assert [len(g) for g in got] == [total] * peers
    assert all(bytes(got[i]) == Pattern(i).doubled[:total] for i in range(peers))
    stats = queue.stats()
    assert stats["buffers_in_use"] == 0, stats
    assert 0 < stats["peak_buffers_in_use"] <= queue.total_buffers
    for client, conn in pairs:
        client.close()
        conn.close()
    queue.close()


@ring_kinds
@pytest.mark.parametrize("limit", ["own-share", "whole-area"])
def test_on_stall_comes_after_every_view_the_receive_delivers_before_it_waits(
    ring, listener, incremental, limit
):
    """A program that gives up its views when told of a stall must have
    them all by then: no view may come between on_stall and the receive's
    start again.  Told first, a program that keeps the newest view until
    the next one comes (as a parser does) would keep that one for ever;
    with every buffer of a shared area so held, no receive could start
    again.  Both ways a receive stalls: its connection reaching its own
    share of the area, and the area running out (an account whose limit
    is the whole area).  Each stop is told once."""
    queue = bufring_queue(ring, incremental, area_size=128 * KIB)
    if limit == "own-share":
        account = queue.pin_account()
    else:
        account = PinAccount(queue.total_buffers)
    client, conn = connect_pair(listener)
    total = 2 * 1024 * KIB
    receiver = queue.recv_multishot(conn, account=account)
    got = bytearray()
    held: list[memoryview] = []
    told_at: list[int] = []  # the receive's restarts when on_stall came
    late: list[int] = []  # views that came after it, before a restart

    def keep_newest(view: memoryview) -> None:
        got.extend(view)
        if told_at and told_at[-1] == receiver.rearms:
            late.append(len(view))
        held[:] = [view]

    def give_up() -> None:
        told_at.append(receiver.rearms)
        held.clear()

    receiver.on_data = keep_newest
    receiver.on_end = lambda error: held.clear()
    account.on_stall = give_up
    sender = threading.Thread(
        target=send_in_pieces, args=(client, Pattern(5).doubled[:total], [total])
    )
    sender.start()
    raised: list[BaseException] = []
    drain_until(ring, lambda: receiver.finished, raised)
    sender.join(TIMEOUT)
    assert not raised
    assert receiver.finished and receiver.eof, receiver.error
    assert bytes(got) == Pattern(5).doubled[:total]
    assert told_at, "the receive never stalled: the test did not test"
    assert late == [], f"{len(late)} views came after on_stall, the first of {late[0]} bytes"
    assert len(set(told_at)) == len(told_at), "told twice of one stop"
    assert queue.buffers_in_use == 0, queue.stats()
    assert account.pinned == 0
    client.close()
    conn.close()
    queue.close()


@ring_kinds
@pytest.mark.parametrize("order", ["receiver-queue-ring", "queue-receiver-ring", "ring-first"])
def test_a_forked_child_closes_the_parents_receiver_and_queue(ring, listener, incremental, order):
    """Like the ring, the receiver and queue a child inherits close there
    (twice, in any order) without touching the parent's: the child's copies
    of the queued views go, nothing is cancelled or unregistered, and the
    parent receives on."""
    queue = bufring_queue(ring, incremental, area_size=64 * KIB)
    client, conn = connect_pair(listener)
    receiver = queue.recv_multishot(conn)
    client.sendall(b"before the fork")
    ring.wait_for(lambda: receiver.queued, TIMEOUT)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 9
        try:
            steps = {
                "receiver": receiver.close,
                "queue": queue.close,
                "ring": ring.close,
            }
            names = order.split("-") if order != "ring-first" else ["ring", "queue", "receiver"]
            for name in names + names:
                steps[name]()
            code = 0 if queue.closed and receiver.queued == 0 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not queue.closed and not receiver.finished
    client.sendall(b", and after")
    got = b""
    while len(got) < len(b"before the fork, and after"):
        got += bytes(receiver.get(TIMEOUT))
    assert got == b"before the fork, and after"
    receiver.close()
    ring.wait_for(lambda: receiver.finished, TIMEOUT)
    assert queue.buffers_in_use == 0, queue.stats()
    client.close()
    conn.close()
    queue.close()


def test_closing_a_queue_cancels_every_receive_when_an_on_end_raises(ring, listener):
    """A starved receive ends at once when its queue closes; its on_end
    raising must not leave the queue's other receives running (a second
    close() would not get to them)."""
    queue = bufring_queue(ring, False, area_size=32 * KIB)  # two buffers
    pairs = [connect_pair(listener) for _ in range(2)]

    def fail(error: BaseException | None) -> None:
        raise ValueError("on_end fails")

    receivers = [
        queue.recv_multishot(pairs[0][1], on_end=fail),
        queue.recv_multishot(pairs[1][1]),
    ]
    # Views left queued hold both buffers: both receives starve.
    for client, _ in pairs:
        client.sendall(b"y" * (64 * KIB))
    ring.wait_for(lambda: all(r.starved for r in receivers), TIMEOUT)
    with pytest.raises(ValueError, match="on_end fails"):
        queue.close()
    queue.close()
    ring.wait_for(lambda: all(r.finished for r in receivers), TIMEOUT)
    assert [r.error for r in receivers] == [None, None]
    for receiver in receivers:
        receiver.close()  # the queued views go
    assert queue.buffers_in_use == 0, queue.stats()
    for client, conn in pairs:
        client.close()
        conn.close()


def test_closing_the_ring_ends_every_receive_when_an_on_end_raises(listener):
    """Closing the ring ends the starved receives of each of its queues:
    one's on_end raising must not leave the others (of that queue or the
    next) running with no end reported."""
    pairs = [connect_pair(listener) for _ in range(4)]
    with iouzcrx.Ring() as ring:
        queues = [bufring_queue(ring, False, area_size=32 * KIB) for _ in range(2)]

        def fail(error: BaseException | None) -> None:
            raise ValueError("on_end fails")

        receivers = [
            queues[i // 2].recv_multishot(conn, on_end=fail if i == 0 else None)
            for i, (_, conn) in enumerate(pairs)
        ]
        for client, _ in pairs:
            client.sendall(b"z" * (64 * KIB))
        ring.wait_for(lambda: all(r.starved for r in receivers), TIMEOUT)
        with pytest.raises(ValueError, match="on_end fails"):
            ring.close()
        ring.close()
    assert [r.finished for r in receivers] == [True] * 4
    assert [q.closed for q in queues] == [True, True]
    for receiver in receivers:
        receiver.close()
    assert [q.buffers_in_use for q in queues] == [0, 0]
    for client, conn in pairs:
        client.close()
        conn.close()
