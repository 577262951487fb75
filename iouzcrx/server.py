"""``create_zcrx_server``: an asyncio server whose connections receive through
zero-copy receive (or the best fallback the machine allows)."""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import numbers
import os
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

from iouzcrx._receive import AcceptedFd
from iouzcrx._transport import Acceptor
from iouzcrx.errors import InvalidConfiguration
from iouzcrx.modes import (
    DEFAULT_AREA_SIZE,
    DEFAULT_BUFFER_SIZE,
    ModeSelection,
    check_queues,
    select_mode,
)
from iouzcrx.netdev import QueueRouter
from iouzcrx.reactor import Reactor
from iouzcrx.socket_transport import AreaReadingProtocol, RefusedConnection
from iouzcrx.transport import ZcrxTransport, owned_fd

__all__ = ["MAX_WORKERS", "ZcrxServer", "attach_connection", "check_workers", "create_zcrx_server"]

log = logging.getLogger("iouzcrx")

# Accept errors that mean "out of resources for now": retry after a pause,
# as asyncio's own accept loop does.
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_ACCEPT_RETRY_DELAY = 1.0

ProtocolFactory = Callable[[], asyncio.BaseProtocol]

# asyncio's Server.wait_closed() waits for the open connections only since
# 3.12.1; before, once close() had been called it returned at once. The server
# does what asyncio does on the running Python, so that code written for either
# behaves the same on either server.
_WAIT_CLOSED_WAITS_FOR_CONNECTIONS = sys.version_info >= (3, 12, 1)


