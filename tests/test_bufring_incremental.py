"""Incremental buffer rings (IOU_PBUF_RING_INC, Linux 6.12+) in bufring mode:
the kernel fills each buffer with many chunks, each delivered as a view over
its part, and a buffer goes back to the ring only when the kernel has
finished it and every view over any part of it is gone. On the host kernel."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import FEATURES, Pattern, Verifier, connect_pair, receive_all

import iouzcrx
from iouzcrx import _bufring
from iouzcrx.errors import InvalidConfiguration

KIB = 1024


def incremental_queue(ring: iouzcrx.Ring, **kw: int) -> iouzcrx.BufRingQueue:
    """An incremental queue, or a skip on a kernel that refuses one."""
    queue = iouzcrx.BufRingQueue(ring, incremental=True, **kw)
    if not queue.incremental:
        queue.close()
        pytest.skip(f"{queue.incremental_refused} (this kernel is {FEATURES.release})")
    return queue


class MessageSender(threading.Thread):
    """Sends ``total`` pattern bytes as messages of the given sizes (cycled),
    each its own send() with Nagle off, then closes."""

    def __init__(self, sock: socket.socket, seed: int, total: int, sizes: list[int]) -> None:
        super().__init__(daemon=True)
        self.sock, self.seed, self.total, self.sizes = sock, seed, total, sizes
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            data = memoryview(Pattern(self.seed).doubled)
            pos = 0
            i = 0
            while pos < self.total:
                n = min(self.sizes[i % len(self.sizes)], self.total - pos, Pattern.BLOCK)
                start = pos % Pattern.BLOCK
                self.sock.sendall(data[start : start + n])
                pos += n
                i += 1
        except BaseException as exc:  # reported by the test through .error
            self.error = exc
        finally:
            self.sock.close()


def message_sizes(seed: int) -> list[int]:
    """Mostly 1-500 bytes, now and then 64-200 KiB."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 500) for _ in range(400)]
    for at in range(0, 400, 100):
        sizes[at] = rng.randint(64 * KIB, 200 * KIB)
    return sizes


def test_the_host_kernel_takes_an_incremental_ring(ring):
    queue = incremental_queue(ring, area_size=256 * KIB, buffer_size=16 * KIB)
    assert queue.incremental_refused is None
    assert queue.stats()["incremental"] is True
    assert "incremental" in repr(queue)
    queue.close()


def test_many_small_and_a_few_large_messages_arrive_byte_exact(ring, listener):
    """Four connections share one ring of 16 KiB buffers: the stream goes
    through every buffer many times, chunks of different connections share
    buffers, and every byte arrives once, in order."""
    queue = incremental_queue(ring, area_size=256 * KIB, buffer_size=16 * KIB)
    total = 2 << 20
    receivers, senders, verifiers = [], [], []
    for seed in range(4):
        client, server = connect_pair(listener)
        verifier = Verifier(seed)
        receivers.append(queue.recv_multishot(server, on_data=verifier.feed))
        senders.append(MessageSender(client, seed, total, message_sizes(seed)))
        verifiers.append(verifier)
    for sender in senders:
        sender.start()
    ring.wait_for(lambda: all(r.finished for r in receivers), 60)
    for sender in senders:
        sender.join(10)
        assert sender.error is None
    for receiver, verifier in zip(receivers, verifiers, strict=True):
        assert receiver.eof and receiver.error is None
        assert verifier.pos == total
    stats = queue.stats()
    assert stats["bytes"] == 4 * total
    # A buffer goes round the ring only once the kernel has filled it to its
    # end, whatever the chunks were (the last one may still be part-filled).
    assert stats["buffers_returned"] * 16 * KIB <= stats["bytes"]
    assert stats["buffers_returned"] >= stats["bytes"] // (16 * KIB) - 1
    assert queue.buffers_in_use == 0
    assert 1 <= queue.peak_buffers_in_use <= queue.total_buffers
    queue.close()


def test_small_chunks_are_views_over_the_area(ring, listener):
    client, server = connect_pair(listener)
    queue = incremental_queue(ring, area_size=64 * KIB, buffer_size=16 * KIB)
    receiver = queue.recv_multishot(server)
    client.sendall(b"x" * 100)
    view = receiver.get(10)
    assert view is not None and bytes(view) == b"x" * 100
    assert not isinstance(view.obj, (bytes, bytearray))  # not a copy
    # The kernel has not finished the buffer: it is still in the ring.
    assert queue.buffers_in_use == 0
    del view
    client.close()
    assert receiver.get(10) is None
    queue.close()
    server.close()


