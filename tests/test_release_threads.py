"""Views released or dropped on a thread other than the ring's owner, while
the owner sleeps waiting for exactly those buffers.

On a free-threaded build (3.13t) an object is freed by the thread that made
it: a view dropped elsewhere is only queued for the owner thread, which frees
it when it next runs Python code.  An owner asleep in the ring's wait, or an
event loop asleep in epoll, must still get the buffers back.  On a build with
the GIL these pass as well; on 3.13t they hang (and time out) without the
wake-ups of iouzcrx._freethreading."""

from __future__ import annotations

import asyncio
import queue as _queue
import threading
import time

import pytest
from conftest import RECEIVE_MODES, SERVER_MODES, Pattern, Sender, Verifier, connect_pair
from test_buffers import finish, first_view
from test_buffers import make_queue as classic_queue

import iouzcrx

TIMEOUT = 30.0
KIB = 1024
# Long enough for the owner to be asleep when the other thread lets go.
SETTLE = 0.3


def starve(
    ring: iouzcrx.Ring, queue: iouzcrx.ReceiveQueue, receiver: iouzcrx.Receiver
) -> list[memoryview]:
    """Every view the receive gets until it stops for want of buffers."""
    views: list[memoryview] = []
    ring.wait_for(lambda: receiver.queued and queue.stats()["starvations"] > 0, TIMEOUT)
    while receiver.queued:
        views.append(receiver.get(0))
    assert ring.awaits_returns
    return views


@pytest.mark.parametrize("mode", RECEIVE_MODES)
@pytest.mark.parametrize("how", ["released", "dropped"])
def test_a_sleeping_owner_gets_back_the_views_another_thread_lets_go(ring, listener, mode, how):
    """The receive has stopped with every buffer held; another thread lets
    go of the views while the owner sleeps in wait_for: the receive starts
    again and the whole stream arrives intact."""
    client, server = connect_pair(listener)
    queue = classic_queue(ring, mode, area_size=256 * KIB, buffer_size=16 * KIB)
    receiver = queue.recv_multishot(server)
    seed, total = 71, 4 << 20
    sender = Sender(client, seed, total)
    verifier = Verifier(seed)
    sender.start()
    views = starve(ring, queue, receiver)
    for view in views:
        verifier.feed(view)
    handed = [views]
    del views, view

    def let_go() -> None:
        time.sleep(SETTLE)
        held = handed.pop()
        if how == "released":
            for view in held:
                view.release()
        held.clear()

    thread = threading.Thread(target=let_go)
    thread.start()
    ring.wait_for(lambda: receiver.queued, TIMEOUT)
    thread.join(TIMEOUT)
    while (view := receiver.get(TIMEOUT)) is not None:
        verifier.feed(view)
        view.release()
    assert verifier.pos == total and receiver.eof
    sender.join(TIMEOUT)
    assert sender.error is None
    assert queue.buffers_in_use == 0
    queue.close()


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_a_view_released_on_another_thread_returns_its_buffers_there_and_then(ring, listener, mode):
    """release() gives the buffers back on the releasing thread: the queue
    counts them returned before the owner runs again."""
    client, server = connect_pair(listener)
    queue = classic_queue(ring, mode, area_size=256 * KIB, buffer_size=16 * KIB)
    receiver = queue.recv_multishot(server)
    sender = Sender(client, 73, 4 << 20)
    sender.start()
    views = [v for v in starve(ring, queue, receiver) if not isinstance(v.obj, bytes)]
    assert views
    seen: list[tuple[int, int]] = []

    def release() -> None:
        for view in views:
            before = queue.buffers_in_use
            view.release()
            seen.append((before, queue.buffers_in_use))

    thread = threading.Thread(target=release)
    thread.start()
    thread.join(TIMEOUT)
    assert len(seen) == len(views)
    assert all(after < before for before, after in seen), seen
    receiver.close()
    server.close()
    sender.join(TIMEOUT)
    ring.drain()
    queue.close()


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_an_exporter_goes_back_with_its_last_export_and_exports_nothing_after(ring, listener, mode):
    """A view's exporter (``view.obj``) may be exported again while the view
    lives; the buffers go back with the last export, and a later export
    fails with BufferError instead of showing memory the kernel reuses."""
    queue, receiver, sender, server, view = first_view(ring, listener, mode, total=1 << 20)
    exporter = view.obj
    expected = view.tobytes()
    in_use = queue.buffers_in_use
    assert bytes(exporter) == expected  # exported and released again at once
    assert queue.buffers_in_use == in_use
    second = memoryview(exporter)
    view.release()
    assert queue.buffers_in_use == in_use  # the second export still holds it
    assert second.tobytes() == expected
    second.release()
    assert queue.buffers_in_use < in_use
    with pytest.raises(BufferError, match="went back"):
        memoryview(exporter)
    with pytest.raises(BufferError):
        bytes(exporter)
    finish(receiver, sender, server)


@pytest.mark.parametrize("mode", SERVER_MODES)
@pytest.mark.parametrize("how", ["released", "dropped"])
async def test_a_sleeping_loop_gets_back_the_views_another_thread_lets_go(mode, how):
    """A server's protocol hands every view to a thread, which lets go of
    them only once delivery has stopped (the connection's share of the area
    held): the loop, asleep with nothing else to do, must resume the
    connection, and the stream arrives whole."""
    seed, total = 77, 1 << 20
    handed: _queue.SimpleQueue[memoryview | None] = _queue.SimpleQueue()
    verifier = Verifier(seed)
    done = asyncio.get_running_loop().create_future()
    batches = [0]

    class Handing(iouzcrx.ZeroCopyProtocol):
        def view_received(self, view: memoryview) -> None:
            verifier.feed(view)
            handed.put(view)

        def eof_received(self) -> None:
            if not done.done():
                done.set_result(verifier.pos)

    def holder() -> None:
        held: list[memoryview] = []
        while True:
            try:
                view = handed.get(timeout=SETTLE)
            except _queue.Empty:
                if held:  # delivery stopped: let go while the loop sleeps
                    batches[0] += 1
                    if how == "released":
                        for item in held:
                            item.release()
                    held.clear()
                continue
            if view is None:
                return
            held.append(view)
            del view

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    loop = asyncio.get_running_loop()
    server = await loop.create_zcrx_server(
        Handing, "127.0.0.1", 0, mode=mode, area_size=512 * KIB, buffer_size=16 * KIB
    )

    async def stream() -> int:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for chunk in Pattern(seed).chunks(total):
            writer.write(chunk)
            await writer.drain()  # waits while the connection is stopped
        writer.write_eof()
        received = await done
        writer.close()
        return received

    try:
        async with server:
            try:
                assert await asyncio.wait_for(stream(), TIMEOUT) == total
            finally:
                server.abort_clients()  # else leaving would wait for a stuck one
            assert batches[0] > 0  # delivery did stop for the held views
    finally:
        handed.put(None)
        thread.join(TIMEOUT)
