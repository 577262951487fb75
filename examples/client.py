"""A client that checks an echo server byte for byte, receiving by zero copy.

    python examples/echo_server.py --port 9000 &
    python examples/client.py [--host 127.0.0.1] [--port 9000] [--size 16777216] [--mode auto]

It sends --size random bytes, half-closes, and compares the echo with what it
sent as the views arrive (client-side zero-copy receive, through
iouzcrx.open_connection). It prints the receive mode, the byte counts and the
throughput, and exits with 0 if the echo is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time

import iouzcrx

CHUNK = 1 << 20


async def send(writer: iouzcrx.ZcrxStreamWriter, payload: memoryview) -> None:
    # Sending alongside receiving: the echo server stops reading while its
    # echo is not read, so sending everything first could stall both sides.
    for start in range(0, len(payload), CHUNK):
        writer.write(payload[start : start + CHUNK])
        await writer.drain()
    writer.write_eof()


def first_difference(got: memoryview, want: memoryview) -> int:
    pairs = zip(got, want, strict=False)  # the echo may be shorter or longer
    return next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(got), len(want)))


async def main(args: argparse.Namespace) -> int:
    payload = memoryview(os.urandom(args.size))
    try:
        reader, writer = await iouzcrx.open_connection(
            args.host, args.port, mode=args.mode, interface=args.interface, queue=args.queue
        )
    except OSError as exc:
        print(f"cannot connect to {args.host}:{args.port}: {exc}")
        return 1
    print(f"mode: {writer.get_extra_info('zcrx_mode')}")
    started = time.monotonic()
    sender = asyncio.create_task(send(writer, payload))
    received = 0
    mismatch: int | None = None
    try:
        async for view in reader:
            end = received + len(view)
            # Compared in place, against the same stretch of what was sent;
            # the view is dropped right after, which returns its buffer.
            if mismatch is None and view != payload[received:end]:
                mismatch = received + first_difference(view, payload[received:end])
            received = end
        await sender
    except OSError as exc:
        print(f"connection failed: {exc}")
        sender.cancel()
        return 1
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    seconds = max(time.monotonic() - started, 1e-9)
    print(f"sent {len(payload)} bytes, received {received} bytes")
    print(f"throughput: {len(payload) / seconds / 1e6:.1f} MB/s in {seconds:.3f} s")
    if mismatch is not None:
        print(f"verified: DIFFERENT, first difference at byte {mismatch}")
    elif received != len(payload):
        print(f"verified: DIFFERENT, {received} bytes came back instead of {len(payload)}")
    else:
        print("verified: identical")
        return 0
    return 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--size", type=int, default=16 << 20, help="bytes to send")
    parser.add_argument("--mode", choices=("auto", *iouzcrx.MODES), default="auto")
    parser.add_argument("--interface", help="NIC for zerocopy mode (with --queue)")
    parser.add_argument("--queue", type=int, help="NIC RX queue for zerocopy mode")
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(iouzcrx.run(main(parse_args())))
