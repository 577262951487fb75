# cython: annotation_typing=False
"""``ZcrxTransport``: an ``asyncio.Transport`` receiving through a zcrx or
buffer-ring queue (multishot receive on the ring) and sending with ring SENDs.

The transport the program holds is a Python ``asyncio.Transport`` (so that it
is one); what a connection is and does lives in its ``TransportCore``, whose
state is C fields: the ring's completions (accept, end of a receive, a send)
and the loop's callbacks call the core directly, and a connection's life
(made, reading, end of stream, close, ``connection_lost``) runs no Python
frame of the library's.
"""

cimport cython
from cpython.exc cimport PyErr_SetFromErrno

from iouzcrx._abi cimport IOUZ_CQE_F_MORE
from iouzcrx._receive cimport AcceptedFd, ReceiveClient, Receiver, ReceiveQueue


cdef extern from "<sys/socket.h>" nogil:
    int c_setsockopt "setsockopt"(int fd, int level, int name, const void *value,
                                  unsigned int length)

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<unistd.h>" nogil:
    int c_close "close"(int fd)

import asyncio
import collections
import errno
import functools
import os
import socket
import sys
import threading

from iouzcrx._checks import AcceptedSocket, byte_buffer
from iouzcrx._readiness import BULK_READ, ReadinessReceiver
from iouzcrx._receive import delivery_methods, socket_addresses
from iouzcrx.protocols import delivery_for

__all__ = ["Acceptor", "TransportCore", "ZcrxTransport", "owned_fd"]

_DEFAULT_HIGH_WATER = 64 * 1024
_MAX_SEND = 1 << 20  # small writes are joined into sends of at most this
# While a watched socket's receive is starved, how often to look for its re-arm.
_STARVED_RECHECK = 0.001
# Plain ints: the socket module's are enums, slower to compare.
_AF_INET = int(socket.AF_INET)
_AF_INET6 = int(socket.AF_INET6)
# How buffer-ring connections read, IOUZCRX_READINESS: by default ("auto")
# with the multishot receive, until requests alternate with responses, then
# by reading when the socket is readable (iouzcrx._readiness), which costs
# less per request; "1": by readiness from the first read; "0": never by
# readiness (benchmarks/README.md, "Reading requests by readiness").
_READINESS = os.environ.get("IOUZCRX_READINESS", "auto")
# Exchanges in a row (one or more small reads, then a write) that move a
# connection to reading by readiness. A short connection (one request, one
# response) never pays for the move.
_EXCHANGES_TO_MOVE = 2


def owned_fd(sock):
    """A socket of the library's own making (a client's connect, a worker's
    hand-over) held as its fd alone, as an accepted one is: the socket
    object the program may then get (get_extra_info) tells the transport
    before its fd is closed or detached, so no queued SQE can name a number
    reused by then. ``sock`` is detached."""
    kind = int(sock.type)
    if sock.gettimeout() == 0:
        kind |= socket.SOCK_NONBLOCK  # socket.type leaves it out
    return AcceptedFd(sock.family, kind, sock.proto, sock.detach())


class _Holder:
    """A protocol-shaped sink: a retired receiver hands its copies (bytes) to
    ``data_received``, the transport's ``_on_view``."""

    __slots__ = ("data_received",)

    def __init__(self, data_received):
        self.data_received = data_received


cdef bint _takes_readiness(protocol, tuple methods) except -1:
    """Whether ``protocol`` takes what a readiness receive gives: bytes or
    buffered data, or views over copies where it says it wants any view
    (``_views_may_be_copies``, as the streams' protocol does). A zero-copy
    protocol's views stay over the area."""
    return methods[0] != "views" or getattr(protocol, "_views_may_be_copies", False) is True


def _discard(view):
    """The delivery of a transport whose protocol is gone (none comes)."""


# The delivery methods of a transport whose protocol is gone.
_NO_METHODS = ("views", _discard, None)


def _address(raw):
    """An IPv4 or IPv6 ``struct sockaddr`` as the socket module gives it:
    ``(host, port)`` or ``(host, port, flowinfo, scope_id)``."""
    if raw is None:
        return None
    port = int.from_bytes(raw[2:4], "big")
    if int.from_bytes(raw[:2], sys.byteorder) == _AF_INET:
        return socket.inet_ntop(_AF_INET, raw[4:8]), port
    return (
        socket.inet_ntop(_AF_INET6, raw[8:24]),
        port,
        int.from_bytes(raw[4:8], "big"),
        int.from_bytes(raw[24:28], sys.byteorder),
    )


def _set_result_unless_cancelled(fut):
    if not fut.cancelled():
        fut.set_result(None)


