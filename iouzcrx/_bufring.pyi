from typing import Any

from iouzcrx._receive import ReceiveQueue
from iouzcrx._ring import Ring

class BufRingQueue(ReceiveQueue):
    """A provided buffer ring of ``area_size // buffer_size`` buffers on
    ``ring``, for multishot ``IORING_OP_RECV`` (``bufring`` mode, Linux 6.1+).

    ``area_size`` defaults to 64 MiB and ``buffer_size`` to 256 KiB.
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
    def __init__(
        self,
        ring: Ring,
        *,
        area_size: int = ...,
        buffer_size: int = ...,
        hugepages: bool = False,
    ) -> None: ...
    def stats(self) -> dict[str, Any]:
        """``ReceiveQueue.stats()`` plus ``buffer_group``, ``buffer_size`` and
        ``ring_entries``."""
