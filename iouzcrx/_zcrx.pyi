from typing import Any

from iouzcrx._receive import ReceiveQueue
from iouzcrx._ring import Ring

ZCRX_MODES: tuple[str, ...]

def rx_queue_count(interface: str) -> int | None: ...

class ZcrxQueue(ReceiveQueue):
    zcrx_id: int
    rq_entries: int
    chunk_size: int
    interface: str | None
    queue: int | None
    can_flush: bool
    flushes: int
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
    def flush(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...