@cython.final
cdef class TransportCore(ReceiveClient):
    """What one connection of a ``ZcrxTransport`` is and does (see the
    module's docstring); the transport's public methods call it. Made by
    ``ZcrxTransport``, never by the program."""

    # The program's transport: handed to the protocol and to whoever
    # on_closed tells. Held until connection_lost, then let go (the
    # transport holds its core).
    cdef object transport
    cdef object _extra
    # Read by the streams' reader (as asyncio's transports have it).
    cdef readonly object _loop
    cdef object _reactor
    # The queue's ring takes the connection's sends too: its closing then
    # tells that no operation names the socket any more.
    cdef object _ring
    cdef object _queue
    cdef object _sock
    cdef object _protocol
    # Looked up once: the receiver is given them when reading starts.
    cdef tuple _methods
    cdef object _on_closed
    cdef object _receiver
    # The loop watches the socket (see _watch_socket).
    cdef bint _watching
    # Where the ring leaves a receive's work for a drain that its fd may
    # announce late (never without DEFER_TASKRUN).
    cdef bint _hints
    # Whether reading may go by readiness (iouzcrx._readiness): buffer-ring
    # connections, until reads show the peer streams or the program closes
    # or detaches the socket object.
    cdef bint _by_readiness
    cdef bint _readiness_fits
    cdef bint _paused
    # Views held while paused, and writes the socket did not take at once:
    # made when first needed.
    cdef object _backlog
    cdef object _write_queue
    cdef bint _eof_seen
    cdef bint _closing
    cdef bint _connection_lost
    cdef object _sending
    # Ring operations naming the socket (the receive, a send) whose last
    # completion has not come: the kernel looks the fd number up when it
    # runs them, so the socket stays open until they are all done, or a
    # connection reusing the number would get them.
    cdef Py_ssize_t _ops_on_socket
    cdef bint _socket_release_wanted
    # The connection's share of the area, across the receives that pause
    # and resume make: over it, the engine stops this receive alone.
    cdef object _pins
    # Bytes queued by write() and not sent yet, and the water marks.
    cdef Py_ssize_t _write_size
    cdef bint _eof_requested
    cdef bint _protocol_paused
    cdef object _high_water
    cdef object _low_water
    # Whether reading goes by readiness when it starts (_by_readiness), and
    # what _note_exchange last saw of the multishot receive.
    cdef bint _prefer_readiness
    cdef Py_ssize_t _exchanges
    cdef Py_ssize_t _seen_deliveries
    cdef Py_ssize_t _seen_bytes
    # The raw local and peer addresses (get_extra_info), of INET sockets.
    cdef tuple _addresses
    # The delivery of held views (pause, backlog), made when first needed.
    cdef object _deliver
    # The readiness receive, while reading goes that way, and the fd number
    # the loop watches for it (see _start_readiness).
    cdef object _ready
    cdef int _ready_fd
    # The ring's poll for errors on the socket, where the loop misses them
    # (Reactor.readers_miss_errors).
    cdef object _error_poll
    # connection_made was called, or is scheduled (start_accepted refuses then).
    cdef bint _started

    def __init__(
        self, transport, reactor, queue, sock, protocol, extra, waiter, on_closed, bint start
    ):
        self.setup(transport, reactor, queue, sock, protocol, extra, waiter, on_closed, start)

    cdef int setup(
        self, transport, reactor, queue, sock, protocol, extra, waiter, on_closed, bint start
    ) except -1:
        # Fields not set here start as None, 0 or False.
        self.transport = transport
        self._extra = extra
        loop = reactor._loop_ref()  # the ``loop`` property without its frame
        self._loop = reactor.loop if loop is None else loop  # None: it raises
        self._reactor = reactor
        self._ring = queue.ring
        self._queue = queue
        if isinstance(sock, socket.socket):
            sock = owned_fd(sock)  # its callers convert it first (they close it)
        self._sock = sock
        self._protocol = protocol
        self._methods = delivery_methods(protocol)
        self._on_closed = on_closed
        self._hints = self._ring.watches_sockets
        self._by_readiness = _READINESS != "0" and not self._hints and queue.mode == "bufring"
        self._readiness_fits = _takes_readiness(protocol, self._methods)
        self._prefer_readiness = _READINESS == "1"
        self._high_water = _DEFAULT_HIGH_WATER
        self._low_water = _DEFAULT_HIGH_WATER // 4
        self._ready_fd = -1
        self._pins = queue.pin_account()
        # The addresses are read now, as asyncio's transports do, so that they
        # are still known once the socket is closed, but made into Python
        # objects only when asked for (get_extra_info), as uvloop does: most
        # connections never are, and making them costs more than the two
        # system calls. The queue's names are looked up when asked for too.
        family, sockname, peername = socket_addresses(sock.fileno())
        self._addresses = (None, None)
        if family == _AF_INET or family == _AF_INET6:
            self._addresses = (sockname, peername)
        else:  # a socket of another family: as asyncio does
            made = sock.socket()
            extra = self._extra
            extra["sockname"] = made.getsockname()
            try:
                extra["peername"] = made.getpeername()
            except OSError:
                extra["peername"] = None  # reset by the peer already: its receive says so
        if start:
            self._started = True
            # One callback, as uvloop does: connection_made, then reading,
            # then the waiter, in the order asyncio's three would run them.
            # The server starts the connections its ring accepted itself
            # (start_accepted).
            self._loop.call_soon(self._connection_made, waiter)
        return 0

    def __repr__(self):
        return self.describe()

    cpdef str describe(self):
        """The transport's repr."""
        state = "closing" if self._closing else "paused" if self._paused else "reading"
        return f"<ZcrxTransport {self._queue.mode} fd={self._sock.fileno()} {state}>"

    cpdef replace_on_closed(self, on_closed):
        """Tell ``on_closed`` instead when the connection is lost, unless
        nobody was to be told."""
        if self._on_closed is not None:
            self._on_closed = on_closed

    def _connection_made(self, waiter):
        try:
            self._protocol.connection_made(self.transport)
        finally:
            # Even when connection_made raised (the loop reports it), as
            # asyncio's separate callbacks would: the connection is served
            # and whoever waits for it is told.
            try:
                self._start_reading()
            finally:
                if waiter is not None:
                    _set_result_unless_cancelled(waiter)

    cpdef start_accepted(self):
        """Start a connection made with ``start=False`` from the completion
        of the ring's accept that made it: ``connection_made``, then reading.

        A completion runs inside a drain of the ring, which submits the
        receive in its next pass: the connection costs no loop callback and
        no enter of its own to start. An exception from ``connection_made``
        goes to the loop's exception handler, as it would from a callback,
        and the connection is served even so. RuntimeError if it was
        started already."""
        if self._started:
            raise RuntimeError(
                "start_accepted(): this connection was started already (the server "
                "starts the connections it accepts)"
            )
        self._started = True
        # _connection_made without a waiter, its exceptions reported.
        try:
            self._protocol.connection_made(self.transport)
        except (SystemExit, KeyboardInterrupt):
            self._start_reading(True)
            raise
        except BaseException as exc:
            self._report(exc, "Exception in protocol.connection_made()")
        try:
            self._start_reading(True)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            # Raised from here, it would end the accept's completion, not
            # this connection: the protocol is told instead.
            self._fatal_error(exc, "Fatal error: zcrx transport could not start receiving")

    cpdef get_extra_info(self, name, default=None):
        """What asyncio's transports answer, and more (see the class
        docstring)."""
        # The transport's own first: what a caller passed in names the rest.
        if name == "socket":
            # The fd gets its socket object now (see AcceptedFd). The program
            # may close it: the loop stops watching its fd first.
            made = self._sock.socket()
            if not self._socket_release_wanted and type(made) is AcceptedSocket:
                # Cleared when the socket closes: the cycle it makes (transport,
                # fd, socket, hook) lasts only while the connection does.
                made.on_release = self._socket_released
            return made
        if name == "zcrx_mode":
            return self._queue.mode
        if name == "pin_account":
            return self._pins
        if name == "zcrx_reading":
            return (
                "readiness"
                if self._ready is not None
                else "multishot"
                if self._receiver is not None
                else None
            )
        extra = self._extra
        if name in extra:
            return extra[name]
        if name == "sockname" or name == "peername":
            local, peer = self._addresses
            # None, as asyncio's: the peer was gone (reset) when accepted.
            value = extra[name] = _address(local if name == "sockname" else peer)
            return value
        if name in ("interface", "queue"):
            # zcrx queues have them, buffer-ring queues neither: looked up
            # once, when asked, rather than failing a getattr per connection.
            value = extra[name] = getattr(self._queue, name, None)
            return value
        return default

    # -- reading ---------------------------------------------------------------

    cdef _start_reading(self, bint in_drain=False):
        """Arm a receive; ``in_drain``: called from a completion, whose
        drain submits it (else a drain is scheduled)."""
        if (
            self._closing
            or self._paused
            or self._eof_seen
            or self._receiver is not None
            or self._ready is not None
        ):
            return
        if self._prefer_readiness and self._by_readiness and self._readiness_fits:
            self._start_readiness()
            return
        # While reading normally the receiver calls the protocol's own methods
        # (no Python frame of ours per delivery; bytes and buffered protocols
        # get copies made straight from the area); an exception the protocol
        # raises comes back through delivery_failed, the end through
        # receive_ended.  Pausing redirects the receiver to _on_view, which
        # holds the data back.
        queue = self._queue
        if not isinstance(queue, ReceiveQueue):
            # Only a core made by TransportCore.__new__ and never set up.
            raise TypeError(f"this transport has no receive queue ({queue!r})")
        cdef Receiver receiver = (<ReceiveQueue>queue).receive_for(self._sock, self._pins, self)
        receiver.deliver_to(self._methods)
        self._receiver = receiver
        self._ops_on_socket += 1
        if not in_drain:
            self._reactor.schedule()
        if self._hints:
            self._watch_socket()

    # Reading by readiness (iouzcrx._readiness).

    cdef _note_exchange(self, receiver):
        """A write on a connection the multishot receive reads: after
        _EXCHANGES_TO_MOVE small requests answered in a row, the receive is
        cancelled, and reading by readiness starts once its last completion
        came (receive_ended), so that no data is read out of order."""
        if not self._readiness_fits:
            return  # a zero-copy protocol's views stay over the area
        deliveries = receiver.deliveries
        if deliveries < self._seen_deliveries:
            # A receive made since (pause, resume): its counts start at 0.
            self._seen_deliveries = self._seen_bytes = 0
        if deliveries == self._seen_deliveries:
            return  # the same answer, in several writes (a header, a body)
        received = receiver.bytes_received
        if received - self._seen_bytes < BULK_READ:
            self._exchanges += 1
        else:
            self._exchanges = 0
        self._seen_deliveries = deliveries
        self._seen_bytes = received
        if (
            self._exchanges >= _EXCHANGES_TO_MOVE
            and not receiver.cancelling
            and not receiver.starved
            and not self._closing
            # Only the rings' thread may cancel (a program may write from
            # another): a later answer there makes the move.
            and threading.get_ident() == self._reactor.thread
            and not self._reactor.inherited
        ):
            # Set first: receive_ended reads it when the end comes.
            self._prefer_readiness = True
            try:
                receiver.cancel()
            except Exception:
                # The move saves work, nothing more: without it the
                # multishot receive reads on.
                self._prefer_readiness = False
                return
            self._reactor.schedule()

    cdef _start_readiness(self):
        ready = ReadinessReceiver(
            self._queue,
            self._sock,
            self._readiness_ended,
            self._on_protocol_error,
            self._readiness_bulk,
            self._reactor.refuse_in_child,
        )
        ready.set_protocol_delivery(self._protocol, self._methods)
        # The queue's receives end when it closes (its ring closing with the
        # loop, or by hand): this connection ends with them.
        self._queue.add_close_listener(self._queue_closed)
        self._ready = ready
        self._ready_fd = fd = self._sock.fileno()
        self._reactor.watch(fd, ready.on_readable)
        if self._reactor.readers_miss_errors:
            self._watch_errors(ready)

    cdef _watch_errors(self, ready):
        # Reactor.readers_miss_errors: the ring tells of POLLERR and POLLHUP
        # (asked for with no other event, the kernel adds them).
        self._error_poll = self._ring.poll(
            self._sock, 0, callback=functools.partial(self._on_error_poll, ready)
        )
        self._ops_on_socket += 1
        self._reactor.schedule()

    def _on_error_poll(self, ready, res, flags):
        try:
            if self._ready is ready and self._error_poll is not None:
                self._error_poll = None
                # Read what is left, then the error or EOF, as the loop would
                # have had it called the reader.
                while self._ready is ready:
                    reads = ready.reads
                    ready.on_readable()
                    if ready.reads == reads:
                        break
                if self._ready is ready and not ready.finished:
                    self._watch_errors(ready)
        finally:
            self._op_on_socket_done()

    cdef _stop_readiness(self):
        """Remove the reader; the socket is still open, so its number still
        names this connection."""
        ready, self._ready = self._ready, None
        if ready is not None:
            ready.close()
            self._queue.remove_close_listener(self._queue_closed)
            self._reactor.unwatch(self._ready_fd)
            self._ready_fd = -1
            error_poll, self._error_poll = self._error_poll, None
            if error_poll is not None:
                error_poll.cancel()  # its completion still comes: _on_error_poll
                self._reactor.schedule()

    def _queue_closed(self):
        if self._ready is not None:
            self._stop_readiness()
            self._force_close(ConnectionAbortedError("the io_uring ring was closed"))

    def _leave_readiness(self):
        """Go on with the multishot receive (the peer streams, or the protocol
        now wants views over the area)."""
        if self._reactor.handed_to_owner(self._leave_readiness):
            return
        self._by_readiness = False
        if self._ready is not None:
            self._stop_readiness()
            self._start_reading()

    def _socket_released(self, closing):
        """The program closes (``closing``) or detaches the socket object
        (AcceptedSocket.on_release), and with it the connection: while the
        number is still this connection's, the loop stops watching it and
        the ring takes every SQE queued with it (a SEND, a receive):
        submitted later, one would act on whatever file the number names by
        then. Off the loop's thread that is handed to the loop, which then
        closes the fd: True."""
        self._by_readiness = False
        if self._socket_release_wanted or self._reactor.inherited or self._loop.is_closed():
            # The transport's own close (nothing names the fd any more), a
            # forked child's copy of the socket (the parent's ring is not the
            # child's to touch), or a loop closed with its rings.
            return False
        if self._reactor.handed_to_owner(functools.partial(self._let_go, closing, True)):
            return True
        self._let_go(closing, False)
        return False

    def _let_go(self, closing, close_now):
        self._stop_readiness()
        self._unwatch_socket()  # while fileno() still names it
        ring = self._ring
        if not ring.closed and ring.unsubmitted:
            ring.submit()
        if close_now:
            self._sock.socket().close_now()
        # Nothing can be read or sent any more: end as a failed read would.
        self._force_close(
            OSError(
                errno.EBADF,
                "the connection's socket was closed"
                if closing
                else "the connection's socket was detached: the program owns its fd",
            )
        )

    def _readiness_bulk(self):
        # Two reads in a row took a whole BULK_READ: the peer streams, and the
        # multishot receive costs less per byte.
        self._leave_readiness()

    def _readiness_ended(self, error):
        ready = self._ready
        self._stop_readiness()
        if error is not None:
            self._fatal_error(error, "Fatal read error on zcrx transport")
        elif ready is not None and ready.eof and not self._closing:
            self._eof_seen = True
            if not self._paused and not self._backlog:
                self._deliver_eof()

    # Where the ring's eventfd wakes the loop late, the socket turning readable
    # drains the ring instead (see iouzcrx.reactor).

    cdef _watch_socket(self):
        if not self._watching:
            self._watching = True
            self._reactor.watch(self._sock.fileno(), self._on_socket_readable)

    cdef _unwatch_socket(self):
        if self._watching:
            self._watching = False
            self._reactor.unwatch(self._sock.fileno())

    def _on_socket_readable(self):
        self._reactor.drain_now()
        receiver = self._receiver
        if receiver is not None and receiver.starved:
            # The area is exhausted, or this connection's views hold their
            # share of it (the engine parks such a receive as starved): the
            # data waits in the socket, which stays readable, until views are
            # released and the receive is re-armed.
            self._unwatch_socket()
            self._loop.call_later(_STARVED_RECHECK, self._rewatch_socket, receiver)

    def _rewatch_socket(self, receiver):
        if receiver is not self._receiver or receiver.finished:
            return
        if receiver.starved:
            self._loop.call_later(_STARVED_RECHECK, self._rewatch_socket, receiver)
        else:
            self._watch_socket()

    def _on_view(self, view):
        if self._paused or self._backlog:
            if self._backlog is None:
                self._backlog = collections.deque()
            self._backlog.append(view)
        else:
            self._deliver_guarded(view if type(view) is memoryview else memoryview(view))

    cdef _deliver_guarded(self, view):
        try:
            deliver = self._deliver
            if deliver is None:
                deliver = self._deliver = delivery_for(self._protocol)
            deliver(view)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._on_protocol_error(exc)

    def _on_protocol_error(self, exc):
        self._fatal_error(exc, "Fatal error: protocol failed to take received data")

    cdef int delivery_failed(self, Receiver receiver, object exc) except -1:
        self._on_protocol_error(exc)
        return 0

    cdef int receive_ended(self, Receiver receiver, object error) except -1:
        # Every connection ends here, usually at EOF.
        try:
            if receiver is not self._receiver:
                return 0  # a receiver retired by pause_reading() or close()
            self._unwatch_socket()
            self._receiver = None
            if error is not None:
                self._fatal_error(error, "Fatal read error on zcrx transport")
            elif self._closing:
                return 0
            elif receiver.eof:
                self._eof_seen = True
                if not self._paused and not self._backlog:
                    self._deliver_eof()
            elif receiver.cancelling and self._prefer_readiness and not self._ring.closed:
                # Cancelled to read by readiness (_note_exchange): the last
                # of its data came before this.
                try:
                    self._start_reading()
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    # Raised from here, it would end a completion, not this
                    # connection.
                    self._fatal_error(exc, "Fatal error: zcrx transport could not go on reading")
            else:
                # Ended neither by EOF, an error nor this transport: the ring closed.
                self._force_close(ConnectionAbortedError("the io_uring ring was closed"))
        finally:
            self._op_on_socket_done()
        return 0

    cdef _deliver_eof(self):
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            transport = self.transport
            if transport is not None and type(transport) is not ZcrxTransport:
                transport.close()  # a subclass's close(), as asyncio's transports call it
            else:
                self.close()

    cpdef is_reading(self):
        """Whether the transport receives (not paused, not closing)."""
        return not self._paused and not self._closing

    cpdef pause_reading(self):
        """Stop delivering data to the protocol until ``resume_reading()``; what
        already arrived is kept for then."""
        # Handed off before the state is read: off the loop's thread it may
        # be changing (a pause handed off just before, not yet run).
        if self._reactor.handed_to_owner(self.pause_reading) or self._closing or self._paused:
            return
        self._paused = True
        self._retire_receiver(False)

    cpdef resume_reading(self):
        """Deliver again, starting with what arrived while paused."""
        if self._reactor.handed_to_owner(self.resume_reading) or self._closing or not self._paused:
            return
        self._paused = False
        self._loop.call_soon(self._resume)

    def _resume(self):
        while self._backlog and not self._paused and not self._closing:
            held = self._backlog.popleft()
            self._deliver_guarded(held if type(held) is memoryview else memoryview(held))
        if self._paused or self._closing:
            return
        if self._eof_seen:
            self._deliver_eof()
        else:
            self._start_reading()

    cdef _retire_receiver(self, bint discard):
        """Stop the current multishot; data already in flight lands in the
        backlog (pause) or is dropped (close)."""
        if self._ready is not None:
            self._stop_readiness()
        self._unwatch_socket()
        receiver, self._receiver = self._receiver, None
        if receiver is None or receiver.finished:
            return
        if discard:
            receiver.close()
        else:
            if receiver.delivery == "views":
                receiver.on_data = self._on_view
            else:
                # Copies are held as bytes: they pin no buffer while paused.
                receiver.set_protocol_delivery(_Holder(self._on_view))
            receiver.cancel()
        self._reactor.schedule()

    # -- writing ---------------------------------------------------------------

    cpdef write(self, data):
        """Send ``data``: at once on the socket where it takes it, the rest through
        ring ``SEND``s. The protocol's ``pause_writing()`` is called above the
        high-water mark and ``resume_writing()`` below the low one."""
        if type(data) is not bytes:
            data = byte_buffer(data)
        if self._eof_requested:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or self._connection_lost:
            return
        if not data:
            return
        if self._by_readiness and not self._prefer_readiness and self._receiver is not None:
            self._note_exchange(self._receiver)
        write_queue = self._write_queue
        if self._sending is None and not write_queue:
            # Nothing queued: try the socket first, as the stock transports do.
            # A response then leaves in this call, without an SQE and a later
            # enter and completion; only what the socket does not take now goes
            # through a ring SEND.
            try:
                sent = self._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on zcrx transport")
                return
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        # The kernel reads the buffer after write() returns: keep an immutable copy
        # unless it already is one.
        chunk = data if isinstance(data, bytes) else bytes(data)
        if write_queue is None:
            write_queue = self._write_queue = collections.deque()
        write_queue.append(chunk)
        self._write_size += len(chunk)
        self._start_send()
        self._maybe_pause_protocol()

    cpdef writelines(self, list_of_data):
        """``write()`` each buffer of ``list_of_data``."""
        for data in list_of_data:
            self.write(data)

    cdef _start_send(self):
        write_queue = self._write_queue
        if self._sending is not None or not write_queue:
            return
        if len(write_queue) > 1:
            parts: list[bytes | memoryview] = []
            size = 0
            while write_queue and size < _MAX_SEND:
                part = write_queue.popleft()
                parts.append(part)
                size += len(part)
            write_queue.appendleft(b"".join(parts))
        try:
            sending = self._ring.send(self._sock, write_queue[0], callback=self._on_sent)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            # The socket is gone (the program closed or detached the socket
            # object), or the ring is: the connection cannot send any more.
            # Raised from here, it would end a completion, not this connection.
            self._fatal_error(exc, "Fatal write error on zcrx transport")
            return
        self._sending = sending
        self._ops_on_socket += 1
        self._reactor.schedule()

    def _on_sent(self, res, flags):
        try:
            if self._sending is not None:  # else abandoned by abort(): ignore it
                self._sent(res)
        finally:
            self._op_on_socket_done()

    cdef _sent(self, Py_ssize_t res):
        self._sending = None
        if res < 0:
            self._fatal_error(
                OSError(-res, os.strerror(-res)), "Fatal write error on zcrx transport"
            )
            return
        write_queue = self._write_queue
        assert write_queue is not None  # a send was made from it
        head = write_queue[0]
        if res < len(head):
            write_queue[0] = memoryview(head)[res:]
        else:
            write_queue.popleft()
        self._write_size -= res
        self._maybe_resume_protocol()
        if self._write_queue:
            self._start_send()
            return
        if self._eof_requested:
            self._shutdown_write()
        if self._closing:
            self._loop.call_soon(self._call_connection_lost, None)

    cpdef write_eof(self):
        """Close the sending side once the data queued so far is sent."""
        if self._closing or self._eof_requested:
            return
        self._eof_requested = True
        if not self._write_queue and self._sending is None:
            self._shutdown_write()

    cdef _shutdown_write(self):
        # Done at once, as the stock transports do: nothing queued may name
        # the fd past the socket's close.
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # the peer is gone: nothing to shut
                self._fatal_error(exc, "Fatal error on shutdown of zcrx transport")

    cpdef get_write_buffer_size(self):
        """Bytes queued and not yet sent."""
        return self._write_size

    cpdef get_write_buffer_limits(self):
        """The ``(low, high)`` water marks of the write buffer."""
        return self._low_water, self._high_water

    cpdef set_write_buffer_limits(self, high=None, low=None):
        """Set the write buffer's water marks, as asyncio's transports do."""
        if high is None:
            high = _DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()

    cdef _maybe_pause_protocol(self):
        if self._protocol_paused or self._write_size <= self._high_water:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._report(exc, "protocol.pause_writing() failed")

    cdef _maybe_resume_protocol(self):
        if not self._protocol_paused or self._write_size > self._low_water:
            return
        self._protocol_paused = False
        try:
            self._protocol.resume_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._report(exc, "protocol.resume_writing() failed")

    # -- closing ---------------------------------------------------------------

    cpdef is_closing(self):
        """Whether the transport is closing or closed."""
        return self._closing

    cpdef close(self):
        """Stop reading, send what is queued, then close the socket."""
        if self._closing:
            return
        # handed_to_owner's first test, spelled out: a close on the rings'
        # thread (every close but one from another thread) costs no frame.
        reactor = self._reactor
        if threading.get_ident() != reactor.thread and reactor.handed_to_owner(self.close):
            return
        self._closing = True
        if self._receiver is not None or self._watching or self._ready is not None:
            self._retire_receiver(True)
        if self._backlog:
            self._backlog.clear()
        if self._sending is None and not self._write_queue:
            self._loop.call_soon(self._call_connection_lost, None)

    cpdef abort(self):
        """Close at once: queued data is dropped, and the protocol's
        ``connection_lost(None)`` follows."""
        if not self._reactor.handed_to_owner(self.abort):
            self._force_close(None)

    cdef _force_close(self, exc):
        if self._connection_lost:
            return
        self._closing = True
        self._retire_receiver(True)
        if self._backlog:
            self._backlog.clear()
        if self._write_queue:
            self._write_queue.clear()
        self._write_size = 0
        if self._sending is not None:
            # Its completion (cancelled, or late) is ignored by _on_sent; the
            # socket stays open until it comes.
            self._sending.cancel()
            self._sending = None
            self._reactor.schedule()
        self._loop.call_soon(self._call_connection_lost, exc)

    cdef _fatal_error(self, exc, message):
        if not isinstance(exc, (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)):
            self._report(exc, message)
        self._force_close(exc)

    cdef _report(self, exc, message):
        self._loop.call_exception_handler(
            {
                "message": message,
                "exception": exc,
                "transport": self.transport,
                "protocol": self._protocol,
            }
        )

    def _call_connection_lost(self, exc):
        if self._connection_lost:
            return
        self._connection_lost = True
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._unwatch_socket()
            # The socket is closed once no ring operation names it any more
            # (else by the last one's completion, _op_on_socket_done). A
            # closed ring has dropped its operations: none is coming back.
            self._socket_release_wanted = True
            if self._ops_on_socket == 0 or self._ring.closed:
                self._sock.close()
            if self._on_closed is not None:
                self._on_closed(self.transport)
            # As asyncio's and uvloop's transports do: the protocol usually
            # holds its transport, and without these the pair (and all they
            # hold) would wait for the cyclic GC instead of going now. The
            # transport holds this core; the core lets go of it here.
            self._protocol = None
            self._methods = _NO_METHODS  # bound methods of the protocol
            self._deliver = _discard
            self.transport = None

    cdef _op_on_socket_done(self):
        self._ops_on_socket -= 1
        if self._socket_release_wanted and (self._ops_on_socket == 0 or self._ring.closed):
            self._sock.close()

    cpdef get_protocol(self):
        """The protocol that gets the data."""
        return self._protocol

    cpdef set_protocol(self, protocol):
        """Hand the connection to another protocol."""
        methods = delivery_methods(protocol)  # a protocol it refuses changes nothing
        self._protocol = protocol
        self._methods = methods
        self._deliver = None
        if self._receiver is not None:
            self._receiver.set_protocol_delivery(protocol, methods)
        self._readiness_fits = _takes_readiness(protocol, methods)
        if self._ready is not None:
            if self._readiness_fits:
                self._ready.set_protocol_delivery(protocol, methods)
            else:
                self._leave_readiness()


