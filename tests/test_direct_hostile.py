"""Hostile uses of the direct receive (a BufferedProtocol in bufring mode
receiving straight into its get_buffer() memory): memory the program drops,
resizes, closes or shares while a RECV may write it."""

from __future__ import annotations

import asyncio
import errno
import gc
import mmap
import os
import socket
import struct
import weakref
from typing import Any

import pytest
from conftest import connect_pair

import iouzcrx
import iouzcrx.loop

TIMEOUT = 60
KIB = 1024
CANARY = 0xA5


def direct_queue(ring: iouzcrx.Ring) -> Any:
    queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=16 * KIB)
    # Off by default (IOUZCRX_DIRECT_RECEIVE=1 turns it on): set here.
    queue.direct_receive = True
    return queue


def exported(memory: bytearray) -> bool:
    try:
        memory.append(0)
    except BufferError:
        return True
    del memory[-1]
    return False


class Window:
    """get_buffer() returns ``size`` bytes in the middle of a canary-filled
    bytearray, so a byte written outside them shows."""

    def __init__(self, size: int, guard: int = 4 * KIB, memory: bytearray | None = None) -> None:
        self.guard = guard
        self.size = size
        self.memory = memory if memory is not None else bytearray([CANARY]) * (size + 2 * guard)
        self.data = bytearray()

    def get_buffer(self, sizehint: int) -> Any:
        return memoryview(self.memory)[self.guard : self.guard + self.size]

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.memory[self.guard : self.guard + nbytes]

    def guards_intact(self) -> bool:
        head = self.memory[: self.guard]
        tail = self.memory[self.guard + self.size :]
        return head.count(CANARY) == len(head) and tail.count(CANARY) == len(tail)


def stream(seed: int, total: int) -> bytes:
    return bytes((seed * 31 + i * 7 + (i >> 8)) & 0xFF for i in range(total))


def test_two_queues_never_receive_into_the_same_memory_at_once(ring, listener):
    """One memory handed to connections of two queues (two servers sharing a
    protocol's buffer): a second RECV into memory the first may still write
    would mix both streams before either is announced."""
    first = direct_queue(ring)
    second = direct_queue(ring)
    shared = bytearray([CANARY]) * (64 * KIB + 8 * KIB)
    pairs = [connect_pair(listener), connect_pair(listener)]
    try:
        protocols = [Window(64 * KIB, memory=shared), Window(64 * KIB, memory=shared)]
        receivers = [
            queue.recv_multishot(server, protocol=protocol)
            for queue, (_, server), protocol in zip((first, second), pairs, protocols, strict=True)
        ]
        ring.drain()
        assert sum(r.direct_armed for r in receivers) == 1, "two RECVs name one memory"
        payloads = [stream(1, 40 * KIB), stream(2, 40 * KIB)]
        for (client, _), payload in zip(pairs, payloads, strict=True):
            client.sendall(payload)
        ring.wait_for(
            lambda: all(len(p.data) >= len(d) for p, d in zip(protocols, payloads, strict=True)),
            TIMEOUT,
        )
        assert [bytes(p.data) for p in protocols] == payloads
        assert protocols[0].guards_intact()
        for receiver in receivers:
            receiver.close()
        ring.wait_for(lambda: all(r.finished for r in receivers), TIMEOUT)
        assert not exported(shared)
    finally:
        for client, server in pairs:
            client.close()
            server.close()


class Held(bytearray):
    """A bytearray a weak reference can watch."""


def test_memory_nobody_references_lives_exactly_until_the_cqe(ring, listener):
    """get_buffer() returns memory it keeps no reference to: the export alone
    keeps it alive while the kernel may write it, and it is freed once the
    data is announced (no leak)."""
    queue = direct_queue(ring)
    client, server = connect_pair(listener)
    watched: list[weakref.ref[Held]] = []
    got: list[bytes] = []

    class Forgetful:
        def get_buffer(self, sizehint: int) -> Any:
            memory = Held(64 * KIB)
            watched.append(weakref.ref(memory))
            return memoryview(memory)[100 : 100 + 32 * KIB]

        def buffer_updated(self, nbytes: int) -> None:
            got.append(bytes(nbytes))

    try:
        receiver = queue.recv_multishot(server, protocol=Forgetful())
        ring.drain()
        assert receiver.direct_armed and len(watched) == 1
        gc.collect()
        assert watched[0]() is not None, "memory a RECV may write was freed"
        client.sendall(b"q" * 20000)
        ring.wait_for(lambda: got, TIMEOUT)
        gc.collect()
        assert watched[0]() is None, "the export outlived its CQE"
        receiver.close()
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
        gc.collect()
        assert all(ref() is None for ref in watched)
    finally:
        client.close()
        server.close()


