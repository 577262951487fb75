"""``python -m iouzcrx demo``: stream data over loopback through the best
receive mode this machine offers, verify every byte, report the figures."""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import resource
import socket
import sys
import time
from collections.abc import Callable

from iouzcrx._bufring import BufRingQueue
from iouzcrx._probe import kernel_features
from iouzcrx._receive import ReceiveQueue
from iouzcrx._ring import Ring
from iouzcrx._zcrx import ZcrxQueue
from iouzcrx.errors import IouzcrxError

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


def open_queue(ring: Ring, mode: str, area_size: int) -> tuple[ReceiveQueue, list[str]]:
    """The queue for ``mode`` ('auto' takes copy, then bufring) and why better
    modes were passed over."""
    refused: list[str] = []
    if mode in ("auto", "copy"):
        try:
            return ZcrxQueue(ring, mode="copy", area_size=area_size), refused
        except IouzcrxError as exc:
            if mode == "copy":
                raise
            refused.append(f"copy: {exc}")
    return BufRingQueue(ring, area_size=area_size), refused


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


def run(size_gib: float, connections: int, mode: str, area_mib: int) -> int:
    total = int(size_gib * GIB)
    per_connection = total // connections
    total = per_connection * connections
    features = kernel_features()
    if not features.io_uring:
        print(f"io_uring is unavailable here: {features.io_uring_error}", file=sys.stderr)
        return 1
    listener = socket.create_server(("127.0.0.1", 0), backlog=connections)
    ctx = multiprocessing.get_context("fork")
    senders = [
        ctx.Process(target=send_stream, args=(listener.getsockname(), seed, per_connection))
        for seed in range(connections)
    ]
    for p in senders:
        p.start()
    # Senders connect in any order; each stream is matched to its seed by its
    # first 64 bytes (the patterns differ there).
    accepted = [listener.accept()[0] for _ in range(connections)]
    listener.close()

    with Ring() as ring:
        queue, refused = open_queue(ring, mode, area_mib << 20)
        print(
            f"iouzcrx demo: mode={queue.mode} kernel={features.release} "
            f"connections={connections} bytes={total}"
        )
        for reason in refused:
            print(f"  not {reason}")
        checks: list[StreamCheck | None] = [None] * connections
        seeds = {pattern_block(seed)[:64]: seed for seed in range(connections)}
        received = [0]

        def on_data_for(index: int) -> Callable[[memoryview], None]:
            def on_data(view: memoryview) -> None:
                check = checks[index]
                if check is None:
                    check = checks[index] = StreamCheck(seeds[view[:64].tobytes()])
                check.feed(view)
                received[0] += len(view)

            return on_data

        usage_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        receivers = [
            queue.recv_multishot(sock, on_data=on_data_for(i)) for i, sock in enumerate(accepted)
        ]
        last = 0.0
        while not all(r.finished for r in receivers):
            ring.wait(0.2)
            now = time.monotonic()
            if now - last > 0.2:
                progress(received[0], total, started)
                last = now
        elapsed = time.monotonic() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        progress(received[0], total, started)
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        errors = [r.error for r in receivers if r.error is not None]
        stats = queue.stats()
    for p in senders:
        p.join()
    for sock in accepted:
        sock.close()
    if errors:
        print(f"receive failed: {errors[0]}", file=sys.stderr)
        return 1
    if received[0] != total or any(c is None or c.pos != per_connection for c in checks):
        print(f"lost data: received {received[0]} of {total} bytes", file=sys.stderr)
        return 1
    cpu = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    gb = total / 1e9
    print(f"mode:             {stats['mode']}")
    print(f"verified:         {total} bytes, byte-exact, over {connections} connections")
    print(f"throughput:       {gb / elapsed:.2f} GB/s ({elapsed:.2f} s)")
    print(f"receiver CPU:     {cpu / gb:.3f} s/GB (verification included)")
    print(f"chunks:           {stats['chunks']} ({stats['chunks'] / elapsed:,.0f}/s)")
    print(
        f"buffers recycled: {stats['buffers_returned']} "
        f"(area {stats['total_buffers']} buffers, {stats['rearms']} re-arms)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iouzcrx demo", description=__doc__)
    parser.add_argument("--size", type=float, default=4.0, help="GiB to stream (default 4)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--mode", choices=("auto", "copy", "bufring"), default="auto")
    parser.add_argument("--area", type=int, default=64, help="receive area in MiB")
    args = parser.parse_args(argv)
    if os.environ.get("IOUZCRX_DEMO_SIZE"):
        args.size = float(os.environ["IOUZCRX_DEMO_SIZE"])
    return run(args.size, args.connections, args.mode, args.area)
