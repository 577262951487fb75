"""Hostile use of a buffer ring's window (bufring mode, on the host kernel):
views released from other threads while the owner drains, held past the
window, across queue and ring close, in a forked child; odd and extreme
window sizes; the classic ring.  Every test checks the bytes of every held
view again when it is released (a buffer handed to the kernel while a view
still holds it would be overwritten by later data) and the queue's
accounting afterwards: nothing lost, nothing returned twice."""

from __future__ import annotations

import asyncio
import gc
import os
import random
import signal
import sys
import threading
from collections import deque

import pytest
from conftest import Pattern, Sender, Verifier, connect_pair
from test_bufring_incremental import MessageSender, incremental_queue, message_sizes

import iouzcrx
from iouzcrx.errors import InvalidConfiguration

KIB = 1024
MIB = 1024 * KIB
TIMEOUT = 30.0


@pytest.fixture
def eager_switches():
    """Threads switch every few bytecodes instead of every 5 ms, so that
    releases on other threads land between the owner's steps."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


class Held:
    """A view with where its bytes are in the stream, checked again on release."""

    def __init__(self, view: memoryview, pos: int, pattern: Pattern) -> None:
        self.view, self.pos, self.pattern = view, pos, pattern

    def check_and_release(self) -> None:
        data = self.view.tobytes()
        expected = self.pattern.expected(self.pos, len(data))
        assert data == expected, f"a held view at byte {self.pos} was overwritten"
        self.view.release()


class Releasers:
    """Threads that check and release the views handed to them; a context
    manager that stops and joins them on exit (errors kept in ``errors``)."""

    def __init__(self, count: int) -> None:
        self.handed: deque[Held | None] = deque()
        self.cond = threading.Condition()
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(count)]

    def __enter__(self) -> Releasers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self.cond:
            self.handed.extend([None] * len(self.threads))
            self.cond.notify_all()
        for thread in self.threads:
            thread.join(TIMEOUT)

    def hand(self, held: Held) -> None:
        with self.cond:
            self.handed.append(held)
            self.cond.notify()

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.handed:
                    self.cond.wait()
                held = self.handed.popleft()
            if held is None:
                return
            try:
                held.check_and_release()
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)


def make_queue(ring: iouzcrx.Ring, incremental: bool, **kw: int) -> iouzcrx.BufRingQueue:
    if incremental:
        return incremental_queue(ring, **kw)
    return iouzcrx.BufRingQueue(ring, incremental=False, **kw)


def check_accounting(queue: iouzcrx.BufRingQueue) -> None:
    """With every view released and the returns published: every buffer is
    either in the ring (at most the window) or a spare."""
    stats = queue.stats()
    assert stats["buffers_in_use"] == 0, stats
    assert stats["buffers_pending_return"] == 0, stats
    in_ring = stats["total_buffers"] - stats["spare_buffers"]
    assert 0 < in_ring <= stats["window"], stats


def fill_the_area(queue: iouzcrx.BufRingQueue, listener, seed: int) -> None:
    """Every buffer must be back: a stream held whole until it pins all
    but two buffers of the area must not stall (a lost buffer would make
    the kernel run dry first; get() then times out)."""
    client, server = connect_pair(listener)
    area = queue.total_buffers * queue.buffer_size
    target = area - 2 * queue.buffer_size
    sender = Sender(client, seed, area)
    receiver = queue.recv_multishot(server)
    sender.start()
    verifier = Verifier(seed)
    pattern = Pattern(seed)
    held = []
    while verifier.pos < target:
        view = receiver.get(TIMEOUT)
        assert view is not None, "the stream ended early"
        held.append(Held(view, verifier.pos, pattern))
        verifier.feed(view)
    for h in held:
        h.check_and_release()
    del held, h, view
    while receiver.get(TIMEOUT) is not None:
        pass
    sender.join(TIMEOUT)
    assert sender.error is None and receiver.eof
    server.close()
    queue.ring.drain()
    check_accounting(queue)


CONFIGS = {
    # incremental, area, buffer, window, bytes sent (in small messages if negative)
    "two-buffer-window": (True, 1 * MIB, 16 * KIB, 32 * KIB, 8 * MIB),
    "odd-window": (True, 1 * MIB, 16 * KIB, 3 * 16 * KIB + 1, 8 * MIB),
    "window-over-the-area": (True, 1 * MIB, 16 * KIB, 1 << 40, 8 * MIB),
    "one-byte-window": (True, 512 * KIB, 16 * KIB, 1, 8 * MIB),
    "classic": (False, 1 * MIB, 16 * KIB, 32 * KIB, 8 * MIB),
    "small-messages": (True, 512 * KIB, 16 * KIB, 32 * KIB, -2 * MIB),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=list(CONFIGS))
def test_views_held_and_released_from_other_threads_in_any_order(
    ring, listener, config, eager_switches
):
    """Several times the area through it: each view is released at once, kept for a
    while (released later in random order, by the owner or by one of two
    other threads) or handed to another thread at once; held views always
    pin more than the window.  Every held view keeps its bytes, and at the
    end every buffer is back where it belongs."""
    incremental, area, buffer_size, window, total = config
    queue = make_queue(
        ring, incremental, area_size=area, buffer_size=buffer_size, window_size=window
    )
    rng = random.Random(1234)
    client, server = connect_pair(listener)
    seed = 11
    pattern = Pattern(seed)
    sender: Sender | MessageSender
    if total < 0:
        total = -total
        sender = MessageSender(client, seed, total, message_sizes(seed))
    else:
        sender = Sender(client, seed, total)
    receiver = queue.recv_multishot(server)
    verifier = Verifier(seed)
    releasers = Releasers(2)
    kept: list[Held] = []
    sender.start()
    with releasers:
        while True:
            view = receiver.get(TIMEOUT)
            if view is None:
                break
            held = Held(view, verifier.pos, pattern)
            verifier.feed(view)
            del view
            choice = rng.random()
            if choice < 0.3:
                held.check_and_release()
            elif choice < 0.6:
                releasers.hand(held)
            else:
                kept.append(held)
            # Keep well clear of the whole area (a receive starved by the
            # program's own views would wait for ever), but past the window.
            if queue.buffers_in_use > queue.total_buffers // 2:
                rng.shuffle(kept)
                while kept and queue.buffers_in_use > queue.total_buffers // 4:
                    h = kept.pop()
                    if rng.random() < 0.5:
                        h.check_and_release()
                    else:
                        releasers.hand(h)
            del held
    assert not releasers.errors, releasers.errors
    assert verifier.pos == total
    sender.join(TIMEOUT)
    assert sender.error is None and receiver.eof and receiver.error is None
    for h in kept:
        h.check_and_release()
    kept.clear()
    server.close()
    ring.drain()
    check_accounting(queue)
    fill_the_area(queue, listener, seed + 1)
    queue.close()
    queue.close()  # twice is harmless


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "classic"])
@pytest.mark.parametrize("what", ["queue", "ring"])
def test_views_held_across_close_keep_their_bytes(listener, incremental, what):
    """Views held when the queue or the ring closes stay readable and intact,
    and release afterwards (from this and another thread) without touching
    the gone ring; the counts end at zero."""
    ring = iouzcrx.Ring()
    try:
        queue = make_queue(
            ring, incremental, area_size=1 * MIB, buffer_size=16 * KIB, window_size=32 * KIB
        )
        client, server = connect_pair(listener)
        seed = 21
        total = 512 * KIB
        sender = Sender(client, seed, total)
        receiver = queue.recv_multishot(server)
        sender.start()
        verifier, pattern = Verifier(seed), Pattern(seed)
        held = []
        while verifier.pos < total:
            view = receiver.get(TIMEOUT)
            assert view is not None
            held.append(Held(view, verifier.pos, pattern))
            verifier.feed(view)
        del view
        sender.join(TIMEOUT)
        assert queue.buffers_in_use > (queue.window if incremental else 16)
        if what == "queue":
            queue.close()
        else:
            ring.close()
        half = len(held) // 2
        thread = threading.Thread(target=lambda: [h.check_and_release() for h in held[:half]])
        thread.start()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        for h in held[half:]:
            h.check_and_release()
        held.clear()
        assert queue.buffers_in_use == 0
        queue.close()
        server.close()
    finally:
        ring.close()
        ring.close()


@pytest.mark.parametrize("close_first", [False, True], ids=["release-first", "close-first"])
def test_views_released_in_a_forked_child_leave_the_parents_ring_alone(ring, listener, close_first):
    """A child forked while the parent holds views past the window releases
    them, closes the queue and the ring, and exits; the parent's views keep
    their bytes, and its ring goes on with every buffer."""
    queue = incremental_queue(ring, area_size=1 * MIB, buffer_size=16 * KIB, window_size=32 * KIB)
    client, server = connect_pair(listener)
    seed = 31
    total = 512 * KIB
    sender = Sender(client, seed, total)
    receiver = queue.recv_multishot(server)
    sender.start()
    verifier, pattern = Verifier(seed), Pattern(seed)
    held = []
    while verifier.pos < total:
        view = receiver.get(TIMEOUT)
        assert view is not None
        held.append(Held(view, verifier.pos, pattern))
        verifier.feed(view)
    del view
    sender.join(TIMEOUT)
    pid = os.fork()
    if pid == 0:  # the child: exit at once whatever happens
        code = 1
        try:
            signal.alarm(int(TIMEOUT))
            if close_first:
                queue.close()
                ring.close()
            for h in held:
                h.check_and_release()
            held.clear()
            queue.close()
            ring.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert queue.buffers_in_use > 0
    for h in held:
        h.check_and_release()
    held.clear()
    assert receiver.get(TIMEOUT) is None and receiver.eof
    server.close()
    ring.drain()
    check_accounting(queue)
    fill_the_area(queue, listener, seed + 1)
    queue.close()


@pytest.mark.parametrize("window_size", [True, 2**64, 2**200, -(2**70)])
def test_absurd_window_sizes_are_refused_by_name(ring, window_size):
    with pytest.raises((InvalidConfiguration, TypeError), match="window_size"):
        iouzcrx.BufRingQueue(ring, area_size=1 * MIB, window_size=window_size)


@pytest.mark.parametrize("value", ["0", "-4096", "  ", "0x100000", "9" * 40])
def test_a_bad_window_in_the_environment_is_refused_with_its_value(ring, monkeypatch, value):
    monkeypatch.setenv("IOUZCRX_BUFRING_WINDOW", value)
    if not value.strip():
        queue = iouzcrx.BufRingQueue(ring, area_size=1 * MIB)  # blank: the default
        queue.close()
        return
    with pytest.raises(InvalidConfiguration) as caught:
        iouzcrx.BufRingQueue(ring, area_size=1 * MIB)
    message = str(caught.value)
    assert "IOUZCRX_BUFRING_WINDOW" in message and value.strip() in message
    assert "unset it" in message
    try:
        int(value)
    except ValueError:
        assert "not a number" in message
    else:
        # A number out of range is not "not a number": say what range.
        assert "not a number" not in message and "positive" in message, message


def test_connections_sharing_a_two_buffer_window_all_finish(ring, listener, eager_switches):
    """Four peers stream at once into one queue whose kernel window is two
    buffers, so the ring runs dry over and over while buffers are on their
    way back; one connection's views are held (many more than the window),
    another's released on a second thread.  Every stream finishes intact
    and every buffer comes back."""
    queue = incremental_queue(ring, area_size=1 * MIB, buffer_size=16 * KIB, window_size=1)
    assert queue.window == 2
    total = 4 * MIB
    seeds = [41, 42, 43, 44]
    senders, receivers, verifiers = [], [], []
    servers = []
    for seed in seeds:
        client, server = connect_pair(listener)
        servers.append(server)
        senders.append(Sender(client, seed, total))
        verifiers.append(Verifier(seed))
        receivers.append(queue.recv_multishot(server))
    releasers = Releasers(1)
    kept: list[Held] = []
    for sender in senders:
        sender.start()
    open_ = set(range(len(seeds)))
    with releasers:
        while open_:
            progressed = False
            for i in list(open_):
                receiver = receivers[i]
                if not receiver.queued and not receiver.finished:
                    continue
                view = receiver.get(TIMEOUT)
                progressed = True
                if view is None:
                    open_.discard(i)
                    continue
                held = Held(view, verifiers[i].pos, verifiers[i].pattern)
                verifiers[i].feed(view)
                del view
                if i == 0:
                    kept.append(held)
                    if queue.buffers_in_use > queue.total_buffers // 2:
                        for h in kept:
                            h.check_and_release()
                        kept.clear()
                elif i == 1:
                    releasers.hand(held)
                else:
                    held.check_and_release()
                del held
            if not progressed:
                ring.wait_for(lambda: any(r.queued or r.finished for r in receivers), TIMEOUT)
    assert not releasers.errors, releasers.errors
    for h in kept:
        h.check_and_release()
    kept.clear()
    for sender, receiver, verifier in zip(senders, receivers, verifiers, strict=True):
        sender.join(TIMEOUT)
        assert sender.error is None and receiver.eof and verifier.pos == total
    assert queue.stats()["starvations"] > 0
    for server in servers:
        server.close()
    ring.drain()
    check_accounting(queue)
    fill_the_area(queue, listener, 45)
    queue.close()


# -- the stream reader's loop -------------------------------------------------------


class BareTransport(asyncio.Transport):
    """A transport of someone else's, with no ``_loop``, or the one given."""

    def __init__(self, loop: object = "none") -> None:
        super().__init__()
        if loop != "none":
            self._loop = loop
        self.paused = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