def test_an_mmap_cannot_be_closed_under_a_receive_and_gets_the_bytes_exact(ring, listener):
    queue = direct_queue(ring)
    client, server = connect_pair(listener)
    area = mmap.mmap(-1, 128 * KIB)
    area.write(bytes([CANARY]) * len(area))
    data = bytearray()

    class Mapped:
        def get_buffer(self, sizehint: int) -> Any:
            return memoryview(area)[4 * KIB : 68 * KIB]

        def buffer_updated(self, nbytes: int) -> None:
            data.extend(area[4 * KIB : 4 * KIB + nbytes])

    try:
        receiver = queue.recv_multishot(server, protocol=Mapped())
        ring.drain()
        assert receiver.direct_armed
        with pytest.raises(BufferError):
            area.close()
        payload = stream(3, 50 * KIB)
        client.sendall(payload)
        ring.wait_for(lambda: len(data) >= len(payload), TIMEOUT)
        assert bytes(data) == payload
        assert area[: 4 * KIB].count(CANARY) == 4 * KIB
        assert area[68 * KIB :].count(CANARY) == 60 * KIB
        receiver.close()
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
        area.close()  # no export is left
    finally:
        client.close()
        server.close()
        if not area.closed:
            try:
                area.close()
            except BufferError:
                pass


def strided() -> Any:
    return memoryview(bytearray(64 * KIB))[::2]


def empty() -> Any:
    return bytearray()


def raises() -> Any:
    raise ValueError("get_buffer went wrong")


@pytest.mark.parametrize(
    ("make", "error", "words"),
    [
        (strided, TypeError, ["get_buffer(", "contiguous"]),
        (lambda: bytes(64 * KIB), TypeError, ["get_buffer(", "writable"]),
        (empty, RuntimeError, ["get_buffer(", "empty"]),
        (raises, ValueError, ["went wrong"]),
    ],
    ids=["strided", "read-only", "empty", "raises"],
)
def test_memory_that_cannot_take_a_receive_is_reported_every_time_and_never_written(
    ring, listener, make, error, words
):
    """A get_buffer() that keeps returning unusable memory: each attempt is
    reported (the copies ask it again once data is there), the receive
    neither spins nor hangs, and it ends cleanly."""
    queue = direct_queue(ring)
    client, server = connect_pair(listener)
    errors: list[BaseException] = []
    calls: list[int] = []

    class Bad:
        def get_buffer(self, sizehint: int) -> Any:
            calls.append(sizehint)
            return make()

        def buffer_updated(self, nbytes: int) -> None:
            raise AssertionError("nothing can have been received")

    try:
        receiver = queue.recv_multishot(server, protocol=Bad(), on_error=errors.append)
        ring.drain()
        assert not receiver.direct_armed
        assert len(errors) == 1 and type(errors[0]) is error
        assert all(word in str(errors[0]) for word in words), str(errors[0])
        client.sendall(b"w" * 3000)
        ring.wait_for(lambda: len(errors) >= 2, TIMEOUT)
        assert all(type(e) is error for e in errors)
        assert len(calls) < 100, "get_buffer() asked again and again"
        receiver.close()
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
    finally:
        client.close()
        server.close()


def test_memory_over_a_gib_takes_one_capped_receive_byte_exact(ring, listener):
    """Over 1 GiB of get_buffer() memory (an untouched mapping: little of it
    is ever resident): one RECV, its length capped, the bytes exact."""
    queue = direct_queue(ring)
    client, server = connect_pair(listener)
    size = (1 << 30) + 8 * KIB
    try:
        area = mmap.mmap(-1, size)
    except (OSError, OverflowError) as exc:
        pytest.skip(f"cannot map {size} bytes here: {exc}")
    data = bytearray()

    class Huge:
        def get_buffer(self, sizehint: int) -> Any:
            return area

        def buffer_updated(self, nbytes: int) -> None:
            data.extend(area[:nbytes])

    try:
        receiver = queue.recv_multishot(server, protocol=Huge())
        ring.drain()
        assert receiver.direct_armed
        payload = stream(4, 40 * KIB)
        client.sendall(payload)
        ring.wait_for(lambda: len(data) >= len(payload), TIMEOUT)
        assert bytes(data) == payload
        receiver.close()
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
    finally:
        client.close()
        server.close()
        area.close()


