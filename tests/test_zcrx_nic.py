"""Zero-copy receive bound to a real NIC queue: netdevsim, the kernel's
simulated NIC (tests/nsim.py sets it up, once per session: the ``nsim``
fixture of conftest.py), rebuilt by tests/vm/netdevsim/build so that the
kernel lets io_uring zcrx bind to its RX queues. Runs in the VM only.

The module's path comes from IOUZCRX_NETDEVSIM_KO (tests/run sets it from the
build script's output); without it these tests skip with that reason.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Iterator

import nlclient
import pytest
from conftest import Sender, Verifier, receive_all
from nsim import (
    LOCAL_ADDR,
    LOCAL_ADDR6,
    PEER_ADDR,
    PEER_ADDR6,
    SETUP_TIMEOUT,
    Nsim,
    bound,
    hds_delta,
    hds_stats,
    steer,
    wait_unbound,
)
from nsim import in_peer_ns as _in_peer_ns

import iouzcrx

pytestmark = [pytest.mark.vm, pytest.mark.netdevsim]


@pytest.fixture(autouse=True)
def queues_released(nsim: Nsim) -> Iterator[None]:
    """Whatever a test did, the next one starts with no queue bound."""
    yield
    for queue in range(nsim.queues):
        wait_unbound(nsim, queue)
    steer(nsim, 0)


def zerocopy(ring: iouzcrx.Ring, nsim: Nsim, queue: int, **kw) -> iouzcrx.ZcrxQueue:
    kw.setdefault("area_size", 1 << 20)
    return iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface=nsim.interface, queue=queue, **kw)


# -- registration -------------------------------------------------------------------


def test_the_nic_is_set_up_for_zcrx(nsim):
    rings = nlclient.rings_get(nsim.interface)
    assert rings["tcp_data_split"] == "on"
    assert rings["hds_thresh"] == 0
    assert not any(bound(nsim, q) for q in range(nsim.queues))


def test_registration_binds_the_queue_to_io_uring(nsim):
    with iouzcrx.Ring() as ring:
        queue = zerocopy(ring, nsim, 1)
        assert queue.mode == "zerocopy"
        assert queue.interface == nsim.interface and queue.queue == 1
        assert queue.chunk_size == 4096
        assert bound(nsim, 1)
        assert not bound(nsim, 0) and not bound(nsim, 2)
        # The queue's restarted page pool took io_uring's memory provider.
        napi_id = nlclient.queue_get(nsim.ifindex, 1)["napi_id"]
        pools = [p for p in nlclient.page_pools(nsim.ifindex) if p["napi_id"] == napi_id]
        assert napi_id and pools and all(p["io_uring"] for p in pools), pools
    wait_unbound(nsim, 1)


def test_a_second_registration_of_a_bound_queue_is_busy(nsim):
    with iouzcrx.Ring() as ring, iouzcrx.Ring() as other:
        zerocopy(ring, nsim, 2)
        with pytest.raises(iouzcrx.QueueBusy, match=f"{nsim.interface} queue 2"):
            zerocopy(other, nsim, 2)
        # Nor on the same ring.
        with pytest.raises(iouzcrx.QueueBusy):
            zerocopy(ring, nsim, 2)
        assert bound(nsim, 2)
    wait_unbound(nsim, 2)


def test_two_queues_bind_on_one_ring(nsim):
    with iouzcrx.Ring() as ring:
        first = zerocopy(ring, nsim, 0)
        second = zerocopy(ring, nsim, 3)
        assert first.zcrx_id != second.zcrx_id
        assert bound(nsim, 0) and bound(nsim, 3)
    wait_unbound(nsim, 0)
    wait_unbound(nsim, 3)


def test_a_queue_is_released_with_its_ring_and_binds_again(nsim):
    for _ in range(3):
        with iouzcrx.Ring() as ring:
            queue = zerocopy(ring, nsim, 1)
            assert bound(nsim, 1)
            queue.close()
            queue.close()  # twice is harmless
        wait_unbound(nsim, 1)


def test_the_nic_refuses_to_drop_header_split_under_a_bound_queue(nsim):
    with iouzcrx.Ring() as ring:
        zerocopy(ring, nsim, 1)
        with pytest.raises(OSError):
            nlclient.rings_set(nsim.interface, tcp_data_split=False)
        assert nlclient.rings_get(nsim.interface)["tcp_data_split"] == "on"
    wait_unbound(nsim, 1)


def test_the_nic_refuses_to_shrink_channels_below_a_bound_queue(nsim):
    assert nlclient.channels_get(nsim.interface) == nsim.queues
    with iouzcrx.Ring() as ring:
        zerocopy(ring, nsim, nsim.queues - 1)
        try:
            with pytest.raises(OSError):
                nlclient.channels_set(nsim.interface, nsim.queues - 1)
            assert nlclient.channels_get(nsim.interface) == nsim.queues
        finally:
            if nlclient.channels_get(nsim.interface) != nsim.queues:
                ring.close()
                wait_unbound(nsim, nsim.queues - 1)
                nlclient.channels_set(nsim.interface, nsim.queues)
    wait_unbound(nsim, nsim.queues - 1)


# -- the library's errors on a real NIC -----------------------------------------------


def test_hds_thresh_above_zero_is_a_misconfigured_nic(nsim):
    nlclient.rings_set(nsim.interface, hds_thresh=256)
    try:
        with iouzcrx.Ring() as ring:
            with pytest.raises(iouzcrx.NicMisconfigured, match="hds-thresh") as info:
                zerocopy(ring, nsim, 1)
            assert nsim.interface in str(info.value)
    finally:
        nlclient.rings_set(nsim.interface, hds_thresh=0)
    assert not bound(nsim, 1)


def test_header_split_off_is_a_misconfigured_nic(nsim):
    nlclient.rings_set(nsim.interface, tcp_data_split=False)
    try:
        with iouzcrx.Ring() as ring, pytest.raises(iouzcrx.NicMisconfigured, match="header split"):
            zerocopy(ring, nsim, 1)
    finally:
        nlclient.rings_set(nsim.interface, tcp_data_split=True)
    assert not bound(nsim, 1)


def test_a_queue_beyond_the_channels_is_out_of_range(nsim):
    with iouzcrx.Ring() as ring:
        with pytest.raises(iouzcrx.QueueOutOfRange, match=f"valid: 0..{nsim.queues - 1}"):
            zerocopy(ring, nsim, nsim.queues)


def test_the_peer_port_is_not_in_this_namespace(nsim):
    with iouzcrx.Ring() as ring, pytest.raises(iouzcrx.InterfaceNotFound, match=nsim.peer):
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface=nsim.peer, queue=0)


# -- data through a bound queue ------------------------------------------------------


def _connect_from_peer(port: int, address: str = LOCAL_ADDR) -> socket.socket:
    def connect() -> socket.socket:
        return socket.create_connection((address, port), timeout=SETUP_TIMEOUT)

    sock = _in_peer_ns(connect)
    sock.settimeout(None)
    return sock


def _pair_across_the_link(ipv6: bool = False) -> tuple[socket.socket, socket.socket]:
    """(client in the peer namespace, server here), connected over the two
    linked netdevsim ports."""
    local, remote = (LOCAL_ADDR6, PEER_ADDR6) if ipv6 else (LOCAL_ADDR, PEER_ADDR)
    with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET) as listener:
        listener.bind((local, 0))
        listener.listen(1)
        client = _connect_from_peer(listener.getsockname()[1], local)
        server, peer = listener.accept()
    assert peer[0] == remote
    return client, server


def _receive_and_verify(receiver, seed: int, total: int, *, timeout: float = 60.0) -> None:
    verifier = Verifier(seed)
    assert receive_all(receiver, verifier, timeout=timeout) == total
    assert verifier.pos == total


def test_data_through_a_bound_queue_arrives_by_zero_copy(nsim):
    """8 MiB through the 1 MiB area of queue 0, every byte verified, and
    every payload byte placed by the NIC into the area's buffers: none went
    through ordinary pages, so none was copied into the area."""
    total = 8 << 20
    client, server = _pair_across_the_link()
    with iouzcrx.Ring() as ring, server:
        queue = zerocopy(ring, nsim, 0, area_size=1 << 20)
        before = hds_stats(nsim)
        receiver = queue.recv_multishot(server)
        sender = Sender(client, seed=41, total=total)
        sender.start()
        _receive_and_verify(receiver, 41, total)
        sender.join(SETUP_TIMEOUT)
        assert sender.error is None
        delta = hds_delta(before, hds_stats(nsim))
    assert delta[0]["niov_bytes"] >= total, delta  # retransmissions count again
    assert all(d["page_bytes"] == 0 and d["unsplit"] == 0 for d in delta.values()), delta
    # Full segments carry more than a buffer: payloads spanned several.
    assert delta[0]["niov_bytes"] > 4096 * delta[0]["niov_packets"], delta
    wait_unbound(nsim, 0)


def test_ipv6_data_through_a_bound_queue_arrives_by_zero_copy(nsim):
    total = 1 << 20
    client, server = _pair_across_the_link(ipv6=True)
    with iouzcrx.Ring() as ring, server:
        queue = zerocopy(ring, nsim, 0)
        before = hds_stats(nsim)
        receiver = queue.recv_multishot(server)
        sender = Sender(client, seed=42, total=total)
        sender.start()
        _receive_and_verify(receiver, 42, total)
        sender.join(SETUP_TIMEOUT)
        assert sender.error is None
        delta = hds_delta(before, hds_stats(nsim))
    assert delta[0]["niov_bytes"] >= total, delta
    assert all(d["page_bytes"] == 0 and d["unsplit"] == 0 for d in delta.values()), delta
    wait_unbound(nsim, 0)


def test_concurrent_connections_through_a_bound_queue_by_zero_copy(nsim):
    count, each = 4, 1 << 20
    steer(nsim, 2)
    pairs = [_pair_across_the_link() for _ in range(count)]
    with iouzcrx.Ring() as ring:
        queue = zerocopy(ring, nsim, 2, area_size=1 << 20)
        before = hds_stats(nsim)
        verifiers = [Verifier(50 + i) for i in range(count)]
        receivers = [
            queue.recv_multishot(server, on_data=verifier.feed)
            for (_, server), verifier in zip(pairs, verifiers, strict=True)
        ]
        senders = [Sender(client, seed=50 + i, total=each) for i, (client, _) in enumerate(pairs)]
        for sender in senders:
            sender.start()
        try:
            ring.wait_for(lambda: all(r.finished for r in receivers), 120)
        finally:
            for _, server in pairs:
                server.close()
            for sender in senders:
                sender.join(SETUP_TIMEOUT)
        assert [r.error for r in receivers] == [None] * count
        assert [v.pos for v in verifiers] == [each] * count
        assert all(s.error is None for s in senders)
        delta = hds_delta(before, hds_stats(nsim))
    assert delta[2]["niov_bytes"] >= count * each, delta
    assert all(d["page_bytes"] == 0 for d in delta.values()), delta
    wait_unbound(nsim, 2)


def test_more_than_an_area_through_the_copy_fallback(nsim):
    """A flow that arrives on an unbound queue (1) while the socket receives
    through queue 0's ifq: the NIC puts its payload in ordinary pages and the
    kernel copies it into the area. It arrives byte-exact, counted as such.

    In zerocopy mode the chunks the kernel copied into go back through the
    refill ring, which it drains only when the queue's page pool refills or
    on a flush. Without flushing on -ENOMEM, after an area's worth every
    receive ended in -ENOMEM and was re-armed at once, for ever."""
    total = 1 << 20  # four areas' worth
    steer(nsim, 1)
    client, server = _pair_across_the_link()
    with iouzcrx.Ring() as ring, server:
        queue = zerocopy(ring, nsim, 0, area_size=256 << 10)
        before = hds_stats(nsim)
        receiver = queue.recv_multishot(server)
        sender = Sender(client, seed=43, total=total)
        sender.start()
        verifier = Verifier(43)
        try:
            # No progress for this long is the livelock: TimeoutError.
            assert receive_all(receiver, verifier, timeout=10.0) == total
        except TimeoutError:
            stats = queue.stats()
            raise TimeoutError(
                f"no progress after {verifier.pos} of {total} bytes (area "
                f"{256 << 10}); rearms={stats['rearms']} flushes={stats['flushes']}"
            ) from None
        finally:
            # Unblock a sender stuck on a full window, whatever happened.
            server.shutdown(socket.SHUT_RDWR)
            sender.join(SETUP_TIMEOUT)
        delta = hds_delta(before, hds_stats(nsim))
    assert delta[1]["page_bytes"] >= total, delta
    assert all(d["niov_bytes"] == 0 for d in delta.values()), delta
    wait_unbound(nsim, 0)


def test_a_flow_on_another_ifqs_queue_is_an_error_naming_the_queues(nsim):
    """Packets that land in the buffers of another zcrx queue (RX queue 2)
    cannot be received through queue 1's ifq: the kernel refuses (EFAULT),
    and the receive ends with an error that says what to do."""
    steer(nsim, 2)
    client, server = _pair_across_the_link()
    with iouzcrx.Ring() as ring, server:
        mine = zerocopy(ring, nsim, 1)
        zerocopy(ring, nsim, 2)
        receiver = mine.recv_multishot(server)
        sender = Sender(client, seed=46, total=64 << 10)
        sender.start()
        try:
            with pytest.raises(OSError) as info:
                receive_all(receiver, Verifier(46), timeout=30.0)
        finally:
            server.shutdown(socket.SHUT_RDWR)
            sender.join(SETUP_TIMEOUT)
        assert info.value.errno == errno.EFAULT
        message = str(info.value)
        assert f"{nsim.interface} queue 1" in message and "another zcrx queue" in message
        assert "steer the flow onto RX queue 1" in message and "queues=" in message
    wait_unbound(nsim, 1)
    wait_unbound(nsim, 2)


def test_an_exhausted_area_drops_at_the_nic_and_recovers_when_views_are_released(nsim):
    """A reader that holds its views empties the queue's page pool: the NIC
    drops what it cannot place (as hardware does) and TCP retransmits once
    the views are released; nothing spins meanwhile."""
    total = 1 << 20
    client, server = _pair_across_the_link()
    with iouzcrx.Ring() as ring, server:
        queue = zerocopy(ring, nsim, 0, area_size=256 << 10)  # 64 buffers
        before = hds_stats(nsim)
        receiver = queue.recv_multishot(server)
        sender = Sender(client, seed=45, total=total)
        sender.start()
        verifier = Verifier(45)
        held = []
        deadline = time.monotonic() + 60.0
        try:
            while hds_delta(before, hds_stats(nsim))[0]["drops"] == 0:
                assert time.monotonic() < deadline, "the NIC never ran out of buffers"
                try:
                    view = receiver.get(0.2)
                except TimeoutError:
                    continue
                assert view is not None, "EOF before the area was exhausted"
                held.append(view)
            rearms = queue.stats()["rearms"]
            # Stuck without buffers, the receive waits: it does not spin.
            with pytest.raises(TimeoutError):
                while True:
                    view = receiver.get(1.0)
                    assert view is not None
                    held.append(view)
            assert queue.stats()["rearms"] - rearms < 100
            for view in held:
                verifier.feed(view)
                view.release()
            held.clear()
            assert verifier.pos + receive_all(receiver, verifier, timeout=60.0) == total
            assert verifier.pos == total
        finally:
            for view in held:
                view.release()
            server.shutdown(socket.SHUT_RDWR)
            sender.join(SETUP_TIMEOUT)
        assert sender.error is None
        delta = hds_delta(before, hds_stats(nsim))
    assert delta[0]["drops"] > 0 and delta[0]["niov_bytes"] >= total, delta
    wait_unbound(nsim, 0)


def test_a_queue_registered_again_carries_data_by_zero_copy_each_time(nsim):
    total = 256 << 10
    steer(nsim, 3)
    for attempt in range(3):
        client, server = _pair_across_the_link()
        with iouzcrx.Ring() as ring, server:
            queue = zerocopy(ring, nsim, 3)
            before = hds_stats(nsim)
            receiver = queue.recv_multishot(server)
            sender = Sender(client, seed=60 + attempt, total=total)
            sender.start()
            _receive_and_verify(receiver, 60 + attempt, total)
            sender.join(SETUP_TIMEOUT)
            assert sender.error is None
            delta = hds_delta(before, hds_stats(nsim))
            assert delta[3]["niov_bytes"] >= total, (attempt, delta)
        wait_unbound(nsim, 3)


# -- many queues: one server, connections routed by the RX queue they arrive on --------

SO_TXREHASH = getattr(socket, "SO_TXREHASH", 74)
CONNECTIONS = 1000
BATCH = 50  # clients in flight at once (each holds a socket on both sides)
PAYLOAD = 512


class Collect(iouzcrx.ZeroCopyProtocol):
    """Keeps what one connection sent; hands it over at its end."""

    def __init__(self, streams: list[bytes]) -> None:
        self.streams = streams
        self.data = bytearray()

    def view_received(self, view: memoryview) -> None:
        self.data += view

    def eof_received(self) -> None:
        self.streams.append(bytes(self.data))


def _peer_sockets(count: int) -> list[socket.socket]:
    """Unconnected client sockets of the peer namespace. Each keeps its flow
    hash (no rehash after a timeout), so its packets stay on the RX queue
    its handshake arrived on, the one the server routed it by."""

    def make() -> list[socket.socket]:
        socks = []
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, SO_TXREHASH, 0)
            sock.setblocking(False)
            socks.append(sock)
        return socks

    return _in_peer_ns(make)


async def _client(sock: socket.socket, port: int, payload: bytes) -> None:
    loop = asyncio.get_running_loop()
    with sock:
        await loop.sock_connect(sock, (LOCAL_ADDR, port))
        await loop.sock_sendall(sock, payload)
        sock.shutdown(socket.SHUT_WR)
        # The server closes once it has seen the end.
        assert await loop.sock_recv(sock, 1) == b""


async def test_a_many_queue_server_routes_a_thousand_connections_by_rx_queue(nsim):
    """queues=[1, 2, 3] on the simulated NIC with flows spread over its four
    queues by their hash: every connection is served and byte-exact, each
    bound queue's connections are received by zero copy through its own ifq
    (another queue's ifq could not take its buffers), and those that land on
    unbound queue 0 are counted as unrouted and served by copy."""
    steer(nsim, None)
    loop = asyncio.get_running_loop()
    streams: list[bytes] = []
    server = await loop.create_zcrx_server(  # type: ignore[attr-defined]
        lambda: Collect(streams),
        LOCAL_ADDR,
        0,
        mode="zerocopy",
        interface=nsim.interface,
        queues=[1, 2, 3],
        area_size=1 << 20,
        backlog=1024,
    )
    try:
        assert server.mode == "zerocopy" and server.queues == (1, 2, 3)
        port = server.sockets[0].getsockname()[1]
        before = hds_stats(nsim)
        payloads = [i.to_bytes(8, "big") + os.urandom(PAYLOAD - 8) for i in range(CONNECTIONS)]
        for first in range(0, CONNECTIONS, BATCH):
            batch = payloads[first : first + BATCH]
            socks = _peer_sockets(len(batch))
            await asyncio.wait_for(
                asyncio.gather(*(_client(s, port, p) for s, p in zip(socks, batch, strict=True))),
                SETUP_TIMEOUT * 2,
            )
        deadline = loop.time() + SETUP_TIMEOUT
        while len(streams) < CONNECTIONS and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert sorted(streams) == sorted(payloads)
        stats = server.stats()
        delta = hds_delta(before, hds_stats(nsim))
    finally:
        server.close()
        await server.wait_closed()
    routed = {q: stats["queues"][q]["connections_routed"] for q in (1, 2, 3)}
    unrouted = stats["unrouted_connections"]
    assert stats["routing_error"] is None
    assert sum(routed.values()) + unrouted == CONNECTIONS, (routed, unrouted)
    assert all(routed.values()) and unrouted, (routed, unrouted)
    # Connections on queues 1-3 arrived in their area's buffers; queue 0's
    # in ordinary pages, which the kernel copied into the first queue's area.
    for q in (1, 2, 3):
        assert delta[q]["niov_bytes"] >= routed[q] * PAYLOAD, delta
        assert delta[q]["page_bytes"] == 0, delta
    assert delta[0]["page_bytes"] >= unrouted * PAYLOAD and delta[0]["niov_bytes"] == 0, delta
