"""Bulk receive through the synchronous engine, side by side with a plain
Python ``recv_into`` receiver, over loopback.

    python benchmarks/engine_bulk.py [--size MiB] [--connections N] [--repeat K]

Receivers run interleaved (A B C A B C ...), each for ``--repeat`` rounds; the
table gives medians with min/max, and every figure as a ratio to recv_into.
Senders are separate processes so the receiver's CPU time is its own.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import selectors
import socket
import statistics
import time
from collections.abc import Callable

import iouzcrx

BLOCK = 1 << 20


def sender(address: tuple[str, int], total: int) -> None:
    payload = memoryview(bytes(range(256)) * (BLOCK // 256))
    with socket.create_connection(address) as sock:
        sent = 0
        while sent < total:
            n = min(BLOCK, total - sent)
            sock.sendall(payload[:n])
            sent += n


def recv_into_receiver(socks: list[socket.socket]) -> tuple[int, int]:
    """The stock way: non-blocking recv_into into one bytearray per socket."""
    selector = selectors.DefaultSelector()
    buffers = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        buffers[sock] = bytearray(256 << 10)
    total = chunks = 0
    open_count = len(socks)
    while open_count:
        for key, _ in selector.select():
            sock = key.fileobj
            try:
                n = sock.recv_into(buffers[sock])
            except BlockingIOError:
                continue
            if n == 0:
                selector.unregister(sock)
                open_count -= 1
            total += n
            chunks += 1
    return total, chunks


def engine_receiver(mode: str) -> Callable[[list[socket.socket]], tuple[int, int]]:
    def receive(socks: list[socket.socket]) -> tuple[int, int]:
        with iouzcrx.Ring() as ring:
            if mode == "bufring":
                queue: iouzcrx.ReceiveQueue = iouzcrx.BufRingQueue(ring, area_size=32 << 20)
            else:
                queue = iouzcrx.ZcrxQueue(ring, mode=mode, area_size=32 << 20)
            # A consumer that touches nothing: the cost measured is delivery.
            receivers = [queue.recv_multishot(s, on_data=len) for s in socks]
            while not all(r.finished for r in receivers):
                ring.wait(1.0)
            return queue.bytes_received, queue.chunks_received

    return receive


def run_once(
    receive: Callable[[list[socket.socket]], tuple[int, int]], connections: int, per_conn: int
) -> dict[str, float]:
    listener = socket.create_server(("127.0.0.1", 0), backlog=connections)
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=sender, args=(listener.getsockname(), per_conn))
        for _ in range(connections)
    ]
    for p in procs:
        p.start()
    socks = [listener.accept()[0] for _ in range(connections)]
    listener.close()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    total, chunks = receive(socks)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    for p in procs:
        p.join()
    for s in socks:
        s.close()
    if total != connections * per_conn:
        raise SystemExit(f"received {total} of {connections * per_conn} bytes")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    gb = total / 1e9
    return {"gbps": gb / elapsed, "cpu_per_gb": cpu / gb, "chunks_per_s": chunks / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1024, help="MiB per round (all connections)")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    receivers: dict[str, Callable[[list[socket.socket]], tuple[int, int]]] = {
        "python recv_into": recv_into_receiver,
        "iouzcrx bufring": engine_receiver("bufring"),
    }
    if iouzcrx.kernel_features().zcrx_nodev:
        receivers["iouzcrx copy"] = engine_receiver("copy")
    per_conn = (args.size << 20) // args.connections
    results: dict[str, list[dict[str, float]]] = {name: [] for name in receivers}
    for _ in range(args.repeat):
        for name, receive in receivers.items():
            results[name].append(run_once(receive, args.connections, per_conn))

    base = statistics.median(r["gbps"] for r in results["python recv_into"])
    base_cpu = statistics.median(r["cpu_per_gb"] for r in results["python recv_into"])
    print(
        f"bulk receive, {args.connections} connections, {args.size} MiB per round, "
        f"{args.repeat} rounds, kernel {iouzcrx.kernel_features().release}\n"
    )
    print("| receiver | GB/s median (min-max) | x recv_into | CPU s/GB | x recv_into | chunks/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in results.items():
        gbps = [r["gbps"] for r in runs]
        cpu = statistics.median(r["cpu_per_gb"] for r in runs)
        rate = statistics.median(r["chunks_per_s"] for r in runs)
        med = statistics.median(gbps)
        print(
            f"| {name} | {med:.2f} ({min(gbps):.2f}-{max(gbps):.2f}) | {med / base:.2f} "
            f"| {cpu:.3f} | {cpu / base_cpu:.2f} | {rate:,.0f} |"
        )


if __name__ == "__main__":
    main()
