"""ZcrxStreamReader's parsing over chunk boundaries, fed directly (the
transport-level behaviour is in test_streams.py)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from iouzcrx.streams import ZcrxStreamReader

TIMEOUT = 10


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


# -- the incremental separator search: each wake-up searches only new bytes ---------


async def pending_readuntil(reader: ZcrxStreamReader, separator: bytes) -> asyncio.Task[Any]:
    """A readuntil that has searched what is buffered and waits for more."""
    task = asyncio.ensure_future(reader.readuntil(separator))
    await asyncio.sleep(0)
    assert not task.done()
    return task


async def test_a_separator_split_over_two_chunks_fed_one_by_one_is_found():
    reader = ZcrxStreamReader()
    reader.feed_view(memoryview(b"key: value\r"))
    task = await pending_readuntil(reader, b"\r\n")
    reader.feed_view(memoryview(b"\nnext"))
    assert bytes(await asyncio.wait_for(task, TIMEOUT)) == b"key: value\r\n"
    assert reader._size == 4


async def test_a_separator_split_over_three_chunks_fed_one_by_one_is_found():
    reader = ZcrxStreamReader()
    reader.feed_view(memoryview(b"head\r"))
    task = await pending_readuntil(reader, b"\r\n\r\n")
    reader.feed_view(memoryview(b"\n\r"))
    await asyncio.sleep(0)
    assert not task.done()
    reader.feed_view(memoryview(b"\nbody"))
    assert bytes(await asyncio.wait_for(task, TIMEOUT)) == b"head\r\n\r\n"
    assert bytes(await reader.read(4)) == b"body"


async def test_a_partial_separator_at_the_end_is_searched_again_once_completed():
    reader = ZcrxStreamReader()
    reader.feed_view(memoryview(b"0123456789--bou"))
    task = await pending_readuntil(reader, b"--boundary")
    # Everything before the possible start of a separator was ruled out.
    assert reader._searched == 10
    reader.feed_view(memoryview(b"nd"))
    await asyncio.sleep(0)
    assert not task.done() and reader._searched == 10
    reader.feed_view(memoryview(b"ary!"))
    assert bytes(await asyncio.wait_for(task, TIMEOUT)) == b"0123456789--boundary"
    assert bytes(await reader.read(1)) == b"!"


async def test_a_false_start_across_a_seam_does_not_hide_a_later_separator():
    # "aab" after "a|a": the candidate at the seam fails, the next one holds.
    reader = ZcrxStreamReader()
    reader.feed_view(memoryview(b"xa"))
    task = await pending_readuntil(reader, b"aab")
    reader.feed_view(memoryview(b"a"))
    await asyncio.sleep(0)
    reader.feed_view(memoryview(b"ab-"))
    assert bytes(await asyncio.wait_for(task, TIMEOUT)) == b"xaaab"


async def test_the_search_does_not_go_over_what_it_already_searched():
    reader = ZcrxStreamReader()
    reader.feed_view(memoryview(b"a" * 1000))
    task = await pending_readuntil(reader, b"\r\n")
    assert reader._searched == 1000
    reader.feed_view(memoryview(b"b" * 500 + b"\r"))
    await asyncio.sleep(0)
    assert reader._searched == 1500  # the "\r" may start the separator
    reader.feed_view(memoryview(b"\n"))
    assert len(await asyncio.wait_for(task, TIMEOUT)) == 1502
    assert reader._searched == 0


async def test_a_limit_overrun_keeps_the_data_and_the_search_position():
    reader = ZcrxStreamReader(limit=8)
    reader.feed_view(memoryview(b"abcdef"))
    reader.feed_view(memoryview(b"ghij\r"))
    with pytest.raises(asyncio.LimitOverrunError) as info:
        await reader.readuntil(b"\r\n")
    assert info.value.consumed == 10  # as asyncio: where the next separator could start
    assert reader._size == 11 and reader._searched == 10
    # A read moves the search position with the read position.
    assert bytes(await reader.read(2)) == b"ab"
    assert reader._searched == 8
    reader.feed_view(memoryview(b"\nrest"))
    assert bytes(await reader.readuntil(b"\r\n")) == b"cdefghij\r\n"
    assert bytes(await reader.readuntil(b"st")) == b"rest"


def stock_reader_of(limit: int, parts: list[bytes]) -> asyncio.StreamReader:
    stock = asyncio.StreamReader(limit=limit)
    for part in parts:
        stock.feed_data(part)
    stock.feed_eof()
    return stock


async def outcomes(reader: Any, calls: list[tuple[str, bytes]]) -> list[Any]:
    """What each call returns or raises (the exception's type, message and
    consumed): the same calls on asyncio's reader must give the same."""
    seen: list[Any] = []
    for name, separator in calls:
        try:
            if name == "readline":
                result = await reader.readline()
            else:
                result = await reader.readuntil(separator)
        except asyncio.LimitOverrunError as exc:
            seen.append(("LimitOverrunError", str(exc), exc.consumed))
        except asyncio.IncompleteReadError as exc:
            seen.append(("IncompleteReadError", exc.partial))
        except ValueError as exc:
            seen.append(("ValueError", str(exc)))
        else:
            seen.append(bytes(result))
    return seen


