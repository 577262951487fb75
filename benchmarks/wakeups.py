"""What the way a receiver learns of a request costs, with no Python in the
picture: ``benchmarks/c/rr_wakeups.c`` serves the suite's ``rr`` scenario
three ways, and the Python receivers named with ``--receivers`` run beside
them in the same rounds.

    python benchmarks/wakeups.py [--repeat K] [--request-size BYTES]
                                 [--receivers NAME,...] [--json PATH]

- ``c-epoll-recv``: epoll_wait on the socket, then recv(), as uvloop does;
- ``c-ring``: a multishot RECV from a buffer ring on an io_uring without
  DEFER_TASKRUN, epoll_wait on the ring's fd, as iouzcrx's bufring mode does;
- ``c-epoll-ring-recv``: epoll_wait on the socket, then a one-shot RECV from
  the buffer ring that io_uring_enter issues and completes at once.

Each figure is the median over ``--repeat`` rounds (p50 latency from the C
sender, receiver CPU per request), and its ratio to ``c-epoll-recv`` in the
same round. If ``c-ring`` is as far behind ``c-epoll-recv`` as iouzcrx is
behind uvloop, what separates those is the kernel's receive path, not the
library.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite import (  # noqa: E402  (a script beside suite.py, not a package)
    Scenario,
    compile_programs,
    figures_of,
    receiver_command,
    run_one,
)

WAYS = ("epoll-recv", "ring", "epoll-ring-recv")
DEFAULT_RECEIVERS = "uvloop-protocol,iouzcrx-bufring-protocol-uvloop"


def rr(request_size: int, requests: int) -> Scenario:
    return Scenario(
        f"rr{request_size}", "rr", "request/response", request_size=request_size, requests=requests
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--request-size", type=int, default=1024, help="bytes (default 1024)")
    parser.add_argument("--requests", type=int, default=20000, help="per run (default 20000)")
    parser.add_argument(
        "--receivers", default=DEFAULT_RECEIVERS, help="Python receivers to run beside the C ones"
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    sc = rr(args.request_size, args.requests)
    names = [f"c-{way}" for way in WAYS] + [n for n in args.receivers.split(",") if n]
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="iouzcrx-wakeups-") as build:
        programs = compile_programs(Path(build))
        for rep in range(args.repeat):
            for name in names:
                if name.startswith("c-"):
                    # receiver_command's options, for a receiver of its own.
                    options = receiver_command("c-recv", programs, sc)[1:]
                    command = [str(programs["rr_wakeups"]), "--wait", name[2:], *options]
                    raw = run_one(name, programs, sc, timeout=300, command=command)
                else:
                    raw = run_one(name, programs, sc, timeout=300)
                fig = figures_of(sc, raw)
                figures[name].append(fig)
                print(
                    f"round {rep + 1}/{args.repeat} {name}: p50 {fig['p50_us']:.1f} us, "
                    f"CPU {fig['recv_cpu_us_per_request']:.1f} us/request",
                    file=sys.stderr,
                    flush=True,
                )
    rows = table(figures, names)
    print(
        f"{sc.request_size} B requests, {args.repeat} rounds; ratios to c-epoll-recv "
        "in the same round (above 1: slower or costlier)\n"
    )
    print("| receiver | p50 latency µs | vs c-epoll-recv | CPU µs/request | vs c-epoll-recv |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['receiver']} | {row['p50_us']:.1f} | {row['p50_ratio']:.2f} | "
            f"{row['cpu_us']:.1f} | {row['cpu_ratio']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"request_size": sc.request_size, "rows": rows}, indent=1))
    return 0


def table(figures: dict[str, list[dict[str, float]]], names: list[str]) -> list[dict[str, Any]]:
    base = figures["c-epoll-recv"]

    def ratios(name: str, key: str) -> float:
        return statistics.median(f[key] / b[key] for f, b in zip(figures[name], base, strict=True))

    return [
        {
            "receiver": name,
            "p50_us": statistics.median(f["p50_us"] for f in figures[name]),
            "p50_ratio": ratios(name, "p50_us"),
            "cpu_us": statistics.median(f["recv_cpu_us_per_request"] for f in figures[name]),
            "cpu_ratio": ratios(name, "recv_cpu_us_per_request"),
        }
        for name in names
    ]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
