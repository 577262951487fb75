"""Shared test support: loopback connections, deterministic senders and a
byte-exact verifier, and the receive modes this kernel can run.

Modes that need a newer kernel skip here with the reason and run for real in
the VM (``tests/vm/run``), where ``IOUZCRX_VM=1``.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import random
import socket
import struct
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_asyncio

import iouzcrx
import iouzcrx.loop
from iouzcrx.reactor import _reactors
from iouzcrx.server import ZcrxServer

FEATURES = iouzcrx.kernel_features()

# The package's Cython modules (setup.py's MODULES).
COMPILED_MODULES = (
    "_ring",
    "_area",
    "_receive",
    "_zcrx",
    "_bufring",
    "_socket_pool",
    "_probe",
    "_reader",
    "_readiness",
    "_transport",
)
IN_VM = os.environ.get("IOUZCRX_VM") == "1"

COPY_MODE_REASON = (
    f"copy mode needs ZCRX_REG_NODEV (Linux >= 7.1); this kernel is {FEATURES.release}. "
    "It runs in the VM: tests/vm/run"
)
requires_copy_mode = pytest.mark.skipif(not FEATURES.zcrx_nodev, reason=COPY_MODE_REASON)

# Receive modes of the engine. 'copy' carries the vm mark so tests/vm/run
# selects it; on a kernel without NODEV it skips with the reason.
RECEIVE_MODES = [
    pytest.param("bufring", id="bufring"),
    pytest.param("copy", id="copy", marks=[pytest.mark.vm, requires_copy_mode]),
]

# Full-size transfers on the host; the VM emulates its CPU (TCG), so it moves
# less data through the same tests.
SCALE = 16 if IN_VM else 1


@pytest.fixture(scope="session")
def nsim() -> Iterator[Any]:
    """The simulated NIC (tests/nsim.py), set up once for every test file of
    the session that asks for it; flows go to RX queue 0 until a test steers
    them elsewhere."""
    import nsim as simulated

    if not IN_VM:
        pytest.skip("the simulated NIC is loaded in the VM only: tests/vm/run")
    ko = os.environ.get(simulated.KO_ENV)
    if not ko:
        pytest.skip(
            f"{simulated.KO_ENV} is not set: build the module with tests/vm/netdevsim/build "
            f"and set {simulated.KO_ENV} to the path it prints"
        )
    try:
        nic = simulated.up(ko)
    except simulated.NsimUnavailable as exc:
        pytest.fail(str(exc))
    try:
        simulated.steer(nic, 0)
        yield nic
    finally:
        simulated.down()


def make_queue(
    ring: iouzcrx.Ring, mode: str, *, area_size: int = 8 << 20, buffer_size: int = 64 << 10, **kw
) -> iouzcrx.ReceiveQueue:
    """A receive queue of ``mode`` with about ``area_size`` bytes of area."""
    if mode == "bufring":
        return iouzcrx.BufRingQueue(ring, area_size=area_size, buffer_size=buffer_size, **kw)
    # zcrx chunks are pages (or rx_buf_len): buffer_size is a bufring notion.
    return iouzcrx.ZcrxQueue(ring, mode=mode, area_size=area_size, **kw)


@pytest.fixture
def ring() -> Iterator[iouzcrx.Ring]:
    with iouzcrx.Ring() as r:
        yield r


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(1024)
    yield ls
    ls.close()


def connect_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(client, server) ends of a fresh loopback TCP connection."""
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return client, server


class Pattern:
    """A deterministic byte stream per seed: a 1 MiB random block, repeated."""

    BLOCK = 1 << 20

    def __init__(self, seed: int) -> None:
        block = random.Random(seed).randbytes(self.BLOCK)
        self.doubled = block + block  # any slice up to BLOCK long is contiguous

    def expected(self, pos: int, n: int) -> bytes:
        start = pos % self.BLOCK
        return self.doubled[start : start + n]

    def chunks(self, total: int, size: int = 256 << 10) -> Iterator[memoryview]:
        view = memoryview(self.doubled)
        pos = 0
        while pos < total:
            n = min(size, total - pos, self.BLOCK)
            start = pos % self.BLOCK
            yield view[start : start + n]
            pos += n


