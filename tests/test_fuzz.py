"""Property-based fuzzing of every public entry point's parameters.

Each generated batch of cases runs in a child process (a crash there must not
take the test run with it). Every case passes one odd value to one parameter
and keeps the others sane. The only acceptable outcomes are success or an
exception of ours, asyncio's, OSError, TypeError or ValueError whose message
names the parameter or the value; a value that can never be valid must be
refused. A crash, a hang or any other exception fails the case.
"""

from __future__ import annotations

import importlib.util
import json
import selectors
import signal
import subprocess
import sys
from typing import Any

import pytest
from conftest import requires_copy_mode
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from isolation import TESTS, child_env

# Seconds one case may take in the child before it counts as a hang.
CASE_TIMEOUT = 5
CHILD_START_TIMEOUT = 120  # seconds to its first case (start-up and import)

# The child: reads a JSON list of cases on stdin, prints "start <i>" before
# and one JSON result line after each, so the parent can name the case that
# crashed or hung.
CHILD = r"""
import asyncio, json, math, os, resource, signal, socket, sys, tempfile

# A huge area must fail with an exception, not take the machine's memory.
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

import iouzcrx
from iouzcrx._socket_pool import SocketBufferPool

class Hang(BaseException):
    pass

def on_alarm(signum, frame):
    raise Hang()

signal.signal(signal.SIGALRM, on_alarm)
CASE_TIMEOUT = float(sys.argv[1])

listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(64)
PORT = listener.getsockname()[1]
held = []  # keeps sockets alive until the child exits

def tcp_pair():
    client = socket.create_connection(("127.0.0.1", PORT))
    server, _ = listener.accept()
    held.extend((client, server))
    return server

def build(spec):
    if isinstance(spec, dict):
        if "float" in spec:
            return float(spec["float"])
        if "bytes" in spec:
            return spec["bytes"].encode()
        kind = spec["obj"]
        if kind == "closed_socket":
            s = socket.socket()
            s.close()
            return s
        if kind == "listening_socket":
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(8)
            held.append(s)
            return s
        if kind == "bound_socket":
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
            return s
        if kind == "udp_socket":
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            held.append(s)
            return s
        if kind == "unix_socket":
            a, b = socket.socketpair()
            held.extend((a, b))
            return a
        if kind == "connected_socket":
            return tcp_pair()
        if kind == "file":
            f = tempfile.TemporaryFile()
            held.append(f)
            return f
        if kind == "file_fd":
            f = tempfile.TemporaryFile()
            held.append(f)
            return f.fileno()
        if kind == "unopened_fd":
            return 987654
        if kind == "closed_fd":
            fd = os.open("/dev/null", os.O_RDONLY)
            os.close(fd)
            return fd
        if kind == "object":
            return object()
        if kind == "closed_ring":
            r = iouzcrx.Ring()
            r.close()
            return r
        if kind == "not_callable":
            return 42
        raise KeyError(kind)
    return spec

def close_server(server):
    async def go():
        server.close()
        await asyncio.wait_for(server.wait_closed(), CASE_TIMEOUT)
    return go()

async def noop_cb(reader, writer):
    writer.close()

def run_case(case):
    entry, param, value = case["entry"], case["param"], build(case["value"])
    if entry == "Ring":
        iouzcrx.Ring(**{param: value}).close()
    elif entry == "Ring.wait":
        with iouzcrx.Ring() as ring:
            ring.wait(value)
    elif entry == "BufRingQueue":
        kw = {"area_size": 1 << 20, "buffer_size": 64 << 10}
        if param == "ring":
            iouzcrx.BufRingQueue(value, **kw)
            return
        kw[param] = value
        with iouzcrx.Ring() as ring:
            iouzcrx.BufRingQueue(ring, **kw)
    elif entry == "ZcrxQueue":
        kw = {"mode": "copy", "area_size": 1 << 20}
        if param == "ring":
            iouzcrx.ZcrxQueue(value, **kw)
            return
        kw[param] = value
        with iouzcrx.Ring() as ring:
            iouzcrx.ZcrxQueue(ring, **kw)
    elif entry in ("recv_multishot", "Receiver.get"):
        with iouzcrx.Ring() as ring:
            queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=64 << 10)
            kw = {}
            sock = tcp_pair()
            if entry == "recv_multishot":
                if param == "sock":
                    sock = value
                else:
                    kw[param] = value
            receiver = queue.recv_multishot(sock, **kw)
            if entry == "Receiver.get":
                receiver.get(value)
            else:
                ring.wait(0.05)
                ring.drain()
            receiver.close()
    elif entry == "SocketBufferPool":
        kw = {"area_size": 1 << 20, "buffer_size": 64 << 10}
        kw[param] = value
        SocketBufferPool(**kw)
    elif entry == "SocketBufferPool.ops":
        pool = SocketBufferPool(area_size=1 << 20, buffer_size=64 << 10)
        total = pool.total_buffers
        views = []
        for op, *args in value:
            try:
                if op == "take":
                    got = pool.take()
                    if got is not None:
                        views.append(got[1])
                elif op == "filled":
                    views.append(pool.filled(*args))
                elif op == "put_back":
                    pool.put_back(*args)
            except (TypeError, ValueError, IndexError, RuntimeError, iouzcrx.IouzcrxError):
                pass  # refused; the invariants below must hold still
            free, used = pool.free_buffers, pool.buffers_in_use
            if not (0 <= free <= total and 0 <= used <= total):
                raise AssertionError(
                    f"after {op}{tuple(args)}: free_buffers={free}, buffers_in_use={used}, "
                    f"total_buffers={total}"
                )
    else:
        loop_kind = case.get("loop", "asyncio")
        iouzcrx.run(run_async(entry, param, value), use_uvloop=loop_kind == "uvloop")

async def run_async(entry, param, value):
    if entry == "create_zcrx_server":
        kw = {"host": "127.0.0.1", "port": 0, "mode": "auto", "area_size": 1 << 20,
              "buffer_size": 64 << 10}
        factory = asyncio.Protocol
        if param == "protocol_factory":
            factory = value
        elif param == "sock":
            kw.pop("host"); kw.pop("port")
            kw["sock"] = value
        else:
            kw[param] = value
        host = kw.pop("host", None)
        port = kw.pop("port", None)
        server = await asyncio.wait_for(
            iouzcrx.create_zcrx_server(factory, host, port, **kw), CASE_TIMEOUT)
        await close_server(server)
    elif entry == "start_server":
        kw = {"host": "127.0.0.1", "port": 0, "mode": "auto", "area_size": 1 << 20,
              "buffer_size": 64 << 10}
        cb = noop_cb
        if param == "client_connected_cb":
            cb = value
        else:
            kw[param] = value
        server = await asyncio.wait_for(iouzcrx.start_server(cb, **kw), CASE_TIMEOUT)
        await close_server(server)
    elif entry == "open_connection":
        kw = {"host": "127.0.0.1", "port": PORT, "mode": "auto", "area_size": 1 << 20}
        kw[param] = value
        host, port = kw.pop("host"), kw.pop("port")
        reader, writer = await asyncio.wait_for(
            iouzcrx.open_connection(host, port, **kw), CASE_TIMEOUT)
        writer.close()
    else:
        raise KeyError(entry)

cases = json.loads(sys.stdin.read())
for i, case in enumerate(cases):
    print(f"start {i}", flush=True)
    signal.setitimer(signal.ITIMER_REAL, CASE_TIMEOUT)
    try:
        run_case(case)
        result = {"i": i, "outcome": "ok"}
    except Hang:
        result = {"i": i, "outcome": "hang"}
    except BaseException as exc:
        result = {"i": i, "outcome": "raised", "type": type(exc).__name__,
                  "mro": [c.__name__ for c in type(exc).__mro__],
                  "module": type(exc).__module__, "message": str(exc)}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(json.dumps(result), flush=True)
print("done", flush=True)
"""

