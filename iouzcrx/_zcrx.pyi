from typing import Any

from iouzcrx._receive import ReceiveQueue
from iouzcrx._ring import Ring

ZCRX_MODES: tuple[str, ...]

def rx_queue_count(interface: str) -> int | None: ...

class ZcrxQueue(ReceiveQueue):
    """A zero-copy receive interface queue on ``ring``: the area, its refill
    ring and ``RECV_ZC`` receives.

    ``mode="copy"`` registers a device-less queue (Linux 7.1+,
    CAP_NET_ADMIN) into which the kernel copies; ``mode="zerocopy"`` binds
    RX queue ``queue`` of ``interface``, set up for zero-copy receive, and
    the NIC writes into the area itself. ``area_size`` defaults to 64 MiB;
    ``rq_entries`` (the refill ring's size) defaults to room for every chunk
    of the area; ``rx_buf_len`` 0 means page-sized chunks. Larger ones (a
    power of two up to 2 MiB, ``zerocopy`` mode) need Linux 7.0, a driver that
    takes a receive page size (bnxt, mlx5) and an area physically contiguous
    in chunk units: reserved huge pages with ``hugepages=True``, otherwise
    transparent huge pages (2 MiB-aligned, ``area_size`` rounded up to 2 MiB
    of memory). An area the kernel does not back with huge pages is refused
    with ``MemoryLimit`` naming the fix, never quietly cut into page-sized
    chunks; ``stats()["chunk_size"]`` is the size in use. Views over the area
    come out of ``recv_multishot(sock)``.

    The kernel frees a zcrx queue (and unpins its area) only with its ring:
    ``close()`` stops the receives and detaches the queue, but the queue and
    its pinned area stay registered until the ring closes.
    """

    zcrx_id: int
    """The id the kernel gave the queue."""
    rq_entries: int
    """Entries of the refill ring."""
    chunk_size: int
    """Bytes per chunk of the area."""
    interface: str | None
    """The network interface, in ``zerocopy`` mode."""
    queue: int | None
    """The RX queue index, in ``zerocopy`` mode."""
    can_flush: bool
    """Whether the kernel takes a refill ring flush (``ZCRX_CTRL_FLUSH_RQ``,
    Linux 6.19+)."""
    flushes: int
    """Flushes requested so far."""
    def __init__(
        self,
        ring: Ring,
        *,
        mode: str = "copy",
        interface: str | None = None,
        queue: int | None = None,
        area_size: int = ...,
        rq_entries: int | None = None,
        rx_buf_len: int = 0,
        hugepages: bool = False,
    ) -> None: ...
    def flush(self) -> None:
        """Publish pending returns and have the kernel take the refill ring
        now (``ZCRX_CTRL_FLUSH_RQ``, Linux 6.19+)."""
    def _emulate_nic_refill(self, flush: bool = True) -> None:
        """Test aid: refill like a NIC-bound queue (no flush after every
        return; ``flush=False``: as without ``ZCRX_CTRL_FLUSH_RQ``)."""
    def stats(self) -> dict[str, Any]:
        """``ReceiveQueue.stats()`` plus ``zcrx_id``, ``rq_entries``,
        ``chunk_size``, ``flushes`` and ``area_page_size`` (bytes of the pages
        backing the area: 2 MiB when huge pages back it)."""
