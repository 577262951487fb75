# cython: language_level=3
"""The stream reader: received chunks buffered in arrival order and read by
coroutines, as ``asyncio.StreamReader`` reads its bytearray.

A read keeps a position into the first chunk instead of slicing the rest
off, answers with a slice of one chunk when it can and copies only what
spans chunks.  ``readuntil`` remembers how far the buffer was searched for
its separator, so that each wake-up searches only what arrived since.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.string cimport memchr, memcmp

from iouzcrx._copy cimport copy_to_bytearray, iouz_copy

import asyncio

cdef extern from "Python.h":
    # Macros over a memoryview's own Py_buffer and a bytearray's storage:
    # the chunks are known to be exactly these types, so no checks.
    Py_buffer *PyMemoryView_GET_BUFFER(object view)
    Py_ssize_t PyByteArray_GET_SIZE(object array)
    bint PyByteArray_CheckExact(object obj)
    bint PyBytes_CheckExact(object obj)
    int PyBuffer_IsContiguous(const Py_buffer *view, char order)

cdef extern from "string.h":
    # GNU, declared by <string.h> because Python.h defines _GNU_SOURCE.
    void *memmem(const void *haystack, size_t haystack_len,
                 const void *needle, size_t needle_len)


DEFAULT_LIMIT = 1 << 20  # buffered bytes before the reader pauses the transport

# Chunks already read are set to None and skipped by an index; the list is
# cut only once that many are dead and they are at least half of it, so that
# reading a chunk never moves the others.
cdef Py_ssize_t COMPACT_AFTER = 32

cdef bytes NEWLINE = b"\n"
cdef object IncompleteReadError = asyncio.IncompleteReadError
cdef object LimitOverrunError = asyncio.LimitOverrunError
get_running_loop = asyncio.get_running_loop  # a module global, so that tests can count its use


def check_limit(limit):
    """Raise TypeError or ValueError unless ``limit`` is a positive int."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise TypeError(f"limit must be a positive int (bytes), not {limit!r}")
    if limit <= 0:
        raise ValueError(f"limit must be a positive int (bytes), not {limit}")


cdef inline const char *chunk_data(object chunk, Py_ssize_t *length):
    """A buffered chunk's bytes: a contiguous byte memoryview of our own, or
    (first in line only) the bytearray a spill made."""
    cdef Py_buffer *buf
    if PyByteArray_CheckExact(chunk):
        length[0] = PyByteArray_GET_SIZE(chunk)
        return PyByteArray_AS_STRING(chunk)
    buf = PyMemoryView_GET_BUFFER(chunk)
    length[0] = buf.len
    return <const char *>buf.buf


cdef object own_view(object data):
    """A memoryview of our own over ``data``: one that nobody else can
    release while its memory is read through the pointer it holds."""
    cdef object view = PyMemoryView_FromObject(data)
    cdef Py_buffer *buf = PyMemoryView_GET_BUFFER(view)
    if buf.itemsize != 1 or buf.ndim != 1 or not PyBuffer_IsContiguous(buf, b'C'):
        # Not plain bytes in one run: what is read is its bytes, in order.
        view = PyMemoryView_FromObject(view.tobytes())
    return view


cdef inline Py_ssize_t find_inside(const char *data, Py_ssize_t length,
                                   const char *separator, Py_ssize_t width) noexcept:
    """Offset of the first ``separator`` wholly inside ``data``, or -1."""
    cdef const char *hit
    if width == 1:
        hit = <const char *>memchr(data, separator[0], length)
    else:
        hit = <const char *>memmem(data, length, separator, width)
    return hit - data if hit != NULL else -1


