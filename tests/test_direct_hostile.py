"""Hostile uses of the direct receive (a BufferedProtocol in bufring mode
receiving straight into its get_buffer() memory): memory the program drops,
resizes, closes or shares while a RECV may write it."""

from __future__ import annotations

from typing import Any

from conftest import connect_pair

import iouzcrx

TIMEOUT = 60
KIB = 1024
CANARY = 0xA5


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
    first = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=16 * KIB)
    second = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=16 * KIB)
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
