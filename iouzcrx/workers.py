"""Many cores: ``workers=N`` processes, each with its own event loop, ring and
receive queue, sharing one port through ``SO_REUSEPORT``, under a supervisor.

    iouzcrx.serve(Sink, "0.0.0.0", 9000, workers=4, mode="auto")
    python -m iouzcrx serve mymodule:Sink --port 9000 --workers 4

The supervisor (the calling process) never makes a ring or a loop. It makes
one listening socket per worker (per address), bound with ``SO_REUSEPORT``
and listening in worker order, and keeps them all its life: worker i serves
socket i, inherited through ``fork()``. So port 0 resolves once, a worker
restarted after a crash serves the connections that queued on its socket
while it was down (instead of their being refused), and the kernel's
reuseport group keeps its order (it reorders the group when a member
closes), which the steering below relies on. It forks the workers,
restarts one that dies (with exponential backoff, so a worker that dies at
start does not spin), stops them on SIGTERM/SIGINT (each closes its server,
lets its connections drain for ``shutdown_timeout`` seconds, then aborts
the rest; a worker still alive after ``kill_timeout`` more seconds is
killed) and gathers the stats each worker writes to its own pipe as JSON
lines.

Steering (``interface=`` and ``queues=[...]``): the RX queues are split
among the workers, each owning a contiguous share (and registering zcrx
queues for it in zerocopy mode), and each connection is sent to the worker
owning the RX queue it arrives on. A classic BPF program on the reuseport
group does it in the kernel, for the SYN (``iouzcrx.steering``); a
connection that still reaches another worker (no program could be
attached, a queue it does not know) is handed over by the worker that
accepted it: the socket's ``SO_INCOMING_NAPI_ID`` names its RX queue
(``iouzcrx.netdev``), and the socket is sent over a unix seqpacket socket
(``SCM_RIGHTS``) to the owner, which serves it as if it had accepted it.

The application is inherited through ``fork()``: nothing is pickled, so
closures and lambdas work, and an ``"module:attribute"`` string is imported in
the supervisor before the workers are forked (an import error surfaces at
once, not N times). Anything a worker needs for itself (its loop, its ring,
database connections) is made after the fork: by the protocol factory, or by
``worker_init(index)``, which each worker calls before its loop exists.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import importlib
import inspect
import json
import logging
import math
import numbers
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from iouzcrx import steering as _steering
from iouzcrx.errors import InvalidConfiguration
from iouzcrx.loop import run as run_loop
from iouzcrx.netdev import QueueRouter
from iouzcrx.server import MAX_WORKERS, bound_sockets, check_workers, create_zcrx_server
from iouzcrx.streams import start_server

__all__ = ["MAX_WORKERS", "STEERING", "Supervisor", "WorkerStartError", "serve"]

log = logging.getLogger("iouzcrx")

# Exit status of a worker that failed before it served (bad options, a
# prerequisite missing): the supervisor reports it instead of retrying at once.
_EXIT_START_FAILED = 3

# create_zcrx_server options a worker passes on as given. The others are the
# supervisor's: every worker binds its own socket with SO_REUSEPORT, serves
# at once and runs on a loop of its own.
_SERVER_OPTIONS = frozenset(
    {
        "mode",
        "interface",
        "queue",
        "area_size",
        "rq_entries",
        "rx_buf_len",
        "buffer_size",
        "hugepages",
        "family",
        "flags",
        "backlog",
        "reuse_address",
        "limit",
    }
)
_REFUSED_OPTIONS = {
    "sock": "the supervisor binds a socket per worker to host:port with SO_REUSEPORT; "
    "pass host and port",
    "reuse_port": "workers always share the port with SO_REUSEPORT",
    "start_serving": "workers serve as soon as they are started",
    "ssl": "zero-copy receive sees the payload as the NIC wrote it; terminate TLS in front",
    "loop": "each worker makes its own loop after the fork (use_uvloop= chooses which)",
}

_PR_SET_PDEATHSIG = 1

# How connections reach the worker owning their RX queue (queues=):
# "auto" attaches the BPF program where the driver records RX queues and
# hands off whatever still lands elsewhere; "bpf" insists on the program
# (and hands off too); "handoff" only hands off; "none" leaves connections
# where the kernel's reuseport hash puts them.
STEERING = ("auto", "bpf", "handoff", "none")

# Connections handed over at once before a worker looks at its loop again.
_ADOPT_BATCH = 64

# Below this, stats reports keep a worker and the supervisor busy.
_MIN_STATS_INTERVAL = 0.01

# The longest single sleep of the supervisor: epoll takes its timeout in
# milliseconds as a C int, and a far deadline (a long backoff or drain) is
# simply waited for in several sleeps.
_MAX_POLL = 3600.0


class WorkerStartError(RuntimeError):
    """A worker failed before it served: the supervisor's start() stops the
    others and raises this, with the worker's own error in the message."""


def _resolve(app: Any) -> Any:
    """``app`` itself, or the object an ``"module:attribute"`` string names."""
    if not isinstance(app, str):
        if not callable(app):
            raise TypeError(
                "app must be a protocol factory, an async def handler(reader, writer) or a "
                f"'module:attribute' string naming one, not {app!r}"
            )
        return app
    module_name, sep, attribute = app.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"app {app!r} must be written 'module:attribute' (e.g. 'myapp:Sink')")
    module = importlib.import_module(module_name)
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"app {app!r}: module {module_name!r} has no {attribute!r}") from None
    if not callable(target):
        raise TypeError(f"app {app!r} names {target!r}, which is not callable")
    return target


