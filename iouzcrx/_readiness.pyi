from collections.abc import Callable
from typing import Any

from iouzcrx._receive import AcceptedFd, ReceiveQueue

BULK_READ: int
"""Bytes a read must take to count as bulk (after two such reads in a row
the transport goes back to the multishot receive)."""

class ReadinessReceiver:
    """Reads one connection when its socket is readable and hands the data
    to its protocol: ``bytes`` to ``data_received``, into ``get_buffer()``
    memory, or views over the bytes read to ``view_received``."""

    finished: bool
    """Whether it ended or was closed: it reads nothing more."""
    eof: bool
    """Whether the peer closed its side."""
    bytes_received: int
    reads: int
    def __init__(
        self,
        queue: ReceiveQueue,
        sock: AcceptedFd,
        on_end: Callable[[BaseException | None], object],
        on_error: Callable[[BaseException], object],
        on_bulk: Callable[[], object],
        on_forked: Callable[[Exception], object],
    ) -> None: ...
    def set_protocol_delivery(
        self, protocol: Any, methods: tuple[str, Any, Any] | None = None
    ) -> None:
        """Deliver to ``protocol`` from the next read on: a protocol that
        wants views gets views over the bytes read."""
    def close(self) -> None:
        """Read no more and call nobody."""
    def on_readable(self) -> None:
        """The loop's reader callback: read once and deliver."""
