from typing import Any

from iouzcrx._receive import ReceiveQueue
from iouzcrx._ring import Ring

class BufRingQueue(ReceiveQueue):
    buffer_group: int
    buffer_size: int
    ring_entries: int
    def __init__(
        self,
        ring: Ring,
        *,
        area_size: int = ...,
        buffer_size: int = ...,
        hugepages: bool = False,
    ) -> None: ...
    def stats(self) -> dict[str, Any]: ...
