"""Where a receiver's CPU goes in one of the suite's scenarios, beside the
receiver it is held against: the profile behind a target's ratio.

    python benchmarks/cpu_profile.py --scenario bulk1 \\
        --receivers uvloop-protocol,iouzcrx-bufring-protocol-uvloop [--repeat K]
        [--symbols N] [--json PATH]

Each receiver serves the scenario under ``perf record`` (kernel and user,
the receiver process only) twice, at full size and at a quarter of it, and
every figure is the difference divided by the difference in units, so that
start-up and teardown (imports, faulting the area in) cancel out. The
receivers run interleaved, ``--repeat`` times.
Its samples are grouped the way ``requests.py`` groups them (io_uring,
epoll, TCP/IP, scheduler... in the kernel; Python, uvloop, iouzcrx, libc in
user space) and given per unit of the scenario: per GB for bulk, per
request for request/response, per connection for short connections. Every
figure is the median over the runs. The first receiver named is the
reference: every other one is listed with its difference to it, group by
group and for the symbols that differ most, so the gap in a target's ratio
reads as the functions it is spent in. Needs ``perf`` (Debian:
``apt-get install linux-perf``) and the right to trace (root, or
``kernel.perf_event_paranoid`` <= -1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from requests import (  # noqa: E402  (scripts beside each other)
    SAMPLE_HZ,
    group_of,
    medians,
    symbol_samples,
)
from suite import Scenario, compile_programs, run_wrapped, scenarios  # noqa: E402


def units_of(sc: Scenario) -> tuple[float, str]:
    """How many units one run of ``sc`` serves, and the unit's name."""
    if sc.kind == "rr":
        return sc.requests + sc.warmup, "request"
    if sc.kind == "short":
        return sc.connections, "connection"
    return sc.expect_bytes / 1e9, "GB"


def quarter_of(sc: Scenario) -> Scenario:
    """``sc`` with a quarter of its requests, connections or bytes."""
    if sc.kind == "rr":
        return dataclasses.replace(sc, requests=sc.requests // 4)
    if sc.kind == "short":
        return dataclasses.replace(sc, connections=sc.connections // 4)
    return dataclasses.replace(sc, bytes_per_connection=sc.bytes_per_connection // 4)


def profile_once(name: str, programs: dict[str, Path], sc: Scenario, work: Path) -> dict[str, Any]:
    """Two runs of ``name`` under perf (a quarter and all of ``sc``): CPU µs
    per unit, by group and by symbol."""
    samples = []
    for size in (quarter_of(sc), sc):
        record = work / f"record-{name}"
        run_wrapped(
            name, programs, size, ["perf", "record", "-q", "-F", str(SAMPLE_HZ), "-o", str(record)]
        )
        samples.append(symbol_samples(record))
    scale = 1e6 / SAMPLE_HZ / (units_of(sc)[0] - units_of(quarter_of(sc))[0])
    by_symbol: dict[str, float] = {}
    by_group: dict[str, float] = {}
    for dso, sym in set(samples[0]) | set(samples[1]):
        cost = (samples[1].get((dso, sym), 0) - samples[0].get((dso, sym), 0)) * scale
        by_symbol[f"{dso} {sym}"] = cost
        group = group_of(dso, sym)
        by_group[group] = by_group.get(group, 0.0) + cost
    return {"groups": by_group, "symbols": by_symbol}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", required=True, help="a suite scenario: bulk1, rr1k, short...")
    parser.add_argument(
        "--receivers", required=True, help="comma-separated names; the first is the reference"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per receiver; figures are medians"
    )
    parser.add_argument("--symbols", type=int, default=12, help="symbols to list per receiver")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    by_name = {sc.name: sc for sc in scenarios(quick=False, vm=False)}
    if args.scenario not in by_name:
        parser.error(f"--scenario must be one of {', '.join(by_name)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if shutil.which("perf") is None:
        raise SystemExit("cpu_profile.py needs perf (Debian: apt-get install linux-perf)")
    sc = by_name[args.scenario]
    _, unit = units_of(sc)
    names = args.receivers.split(",")
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="iouzcrx-profile-") as tmp:
        programs = compile_programs(Path(tmp))
        # Interleaved, as the suite runs, so a slow spell falls on all of them.
        for _ in range(args.repeat):
            for name in names:
                runs[name].append(profile_once(name, programs, sc, Path(tmp)))
    results = {
        name: {
            "groups": medians([run["groups"] for run in rows]),
            "symbols": medians([run["symbols"] for run in rows]),
        }
        for name, rows in runs.items()
    }
    reference = results[names[0]]
    print(f"{sc.name}: receiver CPU in µs per {unit}, medians of {args.repeat} runs")
    for name in names:
        row = results[name]
        total = sum(row["groups"].values())
        print(f"\n{name}: {total:.3g} µs/{unit}")
        for group, value in row["groups"].items():
            delta = value - reference["groups"].get(group, 0.0)
            shown = f"  ({delta:+.3g} vs {names[0]})" if name != names[0] else ""
            print(f"  {group:<40} {value:8.3g}{shown}")
        if name == names[0]:
            listed = list(row["symbols"].items())[: args.symbols]
            print("  top symbols:")
        else:
            # The symbols whose cost differs most from the reference's.
            keys = set(row["symbols"]) | set(reference["symbols"])
            deltas = {
                k: row["symbols"].get(k, 0.0) - reference["symbols"].get(k, 0.0) for k in keys
            }
            listed = sorted(deltas.items(), key=lambda kv: -abs(kv[1]))[: args.symbols]
            print(f"  symbols that differ most from {names[0]} (difference):")
        for symbol, value in listed:
            print(f"    {value:+8.3g}  {symbol}")
    if args.json:
        args.json.write_text(
            json.dumps({"scenario": sc.name, "unit": unit, **results}, indent=1) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
