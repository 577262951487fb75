from collections.abc import Callable, Iterator
from typing import Any

from iouzcrx._area import BufferOwner, PinAccount
from iouzcrx._ring import Request, Ring

class ReceiveQueue(BufferOwner):
    ring: Ring
    refills: int
    rearms: int
    closed: bool
    @property
    def buffers_pending_return(self) -> int: ...
    def recv_multishot(
        self,
        sock: Any,
        *,
        on_data: Callable[[memoryview], object] | None = None,
        on_end: Callable[[BaseException | None], object] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
        account: PinAccount | None = None,
    ) -> Receiver: ...
    def pin_account(self) -> PinAccount: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...

class Receiver(Request):
    queue: ReceiveQueue
    sock: Any
    fd: int
    on_data: Callable[[memoryview], object] | None
    on_end: Callable[[BaseException | None], object] | None
    on_error: Callable[[BaseException], object] | None
    armed: bool
    starved: bool
    throttled: bool
    account: PinAccount | None
    finished: bool
    eof: bool
    cancelling: bool
    discarding: bool
    error: BaseException | None
    bytes_received: int
    chunks_received: int
    rearms: int
    def __iter__(self) -> Iterator[memoryview]: ...
    def __next__(self) -> memoryview: ...
    def get(self, timeout: float | None = None) -> memoryview | None: ...
    @property
    def queued(self) -> int: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...
