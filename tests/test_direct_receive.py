"""A BufferedProtocol in bufring mode receives straight into its own
get_buffer() memory: single-shot RECVs, the memory exported from the SQE until
its CQE however the connection ends (the kernel may write it until then), and
released before buffer_updated() so that the protocol may resize it.  Server
tests run on both loops (tests/conftest.py); the ring-level ones drive a ring
and a queue directly."""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any

import pytest
from conftest import SCALE, Pattern, connect_pair

import iouzcrx
from iouzcrx.errors import WrongProcess

TIMEOUT = 60
KIB = 1024


def expected(seed: int, total: int) -> bytes:
    return b"".join(bytes(c) for c in Pattern(seed).chunks(total))


def exported(memory: bytearray) -> bool:
    """Whether a buffer export holds ``memory`` (it cannot be resized)."""
    try:
        memory.append(0)
    except BufferError:
        return True
    del memory[-1]
    return False


class Memory(asyncio.BufferedProtocol):
    """Collects the stream; ``kind`` says what get_buffer() returns: one
    large bytearray, a fresh bytearray each call, a memoryview slice into a
    bytearray, or small memory (which gets copies instead)."""

    def __init__(self, kind: str = "large") -> None:
        self.kind = kind
        self.data = bytearray()
        self.memory = bytearray(256 * KIB if kind != "small" else 4 * KIB)
        self.current: Any = None
        self.transport: Any = None
        self.released_before_update = True
        loop = asyncio.get_running_loop()
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.calls = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> Any:
        assert sizehint > 0
        self.calls += 1
        if self.kind == "fresh":
            self.memory = bytearray(64 * KIB + self.calls % 7)
            self.current = self.memory
        elif self.kind == "slice":
            self.current = memoryview(self.memory)[16 : 16 + 100_003]
        else:
            self.current = self.memory
        return self.current

    def buffer_updated(self, nbytes: int) -> None:
        view = self.current
        self.data += view[:nbytes]
        if type(view) is memoryview:
            view.release()
        # The kernel is done with the memory before it is announced.
        self.released_before_update &= not exported(self.memory)

    def eof_received(self) -> None:
        if not self.eof.done():
            self.eof.set_result(bytes(self.data))

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.eof.done():
            self.eof.set_result(bytes(self.data))
        if not self.lost.done():
            self.lost.set_result(exc)


async def serve(make: Any, *, direct: bool = True) -> tuple[iouzcrx.ZcrxServer, list[Any]]:
    protocols: list[Any] = []

    def factory() -> Any:
        protocols.append(make())
        return protocols[-1]

    loop = asyncio.get_running_loop()
    server = await loop.create_zcrx_server(factory, "127.0.0.1", 0, mode="bufring")
    # Off by default (IOUZCRX_DIRECT_RECEIVE=1 turns it on): set here.
    server.backend.direct_receive = direct
    return server, protocols


async def first(protocols: list[Any]) -> Any:
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not protocols:
        assert asyncio.get_running_loop().time() < deadline, "no connection was accepted"
        await asyncio.sleep(0.01)
    return protocols[0]


async def send(server: iouzcrx.ZcrxServer, seed: int, total: int, *, eof: bool = True) -> Any:
    port = server.sockets[0].getsockname()[1]
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    for chunk in Pattern(seed).chunks(total):
        writer.write(chunk)
        await writer.drain()
    if eof:
        writer.write_eof()
    return writer


@pytest.mark.parametrize("kind", ["large", "fresh", "slice", "small"])
async def test_the_stream_lands_byte_exact_in_get_buffer_memory(kind):
    total = (8 << 20) // SCALE
    server, protocols = await serve(lambda: Memory(kind))
    async with server:
        writer = await send(server, 3, total)
        protocol = await first(protocols)
        data = await asyncio.wait_for(protocol.eof, TIMEOUT)
        assert data == expected(3, total)
        assert protocol.released_before_update
        await asyncio.wait_for(protocol.lost, TIMEOUT)
        if type(protocol.current) is memoryview:
            # The slice get_buffer() returned last (BufferError: still exported).
            protocol.current.release()
        assert not exported(protocol.memory)
        stats = server.backend.stats()
        if kind == "small":
            # Memory this small gets copies after the first receive (of
            # the connection, and of each restart after a starvation).
            assert stats["direct_receives"] <= 1 + stats["rearms"], repr(stats)
        else:
            assert stats["direct_receives"] > 0, stats
        assert stats["buffers_in_use"] == 0, stats
        writer.close()


