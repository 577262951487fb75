"""Buffer lifecycle guarantees (DESIGN.md), in every receive mode the kernel
can run: bufring on the host, copy (RECV_ZC) in the VM."""

from __future__ import annotations

import fcntl
import gc
import os
import socket
import struct
import termios
import threading
import time

import conftest
import pytest
from conftest import (
    RECEIVE_MODES,
    SCALE,
    Sender,
    Verifier,
    connect_pair,
    receive_all,
)

import iouzcrx

pytestmark = pytest.mark.parametrize("mode", RECEIVE_MODES)


def make_queue(ring, mode, **kw):
    """In bufring mode the classic ring, where each chunk takes a buffer of
    its own, which these tests count (the incremental ring, whose chunks
    share buffers: test_bufring_incremental.py)."""
    if mode == "bufring":
        kw.setdefault("incremental", False)
    return conftest.make_queue(ring, mode, **kw)


def first_view(ring, listener, mode, total=256 << 10, **queue_kw):
    """A queue, its receiver, and the first view received from a sender."""
    client, server = connect_pair(listener)
    queue = make_queue(ring, mode, **queue_kw)
    receiver = queue.recv_multishot(server)
    sender = Sender(client, seed=3, total=total)
    sender.start()
    view = receiver.get(10)
    while view is not None and isinstance(view.obj, bytes):
        view = receiver.get(10)  # a small chunk, copied: it holds no buffer
    assert view is not None
    return queue, receiver, sender, server, view


