cimport cython
from libc.stdint cimport int32_t, uint32_t, uint64_t

from iouzcrx._area cimport Area, BufferOwner, PinAccount
from iouzcrx._ring cimport Request, Ring


cdef class Receiver
cdef class AcceptedFd


cdef class ReceiveClient:
    """What owns a receiver and is told in C, instead of through its
    ``on_end`` and ``on_error`` callables: the end of the receive, and an
    exception the delivery raised (a transport's core is one)."""
    cdef int receive_ended(self, Receiver receiver, object error) except -1
    cdef int delivery_failed(self, Receiver receiver, object exc) except -1


ctypedef struct ReturnedBuffer:
    uint64_t token       # what identifies the buffer to the kernel
    uint32_t length      # bytes the completion carried


cdef class ReceiveQueue(BufferOwner):
    """What the receive backends share: the area, buffer returns waiting to be
    published to the kernel, receivers starved of buffers, and statistics."""
    cdef readonly Ring ring
    cdef readonly uint64_t refills
    cdef readonly uint64_t rearms
    cdef readonly bint closed
    # Starvation bookkeeping: a receive the kernel ended for want of buffers
    # starts again only once buffers went back to the kernel since it was
    # armed (return_epoch moved) or it received data meanwhile, so that no
    # starve/re-arm cycle repeats without progress.
    cdef readonly uint64_t return_epoch
    cdef readonly uint64_t starvations
    cdef readonly uint64_t rearms_held

    cdef ReturnedBuffer *pending
    cdef size_t pending_count
    cdef size_t pending_capacity
    cdef bint pending_ascending      # every pending token >= the one before it
    cdef bint wake_requested
    cdef list starved
    cdef set receivers
    cdef set close_listeners         # called once when the queue closes
    # Receivers holding a run not yet delivered, in the order their runs
    # started: the first apart, as one connection per batch is the usual case
    # and a list made and dropped per batch costs more than its delivery.
    cdef Receiver first_run
    cdef list runs_pending
    cdef uint32_t buffer_unit        # bytes per buffer (bufring) or chunk (zcrx)
    cdef bint tokens_are_offsets     # zcrx: a token is an area offset, else an index
    cdef bint lends_parts            # the kernel fills the rest of a part-used buffer
    # bufring: a completion of this many bytes fills a buffer the kernel is
    # done with, which Receiver.complete takes on itself (0: none do).
    cdef uint32_t whole_buffer
    cdef bint collected              # this starvation already ran the GC
    cdef bint keeps_spares           # publish_returns may have buffers to give unasked
    cdef Py_ssize_t max_run_bytes    # most bytes one delivery may hold

    cdef int setup_returns(self, size_t capacity) except -1
    cdef object tell_close_listeners(self, object error)
    cdef int arm_receiver(self, Receiver receiver) except -1
    cdef Receiver receive_for(self, AcceptedFd sock, PinAccount account, ReceiveClient client)
    cdef Receiver start_receiver(self, object sock, int fd, object on_data, object on_end,
                                 object on_error, PinAccount account, ReceiveClient client)
    cdef bint progressed(self, Receiver receiver) noexcept
    cdef int publish_returns(self) except -1
    cdef uint64_t free_buffers(self) noexcept
    cdef int arm(self, Receiver receiver) except -1
    cdef int receive(self, Receiver receiver, int32_t res, uint32_t flags,
                     uint64_t extra) except -1
    cdef int starve(self, Receiver receiver) except -1
    cdef bint stops(self, Receiver receiver) except -1
    cdef int rearm(self, Receiver receiver) except -1
    cdef int end_by_kernel(self, Receiver receiver, int32_t res) except -1
    cdef int receiver_finished(self, Receiver receiver) except -1
    cdef int release_registration(self) except -1
    cdef int park(self, Receiver receiver) except -1
    cdef bint may_rearm(self, Receiver receiver) except -1


