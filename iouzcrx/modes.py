"""Choosing the receive mode.

``mode="auto"`` takes the first that works of: ``zerocopy`` (only when an
interface and queue are given), ``copy``, ``bufring``, ``socket``, and keeps
the reason each better mode was refused. An explicit mode that cannot work
raises the error naming the missing prerequisite.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from iouzcrx._bufring import BufRingQueue
from iouzcrx._ring import Ring
from iouzcrx._socket_pool import SocketBufferPool
from iouzcrx._zcrx import ZcrxQueue
from iouzcrx.errors import InvalidConfiguration, IouzcrxError

__all__ = ["MODES", "ModeSelection", "select_mode"]

MODES = ("zerocopy", "copy", "bufring", "socket")
DEFAULT_AREA_SIZE = 64 << 20
# Per buffer of the bufring and socket modes: one kernel receive fills at most
# one buffer, and on loopback 256 KiB takes a third less CPU per GB than 64 KiB
# (benchmarks/, bulk over 1, 8 and 64 connections).
DEFAULT_BUFFER_SIZE = 256 << 10

log = logging.getLogger("iouzcrx")


@dataclass
class ModeSelection:
    """The mode taken, the backend serving it, and why better modes were not."""

    mode: str
    backend: Any  # ZcrxQueue | BufRingQueue | SocketBufferPool
    refused: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        text = f"mode {self.mode}"
        if self.refused:
            reasons = "; ".join(f"{m}: {why}" for m, why in self.refused.items())
            text += f" (refused {reasons})"
        return text


def select_mode(
    ring: Ring | None,
    *,
    mode: str = "auto",
    interface: str | None = None,
    queue: int | None = None,
    area_size: int = DEFAULT_AREA_SIZE,
    rq_entries: int | None = None,
    rx_buf_len: int = 0,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    hugepages: bool = False,
    ring_error: BaseException | None = None,
) -> ModeSelection:
    """Open the backend for ``mode`` on ``ring`` (None when io_uring could not
    be set up; ``ring_error`` says why)."""
    if mode == "auto":
        candidates = ["copy", "bufring", "socket"]
        if interface is not None and queue is not None:
            candidates.insert(0, "zerocopy")
    elif mode in MODES:
        candidates = [mode]
    else:
        raise InvalidConfiguration(f"mode must be 'auto' or one of {MODES}, not {mode!r}")
    if mode != "zerocopy" and mode != "auto" and (interface is not None or queue is not None):
        raise InvalidConfiguration("interface= and queue= only apply to mode='zerocopy'")

    refused: dict[str, str] = {}
    for candidate in candidates:
        try:
            if candidate == "socket":
                backend: Any = SocketBufferPool(
                    area_size=area_size, buffer_size=buffer_size, hugepages=hugepages
                )
            elif ring is None:
                raise (
                    ring_error
                    if isinstance(ring_error, OSError)
                    else OSError(f"io_uring is unavailable: {ring_error}")
                )
            elif candidate == "bufring":
                backend = BufRingQueue(
                    ring, area_size=area_size, buffer_size=buffer_size, hugepages=hugepages
                )
            else:
                zerocopy = candidate == "zerocopy"
                backend = ZcrxQueue(
                    ring,
                    mode=candidate,
                    interface=interface if zerocopy else None,
                    queue=queue if zerocopy else None,
                    rq_entries=rq_entries,
                    area_size=area_size,
                    rx_buf_len=rx_buf_len,
                    hugepages=hugepages,
                )
        except (IouzcrxError, OSError) as exc:
            if mode != "auto":
                raise
            refused[candidate] = str(exc)
            continue
        selection = ModeSelection(candidate, backend, refused)
        if refused:
            log.info("iouzcrx: %s", selection.describe())
        return selection
    raise AssertionError("socket mode cannot be refused")  # pragma: no cover
