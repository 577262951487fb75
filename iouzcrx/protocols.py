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


def delivery_for(protocol: Any) -> Callable[[memoryview], None]:
    """The function that hands one received view to ``protocol``.

    Chosen by what the protocol has, as the event loops do (no base class is
    required): ``view_received`` gets the zero-copy views, else
    ``get_buffer`` with ``buffer_updated`` gets copies into its buffers, else
    ``data_received`` gets ``bytes``. TypeError if it has none of these.
    """
    view_received = getattr(protocol, "view_received", None)
    if callable(view_received):
        return view_received  # type: ignore[no-any-return]
    get_buffer = getattr(protocol, "get_buffer", None)
    buffer_updated = getattr(protocol, "buffer_updated", None)
    if callable(get_buffer) and callable(buffer_updated):
        return _buffered_delivery(get_buffer, buffer_updated)
    data_received = getattr(protocol, "data_received", None)
    if callable(data_received):
        return _bytes_delivery(data_received)
    raise TypeError(
        f"the protocol {protocol!r} cannot take received data: give it view_received(view) "
        "(zero copy, see ZeroCopyProtocol), get_buffer(sizehint) and buffer_updated(nbytes) "
        "(asyncio.BufferedProtocol) or data_received(data) (asyncio.Protocol)"
    )


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
                target = memoryview(get_buffer(size - offset)).cast("B")
                if not len(target):
                    raise RuntimeError("get_buffer() returned an empty buffer")
                n = min(len(target), size - offset)
                target[:n] = view[offset : offset + n]
                target.release()
                buffer_updated(n)
                offset += n

    return deliver
