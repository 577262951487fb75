"""The buffer window of an incremental ring in bufring mode: the kernel is
given only ``window_size`` bytes of buffers at a time, the rest wait as
spares, the last returned first.  A stream read as fast as it arrives then
goes through the same few (cache-warm) buffers instead of the whole area,
while views held for longer still draw on every buffer.  On the host kernel."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

import pytest
from conftest import Sender, Verifier, connect_pair
from test_bufring_incremental import incremental_queue

import iouzcrx
from iouzcrx import _receive
from iouzcrx.errors import InvalidConfiguration

KIB = 1024
MIB = 1024 * KIB


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def address_of(view: memoryview) -> int:
    """Where a (read-only) view's bytes are in memory."""
    buffer = _PyBuffer()
    get = ctypes.pythonapi.PyObject_GetBuffer
    get.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
    release = ctypes.pythonapi.PyBuffer_Release
    release.argtypes = [ctypes.POINTER(_PyBuffer)]
    if get(view, ctypes.byref(buffer), 0) != 0:
        raise RuntimeError("PyObject_GetBuffer failed")
    try:
        return int(buffer.buf)
    finally:
        release(ctypes.byref(buffer))


def test_the_ring_is_given_a_window_of_buffers_and_keeps_the_rest(ring):
    queue = incremental_queue(ring, area_size=4 * MIB, buffer_size=64 * KIB, window_size=256 * KIB)
    stats = queue.stats()
    assert queue.total_buffers == 64
    assert stats["window"] == 4
    assert stats["spare_buffers"] == 60
    queue.close()
    # A window smaller than two buffers is two; one larger than the area is all.
    queue = incremental_queue(ring, area_size=1 * MIB, buffer_size=64 * KIB, window_size=1)
    assert queue.stats()["window"] == 2
    queue.close()
    queue = incremental_queue(ring, area_size=1 * MIB, buffer_size=64 * KIB, window_size=64 * MIB)
    assert queue.stats()["window"] == 16 and queue.stats()["spare_buffers"] == 0
    queue.close()


def test_a_classic_ring_is_given_every_buffer(ring):
    queue = iouzcrx.BufRingQueue(
        ring, incremental=False, area_size=1 * MIB, buffer_size=64 * KIB, window_size=128 * KIB
    )
    assert queue.stats()["window"] == 16 and queue.stats()["spare_buffers"] == 0
    queue.close()


@pytest.mark.parametrize("window_size", [0, -1, "1 MiB", 1.5])
def test_a_bad_window_size_is_refused_by_name(ring, window_size):
    with pytest.raises((InvalidConfiguration, TypeError), match="window_size"):
        iouzcrx.BufRingQueue(ring, area_size=1 * MIB, window_size=window_size)


def test_the_environment_sets_the_window_when_the_argument_does_not(ring, monkeypatch):
    monkeypatch.setenv("IOUZCRX_BUFRING_WINDOW", str(512 * KIB))
    queue = incremental_queue(ring, area_size=4 * MIB, buffer_size=64 * KIB)
    assert queue.stats()["window"] == 8
    queue.close()
    queue = incremental_queue(ring, area_size=4 * MIB, buffer_size=64 * KIB, window_size=128 * KIB)
    assert queue.stats()["window"] == 2  # the argument wins
    queue.close()
    monkeypatch.setenv("IOUZCRX_BUFRING_WINDOW", "1M")
    with pytest.raises(InvalidConfiguration, match="IOUZCRX_BUFRING_WINDOW='1M'.*unset it"):
        iouzcrx.BufRingQueue(ring, area_size=1 * MIB)
    monkeypatch.delenv("IOUZCRX_BUFRING_WINDOW")
    queue = incremental_queue(ring, area_size=4 * MIB, buffer_size=64 * KIB)
    assert queue.stats()["window"] == 16  # 1 MiB by default
    queue.close()


