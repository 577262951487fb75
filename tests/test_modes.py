"""Mode selection at the server layer: auto picks the best mode that works and
says why better ones were refused; an explicit mode that cannot work raises
the error naming what is missing."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from conftest import FEATURES

import iouzcrx


class Sink(iouzcrx.ZeroCopyProtocol):
    pass


async def test_auto_takes_the_best_mode_and_says_why_better_ones_were_refused(caplog):
    caplog.set_level(logging.INFO, logger="iouzcrx")
    loop = asyncio.get_running_loop()
    async with await loop.create_zcrx_server(
        Sink, "127.0.0.1", 0, interface="lo", queue=0, area_size=4 << 20
    ) as server:
        assert server.mode == ("copy" if FEATURES.zcrx_nodev else "bufring")
        assert "no queue API" in server.refused["zerocopy"]
        if not FEATURES.zcrx_nodev:
            assert "7.1" in server.refused["copy"]
        assert f"mode {server.mode} (refused zerocopy:" in caplog.text


async def test_explicit_zerocopy_on_a_nic_without_support_raises_the_clear_error():
    loop = asyncio.get_running_loop()
    with pytest.raises(iouzcrx.NicUnsupported, match="no queue API"):
        await loop.create_zcrx_server(
            Sink, "127.0.0.1", 0, mode="zerocopy", interface="lo", queue=0
        )


@pytest.mark.skipif(FEATURES.zcrx_nodev, reason="this kernel has copy mode")
async def test_explicit_copy_mode_on_an_old_kernel_says_which_kernel_it_needs():
    loop = asyncio.get_running_loop()
    with pytest.raises(iouzcrx.KernelTooOld, match="7.1"):
        await loop.create_zcrx_server(Sink, "127.0.0.1", 0, mode="copy")


async def test_an_unknown_mode_is_refused():
    loop = asyncio.get_running_loop()
    with pytest.raises(iouzcrx.InvalidConfiguration, match="mode must be"):
        await loop.create_zcrx_server(Sink, "127.0.0.1", 0, mode="fastest")


def test_the_module_function_works_on_a_stock_asyncio_loop():
    """iouzcrx.create_zcrx_server needs no iouzcrx loop: any running loop."""

    async def main() -> str:
        assert not hasattr(asyncio.get_running_loop(), "create_zcrx_server")
        async with await iouzcrx.create_zcrx_server(Sink, "127.0.0.1", 0) as server:
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            writer.write(b"x" * 1000)
            writer.close()
            return server.mode

    assert asyncio.run(main()) in ("copy", "bufring")


@pytest.mark.parametrize("use_uvloop", [False, True])
def test_run_gives_a_loop_with_create_zcrx_server(use_uvloop):
    async def main() -> str:
        return type(asyncio.get_running_loop()).__name__

    name = iouzcrx.run(main(), use_uvloop=use_uvloop)
    assert name == ("UVLoop" if use_uvloop else "SelectorEventLoop")


@pytest.mark.parametrize("use_uvloop", [False, True])
@pytest.mark.parametrize("mode", ["auto", "socket"])
def test_a_loop_lifetime_leaves_no_file_descriptors_behind(use_uvloop, mode):
    import gc
    import os

    class Count(iouzcrx.ZeroCopyProtocol):
        pass

    async def main() -> None:
        async with await iouzcrx.create_zcrx_server(Count, "127.0.0.1", 0, mode=mode) as server:
            for _ in range(3):
                _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
                writer.write(b"y" * 100_000)
                writer.close()
                await writer.wait_closed()
            server.close_clients()

    # One warm-up lifetime: libuv opens process-wide fds (its threadpool's
    # wake-up pipe) on first use and keeps them; a leak of ours would recur.
    iouzcrx.run(main(), use_uvloop=use_uvloop)
    gc.collect()
    before = set(os.listdir("/proc/self/fd"))
    iouzcrx.run(main(), use_uvloop=use_uvloop)
    gc.collect()
    assert set(os.listdir("/proc/self/fd")) == before  # ring, eventfd, sockets all closed


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"area_size": 1000}, "area_size 1000"),
        ({"buffer_size": 5000}, "buffer_size 5000"),
        ({"area_size": 3 << 20, "buffer_size": 2 << 20}, "area_size 3145728"),
    ],
)
async def test_auto_with_an_invalid_size_raises_invalid_configuration_naming_it(kwargs, named):
    loop = asyncio.get_running_loop()
    with pytest.raises(iouzcrx.InvalidConfiguration, match=named):
        await loop.create_zcrx_server(Sink, "127.0.0.1", 0, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"interface": "lo", "queue": -1}, "not -1"),
        ({"rq_entries": 0}, "not 0"),
        ({"rq_entries": 1 << 20}, "not 1048576"),
        ({"rx_buf_len": 3}, "not 3"),
        ({"rx_buf_len": 12288}, "not 12288"),
    ],
)
async def test_auto_refuses_an_invalid_argument_instead_of_skipping_the_mode(kwargs, named):
    loop = asyncio.get_running_loop()
    with pytest.raises(iouzcrx.InvalidConfiguration, match=named):
        await loop.create_zcrx_server(Sink, "127.0.0.1", 0, area_size=4 << 20, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"rq_entries": 1.5}, "rq_entries must be an integer, not float 1.5"),
        ({"interface": "lo", "queue": 1.5}, "queue must be an integer, not float 1.5"),
        ({"interface": "lo", "queue": "0"}, "queue must be an integer, not str '0'"),
        ({"rx_buf_len": None}, "rx_buf_len must be an integer, not NoneType None"),
        ({"rx_buf_len": 4096.0}, "rx_buf_len must be an integer"),
        ({"buffer_size": "64k"}, "buffer_size must be an integer, not str '64k'"),
        ({"area_size": 1.5}, "area_size must be an integer, not float 1.5"),
        ({"area_size": True}, "area_size must be an integer, not the bool True"),
        ({"hugepages": "yes"}, "hugepages must be True or False, not 'yes'"),
    ],
)
@pytest.mark.parametrize("mode", ["auto", "socket"])
async def test_an_argument_of_the_wrong_type_is_a_type_error_naming_it(mode, kwargs, named):
    if mode != "auto" and set(kwargs) & {"interface", "queue", "rq_entries", "rx_buf_len"}:
        pytest.skip("not an argument of socket mode")
    loop = asyncio.get_running_loop()
    with pytest.raises(TypeError, match=named):
        await loop.create_zcrx_server(Sink, "127.0.0.1", 0, mode=mode, **kwargs)


@pytest.mark.parametrize("mode", ["bufring", "socket"])
@pytest.mark.parametrize("kwargs", [{"rx_buf_len": 8192}, {"rq_entries": 64}])
async def test_a_zcrx_argument_given_to_another_mode_is_refused(mode, kwargs):
    loop = asyncio.get_running_loop()
    with pytest.raises(iouzcrx.InvalidConfiguration, match="only applies to the copy"):
        await loop.create_zcrx_server(Sink, "127.0.0.1", 0, mode=mode, **kwargs)


@pytest.mark.parametrize("port", [65536, 70000, -1, "70000"])
async def test_an_out_of_range_port_raises_overflow_error_as_asyncio_does(port):
    loop = asyncio.get_running_loop()
    with pytest.raises(OverflowError, match=f"port must be 0-65535, not {port!r}"):
        await loop.create_zcrx_server(Sink, "127.0.0.1", port)


@pytest.mark.parametrize("host", ["127.0.0.1\0junk", ["127.0.0.1", "::1\0"]])
async def test_a_host_with_a_nul_character_is_refused_not_cut_at_the_nul(host):
    loop = asyncio.get_running_loop()
    with pytest.raises(ValueError, match="contains a NUL character"):
        await loop.create_zcrx_server(Sink, host, 0)


async def test_a_float_port_is_refused_not_truncated():
    loop = asyncio.get_running_loop()
    with pytest.raises(TypeError, match="port must be an int"):
        await loop.create_zcrx_server(Sink, "127.0.0.1", 1.5)


async def test_sock_that_is_not_an_open_socket_is_refused_naming_it():
    loop = asyncio.get_running_loop()
    with pytest.raises(TypeError, match="sock must be a socket.socket, not 3"):
        await loop.create_zcrx_server(Sink, sock=3)
    closed = socket.socket()
    closed.close()
    with pytest.raises(ValueError, match="is closed"):
        await loop.create_zcrx_server(Sink, sock=closed)
    with pytest.raises(TypeError, match="backlog must be an int, not 1.5"):
        await loop.create_zcrx_server(Sink, "127.0.0.1", 0, backlog=1.5)
