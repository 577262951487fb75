"""Socket mode's lending of area buffers to the event loop's own transport."""

from __future__ import annotations

import asyncio
import collections
import functools
import os
import socket
import subprocess
import sys

import pytest
from isolation import TESTS, child_env

import iouzcrx
from iouzcrx._socket_pool import SocketBufferPool
from iouzcrx.protocols import ZeroCopyProtocol
from iouzcrx.socket_transport import AreaReadingProtocol


def test_an_unfilled_buffer_is_lent_again_not_leaked():
    # A loop asks for a buffer again when its read found nothing (EAGAIN).
    pool = SocketBufferPool(area_size=1 << 20, buffer_size=256 << 10)
    adapter = AreaReadingProtocol(pool, ZeroCopyProtocol())
    first = adapter.get_buffer(-1)
    assert adapter.get_buffer(-1) is first
    assert pool.buffers_in_use == 1
    adapter.connection_lost(None)
    assert pool.buffers_in_use == 0 and pool.free_buffers == 4


# A model of the pool run against the real one in a child process: a heap
# overflow or a wrong count shows as the child dying or failing.
POOL_FUZZ = r"""
import random, sys
import iouzcrx
from iouzcrx._socket_pool import SocketBufferPool

rng = random.Random(int(sys.argv[1]))
total = rng.choice([1, 2, 3, 8])
pool = SocketBufferPool(area_size=total * 4096, buffer_size=4096)
state = {i: "free" for i in range(total)}
views = {}
for _ in range(4000):
    op = rng.choice(["take", "filled", "put_back", "drop", "bad"])
    index = rng.choice([*range(-2, total + 2), rng.randrange(1 << 40)])
    if op == "take":
        taken = pool.take()
        if taken is None:
            assert "free" not in state.values()
        else:
            assert state[taken[0]] == "free"
            state[taken[0]] = "lent"
    elif op in ("filled", "put_back"):
        try:
            if op == "filled":
                nbytes = rng.choice([0, 1, 4096])
                views.setdefault(index, []).append(pool.filled(index, nbytes))
                assert len(views[index][-1]) == nbytes
            else:
                pool.put_back(index)
        except ValueError as exc:
            assert state.get(index) != "lent", exc
            assert str(index) in str(exc)
        else:
            assert state[index] == "lent"
            state[index] = "out" if op == "filled" else "free"
    elif op == "drop":
        out = [i for i, s in state.items() if s == "out"]
        if out:
            i = rng.choice(out)
            del views[i]
            state[i] = "free"
    else:
        for call in (lambda: pool.filled(index, -1), lambda: pool.filled(index, 4097),
                     lambda: pool.put_back("0"), lambda: pool.filled(None, 0)):
            try:
                call()
            except (ValueError, TypeError):
                pass
            else:
                raise AssertionError("a bad call was accepted")
    in_use = sum(s != "free" for s in state.values())
    assert pool.buffers_in_use == in_use, (pool.buffers_in_use, in_use)
    assert pool.free_buffers == total - in_use
views.clear()
for i in [i for i, s in state.items() if s == "lent"]:
    pool.put_back(i)
assert pool.buffers_in_use == 0 and pool.free_buffers == total
print("ok")
"""


def test_the_pool_refuses_every_fill_or_put_back_of_a_buffer_not_lent_and_keeps_its_counts():
    for seed in range(8):
        child = subprocess.run(
            [sys.executable, "-c", POOL_FUZZ, str(seed)],
            cwd=TESTS,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == 0, child.stderr
        assert child.stdout == "ok\n"


def test_a_misused_pool_names_the_buffer_and_its_state():
    pool = SocketBufferPool(area_size=1 << 20, buffer_size=256 << 10)
    with pytest.raises(ValueError, match="buffer 0: it is free"):
        pool.put_back(0)
    with pytest.raises(ValueError, match="buffer 4: this pool has buffers 0 to 3"):
        pool.filled(4, 1)
    taken = pool.take()
    assert taken is not None
    view = pool.filled(taken[0], 5)
    with pytest.raises(ValueError, match=f"buffer {taken[0]}: it is out"):
        pool.put_back(taken[0])
    assert pool.buffers_in_use == 1 and pool.free_buffers == 3
    view.release()
    assert pool.buffers_in_use == 0 and pool.free_buffers == 4


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Holder(ZeroCopyProtocol):
    """Keeps every view until told to let go; counts its connections."""

    def __init__(self, counts: collections.Counter[str], held: list[memoryview]) -> None:
        self.counts = counts
        self.held = held

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.counts["made"] += 1

    def view_received(self, view: memoryview) -> None:
        self.held.append(view)

    def connection_lost(self, exc) -> None:  # type: ignore[no-untyped-def]
        self.counts["lost"] += 1


async def wait_until(predicate, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(6000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_connections_arriving_while_the_pool_is_empty_allocate_no_buffer_each():
    loop = asyncio.get_running_loop()
    counts: collections.Counter[str] = collections.Counter()
    held: list[memoryview] = []
    server = await loop.create_zcrx_server(
        functools.partial(Holder, counts, held),
        "127.0.0.1",
        0,
        mode="socket",
        area_size=256 << 10,
        buffer_size=256 << 10,
        backlog=1000,
    )
    address = server.sockets[0].getsockname()
    async with server:
        first = socket.create_connection(address)
        first.sendall(b"x")
        await wait_until(lambda: held, "the first view")
        assert server.backend.free_buffers == 0
        flood = 2000
        before = rss()
        for _ in range(flood):
            # Each one's data is read while the pool is empty.
            with socket.socket() as client:
                client.setblocking(False)
                await loop.sock_connect(client, address)
                client.send(b"y" * 100)
        # Each connection's data read (into the spare: the pool is empty).
        await wait_until(lambda: len(held) == flood + 1, "every connection's data")
        grown = rss() - before
        # About 135 MB when each connection had a 64 KiB spare of its own.
        assert grown < 40 << 20, f"RSS grew by {grown >> 20} MiB for {flood} connections"
        held.clear()
        await wait_until(lambda: counts["lost"] == flood, "every connection to end")
        assert server.backend.buffers_in_use == 0
        first.close()


async def test_a_socket_mode_client_reads_on_after_its_area_has_filled():
    payload = os.urandom(4 << 20)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        # Two buffers: the area fills many times over.
        reader, writer = await iouzcrx.open_connection(
            "127.0.0.1", port, mode="socket", area_size=128 << 10, buffer_size=64 << 10
        )
        received = bytearray()
        while len(received) < len(payload):
            chunk = await asyncio.wait_for(reader.read(1 << 20), 60)
            assert chunk, f"EOF after {len(received)} bytes"
            received += chunk
        assert received == payload
        writer.close()