def test_a_stream_read_as_it_arrives_goes_through_the_same_few_buffers(ring, listener):
    """32 MiB through an area of 64 buffers, each view released as soon as it
    is read: the kernel only ever fills buffers from the window and the ones
    just returned, never the cold rest of the area."""
    queue = incremental_queue(ring, area_size=4 * MIB, buffer_size=64 * KIB, window_size=256 * KIB)
    client, server = connect_pair(listener)
    total = 32 * MIB
    sender = Sender(client, 3, total)
    verifier = Verifier(3)
    base = None
    used: set[int] = set()

    def on_data(view: memoryview) -> None:
        nonlocal base
        address = address_of(view)
        if base is None:
            base = address  # the first view starts at the first buffer's start
        first = (address - base) // (64 * KIB)
        last = (address - base + len(view) - 1) // (64 * KIB)
        used.update(range(first, last + 1))
        verifier.feed(view)

    receiver = queue.recv_multishot(server, on_data=on_data)
    sender.start()
    ring.wait_for(lambda: receiver.finished, 60)
    sender.join(10)
    assert sender.error is None and receiver.eof and receiver.error is None
    assert verifier.pos == total
    assert min(used) >= 0
    # 512 buffers' worth went through: had the ring been given the whole
    # area, every one of the 64 buffers would have been filled in turn.
    assert len(used) <= 2 * 4, sorted(used)
    assert queue.buffers_in_use == 0
    queue.close()
    server.close()


def hold_views(
    receiver: iouzcrx.Receiver, total: int, check: Callable[[], bool] = lambda: True
) -> list[memoryview]:
    """The views of the first ``total`` bytes, all held; ``check()`` must
    hold after each."""
    views: list[memoryview] = []
    received = 0
    while received < total:
        view = receiver.get(30)
        assert view is not None, "the stream stopped before the area was full"
        views.append(view)
        received += len(view)
        assert check()
    return views


def test_views_held_beyond_the_window_draw_on_the_spares(ring, listener):
    """Views over 3 MiB held at once, through a window of 256 KiB over 4 MiB:
    the spares refill the window as the kernel takes buffers, so the held
    bytes stay intact and the stream goes on until the area, not the window,
    runs out."""
    queue = incremental_queue(ring, area_size=4 * MIB, buffer_size=64 * KIB, window_size=256 * KIB)
    client, server = connect_pair(listener)
    total = 3 * MIB
    sender = Sender(client, 4, total)
    receiver = queue.recv_multishot(server)
    sender.start()
    views = hold_views(receiver, total)
    sender.join(10)
    assert sender.error is None
    assert queue.buffers_in_use >= total // (64 * KIB) - 1
    verifier = Verifier(4)
    for view in views:
        verifier.feed(view)
    assert verifier.pos == total
    for view in views:
        view.release()
    assert queue.buffers_in_use == 0
    assert receiver.get(10) is None and receiver.eof
    queue.close()
    server.close()


def test_the_peak_of_buffers_in_use_counts_views_still_held(ring, listener):
    """The peak is the most buffers out of the ring at once, whether or not
    any went back since: views held over 1 MiB make it, and it stays once
    they are released."""
    queue = incremental_queue(ring, area_size=4 * MIB, buffer_size=64 * KIB, window_size=256 * KIB)
    client, server = connect_pair(listener)
    total = 1 * MIB
    sender = Sender(client, 5, total)
    receiver = queue.recv_multishot(server)
    sender.start()
    views = hold_views(
        receiver,
        total,
        check=lambda: queue.peak_buffers_in_use == queue.buffers_in_use,
    )
    sender.join(10)
    held = queue.buffers_in_use
    assert held >= total // (64 * KIB)
    for view in views:
        view.release()
    assert queue.buffers_in_use == 0
    assert queue.peak_buffers_in_use == queue.stats()["peak_buffers_in_use"] == held
    assert receiver.get(10) is None and receiver.eof
    queue.close()
    server.close()


