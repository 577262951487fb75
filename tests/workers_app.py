"""The application the worker tests serve, by name (``workers_app:Verify``):
each connection says which worker took it (``HELLO <pid> <napi id>``: the
NAPI instance its packets arrive through, 0 on loopback), then checks every
byte it receives against the pattern its header names and answers with the
verdict.

A stream is a 16-byte header (seed, length: two little-endian u64) and
``length`` bytes of ``payload(seed, length)``; after the sender's EOF the
server answers ``OK <pid> <length>`` or ``BAD <pid> <reason>``.

Run as a script (inside ``unshare -n``, as root), it holds the steering
scenarios of tests/test_workers.py, each printing one JSON report:

    python workers_app.py veth WORKERS QUEUES CONNECTIONS STEERING [down] [asyncio|uvloop]

serves ``Verify`` with ``python -m iouzcrx serve --interface qa --queues
0-(QUEUES-1)`` on one end of a veth pair with QUEUES queues, runs
CONNECTIONS verified streams from a second network namespace through the
other end and stops the supervisor; the report has the NAPI id -> RX queue
map, each worker's pid and final stats, each connection's hello and verdict.
With ``down`` the last worker is down while the clients start (see
``scenario``).

    python workers_app.py tun

runs the steering program in the kernel: TCP handshakes written into each
queue of a multi-queue tun device (which records the RX queue, as a NIC
driver does) reach reuseport listeners carrying the program; the report
maps each queue to the listener indexes that accepted its connections.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
from typing import Any

import iouzcrx
from iouzcrx.netdev import NetdevFamily, incoming_napi_id

HEADER = struct.Struct("<QQ")


def payload(seed: int, length: int) -> bytes:
    return hashlib.shake_128(seed.to_bytes(8, "little")).digest(length)


class Verify(iouzcrx.ZeroCopyProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.header = b""
        self.expected = b""
        self.length = -1
        self.received = 0
        self.problem: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        napi_id = incoming_napi_id(transport.get_extra_info("socket"))
        transport.write(f"HELLO {os.getpid()} {napi_id}\n".encode())

    def view_received(self, view: memoryview) -> None:
        data = view.tobytes()
        view.release()
        if self.length < 0:
            self.header += data
            if len(self.header) < HEADER.size:
                return
            seed, self.length = HEADER.unpack_from(self.header)
            self.expected = payload(seed, self.length)
            data = self.header[HEADER.size :]
        end = self.received + len(data)
        if self.problem is None and self.expected[self.received : end] != data:
            self.problem = f"corrupted or too long at byte {self.received}"
        self.received = end

    def eof_received(self) -> None:
        assert self.transport is not None
        if self.problem is None and self.received != self.length:
            self.problem = f"received {self.received} of {self.length} bytes"
        verdict = f"BAD {os.getpid()} {self.problem}" if self.problem else f"OK {os.getpid()}"
        self.transport.write(f"{verdict} {self.received}\n".encode())
        return None


async def verify_streams(reader: iouzcrx.ZcrxStreamReader, writer: iouzcrx.ZcrxStreamWriter):
    """The same contract through streams."""
    napi_id = incoming_napi_id(writer.get_extra_info("socket"))
    writer.write(f"HELLO {os.getpid()} {napi_id}\n".encode())
    seed, length = HEADER.unpack(bytes(await reader.readexactly(HEADER.size)))
    data = bytes(await reader.readexactly(length))
    rest = await reader.read()
    ok = data == payload(seed, length) and not rest
    writer.write(f"{'OK' if ok else 'BAD'} {os.getpid()} {length}\n".encode())
    await writer.drain()
    writer.close()


def refuse_when_told(index: int) -> None:
    """Worker init: fail to start while the file named by
    $WORKERS_APP_REFUSE lists this worker's index."""
    path = os.environ.get("WORKERS_APP_REFUSE")
    if path and os.path.exists(path):
        with open(path) as f:
            if str(index) in f.read().split():
                raise RuntimeError(f"worker {index} told to refuse to start")


# -- the veth steering scenario ------------------------------------------------------

SERVER_ADDRESS = "10.77.0.1"
CLIENT_ADDRESS = "10.77.0.2"

