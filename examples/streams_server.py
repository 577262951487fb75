"""A line-protocol server on iouzcrx streams: it answers the SHA-256 of each body.

    python examples/streams_server.py [--host 127.0.0.1] [--port 9000] [--mode auto]
    # elsewhere:  (printf 'SIZE 5\\nhello'; sleep 1) | nc 127.0.0.1 9000

A request is a header line ``SIZE <n>`` followed by n bytes; the answer is
``OK <sha256 hex>``. Requests may follow each other on one connection; a bad
header is answered with ``ERR <reason>`` and ends the connection. It serves
until Ctrl-C (a second Ctrl-C drops connections still open), or until
--connections N connections have ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib

import iouzcrx

PIECE = 1 << 20


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


def body_size(header: bytes) -> int | None:
    words = header.split()
    if len(words) == 2 and words[0] == b"SIZE" and words[1].isdigit():
        return int(words[1])
    return None


async def handle(
    countdown: Countdown, reader: iouzcrx.ZcrxStreamReader, writer: iouzcrx.ZcrxStreamWriter
) -> None:
    peer = writer.get_extra_info("peername")
    requests = received = 0
    outcome = "closed"
    try:
        while header := await reader.readline():  # empty: EOF between requests
            size = body_size(bytes(header))
            if size is None:
                writer.write(b"ERR expected 'SIZE <n>'\n")
                outcome = "bad header"
                break
            digest = hashlib.sha256()
            # Hashed piece by piece: a piece is mostly views of the receive
            # area, while a whole large body would have to be held in memory
            # (the reader copies out what exceeds the connection's share of
            # the area, which is shared with every other client).
            left = size
            while left:
                piece = await reader.readexactly(min(left, PIECE))
                digest.update(piece)
                left -= len(piece)
            writer.write(f"OK {digest.hexdigest()}\n".encode())
            await writer.drain()
            requests += 1
            received += size
    except asyncio.IncompleteReadError:
        outcome = "peer left mid-request"
    except (ValueError, OSError) as exc:  # ValueError: no newline within the limit
        outcome = f"failed: {exc}"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        print(f"{peer[0]}:{peer[1]}: {requests} requests, {received} bytes, {outcome}")
        countdown.connection_ended()


async def main(args: argparse.Namespace) -> None:
    countdown = Countdown(args.connections)
    server = await iouzcrx.start_server(
        functools.partial(handle, countdown),
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