class ZcrxServer(asyncio.AbstractServer):
    """Listening sockets plus the receive backend their connections share.

    ``mode`` is the receive mode in use and ``refused`` maps each better mode
    to the reason it could not be used. Made by ``create_zcrx_server`` (or
    ``loop.create_zcrx_server``, ``start_server``), not constructed directly;
    an ``asyncio.AbstractServer`` and an async context manager that closes
    the server and waits for its connections on exit.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reactor: Reactor,
        protocol_factory: ProtocolFactory,
        sockets: list[socket.socket],
        selection: ModeSelection,
        backlog: int = 100,
    ) -> None:
        self._loop = loop
        self._reactor = reactor
        self._protocol_factory = protocol_factory
        self._sockets: list[socket.socket] | None = sockets
        self._selection = selection
        self._serving = False
        self._closed = False
        self._accepts: dict[socket.socket, Any] = {}
        # Each listening socket's accept completion (it counts the accept
        # errors in a row).
        self._acceptors: dict[socket.socket, Acceptor] = {}
        self._connections: set[Any] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._serving_forever: asyncio.Future[None] | None = None
        self._backlog = backlog
        self._loop_servers: list[asyncio.AbstractServer] = []  # socket mode
        self._backend_released = False
        # The parameters a later server must ask for to take this one's
        # zcrx queue once it is idle (see _release_backend).
        self._reuse_key: tuple[Any, ...] | None = None
        # Many queues (queues=, zerocopy mode): each RX queue's selection
        # and reuse key, the router that finds a connection's RX queue, and
        # what it decided.
        self._routes: dict[int, tuple[ModeSelection, tuple[Any, ...]]] = {}
        self._queue_router: QueueRouter | None = None
        self._routed: dict[int, int] = {}
        self._unrouted = 0
        # Called with each connection the ring accepted; True when it took
        # the socket (a supervised worker handing it to the worker that
        # owns its RX queue).
        self._steer_callable: Callable[[socket.socket], bool] | None = None
        if self.mode == "socket":
            selection.backend.on_available = functools.partial(
                loop.call_soon_threadsafe, self._resume_starved
            )

    def __repr__(self) -> str:
        return f"<ZcrxServer mode={self.mode} sockets={self.sockets!r}>"

    # -- facts -------------------------------------------------------------------

    @property
    def mode(self) -> str:
        """The receive mode in use: ``"zerocopy"``, ``"copy"``, ``"bufring"`` or
        ``"socket"``."""
        return self._selection.mode

    @property
    def refused(self) -> dict[str, str]:
        """Better modes that were tried and why each could not be used."""
        return dict(self._selection.refused)

    @property
    def backend(self) -> Any:
        """The receive queue (or socket-mode buffer pool) of the connections."""
        return self._selection.backend

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets; empty once the server is closed."""
        return tuple(self._sockets or ())

    @property
    def queues(self) -> tuple[int, ...]:
        """The RX queues with a zcrx queue of this server (zerocopy mode);
        empty in the other modes."""
        if self._routes:
            return tuple(self._routes)
        queue = getattr(self._selection.backend, "queue", None)
        return (queue,) if self.mode == "zerocopy" and queue is not None else ()

    def stats(self) -> dict[str, Any]:
        """What the server did: ``mode``, ``connections`` (open now),
        ``backend`` (the first receive queue's own stats) and, for many
        queues, ``queues`` (RX queue → its zcrx queue's stats plus
        ``connections_routed``) and ``unrouted_connections``: connections
        whose packets arrive on no queue of this server (another queue,
        another device, loopback). Those are served by the first queue, the
        kernel copying their data into its area.

        ``zero_copy`` sums what shows whether zero copy happens, from the
        kernel's own zcrx counters (Linux 7.2+): ``bytes_received``,
        ``copied_bytes`` (what the kernel copied into the areas) and
        ``zero_copy_share``; without those counters ``kernel_stats`` is false
        and ``kernel_stats_missing`` says why. Each queue's stats carry the
        same per queue (``copied_bytes``, ``copies``,
        ``zero_copy_share``, ``copy_events``, ``alloc_fail_events``). The
        kernel does not say which completion was a copy, so a connection has
        its bytes and chunks, not a copy share of its own."""
        backend_stats = getattr(self._selection.backend, "stats", None)
        queues: dict[int, dict[str, Any]] = {}
        for queue, (selection, _key) in self._routes.items():
            queue_stats = dict(selection.backend.stats())
            queue_stats["connections_routed"] = self._routed.get(queue, 0)
            queues[queue] = queue_stats
        backend = backend_stats() if backend_stats is not None else {}
        return {
            "mode": self.mode,
            "connections": len(self._connections),
            "backend": backend,
            "queues": queues,
            "zero_copy": self._zero_copy_summary(backend, queues),
            "unrouted_connections": self._unrouted,
            "routing_error": None
            if self._router is None or self._router.error is None
            else str(self._router.error),
        }

    def _zero_copy_summary(
        self, backend: dict[str, Any], queues: dict[int, dict[str, Any]]
    ) -> dict[str, Any]:
        """How much of what the server received the NIC wrote into the area
        itself, over all its queues, from the kernel's own counters."""
        every = list(queues.values()) or [backend]
        received = sum(stats.get("bytes", 0) for stats in every)
        copied: int | None = None
        share: float | None = None
        if self.mode not in ("zerocopy", "copy"):
            missing: str | None = (
                f"{self.mode} mode has no zcrx queue: the kernel copies every byte"
            )
            share = 0.0
        else:
            missing = next(
                (s["kernel_stats_missing"] for s in every if not s.get("kernel_stats")), None
            )
            if missing is None:
                copied = sum(stats["copied_bytes"] for stats in every)
                share = max(received - copied, 0) / received if received else None
        return {
            "kernel_stats": missing is None,
            "kernel_stats_missing": missing,
            "bytes_received": received,
            "copied_bytes": copied,
            "zero_copy_share": share,
        }

    def get_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on."""
        return self._loop

    def is_serving(self) -> bool:
        """Whether the server accepts new connections."""
        return self._serving

    # -- accepting -----------------------------------------------------------------

    async def start_serving(self) -> None:
        """Start accepting connections (for a server made with
        ``start_serving=False``)."""
        await self._start_serving()
        await asyncio.sleep(0)

    async def _start_serving(self) -> None:
        if self._serving or self._closed:
            return
        self._serving = True
        for sock in self.sockets:
            if self.mode == "socket":
                # The loop accepts, natively: connections reach the area
                # reader with no Python of ours before connection_made.
                loop_server = await self._loop.create_server(
                    self._socket_mode_protocol, sock=sock, backlog=self._backlog
                )
                self._loop_servers.append(loop_server)
                if self._closed:  # close() ran while the loop set it up
                    loop_server.close()
                    return
            else:
                # As asyncio does for sock=: a bound socket that is not yet
                # listening would fail every accept with EINVAL.
                sock.listen(self._backlog)
                self._arm_accept(sock)

    def _socket_mode_protocol(self) -> asyncio.BaseProtocol:
        try:
            reader = AreaReadingProtocol(
                self._selection.backend, self._protocol_factory(), on_closed=self._detach
            )
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            # The loop would drop the accepted socket silently: have it made a
            # transport and closed at once instead.
            self._report_refused_connection(exc)
            return RefusedConnection()
        self._connections.add(reader)
        return reader

    def _arm_accept(self, sock: socket.socket) -> None:
        if not self._serving:
            return
        ring = self._reactor.ring
        assert ring is not None
        acceptor = self._acceptors.get(sock)
        if acceptor is None:
            acceptor = self._acceptors[sock] = Acceptor(
                self,
                sock,
                self._reactor,
                self._selection.backend,
                self._protocol_factory,
                self._connections,
                ZcrxTransport,
            )
        acceptor.direct = self._serves_in_c()
        # On the reactor's ring without DEFER_TASKRUN: the kernel accepts and
        # posts the completion itself, with no work for a socket hint to run.
        self._accepts[sock] = ring.accept(sock, multishot=True, callback=acceptor)
        self._reactor.schedule()

    # The router and the steer are properties so that the accept completions
    # learn of them whenever they are set: until one is, each connection is
    # served in C (Acceptor.direct).

    @property
    def _router(self) -> QueueRouter | None:
        """Finds the RX queue of a connection (many queues), or None."""
        return self._queue_router

    @_router.setter
    def _router(self, router: QueueRouter | None) -> None:
        self._queue_router = router
        self._tell_acceptors()

    @property
    def _steer(self) -> Callable[[socket.socket], bool] | None:
        """Sees each connection the ring accepts first, and is true when it
        took the socket (a worker handing it to its queue's owner), or None."""
        return self._steer_callable

    @_steer.setter
    def _steer(self, steer: Callable[[socket.socket], bool] | None) -> None:
        self._steer_callable = steer
        self._tell_acceptors()

    def _serves_in_c(self) -> bool:
        return self._steer_callable is None and self._queue_router is None

    def _tell_acceptors(self) -> None:
        for acceptor in self._acceptors.values():
            acceptor.direct = self._serves_in_c()

    def _accept_ended(self, acceptor: Acceptor, res: int) -> None:
        """The last completion of ``acceptor``'s multishot accept."""
        sock = acceptor.listener
        self._accepts.pop(sock, None)
        if self._closed:
            sock.close()
            return
        if not self._serving or res == -errno.ECANCELED:
            return
        if res >= 0:
            self._arm_accept(sock)  # a full CQ ended the multishot
            return
        acceptor.failures += 1
        if acceptor.failures == 1 and -res not in _ACCEPT_RETRY_ERRNOS:
            self._arm_accept(sock)  # most likely one connection's error: go on at once
            return
        # Out of resources, or an error of the listener itself that a new
        # accept would meet again at once: re-arming now would spin the loop.
        log.error(
            "iouzcrx: accept failed (%s): %s; retrying in %.1f s",
            errno.errorcode.get(-res, -res),
            os.strerror(-res),
            _ACCEPT_RETRY_DELAY,
        )
        self._loop.call_later(_ACCEPT_RETRY_DELAY, self._arm_accept, sock)

    def _new_connection(
        self,
        conn: socket.socket | AcceptedFd,
        *,
        steerable: bool = True,
        tcp: bool | None = None,
        accepted: bool = False,
    ) -> None:
        """Serve ``conn``, accepted non-blocking by the ring (or handed over
        by another worker: not ``steerable``); it is closed here if it
        cannot be served. ``tcp``: whether it is a TCP socket, when the
        caller knows. ``accepted``: called from the completion of the ring's
        accept, which starts the connection at once
        (``ZcrxTransport.start_accepted``)."""
        try:
            if tcp is None:
                tcp = conn.family in (socket.AF_INET, socket.AF_INET6)
            if tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if steerable and self._steer is not None and self._steer(_socket_of(conn)):
                return
            selection = self._selection if self._router is None else self._route(_socket_of(conn))
            protocol = self._protocol_factory()
            if selection.mode == "socket":  # a socket handed over by another worker
                connection = attach_connection(
                    self._reactor, selection, _socket_of(conn), protocol, self._detach
                )
            else:
                if isinstance(conn, socket.socket):
                    conn = owned_fd(conn)  # closed below on failure
                connection = ZcrxTransport(
                    self._reactor,
                    selection.backend,
                    conn,
                    protocol,
                    on_closed=self._detach,
                    start=not accepted,
                )
        except (SystemExit, KeyboardInterrupt):
            conn.close()
            raise
        except BaseException as exc:
            conn.close()
            self._report_refused_connection(exc)
            return
        self._connections.add(connection)
        if accepted and type(connection) is ZcrxTransport:
            connection.start_accepted()

    def _route(self, conn: socket.socket) -> ModeSelection:
        """The selection (zcrx queue) whose RX queue ``conn`` arrives on; the
        first queue's when it arrives on none of ours."""
        if self._router is None:
            return self._selection
        queue, _napi_id = self._router.route(conn)
        if queue is None or queue not in self._routes:
            self._unrouted += 1
            return self._selection
        self._routed[queue] = self._routed.get(queue, 0) + 1
        return self._routes[queue][0]

    def _report_refused_connection(self, exc: BaseException) -> None:
        self._loop.call_exception_handler(
            {
                "message": "the server's protocol factory failed or made an unusable "
                "protocol; the connection was closed",
                "exception": exc,
                "server": self,
            }
        )

    def _resume_starved(self) -> None:
        for connection in list(self._connections):
            if isinstance(connection, AreaReadingProtocol):
                connection.on_buffers_available()

    def _detach(self, connection: Any) -> None:
        self._connections.discard(connection)
        if self._closed:  # else nobody waits for the last connection
            self._wake_waiters()

    # -- closing ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting and close the listening sockets; open connections
        stay (close_clients() / abort_clients() end them).

        From another thread than the loop's, the close is handed to the loop.
        A listening socket with an accept in the ring is closed when the
        accept's cancellation completes: the kernel looks its fd up when it
        takes the request, and the number must not name another file by
        then. In a forked child only the child's copies close: the listener
        and its accept are the parent's."""
        if self._closed or self._reactor.handed_to_owner(self.close):
            return
        self._closed = True
        self._serving = False
        # Each accept still in the ring keeps its acceptor (and through it
        # this server) until its last completion; the server holds none.
        for acceptor in self._acceptors.values():
            acceptor.closed = True
        self._acceptors.clear()
        for connection in self._connections:
            if type(connection) is ZcrxTransport:
                connection._core.replace_on_closed(self._detach)
        for loop_server in self._loop_servers:
            loop_server.close()
        inherited = self._reactor.inherited
        ring = self._reactor.ring
        for sock in self.sockets:
            accept = self._accepts.pop(sock, None)
            if inherited:
                sock.close()
                continue
            if self.mode != "socket":
                _stop_listening(sock)
            if accept is None or accept.done or ring is None or ring.closed:
                sock.close()  # no accept names it any more
            else:
                accept.cancel()  # its last completion closes the socket
        if not inherited:
            self._reactor.schedule()
        self._sockets = None
        if self._serving_forever is not None and not self._serving_forever.done():
            self._serving_forever.cancel()
        self._wake_waiters()

    def close_clients(self) -> None:
        """Close every open connection, after its pending writes."""
        for connection in list(self._connections):
            _transport_of(connection).close()

    def abort_clients(self) -> None:
        """Close every open connection at once, dropping pending writes."""
        for connection in list(self._connections):
            _transport_of(connection).abort()

    def _wake_waiters(self) -> None:
        if not self._closed or self._connections:
            return
        self._release_backend()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _release_backend(self) -> None:
        """Give the receive memory back once the server is closed and its last
        connection ended (views still out keep their buffers readable)."""
        if self._backend_released:
            return
        self._backend_released = True
        backend = self._selection.backend
        if self.mode == "socket":
            # Its only reference from the loop; the pool goes with the server.
            backend.on_available = None
            return
        if self._reactor.inherited:
            return  # a forked child: the queue is registered on the parent's ring
        if self.mode in ("copy", "zerocopy"):
            # The kernel frees an ifq only with its ring: the loop's next
            # server with the same parameters takes this one.
            if self._routes:
                for selection, key in self._routes.values():
                    self._reactor.park_idle_queue(key, selection)
                return
            self._reactor.park_idle_queue(self._reuse_key, self._selection)
            return
        close = getattr(backend, "close", None)
        if close is not None:
            close()

    async def wait_closed(self) -> None:
        """Wait until the server is closed and every connection has ended.

        As asyncio's before Python 3.12.1, it returns at once there when
        close() was already called, connections or not."""
        if self._closed and (not self._connections or not _WAIT_CLOSED_WAITS_FOR_CONNECTIONS):
            return
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    async def serve_forever(self) -> None:
        """Accept connections until cancelled; cancelling closes the server and
        waits for its connections to end."""
        if self._serving_forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._closed:
            raise RuntimeError(f"server {self!r} is closed")
        await self._start_serving()
        self._serving_forever = self._loop.create_future()
        try:
            await self._serving_forever
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever = None

    async def __aenter__(self) -> ZcrxServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


def attach_connection(
    reactor: Reactor,
    selection: ModeSelection,
    conn: socket.socket,
    protocol: asyncio.BaseProtocol,
    on_closed: Callable[[Any], None] | None = None,
    waiter: asyncio.Future[None] | None = None,
) -> Any:
    """Serve the connected socket ``conn`` with ``protocol`` in the selected
    mode; returns the connection's handle (transport, or socket-mode reader).
    ``waiter`` is resolved once the protocol got connection_made(). ``conn``
    belongs to the connection from here on: if this raises (a protocol that
    cannot take data, say), it is closed."""
    held: socket.socket | AcceptedFd = conn  # closed below on failure
    try:
        if selection.mode != "socket":
            held = owned_fd(conn)
            return ZcrxTransport(
                reactor, selection.backend, held, protocol, on_closed=on_closed, waiter=waiter
            )
        reader = AreaReadingProtocol(selection.backend, protocol, on_closed=on_closed)
    except BaseException:
        held.close()  # never left to the GC
        raise
    loop = reactor.loop

    async def connect() -> None:
        try:
            await loop.connect_accepted_socket(lambda: reader, conn)
        except BaseException as exc:
            if on_closed is not None:
                on_closed(reader)
            conn.close()
            if waiter is not None and not waiter.done():
                waiter.set_exception(exc)
            else:
                loop.call_exception_handler(
                    {"message": "socket-mode connection set-up failed", "exception": exc}
                )
            return
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    loop.create_task(connect())
    return reader


def _socket_of(conn: socket.socket | AcceptedFd) -> socket.socket:
    """The socket object of a connection, made now if it is an accepted fd
    (which then acts through it)."""
    return conn.socket() if type(conn) is AcceptedFd else conn  # type: ignore[return-value]


def _stop_listening(sock: socket.socket) -> None:
    """Make the port refuse connections now. The ring's accept holds the
    socket until its cancellation completes, so closing the fd alone would
    leave it listening (and accepting, only to reset) until the next drain."""
    try:
        sock.shutdown(socket.SHUT_RD)  # on a listener: stop listening, reset the backlog
    except OSError:
        pass  # never listened, or already shut down: nothing listens


# More worker processes than this is a typo, not a deployment.
MAX_WORKERS = 1024


def check_workers(workers: Any) -> int:
    """The number of worker processes, 1 to MAX_WORKERS."""
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral):
        raise TypeError(
            f"workers must be an int (the number of processes, 1 to {MAX_WORKERS}), not {workers!r}"
        )
    count = int(workers)
    if not 1 <= count <= MAX_WORKERS:
        hint = " (one per core is the usual choice: os.cpu_count())" if count < 1 else ""
        raise InvalidConfiguration(
            f"workers must be from 1 to {MAX_WORKERS} processes, not {count}{hint}"
        )
    return count


