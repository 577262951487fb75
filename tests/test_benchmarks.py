"""The benchmark suite's quick run, as a smoke test: every receiver this
machine can run serves every scenario with every byte accounted for, and the
report files are written. No figure is judged here (speed is the suite's
business, never a test's)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iouzcrx._probe import kernel_features

REPO = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, timeout: float) -> str:
    """Run benchmarks/``script`` with ``args``; its standard output, once it
    exited with 0."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def run_suite(tmp_path: Path, *args: str) -> dict:
    stdout = run_script(
        "suite.py", "--quick", "--output", str(tmp_path), "--name", "smoke", *args, timeout=900
    )
    if "--stdout" in args:
        return json.loads(stdout.splitlines()[-1])
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / f"smoke{suffix}").stat().st_size > 0
    return json.loads((tmp_path / "smoke.json").read_text())


def listed_receivers() -> list[str]:
    return json.loads(run_script("receivers.py", "--list", timeout=120))["receivers"]


@pytest.mark.skipif(bool(os.environ.get("IOUZCRX_VM")), reason="the host run")
@pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is None,
    reason="the suite's receivers include uvloop ones; uvloop is not installed for this Python",
)
def test_quick_suite_on_the_host(tmp_path: Path) -> None:
    results = run_suite(tmp_path)
    assert results["failures"] == []
    expected = set(listed_receivers()) | {"c-recv"}
    assert {s["name"] for s in results["scenarios"]} == {
        "bulk1",
        "bulk8",
        "bulk64",
        "rr1k",
        "rr16k",
        "short",
    }
    for scenario, runs in results["runs"].items():
        # The one-thread C receiver has nothing to add on one connection.
        one_thread = set() if scenario.startswith("rr") else {"c-epoll"}
        assert set(runs) == expected | one_thread, scenario
    # The RECV_ZC receiver needs copy mode, which this kernel may lack.
    if "c-recv-zc" not in results["unavailable"]:
        assert all("c-recv-zc" in runs for runs in results["runs"].values())
    assert "c-recv" not in results["unavailable"]
    assert "c-epoll" not in results["unavailable"]
    counts = results["instructions"]
    assert "rows" in counts, counts
    assert {row["mode"] for row in counts["rows"]} >= {"bufring", "socket", "stock"}
    for row in counts["rows"]:
        assert row["instructions_per_chunk_process"] > 0
        if row["mode"] != "stock":  # the library's share is measured for iouzcrx only
            assert row["instructions_per_chunk_library"] > 0
    table = (tmp_path / "smoke.md").read_text()
    for name in expected | {"c-epoll"}:
        assert f"| {name} |" in table


@pytest.mark.vm
def test_quick_suite_in_copy_mode(tmp_path: Path) -> None:
    if not kernel_features().zcrx_nodev:
        pytest.skip("RECV_ZC copy mode needs Linux >= 7.1 (run by tests/vm/run)")
    # JSON on stdout: the report and chart are the host's job (matplotlib's
    # first start is slow under emulation).
    results = run_suite(
        tmp_path,
        "--in-vm",
        "--stdout",
        "--scenarios",
        "bulk1,bulk8",
        "--receivers",
        "c-recv-zc,c-recv,iouzcrx-copy-zerocopy-*",
        "--no-instructions",
    )
    assert results["failures"] == [] and results["unavailable"] == {}
    for runs in results["runs"].values():
        assert set(runs) == {
            "c-recv-zc",
            "c-recv",
            "iouzcrx-copy-zerocopy-asyncio",
            "iouzcrx-copy-zerocopy-uvloop",
        }


def run_scaling(tmp_path: Path) -> dict:
    run_script(
        "scaling.py",
        "--workers", "1,2", "--connections", "32", "--mib", "64", "--repeat", "1",
        "--output", str(tmp_path), "--name", "scaling",
        timeout=600,
    )  # fmt: skip
    return json.loads((tmp_path / "scaling.json").read_text())


@pytest.mark.skipif(
    importlib.util.find_spec("uvloop") is None,
    reason="the scaling run sets uvloop farms beside iouzcrx's; uvloop is not installed here",
)
def test_scaling_runs_every_farm_with_every_byte_counted(tmp_path: Path) -> None:
    # Every farm at 1 and 2 workers receives what the sender sent (the
    # script checks the byte count and fails the run otherwise); with 32
    # connections over 2 SO_REUSEPORT listeners both workers serve some.
    results = run_scaling(tmp_path)
    assert results["failures"] == []
    assert set(results["runs"]) == {"1", "2"}
    for n, farms in results["runs"].items():
        assert set(farms) == {
            "iouzcrx-zerocopy",
            "iouzcrx-streams",
            "uvloop-protocol",
            "uvloop-buffered",
        }
        for figures in farms.values():
            assert figures["workers_used"] == int(n)
            assert figures["gbps"] > 0 and figures["cpu_s_per_gb"] > 0
            if results["mode"] != "zerocopy":
                assert figures["zero_copy_share"] == 0.0
    table = (tmp_path / "scaling.md").read_text()
    assert "| 2 | iouzcrx-zerocopy |" in table and "vs uvloop-protocol" in table


