# cython: language_level=3
"""Receiving when the event loop says a socket is readable.

A request/response connection reads a little, answers, and waits again.
Waiting on a multishot receive costs the kernel more per wake-up than
waiting on the socket itself (``benchmarks/wakeups.py``: the ring's wait
against epoll and ``recv``), so the buffer-ring transport serves such
connections the way uvloop does: the loop watches the socket and a
readable socket is read here, straight into ``bytes`` for ``data_received``
(or a view over them, for a protocol that takes any view) or into
``get_buffer()`` memory (asked for with uvloop's hint, 64 KiB).  Two reads
in a row that take a whole ``BULK_READ`` tell that the peer streams: the
transport then goes back to the multishot receive, which costs less per
byte.  (One is not enough: a short connection that sends 64 KiB and closes
would pay for both ways.)

Only connections whose fd the ring's accept made (``AcceptedFd``) are read
this way: the fd is asked of its owner at each read, and a socket object
the program was given tells the transport before it closes the fd
(``AcceptedSocket.on_release``), so the loop never watches a number that
names another file by then.
"""

cimport cython
from cpython.buffer cimport PyBuffer_Release
from cpython.bytes cimport PyBytes_AS_STRING
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.object cimport PyObject
from cpython.ref cimport Py_XDECREF
from libc.stdint cimport uint64_t

from iouzcrx._copy cimport export_protocol_buffer
from iouzcrx._receive cimport AcceptedFd, ReceiveQueue

import os as _os

from iouzcrx.errors import WrongProcess
from iouzcrx._receive import delivery_methods as _delivery_methods

__all__ = ["BULK_READ", "ReadinessReceiver"]


cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_recv "recv"(int fd, void *buf, size_t length, int flags)
    enum:
        # Whether or not the program made the socket blocking
        # (get_extra_info): a read by readiness never waits.
        MSG_DONTWAIT

cdef extern from "Python.h":
    # Declared to return the new reference as a pointer: it is resized in
    # place before it becomes an object.
    PyObject *new_bytes "PyBytes_FromStringAndSize"(
        const char *data, Py_ssize_t length) except NULL
    int _PyBytes_Resize(PyObject **data, Py_ssize_t length) except -1

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR


cdef enum:
    # What one read takes at most for a bytes protocol, and what a read must
    # take to count as bulk.
    READ_SIZE = 65536
    DELIVER_BYTES = 1
    DELIVER_BUFFERED = 2
    DELIVER_VIEWS = 3             # a view over the bytes read


BULK_READ = READ_SIZE

# This process's pid, kept by a fork hook: a receiver made before a fork
# must not read its parent's sockets in the child (getpid() would cost a
# system call per read).
cdef long current_pid = _os.getpid()


def _forked():
    global current_pid
    current_pid = _os.getpid()


_os.register_at_fork(after_in_child=_forked)