def test_a_held_view_keeps_its_buffer_while_the_kernel_fills_the_rest(ring, listener):
    """A view over the first 100 bytes of a buffer is held while 256 KiB more
    arrive through a ring of two 4 KiB buffers: the kernel fills the rest of
    the held buffer, then everything passes through the other one; the held
    bytes never change, and the buffer goes back only when the view goes."""
    client, server = connect_pair(listener)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    queue = incremental_queue(ring, area_size=8 * KIB, buffer_size=4 * KIB)
    assert queue.total_buffers == 2
    pattern = Pattern(21)
    receiver = queue.recv_multishot(server)
    client.sendall(pattern.expected(0, 100))
    held = receiver.get(10)
    assert held is not None and bytes(held) == pattern.expected(0, 100)
    assert queue.buffers_in_use == 0  # the kernel still fills the rest of it

    total = 256 * KIB
    verifier = Verifier(21)
    verifier.feed(held)
    received = 100

    def send_rest() -> None:
        data = pattern.doubled
        try:
            client.sendall(memoryview(data)[100 : 100 + total])
        finally:
            client.close()

    thread = threading.Thread(target=send_rest, daemon=True)
    thread.start()
    finished_while_held = False
    while True:
        view = receiver.get(30)
        if view is None:
            break
        verifier.feed(view)
        received += len(view)
        view.release()
        # Once the kernel finished the held buffer it is out of the ring,
        # kept by the view alone.
        finished_while_held |= queue.buffers_in_use == 1
        assert bytes(held) == pattern.expected(0, 100), "the held view's bytes changed"
    thread.join(10)
    assert receiver.eof and received == total + 100 == verifier.pos
    assert finished_while_held
    assert queue.buffers_in_use == 1  # the held one: its view is alive
    assert bytes(held) == pattern.expected(0, 100)
    returned = queue.buffers_returned
    held.release()
    assert queue.buffers_in_use == 0
    assert queue.buffers_returned == returned + 1
    queue.close()
    server.close()


def test_held_views_over_parts_and_whole_buffers_return_each_buffer_once(ring, listener):
    """Messages of 1 byte to 20 KiB through 4 KiB buffers, every view held
    until the end: views over parts of buffers and runs that start or end in
    a part with whole buffers between them.  Released in random order, each
    buffer goes back once, when the last view over any part of it goes (the
    kernel having finished it), and no sooner."""
    client, server = connect_pair(listener)
    queue = incremental_queue(ring, area_size=256 * KIB, buffer_size=4 * KIB)
    rng = random.Random(5)
    sizes = [rng.choice((1, 100, 3000, 4096, 5000, 8192, 20000)) for _ in range(60)]
    total = min(sum(sizes), 150 * KIB)
    receiver = queue.recv_multishot(server)
    sender = MessageSender(client, 5, total, sizes)
    sender.start()
    views = []
    while True:
        view = receiver.get(30)
        if view is None:
            break
        views.append(view)
    sender.join(10)
    assert sender.error is None and receiver.eof
    verifier = Verifier(5)
    for view in views:
        verifier.feed(view)
    assert verifier.pos == total
    held = queue.buffers_in_use
    assert 1 <= held <= queue.total_buffers
    rng.shuffle(views)
    returned = queue.buffers_returned
    last = held
    for view in views:
        view.release()
        now = queue.buffers_in_use
        assert now <= last
        assert queue.buffers_returned - returned == held - now
        last = now
    # Every buffer the kernel finished is back; one it still fills is not out.
    assert queue.buffers_in_use == 0
    assert queue.buffers_returned - returned == held
    ring.drain()
    assert queue.buffers_pending_return == 0
    queue.close()
    server.close()


def test_a_refused_flag_falls_back_to_the_classic_ring(ring, listener, monkeypatch):
    """A kernel before 6.12 refuses the flag with EINVAL. Here the real kernel
    refuses a flag word with an unknown bit beside INC, the same way: the
    queue registers a classic ring and says why."""
    monkeypatch.setattr(_bufring, "_INCREMENTAL_FLAGS", _bufring._INCREMENTAL_FLAGS | 0x8000)
    queue = iouzcrx.BufRingQueue(ring, area_size=256 * KIB, buffer_size=16 * KIB)
    assert not queue.incremental
    assert "EINVAL" in queue.incremental_refused and "6.12" in queue.incremental_refused
    client, server = connect_pair(listener)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pattern = Pattern(5)
    receiver = queue.recv_multishot(server)
    client.sendall(pattern.expected(0, 300))
    first = receiver.get(10)
    # Small, so copied out with its buffer back at once, as the classic ring does.
    assert first is not None and isinstance(first.obj, bytes)
    assert bytes(first) == pattern.expected(0, 300)
    verifier = Verifier(5)
    verifier.feed(first)
    total = 256 * KIB

    def send_rest() -> None:
        try:
            client.sendall(memoryview(pattern.doubled)[300 : 300 + total])
        finally:
            client.close()

    thread = threading.Thread(target=send_rest, daemon=True)
    thread.start()
    receive_all(receiver, verifier, 60)
    thread.join(10)
    assert receiver.eof and verifier.pos == total + 300
    assert queue.buffers_in_use == 0
    assert queue.buffers_returned == queue.chunks_received  # one buffer per chunk
    queue.close()
    server.close()