def inq(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (SIOCINQ)."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]


def finish(receiver, sender, server):
    receiver.close()
    sender.join(10)
    server.close()


def test_a_view_is_area_memory_not_a_copy(ring, listener, mode):
    queue, receiver, sender, server, view = first_view(ring, listener, mode)
    assert view.readonly and view.nbytes > 0
    assert view.obj is not None and not isinstance(view.obj, (bytes, bytearray))
    with pytest.raises(TypeError):
        view[0] = 1
    del view
    finish(receiver, sender, server)


def test_buffer_returns_when_its_view_is_dropped(ring, listener, mode):
    queue, receiver, sender, server, view = first_view(ring, listener, mode)
    assert queue.buffers_in_use >= 1
    in_use = queue.buffers_in_use
    returned = queue.buffers_returned
    buffers = view.obj.buffers  # a view may cover a run of adjacent buffers
    del view
    assert queue.buffers_in_use == in_use - buffers
    assert queue.buffers_returned == returned + buffers
    finish(receiver, sender, server)


def test_slices_keep_the_buffer_until_the_last_is_released(ring, listener, mode):
    queue, receiver, sender, server, view = first_view(ring, listener, mode)
    in_use = queue.buffers_in_use
    buffers = view.obj.buffers
    head = view[:10]
    tail = view[10:][5:]
    del view
    assert queue.buffers_in_use == in_use
    head.release()
    assert queue.buffers_in_use == in_use
    data = tail.tobytes()
    del tail
    assert queue.buffers_in_use == in_use - buffers
    assert len(data) > 0
    finish(receiver, sender, server)


def test_release_returns_the_buffer_at_once(ring, listener, mode):
    queue, receiver, sender, server, view = first_view(ring, listener, mode)
    in_use = queue.buffers_in_use
    buffers = view.obj.buffers
    view.release()
    assert queue.buffers_in_use == in_use - buffers
    finish(receiver, sender, server)


def test_a_view_in_a_garbage_cycle_returns_when_collected(ring, listener, mode):
    queue, receiver, sender, server, view = first_view(ring, listener, mode)
    in_use = queue.buffers_in_use
    buffers = view.obj.buffers
    cycle: list[object] = [view]
    cycle.append(cycle)
    del view, cycle
    assert queue.buffers_in_use == in_use
    gc.collect()
    assert queue.buffers_in_use == in_use - buffers
    finish(receiver, sender, server)


def test_a_view_dropped_on_another_thread_returns_without_entering_the_kernel(ring, listener, mode):
    queue, receiver, sender, server, view = first_view(ring, listener, mode)
    in_use = queue.buffers_in_use
    pending = queue.buffers_pending_return
    buffers = view.obj.buffers
    holder = [view]
    del view
    t = threading.Thread(target=holder.clear)
    t.start()
    t.join()
    assert queue.buffers_in_use == in_use - buffers
    # Queued for the owner thread: with SINGLE_ISSUER the other thread could
    # not have entered the kernel.  The next drain publishes it.
    assert queue.buffers_pending_return == pending + buffers
    ring.drain()
    assert queue.buffers_pending_return == 0
    finish(receiver, sender, server)


def test_views_stay_readable_after_everything_is_closed(listener, mode):
    client, server = connect_pair(listener)
    ring = iouzcrx.Ring()
    queue = make_queue(ring, mode)
    receiver = queue.recv_multishot(server)
    sender = Sender(client, seed=11, total=512 << 10)
    sender.start()
    views = []
    verifier = Verifier(11)
    while sum(len(v) for v in views) < 64 << 10:
        views.append(receiver.get(10))
    ring.close()
    server.close()
    sender.join(10)
    del queue, receiver, ring
    gc.collect()
    for view in views:
        verifier.feed(view)  # same bytes, and no crash: the area is still mapped
    assert verifier.pos >= 64 << 10


def test_holding_every_buffer_pauses_delivery_without_loss(ring, listener, mode):
    """With the whole area held by the program the kernel stops receiving,
    TCP flow control holds the sender, and delivery resumes when views go."""
    client, server = connect_pair(listener)
    # Small socket buffers, so the stream is far larger than area + buffers
    # and the sender really is held back.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 << 10)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 << 10)
    total = 8 << 20
    queue = make_queue(ring, mode, area_size=1 << 20, buffer_size=64 << 10)
    receiver = queue.recv_multishot(server)
    sender = Sender(client, seed=5, total=total)
    sender.start()
    verifier = Verifier(5)
    held = []
    while not receiver.starved:
        # Starvation may begin while we wait, so wait for either.
        ring.wait_for(lambda: receiver.queued or receiver.starved, 30)
        while receiver.queued:
            held.append(receiver.get(0))
    assert queue.buffers_in_use == queue.total_buffers
    assert not sender.finished.is_set()  # the sender is held, not finished
    with pytest.raises(TimeoutError):
        receiver.get(0.2)  # and nothing more arrives while we hold everything
    for view in held:
        verifier.feed(view)
    del view
    held.clear()
    receive_all(receiver, verifier)
    sender.join(30)
    assert sender.error is None
    assert verifier.pos == total  # every byte, in order, none twice
    assert receiver.rearms >= 1 and receiver.eof
    server.close()


def test_a_receive_cancelled_as_the_area_runs_out_still_ends(ring, listener, mode):
    """A cancel issued from on_data, in the same batch of completions as the
    kernel ending the receive for want of buffers: the receive must report
    its end once buffers return, not wait as if it were to be re-armed."""
    client, server = connect_pair(listener)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sender = Sender(client, seed=6, total=8 << 20)
    sender.start()
    # Far more queued in the socket than the area holds, so that arming the
    # receive runs the area dry in one go.
    deadline = time.monotonic() + 10
    while inq(server) < (3 << 20) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inq(server) >= 3 << 20
    # Twice the longest view (1 MiB), so that a view reaches on_data while
    # the completions that run the area dry are still to be reaped.
    queue = make_queue(ring, mode, area_size=2 << 20, buffer_size=64 << 10)
    held, ends = [], []

    def hold_and_cancel(view):  # type: ignore[no-untyped-def]
        held.append(view)
        receiver.cancel()

    receiver = queue.recv_multishot(server, on_data=hold_and_cancel, on_end=ends.append)
    ring.wait_for(lambda: receiver.finished or receiver.starved, 10)
    held.clear()  # every buffer goes back
    ring.wait_for(lambda: receiver.finished, 10)
    assert ends == [None] and not receiver.eof
    assert queue.buffers_in_use == 0
    server.close()
    sender.join(10)


@pytest.mark.vm  # and on the host
def test_a_blocking_receive_is_woken_by_its_socket_where_the_eventfd_is_not(ring, listener, mode):
    """Where the kernel signals the eventfd late (Linux 7.3), a blocking wait
    also watches the receiving sockets. Shown with the kernel's eventfd
    signal switched off: data sent while the receiver sleeps must still wake
    it, which the eventfd alone never would."""
    client, server = connect_pair(listener)
    queue = make_queue(ring, mode)
    receiver = queue.recv_multishot(server)
    ring.drain()  # armed, and nothing to receive yet
    # By default the sockets are watched only where the eventfd is late.
    assert ring.kernel_signals_eventfd
    assert ring.watches_sockets == (not iouzcrx.kernel_features().eventfd_prompt)
    ring.kernel_signals_eventfd = False
    ring.watches_sockets = True
    sender = Sender(client, seed=12, total=3 << 20)
    threading.Timer(0.3, sender.start).start()  # once the receiver sleeps
    # True: woken by something that fired, not by the end of the timeout.
    assert ring.wait(30) is True
    assert receive_all(receiver, Verifier(12), timeout=10) == 3 << 20
    assert receiver.eof
    sender.join(10)
    server.close()


def test_a_watched_socket_closed_under_its_armed_receive_is_not_polled(ring, listener, mode):
    """Its number polls as POLLNVAL at once: watched still, every wait would
    return at once and the next enter nothing, round and round until the
    timeout (the enters count the rounds)."""
    client, server = connect_pair(listener)
    queue = make_queue(ring, mode)
    receiver = queue.recv_multishot(server)
    ring.drain()
    ring.watches_sockets = True
    assert receiver.armed
    server.close()
    enters = ring.enters
    try:
        receiver.get(timeout=1.0)  # nothing comes: the peer sends nothing
    except TimeoutError:
        pass
    assert ring.enters - enters < 50
    client.close()


def test_many_sockets_on_one_queue_each_receive_their_own_bytes(ring, listener, mode):
    sockets = 8
    per_socket = (128 << 20) // SCALE  # >= 1 GiB in all on the host
    queue = make_queue(ring, mode, area_size=32 << 20)
    receivers, senders, verifiers, servers = [], [], [], []
    for i in range(sockets):
        client, server = connect_pair(listener)
        servers.append(server)
        verifiers.append(Verifier(100 + i))
        senders.append(Sender(client, seed=100 + i, total=per_socket))
        receivers.append(queue.recv_multishot(server, on_data=verifiers[i].feed))
    for s in senders:
        s.start()
    ring.wait_for(lambda: all(r.finished for r in receivers), 600)
    for i in range(sockets):
        senders[i].join(10)
        assert senders[i].error is None
        assert receivers[i].eof and receivers[i].error is None
        assert verifiers[i].pos == per_socket
        servers[i].close()
    assert queue.bytes_received == sockets * per_socket
    assert queue.buffers_in_use == 0


def test_eof_reaches_the_caller(ring, listener, mode):
    client, server = connect_pair(listener)
    queue = make_queue(ring, mode)
    receiver = queue.recv_multishot(server)
    sender = Sender(client, seed=9, total=100_000)
    sender.start()
    assert receive_all(receiver, Verifier(9)) == 100_000
    assert receiver.eof and receiver.error is None
    assert list(receiver) == []
    server.close()


def test_connection_reset_reaches_the_caller(ring, listener, mode):
    client, server = connect_pair(listener)
    queue = make_queue(ring, mode)
    receiver = queue.recv_multishot(server)
    sender = Sender(client, seed=9, total=64 << 10, reset=True)
    sender.start()
    sender.join(10)
    with pytest.raises(ConnectionResetError):
        while receiver.get(10) is not None:
            pass
    assert receiver.finished and not receiver.eof
    server.close()


def test_a_garbage_cycle_of_ring_queue_and_views_collects_safely(listener, mode):
    gc.collect()  # earlier tests' garbage must not close fds during this one
    before = set(os.listdir("/proc/self/fd"))
    client, server = connect_pair(listener)
    ring = iouzcrx.Ring()
    queue = make_queue(ring, mode)
    receiver = queue.recv_multishot(server)
    sender = Sender(client, seed=31, total=1 << 20)
    sender.start()
    views = [receiver.get(10) for _ in range(4)]
    bag: dict[str, object] = {"ring": ring, "queue": queue, "rx": receiver, "views": views}
    bag["bag"] = bag
    del ring, queue, receiver, views, bag
    gc.collect()  # no crash: buffers released during collection find their queue intact
    server.close()
    sender.join(10)
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) == before  # the ring's fds went with it