@pytest.mark.parametrize("loop_attr", ["none", None], ids=["no-_loop", "_loop-None"])
def test_a_reader_whose_transport_names_no_loop_waits_on_the_running_one(loop_attr):
    async def main() -> bytes:
        reader = iouzcrx.ZcrxStreamReader()
        reader.set_transport(BareTransport(loop_attr))
        loop = asyncio.get_running_loop()
        loop.call_soon(reader.feed_view, b"abc")
        first = await asyncio.wait_for(reader.readexactly(3), TIMEOUT)
        loop.call_soon(reader.feed_view, b"def\n")
        loop.call_soon(reader.feed_eof)
        return bytes(first) + bytes(await asyncio.wait_for(reader.read(), TIMEOUT))

    assert asyncio.run(main()) == b"abcdef\n"


def test_a_reader_used_after_its_connections_loop_closed_fails_at_once():
    """The connection's loop is gone: a read that must wait raises (the data
    would never come) rather than wait for ever, the reader stays usable for
    what is buffered, and a later read raises the same way instead of
    claiming another coroutine is waiting."""
    old = asyncio.new_event_loop()
    old.close()
    reader = iouzcrx.ZcrxStreamReader()
    reader.set_transport(BareTransport(old))

    async def main() -> bytes:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="loop"):
                await asyncio.wait_for(reader.readexactly(1), TIMEOUT)
        reader.feed_view(b"xyz")
        return bytes(await asyncio.wait_for(reader.readexactly(3), TIMEOUT))

    assert asyncio.run(main()) == b"xyz"


