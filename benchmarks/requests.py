"""What one request/response costs a receiver, split the way a profile
splits it: system calls per request, and CPU per request by where it is
spent (io_uring, eventfd, epoll, TCP/IP, scheduler, user space).

    python benchmarks/requests.py [--receivers NAME,...] [--request-size BYTES]
                                  [--requests N1,N2] [--repeat K] [--json PATH]
                                  [--instructions N1,N2]

Each receiver serves the suite's ``rr`` scenario (the C sender's request,
the receiver's 64-byte response, one at a time) twice, with N1 and then N2
requests, and every figure is the difference divided by N2 - N1, so start-up
and teardown cancel out. System calls are counted with ``perf stat`` on the
syscall tracepoints: unlike strace it does not slow the receiver, which would
change how requests batch (a slowed receiver finds the next request already
waiting and skips the sleep). CPU comes from ``perf record`` samples of the
receiver, kernel and user, grouped by symbol. Every figure is the median of
``--repeat`` runs, the receivers interleaved: a profile of one run moves by
a fifth where the machine is shared. ``--instructions N1,N2`` adds user-space instructions per
request (valgrind's callgrind, about fifty times slower: keep N small),
which do not move with the load at all. Receivers are named as in
benchmarks/suite.py (``uvloop-protocol``, ``iouzcrx-bufring-protocol-uvloop``...).
Needs ``perf`` (Debian: ``apt-get install linux-perf``) and the right to
trace (root, or ``kernel.perf_event_paranoid`` <= -1).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import (  # noqa: E402  (a script beside suite.py, not a package)
    Scenario,
    callgrind_instructions,
    compile_programs,
    pair_of,
    run_wrapped,
)

DEFAULT_RECEIVERS = ",".join(
    [
        "uvloop-protocol",
        "iouzcrx-bufring-protocol-uvloop",
        "uvloop-buffered",
        "iouzcrx-bufring-buffered-uvloop",
    ]
)
SAMPLE_HZ = 4999
SYSCALLS = ("epoll_pwait", "epoll_wait", "read", "write", "io_uring_enter", "sendto", "recvfrom")

# Kernel symbols by where their time goes, first match wins. Lock releases
# are mostly the wake-ups they end (a socket's or an eventfd's waiters);
# io_uring's signalling of its eventfd counts as eventfd.
KERNEL_GROUPS = [
    ("eventfd", re.compile(r"eventfd")),
    ("io_uring", re.compile(r"^_*io_|io_uring|^llist_reverse_order$|^xas?_load$|^xas_start$")),
    ("epoll", re.compile(r"^_*ep_|epoll|^tcp_poll$|^sock_poll$")),
    ("locks and wake-ups", re.compile(r"^_raw_spin|wake_up|^try_to_wake")),
    ("scheduler", re.compile(r"sched|task_switch|^switch_|^pick_|enqueue|dequeue|update_curr")),
    (
        "syscall entry/exit, fd lookup",
        re.compile(
            r"^do_syscall|^entry_SYSCALL|syscall_exit|exit_to_user|^__x64_sys_|rseq|"
            r"^fdget|^fget|^fput|^vfs_|^ksys_|^rw_verify_area$|^blkcg_maybe_throttle_current$"
        ),
    ),
    (
        "TCP/IP",
        re.compile(
            r"^_*(tcp|ip|inet|sk|sock|skb|net|dev|eth|bbr|kfree_skb|loopback|napi|__sys_send|"
            r"__sys_recv|_copy_(to|from)_iter|import_ubuf|__check_object_size|__virt_addr_valid)"
        ),
    ),
]


def rr(requests: int, request_size: int) -> Scenario:
    return Scenario(
        "rr", "rr", "request/response", request_size=request_size, requests=requests, warmup=100
    )


def perf_stat_counts(path: Path) -> dict[str, int]:
    """perf stat -x, output: count per syscall name."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_"):
            value = fields[0]
            counts[fields[2].removeprefix("syscalls:sys_enter_")] = (
                int(value) if value.isdigit() else 0
            )
        elif len(fields) > 2 and fields[2] == "raw_syscalls:sys_enter" and fields[0].isdigit():
            counts["all"] = int(fields[0])
    return counts


def group_of(dso: str, symbol: str) -> str:
    if dso == "[kernel.kallsyms]":
        for group, pattern in KERNEL_GROUPS:
            if pattern.search(symbol):
                return "kernel: " + group
        return "kernel: other"
    if IOUZCRX_MODULE.match(dso):
        return "user: iouzcrx"
    if dso.startswith("loop.cpython"):
        return "user: uvloop"
    if "libpython" in dso or dso.startswith("python") or ".cpython-" in dso:
        return "user: Python"  # the interpreter and its own extension modules
    if dso.startswith("libc"):
        return "user: libc"
    return "user: other"


IOUZCRX_MODULE = re.compile(
    r"_(area|bufring|probe|reader|readiness|receive|ring|socket_pool|transport|zcrx)\.cpython-"
)
SAMPLE_LINE = re.compile(r"^\s*[\d.]+%\s+(\d+)\s+(\S+)\s+\[(.)\]\s+(\S+)")