def test_the_classic_ring_by_argument_and_by_environment(ring, monkeypatch):
    queue = iouzcrx.BufRingQueue(ring, area_size=64 * KIB, buffer_size=16 * KIB, incremental=False)
    assert not queue.incremental and queue.incremental_refused is None
    queue.close()
    monkeypatch.setenv("IOUZCRX_BUFRING_INCREMENTAL", "0")
    queue = iouzcrx.BufRingQueue(ring, area_size=64 * KIB, buffer_size=16 * KIB)
    assert not queue.incremental
    queue.close()
    # The argument wins over the environment.
    incremental_queue(ring, area_size=64 * KIB, buffer_size=16 * KIB).close()


def test_a_bad_environment_value_names_itself_and_the_fix(ring, monkeypatch):
    monkeypatch.setenv("IOUZCRX_BUFRING_INCREMENTAL", "maybe")
    with pytest.raises(InvalidConfiguration, match=r"IOUZCRX_BUFRING_INCREMENTAL='maybe'.*1.*0"):
        iouzcrx.BufRingQueue(ring, area_size=64 * KIB, buffer_size=16 * KIB)


@pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is None,
    reason="the small-chunk benchmark compares with uvloop; uvloop is not installed",
)
@pytest.mark.skipif(bool(os.environ.get("IOUZCRX_VM")), reason="the host run")
def test_the_small_chunk_benchmark_runs(tmp_path):
    """benchmarks/small_chunks.py --quick as a smoke test: every receiver gets
    every byte (the script checks), and the figures are written. No speed
    is judged here."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "small_chunks.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| iouzcrx-zerocopy-incremental |" in done.stdout
    result = json.loads((tmp_path / "small_chunks.json").read_text())
    runs, scenario = result["runs"], result["scenario"]
    total = scenario["connections"] * scenario["bytes_per_connection"]
    assert set(runs) == {
        "uvloop-protocol",
        "uvloop-buffered",
        "iouzcrx-zerocopy-copy",
        "iouzcrx-zerocopy-incremental",
        "iouzcrx-buffered-copy",
        "iouzcrx-buffered-incremental",
    }
    for api in ("zerocopy", "buffered"):
        copy, incremental = runs[f"iouzcrx-{api}-copy"], runs[f"iouzcrx-{api}-incremental"]
        # A classic buffer goes round once per chunk, an incremental one once full.
        recycled = incremental["buffers_recycled"]["median"]
        assert recycled <= copy["buffers_recycled"]["median"]
        # Only full (256 KiB) buffers go back.
        assert recycled <= total // (256 * KIB)


@pytest.mark.parametrize("value", ["no", 0, 1])
def test_a_bad_incremental_argument_names_itself_and_the_fix(ring, value):
    with pytest.raises(InvalidConfiguration, match=rf"incremental={value!r}: use True.*False"):
        iouzcrx.BufRingQueue(ring, area_size=64 * KIB, buffer_size=16 * KIB, incremental=value)


def test_views_outlive_the_queue_and_the_ring(listener):
    """Views over parts of buffers released after close (twice) of the
    queue and the ring, one on another thread: nothing is returned to a
    ring that is gone, and the bytes stay readable."""
    client, server = connect_pair(listener)
    with iouzcrx.Ring() as ring:
        queue = incremental_queue(ring, area_size=64 * KIB, buffer_size=16 * KIB)
        receiver = queue.recv_multishot(server)
        views = []
        for part in (b"a" * 10, b"b" * 20, b"c" * 30):
            client.sendall(part)
            views.append(receiver.get(10))
        queue.close()
        queue.close()
    assert [bytes(v) for v in views] == [b"a" * 10, b"b" * 20, b"c" * 30]
    thread = threading.Thread(target=views.pop().release)
    thread.start()
    thread.join(10)
    views.clear()
    assert queue.buffers_in_use == 0
    client.close()
    server.close()
