"""Receive queues a program makes with ``cls.__new__(cls)``, never set up:
every public method either works on the empty object or raises; none may
crash the interpreter (each runs in a child, whose exit status tells)."""

from __future__ import annotations

import pytest
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
