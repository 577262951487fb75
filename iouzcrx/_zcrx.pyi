from typing import Any

from iouzcrx._receive import ReceiveQueue
from iouzcrx._ring import Request, Ring

ZCRX_MODES: tuple[str, ...]

def rx_queue_count(interface: str) -> int | None: ...

class ZcrxExport:
    """A zcrx queue exported from its ring (``ZCRX_CTRL_EXPORT``, Linux
    6.19+): owns the kernel's ``[zcrx]`` file descriptor, which keeps the
    queue registered. ``ZcrxQueue.imported()`` registers the same queue on
    another ring of this process. ``close()`` is idempotent; the fd is also
    closed when the object is collected."""

    mode: str
    """The exported queue's mode."""
    @property
    def closed(self) -> bool:
        """Whether the fd is closed (or detached)."""
    def fileno(self) -> int:
        """The exported queue's fd (ValueError once closed)."""
    def close(self) -> None:
        """Close the fd; the rings using the queue keep it. Closing twice is
        harmless."""
    def detach(self) -> int:
        """Hand over the fd: the caller closes it, this object no longer
        does."""
    def __enter__(self) -> ZcrxExport: ...
    def __exit__(self, *exc_info: object) -> None: ...

class ZcrxEvents(Request):
    """Counts the event CQEs the kernel posts for one zcrx queue (Linux
    7.2+); the ring dispatches them here, never to a receive."""

    copy_events: int
    """Copy-fallback events seen (one per arming, not per copy)."""
    alloc_fail_events: int
    """Buffer allocation failures seen (one per arming)."""
    unknown_events: int
    """Events of a type this library does not know."""

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
    events: ZcrxEvents | None
    """The queue's event counters, or None without kernel events."""
    kernel_stats_missing: str | None
    """Why the kernel keeps no counters for this queue, or None."""
    event_rearms: int
    """Event types armed again after they fired."""
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
    def export_queue(self) -> ZcrxExport:
        """Export this queue (``ZCRX_CTRL_EXPORT``, Linux 6.19+; KernelTooOld
        before): a ZcrxExport to pass to ``ZcrxQueue.imported()`` on another
        ring of this process. Owner thread only."""
    @staticmethod
    def imported(ring: Ring, export: ZcrxExport) -> ZcrxQueue:
        """The queue of ``export`` registered on ``ring``
        (``ZCRX_REG_IMPORT``, Linux 6.19+): the same area and refill ring, a
        receive queue of its own on ``ring``'s thread (call it there).
        Returns from both rings go to the shared refill ring under a lock;
        the kernel's copy counters and events stay with the exporting
        queue. Only a ZcrxExport of this process can be imported: the area
        and the refill ring are this process's private memory."""
    def arm_events(self) -> None:
        """Arm again, now, the event types that fired (the ring does it by
        itself, at most ten times a second). Owner thread only."""
    def kernel_counters(self) -> dict[str, int] | None:
        """The kernel's counters of this queue (Linux 7.2+): ``copies``,
        ``copied_bytes``, ``copy_events``, ``alloc_fail_events``,
        ``event_rearms``; None without them (see ``kernel_stats_missing``)."""
    def zero_copy_stats(self) -> dict[str, Any]:
        """What shows whether zero copy happens (part of ``stats()``): the
        ``kernel_counters()`` (each None without them), ``zero_copy_bytes``
        and ``zero_copy_share`` (against the bytes every ring sharing the
        queue received: the kernel counts its copies per queue, not per
        ring), ``kernel_stats`` and ``kernel_stats_missing``."""
    def stats(self) -> dict[str, Any]:
        """``ReceiveQueue.stats()`` plus ``zcrx_id``, ``rq_entries``,
        ``chunk_size``, ``flushes`` and ``area_page_size`` (bytes of the pages
        backing the area: 2 MiB when huge pages back it)."""