def _check_single_worker(workers: Any) -> None:
    count = check_workers(workers)
    if count != 1:
        raise InvalidConfiguration(
            f"workers={count}: a server made on a running loop serves from this one "
            f"process; for {count} processes sharing the port, call "
            f"iouzcrx.serve(factory, host, port, workers={count}) (or python -m "
            f"iouzcrx serve MODULE:FACTORY --workers {count}) outside any event loop"
        )


def _transport_of(connection: Any) -> asyncio.Transport:
    if isinstance(connection, AreaReadingProtocol):
        assert connection.transport is not None
        return connection.transport
    return connection  # type: ignore[no-any-return]


def check_host(host: Any, *, accept_bytes: bool = False) -> None:
    """Refuse what getaddrinfo() would misread, naming ``host``."""
    if host is None:
        return
    if isinstance(host, bytes) and accept_bytes:
        has_nul = b"\0" in host
    elif isinstance(host, str):
        has_nul = "\0" in host
    else:
        kinds = "a str or bytes" if accept_bytes else "a str or an iterable of str"
        raise TypeError(f"host must be {kinds}, not {host!r}")
    if has_nul:
        # getaddrinfo() would resolve only what comes before the NUL.
        raise ValueError(f"host {host!r} contains a NUL character")


def check_callable(name: str, value: Any) -> None:
    """Refuse a callback at the call, not when the first connection needs it."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, not {type(value).__name__} {value!r}")


def check_port(port: Any) -> None:
    """Refuse what getaddrinfo() would bind as another port (it takes the port
    modulo 65536 and truncates floats), with the exceptions asyncio raises."""
    if port is None:
        return
    if isinstance(port, str):
        if "\0" in port:
            raise ValueError(f"port {port!r} contains a NUL character")
        if not port.isdecimal():
            return  # a service name, as getaddrinfo() reads it
        number = int(port)
    elif isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int (0-65535) or a service name, not {port!r}")
    else:
        number = port
    if not 0 <= number <= 65535:
        raise OverflowError(f"port must be 0-65535, not {port!r}")


def bound_sockets(
    host: str | Iterable[str] | None,
    port: int | None,
    *,
    family: int,
    flags: int,
    reuse_address: bool | None,
    reuse_port: bool | None,
    one_port: bool = False,
) -> list[socket.socket]:
    """A bound, not yet listening, socket per address ``host`` resolves to,
    as ``create_server`` binds them. ``one_port`` gives every address the
    port the first one got when ``port`` is 0 (asyncio lets each pick its
    own)."""
    if host is None or isinstance(host, str):
        hosts: list[str | None] = [host]
    else:
        try:
            hosts = list(host)
        except TypeError:
            raise TypeError(f"host must be a str or an iterable of str, not {host!r}") from None
    for h in hosts:
        check_host(h)
    check_port(port)
    infos = []
    for h in hosts:
        infos.extend(
            socket.getaddrinfo(None if h == "" else h, port, family, socket.SOCK_STREAM, 0, flags)
        )
    sockets: list[socket.socket] = []
    bound_port: int | None = None
    seen = set()
    try:
        for af, socktype, proto, _name, address in infos:
            if (af, address) in seen:
                continue
            seen.add((af, address))
            sock = socket.socket(af, socktype, proto)
            sockets.append(sock)
            if reuse_address is not False:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if one_port and bound_port is not None and address[1] == 0:
                address = (address[0], bound_port, *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {address!r}: {exc}"
                ) from None
            bound_port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listening_sockets(
    host: str | Iterable[str] | None,
    port: int | None,
    *,
    family: int,
    flags: int,
    backlog: int,
    reuse_address: bool | None,
    reuse_port: bool | None,
) -> list[socket.socket]:
    sockets = bound_sockets(
        host, port, family=family, flags=flags, reuse_address=reuse_address, reuse_port=reuse_port
    )
    try:
        for sock in sockets:
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def create_zcrx_server(
    loop: asyncio.AbstractEventLoop,
    protocol_factory: ProtocolFactory,
    host: str | Iterable[str] | None = None,
    port: int | None = None,
    *,
    interface: str | None = None,
    queue: int | None = None,
    queues: Iterable[int] | None = None,
    mode: str = "auto",
    area_size: int = DEFAULT_AREA_SIZE,
    rq_entries: int | None = None,
    rx_buf_len: int = 0,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    hugepages: bool = False,
    family: int = socket.AF_UNSPEC,
    flags: int = socket.AI_PASSIVE,
    sock: socket.socket | None = None,
    backlog: int = 100,
    ssl: Any = None,
    reuse_address: bool | None = None,
    reuse_port: bool | None = None,
    start_serving: bool = True,
    workers: int | None = None,
) -> ZcrxServer:
    """Like ``loop.create_server``, receiving through zero-copy receive.

    ``mode`` is ``"auto"`` (zerocopy when ``interface`` and ``queue`` are
    given, then copy, bufring, socket), or one of those to insist on it.
    ``workers`` may only be 1 (or None): a server made on a running loop
    serves from this process; ``iouzcrx.serve(..., workers=N)`` runs N.

    ``queues=[...]`` instead of ``queue=`` registers one zcrx queue per RX
    queue of ``interface`` (zerocopy mode) on the loop's ring, and each
    accepted connection is received by the one its packets arrive on (its
    ``SO_INCOMING_NAPI_ID``, mapped to an RX queue through the kernel's
    netdev netlink family). A connection that arrives on no queue of ours
    is served by the first queue, in the kernel's copy fallback, and counted
    in ``server.stats()["unrouted_connections"]``. Where zerocopy cannot
    work, ``auto`` falls back as for one queue, to a single backend.
    """
    if workers is not None:
        _check_single_worker(workers)
    if ssl is not None:
        raise ValueError(
            "ssl= is not supported by create_zcrx_server: zero-copy receive hands over "
            "the TCP payload as the NIC wrote it, and io_uring cannot receive kTLS "
            "sockets this way; terminate TLS in front of the server"
        )
    check_callable("protocol_factory", protocol_factory)
    queue_list = check_queues(queues, queue=queue, interface=interface, mode=mode)
    if queue_list is not None:
        queue = queue_list[0]
    if isinstance(backlog, bool) or not isinstance(backlog, int):
        raise TypeError(f"backlog must be an int, not {backlog!r}")
    if not -(1 << 31) <= backlog < 1 << 31:
        # listen() takes a C int; the kernel caps it at net.core.somaxconn anyway.
        raise ValueError(f"backlog {backlog} does not fit listen(): pass at most {(1 << 31) - 1}")
    if sock is not None:
        if host is not None or port is not None:
            raise ValueError("host/port and sock can not be specified at the same time")
        if not isinstance(sock, socket.socket):
            raise TypeError(f"sock must be a socket.socket, not {sock!r}")
        if sock.fileno() < 0:
            raise ValueError(f"sock {sock!r} is closed: pass an open, bound socket")
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        sock.setblocking(False)
        sockets = [sock]
    else:
        sockets = _listening_sockets(
            host,
            port,
            family=family,
            flags=flags,
            backlog=backlog,
            reuse_address=reuse_address,
            reuse_port=reuse_port,
        )
    try:
        reactor = Reactor.for_loop(loop)

        def acquire(rx_queue: int | None, insist: str) -> tuple[ModeSelection, tuple[Any, ...]]:
            # A queue a closed server of this loop parked with the same
            # options, else a new one.
            key = (mode, interface, rx_queue, area_size, rq_entries, rx_buf_len, hugepages)
            made = reactor.take_idle_queue(key) or select_mode(
                reactor.ring,
                mode=insist,
                interface=interface,
                queue=rx_queue,
                area_size=area_size,
                rq_entries=rq_entries,
                rx_buf_len=rx_buf_len,
                buffer_size=buffer_size,
                hugepages=hugepages,
                ring_error=reactor.ring_error,
                zcrx_ring=reactor.zcrx_ring,
            )
            return made, key

        selection, reuse_key = acquire(queue, mode)
        routes: dict[int, tuple[ModeSelection, tuple[Any, ...]]] = {}
        if queue_list is not None and selection.mode == "zerocopy":
            routes[queue_list[0]] = (selection, reuse_key)
            try:
                for extra in queue_list[1:]:
                    routes[extra] = acquire(extra, "zerocopy")
            except BaseException:
                # Registered ifqs live as long as the ring: keep them for
                # the loop's next server rather than leak them.
                for made, key in routes.values():
                    reactor.park_idle_queue(key, made)
                raise
    except BaseException:
        for s in sockets:
            s.close()
        raise
    server = ZcrxServer(loop, reactor, protocol_factory, sockets, selection, backlog)
    server._reuse_key = reuse_key
    if routes:
        assert interface is not None
        server._routes = routes
        server._router = QueueRouter(interface, routes)
    if start_serving:
        await server.start_serving()
    return server
