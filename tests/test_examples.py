"""The examples work as their docstrings say."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import FEATURES
from isolation import TESTS, child_env

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


@pytest.mark.parametrize("mode", ["auto", "socket"])
def test_the_demo_streams_verifies_and_reports(mode):
    out = subprocess.run(
        [sys.executable, "-m", "iouzcrx", "demo", "--size", "0.25", "--mode", mode],
        cwd=TESTS,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    expected = {"socket": "socket", "auto": "copy" if FEATURES.zcrx_nodev else "bufring"}[mode]
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert lines["mode"].strip() == expected
    assert "byte-exact" in lines["verified"] and str(1 << 28) in lines["verified"]
    assert "GB/s" in lines["throughput"] and "s/GB" in lines["receiver CPU"]
    assert int(lines["buffers recycled"].split()[0]) > 0
    # Whether zero copy happened, from the kernel's counters where it keeps them.
    if expected == "copy" and FEATURES.zcrx_events:
        assert lines["zero copy"].split()[0] == "0.0%"
        assert f"the kernel copied {1 << 28} bytes" in lines["zero copy"]
    else:
        assert lines["zero copy"].split()[0] in ("none", "unknown")


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--connections", "-1"], "--connections: -1: use 1 to 256"),
        (["--connections", "0"], "--connections: 0: use 1 to 256"),
        (["--connections", "100000"], "--connections: 100000: use 1 to 256"),
        (["--size", "0"], "--size: 0 GiB"),
        (["--size", "nan"], "--size: nan GiB"),
        (["--size", "inf"], "--size: inf GiB"),
        (["--size", "1e-12"], "less than a byte per connection"),
        (["--area", "0"], "--area: 0: use 1 to"),
    ],
)
def test_the_demo_refuses_arguments_it_cannot_stream_with_naming_them(arguments, named):
    """Before this, a negative count waited for ever for senders it never
    started, and a size of 0 ended in a division by zero."""
    result = subprocess.run(
        [sys.executable, "-m", "iouzcrx", "demo", *arguments],
        cwd=TESTS,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    assert "Traceback" not in result.stderr
