"""A receive the kernel ends for want of buffers (-ENOMEM from the copy path)
never starts again without progress, and resumes once buffers really are
back in the kernel.

On a NIC-bound (``zerocopy``) queue the copy fallback (a flow that does not
arrive through the bound queue) allocates only from chunks the kernel took
from the refill ring, and the kernel takes them only when the queue's page
pool refills or on ZCRX_CTRL_FLUSH_RQ. Copy mode runs the same copy path;
``_emulate_nic_refill`` makes it refill as a NIC-bound queue does, so these
tests run that path on a real kernel (the VM); the buffer-ring mode, which
shares the starvation handling, runs on the host. Counts, not times, tell
a spinning receive from a waiting one."""

from __future__ import annotations

import socket

import pytest
from conftest import SCALE, Sender, Verifier, connect_pair, receive_all, requires_copy_mode

import iouzcrx

IN_VM_COPY = [pytest.mark.vm, requires_copy_mode]

AREA = 32 * 4096  # 32 chunks: the area runs out many times over per transfer
RQ_ENTRIES = 256  # larger than the area: the refill ring is never full


def small_queue(ring: iouzcrx.Ring) -> iouzcrx.ZcrxQueue:
    return iouzcrx.ZcrxQueue(ring, mode="copy", area_size=AREA, rq_entries=RQ_ENTRIES)


def queue_for(ring: iouzcrx.Ring, refill: str) -> iouzcrx.ReceiveQueue:
    if refill == "bufring":
        return iouzcrx.BufRingQueue(ring, area_size=AREA, buffer_size=4096)
    queue = small_queue(ring)
    if refill == "nic":
        queue._emulate_nic_refill()
    return queue


def pump(ring: iouzcrx.Ring, times: int = 20) -> None:
    """Give the ring many chances to re-arm (or spin): drain and wait."""
    for _ in range(times):
        ring.wait(0.02)


def hold_until_starved(ring: iouzcrx.Ring, receiver: iouzcrx.Receiver) -> list[memoryview]:
    held: list[memoryview] = []
    while not receiver.starved:
        ring.wait_for(lambda: receiver.queued or receiver.starved, 30)
        while receiver.queued:
            held.append(receiver.get(0))
    return held


@pytest.mark.parametrize(
    "refill",
    [
        pytest.param("copy", marks=IN_VM_COPY),
        pytest.param("nic", marks=IN_VM_COPY),
        "bufring",  # the same starve/re-arm logic, on the host's kernel
    ],
)
def test_a_receive_starved_by_held_views_waits_then_resumes(ring, listener, refill):
    client, server = connect_pair(listener)
    queue = queue_for(ring, refill)
    receiver = queue.recv_multishot(server)
    total = (4 << 20) // SCALE  # several times the area
    sender = Sender(client, seed=31, total=total)
    sender.start()
    verifier = Verifier(31)
    held = hold_until_starved(ring, receiver)
    starvations = queue.starvations
    rearms = receiver.rearms
    pump(ring)
    # Every buffer is held: nothing to re-arm with, and nothing was tried.
    assert receiver.starved and not receiver.finished
    assert queue.starvations == starvations and receiver.rearms == rearms
    for view in held:
        verifier.feed(view)
        view.release()
    held.clear()
    assert receive_all(receiver, verifier) + verifier.pos > 0
    sender.join(30)
    assert sender.error is None and verifier.pos == total
    assert queue.stats()["starvations"] >= 1
    server.close()


@pytest.mark.vm
@requires_copy_mode
def test_returns_left_in_the_refill_ring_are_flushed_when_a_receive_starves(ring, listener):
    """The livelock: released chunks sit in the refill ring, the copy path
    finds none free and ends the receive with -ENOMEM, and the counters say
    buffers are free. Flushing on -ENOMEM (and while a receive waits) lets
    the transfer finish; no starvation is retried without a return."""
    client, server = connect_pair(listener)
    queue = small_queue(ring)
    queue._emulate_nic_refill()
    assert queue.can_flush
    receiver = queue.recv_multishot(server)
    total = (32 << 20) // SCALE
    sender = Sender(client, seed=32, total=total)
    sender.start()
    verifier = Verifier(32)
    assert receive_all(receiver, verifier, timeout=60) == total
    sender.join(30)
    assert sender.error is None
    stats = queue.stats()
    assert stats["flushes"] >= 1
    # Each retried starvation cost at least one return to the kernel, and
    # each return was at least one chunk that carried data: a spinning
    # receive would have starved millions of times for the same chunks.
    assert stats["starvations"] <= stats["chunks"]
    assert receiver.rearms <= stats["chunks"]
    server.close()


@pytest.mark.vm
@requires_copy_mode
def test_without_a_flush_a_starved_receive_waits_instead_of_spinning(ring, listener):
    """As on a kernel without ZCRX_CTRL_FLUSH_RQ: once every chunk sits in
    the refill ring, nothing can give the copy path a buffer. The receive
    must then wait (counted as held), not re-arm for ever."""
    client, server = connect_pair(listener)
    queue = small_queue(ring)
    queue._emulate_nic_refill(flush=False)
    assert not queue.can_flush
    receiver = queue.recv_multishot(server)
    sender = Sender(client, seed=33, total=(16 << 20) // SCALE)
    sender.start()
    verifier = Verifier(33)
    while not (receiver.starved and queue.rearms_held):
        ring.wait_for(lambda: receiver.queued or (receiver.starved and queue.rearms_held), 30)
        while receiver.queued:
            view = receiver.get(0)
            verifier.feed(view)
            view.release()
    assert verifier.pos >= AREA // 2  # most of the area went round (small chunks are copies)
    pump(ring, 10)  # the last returns still go out, and may start it once more
    starvations = queue.starvations
    rearms = queue.rearms
    pump(ring, 50)
    assert queue.starvations == starvations and queue.rearms == rearms
    assert receiver.starved and not receiver.finished
    assert queue.stats()["rearms_held"] >= 1
    receiver.cancel()
    assert receiver.finished
    server.shutdown(socket.SHUT_RDWR)  # unblocks the sender
    server.close()
    sender.join(30)
