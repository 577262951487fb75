"""Shared test support: loopback connections, deterministic senders and a
byte-exact verifier, and the receive modes this kernel can run.

Modes that need a newer kernel skip here with the reason and run for real in
the VM (``tests/vm/run``), where ``IOUZCRX_VM=1``.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

import iouzcrx

FEATURES = iouzcrx.kernel_features()
IN_VM = os.environ.get("IOUZCRX_VM") == "1"

COPY_MODE_REASON = (
    f"copy mode needs ZCRX_REG_NODEV (Linux >= 7.1); this kernel is {FEATURES.release}. "
    "It runs in the VM: tests/vm/run"
)
requires_copy_mode = pytest.mark.skipif(not FEATURES.zcrx_nodev, reason=COPY_MODE_REASON)

# Receive modes of the engine. 'copy' carries the vm mark so tests/vm/run
# selects it; on a kernel without NODEV it skips with the reason.
RECEIVE_MODES = [
    pytest.param("bufring", id="bufring"),
    pytest.param("copy", id="copy", marks=[pytest.mark.vm, requires_copy_mode]),
]

# Full-size transfers on the host; the VM emulates its CPU (TCG), so it moves
# less data through the same tests.
SCALE = 16 if IN_VM else 1


def make_queue(
    ring: iouzcrx.Ring, mode: str, *, area_size: int = 8 << 20, buffer_size: int = 64 << 10, **kw
) -> iouzcrx.ReceiveQueue:
    """A receive queue of ``mode`` with about ``area_size`` bytes of area."""
    if mode == "bufring":
        return iouzcrx.BufRingQueue(ring, area_size=area_size, buffer_size=buffer_size, **kw)
    # zcrx chunks are pages (or rx_buf_len): buffer_size is a bufring notion.
    return iouzcrx.ZcrxQueue(ring, mode=mode, area_size=area_size, **kw)


@pytest.fixture
def ring() -> Iterator[iouzcrx.Ring]:
    with iouzcrx.Ring() as r:
        yield r


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1024)
    yield ls
    ls.close()


def connect_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(client, server) ends of a fresh loopback TCP connection."""
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return client, server


class Pattern:
    """A deterministic byte stream per seed: a 1 MiB random block, repeated."""

    BLOCK = 1 << 20

    def __init__(self, seed: int) -> None:
        block = random.Random(seed).randbytes(self.BLOCK)
        self.doubled = block + block  # any slice up to BLOCK long is contiguous

    def expected(self, pos: int, n: int) -> bytes:
        start = pos % self.BLOCK
        return self.doubled[start : start + n]

    def chunks(self, total: int, size: int = 256 << 10) -> Iterator[memoryview]:
        view = memoryview(self.doubled)
        pos = 0
        while pos < total:
            n = min(size, total - pos, self.BLOCK)
            start = pos % self.BLOCK
            yield view[start : start + n]
            pos += n


class Verifier:
    """Checks that views arrive as exactly the pattern's bytes, in order."""

    def __init__(self, seed: int) -> None:
        self.pattern = Pattern(seed)
        self.pos = 0

    def feed(self, view: memoryview) -> None:
        data = view.tobytes()
        done = 0
        while done < len(data):
            n = min(len(data) - done, Pattern.BLOCK)
            expected = self.pattern.expected(self.pos, n)
            if data[done : done + n] != expected:
                raise AssertionError(f"stream corrupted at byte {self.pos}")
            self.pos += n
            done += n


class Sender(threading.Thread):
    """Sends ``total`` pattern bytes on ``sock`` from a thread, then closes
    (or resets, with ``reset=True``) the connection."""

    def __init__(self, sock: socket.socket, seed: int, total: int, *, reset: bool = False):
        super().__init__(daemon=True)
        self.sock = sock
        self.seed = seed
        self.total = total
        self.reset = reset
        self.sent = 0
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            for chunk in Pattern(self.seed).chunks(self.total):
                self.sock.sendall(chunk)
                self.sent += len(chunk)
            if self.reset:
                # l_onoff=1, l_linger=0: close() sends RST instead of FIN.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except BaseException as exc:  # reported by the test through .error
            self.error = exc
        finally:
            self.sock.close()
            self.finished.set()


def receive_all(receiver: iouzcrx.Receiver, verifier: Verifier, timeout: float = 60.0) -> int:
    """Feed every view until EOF to ``verifier``; returns the byte count."""
    total = 0
    while True:
        view = receiver.get(timeout)
        if view is None:
            return total
        verifier.feed(view)
        total += len(view)
        view.release()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Every asyncio test runs on the stock selector loop and on uvloop."""
    return {
        "asyncio": lambda: iouzcrx.new_event_loop(use_uvloop=False),
        "uvloop": lambda: iouzcrx.new_event_loop(use_uvloop=True),
    }


# Modes of the asyncio layer: socket works anywhere, bufring wherever
# io_uring does, copy in the VM.
SERVER_MODES = [
    pytest.param("bufring", id="bufring"),
    pytest.param("socket", id="socket"),
    pytest.param("copy", id="copy", marks=[pytest.mark.vm, requires_copy_mode]),
]
