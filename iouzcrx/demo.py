"""``python -m iouzcrx demo``: stream data over loopback through the best
receive mode this machine offers, verify every byte, report the figures."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import multiprocessing
import resource
import socket
import sys
import time
from typing import Any

import iouzcrx
from iouzcrx import create_zcrx_server
from iouzcrx._probe import kernel_features
from iouzcrx.modes import MODES
from iouzcrx.protocols import ZeroCopyProtocol

BLOCK = 1 << 20
GIB = 1 << 30


def pattern_block(seed: int) -> bytes:
    """1 MiB of deterministic bytes per connection (SHAKE-128 of the seed)."""
    return hashlib.shake_128(seed.to_bytes(8, "little")).digest(BLOCK)


def send_stream(address: tuple[str, int], seed: int, total: int) -> None:
    """Sender process: ``total`` bytes of the seed's pattern, then close."""
    block = memoryview(pattern_block(seed))
    with socket.create_connection(address) as sock:
        sent = 0
        while sent < total:
            n = min(BLOCK, total - sent)
            sock.sendall(block[:n])
            sent += n


class StreamCheck:
    """Byte-exact verification of one connection against its pattern."""

    def __init__(self, seed: int) -> None:
        block = pattern_block(seed)
        self.doubled = block + block
        self.pos = 0

    def feed(self, view: memoryview) -> None:
        n = len(view)
        start = self.pos % BLOCK
        if n > BLOCK or view.tobytes() != self.doubled[start : start + n]:
            raise SystemExit(f"data corrupted at byte {self.pos}")
        self.pos += n


def progress(done: int, total: int, started: float) -> None:
    if not sys.stderr.isatty():
        return
    width = 30
    filled = int(width * done / total)
    rate = done / max(time.monotonic() - started, 1e-9) / 1e9
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done / GIB:6.2f}/{total / GIB:.2f} GiB "
        f"{rate:5.2f} GB/s"
    )
    sys.stderr.flush()


class VerifyingProtocol(ZeroCopyProtocol):
    """Checks each connection byte by byte against its sender's pattern."""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.check: StreamCheck | None = None

    def view_received(self, view: memoryview) -> None:
        if self.check is None:
            self.check = StreamCheck(self.demo.seeds[view[:64].tobytes()])
            self.demo.checks.append(self.check)
        self.check.feed(view)
        self.demo.received += len(view)

    def eof_received(self) -> None:
        self.demo.finished += 1
        if self.demo.finished == self.demo.connections:
            self.demo.done.set_result(None)


class Demo:
    def __init__(self, connections: int, per_connection: int) -> None:
        self.connections = connections
        self.per_connection = per_connection
        self.total = connections * per_connection
        self.seeds = {pattern_block(seed)[:64]: seed for seed in range(connections)}
        self.checks: list[StreamCheck] = []
        self.received = 0
        self.finished = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


async def stream(connections: int, per_connection: int, mode: str, area_mib: int) -> int:
    demo = Demo(connections, per_connection)
    loop = asyncio.get_running_loop()
    server = await create_zcrx_server(
        lambda: VerifyingProtocol(demo), "127.0.0.1", 0, mode=mode, area_size=area_mib << 20
    )
    features = kernel_features()
    print(
        f"iouzcrx demo: mode={server.mode} kernel={features.release} "
        f"loop={type(loop).__name__} connections={connections} bytes={demo.total}"
    )
    for refused, reason in server.refused.items():
        print(f"  not {refused}: {reason}")
    ctx = multiprocessing.get_context("spawn")
    address = server.sockets[0].getsockname()
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    senders = [
        ctx.Process(target=send_stream, args=(address, seed, per_connection))
        for seed in range(connections)
    ]
    for p in senders:
        p.start()
    while not demo.done.done():
        await asyncio.wait([demo.done], timeout=0.2)
        progress(demo.received, demo.total, started)
    elapsed = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    for p in senders:
        p.join()
    stats = server.backend.stats()
    zero_copy = server.stats()["zero_copy"]
    server.close()
    server.abort_clients()
    await server.wait_closed()
    if demo.received != demo.total or any(c.pos != per_connection for c in demo.checks):
        print(f"lost data: received {demo.received} of {demo.total} bytes", file=sys.stderr)
        return 1
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    gb = demo.total / 1e9
    print(f"mode:             {stats['mode']}")
    print(f"verified:         {demo.total} bytes, byte-exact, over {connections} connections")
    print(f"throughput:       {gb / elapsed:.2f} GB/s ({elapsed:.2f} s)")
    print(f"receiver CPU:     {cpu / gb:.3f} s/GB (verification included)")
    print(f"chunks:           {stats['chunks']} ({stats['chunks'] / elapsed:,.0f}/s)")
    print(f"views delivered:  {stats['deliveries']}")
    print(
        f"buffers recycled: {stats['buffers_returned']} "
        f"(area {stats['total_buffers']} buffers, {stats['rearms']} re-arms)"
    )
    print(zero_copy_line(zero_copy))
    return 0


def zero_copy_line(summary: dict[str, Any]) -> str:
    """The report's answer to "did zero copy happen?", from the kernel's own
    counters where it keeps them."""
    if not summary["kernel_stats"]:
        share = summary["zero_copy_share"]
        known = "none" if share == 0.0 else "unknown"
        return f"zero copy:        {known} ({summary['kernel_stats_missing']})"
    received = summary["bytes_received"]
    copied = summary["copied_bytes"]
    share = summary["zero_copy_share"]
    percent = "n/a" if share is None else f"{share:.1%}"
    return (
        f"zero copy:        {percent} of {received} bytes; the kernel copied "
        f"{copied} bytes (its zcrx counters)"
    )


def run(
    size_gib: float, connections: int, mode: str, area_mib: int, use_uvloop: bool | None
) -> int:
    per_connection = int(size_gib * GIB) // connections
    return iouzcrx.run(stream(connections, per_connection, mode, area_mib), use_uvloop=use_uvloop)


MAX_CONNECTIONS = 256  # each is a sender process
MAX_SIZE_GIB = 1024.0


def gib_to_stream(text: str) -> float:
    try:
        size = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not 0 < size <= MAX_SIZE_GIB:  # NaN fails too
        raise argparse.ArgumentTypeError(
            f"{text} GiB: stream more than 0 and at most {MAX_SIZE_GIB:g} GiB"
        )
    return size


def whole_number(low: int, high: int) -> Any:
    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number}: use {low} to {high}")
        return number

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iouzcrx demo",
        description=__doc__,
        epilog="The data crosses loopback, which has no NIC queue: zerocopy mode "
        "needs a NIC (create_zcrx_server's interface= and queue=), so auto takes "
        "the best mode loopback allows.",
    )
    parser.add_argument("--size", type=gib_to_stream, default=4.0, help="GiB to stream (default 4)")
    parser.add_argument(
        "--connections",
        type=whole_number(1, MAX_CONNECTIONS),
        default=4,
        help=f"connections, one sender process each (1 to {MAX_CONNECTIONS}, default 4)",
    )
    parser.add_argument("--mode", choices=("auto",) + MODES, default="auto")
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default=None, help="default: uvloop if installed"
    )
    parser.add_argument(
        "--area",
        type=whole_number(1, 1 << 20),
        default=64,
        help="receive area in MiB (default 64)",
    )
    args = parser.parse_args(argv)
    if int(args.size * GIB) < args.connections:
        parser.error(f"--size {args.size} GiB is less than a byte per connection")
    use_uvloop = None if args.loop is None else args.loop == "uvloop"
    return run(args.size, args.connections, args.mode, args.area, use_uvloop)
