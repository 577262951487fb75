# cython: language_level=3
"""Receive machinery shared by the zcrx and buffer-ring backends.

Buffer returns may happen on any thread (a view collected elsewhere) but never
enter the kernel there: they are queued here under the GIL, and the ring's
owner thread publishes them before its next enter (``before_enter``).
"""

cimport cython
from iouzcrx._abi cimport (ECANCELED, IOUZ_CQE_BUFFER_SHIFT, IOUZ_CQE_F_BUFFER,
                           IOUZ_CQE_F_MORE, IOUZ_CQE_F_SOCK_NONEMPTY)
from libc.stdint cimport int32_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc

from cpython.buffer cimport (PyBUF_SIMPLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from cpython.exc cimport PyErr_CheckSignals
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.object cimport PyObject

from iouzcrx._area cimport BufferOwner, PinAccount
from iouzcrx._copy cimport copy_to_bytes, export_protocol_buffer, iouz_copy
from iouzcrx._ring cimport Request, Ring, trust_fd_owner
from iouzcrx._ring cimport fd_now as owner_fd_now

import collections as _collections
import gc as _gc
import os as _os

from iouzcrx import _checks
from iouzcrx._checks import AcceptedSocket as _AcceptedSocket
from iouzcrx.errors import kernel_error


def delivery_methods(protocol):
    """How data reaches ``protocol``: ``("views", view_received, None)``,
    ``("buffered", get_buffer, buffer_updated)`` or ``("bytes",
    data_received, None)``, the bound methods looked up once.

    Chosen by what the protocol has, as the event loops do (no base class is
    required), in that order. TypeError if it has none of these.
    """
    # Here rather than in iouzcrx.protocols (which exports it): every
    # connection asks it once, and in C the look-ups cost no Python frame.
    view_received = getattr(protocol, "view_received", None)
    if callable(view_received):
        return "views", view_received, None
    get_buffer = getattr(protocol, "get_buffer", None)
    buffer_updated = getattr(protocol, "buffer_updated", None)
    if callable(get_buffer) and callable(buffer_updated):
        return "buffered", get_buffer, buffer_updated
    data_received = getattr(protocol, "data_received", None)
    if callable(data_received):
        return "bytes", data_received, None
    raise TypeError(
        f"the protocol {protocol!r} cannot take received data: give it view_received(view) "
        "(zero copy, see ZeroCopyProtocol), get_buffer(sizehint) and buffer_updated(nbytes) "
        "(asyncio.BufferedProtocol) or data_received(data) (asyncio.Protocol)"
    )


cdef extern from *:
    """
    /* The head of CPython's socket object (Modules/socketmodule.h): its fd,
       an int on POSIX, follows the object header in every version. */
    typedef struct { PyObject_HEAD int sock_fd; } iouz_socket_head;
    """
    ctypedef struct iouz_socket_head:
        int sock_fd


# The socket objects AcceptedFd.socket() makes.
cdef type accepted_socket_type = _AcceptedSocket


cdef inline int accepted_socket_fd(object sock) noexcept:
    """The fd of an ``AcceptedSocket`` (-1 once closed or detached), read as
    its ``fileno()`` would read it, without the method call: a connection
    whose program asked for its socket asks for the fd at every read and
    send."""
    return (<iouz_socket_head *><PyObject *>sock).sock_fd


cdef enum:
    # Bound on one coalesced view: a run holds all of its buffers until the
    # program releases the view.
    MAX_RUN_BYTES = 1024 * 1024
    # Bound on one run delivered as a copy (bytes, get_buffer memory).
    COPY_RUN_BYTES = 256 * 1024
    # A chunk shorter than 1/COPY_BELOW_SHARE of its buffer is copied out and
    # the buffer returned at once: kept, it would pin at least 8 times its
    # size (a peer sending tiny segments could pin the whole area with a
    # few kilobytes), while the copy costs at most an eighth of a buffer,
    # less than delivering the view does.  Larger chunks stay zero-copy.
    COPY_BELOW_SHARE = 8
    # The share of the area one connection's views may pin: a quarter of the
    # buffers, and at least MIN_PIN_LIMIT so that a small area still moves
    # more than a buffer at a time.
    PIN_SHARE = 4
    MIN_PIN_LIMIT = 2


cdef enum:
    # Receiver.delivery_kind
    DELIVER_VIEWS = 0      # views to on_data, or queued for get()
    DELIVER_BYTES = 1      # bytes to data_received
    DELIVER_BUFFERED = 2   # copied into get_buffer(), then buffer_updated

_DELIVERY_NAMES = ("views", "bytes", "buffered")


cdef extern from "Python.h":
    # Called without a try block: entering one costs about as much as the
    # call itself, on every delivery; a failure is the rare case.
    PyObject *call_one "PyObject_CallOneArg" (object callable, object arg)
    void drop_result "Py_DECREF" (PyObject *result)


cdef int raise_set_error() except -1:
    """Raises the exception already set (by a call that returned NULL)."""
    return -1
cdef object _deque = _collections.deque


# The first half of queueing buffer returns, shared by give_back and
# give_back_run (the second, returns_added, is in the .pxd); plain functions
# so that the compiler can inline them.

cdef inline ReturnedBuffer *reserve_returns(ReceiveQueue queue, size_t count,
                                            uint64_t first_token) noexcept:
    """Room for ``count`` more pending returns, the first of them for
    ``first_token``. NULL when the ring is gone (the kernel reclaimed every
    buffer itself) or the list cannot grow (losing the returns only
    shrinks the pool; nothing is corrupted)."""
    cdef size_t capacity = queue.pending_capacity
    cdef ReturnedBuffer *grown
    if queue.closed or queue.ring is None:
        return NULL
    if queue.pending_count + count > capacity:
        while queue.pending_count + count > capacity:
            capacity *= 2
        grown = <ReturnedBuffer *>realloc(queue.pending, capacity * sizeof(ReturnedBuffer))
        if grown == NULL:
            return NULL
        queue.pending = grown
        queue.pending_capacity = capacity
    if queue.pending_count == 0:
        queue.pending_ascending = True
    elif first_token < queue.pending[queue.pending_count - 1].token:
        queue.pending_ascending = False
    return queue.pending + queue.pending_count


cdef bint forked_copy(Ring ring) except -1:
    """Whether this process is a child forked from ``ring``'s owner."""
    return ring.owner_pid != _os.getpid()


cdef inline void return_buffers(ReceiveQueue queue, uint64_t token, uint32_t count,
                                uint32_t first_length, Py_ssize_t length) noexcept:
    # As a Buffer exporting the same chunks returns them when released.
    if count == 1:
        queue.give_back(token, <uint32_t>length)
    else:
        queue.give_back_run(token, count, first_length, length)


cdef int socket_fd_now(object sock) except? -2:
    """The fd ``sock`` names now (-1: closed, detached, or no answer)."""
    cdef AcceptedFd accepted
    if type(sock) is AcceptedFd:
        accepted = <AcceptedFd>sock
        if accepted.fd >= 0:
            return accepted.fd
        sock = accepted.sock
        if sock is None:
            return -1
        if type(sock) is accepted_socket_type:
            return accepted_socket_fd(sock)  # as AcceptedFd.fd_now reads it
    elif type(sock) is int:
        return <int>sock  # a bare number: the program vouches for it
    return owner_fd_now(sock)


cdef inline bint extends_run(Receiver receiver, char *data, uint32_t length) noexcept:
    """Adds a chunk to the receiver's pending run and counts it, if it
    continues the run in memory and the run has room for it (the caller
    then sets the run's new end); else changes nothing and returns False."""
    # run_end is NULL unless a run is pending and can still grow.
    if data != receiver.run_end or data + length > receiver.run_limit:
        return False
    receiver.bytes_received += length
    receiver.chunks_received += 1
    receiver.run_count += 1
    return True


cdef inline Py_ssize_t close_run(Receiver receiver) noexcept:
    """Ends the pending run (the caller delivers it); returns its length."""
    cdef Py_ssize_t length = receiver.run_end - receiver.run_data
    receiver.run_count = 0
    receiver.run_end = NULL
    return length


cdef inline bint run_goes_on(Receiver receiver) noexcept:
    """Whether a pending run is kept for the drain's next batch: the
    receive goes on, the run may still grow, and the kernel said that the
    socket holds more (it posts at most a few dozen completions of one
    receive per batch and carries on in the next, into the buffers that
    follow).  A run kept so reaches its size bounds (MAX_RUN_BYTES, half
    the connection's pin limit) or the drain's end instead of being cut
    into one view per batch, each costing far more than a chunk."""
    return (receiver.last_flags & IOUZ_CQE_F_SOCK_NONEMPTY and receiver.armed
            and receiver.run_end != NULL)


# no_gc_clear: a queue must keep its ring and area while any buffer of it may
# still be released, even when both sit in the same garbage cycle (the ring's
# client list and request set, both cleared by the GC, break such cycles).
@cython.no_gc_clear
cdef class ReceiveQueue(BufferOwner):

    def __cinit__(self, *args, **kwargs):
        self.starved = []
        self.receivers = set()
        self.close_listeners = set()
        self.runs_pending = []
        self.max_run_bytes = MAX_RUN_BYTES

    def __dealloc__(self):
        free(self.pending)
        self.pending = NULL

    cdef int setup_returns(self, size_t capacity) except -1:
        self.pending = <ReturnedBuffer *>realloc(self.pending, capacity * sizeof(ReturnedBuffer))
        if self.pending == NULL:
            raise MemoryError()
        self.pending_capacity = capacity
        return 0

    # -- buffer returns --------------------------------------------------------

    cdef void pins_released(self) noexcept:
        request_pass(self)

    cdef void give_back(self, uint64_t token, uint32_t length) noexcept:
        self.buffers_in_use -= 1
        self.buffers_returned += 1
        cdef ReturnedBuffer *entry = reserve_returns(self, 1, token)
        if entry != NULL:
            entry.token = token
            entry.length = length
            returns_added(self, 1)

    cdef void give_back_run(self, uint64_t token, uint32_t count, uint32_t first_length,
                            Py_ssize_t length) noexcept:
        """Return every buffer of a run: one pending return per completion,
        as if each had come back on its own."""
        cdef uint32_t i
        self.buffers_in_use -= count
        self.buffers_returned += count
        cdef ReturnedBuffer *entry = reserve_returns(self, count, token)
        if entry == NULL:
            return
        entry[0].token = token
        entry[0].length = first_length
        length -= first_length
        cdef uint32_t unit = self.buffer_unit
        if self.tokens_are_offsets:
            # Every chunk after the first starts at a chunk boundary.
            token += first_length
            for i in range(1, count):
                entry[i].token = token
                entry[i].length = unit if length > unit else <uint32_t>length
                token += unit
                length -= unit
        else:
            for i in range(1, count):
                entry[i].token = token + i
                entry[i].length = unit if length > unit else <uint32_t>length
                length -= unit
        returns_added(self, count)

    cdef int after_reap(self, bint last) except -1:
        cdef Receiver receiver = self.first_run
        if receiver is not None:
            if not last and not self.runs_pending and run_goes_on(receiver):
                # The one receive with data in this batch: its run may go on
                # in the next.  (With several, each one's next buffers are
                # interleaved with the others' and no run would continue.)
                return 0
            self.first_run = None
            receiver.run_listed = False
            receiver.flush_run()
        if not self.runs_pending:
            return 0
        runs, self.runs_pending = self.runs_pending, []
        for receiver in runs:
            receiver.run_listed = False
            receiver.flush_run()
        return 0

    cdef int before_enter(self) except -1:
        cdef Receiver receiver
        cdef PinAccount account
        cdef uint64_t refills
        self.wake_requested = False
        if self.closed:
            # Closed during this walk of the ring's clients (by a finalizer or
            # a callback another client ran), which still calls it: returns
            # are dropped once closed, and its registration may be gone.
            return 0
        if (self.starved and not self.collected and not self.pending_count
                and not self.free_buffers()):
            # Starved with every buffer held: views that are garbage only
            # inside reference cycles hold buffers until the GC runs, which
            # may be never while the program only waits for data.  Once per
            # starvation, and only then: a ring that merely ran dry while its
            # buffers were on their way back (the usual case when a small
            # area is read as fast as it fills) must not pay for a full
            # collection each time.
            self.collected = True
            _gc.collect()
            if self.closed:
                # A finalizer it ran closed this queue, whose registration
                # (a zcrx refill ring, a buffer ring) may be gone already.
                return 0
        if self.pending_count or self.keeps_spares:
            refills = self.refills
            self.publish_returns()
            if self.refills != refills:
                self.return_epoch += 1
        if self.starved and self.free_buffers():
            self.collected = False  # buffers are back: the starvation is over
            starved, self.starved = self.starved, []
            for receiver in starved:
                if receiver.finished or receiver.cancelling:
                    receiver.starved = False
                elif not self.may_rearm(receiver):
                    self.starved.append(receiver)  # its own views hold it back
                elif not self.progressed(receiver):
                    # Buffers look free to us, but none reached the kernel
                    # since this receive last started (they may sit in a
                    # refill ring the kernel has not taken yet): starting it
                    # now would only end it again at once, for ever.
                    if not receiver.held_counted:
                        receiver.held_counted = True
                        self.rearms_held += 1
                    self.starved.append(receiver)
                else:
                    receiver.starved = False
                    account = receiver.account
                    if account is not None and account.pinned <= account.limit // 2:
                        # Receiving again, its views well within their share:
                        # a reader must not keep giving up its views for a
                        # stall that is over (a window that ran dry ends a
                        # receive this way many times a second).
                        account.stalled = False
                    receiver.rearms += 1
                    self.rearms += 1
                    self.arm_receiver(receiver)
        return 0

    cdef bint progressed(self, Receiver receiver) noexcept:
        """Whether a receive the kernel ended for want of buffers may start
        again: buffers went back to the kernel since it was last armed, or
        it received data in that time (so it was not ended at once)."""
        if not receiver.waiting_for_returns:
            return True
        return (self.return_epoch != receiver.armed_epoch
                or receiver.bytes_received != receiver.bytes_at_arm)

    cdef int arm_receiver(self, Receiver receiver) except -1:
        if receiver.rearms and receiver.fd >= 0 and socket_fd_now(receiver.sock) != receiver.fd:
            # The program closed or detached the socket while the receive
            # waited: its number may name another connection by now.  Armed
            # on no fd, the receive ends the usual way, with EBADF.
            receiver.fd = -1
        receiver.waiting_for_returns = False
        receiver.held_counted = False
        receiver.armed_epoch = self.return_epoch
        receiver.bytes_at_arm = receiver.bytes_received
        return self.arm(receiver)

    cdef bint may_rearm(self, Receiver receiver) except -1:
        """Whether a waiting receive's own pins allow it to start again: a
        throttled one once its views pin at most half its limit and the
        cancel that stopped it has completed (else that cancel could hit
        the new receive)."""
        if not receiver.throttled:
            return True
        cdef PinAccount account = receiver.account
        if account.pinned > account.limit // 2:
            return False
        if receiver.throttle_cancel is not None and not receiver.throttle_cancel.done:
            return False
        receiver.throttled = False
        receiver.throttle_cancel = None
        account.stalled = False
        return True

    cdef int add_watched_fds(self, list fds) except -1:
        # Only armed receives: a starved one's socket stays readable until
        # buffers return, which its readiness cannot hasten.
        # And only while the socket object still names the fd the receive
        # was armed with: a closed number polls as POLLNVAL at once (a wait
        # would spin), and a reused one names another file.
        cdef Receiver receiver
        for receiver in self.receivers:
            if receiver.armed and receiver.fd >= 0 and socket_fd_now(receiver.sock) == receiver.fd:
                fds.append(receiver.fd)
        return 0

    cdef bint awaits_returns(self) noexcept:
        return len(self.starved) != 0

    cdef int receiver_finished(self, Receiver receiver) except -1:
        self.receivers.discard(receiver)
        if self.closed and not self.receivers and not self.ring.closed:
            # close() asked for it: nothing is armed any more.
            self.release_registration()
        return 0

    cdef int release_registration(self) except -1:
        """Give the kernel-side registration back, once nothing is armed."""
        return 0

    cdef int ring_closed(self) except -1:
        cdef Receiver receiver
        self.closed = True
        self.pending_count = 0
        error = None
        for receiver in list(self.receivers):
            if not receiver.finished:
                try:
                    receiver.finish(None, False)
                except BaseException as exc:
                    # Its on_end failed: the others still get theirs.
                    if error is None:
                        error = exc
        self.receivers.clear()
        self.starved.clear()
        error = self.tell_close_listeners(error)
        if error is not None:
            raise error
        return 0

    cdef object tell_close_listeners(self, object error):
        """Call each close listener once; the first exception among ``error``
        and theirs, for the caller to raise once all were called."""
        listeners = list(self.close_listeners)
        self.close_listeners.clear()
        for listener in listeners:
            try:
                listener()
            except BaseException as exc:
                if error is None:
                    error = exc
        return error

    def add_close_listener(self, listener):
        """Call ``listener()`` once when this queue closes (``close()``, or its
        ring closing): a connection of the queue reading by other means than
        its receives (iouzcrx._readiness) ends there as theirs do."""
        if self.closed:
            raise ValueError("the receive queue is closed")
        self.close_listeners.add(listener)

    def remove_close_listener(self, listener):
        """Forget ``listener``; nothing if it was not added."""
        self.close_listeners.discard(listener)

    cdef int publish_returns(self) except -1:
        raise NotImplementedError

    cdef uint64_t free_buffers(self) noexcept:
        return self.total_buffers - self.buffers_in_use - self.pending_count

    # -- receives --------------------------------------------------------------

    cdef int arm(self, Receiver receiver) except -1:
        raise NotImplementedError

    cdef int receive(self, Receiver receiver, int32_t res, uint32_t flags,
                     uint64_t extra) except -1:
        raise NotImplementedError

    cdef int starve(self, Receiver receiver) except -1:
        """The kernel ended ``receiver`` for want of buffers; the data stays in
        the socket (TCP flow control holds the sender) until buffers return."""
        if not self.stops(receiver):
            return 0
        self.starvations += 1
        receiver.starved = True
        receiver.waiting_for_returns = True
        self.starved.append(receiver)
        self.ring.client_awaits_returns()
        if receiver.account is not None and (
                receiver.throttled or not (self.keeps_spares and self.free_buffers())):
            # The area is exhausted, or the receive had reached its pin
            # limit and is told now that it has stopped.  A window that
            # merely ran dry, with spares left, is refilled on the next
            # pass: no stall to report, which would wake a waiting reader
            # for nothing.
            receiver.account.stall()
        return 0

    cdef int park(self, Receiver receiver) except -1:
        """A receive stopped for its pins waits, like a starved one, for the
        owner thread's before_enter to start it again.  Its account is told
        of the stall now that the receive has stopped, after its last view:
        a program that gives up its views when told must have them all by
        then, or the view it keeps could hold the last free buffer for
        ever."""
        if not self.stops(receiver):
            return 0
        receiver.starved = True
        self.starved.append(receiver)
        self.ring.client_awaits_returns()
        return receiver.account.stall()

    cdef bint stops(self, Receiver receiver) except -1:
        """The kernel ended ``receiver`` with more to come, so it is to wait:
        its pending run is delivered first (its data before its stall, see
        park).  False if the receive is over instead: ended by that
        delivery's callback, or cancelled by a callback (whose cancel then
        finds nothing to cancel, so the receive ends here)."""
        receiver.armed = False
        if receiver.run_count:
            receiver.flush_run()
            if receiver.finished:
                return False
        if receiver.cancelling:
            receiver.finish(None, False)
            return False
        return True

    cdef int rearm(self, Receiver receiver) except -1:
        """The kernel ended ``receiver`` with more to receive (a full CQ):
        start it again, unless the program cancelled it meanwhile."""
        receiver.armed = False
        if receiver.cancelling:
            return receiver.finish(None, False)
        if receiver.throttled:
            return self.park(receiver)
        receiver.rearms += 1
        self.rearms += 1
        return self.arm_receiver(receiver)

    cdef int end_by_kernel(self, Receiver receiver, int32_t res) except -1:
        """A final CQE that is neither data nor starvation."""
        receiver.armed = False
        if res == 0:
            return receiver.finish(None, True)
        if res == -ECANCELED and (receiver.cancelling or self.ring.closing):
            return receiver.finish(None, False)
        if res == -ECANCELED and receiver.throttled:
            return self.park(receiver)
        return receiver.finish(kernel_error(-res, f"{self.mode} receive on fd {receiver.fd}"),
                               False)

    # -- Python API --------------------------------------------------------------

    def recv_multishot(self, sock, *, on_data=None, on_end=None, on_error=None,
                       PinAccount account=None):
        """Start a multishot receive on the connected TCP socket ``sock``.

        Returns a Receiver: iterate it for memoryviews (blocking, on the ring's
        thread), or pass ``on_data(view)`` / ``on_end(exc_or_None)`` callbacks
        that the ring calls while it drains.  An exception raised by
        ``on_data`` goes to ``on_error(exc)`` if given (KeyboardInterrupt and
        SystemExit excepted), else to the ring's error handling.

        With ``account`` (see ``pin_account``) the receive stops while the
        views it counts pin their share of the area, and starts again once
        enough of them are gone.
        """
        if self.closed or self.ring is None:
            raise ValueError(f"the {self.mode} receive queue is closed")
        self.ring.check_owner()
        # Checked now: a completion that finds a bad callback or fd could
        # only end the receive, far from the call that was wrong.  What
        # passes (a socket the library accepted itself, callables) costs no
        # Python frame: every accepted connection comes this way.
        cdef int fd = -1
        if type(sock) is AcceptedFd:
            fd = (<AcceptedFd>sock).fd
            if fd < 0 and (<AcceptedFd>sock).sock is not None:
                fd = (<AcceptedFd>sock).sock.fileno()
        elif type(sock) is _AcceptedSocket:
            fd = sock.fileno()
        if fd < 0:
            fd = _checks.stream_socket_fd("sock", sock)
        if not (on_data is None or callable(on_data)):
            _checks.callback("on_data", on_data)
        if not (on_end is None or callable(on_end)):
            _checks.callback("on_end", on_end)
        if not (on_error is None or callable(on_error)):
            _checks.callback("on_error", on_error)
        return self.start_receiver(sock, fd, on_data, on_end, on_error, account, None)

    cdef Receiver receive_for(self, AcceptedFd sock, PinAccount account, ReceiveClient client):
        """recv_multishot for a transport's core: on the socket the server
        accepted, counted in the connection's pin account, and ``client``
        told of the end and of the delivery's exceptions."""
        if sock is None:
            raise TypeError("receive_for() needs the connection's AcceptedFd, not None")
        if self.closed or self.ring is None:
            raise ValueError(f"the {self.mode} receive queue is closed")
        self.ring.check_owner()
        return self.start_receiver(sock, sock.fd_now(), None, None, None, account, client)

    cdef Receiver start_receiver(self, object sock, int fd, object on_data, object on_end,
                                 object on_error, PinAccount account, ReceiveClient client):
        """recv_multishot once its arguments are checked (``fd`` is
        ``sock``'s, the callables are None or callable); ``client``, if not
        None, is told instead of ``on_end`` and ``on_error``."""
        cdef Receiver receiver = Receiver.__new__(Receiver)
        receiver.queue = self
        receiver.sock = sock
        receiver.fd = fd
        if client is None:
            receiver.chunks = _deque()  # a client's receiver delivers: made if ever needed
        if on_data is not None:
            receiver.on_data = on_data
        receiver.on_end = on_end
        receiver.on_error = on_error
        receiver.client = client
        receiver.account = account
        receiver.run_cap = 0xFFFFFFFF
        receiver.run_bytes_cap = self.max_run_bytes
        if account is not None:
            account.stalled = False
            # The view a program holds while it waits for the next one must
            # leave the receive able to resume (at half the limit).
            receiver.run_cap = <uint32_t>max(<uint64_t>1, account.limit // 2)
        self.arm_receiver(receiver)
        self.receivers.add(receiver)
        return receiver

    def close(self):
        """Stop using this queue: cancel its receives (they end with no
        error, keeping the views they queued), detach it from the ring and
        give its kernel registration back once nothing is armed on it.  The
        area stays mapped until the last view over it is released.  Only the
        ring's owner thread may close a queue (WrongThread otherwise, and the
        queue is left as it was); closing twice is harmless.  A queue that is
        dropped without close() is released when it is collected.  In a
        process forked from the owner it only marks this copy closed, as
        Ring.close does there: the parent's receives go on.  An exception
        from an on_end it calls is raised once every receive is cancelled."""
        if self.closed:
            return
        cdef Ring ring = self.ring
        cdef Receiver receiver
        if ring is None:  # made by __new__, never set up: nothing to undo
            self.closed = True
            return
        if forked_copy(ring):
            # As Ring.close does there: the receives and the registration
            # are the parent's, and only this process's copy closes.
            self.closed = True
            self.starved.clear()
            return
        if not ring.closed:
            ring.check_thread()
        self.closed = True
        self.starved.clear()
        if ring.closed:
            return
        ring.detach_client(self)
        error = None
        for receiver in list(self.receivers):
            try:
                receiver.cancel()  # a starved one ends here, calling its on_end
            except BaseException as exc:
                # Every receive is cancelled even so: a second close() returns
                # at once and would not get to the others.
                if error is None:
                    error = exc
        if not self.receivers:
            self.release_registration()
        error = self.tell_close_listeners(error)
        if error is not None:
            raise error

    def pin_account(self):
        """A new PinAccount for one connection: its receives may pin a quarter
        of this queue's buffers (at least 2, at most all of them)."""
        cdef uint64_t limit = max(<uint64_t>MIN_PIN_LIMIT, self.total_buffers // PIN_SHARE)
        return PinAccount(min(limit, self.total_buffers))

    @property
    def buffers_pending_return(self):
        """Buffers released by the program but not yet handed to the kernel."""
        return self.pending_count

    def stats(self):
        stats = BufferOwner.stats(self)
        stats.update(buffers_pending_return=self.pending_count, refills=self.refills,
                     rearms=self.rearms, starvations=self.starvations,
                     rearms_held=self.rearms_held)
        return stats


cdef class ReceiveClient:
    """What owns a receiver and is told in C: the receive's end and the
    delivery's exceptions (see the declaration). This base is told and does
    nothing."""

    cdef int receive_ended(self, Receiver receiver, object error) except -1:
        return 0

    cdef int delivery_failed(self, Receiver receiver, object exc) except -1:
        return 0


@cython.final
cdef class Receiver(Request):

    cdef int complete(self, int32_t res, uint32_t flags, uint64_t extra) except -1:
        cdef uint32_t bid
        cdef char *data
        self.last_flags = flags
        if (flags & (IOUZ_CQE_F_BUFFER | IOUZ_CQE_F_MORE) == IOUZ_CQE_F_BUFFER | IOUZ_CQE_F_MORE
                and <uint32_t>res == self.queue.whole_buffer):
            # The bulk case of a buffer ring, handled here rather than one
            # virtual call further in the queue's receive(), which does the
            # same: a whole buffer (no part bookkeeping, even on an
            # incremental ring) and the receive goes on.  Only a buffer
            # ring's completions carry F_BUFFER, and its whole_buffer is the
            # buffer size, so res > 0.  The queue's fields are reached
            # through self (a local would take a reference); its peak is
            # taken when buffers go back.
            bid = flags >> IOUZ_CQE_BUFFER_SHIFT
            self.queue.buffers_in_use += 1
            self.queue.bytes_received += res
            self.queue.chunks_received += 1
            data = self.queue.area.base + <uint64_t>bid * <uint32_t>res
            if extends_run(self, data, <uint32_t>res):
                self.run_end = data + res
                return 0
            return self.add_chunk(data, res, bid, True)
        if self.fd_gone:
            # Its SQE became a no-op: the socket was closed before it went
            # to the kernel (Ring.drop_stale_fds). Cancelled meanwhile, it
            # ends as a cancel does.
            self.fd_gone = False
            res = -ECANCELED if self.cancelling else -EBADF
        return self.queue.receive(self, res, flags, extra)

    cdef int add_chunk(self, char *data, uint32_t length, uint64_t token,
                       bint fills_buffer) except -1:
        """One data completion (its buffer already counted as in use).

        Chunks that continue the run in memory (the run's last buffer was
        filled to its end, this one starts right after it) join it; the run
        is delivered as one view when a chunk does not fit, when its last
        chunk leaves its buffer part-filled, at the end of the CQE batch
        (the queue's after_reap) unless the socket has more for the next
        batch of the same drain (run_goes_on), at the end of the drain, or
        before the end is reported."""
        if extends_run(self, data, length):
            self.run_end = data + length
            if fills_buffer:
                return 0
            return self.flush_run()
        self.bytes_received += length
        self.chunks_received += 1
        return self.start_run(data, length, token, fills_buffer)

    cdef int start_run(self, char *data, uint32_t length, uint64_t token,
                       bint fills_buffer) except -1:
        if self.run_count:
            self.flush_run()  # the run this chunk does not continue
        if not fills_buffer:
            # A part-filled buffer cannot be continued: deliver it on its own.
            if self.delivery_kind != DELIVER_VIEWS:
                return self.deliver_owned(data, length, token, 1, length)
            if (length < self.queue.buffer_unit // COPY_BELOW_SHARE
                    and not self.queue.lends_parts):
                return self.deliver_copy(data, length, token)
            return self.deliver_pinned(
                self.queue.export_pinned(data, length, token, 1, length, self.account))
        self.run_data = data
        self.run_end = data + length
        self.run_token = token
        self.run_count = 1
        self.run_first_length = length
        self.limit_run()
        if not self.run_listed:
            self.run_listed = True
            if self.queue.first_run is None:
                self.queue.first_run = self
            else:
                self.queue.runs_pending.append(self)
        return 0

    cdef void limit_run(self) noexcept:
        """Where the pending run must end at the latest: ``run_bytes_cap``
        bytes from its start, and ``run_cap`` buffers.  Every chunk after
        the first starts a buffer and fills at most that one, so the n-th
        ends within the first chunk's length and n - 1 buffers of the run's
        start: one bound on memory checks both caps as the run grows."""
        cdef uint64_t room = (<uint64_t>(self.run_cap - 1) * self.queue.buffer_unit
                              + self.run_first_length)
        if room > <uint64_t>self.run_bytes_cap:
            room = <uint64_t>self.run_bytes_cap
        self.run_limit = self.run_data + room

    cdef object take_run(self):
        """The pending run as one view (the run is empty afterwards)."""
        cdef uint32_t count = self.run_count
        cdef Py_ssize_t length = close_run(self)
        return self.queue.export_pinned(self.run_data, length, self.run_token,
                                        count, self.run_first_length, self.account)

    cdef int flush_run(self) except -1:
        cdef uint32_t count = self.run_count
        if not count:
            return 0
        if self.delivery_kind == DELIVER_VIEWS:
            return self.deliver_pinned(self.take_run())
        return self.deliver_owned(self.run_data, close_run(self), self.run_token, count,
                                  self.run_first_length)

    cdef int deliver_owned(self, char *data, Py_ssize_t length, uint64_t token,
                           uint32_t count, uint32_t first_length) except -1:
        """Deliver a chunk or a run to a bytes or buffered protocol: copied
        out of the area, its buffers go back at once and pin nothing, so
        this path never throttles the receive."""
        self.deliveries += 1
        self.queue.deliveries += 1
        try:
            if not self.discarding:
                self.copy_to_protocol(data, length)
        except BaseException as exc:
            return_buffers(self.queue, token, count, first_length, length)
            return self.callback_failed(exc)
        return_buffers(self.queue, token, count, first_length, length)
        return 0

    cdef int copy_to_protocol(self, char *data, Py_ssize_t length) except -1:
        """Copy ``length`` bytes of area memory (whose buffers the caller
        still holds) to the protocol.  The delivery is looked at again after
        each callback: it may have paused reading or handed the connection
        to another protocol (set_protocol_delivery) or closed the receive,
        and what is left goes where that says."""
        cdef Py_buffer target
        cdef Py_ssize_t n
        while length > 0 and not self.discarding:
            if self.delivery_kind == DELIVER_BYTES:
                self.copy_target(copy_to_bytes(data, length))
                return 0
            if self.delivery_kind == DELIVER_VIEWS:
                # Views wanted from here on (on_data was set): the rest as a
                # view over a copy, since the buffers go back now.
                self.deliveries -= 1  # deliver() counts it again
                return self.deliver(PyMemoryView_FromObject(copy_to_bytes(data, length)))
            buffer_updated = self.copy_updated
            export_protocol_buffer(self.copy_target(length), &target, length)
            n = target.len
            if n > length:
                n = length
            iouz_copy(target.buf, data, <size_t>n)
            PyBuffer_Release(&target)
            buffer_updated(n)
            data += n
            length -= n
        return 0

    cdef int deliver_copy(self, char *data, uint32_t length, uint64_t token) except -1:
        """Deliver a small chunk as a view over a copy; its buffer goes back
        now rather than when the program lets go of the data."""
        view = PyMemoryView_FromObject(copy_to_bytes(data, length))
        self.queue.deliveries += 1
        self.queue.give_back(token, length)
        return self.deliver(view)

    cdef int deliver_pinned(self, object view) except -1:
        """Deliver a view over area buffers; when the account it counts
        against reaches its limit, stop the receive (its data waits in the
        socket meanwhile)."""
        cdef PinAccount account = self.account
        if (account is None or account.pinned < account.limit or self.throttled
                or self.finished or self.cancelling or self.discarding):
            return self.deliver(view)
        self.throttled = True
        account.stalled = True  # as a reader looking at it sees from here on
        if self.armed:
            self.throttle_cancel = self.queue.ring.cancel(self)
        # on_stall is called once the receive has stopped (park, or starve
        # if the buffers ran out first), after any view still on its way; a
        # receive that ends instead (this flush may be its finish's) is not
        # told.
        return self.deliver(view)

    cdef int deliver(self, object view) except -1:
        self.deliveries += 1
        if self.discarding:
            return 0  # closed: the view dies here and its buffers go back
        on_data = self.data_callback  # held: the callback may replace itself
        if on_data is None:
            if self.chunks is None:
                self.chunks = _deque()
            self.chunks.append(view)
            return 0
        cdef PyObject *result = call_one(on_data, view)
        if result == NULL:
            return self.on_data_raised()
        drop_result(result)
        return 0

    cdef int on_data_raised(self) except -1:
        """on_data raised (the exception is set): hand it on."""
        try:
            raise_set_error()
        except BaseException as exc:
            self.callback_failed(exc)
        return 0

    cdef int callback_failed(self, object exc) except -1:
        # Caught here rather than in the caller so that the receive's own
        # bookkeeping (re-arm, buffer counts) always runs to the end.
        on_error = self.on_error
        client = self.client
        if (on_error is None and client is None) or isinstance(
                exc, (KeyboardInterrupt, SystemExit)):
            return self.queue.ring.report_callback_error(exc)
        try:
            if client is not None:
                client.delivery_failed(self, exc)
            else:
                on_error(exc)
        except BaseException as error:
            self.queue.ring.report_callback_error(error)
        return 0

    cdef int finish(self, object error, bint eof) except -1:
        if self.finished:
            return 0
        self.flush_run()  # data first, then the end
        self.finished = True
        self.armed = False
        self.eof = eof
        self.error = error
        self.queue.receiver_finished(self)
        client = self.client
        if client is not None:
            self.client = None  # it holds this receiver: no cycle left behind
            client.receive_ended(self, error)
        elif self.on_end is not None:
            self.on_end(error)
        return 0

    @property
    def on_data(self):
        """Called with each view instead of queueing it (None: queue them).
        Setting it switches the receiver to delivering views."""
        return self.data_callback

    @on_data.setter
    def on_data(self, callback):
        if callback is not None and not callable(callback):
            raise TypeError(f"on_data must be callable or None, not {callback!r}")
        self.data_callback = callback
        self.delivery_kind = DELIVER_VIEWS
        self.copy_target = None
        self.copy_updated = None
        self.run_bytes_cap = (MAX_RUN_BYTES if self.queue is None
                              else self.queue.max_run_bytes)
        if self.run_count:
            self.limit_run()

    def set_protocol_delivery(self, protocol, methods=None):
        """Deliver straight to ``protocol``'s methods, chosen as
        ``iouzcrx.protocols.delivery_for`` chooses (TypeError, and nothing
        changed, if it has none): ``view_received(view)`` gets the views;
        ``get_buffer(n)`` with ``buffer_updated(n)``, or ``data_received(bytes)``,
        get copies made from the area, whose buffers go back at once.
        ``methods``: what ``iouzcrx.protocols.delivery_methods(protocol)``
        returned, when the caller has it already (not looked up again).
        Returns the kind chosen, as ``delivery`` does."""
        if methods is None:
            methods = delivery_methods(protocol)
        methods = tuple(methods)
        self.deliver_to(methods)
        return methods[0]

    cdef int deliver_to(self, tuple methods) except -1:
        """set_protocol_delivery with what delivery_methods returned."""
        kind, method, updated = methods
        if kind == "views":
            # The setter: views, and what copies needed let go of (the
            # protocol a copy went to, the copies' smaller runs).
            self.on_data = method
        else:
            self.data_callback = None
            self.delivery_kind = DELIVER_BYTES if kind == "bytes" else DELIVER_BUFFERED
            self.copy_target = method
            self.copy_updated = updated
            # A copy is made from the run and dropped at once: kept to the
            # size the stock loops read at a time, the destination memory
            # the allocator hands back is the same, still in the cache, on
            # every delivery.
            self.run_bytes_cap = COPY_RUN_BYTES
            if self.queue is not None:
                self.run_bytes_cap = min(self.run_bytes_cap, self.queue.max_run_bytes)
            if self.run_count:
                self.limit_run()
        return 0

    @property
    def delivery(self):
        """How data is delivered: ``"views"`` (to ``on_data`` or queued),
        ``"bytes"`` or ``"buffered"`` (see ``set_protocol_delivery``)."""
        return _DELIVERY_NAMES[self.delivery_kind]

    def __iter__(self):
        return self

    def __next__(self):
        view = self.get()
        if view is None:
            raise StopIteration
        return view

    cdef int check_made(self) except -1:
        # Receiver() or Receiver.__new__ makes one with no queue nor ring.
        if self.queue is None:
            raise TypeError("this Receiver was not made by a receive queue: receivers come "
                            "from queue.recv_multishot(sock)")
        return 0

    def get(self, timeout=None):
        """The next received view; None at EOF or after cancel; raises the
        receive's error, or TimeoutError after ``timeout`` seconds (None:
        no limit; NaN or negative: ValueError)."""
        self.check_made()
        self.queue.ring.check_thread()
        if self.chunks is None:
            self.chunks = _deque()
        chunks = self.chunks
        if not chunks and not self.finished:
            if self.starved and not self.throttled:
                # Views taken since the starvation may have become garbage
                # inside reference cycles: only the GC can return those, and
                # nothing else will before the data this waits for.
                _gc.collect()
            self.ring.wait_for(lambda: chunks or self.finished, timeout)
        if chunks:
            return chunks.popleft()
        if self.error is not None:
            raise self.error
        return None

    @property
    def queued(self):
        """Views received but not yet taken with get()/iteration."""
        return 0 if self.chunks is None else len(self.chunks)

    def cancel(self):
        """Stop receiving: the multishot is cancelled, queued views stay.
        Owner thread only: from another thread it raises WrongThread and
        changes nothing."""
        self.check_made()
        if self.finished or self.cancelling:
            return
        if self.armed:
            self.queue.ring.check_owner()
        else:
            self.queue.ring.check_thread()
        self.cancelling = True
        if self.starved:
            self.finish(None, False)
        elif self.armed:
            self.ring.cancel(self)

    def close(self):
        """Cancel, and drop the views not yet taken and any that arrive before
        the cancel completes (their buffers go back).  Owner thread only:
        from another thread it raises WrongThread and changes nothing.  In a
        process forked from the owner it drops only this copy's queued views
        (the receive is the parent's)."""
        self.check_made()
        if not self.finished:
            if forked_copy(self.queue.ring):
                # The receive is the parent's: only this copy's views go.
                self.discarding = True
                if self.chunks is not None:
                    self.chunks.clear()
                return
            self.queue.ring.check_thread()
        self.discarding = True
        self.flush_run()
        self.cancel()
        if self.chunks is not None:
            self.chunks.clear()

    def __repr__(self):
        state = ("finished" if self.finished else "starved" if self.starved
                 else "armed" if self.armed else "idle")
        return (f"<Receiver fd={self.fd} {state} bytes={self.bytes_received} "
                f"chunks={self.chunks_received}>")


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct sockaddr_storage:
        unsigned short ss_family
    int getsockname(int fd, sockaddr *addr, socklen_t *length)
    int getpeername(int fd, sockaddr *addr, socklen_t *length)


def socket_addresses(int fd):
    """``(family, local, peer)``: the address family of the socket ``fd``
    (-1 if the kernel will not say) and its local and peer addresses as the
    kernel gives them (``struct sockaddr`` bytes), each None where it
    refuses (a peer gone already).  A transport keeps them, as asyncio's do, so that
    they are known after its socket is closed; made into Python addresses
    only if asked for, which most connections never are."""
    cdef sockaddr_storage local
    cdef sockaddr_storage peer
    cdef socklen_t local_length = sizeof(local)
    cdef socklen_t peer_length = sizeof(peer)
    cdef bint has_local = getsockname(fd, <sockaddr *>&local, &local_length) == 0
    cdef bint has_peer = getpeername(fd, <sockaddr *>&peer, &peer_length) == 0
    return (local.ss_family if has_local else -1,
            PyBytes_FromStringAndSize(<char *>&local, min(local_length, sizeof(local)))
            if has_local else None,
            PyBytes_FromStringAndSize(<char *>&peer, min(peer_length, sizeof(peer)))
            if has_peer else None)


cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_send "send"(int fd, const void *buf, size_t length, int flags)
    int c_shutdown "shutdown"(int fd, int how)
    int c_setsockopt "setsockopt"(int fd, int level, int name, const void *value,
                                  socklen_t length)
    enum:
        MSG_NOSIGNAL
        MSG_DONTWAIT

cdef extern from "<unistd.h>" nogil:
    int c_close "close"(int fd)

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR
        EBADF


cdef inline object os_error(int number):
    # OSError(errno, ...) makes the subclass the socket module would raise
    # (BlockingIOError for EAGAIN, BrokenPipeError for EPIPE).
    return OSError(number, _os.strerror(number))


@cython.freelist(16)  # one per accepted connection
cdef class AcceptedFd:
    """A connection the server's ring accepted, held as its fd alone: most
    connections are served, written to and closed without anyone asking
    for a ``socket.socket``, whose making costs a system call
    (``getsockname``, its check that the fd is a socket) and a Python
    object.  ``socket()`` makes one on demand (``get_extra_info``) and
    hands it the fd: from then on every method here acts through that
    object, so that an fd its owner closed is never used by number again
    (``send`` asks it for its fd at each call, as socket.send reads its
    own, and sends without the object's timeout).

    It owns the fd until ``close()`` or ``socket()``; dropped while it
    still owns it, the fd is closed (as a socket object would)."""

    def __cinit__(self, int family, int kind, int proto, int fd):
        self.fd = fd
        self.family = family
        self.kind = kind
        self.proto = proto

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def fileno(self):
        """The fd; -1 once closed."""
        if self.sock is not None:
            return self.sock.fileno()
        return self.fd

    def socket(self):
        """The ``socket.socket`` of the connection (an ``AcceptedSocket``),
        made on the first call; it owns the fd from then on. Asked for once
        the connection is closed, a closed socket of the same kind."""
        if self.sock is not None:
            return self.sock
        cdef int fd = self.fd
        cdef bint claimed = False
        if fd < 0:
            sock = _AcceptedSocket(self.family, self.kind, self.proto)
            sock.close()
        else:
            # Made before the fd is taken: making it may let another thread
            # run, which may ask for the socket too, or close the fd.
            sock = _AcceptedSocket(self.family, self.kind, self.proto, fd)
        with cython.critical_section(self):
            if self.sock is None and self.fd == fd:
                self.fd = -1
                self.sock = sock
                claimed = True
        if not claimed:
            if fd >= 0:
                # Another thread claimed the fd first, or closed it (its
                # number may name another file by now): never this object's.
                sock.detach()
            if self.sock is None:
                return self.socket()  # closed meanwhile: a closed stand-in
        return self.sock

    cdef int take_fd(self) noexcept:
        """The owned fd, which the caller now owns (-1: none)."""
        cdef int fd
        with cython.critical_section(self):
            fd = self.fd
            self.fd = -1
        return fd

    def close(self):
        """Close the fd (through the socket object, if one was made);
        closing twice does nothing."""
        sock = self.sock
        if sock is not None:
            sock.close()
            return
        cdef int fd = self.take_fd()
        if fd >= 0:
            c_close(fd)

    cdef int fd_now(self) except -1:
        """The fd to act on at this moment, asked of its owner: the socket
        once one was made (the program may have closed it: its fileno() is
        then -1), else this object.  EBADF once closed, never a number
        that may name another connection by now."""
        cdef int fd
        sock = self.sock
        if sock is None:
            fd = self.fd
        elif type(sock) is accepted_socket_type:
            fd = accepted_socket_fd(sock)
        else:
            fd = sock.fileno()
        if fd < 0:
            raise os_error(EBADF)
        return fd

    def send(self, data):
        """``socket.send(data)``: the number of bytes the socket took
        (``BlockingIOError`` when none, whatever the socket's timeout);
        SIGPIPE is never raised."""
        cdef Py_buffer view
        cdef ssize_t sent
        cdef int fd
        cdef int error
        self.fd_now()
        # Exporting the buffer, like the signal handlers below, may run the
        # program's code (a class with __buffer__), which may close this
        # connection and open another on the same fd number: the fd is read
        # only after any such code, just before the send. Once a socket
        # object was made it owns the fd, but sending through its send()
        # would cost an argument parse and a method call per write: the fd
        # is asked of it instead, as socket.send itself reads its own.
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            while True:
                fd = self.fd_now()
                with nogil:
                    # MSG_DONTWAIT: the program may have made the socket
                    # blocking (get_extra_info), and the loop must not wait.
                    sent = c_send(fd, view.buf, <size_t>view.len, MSG_NOSIGNAL | MSG_DONTWAIT)
                    error = errno
                if sent >= 0:
                    return sent
                if error != EINTR:
                    raise os_error(error)
                PyErr_CheckSignals()
        finally:
            PyBuffer_Release(&view)

    def shutdown(self, int how):
        """``socket.shutdown(how)``."""
        if self.sock is not None:
            return self.sock.shutdown(how)
        if c_shutdown(self.fd_now(), how) != 0:
            raise os_error(errno)

    def setsockopt(self, int level, int name, int value):
        """``socket.setsockopt(level, name, value)`` for an int value."""
        if self.sock is not None:
            return self.sock.setsockopt(level, name, value)
        if c_setsockopt(self.fd_now(), level, name, &value, sizeof(value)) != 0:
            raise os_error(errno)

    def __repr__(self):
        return f"<AcceptedFd fd={self.fileno()}>"


# Its fileno() runs none of the program's code: the ring may ask it again
# just before it submits an SQE made with its number (Ring.drop_stale_fds).
trust_fd_owner(AcceptedFd)
