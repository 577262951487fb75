from cpython.pythread cimport PyThread_type_lock
from libc.stdint cimport uint32_t, uint64_t

from iouzcrx._abi cimport iouz_zcrx_rqe, iouz_zcrx_stats
from iouzcrx._receive cimport ReceiveQueue
from iouzcrx._ring cimport Request


cdef class ZcrxQueue


cdef class RefillRing:
    cdef char *region
    cdef size_t region_size
    cdef uint32_t *rq_head
    cdef uint32_t *rq_tail
    cdef iouz_zcrx_rqe *rqes
    cdef uint32_t rq_entries
    cdef uint32_t rq_mask
    # Under lock:
    cdef PyThread_type_lock lock
    cdef uint32_t local_tail
    cdef uint32_t flushed_tail       # local_tail at the last flush
    cdef uint64_t epoch              # moves when returns reach the kernel
    cdef list sharers                # weak references to the queues using it

    cdef int acquire(self) except -1
    cdef void release(self) noexcept
    cdef int returns_reached_kernel(self, ZcrxQueue by) except -1


cdef class ZcrxExport:
    cdef int fd
    cdef ZcrxQueue source
    cdef readonly str mode


cdef class ZcrxEvents(Request):
    cdef readonly uint64_t copy_events
    cdef readonly uint64_t alloc_fail_events
    cdef readonly uint64_t unknown_events
    cdef uint32_t fired              # types that fired and are not armed again


cdef class ZcrxQueue(ReceiveQueue):
    cdef readonly uint32_t zcrx_id
    cdef readonly uint32_t rq_entries
    cdef readonly uint32_t chunk_size
    cdef readonly object interface
    cdef readonly object queue
    cdef readonly bint can_flush
    cdef readonly uint64_t flushes
    cdef RefillRing refill
    cdef uint64_t refill_epoch       # refill.epoch as this queue last saw it
    cdef bint flush_after_publish    # nothing but a flush drains the refill ring
    # Kernel events and counters (7.2+); NULL/None without them.
    cdef iouz_zcrx_stats *kernel_stats   # inside region
    cdef readonly ZcrxEvents events
    cdef readonly object kernel_stats_missing
    cdef readonly uint64_t event_rearms
    cdef uint64_t events_armed_at

    cdef int rearm_events(self, bint now) except -1

    cdef int attach(self, features) except -1
    cdef int publish_locked(self, RefillRing refill, bint copy_mode) except -1
    cdef int order_for_freelist(self) except -1
    cdef int flush_with_lock(self) except -1
    cdef int flush_refill_ring(self) except -1
