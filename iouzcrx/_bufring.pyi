from typing import Any

from iouzcrx._receive import ReceiveQueue
from iouzcrx._ring import Ring

class BufRingQueue(ReceiveQueue):
    """A provided buffer ring of ``area_size // buffer_size`` buffers on
    ``ring``, for multishot ``IORING_OP_RECV`` (``bufring`` mode, Linux 6.1+).

    ``area_size`` defaults to 64 MiB and ``buffer_size`` to 256 KiB.

    ``incremental`` (None: the ``IOUZCRX_BUFRING_INCREMENTAL`` environment
    variable, 1 or 0, and on when it is unset) asks for an incremental ring
    (``IOU_PBUF_RING_INC``, Linux 6.12+): the kernel fills each buffer with
    many chunks, each delivered as a view over its part, and the buffer goes
    back when the kernel has finished it and every view over a part of it is
    gone. A kernel that refuses the flag gets the classic ring, where each
    chunk takes a buffer and a chunk under an eighth of a buffer is copied
    out so that its buffer goes back at once (``incremental_refused`` says
    why).

    An incremental ring is given ``window_size`` bytes of buffers (None: the
    ``IOUZCRX_BUFRING_WINDOW`` environment variable, else 1 MiB; at least two
    buffers) at a time; the other free buffers wait, the last returned first,
    so that the kernel fills buffers that are still in the cache instead of
    going round the whole area. Held views still draw on every buffer of the
    area. One delivery then holds at most half the window, and on any ring
    at most half the area (at least one buffer), so that a view kept while
    the next is awaited never holds every buffer.
    ``close()`` unregisters the buffer ring once nothing is armed on it; a
    queue dropped without ``close()`` is unregistered by the ring's owner
    thread at its next drain.
    """

    buffer_group: int
    """The buffer group id registered with the kernel."""
    buffer_size: int
    """Bytes per buffer."""
    ring_entries: int
    """Entries of the provided buffer ring."""
    incremental: bool
    """Whether the ring is incremental (``IOU_PBUF_RING_INC``)."""
    incremental_refused: str | None
    """Why the kernel refused an incremental ring that was asked for, else None."""
    peak_buffers_in_use: int
    """The most buffers out of the kernel's ring at once since creation."""
    window: int
    """The most buffers the kernel is given at a time."""
    def __init__(
        self,
        ring: Ring,
        *,
        area_size: int = ...,
        buffer_size: int = ...,
        hugepages: bool = False,
        incremental: bool | None = None,
        window_size: int | None = None,
    ) -> None: ...
    def stats(self) -> dict[str, Any]:
        """``ReceiveQueue.stats()`` plus ``buffer_group``, ``buffer_size``,
        ``ring_entries``, ``incremental``, ``peak_buffers_in_use``, ``window``
        and ``spare_buffers`` (free buffers not given to the kernel)."""
