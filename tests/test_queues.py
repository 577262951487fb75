"""Routing connections to the RX queue they arrive on: the netdev netlink
client against the real kernel (a veth pair across two network namespaces,
so traffic crosses the device's NAPI instances), the routing decision, and
the ``queues=`` option of ``create_zcrx_server``."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest
from isolation import PACKAGE_ROOT

import iouzcrx
from iouzcrx import netdev
from iouzcrx._zcrx import rx_queue_count
from iouzcrx.errors import InterfaceNotFound, InvalidConfiguration

TESTS = os.path.dirname(os.path.abspath(__file__))


def _veth_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces and veth devices"
    for tool in ("unshare", "ip", "ethtool"):
        if shutil.which(tool) is None:
            return f"needs {tool!r} on PATH"
    return None


requires_veth = pytest.mark.skipif(_veth_reason() is not None, reason=str(_veth_reason()))


def veth_run(connections: int, rx_queues: int, *, server: bool = False) -> dict:
    """Run tests/veth_napi.py in a fresh network namespace; its report."""
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT)
    done = subprocess.run(
        ["unshare", "-n", sys.executable, os.path.join(TESTS, "veth_napi.py"),
         str(connections), str(rx_queues)] + (["server"] if server else []),
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# -- the netlink client against the host kernel ------------------------------------


def test_the_netdev_family_lists_the_loopback_rx_queue():
    with netdev.NetdevFamily() as family:
        queues = family.rx_queues("lo")
        assert [q.queue for q in queues] == list(range(rx_queue_count("lo") or 1))
        assert all(q.ifindex == socket.if_nametoindex("lo") and not q.io_uring for q in queues)
        assert family.rx_queues(socket.if_nametoindex("lo")) == queues
        # Loopback has no NAPI: nothing can be routed through it.
        assert family.napi_to_queue("lo") == {}
        assert family.family_id > 0
        assert "family" in repr(family)
    assert "closed" in repr(family)


def test_the_netdev_family_names_a_missing_interface_and_bad_arguments():
    with netdev.NetdevFamily() as family:
        with pytest.raises(InterfaceNotFound, match="no network interface 'nosuch0'"):
            family.rx_queues("nosuch0")
        with pytest.raises(InterfaceNotFound):
            family.napi_ids(0x7FFFFFF0)  # a well-formed index nobody has
        with pytest.raises(TypeError, match="interface must be"):
            family.rx_queues(1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="interface must be"):
            family.rx_queues(True)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="positive"):
            family.rx_queues(0)
        for huge in (2**31, 2**40, 2**100):
            with pytest.raises(ValueError, match=f"not {huge}"):
                family.rx_queues(huge)
            with pytest.raises(ValueError, match=f"not {huge}"):
                family.napi_ids(huge)
        # Still usable after the errors: each answer was read to its end.
        assert family.rx_queues("lo")


def test_a_closed_family_says_so_and_closes_twice():
    family = netdev.NetdevFamily()
    family.close()
    family.close()
    with pytest.raises(ValueError, match="closed"):
        family.rx_queues("lo")


def test_threads_sharing_a_family_take_turns():
    import threading

    results: list[list[netdev.RxQueue]] = []
    errors: list[BaseException] = []
    with netdev.NetdevFamily() as family:

        def worker() -> None:
            try:
                for _ in range(50):
                    results.append(family.rx_queues("lo"))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors and len(results) == 200
    assert all(r == results[0] for r in results)


def test_a_family_refuses_use_in_a_forked_child():
    with netdev.NetdevFamily() as family:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its status
            try:
                family.rx_queues("lo")
            except RuntimeError as exc:
                os._exit(0 if "fork" in str(exc) else 2)
            except BaseException:
                os._exit(3)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert family.rx_queues("lo")  # the parent's socket is untouched


def test_a_forked_child_closes_a_family_a_parent_thread_was_using():
    # The child inherits the lock as some parent thread held it mid-request
    # (held here for certain): close() must not wait for it.
    with netdev.NetdevFamily() as family:
        with family._lock:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through its status
                signal.alarm(10)  # a hang ends the child, failing the test
                family.close()
                family.close()
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert family.rx_queues("lo")  # the parent's socket is untouched


def test_a_loopback_connection_has_no_napi_id_and_is_unrouted(listener):
    client, server = socket.create_connection(listener.getsockname()), listener.accept()[0]
    with client, server:
        client.sendall(b"x" * 1000)
        assert server.recv(1000)
        assert netdev.incoming_napi_id(server) == 0
        router = netdev.QueueRouter("lo", [0])
        assert router.error is None
        assert router.route(server) == (None, 0)


def test_a_router_for_a_missing_interface_routes_nothing(listener):
    router = netdev.QueueRouter("nosuch0", [0, 1])
    assert isinstance(router.error, InterfaceNotFound)
    client, server = socket.create_connection(listener.getsockname()), listener.accept()[0]
    with client, server:
        assert router.route(server) == (None, 0)


@pytest.mark.parametrize(
    "interface,queues,words",
    [
        ("lo", 5, "queues must be RX queue indexes such as [0, 1], not 5"),
        ("lo", "01", "not '01'"),
        ("lo", [0, True], "not True"),
        ("lo", [-1], "not -1"),
        ("lo", [0.5], "not 0.5"),
        (None, [0], "interface must be a name"),
        (b"lo", [0], "interface must be a name"),
    ],
)
def test_a_router_names_bad_arguments(interface, queues, words):
    with pytest.raises(TypeError) as info:
        netdev.QueueRouter(interface, queues)
    assert words in str(info.value)


def test_the_routing_decision():
    mapping = {300: 0, 301: 1, 302: 2}
    assert netdev.route_queue(301, mapping, [0, 1]) == 1
    assert netdev.route_queue(302, mapping, [0, 1]) is None  # a queue that is not ours
    assert netdev.route_queue(0, mapping, [0, 1]) is None  # loopback, nothing received
    assert netdev.route_queue(999, mapping, [0, 1]) is None  # another device
    assert netdev.route_queue(300, {}, [0]) is None


# -- real NAPI ids: veth across two namespaces ---------------------------------------


@pytest.fixture(scope="module")
def veth_report() -> dict:
    reason = _veth_reason()
    if reason is not None:
        pytest.skip(reason)
    return veth_run(connections=24, rx_queues=2)


@requires_veth
def test_the_kernel_reports_the_veth_queues_and_their_napi_instances(veth_report):
    assert [q["queue"] for q in veth_report["rx_queues"]] == [0, 1]
    ids = veth_report["napi_ids"]
    assert len(ids) == 2 and all(i > 0 for i in ids)
    # veth links no NAPI instance to its queues: paired in creation order.
    assert veth_report["napi_to_queue"] == {str(ids[0]): 0, str(ids[1]): 1}


@requires_veth
def test_connections_are_routed_to_the_queue_their_packets_arrive_on(veth_report):
    conns = veth_report["connections"]
    assert veth_report["client_rc"] == 0
    assert len(conns) == 24 and all(c["bytes"] == 65536 for c in conns)
    mapping = {int(k): v for k, v in veth_report["napi_to_queue"].items()}
    for conn in conns:
        # Every connection crossed the device: its NAPI id is one of the
        # device's, and it is routed to that NAPI instance's queue.
        assert conn["napi_id"] in mapping
        assert conn["queue"] == mapping[conn["napi_id"]]
        # A router that owns only queue 0 leaves queue 1's connections unrouted.
        assert conn["only_first"] == (0 if conn["queue"] == 0 else None)
    # The sender's TX queue (a hash of the flow) picks the RX queue: 24
    # flows all on one of two queues would be a 1 in 8 million chance.
    assert {c["queue"] for c in conns} == {0, 1}


# -- create_zcrx_server(queues=...) ------------------------------------------------


async def test_queue_and_queues_together_are_refused():
    with pytest.raises(InvalidConfiguration, match="queue= or queues="):
        await iouzcrx.create_zcrx_server(
            asyncio.Protocol, "127.0.0.1", 0,
            interface="lo", queue=0, queues=[0, 1], mode="zerocopy",
        )  # fmt: skip


def never_read() -> Iterator[int]:
    """Items no one may ask for."""
    raise AssertionError("queues= was read on past its first repeat")
    yield 0  # a generator


@pytest.mark.parametrize(
    ("queues", "error", "match"),
    [
        ([], InvalidConfiguration, "at least one"),
        ([0, 0], InvalidConfiguration, "twice"),
        # An iterator is not read past its first repeat (it may be endless).
        (lambda: itertools.chain([0, 0], never_read()), InvalidConfiguration, r"0 twice: \[0, 0\]"),
        ([0, -1], InvalidConfiguration, "non-negative"),
        ([0, "1"], TypeError, "queue must be an integer"),
        (3, TypeError, "queues must be"),
        ("01", TypeError, "queues must be"),
    ],
)
async def test_bad_queues_are_named(queues, error, match):
    if callable(queues):  # an iterator, made afresh for each loop
        queues = queues()
    with pytest.raises(error, match=match):
        await iouzcrx.create_zcrx_server(
            asyncio.Protocol, "127.0.0.1", 0, interface="lo", queues=queues
        )


async def test_queues_need_an_interface_and_zerocopy():
    with pytest.raises(InvalidConfiguration, match="interface="):
        await iouzcrx.create_zcrx_server(asyncio.Protocol, "127.0.0.1", 0, queues=[0, 1])
    with pytest.raises(InvalidConfiguration, match="zerocopy"):
        await iouzcrx.create_zcrx_server(
            asyncio.Protocol, "127.0.0.1", 0, interface="lo", queues=[0], mode="copy"
        )


async def test_queues_on_a_device_without_zcrx_support_fall_back_with_reasons():
    """Loopback has no queue ops: auto falls back to another mode (one
    backend), saying why, and the server still serves and counts."""
    server = await iouzcrx.create_zcrx_server(
        asyncio.Protocol, "127.0.0.1", 0, interface="lo", queues=[0]
    )
    async with server:
        assert server.mode != "zerocopy" and "zerocopy" in server.refused
        assert server.queues == ()
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        await writer.drain()
        stats = server.stats()
        assert stats["queues"] == {} and stats["unrouted_connections"] == 0
        assert stats["mode"] == server.mode
        writer.close()
        await writer.wait_closed()
        server.close_clients()


@requires_veth
def test_a_server_receives_each_connection_on_the_queue_it_arrives_on():
    """The server's routing for real: connections across the veth pair are
    accepted, routed by their NAPI id, and their data is received by that
    queue's backend (bufring queues stand in for zcrx ones, which veth
    cannot bind)."""
    report = veth_run(connections=24, rx_queues=2, server=True)
    assert report["client_rc"] == 0
    assert report["unrouted_connections"] == 0 and report["routing_error"] is None
    queues = report["queues"]
    assert set(queues) == {"0", "1"}
    routed = [queues[q]["connections_routed"] for q in ("0", "1")]
    assert sum(routed) == 24 and all(routed)
    for q in ("0", "1"):
        # Every byte of a routed connection went through its queue's backend.
        assert queues[q]["bytes"] == 65536 * queues[q]["connections_routed"]