CLIENT = r"""
import asyncio, json, socket, subprocess, sys
from workers_app import HEADER, payload
print("ready", flush=True)  # in the new namespace now
port, count = (int(x) for x in sys.stdin.readline().split())
# veth hands a packet to the peer's NAPI (marking it with a NAPI id) only
# when the sending end does not do TSO.
for cmd in (["ip", "link", "set", "lo", "up"],
            ["ethtool", "-K", "qb", "tso", "off"],
            ["ip", "addr", "add", "10.77.0.2/24", "dev", "qb"],
            ["ip", "link", "set", "qb", "up"]):
    subprocess.run(cmd, check=True)

async def connect():
    sock = socket.socket()
    # veth puts a flow on the RX queue of the sender's TX queue, which the
    # sender picks by the socket's hash; without this, a retransmitted SYN
    # would get a new hash and could move the flow to another queue.
    sock.setsockopt(socket.SOL_SOCKET, 74, 0)  # SO_TXREHASH: SOCK_TXREHASH_DISABLED
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("10.77.0.1", port))
    return await asyncio.open_connection(sock=sock)

async def one(seed, limit):
    async with limit:
        length = 32768 + seed * 7
        r, w = await asyncio.wait_for(connect(), 60)
        try:
            hello = (await asyncio.wait_for(r.readline(), 60)).decode().split()
            w.write(HEADER.pack(seed, length) + payload(seed, length))
            w.write_eof()
            verdict = (await asyncio.wait_for(r.readline(), 60)).decode().split()
        finally:
            w.close()
        return {"seed": seed, "length": length + HEADER.size, "hello": hello, "verdict": verdict}

async def main():
    limit = asyncio.Semaphore(16)
    return await asyncio.gather(*(one(seed, limit) for seed in range(count)))

print(json.dumps(asyncio.run(main())), flush=True)
sys.stdin.readline()  # the device goes with this namespace: not before it is read
"""


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


def _veth(queues: int) -> None:
    _run("ip", "link", "set", "lo", "up")
    q = str(queues)
    both = ["numrxqueues", q, "numtxqueues", q]
    _run("ip", "link", "add", "qa", *both, "type", "veth", "peer", "name", "qb", *both)
    # veth receives through NAPI only with GRO on (or XDP).
    _run("ethtool", "-K", "qa", "gro", "on")
    _run("ip", "addr", "add", f"{SERVER_ADDRESS}/24", "dev", "qa")
    _run("ip", "link", "set", "qa", "up")


def _events(proc: subprocess.Popen[str]) -> Any:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield json.loads(line)
    raise SystemExit(f"the supervisor ended early with {proc.wait(30)}")


def scenario(
    workers: int, queues: int, count: int, steering: str, down: bool = False, loop: str = ""
) -> dict[str, Any]:
    """With ``down``, the last worker is killed before the clients start
    and kept from restarting until the first worker has handed it a
    connection: it then serves what queued on its socket and in its inbox."""
    _veth(queues)
    here = os.path.dirname(os.path.abspath(__file__))
    refuse = os.path.join(tempfile.mkdtemp(prefix="workers-app-"), "refuse")
    server = subprocess.Popen(
        [sys.executable, "-m", "iouzcrx", "serve", "workers_app:Verify",
         "--host", SERVER_ADDRESS, "--port", "0", "--workers", str(workers),
         "--mode", "bufring", "--interface", "qa", "--queues", f"0-{queues - 1}",
         "--steering", steering, "--json", "--stats-interval", "0.1",
         "--backoff", "0.05", "--max-backoff", "0.2", "--init", "workers_app:refuse_when_told"]
        + (["--loop", loop] if loop else []),
        cwd=here, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, WORKERS_APP_REFUSE=refuse),
    )  # fmt: skip
    client = subprocess.Popen(
        ["unshare", "-n", sys.executable, "-c", CLIENT],
        cwd=here, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        events = _events(server)
        report: dict[str, Any] = {"listening": next(events), "pids": {}}
        while len(report["pids"]) < workers:
            event = next(events)
            if event["event"] == "serving":
                report["pids"][event["worker"]] = event["pid"]
            elif event["event"] == "exited":
                raise SystemExit(f"a worker failed: {event}")
        last = workers - 1
        if down:
            with open(refuse, "w") as f:
                f.write(str(last))
            os.kill(report["pids"][last], signal.SIGKILL)
            while not (event := next(events))["event"] == "exited":
                pass
        assert client.stdin is not None and client.stdout is not None
        if client.stdout.readline().strip() != "ready":
            raise SystemExit(f"the client did not start: {client.wait(30)}")
        # Moved only once the client has its own namespace.
        _run("ip", "link", "set", "qb", "netns", str(client.pid))
        client.stdin.write(f"{report['listening']['port']} {count}\n")
        client.stdin.flush()
        if down:
            while not (
                event["event"] == "stats" and event["worker"] == 0 and event["handed_off"] > 0
            ):
                event = next(events)
            os.unlink(refuse)
            while not (event["event"] == "serving" and event["worker"] == last):
                event = next(events)
            report["pids"][last] = event["pid"]
        report["connections"] = json.loads(client.stdout.readline() or "null")
        with NetdevFamily() as family:
            report["napi_to_queue"] = {str(k): v for k, v in family.napi_to_queue("qa").items()}
        client.stdin.write("\n")
        client.stdin.flush()
        report["client_rc"] = client.wait(60)
        server.send_signal(signal.SIGTERM)
        for event in events:
            if event["event"] == "stopped":
                report["final"] = event["workers"]
                break
        report["server_rc"] = server.wait(60)
    finally:
        for proc in (client, server):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(os.path.dirname(refuse), ignore_errors=True)
    return report


# -- the steering program, run by the kernel on a tun device -------------------------

TUN_QUEUES, TUN_LISTENERS, TUN_PER_QUEUE = 6, 4, 3
# Queue 4 is nobody's: the program leaves it to the kernel's hash.
TUN_OWNERS = {0: 2, 1: 0, 2: 3, 3: 1, 5: 2}
_TUNSETIFF, _IFF_TUN, _IFF_NO_PI, _IFF_MULTI_QUEUE = 0x400454CA, 0x0001, 0x1000, 0x0100
_TUN_SERVER, _TUN_CLIENT = "10.78.0.1", "10.78.0.2"


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _tcp_packet(sport: int, dport: int, seq: int, ack: int, flags: int) -> bytes:
    """An IPv4 TCP segment without payload from the client to the server."""
    src, dst = socket.inet_aton(_TUN_CLIENT), socket.inet_aton(_TUN_SERVER)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, socket.IPPROTO_TCP, 0, src, dst
    )
    return ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:] + tcp


