"""Choosing the receive mode.

``mode="auto"`` takes the first that works of: ``zerocopy`` (only when an
interface and queue are given), ``copy``, ``bufring``, ``socket``, and keeps
the reason each better mode was refused. An explicit mode that cannot work
raises the error naming the missing prerequisite.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from iouzcrx._bufring import BufRingQueue
from iouzcrx._probe import kernel_features
from iouzcrx._ring import Ring
from iouzcrx._socket_pool import SocketBufferPool
from iouzcrx._zcrx import ZcrxQueue
from iouzcrx.errors import InvalidConfiguration, IouzcrxError

__all__ = ["MODES", "ModeSelection", "check_queues", "select_mode"]

MODES = ("zerocopy", "copy", "bufring", "socket")
"""The receive modes, best first: the order in which ``mode="auto"`` tries them."""
DEFAULT_AREA_SIZE = 64 << 20
# Per buffer of the bufring and socket modes: one kernel receive fills at most
# one buffer, and on loopback 256 KiB takes a third less CPU per GB than 64 KiB
# (benchmarks/, bulk over 1, 8 and 64 connections).
DEFAULT_BUFFER_SIZE = 256 << 10

_PAGE_SIZE = 4096
_HUGE_PAGE_SIZE = 2 << 20
_MAX_BUFFER_SIZE = (1 << 32) - _PAGE_SIZE  # a buffer length is 32 bits in the kernel
_MAX_RQ_ENTRIES = 32768  # IORING_MAX_ENTRIES of the zcrx refill ring
_MAX_QUEUE = 0xFFFFFFFF - 1
# Beyond the 47-bit user address space of x86-64 and arm64: no mapping fits.
_MAX_AREA_SIZE = 1 << 47

log = logging.getLogger("iouzcrx")


@dataclass
class ModeSelection:
    """The mode taken, the backend serving it, and why better modes were not."""

    mode: str
    """The mode taken."""
    backend: Any  # ZcrxQueue | BufRingQueue | SocketBufferPool
    """The ``ZcrxQueue``, ``BufRingQueue`` or socket-mode buffer pool."""
    refused: dict[str, str] = field(default_factory=dict)
    """Each better mode that was tried, with why it could not be used."""

    def describe(self) -> str:
        """One line for a log: the mode and the reasons for refusals."""
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
    zcrx_ring: Callable[[], Ring] | None = None,
) -> ModeSelection:
    """Open the backend for ``mode`` on ``ring`` (None when io_uring could not
    be set up; ``ring_error`` says why).

    ``zcrx_ring``, when given, makes (or returns) the ring the ``zerocopy``
    and ``copy`` modes register on instead of ``ring``: they need one set up
    with DEFER_TASKRUN, which the buffer-ring mode is faster without. It is
    called only when one of them is tried.

    ``"auto"`` takes the first of ``MODES`` that works (``zerocopy`` only
    when ``interface`` and ``queue`` are given) and records why each better
    one was refused; an explicit mode that cannot work raises the error
    naming the missing prerequisite. The other options are those of
    ``create_zcrx_server``.
    """
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
    # Every argument is checked before any mode is tried: a bad value is the
    # caller's mistake whatever the mode, and auto must not read it as "this
    # mode is unavailable" and quietly take the next.
    _check_arguments(
        candidates,
        interface=interface,
        queue=queue,
        area_size=area_size,
        rq_entries=rq_entries,
        rx_buf_len=rx_buf_len,
        buffer_size=buffer_size,
        hugepages=hugepages,
    )

    if ring is not None and candidates != ["socket"]:
        features = kernel_features()
        if not features.io_uring:
            # The ring set up, yet the kernel refuses to run it (io_uring_enter
            # blocked): the ring modes would fail at their first submission.
            ring, ring_error = None, features.io_uring_error
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
                    ring if zcrx_ring is None else zcrx_ring(),
                    mode=candidate,
                    interface=interface if zerocopy else None,
                    queue=queue if zerocopy else None,
                    rq_entries=rq_entries,
                    area_size=area_size,
                    # Large chunks are the NIC's: where auto falls back to copy
                    # mode, the kernel copies into pages (as it only can), rather
                    # than the fallback failing on a zerocopy tuning.
                    rx_buf_len=0 if mode == "auto" and not zerocopy else rx_buf_len,
                    hugepages=hugepages,
                )
        except InvalidConfiguration:
            raise  # the arguments, not the machine: no other mode would do
        except (IouzcrxError, OSError) as exc:
            if candidate == candidates[-1]:
                raise  # nothing left to fall back to (e.g. MemoryLimit in socket mode)
            refused[candidate] = str(exc)
            continue
        selection = ModeSelection(candidate, backend, refused)
        if refused:
            log.info("iouzcrx: %s", selection.describe())
        return selection
    raise AssertionError("unreachable: the last candidate raises")  # pragma: no cover


def check_queues(queues: Any, *, queue: Any, interface: Any, mode: str) -> list[int] | None:
    """``queues=`` of ``create_zcrx_server`` as a list of RX queue indexes
    (None when not given); TypeError or InvalidConfiguration naming the
    first bad value."""
    if queues is None:
        return None
    if queue is not None:
        raise InvalidConfiguration(
            f"pass queue= or queues=, not both (queue={queue!r}, queues={queues!r}): "
            "queues=[...] serves every RX queue listed, queue= one"
        )
    if isinstance(queues, (str, bytes)) or not hasattr(queues, "__iter__"):
        raise TypeError(f"queues must be a list of RX queue indexes such as [0, 1], not {queues!r}")
    result: list[int] = []
    seen: set[int] = set()
    for item in queues:
        index = _integer("queue", item)
        if not 0 <= index <= _MAX_QUEUE:
            raise InvalidConfiguration(
                f"queues must hold non-negative RX queue indexes, not {index}"
            )
        result.append(index)
        if index in seen:
            # What was read so far: queues may be an iterator, even an
            # endless one, whose rest must not be read.
            shown = f"{result[:16]!r}{' ...' if len(result) > 16 else ''}"
            raise InvalidConfiguration(f"queues names RX queue {index} twice: {shown}")
        seen.add(index)
    if not result:
        raise InvalidConfiguration("queues= needs at least one RX queue index (or leave it out)")
    if interface is None:
        raise InvalidConfiguration(
            "queues= needs interface= (the NIC whose RX queues they are, e.g. 'eth0')"
        )
    if mode not in ("auto", "zerocopy"):
        raise InvalidConfiguration(
            f"queues= only applies to mode='zerocopy' (or 'auto'), not mode={mode!r}"
        )
    return result


def _integer(name: str, value: Any) -> int:
    """``value`` as an int; bools and floats are refused, not truncated."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, not the bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, not {type(value).__name__} {value!r}"
        ) from None


