"""The asyncio examples, run for real: each server is a subprocess on loopback,
driven by real clients, and judged by what came back or was written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import FEATURES

import iouzcrx

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TIMEOUT = 60
MODES = ["auto", "socket"]


def expected_mode(asked: str) -> str:
    if asked != "auto":
        return asked
    if FEATURES.zcrx_nodev:
        return "copy"
    return "bufring" if FEATURES.io_uring else "socket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(script: str, *args: str, **popen: object) -> Iterator[subprocess.Popen[str]]:
    """The example as a subprocess; killed on the way out whatever happened."""
    argv = [sys.executable, os.path.join(EXAMPLES, script), *args]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def dial(port: int) -> socket.socket:
    # A server that stops answering fails the test instead of hanging it.
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def connect(port: int, proc: subprocess.Popen[str]) -> socket.socket:
    """The first connection, retried until the server listens."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return dial(port)
        except ConnectionRefusedError:
            if proc.poll() is not None:
                pytest.fail(f"the example exited before listening:\n{proc.stderr.read()}")
            assert time.monotonic() < deadline, "the example never listened"
            time.sleep(0.05)


def finish(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    return out


def assert_mode_report(out: str, asked: str) -> None:
    mode = expected_mode(asked)
    assert f"mode: {mode}\n" in out
    # auto names each better mode it passed over and why (zerocopy is a candidate
    # only with --interface and --queue); an explicit mode tries nothing else.
    better = list(iouzcrx.MODES[1 : iouzcrx.MODES.index(mode)]) if asked == "auto" else []
    assert re.findall(r"^refused (\w+): .+$", out, re.M) == better


def send_and_close(sock: socket.socket, data: bytes) -> None:
    with sock:
        sock.sendall(data)


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` and half-close from a thread while reading until EOF."""

    def send() -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = bytearray()
    while chunk := sock.recv(1 << 20):
        received += chunk
    sender.join(TIMEOUT)
    return bytes(received)


@pytest.mark.parametrize("mode", MODES)
def test_sink_server_counts_the_bytes_of_each_connection(mode):
    port = free_port()
    sizes = [(8 << 20) + 123, 1, 0]
    with running("sink_server.py", "--port", str(port), "--mode", mode, "--connections", "3") as p:
        send_and_close(connect(port, p), os.urandom(sizes[0]))
        for size in sizes[1:]:
            send_and_close(dial(port), os.urandom(size))
        out = finish(p)
    assert_mode_report(out, mode)
    counts = [
        int(n) for n in re.findall(r"received (\d+) bytes in [\d.]+ s, [\d.]+ MB/s$", out, re.M)
    ]
    assert sorted(counts) == sorted(sizes)


@pytest.mark.parametrize("mode", MODES)
def test_echo_server_echoes_every_byte_to_a_socket_and_to_the_client_example(mode):
    port = free_port()
    raw_payload = os.urandom((4 << 20) + 5)
    client_size = (8 << 20) + 7
    with running("echo_server.py", "--port", str(port), "--mode", mode, "--connections", "2") as p:
        with connect(port, p) as sock:
            assert exchange(sock, raw_payload) == raw_payload
        client = subprocess.run(
            [sys.executable, os.path.join(EXAMPLES, "client.py"), "--port", str(port)]
            + ["--size", str(client_size), "--mode", mode],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        out = finish(p)
    assert client.returncode == 0, client.stdout + client.stderr
    assert f"mode: {expected_mode(mode)}\n" in client.stdout
    assert f"sent {client_size} bytes, received {client_size} bytes\n" in client.stdout
    assert "verified: identical\n" in client.stdout
    assert re.search(r"^throughput: [\d.]+ MB/s", client.stdout, re.M)
    assert_mode_report(out, mode)
    echoed = [int(n) for n in re.findall(r": echoed (\d+) bytes$", out, re.M)]
    assert sorted(echoed) == sorted([len(raw_payload), client_size])


class CorruptingEcho(threading.Thread):
    """An echo server that damages the echo on purpose: one byte flipped at
    ``offset`` ("flip"), or everything from ``offset`` on left out ("short")."""

    def __init__(self, how: str, offset: int) -> None:
        super().__init__(daemon=True)
        self.how = how
        self.offset = offset
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]

    def run(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        with conn:
            pos = 0
            while chunk := bytearray(conn.recv(1 << 20)):
                end = pos + len(chunk)
                if self.how == "flip" and pos <= self.offset < end:
                    chunk[self.offset - pos] ^= 0x01
                if self.how == "short":
                    chunk = chunk[: max(0, self.offset - pos)]
                conn.sendall(chunk)
                pos = end
            conn.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("how", ["flip", "short"])
def test_client_example_exits_1_when_the_echo_differs(how):
    size, offset = 3 << 20, (1 << 20) + 17
    server = CorruptingEcho(how, offset)
    server.start()
    try:
        client = subprocess.run(
            [sys.executable, os.path.join(EXAMPLES, "client.py"), "--port", str(server.port)]
            + ["--size", str(size)],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        server.listener.close()
        server.join(TIMEOUT)
    assert client.returncode == 1, client.stdout + client.stderr
    assert "verified: identical" not in client.stdout
    if how == "flip":
        assert f"first difference at byte {offset}\n" in client.stdout
    else:
        assert f"{offset} bytes came back instead of {size}\n" in client.stdout


def request(body: bytes) -> bytes:
    return b"SIZE %d\n" % len(body) + body


@pytest.mark.parametrize("mode", MODES)
def test_streams_server_answers_the_sha256_of_each_body(mode):
    port = free_port()
    # Bodies that look like headers, an empty one, and one well past the
    # reader's limit (it arrives in many views and must still hash whole).
    bodies = [b"SIZE 3\nabc\n", b"", os.urandom((5 << 20) + 3), b"\n" * 1000]
    with running(
        "streams_server.py", "--port", str(port), "--mode", mode, "--connections", "2"
    ) as p:
        with connect(port, p) as sock:
            # The first header in two pieces, so readline has to wait for its end.
            first = request(bodies[0])
            sock.sendall(first[:3])
            time.sleep(0.05)
            answers = exchange(sock, first[3:] + b"".join(request(b) for b in bodies[1:]))
        with dial(port) as sock:
            refusal = exchange(sock, b"LENGTH 5\nhello")
        out = finish(p)
    assert answers.decode().splitlines() == [f"OK {hashlib.sha256(b).hexdigest()}" for b in bodies]
    assert refusal.startswith(b"ERR ") and refusal.endswith(b"\n") and refusal.count(b"\n") == 1
    assert_mode_report(out, mode)
    total = sum(len(b) for b in bodies)
    assert re.search(rf": {len(bodies)} requests, {total} bytes, closed$", out, re.M)
    assert re.search(r": 0 requests, 0 bytes, bad header$", out, re.M)


@pytest.mark.parametrize("mode", MODES)
def test_receive_to_file_async_writes_one_exact_file_per_connection(tmp_path, mode):
    port = free_port()
    outdir = tmp_path / "received"
    payloads = [os.urandom((6 << 20) + 5), os.urandom((3 << 20) + 1), os.urandom(1), b""]
    with running(
        "receive_to_file_async.py",
        str(outdir),
        *("--port", str(port), "--mode", mode, "--connections", str(len(payloads))),
    ) as p:
        send_and_close(connect(port, p), payloads[0])
        # The others at the same time, so that the files are written interleaved.
        senders = [
            threading.Thread(
                target=send_and_close,
                args=(dial(port), payload),
            )
            for payload in payloads[1:]
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(TIMEOUT)
        out = finish(p)
    assert_mode_report(out, mode)
    files = sorted(outdir.iterdir())
    assert [f.name for f in files] == [f"connection-{k:04d}.bin" for k in (1, 2, 3, 4)]
    # The first connection was accepted alone; the others in any order.
    assert files[0].read_bytes() == payloads[0]
    assert sorted(f.read_bytes() for f in files[1:]) == sorted(payloads[1:])
    written = sorted(int(n) for n in re.findall(r"^wrote (\d+) bytes to ", out, re.M))
    assert written == sorted(len(payload) for payload in payloads)


def default_sigint() -> None:
    # A test run in the background may ignore SIGINT, and a child would inherit that.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_until(proc: subprocess.Popen[str], pattern: str, seen: bytearray) -> None:
    """Add the unbuffered child's output to ``seen`` until ``pattern`` is in it."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + TIMEOUT
    while not re.search(pattern.encode(), seen, re.M):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"never printed {pattern!r}:\n{seen.decode()}"
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 1 << 16)
            assert chunk, f"exited before printing {pattern!r}:\n{seen.decode()}"
            seen += chunk


@pytest.mark.parametrize("mode", MODES)
def test_sink_server_serves_until_ctrl_c(mode):
    port = free_port()
    seen = bytearray()
    with running(
        "sink_server.py",
        *("--port", str(port), "--mode", mode),
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        preexec_fn=default_sigint,
    ) as p:
        send_and_close(connect(port, p), b"z" * 1000)
        # Ctrl-C only once the report is out and that connection was served.
        read_until(p, r"^mode: \w+$", seen)
        read_until(p, r"received 1000 bytes in .*\n", seen)
        p.send_signal(signal.SIGINT)
        out = seen.decode() + finish(p)
    assert_mode_report(out, mode)