class Verifier:
    """Checks that views arrive as exactly the pattern's bytes, in order."""

    def __init__(self, seed: int) -> None:
        self.pattern = Pattern(seed)
        self.pos = 0

    def feed(self, view: memoryview) -> None:
        data = view.tobytes()
        done = 0
        while done < len(data):
            n = min(len(data) - done, Pattern.BLOCK)
            expected = self.pattern.expected(self.pos, n)
            if data[done : done + n] != expected:
                raise AssertionError(f"stream corrupted at byte {self.pos}")
            self.pos += n
            done += n


class Sender(threading.Thread):
    """Sends ``total`` pattern bytes on ``sock`` from a thread, then closes
    (or resets, with ``reset=True``) the connection."""

    def __init__(self, sock: socket.socket, seed: int, total: int, *, reset: bool = False):
        super().__init__(daemon=True)
        self.sock = sock
        self.seed = seed
        self.total = total
        self.reset = reset
        self.sent = 0
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def run(self) -> None:
        try:
            for chunk in Pattern(self.seed).chunks(self.total):
                self.sock.sendall(chunk)
                self.sent += len(chunk)
            if self.reset:
                # l_onoff=1, l_linger=0: close() sends RST instead of FIN.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except BaseException as exc:  # reported by the test through .error
            self.error = exc
        finally:
            self.sock.close()
            self.finished.set()


def receive_all(receiver: iouzcrx.Receiver, verifier: Verifier, timeout: float = 60.0) -> int:
    """Feed every view until EOF to ``verifier``; returns the byte count."""
    total = 0
    while True:
        view = receiver.get(timeout)
        if view is None:
            return total
        verifier.feed(view)
        total += len(view)
        view.release()


# -- the resource check around every asyncio test ----------------------------------
#
# As uvloop's test base does: a test fails if it reached the loop's default
# exception handler without saying it expects to, or if it leaves buffers
# out, ring requests in flight, or file descriptors open once its loop is
# closed. The loops are subclasses of iouzcrx's own, so the library code under
# test is exactly what users run.


class _LoopCheck:
    """What one asyncio test's loops did, gathered for its teardown."""

    def __init__(self) -> None:
        self.handler_calls: list[dict[str, Any]] = []
        self.reactors: list[Any] = []
        # Open servers are held, so one the test dropped unclosed is still
        # there to be found; closing one lets it go.
        self.open_servers: list[Any] = []
        self.closed_servers: weakref.WeakSet[Any] = weakref.WeakSet()
        self.problems: list[str] = []


_current_check: _LoopCheck | None = None

# Loop iterations (with a GC pass before each) that a closing loop gets to
# reap the cancellations its closed servers and transports queued.
_SETTLE_ITERATIONS = 20


def _settle_and_inspect(loop: asyncio.AbstractEventLoop) -> None:
    """Before the loop closes: let it settle, then record any buffer still
    out and any ring request still in flight."""
    check = _current_check
    if check is None or loop.is_running() or loop.is_closed():
        return
    reactor = _reactors.get(loop)
    if reactor is not None and reactor not in check.reactors:
        check.reactors.append(reactor)

    def busy() -> bool:
        for r in check.reactors:
            ring = getattr(r, "ring", None)
            if ring is not None and not ring.closed and ring.in_flight:
                return True
        return any(b.buffers_in_use for b in _backends(check))

    for _ in range(_SETTLE_ITERATIONS):
        if not busy():
            break
        gc.collect()
        loop.run_until_complete(asyncio.sleep(0))
    for server in check.open_servers:
        check.problems.append(f"{server!r} was never closed")
    for r in check.reactors:
        ring = getattr(r, "ring", None)
        if ring is not None and not ring.closed and ring.in_flight:
            check.problems.append(
                f"{ring.in_flight} ring request(s) still in flight when the loop closed"
            )
    for backend in _backends(check):
        if backend.buffers_in_use:
            check.problems.append(
                f"{backend.buffers_in_use} buffer(s) of {backend!r} (mode "
                f"{getattr(backend, 'mode', '?')}) not returned when the loop closed"
            )


def _backends(check: _LoopCheck) -> list[Any]:
    """Every receive backend the test's servers and clients used, once each."""
    found: list[Any] = []
    candidates = [s.backend for s in [*check.open_servers, *check.closed_servers]]
    for r in check.reactors:
        candidates.extend(getattr(r, "client_backends", {}).values())
    for backend in candidates:
        backend = getattr(backend, "backend", backend)  # a ModeSelection
        if backend is not None and not any(backend is b for b in found):
            found.append(backend)
    return found


