from libc.stdint cimport uint32_t, uint64_t

from iouzcrx._ring cimport RingClient


cdef class Area:
    """Page-aligned anonymous memory the kernel writes received data into."""
    cdef char *base
    cdef readonly size_t size
    cdef size_t mapped                # size, rounded up to whole 2 MiB pages for THP
    cdef readonly bint hugepages      # reserved (hugetlb) huge pages
    cdef readonly bint transparent_hugepages
    cdef readonly size_t page_size    # of the pages backing it: 4 KiB or 2 MiB
    cdef int check_huge(self, size_t contiguous) except -1


cdef class PinAccount


cdef class BufferOwner(RingClient):
    """Hands out views over its area; takes each buffer back exactly once.
    The counters are kept by the backends (they know when a buffer is lent)."""
    cdef readonly Area area
    cdef readonly str mode
    cdef readonly uint64_t total_buffers
    cdef readonly uint64_t buffers_in_use
    cdef readonly uint64_t buffers_returned
    cdef readonly uint64_t bytes_received
    cdef readonly uint64_t chunks_received
    cdef readonly uint64_t deliveries
    cdef bint setup_begun
    cdef int begin_setup(self) except -1
    cdef void give_back(self, uint64_t token, uint32_t length) noexcept
    cdef void give_back_run(self, uint64_t token, uint32_t count, uint32_t first_length,
                            Py_ssize_t length) noexcept
    cdef void pins_released(self) noexcept
    cdef object export(self, char *data, Py_ssize_t length, uint64_t token)
    cdef object export_run(self, char *data, Py_ssize_t length, uint64_t token,
                           uint32_t count, uint32_t first_length)
    cdef object export_pinned(self, char *data, Py_ssize_t length, uint64_t token,
                              uint32_t count, uint32_t first_length, PinAccount account)


cdef class PinAccount:
    """The area buffers pinned by the views of one connection, against its
    share of the area.  It outlives the connection's receives (a paused
    transport starts a new one), so the bound holds across them."""
    cdef readonly uint64_t pinned
    cdef readonly uint64_t limit
    cdef readonly bint stalled        # the receive waits for pins or buffers to go
    # Called (no argument) when the receive starts waiting, after the last
    # view it delivers before then.
    cdef public object on_stall
    cdef int stall(self) except -1


cdef class Buffer:
    """Exporter of received data: one chunk, or a run of adjacent chunks
    (``buffers`` of them, the first identified by ``token``).  The memoryviews
    handed to users are its only exports; when the last is released every
    buffer of it goes back to its owner, and it exports nothing again."""
    cdef BufferOwner owner
    cdef char *data
    cdef Py_ssize_t length
    cdef uint64_t token
    cdef readonly uint32_t buffers
    cdef uint32_t first_length
    cdef PinAccount account           # None: pins of no connection
    cdef Py_ssize_t exports
    cdef void return_to_owner(self) noexcept


cdef uint64_t buffer_count(size_t area_size, uint32_t buffer_size) except 0
