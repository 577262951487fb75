"""One zcrx queue, several rings: ZCRX_CTRL_EXPORT on one ring and
ZCRX_REG_IMPORT on another (Linux 6.19+). The refill ring is single-producer
for the kernel: returns from both rings go through one lock, and data on
both stays byte-exact while they recycle the same small area."""

from __future__ import annotations

import copy
import os
import pickle
import threading

import pytest
from conftest import (
    FEATURES,
    SCALE,
    Sender,
    Verifier,
    connect_pair,
    receive_all,
    requires_copy_mode,
)

import iouzcrx

requires_export = pytest.mark.skipif(
    not FEATURES.zcrx_export,
    reason=f"zcrx export/import needs Linux >= 6.19; this kernel is {FEATURES.release}. "
    "It runs in the VM: tests/vm/run",
)


@pytest.mark.skipif(FEATURES.zcrx_export, reason="this kernel can share zcrx queues")
def test_importing_on_an_older_kernel_names_the_version_needed(ring):
    with pytest.raises(iouzcrx.KernelTooOld, match="6.19") as info:
        iouzcrx.ZcrxQueue.imported(ring, iouzcrx.ZcrxExport())
    assert FEATURES.release in str(info.value)


def test_only_an_export_of_this_process_can_be_imported(ring):
    with pytest.raises(TypeError, match="another process"):
        iouzcrx.ZcrxQueue.imported(ring, 7)


def test_an_export_closes_twice_harmlessly():
    export = iouzcrx.ZcrxExport()
    assert export.closed
    export.close()
    export.close()
    with pytest.raises(ValueError, match="closed"):
        export.fileno()


def test_an_export_adopts_no_fd_and_is_neither_pickled_nor_copied():
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        # It would look as if it owned fd, and own nothing.
        with pytest.raises(TypeError, match="export_queue"):
            iouzcrx.ZcrxExport(fd)
        with pytest.raises(TypeError, match="export_queue"):
            iouzcrx.ZcrxExport(fd=fd)
    finally:
        os.close(fd)
    export = iouzcrx.ZcrxExport()
    for duplicate in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot be pickled or copied"):
            duplicate(export)


@pytest.mark.vm
@requires_copy_mode
@requires_export
def test_export_gives_a_zcrx_fd_owned_by_the_export(ring):
    queue = iouzcrx.ZcrxQueue(ring, mode="copy", area_size=1 << 20)
    export = queue.export_queue()
    fd = export.fileno()
    assert "zcrx" in os.readlink(f"/proc/self/fd/{fd}")
    with export:
        pass
    assert export.closed
    export.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    # detach(): the caller owns the fd.
    export = queue.export_queue()
    fd = export.detach()
    export.close()
    os.fstat(fd)
    os.close(fd)
    with pytest.raises(ValueError, match="closed"):
        iouzcrx.ZcrxQueue.imported(ring, export)


@pytest.mark.vm
@requires_copy_mode
@requires_export
def test_two_rings_share_one_queue_and_both_receive_byte_exact(ring, listener):
    """The exporting ring and a ring on another thread receive at once
    through one small area: every chunk is recycled many times through the
    shared refill ring from both threads."""
    # Three times the area on each side, even scaled down for the VM.
    total = max((8 << 20) // SCALE, 3 << 20)
    queue = iouzcrx.ZcrxQueue(ring, mode="copy", area_size=1 << 20)
    export = queue.export_queue()
    client_a, server_a = connect_pair(listener)
    client_b, server_b = connect_pair(listener)
    imported_ready = threading.Event()
    outcome: dict[str, object] = {}

    def other_ring() -> None:
        try:
            with iouzcrx.Ring() as ring_b:
                shared = iouzcrx.ZcrxQueue.imported(ring_b, export)
                outcome["zcrx_id"] = shared.zcrx_id
                outcome["area"] = shared.area is queue.area
                receiver = shared.recv_multishot(server_b)
                imported_ready.set()
                verifier = Verifier(42)
                outcome["received"] = receive_all(receiver, verifier, timeout=120)
                outcome["stats"] = shared.stats()
                shared.close()
        except BaseException as exc:
            outcome["error"] = exc
            imported_ready.set()

    thread = threading.Thread(target=other_ring)
    thread.start()
    assert imported_ready.wait(60)
    senders = [Sender(client_a, seed=41, total=total), Sender(client_b, seed=42, total=total)]
    for sender in senders:
        sender.start()
    receiver = queue.recv_multishot(server_a)
    assert receive_all(receiver, Verifier(41), timeout=120) == total
    thread.join(150)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    for sender in senders:
        sender.join(30)
        assert sender.error is None
    assert outcome["received"] == total
    # Same area; the id is the other ring's own (ids are per ring).
    assert outcome["area"] is True and isinstance(outcome["zcrx_id"], int)
    # Both rings recycled the 256-chunk area many times over.
    assert queue.buffers_returned > queue.total_buffers
    stats = outcome["stats"]
    assert isinstance(stats, dict) and stats["buffers_returned"] > stats["total_buffers"]
    # The kernel counts copies on the exporting queue only.
    assert stats["copied_bytes"] is None and "exporting" in stats["kernel_stats_missing"]
    export.close()
    server_a.close()
    server_b.close()


@pytest.mark.vm
@requires_copy_mode
@requires_export
def test_export_misuse_gets_clear_errors_and_a_forked_child_leaves_the_parents_fd(ring):
    queue = iouzcrx.ZcrxQueue(ring, mode="copy", area_size=1 << 20)
    failures: list[BaseException] = []

    def from_another_thread() -> None:
        try:
            queue.export_queue()
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=from_another_thread)
    thread.start()
    thread.join(30)
    assert len(failures) == 1 and isinstance(failures[0], iouzcrx.WrongThread)
    export = queue.export_queue()
    fd = export.fileno()
    pid = os.fork()
    if pid == 0:  # the child closes its own copy only
        try:
            export.close()
            export.close()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "zcrx" in os.readlink(f"/proc/self/fd/{fd}")
    # Closing from another thread, twice at once: one close of the fd.
    closers = [threading.Thread(target=export.close) for _ in range(2)]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join(30)
    assert export.closed
    queue.close()
    with pytest.raises(ValueError, match="closed"):
        queue.export_queue()
    # The counters stay readable after the ring is gone.
    ring.close()
    assert queue.stats()["copied_bytes"] == (0 if FEATURES.zcrx_events else None)