def test_an_on_data_exception_goes_to_on_error_and_every_buffer_still_returns(ring, listener, mode):
    client, server = connect_pair(listener)
    queue = make_queue(ring, mode)
    errors: list[BaseException] = []
    seen: list[int] = []

    def on_data(view: memoryview) -> None:
        seen.append(len(view))
        if len(seen) % 2:
            raise ValueError(len(seen))

    receiver = queue.recv_multishot(server, on_data=on_data, on_error=errors.append)
    sender = Sender(client, seed=4, total=1 << 20)
    sender.start()
    while not receiver.finished:
        ring.wait(1.0)  # on_error took every exception: the drain never raises
    sender.join(10)
    assert receiver.eof and sum(seen) == 1 << 20
    assert [e.args[0] for e in errors] == list(range(1, len(seen) + 1, 2))
    for error in errors:
        error.__traceback__ = None  # the failing frame held its view
    gc.collect()
    assert queue.buffers_in_use == 0
    server.close()


def test_adjacent_chunks_arrive_as_one_view_with_exactly_the_bytes_in_order(ring, listener, mode):
    """A burst of full 4 KiB buffers, adjacent in the area, is delivered as
    views over several buffers; every completion is in exactly one view."""
    client, server = connect_pair(listener)
    total = 8 << 20
    # 256 buffers: the stream goes through each of them eight times, so a
    # buffer returned wrongly would show up as corrupted or missing data.
    queue = make_queue(ring, mode, area_size=1 << 20, buffer_size=4096)
    verifier = Verifier(12)
    sizes: list[tuple[int, int]] = []

    def on_data(view: memoryview) -> None:
        assert view.readonly and view.nbytes <= 1 << 20
        # A small chunk arrives as a copy (its buffer already went back): one completion.
        sizes.append((view.nbytes, getattr(view.obj, "buffers", 1)))
        verifier.feed(view)

    receiver = queue.recv_multishot(server, on_data=on_data)
    sender = Sender(client, seed=12, total=total)
    sender.start()
    # Let data pile up in the socket before the first drain (which submits
    # the receive): the first batch is then a long burst.
    deadline = time.monotonic() + 10
    while sender.sent < 1 << 20 and time.monotonic() < deadline:
        time.sleep(0.001)
    ring.wait_for(lambda: receiver.finished, 60)
    assert receiver.eof and verifier.pos == total
    assert max(buffers for _, buffers in sizes) > 1  # coalesced
    assert sum(buffers for _, buffers in sizes) == queue.chunks_received
    assert len(sizes) == queue.deliveries == queue.stats()["deliveries"] < queue.chunks_received
    assert all(n > (b - 1) * 4096 for n, b in sizes)  # no view spans an empty buffer
    assert queue.buffers_in_use == 0
    server.close()