class Pausing(Memory):
    """Pauses after every ``step`` bytes, resuming a little later."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step = step
        self.paused = False
        self.late = 0

    def get_buffer(self, sizehint: int) -> Any:
        self.late += self.paused
        return super().get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.late += self.paused
        before = len(self.data)
        super().buffer_updated(nbytes)
        if before // self.step != len(self.data) // self.step:
            self.paused = True
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(0.002, self.resume)

    def resume(self) -> None:
        self.paused = False
        self.transport.resume_reading()


async def test_pause_and_resume_mid_stream_keep_the_stream_exact():
    total = (4 << 20) // SCALE
    server, protocols = await serve(lambda: Pausing(300_000 // SCALE))
    async with server:
        writer = await send(server, 4, total)
        protocol = await first(protocols)
        data = await asyncio.wait_for(protocol.eof, TIMEOUT)
        assert data == expected(4, total)
        assert protocol.late == 0, "a callback came while paused"
        assert protocol.released_before_update
        writer.close()
        await asyncio.wait_for(protocol.lost, TIMEOUT)
        assert not exported(protocol.memory)


async def test_pause_and_resume_at_once_never_receive_twice_into_the_memory():
    """Resumed before the paused receive's cancel completed: the new receive
    must not write the memory the old one may still fill."""

    class Flicker(Pausing):
        def buffer_updated(self, nbytes: int) -> None:
            Memory.buffer_updated(self, nbytes)
            # Once the drain that called this has armed the next receive.
            asyncio.get_running_loop().call_soon(self.flick)

        def flick(self) -> None:
            if not self.transport.is_closing():
                self.transport.pause_reading()
                self.transport.resume_reading()

    total = (4 << 20) // SCALE
    server, protocols = await serve(lambda: Flicker(1))
    async with server:
        writer = await send(server, 8, total)
        protocol = await first(protocols)
        data = await asyncio.wait_for(protocol.eof, TIMEOUT)
        assert data == expected(8, total)
        writer.close()
        await asyncio.wait_for(protocol.lost, TIMEOUT)
        assert not exported(protocol.memory)


SHARED = bytearray(256 * KIB)


class Shared(Memory):
    """Every connection's get_buffer() returns the same memory, as a
    program that reads each chunk at once may (asyncio fills it only
    between get_buffer() and buffer_updated())."""

    def get_buffer(self, sizehint: int) -> Any:
        self.current = SHARED
        return SHARED

    def buffer_updated(self, nbytes: int) -> None:
        self.data += SHARED[:nbytes]


async def test_memory_shared_between_connections_gets_each_stream_exact():
    """One scratch memory for every connection, as the stock loops allow:
    exact on the copies, the default.  (With the direct receive it is not
    yet safe: see test_direct_hostile.py.)"""
    total = (4 << 20) // SCALE
    server, protocols = await serve(Shared, direct=False)
    async with server:
        senders = [asyncio.create_task(send(server, seed, total)) for seed in (11, 12, 13)]
        writers = await asyncio.gather(*senders)
        deadline = asyncio.get_running_loop().time() + TIMEOUT
        while len(protocols) < 3:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        got = sorted([await asyncio.wait_for(p.eof, TIMEOUT) for p in protocols])
        assert got == sorted(expected(seed, total) for seed in (11, 12, 13))
        for writer in writers:
            writer.close()
        for p in protocols:
            await asyncio.wait_for(p.lost, TIMEOUT)
        assert not exported(SHARED)


class Bytes(asyncio.Protocol):
    def __init__(self, owner: HandsOver) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner.data += data
        if len(self.owner.data) >= 2 * self.owner.after:
            back = Memory()
            back.data, back.eof, back.lost = self.owner.data, self.owner.eof, self.owner.lost
            back.transport = self.owner.transport
            self.owner.back = back
            self.owner.transport.set_protocol(back)

    def eof_received(self) -> None:
        self.owner.eof_received()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.owner.connection_lost(exc)


class HandsOver(Memory):
    """Hands the connection to a bytes Protocol after ``after`` bytes, which
    hands it back to a new buffered one after as many again."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after
        self.back: Memory | None = None

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        if len(self.data) >= self.after and self.transport.get_protocol() is self:
            self.transport.set_protocol(Bytes(self))


