"""User-space instructions per 4 KiB chunk delivered to a zero-copy protocol,
counted with valgrind's callgrind (deterministic, unlike wall-clock time on a
shared machine).

    python benchmarks/instructions.py [--modes bufring,socket] [--loops asyncio,uvloop]
                                      [--consumers len,method,bytes,buffered]
                                      [--mib N] [--connections 1,8] [--json PATH]

A receiver process runs under callgrind: an iouzcrx loop serving one
``create_zcrx_server`` with 4 KiB buffers, so every kernel completion is one
4 KiB chunk. This script, outside valgrind, is the sender. It sends in
phases: a warm-up, then X and 2X bytes (X = ``--mib``), each over fresh
connections. The receiver makes callgrind dump its counters between phases
(``--dump-before`` on a libc function nothing else calls), and every figure
is a difference between the 2X and the X phase divided by the difference in
chunks, so start-up, connection set-up and teardown cancel out.

Per row:

- ``instructions_per_chunk_process``: everything the receiver executed in
  user space (interpreter, event loop, library, consumer).
- ``instructions_per_chunk_library``: for the ring modes, the inclusive cost
  of the ring's drain entry points (``Ring.on_ring_readable``,
  ``Ring.on_eventfd_readable`` and ``Ring.drain``): reaping, buffer export,
  delivery up to and including the protocol's callback, buffer returns and
  the ring's enters (the syscall instruction itself; kernel time is not
  counted). The Reactor's Python frames of scheduled drains are outside
  it. With the ``len`` consumer (``view_received = len`` on the instance) the
  callback's own body is a C builtin of a few dozen instructions; the
  ``method`` consumer shows what one Python-level method adds. The
  ``bytes`` (``asyncio.Protocol``) and ``buffered`` (``BufferedProtocol``
  with a 256 KiB buffer) consumers measure the copying deliveries; there
  the copy itself dominates, as callgrind counts each byte a ``rep movsb``
  moves as one instruction (about 4,100 per 4 KiB chunk).
  For socket mode the library is Python code called by the loop's own
  transport, which callgrind cannot single out by symbol; the figure is
  the process cost minus that of the stock baseline on the same loop.
- ``stock`` rows: asyncio's own ``loop.create_server`` with a
  ``BufferedProtocol`` reading into a 4 KiB bytearray, the reference for
  the process figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

CHUNK = 4096
# callgrind dumps its counters whenever this libc function is entered; the
# receiver calls it (os.getloadavg) at each phase boundary.
MARKER = "getloadavg"
LIBRARY_ENTRY = re.compile(
    r"__pyx_pw_7iouzcrx_5_ring_4Ring_\d+(on_ring_readable|on_eventfd_readable|drain)$"
)
VALGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"


# -- receiver (runs under callgrind) ---------------------------------------------


def receiver_main(mode: str, loop_name: str, consumer: str, connections: int) -> None:
    import iouzcrx

    loop: Any = iouzcrx.new_event_loop(use_uvloop=loop_name == "uvloop")
    asyncio.set_event_loop(loop)
    lost = 0
    done: asyncio.Future[None] | None = None
    stock_chunks = stock_bytes = 0

    def on_lost() -> None:
        nonlocal lost
        lost += 1
        if lost >= connections and done is not None and not done.done():
            done.set_result(None)

    class LenConsumer(iouzcrx.ZeroCopyProtocol):
        def __init__(self) -> None:
            # A C builtin as the callback: no Python frame per delivery.
            self.view_received = len  # type: ignore[method-assign, assignment]

        def connection_lost(self, exc: BaseException | None) -> None:
            on_lost()

    class MethodConsumer(iouzcrx.ZeroCopyProtocol):
        views = 0

        def view_received(self, view: memoryview) -> None:
            self.views += 1

        def connection_lost(self, exc: BaseException | None) -> None:
            on_lost()

    class BytesConsumer(asyncio.Protocol):
        # A plain asyncio.Protocol: each run arrives as a new bytes object.
        received = 0

        def data_received(self, data: bytes) -> None:
            self.received += len(data)

        def connection_lost(self, exc: BaseException | None) -> None:
            on_lost()

    class BufferedConsumer(asyncio.BufferedProtocol):
        # A BufferedProtocol with one 256 KiB buffer, the size uvloop reads.
        def __init__(self) -> None:
            self.buffer = bytearray(256 * 1024)

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buffer

        def buffer_updated(self, nbytes: int) -> None:
            pass

        def connection_lost(self, exc: BaseException | None) -> None:
            on_lost()

    class StockConsumer(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.buffer = bytearray(CHUNK)

        def get_buffer(self, sizehint: int) -> bytearray:
            return self.buffer

        def buffer_updated(self, nbytes: int) -> None:
            nonlocal stock_chunks, stock_bytes
            stock_chunks += 1
            stock_bytes += nbytes

        def connection_lost(self, exc: BaseException | None) -> None:
            on_lost()

    def counters() -> dict[str, int]:
        if mode == "stock":
            return {"chunks": stock_chunks, "bytes": stock_bytes, "deliveries": stock_chunks}
        stats = server.backend.stats()
        return {
            "chunks": stats["chunks"],
            "bytes": stats["bytes"],
            "deliveries": stats.get("deliveries", stats["chunks"]),
        }

    if mode == "stock":
        factory: Any = StockConsumer
    else:
        factory = {
            "len": LenConsumer,
            "method": MethodConsumer,
            "bytes": BytesConsumer,
            "buffered": BufferedConsumer,
        }[consumer]

    server: Any = None

    async def main() -> None:
        nonlocal server
        if mode == "stock":
            listen = socket.create_server(("127.0.0.1", 0), backlog=64)
            server = await loop.create_server(factory, sock=listen)
        else:
            server = await loop.create_zcrx_server(
                factory,
                "127.0.0.1",
                0,
                mode=mode,
                buffer_size=CHUNK,
                area_size=16 << 20,
            )
        print("PORT", server.sockets[0].getsockname()[1], flush=True)
        await serve_phases()
        server.close()

    async def serve_phases() -> None:
        nonlocal done, lost
        phases = []
        for line in sys.stdin:
            if line.strip() == "STOP":
                break
            lost = 0
            done = loop.create_future()
            before = counters()
            print("GO", flush=True)
            await done
            after = counters()
            os.getloadavg()  # phase boundary: callgrind dumps here
            phases.append({key: after[key] - before[key] for key in after})
        print("RESULT", json.dumps(phases), flush=True)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


# -- callgrind output ------------------------------------------------------------


def read_profile(path: str) -> tuple[int, int]:
    """(total instructions, inclusive instructions of the library entry
    points) of one callgrind dump written with uncompressed names."""
    total = 0
    library = 0
    in_entry = False
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
            elif line.startswith("fn="):
                in_entry = bool(LIBRARY_ENTRY.search(line[3:].strip()))
            elif line[:1].isdigit() or line[:1] in "+-*":
                if in_entry:
                    # Self cost lines and the inclusive cost of each call.
                    parts = line.split()
                    if len(parts) > 1:
                        library += int(parts[1])
    return total, library


# -- driver ----------------------------------------------------------------------


def send_phase(port: int, total: int, connections: int) -> None:
    payload = memoryview(bytes(range(256)) * (1 << 12))  # 1 MiB
    per_conn = total // connections

    def send_one() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sent = 0
            while sent < per_conn:
                n = min(len(payload), per_conn - sent)
                sock.sendall(payload[:n])
                sent += n

    threads = [threading.Thread(target=send_one) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def lines_of(proc: subprocess.Popen[str]) -> Iterator[str]:
    assert proc.stdout is not None
    for line in proc.stdout:
        yield line.rstrip("\n")


def measure(mode: str, loop: str, consumer: str, mib: int, connections: int) -> dict[str, Any]:
    x = mib << 20
    sizes = [max(x // 4, connections * CHUNK), x, 2 * x]  # warm-up, X, 2X
    with tempfile.TemporaryDirectory(prefix="iouzcrx-cg-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        cmd = [
            VALGRIND,
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            f"--dump-before={MARKER}",
            "--compress-strings=no",
            "--compress-pos=no",
            sys.executable,
            os.path.abspath(__file__),
            "--receiver",
            mode,
            loop,
            consumer,
            str(connections),
        ]
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONHASHSEED="0"),
        )
        assert proc.stdin is not None
        lines = lines_of(proc)
        try:
            port = 0
            for line in lines:
                if line.startswith("PORT "):
                    port = int(line.split()[1])
                    break
            if not port:
                raise RuntimeError("receiver did not start")
            for size in sizes:
                proc.stdin.write("PHASE\n")
                proc.stdin.flush()
                if next(lines) != "GO":
                    raise RuntimeError("receiver did not acknowledge a phase")
                send_phase(port, size, connections)
            proc.stdin.write("STOP\n")
            proc.stdin.flush()
            phases: list[dict[str, int]] = []
            for line in lines:
                if line.startswith("RESULT "):
                    phases = json.loads(line[len("RESULT ") :])
            proc.wait(timeout=120)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if proc.returncode != 0 or len(phases) != 3:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"receiver failed ({proc.returncode}):\n{err[-3000:]}")
        for phase, size in zip(phases, sizes, strict=True):
            if phase["bytes"] != size // connections * connections:
                raise RuntimeError(f"received {phase['bytes']} of {size} bytes")
        # Dump n+1 holds what ran between phase boundary n and n+1.
        dumps = sorted(
            (p for p in os.listdir(tmp) if re.fullmatch(r"callgrind\.out\.\d+", p)),
            key=lambda p: int(p.rsplit(".", 1)[1]),
        )
        if len(dumps) < 3:
            raise RuntimeError(f"expected 3 phase dumps from callgrind, got {dumps}")
        _, small, large = (read_profile(os.path.join(tmp, d)) for d in dumps[:3])
    chunks = phases[2]["chunks"] - phases[1]["chunks"]
    deliveries = phases[2]["deliveries"] - phases[1]["deliveries"]
    return {
        "mode": mode,
        "loop": loop,
        "consumer": consumer,
        "connections": connections,
        "chunk_size": CHUNK,
        "chunks": chunks,
        "deliveries": deliveries,
        "bytes": phases[2]["bytes"] - phases[1]["bytes"],
        "instructions_per_chunk_process": (large[0] - small[0]) / chunks,
        "instructions_per_chunk_library": (
            (large[1] - small[1]) / chunks if mode not in ("socket", "stock") else None
        ),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--receiver":
        mode, loop, consumer, connections = sys.argv[2:6]
        receiver_main(mode, loop, consumer, int(connections))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", default="bufring,socket", help="comma-separated receive modes")
    parser.add_argument("--loops", default="asyncio,uvloop", help="asyncio and/or uvloop")
    parser.add_argument(
        "--consumers",
        default="len,method",
        help="len, method, bytes (asyncio.Protocol) and/or buffered (BufferedProtocol)",
    )
    parser.add_argument("--mib", type=int, default=16, help="X: MiB of the smaller phase")
    parser.add_argument("--connections", default="1", help="e.g. 1,8")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not os.path.exists(VALGRIND):
        raise SystemExit("valgrind is not installed")

    modes = [m for m in args.modes.split(",") if m]
    loops = [lp for lp in args.loops.split(",") if lp]
    consumers = [c for c in args.consumers.split(",") if c]
    conns = [int(c) for c in args.connections.split(",") if c]
    jobs = [(m, lp, c, n) for n in conns for lp in loops for m in modes for c in consumers]
    if "socket" in modes:
        jobs += [("stock", lp, "buffered", n) for n in conns for lp in loops]

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda job: measure(job[0], job[1], job[2], args.mib, job[3]), jobs))

    stock = {(r["loop"], r["connections"]): r for r in rows if r["mode"] == "stock"}
    for row in rows:
        if row["mode"] == "socket":
            base = stock.get((row["loop"], row["connections"]))
            if base is not None:
                row["instructions_per_chunk_library"] = (
                    row["instructions_per_chunk_process"] - base["instructions_per_chunk_process"]
                )

    print(
        f"user-space instructions per {CHUNK} B chunk (callgrind, Δ of {args.mib} MiB "
        f"and {2 * args.mib} MiB phases)\n"
    )
    print(
        "| mode | loop | consumer | conns | chunks | deliveries | library/chunk | process/chunk |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        lib = r["instructions_per_chunk_library"]
        print(
            f"| {r['mode']} | {r['loop']} | {r['consumer']} | {r['connections']} | {r['chunks']} "
            f"| {r['deliveries']} | {'-' if lib is None else f'{lib:,.0f}'} "
            f"| {r['instructions_per_chunk_process']:,.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
