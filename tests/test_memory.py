"""Memory does not grow with the bytes received.

The area, the rings and the buffer pools are allocated when the server starts;
after that, receiving more must not cost more memory. Each test warms a server
up with a few transfers, then measures the process's live Python blocks and
resident memory across eight more: anything kept per chunk or per delivery
would add hundreds of blocks or megabytes, while a bounded state (caches,
free lists) stays where the warm-up left it."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import socket
import sys
import sysconfig

import pytest
from conftest import SCALE, SERVER_MODES, Sender

import iouzcrx

pytestmark = pytest.mark.parametrize("mode", SERVER_MODES)

# A small area, so that the warm-up has every page of it resident: the
# kernel fills buffers in turn, and an area is faulted in as it is first used.
AREA = 4 << 20
TRANSFER = (32 << 20) // SCALE  # bytes per connection
WARM_UP = 3  # transfers before measuring
MEASURED = 8  # transfers measured: 256 MiB on the host
_libc = ctypes.CDLL(None)

# Bounds for what a bounded state may still settle by (the loop's internal
# queues, the allocator's pages); a leak of one object per delivery adds
# more blocks than this by itself, one per 4 KiB chunk adds 65,536.
MAX_NEW_BLOCKS = 100
MAX_RSS_GROWTH = 1 << 20
# A free-threaded build allocates objects with mimalloc: the heap of each
# sender thread keeps freed pages resident for a while, beyond the reach of
# malloc_trim(). There the block count alone measures growth.
RSS_MEASURES_GROWTH = not sysconfig.get_config_var("Py_GIL_DISABLED")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def live_memory() -> tuple[int, int]:
    gc.collect()
    # Hand free heap pages back first: what stays resident is what is used.
    _libc.malloc_trim(0)
    return sys.getallocatedblocks(), resident_bytes()


async def transfer(port: int, received: asyncio.Queue[int]) -> None:
    # The sender is a thread sending slices of one pattern: it allocates
    # nothing per transfer, so what grows is the receiving side.
    sender = Sender(socket.create_connection(("127.0.0.1", port)), seed=8, total=TRANSFER)
    sender.start()
    assert await asyncio.wait_for(received.get(), 60) == TRANSFER
    sender.join(10)
    assert sender.error is None


async def measure(port: int, received: asyncio.Queue[int]) -> tuple[int, int]:
    """Warm up, then the growth in (blocks, resident bytes) over MEASURED transfers."""
    for _ in range(WARM_UP):
        await transfer(port, received)
    blocks, rss = live_memory()
    for _ in range(MEASURED):
        await transfer(port, received)
    blocks_after, rss_after = live_memory()
    return blocks_after - blocks, rss_after - rss


def check(growth: tuple[int, int]) -> None:
    blocks, rss = growth
    assert blocks <= MAX_NEW_BLOCKS, f"{blocks} Python blocks more after {MEASURED} transfers"
    if RSS_MEASURES_GROWTH:
        assert rss <= MAX_RSS_GROWTH, f"resident memory grew {rss / 1024:.0f} KiB"


async def test_a_zero_copy_protocol_server_does_not_grow(mode):
    received: asyncio.Queue[int] = asyncio.Queue()

    class Count(iouzcrx.ZeroCopyProtocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.bytes = 0

        def view_received(self, view):  # type: ignore[no-untyped-def]
            self.bytes += len(view)

        def eof_received(self):  # type: ignore[no-untyped-def]
            received.put_nowait(self.bytes)

    loop = asyncio.get_running_loop()
    server = await loop.create_zcrx_server(Count, "127.0.0.1", 0, mode=mode, area_size=AREA)
    async with server:
        check(await measure(server.sockets[0].getsockname()[1], received))


@pytest.mark.parametrize("consumer", ["keeps-up", "falls-behind"])
async def test_a_streams_server_does_not_grow(mode, consumer):
    received: asyncio.Queue[int] = asyncio.Queue()

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        total = 0
        async for view in reader:
            total += len(view)
            if consumer == "falls-behind" and total % (1 << 20) < len(view):
                # Now and then the consumer is away: views pile up, reading
                # pauses, the area runs dry and the receive is re-armed.
                await asyncio.sleep(0.002)
        received.put_nowait(total)
        writer.close()

    server = await iouzcrx.start_server(handler, "127.0.0.1", 0, mode=mode, area_size=AREA)
    async with server:
        check(await measure(server.sockets[0].getsockname()[1], received))
