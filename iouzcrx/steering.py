"""Which worker's listening socket a new connection reaches: a classic BPF
program on the port's ``SO_REUSEPORT`` group that reads the RX queue the
connection's SYN arrived on and picks the worker owning that queue.

The kernel runs a reuseport group's classic program on the SYN and uses
its return value as an index into the group's sockets, in the order they
started listening; an index past the last socket (or a program that cannot
tell) falls back to the group's hash, as without a program
(``reuseport_select_sock``, Linux 4.5+). Classic programs need no
privilege (``SO_ATTACH_REUSEPORT_CBPF``), unlike eBPF ones.

The program reads ``skb->queue_mapping`` (the ``SKF_AD_QUEUE`` ancillary
load). A NIC driver (and tun) records the RX queue there as queue + 1
(``skb_record_rx_queue``), 0 meaning none recorded. Software devices that
hand a peer's packet to the RX queue of the peer's TX queue (veth,
netdevsim) record nothing: the value is still the sender's TX queue index,
which is the index of the RX queue they deliver on (measured on veth,
Linux 6.18, and on netdevsim, Linux 7.3: the value equals the queue whose
NAPI instance delivered the connection). A netdevsim that splits headers
from payload records the queue (+ 1) on the skbs it rebuilds, but only for
segments with payload: the SYN the program sees is passed on as it came.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Mapping

__all__ = [
    "SO_ATTACH_REUSEPORT_CBPF",
    "RECORDS_NO_RX_QUEUE",
    "SteeringUnavailable",
    "attach_steering",
    "queue_mapping_offset",
    "steering_program",
]

SO_ATTACH_REUSEPORT_CBPF = 51

# Drivers that never call skb_record_rx_queue(): they pick the RX queue by
# the sender's queue_mapping and hand its skb on as it is
# (drivers/net/veth.c, drivers/net/netdevsim/netdev.c, Linux 6.18 and 7.3).
RECORDS_NO_RX_QUEUE = frozenset({"veth", "netdevsim"})

# Classic BPF (linux/filter.h, linux/bpf_common.h).
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_SKF_AD_OFF = -0x1000
_SKF_AD_QUEUE = 24
_BPF_MAXINSNS = 4096

# Any index past the group's last socket: the kernel then picks by hash.
BY_HASH = 0xFFFFFFFF

_INSN = struct.Struct("=HBBI")
# struct sock_fprog: unsigned short len, then a pointer (native alignment
# pads between them as the C compiler does).
_FPROG = struct.Struct("@HP")


class SteeringUnavailable(OSError):
    """The kernel refused the steering program (before Linux 4.5, or a
    socket that is not in a reuseport group)."""


def queue_mapping_offset(interface: str | int) -> int:
    """What ``skb->queue_mapping`` holds beyond the RX queue index for
    packets ``interface`` receives: 1 where the driver records the queue
    (NIC drivers, tun), 0 for the devices of ``RECORDS_NO_RX_QUEUE``.
    Raises ``InterfaceNotFound`` for an unknown interface."""
    try:
        name = interface if isinstance(interface, str) else socket.if_indextoname(interface)
        socket.if_nametoindex(name)
    except OSError:
        from iouzcrx.errors import InterfaceNotFound

        raise InterfaceNotFound(
            errno.ENODEV,
            f"no network interface {interface!r} in this network namespace (see 'ip link')",
        ) from None
    return 0 if _driver(name) in RECORDS_NO_RX_QUEUE else 1


def _driver(interface: str) -> str | None:
    """The kernel driver's name, as ``ethtool -i`` shows it; from sysfs for
    a bus device when the ethtool query fails."""
    name = _ethtool_driver(interface)
    if name is not None:
        return name
    try:
        return os.path.basename(os.readlink(f"/sys/class/net/{interface}/device/driver"))
    except OSError:
        return None


def _ethtool_driver(interface: str) -> str | None:
    """``ETHTOOL_GDRVINFO``'s driver name: every device answers it, veth
    (which has no bus device in sysfs) included."""
    siocethtool = 0x8946
    ethtool_gdrvinfo = 0x00000003
    info = bytearray(196)  # struct ethtool_drvinfo
    struct.pack_into("=I", info, 0, ethtool_gdrvinfo)
    buffer = ctypes.create_string_buffer(bytes(info), len(info))
    request = struct.pack("16sP", interface.encode()[:15], ctypes.addressof(buffer))
    request += bytes(40 - len(request))  # struct ifreq is 40 bytes
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), siocethtool, request)
    except OSError:
        return None
    return buffer.raw[4:36].split(b"\0", 1)[0].decode(errors="replace") or None


def steering_program(owners: Mapping[int, int], *, offset: int = 1) -> bytes:
    """The classic BPF program (``struct sock_filter`` array) returning
    ``owners[queue]`` for a SYN that arrived on RX queue ``queue``, and an
    out-of-range index (the kernel's hash) for any other queue or none.
    ``offset`` is ``queue_mapping_offset()`` of the interface."""
    if offset not in (0, 1):
        raise ValueError(f"offset must be 0 or 1 (see queue_mapping_offset), not {offset!r}")
    if not owners:
        raise ValueError("owners must map at least one RX queue to a socket index")
    if 2 * len(owners) + 2 > _BPF_MAXINSNS:
        raise ValueError(
            f"{len(owners)} queues do not fit one classic BPF program "
            f"(at most {(_BPF_MAXINSNS - 2) // 2})"
        )
    insns = [_INSN.pack(_LD_W_ABS, 0, 0, (_SKF_AD_OFF + _SKF_AD_QUEUE) & 0xFFFFFFFF)]
    for queue, index in sorted(owners.items()):
        if isinstance(queue, bool) or not isinstance(queue, int) or not 0 <= queue < 0xFFFF:
            # queue_mapping is 16 bits wide.
            raise ValueError(f"RX queue {queue!r} is not a queue index (0 to 65534)")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < BY_HASH:
            raise ValueError(f"socket index {index!r} for RX queue {queue} is out of range")
        # Equal: fall into the return just below; else skip over it.
        insns.append(_INSN.pack(_JEQ_K, 0, 1, queue + offset))
        insns.append(_INSN.pack(_RET_K, 0, 0, index))
    insns.append(_INSN.pack(_RET_K, 0, 0, BY_HASH))
    return b"".join(insns)


def attach_steering(sock: socket.socket, program: bytes) -> None:
    """Attach ``program`` to the reuseport group ``sock`` listens in: it
    then chooses for every socket of the group (of this address)."""
    count, rest = divmod(len(program), _INSN.size)
    if rest or not 0 < count <= _BPF_MAXINSNS:
        raise ValueError(f"not a classic BPF program: {len(program)} bytes")
    # The kernel copies the program in setsockopt(): the buffer need only
    # outlive the call.
    code = ctypes.create_string_buffer(program, len(program))
    fprog = _FPROG.pack(count, ctypes.addressof(code))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP):
            raise SteeringUnavailable(
                exc.errno, f"the kernel refused the reuseport steering program: {exc.strerror}"
            ) from None
        raise
