"""The io_uring instance on the host kernel: setup, probing, the operations the
server layer needs, task-work draining, the eventfd wake-up, teardown."""

from __future__ import annotations

import mmap
import os
import select
import socket
import threading

import pytest
from conftest import FEATURES, Pattern, Sender, Verifier, connect_pair, receive_all

import iouzcrx
from iouzcrx import _probe

CQE_F_MORE = 0x2
# Iterations of a spin on shared memory before giving up (seconds of Python).
SPIN_LIMIT = 100_000_000


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_ring_is_set_up_for_zcrx(ring):
    names = set(ring.setup_flag_names)
    assert {"SINGLE_ISSUER", "DEFER_TASKRUN", "TASKRUN_FLAG", "CQSIZE"} <= names
    # zcrx needs 32-byte completions: either a mixed CQ or an all-32-byte one.
    assert ("CQE_MIXED" in names) != ("CQE32" in names)
    assert ring.cqe_mixed == ("CQE_MIXED" in names)
    assert ring.sq_entries == 256 and ring.cq_entries == 8192


def test_probe_reports_the_opcodes_the_engine_uses(ring):
    ops = ring.probe_opcodes()
    for op in (_probe.OP_RECV, _probe.OP_ACCEPT, _probe.OP_SEND):
        assert op in ops
    assert FEATURES.io_uring and FEATURES.bufring
    assert FEATURES.recv_zc == (_probe.OP_RECV_ZC in ops)


def test_query_answers_on_kernels_that_have_it():
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    opcodes = _probe.query_opcodes()
    if release >= (6, 18):
        assert opcodes is not None
        assert opcodes["nr_request_opcodes"] > _probe.OP_RECV_ZC
    zcrx = _probe.query_zcrx()
    if release <= (6, 18):
        assert zcrx is None  # 6.18 answers the zcrx entry with EOPNOTSUPP
    else:
        assert zcrx is not None and zcrx["rq_hdr_size"] > 0


def test_nop_completes_with_zero(ring):
    assert ring.nop().wait(5) == 0


def test_a_drain_enters_the_kernel_once_when_nothing_follows(ring):
    # The enter that submits also reaps; a second one would find nothing.
    done = [ring.nop() for _ in range(4)]
    before = ring.enters
    assert ring.drain() is False
    assert ring.enters - before == 1
    assert all(c.done and c.results == [(0, 0)] for c in done)


def test_a_stale_taskrun_flag_neither_spins_nor_starves_other_threads(ring, listener):
    # The kernel sets SQ_TASKRUN just after it queues task work, so an enter on
    # the other CPU can run the work first and leave the flag up with nothing
    # behind it (seen here about once in 10^5 wake-ups). Raise it on purpose.
    ring._raise_stale_taskrun_flag()
    before = ring.enters
    assert ring.drain() is False
    assert ring.enters - before <= 3
    assert ring.stale_taskrun_flags == 1
    # A blocking receive fed by a Python thread: a drain that trusted the
    # flag would spin without ever letting the sender thread run.
    client, server = connect_pair(listener)
    with server:
        queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=64 << 10)
        receiver = queue.recv_multishot(server)
        ring._raise_stale_taskrun_flag()
        sender = Sender(client, seed=3, total=4 << 20)
        sender.start()
        assert receive_all(receiver, Verifier(3), timeout=20.0) == 4 << 20
        sender.join()
        assert sender.error is None


def test_send_and_read_move_bytes(ring):
    a, b = socket.socketpair()
    with a, b:
        sent = ring.send(a, b"hello, ring")
        assert sent.wait(5) == 11
        buf = bytearray(32)
        n = ring.read(b, buf).wait(5)
        assert bytes(buf[:n]) == b"hello, ring"


@pytest.mark.parametrize("extra", [0, 5])
def test_a_send_or_read_of_4_gib_or_more_moves_part_of_it_never_nothing(ring, extra):
    """An SQE's length is 32 bits: a buffer of 4 GiB (+ 5) must not become
    one of 0 (5) bytes. Untouched anonymous memory: nothing is faulted in
    beyond what the socket and the pipe take."""
    import mmap

    # Private and unreserved: nothing is charged for pages never touched.
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)
    try:
        big = mmap.mmap(-1, (4 << 30) + extra, flags=flags)
    except OSError as exc:
        pytest.skip(f"this machine cannot map 4 GiB of address space: {exc}")
    a, b = socket.socketpair()
    with a, b, big:
        view = memoryview(big)
        sent = ring.send(a, view).wait(10)
        assert sent > extra  # the socket takes what its buffer holds
        b.setblocking(False)
        got = 0
        while got < sent:
            got += len(b.recv(1 << 20))
        assert got == sent
        readable, writable = os.pipe()
        try:
            os.write(writable, b"data waiting in the pipe")
            assert ring.read(readable, view).wait(10) == len(b"data waiting in the pipe")
            assert big[:4] == b"data"
        finally:
            os.close(readable)
            os.close(writable)
        view.release()


