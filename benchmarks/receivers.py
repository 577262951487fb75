"""The Python receivers of the benchmark suite, one per process.

    python benchmarks/receivers.py NAME --scenario bulk|rr|short --connections N
        [--request-size K --response-size R] [--expect-bytes B]
    python benchmarks/receivers.py --list        names this machine can run

Each receiver is written the way a user would write it against its API. It
listens on 127.0.0.1 (port 0), prints ``READY <port>``, serves the scenario
and prints one JSON line of figures (the same keys as the C receivers):

- bulk: N connections, each read to EOF and then closed;
- rr: one connection; after every K request bytes, an R-byte response;
- short: N connections, each read to EOF and then closed.

The measured window runs from the first connection to the end condition; CPU
is this process's getrusage over the window. ``rss_ready_kb`` is the peak RSS
before the first connection, ``rss_mid_kb`` the peak when half the expected
bytes had arrived, ``maxrss_kb`` the peak at the end: a receiver whose memory
does not grow with the bytes received shows the last two equal.

Names: ``{asyncio,uvloop}-{protocol,buffered,buffered-aligned}`` for the stock
loops, and ``iouzcrx-{MODE}-{zerocopy,streams,buffered}-{asyncio,uvloop}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import iouzcrx

STOCK_APIS = ("protocol", "buffered", "buffered-aligned")
IOUZCRX_APIS = ("zerocopy", "streams", "buffered", "protocol")
LOOPS = ("asyncio", "uvloop")
READ_SIZE = 256 << 10  # what the stock BufferedProtocols offer per read


class Figures:
    """What every receiver counts, and the end condition."""

    def __init__(self, args: argparse.Namespace, loop: asyncio.AbstractEventLoop) -> None:
        self.expect_connections = args.connections if args.scenario != "rr" else 1
        self.mid_bytes = args.expect_bytes // 2 if args.expect_bytes else 0
        self.bytes = 0
        self.chunks = 0
        self.connections = 0
        self.finished_connections = 0
        self.started = 0.0
        self.usage_start: resource.struct_rusage | None = None
        self.rss_ready_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.rss_mid_kb: int | None = None
        self.done = loop.create_future()
        self.result: dict[str, Any] = {}

    def connected(self) -> None:
        if not self.connections:
            self.started = time.perf_counter()
            self.usage_start = resource.getrusage(resource.RUSAGE_SELF)
        self.connections += 1

    def received(self, n: int) -> None:
        # Kept inline-cheap: one call per delivered chunk in every receiver.
        self.bytes += n
        self.chunks += 1
        if self.mid_bytes and self.bytes >= self.mid_bytes and self.rss_mid_kb is None:
            self.rss_mid_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def finished(self) -> None:
        self.finished_connections += 1
        if self.finished_connections == self.expect_connections and not self.done.done():
            seconds = time.perf_counter() - self.started
            end = resource.getrusage(resource.RUSAGE_SELF)
            start = self.usage_start
            assert start is not None
            self.result = {
                "bytes": self.bytes,
                "chunks": self.chunks,
                "connections": self.finished_connections,
                "seconds": seconds,
                "cpu_user": end.ru_utime - start.ru_utime,
                "cpu_sys": end.ru_stime - start.ru_stime,
                "maxrss_kb": end.ru_maxrss,
                "rss_ready_kb": self.rss_ready_kb,
                "rss_mid_kb": self.rss_mid_kb,
            }
            self.done.set_result(None)


class Responder:
    """The request/response rule: an R-byte response after every K bytes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.active = args.scenario == "rr"
        self.request_size = args.request_size
        self.response = b"r" * args.response_size
        self.partial = 0

    def feed(self, n: int, write: Callable[[bytes], None]) -> None:
        total = self.partial + n
        requests, self.partial = divmod(total, self.request_size)
        for _ in range(requests):
            write(self.response)


# -- protocols -----------------------------------------------------------------


class Counting:
    """What every benchmark protocol does around its data callback: count
    connections and bytes, and answer requests in the rr scenario."""

    def __init__(self, figures: Figures, args: argparse.Namespace) -> None:
        self.figures = figures
        self.responder = Responder(args)
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.responder.active:
            _nodelay(transport)
        self.figures.connected()

    def count(self, n: int) -> None:
        self.figures.received(n)
        if self.responder.active:
            self.responder.feed(n, self.transport.write)

    def eof_received(self) -> None:
        return None  # the transport closes

    def connection_lost(self, exc: BaseException | None) -> None:
        self.figures.finished()


class CountingProtocol(Counting, asyncio.Protocol):
    """The stock ``asyncio.Protocol``: data arrives as ``bytes``."""

    def data_received(self, data: bytes) -> None:
        self.count(len(data))


class CountingBufferedProtocol(Counting, asyncio.BufferedProtocol):
    """The stock ``asyncio.BufferedProtocol``, reading into one buffer."""

    def __init__(self, figures: Figures, args: argparse.Namespace, aligned: bool) -> None:
        super().__init__(figures, args)
        # A bytearray's data sits just past malloc's header, 16 bytes into a
        # page; an anonymous mapping starts on a page boundary.
        self.buffer = memoryview(mmap.mmap(-1, READ_SIZE) if aligned else bytearray(READ_SIZE))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.count(nbytes)