class _CheckedLoopMixin:
    """Records what reaches the default exception handler and inspects the
    loop's resources before it closes."""

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        if _current_check is not None:
            _current_check.handler_calls.append(context)
        super().default_exception_handler(context)  # type: ignore[misc]

    def close(self) -> None:
        _settle_and_inspect(self)  # type: ignore[arg-type]
        super().close()  # type: ignore[misc]


class _CheckedSelectorLoop(_CheckedLoopMixin, iouzcrx.loop.SelectorEventLoop):
    pass


if iouzcrx.loop.uvloop_available():

    class _CheckedUVLoop(_CheckedLoopMixin, iouzcrx.loop.UVLoop):  # type: ignore[misc]
        pass

else:
    # uvloop has no build for every Python (none for free-threaded 3.13):
    # there every test that runs on uvloop skips, saying so.
    _CheckedUVLoop = None  # type: ignore[assignment, misc]
    NO_UVLOOP_REASON = "uvloop is not installed for this Python (it has no build for it)"

    def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
        for item in items:
            callspec = getattr(item, "callspec", None)
            ids = callspec.id.split("-") if callspec is not None else []
            params = getattr(callspec, "params", {})
            if "uvloop" in ids or "uvloop" in params.values() or params.get("use_uvloop"):
                item.add_marker(pytest.mark.skip(reason=NO_UVLOOP_REASON))


def _track_servers() -> None:
    """Remember every server built while a check is active: their backends
    are checked for buffers at loop close, and each must have been closed."""
    init = ZcrxServer.__init__
    close = ZcrxServer.close

    def tracking_init(self: ZcrxServer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if _current_check is not None:
            _current_check.open_servers.append(self)

    def tracking_close(self: ZcrxServer) -> None:
        close(self)
        check = _current_check
        if check is not None and any(s is self for s in check.open_servers):
            check.open_servers = [s for s in check.open_servers if s is not self]
            check.closed_servers.add(self)

    ZcrxServer.__init__ = tracking_init  # type: ignore[method-assign]
    ZcrxServer.close = tracking_close  # type: ignore[method-assign]


_track_servers()

# libuv opens a process-wide pipe pair with the first loop, for good: open it
# now so that no test's fd count includes it.
if iouzcrx.loop.uvloop_available():
    iouzcrx.new_event_loop(use_uvloop=True).close()


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory's own fd, gone already
    return fds


@pytest.fixture
def exception_handler_calls() -> list[dict[str, Any]]:
    """The contexts that reached the loop's default exception handler; a test
    that asks for them expects such calls and is not failed for them."""
    assert _current_check is not None, "only for asyncio tests"
    return _current_check.handler_calls


@pytest.fixture(autouse=True)
def _loop_resource_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Around every asyncio test: see the module comment above. Set up before
    pytest-asyncio's runner, so this teardown runs after the loop closed."""
    global _current_check
    if not pytest_asyncio.is_async_test(request.node):
        yield
        return
    gc.collect()
    fds_before = _open_fds()
    check = _current_check = _LoopCheck()
    try:
        yield
    finally:
        _current_check = None
    gc.collect()
    problems = list(check.problems)
    expected = "exception_handler_calls" in request.fixturenames or request.node.get_closest_marker(
        "allow_exception_handler"
    )
    if check.handler_calls and not expected:
        calls = collections.Counter(
            f"{c.get('message')!r} ({c.get('exception')!r})" for c in check.handler_calls
        )
        problems.append(
            "the loop's exception handler was called: "
            + "; ".join(f"{n} x {call}" for call, n in calls.items())
            + " (mark the test allow_exception_handler if that is expected)"
        )
    leaked = {fd: target for fd, target in _open_fds().items() if fd not in fds_before}
    if leaked:
        problems.append(
            "file descriptors left open after the loop closed: "
            + ", ".join(f"{fd} -> {target}" for fd, target in sorted(leaked.items()))
        )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Every asyncio test runs on the stock selector loop and on uvloop
    (iouzcrx's loops, checked by ``_loop_resource_check``)."""
    return {
        "asyncio": _CheckedSelectorLoop,
        "uvloop": _CheckedUVLoop or _CheckedSelectorLoop,  # skipped without uvloop
    }


# Modes of the asyncio layer: socket works anywhere, bufring wherever
# io_uring does, copy in the VM.
SERVER_MODES = [
    pytest.param("bufring", id="bufring"),
    pytest.param("socket", id="socket"),
    pytest.param("copy", id="copy", marks=[pytest.mark.vm, requires_copy_mode]),
]
