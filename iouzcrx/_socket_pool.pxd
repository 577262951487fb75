from libc.stdint cimport uint8_t, uint32_t, uint64_t

from iouzcrx._area cimport BufferOwner


cdef class SocketBufferPool(BufferOwner):
    cdef readonly uint32_t buffer_size
    cdef uint32_t *free_stack
    cdef uint32_t free_count
    cdef uint8_t *states
    cdef public object on_available
    cdef readonly set starved_readers
    cdef readonly bytearray spare
    cdef int check_lent(self, object index, str action) except -1
    cdef void push_free(self, uint32_t index) noexcept
