"""Small chunks in bufring mode: threshold copy against incremental buffer rings.

    python benchmarks/small_chunks.py [--quick] [--repeat N] [--output DIR]

Many connections (64 by default) each send small messages (100-500 bytes, one
``send()`` each, Nagle off; the C sender's ``--message-size``). The receivers
run interleaved, ``--repeat`` times each (default 3, 1 with ``--quick``):

- ``uvloop-protocol`` and ``uvloop-buffered``: uvloop's own, as in the suite;
- ``iouzcrx-{zerocopy,buffered}-{copy,incremental}``: a
  ``create_zcrx_server`` in bufring mode on uvloop, with the classic buffer
  ring (a chunk under an eighth of a buffer is copied out and its buffer
  returned at once; ``IOUZCRX_BUFRING_INCREMENTAL=0``) or the incremental one
  (the kernel fills each buffer with many chunks, each delivered as a view
  over its part; ``IOUZCRX_BUFRING_INCREMENTAL=1``).

Figures: throughput, receiver CPU per GB, bytes per delivered chunk and, for
iouzcrx, ``peak_buffers_in_use``: the most buffers out of the kernel's ring
at once (the area's high-water mark), and ``buffers_recycled``: how many
times a buffer went back to the ring (once per chunk with the classic ring,
once per filled buffer with the incremental one). ``--pause-us`` sets the
sender's pause after each message (default the scenario's 100 us; 0 floods,
and the receiver then reads many messages at once). Medians with min and max, as a table on
stdout and JSON in ``DIR/small_chunks.json`` when ``--output`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import suite  # noqa: E402

RING_KINDS = {"copy": "0", "incremental": "1"}
IOUZCRX_APIS = ("zerocopy", "buffered")
STOCK = ("uvloop-protocol", "uvloop-buffered")


def receiver_names() -> list[str]:
    names = list(STOCK)
    for api in IOUZCRX_APIS:
        names += [f"iouzcrx-{api}-{kind}" for kind in RING_KINDS]
    return names


def command(name: str, sc: suite.Scenario) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if name in STOCK:
        base = [sys.executable, str(HERE / "receivers.py"), name]
    else:
        _, api, kind = name.split("-")
        env["IOUZCRX_BUFRING_INCREMENTAL"] = RING_KINDS[kind]
        base = [sys.executable, str(Path(__file__).resolve()), "--serve", api]
    args = ["--scenario", "bulk", "--connections", str(sc.connections)]
    return base + args + ["--expect-bytes", str(sc.expect_bytes)], env


def run_one(name: str, programs: dict[str, Path], sc: suite.Scenario) -> dict[str, Any]:
    cmd, env = command(name, sc)
    raw = suite.run_one(name, programs, sc, timeout=300, command=cmd, env=env)
    fig = suite.figures_of(sc, raw)
    for key in ("peak_buffers_in_use", "total_buffers", "buffers_recycled"):
        if key in raw["receiver"]:
            fig[key] = raw["receiver"][key]
    return fig


# -- the iouzcrx receiver, in its own process -------------------------------------


async def serve(api: str, argv: list[str]) -> dict[str, Any]:
    import receivers

    import iouzcrx

    loop = asyncio.get_running_loop()
    args = receivers.parse_args([f"iouzcrx-bufring-{api}-uvloop", *argv])
    figures = receivers.Figures(args, loop)

    def factory() -> asyncio.BaseProtocol:
        if api == "zerocopy":
            return receivers.CountingZeroCopyProtocol(figures, args)
        return receivers.CountingBufferedProtocol(figures, args, False)

    server = await iouzcrx.create_zcrx_server(
        factory, "127.0.0.1", 0, loop=loop, mode="bufring", backlog=4096
    )
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await figures.done
    backend = server.stats()["backend"]
    server.close()
    if not backend.get("incremental") and os.environ["IOUZCRX_BUFRING_INCREMENTAL"] == "1":
        raise SystemExit("the kernel refused an incremental buffer ring (Linux 6.12+)")
    return figures.result | {
        "peak_buffers_in_use": backend["peak_buffers_in_use"],
        "total_buffers": backend["total_buffers"],
        "buffers_recycled": backend["buffers_returned"],
    }


def serve_main(api: str, argv: list[str]) -> int:
    import iouzcrx

    loop = iouzcrx.new_event_loop(use_uvloop=True)
    try:
        result = loop.run_until_complete(serve(api, argv))
    finally:
        loop.close()
    print(json.dumps(result), flush=True)
    return 0


# -- the comparison ------------------------------------------------------------------


def table(runs: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| receiver | GB/s | recv CPU s/GB | bytes/chunk | peak buffers in use "
        "| buffers recycled |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def cell(fig: dict[str, dict[str, float]], key: str, fmt: str) -> str:
        if key not in fig:
            return "-"
        s = fig[key]
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    for name, fig in runs.items():
        peak = cell(fig, "peak_buffers_in_use", ".0f")
        if "total_buffers" in fig:
            peak += f" of {fig['total_buffers']['median']:.0f}"
        lines.append(
            f"| {name} | {cell(fig, 'gbps', '.3f')} | {cell(fig, 'recv_cpu_s_per_gb', '.2f')}"
            f" | {cell(fig, 'bytes_per_chunk', '.0f')} | {peak}"
            f" | {cell(fig, 'buffers_recycled', '.0f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:
        return serve_main(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a sixteenth of the data, one run")
    parser.add_argument("--repeat", type=int, default=0, help="runs per receiver (default 3)")
    parser.add_argument("--receivers", help="comma-separated names (default all)")
    parser.add_argument("--output", type=Path, help="directory for small_chunks.json")
    parser.add_argument("--pause-us", type=int, help="the sender's pause after each message")
    args = parser.parse_args(argv)
    (sc,) = [s for s in suite.extra_scenarios(args.quick, False) if s.name == "small64"]
    if args.pause_us is not None:
        title = f"64 connections of 100-500 B messages, {args.pause_us} us apart"
        sc = dataclasses.replace(sc, message_pause_us=args.pause_us, title=title)
    names = args.receivers.split(",") if args.receivers else receiver_names()
    unknown = set(names) - set(receiver_names())
    if unknown:
        parser.error(f"unknown receivers {sorted(unknown)}; known: {receiver_names()}")
    repeat = args.repeat or (1 if args.quick else 3)
    figs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory(prefix="iouzcrx-small-") as build:
        programs = suite.compile_programs(Path(build))
        for rep in range(repeat):
            for name in names:
                fig = run_one(name, programs, sc)
                figs[name].append(fig)
                suite.log(f"{rep + 1}/{repeat} {name}: {suite.headline(sc, fig)}")
    runs = {
        name: {key: suite.summarise([f[key] for f in fl]) for key in fl[0]}
        for name, fl in figs.items()
    }
    print(f"{sc.title}, {sc.bytes_per_connection} bytes each, medians of {repeat} (min-max)")
    print(table(runs))
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        result = {"scenario": sc.__dict__, "repeat": repeat, "runs": runs}
        result["machine"] = suite.machine()
        (args.output / "small_chunks.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
