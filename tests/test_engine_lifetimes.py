"""Lifetimes in the engine: closing a ring or a queue from anywhere (a
callback, another thread, a forked child) never touches memory that is gone,
every op naming a socket holds it open, and refused calls change nothing.

Code that used to crash the interpreter runs in a child process; the test
asserts the child exited cleanly and said what was expected.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import weakref

import pytest
from conftest import RECEIVE_MODES, connect_pair, make_queue
from isolation import TESTS, child_env

import iouzcrx
from iouzcrx.errors import WrongThread

# What every child starts with: a ring, a queue of the mode under test and a
# loopback connection.
PRELUDE = """
import os, socket, sys, threading, time
import iouzcrx
from conftest import make_queue

def pair():
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    client = socket.create_connection(ls.getsockname())
    server, _ = ls.accept()
    ls.close()
    return client, server

def drive(ring, predicate, rounds=500):
    for _ in range(rounds):
        if predicate():
            return True
        ring.wait(0.02)
    return predicate()
"""


def run_child(code: str, mode: str = "bufring", timeout: float = 60) -> list[str]:
    """Run ``code`` (after PRELUDE, with ``MODE`` set) in a child interpreter;
    assert it exited cleanly (no SIGSEGV, no exception) and return its
    stdout lines."""
    source = PRELUDE + f"MODE = {mode!r}\n" + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=TESTS,
        env=child_env(),
    )
    assert result.returncode == 0, (
        f"child exited with {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout.splitlines()


# -- 1: close from a completion callback ---------------------------------------


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_ring_close_inside_on_data_takes_effect_after_the_drain(mode):
    out = run_child(
        """
        ring = iouzcrx.Ring()
        queue = make_queue(ring, MODE, area_size=1 << 20)
        client, server = pair()
        views = []
        def on_data(view):
            views.append(view)
            ring.close()
            print("closed inside on_data:", ring.closed)
        receiver = queue.recv_multishot(server, on_data=on_data)
        client.sendall(b"x" * 100000)
        drive(ring, lambda: ring.closed)
        print("closed after the drain:", ring.closed)
        print("receiver finished:", receiver.finished, receiver.error)
        print("views readable:", all(bytes(v) == b"x" * len(v) for v in views))
        ring.close()  # twice: nothing happens
        """,
        mode,
    )
    assert "closed inside on_data: False" in out
    assert "closed after the drain: True" in out
    assert "receiver finished: True None" in out
    assert "views readable: True" in out


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_ring_close_inside_on_end_takes_effect_after_the_drain(mode):
    out = run_child(
        """
        ring = iouzcrx.Ring()
        queue = make_queue(ring, MODE, area_size=1 << 20)
        client, server = pair()
        ends = []
        def on_end(error):
            ends.append(error)
            ring.close()
        receiver = queue.recv_multishot(server, on_data=lambda view: None, on_end=on_end)
        client.sendall(b"y" * 5000)
        client.close()
        drive(ring, lambda: ring.closed)
        print("closed:", ring.closed, "ends:", ends)
        """,
        mode,
    )
    assert out == ["closed: True ends: [None]"]


def test_ring_close_inside_a_send_callback_takes_effect_after_the_drain():
    out = run_child(
        """
        ring = iouzcrx.Ring()
        client, server = pair()
        results = []
        def sent(res, flags):
            results.append(res)
            ring.close()
        ring.send(client, b"hello", callback=sent)
        ring.nop()
        drive(ring, lambda: ring.closed)
        print("closed:", ring.closed, "results:", results, "peer:", server.recv(5))
        """
    )
    assert out == ["closed: True results: [5] peer: b'hello'"]


# -- 2: close from another thread --------------------------------------------


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_ring_close_from_another_thread_inside_on_data_is_deferred_to_the_owner(mode):
    # The other thread closes while the owner is inside on_data (the owner
    # waits for it there): the owner must still finish its walk safely.
    out = run_child(
        """
        ring = iouzcrx.Ring()
        queue = make_queue(ring, MODE, area_size=1 << 20)
        client, server = pair()
        outcome = []
        def close_elsewhere():
            try:
                ring.close()
                outcome.append(("returned", ring.closed))
            except Exception as exc:
                outcome.append((type(exc).__name__,))
        def on_data(view):
            if not outcome:
                closer = threading.Thread(target=close_elsewhere)
                closer.start()
                closer.join(10)
        receiver = queue.recv_multishot(server, on_data=on_data)
        client.sendall(b"z" * 300000)
        drive(ring, lambda: ring.closed)
        print("outcome:", outcome, "closed:", ring.closed, "finished:", receiver.finished)
        """,
        mode,
    )
    assert out == ["outcome: [('returned', False)] closed: True finished: True"]


def test_ring_close_from_another_thread_wakes_a_blocked_owner():
    ring = iouzcrx.Ring()
    closer = threading.Timer(0.05, ring.close)
    closer.start()
    try:
        ring.wait(30)  # returns once the owner has closed the ring
        closer.join(30)
        assert ring.closed
    finally:
        closer.cancel()
        ring.close()


# -- 8: refused calls change nothing ------------------------------------------


def call_in_thread(function):
    """Call ``function`` in another thread; return what it raised."""
    raised = []

    def run():
        try:
            function()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    return raised[0] if raised else None


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_receiver_cancel_refused_from_another_thread_changes_nothing(ring, listener, mode):
    client, server = connect_pair(listener)
    with client, server:
        queue = make_queue(ring, mode, area_size=1 << 20)
        receiver = queue.recv_multishot(server)
        assert isinstance(call_in_thread(receiver.cancel), WrongThread)
        assert not receiver.cancelling and receiver.armed
        receiver.cancel()  # the owner's cancel still works
        assert receiver.get(10) is None
        assert receiver.finished and receiver.error is None


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_receiver_close_refused_from_another_thread_keeps_delivering(ring, listener, mode):
    client, server = connect_pair(listener)
    with client, server:
        queue = make_queue(ring, mode, area_size=1 << 20)
        receiver = queue.recv_multishot(server)
        assert isinstance(call_in_thread(receiver.close), WrongThread)
        assert not receiver.discarding and not receiver.cancelling
        client.sendall(b"still here")
        assert bytes(receiver.get(10)) == b"still here"


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_queue_close_refused_from_another_thread_changes_nothing(ring, listener, mode):
    client, server = connect_pair(listener)
    with client, server:
        queue = make_queue(ring, mode, area_size=1 << 20)
        receiver = queue.recv_multishot(server)
        assert isinstance(call_in_thread(queue.close), WrongThread)
        assert not queue.closed and not receiver.cancelling
        client.sendall(b"abc")
        assert bytes(receiver.get(10)) == b"abc"


def test_bufring_queue_refused_on_another_thread_allocates_nothing(ring):
    error = call_in_thread(lambda: iouzcrx.BufRingQueue(ring, area_size=1 << 20))
    assert isinstance(error, WrongThread)
    queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=64 << 10)
    assert queue.buffer_group == 1  # the refused call took no group


# -- 9: queues are closed, or freed when dropped -------------------------------


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_receive_queue_dropped_while_its_ring_lives_is_freed(ring, mode):
    queue = make_queue(ring, mode, area_size=1 << 20)
    ref = weakref.ref(queue)
    del queue
    gc.collect()
    assert ref() is None
    ring.nop().wait(5)  # the owner releases what the queue left behind
    make_queue(ring, "bufring", area_size=1 << 20).close()


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_queue_close_ends_receives_without_error_and_views_outlive_it(ring, listener, mode):
    client, server = connect_pair(listener)
    with client, server:
        queue = make_queue(ring, mode, area_size=1 << 20)
        ends = []
        receiver = queue.recv_multishot(server, on_end=ends.append)
        # Large enough not to be copied out of the area as a small chunk.
        payload = b"kept" * 4096
        client.sendall(payload)
        ring.wait_for(lambda: receiver.queued, 10)
        view = receiver.get(0)
        queue.close()
        queue.close()  # idempotent
        ring.wait_for(lambda: receiver.finished, 10)
        assert ends == [None] and receiver.error is None
        assert queue.closed
        with pytest.raises(ValueError, match="closed"):
            queue.recv_multishot(server)
        ref = weakref.ref(queue)
        queue = receiver = None
        gc.collect()
        assert ref() is not None  # the view holds the area
        assert len(view) and payload.startswith(bytes(view))
        view.release()
        gc.collect()
        assert ref() is None


def test_a_closed_bufring_queue_gives_its_buffer_ring_back_once_nothing_is_armed(ring, listener):
    client, server = connect_pair(listener)
    with client, server:
        queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=64 << 10)
        group = queue.buffer_group
        receiver = queue.recv_multishot(server)
        ring.drain()
        queue.close()
        assert ring._buffer_group_registered(group)  # the receive is still armed
        ring.wait_for(lambda: receiver.finished, 10)
        assert not ring._buffer_group_registered(group)
        assert receiver.error is None


def test_a_bufring_queue_dropped_without_close_is_unregistered_at_the_next_drain(ring):
    queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=64 << 10)
    group = queue.buffer_group
    del queue
    gc.collect()
    ring.drain()
    assert not ring._buffer_group_registered(group)


# -- 4: ops that name a socket hold it open ----------------------------------------


def test_shutdown_holds_its_socket_open_until_it_completes(ring):
    a, b = socket.socketpair()
    with b:
        request = ring.shutdown(a, socket.SHUT_WR)
        del a
        gc.collect()
        assert request.wait(5) == 0
        b.settimeout(5)
        assert b.recv(1) == b""  # the peer sees the EOF: it was the right socket


def test_send_holds_its_socket_open_until_it_completes(ring):
    a, b = socket.socketpair()
    with b:
        request = ring.send(a, b"through the dropped socket")
        del a
        gc.collect()
        assert request.wait(5) == len(b"through the dropped socket")
        b.settimeout(5)
        assert b.recv(100) == b"through the dropped socket"


def test_read_holds_its_source_open_until_it_completes(ring):
    a, b = socket.socketpair()
    with b:
        buffer = bytearray(5)
        request = ring.read(a, buffer)
        del a
        gc.collect()
        b.sendall(b"fresh")
        assert request.wait(5) == 5 and buffer == b"fresh"


def test_cancel_fd_holds_its_socket_open_until_it_completes(ring):
    a, b = socket.socketpair()
    with b:
        read = ring.read(a, bytearray(10))
        request = ring.cancel_fd(a)
        del a
        gc.collect()
        assert request.wait(5) == 1  # one request cancelled
        with pytest.raises(OSError):
            read.wait(5)


def test_the_raw_fd_close_op_is_gone(ring):
    assert not hasattr(ring, "close_fd")


# -- 18: timeouts --------------------------------------------------------------------


@pytest.mark.parametrize("timeout", ["-1", "-0.5", "float('nan')"])
def test_nan_or_negative_timeouts_are_refused_naming_the_value(timeout):
    out = run_child(
        f"""
        timeout = {timeout}
        ring = iouzcrx.Ring()
        queue = make_queue(ring, MODE, area_size=1 << 20)
        client, server = pair()
        receiver = queue.recv_multishot(server)
        calls = {{
            "ring.wait": lambda: ring.wait(timeout),
            "ring.wait_for": lambda: ring.wait_for(lambda: False, timeout),
            "completion.wait": lambda: ring.read(server, bytearray(1)).wait(timeout),
            "receiver.get": lambda: receiver.get(timeout=timeout),
        }}
        for name, call in calls.items():
            # A pending wake-up, so that a wait that is not refused returns.
            os.write(ring.eventfd, (1).to_bytes(8, "little"))
            try:
                call()
                print(name, "accepted")
            except ValueError as exc:
                print(name, "ValueError", repr(timeout) in str(exc))
        """,
        timeout=30,
    )
    assert out == [
        "ring.wait ValueError True",
        "ring.wait_for ValueError True",
        "completion.wait ValueError True",
        "receiver.get ValueError True",
    ]


def test_ring_wait_none_and_zero_still_mean_forever_and_poll(ring):
    ring.nop()
    assert ring.wait(0) in (True, False)
    request = ring.nop()
    assert request.wait(None) == 0


# -- 20: messages that name the real cause; fork ---------------------------------


def test_ring_with_zero_entries_names_the_value_not_the_kernel():
    with pytest.raises(iouzcrx.InvalidConfiguration, match="sq_entries .* not 0"):
        iouzcrx.Ring(0)
    with pytest.raises(iouzcrx.InvalidConfiguration, match="cq_entries .* not -1"):
        iouzcrx.Ring(8, -1)


def test_the_smallest_ring_is_made_with_room_for_one_wide_completion():
    """One CQ entry is too few where a 32-byte CQE takes two (CQE_MIXED):
    the kernel would refuse the ring with EOVERFLOW."""
    with iouzcrx.Ring(1, 1) as ring:
        assert ring.sq_entries == 1 and ring.cq_entries >= 2
        assert ring.nop().wait(10) == 0


def test_ring_sizes_above_the_kernel_limit_are_clamped():
    with iouzcrx.Ring(1 << 20, 1 << 30) as ring:
        assert ring.sq_entries == 32768 and ring.cq_entries == 65536


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_a_forked_child_touching_the_parents_ring_gets_a_clear_error(mode):
    out = run_child(
        """
        ring = iouzcrx.Ring()
        queue = make_queue(ring, MODE, area_size=1 << 20)
        client, server = pair()
        receiver = queue.recv_multishot(server)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                ring.nop()
                code = 3
            except iouzcrx.WrongThread as exc:
                code = 0 if "parent process" in str(exc) else 4
            try:
                ring.close()  # submits nothing: only the child's copies go
                code = code or (0 if ring.closed else 5)
            except BaseException:
                code = 6
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print("child status:", os.waitstatus_to_exitcode(status))
        client.sendall(b"parent still receives")
        print("parent:", bytes(receiver.get(10)), receiver.error)
        ring.close()
        """,
        mode,
    )
    assert out == ["child status: 0", "parent: b'parent still receives' None"]


# -- 21: silent acceptance ------------------------------------------------------------


def test_ring_sizes_must_be_integers():
    with pytest.raises(TypeError, match="1.5"):
        iouzcrx.Ring(1.5)
    with pytest.raises(TypeError, match="2.5"):
        iouzcrx.Ring(8, 2.5)


def test_rq_entries_must_be_an_integer(ring):
    with pytest.raises(iouzcrx.InvalidConfiguration, match="rq_entries .*1.5"):
        iouzcrx.ZcrxQueue(
            ring, mode="zerocopy", interface="lo", queue=0, area_size=1 << 20, rq_entries=1.5
        )


def test_cancel_of_none_is_refused(ring):
    with pytest.raises(TypeError):
        ring.cancel(None)
    assert ring.in_flight == 0


def test_a_completion_never_submitted_says_so():
    with pytest.raises(RuntimeError, match="never submitted"):
        iouzcrx.Completion().wait()
    with pytest.raises(RuntimeError, match="never submitted"):
        iouzcrx.Completion().cancel()


def reuse_number(listener: socket.socket, number: int) -> tuple[socket.socket, socket.socket]:
    """A new connection whose socket got ``number`` (the lowest free one,
    just closed), and its peer."""
    a, b = connect_pair(listener)
    assert number in (a.fileno(), b.fileno())
    return (a, b) if a.fileno() == number else (b, a)


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_a_receive_queued_on_a_socket_closed_before_submission_never_reads_its_successor(
    ring, listener, mode
):
    """The SQE holds the number: submitted after the close and a new
    connection on it, it would read that connection's data. The ring turns
    it into a no-op and the receive ends with EBADF."""
    queue = make_queue(ring, mode)
    client, server = connect_pair(listener)
    receiver = queue.recv_multishot(server)  # queued, not yet submitted
    number = server.fileno()
    server.close()
    mine, peer = reuse_number(listener, number)
    with client, mine, peer:
        peer.sendall(b"another connection's data")
        with pytest.raises(OSError) as raised:
            receiver.get(timeout=10)
        assert raised.value.errno == errno.EBADF
        mine.settimeout(10)
        assert mine.recv(100) == b"another connection's data"  # still all there


@pytest.mark.parametrize(
    "operation",
    ["send", "shutdown", "poll", "cancel_fd"],
)
def test_an_operation_queued_on_a_socket_closed_before_submission_never_acts_on_its_successor(
    ring, listener, operation
):
    client, server = connect_pair(listener)
    with client:
        if operation == "send":
            request = ring.send(server, b"meant for the closed connection")
        elif operation == "shutdown":
            request = ring.shutdown(server, socket.SHUT_RDWR)
        elif operation == "poll":
            request = ring.poll(server, select.POLLOUT)
        else:
            request = ring.cancel_fd(server)
        number = server.fileno()
        server.close()
        mine, peer = reuse_number(listener, number)
        with mine, peer:
            with pytest.raises(OSError) as raised:
                request.wait(10)
            assert raised.value.errno == errno.EBADF
            # The new connection is whole: nothing sent to it, not shut down.
            mine.sendall(b"ping")
            peer.settimeout(10)
            assert peer.recv(100) == b"ping"
            peer.sendall(b"pong")
            mine.settimeout(10)
            assert mine.recv(100) == b"pong"


def test_the_check_before_submission_runs_none_of_the_program_s_code():
    """An object whose own fileno() the ring would call between filling
    SQEs and submitting them could close the ring there (its SQEs unmapped
    under the check): such an owner is not asked again. In a child, which
    must not crash."""
    lines = run_child(
        """
        import socket
        import iouzcrx
        ring = iouzcrx.Ring()
        a, b = socket.socketpair()

        class ClosesTheRing:
            calls = 0

            def fileno(self):
                ClosesTheRing.calls += 1
                if ClosesTheRing.calls > 1:
                    ring.close()
                return a.fileno()

        request = ring.send(ClosesTheRing(), b"hi")
        print("sent", request.wait(10), ClosesTheRing.calls, b.recv(10))
        """
    )
    assert lines == ["sent 2 1 b'hi'"]


def test_an_fd_given_as_an_int_subclass_is_used_as_given(ring):
    class Fd(int):
        pass

    readable, writable = os.pipe()
    try:
        os.write(writable, b"ok")
        assert ring.read(Fd(readable), bytearray(10)).wait(10) == 2
    finally:
        os.close(readable)
        os.close(writable)


def test_a_completed_send_lets_go_of_its_socket(ring):
    a, b = socket.socketpair()
    with b:
        assert ring.send(a, b"x").wait(10) == 1
        gone = weakref.ref(a)
        a.close()
        del a
        gc.collect()
        assert gone() is None


@pytest.mark.parametrize("mode", RECEIVE_MODES)
def test_a_receive_cancelled_then_closed_before_submission_ends_as_a_cancel(ring, listener, mode):
    queue = make_queue(ring, mode)
    client, server = connect_pair(listener)
    with client:
        receiver = queue.recv_multishot(server)
        receiver.cancel()
        server.close()
        assert receiver.get(timeout=10) is None  # no error: the program cancelled it
        assert receiver.finished and receiver.error is None