LONG_LINES = [
    # A line past the limit with no newline yet, ended later.
    (8, [b"ok 1\n", b"A" * 20, b"\nok 2\n", b"tail"], [("readline", b"")] * 5),
    # The newline arrives with the line, beyond the limit.
    (8, [b"A" * 12 + b"\nok\n"], [("readline", b"")] * 3),
    # An unterminated tail past the limit at EOF.
    (8, [b"short\n", b"B" * 30], [("readline", b"")] * 3),
    # readuntil leaves the data where it is, whichever error it raises.
    (
        8,
        [b"C" * 10 + b"\r\n", b"D" * 3 + b"\r\n"],
        [("readuntil", b"\r\n"), ("readline", b""), ("readuntil", b"\r\n"), ("readline", b"")],
    ),
    (6, [b"E" * 7, b"F\r"], [("readuntil", b"\r\n"), ("readline", b""), ("readline", b"")]),
    # A separator that ends right at the limit is within it.
    (4, [b"abcd;", b"abcde;"], [("readuntil", b";"), ("readuntil", b";"), ("readline", b"")]),
]


@pytest.mark.parametrize(("limit", "parts", "calls"), LONG_LINES)
async def test_lines_past_the_limit_are_refused_and_dropped_as_asyncio_does(limit, parts, calls):
    """readline raises ValueError for a line past the limit and drops it, so
    that the next call reads on (a handler that skips long lines must not
    spin on the same bytes); readuntil raises LimitOverrunError and keeps
    them. Chunked as fed, and in chunks of one byte."""
    expected = await outcomes(stock_reader_of(limit, parts), calls)
    for chunks in (parts, [bytes([b]) for part in parts for b in part]):
        reader = ZcrxStreamReader(limit=limit)
        for chunk in chunks:
            reader.feed_view(memoryview(chunk))
        reader.feed_eof()
        assert await outcomes(reader, calls) == expected


async def test_another_separator_starts_a_new_search():
    reader = reader_of(b"one;two,three;")
    assert bytes(await reader.readuntil(b",")) == b"one;two,"
    assert bytes(await reader.readuntil(b";")) == b"three;"
    reader = ZcrxStreamReader(limit=4)
    reader.feed_view(memoryview(b"abc;defgh"))
    with pytest.raises(asyncio.LimitOverrunError):
        await reader.readuntil(b",")
    assert bytes(await reader.readuntil(b";")) == b"abc;"


@pytest.mark.parametrize("seed", range(40))
async def test_readuntil_matches_bytes_find_over_random_chunks(seed):
    rng = random.Random(seed)
    separator = rng.choice([b"\n", b"\r\n", b"\r\n\r\n", b"abab", b"aab", b"xyzzy"])
    alphabet = b"ab\r\nxyz"
    data = bytes(rng.choice(alphabet) for _ in range(400))
    cuts = sorted(rng.sample(range(1, len(data)), 60))
    chunks = [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    expected = []
    start = 0
    while (end := data.find(separator, start)) >= 0:
        expected.append(data[start : end + len(separator)])
        start = end + len(separator)
    reader = ZcrxStreamReader()
    got: list[bytes] = []
    task = asyncio.ensure_future(reader.readuntil(separator))
    for chunk in chunks:
        reader.feed_view(memoryview(chunk))
        await asyncio.sleep(0)
        while task.done():
            got.append(bytes(task.result()))
            task = asyncio.ensure_future(reader.readuntil(separator))
            await asyncio.sleep(0)
    reader.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError) as info:
        await asyncio.wait_for(task, TIMEOUT)
    assert got == expected
    assert info.value.partial == data[start:]