async def test_set_protocol_to_a_protocol_and_back_mid_stream():
    total = (4 << 20) // SCALE
    server, protocols = await serve(lambda: HandsOver(1_000_000 // SCALE))
    async with server:
        writer = await send(server, 5, total)
        protocol = await first(protocols)
        data = await asyncio.wait_for(protocol.eof, TIMEOUT)
        assert data == expected(5, total)
        assert protocol.back is not None, "the stream ended before it was handed back"
        writer.close()
        await asyncio.wait_for(protocol.lost, TIMEOUT)
        assert not exported(protocol.memory)
        assert not exported(protocol.back.memory)


class Ends(Memory):
    """Closes or aborts its transport from buffer_updated after ``after`` bytes."""

    def __init__(self, how: str, after: int) -> None:
        super().__init__()
        self.how = how
        self.after = after
        self.updates_after_end = 0
        self.ended = False

    def buffer_updated(self, nbytes: int) -> None:
        self.updates_after_end += self.ended
        super().buffer_updated(nbytes)
        if not self.ended and len(self.data) >= self.after:
            self.ended = True
            getattr(self.transport, self.how)()


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_close_or_abort_from_buffer_updated(how):
    server, protocols = await serve(lambda: Ends(how, 200_000 // SCALE))
    async with server:
        writer = await send(server, 6, (2 << 20) // SCALE, eof=False)
        protocol = await first(protocols)
        assert await asyncio.wait_for(protocol.lost, TIMEOUT) is None
        assert protocol.updates_after_end == 0
        assert protocol.data == expected(6, len(protocol.data))
        # Nothing was armed into the memory after the end.
        assert not exported(protocol.memory)
        writer.close()


class Echo(Memory):
    """Answers each 1 KiB request with 64 bytes."""

    def buffer_updated(self, nbytes: int) -> None:
        super().buffer_updated(nbytes)
        while len(self.data) >= 1024:
            del self.data[:1024]
            self.transport.write(b"r" * 64)


async def enters_per_request(direct: bool, requests: int) -> float:
    server, protocols = await serve(Echo, direct=direct)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"q" * 1024
        writer.write(request)
        await asyncio.wait_for(reader.readexactly(64), TIMEOUT)
        ring = server.backend.ring
        enters = ring.enters
        for _ in range(requests):
            writer.write(request)
            await asyncio.wait_for(reader.readexactly(64), TIMEOUT)
        per_request = (ring.enters - enters) / requests
        writer.close()
        await asyncio.wait_for((await first(protocols)).lost, TIMEOUT)
    return per_request


async def test_request_response_costs_no_enter_of_its_own():
    """Short requests that empty the socket switch the connection to a
    multishot, which stays armed between requests: serving them takes the
    enters the copy path takes, not one more per request (a RECV armed per
    request is an SQE the drain must enter for)."""
    requests = 200
    copies = await enters_per_request(False, requests)
    direct = await enters_per_request(True, requests)
    assert direct < copies + 0.25, f"{direct:.2f} enters per request, copies {copies:.2f}"


# -- the ring level: the export's lifetime ------------------------------------------


class Plain:
    """A buffered protocol for a bare receive: one bytearray."""

    def __init__(self, size: int = 64 * KIB) -> None:
        self.memory = bytearray(size)
        self.data = bytearray()
        self.hook: Any = None

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.memory

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.memory[:nbytes]
        if self.hook is not None:
            self.hook()


@pytest.mark.parametrize("end", ["data", "cancel", "close", "queue-close", "ring-close"])
def test_the_memory_stays_exported_until_the_cqe(ring, listener, end):
    queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=16 * KIB)
    queue.direct_receive = True
    client, server = connect_pair(listener)
    try:
        protocol = Plain()
        ends: list[Any] = []
        receiver = queue.recv_multishot(server, protocol=protocol, on_end=ends.append)
        assert not exported(protocol.memory), "get_buffer() is asked inside a drain"
        ring.drain()
        assert receiver.direct_armed
        assert exported(protocol.memory)
        if end == "data":
            client.sendall(b"x" * 1000)
            ring.wait_for(lambda: protocol.data, TIMEOUT)
            assert protocol.data == b"x" * 1000
        elif end == "cancel":
            receiver.cancel()
        elif end == "close":
            receiver.close()
        elif end == "queue-close":
            queue.close()
        if end != "ring-close":
            # Asked to stop, not stopped: the kernel may still write.
            assert exported(protocol.memory) or end == "data"
        if end == "ring-close":
            ring.close()  # waits for the cancel's CQE
            assert ends == [None]
        elif end != "data":
            ring.wait_for(lambda: receiver.finished, TIMEOUT)
            assert ends == [None]
        assert not exported(protocol.memory)
        if end == "data":
            receiver.close()
            ring.wait_for(lambda: receiver.finished, TIMEOUT)
            assert not exported(protocol.memory)
    finally:
        client.close()
        server.close()


def test_a_bad_get_buffer_is_reported_and_the_copies_take_over(ring, listener):
    queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=16 * KIB)
    queue.direct_receive = True
    client, server = connect_pair(listener)
    errors: list[BaseException] = []

    class Odd(Plain):
        calls = 0

        def get_buffer(self, sizehint: int) -> Any:
            self.calls += 1
            if self.calls == 1:
                return memoryview(bytes(10))  # read-only
            return self.memory

    try:
        protocol = Odd()
        receiver = queue.recv_multishot(server, protocol=protocol, on_error=errors.append)
        ring.drain()
        assert [type(e) for e in errors] == [TypeError]
        assert "get_buffer(" in str(errors[0]) and "writable" in str(errors[0])
        assert not receiver.direct_armed and receiver.armed
        client.sendall(b"y" * 5000)
        ring.wait_for(lambda: len(protocol.data) >= 5000, TIMEOUT)
        assert protocol.data == b"y" * 5000
        receiver.close()
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
    finally:
        client.close()
        server.close()


def test_a_forked_child_never_releases_the_parents_export(ring, listener):
    """The receive is the parent's: a child that closes the ring and drops
    the receiver keeps its copy of the memory exported (the CQE never comes
    there); the parent's receive goes on and releases at its CQE."""
    queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=16 * KIB)
    queue.direct_receive = True
    client, server = connect_pair(listener)
    try:
        protocol = Plain()
        receiver = queue.recv_multishot(server, protocol=protocol)
        ring.drain()
        assert receiver.direct_armed
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                receiver.close()
                ring.close()
                del receiver
                gc.collect()
                code = 0 if exported(protocol.memory) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        client.sendall(b"z" * 3000)
        ring.wait_for(lambda: len(protocol.data) >= 3000, TIMEOUT)
        assert protocol.data == b"z" * 3000
        receiver.close()
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
        assert not exported(protocol.memory)
    finally:
        client.close()
        server.close()


def test_a_child_forked_in_buffer_updated_leaves_the_parent_receiving(ring, listener):
    queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=16 * KIB)
    queue.direct_receive = True
    client, server = connect_pair(listener)
    parent = os.getpid()
    children: list[int] = []
    try:
        protocol = Plain()

        def fork_once() -> None:
            if os.getpid() != parent or children:
                return
            pid = os.fork()
            if pid:
                children.append(pid)

        protocol.hook = fork_once
        receiver = queue.recv_multishot(server, protocol=protocol)
        client.sendall(b"a" * 1000)
        code = 10
        try:
            while not children:
                ring.wait(0.01)
        except WrongProcess:
            code = 0  # the child's next drain: the ring is the parent's
        if os.getpid() != parent:
            os._exit(code)
        _, status = os.waitpid(children[0], 0)
        assert os.waitstatus_to_exitcode(status) == 0
        client.sendall(b"b" * 2000)
        ring.wait_for(lambda: len(protocol.data) >= 3000, TIMEOUT)
        assert protocol.data == b"a" * 1000 + b"b" * 2000
        receiver.close()
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
        assert not exported(protocol.memory)
    finally:
        if os.getpid() == parent:
            client.close()
            server.close()