cdef class Receiver(Request):
    """Multishot receive on one socket.  Views arrive in ``chunks`` (or go to
    ``on_data``, whose exceptions go to ``on_error``); the end (EOF, error,
    cancel) is reported once."""
    cdef readonly ReceiveQueue queue
    cdef readonly object sock
    cdef readonly int fd
    cdef object chunks
    cdef object data_callback         # on_data: gets views (DELIVER_VIEWS)
    cdef public object on_end
    cdef public object on_error
    cdef ReceiveClient client        # told instead of on_end/on_error (None: not)
    cdef readonly bint armed
    cdef readonly bint starved
    cdef readonly bint finished
    cdef readonly bint eof
    cdef readonly bint cancelling
    cdef readonly bint discarding
    cdef readonly object error
    cdef readonly uint64_t bytes_received
    cdef readonly uint64_t chunks_received
    cdef readonly uint64_t deliveries
    cdef readonly uint64_t rearms
    cdef bint waiting_for_returns    # starved by the kernel (not throttled)
    cdef bint held_counted           # this starvation already counted as held
    cdef uint64_t armed_epoch        # the queue's return_epoch when last armed
    cdef uint64_t bytes_at_arm       # bytes_received when last armed

    # The run: adjacent chunks of one CQE batch, delivered as one view.
    cdef char *run_data
    cdef char *run_end               # where a chunk must start to join; NULL: closed
    cdef char *run_limit             # where the run must end at the latest (its caps)
    cdef uint64_t run_token
    cdef uint32_t run_count
    cdef uint32_t run_first_length
    cdef bint run_listed
    cdef uint32_t last_flags         # of the last completion (SOCK_NONEMPTY: more queued)

    # Pin accounting (None: unbounded): over its limit the receive is
    # cancelled and waits with the starved ones until its views go.
    cdef readonly PinAccount account
    cdef readonly bint throttled
    cdef object throttle_cancel     # the Completion of that cancel
    cdef uint32_t run_cap            # most buffers one view may hold
    cdef Py_ssize_t run_bytes_cap    # most bytes one delivery may hold

    # How data reaches the program (set_protocol_delivery): views to
    # on_data (or the queue), or a copy straight from the area into bytes
    # for data_received or into get_buffer()'s memory, the buffers going
    # back at once.
    cdef int delivery_kind
    cdef object copy_target           # data_received, or get_buffer
    cdef object copy_updated          # buffer_updated

    cdef int add_chunk(self, char *data, uint32_t length, uint64_t token,
                       bint fills_buffer) except -1
    cdef int start_run(self, char *data, uint32_t length, uint64_t token,
                       bint fills_buffer) except -1
    cdef void limit_run(self) noexcept
    cdef object take_run(self)
    cdef int flush_run(self) except -1
    cdef int deliver(self, object view) except -1
    cdef int on_data_raised(self) except -1
    cdef int deliver_copy(self, char *data, uint32_t length, uint64_t token) except -1
    cdef int deliver_pinned(self, object view) except -1
    cdef int deliver_owned(self, char *data, Py_ssize_t length, uint64_t token,
                           uint32_t count, uint32_t first_length) except -1
    cdef int copy_to_protocol(self, char *data, Py_ssize_t length) except -1
    cdef int callback_failed(self, object exc) except -1
    cdef int check_made(self) except -1
    cdef int finish(self, object error, bint eof) except -1
    cdef int deliver_to(self, tuple methods) except -1


cdef inline void request_pass(ReceiveQueue queue) noexcept:
    # Have the owner thread run before_enter (publish the returns, start
    # waiting receives again) soon.
    cdef Ring ring = queue.ring
    if ring is None:
        return
    if ring.draining:
        # The drain runs it: in its next pass, or once its last pass is
        # over (Ring.drain_completions).
        ring.pass_requested = True
    elif not queue.wake_requested:
        # Nothing is going to drain soon (no traffic while the pool is
        # empty, say): have the owner thread woken.
        queue.wake_requested = True
        ring.wake()


cdef inline void returns_added(ReceiveQueue queue, size_t count) noexcept:
    # ``count`` buffer returns were queued for the owner thread to publish.
    queue.pending_count += count
    request_pass(queue)


@cython.final
cdef class AcceptedFd:
    cdef int fd                  # owned while >= 0 and no socket was made
    cdef readonly int family
    cdef readonly int kind       # type, as accept made it (SOCK_NONBLOCK)
    cdef readonly int proto
    cdef object sock             # the socket made by socket(), the fd's owner

    cdef int take_fd(self) noexcept
    cdef int fd_now(self) except -1