def test_a_reset_mid_receive_ends_it_and_releases_the_memory(ring, listener):
    queue = direct_queue(ring)
    client, server = connect_pair(listener)
    protocol = Window(64 * KIB)
    ends: list[Any] = []
    try:
        receiver = queue.recv_multishot(server, protocol=protocol, on_end=ends.append)
        ring.drain()
        assert receiver.direct_armed and exported(protocol.memory)
        payload = stream(5, 30 * KIB)
        client.sendall(payload)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
        assert not exported(protocol.memory)
        assert payload.startswith(bytes(protocol.data))
        assert protocol.guards_intact()
        assert len(ends) == 1
    finally:
        client.close()
        server.close()


def test_keyboard_interrupt_in_get_buffer_leaves_every_connection_receiving(ring, listener):
    """KeyboardInterrupt from one get_buffer() reaches the program after the
    drain; that connection and the others armed in the same drain still
    receive."""
    queue = direct_queue(ring)
    pairs = [connect_pair(listener) for _ in range(3)]

    class Interrupts(Window):
        interrupted = False

        def get_buffer(self, sizehint: int) -> Any:
            if not self.interrupted:
                self.interrupted = True
                raise KeyboardInterrupt
            return super().get_buffer(sizehint)

    protocols = [Window(32 * KIB), Interrupts(32 * KIB), Window(32 * KIB)]
    try:
        receivers = [
            queue.recv_multishot(server, protocol=protocol)
            for (_, server), protocol in zip(pairs, protocols, strict=True)
        ]
        with pytest.raises(KeyboardInterrupt):
            ring.drain()
        ring.drain()
        payloads = [stream(10 + i, 20 * KIB) for i in range(3)]
        for (client, _), payload in zip(pairs, payloads, strict=True):
            client.sendall(payload)
        ring.wait_for(
            lambda: all(len(p.data) >= len(d) for p, d in zip(protocols, payloads, strict=True)),
            TIMEOUT,
        )
        assert [bytes(p.data) for p in protocols] == payloads
        for receiver in receivers:
            receiver.close()
        ring.wait_for(lambda: all(r.finished for r in receivers), TIMEOUT)
        assert not any(exported(p.memory) for p in protocols)
    finally:
        for client, server in pairs:
            client.close()
            server.close()


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_closing_the_loop_with_receives_in_flight_releases_every_memory(use_uvloop):
    """Memory that fills exactly (20 KiB, 40 KiB sent) keeps a direct RECV
    armed after the data; the loop closes under it, servers and
    connections left open: every export is released by then."""
    if use_uvloop and not iouzcrx.loop.uvloop_available():
        pytest.skip("uvloop is not installed for this Python")
    memories: list[bytearray] = []

    class Keeps(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.memory = bytearray(20 * KIB)
            memories.append(self.memory)

        def get_buffer(self, sizehint: int) -> Any:
            return self.memory

        def buffer_updated(self, nbytes: int) -> None:
            pass

    async def start() -> list[Any]:
        loop = asyncio.get_running_loop()
        server = await loop.create_zcrx_server(Keeps, "127.0.0.1", 0, mode="bufring")  # type: ignore[attr-defined]
        server.backend.direct_receive = True
        port = server.sockets[0].getsockname()[1]
        kept: list[Any] = [server]
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"x" * 40 * KIB)
            kept.append(writer)
        deadline = loop.time() + TIMEOUT
        while not (len(memories) == 3 and all(exported(m) for m in memories)):
            assert loop.time() < deadline, "no direct receive was armed"
            await asyncio.sleep(0.01)
        return kept

    loop = iouzcrx.loop.new_event_loop(use_uvloop=use_uvloop)
    try:
        kept = loop.run_until_complete(asyncio.wait_for(start(), TIMEOUT))
    finally:
        loop.close()
    del kept
    gc.collect()
    assert [exported(m) for m in memories] == [False, False, False]


async def test_two_servers_sharing_memory_get_each_stream_exact():
    memory = bytearray(64 * KIB)
    received: list[asyncio.Future[bytes]] = []

    class SharesMemory(asyncio.BufferedProtocol):
        def __init__(self) -> None:
            self.data = bytearray()
            self.done = asyncio.get_running_loop().create_future()
            received.append(self.done)

        def get_buffer(self, sizehint: int) -> Any:
            return memory

        def buffer_updated(self, nbytes: int) -> None:
            self.data += memory[:nbytes]

        def eof_received(self) -> None:
            self.done.set_result(bytes(self.data))

    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_zcrx_server(SharesMemory, "127.0.0.1", 0, mode="bufring")  # type: ignore[attr-defined]
        for _ in range(2)
    ]
    payloads = [stream(20 + i, 2 << 20) for i in range(4)]

    async def send(port: int, payload: bytes) -> Any:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for at in range(0, len(payload), 256 * KIB):
            writer.write(payload[at : at + 256 * KIB])
            await writer.drain()
        writer.write_eof()
        return writer

    try:
        for server in servers:
            server.backend.direct_receive = True
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        writers = await asyncio.gather(
            *(send(ports[i % 2], payload) for i, payload in enumerate(payloads))
        )
        got = [await asyncio.wait_for(done, TIMEOUT) for done in received]
        assert sorted(got) == sorted(payloads)
        for writer in writers:
            writer.close()
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
    assert not exported(memory)