def _check_arguments(
    candidates: list[str],
    *,
    interface: Any,
    queue: Any,
    area_size: Any,
    rq_entries: Any,
    rx_buf_len: Any,
    buffer_size: Any,
    hugepages: Any,
) -> None:
    """Raise TypeError or InvalidConfiguration naming the first bad argument
    among those the candidate modes use."""
    if not isinstance(hugepages, bool):
        raise TypeError(f"hugepages must be True or False, not {hugepages!r}")
    unit = _HUGE_PAGE_SIZE if hugepages else _PAGE_SIZE
    area_size = _integer("area_size", area_size)
    if area_size > _MAX_AREA_SIZE:
        raise InvalidConfiguration(
            f"area_size {area_size} is larger than any mapping can be: at most {_MAX_AREA_SIZE}"
        )
    if area_size <= 0 or area_size % unit:
        raise InvalidConfiguration(
            f"area_size {area_size} must be a positive multiple of {unit} bytes"
            + (" (hugepages=True maps 2 MiB pages)" if hugepages else "")
        )
    if interface is not None:
        if not isinstance(interface, str):
            raise TypeError(f"interface must be a str such as 'eth0', not {interface!r}")
        if not interface or "\0" in interface or "/" in interface:
            raise InvalidConfiguration(f"interface {interface!r} is not a network interface name")
    if queue is not None:
        queue = _integer("queue", queue)
        if not 0 <= queue <= _MAX_QUEUE:
            raise InvalidConfiguration(f"queue must be a non-negative RX queue index, not {queue}")
    zcrx = "copy" in candidates or "zerocopy" in candidates
    if rq_entries is not None:
        rq_entries = _integer("rq_entries", rq_entries)
        if not zcrx:
            raise InvalidConfiguration("rq_entries= only applies to the copy and zerocopy modes")
        if not 1 <= rq_entries <= _MAX_RQ_ENTRIES:
            raise InvalidConfiguration(
                f"rq_entries must be between 1 and {_MAX_RQ_ENTRIES}, not {rq_entries}"
            )
    rx_buf_len = _integer("rx_buf_len", rx_buf_len)
    if rx_buf_len:
        if not zcrx:
            raise InvalidConfiguration(
                "rx_buf_len= only applies to the copy and zerocopy modes (bufring and "
                "socket modes take buffer_size=)"
            )
        if rx_buf_len < _PAGE_SIZE or rx_buf_len & (rx_buf_len - 1):
            raise InvalidConfiguration(
                f"rx_buf_len must be 0 (page-sized chunks) or a power of two >= {_PAGE_SIZE}, "
                f"not {rx_buf_len}"
            )
        if rx_buf_len > _HUGE_PAGE_SIZE:
            raise InvalidConfiguration(
                f"rx_buf_len {rx_buf_len} is larger than a 2 MiB page, the largest physically "
                f"contiguous unit an area can be made of: use at most {_HUGE_PAGE_SIZE}"
            )
        if area_size % rx_buf_len:
            raise InvalidConfiguration(
                f"area_size {area_size} must be a multiple of rx_buf_len {rx_buf_len}"
            )
    if "bufring" in candidates or "socket" in candidates:
        buffer_size = _integer("buffer_size", buffer_size)
        if not 0 < buffer_size <= _MAX_BUFFER_SIZE or buffer_size % _PAGE_SIZE:
            raise InvalidConfiguration(
                f"buffer_size {buffer_size} must be a positive multiple of {_PAGE_SIZE} "
                f"bytes, at most {_MAX_BUFFER_SIZE}"
            )
        if area_size < buffer_size or area_size % buffer_size:
            raise InvalidConfiguration(
                f"area_size {area_size} must be a positive multiple of buffer_size {buffer_size}"
            )
