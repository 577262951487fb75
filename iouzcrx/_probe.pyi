from typing import Any

from iouzcrx._ring import Ring

OP_RECV: int
OP_RECV_ZC: int
OP_ACCEPT: int
OP_SEND: int

def query_opcodes() -> dict[str, int] | None: ...
def query_zcrx() -> dict[str, int] | None: ...
def query_zcrx_event() -> dict[str, int] | None:
    """``IO_URING_QUERY_ZCRX_EVENT``, or None before Linux 7.2."""

class KernelFeatures:
    """What the running kernel offers iouzcrx, measured rather than inferred
    from the version. Built once per process by ``kernel_features()``; every
    mode decision reads it."""

    release: str
    """The kernel release (``uname -r``)."""
    io_uring: bool
    """Whether a ring could be set up and entered."""
    io_uring_error: OSError | None
    """Why not, when ``io_uring`` is false."""
    setup_flags: list[str]
    """The setup flags a ring gets on this kernel."""
    opcodes: frozenset[int]
    """The ``IORING_OP_*`` numbers the kernel supports."""
    query: dict[str, int] | None
    """``IO_URING_QUERY_OPCODES``, or None before Linux 6.18."""
    zcrx_query: dict[str, int] | None
    """``IO_URING_QUERY_ZCRX``, or None where the kernel cannot answer it
    (before 6.19)."""
    zcrx_nodev: bool
    """Whether a device-less zcrx queue can be registered: ``copy`` mode."""
    zcrx_import: bool
    """Whether a zcrx queue can be imported from another ring."""
    zcrx_ctrl_flush: bool
    """Whether the kernel takes ``ZCRX_CTRL_FLUSH_RQ``."""
    zcrx_rx_buf_len: bool
    """Whether chunks larger than a page (``rx_buf_len``) can be asked for."""
    zcrx_event_query: dict[str, int] | None
    """``IO_URING_QUERY_ZCRX_EVENT``, or None before Linux 7.2."""
    zcrx_events: bool
    """Whether a zcrx queue can register for events (copy fallback,
    allocation failure) and kernel copy statistics (Linux 7.2+)."""
    zcrx_event_types: int
    """Event types the kernel offers, one bit per type."""
    zcrx_stats_size: int
    """Bytes of the kernel's zcrx statistics (0 without them)."""
    zcrx_stats_alignment: int
    """Alignment the kernel requires of the statistics' offset."""
    zcrx_export: bool
    """Whether a zcrx queue can be exported to another ring and imported
    there (Linux 6.19+)."""
    rq_hdr_size: int
    """Size of the refill ring's header, as the kernel reports it."""
    rq_hdr_alignment: int
    """Alignment of the refill ring's entries after the header."""
    recvsend_bundle: bool
    """Whether the kernel has ``IORING_FEAT_RECVSEND_BUNDLE``."""
    eventfd_prompt: bool
    """Whether the ring's eventfd is signalled inside the wake-up that queues
    task work (as on 6.18) rather than milliseconds later (Linux 7.3). When
    it is not, the asyncio layer and blocking waits also watch each
    receiving socket."""
    @property
    def recv_zc(self) -> bool:
        """``IORING_OP_RECV_ZC`` exists (6.15+); says nothing about a NIC."""
    @property
    def bufring(self) -> bool:
        """Whether ``bufring`` mode can run: io_uring works and has
        ``IORING_OP_RECV``."""
    def as_dict(self) -> dict[str, Any]:
        """The features as a JSON-ready dict (``python -m iouzcrx features``)."""

def zcrx_events_missing(features: KernelFeatures) -> str | None:
    """Why there are no zcrx events or kernel statistics, or None."""

def zcrx_export_missing(features: KernelFeatures) -> str | None:
    """Why zcrx queues cannot be shared between rings, or None."""

def enter_error(exc: OSError) -> OSError: ...
def eventfd_wakes_at_once(ring: Ring) -> bool: ...
def kernel_features() -> KernelFeatures:
    """The ``KernelFeatures`` of this kernel (probed once per process)."""
