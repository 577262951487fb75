"""Which RX queue a connection arrives on: the kernel's ``netdev`` generic
netlink family, read with a small client of its own.

A TCP socket knows the NAPI instance that last delivered its packets
(``SO_INCOMING_NAPI_ID``); the family's ``queue-get`` dump tells which RX
queue each NAPI instance serves. Together they route an accepted
connection to the zcrx queue bound to the RX queue it arrives on.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from iouzcrx._netlink import GenericNetlink, as_u32, attr, attrs, u32

__all__ = [
    "NetdevFamily",
    "NetdevUnavailable",
    "QueueRouter",
    "RxQueue",
    "incoming_napi_id",
    "route_queue",
]

SO_INCOMING_NAPI_ID = getattr(socket, "SO_INCOMING_NAPI_ID", 56)

# The netdev family (linux/netdev.h).
_FAMILY = "netdev"
_CMD_QUEUE_GET = 10
_CMD_NAPI_GET = 11
_A_NAPI_IFINDEX = 1
_A_NAPI_ID = 2
_A_QUEUE_ID = 1
_A_QUEUE_IFINDEX = 2
_A_QUEUE_TYPE = 3
_A_QUEUE_NAPI_ID = 4
_A_QUEUE_IO_URING = 6
_QUEUE_TYPE_RX = 0

_MAX_IFINDEX = 0x7FFFFFFF


class NetdevUnavailable(OSError):
    """The kernel has no ``netdev`` netlink family (before Linux 6.5), or
    netlink cannot be used here."""


@dataclass(frozen=True)
class RxQueue:
    """One RX queue as the kernel reports it."""

    ifindex: int
    """The interface's index."""
    queue: int
    """The RX queue index (as in ``queue=`` of zerocopy mode)."""
    napi_id: int
    """The NAPI instance serving the queue; 0 when it has none (then no
    socket can be routed to it)."""
    io_uring: bool
    """Whether an io_uring zcrx queue is bound to it."""


class NetdevFamily(GenericNetlink):
    """A generic netlink socket speaking the ``netdev`` family.

    Raises ``NetdevUnavailable`` when the kernel lacks the family. Usable
    as a context manager; ``close()`` may be called any number of times,
    from any thread. Threads sharing one take turns (a request and its
    answers are one exchange on the socket).
    """

    def __init__(self) -> None:
        try:
            super().__init__()
        except OSError as exc:
            raise NetdevUnavailable(exc.errno, f"no generic netlink socket: {exc}") from None
        try:
            self.family_id = self.family(_FAMILY)
        except OSError as exc:
            self.close()
            if exc.errno == errno.ENOENT:
                raise NetdevUnavailable(
                    errno.ENOENT,
                    f"the kernel has no {_FAMILY!r} generic netlink family (Linux >= 6.5 has)",
                ) from None
            if exc.errno == errno.EPROTO:
                raise NetdevUnavailable(exc.errno, str(exc)) from None
            raise
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NetdevFamily:
        return self

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"family {self.family_id}"
        return f"<NetdevFamily {state}>"

    def _dump(self, interface: str | int, cmd: int, ifindex_attr: int) -> tuple[int, list[bytes]]:
        """(ifindex, answers) of a ``cmd`` dump filtered to ``interface``."""
        ifindex = _ifindex(interface)
        try:
            return ifindex, self.request(
                self.family_id, cmd, attr(ifindex_attr, u32(ifindex)), dump=True
            )
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                raise _no_interface(interface) from None
            raise

    def rx_queues(self, interface: str | int) -> list[RxQueue]:
        """The RX queues of ``interface`` (a name or an index), in queue
        order. Raises ``InterfaceNotFound`` for an unknown interface."""
        ifindex, answers = self._dump(interface, _CMD_QUEUE_GET, _A_QUEUE_IFINDEX)
        queues = []
        for payload in answers:
            fields: dict[int, Any] = {}
            for kind, value in attrs(payload):
                fields[kind] = as_u32(value) if kind != _A_QUEUE_IO_URING else True
            if fields.get(_A_QUEUE_TYPE) != _QUEUE_TYPE_RX:
                continue
            if fields.get(_A_QUEUE_IFINDEX, ifindex) != ifindex:
                continue  # a kernel that ignores the filter dumps every device
            queues.append(
                RxQueue(
                    ifindex=ifindex,
                    queue=fields.get(_A_QUEUE_ID, 0),
                    napi_id=fields.get(_A_QUEUE_NAPI_ID, 0),
                    io_uring=bool(fields.get(_A_QUEUE_IO_URING, False)),
                )
            )
        queues.sort(key=lambda q: q.queue)
        return queues

    def napi_ids(self, interface: str | int) -> list[int]:
        """The ids of ``interface``'s NAPI instances (``napi-get`` dump),
        ascending."""
        ifindex, answers = self._dump(interface, _CMD_NAPI_GET, _A_NAPI_IFINDEX)
        ids = []
        for payload in answers:
            fields = {kind: as_u32(value) for kind, value in attrs(payload)}
            if fields.get(_A_NAPI_IFINDEX, ifindex) == ifindex and fields.get(_A_NAPI_ID):
                ids.append(fields[_A_NAPI_ID])
        return sorted(ids)

    def napi_to_queue(self, interface: str | int) -> dict[int, int]:
        """NAPI id → RX queue index for ``interface``.

        From the queues' own NAPI links where the driver reports them (every
        driver with zcrx support does). A NAPI instance serving several RX
        queues maps to the lowest of them. A driver that links none (veth)
        but has exactly one NAPI instance per RX queue gets them paired in
        creation order, which is queue order for such drivers; a wrong
        guess only costs a copy, never data."""
        mapping: dict[int, int] = {}
        queues = self.rx_queues(interface)
        for rxq in queues:
            if rxq.napi_id:
                mapping.setdefault(rxq.napi_id, rxq.queue)
        if not mapping and queues:
            ids = self.napi_ids(interface)
            if len(ids) == len(queues):
                mapping = {napi: rxq.queue for napi, rxq in zip(ids, queues, strict=True)}
        return mapping