cdef inline TransportCore core_of(transport):
    """``transport``'s core, checked: a program may have replaced it."""
    core = transport._core
    if type(core) is not TransportCore:
        raise TypeError(
            f"this ZcrxTransport's _core is {core!r}, not its TransportCore: the transport "
            "cannot be used once that is replaced"
        )
    return <TransportCore>core


class ZcrxTransport(asyncio.Transport):
    """One TCP connection served by the ring's receive queue.

    Made by the server for each connection (in ``copy``, ``zerocopy`` and
    ``bufring`` modes), not constructed directly. ``get_extra_info`` knows
    ``"zcrx_mode"``, ``"socket"``, ``"peername"``, ``"sockname"``,
    ``"interface"``, ``"queue"`` and ``"zcrx_reading"`` (how it reads now:
    ``"multishot"``, ``"readiness"`` or None while not reading). When the
    views the program holds leave the area empty, reading pauses by itself
    and resumes as they are released.
    """

    # The core in a slot, and the instance dict made only if a program sets
    # an attribute of its own: the server makes one of these per connection.
    __slots__ = ("_core", "__dict__", "__weakref__")

    def __init__(
        self, reactor, queue, sock, protocol, extra=None, waiter=None, on_closed=None, *, start=True
    ):
        # What asyncio.BaseTransport.__init__ does, without its frame.
        if extra is None:
            extra = {}
        self._extra = extra
        self._core = TransportCore(
            self, reactor, queue, sock, protocol, extra, waiter, on_closed, start
        )

    @property
    def _loop(self):
        # The event loop, where asyncio's transports keep it: the streams'
        # reader waits on futures of this loop.
        cdef TransportCore core = core_of(self)
        return core._loop

    def start_accepted(self):
        """Start a connection made with ``start=False`` from the completion
        of the ring's accept that made it: ``connection_made``, then reading.

        A completion runs inside a drain of the ring, which submits the
        receive in its next pass: the connection costs no loop callback and
        no enter of its own to start. An exception from ``connection_made``
        goes to the loop's exception handler, as it would from a callback,
        and the connection is served even so."""
        cdef TransportCore core = core_of(self)
        core.start_accepted()

    def __repr__(self):
        cdef TransportCore core = core_of(self)
        return core.describe()

    def get_extra_info(self, name, default=None):
        """What asyncio's transports answer, and more (see the class
        docstring)."""
        cdef TransportCore core = core_of(self)
        return core.get_extra_info(name, default)

    def is_reading(self):
        """Whether the transport receives (not paused, not closing)."""
        cdef TransportCore core = core_of(self)
        return core.is_reading()

    def pause_reading(self):
        """Stop delivering data to the protocol until ``resume_reading()``; what
        already arrived is kept for then."""
        cdef TransportCore core = core_of(self)
        core.pause_reading()

    def resume_reading(self):
        """Deliver again, starting with what arrived while paused."""
        cdef TransportCore core = core_of(self)
        core.resume_reading()

    def write(self, data):
        """Send ``data``: at once on the socket where it takes it, the rest through
        ring ``SEND``s. The protocol's ``pause_writing()`` is called above the
        high-water mark and ``resume_writing()`` below the low one."""
        cdef TransportCore core = core_of(self)
        core.write(data)

    def writelines(self, list_of_data):
        """``write()`` each buffer of ``list_of_data``."""
        cdef TransportCore core = core_of(self)
        if type(self) is ZcrxTransport:
            core.writelines(list_of_data)
        else:
            for data in list_of_data:
                self.write(data)  # a subclass's write(), as asyncio's transports call it

    def can_write_eof(self):
        """True: TCP can close its sending side alone."""
        return True

    def write_eof(self):
        """Close the sending side once the data queued so far is sent."""
        cdef TransportCore core = core_of(self)
        core.write_eof()

    def get_write_buffer_size(self):
        """Bytes queued and not yet sent."""
        cdef TransportCore core = core_of(self)
        return core.get_write_buffer_size()

    def get_write_buffer_limits(self):
        """The ``(low, high)`` water marks of the write buffer."""
        cdef TransportCore core = core_of(self)
        return core.get_write_buffer_limits()

    def set_write_buffer_limits(self, high=None, low=None):
        """Set the write buffer's water marks, as asyncio's transports do."""
        cdef TransportCore core = core_of(self)
        core.set_write_buffer_limits(high, low)

    def is_closing(self):
        """Whether the transport is closing or closed."""
        cdef TransportCore core = core_of(self)
        return core.is_closing()

    def close(self):
        """Stop reading, send what is queued, then close the socket."""
        cdef TransportCore core = core_of(self)
        core.close()

    def abort(self):
        """Close at once: queued data is dropped, and the protocol's
        ``connection_lost(None)`` follows."""
        cdef TransportCore core = core_of(self)
        core.abort()

    def get_protocol(self):
        """The protocol that gets the data."""
        cdef TransportCore core = core_of(self)
        return core.get_protocol()

    def set_protocol(self, protocol):
        """Hand the connection to another protocol."""
        cdef TransportCore core = core_of(self)
        core.set_protocol(protocol)