def test_a_reader_awaited_from_another_threads_loop_fails_at_once():
    """The connection's loop runs in this thread; a coroutine on another
    thread's loop reads: it raises rather than waiting on a future that data
    arriving here would complete from the wrong thread."""
    loop = asyncio.new_event_loop()
    try:
        reader = iouzcrx.ZcrxStreamReader()
        reader.set_transport(BareTransport(loop))
        outcome: list[BaseException | bytes] = []

        def other() -> None:
            async def read() -> bytes:
                return await asyncio.wait_for(reader.readexactly(1), TIMEOUT)

            try:
                outcome.append(asyncio.run(read()))
            except BaseException as exc:  # examined below
                outcome.append(exc)

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
        assert "loop" in str(outcome[0])
    finally:
        loop.close()


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "classic"])
def test_a_queue_closed_from_its_own_callback_while_threads_release(
    ring, listener, incremental, eager_switches
):
    """on_data keeps views past the window and hands them to a thread that
    releases them, then closes the queue from inside a callback mid-stream:
    the receive ends without error, the views still out keep their bytes
    and release later from the thread, and the counts end at zero."""
    # A classic ring delivers runs of up to 1 MiB: 4 MiB leaves room for a
    # few held past the window.
    queue = make_queue(
        ring, incremental, area_size=4 * MIB, buffer_size=16 * KIB, window_size=32 * KIB
    )
    client, server = connect_pair(listener)
    seed = 51
    total = 64 * MIB  # far more than is read before the close
    pattern, verifier = Pattern(seed), Verifier(seed)
    sender = Sender(client, seed, total)
    handed: deque[Held | None] = deque()
    cond = threading.Condition()
    errors: list[BaseException] = []
    ended: list[BaseException | None] = []

    def releaser() -> None:
        while True:
            with cond:
                while not handed:
                    cond.wait()
                held = handed.popleft()
            if held is None:
                return
            try:
                held.check_and_release()
            except BaseException as exc:  # reported by the test
                errors.append(exc)

    kept: list[Held] = []

    def on_data(view: memoryview) -> None:
        held = Held(view, verifier.pos, pattern)
        verifier.feed(view)
        if queue.buffers_in_use < queue.total_buffers // 4:
            kept.append(held)
        else:
            with cond:
                handed.append(held)
                cond.notify()
        if verifier.pos >= 8 * MIB and not queue.closed:
            queue.close()

    thread = threading.Thread(target=releaser, daemon=True)
    thread.start()
    receiver = queue.recv_multishot(server, on_data=on_data, on_end=ended.append)
    sender.start()
    try:
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
    finally:
        with cond:
            handed.append(None)
            cond.notify()
        thread.join(TIMEOUT)
    assert not errors, errors
    assert ended == [None] and receiver.error is None
    for h in kept:
        h.check_and_release()
    kept.clear()
    assert queue.buffers_in_use == 0
    queue.close()
    server.close()  # the sender then fails, as the peer of a closed connection does
    sender.join(TIMEOUT)
    ring.close()


