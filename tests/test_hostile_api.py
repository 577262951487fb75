"""Receive queues a program makes with ``cls.__new__(cls)``, never set up:
every public method either works on the empty object or raises; none may
crash the interpreter (each runs in a child, whose exit status tells)."""

from __future__ import annotations

import importlib

import pytest
from conftest import COMPILED_MODULES
from isolation import run_python

METHODS = (
    "close",
    "stats",
    "__repr__",
    "pin_account",
    "recv_multishot",
    "export_queue",
    "flush",
    "_emulate_nic_refill",
    "arm_events",
    "zero_copy_stats",
    "kernel_counters",
)


BUFRING_METHODS = ("close", "stats", "__repr__", "pin_account", "recv_multishot")


@pytest.mark.parametrize(
    "module,name", [("iouzcrx._zcrx", "ZcrxQueue"), ("iouzcrx._bufring", "BufRingQueue")]
)
def test_a_queue_never_set_up_refuses_or_answers_and_closes_twice(module, name):
    lines = run_python(
        f"""
        import socket
        from {module} import {name} as cls
        for method in {METHODS!r}:
            queue = cls.__new__(cls)
            call = getattr(queue, method, None)
            if call is None:
                continue
            try:
                call(socket.socket()) if method == "recv_multishot" else call()
            except (ValueError, TypeError) as exc:
                print(method, "refused:", exc)
            queue.close()
            queue.close()
            assert queue.closed, method
            print(method, "ok")
        """
    )
    done = [line.split()[0] for line in lines if line.endswith(" ok")]
    assert done == [m for m in METHODS if name == "ZcrxQueue" or m in BUFRING_METHODS]
    assert "recv_multishot refused: the None receive queue is closed" in lines


def test_no_engine_type_can_be_copied_or_pickled_into_a_second_owner():
    """A copy of a view's exporter, a receiver or a queue would give the
    same buffer (fd, mapping) back twice: every extension type refuses."""
    seen = []
    for name in COMPILED_MODULES:
        module = importlib.import_module(f"iouzcrx.{name}")
        for attr, value in vars(module).items():
            if isinstance(value, type) and value.__module__ == module.__name__:
                seen.append(attr)
                # Cython's generated pickling copies C fields (a char * as a
                # NUL-terminated string): none may be generated.
                assert not hasattr(value, "__reduce_cython__"), attr
    assert {"Buffer", "Receiver", "BufRingQueue", "ZcrxStreamReader"} <= set(seen)
    lines = run_python(
        """
        import copy, pickle, socket
        import iouzcrx
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        ring = iouzcrx.Ring()
        queue = iouzcrx.BufRingQueue(ring, area_size=8 * 4096, buffer_size=4096, incremental=False)
        receiver = queue.recv_multishot(server)
        client.sendall(b"A" * 4096)
        held = receiver.get(timeout=10)
        for name, thing in [("Buffer", held.obj), ("Receiver", receiver), ("queue", queue)]:
            for how in (copy.copy, pickle.dumps):
                try:
                    how(thing)
                except TypeError:
                    print(name, how.__name__, "refused")
        # The held buffer is still out: more data goes to other buffers.
        for i in range(40):
            client.sendall(bytes([66 + i % 20]) * 4096)
            receiver.get(timeout=10)
        print("held", bytes(held[:8]))
        """
    )
    assert lines[:-1] == [
        f"{name} {how} refused"
        for name in ("Buffer", "Receiver", "queue")
        for how in ("copy", "dumps")
    ]
    assert lines[-1] == "held " + repr(b"A" * 8)


def test_a_receiver_made_directly_refuses_every_operation():
    lines = run_python(
        """
        import iouzcrx
        for receiver in (iouzcrx.Receiver(), iouzcrx.Receiver.__new__(iouzcrx.Receiver)):
            for call in ("get", "cancel", "close", "__next__"):
                try:
                    getattr(receiver, call)()
                except TypeError as exc:
                    print(call, "refused:", exc)
            print("queued", receiver.queued, repr(receiver))
        """
    )
    refusals = [line for line in lines if "refused" in line]
    assert len(refusals) == 8
    assert all("recv_multishot" in line for line in refusals)
    assert lines.count("queued 0 <Receiver fd=0 idle bytes=0 chunks=0>") == 2


def test_setting_up_a_queue_again_is_refused_and_its_views_stay_readable():
    lines = run_python(
        """
        import gc, socket
        import iouzcrx
        from iouzcrx.streams import ZcrxStreamReader
        from iouzcrx._socket_pool import SocketBufferPool
        listener = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        ring = iouzcrx.Ring()
        queue = iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=4096)
        receiver = queue.recv_multishot(server)
        client.sendall(b"A" * 8192)
        view = receiver.get(timeout=10)
        pool = SocketBufferPool(area_size=1 << 20, buffer_size=4096)
        reader = ZcrxStreamReader()
        for thing, args, kwargs in [
            (queue, (ring,), dict(area_size=1 << 20, buffer_size=4096)),
            (pool, (), dict(area_size=1 << 20, buffer_size=4096)),
            (reader, (), {}),
        ]:
            try:
                thing.__init__(*args, **kwargs)
            except RuntimeError as exc:
                print(type(thing).__name__, "refused:", exc)
        gc.collect()
        print("view", bytes(view[:4]), queue.stats()["total_buffers"])
        """
    )
    assert [line.split(" refused:")[0] for line in lines[:-1]] == [
        "BufRingQueue",
        "SocketBufferPool",
        "ZcrxStreamReader",
    ]
    assert all("set up already" in line for line in lines[:-1])
    assert lines[-1] == "view b'AAAA' 256"
