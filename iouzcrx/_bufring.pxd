from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t


ctypedef struct SpareRow:
    uint32_t bid        # the first of a row of adjacent free buffers
    uint32_t count

from iouzcrx._abi cimport iouz_buf
from iouzcrx._receive cimport ReceiveQueue, Receiver


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
    cdef readonly bint incremental    # IOU_PBUF_RING_INC: buffers are consumed in parts
    cdef readonly object incremental_refused  # why the kernel refused it, or None
    # Incremental ring, per buffer id: bytes the kernel has filled of a buffer
    # it will fill more of, and the references that keep the buffer from the
    # ring (the kernel's while it fills it, one per view over any part of it).
    cdef uint32_t *consumed
    cdef uint32_t *refs
    # Free buffers kept back from the ring, as rows of adjacent buffers, the
    # last returned on top: the ring holds at most ``window`` buffers the
    # kernel has not taken, so that it fills buffers still in the cache
    # rather than cycling through the whole area.
    cdef SpareRow *spares
    cdef uint32_t spare_rows
    cdef uint32_t spare_count         # buffers in all rows
    cdef readonly uint32_t window
    # The most buffers in use so far, taken before buffers go back (the
    # peak_buffers_in_use property takes the present count too): a chunk
    # that arrives only adds to buffers_in_use.
    cdef uint64_t peak_in_use

    cdef int after_data(self, Receiver receiver, int32_t res, uint32_t flags) except -1
    cdef void release_part(self, uint32_t bid) noexcept
