"""Ethtool ring and channel settings (tcp-data-split, hds-thresh) and the
netdev family's queue-get and page-pool-get, for the NIC tests.

Debian bookworm's ethtool (6.1) cannot set tcp-data-split or hds-thresh, and
no tool there reads a queue's io_uring binding, so the tests speak netlink
themselves, over the library's generic netlink socket. Errors come back as
OSError with the kernel's extended-ack message.
"""

from __future__ import annotations

import errno

from iouzcrx._netlink import GenericNetlink, as_u32, attr, attrs, nested, u32

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


def _ask(family: str, cmd: int, payload: bytes, *, dump: bool = False) -> list[bytes]:
    with GenericNetlink(timeout=5.0) as nl:
        return nl.request(nl.family(family), cmd, payload, dump=dump)


def _dev_header(interface: str, kind: int = ETHTOOL_A_RINGS_HEADER) -> bytes:
    name = attr(ETHTOOL_A_HEADER_DEV_NAME, interface.encode() + b"\0")
    return nested(kind, name)


def rings_get(interface: str) -> dict[str, object]:
    """ethtool -g, the parts zcrx cares about."""
    replies = _ask("ethtool", ETHTOOL_MSG_RINGS_GET, _dev_header(interface))
    out: dict[str, object] = {}
    for kind, value in attrs(replies[0]):
        if kind == ETHTOOL_A_RINGS_TCP_DATA_SPLIT:
            out["tcp_data_split"] = TCP_DATA_SPLIT.get(value[0], str(value[0]))
        elif kind == ETHTOOL_A_RINGS_HDS_THRESH:
            out["hds_thresh"] = as_u32(value)
        elif kind == ETHTOOL_A_RINGS_HDS_THRESH_MAX:
            out["hds_thresh_max"] = as_u32(value)
        elif kind == ETHTOOL_A_RINGS_RX:
            out["rx"] = as_u32(value)
    return out


def rings_set(
    interface: str, *, tcp_data_split: bool | None = None, hds_thresh: int | None = None
) -> None:
    """ethtool -G IF tcp-data-split on|off hds-thresh N."""
    parts = [_dev_header(interface)]
    if tcp_data_split is not None:
        parts.append(attr(ETHTOOL_A_RINGS_TCP_DATA_SPLIT, bytes([2 if tcp_data_split else 1])))
    if hds_thresh is not None:
        parts.append(attr(ETHTOOL_A_RINGS_HDS_THRESH, u32(hds_thresh)))
    _ask("ethtool", ETHTOOL_MSG_RINGS_SET, b"".join(parts))


def channels_get(interface: str) -> int:
    """ethtool -l: the combined channel count."""
    replies = _ask(
        "ethtool", ETHTOOL_MSG_CHANNELS_GET, _dev_header(interface, ETHTOOL_A_CHANNELS_HEADER)
    )
    for kind, value in attrs(replies[0]):
        if kind == ETHTOOL_A_CHANNELS_COMBINED_COUNT:
            return as_u32(value)
    raise OSError(errno.EOPNOTSUPP, f"{interface} reports no combined channel count")


def channels_set(interface: str, combined: int) -> None:
    """ethtool -L IF combined N."""
    payload = _dev_header(interface, ETHTOOL_A_CHANNELS_HEADER) + attr(
        ETHTOOL_A_CHANNELS_COMBINED_COUNT, u32(combined)
    )
    _ask("ethtool", ETHTOOL_MSG_CHANNELS_SET, payload)


def queue_get(ifindex: int, queue: int) -> dict[str, object]:
    """netdev queue-get for one RX queue: its NAPI ID and what is bound to it
    (``io_uring`` True when a zcrx ifq holds the queue)."""
    payload = (
        attr(NETDEV_A_QUEUE_IFINDEX, u32(ifindex))
        + attr(NETDEV_A_QUEUE_TYPE, u32(NETDEV_QUEUE_TYPE_RX))
        + attr(NETDEV_A_QUEUE_ID, u32(queue))
    )
    replies = _ask("netdev", NETDEV_CMD_QUEUE_GET, payload)
    out: dict[str, object] = {"io_uring": False, "dmabuf": None, "napi_id": None}
    for kind, value in attrs(replies[0]):
        if kind == NETDEV_A_QUEUE_IO_URING:
            out["io_uring"] = True
        elif kind == NETDEV_A_QUEUE_DMABUF:
            out["dmabuf"] = as_u32(value)
        elif kind == NETDEV_A_QUEUE_NAPI_ID:
            out["napi_id"] = as_u32(value)
    return out


def page_pools(ifindex: int) -> list[dict[str, object]]:
    """netdev page-pool-get (dump) for one interface: each pool's id, NAPI ID
    and whether io_uring's memory provider backs it."""
    replies = _ask("netdev", NETDEV_CMD_PAGE_POOL_GET, b"", dump=True)
    pools = []
    for reply in replies:
        pool: dict[str, object] = {"io_uring": False, "napi_id": None, "ifindex": None}
        for kind, value in attrs(reply):
            if kind == NETDEV_A_PAGE_POOL_IO_URING:
                pool["io_uring"] = True
            elif kind == NETDEV_A_PAGE_POOL_ID:
                pool["id"] = as_u32(value)
            elif kind == NETDEV_A_PAGE_POOL_IFINDEX:
                pool["ifindex"] = as_u32(value)
            elif kind == NETDEV_A_PAGE_POOL_NAPI_ID:
                pool["napi_id"] = as_u32(value)
        if pool["ifindex"] == ifindex:
            pools.append(pool)
    return pools
