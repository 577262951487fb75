"""``workers=N``: N processes share the port, every byte arrives, a crashed
worker loses only its own connections and comes back, and a stop is
graceful.

The supervisor forks, so it runs in a child interpreter (``python -m iouzcrx
serve`` or a script), never in pytest's own process. Its events come back
as JSON lines; the clients are plain asyncio streams on the stock loop. The
servers run in bufring mode, which the host kernel has, on both loops.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import requires_copy_mode
from isolation import TESTS, child_env, run_python
from workers_app import HEADER, TUN_OWNERS, TUN_PER_QUEUE, TUN_QUEUES, payload

import iouzcrx
from iouzcrx import steering
from iouzcrx.loop import uvloop_available

LOOPS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(
        "uvloop",
        id="uvloop",
        marks=pytest.mark.skipif(not uvloop_available(), reason="uvloop is not installed"),
    ),
]

# Generous bounds for a loaded two-core machine: they end a broken test, they
# never decide a passing one.
EVENT_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0


class Served:
    """``python -m iouzcrx serve`` in a child, its events read as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "iouzcrx", "serve", "--port", "0", "--json", *args],
            cwd=TESTS,
            env=env or child_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = self.wait_for(lambda e: e["event"] == "listening")["port"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(json.loads(line))
        self._queue.put(None)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The next event matching ``predicate`` (earlier ones are kept in
        ``events``)."""
        while True:
            try:
                event = self._queue.get(timeout=EVENT_TIMEOUT)
            except queue.Empty:
                raise AssertionError(
                    f"no such event within {EVENT_TIMEOUT} s: {self.events}"
                ) from None
            if event is None:
                raise AssertionError(f"the supervisor ended first: {self.events}")
            self.events.append(event)
            if predicate(event):
                return event

    def serving(self, count: int) -> dict[int, int]:
        """worker index -> pid, once ``count`` workers serve."""
        pids: dict[int, int] = {}
        while len(pids) < count:
            event = self.wait_for(lambda e: e["event"] == "serving")
            pids[event["worker"]] = event["pid"]
        return pids

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, list[dict[str, Any]]]:
        """Signal the supervisor; its exit status and final per-worker stats."""
        self.proc.send_signal(signum)
        return self.ended()

    def ended(self) -> tuple[int, list[dict[str, Any]]]:
        """Once the supervisor exits: its status and final per-worker stats."""
        returncode = self.proc.wait(timeout=EXIT_TIMEOUT)
        self._reader.join(timeout=EXIT_TIMEOUT)
        while (event := self._queue.get_nowait()) is not None:
            self.events.append(event)
        final = [e for e in self.events if e["event"] == "stopped"]
        assert final, f"no final report: {self.events}"
        return returncode, final[-1]["workers"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=EXIT_TIMEOUT)


@contextmanager
def served(*args: str, env: dict[str, str] | None = None) -> Iterator[Served]:
    server = Served(*args, env=env)
    try:
        yield server
    finally:
        server.kill()


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # only a zombie left
    except FileNotFoundError:
        return True


class Stream:
    """One client connection of the workers_app contract."""

    def __init__(self, port: int, seed: int, length: int) -> None:
        self.port = port
        self.seed = seed
        self.length = length
        self.data = HEADER.pack(seed, length) + payload(seed, length)
        self.pid: int | None = None
        self.napi_id = 0  # of the NAPI instance its packets arrive through (0: none)
        self.reply = ""
        self.error: BaseException | None = None

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port), EVENT_TIMEOUT
        )

    async def open(self) -> None:
        self.reader, self.writer = await self.connect()
        hello = await asyncio.wait_for(self.reader.readline(), EVENT_TIMEOUT)
        assert hello.startswith(b"HELLO "), hello
        _, pid, napi_id = hello.split()
        self.pid, self.napi_id = int(pid), int(napi_id)

    async def send(self, start: int, end: int) -> None:
        self.writer.write(self.data[start:end])
        await asyncio.wait_for(self.writer.drain(), EVENT_TIMEOUT)

    async def finish(self, start: int = 0) -> None:
        """Send from ``start`` on, EOF, read the verdict."""
        try:
            await self.send(start, len(self.data))
            self.writer.write_eof()
            reply = await asyncio.wait_for(self.reader.readline(), EVENT_TIMEOUT)
            self.reply = reply.decode().strip()
        except (ConnectionError, OSError) as exc:
            self.error = exc
        finally:
            self.writer.close()

    @property
    def verified(self) -> bool:
        return self.reply == f"OK {self.pid} {self.length}"

    async def run(self) -> Stream:
        await self.open()
        await self.finish()
        return self


async def run_streams(port: int, count: int, length: int, *, concurrency: int = 64) -> list[Stream]:
    limit = asyncio.Semaphore(concurrency)

    async def one(seed: int) -> Stream:
        async with limit:
            return await Stream(port, seed, length + seed % 4099).run()

    return await asyncio.gather(*(one(seed) for seed in range(count)))


# -- every byte, many workers -------------------------------------------------------


@pytest.mark.parametrize("loop,workers", [("asyncio", 2), ("uvloop", 4)])
def test_a_thousand_connections_over_several_workers_arrive_byte_exact(loop, workers):
    if loop == "uvloop" and not uvloop_available():
        pytest.skip("uvloop is not installed")
    args = ("--workers", str(workers), "--mode", "bufring", "--loop", loop)
    with served("workers_app:Verify", *args, "--stats-interval", "0.2") as server:
        pids = server.serving(workers)
        streams = asyncio.run(run_streams(server.port, 1000, 16 << 10))
        # While they serve, each worker reports its figures on its own.
        live = server.wait_for(lambda e: e["event"] == "stats" and e["bytes"] > 0)
        assert live["mode"] == "bufring" and live["connections"] > 0
        bad = [(s.seed, s.reply, s.error) for s in streams if not s.verified]
        assert not bad, f"{len(bad)} connections not verified, e.g. {bad[:5]}"
        served_by = {s.pid for s in streams}
        assert served_by <= set(pids.values())
        assert len(served_by) > 1, "SO_REUSEPORT spread no connection to a second worker"
        returncode, final = server.stop()
    assert returncode == 0
    assert [w["returncode"] for w in final] == [0] * workers
    assert {w["mode"] for w in final} == {"bufring"}
    # bufring mode receives with the kernel's copy: nothing is zero copy.
    assert {(w["copied_bytes"], w["zero_copy_share"]) for w in final} == {(None, 0.0)}
    assert sum(w["connections"] for w in final) == 1000
    total = sum(len(s.data) for s in streams)
    assert sum(w["bytes"] for w in final) == total
    for w in final:
        mine = [s for s in streams if s.pid == w["pid"]]
        assert w["connections"] == len(mine)
        assert w["bytes"] == sum(len(s.data) for s in mine)
    assert all(process_gone(pid) for pid in pids.values())


@pytest.mark.vm
@requires_copy_mode
def test_workers_each_register_their_own_zcrx_queue_in_copy_mode():
    # Kept small: the VM emulates its CPU.
    args = ("--workers", "2", "--mode", "copy", "--area", "4")
    with served("workers_app:Verify", *args) as server:
        pids = server.serving(2)
        streams = asyncio.run(run_streams(server.port, 24, 4 << 10, concurrency=8))
        assert all(s.verified for s in streams), [s.reply for s in streams if not s.verified]
        assert {s.pid for s in streams} == set(pids.values())
        returncode, final = server.stop()
    assert returncode == 0
    assert [w["mode"] for w in final] == ["copy", "copy"]
    assert sum(w["bytes"] for w in final) == sum(len(s.data) for s in streams)
    # The kernel's own counters: in copy mode it copied every byte.
    assert [w["copied_bytes"] for w in final] == [w["bytes"] for w in final]
    assert [w["zero_copy_share"] for w in final] == [0.0, 0.0]


def test_streams_handler_is_served_by_workers():
    with served("workers_app:verify_streams", "--workers", "2", "--mode", "bufring") as server:
        server.serving(2)
        streams = asyncio.run(run_streams(server.port, 50, 64 << 10))
        assert all(s.verified for s in streams), [s.reply for s in streams if not s.verified]
        returncode, final = server.stop()
    assert returncode == 0
    assert sum(w["connections"] for w in final) == 50


# -- steering: each connection reaches the worker owning its RX queue ------------------


def _namespace_reason(*devices: str) -> str | None:
    import shutil

    if os.geteuid() != 0:
        return "needs root to make network namespaces and network devices"
    for tool in ("unshare", "ip", "ethtool"):
        if shutil.which(tool) is None:
            return f"needs {tool!r} on PATH"
    for device in devices:
        if not os.path.exists(device):
            return f"needs {device}"
    return None


requires_veth = pytest.mark.skipif(_namespace_reason() is not None, reason=str(_namespace_reason()))
requires_tun = pytest.mark.skipif(
    _namespace_reason("/dev/net/tun") is not None, reason=str(_namespace_reason("/dev/net/tun"))
)


def in_namespace(*args: str) -> Any:
    """tests/workers_app.py's scenario ``args`` in a new network namespace;
    its JSON report."""
    done = subprocess.run(
        ["unshare", "-n", sys.executable, os.path.join(TESTS, "workers_app.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=child_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@requires_tun
def test_the_steering_program_sends_each_rx_queue_to_its_socket_when_the_kernel_runs_it():
    # tun records the RX queue of what is written into each of its queues as
    # a NIC driver does; the listener that accepts each handshake is the
    # kernel's choice, made by the program.
    landed = in_namespace("tun")
    assert sorted(landed) == [str(q) for q in range(TUN_QUEUES)]
    for rx_queue, indexes in landed.items():
        assert len(indexes) == TUN_PER_QUEUE
        owner = TUN_OWNERS.get(int(rx_queue))
        if owner is not None:
            assert indexes == [owner] * TUN_PER_QUEUE, f"queue {rx_queue}: {indexes}"


def check_steered(report: dict[str, Any], workers: int, count: int) -> list[dict[str, Any]]:
    """Every byte verified, and every connection served by the worker that
    owns the RX queue its packets arrived on; the final stats."""
    assert report["client_rc"] == 0 and report["server_rc"] == 0
    shares = report["listening"]["queues"]
    pids = {int(k): v for k, v in report["pids"].items()}
    napi_to_queue = {int(k): v for k, v in report["napi_to_queue"].items()}
    conns = report["connections"]
    assert len(conns) == count and len(shares) == workers
    for c in conns:
        _, pid, napi_id = c["hello"]
        assert c["verdict"] == ["OK", pid, str(c["length"] - HEADER.size)], c
        queue = napi_to_queue[int(napi_id)]
        (owner,) = [i for i, share in enumerate(shares) if queue in share]
        assert int(pid) == pids[owner], f"queue {queue} is worker {owner}'s: {c}"
    final = report["final"]
    assert [w["returncode"] for w in final] == [0] * workers
    for w in final:
        mine = [c for c in conns if int(c["hello"][1]) == w["pid"]]
        assert w["connections"] == len(mine) == w["steered"] + w["adopted"]
        assert w["bytes"] == sum(c["length"] for c in mine)
        assert w["unsteerable"] == 0 and w["queues"] == shares[w["worker"]]
    assert sum(w["handed_off"] for w in final) == sum(w["adopted"] for w in final)
    return final


@requires_veth
def test_the_steering_program_puts_a_thousand_connections_on_the_workers_owning_their_queues():
    # veth delivers on the RX queue of the sender's TX queue and leaves that
    # index in queue_mapping: the program reads it for the SYN.
    report = in_namespace("veth", "4", "8", "1000", "auto")
    assert report["listening"]["steering"] == "bpf+handoff"
    assert report["listening"]["queues"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    final = check_steered(report, 4, 1000)
    assert {w["steering"] for w in final} == {"bpf+handoff"}
    assert sum(w["handed_off"] for w in final) == 0, final
    assert all(w["connections"] > 0 for w in final)


@requires_veth
@pytest.mark.parametrize("loop", LOOPS)
def test_without_the_program_workers_hand_each_connection_to_the_owner_of_its_queue(loop):
    report = in_namespace("veth", "3", "7", "120", "handoff", loop)
    assert report["listening"]["steering"] == "handoff"
    assert report["listening"]["queues"] == [[0, 1], [2, 3], [4, 5, 6]]
    final = check_steered(report, 3, 120)
    assert {w["steering"] for w in final} == {"handoff"}
    # The kernel's hash put some on the wrong worker: the hand-off ran.
    assert sum(w["handed_off"] for w in final) > 0, final


@requires_veth
def test_a_worker_down_while_its_connections_arrive_serves_them_once_restarted():
    # Worker 1 is down (killed, kept from restarting) while the clients
    # start: its connections queue on its listening socket, or in its
    # inbox once worker 0 accepted and handed them over. Its next process
    # serves them all.
    report = in_namespace("veth", "2", "4", "40", "handoff", "down")
    final = check_steered(report, 2, 40)
    assert final[1]["restarts"] >= 1 and final[0]["restarts"] == 0
    assert final[1]["pid"] == report["pids"]["1"]
    assert final[0]["handed_off"] > 0 and final[1]["adopted"] > 0, final


def test_the_steering_program_refuses_bad_tables_naming_the_value():
    for owners, offset, words in [
        ({}, 1, "at least one RX queue"),
        ({0: 0}, 2, "offset must be 0 or 1"),
        ({-1: 0}, 1, "RX queue -1"),
        ({True: 0}, 1, "RX queue True"),
        ({0xFFFF: 0}, 1, "RX queue 65535"),
        ({0: -1}, 1, "socket index -1"),
        ({0: 0xFFFFFFFF}, 1, "socket index 4294967295"),
        (dict.fromkeys(range(3000), 0), 1, "3000 queues do not fit"),
    ]:
        with pytest.raises(ValueError) as info:
            steering.steering_program(owners, offset=offset)
        assert words in str(info.value), (owners, offset)
    program = steering.steering_program({0: 1, 7: 0})
    assert len(program) == 8 * (1 + 2 * 2 + 1)


def test_the_steering_program_needs_a_reuseport_socket():
    import socket

    with socket.socket() as sock:
        with pytest.raises(steering.SteeringUnavailable, match="refused"):
            steering.attach_steering(sock, steering.steering_program({0: 0}))
        with pytest.raises(ValueError, match="not a classic BPF program"):
            steering.attach_steering(sock, b"\0" * 7)
    with pytest.raises(iouzcrx.InterfaceNotFound, match="nosuch0"):
        steering.queue_mapping_offset("nosuch0")
    assert steering.queue_mapping_offset("lo") == 1


# -- a crash costs only the crashed worker's connections -------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_a_killed_worker_loses_only_its_own_connections_and_is_restarted(loop):
    with served(
        "workers_app:Verify", "--workers", "2", "--mode", "bufring", "--loop", loop
    ) as server:
        pids = server.serving(2)

        async def scenario() -> tuple[int, list[Stream]]:
            streams = [Stream(server.port, seed, 256 << 10) for seed in range(40)]
            await asyncio.gather(*(s.open() for s in streams))
            owners = {s.pid for s in streams}
            assert len(owners) == 2, f"all 40 connections went to one worker: {owners}"
            # Mid-stream: half of every stream is on its way.
            await asyncio.gather(*(s.send(0, len(s.data) // 2) for s in streams))
            victim = streams[0].pid
            assert victim is not None
            os.kill(victim, signal.SIGKILL)
            await asyncio.gather(*(s.finish(len(s.data) // 2) for s in streams))
            return victim, streams

        victim, streams = asyncio.run(scenario())
        lost = [s for s in streams if not s.verified]
        assert {s.pid for s in lost} == {victim}
        assert all(s.verified for s in streams if s.pid != victim)
        assert len(lost) == sum(1 for s in streams if s.pid == victim)
        (slot,) = [i for i, pid in pids.items() if pid == victim]
        exited = server.wait_for(lambda e: e["event"] == "exited" and e["pid"] == victim)
        assert exited["returncode"] == -signal.SIGKILL and exited["restart_in"] > 0
        again = server.wait_for(lambda e: e["event"] == "serving" and e["worker"] == slot)
        assert again["pid"] != victim
        # The restarted worker and its sibling serve new connections.
        after = asyncio.run(run_streams(server.port, 40, 32 << 10))
        assert all(s.verified for s in after)
        returncode, final = server.stop()
    assert returncode == 0
    assert final[slot]["restarts"] == 1 and final[1 - slot]["restarts"] == 0
    assert [w["returncode"] for w in final] == [0, 0]
    assert all(process_gone(pid) for pid in (victim, again["pid"], *pids.values()))


def test_a_worker_that_dies_at_start_is_restarted_with_growing_backoff(tmp_path):
    refuse = tmp_path / "refuse"
    env = child_env(WORKERS_APP_REFUSE=str(refuse))
    args = ("workers_app:Verify", "--workers", "2", "--mode", "bufring", "--backoff", "0.05")
    with served(*args, "--init", "workers_app:refuse_when_told", env=env) as server:
        pids = server.serving(2)
        refuse.write_text("1")
        os.kill(pids[1], signal.SIGKILL)
        delays = []
        for _ in range(5):
            exited = server.wait_for(lambda e: e["event"] == "exited" and e["worker"] == 1)
            delays.append(exited["restart_in"])
        # The first death came after serving, the next ones at start: each
        # doubles the wait instead of forking again at once.
        assert delays == [0.05, 0.1, 0.2, 0.4, 0.8]
        assert "told to refuse to start" in exited["error"]
        refuse.unlink()
        server.wait_for(lambda e: e["event"] == "serving" and e["worker"] == 1)
        # Worker 0 served all along.
        streams = asyncio.run(run_streams(server.port, 20, 4096))
        assert all(s.verified for s in streams)
        returncode, final = server.stop()
    assert returncode == 0
    assert final[0]["restarts"] == 0 and final[1]["restarts"] >= 5


def test_a_restarted_worker_serves_the_connections_queued_on_its_socket_while_it_was_down(
    tmp_path,
):
    refuse = tmp_path / "refuse"
    env = child_env(WORKERS_APP_REFUSE=str(refuse))
    args = ("workers_app:Verify", "--workers", "2", "--mode", "bufring", "--backoff", "0.05")
    args += ("--max-backoff", "0.2", "--init", "workers_app:refuse_when_told")
    with served(*args, env=env) as server:
        pids = server.serving(2)
        # Worker 1 cannot come back while the file names it; its listening
        # socket, the supervisor's, keeps taking connections meanwhile.
        refuse.write_text("1")
        os.kill(pids[1], signal.SIGKILL)
        server.wait_for(lambda e: e["event"] == "exited" and e["pid"] == pids[1])

        async def scenario() -> list[Stream]:
            streams = [Stream(server.port, seed, 64 << 10) for seed in range(30)]

            async def connect(s: Stream) -> None:
                s.reader, s.writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", server.port), EVENT_TIMEOUT
                )

            await asyncio.gather(*(connect(s) for s in streams))
            await asyncio.gather(*(s.send(0, 1000) for s in streams))
            refuse.unlink()

            async def rest(s: Stream) -> None:
                hello = await asyncio.wait_for(s.reader.readline(), EVENT_TIMEOUT)
                assert hello.startswith(b"HELLO "), hello
                s.pid = int(hello.split()[1])
                await s.finish(1000)

            await asyncio.gather(*(rest(s) for s in streams))
            return streams

        streams = asyncio.run(scenario())
        again = server.wait_for(lambda e: e["event"] == "serving" and e["worker"] == 1)
        bad = [(s.seed, s.pid, s.reply, s.error) for s in streams if not s.verified]
        assert not bad, bad
        # Every connection was made while worker 1 was down: those the
        # kernel queued on its socket waited for its next process.
        assert {s.pid for s in streams} == {pids[0], again["pid"]}
        returncode, final = server.stop()
    assert returncode == 0
    assert final[1]["connections"] == sum(1 for s in streams if s.pid == again["pid"])


# -- graceful stop ------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_sigint_lets_open_connections_finish_then_every_worker_exits_0(loop):
    with served(
        "workers_app:Verify", "--workers", "3", "--mode", "bufring", "--loop", loop
    ) as server:
        pids = server.serving(3)

        probes = 0

        async def scenario() -> list[Stream]:
            nonlocal probes
            streams = [Stream(server.port, seed, 128 << 10) for seed in range(12)]
            await asyncio.gather(*(s.open() for s in streams))
            await asyncio.gather(*(s.send(0, 1000) for s in streams))
            server.proc.send_signal(signal.SIGINT)
            # Once no worker listens, connections are refused...
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
                except ConnectionRefusedError:
                    break
                except ConnectionResetError:
                    # Queued on a listener that closed before accepting it.
                    await asyncio.sleep(0.05)
                    continue
                probes += 1
                writer.close()
                await asyncio.sleep(0.05)
            # ... and the open ones still finish, byte-exact.
            await asyncio.gather(*(s.finish(1000) for s in streams))
            return streams

        streams = asyncio.run(scenario())
        assert all(s.verified for s in streams), [s.reply for s in streams]
        returncode, final = server.ended()
    assert returncode == 0
    assert [w["returncode"] for w in final] == [0, 0, 0]
    assert [w["aborted"] for w in final] == [0, 0, 0]
    # A probe may have been queued on a listener that closed before its
    # worker accepted it: reset, never served.
    assert 12 <= sum(w["connections"] for w in final) <= 12 + probes
    assert all(process_gone(pid) for pid in pids.values())


def test_workers_stop_when_the_supervisor_is_killed():
    with served("workers_app:Verify", "--workers", "2", "--mode", "bufring") as server:
        pids = server.serving(2)
        server.proc.kill()
        server.proc.wait(timeout=EXIT_TIMEOUT)
        # PR_SET_PDEATHSIG: each worker gets SIGTERM and stops on its own.
        for _ in range(int(EXIT_TIMEOUT / 0.05)):
            if all(process_gone(pid) for pid in pids.values()):
                break
            threading.Event().wait(0.05)
        assert all(process_gone(pid) for pid in pids.values())


def test_connections_still_open_after_shutdown_timeout_are_aborted_and_workers_exit_0():
    args = ("workers_app:Verify", "--workers", "2", "--mode", "bufring")
    with served(*args, "--shutdown-timeout", "0.2") as server:
        pids = server.serving(2)

        async def idle_connections() -> list[Stream]:
            streams = [Stream(server.port, seed, 1 << 20) for seed in range(8)]
            await asyncio.gather(*(s.open() for s in streams))
            await asyncio.gather(*(s.send(0, 100) for s in streams))
            return streams

        loop = asyncio.new_event_loop()
        try:
            streams = loop.run_until_complete(idle_connections())
            returncode, final = server.stop()

            async def read_ends() -> list[bytes]:
                return [await asyncio.wait_for(s.reader.read(), EVENT_TIMEOUT) for s in streams]

            try:
                ends = loop.run_until_complete(read_ends())
            except ConnectionResetError:
                ends = []
            for s in streams:
                s.writer.close()
        finally:
            loop.close()
    assert returncode == 0
    assert all(end == b"" for end in ends)
    assert [w["returncode"] for w in final] == [0, 0]
    assert sum(w["aborted"] for w in final) == 8
    assert all(process_gone(pid) for pid in pids.values())


# -- the supervisor as an object ------------------------------------------------------


def run_script(code: str) -> list[str]:
    return run_python(code, timeout=120)


CLIENT = """
import asyncio, os, signal, sys, threading, json
from workers_app import HEADER, payload

def one_connection(port):
    async def go():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        hello = await r.readline()
        w.write(HEADER.pack(7, 5000) + payload(7, 5000))
        w.write_eof()
        reply = await r.readline()
        w.close()
        return reply.decode().split()
    return asyncio.run(asyncio.wait_for(go(), 60))
"""


def test_supervisor_close_is_safe_twice_from_a_signal_handler_and_in_a_forked_child():
    lines = run_script(
        CLIENT
        + textwrap.dedent("""
        from iouzcrx import Supervisor
        # With steering: the child's copies include the hand-off sockets.
        sup = Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=2, mode="bufring",
                         interface="lo", queues=[0, 1])
        sup.start()
        pids = [w["pid"] for w in sup.stats()]

        # A forked child lets its copy go; the workers are not its own.
        child = os.fork()
        if child == 0:
            sup.close(); sup.close(); sup.kill()
            os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        assert one_connection(sup.port)[0] == "OK"
        assert [w["state"] for w in sup.stats()] == ["serving", "serving"]

        # A signal handler (running inside wait()) only asks; wait() stops.
        signal.signal(signal.SIGUSR1, lambda *a: sup.close())
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        assert sup.wait(timeout=60) is True
        sup.close(); sup.close(); sup.kill()
        assert sup.closed
        print(json.dumps([w["returncode"] for w in sup.stats()]))
        print(json.dumps(pids))
        """)
    )
    assert json.loads(lines[-2]) == [0, 0]
    assert all(process_gone(pid) for pid in json.loads(lines[-1]))


def test_supervisor_closed_from_another_thread_and_as_a_context_manager():
    lines = run_script(
        CLIENT
        + textwrap.dedent("""
        from iouzcrx import Supervisor
        with Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=2, mode="bufring",
                        use_uvloop=False) as sup:
            assert one_connection(sup.port)[0] == "OK"
            closer = threading.Thread(target=sup.close)
            closer.start(); closer.join(60)
            assert sup.closed
        sup.close()
        print(json.dumps([w["returncode"] for w in sup.stats()]))
        """)
    )
    assert json.loads(lines[-1]) == [0, 0]


def test_supervisor_closed_while_it_starts_stops_what_started_and_leaves_nothing():
    lines = run_script(
        textwrap.dedent("""
        import json, os, socket, threading
        from iouzcrx import Supervisor
        results = []
        for when in ("listening", "started"):
            for from_thread in (False, True):
                sup = None

                def on_event(event, when=when, from_thread=from_thread):
                    if event["event"] == when:
                        if from_thread:
                            closer = threading.Thread(target=sup.close)
                            closer.start()
                            closer.join(60)
                        else:
                            sup.close()

                sup = Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=2,
                                 mode="bufring", use_uvloop=False, on_event=on_event,
                                 interface="lo", queues=[0, 1], steering="handoff")
                sup.start()  # returns: what it started is stopped
                try:
                    os.waitpid(-1, os.WNOHANG)
                    children = True
                except ChildProcessError:
                    children = False
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", sup.port))  # the port was let go
                sup.close()
                results.append([when, from_thread, sup.closed, children])
        print(json.dumps(results))
        """)
    )
    assert json.loads(lines[-1]) == [
        [when, from_thread, True, False]
        for when in ("listening", "started")
        for from_thread in (False, True)
    ]


def test_a_start_that_fails_before_forking_keeps_no_socket_or_pipe():
    lines = run_script(
        textwrap.dedent("""
        import json, os
        from iouzcrx import Supervisor

        def on_event(event):
            if event["event"] == "listening":
                raise SystemExit(3)  # not an Exception: it goes through start()

        before = set(os.listdir("/proc/self/fd"))
        sup = Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=2, mode="bufring",
                         use_uvloop=False, on_event=on_event, interface="lo",
                         queues=[0, 1], steering="handoff")
        try:
            sup.start()
        except SystemExit as exc:
            code = exc.code
        sup.close()
        print(json.dumps([code, sup.closed, sorted(set(os.listdir("/proc/self/fd")) - before)]))
        """)
    )
    assert json.loads(lines[-1]) == [3, True, []]


def test_wait_or_start_from_on_event_is_refused_instead_of_waiting_for_itself():
    lines = run_script(
        textwrap.dedent("""
        import json, signal
        from iouzcrx import Supervisor
        signal.alarm(60)  # a supervisor waiting for itself ends here, not in the test
        answers = {}
        sup = None

        def on_event(event):
            call = {"started": "wait", "serving": "wait", "stopped": "start"}.get(event["event"])
            if call is not None and event["event"] not in answers:
                try:
                    getattr(sup, call)()
                    answers[event["event"]] = "returned"
                except RuntimeError as exc:
                    answers[event["event"]] = str(exc)

        sup = Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=1, mode="bufring",
                         use_uvloop=False, on_event=on_event)
        sup.start()
        sup.close()
        print(json.dumps(answers))
        """)
    )
    answers = json.loads(lines[-1])
    assert "would wait for itself" in answers["started"]
    assert "would wait for itself" in answers["serving"]
    assert "already started" in answers["stopped"]


def test_connections_from_no_queue_are_served_where_they_land_and_counted():
    # Loopback has no NAPI instance: no connection names an RX queue, so
    # each is served by the worker that accepted it, counted unsteerable.
    # Socket mode accepts in the loop: only the program steers there.
    lines = run_script(
        CLIENT
        + textwrap.dedent("""
        from iouzcrx import Supervisor
        for mode in ("bufring", "socket"):
            sup = Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=2, mode=mode,
                             interface="lo", queues=[0, 1], steering="bpf")
            with sup:
                assert [one_connection(sup.port)[0] for _ in range(4)] == ["OK"] * 4
            print(json.dumps([sup.steering, sup.stats()]))
        """)
    )
    cases = zip(lines[-2:], ("bufring", "socket"), ("bpf+handoff", "bpf"), strict=True)
    for line, mode, in_worker in cases:
        in_force, final = json.loads(line)
        assert in_force == "bpf+handoff"
        assert [w["queues"] for w in final] == [[0], [1]]
        assert {w["steering"] for w in final} == {in_worker}
        assert {w["mode"] for w in final} == {mode}
        assert sum(w["connections"] for w in final) == 4
        counted = sum(w["unsteerable"] for w in final)
        assert counted == (4 if mode == "bufring" else 0)
        assert sum(w["handed_off"] + w["adopted"] + w["steered"] for w in final) == 0


def test_a_far_restart_deadline_does_not_break_supervision():
    # A worker killed with backoff=1e9 restarts in 1e9 s: wait() without a
    # timeout must still sleep (in bounded steps) and stop on close().
    lines = run_script(
        textwrap.dedent("""
        import json, os, signal, threading
        from iouzcrx import Supervisor
        sup = Supervisor("workers_app:Verify", "127.0.0.1", 0, mode="bufring",
                         backoff=1e9, max_backoff=1e9, shutdown_timeout=1e9)
        sup.start()
        os.kill(sup.stats()[0]["pid"], signal.SIGKILL)
        threading.Timer(0.5, sup.close).start()
        assert sup.wait() is True
        print(json.dumps([sup.closed, sup.stats()[0]["state"]]))
        """)
    )
    assert json.loads(lines[-1]) == [True, "exited"]


def test_a_worker_that_cannot_start_fails_start_with_its_error():
    lines = run_script(
        textwrap.dedent("""
        import os
        from iouzcrx import Supervisor, WorkerStartError
        sup = Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=3, mode="bufring",
                         buffer_size=3)
        try:
            sup.start()
        except WorkerStartError as exc:
            print("refused:", exc)
        assert sup.closed
        print([w["returncode"] for w in sup.stats()])
        """)
    )
    assert lines[0].startswith("refused: worker ") and "buffer_size" in lines[0]


def test_a_bad_backlog_fails_start_before_any_fork():
    for backlog, error, words in [
        ("9", TypeError, "backlog must be an int, not '9'"),
        (1 << 40, iouzcrx.InvalidConfiguration, f"backlog {1 << 40} does not fit"),
    ]:
        sup = iouzcrx.Supervisor("workers_app:Verify", "127.0.0.1", 0, backlog=backlog)
        with pytest.raises(error, match=words):
            sup.start()
        sup.close()
        sup.close()
        assert sup.closed


def test_steering_over_a_missing_interface_fails_start_naming_it():
    for steering_mode in ("auto", "handoff"):
        sup = iouzcrx.Supervisor(
            "workers_app:Verify", "127.0.0.1", 0, workers=2, mode="bufring",
            interface="nosuch0", queues=[0, 1], steering=steering_mode,
        )  # fmt: skip
        with pytest.raises(iouzcrx.InterfaceNotFound, match="nosuch0"):
            sup.start()
        sup.close()
        assert sup.closed and sup.stats()[0]["pid"] is None


def test_a_supervisor_is_neither_copied_nor_pickled():
    import copy
    import pickle

    sup = iouzcrx.Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=2)
    for duplicate in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied or pickled"):
            duplicate(sup)
    sup.close()


def test_the_supervisor_refuses_to_fork_from_a_running_loop():
    async def inside() -> None:
        sup = iouzcrx.Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=2)
        with pytest.raises(RuntimeError, match="outside any running event loop"):
            sup.start()
        sup.close()
        sup.close()

    asyncio.run(inside())


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "workers,error,words",
    [
        (0, iouzcrx.InvalidConfiguration, "from 1 to 1024 processes, not 0"),
        (-3, iouzcrx.InvalidConfiguration, "not -3"),
        (100_000, iouzcrx.InvalidConfiguration, "not 100000"),
        (True, TypeError, "must be an int"),
        (2.5, TypeError, "not 2.5"),
        ("4", TypeError, "not '4'"),
        (None, TypeError, "not None"),
    ],
)
def test_bad_workers_values_are_refused_naming_the_value(workers, error, words):
    with pytest.raises(error, match="workers") as info:
        iouzcrx.Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=workers)
    assert words in str(info.value)


def endless(item: Any) -> Iterator[int]:
    """``item(i)`` for i = 0, 1, ... and a failure past any finite need."""
    for i in range(1 << 17):
        yield item(i)
    raise AssertionError("queues= was read on past where it had to fail")


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"sock": object()}, "binds a socket per worker"),
        ({"reuse_port": False}, "SO_REUSEPORT"),
        ({"colour": "red"}, "unknown server option(s) colour"),
        ({"limit": 10}, "needs an async def handler"),
        ({"shutdown_timeout": -1}, "shutdown_timeout must be a finite non-negative"),
        ({"backoff": 0}, "backoff must be a finite positive"),
        ({"backoff": float("inf")}, "backoff must be a finite positive"),
        ({"max_backoff": float("inf")}, "max_backoff must be a finite positive"),
        ({"shutdown_timeout": float("inf")}, "shutdown_timeout must be a finite"),
        ({"kill_timeout": float("nan")}, "kill_timeout must be a finite"),
        ({"stats_interval": 1e-300}, "stats_interval must be at least 0.01 s"),
        ({"use_uvloop": "yes"}, "use_uvloop must be"),
        ({"worker_init": 3}, "worker_init must be callable"),
        ({"queues": [0, 1]}, "queues= needs interface="),
        ({"queues": [0], "interface": "lo"}, "workers=2 but queues= lists 1 RX queue(s) [0]"),
        ({"queues": [0, 0], "interface": "lo"}, "names an RX queue twice"),
        # Endless iterators end at the first repeat or out-of-range index
        # (these stand for endless ones: they fail if read on past that).
        ({"queues": endless(lambda i: 0), "interface": "lo"}, "names an RX queue twice (0)"),
        ({"queues": endless(lambda i: i), "interface": "lo"}, "not 65535"),
        ({"queues": [0, "1"], "interface": "lo"}, "not '1'"),
        ({"queues": [0, 1 << 16], "interface": "lo"}, "not 65536"),
        ({"queues": 3, "interface": "lo"}, "queues must be a list"),
        ({"queues": [], "interface": "lo"}, "queues= needs at least one RX queue"),
        ({"queues": [0, 1], "interface": "lo\0"}, "interface 'lo\\x00' is not a network"),
        ({"queues": [0, 1], "interface": ""}, "interface '' is not a network"),
        (
            {"queues": [0, 1], "interface": b"lo"},
            "interface must be a str such as 'eth0', not b'lo'",
        ),
        ({"queues": [0, 1], "interface": 1}, "interface must be a str such as 'eth0', not 1"),
        ({"queues": [0, 1], "interface": "lo", "queue": 0}, "pass queue= or queues="),
        ({"steering": "ebpf"}, "steering must be one of"),
        (
            {"queue": 3, "interface": "lo", "mode": "zerocopy"},
            "queue=3 with workers=2: an RX queue binds to one worker's ring only",
        ),
        ({"steering": "bpf"}, "steering='bpf' needs queues="),
    ],
)
def test_bad_supervisor_options_are_refused_before_any_fork(kwargs, words):
    with pytest.raises((TypeError, ValueError)) as info:
        iouzcrx.Supervisor("workers_app:Verify", "127.0.0.1", 0, workers=2, **kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize(
    "app,words",
    [
        ("workers_app", "must be written 'module:attribute'"),
        ("workers_app:Nope", "has no 'Nope'"),
        ("workers_app:HEADER", "not callable"),
        (42, "must be a protocol factory"),
    ],
)
def test_bad_apps_are_refused_naming_them(app, words):
    with pytest.raises((TypeError, ValueError)) as info:
        iouzcrx.Supervisor(app, "127.0.0.1", 0, workers=2)
    assert words in str(info.value)


async def test_create_zcrx_server_points_workers_to_serve():
    with pytest.raises(iouzcrx.InvalidConfiguration, match=r"iouzcrx.serve\(.*workers=4\)"):
        await iouzcrx.create_zcrx_server(asyncio.Protocol, "127.0.0.1", 0, workers=4)
    with pytest.raises(TypeError, match="workers must be an int"):
        await iouzcrx.create_zcrx_server(asyncio.Protocol, "127.0.0.1", 0, workers="2")
    server = await iouzcrx.create_zcrx_server(
        asyncio.Protocol, "127.0.0.1", 0, workers=1, mode="bufring"
    )
    server.close()
    await server.wait_closed()


def test_the_cli_reports_bad_workers_and_exits_1():
    result = subprocess.run(
        [sys.executable, "-m", "iouzcrx", "serve", "workers_app:Verify", "--workers", "0"],
        cwd=TESTS,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "workers must be from 1 to 1024 processes, not 0" in result.stderr


@pytest.mark.parametrize(
    "args,code,words",
    [
        (("--queues", "3-1"), 2, "queue range '3-1' runs backwards"),
        (("--queues", "a"), 2, "'a' is not a list of RX queues"),
        (("--queues", "0-3", "--workers", "5", "--interface", "lo"), 1, "workers=5 but"),
        (("--port", "70000"), 2, "70000 is not a port: use 0 to 65535"),
        (("--port", "-1"), 2, "-1 is not a port: use 0 to 65535"),
        (("--port", "http"), 2, "'http' is not a port number"),
    ],
)
def test_the_cli_reports_bad_queues_and_ports(args, code, words):
    result = subprocess.run(
        [sys.executable, "-m", "iouzcrx", "serve", "workers_app:Verify", *args],
        cwd=TESTS,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == code
    assert words in result.stderr


# -- the example ----------------------------------------------------------------------

EXAMPLE = os.path.join(os.path.dirname(TESTS), "examples", "serve_workers.py")


@pytest.mark.skipif(not os.path.isfile(EXAMPLE), reason=f"no {EXAMPLE} beside the tests")
def test_the_serve_workers_example_digests_streams_and_stops_on_sigterm():
    proc = subprocess.Popen(
        [sys.executable, EXAMPLE, "--workers", "2", "--port", "0", "--mode", "bufring"],
        cwd=TESTS,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().split()[-1])
        for _ in range(2):
            assert ": mode bufring" in proc.stdout.readline()

        async def one(seed: int) -> tuple[bytes, bytes]:
            data = payload(seed, 300_000 + seed)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(data)
            writer.write_eof()
            answer = await asyncio.wait_for(reader.readline(), EVENT_TIMEOUT)
            writer.close()
            expected = f"{len(data)} {hashlib.sha256(data).hexdigest()} ".encode()
            return answer, expected

        async def all_of_them() -> list[tuple[bytes, bytes]]:
            return await asyncio.gather(*(one(seed) for seed in range(10)))

        for answer, expected in asyncio.run(all_of_them()):
            assert answer.startswith(expected)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=EXIT_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0
    summary = [line for line in out.splitlines() if line.startswith("worker ")]
    assert len(summary) == 2 and all(line.endswith("exit 0") for line in summary)
    assert sum(int(line.split(": ")[1].split()[0]) for line in summary) == 10
