"""The engine's constructors and calls refuse bad arguments up front, with an
exception naming the parameter and the value, before they allocate anything
or ask the kernel."""

from __future__ import annotations

import errno
import math
import os
import re
import socket
import tempfile
from collections.abc import Iterator

import pytest
from conftest import connect_pair

import iouzcrx
from iouzcrx._socket_pool import SocketBufferPool

SIZES = {"area_size": 1 << 20, "buffer_size": 64 << 10}
BAD_SIZES = [
    (-1, iouzcrx.InvalidConfiguration),
    (0, iouzcrx.InvalidConfiguration),
    (2**64, iouzcrx.InvalidConfiguration),
    (None, TypeError),
    ("12", TypeError),
    (b"12", TypeError),
    (1.5, TypeError),
    (math.nan, TypeError),
    (True, TypeError),
]


def named(param: str, value: object) -> str:
    return rf"{param}\b.*{re.escape(repr(value) if isinstance(value, str | bytes) else str(value))}"


@pytest.mark.parametrize("param", ["area_size", "buffer_size"])
@pytest.mark.parametrize(("value", "error"), BAD_SIZES)
def test_buffer_ring_queue_sizes_are_refused_naming_parameter_and_value(
    ring: iouzcrx.Ring, param: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=named(param, value)):
        iouzcrx.BufRingQueue(ring, **{**SIZES, param: value})


@pytest.mark.parametrize("param", ["area_size", "buffer_size"])
@pytest.mark.parametrize(("value", "error"), BAD_SIZES)
def test_socket_buffer_pool_sizes_are_refused_naming_parameter_and_value(
    param: str, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match=named(param, value)):
        SocketBufferPool(**{**SIZES, param: value})


@pytest.mark.parametrize(
    ("param", "value", "error"),
    [
        *(("area_size", v, e) for v, e in BAD_SIZES),
        ("rq_entries", 0, iouzcrx.InvalidConfiguration),
        ("rq_entries", -1, iouzcrx.InvalidConfiguration),
        ("rq_entries", "12", iouzcrx.InvalidConfiguration),
        ("rq_entries", 1.5, iouzcrx.InvalidConfiguration),
        ("rx_buf_len", -1, iouzcrx.InvalidConfiguration),
        ("rx_buf_len", 3, iouzcrx.InvalidConfiguration),
        ("rx_buf_len", 6000, iouzcrx.InvalidConfiguration),
        ("rx_buf_len", math.nan, TypeError),
    ],
)
def test_zcrx_queue_refuses_impossible_values_before_asking_the_kernel(
    ring: iouzcrx.Ring, param: str, value: object, error: type[Exception]
) -> None:
    """On every kernel, including those without copy mode: the mistake in
    the call is what gets named, not what the kernel lacks."""
    with pytest.raises(error, match=named(param, value)):
        iouzcrx.ZcrxQueue(ring, mode="copy", **{"area_size": 1 << 20, param: value})


def test_ring_entry_counts_are_refused_naming_parameter_and_value() -> None:
    for param in ("sq_entries", "cq_entries"):
        with pytest.raises(iouzcrx.InvalidConfiguration, match=named(param, 0)):
            iouzcrx.Ring(**{param: 0})
        with pytest.raises(TypeError, match=named(param, "8")):
            iouzcrx.Ring(**{param: "8"})


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("0.1", TypeError),
        (b"1", TypeError),
        (object(), TypeError),
        (-1, ValueError),
        (-math.inf, ValueError),
        (math.nan, ValueError),
    ],
)
def test_timeouts_are_none_or_a_non_negative_real_number(
    ring: iouzcrx.Ring, listener: socket.socket, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error, match="timeout"):
        ring.wait(value)
    queue = iouzcrx.BufRingQueue(ring, **SIZES)
    client, server = connect_pair(listener)
    with client, server:
        receiver = queue.recv_multishot(server)
        with pytest.raises(error, match="timeout"):
            receiver.get(value)
        receiver.close()
    queue.close()


def test_an_infinite_timeout_waits_until_there_is_data(
    ring: iouzcrx.Ring, listener: socket.socket
) -> None:
    queue = iouzcrx.BufRingQueue(ring, **SIZES)
    client, server = connect_pair(listener)
    with client, server:
        receiver = queue.recv_multishot(server)
        client.sendall(b"x")
        assert bytes(receiver.get(math.inf)) == b"x"
        receiver.close()
    queue.close()


@pytest.fixture
def queue(ring: iouzcrx.Ring) -> Iterator[iouzcrx.BufRingQueue]:
    queue = iouzcrx.BufRingQueue(ring, **SIZES)
    yield queue
    queue.close()


def test_recv_multishot_refuses_anything_but_a_connected_stream_socket(
    queue: iouzcrx.BufRingQueue,
) -> None:
    listening = socket.socket()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unconnected = socket.socket()
    closed = socket.socket()
    closed.close()
    with listening, udp, unconnected, tempfile.TemporaryFile() as file:
        closed_fd = os.open(os.devnull, os.O_RDONLY)
        os.close(closed_fd)
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        udp.bind(("127.0.0.1", 0))
        cases = [
            (listening, ValueError, "listening"),
            (udp, ValueError, "SOCK_DGRAM"),
            (closed, ValueError, "closed"),
            (file, TypeError, "not a socket"),
            (file.fileno(), TypeError, "not a socket"),
            (closed_fd, ValueError, "not an open file descriptor"),
            (-1, ValueError, "not an open file descriptor"),
            (2**40, ValueError, "not an open file descriptor"),
            (None, TypeError, "connected socket"),
            ("3", TypeError, "connected socket"),
        ]
        for sock, error, why in cases:
            with pytest.raises(error, match=rf"^sock\b.*{why}"):
                queue.recv_multishot(sock)


def test_a_stream_socket_that_is_not_connected_ends_its_receive_with_the_kernels_error(
    queue: iouzcrx.BufRingQueue,
) -> None:
    # Not refused up front: a transport resuming on a socket its peer has
    # just reset must get the kernel's answer as the receive's end.
    with socket.socket() as unconnected:
        receiver = queue.recv_multishot(unconnected)
        queue.ring.wait_for(lambda: receiver.finished, 10)
        assert isinstance(receiver.error, OSError)
        assert receiver.error.errno == errno.ENOTCONN


def test_recv_multishot_takes_a_connected_unix_stream_socket(
    queue: iouzcrx.BufRingQueue,
) -> None:
    a, b = socket.socketpair()
    with a, b:
        receiver = queue.recv_multishot(a)
        b.sendall(b"unix")
        assert bytes(receiver.get(10)) == b"unix"
        receiver.close()


@pytest.mark.parametrize("param", ["on_data", "on_end", "on_error"])
def test_recv_multishot_refuses_callbacks_that_cannot_be_called(
    queue: iouzcrx.BufRingQueue, listener: socket.socket, param: str
) -> None:
    client, server = connect_pair(listener)
    with client, server:
        for value in (42, "print"):
            with pytest.raises(TypeError, match=rf"^{param} must be callable.*{value!r}"):
                queue.recv_multishot(server, **{param: value})
        # Refused calls started nothing: a good one still gets all the data.
        receiver = queue.recv_multishot(server)
        client.sendall(b"ok")
        assert bytes(receiver.get(10)) == b"ok"
        receiver.close()
