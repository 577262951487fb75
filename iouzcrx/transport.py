"""``ZcrxTransport``: an ``asyncio.Transport`` receiving through a zcrx or
buffer-ring queue (multishot receive on the ring) and sending with ring SENDs.

Implemented in Cython (``iouzcrx._transport``); this is where it is
documented and imported from.
"""

from iouzcrx._transport import ZcrxTransport, owned_fd

__all__ = ["ZcrxTransport", "owned_fd"]
