"""Streams: start_server / open_connection and the zero-copy reader, on both
loops and in every mode the kernel can run."""

from __future__ import annotations

import asyncio
import gc

import pytest
from conftest import SERVER_MODES, Pattern, Verifier

import iouzcrx

pytestmark = pytest.mark.parametrize("mode", SERVER_MODES)

TIMEOUT = 60


async def serve(mode, handler):  # type: ignore[no-untyped-def]
    server = await iouzcrx.start_server(handler, "127.0.0.1", 0, mode=mode)
    host, port = server.sockets[0].getsockname()
    return server, host, port


async def test_async_for_yields_every_byte_as_views(mode):
    got = asyncio.get_running_loop().create_future()

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        verifier = Verifier(40)
        async for view in reader:
            assert isinstance(view, memoryview) and view.readonly
            verifier.feed(view)
        got.set_result(verifier.pos)
        writer.close()

    server, host, port = await serve(mode, handler)
    async with server:
        reader, writer = await asyncio.open_connection(host, port)
        for chunk in Pattern(40).chunks(6 << 20):
            writer.write(chunk)
        writer.write_eof()
        assert await asyncio.wait_for(got, TIMEOUT) == 6 << 20
        writer.close()


async def test_readexactly_copies_only_across_chunk_boundaries(mode):
    results = asyncio.get_running_loop().create_future()
    record = 1000  # does not divide the chunk sizes: some records span two chunks

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        kinds = {"view": 0, "copy": 0}
        verifier = Verifier(41)
        while True:
            try:
                data = await reader.readexactly(record)
            except asyncio.IncompleteReadError as exc:
                assert exc.partial == b""
                break
            kinds["view" if isinstance(data, memoryview) else "copy"] += 1
            verifier.feed(memoryview(data))
        results.set_result((kinds, verifier.pos))
        writer.close()

    server, host, port = await serve(mode, handler)
    async with server:
        _, writer = await asyncio.open_connection(host, port)
        total = 2000 * record
        for chunk in Pattern(41).chunks(total):
            writer.write(chunk)
        writer.write_eof()
        kinds, pos = await asyncio.wait_for(results, TIMEOUT)
        assert pos == total
        assert kinds["view"] > kinds["copy"] > 0
        writer.close()


async def test_readuntil_readline_read_and_incomplete_read(mode):
    results = asyncio.get_running_loop().create_future()

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        first = await reader.readuntil(b"\r\n")
        line = await reader.readline()
        some = await reader.read(3)
        try:
            await reader.readexactly(100)
        except asyncio.IncompleteReadError as exc:
            partial = exc.partial
        results.set_result((bytes(first), bytes(line), bytes(some), partial, reader.at_eof()))
        writer.close()

    server, host, port = await serve(mode, handler)
    async with server:
        _, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.1\r\n")
        await asyncio.sleep(0.05)
        writer.write(b"second ")
        await asyncio.sleep(0.05)
        writer.write(b"line\nabcdef")
        writer.write_eof()
        assert await asyncio.wait_for(results, TIMEOUT) == (
            b"GET / HTTP/1.1\r\n",
            b"second line\n",
            b"abc",
            b"def",
            True,
        )
        writer.close()


async def test_open_connection_receives_zero_copy_on_the_client_side(mode):
    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        for chunk in Pattern(42).chunks(3 << 20):
            writer.write(chunk)
            await writer.drain()
        writer.close()

    server, host, port = await serve(mode, handler)
    async with server:
        reader, writer = await iouzcrx.open_connection(host, port, mode=mode)
        assert writer.get_extra_info("zcrx_mode") == mode
        verifier = Verifier(42)
        async for view in reader:
            verifier.feed(view)
        assert verifier.pos == 3 << 20
        writer.close()
        await writer.wait_closed()


async def test_cancelling_a_handler_mid_stream_returns_its_buffers(mode):
    started = asyncio.get_running_loop().create_future()
    tasks: list[asyncio.Task] = []

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            view = await reader.__anext__()
            started.set_result(len(view))
            await asyncio.sleep(3600)  # a handler stuck mid-stream
        finally:
            writer.close()

    server, host, port = await serve(mode, handler)
    _, client = await asyncio.open_connection(host, port)
    for chunk in Pattern(43).chunks(512 << 10):
        client.write(chunk)
    await asyncio.wait_for(started, TIMEOUT)
    tasks[0].cancel()
    # Waited for, not awaited: on 3.13 a CancelledError raised into this
    # frame stays referenced from inside asyncio after it is caught, and its
    # traceback holds the handler's frame, with the view it read.
    await asyncio.wait(tasks, timeout=TIMEOUT)
    assert tasks[0].cancelled()
    server.close()
    await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    client.close()
    tasks.clear()
    gc.collect()
    assert server.backend.buffers_in_use == 0


async def test_readexactly_beyond_the_reader_limit_does_not_stall(mode):
    """The reader pauses the transport past 2 x limit; a read that needs more
    than that must resume it."""
    got = asyncio.get_running_loop().create_future()

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        data = await reader.readexactly(3 << 20)
        got.set_result(bytes(data))
        writer.close()

    server = await iouzcrx.start_server(handler, "127.0.0.1", 0, mode=mode, limit=256 << 10)
    async with server:
        _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        for chunk in Pattern(44).chunks(3 << 20):
            writer.write(chunk)
        expected = b"".join(bytes(c) for c in Pattern(44).chunks(3 << 20))
        assert await asyncio.wait_for(got, TIMEOUT) == expected
        writer.close()


async def test_a_handler_that_raises_is_reported_and_its_connection_closed(mode):
    loop = asyncio.get_running_loop()
    reported = loop.create_future()

    def on_error(loop, context):  # type: ignore[no-untyped-def]
        if not reported.done():
            reported.set_result(context)

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        await reader.read(1)
        raise RuntimeError("handler failed")

    loop.set_exception_handler(on_error)
    try:
        server, host, port = await serve(mode, handler)
        reader, client = await asyncio.open_connection(host, port)
        client.write(b"x")
        context = await asyncio.wait_for(reported, TIMEOUT)
        assert "client_connected_cb" in context["message"]
        assert str(context["exception"]) == "handler failed"
        # The server closed its end: the client reads EOF, not silence.
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        client.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    finally:
        loop.set_exception_handler(None)


async def test_reads_wait_on_the_connections_loop_without_asking_for_the_running_one(
    mode, monkeypatch
):
    """A request/response handler waits for each request: the future it
    waits on comes from its transport's loop, not from
    asyncio.get_running_loop(), which makes a system call each time on some
    Pythons."""
    from iouzcrx import _reader

    asked = []
    real = _reader.get_running_loop
    monkeypatch.setattr(_reader, "get_running_loop", lambda: asked.append(1) or real())
    served = asyncio.get_running_loop().create_future()

    async def handler(reader, writer):  # type: ignore[no-untyped-def]
        requests = 0
        while True:
            try:
                await reader.readexactly(100)
            except asyncio.IncompleteReadError:
                break
            requests += 1
            writer.write(b"ok")
        served.set_result(requests)
        writer.close()

    server, host, port = await serve(mode, handler)
    async with server:
        reader, writer = await asyncio.open_connection(host, port)
        for _ in range(20):
            writer.write(b"q" * 100)
            assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"ok"
        writer.write_eof()
        assert await asyncio.wait_for(served, TIMEOUT) == 20
        writer.close()
    assert asked == []