class CountingGC:
    """Stands in for the gc module inside the receive code, counting collections."""

    def __init__(self, real) -> None:
        self.real = real
        self.collections = 0

    def collect(self, *args: int) -> int:
        self.collections += 1
        return self.real.collect(*args)

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def test_a_ring_that_runs_dry_while_its_buffers_come_back_runs_no_collection(
    ring, listener, monkeypatch
):
    """Two buffers in the window: the kernel empties the ring again and again
    (each time ending the receive for want of buffers) while every buffer is
    on its way back.  Only a starvation with every buffer held may run the
    garbage collector, which costs milliseconds on a large heap."""
    counting = CountingGC(_receive._gc)
    monkeypatch.setattr(_receive, "_gc", counting)
    queue = incremental_queue(ring, area_size=1 * MIB, buffer_size=16 * KIB, window_size=32 * KIB)
    client, server = connect_pair(listener)
    total = 16 * MIB
    sender = Sender(client, 5, total)
    verifier = Verifier(5)
    receiver = queue.recv_multishot(server, on_data=verifier.feed)
    sender.start()
    ring.wait_for(lambda: receiver.finished, 60)
    sender.join(10)
    assert sender.error is None and receiver.eof and verifier.pos == total
    assert queue.stats()["starvations"] > 0  # the ring did run dry
    assert counting.collections == 0
    queue.close()
    server.close()


def test_a_starvation_with_every_buffer_held_still_collects_cycles(ring, listener, monkeypatch):
    """Views kept alive only by reference cycles hold both buffers of the
    area: the starved receive runs the collector, which frees them, and the
    stream goes on."""
    counting = CountingGC(_receive._gc)
    monkeypatch.setattr(_receive, "_gc", counting)
    queue = incremental_queue(ring, area_size=32 * KIB, buffer_size=16 * KIB)
    client, server = connect_pair(listener)
    total = 256 * KIB
    sender = Sender(client, 6, total)
    verifier = Verifier(6)

    class Cycle:
        pass

    def on_data(view: memoryview) -> None:
        verifier.feed(view)
        cycle = Cycle()
        cycle.self = cycle  # type: ignore[attr-defined]
        cycle.view = view  # type: ignore[attr-defined]

    gc_was_enabled = _receive._gc.isenabled()
    _receive._gc.disable()
    try:
        receiver = queue.recv_multishot(server, on_data=on_data)
        sender.start()
        ring.wait_for(lambda: receiver.finished, 60)
    finally:
        if gc_was_enabled:
            _receive._gc.enable()
    sender.join(10)
    assert sender.error is None and receiver.eof and verifier.pos == total
    assert counting.collections > 0
    queue.close()
    server.close()


def test_returns_from_another_thread_refill_the_window(ring, listener):
    """Views released on another thread while the owner waits: the spares
    they become reach the kernel on the owner thread."""
    queue = incremental_queue(ring, area_size=1 * MIB, buffer_size=16 * KIB, window_size=32 * KIB)
    client, server = connect_pair(listener)
    total = 4 * MIB
    sender = Sender(client, 7, total)
    receiver = queue.recv_multishot(server)
    sender.start()
    verifier = Verifier(7)
    handed: list[memoryview] = []
    lock = threading.Condition()
    done = False

    def releaser() -> None:
        while True:
            with lock:
                while not handed and not done:
                    lock.wait()
                if not handed and done:
                    return
                view = handed.pop(0)
            verifier.feed(view)
            view.release()

    thread = threading.Thread(target=releaser, daemon=True)
    thread.start()
    while True:
        view = receiver.get(30)
        if view is None:
            break
        with lock:
            handed.append(view)
            lock.notify()
        del view
    with lock:
        done = True
        lock.notify()
    thread.join(30)
    sender.join(10)
    assert sender.error is None and receiver.eof
    assert verifier.pos == total
    assert queue.buffers_in_use == 0
    queue.close()
    server.close()
