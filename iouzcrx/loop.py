"""Event loops that have ``create_zcrx_server``, without patching asyncio.

``new_event_loop()`` gives a uvloop loop when uvloop is installed (unless
``use_uvloop=False``), else asyncio's selector loop; ``run(main())`` and
``install()`` follow uvloop's shape. ``iouzcrx.create_zcrx_server(...)``
works on any running loop, these or not.
"""

from __future__ import annotations

import asyncio
import os
import select
import selectors
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from iouzcrx.reactor import close_loop_reactor
from iouzcrx.server import ZcrxServer, create_zcrx_server

__all__ = [
    "EventLoopPolicy",
    "SelectorEventLoop",
    "install",
    "new_event_loop",
    "run",
    "uvloop_available",
]

T = TypeVar("T")

try:
    import uvloop as _uvloop
except ImportError:  # pragma: no cover - uvloop is optional
    _uvloop = None  # type: ignore[assignment]


class ZcrxLoopMethods:
    """What iouzcrx adds to an event loop class."""

    # Its close() closes the loop's reactor (iouzcrx.reactor need not wrap it).
    closes_zcrx_reactor = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._zcrx_pid = os.getpid()

    async def create_zcrx_server(
        self, protocol_factory: Any, host: Any = None, port: int | None = None, **kwargs: Any
    ) -> ZcrxServer:
        """``loop.create_server`` with zero-copy receive; see
        :func:`iouzcrx.server.create_zcrx_server` for the options."""
        loop: asyncio.AbstractEventLoop = self  # type: ignore[assignment]
        return await create_zcrx_server(loop, protocol_factory, host, port, **kwargs)

    def close(self) -> None:
        # A refused close changes nothing: the reactor of a running loop stays.
        if self.is_running():  # type: ignore[attr-defined]
            raise RuntimeError("Cannot close a running event loop")
        # The ring must be closed while the loop can still drop its reader.
        close_loop_reactor(self)  # type: ignore[arg-type]
        if os.getpid() != self._zcrx_pid:
            self._close_in_forked_child()
        else:
            super().close()  # type: ignore[misc]

    def _close_in_forked_child(self) -> None:
        """Close a loop inherited through fork without touching the epoll
        instance it shares with the parent: every fd the loop unregisters
        there would stop the parent's loop from seeing it."""
        super().close()  # type: ignore[misc]


class SelectorEventLoop(ZcrxLoopMethods, asyncio.SelectorEventLoop):
    """asyncio's selector loop with ``create_zcrx_server``."""

    def run_forever(self) -> None:
        # Ctrl-C under asyncio.run (or iouzcrx.run) cancels the main task
        # from a Python-level handler, which runs only once this thread runs
        # Python code: a SIGINT that lands just before the selector blocks,
        # or on another thread, would wait for the next event, for ever on
        # an idle server. Signals written to the self-pipe (the wakeup fd,
        # as asyncio's proactor loop sets it) wake the selector instead.
        installed = (
            threading.current_thread() is threading.main_thread()
            and not self.is_closed()
            and _swap_wakeup_fd(-1, self._csock.fileno())  # type: ignore[attr-defined]
        )
        try:
            super().run_forever()
        finally:
            if installed:
                self._clear_wakeup_fd()

    def close(self) -> None:
        if not self.is_running():
            # Before the self-pipe goes: a signal must never be written to
            # its fd number once something else may have it.
            self._clear_wakeup_fd()
        super().close()

    def _clear_wakeup_fd(self) -> None:
        """Unset the wakeup fd if it is this loop's self-pipe."""
        csock = getattr(self, "_csock", None)
        if csock is not None and threading.current_thread() is threading.main_thread():
            _swap_wakeup_fd(csock.fileno(), -1)

    def _close_in_forked_child(self) -> None:
        selector = getattr(self, "_selector", None)
        if isinstance(selector, selectors.EpollSelector):
            # Unregistering (the self-pipe, at least) goes to a private epoll
            # instance; the shared one only loses this process's reference.
            selector._selector.close()  # type: ignore[attr-defined]
            selector._selector = select.epoll()  # type: ignore[attr-defined]
        super()._close_in_forked_child()


def _swap_wakeup_fd(expected: int, new: int) -> bool:
    """Make ``new`` the signal wakeup fd if it is ``expected`` (main thread
    only); a wakeup fd someone else set is left as it was."""
    try:
        current = signal.set_wakeup_fd(new, warn_on_full_buffer=False)
    except ValueError:  # not the main interpreter
        return False
    if current != expected:
        signal.set_wakeup_fd(current)
        return False
    return True


if _uvloop is not None:

    class UVLoop(ZcrxLoopMethods, _uvloop.Loop):  # type: ignore[misc]
        """uvloop's loop with ``create_zcrx_server``."""

        _zcrx_abandoned = False

        def _close_in_forked_child(self) -> None:
            # Closing libuv's handles deletes their fds from the epoll instance
            # shared with the parent (and libuv does not survive fork): the
            # child's copies go with the process instead.
            self._zcrx_abandoned = True

        def is_closed(self) -> bool:
            return self._zcrx_abandoned or super().is_closed()


def uvloop_available() -> bool:
    return _uvloop is not None


def new_event_loop(*, use_uvloop: bool | None = None) -> asyncio.AbstractEventLoop:
    """A new loop with ``create_zcrx_server``: uvloop's if installed and not
    refused (``use_uvloop=False``), else asyncio's selector loop."""
    if use_uvloop is None:
        use_uvloop = _uvloop is not None
    if use_uvloop:
        if _uvloop is None:
            raise RuntimeError("use_uvloop=True but uvloop is not installed (pip install uvloop)")
        return UVLoop()
    return SelectorEventLoop()


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """A policy whose loops have ``create_zcrx_server``."""

    def __init__(self, *, use_uvloop: bool | None = None) -> None:
        super().__init__()
        self._use_uvloop = use_uvloop

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        """A new loop with ``create_zcrx_server``, as ``iouzcrx.new_event_loop()``
        makes it."""
        return new_event_loop(use_uvloop=self._use_uvloop)


def install(*, use_uvloop: bool | None = None) -> None:
    """Make iouzcrx's loops the default for this process."""
    asyncio.set_event_loop_policy(EventLoopPolicy(use_uvloop=use_uvloop))


def run(
    main: Coroutine[Any, Any, T], *, debug: bool | None = None, use_uvloop: bool | None = None
) -> T:
    """``asyncio.run`` on a loop with ``create_zcrx_server``."""
    with asyncio.Runner(
        debug=debug, loop_factory=lambda: new_event_loop(use_uvloop=use_uvloop)
    ) as runner:
        return runner.run(main)
