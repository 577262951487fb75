"""A small generic-netlink client for the NIC tests: ethtool ring settings
(tcp-data-split, hds-thresh) and the netdev family's queue-get.

Debian bookworm's ethtool (6.1) cannot set tcp-data-split or hds-thresh, and
no tool there reads a queue's io_uring binding, so the tests speak netlink
themselves: pure Python over an AF_NETLINK socket, one request at a time.
Errors come back as OSError with the kernel's extended-ack message.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator

NETLINK_GENERIC = 16
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF
NLMSGERR_ATTR_MSG = 1

GENL_ID_CTRL = 0x10
CTRL_CMD_GETFAMILY = 3
CTRL_ATTR_FAMILY_ID = 1
CTRL_ATTR_FAMILY_NAME = 2

# include/uapi/linux/ethtool_netlink_generated.h
ETHTOOL_MSG_RINGS_GET = 15
ETHTOOL_MSG_RINGS_SET = 16
ETHTOOL_MSG_CHANNELS_GET = 17
ETHTOOL_MSG_CHANNELS_SET = 18
ETHTOOL_A_HEADER_DEV_NAME = 2
ETHTOOL_A_RINGS_HEADER = 1
ETHTOOL_A_RINGS_RX = 6
ETHTOOL_A_RINGS_TCP_DATA_SPLIT = 11
ETHTOOL_A_RINGS_HDS_THRESH = 17
ETHTOOL_A_RINGS_HDS_THRESH_MAX = 18
ETHTOOL_A_CHANNELS_HEADER = 1
ETHTOOL_A_CHANNELS_COMBINED_COUNT = 9
TCP_DATA_SPLIT = {0: "unknown", 1: "off", 2: "on"}

# include/uapi/linux/netdev.h
NETDEV_CMD_PAGE_POOL_GET = 5
NETDEV_CMD_QUEUE_GET = 10
NETDEV_A_PAGE_POOL_ID = 1
NETDEV_A_PAGE_POOL_IFINDEX = 2
NETDEV_A_PAGE_POOL_NAPI_ID = 3
NETDEV_A_PAGE_POOL_IO_URING = 8
NETDEV_A_QUEUE_ID = 1
NETDEV_A_QUEUE_IFINDEX = 2
NETDEV_A_QUEUE_TYPE = 3
NETDEV_A_QUEUE_NAPI_ID = 4
NETDEV_A_QUEUE_DMABUF = 5
NETDEV_A_QUEUE_IO_URING = 6
NETDEV_QUEUE_TYPE_RX = 0

_HDR = struct.Struct("=IHHII")  # nlmsghdr
_GENL = struct.Struct("=BBH")  # genlmsghdr
_ATTR = struct.Struct("=HH")


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    size = _ATTR.size + len(payload)
    return _ATTR.pack(size, kind) + payload + b"\0" * (_align(size) - size)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def parse_attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos + _ATTR.size <= len(data):
        size, kind = _ATTR.unpack_from(data, pos)
        if size < _ATTR.size:
            break
        yield kind & NLA_TYPE_MASK, data[pos + _ATTR.size : pos + size]
        pos += _align(size)


class GenlSocket:
    """One generic-netlink socket; use as a context manager."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self.sock.settimeout(5.0)
        # Errors echo only the request's header, and carry the kernel's text.
        self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self.sock.bind((0, 0))
        self.seq = 0
        self.families: dict[str, int] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GenlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, family: int, cmd: int, payload: bytes, *, dump: bool = False) -> list[bytes]:
        """Send one request (with ACK); return the payloads of the replies."""
        self.seq += 1
        body = _GENL.pack(cmd, 1, 0) + payload
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_DUMP if dump else 0)
        msg = _HDR.pack(_HDR.size + len(body), family, flags, self.seq, 0)
        self.sock.send(msg + body)
        replies = []
        while True:
            data = self.sock.recv(1 << 16)
            pos = 0
            while pos + _HDR.size <= len(data):
                size, kind, _flags, seq, _pid = _HDR.unpack_from(data, pos)
                chunk = data[pos + _HDR.size : pos + size]
                pos += _align(size)
                if seq != self.seq:
                    continue
                if kind == NLMSG_ERROR:
                    (err,) = struct.unpack_from("=i", chunk)
                    if err == 0:
                        return replies
                    text = ""
                    # With CAP_ACK only the request's header follows the code.
                    for akind, value in parse_attrs(chunk[4 + _HDR.size :]):
                        if akind == NLMSGERR_ATTR_MSG:
                            text = value.rstrip(b"\0").decode(errors="replace")
                    detail = f": {text}" if text else ""
                    raise OSError(-err, f"{os.strerror(-err)}{detail}")
                if kind == NLMSG_DONE:
                    return replies
                replies.append(chunk[_GENL.size :])

    def family(self, name: str) -> int:
        if name not in self.families:
            replies = self.request(
                GENL_ID_CTRL,
                CTRL_CMD_GETFAMILY,
                attr(CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"),
            )
            for kind, value in parse_attrs(replies[0]):
                if kind == CTRL_ATTR_FAMILY_ID:
                    self.families[name] = struct.unpack("=H", value[:2])[0]
        if name not in self.families:
            raise OSError(errno.ENOENT, f"no generic netlink family {name!r}")
        return self.families[name]


def _dev_header(interface: str, kind: int = ETHTOOL_A_RINGS_HEADER) -> bytes:
    name = attr(ETHTOOL_A_HEADER_DEV_NAME, interface.encode() + b"\0")
    return nested(kind, name)


def rings_get(interface: str) -> dict[str, object]:
    """ethtool -g, the parts zcrx cares about."""
    with GenlSocket() as nl:
        replies = nl.request(nl.family("ethtool"), ETHTOOL_MSG_RINGS_GET, _dev_header(interface))
    out: dict[str, object] = {}
    for kind, value in parse_attrs(replies[0]):
        if kind == ETHTOOL_A_RINGS_TCP_DATA_SPLIT:
            out["tcp_data_split"] = TCP_DATA_SPLIT.get(value[0], str(value[0]))
        elif kind == ETHTOOL_A_RINGS_HDS_THRESH:
            out["hds_thresh"] = struct.unpack("=I", value[:4])[0]
        elif kind == ETHTOOL_A_RINGS_HDS_THRESH_MAX:
            out["hds_thresh_max"] = struct.unpack("=I", value[:4])[0]
        elif kind == ETHTOOL_A_RINGS_RX:
            out["rx"] = struct.unpack("=I", value[:4])[0]
    return out


def rings_set(
    interface: str, *, tcp_data_split: bool | None = None, hds_thresh: int | None = None
) -> None:
    """ethtool -G IF tcp-data-split on|off hds-thresh N."""
    attrs = [_dev_header(interface)]
    if tcp_data_split is not None:
        attrs.append(attr(ETHTOOL_A_RINGS_TCP_DATA_SPLIT, bytes([2 if tcp_data_split else 1])))
    if hds_thresh is not None:
        attrs.append(attr(ETHTOOL_A_RINGS_HDS_THRESH, struct.pack("=I", hds_thresh)))
    with GenlSocket() as nl:
        nl.request(nl.family("ethtool"), ETHTOOL_MSG_RINGS_SET, b"".join(attrs))


def channels_get(interface: str) -> int:
    """ethtool -l: the combined channel count."""
    with GenlSocket() as nl:
        replies = nl.request(
            nl.family("ethtool"),
            ETHTOOL_MSG_CHANNELS_GET,
            _dev_header(interface, ETHTOOL_A_CHANNELS_HEADER),
        )
    for kind, value in parse_attrs(replies[0]):
        if kind == ETHTOOL_A_CHANNELS_COMBINED_COUNT:
            return int(struct.unpack("=I", value[:4])[0])
    raise OSError(errno.EOPNOTSUPP, f"{interface} reports no combined channel count")


def channels_set(interface: str, combined: int) -> None:
    """ethtool -L IF combined N."""
    payload = _dev_header(interface, ETHTOOL_A_CHANNELS_HEADER) + attr(
        ETHTOOL_A_CHANNELS_COMBINED_COUNT, struct.pack("=I", combined)
    )
    with GenlSocket() as nl:
        nl.request(nl.family("ethtool"), ETHTOOL_MSG_CHANNELS_SET, payload)


def queue_get(ifindex: int, queue: int) -> dict[str, object]:
    """netdev queue-get for one RX queue: its NAPI ID and what is bound to it
    (``io_uring`` True when a zcrx ifq holds the queue)."""
    payload = (
        attr(NETDEV_A_QUEUE_IFINDEX, struct.pack("=I", ifindex))
        + attr(NETDEV_A_QUEUE_TYPE, struct.pack("=I", NETDEV_QUEUE_TYPE_RX))
        + attr(NETDEV_A_QUEUE_ID, struct.pack("=I", queue))
    )
    with GenlSocket() as nl:
        replies = nl.request(nl.family("netdev"), NETDEV_CMD_QUEUE_GET, payload)
    out: dict[str, object] = {"io_uring": False, "dmabuf": None, "napi_id": None}
    for kind, value in parse_attrs(replies[0]):
        if kind == NETDEV_A_QUEUE_IO_URING:
            out["io_uring"] = True
        elif kind == NETDEV_A_QUEUE_DMABUF:
            out["dmabuf"] = struct.unpack("=I", value[:4])[0]
        elif kind == NETDEV_A_QUEUE_NAPI_ID:
            out["napi_id"] = struct.unpack("=I", value[:4])[0]
    return out


def page_pools(ifindex: int) -> list[dict[str, object]]:
    """netdev page-pool-get (dump) for one interface: each pool's id, NAPI ID
    and whether io_uring's memory provider backs it."""
    with GenlSocket() as nl:
        replies = nl.request(nl.family("netdev"), NETDEV_CMD_PAGE_POOL_GET, b"", dump=True)
    pools = []
    for reply in replies:
        pool: dict[str, object] = {"io_uring": False, "napi_id": None, "ifindex": None}
        for kind, value in parse_attrs(reply):
            if kind == NETDEV_A_PAGE_POOL_IO_URING:
                pool["io_uring"] = True
            elif kind == NETDEV_A_PAGE_POOL_ID:
                pool["id"] = struct.unpack("=I", value[:4])[0]
            elif kind == NETDEV_A_PAGE_POOL_IFINDEX:
                pool["ifindex"] = struct.unpack("=I", value[:4])[0]
            elif kind == NETDEV_A_PAGE_POOL_NAPI_ID:
                pool["napi_id"] = struct.unpack("=I", value[:4])[0]
        if pool["ifindex"] == ifindex:
            pools.append(pool)
    return pools
