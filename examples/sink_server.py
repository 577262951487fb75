"""A server that receives and discards, counting bytes per connection.

    python examples/sink_server.py [--host 127.0.0.1] [--port 9000] [--mode auto]
    python examples/sink_server.py --interface eth1 --queue 7   # true zero copy
    # elsewhere:  head -c 1G /dev/zero > /dev/tcp/127.0.0.1/9000

When a connection ends it prints the bytes received and the rate. It serves
until Ctrl-C (a second Ctrl-C drops connections still open), or until
--connections N connections have ended.
"""

from __future__ import annotations

import argparse
import asyncio
import time

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


class Sink(iouzcrx.ZeroCopyProtocol):
    def __init__(self, countdown: Countdown) -> None:
        self.countdown = countdown
        self.received = 0
        self.peer = "?"
        self.started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.started = time.monotonic()

    def view_received(self, view: memoryview) -> None:
        # Only the length is needed: returning without keeping the view hands
        # its buffer straight back to the kernel.
        self.received += len(view)

    def eof_received(self) -> None:
        return None  # nothing to answer: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        seconds = max(time.monotonic() - self.started, 1e-9)
        rate = self.received / seconds / 1e6
        error = f" ({exc})" if exc else ""
        print(
            f"{self.peer}: received {self.received} bytes in {seconds:.3f} s, "
            f"{rate:.1f} MB/s{error}"
        )
        self.countdown.connection_ended()


def report(server: iouzcrx.ZcrxServer, host: str, port: int) -> None:
    print(f"listening on {host}:{port}")
    print(f"mode: {server.mode}")
    for better, why in server.refused.items():
        print(f"refused {better}: {why}")


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    countdown = Countdown(args.connections)
    server = await loop.create_zcrx_server(
        lambda: Sink(countdown),
        args.host,
        args.port,
        mode=args.mode,
        interface=args.interface,
        queue=args.queue,
    )
    report(server, args.host, args.port)
    async with server:
        try:
            if args.connections is None:
                await server.serve_forever()
            else:
                await countdown.done
        except asyncio.CancelledError:
            # Ctrl-C: serve_forever stops accepting and waits for the open
            # connections; a second Ctrl-C lands here and drops them, or leaving
            # `async with` would wait for them again.
            server.abort_clients()
            raise


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