def symbol_samples(record: Path) -> dict[tuple[str, str], int]:
    """perf report of ``record``: samples per (dso, symbol)."""
    report = subprocess.run(
        ["perf", "report", "-i", str(record), "--stdio", "-n", "-g", "none"]
        + ["--no-children", "--sort", "dso,sym"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    samples: dict[tuple[str, str], int] = {}
    for line in report.splitlines():
        match = SAMPLE_LINE.match(line)
        if match is not None:
            key = (match[2], match[4])
            samples[key] = samples.get(key, 0) + int(match[1])
    return samples


def samples_by_group(record: Path) -> tuple[dict[str, int], dict[str, int]]:
    """perf report of ``record``: samples per group and per kernel symbol."""
    groups: dict[str, int] = {}
    kernel: dict[str, int] = {}
    for (dso, symbol), samples in symbol_samples(record).items():
        group = group_of(dso, symbol)
        groups[group] = groups.get(group, 0) + samples
        if dso == "[kernel.kallsyms]":
            kernel[symbol] = kernel.get(symbol, 0) + samples
    return groups, kernel


def per_request(
    low: dict[str, int], high: dict[str, int], span: int, scale: float
) -> dict[str, float]:
    return {k: (high.get(k, 0) - low.get(k, 0)) * scale / span for k in set(low) | set(high)}


def measure(
    name: str, programs: dict[str, Path], pair: tuple[int, int], size: int, work: Path
) -> dict[str, Any]:
    events = ",".join(
        ["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{call}" for call in SYSCALLS]
    )
    counts, groups, symbols = [], [], []
    for n in pair:
        sc = rr(n, size)
        stat = work / f"stat-{name}-{n}"
        run_wrapped(name, programs, sc, ["perf", "stat", "-x,", "-o", str(stat), "-e", events])
        counts.append(perf_stat_counts(stat))
        record = work / f"record-{name}-{n}"
        run_wrapped(
            name, programs, sc, ["perf", "record", "-q", "-F", str(SAMPLE_HZ), "-o", str(record)]
        )
        by_group, by_symbol = samples_by_group(record)
        groups.append(by_group)
        symbols.append(by_symbol)
    span = pair[1] - pair[0]
    us = 1e6 / SAMPLE_HZ
    return {
        "syscalls": per_request(*counts, span, 1),
        "cpu_us": per_request(*groups, span, us),
        "kernel_symbols_us": per_request(*symbols, span, us),
    }


def instructions_per_request(
    name: str, programs: dict[str, Path], pair: tuple[int, int], size: int, work: Path
) -> float:
    """User-space instructions per request (callgrind), which do not move
    with the machine's load as time does."""
    totals = [
        callgrind_instructions(name, programs, rr(n, size), work / f"callgrind-{name}-{n}")
        for n in pair
    ]
    return (totals[1] - totals[0]) / (pair[1] - pair[0])


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    """The name-by-name median of ``rows`` (a name a row lacks counts 0 there),
    largest first."""
    names = {name for row in rows for name in row}
    middle = {n: statistics.median(row.get(n, 0.0) for row in rows) for n in names}
    return dict(sorted(middle.items(), key=lambda kv: -kv[1]))


def median_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The figure-by-figure median of ``measure``'s rows."""

    def median(key: str, digits: int, floor: float) -> dict[str, float]:
        middle = medians([row[key] for row in rows])
        return {n: round(v, digits) for n, v in middle.items() if v >= floor}

    cpu = median("cpu_us", 2, 0.05)
    return {
        "syscalls": median("syscalls", 2, 0.01),
        "cpu_us": cpu,
        "cpu_us_total": round(sum(cpu.values()), 1),
        "kernel_symbols_us": dict(list(median("kernel_symbols_us", 3, 0.0).items())[:25]),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", default=DEFAULT_RECEIVERS, help="comma-separated names")
    parser.add_argument("--requests", type=pair_of, default=(2000, 22000), help="N1,N2")
    parser.add_argument("--request-size", type=int, default=1024, help="bytes per request")
    parser.add_argument(
        "--instructions",
        type=pair_of,
        default=None,
        help="N1,N2 for callgrind (e.g. 200,600); omitted: no instruction counts",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per receiver; figures are medians"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    for tool, package in [("perf", "linux-perf")] + (
        [("valgrind", "valgrind")] if args.instructions else []
    ):
        if shutil.which(tool) is None:
            raise SystemExit(f"requests.py needs {tool} (Debian: apt-get install {package})")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="iouzcrx-requests-") as tmp:
        work = Path(tmp)
        programs = compile_programs(work)
        names = args.receivers.split(",")
        # Interleaved (A B A B ...), as the suite runs: a slow spell of a
        # shared machine then falls on every receiver, not on one.
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for _ in range(args.repeat):
            for name in names:
                runs[name].append(measure(name, programs, args.requests, args.request_size, work))
        for name in names:
            row = results[name] = median_of(runs[name])
            if args.instructions:
                row["instructions"] = round(
                    instructions_per_request(
                        name, programs, args.instructions, args.request_size, work
                    )
                )
            calls = ", ".join(f"{k} {v:g}" for k, v in row["syscalls"].items() if k != "all")
            cpu = ", ".join(f"{k} {v:g}" for k, v in row["cpu_us"].items())
            extra = f"; {row['instructions']} instructions" if "instructions" in row else ""
            print(
                f"{name}: {row['syscalls'].get('all', 0):g} syscalls/request ({calls}); "
                f"{row['cpu_us_total']:g} us CPU/request ({cpu}){extra}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
