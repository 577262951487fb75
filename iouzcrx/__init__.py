"""iouzcrx: io_uring zero-copy receive (ZC Rx) for asyncio and uvloop.

The engine, synchronously::

    with iouzcrx.Ring() as ring:
        queue = iouzcrx.ZcrxQueue(ring, mode="copy")      # or BufRingQueue(ring)
        for view in queue.recv_multishot(sock):
            consume(view)                                 # a memoryview over the area
"""

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
    WrongThread,
)

__version__ = "0.1.0"

__all__ = [
    "BufRingQueue",
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
    "WrongThread",
    "ZcrxQueue",
    "kernel_features",
]
