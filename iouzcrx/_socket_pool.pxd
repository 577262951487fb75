from libc.stdint cimport uint32_t, uint64_t

from iouzcrx._area cimport BufferOwner


cdef class SocketBufferPool(BufferOwner):
    cdef readonly str mode
    cdef readonly uint32_t buffer_size
    cdef readonly uint64_t total_buffers
    cdef readonly uint64_t buffers_in_use
    cdef readonly uint64_t buffers_returned
    cdef readonly uint64_t bytes_received
    cdef readonly uint64_t chunks_received
    cdef uint32_t *free_stack
    cdef uint32_t free_count
    cdef public object on_available