def _syn_ack_seq(fds: list[int], sport: int) -> int:
    """The server's sequence number from its SYN-ACK to ``sport``, read from
    whichever tun queue the kernel sent it on."""
    import select

    for _ in range(300):
        ready, _, _ = select.select(fds, [], [], 0.1)
        for fd in ready:
            while True:
                try:
                    packet = os.read(fd, 65536)
                except BlockingIOError:
                    break
                if len(packet) < 40 or packet[9] != socket.IPPROTO_TCP:
                    continue
                ihl = (packet[0] & 15) * 4
                _src, dst, seq = struct.unpack_from("!HHI", packet, ihl)
                if dst == sport and packet[ihl + 13] & 0x12 == 0x12:
                    return int(seq)
    raise SystemExit(f"no SYN-ACK for port {sport}")


def tun_scenario() -> dict[str, list[int]]:
    import fcntl
    import select

    from iouzcrx import steering

    _run("ip", "link", "set", "lo", "up")
    fds = []
    for _ in range(TUN_QUEUES):  # each open attaches the device's next queue
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        flags = _IFF_TUN | _IFF_NO_PI | _IFF_MULTI_QUEUE
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", b"st0", flags))
        fds.append(fd)
    _run("ip", "addr", "add", f"{_TUN_SERVER}/24", "dev", "st0")
    _run("ip", "link", "set", "st0", "up")
    listeners: list[socket.socket] = []
    for _ in range(TUN_LISTENERS):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((_TUN_SERVER, listeners[0].getsockname()[1] if listeners else 0))
        listeners.append(sock)
    for sock in listeners:
        sock.listen(64)
        sock.setblocking(False)
    port = listeners[0].getsockname()[1]
    offset = steering.queue_mapping_offset("st0")
    steering.attach_steering(listeners[0], steering.steering_program(TUN_OWNERS, offset=offset))
    landed: dict[str, list[int]] = {}
    for queue in range(TUN_QUEUES):
        for n in range(TUN_PER_QUEUE):
            sport = 20000 + queue * 100 + n
            os.write(fds[queue], _tcp_packet(sport, port, 1000, 0, 0x02))  # SYN
            theirs = _syn_ack_seq(fds, sport)
            os.write(fds[queue], _tcp_packet(sport, port, 1001, theirs + 1, 0x10))  # ACK
            ready, _, _ = select.select(listeners, [], [], 30)
            if not ready:
                raise SystemExit(f"no listener accepted the connection from port {sport}")
            for index, sock in enumerate(listeners):
                if sock in ready:
                    conn, peer = sock.accept()
                    conn.close()
                    if peer[1] != sport:
                        raise SystemExit(f"accepted {peer}, expected port {sport}")
                    landed.setdefault(str(queue), []).append(index)
    return landed


if __name__ == "__main__":
    if sys.argv[1:2] == ["veth"] and len(sys.argv) >= 6:
        workers, queues, count = (int(x) for x in sys.argv[2:5])
        extra = sys.argv[6:]
        loop = next((a for a in extra if a in ("asyncio", "uvloop")), "")
        report = scenario(workers, queues, count, sys.argv[5], "down" in extra, loop)
        print(json.dumps(report))
    elif sys.argv[1:] == ["tun"]:
        print(json.dumps(tun_scenario()))
    else:
        raise SystemExit(__doc__)
