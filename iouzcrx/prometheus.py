"""Prometheus exporter for a server's receive counters (optional).

Install the extra (``pip install iouzcrx[prometheus]``), then, on the loop
that runs the server::

    from iouzcrx.prometheus import start_exporter

    server = await loop.create_zcrx_server(...)   # or iouzcrx.create_zcrx_server
    exporter = start_exporter(server, port=9464)   # http://HOST:9464/metrics
    ...
    exporter.close()                               # stops serving, unregisters

Every metric carries a ``queue`` label (the RX queue index in zerocopy mode
with several queues, else ``"main"``) and a ``mode`` label. The ones that
show whether zero copy happens come from the kernel's own zcrx counters
(Linux 7.2+): ``iouzcrx_kernel_copied_bytes_total`` against
``iouzcrx_received_bytes_total``, and ``iouzcrx_zero_copy_ratio``. Where the
kernel keeps no such counters they are absent and
``iouzcrx_kernel_stats_available`` is 0.

A scrape runs on the exporter's own thread; the counters are read on the
server's event loop (the stats are that loop's), so a loop that is blocked
for more than ``timeout`` seconds gives a scrape with only
``iouzcrx_up 0``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "iouzcrx.prometheus needs prometheus-client: pip install 'iouzcrx[prometheus]'"
    ) from exc

__all__ = ["Exporter", "ServerCollector", "start_exporter"]

# (metric suffix, stats key, help) of the per-queue counters.
_COUNTERS = (
    ("received_bytes", "bytes", "Bytes received through the queue."),
    ("received_chunks", "chunks", "Receive completions (chunks) of the queue."),
    (
        "kernel_copied_bytes",
        "copied_bytes",
        "Bytes the kernel copied into the area instead of the NIC writing them "
        "(zcrx statistics, Linux 7.2+).",
    ),
    ("kernel_copies", "copies", "Copy operations of the kernel's zcrx copy fallback."),
    ("copy_events", "copy_events", "zcrx copy-fallback events (one per arming)."),
    (
        "alloc_fail_events",
        "alloc_fail_events",
        "zcrx buffer allocation failures (one per arming): the NIC ran out of buffers.",
    ),
    ("starvations", "starvations", "Receives the kernel ended for want of buffers."),
)


class ServerCollector:
    """A Prometheus collector over ``server.stats()`` (a ZcrxServer), read
    on ``loop`` (the server's loop; by default the running one)."""

    def __init__(
        self,
        server: Any,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = 2.0,
    ) -> None:
        stats = getattr(server, "stats", None)
        if not callable(stats):
            raise TypeError(f"server must have a stats() method (a ZcrxServer), not {server!r}")
        # A wait longer than the platform's (inf included) fails every
        # scrape from inside the threading module: refuse it here.
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout <= threading.TIMEOUT_MAX
        ):
            raise ValueError(
                f"timeout must be a positive number of seconds up to "
                f"{threading.TIMEOUT_MAX:g}, not {timeout!r}"
            )
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "no running event loop: call this on the server's loop, or pass "
                    "loop=<the server's loop>"
                ) from None
        elif not isinstance(loop, asyncio.AbstractEventLoop):
            # Checked now: every scrape would fail on it, far from here.
            raise TypeError(f"loop must be the server's event loop, not {loop!r}")
        self._stats: Callable[[], dict[str, Any]] = stats
        self._loop = loop
        self._timeout = timeout

    def _read(self) -> dict[str, Any] | None:
        """The server's stats, read on its loop; None if that cannot be done
        in time (the loop is closed, stopped or busy)."""
        if self._loop.is_closed():
            return None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return self._stats()
        result: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def read() -> None:
            if result.set_running_or_notify_cancel():
                try:
                    result.set_result(self._stats())
                except BaseException as exc:
                    result.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(read)
            return result.result(self._timeout)
        except (RuntimeError, concurrent.futures.TimeoutError):
            result.cancel()
            return None

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        up = GaugeMetricFamily("iouzcrx_up", "Whether the server's stats could be read.")
        up.add_metric([], 0 if stats is None else 1)
        yield up
        if stats is None:
            return
        mode = str(stats["mode"])
        queues: dict[str, dict[str, Any]] = {
            str(queue): queue_stats for queue, queue_stats in stats["queues"].items()
        } or {"main": stats["backend"]}
        labels = ["queue", "mode"]
        connections = GaugeMetricFamily(
            "iouzcrx_connections", "Open connections of the server.", labels=["mode"]
        )
        connections.add_metric([mode], stats["connections"])
        yield connections
        for suffix, key, text in _COUNTERS:
            family = CounterMetricFamily(f"iouzcrx_{suffix}", text, labels=labels)
            for queue, queue_stats in queues.items():
                value = queue_stats.get(key)
                if value is not None:
                    family.add_metric([queue, mode], value)
            yield family
        available = GaugeMetricFamily(
            "iouzcrx_kernel_stats_available",
            "1 where the kernel keeps zcrx copy statistics for the queue (Linux 7.2+).",
            labels=labels,
        )
        ratio = GaugeMetricFamily(
            "iouzcrx_zero_copy_ratio",
            "Share of the received bytes the kernel did not copy (the NIC wrote them).",
            labels=labels,
        )
        for queue, queue_stats in queues.items():
            available.add_metric([queue, mode], 1 if queue_stats.get("kernel_stats") else 0)
            share = queue_stats.get("zero_copy_share")
            if share is not None:
                ratio.add_metric([queue, mode], share)
        yield available
        yield ratio


class Exporter:
    """A running exporter: its collector, registered, and its HTTP server.
    ``close()`` stops both; closing twice, from another thread or in a
    forked child is harmless (a child only closes its copy of the
    listening socket)."""

    def __init__(
        self, collector: ServerCollector, registry: CollectorRegistry, http: Any, thread: Any
    ) -> None:
        self.collector = collector
        self.registry = registry
        self._http = http
        self._thread = thread
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()

    @property
    def port(self) -> int:
        """The port the exporter listens on (useful with ``port=0``)."""
        return int(self._http.server_address[1])

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if os.getpid() != self._pid:
            # A forked child has no serving thread: shutdown() would wait
            # for ever for it to stop.
            self._http.server_close()
        else:
            self._http.shutdown()
            self._http.server_close()
            if self._thread is not None:
                self._thread.join(5)
        try:
            self.registry.unregister(self.collector)
        except KeyError:
            pass  # unregistered by the program already

    def __enter__(self) -> Exporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def start_exporter(
    server: Any,
    port: int = 9464,
    addr: str = "127.0.0.1",
    *,
    registry: CollectorRegistry | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    timeout: float = 2.0,
) -> Exporter:
    """Serve ``server``'s counters at ``http://addr:port/metrics`` from a
    thread. Call it on the server's loop (or pass ``loop``). ``registry``
    defaults to prometheus-client's global one; ``port=0`` picks a free
    port (see ``Exporter.port``)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be a TCP port number (0 picks a free one), not {port!r}")
    collector = ServerCollector(server, loop=loop, timeout=timeout)
    target = REGISTRY if registry is None else registry
    target.register(collector)
    try:
        http, thread = start_http_server(port, addr=addr, registry=target)
    except OSError as exc:
        target.unregister(collector)
        if exc.errno is None:
            raise
        # The socket's own message names neither the address nor the port.
        raise OSError(
            exc.errno,
            f"cannot serve metrics on {addr!r} port {port}: {exc.strerror}; pick another "
            "port (port=0 picks a free one, see Exporter.port) or addr",
        ) from exc
    except BaseException:
        target.unregister(collector)
        raise
    return Exporter(collector, target, http, thread)