class Meddles(asyncio.BufferedProtocol):
    """Does ``how`` from inside get_buffer() on every ``every``-th call:
    pause and resume at once, hand the connection to a new protocol sharing
    the same memory, or close/abort the transport."""

    def __init__(self, how: str, every: int, memory: bytearray | None = None) -> None:
        self.how = how
        self.every = every
        self.memory = memory if memory is not None else bytearray(64 * KIB)
        self.data = bytearray()
        self.transport: Any = None
        self.calls = 0
        self.root: Meddles = self
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> Any:
        self.calls += 1
        if self.calls % self.every == 0 and not self.transport.is_closing():
            if self.how == "flicker":
                for _ in range(3):
                    self.transport.pause_reading()
                    self.transport.resume_reading()
            elif self.how == "hand-over":
                heir = Meddles(self.how, self.every, self.memory)
                heir.transport, heir.root = self.transport, self.root
                self.transport.set_protocol(heir)
            else:
                getattr(self.transport, self.how)()
        return self.memory

    def buffer_updated(self, nbytes: int) -> None:
        self.root.data += self.memory[:nbytes]

    def eof_received(self) -> None:
        self.connection_lost(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.root.done.done():
            self.root.done.set_result(bytes(self.root.data))


@pytest.mark.parametrize("how", ["flicker", "hand-over", "close", "abort"])
async def test_get_buffer_that_meddles_with_its_transport_keeps_the_stream_exact(how):
    protocols: list[Meddles] = []

    def make() -> Meddles:
        protocols.append(Meddles(how, 3))
        return protocols[-1]

    loop = asyncio.get_running_loop()
    server = await loop.create_zcrx_server(make, "127.0.0.1", 0, mode="bufring")  # type: ignore[attr-defined]
    server.backend.direct_receive = True
    payload = stream(30, 1 << 20)
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for at in range(0, len(payload), 64 * KIB):
                writer.write(payload[at : at + 64 * KIB])
                await writer.drain()
            writer.write_eof()
        except ConnectionError:
            assert how in ("close", "abort")
        deadline = loop.time() + TIMEOUT
        while not protocols:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        data = await asyncio.wait_for(protocols[0].done, TIMEOUT)
        if how in ("close", "abort"):
            assert payload.startswith(data)
        else:
            assert data == payload
        assert server.backend.stats()["direct_receives"] > 0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    deadline = loop.time() + TIMEOUT
    while exported(protocols[0].memory):
        assert loop.time() < deadline, "the memory stayed exported"
        await asyncio.sleep(0.01)


def test_a_file_mapping_truncated_under_a_receive_ends_it_naming_get_buffer(
    ring, listener, tmp_path
):
    """The kernel cannot write a file mapping whose file was truncated
    under it: the receive ends with EFAULT that says whose memory it was
    and what to return instead, and nothing is announced."""
    queue = direct_queue(ring)
    client, server = connect_pair(listener)
    backing = open(tmp_path / "backing", "w+b")
    backing.truncate(64 * KIB)
    area = mmap.mmap(backing.fileno(), 64 * KIB)
    ends: list[Any] = []
    updates: list[int] = []

    class Mapped:
        def get_buffer(self, sizehint: int) -> Any:
            return area

        def buffer_updated(self, nbytes: int) -> None:
            updates.append(nbytes)

    try:
        receiver = queue.recv_multishot(server, protocol=Mapped(), on_end=ends.append)
        ring.drain()
        assert receiver.direct_armed
        backing.truncate(0)
        client.sendall(b"t" * 30000)
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
        assert updates == []
        assert len(ends) == 1 and isinstance(ends[0], OSError), ends
        assert ends[0].errno == errno.EFAULT
        assert "get_buffer()" in str(ends[0]) and "writable" in str(ends[0]), str(ends[0])
        area.close()  # released at the CQE
    finally:
        client.close()
        server.close()
        backing.close()
        if not area.closed:
            try:
                area.close()
            except BufferError:
                pass


class Collects:
    def __init__(self, memory: bytearray | None = None) -> None:
        self.memory = memory if memory is not None else bytearray(64 * KIB)
        self.data = bytearray()

    def get_buffer(self, sizehint: int) -> Any:
        return self.memory

    def buffer_updated(self, nbytes: int) -> None:
        self.data += self.memory[:nbytes]


def test_a_forked_child_with_its_own_ring_receives_direct_again_into_freed_memory(ring, listener):
    """The child closes the parent's ring under a direct receive (whose CQE
    never comes there) and drops it; a receive of its own ring, made at the
    same address, must release its memory at its CQE, so that the next
    receive into that memory goes direct again."""
    queue = direct_queue(ring)
    client, server = connect_pair(listener)
    try:
        receiver = queue.recv_multishot(server, protocol=Collects())
        ring.drain()
        assert receiver.direct_armed
        pid = os.fork()
        if pid == 0:
            code = 10
            try:
                receiver.close()
                ring.close()
                del receiver, queue
                gc.collect()
                with iouzcrx.Ring() as own:
                    mine = direct_queue(own)
                    first_client, first_server = connect_pair(listener)
                    first = Collects()
                    taken = mine.recv_multishot(first_server, protocol=first)
                    # CPython hands the new receive the address of the one
                    # just freed: the span left behind names it.
                    own.drain()
                    first_client.sendall(b"c" * 1000)
                    own.wait_for(lambda: first.data, TIMEOUT)
                    taken.close()
                    own.wait_for(lambda: taken.finished, TIMEOUT)
                    next_client, next_server = connect_pair(listener)
                    again = mine.recv_multishot(next_server, protocol=Collects(first.memory))
                    own.drain()
                    code = 0 if again.direct_armed else 12
                    again.close()
                    own.wait_for(lambda: again.finished, TIMEOUT)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        assert code != 12, "the child's memory stayed marked as in flight after its CQE"
        assert code == 0, f"the child exited with {code}"
        receiver.close()
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
    finally:
        client.close()
        server.close()


@pytest.mark.xfail(
    reason="known defect, why the direct receive is off by default: the copy path of "
    "a connection whose get_buffer() memory overlaps another's direct RECV copies into "
    "it while that RECV's CQE is still unread later in the same batch, overwriting "
    "bytes the kernel already wrote (here the first byte of the third stream); it "
    "depends on the order of completions, so the mark is not strict",
)
def test_overlapping_slices_of_one_memory_never_take_two_receives(ring, listener):
    """Four connections handed slices of one bytearray that overlap their
    neighbours' by one byte, and one that touches without overlapping:
    only memory no RECV in flight may write takes a direct receive, and
    every stream comes out exact."""
    queue = direct_queue(ring)
    memory = bytearray(256 * KIB)
    step = 32 * KIB
    # [0, 32K+1), [32K, 64K+1), [64K, 96K+1), [96K+1, 128K+1): the last
    # touches the third without overlapping it.
    bounds = [(0, step + 1), (step, 2 * step + 1), (2 * step, 3 * step + 1)]
    bounds.append((3 * step + 1, 4 * step + 1))
    pairs = [connect_pair(listener) for _ in bounds]

    class Slice:
        def __init__(self, start: int, end: int) -> None:
            self.start, self.end = start, end
            self.data = bytearray()

        def get_buffer(self, sizehint: int) -> Any:
            return memoryview(memory)[self.start : self.end]

        def buffer_updated(self, nbytes: int) -> None:
            self.data += memory[self.start : self.start + nbytes]

    protocols = [Slice(start, end) for start, end in bounds]
    try:
        receivers = [
            queue.recv_multishot(server, protocol=protocol)
            for (_, server), protocol in zip(pairs, protocols, strict=True)
        ]
        ring.drain()
        assert [r.direct_armed for r in receivers] == [True, False, True, True]
        payloads = [stream(40 + i, 200 * KIB) for i in range(len(bounds))]
        for (client, _), payload in zip(pairs, payloads, strict=True):
            client.sendall(payload)
        ring.wait_for(
            lambda: all(len(p.data) >= len(d) for p, d in zip(protocols, payloads, strict=True)),
            TIMEOUT,
        )
        assert [bytes(p.data) for p in protocols] == payloads
        for receiver in receivers:
            receiver.close()
        ring.wait_for(lambda: all(r.finished for r in receivers), TIMEOUT)
        assert not exported(memory)
    finally:
        for client, server in pairs:
            client.close()
            server.close()