class CountingZeroCopyProtocol(Counting, iouzcrx.ZeroCopyProtocol):
    """iouzcrx's own protocol: each chunk is a view over the receive area,
    dropped (so its buffer goes back) when this method returns."""

    def view_received(self, view: memoryview) -> None:
        self.count(len(view))


def _nodelay(transport: Any) -> None:
    import socket

    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# -- servers ---------------------------------------------------------------------


async def serve_stock(api: str, figures: Figures, args: argparse.Namespace) -> Any:
    loop = asyncio.get_running_loop()
    aligned = api == "buffered-aligned"

    def factory() -> asyncio.BaseProtocol:
        if api == "protocol":
            return CountingProtocol(figures, args)
        return CountingBufferedProtocol(figures, args, aligned)

    return await loop.create_server(factory, "127.0.0.1", 0, backlog=4096)


async def serve_iouzcrx(mode: str, api: str, figures: Figures, args: argparse.Namespace) -> Any:
    loop = asyncio.get_running_loop()
    if api == "streams":
        return await iouzcrx.start_server(
            lambda r, w: stream_handler(r, w, figures, args),
            "127.0.0.1",
            0,
            mode=mode,
            backlog=4096,
            **args.options,
        )

    def factory() -> asyncio.BaseProtocol:
        if api == "zerocopy":
            return CountingZeroCopyProtocol(figures, args)
        if api == "protocol":
            return CountingProtocol(figures, args)
        return CountingBufferedProtocol(figures, args, False)

    return await iouzcrx.create_zcrx_server(
        factory, "127.0.0.1", 0, loop=loop, mode=mode, backlog=4096, **args.options
    )


async def stream_handler(
    reader: Any, writer: Any, figures: Figures, args: argparse.Namespace
) -> None:
    figures.connected()
    try:
        if args.scenario == "rr":
            _nodelay(writer.transport)
            response = b"r" * args.response_size
            while True:
                try:
                    request = await reader.readexactly(args.request_size)
                except asyncio.IncompleteReadError:
                    break
                figures.received(len(request))
                writer.write(response)
        else:
            async for view in reader:
                figures.received(len(view))
        writer.close()
    finally:
        figures.finished()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    figures = Figures(args, loop)
    parts = args.name.split("-")
    if parts[0] == "iouzcrx":
        server = await serve_iouzcrx(parts[1], "-".join(parts[2:-1]), figures, args)
    else:
        server = await serve_stock("-".join(parts[1:]), figures, args)
    port = server.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    await figures.done
    server.close()
    return figures.result


def loop_of(name: str) -> str:
    return name.split("-")[-1] if name.startswith("iouzcrx-") else name.split("-")[0]


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    use_uvloop = loop_of(name) == "uvloop"
    if name.startswith("iouzcrx-"):
        return iouzcrx.new_event_loop(use_uvloop=use_uvloop)
    if use_uvloop:
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.SelectorEventLoop()


def available_modes() -> dict[str, str | None]:
    """Each receive mode, with None if it works here, else the reason not."""
    from iouzcrx.modes import select_mode

    reasons: dict[str, str | None] = {}
    try:
        ring: Any = iouzcrx.Ring()
        ring_error = None
    except OSError as exc:
        ring, ring_error = None, exc
    for mode in ("copy", "bufring", "socket"):
        try:
            select_mode(ring, mode=mode, area_size=1 << 20, ring_error=ring_error)
            reasons[mode] = None
        except (iouzcrx.IouzcrxError, OSError) as exc:
            reasons[mode] = str(exc)
    reasons["zerocopy"] = "needs a NIC queue prepared for zero copy (interface= and queue=)"
    if ring is not None:
        ring.close()
    return reasons


def receiver_names(modes: list[str]) -> list[str]:
    names = [f"{loop}-{api}" for loop in LOOPS for api in STOCK_APIS]
    names += [f"iouzcrx-{m}-{api}-{loop}" for m in modes for api in IOUZCRX_APIS for loop in LOOPS]
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?")
    parser.add_argument("--list", action="store_true", help="print the runnable receivers")
    parser.add_argument("--scenario", choices=("bulk", "rr", "short"), default="bulk")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--request-size", type=int, default=1024)
    parser.add_argument("--response-size", type=int, default=64)
    parser.add_argument("--expect-bytes", type=int, default=0)
    parser.add_argument(
        "--buffer-size", type=int, help="iouzcrx: buffer_size (default: the library's)"
    )
    parser.add_argument("--area-size", type=int, help="iouzcrx: area_size (default: the library's)")
    args = parser.parse_args(argv)
    args.options = {"buffer_size": args.buffer_size} if args.buffer_size else {}
    if args.area_size:
        args.options["area_size"] = args.area_size
    if not args.list and not args.name:
        parser.error("give a receiver NAME or --list")
    return args


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.list:
        modes = available_modes()
        usable = [m for m, why in modes.items() if why is None]
        print(json.dumps({"modes": modes, "receivers": receiver_names(usable)}))
        return 0
    loop = new_loop(args.name)
    try:
        result = loop.run_until_complete(main(args))
    finally:
        loop.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
