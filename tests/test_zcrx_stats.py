"""A user can see whether zero copy happens: the kernel's own zcrx counters
and events (Linux 7.2+) per queue, in the queue's and the server's stats.

Copy mode (ZCRX_REG_NODEV) copies every byte, so there the kernel's
``copied_bytes`` must equal what was received: a check that fails if the
counters are misplaced, unread or mixed up with receive completions. On a
kernel without them (the 6.18 host) the fields are None with the reason."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
from conftest import (
    FEATURES,
    Pattern,
    Sender,
    Verifier,
    connect_pair,
    receive_all,
    requires_copy_mode,
)

import iouzcrx
from iouzcrx import _probe

requires_events = pytest.mark.skipif(
    not FEATURES.zcrx_events,
    reason=f"kernel zcrx events need Linux >= 7.2; this kernel is {FEATURES.release}. "
    "They run in the VM: tests/vm/run",
)


# -- a kernel without them (the host) ---------------------------------------------


@pytest.mark.skipif(FEATURES.zcrx_events, reason="this kernel has zcrx events")
def test_without_kernel_counters_the_features_say_why():
    reason = _probe.zcrx_events_missing(FEATURES)
    assert reason is not None and "7.2" in reason and FEATURES.release in reason
    assert FEATURES.as_dict()["zcrx_events"] is False
    assert FEATURES.zcrx_stats_size == 0


@pytest.mark.skipif(FEATURES.zcrx_export, reason="this kernel can share zcrx queues")
def test_without_export_the_features_say_which_kernel_is_needed():
    reason = _probe.zcrx_export_missing(FEATURES)
    assert reason is not None and "6.19" in reason


def test_a_server_without_a_zcrx_queue_reports_no_zero_copy_and_why():
    async def main() -> dict:
        server = await iouzcrx.create_zcrx_server(
            asyncio.Protocol, "127.0.0.1", 0, mode="bufring", area_size=1 << 20
        )
        try:
            return server.stats()
        finally:
            server.close()
            await server.wait_closed()

    summary = asyncio.run(main())["zero_copy"]
    assert summary["kernel_stats"] is False
    assert summary["zero_copy_share"] == 0.0
    assert "bufring" in summary["kernel_stats_missing"]


# -- the kernel's counters, for real (the VM) --------------------------------------


@pytest.mark.vm
@requires_events
def test_query_reports_the_events_and_counters_the_queue_uses():
    event = _probe.query_zcrx_event()
    assert event is not None
    assert event["event_flags"] & 0b11 == 0b11  # ALLOC_FAIL and COPY
    assert event["stats_size"] == 16 and event["stats_off_alignment"] == 8
    assert _probe.zcrx_events_missing(FEATURES) is None


@pytest.mark.vm
@requires_copy_mode
@requires_events
def test_in_copy_mode_the_kernel_counts_every_received_byte_as_copied(ring, listener):
    total = (1 << 20) + 12345
    client, server = connect_pair(listener)
    queue = iouzcrx.ZcrxQueue(ring, mode="copy", area_size=4 << 20)
    before = queue.kernel_counters()
    assert before is not None and before["copied_bytes"] == 0
    receiver = queue.recv_multishot(server)
    sender = Sender(client, seed=31, total=total)
    sender.start()
    verifier = Verifier(31)
    assert receive_all(receiver, verifier) == total
    sender.join(30)
    assert sender.error is None
    stats = queue.stats()
    assert stats["kernel_stats"] is True and stats["kernel_stats_missing"] is None
    assert stats["bytes"] == total
    assert stats["copied_bytes"] == total
    # A copy operation fills one or more chunks (one CQE each).
    assert 1 <= stats["copies"] <= stats["chunks"]
    assert stats["zero_copy_bytes"] == 0 and stats["zero_copy_share"] == 0.0
    # The copy fired its event at least once; the ring dispatched it to the
    # queue's event counter, not to a receive.
    assert stats["copy_events"] >= 1
    assert stats["alloc_fail_events"] == 0
    assert queue.events.unknown_events == 0
    server.close()


@pytest.mark.vm
@requires_copy_mode
@requires_events
def test_a_copy_event_fires_again_once_rearmed(ring, listener):
    client, server = connect_pair(listener)
    queue = iouzcrx.ZcrxQueue(ring, mode="copy", area_size=1 << 20)
    receiver = queue.recv_multishot(server)
    verifier = Verifier(32)
    data = Pattern(32).expected(0, 64 << 10)
    client.sendall(data[: 32 << 10])
    got = 0
    while got < 32 << 10:
        view = receiver.get(30)
        got += len(view)
        verifier.feed(view)
        del view
    ring.drain()
    fired = queue.events.copy_events
    assert fired >= 1
    queue.arm_events()
    rearms = queue.event_rearms
    assert rearms >= 1
    client.sendall(data[32 << 10 :])
    client.shutdown(socket.SHUT_WR)
    receive_all(receiver, verifier)
    assert verifier.pos == 64 << 10
    assert queue.events.copy_events > fired
    server.close()
    client.close()


@pytest.mark.vm
@requires_copy_mode
@requires_events
def test_a_server_reports_the_kernel_copy_share_per_queue():
    total = 2 << 20

    async def main() -> dict:
        done = asyncio.get_running_loop().create_future()
        received = 0

        class Sink(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                nonlocal received
                received += len(data)

            def eof_received(self) -> None:
                if not done.done():
                    done.set_result(None)

        server = await iouzcrx.create_zcrx_server(
            Sink, "127.0.0.1", 0, mode="copy", area_size=4 << 20
        )
        address = server.sockets[0].getsockname()

        def send() -> None:
            with socket.create_connection(address) as sock:
                sock.sendall(b"z" * total)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)

        thread = threading.Thread(target=send)
        thread.start()
        try:
            await asyncio.wait_for(done, 60)
            stats = server.stats()
        finally:
            server.close()
            server.abort_clients()
            await server.wait_closed()
            await asyncio.to_thread(thread.join, 30)
        assert received == total
        return stats

    stats = asyncio.run(main())
    assert stats["backend"]["copied_bytes"] == total
    summary = stats["zero_copy"]
    assert summary["kernel_stats"] is True
    assert summary["bytes_received"] == total
    assert summary["copied_bytes"] == total
    assert summary["zero_copy_share"] == 0.0
