from collections.abc import Callable
from typing import Any

from iouzcrx._ring import RingClient

class Area:
    """Anonymous, page-aligned memory for received data.

    It stays mapped while anything references it: the receive queue and every
    buffer exported over it, so a view can never outlive its memory.

    ``contiguous`` (0, or a power of two up to 2 MiB) asks that every aligned
    ``contiguous`` bytes be physically contiguous, as zcrx chunks larger than
    a page need: reserved huge pages (``hugepages=True``) are; otherwise the
    area is mapped 2 MiB-aligned with transparent huge pages and checked to be
    backed by them, and refused (``MemoryLimit`` naming the fix) where it is
    not.
    """

    size: int
    """Bytes of the area (the mapping is rounded up to 2 MiB with
    transparent huge pages)."""
    hugepages: bool
    """Whether reserved (hugetlb) huge pages back the area."""
    transparent_hugepages: bool
    """Whether transparent huge pages back the area."""
    page_size: int
    """Bytes of the pages backing the area: 4096, or 2 MiB for huge pages."""
    def __init__(self, size: int, hugepages: bool = False, contiguous: int = 0) -> None: ...
    def small_page_bytes(self) -> int | None:
        """Bytes of the area mapped by 4 KiB pages rather than 2 MiB ones now,
        or None where the kernel does not tell."""

class BufferOwner(RingClient):
    """Hands out views over its area and takes each buffer back exactly once."""

    mode: str
    """The receive mode: ``"zerocopy"``, ``"copy"``, ``"bufring"`` or ``"socket"``."""
    total_buffers: int
    """Buffers (or chunks) the area is divided into."""
    buffers_in_use: int
    """Buffers held by views the program has not released yet."""
    buffers_returned: int
    """Buffers given back since creation."""
    bytes_received: int
    """Bytes received since creation."""
    chunks_received: int
    """Kernel completions that carried data."""
    deliveries: int
    """Views handed out (adjacent chunks can share one view)."""
    @property
    def area(self) -> Area:
        """The memory the kernel writes received data into."""
    def stats(self) -> dict[str, Any]:
        """Counters since creation, as a dict (the same keys in every mode)."""

class PinAccount:
    """How many area buffers the views of one connection pin, and how many it
    may pin (``limit``) before its receive pauses.

    A receive that pauses waits with its data in the socket (TCP flow control
    holds the peer back) and resumes once the views are down to half the
    limit, so that a peer which makes the program hold its views cannot take
    the area from the other connections. Get one from
    ``ReceiveQueue.pin_account()``; pass it to every receive of the
    connection.
    """

    pinned: int
    """Buffers pinned by the connection's views now."""
    limit: int
    """Buffers the connection's views may pin before its receive pauses."""
    stalled: bool
    """Whether the receive waits for pins or buffers to go."""
    on_stall: Callable[[], object] | None
    """Called, with no argument, when the receive starts waiting: after the
    last view it delivers before then, so that giving up the views held at
    that moment gives up all of them."""
    def __init__(self, limit: int) -> None: ...

class Buffer:
    """What a received view is a view of: one chunk, or a run of adjacent
    chunks; when the last view over it is released, every buffer of it goes
    back."""

    buffers: int
    """How many area buffers the view spans."""
    def __buffer__(self, flags: int, /) -> memoryview: ...