@cython.final
cdef class ReadinessReceiver:
    """Reads one connection when its socket is readable (``on_readable``,
    the loop's reader callback) and hands the data to its protocol.

    What it reads counts in ``queue``'s statistics, as a receive's would.
    ``on_end(error)`` is called once when the socket says EOF (``error`` is
    None, ``eof`` True) or fails; ``on_error(exc)`` when the protocol raised;
    ``on_bulk()`` after the second read in a row that took ``BULK_READ``
    bytes;
    ``on_forked(exc)`` instead of reading, in a process forked after it was
    made.  After ``close()`` it reads nothing more and calls nobody."""

    cdef AcceptedFd sock
    cdef ReceiveQueue queue       # counts what it reads, as its receives do
    cdef int delivery_kind
    cdef object method            # data_received, view_received or get_buffer
    cdef object updated           # buffer_updated
    cdef object on_end
    cdef object on_error
    cdef object on_bulk
    cdef object on_forked
    cdef long pid
    cdef readonly bint finished
    cdef readonly bint eof
    cdef bint last_read_full
    cdef readonly uint64_t bytes_received
    cdef readonly uint64_t reads

    def __cinit__(self, ReceiveQueue queue not None, AcceptedFd sock not None, on_end, on_error,
                  on_bulk, on_forked):
        self.queue = queue
        self.sock = sock
        self.on_end = on_end
        self.on_error = on_error
        self.on_bulk = on_bulk
        self.on_forked = on_forked
        self.pid = current_pid

    def set_protocol_delivery(self, protocol, methods=None):
        """Deliver to ``protocol`` from the next read on (``methods``: its
        ``delivery_methods``, if already looked up).  A protocol that wants
        views gets read-only views over the bytes read, never over the
        area: the transport reads this way only for those that say any view
        will do."""
        kind, method, updated = _delivery_methods(protocol) if methods is None else methods
        if kind == "bytes":
            self.delivery_kind = DELIVER_BYTES
        elif kind == "buffered":
            self.delivery_kind = DELIVER_BUFFERED
        else:
            self.delivery_kind = DELIVER_VIEWS
        self.method = method
        self.updated = updated

    def close(self):
        """Read no more and call nobody; closing twice does nothing."""
        self.finished = True
        self.method = self.updated = None
        self.on_end = self.on_error = self.on_bulk = self.on_forked = None

    def on_readable(self):
        """Read the socket once and deliver what came (the loop calls it
        while the socket is readable, so one read per call is enough)."""
        cdef ssize_t n
        cdef int error = 0
        cdef int fd
        cdef Py_buffer target
        cdef PyObject *raw
        cdef char *into
        if self.finished:
            return
        if self.pid != current_pid:
            # A forked child runs its parent's loop: the socket is the
            # parent's connection, and so is the data.
            on_forked = self.on_forked
            if on_forked is not None:
                on_forked(WrongProcess("a forked child ran its parent's event loop, which "
                                       "reads the parent's connections"))
            return
        # Held: a callback that closes the connection drops the receiver's,
        # and an exception it raises after that must still be reported.
        on_error = self.on_error
        try:
            fd = self.sock.fd_now()
        except OSError as exc:
            self.end(exc)
            return
        if self.delivery_kind != DELIVER_BUFFERED:
            # Read into a bytes object of the largest size, cut to what came
            # (realloc shrinks in place): no copy, and nothing on the C stack.
            raw = new_bytes(NULL, READ_SIZE)
            into = PyBytes_AS_STRING(<object>raw)
            with nogil:
                n = c_recv(fd, into, READ_SIZE, MSG_DONTWAIT)
                if n < 0:
                    error = errno
            if n <= 0:
                Py_XDECREF(raw)
            else:
                self.received(n)
                if n < READ_SIZE:
                    _PyBytes_Resize(&raw, n)  # on failure it freed raw
                data = <object>raw  # a reference of its own
                Py_XDECREF(raw)
                if self.delivery_kind == DELIVER_VIEWS:
                    data = PyMemoryView_FromObject(data)
                try:
                    self.method(data)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self.protocol_failed(exc, on_error)
                    return
        else:
            # The buffer is the protocol's that get_buffer() came from, even
            # if the call handed the connection to another one.
            updated = self.updated
            try:
                export_protocol_buffer(self.method(READ_SIZE), &target, READ_SIZE)
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self.protocol_failed(exc, on_error)
                return
            if self.finished:  # get_buffer() closed the connection
                PyBuffer_Release(&target)
                return
            # The fd again: get_buffer() may have let the program go.
            try:
                fd = self.sock.fd_now()
            except OSError as exc:
                PyBuffer_Release(&target)
                self.end(exc)
                return
            with nogil:
                n = c_recv(fd, target.buf, <size_t>target.len, MSG_DONTWAIT)
                if n < 0:
                    error = errno
            PyBuffer_Release(&target)
            if n > 0:
                self.received(n)
                try:
                    updated(n)
                except (SystemExit, KeyboardInterrupt):
                    raise
                except BaseException as exc:
                    self.protocol_failed(exc, on_error)
                    return
        if n == 0:
            self.eof = True
            self.end(None)
        elif n < 0:
            if error != EAGAIN and error != EINTR:  # EWOULDBLOCK is EAGAIN on Linux
                self.end(OSError(error, _os.strerror(error)))
        elif n < READ_SIZE:
            self.last_read_full = False
        elif not self.last_read_full:
            self.last_read_full = True
        elif not self.finished:
            on_bulk = self.on_bulk
            if on_bulk is not None:
                on_bulk()

    cdef inline void received(self, ssize_t n) noexcept:
        cdef ReceiveQueue queue = self.queue
        self.reads += 1
        self.bytes_received += <uint64_t>n
        queue.bytes_received += <uint64_t>n
        queue.chunks_received += 1
        queue.deliveries += 1

    cdef int end(self, object error) except -1:
        on_end = self.on_end
        self.close()
        if on_end is not None:
            on_end(error)
        return 0

    cdef int protocol_failed(self, BaseException exc, object on_error) except -1:
        # Even when the callback closed the connection first: the transport
        # reports it (and its close is done already).
        if on_error is not None:
            on_error(exc)
        return 0

    def __repr__(self):
        return (f"<ReadinessReceiver {'finished' if self.finished else 'reading'} "
                f"bytes={self.bytes_received} reads={self.reads}>")