cdef object _new_object = object.__new__


@cython.final
cdef class Acceptor:
    """The completion of a listening socket's multishot accept: the ring
    calls it with each CQE. Each connection is made a ``ZcrxTransport`` and
    started here, with no Python frame. The server is called for the rest:
    a connection it steers or routes (``_new_connection``), a connection its
    protocol factory refused (``_report_refused_connection``) and the
    accept's last completion (``_accept_ended``). Made by the server."""

    cdef object _server
    cdef readonly object listener
    cdef int _family
    cdef int _kind
    cdef int _proto
    cdef bint _tcp
    cdef object _reactor
    cdef object _queue
    cdef object _factory
    cdef object _transport_type
    cdef set _connections
    cdef object _leave
    # Set by the server: once it closed, each connection accepted still is
    # closed at once (refused).
    cdef public bint closed
    # Whether each connection is served here: neither steered nor routed.
    cdef public bint direct
    # Accept errors in a row, for the server's retry (a success resets it).
    cdef public int failures

    def __init__(
        self, server, listener, reactor, queue, factory, set connections not None,
        transport_type=ZcrxTransport,
    ):
        if not (isinstance(transport_type, type) and issubclass(transport_type, ZcrxTransport)):
            raise TypeError(f"transport_type={transport_type!r}: want ZcrxTransport or a subclass")
        self._transport_type = transport_type
        self._server = server
        self.listener = listener
        # Each accepted socket is made with the listener's family, type and
        # protocol (the ring's accept makes it non-blocking), read here once.
        self._family = int(listener.family)
        self._kind = int(listener.type) | socket.SOCK_NONBLOCK
        self._proto = listener.proto
        self._tcp = self._family == _AF_INET or self._family == _AF_INET6
        self._reactor = reactor
        self._queue = queue
        self._factory = factory
        self._connections = connections
        # While the server is open, leaving is only this (close() hands the
        # connections still open the server's _detach, which wakes
        # wait_closed() after the last).
        self._leave = connections.discard

    def __call__(self, int res, unsigned int flags):
        if res >= 0:
            if self.closed:
                c_close(res)  # taken as the listener closed: refused
            else:
                self.failures = 0
                if self.direct:
                    self.serve(res)
                else:
                    self._server._new_connection(
                        AcceptedFd(self._family, self._kind, self._proto, res),
                        tcp=self._tcp,
                        accepted=True,
                    )
        if not flags & IOUZ_CQE_F_MORE:
            self._server._accept_ended(self, res)

    cdef int serve(self, int fd) except -1:
        cdef TransportCore core = None
        cdef int one = 1
        # The fd alone, in a small object that owns it: no socket.socket
        # (and its getsockname) unless the program asks for one.
        conn = AcceptedFd(self._family, self._kind, self._proto, fd)
        try:
            if self._tcp and c_setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0:
                PyErr_SetFromErrno(OSError)
            protocol = self._factory()
            # What ZcrxTransport() does, without its argument parsing.
            core = TransportCore.__new__(TransportCore)
            extra = {}
            transport = _new_object(self._transport_type)
            transport._extra = extra
            transport._core = core
            core.setup(
                transport, self._reactor, self._queue, conn, protocol, extra, None, self._leave,
                False,
            )
        except (SystemExit, KeyboardInterrupt):
            conn.close()
            raise
        except BaseException as exc:
            conn.close()
            if core is not None:
                core.transport = None  # the pair is freed now, not by the cyclic GC
            self._server._report_refused_connection(exc)
            return 0
        self._connections.add(transport)
        core.start_accepted()
        return 0
