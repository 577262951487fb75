from collections.abc import Callable
from typing import Any

from iouzcrx._area import BufferOwner

class SocketBufferPool(BufferOwner):
    mode: str
    buffer_size: int
    total_buffers: int
    buffers_in_use: int
    buffers_returned: int
    bytes_received: int
    chunks_received: int
    on_available: Callable[[], object] | None
    def __init__(self, *, area_size: int, buffer_size: int, hugepages: bool = False) -> None: ...
    @property
    def free_buffers(self) -> int: ...
    def take(self) -> tuple[int, memoryview] | None: ...
    def filled(self, index: int, nbytes: int) -> memoryview: ...
    def put_back(self, index: int) -> None: ...
    def stats(self) -> dict[str, Any]: ...