@pytest.mark.skipif(bool(os.environ.get("IOUZCRX_VM")), reason="the host run")
@pytest.mark.skipif(
    shutil.which("perf") is None, reason="perf is not installed (apt-get install linux-perf)"
)
@pytest.mark.parametrize("reading", ["0", "auto"], ids=["ring", "moves-to-readiness"])
def test_request_costs_show_where_each_receiver_gets_its_data(
    tmp_path: Path, reading: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The stock loop receives each request with a recv(2). On the ring
    # (IOUZCRX_READINESS=0) the bufring receiver calls neither recv nor
    # io_uring_enter: the kernel completes its receive as the data arrives,
    # and the drain reaps it from memory. What it does call is the loop's
    # wait (twice where the kernel's work interrupts a sleeping wait) and
    # the send of the answer. By default the connection moves to reading
    # by readiness after its first answers: one recv per request, as the
    # stock loop, and still no io_uring_enter.
    monkeypatch.setenv("IOUZCRX_READINESS", reading)
    out = tmp_path / "requests.json"
    stock, ours = "asyncio-protocol", "iouzcrx-bufring-protocol-asyncio"
    run_script(
        "requests.py",
        "--receivers",
        f"{stock},{ours}",
        "--requests",
        "200,2000",
        "--repeat",
        "1",
        "--json",
        str(out),
        timeout=600,
    )
    results = json.loads(out.read_text())
    assert results[stock]["syscalls"]["recvfrom"] >= 0.9
    assert "io_uring_enter" not in results[stock]["syscalls"]
    calls = results[ours]["syscalls"]
    assert calls.get("io_uring_enter", 0) < 0.1, calls
    if reading == "0":
        assert calls.get("recvfrom", 0) < 0.1, calls
    else:
        assert 0.9 <= calls.get("recvfrom", 0) < 1.1, calls
    recvs = calls.get("recvfrom", 0)
    assert calls["all"] - calls.get("epoll_wait", 0) - calls["sendto"] - recvs < 0.1, calls
    for row in results.values():
        assert row["syscalls"]["sendto"] >= 0.9  # each answer is sent at once
        assert row["kernel_symbols_us"]  # the profile was read


@pytest.mark.skipif(bool(os.environ.get("IOUZCRX_VM")), reason="the host run")
def test_each_way_of_waking_for_a_request_answers_every_request(tmp_path: Path) -> None:
    # run_one fails a run unless every request byte arrived and the sender
    # got every answer, so three rows mean three working receivers.
    out = tmp_path / "wakeups.json"
    run_script(
        "wakeups.py",
        "--repeat",
        "1",
        "--requests",
        "500",
        "--receivers",
        "",
        "--json",
        str(out),
        timeout=300,
    )
    rows = json.loads(out.read_text())["rows"]
    assert [row["receiver"] for row in rows] == ["c-epoll-recv", "c-ring", "c-epoll-ring-recv"]
    assert all(row["p50_us"] > 0 and row["cpu_us"] >= 0 for row in rows)
    assert rows[0]["p50_ratio"] == 1.0


@pytest.mark.skipif(bool(os.environ.get("IOUZCRX_VM")), reason="the host run")
@pytest.mark.skipif(
    shutil.which("perf") is None, reason="perf is not installed (apt-get install linux-perf)"
)
def test_a_scenario_profile_puts_each_receiver_s_cpu_where_its_code_is(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    stock, ours = "asyncio-protocol", "iouzcrx-bufring-protocol-asyncio"
    printed = run_script(
        "cpu_profile.py",
        "--scenario",
        "short",
        "--receivers",
        f"{stock},{ours}",
        "--repeat",
        "1",
        "--json",
        str(out),
        timeout=600,
    )
    assert "µs per connection" in printed
    results = json.loads(out.read_text())
    assert results["scenario"] == "short" and results["unit"] == "connection"
    for name in (stock, ours):
        groups = results[name]["groups"]
        assert sum(groups.values()) > 0 and groups.get("user: Python", 0) > 0, groups
        assert results[name]["symbols"]
    # The library's modules are found as such, and where they run: the
    # stock receiver only imports them (its start-up is taken out, up to
    # sampling noise).
    library = results[ours]["groups"].get("user: iouzcrx", 0)
    assert library > 0.5, results[ours]["groups"]
    assert abs(results[stock]["groups"].get("user: iouzcrx", 0)) < library / 10
