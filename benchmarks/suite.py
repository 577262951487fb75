"""The benchmark suite: iouzcrx side by side with the receivers users would
otherwise run, over loopback, in one run.

    python benchmarks/suite.py [--quick] [--repeat N] [--scenarios a,b] [--receivers pat,...]
    python benchmarks/suite.py --vm [--quick]     the same inside a VM on a
                                                  kernel with RECV_ZC copy mode

(``bash benchmarks/run`` installs what it needs first.) The C sender and the C
receivers are compiled here with the system compiler. For every scenario the
receivers run interleaved (A B C A B C ...), ``--repeat`` times each; figures
are medians with min and max. Results go to ``benchmarks/results/`` (or
``--output``): ``<name>.json``, ``<name>.md`` and ``<name>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import importlib.metadata
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 1 << 20
NOT_AVAILABLE = 2  # a C receiver's exit status when this kernel lacks its path
# Under emulation every run is slow: the VM measures the copy mode against its
# C reference and the stock uvloop receivers its targets name, with one
# bufring receiver beside.
VM_RECEIVERS = [
    "c-*",
    "uvloop-protocol",
    "uvloop-buffered",
    "uvloop-buffered-aligned",
    "uvloop-streams",
    "iouzcrx-copy-*",
    "iouzcrx-bufring-zerocopy-uvloop",
]


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # bulk | rr | short
    title: str
    connections: int = 1
    bytes_per_connection: int = 0
    request_size: int = 0
    response_size: int = 64
    requests: int = 0
    warmup: int = 100  # untimed requests before the timed ones (rr)
    message_size: str = ""  # bulk: "MIN-MAX" bytes, one send() each, Nagle off
    message_pause_us: int = 0  # bulk with message_size: a pause after each message

    @property
    def expect_bytes(self) -> int:
        if self.kind == "rr":
            return self.request_size * (self.warmup + self.requests)
        return self.connections * self.bytes_per_connection


def scenarios(quick: bool, vm: bool) -> list[Scenario]:
    # Full sizes take a second or more per run at loopback speeds; quick ones
    # only show that every receiver works. Under emulation (the VM) the kernel
    # is ~20x slower, so the VM moves less data.
    scale = 16 if quick else 1
    if vm:
        scale *= 8
    gib = 4096 * MIB // scale
    return [
        Scenario("bulk1", "bulk", "bulk, 1 connection", 1, gib),
        Scenario("bulk8", "bulk", "bulk, 8 connections", 8, gib // 8),
        Scenario("bulk64", "bulk", "bulk, 64 connections", 64, gib // 64),
        Scenario(
            "rr1k",
            "rr",
            "1 KiB request / 64 B response",
            request_size=1024,
            requests=20000 // scale,
        ),
        Scenario(
            "rr16k",
            "rr",
            "16 KiB request / 64 B response",
            request_size=16384,
            requests=10000 // scale,
        ),
        Scenario(
            "short",
            "short",
            "short connections (connect, send 64 KiB, close)",
            connections=5000 // scale,
            bytes_per_connection=64 << 10,
        ),
    ]


def extra_scenarios(quick: bool, vm: bool) -> list[Scenario]:
    """Scenarios that run only when named with --scenarios."""
    scale = (16 if quick else 1) * (8 if vm else 1)
    return [
        Scenario(
            "small64",
            "bulk",
            "64 connections of 100-500 B messages, 100 us apart",
            64,
            4 * MIB // scale,
            message_size="100-500",
            message_pause_us=100,
        ),
    ]


# -- building and running --------------------------------------------------------


def compile_programs(build: Path) -> dict[str, Path]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("no C compiler: install gcc (the sender and C receivers are built here)")
    programs = {}
    for name in ("sender", "recv_receiver", "zcrx_receiver", "rr_wakeups"):
        out = build / name
        subprocess.run(
            [cc, "-O2", "-pthread", "-o", str(out), str(HERE / "c" / f"{name}.c")], check=True
        )
        programs[name] = out
    return programs


def receiver_command(name: str, programs: dict[str, Path], sc: Scenario) -> list[str]:
    if name == "c-recv":
        cmd = [str(programs["recv_receiver"])]
    elif name == "c-epoll":
        cmd = [str(programs["recv_receiver"]), "--threads", "one"]
    elif name == "c-recv-zc":
        cmd = [str(programs["zcrx_receiver"])]
    else:
        cmd = [
            sys.executable,
            str(HERE / "receivers.py"),
            name,
            "--expect-bytes",
            str(sc.expect_bytes),
        ]
    cmd += ["--scenario", sc.kind, "--connections", str(sc.connections)]
    if sc.kind == "rr":
        cmd += ["--request-size", str(sc.request_size), "--response-size", str(sc.response_size)]
    return cmd


def sender_command(programs: dict[str, Path], sc: Scenario, port: int) -> list[str]:
    cmd = [str(programs["sender"]), "--port", str(port), "--scenario", sc.kind]
    if sc.kind == "rr":
        cmd += [
            "--request-size",
            str(sc.request_size),
            "--response-size",
            str(sc.response_size),
            "--requests",
            str(sc.requests),
            "--warmup",
            str(sc.warmup),
        ]
    else:
        cmd += ["--connections", str(sc.connections), "--bytes", str(sc.bytes_per_connection)]
        if sc.message_size:
            cmd += ["--message-size", sc.message_size]
            cmd += ["--message-pause-us", str(sc.message_pause_us)]
    return cmd


class Unavailable(Exception):
    """The receiver cannot run on this machine (its reason is the message)."""


def last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise ValueError("no JSON line in the output")


def run_one(
    name: str,
    programs: dict[str, Path],
    sc: Scenario,
    timeout: float,
    *,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
    start_timeout: float = 30,
) -> dict[str, Any]:
    """One receiver process (``command``, by default the suite's for
    ``name``, under ``env``) and one sender process; both figures, merged."""
    receiver = subprocess.Popen(
        command or receiver_command(name, programs, sc),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert receiver.stdout is not None
        ready, _, _ = select.select([receiver.stdout], [], [], start_timeout)
        line = receiver.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            receiver.kill()
            _, err = receiver.communicate()
            if receiver.returncode == NOT_AVAILABLE:
                raise Unavailable(err.strip())
            raise RuntimeError(f"{name} did not start: {err.strip() or line!r}")
        port = int(line.split()[1])
        sender = subprocess.run(
            sender_command(programs, sc, port), capture_output=True, text=True, timeout=timeout
        )
        if sender.returncode != 0:
            raise RuntimeError(f"sender failed against {name}: {sender.stderr.strip()}")
        out, err = receiver.communicate(timeout=30)
        if receiver.returncode != 0:
            raise RuntimeError(f"{name} failed: {err.strip()}")
        return {"receiver": last_json(out), "sender": last_json(sender.stdout)}
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()


def run_wrapped(
    name: str, programs: dict[str, Path], sc: Scenario, wrapper: list[str]
) -> dict[str, Any]:
    """``run_one`` with the receiver under ``wrapper`` (a profiler: strace,
    perf, valgrind); fails unless every byte arrived."""
    raw = run_one(
        name,
        programs,
        sc,
        timeout=600,
        command=wrapper + receiver_command(name, programs, sc),
        start_timeout=600,  # under callgrind the interpreter starts slowly
    )
    got = raw["receiver"]["bytes"]
    if got != sc.expect_bytes:
        raise RuntimeError(f"{name} received {got} bytes, expected {sc.expect_bytes}")
    return raw


def callgrind_instructions(name: str, programs: dict[str, Path], sc: Scenario, out: Path) -> int:
    """User-space instructions of one run of ``name`` under callgrind."""
    run_wrapped(name, programs, sc, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
    if match is None:
        raise RuntimeError(f"no totals in {out}")
    return int(match.group(1))


def pair_of(text: str) -> tuple[int, int]:
    """An ``N1,N2`` argument of the per-unit scripts (0 < N1 < N2)."""
    low, high = (int(x) for x in text.split(","))
    if not 0 < low < high:
        raise argparse.ArgumentTypeError(f"want N1,N2 with 0 < N1 < N2, not {text!r}")
    return low, high


def figures_of(sc: Scenario, raw: dict[str, Any]) -> dict[str, float]:
    """The reported figures of one run, checked against what was sent."""
    r, s = raw["receiver"], raw["sender"]
    if r["bytes"] != sc.expect_bytes or s["bytes"] != sc.expect_bytes:
        raise RuntimeError(
            f"received {r['bytes']} bytes, sent {s['bytes']}, expected {sc.expect_bytes}"
        )
    gb = r["bytes"] / 1e9
    recv_cpu = r["cpu_user"] + r["cpu_sys"]
    send_cpu = s["cpu_user"] + s["cpu_sys"]
    fig = {
        "gbps": gb / r["seconds"],
        "recv_cpu_s_per_gb": recv_cpu / gb,
        "total_cpu_s_per_gb": (recv_cpu + send_cpu) / gb,
        "chunks_per_s": r["chunks"] / r["seconds"],
        "bytes_per_chunk": r["bytes"] / max(r["chunks"], 1),
        "peak_rss_mib": r["maxrss_kb"] / 1024,
    }
    if r.get("rss_ready_kb") is not None:
        fig["rss_growth_mib"] = (r["maxrss_kb"] - r["rss_ready_kb"]) / 1024
    if r.get("rss_mid_kb") is not None:
        fig["rss_second_half_mib"] = (r["maxrss_kb"] - r["rss_mid_kb"]) / 1024
    if sc.kind == "rr":
        fig.update(
            rate=s["rate"],
            p50_us=s["p50_us"],
            p99_us=s["p99_us"],
            recv_cpu_us_per_request=recv_cpu / (sc.requests + sc.warmup) * 1e6,
        )
    elif sc.kind == "short":
        fig.update(
            rate=sc.connections / r["seconds"],
            recv_cpu_us_per_connection=recv_cpu / sc.connections * 1e6,
        )
    return fig


def summarise(values: list[float]) -> dict[str, Any]:
    # The values stay in run order: run i of every receiver ran in the same
    # round, so report.py pairs them for a ratio's spread.
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "values": values,
    }


# -- the run ---------------------------------------------------------------------


def list_receivers() -> tuple[list[str], dict[str, str | None]]:
    out = subprocess.run(
        [sys.executable, str(HERE / "receivers.py"), "--list"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listing = json.loads(out)
    return ["c-recv", "c-epoll", "c-recv-zc"] + listing["receivers"], listing["modes"]


def runs_in(name: str, sc: Scenario) -> bool:
    """Whether a receiver takes part in a scenario: request/response has one
    connection, where the one-thread C receiver would be c-recv again."""
    return not (name == "c-epoll" and sc.kind == "rr")


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import iouzcrx

    versions = {"python": platform.python_version(), "iouzcrx": iouzcrx.__version__}
    try:
        versions["uvloop"] = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        pass
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "in_vm": bool(os.environ.get("IOUZCRX_VM")),
        **versions,
    }


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    names, modes = list_receivers()
    patterns = args.receivers.split(",") if args.receivers else None
    if patterns is None and args.in_vm:
        patterns = VM_RECEIVERS
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    chosen = scenarios(args.quick, args.in_vm)
    if args.scenarios:
        wanted = args.scenarios.split(",")
        chosen = [
            sc for sc in chosen + extra_scenarios(args.quick, args.in_vm) if sc.name in wanted
        ]
    repeat = args.repeat or (1 if args.quick else 3)
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "quick": args.quick,
        "repeat": repeat,
        # What narrowed the default run, for the report's command line.
        "options": {
            "repeat": args.repeat or None,
            "scenarios": args.scenarios,
            "receivers": args.receivers,
        },
        "modes": modes,
        "scenarios": [sc.__dict__ | {"expect_bytes": sc.expect_bytes} for sc in chosen],
        "unavailable": {},
        "failures": [],
        "runs": {},
    }
    # Under the VM's software emulation, on a loaded machine, an interpreter
    # importing asyncio and the package has been seen to need more than 30 s.
    start_timeout = 300 if args.in_vm else 30
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="iouzcrx-bench-") as build:
        programs = compile_programs(Path(build))
        for sc in chosen:
            per_receiver: dict[str, list[dict[str, float]]] = {n: [] for n in names}
            rounds: dict[str, list[int]] = {n: [] for n in names}
            for rep in range(repeat):
                for name in names:
                    if name in results["unavailable"] or not runs_in(name, sc):
                        continue
                    clock = time.monotonic() - started
                    label = f"[{clock:6.1f}s] {sc.name} {rep + 1}/{repeat} {name}"
                    try:
                        raw = run_one(
                            name, programs, sc, timeout=args.timeout, start_timeout=start_timeout
                        )
                        fig = figures_of(sc, raw)
                    except Unavailable as exc:
                        results["unavailable"][name] = str(exc)
                        log(f"{label}: not available here ({exc})")
                        continue
                    except (RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
                        results["failures"].append(
                            {"scenario": sc.name, "receiver": name, "error": str(exc)}
                        )
                        log(f"{label}: FAILED {exc}")
                        continue
                    per_receiver[name].append(fig)
                    rounds[name].append(rep)
                    log(f"{label}: " + headline(sc, fig))
            results["runs"][sc.name] = {
                name: {key: summarise([f[key] for f in figs]) for key in figs[0]}
                | {"repetitions": len(figs), "rounds": rounds[name]}
                for name, figs in per_receiver.items()
                if figs
            }
    if not args.no_instructions:
        results["instructions"] = instruction_counts(args)
    results["seconds"] = time.monotonic() - started
    return results


def headline(sc: Scenario, fig: dict[str, float]) -> str:
    if sc.kind == "rr":
        return f"{fig['rate']:.0f} req/s p50 {fig['p50_us']:.1f} us p99 {fig['p99_us']:.1f} us"
    if sc.kind == "short":
        return f"{fig['rate']:.0f} conn/s"
    return f"{fig['gbps']:.2f} GB/s, {fig['recv_cpu_s_per_gb']:.3f} s/GB"


def instruction_counts(args: argparse.Namespace) -> Any:
    """Per-chunk instruction counts under callgrind (benchmarks/instructions.py)."""
    script = HERE / "instructions.py"
    if shutil.which("valgrind") is None:
        return {"error": "valgrind is not installed"}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, str(script), "--json", out.name]
        if args.quick:
            # Not less: a phase's count moves by some 50k instructions from
            # run to run (how completions batch), which over 4 MiB could
            # even make the per-chunk figure negative.
            cmd += ["--mib", "8"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr.strip()[-2000:]}
        return {"rows": json.loads(Path(out.name).read_text())}


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_in_vm(args: argparse.Namespace) -> dict[str, Any]:
    """Run this script inside the test VM and return its results."""
    inner = [sys.executable, str(Path(__file__).relative_to(REPO)), "--in-vm", "--stdout"]
    inner += [f"--repeat={args.repeat}"] if args.repeat else []
    inner += ["--quick"] if args.quick else []
    inner += [f"--scenarios={args.scenarios}"] if args.scenarios else []
    inner += [f"--receivers={args.receivers}"] if args.receivers else []
    inner += ["--no-instructions"]
    done = subprocess.run(
        ["bash", str(REPO / "tests" / "vm" / "run"), "--", *inner],
        stdout=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"the suite failed in the VM (exit {done.returncode})")
    return last_json(done.stdout)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small transfers, one repetition: a smoke test"
    )
    parser.add_argument("--repeat", type=int, default=0, help="repetitions (default 3)")
    parser.add_argument("--scenarios", help="comma-separated scenario names")
    parser.add_argument("--receivers", help="comma-separated name patterns (fnmatch)")
    parser.add_argument(
        "--vm", action="store_true", help="run in the test VM (Linux >= 7.1, RECV_ZC copy mode)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=HERE / "results",
        help="directory for the results (default benchmarks/results)",
    )
    parser.add_argument("--name", help="file name stem (default host, vm, or quick-*)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    parser.add_argument(
        "--no-instructions", action="store_true", help="skip the callgrind instruction counts"
    )
    parser.add_argument("--in-vm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stdout", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    results = run_in_vm(args) if args.vm else run_suite(args)
    if args.stdout:
        print(json.dumps(results), flush=True)
        return 0

    from report import write_report

    stem = args.name or ("vm" if args.vm else "host")
    if args.quick and not args.name:
        stem = f"quick-{stem}"
    paths = write_report(results, args.output, stem)
    for path in paths:
        print(path)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