# -- fast paths and misuse -----------------------------------------------------------


async def test_reads_inside_one_chunk_are_slices_and_across_chunks_copies():
    reader = reader_of(b"abcdefgh", b"ijkl")
    first = await reader.readexactly(3)
    assert isinstance(first, memoryview) and bytes(first) == b"abc"
    middle = await reader.readexactly(7)
    assert isinstance(middle, bytes) and middle == b"defghij"
    rest = await reader.__anext__()
    assert isinstance(rest, memoryview) and rest.readonly and bytes(rest) == b"kl"
    with pytest.raises(StopAsyncIteration):
        await reader.__anext__()


async def test_a_view_released_by_its_sender_stays_readable():
    reader = ZcrxStreamReader()
    view = memoryview(bytearray(b"payload"))
    reader.feed_view(view)
    view.release()
    assert bytes(await reader.readexactly(7)) == b"payload"


async def test_views_that_are_not_plain_bytes_are_read_as_their_bytes():
    reader = ZcrxStreamReader()
    words = memoryview(bytearray(b"\x01\x00\x02\x00")).cast("H")
    reader.feed_view(words)
    reader.feed_view(memoryview(b"0123456789")[::2])
    reader.feed_view(memoryview(b"abcdef").cast("B", (2, 3)))
    reader.feed_eof()
    assert bytes(await reader.readexactly(9)) == b"\x01\x00\x02\x0002468"
    assert bytes(await reader.read(2)) == b"ab"  # bytes, not rows
    assert bytes(await reader.read()) == b"cdef"


async def test_two_coroutines_waiting_on_one_reader_is_refused():
    reader = ZcrxStreamReader()
    task = asyncio.ensure_future(reader.readexactly(4))
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already waiting"):
        await reader.read(1)
    reader.feed_view(memoryview(b"data"))
    assert bytes(await asyncio.wait_for(task, TIMEOUT)) == b"data"


async def test_bad_separators_are_refused_naming_the_value():
    reader = reader_of(b"x\n")
    with pytest.raises(TypeError, match="'\\\\n'"):
        await reader.readuntil("\n")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one-byte"):
        await reader.readuntil(b"")
    assert bytes(await reader.readuntil(bytearray(b"\n"))) == b"x\n"


def finished_without_waiting(coroutine: Any) -> Any:
    """The coroutine's result, given that it returns at its first step: the
    data was there, so it neither awaited nor made a future."""
    with pytest.raises(StopIteration) as info:
        coroutine.send(None)
    return info.value.value


def test_reads_of_buffered_data_return_without_awaiting():
    reader = ZcrxStreamReader()
    reader.feed_view(memoryview(b"line one\nline two\nabcdefgh"))
    reader.feed_view(memoryview(b"ijkl"))
    assert bytes(finished_without_waiting(reader.readline())) == b"line one\n"
    assert bytes(finished_without_waiting(reader.readuntil(b"two\n"))) == b"line two\n"
    assert bytes(finished_without_waiting(reader.readexactly(3))) == b"abc"
    assert bytes(finished_without_waiting(reader.read(2))) == b"de"
    assert bytes(finished_without_waiting(reader.__anext__())) == b"fgh"
    assert bytes(finished_without_waiting(reader.readexactly(4))) == b"ijkl"
    reader.feed_eof()
    assert finished_without_waiting(reader.read()) == b""


async def test_releasing_the_area_lets_go_of_every_view_and_keeps_the_bytes():
    # A bytearray cannot be resized while a view over it lives: resizing it
    # shows whether the reader still holds one.
    memories = [bytearray(b"first "), bytearray(b"second "), bytearray(b"third")]
    reader = ZcrxStreamReader()
    for memory in memories:
        reader.feed_view(memoryview(memory))
    assert bytes(await reader.readexactly(2)) == b"fi"
    with pytest.raises(BufferError):
        memories[0].extend(b"!")
    reader._release_area()
    reader._release_area()  # twice: nothing more to give back
    for memory in memories:
        memory.extend(b"!")
    reader.feed_view(memoryview(b" fourth"))
    reader.feed_eof()
    assert bytes(await reader.readuntil(b"second")) == b"rst second"
    assert bytes(await reader.read()) == b" third fourth"
    assert reader.at_eof()
