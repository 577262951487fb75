# cython: language_level=3
"""socket mode: no io_uring at all.  The event loop's own transport reads
(recv_into) straight into area buffers handed out here, and the program gets
the same read-only views as in the io_uring modes."""

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from iouzcrx._area cimport Area, BufferOwner, buffer_count


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


@cython.final
@cython.no_gc_clear
cdef class SocketBufferPool(BufferOwner):
    """``area_size // buffer_size`` buffers over one area, reused LIFO (the
    most recently returned buffer is still warm in the cache)."""

    def __init__(self, *, size_t area_size, uint32_t buffer_size, bint hugepages=False):
        cdef uint64_t count = buffer_count(area_size, buffer_size)
        self.mode = "socket"
        self.area = Area(area_size, hugepages)
        self.buffer_size = buffer_size
        self.total_buffers = count
        self.free_stack = <uint32_t *>malloc(self.total_buffers * sizeof(uint32_t))
        if self.free_stack == NULL:
            raise MemoryError()
        cdef uint32_t i
        for i in range(self.total_buffers):
            self.free_stack[i] = <uint32_t>(self.total_buffers - 1 - i)
        self.free_count = <uint32_t>self.total_buffers

    def __dealloc__(self):
        free(self.free_stack)
        self.free_stack = NULL

    cdef void give_back(self, uint64_t token, uint32_t length) noexcept:
        self.buffers_in_use -= 1
        self.buffers_returned += 1
        self.free_stack[self.free_count] = <uint32_t>token
        self.free_count += 1
        if self.free_count == 1 and self.on_available is not None:
            try:
                self.on_available()
            except BaseException:
                pass  # a failed wake-up only delays the next read

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
        self.buffers_in_use += 1
        cdef FillSlot slot = FillSlot.__new__(FillSlot)
        slot.pool = self
        slot.data = self.area.base + <uint64_t>index * self.buffer_size
        slot.length = self.buffer_size
        return index, PyMemoryView_FromObject(slot)

    def filled(self, uint32_t index, Py_ssize_t nbytes):
        """The read-only view over the first ``nbytes`` of buffer ``index``;
        the buffer comes back when the last view over it goes."""
        if index >= self.total_buffers or nbytes < 0 or nbytes > self.buffer_size:
            raise ValueError(f"bad fill of buffer {index} with {nbytes} bytes")
        self.bytes_received += nbytes
        self.chunks_received += 1
        return self.export(self.area.base + <uint64_t>index * self.buffer_size, nbytes, index)

    def put_back(self, uint32_t index):
        """Return a buffer taken but never filled."""
        self.give_back(index, 0)
