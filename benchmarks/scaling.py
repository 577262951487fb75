"""Scaling: 1, 2, ... N worker processes sharing one port, iouzcrx's
``workers=N`` side by side with the stock way (N uvloop processes, each with
``create_server(reuse_port=True)``), in one run.

    python benchmarks/scaling.py [--workers 1,2] [--mode auto] [--quick]
    python benchmarks/scaling.py --vm [--quick]     in the test VM (copy mode)

For every worker count the farms run interleaved (A B C A B C ...),
``--repeat`` times each, against the C sender's bulk scenario (``--connections``
connections, ``--mib`` MiB in all). Each worker reports to this program, over
a pipe, when a connection of its own ends: its bytes, and the worker's clock
and CPU time at its first connection and now. From that come:

- GB/s: every byte over the window from the first connection (any worker) to
  the last end (any worker);
- CPU s/GB per worker: each worker's CPU time over its own window, over the
  bytes it received, and the farm's total over all bytes;
- scaling: GB/s at N workers over N times GB/s at one worker (the target is
  0.9 where the machine has a core for every worker and for the sender);
- zero-copy share: the bytes the kernel placed without a copy, from each
  worker's receive-queue stats where the mode can tell (zerocopy); the
  copying modes (``copy``, ``bufring``, ``socket``) are 0 by definition.

Results go to ``benchmarks/results/scaling-<host|vm>.{json,md}`` (or
``--output``/``--name``). ``bash benchmarks/run`` installs what this needs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import mmap
import os
import resource
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from suite import compile_programs, last_json

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 1 << 20
FARMS = ("iouzcrx-zerocopy", "iouzcrx-streams", "uvloop-protocol", "uvloop-buffered")
READ_SIZE = 256 << 10


# -- what runs in each worker ----------------------------------------------------------


class Reporter:
    """One per worker process: counts its connections' bytes and reports
    each end to the farm's pipe (one short line, one atomic write)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.first: tuple[float, float] | None = None

    def connected(self) -> None:
        if self.first is None:
            self.first = (time.monotonic(), _cpu())

    def finished(self, nbytes: int) -> None:
        assert self.first is not None
        line = json.dumps(
            {
                "pid": os.getpid(),
                "bytes": nbytes,
                "t0": self.first[0],
                "cpu0": self.first[1],
                "t": time.monotonic(),
                "cpu": _cpu(),
            }
        )
        os.write(self.fd, line.encode() + b"\n")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Counting:
    reporter: Reporter

    def __init__(self) -> None:
        self.nbytes = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.reporter.connected()

    def eof_received(self) -> bool:
        self.transport.close()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.reporter.finished(self.nbytes)


