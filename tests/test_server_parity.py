"""The server against asyncio's own, on the Python running the tests: what
changed between versions (``wait_closed`` waiting for connections since
3.12.1, ``close_clients``/``abort_clients`` since 3.13) must match what
asyncio does here.

Each scenario runs once on a ZcrxServer and once on a stock asyncio server;
the reference runs on a stock selector loop in a worker thread so that it is
asyncio's server whatever loop the test itself runs on.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import SERVER_MODES

import iouzcrx

pytestmark = pytest.mark.parametrize("mode", SERVER_MODES)

TIMEOUT = 60
# How long a scenario lets wait_closed() run before it looks whether it
# returned: only the answer "it already returned" is used, and asyncio's
# returns within a few loop iterations when it does not wait.
SETTLE = 0.2

MakeServer = Callable[[Callable[[], asyncio.BaseProtocol]], Awaitable[Any]]


class Peer(asyncio.Protocol):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.made = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.set_result(transport)

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


async def _connected(make_server: MakeServer) -> tuple[Any, Peer, socket.socket]:
    peers: list[Peer] = []

    def factory() -> Peer:
        peers.append(Peer())
        return peers[-1]

    server = await make_server(factory)
    client = socket.create_connection(server.sockets[0].getsockname()[:2], timeout=TIMEOUT)
    loop = asyncio.get_running_loop()
    while not peers:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(peers[0].made, TIMEOUT)
    assert loop is asyncio.get_running_loop()
    return server, peers[0], client


async def _client_reads(client: socket.socket) -> str:
    loop = asyncio.get_running_loop()
    try:
        data = await loop.run_in_executor(None, client.recv, 100)
    except ConnectionResetError:
        return "reset"
    return "eof" if data == b"" else f"data {data!r}"


async def wait_closed_after_close_with_a_client(make_server: MakeServer) -> dict[str, Any]:
    server, peer, client = await _connected(make_server)
    try:
        server.close()
        waiting = asyncio.ensure_future(server.wait_closed())
        await asyncio.wait([waiting], timeout=SETTLE)
        returned_early = waiting.done()
        client.close()
        await asyncio.wait_for(peer.lost, TIMEOUT)
        await asyncio.wait_for(waiting, TIMEOUT)
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    finally:
        client.close()
    return {"wait_closed returned with a client open": returned_early}


async def wait_closed_before_close(make_server: MakeServer) -> dict[str, Any]:
    server, peer, client = await _connected(make_server)
    try:
        waiting = asyncio.ensure_future(server.wait_closed())
        await asyncio.wait([waiting], timeout=SETTLE)
        returned_before_close = waiting.done()
        server.close()
        await asyncio.wait([waiting], timeout=SETTLE)
        returned_at_close = waiting.done()
        client.close()
        await asyncio.wait_for(peer.lost, TIMEOUT)
        await asyncio.wait_for(waiting, TIMEOUT)
    finally:
        client.close()
    return {"before close": returned_before_close, "at close": returned_at_close}


async def ending_clients(make_server: MakeServer, how: str) -> dict[str, Any]:
    server, peer, client = await _connected(make_server)
    try:
        getattr(server, how)()
        exc = await asyncio.wait_for(peer.lost, TIMEOUT)
        still_serving = server.is_serving()
        seen_by_client = await _client_reads(client)
        server.close()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)
    finally:
        client.close()
    return {
        "connection_lost": exc,
        "client": seen_by_client,
        "serving after": still_serving,
    }


async def ending_clients_after_close(make_server: MakeServer, how: str) -> dict[str, Any]:
    server, peer, client = await _connected(make_server)
    try:
        server.close()
        waiting = asyncio.ensure_future(server.wait_closed())
        getattr(server, how)()
        exc = await asyncio.wait_for(peer.lost, TIMEOUT)
        await asyncio.wait_for(waiting, TIMEOUT)
        seen_by_client = await _client_reads(client)
    finally:
        client.close()
    return {"connection_lost": exc, "client": seen_by_client}


def _reference(scenario: Callable[..., Awaitable[dict[str, Any]]], *args: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        loop = asyncio.get_running_loop()

        async def make_server(factory: Callable[[], asyncio.BaseProtocol]) -> Any:
            return await loop.create_server(factory, "127.0.0.1", 0)

        return await scenario(make_server, *args)

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


async def compare(mode: str, scenario: Callable[..., Awaitable[dict[str, Any]]], *args: Any):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()

    async def make_server(factory: Callable[[], asyncio.BaseProtocol]) -> Any:
        return await loop.create_zcrx_server(factory, "127.0.0.1", 0, mode=mode)

    ours = await scenario(make_server, *args)
    reference = await loop.run_in_executor(None, _reference, scenario, *args)
    assert ours == reference, f"ZcrxServer: {ours}; asyncio {sys.version_info[:3]}: {reference}"
    return ours


async def test_wait_closed_after_close_waits_for_connections_as_asyncio_here(mode):
    result = await compare(mode, wait_closed_after_close_with_a_client)
    # The change itself, so that the comparison cannot pass vacuously.
    assert result["wait_closed returned with a client open"] == (sys.version_info < (3, 12, 1))


async def test_wait_closed_called_before_close_waits_for_connections_as_asyncio(mode):
    result = await compare(mode, wait_closed_before_close)
    assert result == {"before close": False, "at close": False}


@pytest.mark.parametrize("how", ["close_clients", "abort_clients"])
async def test_ending_clients_matches_asyncio_where_it_has_the_method(mode, how):
    if sys.version_info >= (3, 13):
        result = await compare(mode, ending_clients, how)
    else:
        # asyncio gains the method in 3.13; ours has it on every version and
        # does what 3.13's does.
        loop = asyncio.get_running_loop()

        async def make_server(factory):  # type: ignore[no-untyped-def]
            return await loop.create_zcrx_server(factory, "127.0.0.1", 0, mode=mode)

        result = await ending_clients(make_server, how)
    assert result == {"connection_lost": None, "client": "eof", "serving after": True}


@pytest.mark.parametrize("how", ["close_clients", "abort_clients"])
async def test_ending_clients_after_close_lets_wait_closed_return(mode, how):
    if sys.version_info >= (3, 13):
        result = await compare(mode, ending_clients_after_close, how)
    else:
        loop = asyncio.get_running_loop()

        async def make_server(factory):  # type: ignore[no-untyped-def]
            return await loop.create_zcrx_server(factory, "127.0.0.1", 0, mode=mode)

        result = await ending_clients_after_close(make_server, how)
    assert result == {"connection_lost": None, "client": "eof"}


def test_the_server_has_every_method_of_asyncio_server_here(mode):
    missing = {
        name
        for name in dir(asyncio.Server)
        if not name.startswith("_") and not hasattr(iouzcrx.ZcrxServer, name)
    }
    assert not missing
