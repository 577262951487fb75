"""The per-chunk delivery paths under hostile use, on the host kernel in
bufring mode (classic and incremental rings): error handlers that raise,
protocols handing back odd memory, views over parts of buffers outliving
their connection. Every test checks that the data still arrives byte-exact
and that every buffer goes back."""

from __future__ import annotations

import array
import asyncio
import time
from typing import Any

import pytest
from conftest import Pattern, connect_pair

import iouzcrx

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
