"""iouzcrx: io_uring zero-copy receive (ZC Rx) for asyncio and uvloop.

The engine, synchronously::

    with iouzcrx.Ring() as ring:
        queue = iouzcrx.ZcrxQueue(ring, mode="copy")      # or BufRingQueue(ring)
        for view in queue.recv_multishot(sock):
            consume(view)                                 # a memoryview over the area
"""

import asyncio as _asyncio
from typing import Any as _Any

from iouzcrx._bufring import BufRingQueue
from iouzcrx._probe import KernelFeatures, kernel_features
from iouzcrx._receive import ReceiveQueue, Receiver
from iouzcrx._ring import Completion, Ring
from iouzcrx._zcrx import ZcrxQueue
from iouzcrx.errors import (
    InterfaceNotFound,
    InvalidConfiguration,
    IoUringUnavailable,
    IouzcrxError,
    KernelTooOld,
    MemoryLimit,
    MissingCapability,
    NicMisconfigured,
    NicUnsupported,
    QueueBusy,
    QueueOutOfRange,
    WrongProcess,
    WrongThread,
)
from iouzcrx.loop import EventLoopPolicy, install, new_event_loop, run
from iouzcrx.modes import MODES, ModeSelection, select_mode
from iouzcrx.protocols import ZeroCopyProtocol
from iouzcrx.server import ZcrxServer
from iouzcrx.server import create_zcrx_server as _create_on_loop
from iouzcrx.streams import ZcrxStreamReader, ZcrxStreamWriter, open_connection, start_server
from iouzcrx.transport import ZcrxTransport

__version__ = "0.1.0"


async def create_zcrx_server(
    protocol_factory: _Any,
    host: _Any = None,
    port: int | None = None,
    *,
    loop: _asyncio.AbstractEventLoop | None = None,
    **kwargs: _Any,
) -> ZcrxServer:
    """``loop.create_server`` with zero-copy receive, on any running loop
    (stock asyncio or uvloop); options as in :mod:`iouzcrx.server`."""
    return await _create_on_loop(
        loop or _asyncio.get_running_loop(), protocol_factory, host, port, **kwargs
    )


__all__ = [
    "MODES",
    "BufRingQueue",
    "EventLoopPolicy",
    "ModeSelection",
    "ZcrxServer",
    "ZcrxStreamReader",
    "ZcrxStreamWriter",
    "open_connection",
    "start_server",
    "ZcrxTransport",
    "ZeroCopyProtocol",
    "create_zcrx_server",
    "install",
    "new_event_loop",
    "run",
    "select_mode",
    "Completion",
    "InterfaceNotFound",
    "InvalidConfiguration",
    "IouzcrxError",
    "IoUringUnavailable",
    "KernelFeatures",
    "KernelTooOld",
    "MemoryLimit",
    "MissingCapability",
    "NicMisconfigured",
    "NicUnsupported",
    "QueueBusy",
    "QueueOutOfRange",
    "ReceiveQueue",
    "Receiver",
    "Ring",
    "WrongProcess",
    "WrongThread",
    "ZcrxQueue",
    "kernel_features",
]
