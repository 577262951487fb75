"""Receive one TCP connection straight into a file, with the synchronous engine.

    python examples/receive_to_file.py OUTPUT [--port 9000] [--mode auto|copy|bufring]
    # elsewhere:  cat bigfile > /dev/tcp/127.0.0.1/9000

Each chunk is written to the file from the receive area itself (os.write of
the memoryview): no Python-level copy, and the buffer goes back to the kernel
as soon as the write returns.
"""

from __future__ import annotations

import argparse
import os
import socket

import iouzcrx


def open_queue(ring: iouzcrx.Ring, mode: str) -> iouzcrx.ReceiveQueue:
    if mode in ("auto", "copy"):
        try:
            return iouzcrx.ZcrxQueue(ring, mode="copy", area_size=16 << 20)
        except iouzcrx.IouzcrxError as exc:
            if mode == "copy":
                raise
            print(f"copy mode unavailable ({exc}); using bufring")
    return iouzcrx.BufRingQueue(ring, area_size=16 << 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--mode", choices=("auto", "copy", "bufring"), default="auto")
    args = parser.parse_args()

    with socket.create_server(("127.0.0.1", args.port)) as listener:
        print(f"waiting on 127.0.0.1:{args.port}")
        conn, peer = listener.accept()
    fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with conn, iouzcrx.Ring() as ring:
            queue = open_queue(ring, args.mode)
            for view in queue.recv_multishot(conn):
                while view:
                    view = view[os.write(fd, view) :]
            print(f"{peer[0]}:{peer[1]}: {queue.bytes_received} bytes in {queue.mode} mode")
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