def test_a_view_of_a_receive_with_a_pin_account_holds_at_most_half_its_limit(ring, listener, mode):
    """With a pin account, a coalesced view spans at most half the account's
    limit in buffers (so that the view a program keeps while it waits for
    the next leaves the receive able to go on), however long the burst."""
    client, server = connect_pair(listener)
    total = 8 << 20
    queue = make_queue(ring, mode, area_size=1 << 20, buffer_size=4096)
    account = queue.pin_account()
    cap = account.limit // 2
    assert 1 < cap < 128  # below what the area's other bounds allow one view
    verifier = Verifier(15)
    buffers: list[int] = []

    def on_data(view: memoryview) -> None:
        buffers.append(getattr(view.obj, "buffers", 1))
        assert view.nbytes <= cap * 4096
        verifier.feed(view)

    receiver = queue.recv_multishot(server, on_data=on_data, account=account)
    sender = Sender(client, seed=15, total=total)
    sender.start()
    deadline = time.monotonic() + 10
    while sender.sent < 1 << 20 and time.monotonic() < deadline:
        time.sleep(0.001)  # a long burst waits in the socket
    ring.wait_for(lambda: receiver.finished, 60)
    assert receiver.eof and verifier.pos == total
    assert 1 < max(buffers) <= cap
    assert sum(buffers) == queue.chunks_received
    server.close()


