"""``workers=N`` in zerocopy mode on the simulated NIC (tests/nsim.py), in
the VM: each worker registers zcrx queues for its share of ``queues=``, the
reuseport steering program sends each connection to the worker owning the
RX queue its SYN arrived on, every byte arrives, and a killed worker comes
back, registers its queues again and serves by zero copy.

The supervisor runs in a child interpreter (``python -m iouzcrx serve``,
the ``Served`` helper of test_workers.py) serving ``workers_app:Verify``:
each connection says which worker took it and through which NAPI instance
its packets arrive (hence which RX queue), and answers with the verdict
on every byte. The clients run in the peer namespace; each keeps its flow
hash (``SO_TXREHASH`` off), so its packets stay on the RX queue its
handshake arrived on, and the flows spread over the NIC's four queues by
that hash.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from nsim import (
    LOCAL_ADDR,
    Nsim,
    bound,
    enter_peer_ns,
    hds_delta,
    hds_stats,
    steer,
    wait_for,
    wait_unbound,
)
from test_workers import EVENT_TIMEOUT, Stream, process_gone, served

from iouzcrx.netdev import NetdevFamily

pytestmark = [pytest.mark.vm, pytest.mark.netdevsim]

SO_TXREHASH = getattr(socket, "SO_TXREHASH", 74)
SYS_PIDFD_GETFD = 438  # the same number on every architecture
CONCURRENCY = 50  # clients in flight at once
CLIENT_TIMEOUT = 300.0  # ends a hung run; a passing one takes a fraction


@pytest.fixture
def spread(nsim: Nsim) -> Iterator[Nsim]:
    """Flows spread over the RX queues by their hash; afterwards, no queue
    left bound and flows back on queue 0."""
    steer(nsim, None)
    try:
        yield nsim
    finally:
        for queue in range(nsim.queues):
            wait_unbound(nsim, queue)
        steer(nsim, 0)


def serve(nsim: Nsim, workers: int, *extra: str) -> Any:
    return served(
        "workers_app:Verify",
        "--host", LOCAL_ADDR, "--workers", str(workers), "--mode", "zerocopy",
        "--interface", nsim.interface, "--queues", "1-3", "--steering", "bpf",
        "--area", "1", "--backlog", "1024", "--backoff", "0.05", "--max-backoff", "0.5",
        *extra,
    )  # fmt: skip


def in_peer(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run the coroutine ``main()`` on a loop of its own, in a thread of the
    peer namespace (every socket it makes is the peer's); its result."""
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            enter_peer_ns()
            result["value"] = asyncio.run(asyncio.wait_for(main(), CLIENT_TIMEOUT))
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(CLIENT_TIMEOUT + 10)
    assert not thread.is_alive(), "the clients hung"
    if "error" in result:
        raise result["error"]
    return result["value"]


class Conn(Stream):
    """One verified stream of the workers_app contract, from the peer: its
    flow keeps its hash, so its packets stay on one RX queue."""

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TXREHASH, 0)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, (LOCAL_ADDR, self.port)), EVENT_TIMEOUT)
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise


async def run_conns(port: int, seeds: range, length: Callable[[int], int]) -> list[Conn]:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(seed: int) -> Conn:
        async with limit:
            conn = Conn(port, seed, length(seed))
            await conn.run()
            return conn

    return await asyncio.gather(*(one(seed) for seed in seeds))


def rx_queues(nsim: Nsim, conns: list[Conn]) -> dict[int, list[Conn]]:
    """The connections by the RX queue their packets arrived on."""
    with NetdevFamily() as family:
        napi_to_queue = family.napi_to_queue(nsim.interface)
    by_queue: dict[int, list[Conn]] = {q: [] for q in range(nsim.queues)}
    for conn in conns:
        assert conn.napi_id in napi_to_queue, (conn.napi_id, napi_to_queue)
        by_queue[napi_to_queue[conn.napi_id]].append(conn)
    return by_queue


