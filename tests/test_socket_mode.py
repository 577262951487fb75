"""Socket mode's lending of area buffers to the event loop's own transport."""

from __future__ import annotations

from iouzcrx._socket_pool import SocketBufferPool
from iouzcrx.protocols import ZeroCopyProtocol
from iouzcrx.socket_transport import AreaReadingProtocol


def test_an_unfilled_buffer_is_lent_again_not_leaked():
    # A loop asks for a buffer again when its read found nothing (EAGAIN).
    pool = SocketBufferPool(area_size=1 << 20, buffer_size=256 << 10)
    adapter = AreaReadingProtocol(pool, ZeroCopyProtocol())
    first = adapter.get_buffer(-1)
    assert adapter.get_buffer(-1) is first
    assert pool.buffers_in_use == 1
    adapter.connection_lost(None)
    assert pool.buffers_in_use == 0 and pool.free_buffers == 4
