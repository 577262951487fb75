"""Protocols a zcrx transport can drive, and how a received view reaches each.

- ``ZeroCopyProtocol``: ``view_received(view)`` gets the memoryview over area
  memory itself; the buffer goes back when the program drops the view.
- ``asyncio.BufferedProtocol``: the view is copied into ``get_buffer()``.
- ``asyncio.Protocol``: the view is copied into ``bytes`` for ``data_received``.

In the last two cases the buffer goes back as soon as the copy is made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["ZeroCopyProtocol", "delivery_for"]


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


def delivery_for(protocol: asyncio.BaseProtocol) -> Callable[[memoryview], None]:
    """The function that hands one received view to ``protocol``."""
    if isinstance(protocol, ZeroCopyProtocol):
        return protocol.view_received
    if isinstance(protocol, asyncio.BufferedProtocol):
        return _buffered_delivery(protocol)
    if isinstance(protocol, asyncio.Protocol):
        return _bytes_delivery(protocol)
    raise TypeError(
        f"{type(protocol).__name__} is not a ZeroCopyProtocol, asyncio.BufferedProtocol "
        "or asyncio.Protocol"
    )


def _bytes_delivery(protocol: asyncio.Protocol) -> Callable[[memoryview], None]:
    data_received = protocol.data_received

    def deliver(view: memoryview) -> None:
        data = view.tobytes()
        view.release()
        data_received(data)

    return deliver


def _buffered_delivery(protocol: asyncio.BufferedProtocol) -> Callable[[memoryview], None]:
    get_buffer = protocol.get_buffer
    buffer_updated = protocol.buffer_updated

    def deliver(view: memoryview) -> None:
        with view:
            offset, size = 0, len(view)
            while offset < size:
                target = memoryview(get_buffer(size - offset)).cast("B")
                if not len(target):
                    raise RuntimeError("get_buffer() returned an empty buffer")
                n = min(len(target), size - offset)
                target[:n] = view[offset : offset + n]
                target.release()
                buffer_updated(n)
                offset += n

    return deliver
