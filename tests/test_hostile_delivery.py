"""The per-chunk delivery paths under hostile use, on the host kernel in
bufring mode (classic and incremental rings): error handlers that raise,
protocols handing back odd memory, views over parts of buffers outliving
their connection. Every test checks that the data still arrives byte-exact
and that every buffer goes back."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import Pattern, connect_pair

import iouzcrx

KIB = 1024
TIMEOUT = 30

ring_kinds = pytest.mark.parametrize("incremental", [False, True], ids=["classic", "incremental"])


def bufring_queue(ring: iouzcrx.Ring, incremental: bool, **kw: int) -> iouzcrx.BufRingQueue:
    kw.setdefault("area_size", 1 << 20)
    kw.setdefault("buffer_size", 16 * KIB)
    queue = iouzcrx.BufRingQueue(ring, incremental=incremental, **kw)
    if incremental and not queue.incremental:
        queue.close()
        pytest.skip(str(queue.incremental_refused))
    return queue


def drain_until(ring: iouzcrx.Ring, done: Any, errors: list[BaseException]) -> None:
    """Drain as an event loop would, keeping what the drains raise, until
    ``done()`` or TIMEOUT (then the assertion names what was missing)."""
    deadline = time.monotonic() + TIMEOUT
    while not done() and time.monotonic() < deadline:
        try:
            ring.wait(0.01)
        except Exception as exc:  # the error handler's own failure
            errors.append(exc)


@ring_kinds
def test_an_error_handler_that_raises_does_not_strand_other_connections(
    ring, listener, incremental
):
    """One connection's callback raises and so does the ring's error
    handler: the drain still delivers every other connection's data of the
    same batch (runs of full buffers wait for the end of the batch), and
    the handler's failure comes out of the drain."""
    queue = bufring_queue(ring, incremental)
    handled: list[BaseException] = []

    def handler(exc: BaseException) -> None:
        handled.append(exc)
        raise RuntimeError("the error handler fails")

    ring.error_handler = handler
    pairs = [connect_pair(listener) for _ in range(4)]
    got = [bytearray() for _ in pairs]

    def refuse(view: memoryview) -> None:
        raise ValueError("on_data refuses")

    receivers = [
        queue.recv_multishot(conn, on_data=refuse if i == 0 else got[i].extend)
        for i, (_, conn) in enumerate(pairs)
    ]
    ring.submit()
    # Whole buffers: each connection's data waits in a run until the batch ends.
    payloads = [Pattern(i).doubled[: 32 * KIB] for i in range(len(pairs))]
    for (client, _), payload in zip(pairs, payloads, strict=True):
        client.sendall(payload)
    raised: list[BaseException] = []
    drain_until(ring, lambda: all(len(g) == 32 * KIB for g in got[1:]), raised)
    assert [len(g) for g in got[1:]] == [32 * KIB] * 3
    assert [bytes(g) for g in got[1:]] == payloads[1:]
    assert raised and all(str(e) == "the error handler fails" for e in raised)
    assert all(isinstance(e, ValueError) for e in handled)
    for receiver in receivers:
        receiver.close()
    for client, conn in pairs:
        client.close()
        conn.close()
    drain_until(ring, lambda: all(r.finished for r in receivers), raised)
    # The refused views live on in the tracebacks until these go.
    handled.clear()
    raised.clear()
    assert queue.buffers_in_use == 0, queue.stats()
    queue.close()