def test_a_window_that_runs_dry_leaves_no_stall_behind(ring, listener):
    """A two-buffer window runs dry over and over while each view is
    released at once, with spares left every time: the connection's
    PinAccount must not say "stalled" (nor call on_stall), or a stream
    reader waiting on that connection would be woken for nothing and copy
    out every view it buffers, as if the area were exhausted."""
    queue = incremental_queue(ring, area_size=1 * MIB, buffer_size=16 * KIB, window_size=1)
    account = queue.pin_account()
    stalls: list[bool] = []
    account.on_stall = lambda: stalls.append(True)
    client, server = connect_pair(listener)
    seed = 61
    total = 16 * MIB
    sender = Sender(client, seed, total)
    verifier = Verifier(seed)
    receiver = queue.recv_multishot(server, on_data=verifier.feed, account=account)
    sender.start()
    ring.wait_for(lambda: receiver.finished, TIMEOUT)
    sender.join(TIMEOUT)
    assert sender.error is None and receiver.eof and verifier.pos == total
    assert queue.stats()["starvations"] > 0  # the window did run dry
    assert stalls == []
    assert account.pinned == 0
    assert not account.stalled, account
    server.close()
    ring.drain()
    check_accounting(queue)
    queue.close()


@pytest.mark.parametrize("incremental", [True, False], ids=["incremental", "classic"])
def test_holding_the_last_view_while_waiting_for_the_next_never_stalls(ring, listener, incremental):
    """The commonest way to read a stream that a parser needs two views of:
    keep the previous view while getting the next.  Through a small area
    (no larger than one delivery may be) one view must never hold every
    buffer, or the next never comes."""
    queue = make_queue(
        ring, incremental, area_size=512 * KIB, buffer_size=16 * KIB, window_size=1 << 40
    )
    client, server = connect_pair(listener)
    seed = 71
    total = 8 * MIB
    sender = Sender(client, seed, total)
    receiver = queue.recv_multishot(server)
    sender.start()
    pattern, verifier = Pattern(seed), Verifier(seed)
    previous: Held | None = None
    while True:
        view = receiver.get(TIMEOUT)  # TimeoutError: the held view starved the receive
        if view is None:
            break
        held = Held(view, verifier.pos, pattern)
        verifier.feed(view)
        del view
        if previous is not None:
            previous.check_and_release()
        previous = held
        del held
    assert previous is not None
    previous.check_and_release()
    sender.join(TIMEOUT)
    assert sender.error is None and receiver.eof and verifier.pos == total
    server.close()
    ring.drain()
    check_accounting(queue)
    queue.close()