def _seconds(name: str, value: Any, *, positive: bool = False, least: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    seconds = float(value)
    # Infinity would reach the selector's timeout (OverflowError mid-stop,
    # workers left running); a wait without end is timeout=None, not inf.
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        kind = "positive" if positive else "non-negative"
        raise InvalidConfiguration(
            f"{name} must be a finite {kind} number of seconds, not {value!r}"
        )
    if seconds < least:
        raise InvalidConfiguration(
            f"{name} must be at least {least} s, not {value!r}: shorter only burns CPU"
        )
    return seconds


def _listeners(
    host: Any, port: Any, workers: int, *, family: int, flags: int, backlog: int
) -> list[list[socket.socket]]:
    """Per worker, a listening socket per address ``host`` resolves to, all
    with ``SO_REUSEPORT``. They listen in worker order, which is their
    order in each address's reuseport group (the index a steering program
    returns)."""
    groups: list[list[socket.socket]] = []
    try:
        for _ in range(workers):
            bound = bound_sockets(
                host,
                port,
                family=family,
                flags=flags,
                reuse_address=True,
                reuse_port=True,
                one_port=True,
            )
            if not bound:
                raise OSError(errno.EADDRNOTAVAIL, f"host {host!r} resolves to no address")
            groups.append(bound)
            # A port-0 request resolves once: the others bind the same port.
            port = bound[0].getsockname()[1]
        for group in groups:
            for sock in group:
                sock.listen(backlog)
    except BaseException:
        for group in groups:
            for sock in group:
                sock.close()
        raise
    return groups


def _queue_shares(queues: Any, workers: int, interface: Any) -> list[tuple[int, ...]]:
    """``queues`` split into ``workers`` contiguous shares, in order."""
    if isinstance(queues, (str, bytes)) or not hasattr(queues, "__iter__"):
        raise TypeError(f"queues must be a list of RX queue indexes such as [0, 1], not {queues!r}")
    listed: list[int] = []
    seen: set[int] = set()
    for item in queues:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"queues must hold int RX queue indexes, not {item!r}")
        queue = int(item)
        listed.append(queue)
        if not 0 <= queue <= 0xFFFE:
            raise InvalidConfiguration(f"queues must hold RX queue indexes 0-65534, not {queue}")
        # Checked as they come: an endless iterator then ends within 65,535
        # items (a repeat or an index out of range) instead of never.
        if queue in seen:
            raise InvalidConfiguration(
                f"queues names an RX queue twice ({queue}): "
                f"{listed[:16]!r}{' ...' if len(listed) > 16 else ''}"
            )
        seen.add(queue)
    if not listed:
        raise InvalidConfiguration("queues= needs at least one RX queue index (or leave it out)")
    if interface is None:
        raise InvalidConfiguration(
            "queues= needs interface= (the NIC whose RX queues they are, e.g. 'eth0')"
        )
    # Checked here, before any fork, as create_zcrx_server checks it: the
    # steering set-up would otherwise fail on it without naming it.
    if not isinstance(interface, str):
        raise TypeError(f"interface must be a str such as 'eth0', not {interface!r}")
    if not interface or "\0" in interface or "/" in interface:
        raise InvalidConfiguration(f"interface {interface!r} is not a network interface name")
    if len(listed) < workers:
        raise InvalidConfiguration(
            f"workers={workers} but queues= lists {len(listed)} RX queue(s) {listed!r}: each "
            f"worker owns at least one queue; pass workers={len(listed) or 1} or more queues"
        )
    count = len(listed)
    return [
        tuple(listed[i * count // workers : (i + 1) * count // workers]) for i in range(workers)
    ]


class _Slot:
    """One worker position: the process now filling it and what it said."""

    def __init__(self, index: int, queues: tuple[int, ...] = ()) -> None:
        self.index = index
        self.queues = queues  # the RX queues it owns (queues=)
        self.pid: int | None = None  # the process now in the slot
        self.last_pid: int | None = None
        self.pidfd: int | None = None
        self.pipe: int | None = None  # read end of the worker's stats pipe
        self.pending = b""
        self.state = "idle"  # starting, serving, stopping, exited, waiting
        self.started = 0  # processes forked for this slot
        self.failures = 0  # quick deaths in a row
        self.ready_at: float | None = None
        self.restart_at: float | None = None
        self.returncode: int | None = None
        self.error: str | None = None
        self.counters: dict[str, Any] = {}

    def stats(self) -> dict[str, Any]:
        return {
            "worker": self.index,
            "pid": self.pid if self.pid is not None else self.last_pid,
            "state": self.state,
            "mode": self.counters.get("mode"),
            "connections": self.counters.get("connections", 0),
            "open": self.counters.get("open", 0),
            "bytes": self.counters.get("bytes", 0),
            "copied_bytes": self.counters.get("copied_bytes"),
            "zero_copy_share": self.counters.get("zero_copy_share"),
            "restarts": max(self.started - 1, 0),
            "aborted": self.counters.get("aborted", 0),
            "returncode": self.returncode,
            "error": self.error,
            "queues": list(self.queues),
            "steering": self.counters.get("steering", "none"),
            "steered": self.counters.get("steered", 0),
            "handed_off": self.counters.get("handed_off", 0),
            "adopted": self.counters.get("adopted", 0),
            "unsteerable": self.counters.get("unsteerable", 0),
        }


class Supervisor:
    """N worker processes serving ``app`` on ``host:port``.

    ``app`` is a protocol factory (a protocol class or any callable returning
    one: ``create_zcrx_server``), an ``async def handler(reader, writer)``
    (``start_server``), or a ``"module:attribute"`` string naming either.
    ``server_options`` are ``create_zcrx_server``'s (``mode``, ``interface``,
    ``queue``, ``area_size``, ``buffer_size``, ``backlog``, ...).

    ``queues=[...]`` (with ``interface=``) splits those RX queues among the
    workers, worker i owning a contiguous share (``stats()`` names it); in
    ``zerocopy``/``auto`` mode each worker registers zcrx queues for its
    share. ``steering`` (one of ``STEERING``) says how a connection reaches
    the worker owning its RX queue: ``"auto"`` (default) attaches a
    reuseport BPF program where the kernel takes it and hands off, over a
    unix socket, any connection still accepted by another worker;
    ``"bpf"`` insists on the program; ``"handoff"`` only hands off;
    ``"none"`` leaves the kernel's hash alone. More workers than queues is
    refused.

    ``start()`` forks the workers and returns once every one serves (or
    raises ``WorkerStartError``); ``wait()`` supervises; ``close()`` stops
    them gracefully; ``run()`` does all three and stops on SIGTERM/SIGINT
    (a second signal kills the workers at once). ``stats()`` gives each
    worker's pid, state, mode, connections, bytes and restarts.

    Timing: a worker drains its connections for ``shutdown_timeout`` seconds
    at shutdown, then aborts them; after ``kill_timeout`` more seconds it is
    killed. A worker that dies within ``min_uptime`` seconds of serving (or
    before) waits ``backoff`` seconds before its restart, doubled at each such
    death in a row up to ``max_backoff``. Workers report stats every
    ``stats_interval`` seconds, and ``on_event(dict)`` is called in the
    supervisor for each event (``listening``, ``started``, ``serving``,
    ``stats``, ``drained``, ``exited``, ``stopped``).
    """

    def __init__(
        self,
        app: Any,
        host: Any = None,
        port: Any = None,
        *,
        workers: int = 1,
        use_uvloop: bool | None = None,
        shutdown_timeout: float = 30.0,
        kill_timeout: float = 5.0,
        backoff: float = 0.1,
        max_backoff: float = 10.0,
        min_uptime: float = 5.0,
        stats_interval: float = 1.0,
        start_timeout: float = 60.0,
        worker_init: Callable[[int], object] | None = None,
        on_event: Callable[[dict[str, Any]], object] | None = None,
        queues: Any = None,
        steering: str = "auto",
        **server_options: Any,
    ) -> None:
        self._workers = check_workers(workers)
        for name, why in _REFUSED_OPTIONS.items():
            if name in server_options:
                raise TypeError(f"{name}= is not an option of a supervised server: {why}")
        unknown = sorted(set(server_options) - _SERVER_OPTIONS)
        if unknown:
            raise TypeError(
                f"unknown server option(s) {', '.join(unknown)}; the options are "
                f"{', '.join(sorted(_SERVER_OPTIONS))}"
            )
        if "limit" in server_options and not inspect.iscoroutinefunction(_resolve(app)):
            raise TypeError(
                "limit= is a stream option: it needs an async def handler(reader, writer)"
            )
        if steering not in STEERING:
            raise InvalidConfiguration(
                f"steering must be one of {', '.join(map(repr, STEERING))}, not {steering!r}"
            )
        self._shares: list[tuple[int, ...]] | None = None
        if queues is not None:
            if server_options.get("queue") is not None:
                raise InvalidConfiguration(
                    f"pass queue= or queues=, not both (queue={server_options['queue']!r}, "
                    f"queues={queues!r})"
                )
            self._shares = _queue_shares(queues, self._workers, server_options.get("interface"))
        elif (
            self._workers > 1
            and server_options.get("queue") is not None
            and server_options.get("mode") == "zerocopy"
        ):
            raise InvalidConfiguration(
                f"queue={server_options['queue']!r} with workers={self._workers}: an RX queue "
                "binds to one worker's ring only; pass queues=[...] to give each worker its own"
            )
        elif steering in ("bpf", "handoff"):
            raise InvalidConfiguration(
                f"steering={steering!r} needs queues=[...] and interface=: it sends each "
                "connection to the worker owning its RX queue"
            )
        self._steering = steering if self._shares is not None else "none"
        if use_uvloop is not None and not isinstance(use_uvloop, bool):
            raise TypeError(f"use_uvloop must be True, False or None, not {use_uvloop!r}")
        if worker_init is not None and not callable(worker_init):
            raise TypeError(f"worker_init must be callable or None, not {worker_init!r}")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be callable or None, not {on_event!r}")
        self._shutdown_timeout = _seconds("shutdown_timeout", shutdown_timeout)
        self._kill_timeout = _seconds("kill_timeout", kill_timeout)
        self._backoff = _seconds("backoff", backoff, positive=True)
        self._max_backoff = max(_seconds("max_backoff", max_backoff, positive=True), self._backoff)
        self._min_uptime = _seconds("min_uptime", min_uptime)
        self._stats_interval = _seconds(
            "stats_interval", stats_interval, positive=True, least=_MIN_STATS_INTERVAL
        )
        self._start_timeout = _seconds("start_timeout", start_timeout, positive=True)
        self._app = _resolve(app)
        self._streams = inspect.iscoroutinefunction(self._app)
        self._host = host
        self._port = port
        self._use_uvloop = use_uvloop
        self._worker_init = worker_init
        self._on_event = on_event
        self._options = server_options
        self._owner = os.getpid()
        self._slots = [
            _Slot(i, self._shares[i] if self._shares is not None else ())
            for i in range(self._workers)
        ]
        # Per worker: its listening sockets (one per address) and the
        # unix socket pair other workers hand its connections over on.
        self._listeners: list[list[socket.socket]] = []
        self._inboxes: list[tuple[socket.socket, socket.socket]] = []
        self._bpf: str | None = None  # why no steering program, when none
        self._in_force = "none"
        self._port_bound: int | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._lock = threading.Lock()
        self._holder: int | None = None  # the thread holding _lock
        self._state = "new"  # starting, running, stopping, closed
        self._stop_requested = False
        self._kill_requested = False
        self._kill_at: float | None = None

    def __repr__(self) -> str:
        return f"<Supervisor {self._state} workers={self._workers} port={self._port_bound}>"

    def __reduce__(self) -> Any:
        # A copy would share the workers, sockets and lock: closing it would
        # stop the original's workers behind the original's back.
        raise TypeError(
            "a Supervisor owns its worker processes and listening sockets: it cannot be "
            "copied or pickled; make another Supervisor (on another port) instead"
        )

    # -- public ------------------------------------------------------------------

    @property
    def workers(self) -> int:
        """The number of worker processes."""
        return self._workers

    @property
    def port(self) -> int | None:
        """The port the workers share (resolved when 0 was asked for), once
        started."""
        return self._port_bound

    @property
    def closed(self) -> bool:
        """Whether every worker has ended and the port is released."""
        return self._state == "closed"

    def stats(self) -> list[dict[str, Any]]:
        """Per worker: ``worker`` (index), ``pid``, ``state``, ``mode``,
        ``connections`` (accepted by its current process), ``open``,
        ``bytes`` (received by its current process, as of its last report),
        ``copied_bytes`` and ``zero_copy_share`` (of those bytes, what the
        kernel copied and the share it did not, from its zcrx counters: None
        where the kernel has none; 0.0 share in the copying modes),
        ``restarts``, ``aborted`` (connections cut at shutdown after
        ``shutdown_timeout``), ``returncode`` (of its last process) and
        ``error`` (why it last failed to start); with ``queues=``, its
        ``queues``, the ``steering`` in force in it, and of the connections
        its current process accepted or adopted: ``steered`` (accepted on
        one of its queues), ``handed_off`` (to the owner of theirs),
        ``adopted`` (handed to it) and ``unsteerable`` (no worker's queue,
        or the owner's inbox was full: served where they landed)."""
        return [slot.stats() for slot in self._slots]

    def start(self) -> None:
        """Bind the port, fork the workers and return once each serves.
        Raises ``WorkerStartError`` (after stopping the others) if one fails
        before it serves. A close() meanwhile (from ``on_event``, a signal
        handler or another thread) stops whatever started: start() then
        returns with the supervisor closed."""
        self._check_owner("start")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError(
                "start the supervisor outside any running event loop: workers are forked, "
                "and a forked child cannot use its parent's loop or ring"
            )
        if self._state != "new":  # before the lock: on_event may be asking
            raise RuntimeError(f"{self!r} was already started")
        with self._supervising("start"):
            if self._state != "new":
                raise RuntimeError(f"{self!r} was already started")
            if self._stop_requested:
                self._state = "closed"
                raise RuntimeError(f"{self!r} was closed before it started")
            # Not "new" any more: a close() from now on leaves the stop to
            # this method, which alone knows what it has made so far.
            self._state = "starting"
        try:
            self._start_unlocked()
        except BaseException:
            if self._state == "starting":
                # Failed before any fork (a bind, the steering set-up, an
                # on_event that raised SystemExit): let go of what it made.
                self._release_setup()
                self._state = "new"
            raise

    def _release_setup(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        wake_r, wake_w = self._wake_r, self._wake_w
        self._wake_r = self._wake_w = -1
        for fd in (wake_r, wake_w):
            if fd >= 0:
                _close_fd(fd)
        self._release_sockets()

    def _start_unlocked(self) -> None:
        backlog = self._options.get("backlog", 100)
        if isinstance(backlog, bool) or not isinstance(backlog, int):
            raise TypeError(f"backlog must be an int, not {backlog!r}")
        if not -(1 << 31) <= backlog < 1 << 31:
            # listen() takes a C int; the kernel caps it at somaxconn anyway.
            raise InvalidConfiguration(
                f"backlog {backlog} does not fit listen(): pass at most {(1 << 31) - 1}"
            )
        self._listeners = _listeners(
            self._host,
            self._port,
            self._workers,
            family=self._options.get("family", socket.AF_UNSPEC),
            flags=self._options.get("flags", socket.AI_PASSIVE),
            backlog=backlog,
        )
        self._port_bound = self._listeners[0][0].getsockname()[1]
        try:
            self._steer_setup()
        except BaseException:
            self._release_sockets()
            raise
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        except BaseException:
            self._release_sockets()
            raise
        addresses = [s.getsockname() for s in self._listeners[0]]
        self._emit(
            {
                "event": "listening",
                "port": self._port_bound,
                "addresses": addresses,
                "steering": self.steering,
                "steering_note": self._bpf,
                "queues": [list(slot.queues) for slot in self._slots],
            }
        )
        with self._supervising("start"):
            self._state = "running"
            try:
                if not self._stop_requested:
                    self._start_locked()
            except BaseException:
                # A fork that failed, a worker that could not start, Ctrl-C
                # without run()'s handlers: no worker outlives a failed start.
                self._finish_locked(force=True)
                raise
            if self._stop_requested:
                # close() came while starting: it only asked (the lock was
                # ours, or the state said "starting").
                self._finish_locked(force=self._kill_requested)

    @property
    def steering(self) -> str:
        """The steering in force once started: ``"bpf+handoff"`` (the
        kernel program, hand-off for the rest), ``"handoff"`` or
        ``"none"``."""
        return self._in_force

    @property
    def steering_note(self) -> str | None:
        """Why no steering program is attached, when none is (and queues=
        asks for steering)."""
        return self._bpf

    def _steer_setup(self) -> None:
        """The hand-off sockets and, where it can work, the BPF program."""
        if self._steering == "none":
            return
        assert self._shares is not None
        interface = self._options["interface"]
        # A misspelt interface would steer nothing, silently: refuse it.
        offset = _steering.queue_mapping_offset(interface)
        for _ in range(self._workers):
            # Seqpacket, not datagram: a datagram pair holds only
            # net.unix.max_dgram_qlen (10) messages, too few for a burst.
            inbox, outbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self._inboxes.append((inbox, outbox))
        self._in_force = "handoff"
        if self._steering == "handoff":
            self._bpf = "steering='handoff' asked for no program"
            return
        owners = {q: i for i, share in enumerate(self._shares) for q in share}
        try:
            program = _steering.steering_program(owners, offset=offset)
            for sock in self._listeners[0]:
                # One program per reuseport group, i.e. per address.
                _steering.attach_steering(sock, program)
        except (OSError, ValueError) as exc:
            if self._steering == "bpf":
                raise
            self._bpf = f"no steering program: {exc}"
            return
        self._in_force = "bpf+handoff"

    def _release_sockets(self) -> None:
        for group in self._listeners:
            for sock in group:
                sock.close()
        self._listeners = []
        for pair in self._inboxes:
            for sock in pair:
                sock.close()
        self._inboxes = []

    def _start_locked(self) -> None:
        for slot in self._slots:
            self._spawn(slot)
        deadline = time.monotonic() + self._start_timeout
        while not self._stop_requested:
            failed = [s for s in self._slots if s.ready_at is None and s.state == "waiting"]
            if failed:
                slot = failed[0]
                reason = slot.error or f"exit status {slot.returncode}"
                raise WorkerStartError(f"worker {slot.index} failed to start: {reason}")
            if all(s.ready_at is not None for s in self._slots):
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerStartError(
                    f"workers did not start within start_timeout={self._start_timeout} s"
                )
            self._poll(left)

    def wait(self, timeout: float | None = None) -> bool:
        """Supervise (restart, gather stats, carry out a requested stop) for
        up to ``timeout`` seconds, or until the supervisor is closed; returns
        whether it is closed."""
        self._check_owner("wait")
        deadline = None if timeout is None else time.monotonic() + _seconds("timeout", timeout)
        if self._state in ("new", "starting"):
            raise RuntimeError(f"{self!r} was not started: call start() first (and let it return)")
        with self._supervising("wait"):
            while self._state != "closed":
                if self._stop_requested:
                    self._finish_locked(force=self._kill_requested)
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._poll(left)
        return self._state == "closed"

    def close(self) -> None:
        """Stop every worker gracefully and release the port. Safe to call
        twice, from a signal handler, from another thread or in a forked
        child (where it only lets the child's copies go). If ``wait()`` or
        ``run()`` is supervising, close() asks it to stop and returns at
        once; otherwise it carries out the stop and returns when every
        worker has ended."""
        if os.getpid() != self._owner:
            self._forget_in_child()
            return
        self._request_stop(kill=False)
        if self._lock.acquire(blocking=False):
            self._holder = threading.get_ident()
            try:
                if self._state == "new":
                    self._state = "closed"
                elif self._state not in ("closed", "starting"):
                    self._finish_locked(force=self._kill_requested)
            finally:
                self._holder = None
                self._lock.release()

    def kill(self) -> None:
        """Stop at once: SIGKILL every worker, then release the port (as
        close() does, from any context)."""
        if os.getpid() != self._owner:
            self._forget_in_child()
            return
        self._request_stop(kill=True)
        for slot in self._slots:
            if slot.pid is not None and slot.state not in ("exited", "waiting", "idle"):
                _signal(slot.pid, signal.SIGKILL)
        self.close()

    def run(self) -> list[dict[str, Any]]:
        """start(), supervise until SIGTERM or SIGINT (in the main thread; a
        second signal kills the workers at once) or close(), stop; returns
        the final ``stats()``."""
        handlers: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                handlers[signum] = signal.signal(signum, self._on_signal)
        try:
            self.start()
            self.wait()
        finally:
            try:
                self.close()
            finally:
                for signum, handler in handlers.items():
                    signal.signal(signum, handler)
        return self.stats()

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests (signal-safe: set flags, write one byte) --------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_requested:
            self.kill()
        else:
            self.close()

    def _request_stop(self, *, kill: bool) -> None:
        self._stop_requested = True
        self._kill_requested = self._kill_requested or kill
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # full (a wake-up is pending anyway) or closed

    @contextlib.contextmanager
    def _supervising(self, what: str) -> Iterator[None]:
        """Hold the supervision lock; refuse a call from the thread that
        holds it (on_event or a signal handler run by the supervision
        itself), which would wait for itself for ever."""
        if self._holder == threading.get_ident():
            raise RuntimeError(
                f"Supervisor.{what}() from inside the supervision (an on_event callback or "
                "a signal handler it runs) would wait for itself: call close() or kill() "
                "there, which only ask"
            )
        with self._lock:
            self._holder = threading.get_ident()
            try:
                yield
            finally:
                self._holder = None

    def _check_owner(self, what: str) -> None:
        if os.getpid() != self._owner:
            raise RuntimeError(
                f"Supervisor.{what}() in a forked child: only the process that made the "
                "supervisor runs it (a child may only close() its copy)"
            )

    def _forget_in_child(self, keep: int | None = None) -> None:
        """In a forked child: close this process's copies of the
        supervisor's fds (but worker ``keep``'s sockets, and every worker's
        hand-off outbox, in that worker); the workers are not ours to
        signal."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._selector is not None:
            # The selector's epoll fd is this process's own copy.
            self._selector.close()
            self._selector = None
        for slot in self._slots:
            for fd in (slot.pipe, slot.pidfd):
                if fd is not None:
                    _close_fd(fd)
            slot.pipe = slot.pidfd = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                _close_fd(fd)
        self._wake_r = self._wake_w = -1
        for index, group in enumerate(self._listeners):
            if index != keep:
                for sock in group:
                    sock.close()
        for index, (inbox, outbox) in enumerate(self._inboxes):
            if index != keep:
                inbox.close()
            if keep is None:
                outbox.close()

    # -- supervision (under self._lock, in the supervising thread) -------------------

    def _emit(self, event: dict[str, Any]) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("iouzcrx: the supervisor's on_event callback failed")

    def _spawn(self, slot: _Slot) -> None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        # Signals stay blocked across fork so the child never runs the
        # supervisor's handlers; it installs its own before unblocking.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:
            code = 1
            try:
                os.close(read_end)
                code = self._worker_main(slot.index, write_end, blocked)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(write_end)
        os.set_blocking(read_end, False)
        slot.pid = pid
        slot.pipe = read_end
        slot.pending = b""
        slot.state = "starting"
        slot.started += 1
        slot.ready_at = None
        slot.restart_at = None
        slot.returncode = None
        slot.error = None
        slot.counters = {}
        assert self._selector is not None
        self._selector.register(read_end, selectors.EVENT_READ, ("pipe", slot))
        try:
            slot.pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            slot.pidfd = None  # before Linux 5.3: _poll() checks with waitpid()
        else:
            self._selector.register(slot.pidfd, selectors.EVENT_READ, ("exit", slot))
        self._emit({"event": "started", "worker": slot.index, "pid": pid})

    def _poll(self, timeout: float | None) -> None:
        now = time.monotonic()
        deadlines = [s.restart_at for s in self._slots if s.restart_at is not None]
        if self._kill_at is not None:
            deadlines.append(self._kill_at)
        if any(s.pid is not None and s.pidfd is None for s in self._slots):
            deadlines.append(now + 0.1)
        if deadlines:
            wait = max(min(deadlines) - now, 0.0)
            timeout = wait if timeout is None else min(timeout, wait)
        if timeout is not None:
            timeout = min(timeout, _MAX_POLL)
        assert self._selector is not None
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                continue
            kind, slot = key.data
            if kind == "pipe":
                self._read_pipe(slot)
            else:
                self._reap(slot, block=True)
        for slot in self._slots:
            if slot.pid is not None and slot.pidfd is None:
                self._reap(slot, block=False)
        now = time.monotonic()
        if self._kill_at is not None and now >= self._kill_at:
            self._kill_at = None
            for slot in self._slots:
                if slot.pid is not None:
                    log.warning(
                        "iouzcrx: worker %d (pid %d) did not stop in time: killed",
                        slot.index,
                        slot.pid,
                    )
                    _signal(slot.pid, signal.SIGKILL)
        if self._state == "running" and not self._stop_requested:
            for slot in self._slots:
                if slot.restart_at is not None and now >= slot.restart_at:
                    self._spawn(slot)

    def _read_pipe(self, slot: _Slot) -> None:
        if slot.pipe is None:
            return
        while True:
            try:
                data = os.read(slot.pipe, 65536)
            except BlockingIOError:
                return
            if not data:
                # The worker (and any child of its that held the pipe) is gone.
                assert self._selector is not None
                self._selector.unregister(slot.pipe)
                os.close(slot.pipe)
                slot.pipe = None
                break
            slot.pending += data
            *lines, slot.pending = slot.pending.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                self._on_message(slot, message)
        if slot.pending:
            slot.pending = b""

    def _on_message(self, slot: _Slot, message: dict[str, Any]) -> None:
        event = message.get("event")
        slot.counters.update(message.get("stats", {}))
        if event == "serving":
            slot.ready_at = time.monotonic()
            slot.state = "serving" if slot.state == "starting" else slot.state
            self._emit(
                {
                    "event": "serving",
                    "worker": slot.index,
                    "pid": slot.pid,
                    "mode": slot.counters.get("mode"),
                }
            )
        elif event == "failed":
            slot.error = message.get("error")
        elif event == "stats":
            self._emit({"event": "stats", **slot.stats()})
        elif event == "stopped":
            slot.counters["aborted"] = message.get("aborted", 0)
            self._emit({"event": "drained", **slot.stats()})

    def _reap(self, slot: _Slot, *, block: bool) -> None:
        if slot.pid is None:
            return
        try:
            pid, status = os.waitpid(slot.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid, status = slot.pid, 0  # reaped by someone else: its status is lost
        if pid == 0:
            return
        self._read_pipe(slot)  # whatever it wrote before it ended
        assert self._selector is not None
        if slot.pidfd is not None:
            self._selector.unregister(slot.pidfd)
            os.close(slot.pidfd)
            slot.pidfd = None
        if slot.pipe is not None:
            # A child of the worker may hold its pipe: stop listening to it.
            self._selector.unregister(slot.pipe)
            os.close(slot.pipe)
            slot.pipe = None
        returncode = os.waitstatus_to_exitcode(status)
        old_pid, slot.pid = slot.pid, None
        slot.last_pid = old_pid
        slot.returncode = returncode
        stopping = self._state != "running" or self._stop_requested
        event: dict[str, Any] = {
            "event": "exited",
            "worker": slot.index,
            "pid": old_pid,
            "returncode": returncode,
        }
        if slot.error:
            event["error"] = slot.error
        if stopping:
            slot.state = "exited"
        else:
            now = time.monotonic()
            quick = slot.ready_at is None or now - slot.ready_at < self._min_uptime
            slot.failures = slot.failures + 1 if quick else 1
            delay = min(self._max_backoff, self._backoff * 2 ** (slot.failures - 1))
            slot.state = "waiting"
            slot.restart_at = now + delay
            event["restart_in"] = delay
            log.warning(
                "iouzcrx: worker %d (pid %d) exited with %s%s; restarting in %.2f s",
                slot.index,
                old_pid,
                returncode,
                f" ({slot.error})" if slot.error else "",
                delay,
            )
        self._emit(event)

    def _finish_locked(self, *, force: bool) -> None:
        """Stop every worker (SIGTERM, or SIGKILL with ``force``), wait for
        each to end, release the port."""
        if self._state == "closed":
            return
        self._state = "stopping"
        for slot in self._slots:
            slot.restart_at = None
            if slot.state == "waiting":
                slot.state = "exited"  # its restart is cancelled
            if slot.pid is not None:
                slot.state = "stopping"
                _signal(slot.pid, signal.SIGKILL if force else signal.SIGTERM)
        self._kill_at = time.monotonic() + (
            0.0 if force else self._shutdown_timeout + self._kill_timeout
        )
        while any(slot.pid is not None for slot in self._slots):
            if self._kill_requested and self._kill_at is not None:
                self._kill_at = min(self._kill_at, time.monotonic())
            self._poll(None)
        for slot in self._slots:
            if slot.pipe is not None:
                _close_fd(slot.pipe)
                slot.pipe = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self._release_sockets()
        wake_r, wake_w = self._wake_r, self._wake_w
        self._wake_r = self._wake_w = -1
        for fd in (wake_r, wake_w):
            if fd >= 0:
                _close_fd(fd)
        self._state = "closed"
        self._emit({"event": "stopped", "workers": self.stats()})

    # -- the worker (in the forked child) --------------------------------------------

    def _worker_main(self, index: int, pipe: int, blocked: set[Any]) -> int:
        # The supervisor's fds are not the worker's to keep: another worker's
        # pipe held open here would hide that worker's death, another's
        # listening socket would be one it never accepts on.
        self._forget_in_child(keep=index)
        self._state = "worker"
        # SIGINT from a terminal reaches the whole group: the supervisor turns
        # it into one orderly SIGTERM per worker.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _die_with_parent(self._owner)
        # SIGTERM stays blocked (pending, if it comes) until the worker's
        # loop handles it: a stop while the worker boots is then a graceful
        # one, never a death by the signal's default action.
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked | {signal.SIGTERM})
        worker = _Worker(self, index, pipe, blocked)
        return run_loop(worker.serve(), use_uvloop=self._use_uvloop)


class _Worker:
    """What runs in one worker process: its loop, its server, its reports."""

    def __init__(self, supervisor: Supervisor, index: int, pipe: int, mask: set[Any]) -> None:
        self.supervisor = supervisor
        self.mask = mask
        self.index = index
        self.pipe = pipe
        self.connections = 0
        self.server: Any = None
        # Steering (queues=): the RX queue -> worker map, the router that
        # finds a socket's RX queue, this worker's inbox, every outbox.
        self.owners: dict[int, int] = {}
        self.router: QueueRouter | None = None
        self.inbox: socket.socket | None = None
        self.outboxes: list[socket.socket] = []
        self.steering = "none"
        self.steered = self.handed_off = self.adopted = self.unsteerable = 0

    def send(self, event: str, **fields: Any) -> None:
        fields["event"] = event
        line = json.dumps(fields, default=str).encode() + b"\n"
        try:
            os.write(self.pipe, line)  # under PIPE_BUF: one atomic write
        except OSError:
            pass  # the supervisor is gone; PR_SET_PDEATHSIG stops us

    def counters(self) -> dict[str, Any]:
        server = self.server
        stats: dict[str, Any] = {
            "connections": self.connections,
            "steering": self.steering,
            "steered": self.steered,
            "handed_off": self.handed_off,
            "adopted": self.adopted,
            "unsteerable": self.unsteerable,
        }
        if server is None:
            return stats
        stats["mode"] = server.mode
        stats["open"] = len(server._connections)
        try:
            # Over every queue the worker owns, with the kernel's copy counters.
            zero_copy = server.stats()["zero_copy"]
        except Exception:
            return stats
        stats["bytes"] = zero_copy["bytes_received"]
        stats["copied_bytes"] = zero_copy["copied_bytes"]
        stats["zero_copy_share"] = zero_copy["zero_copy_share"]
        return stats

    def application(self) -> Any:
        app = self.supervisor._app
        if self.supervisor._streams:

            async def handler(reader: Any, writer: Any) -> None:
                self.connections += 1
                await app(reader, writer)

            return handler

        def factory() -> Any:
            protocol = app()
            self.connections += 1
            return protocol

        return factory

    async def serve(self) -> int:

        supervisor = self.supervisor
        loop = asyncio.get_running_loop()
        stop = loop.create_future()

        def request_stop() -> None:
            if not stop.done():
                stop.set_result(None)

        loop.add_signal_handler(signal.SIGTERM, request_stop)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        try:
            if supervisor._worker_init is not None:
                supervisor._worker_init(self.index)
            make = start_server if supervisor._streams else create_zcrx_server
            args: tuple[Any, ...] = (self.application(),)
            if make is create_zcrx_server:
                args = (loop, *args)
            first, *others = supervisor._listeners[self.index]
            self.server = await make(
                *args, sock=first, start_serving=False, **self.server_options()
            )
            # Every address's socket of this worker: create_zcrx_server
            # takes one as sock=.
            for sock in others:
                sock.setblocking(False)
                self.server._sockets.append(sock)
            self.start_steering(loop)
            await self.server.start_serving()
        except (Exception, SystemExit) as exc:
            traceback.print_exc()
            self.send("failed", error=f"{type(exc).__name__}: {exc}")
            return _EXIT_START_FAILED
        server = self.server
        self.send("serving", stats=self.counters(), refused=server.refused)
        reporter = loop.create_task(self.report_every(supervisor._stats_interval))
        try:
            await stop
        finally:
            reporter.cancel()
        server.close()
        self.stop_steering(loop)
        aborted = 0
        if not await self.drained(supervisor._shutdown_timeout):
            aborted = len(server._connections)
            server.abort_clients()
            await self.drained(supervisor._kill_timeout)
        self.send("stopped", stats=self.counters(), aborted=aborted)
        return 0

    def server_options(self) -> dict[str, Any]:
        options = dict(self.supervisor._options)
        share = self.supervisor._slots[self.index].queues
        if share:
            if options.get("mode", "auto") in ("auto", "zerocopy"):
                options["queues"] = list(share)
            else:
                # The queues only say which connections are this worker's:
                # the other modes bind no NIC queue.
                options.pop("interface", None)
        return options

    def start_steering(self, loop: asyncio.AbstractEventLoop) -> None:
        supervisor = self.supervisor
        if supervisor._steering == "none":
            return
        assert supervisor._shares is not None
        in_kernel = supervisor._in_force == "bpf+handoff"
        if self.server.mode == "socket":
            # The loop accepts natively: no connection passes here first.
            self.steering = "bpf" if in_kernel else "none"
            return
        self.steering = "bpf+handoff" if in_kernel else "handoff"
        self.owners = {q: i for i, share in enumerate(supervisor._shares) for q in share}
        self.router = QueueRouter(supervisor._options["interface"], self.owners)
        self.inbox = supervisor._inboxes[self.index][0]
        self.outboxes = [outbox for _inbox, outbox in supervisor._inboxes]
        self.inbox.setblocking(False)
        loop.add_reader(self.inbox.fileno(), self.adopt)
        self.server._steer = self.steer
        self.adopt()  # handed over while this worker was down

    def stop_steering(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.inbox is None:
            return
        self.adopt()  # already accepted: served, not dropped
        loop.remove_reader(self.inbox.fileno())

    def steer(self, conn: socket.socket) -> bool:
        """Whether ``conn`` was handed to the worker owning its RX queue."""
        assert self.router is not None
        queue, _napi_id = self.router.route(conn)
        owner = self.owners.get(queue) if queue is not None else None
        if owner is None:
            self.unsteerable += 1
            return False
        if owner == self.index:
            self.steered += 1
            return False
        try:
            socket.send_fds(self.outboxes[owner], [b"c"], [conn.fileno()], socket.MSG_DONTWAIT)
        except OSError:
            # The owner's inbox is full (it is down or far behind): serve
            # it here rather than drop it.
            self.unsteerable += 1
            return False
        conn.close()
        self.handed_off += 1
        return True

    def adopt(self) -> None:
        """Serve the connections other workers handed over."""
        assert self.inbox is not None and self.server is not None
        for _ in range(_ADOPT_BATCH):
            try:
                _data, fds, _flags, _address = socket.recv_fds(
                    self.inbox, 16, 4, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the supervisor closed the pair: stopping
            for fd in fds:
                conn = socket.socket(fileno=fd)
                conn.setblocking(False)
                self.adopted += 1
                self.server._new_connection(conn, steerable=False)
        # More may be waiting: the reader fires again while any are.

    async def report_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.send("stats", stats=self.counters())

    async def drained(self, timeout: float) -> bool:
        """Whether the closed server's connections all ended within
        ``timeout`` seconds."""
        server = self.server
        if not server._connections:
            return True
        # The server resolves its waiters once closed with no connection left
        # (on every Python, unlike wait_closed() before 3.12.1).
        waiter = asyncio.get_running_loop().create_future()
        server._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            return False
        return True


def serve(app: Any, host: Any = None, port: Any = None, **options: Any) -> list[dict[str, Any]]:
    """Serve ``app`` on ``host:port`` from ``workers=N`` processes until
    SIGTERM or SIGINT, then stop them gracefully; returns each worker's final
    stats. The options are ``Supervisor``'s (``workers``, ``use_uvloop``,
    ``shutdown_timeout``, ...) and ``create_zcrx_server``'s (``mode``,
    ``area_size``, ...)."""
    return Supervisor(app, host, port, **options).run()


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # ended already; its exit is being reaped


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM (a graceful stop) if the supervisor dies,
    so that a killed supervisor leaves no worker behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl() took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _queue_list(text: str) -> list[int]:
    """``0-3,8`` -> [0, 1, 2, 3, 8]."""
    queues: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a list of RX queues such as 0-7 or 0,2,4"
            ) from None
        if high < low:
            raise argparse.ArgumentTypeError(f"queue range {part!r} runs backwards")
        queues.extend(range(low, high + 1))
    return queues


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port: use 0 to 65535")
    return port


def main(argv: list[str] | None = None) -> int:
    """``python -m iouzcrx serve MODULE:APP [options]``."""
    from iouzcrx.modes import MODES

    parser = argparse.ArgumentParser(
        prog="python -m iouzcrx serve",
        description="Serve a protocol factory or an async def handler(reader, writer) from "
        "N worker processes sharing the port (SO_REUSEPORT), until SIGTERM or Ctrl-C.",
    )
    parser.add_argument("app", help="MODULE:ATTRIBUTE, e.g. examples.serve_workers:Digest")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1")
    parser.add_argument(
        "--port", type=port_number, default=9000, help="0 to 65535 (default 9000; 0 picks one)"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    parser.add_argument("--mode", choices=("auto", *MODES), default="auto")
    parser.add_argument("--interface", help="NIC for zerocopy mode")
    parser.add_argument("--queue", type=int, help="NIC RX queue for zerocopy mode")
    parser.add_argument(
        "--queues",
        type=_queue_list,
        metavar="LIST",
        help="RX queues of --interface split among the workers, e.g. 0-7 or 0,2,4",
    )
    parser.add_argument(
        "--steering",
        choices=STEERING,
        default="auto",
        help="how connections reach the worker owning their RX queue (with --queues)",
    )
    parser.add_argument("--area", type=int, help="receive area per worker, MiB")
    parser.add_argument("--backlog", type=int, default=100)
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), help="default: uvloop if installed"
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long connections may drain at shutdown (default 30)",
    )
    parser.add_argument(
        "--kill-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="after the drain, how long a worker may take to exit before SIGKILL (default 5)",
    )
    parser.add_argument(
        "--backoff",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="first restart delay after a crash, doubled per crash in a row",
    )
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="longest restart delay (default 10)",
    )
    parser.add_argument("--stats-interval", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument(
        "--init",
        metavar="MODULE:ATTRIBUTE",
        help="called in each worker with its index before its loop exists",
    )
    parser.add_argument("--json", action="store_true", help="print every event as a JSON line")
    args = parser.parse_args(argv)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, "")  # MODULE:ATTRIBUTE from the working directory
    options: dict[str, Any] = {"mode": args.mode, "backlog": args.backlog}
    if args.interface is not None:
        options["interface"] = args.interface
    if args.queue is not None:
        options["queue"] = args.queue
    if args.queues is not None:
        options["queues"] = args.queues
        options["steering"] = args.steering
    if args.area is not None:
        options["area_size"] = args.area << 20

    def on_event(event: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(event, default=str), flush=True)
            return
        kind = event["event"]
        if kind == "listening":
            print(f"listening on port {event['port']}: {event['addresses']}", flush=True)
            if event["steering"] != "none" or event["steering_note"]:
                print(
                    f"queues per worker {event['queues']}, steering {event['steering']}"
                    + (f" ({event['steering_note']})" if event["steering_note"] else ""),
                    flush=True,
                )
        elif kind == "serving":
            print(
                f"worker {event['worker']} (pid {event['pid']}) serving, mode {event['mode']}",
                flush=True,
            )
        elif kind == "exited":
            restart = event.get("restart_in")
            print(
                f"worker {event['worker']} (pid {event['pid']}) exited with "
                f"{event['returncode']}"
                + (f", restarting in {restart:.2f} s" if restart is not None else ""),
                flush=True,
            )
        elif kind == "stopped":
            for w in event["workers"]:
                steered = (
                    f", steering {w['steering']}: {w['steered']} steered, {w['handed_off']} "
                    f"handed off, {w['adopted']} adopted, {w['unsteerable']} unsteerable"
                    if w["queues"]
                    else ""
                )
                print(
                    f"worker {w['worker']}: mode {w['mode']}, {w['connections']} connections, "
                    f"{w['bytes']} bytes, {w['restarts']} restarts, exit "
                    f"{w['returncode']}{steered}",
                    flush=True,
                )

    try:
        supervisor = Supervisor(
            args.app,
            args.host,
            args.port,
            workers=args.workers,
            use_uvloop=None if args.loop is None else args.loop == "uvloop",
            shutdown_timeout=args.shutdown_timeout,
            kill_timeout=args.kill_timeout,
            backoff=args.backoff,
            max_backoff=args.max_backoff,
            stats_interval=args.stats_interval,
            worker_init=None if args.init is None else _resolve(args.init),
            on_event=on_event,
            **options,
        )
        final = supervisor.run()
    except (WorkerStartError, TypeError, ValueError, ImportError, OSError) as exc:
        print(f"python -m iouzcrx serve: {exc}", file=sys.stderr)
        return 1
    return 0 if all(w["returncode"] == 0 for w in final) else 1