def rings_of(pid: int) -> list[int]:
    """Duplicates (pidfd_getfd) of process ``pid``'s io_uring fds: each
    keeps its ring, and the zcrx queues registered on it, alive."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    fds = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}") != "anon_inode:[io_uring]":
                    continue
            except OSError:
                continue
            fd = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
            fds.append(fd)
    finally:
        os.close(pidfd)
    return fds


def owners(shares: list[list[int]]) -> dict[int, int]:
    return {q: worker for worker, share in enumerate(shares) for q in share}


def test_three_workers_serve_a_thousand_connections_each_on_its_own_queue_by_zero_copy(spread):
    """queues=[1, 2, 3] over three workers, steering="bpf": the program sends
    each SYN to the worker owning its RX queue, so no connection is handed
    over between workers; each bound queue's payload lands in its worker's
    zcrx area (zero copy), and the connections of unbound queue 0 are served
    where the kernel's hash put them, by copy."""
    nsim = spread
    count = 1000
    with serve(nsim, 3) as server:
        listening = server.events[0]
        assert listening["steering"] == "bpf+handoff", listening
        shares = listening["queues"]
        assert shares == [[1], [2], [3]]
        pids = server.serving(3)
        worker_of = {pid: worker for worker, pid in pids.items()}
        assert all(bound(nsim, q) for q in (1, 2, 3)) and not bound(nsim, 0)
        before = hds_stats(nsim)
        conns = in_peer(lambda: run_conns(server.port, range(count), lambda s: 256 + s % 512))
        delta = hds_delta(before, hds_stats(nsim))
        returncode, final = server.stop()
    bad = [(c.seed, c.pid, c.reply, c.error) for c in conns if not c.verified]
    assert not bad, bad
    assert returncode == 0
    by_queue = rx_queues(nsim, conns)
    owner = owners(shares)
    for q in (1, 2, 3):
        assert by_queue[q], {k: len(v) for k, v in by_queue.items()}
        assert {worker_of[c.pid] for c in by_queue[q]} == {owner[q]}, q
    assert by_queue[0], "no flow hashed onto unbound queue 0"
    # The program did all the steering: nothing was accepted by another
    # worker and handed over.
    assert [w["steering"] for w in final] == ["bpf+handoff"] * 3, final
    assert [w["handed_off"] for w in final] == [0, 0, 0], final
    assert [w["adopted"] for w in final] == [0, 0, 0], final
    assert [w["steered"] for w in final] == [len(by_queue[q]) for q in (1, 2, 3)], final
    assert sum(w["unsteerable"] for w in final) == len(by_queue[0]), final
    assert sum(w["connections"] for w in final) == count, final
    # Bound queues: the payload went into zcrx buffers, none through pages.
    for q in (1, 2, 3):
        sent = sum(len(c.data) for c in by_queue[q])
        assert delta[q]["niov_bytes"] >= sent and delta[q]["page_bytes"] == 0, (q, delta)
    # Queue 0 is nobody's: ordinary pages, which the kernel copied.
    sent = sum(len(c.data) for c in by_queue[0])
    assert delta[0]["page_bytes"] >= sent and delta[0]["niov_bytes"] == 0, delta