def test_send_failure_raises_oserror(ring):
    a, b = socket.socketpair()
    b.close()
    with a:
        with pytest.raises(OSError):
            ring.send(a, b"x" * 4096).wait(5)


def test_multishot_accept_yields_each_connection(ring, listener):
    accepted = ring.accept(listener)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    try:
        ring.wait_for(lambda: len(accepted.results) >= 3, 5)
        fds = [res for res, flags in accepted.results]
        assert all(fd >= 0 for fd in fds)
        assert all(flags & CQE_F_MORE for res, flags in accepted.results)
        assert not accepted.done
        for fd in fds:
            os.close(fd)
        accepted.cancel()
        ring.wait_for(lambda: accepted.done, 5)
    finally:
        for c in clients:
            c.close()


def test_shutdown_ends_a_receive_with_eof(ring, listener):
    client, server = connect_pair(listener)
    with client, server:
        queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=64 << 10)
        receiver = queue.recv_multishot(server)
        ring.shutdown(server, socket.SHUT_RD).wait(5)
        assert receiver.get(5) is None
        assert receiver.eof and receiver.error is None


def test_deferred_task_work_signals_the_eventfd(ring):
    """DEFER_TASKRUN: a completion waits as task work; the registered eventfd
    must become readable so an event loop wakes (epoll on the ring fd would
    not before Linux 7.3.2)."""
    r, w = os.pipe()
    try:
        buf = bytearray(8)
        read = ring.read(r, buf)
        ring.drain()
        ring.on_eventfd_readable()  # consume wake-ups from the submission itself
        os.write(w, b"x")
        readable, _, _ = select.select([ring.eventfd], [], [], 5)
        assert readable == [ring.eventfd]
        assert not read.done  # nothing ran yet: the owner must enter the kernel
        ring.on_eventfd_readable()
        assert read.done and read.results[-1][0] == 1
    finally:
        os.close(r)
        os.close(w)


def test_a_drain_called_in_a_busy_loop_runs_work_queued_while_it_ran():
    """COOP_TASKRUN: the kernel queues a completion's work for this thread
    without interrupting it, and runs it at its next return from the kernel.
    A program that polls with drain() and no other system call still gets
    it: the drain enters when it finds nothing. The write comes from a
    child process, and the parent waits for it in shared memory, so that
    nothing but the drain enters the kernel."""
    flags = mmap.mmap(-1, 2)  # [0]: written, set by the child; [1]: go
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            for _ in range(SPIN_LIMIT):
                if flags[1]:
                    os.write(w, b"x")
                    flags[0] = 1
                    break
        finally:
            os._exit(0)
    try:
        with iouzcrx.Ring(defer_taskrun=False) as ring:
            read = ring.read(r, bytearray(8))
            ring.drain()  # submitted: the pipe is empty, so it waits
            assert not read.done
            flags[1] = 1
            for _ in range(SPIN_LIMIT):
                if flags[0]:
                    break
            assert flags[0], "the child never wrote"
            ring.drain()
            assert read.done and read.results[-1][0] == 1
    finally:
        os.waitpid(child, 0)
        os.close(r)
        os.close(w)
        flags.close()


def test_a_ring_without_defer_taskrun_completes_a_read_with_no_enter():
    """defer_taskrun=False: the kernel runs the read once the pipe has data
    (COOP_TASKRUN: it wakes the sleeping thread for it) and posts its
    completion itself; the ring fd turns readable (its eventfd does not) and
    on_ring_readable reaps it without io_uring_enter."""
    r, w = os.pipe()
    try:
        with iouzcrx.Ring(defer_taskrun=False) as ring:
            names = set(ring.setup_flag_names)
            assert "SINGLE_ISSUER" in names and not ring.defer_taskrun
            assert not names & {"DEFER_TASKRUN", "TASKRUN_FLAG"}
            assert "COOP_TASKRUN" in names
            assert not ring.kernel_signals_eventfd
            read = ring.read(r, bytearray(8))
            ring.drain()  # submits it: the pipe is empty, so it waits
            assert not read.done
            enters = ring.enters
            os.write(w, b"x")
            assert select.select([ring.fd, ring.eventfd], [], [], 5)[0] == [ring.fd]
            assert ring.on_ring_readable() is False  # nothing left
            assert read.done and read.results[-1][0] == 1
            assert ring.enters == enters
            assert select.select([ring.fd], [], [], 0)[0] == []  # reaped
    finally:
        os.close(r)
        os.close(w)


def test_a_blocking_wait_on_a_ring_without_defer_taskrun_wakes_for_either_fd():
    """Completions make the ring fd readable, a wake-up from another thread
    the eventfd: a blocking wait returns for each."""
    r, w = os.pipe()
    try:
        with iouzcrx.Ring(defer_taskrun=False) as ring:
            read = ring.read(r, bytearray(8))
            writer = threading.Timer(0.05, os.write, (w, b"x"))
            writer.start()
            assert read.wait(10) == 1
            writer.join()
            waker = threading.Timer(0.05, os.write, (ring.eventfd, (1).to_bytes(8, "little")))
            waker.start()
            assert ring.wait(10) is True
            waker.join()
    finally:
        os.close(r)
        os.close(w)