cdef class ZcrxStreamReader:
    """Buffered views of one connection, consumed by coroutines.

    Shaped like ``asyncio.StreamReader``; ``async for view in reader``
    yields the received views themselves. ``read``, ``readexactly``,
    ``readuntil`` and ``readline`` return a ``memoryview`` slice when the
    answer lies inside one received chunk, and copy into ``bytes`` only when
    it spans chunks. More than twice ``limit`` bytes buffered pause the
    transport until reads take them. ``readuntil`` and ``readline`` search
    only what arrived since their last look. One coroutine at a time may
    wait on a reader: a second gets ``RuntimeError``, as with asyncio's.
    """

    cdef readonly Py_ssize_t _limit
    # Chunks in arrival order from _chunks[_head], _pos bytes of the first
    # already read; every chunk is a memoryview of our own, except that the
    # first may be a bytearray holding a copy of chunks given up while the
    # connection's receive was stalled.
    cdef list _chunks
    cdef Py_ssize_t _head
    cdef Py_ssize_t _pos
    cdef readonly Py_ssize_t _size
    # How far readuntil searched the buffer (from the read position) for
    # _separator: every separator that starts before it was ruled out.
    cdef bytes _separator
    cdef readonly Py_ssize_t _searched
    cdef bint _eof
    cdef bint _paused
    cdef object _exception
    cdef object _waiter
    # The transport's loop, where its data arrives, for the futures reads
    # wait on: asyncio.get_running_loop() makes a getpid() system call each
    # time on CPython 3.11, once per request in a request/response server.
    cdef object _loop
    cdef object _transport
    cdef object _pins  # the transport's PinAccount, if it has one
    cdef object __weakref__

    def __init__(self, limit=DEFAULT_LIMIT):
        if self._chunks is not None:
            # Called again: views and counts would part ways.
            raise RuntimeError("this ZcrxStreamReader is set up already: make a new one")
        check_limit(limit)
        self._limit = limit
        self._chunks = []

    def __repr__(self):
        return f"<ZcrxStreamReader {self._size} bytes{' eof' if self._eof else ''}>"

    # -- fed by the protocol ---------------------------------------------------------

    def set_transport(self, transport):
        """Called by the connection's protocol with its transport."""
        self._transport = transport
        self._loop = getattr(transport, "_loop", None)
        pins = transport.get_extra_info("pin_account")
        if pins is not None:
            # A stall (this connection's views at their share of the area,
            # or the area exhausted) wakes a waiting read, which then gives
            # up its views so that the receive can go on.
            pins.on_stall = self._wake
            self._pins = pins

    def feed_view(self, view):
        """Called by the connection's protocol with each received view."""
        cdef Py_ssize_t length
        view = own_view(view)
        chunk_data(view, &length)
        if length == 0:
            return
        self._chunks.append(view)
        self._size += length
        self._wakeup()
        # Views hold area buffers: stop reading rather than hoard the area.
        if not self._paused and self._transport is not None and self._size > 2 * self._limit:
            self._paused = True
            self._transport.pause_reading()

    def feed_eof(self):
        """Called by the connection's protocol when the peer closed its side."""
        self._eof = True
        self._wakeup()

    def _release_area(self):
        """The connection is gone: what is still buffered stays readable,
        but as a copy, so that its buffers go back to the shared area now
        (not when the program, or the GC, drops this reader)."""
        if self._pins is not None:
            self._pins.on_stall = None
            self._pins = None
        self._spill()

    def set_exception(self, exc):
        """Make waiting and later reads raise ``exc``."""
        self._exception = exc
        self._wakeup()

    def exception(self):
        """The exception reads raise, if any."""
        return self._exception

    def at_eof(self):
        """Whether the peer closed its side and everything was read."""
        return self._eof and self._size == 0

    def _wake(self):
        self._wakeup()

    cdef int _wakeup(self) except -1:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return 0

    cdef object _new_waiter(self, str reading):
        """The future a read awaits for more data (after resuming a paused
        transport and giving up stalled views, without which it could wait
        for ever)."""
        if self._exception is not None:
            raise self._exception
        if self._waiter is not None:
            raise RuntimeError(
                f"{reading}() called while another coroutine is already waiting "
                "for data on this reader: read it from one coroutine at a time")
        if self._paused and self._transport is not None:
            # The caller needs more than is buffered (readexactly of more than
            # the limit, say): reading must go on or this waits forever.
            self._paused = False
            self._transport.resume_reading()
        if self._pins is not None and self._pins.stalled and self._size:
            # The read needs more than the views this connection may pin (or
            # than the area has left): copy them out, so that their buffers
            # go back and the receive resumes, rather than wait for ever.
            self._spill()
        loop = self._loop
        if loop is None:
            loop = get_running_loop()  # no transport of ours (yet)
        waiter = self._waiter = loop.create_future()
        return waiter

    # -- the buffer ----------------------------------------------------------------------

    cdef inline void _drop_first(self) noexcept:
        """Forget the first chunk (all of it read): its buffer goes back as
        soon as no slice handed out holds it."""
        cdef Py_ssize_t count = len(self._chunks)
        self._chunks[self._head] = None
        self._head += 1
        self._pos = 0
        if self._head == count:
            del self._chunks[:]
            self._head = 0
        elif self._head >= COMPACT_AFTER and 2 * self._head >= count:
            del self._chunks[:self._head]
            self._head = 0

    cdef int _consumed(self, Py_ssize_t n) except -1:
        self._size -= n
        # Positions count from the read position: the search resumes where it
        # was, n bytes nearer.
        self._searched = self._searched - n if self._searched > n else 0
        if self._paused and self._size <= self._limit and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return 0

    cdef int _spill(self) except -1:
        """Replace every buffered chunk by one bytearray holding their bytes."""
        cdef Py_ssize_t length, i, end
        cdef const char *data
        if self._size == 0:
            return 0
        first = self._chunks[self._head]
        if PyByteArray_CheckExact(first):
            if self._head + 1 == len(self._chunks):
                return 0  # nothing but our own copy is buffered
            spilled = first
            if self._pos:
                # bytearray drops a prefix without moving the rest.
                del spilled[:self._pos]
        else:
            data = chunk_data(first, &length)
            spilled = copy_to_bytearray(data + self._pos, length - self._pos)
        # Grown once to every buffered byte, then the later chunks copied in.
        end = PyByteArray_GET_SIZE(spilled)
        PyByteArray_Resize(spilled, self._size)
        for i in range(self._head + 1, len(self._chunks)):
            data = chunk_data(self._chunks[i], &length)
            iouz_copy(PyByteArray_AS_STRING(spilled) + end, data, <size_t>length)
            end += length
        assert end == self._size
        self._chunks = [spilled]
        self._head = 0
        self._pos = 0
        return 0

    cdef object _take(self, Py_ssize_t n):
        """Remove the first ``n`` buffered bytes (0 < n <= buffered): a slice
        of the first chunk if it holds them all, else a copy."""
        cdef Py_ssize_t length, part, done = 0
        cdef const char *data
        cdef char *out
        first = self._chunks[self._head]
        data = chunk_data(first, &length)
        if length - self._pos >= n:
            if PyByteArray_CheckExact(first):
                result = PyBytes_FromStringAndSize(data + self._pos, n)
            elif self._pos == 0 and length == n:
                result = first
            else:
                result = first[self._pos:self._pos + n]
            self._pos += n
            if self._pos == length:
                self._drop_first()
            self._consumed(n)
            return result
        result = PyBytes_FromStringAndSize(NULL, n)
        out = PyBytes_AS_STRING(result)
        while done < n:
            data = chunk_data(self._chunks[self._head], &length)
            part = min(length - self._pos, n - done)
            iouz_copy(out + done, data + self._pos, <size_t>part)
            done += part
            self._pos += part
            if self._pos == length:
                self._drop_first()
        self._consumed(n)
        return result

    cdef int _discard(self, Py_ssize_t n) except -1:
        """Remove the first ``n`` buffered bytes (0 <= n <= buffered) unread:
        no copy, and their buffers go back as no slice holds them."""
        cdef Py_ssize_t length, part, left = n
        while left:
            chunk_data(self._chunks[self._head], &length)
            part = min(length - self._pos, left)
            left -= part
            self._pos += part
            if self._pos == length:
                self._drop_first()
        self._consumed(n)
        return 0

    cdef object _take_first(self):
        """Remove the rest of the first chunk, as a read-only memoryview."""
        cdef Py_ssize_t length
        first = self._chunks[self._head]
        chunk_data(first, &length)
        n = length - self._pos
        if PyByteArray_CheckExact(first):
            if self._pos:
                del first[:self._pos]
            result = memoryview(first).toreadonly()
        elif self._pos:
            result = first[self._pos:]
        else:
            result = first
        self._drop_first()
        self._consumed(n)
        return result

    cdef int _matches_across(self, Py_ssize_t index, Py_ssize_t offset,
                             const char *separator, Py_ssize_t width) except -2:
        """Whether ``separator`` starts at ``offset`` of chunk ``index`` and
        runs on into the next chunks: 1, 0, or -1 if the buffer ends first."""
        cdef Py_ssize_t length, part, done = 0
        cdef Py_ssize_t count = len(self._chunks)
        cdef const char *data
        while True:
            data = chunk_data(self._chunks[index], &length)
            part = min(length - offset, width - done)
            if memcmp(data + offset, separator + done, part) != 0:
                return 0
            done += part
            if done == width:
                return 1
            index += 1
            offset = 0
            if index == count:
                return -1

    cdef Py_ssize_t _find(self, bytes separator) except -2:
        """Bytes up to and including the first ``separator``, or -1.

        Starts where the previous search for the same separator stopped: the
        first position where a separator could still start, which is at most
        ``len(separator) - 1`` bytes before the end of what was buffered.
        """
        cdef const char *needle = PyBytes_AS_STRING(separator)
        cdef Py_ssize_t width = len(separator)
        cdef Py_ssize_t count = len(self._chunks)
        cdef Py_ssize_t index = self._head
        cdef Py_ssize_t base = -self._pos  # read position of chunk index's first byte
        cdef Py_ssize_t start, length, offset, hit
        cdef int matched
        cdef const char *data
        if separator is not self._separator and separator != self._separator:
            self._separator = separator
            self._searched = 0
        start = self._searched
        while index < count:
            data = chunk_data(self._chunks[index], &length)
            if base + length <= start:
                base += length
                index += 1
                continue
            offset = start - base
            if length - offset >= width:
                hit = find_inside(data + offset, length - offset, needle, width)
                if hit >= 0:
                    return base + offset + hit + width
                offset = length - width + 1
            # The last width - 1 positions: a separator there runs into the
            # next chunks (or is not all here yet).
            while offset < length:
                if data[offset] == needle[0]:
                    matched = self._matches_across(index, offset, needle, width)
                    if matched > 0:
                        return base + offset + width
                    if matched < 0:
                        self._searched = base + offset
                        return -1
                offset += 1
            base += length
            start = base
            index += 1
        self._searched = self._size
        return -1

    cdef object _until(self, bytes separator, bint partial_at_eof):
        """readuntil's answer if it has one now, else None."""
        cdef Py_ssize_t width = len(separator)
        cdef Py_ssize_t end = self._find(separator)
        # As asyncio's reader: past the limit is where the separator starts,
        # or, while none is found, where the next one could start.
        if end >= 0:
            if end - width > self._limit:
                raise LimitOverrunError(
                    "Separator is found, but chunk is longer than limit", end - width
                )
            return self._take(end)
        if self._size + 1 - width > self._limit:
            raise LimitOverrunError(
                "Separator is not found, and chunk exceed the limit", self._size + 1 - width
            )
        if self._eof:
            partial = self._take(self._size) if self._size else b""
            if partial_at_eof:
                return bytes(partial)  # as the partial of IncompleteReadError
            raise IncompleteReadError(bytes(partial), None)
        return None

    # -- the coroutine API ---------------------------------------------------------------

    def __aiter__(self):
        return self

    async def __anext__(self):
        while self._size == 0:
            if self._eof:
                raise StopAsyncIteration
            waiter = self._new_waiter("__anext__")
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._take_first()

    async def read(self, Py_ssize_t n=-1):
        """Up to ``n`` bytes (all until EOF if ``n < 0``); empty at EOF."""
        cdef Py_ssize_t length
        if n == 0:
            return b""
        if n < 0:
            while not self._eof:
                waiter = self._new_waiter("read")
                try:
                    await waiter
                finally:
                    if self._waiter is waiter:
                        self._waiter = None
            return self._take(self._size) if self._size else b""
        while self._size == 0:
            if self._eof:
                return b""
            waiter = self._new_waiter("read")
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        chunk_data(self._chunks[self._head], &length)
        return self._take(min(n, length - self._pos))

    async def readexactly(self, Py_ssize_t n):
        """Exactly ``n`` bytes: a slice of one view when they lie in one, else a
        copy. ``asyncio.IncompleteReadError`` if EOF comes first."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        while self._size < n:
            if self._eof:
                partial = self._take(self._size) if self._size else b""
                raise IncompleteReadError(bytes(partial), n)
            waiter = self._new_waiter("readexactly")
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._take(n) if n else b""

    async def readuntil(self, separator=b"\n"):
        """The bytes up to and including ``separator``: a slice of one view when
        they lie in one, else a copy. ``asyncio.LimitOverrunError`` past the
        reader's limit, ``asyncio.IncompleteReadError`` if EOF comes first."""
        if not PyBytes_CheckExact(separator):
            if not isinstance(separator, (bytes, bytearray, memoryview)):
                raise TypeError(f"separator must be bytes, not {separator!r}")
            separator = bytes(separator)
        if not separator:
            raise ValueError("Separator should be at least one-byte string")
        while True:
            line = self._until(separator, False)
            if line is not None:
                return line
            waiter = self._new_waiter("readuntil")
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None

    async def readline(self):
        """One line, ending with the newline unless EOF came first.

        A line longer than the limit raises ``ValueError`` and is dropped, as
        asyncio's reader does: up to its newline if one came, else all that
        is buffered. The next call reads on after it."""
        cdef Py_ssize_t end
        while True:
            try:
                line = self._until(NEWLINE, True)
            except LimitOverrunError as exc:
                end = self._find(NEWLINE)
                self._discard(end if end >= 0 else self._size)
                raise ValueError(exc.args[0]) from None
            if line is not None:
                return line
            waiter = self._new_waiter("readline")
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
