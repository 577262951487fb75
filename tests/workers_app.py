"""The application the worker tests serve, by name (``workers_app:Verify``):
each connection says which worker took it, then checks every byte it
receives against the pattern its header names and answers with the verdict.

A stream is a 16-byte header (seed, length: two little-endian u64) and
``length`` bytes of ``payload(seed, length)``; after the sender's EOF the
server answers ``OK <pid> <length>`` or ``BAD <pid> <reason>``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct

import iouzcrx

HEADER = struct.Struct("<QQ")


def payload(seed: int, length: int) -> bytes:
    return hashlib.shake_128(seed.to_bytes(8, "little")).digest(length)


class Verify(iouzcrx.ZeroCopyProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.header = b""
        self.expected = b""
        self.length = -1
        self.received = 0
        self.problem: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(f"HELLO {os.getpid()}\n".encode())

    def view_received(self, view: memoryview) -> None:
        data = view.tobytes()
        view.release()
        if self.length < 0:
            self.header += data
            if len(self.header) < HEADER.size:
                return
            seed, self.length = HEADER.unpack_from(self.header)
            self.expected = payload(seed, self.length)
            data = self.header[HEADER.size :]
        end = self.received + len(data)
        if self.problem is None and self.expected[self.received : end] != data:
            self.problem = f"corrupted or too long at byte {self.received}"
        self.received = end

    def eof_received(self) -> None:
        assert self.transport is not None
        if self.problem is None and self.received != self.length:
            self.problem = f"received {self.received} of {self.length} bytes"
        verdict = f"BAD {os.getpid()} {self.problem}" if self.problem else f"OK {os.getpid()}"
        self.transport.write(f"{verdict} {self.received}\n".encode())
        return None


async def verify_streams(reader: iouzcrx.ZcrxStreamReader, writer: iouzcrx.ZcrxStreamWriter):
    """The same contract through streams."""
    writer.write(f"HELLO {os.getpid()}\n".encode())
    seed, length = HEADER.unpack(bytes(await reader.readexactly(HEADER.size)))
    data = bytes(await reader.readexactly(length))
    rest = await reader.read()
    ok = data == payload(seed, length) and not rest
    writer.write(f"{'OK' if ok else 'BAD'} {os.getpid()} {length}\n".encode())
    await writer.drain()
    writer.close()


def refuse_when_told(index: int) -> None:
    """Worker init: fail to start while the file named by
    $WORKERS_APP_REFUSE lists this worker's index."""
    path = os.environ.get("WORKERS_APP_REFUSE")
    if path and os.path.exists(path):
        with open(path) as f:
            if str(index) in f.read().split():
                raise RuntimeError(f"worker {index} told to refuse to start")
