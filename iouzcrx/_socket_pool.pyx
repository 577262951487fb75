# cython: language_level=3
"""socket mode: no io_uring at all.  The event loop's own transport reads
(recv_into) straight into area buffers handed out here, and the program gets
the same read-only views as in the io_uring modes."""

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

from iouzcrx._area cimport Area, BufferOwner, buffer_count

from iouzcrx import _checks


@cython.final
cdef class FillSlot:
    """Writable export of one free buffer, lent to the transport's recv_into."""
    cdef SocketBufferPool pool
    cdef char *data
    cdef Py_ssize_t length

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.data, self.length, 0, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef enum:
    # What became of each buffer: on the free stack, lent by take() to be
    # filled or put back, or out in views until the last one goes.
    FREE = 0
    LENT = 1
    OUT = 2
    # What a connection reads into while the pool is empty (until its reading
    # is paused); one per pool, as the loop fills and consumes it at once.
    SPARE_SIZE = 16 * 1024


cdef tuple STATE_NAMES = ("free", "lent (taken, not yet filled)", "out (filled, in views)")


@cython.final
@cython.no_gc_clear
cdef class SocketBufferPool(BufferOwner):
    """``area_size // buffer_size`` buffers over one area, reused LIFO (the
    most recently returned buffer is still warm in the cache).

    Each buffer taken must be either filled or put back, exactly once;
    anything else raises ValueError naming the buffer and its state.
    """

    def __init__(self, *, area_size, buffer_size, bint hugepages=False):
        self.begin_setup()
        cdef uint64_t count = buffer_count(_checks.size("area_size", area_size, _checks.PAGE_SIZE),
                                           _checks.size("buffer_size", buffer_size,
                                                        _checks.PAGE_SIZE,
                                                        _checks.MAX_BUFFER_SIZE))
        self.mode = "socket"
        self.area = Area(area_size, hugepages)
        self.buffer_size = buffer_size
        self.total_buffers = count
        self.starved_readers = set()
        self.spare = bytearray(min(buffer_size, SPARE_SIZE))
        self.free_stack = <uint32_t *>malloc(self.total_buffers * sizeof(uint32_t))
        self.states = <uint8_t *>calloc(self.total_buffers, sizeof(uint8_t))
        if self.free_stack == NULL or self.states == NULL:
            raise MemoryError()
        cdef uint32_t i
        for i in range(self.total_buffers):
            self.free_stack[i] = <uint32_t>(self.total_buffers - 1 - i)
        self.free_count = <uint32_t>self.total_buffers

    def __dealloc__(self):
        free(self.free_stack)
        self.free_stack = NULL
        free(self.states)
        self.states = NULL

    cdef void push_free(self, uint32_t index) noexcept:
        self.states[index] = FREE
        self.free_stack[self.free_count] = index
        self.free_count += 1
        if self.free_count == 1 and self.on_available is not None:
            try:
                self.on_available()
            except BaseException:
                pass  # a failed wake-up only delays the next read

    cdef void give_back(self, uint64_t token, uint32_t length) noexcept:
        # Only from the last view of a filled buffer (Buffer.return_to_owner).
        if self.states == NULL or token >= self.total_buffers or self.states[token] != OUT:
            return
        self.buffers_in_use -= 1
        self.buffers_returned += 1
        self.push_free(<uint32_t>token)

    cdef int check_lent(self, object index, str action) except -1:
        if not isinstance(index, int):
            raise TypeError(f"buffer index must be an int, not {type(index).__name__}")
        if not 0 <= index < self.total_buffers:
            raise ValueError(
                f"cannot {action} buffer {index}: this pool has buffers 0 to "
                f"{self.total_buffers - 1}")
        cdef uint8_t state = self.states[<uint32_t>index]
        if state != LENT:
            raise ValueError(
                f"cannot {action} buffer {index}: it is {STATE_NAMES[state]}; only a buffer "
                "from take() can be filled or put back, and only once")
        return 0

    @property
    def free_buffers(self):
        return self.free_count

    def take(self):
        """(index, writable view) of a free buffer, or None if all are in use.
        The buffer counts as in use until filled() hands it out or put_back()."""
        if self.free_count == 0:
            return None
        self.free_count -= 1
        cdef uint32_t index = self.free_stack[self.free_count]
        self.states[index] = LENT
        self.buffers_in_use += 1
        cdef FillSlot slot = FillSlot.__new__(FillSlot)
        slot.pool = self
        slot.data = self.area.base + <uint64_t>index * self.buffer_size
        slot.length = self.buffer_size
        return index, PyMemoryView_FromObject(slot)

    def filled(self, index, Py_ssize_t nbytes):
        """The read-only view over the first ``nbytes`` of buffer ``index``
        (lent by take()); the buffer comes back when the last view over it
        goes."""
        self.check_lent(index, "fill")
        if nbytes < 0 or nbytes > self.buffer_size:
            raise ValueError(
                f"cannot fill buffer {index} with {nbytes} bytes: a buffer holds 0 to "
                f"{self.buffer_size}")
        cdef uint32_t i = index
        self.states[i] = OUT
        self.bytes_received += nbytes
        self.chunks_received += 1
        return self.export(self.area.base + <uint64_t>i * self.buffer_size, nbytes, i)

    def put_back(self, index):
        """Return a buffer taken but never filled."""
        self.check_lent(index, "put back")
        self.buffers_in_use -= 1
        self.buffers_returned += 1
        self.push_free(<uint32_t>index)