def test_a_wake_up_leaves_no_second_one_behind(ring):
    """Posting the CQEs of a drain signals the eventfd again; the callback
    reads it after its drain, so the loop is not woken a second time for
    nothing (an epoll wait, a read and an enter per request)."""
    r, w = os.pipe()
    try:
        for n in range(3):
            read = ring.read(r, bytearray(8))
            ring.drain()
            ring.on_eventfd_readable()
            os.write(w, b"x")
            assert select.select([ring.eventfd], [], [], 5)[0] == [ring.eventfd]
            ring.on_eventfd_readable()
            assert read.done and read.results[-1][0] == 1, n
            assert select.select([ring.eventfd], [], [], 0)[0] == [], n
    finally:
        os.close(r)
        os.close(w)


def test_a_wake_up_from_inside_the_drain_is_not_read_away(ring):
    """The callback reads the eventfd after its drain, so it may take away a
    wake() made during that drain; it must drain again then. A buffer ring
    freed from a completion handler asks for such a wake-up: its owner
    unregisters it at the start of a drain."""
    a, b = socket.socketpair()
    doomed = [iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=64 << 10)]
    group = doomed[0].buffer_group
    try:
        ring.drain()
        ring.on_eventfd_readable()
        assert ring._buffer_group_registered(group)
        ring.send(a, b"x", callback=lambda res, flags: doomed.clear())
        ring.on_eventfd_readable()  # submits the send; its handler frees the queue
        assert not doomed
        assert not ring._buffer_group_registered(group)
    finally:
        a.close()
        b.close()


def test_one_drain_runs_all_pending_task_work(ring):
    """An enter runs at most 20 task-work items; drain loops while
    IORING_SQ_TASKRUN is set so 50 completions all arrive in one call."""
    pipes = [os.pipe() for _ in range(50)]
    try:
        reads = [ring.read(r, bytearray(1)) for r, _ in pipes]
        ring.drain()
        for _, w in pipes:
            os.write(w, b"y")
        ring.drain()
        assert all(req.done for req in reads)
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_the_ring_refuses_other_threads(ring):
    caught: list[BaseException] = []

    def use() -> None:
        try:
            ring.nop()
        except BaseException as exc:
            caught.append(exc)

    t = threading.Thread(target=use)
    t.start()
    t.join()
    assert len(caught) == 1 and isinstance(caught[0], iouzcrx.WrongThread)


def test_close_cancels_in_flight_receives_and_releases_fds(listener):
    before = open_fds()
    client, server = connect_pair(listener)
    ring = iouzcrx.Ring()
    queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=64 << 10)
    receivers = [queue.recv_multishot(server)]
    ring.drain()
    assert ring.in_flight == 1
    ring.close()
    assert ring.closed and ring.in_flight == 0
    assert receivers[0].finished and receivers[0].error is None
    client.close()
    server.close()
    assert open_fds() == before
    with pytest.raises(ValueError, match="closed"):
        ring.nop()


def test_receive_through_the_engine_is_byte_exact(ring, listener):
    client, server = connect_pair(listener)
    with server:
        queue = iouzcrx.BufRingQueue(ring, area_size=4 << 20, buffer_size=64 << 10)
        receiver = queue.recv_multishot(server)
        sender = Sender(client, seed=7, total=32 << 20)
        sender.start()
        verifier = Verifier(7)
        assert receive_all(receiver, verifier) == 32 << 20
        sender.join()
        assert sender.error is None
        assert receiver.eof


def test_pattern_helper_is_deterministic():
    assert Pattern(1).expected(5, 100) == Pattern(1).expected(5 + Pattern.BLOCK, 100)
    assert Pattern(1).expected(0, 64) != Pattern(2).expected(0, 64)


@pytest.mark.parametrize("handler", [True, False])
def test_a_raising_completion_handler_leaves_the_rest_of_its_batch_dispatched(ring, handler):
    a, b = socket.socketpair()
    with a, b:
        ran: list[int] = []
        reported: list[BaseException] = []

        def callback(index: int):
            def on_sent(res: int, flags: int) -> None:
                ran.append(index)
                if index in (0, 2):
                    raise ValueError(f"handler {index}")

            return on_sent

        if handler:
            ring.error_handler = reported.append
        for index in range(4):
            ring.send(a, b"x", callback=callback(index))
        if handler:
            while len(ran) < 4:
                ring.wait(5)
            assert [str(e) for e in reported] == ["handler 0", "handler 2"]
        else:
            with pytest.raises(ValueError, match="handler 0"):
                while len(ran) < 4:
                    ring.wait(5)
        assert sorted(ran) == [0, 1, 2, 3]
        assert ring.in_flight == 0
