"""A generic netlink socket: request framing, answers, the kernel's error
text, and family ids by name. ``iouzcrx.netdev`` speaks the netdev family
over it; the NIC tests speak ethtool's.

Pure Python over AF_NETLINK, one exchange at a time: threads sharing a
socket take turns, and a forked child may only close its copy.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator

# linux/netlink.h, linux/genetlink.h
NETLINK_GENERIC = 16
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10
_NETLINK_EXT_ACK = 11
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_DUMP = 0x300
_NLM_F_CAPPED = 0x100  # on an error: only the request's header is echoed
_NLM_F_ACK_TLVS = 0x200  # on an error: extended-ack attributes follow
_NLA_F_NESTED = 0x8000
_NLA_TYPE_MASK = 0x3FFF
_NLMSGERR_ATTR_MSG = 1
_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_ID = 1
_CTRL_ATTR_FAMILY_NAME = 2

_HEADER = struct.Struct("=IHHII")  # nlmsghdr
_GENL = struct.Struct("=BBH")  # genlmsghdr
_ATTR = struct.Struct("=HH")  # nlattr

# Netlink's limit on one dump message is a page or 8 KiB; 64 KiB covers any.
_RECV_SIZE = 65536


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to netlink's 4-byte alignment."""
    data = _ATTR.pack(_ATTR.size + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | _NLA_F_NESTED, b"".join(attrs))


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of each attribute in ``data``; a truncated tail ends
    the walk, keeping what was read."""
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > len(data):
            return
        yield kind & _NLA_TYPE_MASK, data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3


def as_u32(payload: bytes) -> int:
    return int(struct.unpack_from("=I", payload)[0]) if len(payload) >= 4 else 0


class GenericNetlink:
    """One generic netlink socket. ``close()`` may be called any number of
    times, from any thread, and in a forked child."""

    def __init__(self, timeout: float | None = None) -> None:
        self._sock: socket.socket | None = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC
        )
        self._pid = os.getpid()
        self._seq = 0
        self._lock = threading.Lock()
        self._families: dict[str, int] = {}
        try:
            self._sock.settimeout(timeout)
            # Errors then echo only the request's header, and carry the
            # kernel's own text (kernels before 4.12 lack both: no matter).
            for option in (_NETLINK_CAP_ACK, _NETLINK_EXT_ACK):
                try:
                    self._sock.setsockopt(_SOL_NETLINK, option, 1)
                except OSError:
                    pass
            self._sock.bind((0, 0))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if os.getpid() != self._pid:
            # A forked child: the lock may be a copy of one a parent thread
            # held at the fork, never to be released here. Only this
            # process's copy of the socket goes; no thread of ours uses it.
            sock, self._sock = self._sock, None
        else:
            with self._lock:
                sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __enter__(self) -> GenericNetlink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def request(self, family: int, cmd: int, payload: bytes, *, dump: bool = False) -> list[bytes]:
        """Send one request; the payloads (after the genl header) of every
        answer up to the ack or the end of the dump. A kernel error is an
        OSError with the kernel's text."""
        if os.getpid() != self._pid:
            # A forked child shares the socket (answers would go to either)
            # and maybe a lock some parent thread held at the fork.
            raise RuntimeError(
                f"a {type(self).__name__} cannot be used across fork(); make a new one"
            )
        flags = _NLM_F_REQUEST | (_NLM_F_DUMP if dump else _NLM_F_ACK)
        with self._lock:
            return self._exchange(family, cmd, flags, payload)

    def _exchange(self, family: int, cmd: int, flags: int, payload: bytes) -> list[bytes]:
        sock = self._sock
        if sock is None:
            raise ValueError("the netlink socket is closed")
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        body = _GENL.pack(cmd, 1, 0) + payload
        sock.send(_HEADER.pack(_HEADER.size + len(body), family, flags, seq, 0) + body)
        answers: list[bytes] = []
        while True:
            data = sock.recv(_RECV_SIZE)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, answer_flags, got_seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise OSError(errno.EPROTO, "malformed netlink answer")
                message = data[offset + _HEADER.size : offset + length]
                offset += (length + 3) & ~3
                if got_seq != seq:
                    continue  # the tail of an earlier, abandoned request
                if kind == _NLMSG_ERROR or kind == _NLMSG_DONE:
                    code = struct.unpack_from("=i", message)[0] if len(message) >= 4 else 0
                    if code < 0:
                        raise _kernel_error(-code, answer_flags, message)
                    return answers
                answers.append(message[_GENL.size :])

    def family(self, name: str) -> int:
        """The id of generic netlink family ``name``; OSError(ENOENT) when
        the kernel has none by that name."""
        if name not in self._families:
            answers = self.request(
                _GENL_ID_CTRL,
                _CTRL_CMD_GETFAMILY,
                attr(_CTRL_ATTR_FAMILY_NAME, name.encode() + b"\0"),
            )
            for payload in answers:
                for kind, value in attrs(payload):
                    if kind == _CTRL_ATTR_FAMILY_ID and len(value) >= 2:
                        self._families[name] = int(struct.unpack_from("=H", value)[0])
            if name not in self._families:
                raise OSError(errno.EPROTO, f"no id in the answer for family {name!r}")
        return self._families[name]


def _kernel_error(code: int, flags: int, message: bytes) -> OSError:
    # The error code, the echoed request (its header alone when capped),
    # then the extended ack's attributes when the kernel sent any.
    text = ""
    if flags & _NLM_F_ACK_TLVS and len(message) >= 4 + _HEADER.size:
        echoed = _HEADER.size if flags & _NLM_F_CAPPED else _HEADER.unpack_from(message, 4)[0]
        for kind, value in attrs(message[4 + ((echoed + 3) & ~3) :]):
            if kind == _NLMSGERR_ATTR_MSG:
                text = value.rstrip(b"\0").decode(errors="replace")
    detail = f": {text}" if text else ""
    return OSError(code, f"netlink: {os.strerror(code)}{detail}")
