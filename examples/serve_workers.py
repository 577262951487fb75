"""A digest service on many cores: N worker processes share the port
(SO_REUSEPORT); each connection sends a stream and, after its EOF, gets back
the byte count and SHA-256 of what arrived, hashed straight from the receive
area.

    python examples/serve_workers.py --workers 4 [--port 9000] [--mode auto]
    # elsewhere:  head -c 100M /dev/urandom | tee >(sha256sum >&2) | nc -N 127.0.0.1 9000

The same application from the command line (from this directory):

    python -m iouzcrx serve serve_workers:Digest --workers 4 --port 9000

On a NIC with several RX queues, each worker can own some of them, and each
connection is served by the worker owning the queue it arrives on:

    python examples/serve_workers.py --workers 4 --interface eth0 --queues 0-7

Ctrl-C or SIGTERM stops it gracefully: the workers stop accepting, let open
connections finish (--shutdown-timeout), and each one's stats are printed.
A worker that crashes is restarted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
from typing import Any

import iouzcrx
from iouzcrx.workers import STEERING


class Digest(iouzcrx.ZeroCopyProtocol):
    """Hash each view where the kernel put it; answer at EOF."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.sha256 = hashlib.sha256()
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def view_received(self, view: memoryview) -> None:
        # hashlib reads the memoryview in place: no copy of the payload.
        self.sha256.update(view)
        self.received += len(view)

    def eof_received(self) -> None:
        assert self.transport is not None
        answer = f"{self.received} {self.sha256.hexdigest()} worker-pid {os.getpid()}\n"
        self.transport.write(answer.encode())
        return None  # close once the answer is written


def report(event: dict[str, Any]) -> None:
    kind = event["event"]
    if kind == "listening":
        print(f"listening on port {event['port']}", flush=True)
        if event["steering"] != "none":
            print(f"queues {event['queues']}, steering {event['steering']}", flush=True)
    elif kind == "serving":
        print(f"worker {event['worker']} pid {event['pid']}: mode {event['mode']}", flush=True)
    elif kind == "exited" and "restart_in" in event:
        print(
            f"worker {event['worker']} pid {event['pid']} died ({event['returncode']}), "
            f"restarting in {event['restart_in']:.1f} s",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--mode", choices=("auto", *iouzcrx.MODES), default="auto")
    parser.add_argument("--interface", help="NIC for zerocopy mode (with --queue)")
    parser.add_argument("--queue", type=int, help="NIC RX queue for zerocopy mode")
    parser.add_argument(
        "--queues", help="RX queues of --interface split among the workers, e.g. 0-7 or 0,2,4"
    )
    parser.add_argument("--steering", choices=STEERING, default="auto")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0)
    args = parser.parse_args()
    queues = None
    if args.queues:
        queues = []
        for part in args.queues.split(","):  # "0-3,8"
            first, _, last = part.partition("-")
            queues.extend(range(int(first), int(last or first) + 1))
    final = iouzcrx.serve(
        Digest,
        args.host,
        args.port,
        workers=args.workers,
        mode=args.mode,
        interface=args.interface,
        queue=args.queue,
        queues=queues,
        steering=args.steering,
        shutdown_timeout=args.shutdown_timeout,
        on_event=report,
    )
    for w in final:
        print(
            f"worker {w['worker']}: {w['connections']} connections, {w['bytes']} bytes, "
            f"{w['handed_off']} handed off, {w['restarts']} restarts, exit {w['returncode']}"
        )
    return 0 if all(w["returncode"] == 0 for w in final) else 1


if __name__ == "__main__":
    raise SystemExit(main())
