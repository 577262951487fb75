"""An echo server: every received view is written straight back.

    python examples/echo_server.py [--host 127.0.0.1] [--port 9000] [--mode auto]
    # elsewhere:  python examples/client.py --port 9000 --size 100000000

Writing is flow-controlled: while the peer does not read its echo, the server
stops reading, so neither side buffers without bound. When the peer half-closes,
the server sends what is left, closes its side and ends the connection. It
serves until Ctrl-C (a second Ctrl-C drops connections still open), or until
--connections N connections have ended.
"""

from __future__ import annotations

import argparse
import asyncio

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


class Echo(iouzcrx.ZeroCopyProtocol):
    def __init__(self, countdown: Countdown) -> None:
        self.countdown = countdown
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.echoed = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def view_received(self, view: memoryview) -> None:
        assert self.transport is not None
        # write() keeps whatever it cannot send at once, so the view can go.
        self.transport.write(view)
        self.echoed += len(view)

    # Past the write buffer's high-water mark: stop taking in more until the
    # peer has read enough of its echo.
    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def eof_received(self) -> None:
        assert self.transport is not None
        # The peer is done sending: pass its EOF on once the echo is out.
        self.transport.write_eof()
        self.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        print(f"{self.peer}: echoed {self.echoed} bytes" + (f" ({exc})" if exc else ""))
        self.countdown.connection_ended()


async def main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    countdown = Countdown(args.connections)
    server = await loop.create_zcrx_server(
        lambda: Echo(countdown),
        args.host,
        args.port,
        mode=args.mode,
        interface=args.interface,
        queue=args.queue,
    )
    print(f"listening on {args.host}:{args.port}")
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