def test_every_buffer_of_a_coalesced_view_returns_once_with_its_last_slice(ring, listener, mode):
    client, server = connect_pair(listener)
    queue = make_queue(ring, mode, area_size=4 << 20, buffer_size=4096)
    kept: list[memoryview] = []

    def keep_first_run(view: memoryview) -> None:
        # Keep the first view over several buffers, drop every other one
        # at once (inside the drain, so returns are published promptly). A
        # small chunk arrives as a copy (bytes): it spans no buffer.
        if not kept and getattr(view.obj, "buffers", 1) > 1:
            kept.append(view)

    receiver = queue.recv_multishot(server, on_data=keep_first_run)
    sender = Sender(client, seed=13, total=8 << 20)
    sender.start()
    ring.wait_for(lambda: receiver.finished, 60)
    assert receiver.eof and kept, "no coalesced view in an 8 MiB stream"
    run = kept.pop()
    buffers = run.obj.buffers
    assert queue.buffers_in_use == buffers
    head, tail = run[:1], run[-1:]
    returned = queue.buffers_returned
    run.release()
    assert queue.buffers_in_use == buffers  # the slices still hold the run
    head.release()
    assert queue.buffers_in_use == buffers
    del tail  # the last slice: every buffer of the run goes back, once
    assert queue.buffers_in_use == 0
    assert queue.buffers_returned == returned + buffers == queue.chunks_received
    # The returned buffers are good for the kernel: another stream through
    # the same queue is byte-exact.
    client, server2 = connect_pair(listener)
    receiver = queue.recv_multishot(server2)
    sender = Sender(client, seed=14, total=4 << 20)
    sender.start()
    assert receive_all(receiver, Verifier(14)) == 4 << 20
    server.close()
    server2.close()


def test_every_byte_received_is_delivered_when_a_drain_returns(ring, listener, mode):
    """A run of adjacent chunks may be kept from one batch to the next while
    the socket has more, but never past the drain: whenever drain() returns,
    every byte the receive took from the kernel has reached on_data."""
    client, server = connect_pair(listener)
    queue = make_queue(ring, mode, area_size=4 << 20, buffer_size=4096)
    total = 32 << 20 if SCALE == 1 else 512 << 10  # the VM emulates its CPUs
    verifier = Verifier(13)
    delivered = 0

    def on_data(view: memoryview) -> None:
        nonlocal delivered
        delivered += len(view)
        verifier.feed(view)

    receiver = queue.recv_multishot(server, on_data=on_data)
    sender = Sender(client, 13, total)
    sender.start()
    deadline = time.monotonic() + 60
    while not receiver.finished:
        assert time.monotonic() < deadline, f"{delivered} of {total} bytes in 60 s"
        ring.drain()
        assert delivered == receiver.bytes_received
        time.sleep(0.001)
    sender.join(10)
    assert sender.error is None and receiver.eof
    assert delivered == verifier.pos == total
    queue.close()
    server.close()
