from iouzcrx._ring import RingClient

class Area:
    size: int
    hugepages: bool
    def __init__(self, size: int, hugepages: bool = False) -> None: ...

class BufferOwner(RingClient):
    @property
    def area(self) -> Area: ...

class Buffer:
    def __buffer__(self, flags: int, /) -> memoryview: ...
