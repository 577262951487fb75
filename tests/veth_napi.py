"""Run inside a new network namespace (``unshare -n``): a veth pair whose
far end lives in a second namespace, so that TCP between them really
crosses the device (and its NAPI instances) instead of loopback. Prints one
JSON object: what the netdev family reported and, per accepted connection,
its SO_INCOMING_NAPI_ID and routing decision.

Usage: python veth_napi.py CONNECTIONS RX_QUEUES [server]

With ``server``, a ``create_zcrx_server`` serves the connections instead,
its routing set up for RX_QUEUES queues with one bufring queue standing in
for each queue's zcrx queue (veth has no zcrx support; the routing is the
same), and the report is the server's stats.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from typing import Any

from iouzcrx import netdev

CLIENT = r"""
import socket, subprocess, sys
print("ready", flush=True)  # in the new namespace now
sys.stdin.readline()  # the peer end was moved in
# veth hands a packet to the peer's NAPI (and so marks it with a NAPI id)
# only when the sending end does not do TSO.
for cmd in (["ip", "link", "set", "lo", "up"],
            ["ethtool", "-K", "qb", "tso", "off"],
            ["ip", "addr", "add", "10.77.0.2/24", "dev", "qb"],
            ["ip", "link", "set", "qb", "up"]):
    subprocess.run(cmd, check=True)
for _ in range(int(sys.argv[1])):
    c = socket.create_connection(("10.77.0.1", 7777), timeout=30)
    c.sendall(b"x" * 65536)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    c.close()
"""


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


async def serve(count: int, rx_queues: int, client: subprocess.Popen[str]) -> dict[str, Any]:
    import iouzcrx
    from iouzcrx.modes import select_mode
    from iouzcrx.reactor import Reactor

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    ended = 0

    class Sink(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport

        def eof_received(self) -> bool:
            nonlocal ended
            self.transport.write(b"k")
            self.transport.close()
            ended += 1
            if ended == count and not done.done():
                done.set_result(None)
            return True

    server = await iouzcrx.create_zcrx_server(
        Sink, "10.77.0.1", 7777, mode="bufring", area_size=4 << 20, buffer_size=64 << 10
    )
    ring = Reactor.for_loop(loop).ring
    routes: dict[int, Any] = {0: (server._selection, None)}
    for queue in range(1, rx_queues):
        extra = select_mode(ring, mode="bufring", area_size=4 << 20, buffer_size=64 << 10)
        routes[queue] = (extra, None)
    server._routes = routes
    server._router = netdev.QueueRouter("qa", routes)
    assert client.stdin is not None
    client.stdin.write("go\n")
    client.stdin.flush()
    try:
        await asyncio.wait_for(done, 60)
        return server.stats()
    finally:
        server.close()
        await server.wait_closed()
        for selection, _key in routes.values():
            selection.backend.close()


def accept(listener: socket.socket, client: subprocess.Popen[str]) -> socket.socket:
    """The next connection; fails at once if the client died first."""
    listener.settimeout(1)
    for _ in range(60):
        try:
            return listener.accept()[0]
        except TimeoutError:
            if client.poll() is not None:
                raise SystemExit(f"the client exited with {client.returncode}") from None
    raise SystemExit("no connection within 60 s")


def main() -> None:
    count, rx_queues = int(sys.argv[1]), int(sys.argv[2])
    run("ip", "link", "set", "lo", "up")
    q = str(rx_queues)
    queues = ["numrxqueues", q, "numtxqueues", q]
    run("ip", "link", "add", "qa", *queues, "type", "veth", "peer", "name", "qb", *queues)
    # veth receives through NAPI only with GRO on (or XDP).
    run("ethtool", "-K", "qa", "gro", "on")
    run("ip", "addr", "add", "10.77.0.1/24", "dev", "qa")
    run("ip", "link", "set", "qa", "up")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("10.77.0.1", 7777))
    listener.listen(count)
    client = subprocess.Popen(
        ["unshare", "-n", sys.executable, "-c", CLIENT, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdin is not None and client.stdout is not None
        # Moved only once the child has its own namespace: before, the
        # move would be into this one (a no-op).
        if client.stdout.readline().strip() != "ready":
            raise SystemExit(f"the client did not start: {client.wait(30)}")
        run("ip", "link", "set", "qb", "netns", str(client.pid))
        if len(sys.argv) > 3 and sys.argv[3] == "server":
            listener.close()
            report = asyncio.run(serve(count, rx_queues, client))
            client.wait(60)
            report["client_rc"] = client.returncode
            print(json.dumps(report))
            return
        client.stdin.write("go\n")
        client.stdin.flush()
        with netdev.NetdevFamily() as family:
            report = {
                "rx_queues": [q.__dict__ for q in family.rx_queues("qa")],
                "napi_ids": family.napi_ids("qa"),
                "napi_to_queue": {str(k): v for k, v in family.napi_to_queue("qa").items()},
                "lo_rx_queues": [q.__dict__ for q in family.rx_queues("lo")],
            }
        router = netdev.QueueRouter("qa", range(rx_queues))
        only_first = netdev.QueueRouter("qa", [0])
        conns = []
        for _ in range(count):
            conn = accept(listener, client)
            conn.settimeout(30)
            received = 0
            while chunk := conn.recv(65536):
                received += len(chunk)
            queue, napi_id = router.route(conn)
            conns.append(
                {
                    "napi_id": napi_id,
                    "queue": queue,
                    "bytes": received,
                    "only_first": only_first.route(conn)[0],
                }
            )
            conn.sendall(b"k")
            conn.close()
        report["connections"] = conns
        client.wait(60)
        report["client_rc"] = client.returncode
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