# Exception types a refusal may have (by name, anywhere in the MRO); asyncio
# itself raises OverflowError for a port out of range, so it may too, naming
# the value.
ACCEPTED_TYPES = {"IouzcrxError", "OSError", "TypeError", "ValueError", "OverflowError"}
ACCEPTED_MODULES = ("iouzcrx", "asyncio")
REFUSED_ANYWAY = {"AssertionError", "AttributeError", "SystemError", "KeyError"}


def spec_words(spec: Any) -> list[str]:
    """Ways a message may name the value ``spec`` builds."""
    if isinstance(spec, dict):
        if "float" in spec:
            return [str(float(spec["float"])).lower()]
        if "bytes" in spec:
            return [repr(spec["bytes"].encode())]
        return {
            "closed_socket": ["fd=-1", "closed"],
            "listening_socket": ["listen"],
            "bound_socket": ["listen", "bound"],
            "udp_socket": ["SOCK_DGRAM", "stream", "UDP"],
            "unix_socket": ["AF_UNIX", "unix"],
            "file": ["socket", "file"],
            "file_fd": ["socket"],
            "unopened_fd": ["987654"],
            "closed_fd": ["not open", "closed", "bad file descriptor"],
            "object": ["object"],
            "closed_ring": ["closed"],
            "not_callable": ["42", "callable"],
            "connected_socket": [],
        }[spec["obj"]]
    if isinstance(spec, str):
        words = [spec, repr(spec)]
        if "\0" in spec:
            words += ["NUL", "null byte", "\\x00"]
        return words
    return [str(spec), repr(spec)]


