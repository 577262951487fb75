from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t

from iouzcrx._abi cimport iouz_params, iouz_sqe


cdef class Ring


cdef int fileno_of(object sock) except -1
cdef void trust_fd_owner(type kind) noexcept
cdef int fd_now(object owner) except? -2


cdef class Request:
    """One submitted operation; the ring calls complete() for each of its CQEs."""
    cdef readonly Ring ring
    # What the SQE's fd number was read from (None: a number given as such),
    # and whether the ring found it naming another fd, or none, by the time
    # it submitted the SQE, which it then turned into a no-op (see enter).
    cdef object fd_owner
    cdef bint fd_gone
    cdef int complete(self, int32_t res, uint32_t flags, uint64_t extra) except -1


cdef class RingClient:
    """A component attached to a ring (a receive queue): the ring calls
    before_enter() on its owner thread before every enter of a drain (to
    publish buffer returns, re-arm starved receives), after_reap(False) once
    a batch of completions was dispatched (to deliver what it gathered) and
    after_reap(True) when the drain ends (to deliver what it held back for
    the next batch), and ring_closed() once; add_watched_fds() before a
    blocking wait, where the kernel signals the eventfd late (see
    Ring.wait_readable); awaits_returns() to learn whether it waits for
    buffers the program holds.  The ring holds its clients weakly: a client
    nobody else references is freed."""
    cdef object __weakref__
    cdef int before_enter(self) except -1
    cdef int after_reap(self, bint last) except -1
    cdef int ring_closed(self) except -1
    cdef int add_watched_fds(self, list fds) except -1
    cdef bint awaits_returns(self) noexcept


cdef class Ring:
    cdef readonly int fd
    cdef readonly int eventfd
    cdef readonly uint32_t setup_flags
    cdef readonly uint32_t features
    cdef readonly uint32_t sq_entries
    cdef readonly uint32_t cq_entries
    cdef readonly bint cqe_mixed
    cdef readonly bint defer_taskrun
    cdef readonly bint closed
    cdef readonly bint closing
    cdef readonly unsigned long owner_thread
    cdef readonly long owner_pid

    cdef char *ring_map
    cdef size_t ring_map_size
    cdef iouz_sqe *sqes
    cdef size_t sqes_size
    cdef uint32_t *sq_head
    cdef uint32_t *sq_tail
    cdef uint32_t *sq_flags
    cdef uint32_t sq_mask
    cdef uint32_t *cq_head
    cdef uint32_t *cq_tail
    cdef uint32_t cq_mask
    cdef uint32_t *cq_flags
    cdef char *cqes
    cdef uint32_t cqe_stride
    cdef uint32_t local_sq_tail
    cdef uint32_t submitted_tail
    cdef uint16_t next_buffer_group
    cdef bint fd_owners_pending      # an unsubmitted SQE has an fd_owner

    cdef set inflight
    # Objects whose address the kernel holds as user_data outside any
    # request (a zcrx queue's event descriptor): alive until the ring closes.
    cdef list kernel_refs
    cdef list clients                # weak references; rebound, never mutated
    cdef list dropped_buffer_groups  # to unregister on the owner thread
    cdef list callback_errors
    cdef public object error_handler
    cdef public object more_work_handler
    cdef public object awaiting_returns_handler
    cdef public object closing_handler
    cdef public object refused_reader_handler
    cdef readonly uint64_t enters
    cdef readonly uint64_t drains
    cdef readonly uint64_t stale_taskrun_flags
    cdef readonly uint64_t cqes_reaped

    cdef bint draining
    cdef bint close_requested
    cdef uint32_t wake_pending       # wake() ran since the eventfd callback began
    cdef bint pass_requested         # a client asked for a clients_before_enter pass
    cdef int watch_client_fds        # -1: not yet known; else 0 or 1

    cdef int map_rings(self, iouz_params *p) except -1
    cdef int setup_eventfd(self) except -1
    cdef void release_resources(self) noexcept
    cdef int check_owner(self) except -1
    cdef int check_thread(self) except -1
    cdef int close_now(self, double timeout) except -1
    cdef int finish_close(self) except -1
    cdef bint reader_may_drain(self) except -1
    cdef int forget(self) except -1
    cdef int release_dropped(self) except -1
    cdef int buffer_group_dropped(self, uint16_t group) noexcept
    cdef int check_open(self) except -1
    cdef bint watching_sockets(self) except -1
    cdef bint work_left(self, int more) except -1
    cdef iouz_sqe *get_sqe(self) except NULL
    cdef iouz_sqe *prepare(self, Request request, int opcode, int fd,
                           object fd_owner=*) except NULL
    cdef int drop_stale_fds(self) except -1
    cdef uint32_t pending_submissions(self) noexcept
    cdef bint kernel_has_work(self) noexcept
    cdef int enter(self, uint32_t min_complete, bint getevents) except -1
    cdef int reap(self) except -1
    cdef int drain_completions(self, int max_passes) except -1
    cdef int wait_readable(self, double timeout) except -1
    cdef int register(self, unsigned opcode, void *arg, unsigned nr_args) except? -1
    cdef int add_client(self, RingClient client) except -1
    cdef int detach_client(self, RingClient client) except -1
    cdef list live_clients(self)
    cdef int clients_before_enter(self) except -1
    cdef int clients_after_reap(self, bint last) except -1
    cdef int call_clients(self, bint after_reap, bint last) except -1
    cdef int forget_dead_clients(self) except -1
    cdef uint16_t allocate_buffer_group(self) noexcept
    cdef int wake(self) noexcept
    cdef bint awaiting_returns(self) noexcept
    cdef int client_awaits_returns(self) except -1
    cdef int report_callback_error(self, object exc) except -1
