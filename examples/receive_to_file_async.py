"""An asyncio server that writes each connection straight into its own file.

    python examples/receive_to_file_async.py OUTDIR [--host 127.0.0.1] [--port 9000]
    # elsewhere:  cat bigfile > /dev/tcp/127.0.0.1/9000

Connection k is stored in OUTDIR/connection-000k.bin. Every received view is
written with os.write from the receive area itself: the bytes never become a
Python object, and the buffer goes back to the kernel once the write returns.
It serves until Ctrl-C (a second Ctrl-C drops connections still open), or
until --connections N connections have ended.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os

import iouzcrx


class Countdown:
    """Resolves ``done`` once ``wanted`` connections have ended (never if None)."""

    def __init__(self, wanted: int | None) -> None:
        self.left = wanted
        self.done = asyncio.get_running_loop().create_future()

    def connection_ended(self) -> None:
        if self.left is not None:
            self.left -= 1
            if self.left == 0:
                self.done.set_result(None)


class ToFile(iouzcrx.ZeroCopyProtocol):
    def __init__(self, path: str, countdown: Countdown) -> None:
        self.path = path
        self.countdown = countdown
        self.fd = -1
        self.written = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def view_received(self, view: memoryview) -> None:
        # A blocking write on the loop: to the page cache it costs about what a
        # copy would, and it keeps the order of the data without any queue.
        while view:
            n = os.write(self.fd, view)
            self.written += n
            view = view[n:]  # writes can be short (nearly full disk, a signal)

    def eof_received(self) -> None:
        return None  # the file is complete: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        error = f" ({exc})" if exc else ""
        print(f"wrote {self.written} bytes to {self.path}{error}")
        self.countdown.connection_ended()


async def main(args: argparse.Namespace) -> None:
    os.makedirs(args.outdir, exist_ok=True)
    countdown = Countdown(args.connections)
    numbers = itertools.count(1)

    def new_connection() -> ToFile:
        path = os.path.join(args.outdir, f"connection-{next(numbers):04d}.bin")
        return ToFile(path, countdown)

    loop = asyncio.get_running_loop()
    server = await loop.create_zcrx_server(
        new_connection,
        args.host,
        args.port,
        mode=args.mode,
        interface=args.interface,
        queue=args.queue,
    )
    print(f"listening on {args.host}:{args.port}, writing to {args.outdir}")
    print(f"mode: {server.mode}")
    for better, why in server.refused.items():
        print(f"refused {better}: {why}")
    async with server:
        try:
            if args.connections is None:
                await server.serve_forever()
            else:
                await countdown.done
        except asyncio.CancelledError:
            # A second Ctrl-C (serve_forever waits for open connections after
            # the first): drop them, or leaving `async with` would wait again.
            server.abort_clients()
            raise


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("outdir", help="directory for the received files")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--mode", choices=("auto", *iouzcrx.MODES), default="auto")
    parser.add_argument("--interface", help="NIC for zerocopy mode (with --queue)")
    parser.add_argument("--queue", type=int, help="NIC RX queue for zerocopy mode")
    parser.add_argument("--connections", type=int, help="exit after N connections ended")
    return parser.parse_args()


if __name__ == "__main__":
    try:
        iouzcrx.run(main(parse_args()))
    except KeyboardInterrupt:
        pass