def run_children(cases: list[dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Results by case index, and what went wrong outside any one result.
    A child that dies or stops answering is charged to the case it was
    running; the cases after it go to a new child."""
    results: dict[int, dict[str, Any]] = {}
    deaths: list[str] = []
    first = 0
    while first < len(cases):
        batch = cases[first:]
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(CASE_TIMEOUT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=TESTS,
            env=child_env(),
        )
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(batch))
        child.stdin.close()
        started = -1
        finished = False
        with selectors.DefaultSelector() as selector:
            selector.register(child.stdout, selectors.EVENT_READ)
            while True:
                # A case's own alarm fires after CASE_TIMEOUT; this is the
                # backstop for code that never returns to the interpreter.
                # Before its first case the child is starting the interpreter
                # and importing the library, which under emulation on a busy
                # machine can take longer than any case may.
                limit = CASE_TIMEOUT * 2 + 5 if started >= 0 else CHILD_START_TIMEOUT
                if not selector.select(limit):
                    child.kill()
                    break
                line = child.stdout.readline()
                if not line:
                    break
                if line.startswith("start "):
                    started = int(line.split()[1])
                elif line.startswith("{"):
                    result = json.loads(line)
                    results[first + result["i"]] = result
                elif line.strip() == "done":
                    finished = True
        child.wait()
        stderr = child.stderr.read() if child.stderr else ""
        if finished and child.returncode == 0:
            break
        culprit = first + max(started, 0)
        if culprit in results:  # died after answering: charge the next case
            culprit += 1
        if culprit >= len(cases):
            deaths.append(
                f"child exited with {child.returncode} after its last case: {stderr[-1500:]}"
            )
            break
        how = (
            "stopped answering"
            if child.returncode == -signal.SIGKILL
            else (f"died (exit {child.returncode})")
        )
        deaths.append(f"{describe(cases[culprit])}: the child {how}: {stderr[-1500:]}")
        first = culprit + 1
    return results, deaths


def describe(case: dict[str, Any]) -> str:
    return f"{case['entry']}({case['param']}={case['value']!r})"


def check_batch(cases: list[dict[str, Any]]) -> None:
    results, failures = run_children(cases)
    for i, case in enumerate(cases):
        if i not in results:
            continue
        problem = judge(case, results[i])
        if problem:
            failures.append(f"{describe(case)}: {problem}")
    assert not failures, "\n".join(failures)


def judge(case: dict[str, Any], result: dict[str, Any]) -> str | None:
    outcome = result["outcome"]
    if outcome == "hang":
        return f"no answer within {CASE_TIMEOUT} s"
    if outcome == "ok":
        if case["bad"]:
            return "silently accepted a value that can never be valid"
        return None
    name = result["type"]
    if name in REFUSED_ANYWAY or not (
        ACCEPTED_TYPES & set(result["mro"]) or result["module"].startswith(ACCEPTED_MODULES)
    ):
        return f"raised {name}: {result['message']}"
    message = result["message"]
    words = [case["param"], *spec_words(case["value"])]
    if not any(w and w.lower() in message.lower() for w in words):
        if case["bad"] or name in ("TypeError", "ValueError", "OverflowError"):
            return f"{name}({message!r}) names neither {case['param']!r} nor the value"
    return None


# -- values ---------------------------------------------------------------------------
# (spec, bad): bad marks values no parameter of that kind can accept.

NAN = {"float": "nan"}
WRONG_TYPES = [
    ("12", True),
    ({"bytes": "12"}, True),
    ([1], True),
    ({"obj": "object"}, True),
    ({"float": "1.5"}, True),
    (NAN, True),
    ({"float": "inf"}, True),
]
SIZES = [
    (-1, True),
    (-(2**63), True),
    (0, True),
    (1, False),
    (3, False),
    (4095, False),
    (4097, False),
    (5000, False),
    (1 << 20, False),
    (2**32 + 4096, False),
    (2**63 - 1, False),
    (2**64, False),
    (2**100, False),
    (None, True),
    *WRONG_TYPES,
]
COUNTS = [(v, b) for v, b in SIZES if v != 2**32 + 4096]
OPTIONAL_COUNTS = [(None, False) if v is None else (v, b) for v, b in COUNTS]
TIMEOUTS = [
    (-1, True),
    ({"float": "-0.5"}, True),
    (NAN, True),
    ({"float": "-inf"}, True),
    (0, False),
    ({"float": "0.01"}, False),
    ("0.1", True),
    ({"obj": "object"}, True),
]
SOCKETS = [
    ({"obj": "closed_socket"}, True),
    ({"obj": "listening_socket"}, True),
    ({"obj": "udp_socket"}, True),
    ({"obj": "unix_socket"}, False),
    ({"obj": "file"}, True),
    ({"obj": "file_fd"}, True),
    ({"obj": "unopened_fd"}, True),
    ({"obj": "closed_fd"}, True),
    (-1, True),
    (2**40, True),
    (None, True),
    ("3", True),
    ({"obj": "object"}, True),
]
SERVER_SOCKETS = [
    ({"obj": "closed_socket"}, True),
    ({"obj": "listening_socket"}, False),
    ({"obj": "bound_socket"}, False),
    ({"obj": "udp_socket"}, True),
    ({"obj": "unix_socket"}, False),  # asyncio serves AF_UNIX stream sockets too
    ({"obj": "file"}, True),
    (5, True),
    ({"obj": "object"}, True),
]
HOSTS = [
    ("127.0.0.1\x00evil", True),
    ("\x00", True),
    ("", False),
    ("no-such-host.invalid", False),
    ("999.1.1.1", False),
    (5, True),
    ({"bytes": "127.0.0.1"}, False),
    ({"obj": "object"}, True),
]
PORTS = [
    (-1, True),
    (65536, True),
    (65536 + 80, True),
    (2**64, True),
    ({"float": "80.5"}, True),
    (NAN, True),
    ("http", False),
    ("abc\x00", True),
    ({"obj": "object"}, True),
]
MODES = [
    ("", True),
    ("bogus", True),
    ("copy\x00", True),
    (None, True),
    (1, True),
    ("socket", False),
    ("bufring", False),
    ("zerocopy", False),
]
STRINGS = [("", False), ("eth\x00", True), ("x" * 300, False), (5, True), ("lo", False)]
CALLBACKS = [({"obj": "not_callable"}, True), ("print", True)]

PARAMS: dict[str, dict[str, list[tuple[Any, bool]]]] = {
    "Ring": {"sq_entries": COUNTS, "cq_entries": COUNTS},
    "Ring.wait": {"timeout": TIMEOUTS},
    "BufRingQueue": {
        "ring": [({"obj": "closed_ring"}, True), (None, True), ({"obj": "object"}, True)],
        "area_size": SIZES,
        "buffer_size": SIZES,
    },
    "ZcrxQueue": {
        "ring": [({"obj": "closed_ring"}, True), (None, True)],
        "mode": MODES,
        "interface": STRINGS,
        "queue": [(-1, True), (2**40, False), ("0", True), (NAN, True)],
        "area_size": SIZES,
        "rq_entries": OPTIONAL_COUNTS,
        "rx_buf_len": [(-1, True), (3, True), (4096, False), (8192, False), (NAN, True)],
    },
    "recv_multishot": {
        "sock": SOCKETS,
        "on_data": CALLBACKS,
        "on_end": CALLBACKS,
        "on_error": CALLBACKS,
    },
    "Receiver.get": {"timeout": TIMEOUTS},
    "SocketBufferPool": {"area_size": SIZES, "buffer_size": SIZES},
    "create_zcrx_server": {
        "host": HOSTS,
        "port": PORTS,
        "sock": SERVER_SOCKETS,
        "mode": MODES,
        "area_size": SIZES,
        "buffer_size": SIZES,
        "rq_entries": OPTIONAL_COUNTS,
        "queue": [(-1, True), ("0", True)],
        "interface": STRINGS,
        "backlog": [(-1, False), (2**40, True), ("5", True), (NAN, True)],
        "protocol_factory": CALLBACKS,
    },
    "start_server": {
        "host": HOSTS,
        "port": PORTS,
        "limit": [(0, True), (-1, True), (NAN, True), ("1", True)],
        "mode": MODES,
        "area_size": SIZES,
        "client_connected_cb": CALLBACKS,
    },
    "open_connection": {
        "host": HOSTS,
        "port": PORTS,
        "limit": [(0, True), (-1, True), (NAN, True)],
        "mode": MODES,
        "area_size": SIZES,
        "buffer_size": SIZES,
    },
}


# uvloop has no build for every Python (none for free-threaded 3.13).
LOOP_KINDS = ["asyncio", "uvloop"] if importlib.util.find_spec("uvloop") else ["asyncio"]


def cases_for(entry: str) -> st.SearchStrategy[dict[str, Any]]:
    options = [
        {"entry": entry, "param": param, "value": value, "bad": bad}
        for param, values in PARAMS[entry].items()
        for value, bad in values
    ]
    case = st.sampled_from(options)
    if entry in ("create_zcrx_server", "start_server", "open_connection"):
        return st.tuples(case, st.sampled_from(LOOP_KINDS)).map(
            lambda pair: {**pair[0], "loop": pair[1]}
        )
    return case


def every_case(entry: str) -> list[dict[str, Any]]:
    return [
        {"entry": entry, "param": param, "value": value, "bad": bad}
        for param, values in PARAMS[entry].items()
        for value, bad in values
    ]


FUZZ = settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    # Each example is a child process: shrinking would rerun dozens of them,
    # and every case of a batch is reported already.
    phases=[Phase.explicit, Phase.generate],
)


@pytest.mark.parametrize("entry", list(PARAMS))
def test_every_odd_value_is_accepted_or_refused_with_a_clear_exception(entry: str) -> None:
    """Every listed value of every parameter, once, in one child."""
    check_batch(every_case(entry))


@pytest.mark.vm
@requires_copy_mode
def test_zcrx_queue_odd_values_are_accepted_or_refused_clearly_where_copy_mode_runs() -> None:
    """The same cases where the kernel can register a copy-mode queue, so
    every value reaches the library's own checks."""
    check_batch(every_case("ZcrxQueue"))


@pytest.mark.parametrize("entry", ["create_zcrx_server", "start_server", "open_connection"])
@FUZZ
@given(data=st.data())
def test_odd_values_on_either_loop_are_accepted_or_refused_with_a_clear_exception(
    entry: str, data: st.DataObject
) -> None:
    """Random mixes of the cases on the stock loop and on uvloop."""
    check_batch(data.draw(st.lists(cases_for(entry), min_size=4, max_size=12)))


POOL_INDEXES = st.one_of(
    st.integers(min_value=-3, max_value=20),
    st.sampled_from([2**31, 2**63, -(2**63)]),
)
POOL_OPS = st.lists(
    st.one_of(
        st.just(["take"]),
        st.tuples(st.just("filled"), POOL_INDEXES, st.integers(-2, 1 << 17)).map(list),
        st.tuples(st.just("put_back"), POOL_INDEXES).map(list),
    ),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
    # Each example is a child process: shrinking would rerun dozens of them,
    # and every case of a batch is reported already.
    phases=[Phase.explicit, Phase.generate],
)
@given(batch=st.lists(POOL_OPS, min_size=8, max_size=8))
def test_socket_buffer_pool_keeps_its_counts_whatever_calls_it_gets(
    batch: list[list[list[Any]]],
) -> None:
    """take/filled/put_back in any order with any index: refused or applied,
    the pool never counts more free or used buffers than it has."""
    check_batch(
        [
            {"entry": "SocketBufferPool.ops", "param": "index", "value": ops, "bad": False}
            for ops in batch
        ]
    )
