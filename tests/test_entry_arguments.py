"""The Python entry points refuse bad arguments at the call, with an exception
naming the argument, and open nothing."""

from __future__ import annotations

import asyncio
import math
import socket

import pytest

import iouzcrx


async def _noop(reader: iouzcrx.ZcrxStreamReader, writer: iouzcrx.ZcrxStreamWriter) -> None:
    writer.close()


@pytest.mark.parametrize("factory", ["print", object()])
async def test_create_zcrx_server_refuses_a_protocol_factory_that_is_not_callable(factory):
    with pytest.raises(TypeError, match="protocol_factory"):
        await iouzcrx.create_zcrx_server(factory, "127.0.0.1", 0, mode="socket")


@pytest.mark.parametrize("host", [5, object()])
async def test_create_zcrx_server_names_a_host_that_is_not_a_string(host):
    with pytest.raises(TypeError, match="host"):
        await iouzcrx.create_zcrx_server(asyncio.Protocol, host, 0, mode="socket")


@pytest.mark.parametrize("area_size", [2**64, 2**100])
async def test_create_zcrx_server_names_an_area_size_no_mapping_can_have(area_size):
    with pytest.raises(iouzcrx.InvalidConfiguration, match="area_size"):
        await iouzcrx.create_zcrx_server(
            asyncio.Protocol, "127.0.0.1", 0, mode="socket", area_size=area_size
        )


async def test_create_zcrx_server_names_a_backlog_listen_cannot_take():
    with pytest.raises(ValueError, match="backlog"):
        await iouzcrx.create_zcrx_server(
            asyncio.Protocol, "127.0.0.1", 0, mode="socket", backlog=2**40
        )


@pytest.mark.parametrize("limit", [0, -1, math.nan, "1", True])
async def test_start_server_refuses_a_bad_limit_at_the_call(limit):
    with pytest.raises((TypeError, ValueError), match="limit"):
        await iouzcrx.start_server(_noop, "127.0.0.1", 0, mode="socket", limit=limit)


@pytest.mark.parametrize("callback", ["print", object()])
async def test_start_server_refuses_a_client_connected_cb_that_is_not_callable(callback):
    with pytest.raises(TypeError, match="client_connected_cb"):
        await iouzcrx.start_server(callback, "127.0.0.1", 0, mode="socket")


@pytest.fixture
def port():
    # A listener that would accept whatever a misread address reaches on it.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


@pytest.mark.parametrize("host", ["127.0.0.1\x00evil", b"127.0.0.1\x00evil"])
async def test_open_connection_refuses_a_host_with_a_nul_instead_of_connecting_to_its_prefix(
    host, port
):
    with pytest.raises(ValueError, match="host"):
        await iouzcrx.open_connection(host, port, mode="socket")


@pytest.mark.parametrize("host", [5, object()])
async def test_open_connection_names_a_host_that_is_not_a_string(host, port):
    with pytest.raises(TypeError, match="host"):
        await iouzcrx.open_connection(host, port, mode="socket")


@pytest.mark.parametrize("offset", [0, 80])
async def test_open_connection_refuses_a_port_getaddrinfo_would_wrap_around(offset):
    with pytest.raises(OverflowError, match="port"):
        await iouzcrx.open_connection("127.0.0.1", 65536 + offset, mode="socket")


@pytest.mark.parametrize("bad_port", [80.5, math.nan, object()])
async def test_open_connection_names_a_port_that_is_not_an_int(bad_port):
    with pytest.raises(TypeError, match="port"):
        await iouzcrx.open_connection("127.0.0.1", bad_port, mode="socket")


@pytest.mark.parametrize("limit", [0, -1, math.nan])
async def test_open_connection_refuses_a_bad_limit(limit, port):
    with pytest.raises((TypeError, ValueError), match="limit"):
        await iouzcrx.open_connection("127.0.0.1", port, mode="socket", limit=limit)


async def test_open_connection_names_an_area_size_no_mapping_can_have(port):
    with pytest.raises(iouzcrx.InvalidConfiguration, match="area_size"):
        await iouzcrx.open_connection("127.0.0.1", port, mode="socket", area_size=2**64)
