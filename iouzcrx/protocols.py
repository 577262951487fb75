"""Protocols a zcrx transport can drive, and how a received view reaches each.

- ``ZeroCopyProtocol``: ``view_received(view)`` gets the memoryview over area
  memory itself; the buffer goes back when the program drops the view.
- ``asyncio.BufferedProtocol``: the view is copied into ``get_buffer()``.
- ``asyncio.Protocol``: the view is copied into ``bytes`` for ``data_received``.

As with the event loops' own transports, what counts is the methods a
protocol has, not its base class.

In the last two cases the buffer goes back as soon as the copy is made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from iouzcrx._receive import delivery_methods

__all__ = ["ZeroCopyProtocol", "delivery_for", "delivery_methods"]


class ZeroCopyProtocol(asyncio.BaseProtocol):
    """Receives data as zero-copy memoryviews over the receive area.

    A view (and any slice of it) keeps its buffer out of the kernel's hands;
    release it (``view.release()`` or drop it) when done. Holding many views
    makes the transport stop reading until they are released.
    """

    def view_received(self, view: memoryview) -> None:
        """Called with each received chunk, in order."""

    def eof_received(self) -> bool | None:
        """The peer closed its side. Return true to keep the transport open
        for writing (half-close); otherwise it is closed."""
        return None


def delivery_for(protocol: Any) -> Callable[[memoryview], None]:
    """The function that hands one received view to ``protocol``, chosen by
    ``delivery_methods``: the view itself to ``view_received``, else a copy
    into ``get_buffer()`` memory or into ``bytes``.

    The ring transports deliver from Cython instead
    (``Receiver.set_protocol_delivery``, the same choice); this serves the
    socket mode and data a paused transport holds.
    """
    kind, method, updated = delivery_methods(protocol)
    if kind == "views":
        return method
    if kind == "buffered":
        assert updated is not None
        return _buffered_delivery(method, updated)
    return _bytes_delivery(method)


def _bytes_delivery(data_received: Callable[[bytes], object]) -> Callable[[memoryview], None]:
    def deliver(view: memoryview) -> None:
        data = view.tobytes()
        view.release()
        data_received(data)

    return deliver


def _buffered_delivery(
    get_buffer: Callable[[int], Any], buffer_updated: Callable[[int], object]
) -> Callable[[memoryview], None]:
    def deliver(view: memoryview) -> None:
        with view:
            offset, size = 0, len(view)
            while offset < size:
                memory = get_buffer(size - offset)
                try:
                    target = memoryview(memory).cast("B")
                except TypeError:  # no buffer, or not C-contiguous
                    target = None
                if target is None or target.readonly:
                    raise _not_writable(memory, size - offset)
                if not len(target):
                    raise RuntimeError("get_buffer() returned an empty buffer")
                n = min(len(target), size - offset)
                target[:n] = view[offset : offset + n]
                target.release()
                buffer_updated(n)
                offset += n

    return deliver


def _not_writable(memory: Any, sizehint: int) -> TypeError:
    """The TypeError the ring modes raise for the same object: it names
    what get_buffer() returned and what to return instead."""
    return TypeError(
        f"get_buffer({sizehint}) returned {type(memory).__name__!r}, which is not writable "
        "contiguous memory: return a bytearray, a writable memoryview or another object "
        "exporting a writable buffer"
    )
