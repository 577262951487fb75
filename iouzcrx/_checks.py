"""Checks of the arguments the engine takes from Python, in one place, so that
every refusal names the parameter and the value and says what would do.

They run before any C conversion: a C-typed parameter would refuse a bad
value with an error that names neither.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
import socket
import stat
from collections.abc import Callable
from typing import Any

from iouzcrx.errors import InvalidConfiguration

__all__ = [
    "AcceptedSocket",
    "byte_buffer",
    "integer",
    "size",
    "timeout",
    "callback",
    "stream_socket_fd",
]

SIZE_MAX = (1 << 64) - 1
PAGE_SIZE = 4096
# Buffer lengths travel in 32-bit fields (the buffer ring's len, a CQE's res).
MAX_BUFFER_SIZE = (1 << 32) - PAGE_SIZE


def integer(name: str, value: Any, low: int, high: int | None, what: str = "an integer") -> int:
    """``value`` as an int in ``low..high`` (``high`` None: no upper bound).
    TypeError for anything that is not an integer (bool and float included:
    no silent truncation), InvalidConfiguration (a ValueError) out of range."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {what}, not {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {what}, not {value!r}") from None
    if number < low or (high is not None and number > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise InvalidConfiguration(f"{name} must be {what} {bounds}, not {number}")
    return number


def byte_buffer(data: Any) -> bytes | bytearray | memoryview:
    """``data`` as a transport's write() sends it: a buffer whose ``len``
    counts its bytes. Anything but bytes, bytearray or memoryview is refused,
    as by asyncio's transports (``bytes(3)`` would send three NULs); a view
    of wider items, of several dimensions or with gaps becomes its bytes, in
    order."""
    if isinstance(data, (bytes, bytearray)):
        return data
    if not isinstance(data, memoryview):
        raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
    if data.itemsize == 1 and data.ndim == 1 and data.c_contiguous:
        return data
    return data.cast("B") if data.c_contiguous and data.ndim else data.tobytes()


def size(name: str, value: Any, unit: int, high: int = SIZE_MAX) -> int:
    """A byte count: a positive multiple of ``unit`` no larger than ``high``."""
    what = f"a positive multiple of {unit}"
    number = integer(name, value, -(1 << 1024), None, what)
    if number < unit or number % unit or number > high:
        raise InvalidConfiguration(
            f"{name} must be {what} (at most {high - high % unit}), not {number}"
        )
    return number


def timeout(value: Any) -> float | None:
    """Seconds as a float, or None for no limit.  Only real numbers (no
    strings: asyncio and threading take none); NaN and negative values are
    refused rather than meaning 'forever' or 'now'; +inf waits for ever."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds or None, not {value!r}")
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"timeout must be a non-negative number of seconds or None, not {value!r}")
    return seconds


def callback(name: str, value: object) -> Callable[..., object] | None:
    """None or a callable, checked when it is given rather than when the
    first completion calls it."""
    if value is None:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be callable or None, not {value!r}")
    return value


class AcceptedSocket(socket.socket):
    """A connection the library's own accept returned (a server's ring
    accept), made with the listener's family, type and protocol.

    It is a connected TCP stream socket for as long as its fd is open: a
    connected socket never turns into a listening one nor changes type. So
    ``stream_socket_fd`` asks the kernel nothing about it, which spares
    every accepted connection six system calls. Sockets a program passes
    in are plain ``socket.socket`` objects and are always checked.

    ``on_release(closing)``, when set, is called once before the fd is
    closed (``closing`` True) or detached: a transport whose ring or loop
    may still name the fd lets go of it there, while the number still names
    this connection. Off the loop's thread it cannot, and returns True: the
    loop closes the fd (``close_now``) once it let go of it, and a
    ``detach()`` there hands the program a duplicate of the fd."""

    __slots__ = ("on_release", "_left_to_loop")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_release: Callable[[bool], bool] | None = None
        # The hook handed the fd to the loop, which closes it (close_now):
        # until then no close or detach of this object may free the number.
        self._left_to_loop = False

    def _released(self, closing: bool) -> bool:
        hook, self.on_release = self.on_release, None
        return hook is not None and hook(closing)

    def _real_close(self, *args: Any) -> None:
        # Every close ends here (close(), a makefile's last close, __exit__).
        if self._left_to_loop:
            return
        try:
            left = self._released(True)
        except BaseException:
            super()._real_close(*args)  # type: ignore[misc]
            raise
        if left:
            self._left_to_loop = True
        else:
            super()._real_close(*args)  # type: ignore[misc]

    def close_now(self) -> None:
        """Close the fd, whatever the hook would say."""
        self._left_to_loop = False
        super()._real_close()  # type: ignore[misc]

    def detach(self) -> int:
        if self._left_to_loop:
            self._closed = True
            return -1  # closed already: the loop closes the fd
        if self.on_release is None:
            return super().detach()
        # Off the loop's thread the loop still names the number until it let
        # go of it, and then closes it: the program gets a number of its own
        # for the socket, made first, as the loop may close the number as
        # soon as the hook handed it over.
        fd = os.dup(self.fileno())
        try:
            left = self._released(False)
        except BaseException:
            os.close(fd)
            raise
        if not left:
            os.close(fd)
            return super().detach()
        self._left_to_loop = True
        self._closed = True
        return fd


def stream_socket_fd(name: str, sock: Any) -> int:
    """The fd of ``sock`` (a socket object or an int fd), which must be an
    open, connected stream socket: a receive on anything else would fail at
    its first completion, or never complete at all (a listening socket)."""
    if type(sock) is AcceptedSocket:
        fd: int = sock.fileno()
        if fd >= 0:
            return fd
        # Closed (or detached): the checks below say so.
    if isinstance(sock, bool) or not (isinstance(sock, int) or hasattr(sock, "fileno")):
        raise TypeError(f"{name} must be a connected socket or its fd, not {sock!r}")
    try:
        fd = sock if isinstance(sock, int) else sock.fileno()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name} {sock!r} is closed ({exc})") from None
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"{name}.fileno() must return an int, not {fd!r}")
    if not 0 <= fd < 1 << 31:
        raise ValueError(f"{name} {sock!r} is not an open file descriptor (fd={fd}, closed?)")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ValueError(
            f"{name} {sock!r} is not an open file descriptor (fd {fd}: {exc.strerror})"
        ) from None
    if not stat.S_ISSOCK(mode):
        raise TypeError(f"{name} {sock!r} is not a socket (fd {fd} is a file or device)")
    # A socket object built over the fd only to ask; detach() leaves it open.
    try:
        probe = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"{name} {sock!r} is not a usable socket ({exc})") from None
    try:
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if kind != socket.SOCK_STREAM:
            raise ValueError(
                f"{name} {sock!r} must be a stream (TCP) socket, not "
                f"{'SOCK_DGRAM (UDP)' if kind == socket.SOCK_DGRAM else f'type {kind}'}"
            )
        if probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(
                f"{name} {sock!r} is a listening socket: receive on the sockets "
                "accept() returns instead"
            )
        # Not connected (yet, or any more: reset by its peer) is the kernel's
        # to report, as the receive's error: a transport resuming on a socket
        # its peer just reset must see that, not a refusal here.
    finally:
        probe.detach()
    return fd
