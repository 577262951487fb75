"""What one short connection costs a receiver, in counts rather than time:
system calls per connection (strace -c) and user-space instructions per
connection (valgrind's callgrind).

    python benchmarks/connections.py [--receivers NAME,...] [--connections N1,N2]
                                     [--instructions N1,N2] [--json PATH]

Each receiver serves the suite's ``short`` scenario (connect, send 64 KiB,
close; one connection at a time from the C sender) twice, with N1 and then
N2 connections, and every figure is the difference divided by N2 - N1, so
start-up and teardown cancel out. Both counts are deterministic enough to
compare before and after a change on a machine whose wall clock is shared.
The instruction counts run the receiver under callgrind, about fifty times
slower: keep their N small. A receiver that copies the data in user
space (a stock ``Protocol``'s ``bytes``) counts that copy too: about 65k
instructions of memcpy per 64 KiB connection. Receivers are named as in benchmarks/suite.py
(``c-epoll``, ``uvloop-protocol``, ``iouzcrx-bufring-zerocopy-uvloop``...).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
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

DEFAULT_RECEIVERS = "c-epoll,uvloop-protocol,iouzcrx-bufring-zerocopy-uvloop"
BYTES_PER_CONNECTION = 64 << 10


def short(connections: int) -> Scenario:
    return Scenario("short", "short", "short connections", connections, BYTES_PER_CONNECTION)


def syscall_counts(path: Path) -> dict[str, int]:
    """strace -c's table: calls per system call."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def syscalls_per_connection(
    name: str, programs: dict[str, Path], pair: tuple[int, int], work: Path
) -> dict[str, float]:
    tables = []
    for n in pair:
        out = work / f"strace-{name}-{n}"
        run_wrapped(name, programs, short(n), ["strace", "-c", "-f", "-o", str(out)])
        tables.append(syscall_counts(out))
    low, high = tables
    span = pair[1] - pair[0]
    each = {k: (high.get(k, 0) - low.get(k, 0)) / span for k in set(low) | set(high)}
    return dict(
        sorted(((k, round(v, 2)) for k, v in each.items() if v >= 0.05), key=lambda kv: -kv[1])
    )


def instructions_per_connection(
    name: str, programs: dict[str, Path], pair: tuple[int, int], work: Path
) -> float:
    totals = [
        callgrind_instructions(name, programs, short(n), work / f"callgrind-{name}-{n}")
        for n in pair
    ]
    return (totals[1] - totals[0]) / (pair[1] - pair[0])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", default=DEFAULT_RECEIVERS, help="comma-separated names")
    parser.add_argument("--connections", type=pair_of, default=(500, 2000), help="N1,N2 for strace")
    parser.add_argument(
        "--instructions",
        type=pair_of,
        default=None,
        help="N1,N2 for callgrind (e.g. 300,900); omitted: no instruction counts",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    for tool in ["strace"] + (["valgrind"] if args.instructions else []):
        if shutil.which(tool) is None:
            raise SystemExit(f"connections.py needs {tool} (apt-get install {tool})")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="iouzcrx-conns-") as tmp:
        work = Path(tmp)
        programs = compile_programs(work)
        for name in args.receivers.split(","):
            row: dict[str, Any] = {
                "syscalls": syscalls_per_connection(name, programs, args.connections, work)
            }
            row["syscalls_total"] = round(sum(row["syscalls"].values()), 1)
            if args.instructions:
                row["instructions"] = round(
                    instructions_per_connection(name, programs, args.instructions, work)
                )
            results[name] = row
            calls = ", ".join(f"{k} {v:g}" for k, v in row["syscalls"].items())
            extra = f"; {row['instructions']} instructions" if "instructions" in row else ""
            print(f"{name}: {row['syscalls_total']:g} syscalls ({calls}){extra}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
