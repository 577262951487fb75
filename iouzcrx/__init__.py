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
from iouzcrx._zcrx import ZcrxExport, ZcrxQueue
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
from iouzcrx.workers import Supervisor, WorkerStartError, serve

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
    (stock asyncio or uvloop), or on ``loop`` if given.

    The protocols ``protocol_factory`` makes get the received data as
    ``ZeroCopyProtocol.view_received(view)``, ``asyncio.BufferedProtocol``
    or ``asyncio.Protocol`` calls, whichever methods they have. Options:

    - ``mode``: ``"auto"`` (the default: ``zerocopy`` when ``interface``
      and ``queue`` are given, then ``copy``, ``bufring``, ``socket``), or
      one of those to insist on it;
    - ``interface``, ``queue``: the NIC and its RX queue for ``zerocopy``;
    - ``area_size``: bytes of receive area shared by the connections
      (64 MiB);
    - ``rq_entries``, ``rx_buf_len``: the refill ring's size and the chunk
      size of a zcrx queue (``copy``, ``zerocopy``), as ``ZcrxQueue`` takes
      them;
    - ``buffer_size``: bytes per buffer in ``bufring`` and ``socket`` modes
      (256 KiB);
    - ``hugepages``: back the area with huge pages;
    - ``host``, ``port``, ``family``, ``flags``, ``sock``, ``backlog``,
      ``reuse_address``, ``reuse_port``, ``start_serving``: as
      ``loop.create_server`` takes them. ``ssl`` is refused: zero-copy
      receive sees the payload as the NIC wrote it.

    Returns the ``ZcrxServer``; ``server.refused`` says why each better
    mode was not taken. An explicit mode that cannot work raises the error
    naming the missing prerequisite.
    """
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
    "serve",
    "Supervisor",
    "WorkerStartError",
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
    "ZcrxExport",
    "ZcrxQueue",
    "kernel_features",
]
