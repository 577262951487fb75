"""The examples work as their docstrings say."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_receive_to_file_writes_exactly_what_was_sent(tmp_path):
    payload = os.urandom(8 << 20)
    output = tmp_path / "received.bin"
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "examples", "receive_to_file.py"),
            str(output),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the example never listened"
                time.sleep(0.05)
        with sock:
            sock.sendall(payload)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert f"{len(payload)} bytes in" in out
    assert output.read_bytes() == payload
