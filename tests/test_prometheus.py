"""The optional Prometheus exporter serves a server's per-queue counters,
read on the server's loop, and closes cleanly."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import urllib.request

import pytest

import iouzcrx

prometheus_client = pytest.importorskip(
    "prometheus_client", reason="prometheus-client is not installed (pip install iouzcrx[test])"
)
from iouzcrx.prometheus import ServerCollector, start_exporter  # noqa: E402


def scrape(port: int) -> dict[str, float]:
    """Sample name with labels → value, from a real HTTP scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_the_exporter_serves_the_received_bytes_per_queue_and_the_kernel_stats_state():
    total = 3 << 20

    async def main() -> dict[str, float]:
        done = asyncio.get_running_loop().create_future()

        class Sink(asyncio.Protocol):
            def eof_received(self) -> None:
                done.set_result(None)

        server = await iouzcrx.create_zcrx_server(
            Sink, "127.0.0.1", 0, mode="bufring", area_size=1 << 20
        )
        registry = prometheus_client.CollectorRegistry()
        exporter = start_exporter(server, port=0, registry=registry)
        address = server.sockets[0].getsockname()

        def send() -> None:
            with socket.create_connection(address) as sock:
                sock.sendall(b"p" * total)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(1)

        sender = asyncio.create_task(asyncio.to_thread(send))
        try:
            await asyncio.wait_for(done, 60)
            during = await asyncio.to_thread(scrape, exporter.port)
        finally:
            server.close()
            server.abort_clients()
            await server.wait_closed()
            await sender
        exporter.close()
        exporter.close()  # twice: harmless
        with pytest.raises(OSError):
            await asyncio.to_thread(scrape, exporter.port)
        return during

    samples = asyncio.run(main())
    labels = '{mode="bufring",queue="main"}'
    assert samples["iouzcrx_up"] == 1.0
    assert samples[f"iouzcrx_received_bytes_total{labels}"] == total
    assert samples[f"iouzcrx_received_chunks_total{labels}"] >= 1
    assert samples[f"iouzcrx_kernel_stats_available{labels}"] == 0.0
    assert f"iouzcrx_kernel_copied_bytes_total{labels}" not in samples
    assert samples['iouzcrx_connections{mode="bufring"}'] >= 0


def test_a_scrape_from_another_thread_of_a_stopped_loop_reports_down():
    loop = asyncio.new_event_loop()
    try:
        server = loop.run_until_complete(
            iouzcrx.create_zcrx_server(
                asyncio.Protocol, "127.0.0.1", 0, mode="bufring", area_size=1 << 20
            )
        )
        collector = ServerCollector(server, loop=loop, timeout=0.2)
        # The loop is not running: nothing can read the stats on it.
        metrics = {m.name: m for m in collector.collect()}
        assert metrics["iouzcrx_up"].samples[0].value == 0.0
        assert set(metrics) == {"iouzcrx_up"}
        server.close()
        loop.run_until_complete(server.wait_closed())
    finally:
        loop.close()
    # Closed loop: the same, at once.
    assert [m.samples[0].value for m in collector.collect()] == [0.0]


def test_bad_arguments_are_named():
    # Outside a loop, and a loop that is not one: every scrape would fail.
    with pytest.raises(RuntimeError, match="pass loop="):
        ServerCollector(type("Server", (), {"stats": lambda self: {}})())
    with pytest.raises(TypeError, match="loop must be the server's event loop, not 5"):
        ServerCollector(type("Server", (), {"stats": lambda self: {}})(), loop=5)  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(TypeError, match="stats"):
            ServerCollector(object())
        server = await iouzcrx.create_zcrx_server(
            asyncio.Protocol, "127.0.0.1", 0, mode="bufring", area_size=1 << 20
        )
        try:
            with pytest.raises(ValueError, match="port"):
                start_exporter(server, port=70000)
            registry = prometheus_client.CollectorRegistry()
            with start_exporter(server, port=0, registry=registry) as first:
                with pytest.raises(OSError, match=f"'127.0.0.1' port {first.port}: .*port=0"):
                    start_exporter(server, port=first.port, registry=registry)
            with pytest.raises(ValueError, match="timeout"):
                ServerCollector(server, timeout=0)
            # Waits the threading module cannot make would fail every scrape.
            for timeout in (float("inf"), float("nan"), 1e300, True, "1"):
                with pytest.raises(ValueError, match="timeout"):
                    ServerCollector(server, timeout=timeout)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_an_exporter_inherited_by_a_forked_child_closes_there_without_hanging():
    # The child is its own process (fork from the test's thread-rich
    # interpreter would be unsafe); it forks, closes in the grandchild,
    # then in itself, and the parent still serves in between.
    code = textwrap.dedent(
        """
        import asyncio, os, signal, sys, urllib.request
        import prometheus_client
        import iouzcrx
        from iouzcrx.prometheus import start_exporter

        async def main():
            server = await iouzcrx.create_zcrx_server(
                asyncio.Protocol, "127.0.0.1", 0, mode="bufring", area_size=1 << 20)
            exporter = start_exporter(
                server, port=0, registry=prometheus_client.CollectorRegistry())
            pid = os.fork()
            if pid == 0:
                signal.alarm(20)  # a hang ends this process, not only the test
                exporter.close()
                exporter.close()
                os._exit(0)
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
            url = f"http://127.0.0.1:{exporter.port}/metrics"
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(url, timeout=10).read().decode())
            exporter.close()
            server.close()
            await server.wait_closed()
            print(os.waitstatus_to_exitcode(status), "iouzcrx_up 1.0" in text)

        asyncio.run(main())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "True"]
