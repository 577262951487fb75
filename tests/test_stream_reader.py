"""ZcrxStreamReader's parsing over chunk boundaries, fed directly (the
transport-level behaviour is in test_streams.py)."""

from __future__ import annotations

import pytest

from iouzcrx.streams import ZcrxStreamReader


def reader_of(*parts: bytes) -> ZcrxStreamReader:
    reader = ZcrxStreamReader()
    for part in parts:
        reader.feed_view(memoryview(part))
    reader.feed_eof()
    return reader


async def test_a_separator_split_over_three_views_is_found():
    reader = reader_of(b"ab\r", b"\ncd", b"ef\r", b"\n", b"\r", b"\nxyz")
    assert bytes(await reader.readuntil(b"\r\n")) == b"ab\r\n"
    assert bytes(await reader.readuntil(b"\r\n\r\n")) == b"cdef\r\n\r\n"
    assert bytes(await reader.read()) == b"xyz"


async def test_a_separator_inside_one_view_comes_back_as_a_slice_of_it():
    reader = reader_of(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody")
    head = await reader.readuntil(b"\r\n\r\n")
    assert isinstance(head, memoryview) and bytes(head) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("split", range(1, 9))
async def test_readuntil_finds_the_separator_wherever_the_chunks_split(split):
    data = b"1234\r\n\r\nrest"
    reader = reader_of(data[:split], data[split:])
    assert bytes(await reader.readuntil(b"\r\n\r\n")) == b"1234\r\n\r\n"