def protocol_class(kind: str, reporter: Reporter) -> type:
    """The protocol a farm's workers serve, written as a user would."""
    if kind == "iouzcrx-zerocopy":
        import iouzcrx

        class ZeroCopy(_Counting, iouzcrx.ZeroCopyProtocol):
            def view_received(self, view: memoryview) -> None:
                self.nbytes += len(view)

        base: type = ZeroCopy
    elif kind == "uvloop-protocol":

        class Plain(_Counting, asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                self.nbytes += len(data)

        base = Plain
    else:

        class Buffered(_Counting, asyncio.BufferedProtocol):
            def __init__(self) -> None:
                super().__init__()
                self.buffer = memoryview(mmap.mmap(-1, READ_SIZE))

            def get_buffer(self, sizehint: int) -> memoryview:
                return self.buffer

            def buffer_updated(self, nbytes: int) -> None:
                self.nbytes += nbytes

        base = Buffered
    return type(base.__name__, (base,), {"reporter": reporter})


def stream_handler(reporter: Reporter) -> Any:
    async def handle(reader: Any, writer: Any) -> None:
        reporter.connected()
        nbytes = 0
        try:
            async for view in reader:
                nbytes += len(view)
            writer.close()
        finally:
            reporter.finished(nbytes)

    return handle


# -- the farms ---------------------------------------------------------------------------


class Farm:
    """N workers serving one port; ``start()`` returns the port."""

    def __init__(self, kind: str, workers: int, args: argparse.Namespace, report_fd: int) -> None:
        self.kind, self.workers, self.args, self.report_fd = kind, workers, args, report_fd
        self.supervisor: Any = None
        self.pids: list[int] = []
        self.listener: socket.socket | None = None

    def start(self) -> int:
        reporter = Reporter(self.report_fd)
        if self.kind.startswith("iouzcrx-"):
            import iouzcrx

            app = (
                stream_handler(reporter)
                if self.kind == "iouzcrx-streams"
                else protocol_class(self.kind, reporter)
            )
            options: dict[str, Any] = {"mode": self.args.mode, "backlog": 4096}
            if self.args.interface:
                options["interface"] = self.args.interface
                options["queues"] = [int(q) for q in self.args.queues.split(",")]
            self.supervisor = iouzcrx.Supervisor(
                app,
                self.args.host,
                0,
                workers=self.workers,
                use_uvloop=True,
                stats_interval=3600,
                shutdown_timeout=5,
                **options,
            )
            self.supervisor.start()
            return int(self.supervisor.port)
        # The stock way: bind once for the port, then N processes each with
        # its own SO_REUSEPORT listener on it.
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.listener.bind((self.args.host, 0))
        port = self.listener.getsockname()[1]
        ready_r, ready_w = os.pipe()
        for _ in range(self.workers):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os.close(ready_r)
                code = 1
                try:
                    _serve_stock(self.kind, self.args.host, port, reporter, ready_w)
                    code = 0
                finally:
                    os._exit(code)
            self.pids.append(pid)
        os.close(ready_w)
        with os.fdopen(ready_r, "rb") as ready:
            for _ in range(self.workers):
                if not ready.readline():
                    raise RuntimeError(f"a {self.kind} worker did not start")
        return int(port)

    def stop(self) -> list[dict[str, Any]]:
        """Stop the workers; iouzcrx's report their final counters."""
        stats: list[dict[str, Any]] = []
        if self.supervisor is not None:
            self.supervisor.close()
            stats = self.supervisor.stats()
            self.supervisor = None
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in self.pids:
            os.waitpid(pid, 0)
        self.pids.clear()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        return stats


def _serve_stock(kind: str, host: str, port: int, reporter: Reporter, ready_w: int) -> None:
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    server = loop.run_until_complete(
        loop.create_server(
            protocol_class(kind, reporter), host, port, reuse_port=True, backlog=4096
        )
    )
    os.write(ready_w, b"ready\n")
    os.close(ready_w)
    loop.run_until_complete(stop)
    server.close()
    loop.close()


# -- one run -----------------------------------------------------------------------------


def run_once(kind: str, workers: int, args: argparse.Namespace, sender: Path) -> dict[str, Any]:
    per_connection = args.mib * MIB // args.connections
    report_r, report_w = os.pipe()
    farm = Farm(kind, workers, args, report_w)
    ends: list[dict[str, Any]] = []
    try:
        port = farm.start()
        os.close(report_w)
        report_w = -1
        cmd = [str(sender), "--host", args.host, "--port", str(port), "--scenario", "bulk"]
        cmd += ["--connections", str(args.connections), "--bytes", str(per_connection)]
        done = subprocess.run(
            args.sender_prefix + cmd, capture_output=True, text=True, timeout=args.timeout
        )
        if done.returncode != 0:
            raise RuntimeError(f"the sender failed against {kind}: {done.stderr.strip()}")
        # The sender is done once the receivers closed: every end is
        # reported, or about to be.
        pending = b""
        deadline = time.monotonic() + 30
        while len(ends) < args.connections:
            ready, _, _ = select.select([report_r], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise RuntimeError(f"{kind}: {len(ends)} of {args.connections} connections ended")
            chunk = os.read(report_r, 65536)
            if not chunk:
                raise RuntimeError(f"{kind}: the workers went away")
            pending += chunk
            *lines, pending = pending.split(b"\n")
            ends += [json.loads(line) for line in lines if line]
    finally:
        stats = farm.stop()
        os.close(report_r)
        if report_w >= 0:
            os.close(report_w)
    return figures(kind, workers, ends, per_connection * args.connections, stats)


def figures(
    kind: str, workers: int, ends: list[dict[str, Any]], expect: int, stats: list[dict[str, Any]]
) -> dict[str, Any]:
    total = sum(e["bytes"] for e in ends)
    if total != expect:
        raise RuntimeError(f"{kind}: received {total} bytes, the sender sent {expect}")
    seconds = max(e["t"] for e in ends) - min(e["t0"] for e in ends)
    per_worker: dict[int, dict[str, float]] = {}
    for e in ends:
        w = per_worker.setdefault(e["pid"], {"bytes": 0, "cpu0": e["cpu0"], "cpu": e["cpu"]})
        w["bytes"] += e["bytes"]
        w["cpu"] = max(w["cpu"], e["cpu"])
    cpu = sum(w["cpu"] - w["cpu0"] for w in per_worker.values())
    mode = stats[0].get("mode") if stats else None
    copied = [s.get("copied_bytes") for s in stats]
    share: float | None = None
    if mode not in ("zerocopy", "copy"):
        share = 0.0  # stock sockets, bufring and socket modes: the kernel copies
    elif all(isinstance(c, int) for c in copied):
        share = max(total - sum(c for c in copied if isinstance(c, int)), 0) / total
    return {
        "gbps": total / seconds / 1e9,
        "cpu_s_per_gb": cpu / (total / 1e9),
        "workers_used": len(per_worker),
        "worker_cpu_s_per_gb": sorted(
            (w["cpu"] - w["cpu0"]) / max(w["bytes"] / 1e9, 1e-12) for w in per_worker.values()
        ),
        "zero_copy_share": share,
        # The mode the iouzcrx workers took (mode="auto" picks the best here).
        "mode": mode,
    }


# -- the run -----------------------------------------------------------------------------


def zero_copy_note(mode: str) -> str:
    if mode in ("zerocopy", "copy"):
        return "from the kernel's zcrx copy counters, summed over the workers"
    return f"0 by definition: the kernel copies every byte in {mode} mode and in stock sockets"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import iouzcrx

    counts = [int(n) for n in args.workers.split(",")]
    farms = args.farms.split(",")
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": {
            "kernel": os.uname().release,
            "cores": os.cpu_count(),
            "in_vm": bool(os.environ.get("IOUZCRX_VM")),
            "python": sys.version.split()[0],
            "iouzcrx": iouzcrx.__version__,
        },
        "mode": args.mode,
        "connections": args.connections,
        "mib": args.mib,
        "interface": args.interface,
        "queues": args.queues,
        "repeat": args.repeat,
        "runs": {},
        "failures": [],
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="iouzcrx-scaling-") as build:
        sender = compile_programs(Path(build))["sender"]
        for n in counts:
            samples: dict[str, list[dict[str, Any]]] = {kind: [] for kind in farms}
            for rep in range(args.repeat):
                for kind in farms:
                    clock = time.monotonic() - started
                    label = f"[{clock:6.1f}s] {n} worker(s) {rep + 1}/{args.repeat} {kind}"
                    try:
                        fig = run_once(kind, n, args, sender)
                    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                        results["failures"].append({"workers": n, "farm": kind, "error": str(exc)})
                        print(f"{label}: FAILED {exc}", file=sys.stderr, flush=True)
                        continue
                    samples[kind].append(fig)
                    if fig["mode"] is not None:
                        results["mode"] = fig["mode"]
                    print(
                        f"{label}: {fig['gbps']:.2f} GB/s, {fig['cpu_s_per_gb']:.3f} CPU s/GB, "
                        f"{fig['workers_used']} worker(s) used",
                        file=sys.stderr,
                        flush=True,
                    )
            results["runs"][str(n)] = {
                kind: {
                    "gbps": statistics.median(f["gbps"] for f in figs),
                    "gbps_min": min(f["gbps"] for f in figs),
                    "gbps_max": max(f["gbps"] for f in figs),
                    "cpu_s_per_gb": statistics.median(f["cpu_s_per_gb"] for f in figs),
                    "workers_used": min(f["workers_used"] for f in figs),
                    "zero_copy_share": figs[-1]["zero_copy_share"],
                    "repetitions": len(figs),
                }
                for kind, figs in samples.items()
                if figs
            }
    results["zero_copy_note"] = zero_copy_note(results["mode"])
    results["seconds"] = time.monotonic() - started
    return results


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    command = "python benchmarks/scaling.py"
    link = "over loopback"
    if results.get("interface"):
        link = (
            f"from a peer namespace over {results['interface']}, RX queues "
            f"{results['queues']} bound for the workers"
        )
        command += " --vm --nic" if m["in_vm"] else f" --interface {results['interface']}"
    elif m["in_vm"]:
        command += " --vm"
    lines = [
        f"Scaling of {results['date']} {'in the VM' if m['in_vm'] else 'on the host'}: "
        f"Linux {m['kernel']}, {m['cores']} cores, Python {m['python']}, iouzcrx {m['iouzcrx']}. "
        f"Receive mode `{results['mode']}`; the C sender's bulk scenario, "
        f"{results['connections']} connections, {results['mib']} MiB per run {link}; "
        f"medians of {results['repeat']} interleaved runs. Command: `{command}`.",
        "",
        f"Zero-copy share: {results['zero_copy_note']}.",
        "",
        "| workers | farm | GB/s (min–max) | vs 1 worker | scaling (target 0.9) "
        "| CPU s/GB | vs uvloop-protocol | zero-copy share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    one = results["runs"].get("1", {})
    for n, farms in results["runs"].items():
        peer = farms.get("uvloop-protocol")
        for kind, f in farms.items():
            base = one.get(kind)
            speedup = f["gbps"] / base["gbps"] if base else None
            share = f["zero_copy_share"]
            lines.append(
                f"| {n} | {kind} | {f['gbps']:.2f} ({f['gbps_min']:.2f}–{f['gbps_max']:.2f}) "
                f"| {_x(speedup)} | {_ratio(speedup / int(n) if speedup else None)} "
                f"| {f['cpu_s_per_gb']:.3f} | {_x(f['gbps'] / peer['gbps'] if peer else None)} "
                f"| {'—' if share is None else f'{share:.0%}'} |"
            )
    cores = m["cores"] or 1
    where = (
        f"This VM has {cores} vCPUs, emulated (TCG) on the host's cores, and the sender "
        "runs on them too"
        if m["in_vm"]
        else f"This machine has {cores} cores and the sender runs on them too"
    )
    lines += [
        "",
        f"{where}: the kernel's TCP work is charged to whichever side it interrupts, so "
        f"N workers can reach N× one worker only while N + 1 ≤ {cores}. Above that the "
        "figure shows how the farm shares the cores, not how it would scale with one "
        "core per worker; CPU s/GB per worker is the figure that carries over.",
    ]
    for failure in results["failures"]:
        lines.append(
            f"- FAILED: {failure['workers']} worker(s), {failure['farm']}: {failure['error']}"
        )
    return "\n".join(lines) + "\n"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def run_in_vm(args: argparse.Namespace) -> dict[str, Any]:
    inner = [sys.executable, str(Path(__file__).relative_to(REPO)), "--stdout"]
    inner += ["--workers", args.workers, "--repeat", str(args.repeat), "--farms", args.farms]
    inner += ["--connections", str(args.connections), "--mib", str(args.mib)]
    env = dict(os.environ)
    # A vCPU per worker (at least the VM's usual two), unless told otherwise.
    most = max(int(n) for n in args.workers.split(","))
    env.setdefault("IOUZCRX_VM_CPUS", str(max(most, 2)))
    if args.nic:
        inner.append("--nic")
        build = subprocess.run(
            [str(REPO / "tests" / "vm" / "netdevsim" / "build")],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        env["IOUZCRX_NETDEVSIM_KO"] = build.stdout.strip().splitlines()[-1]
    done = subprocess.run(
        ["bash", str(REPO / "tests" / "vm" / "run"), "--", *inner],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"the scaling run failed in the VM (exit {done.returncode})")
    try:
        return last_json(done.stdout)
    except ValueError:
        raise SystemExit("the VM run printed no results") from None


def use_the_simulated_nic(args: argparse.Namespace) -> None:
    """In the VM: set the simulated NIC up (tests/nsim.py) and point the
    run at it: every RX queue bound for the workers' zerocopy mode, the
    sender in the peer namespace."""
    up = subprocess.run(
        [sys.executable, str(REPO / "tests" / "nsim.py"), "up"],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    nic = json.loads(up.stdout.strip().splitlines()[-1])
    args.mode = "zerocopy"
    args.interface = nic["interface"]
    args.queues = ",".join(str(q) for q in range(nic["queues"]))
    args.host = nic["addresses"]["local"]
    args.sender_prefix = ["ip", "netns", "exec", nic["peer_netns"]]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers", default=None, help="worker counts, comma-separated (default 1..cores)"
    )
    parser.add_argument("--farms", default=",".join(FARMS), help="farms to run, comma-separated")
    parser.add_argument("--mode", default="auto", help="iouzcrx receive mode (default auto)")
    parser.add_argument("--interface", help="iouzcrx zerocopy mode: the NIC (with --queues)")
    parser.add_argument("--queues", default="", help="iouzcrx zerocopy mode: RX queues, 1,2,3")
    parser.add_argument("--host", default="127.0.0.1", help="address the farms listen on")
    parser.add_argument(
        "--sender-prefix",
        default="",
        help="a command to run the sender under (ip netns exec NS)",
    )
    parser.add_argument("--connections", type=int, default=32, help="sender connections")
    parser.add_argument("--mib", type=int, default=4096, help="MiB per run, all connections")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1/16 of the bytes, one repetition")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per run")
    parser.add_argument("--vm", action="store_true", help="run in the test VM (copy mode)")
    parser.add_argument(
        "--nic",
        action="store_true",
        help="with --vm: zerocopy mode on the simulated NIC (netdevsim), sender in its peer netns",
    )
    parser.add_argument("--output", type=Path, default=HERE / "results")
    parser.add_argument("--name", help="file name stem (default scaling-host or scaling-vm)")
    parser.add_argument("--stdout", action="store_true", help="print the JSON results only")
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = ",".join(str(n) for n in range(1, (os.cpu_count() or 1) + 1))
    if args.quick:
        args.mib = max(args.mib // 16, args.connections)
        args.repeat = 1
    if args.vm and not os.environ.get("IOUZCRX_VM"):
        args.mib //= 8
    args.sender_prefix = args.sender_prefix.split()
    if bool(args.interface) != bool(args.queues):
        parser.error("--interface and --queues go together")
    if args.nic and not (args.vm or os.environ.get("IOUZCRX_VM")):
        parser.error("--nic needs --vm: the simulated NIC exists in the test VM only")
    if args.nic and not args.vm:
        use_the_simulated_nic(args)
    results = run_in_vm(args) if args.vm else run(args)
    if args.stdout:
        print(json.dumps(results), flush=True)
        return 1 if results["failures"] else 0
    stem = args.name or ("scaling-nic" if args.nic else "scaling-vm" if args.vm else "scaling-host")
    if args.quick and not args.name:
        stem = f"quick-{stem}"
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.output / f"{stem}.md").write_text(report(results))
    print(args.output / f"{stem}.md")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