@pytest.mark.parametrize("which", ["its-own-queue", "another-queue"])
def test_a_queue_closed_by_a_finalizer_the_starved_ring_collects(listener, which):
    """Every buffer is held by views that are garbage only in reference
    cycles, so the starved receive runs the collector; a finalizer it runs
    closes the queue (which gives the buffer ring back to the kernel at
    once, its receive being starved).  The pass that ran the collector must
    not then touch the ring it no longer has.  In a child process, so that
    a crash fails this test instead of ending the run."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(int(TIMEOUT))
            code = _close_from_a_finalizer(listener, which == "another-queue")
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"the child died of signal {os.WTERMSIG(status)}"
    assert os.WEXITSTATUS(status) == 0, os.WEXITSTATUS(status)


def _close_from_a_finalizer(listener, another: bool) -> int:
    ring = iouzcrx.Ring()
    queue = incremental_queue(ring, area_size=64 * KIB, buffer_size=16 * KIB, window_size=1)
    assert queue.window == 2 and queue.total_buffers == 4
    # Drained after the starved queue, in the same walk of the ring's clients.
    other = incremental_queue(ring, area_size=64 * KIB, buffer_size=16 * KIB, window_size=1)
    target = other if another else queue
    client, server = connect_pair(listener)
    sender = Sender(client, 81, 4 * MIB)
    closed_by: list[str] = []

    class Holder:
        def __init__(self, view: memoryview) -> None:
            self.view = view
            self.me = self  # a cycle: only the collector frees it

        def __del__(self) -> None:
            if not closed_by:
                closed_by.append("finalizer")
                target.close()

    ended: list[BaseException | None] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        receiver = queue.recv_multishot(server, on_data=Holder, on_end=ended.append)
        sender.start()
        # Closing its own queue ends the receive; closing the other, the
        # stream goes on (each starvation collects the views) to its end.
        ring.wait_for(lambda: receiver.finished, TIMEOUT)
    finally:
        if gc_was_enabled:
            gc.enable()
    assert closed_by == ["finalizer"] and ended == [None]
    gc.collect()
    assert queue.buffers_in_use == 0
    queue.close()
    other.close()
    server.close()
    ring.close()
    return 0
