from collections.abc import Callable
from typing import Any

from iouzcrx._ring import RingClient

class Area:
    size: int
    hugepages: bool
    def __init__(self, size: int, hugepages: bool = False) -> None: ...

class BufferOwner(RingClient):
    mode: str
    total_buffers: int
    buffers_in_use: int
    buffers_returned: int
    bytes_received: int
    chunks_received: int
    deliveries: int
    @property
    def area(self) -> Area: ...
    def stats(self) -> dict[str, Any]: ...

class PinAccount:
    pinned: int
    limit: int
    stalled: bool
    on_stall: Callable[[], object] | None
    def __init__(self, limit: int) -> None: ...

class Buffer:
    buffers: int
    def __buffer__(self, flags: int, /) -> memoryview: ...
