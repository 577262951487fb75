from libc.stdint cimport uint32_t, uint64_t

from iouzcrx._area cimport BufferOwner


cdef class SocketBufferPool(BufferOwner):
    cdef readonly uint32_t buffer_size
    cdef uint32_t *free_stack
    cdef uint32_t free_count
    cdef public object on_available
