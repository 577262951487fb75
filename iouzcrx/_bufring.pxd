from libc.stdint cimport uint16_t, uint32_t

from iouzcrx._abi cimport iouz_buf
from iouzcrx._receive cimport ReceiveQueue


cdef class BufRingQueue(ReceiveQueue):
    cdef readonly uint16_t buffer_group
    cdef readonly uint32_t buffer_size
    cdef readonly uint32_t ring_entries
    cdef iouz_buf *bufs
    cdef size_t bufs_size
    cdef uint16_t *ring_tail
    cdef uint16_t local_tail
    cdef uint32_t mask
    cdef bint registered
