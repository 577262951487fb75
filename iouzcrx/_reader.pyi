import asyncio
from typing import Any

DEFAULT_LIMIT: int

def check_limit(limit: Any) -> None:
    """Raise TypeError or ValueError unless ``limit`` is a positive int."""

class ZcrxStreamReader:
    """Buffered views of one connection, consumed by coroutines.

    Shaped like ``asyncio.StreamReader``; ``async for view in reader``
    yields the received views themselves. ``read``, ``readexactly``,
    ``readuntil`` and ``readline`` return a ``memoryview`` slice when the
    answer lies inside one received chunk, and copy into ``bytes`` only when
    it spans chunks. More than twice ``limit`` bytes buffered pause the
    transport until reads take them. ``readuntil`` and ``readline`` search
    only what arrived since their last look. One coroutine at a time may
    wait on a reader: a second gets ``RuntimeError``, as with asyncio's.
    """

    @property
    def _limit(self) -> int: ...
    @property
    def _size(self) -> int: ...
    @property
    def _searched(self) -> int: ...
    def __init__(self, limit: int = ...) -> None: ...
    def set_transport(self, transport: asyncio.BaseTransport) -> None:
        """Called by the connection's protocol with its transport."""
    def feed_view(self, view: memoryview | bytes | bytearray) -> None:
        """Called by the connection's protocol with each received view."""
    def feed_eof(self) -> None:
        """Called by the connection's protocol when the peer closed its side."""
    def _release_area(self) -> None: ...
    def set_exception(self, exc: BaseException) -> None:
        """Make waiting and later reads raise ``exc``."""
    def exception(self) -> BaseException | None:
        """The exception reads raise, if any."""
    def at_eof(self) -> bool:
        """Whether the peer closed its side and everything was read."""
    def _wake(self) -> None: ...
    def __aiter__(self) -> ZcrxStreamReader: ...
    async def __anext__(self) -> memoryview: ...
    async def read(self, n: int = -1) -> memoryview | bytes:
        """Up to ``n`` bytes (all until EOF if ``n < 0``); empty at EOF."""
    async def readexactly(self, n: int) -> memoryview | bytes:
        """Exactly ``n`` bytes: a slice of one view when they lie in one, else a
        copy. ``asyncio.IncompleteReadError`` if EOF comes first."""
    async def readuntil(self, separator: bytes = b"\n") -> memoryview | bytes:
        """The bytes up to and including ``separator``: a slice of one view when
        they lie in one, else a copy. ``asyncio.LimitOverrunError`` past the
        reader's limit, ``asyncio.IncompleteReadError`` if EOF comes first."""
    async def readline(self) -> memoryview | bytes:
        """One line, ending with the newline unless EOF came first."""