def test_a_killed_worker_loses_only_its_connections_and_registers_its_queues_again(spread):
    """Two workers over queues [1, 2, 3] (worker 1 owns 2 and 3). Worker 1
    is SIGKILLed mid-stream: its connections are lost, worker 0's complete
    byte-exact. The kernel releases the queues only once the dead worker's
    ring is freed, which ends after the process is gone; here the test holds
    that ring open (a duplicate of its fd), so the restarted worker finds
    its queues busy for as long as it takes. The supervisor's restarts with
    backoff get it through once the ring goes, and it serves new connections
    by zero copy."""
    nsim = spread
    held: list[int] = []
    with serve(nsim, 2, "--backoff", "0.005") as server:
        shares = server.events[0]["queues"]
        assert shares == [[1], [2, 3]]
        pids = server.serving(2)
        victim = pids[1]

        released = threading.Event()

        async def midstream() -> list[Conn]:
            conns = [Conn(server.port, seed, 4096 + seed * 31) for seed in range(40)]
            await asyncio.gather(*(c.open() for c in conns))
            assert {c.pid for c in conns} == set(pids.values()), [c.pid for c in conns]
            await asyncio.gather(*(c.send(0, len(c.data) // 2) for c in conns))
            held.extend(rings_of(victim))
            os.kill(victim, signal.SIGKILL)
            # The dead worker's connections end with its ring: once the
            # test lets it go.
            await asyncio.get_running_loop().run_in_executor(None, released.wait, EVENT_TIMEOUT)
            await asyncio.gather(*(c.finish(len(c.data) // 2) for c in conns))
            return conns

        box: dict[str, Any] = {}

        def clients() -> None:
            try:
                box["conns"] = in_peer(midstream)
            except BaseException as exc:
                box["error"] = exc

        runner = threading.Thread(target=clients, daemon=True)
        runner.start()
        try:
            exited = server.wait_for(lambda e: e["event"] == "exited" and e["pid"] == victim)
            assert exited["returncode"] == -signal.SIGKILL and exited["restart_in"] > 0
            assert held, "the victim has no io_uring"
            refused = server.wait_for(lambda e: e["event"] == "exited" and e["worker"] == 1)
            assert refused["returncode"] == 3 and "QueueBusy" in refused["error"], refused
            assert f"{nsim.interface} queue 2" in refused["error"], refused
            assert bound(nsim, 2) and bound(nsim, 3)
        finally:
            for fd in held:
                os.close(fd)
            released.set()
            runner.join(CLIENT_TIMEOUT + 20)
        assert not runner.is_alive(), "the clients hung"
        if "error" in box:
            raise box["error"]
        conns = box["conns"]
        lost = [c for c in conns if not c.verified]
        assert lost and {c.pid for c in lost} == {victim}
        assert all(c.verified for c in conns if c.pid != victim)
        assert len(lost) == sum(1 for c in conns if c.pid == victim)
        by_queue = rx_queues(nsim, conns)
        assert {c.pid for c in by_queue[1]} <= {pids[0]}
        assert {c.pid for c in by_queue[2] + by_queue[3]} == {victim}

        again = server.wait_for(lambda e: e["event"] == "serving" and e["worker"] == 1)
        assert again["pid"] != victim and again["mode"] == "zerocopy"
        # Every attempt before it found the queues held by the dead ring.
        busy = [
            e
            for e in server.events
            if e["event"] == "exited" and e["worker"] == 1 and e["pid"] != victim
        ]
        assert all("QueueBusy" in e["error"] for e in busy), busy
        assert bound(nsim, 2) and bound(nsim, 3)

        before = hds_stats(nsim)
        after = in_peer(lambda: run_conns(server.port, range(100, 140), lambda s: 2048 + s))
        delta = hds_delta(before, hds_stats(nsim))
        returncode, final = server.stop()
    bad = [(c.seed, c.pid, c.reply, c.error) for c in after if not c.verified]
    assert not bad, bad
    assert returncode == 0
    by_queue = rx_queues(nsim, after)
    assert {c.pid for c in by_queue[1]} <= {pids[0]}
    restarted = by_queue[2] + by_queue[3]
    assert restarted and {c.pid for c in restarted} == {again["pid"]}
    for q in (2, 3):
        sent = sum(len(c.data) for c in by_queue[q])
        assert delta[q]["niov_bytes"] >= sent and delta[q]["page_bytes"] == 0, (q, delta)
    assert final[0]["restarts"] == 0 and final[1]["restarts"] == 1 + len(busy) >= 2, final
    assert all(process_gone(pid) for pid in (victim, again["pid"], pids[0]))
    wait_for("the queues' release", lambda: not any(bound(nsim, q) for q in (1, 2, 3)))