def _no_interface(interface: str | int) -> OSError:
    from iouzcrx.errors import InterfaceNotFound

    return InterfaceNotFound(
        errno.ENODEV,
        f"no network interface {interface!r} in this network namespace (see 'ip link')",
    )


def _ifindex(interface: str | int) -> int:
    if isinstance(interface, bool) or not isinstance(interface, (str, int)):
        raise TypeError(f"interface must be a name such as 'eth0' or an index, not {interface!r}")
    if isinstance(interface, int):
        # The kernel's index is a C int: anything larger would not even fit
        # the request's u32 attribute.
        if not 0 < interface <= _MAX_IFINDEX:
            raise ValueError(
                f"an interface index is positive and at most {_MAX_IFINDEX}, not {interface}"
                " (see 'ip link' for the indexes)"
            )
        return interface
    try:
        return socket.if_nametoindex(interface)
    except (OSError, ValueError):
        raise _no_interface(interface) from None


def incoming_napi_id(sock: socket.socket) -> int:
    """The NAPI id of the RX queue that last delivered ``sock``'s packets:
    0 when unknown (loopback, a device without NAPI, nothing received yet)."""
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_INCOMING_NAPI_ID))
    except OSError:
        return 0  # kernels without busy polling lack the option


def route_queue(napi_id: int, napi_to_queue: dict[int, int], queues: Iterable[int]) -> int | None:
    """The RX queue among ``queues`` that NAPI instance ``napi_id`` serves,
    or None: unknown NAPI id (0, another device, a NAPI instance that
    changed) or a queue that is not one of ``queues``."""
    queue = napi_to_queue.get(napi_id) if napi_id else None
    return queue if queue is not None and queue in set(queues) else None


class QueueRouter:
    """Routes sockets to RX queues of ``interface`` among ``queues``.

    The NAPI map is read once, and again when a socket names a NAPI id it
    does not hold (a NIC reconfigured: channels changed, device reset), at
    most once per unknown id. Without the netdev family every socket is
    unrouted (``route`` returns None) and ``error`` says why.
    """

    def __init__(self, interface: str, queues: Iterable[int]) -> None:
        if isinstance(interface, bool) or not isinstance(interface, (str, int)):
            raise TypeError(
                f"interface must be a name such as 'eth0' or an index, not {interface!r}"
            )
        if isinstance(queues, (str, bytes)) or not hasattr(queues, "__iter__"):
            raise TypeError(f"queues must be RX queue indexes such as [0, 1], not {queues!r}")
        self.queues = tuple(queues)
        for queue in self.queues:
            if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
                raise TypeError(
                    f"queues must hold non-negative int RX queue indexes, not {queue!r}"
                )
        self.interface = interface
        self.napi_to_queue: dict[int, int] = {}
        self.error: BaseException | None = None
        self._misses: set[int] = set()
        self.refresh()

    def refresh(self) -> None:
        """Read the NAPI map again from the kernel."""
        try:
            with NetdevFamily() as family:
                self.napi_to_queue = family.napi_to_queue(self.interface)
            self.error = None
        except OSError as exc:
            self.napi_to_queue = {}
            self.error = exc
        self._misses.clear()

    def route(self, sock: socket.socket) -> tuple[int | None, int]:
        """(queue or None, the socket's NAPI id)."""
        napi_id = incoming_napi_id(sock)
        if napi_id and napi_id not in self.napi_to_queue and napi_id not in self._misses:
            self.refresh()
            if napi_id not in self.napi_to_queue:
                self._misses.add(napi_id)
        return route_queue(napi_id, self.napi_to_queue, self.queues), napi_id
