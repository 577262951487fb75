# cython: language_level=3
"""The io_uring instance: setup, SQ/CQ rings, submission, completion dispatch.

One Ring belongs to one thread (SINGLE_ISSUER): every io_uring_enter and
io_uring_register call must come from the thread that created it, so every
method that enters the kernel or walks the mapped rings checks that first,
before it changes anything.  A forked child inherits the mappings but not the
ring: it may only close its copy (see Ring.close).
"""

cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject_AsFileDescriptor
from cpython.pythread cimport PyThread_get_thread_ident
from libc.errno cimport EBADF, ENOENT, errno
from libc.limits cimport INT_MAX
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset
from posix.mman cimport MAP_FAILED, MAP_POPULATE, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.unistd cimport close, getpid, read, write
from cpython.object cimport PyObject
from cpython.weakref cimport PyWeakref_GetObject, PyWeakref_NewRef

from iouzcrx._abi cimport *

import errno as _errno
import math as _math
import os as _os
import socket as _socket
import time

from iouzcrx import _checks, _freethreading
from iouzcrx.errors import WrongProcess, WrongThread, kernel_error, setup_error


# This process's pid, refreshed in a forked child by the hook below: the owner
# checks run on every submission and blocking get(), and getpid() is a
# system call each time.
cdef long current_pid = getpid()


def _refresh_pid_after_fork():
    global current_pid
    current_pid = getpid()


_os.register_at_fork(after_in_child=_refresh_pid_after_fork)


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum:
        POLLIN


cdef bint FREE_THREADED = _freethreading.FREE_THREADED
cdef int FREE_THREADED_WAKE_MS = <int>(_freethreading.WAKE_INTERVAL * 1000.0)


cdef enum:
    DEFAULT_SQ_ENTRIES = 256
    DEFAULT_CQ_ENTRIES = 8192
    # One enter runs at most 20 task-work items (kernel-abi §3), so a drain is
    # bounded in passes rather than in CQEs.
    DEFAULT_DRAIN_PASSES = 256
    # io_uring_setup's own limits (IORING_MAX_ENTRIES, IORING_MAX_CQ_ENTRIES);
    # CLAMP lowers larger sizes to them.
    MAX_SQ_ENTRIES = 32768
    MAX_CQ_ENTRIES = 65536
    # The most one read or send moves, as the kernel's own MAX_RW_COUNT: an
    # SQE's length is 32 bits, and a longer buffer is sent or read in part,
    # as send(2) and read(2) do, never cut to its length modulo 4 GiB.
    MAX_IO_LENGTH = 0x7FFFF000
    # Enters in a row that post nothing while SQ_TASKRUN is set, after which
    # a drain takes the flag for stale (see drain_completions).
    MAX_FRUITLESS_ENTERS = 3
    PBUF_STATUS = 26   # IORING_REGISTER_PBUF_STATUS

CQE_F_MORE = IOUZ_CQE_F_MORE


cdef int fileno_of(object sock) except -1:
    return PyObject_AsFileDescriptor(sock)


# The owners whose fileno() the ring asks again before it submits an SQE
# (Ring.drop_stale_fds): socket objects whose fileno is the socket module's
# own, and the types registered with trust_fd_owner (the library's accepted
# fds). Only these: the check runs between filling SQEs and submitting them,
# where a program's own fileno() could close the ring or submit under it.
cdef object socket_fileno = _socket.socket.fileno
cdef set trusted_owner_types = set()


cdef void trust_fd_owner(type kind) noexcept:
    trusted_owner_types.add(kind)


cdef inline bint checkable_owner(object owner) noexcept:
    cdef type kind = type(owner)
    return (kind in trusted_owner_types
            or (isinstance(owner, _socket.socket)
                and getattr(kind, "fileno", None) is socket_fileno))


cdef int fd_now(object owner) except? -2:
    """The fd ``owner`` names now, asked of its ``fileno()``; -1 if none
    (closed, detached, no answer; a KeyboardInterrupt or SystemExit in it
    is raised).  Before a submission only a checkable_owner is asked."""
    try:
        fd = owner.fileno()
        return fd if type(fd) is int and 0 <= fd < 0x7FFFFFFF else -1
    except Exception:
        return -1


cdef unsigned entries_argument(str name, object value, unsigned limit) except 0:
    """A ring size from Python: a positive integer (no float truncated);
    above ``limit`` the kernel clamps it."""
    number = _checks.integer(name, value, 1, None,
                             f"a number of entries (above {limit} it is clamped)")
    return <unsigned>min(number, limit)


# The walk of the CQ, once per ring layout: the layout test, the ring's fields
# and the position stay out of the loop.  Each walk hands the CQEs up to
# ``tail`` to their requests; the ring's CQ head and CQE count move past each
# CQE before its handler runs, so that after a handler's exception the caller
# goes on from the head.  The ring's layout is read once: nothing a handler
# may do moves it (a close inside a drain waits for the drain's end), and a
# handler that forks stops the walk in the child.

cdef int walk_mixed(Ring ring, uint32_t tail) except -1:
    """CQE_MIXED: 16-byte slots, a 32-byte CQE in two of them."""
    cdef const char *cqes = ring.cqes
    cdef uint32_t *cq_head = ring.cq_head
    cdef uint32_t mask = ring.cq_mask
    cdef uint32_t h = cq_head[0]
    cdef const iouz_cqe *cqe
    cdef uint64_t user_data, extra
    cdef int32_t res
    cdef uint32_t flags
    while h != tail:
        cqe = <const iouz_cqe *>(cqes + ((h & mask) << 4))
        flags = cqe.flags
        h += 1
        extra = 0
        if flags & (IOUZ_CQE_F_SKIP | IOUZ_CQE_F_32):
            if flags & IOUZ_CQE_F_SKIP:
                # Filler before a 32-byte CQE that would wrap.
                iouz_store_release(cq_head, h)
                continue
            extra = (<const iouz_zcrx_cqe *>(cqe + 1)).off
            h += 1
        user_data = cqe.user_data
        res = cqe.res
        # Release the slot (read before: the kernel may reuse it from then
        # on) before running the handler, which may submit more.
        iouz_store_release(cq_head, h)
        ring.cqes_reaped += 1
        hand_over(ring, user_data, res, flags, extra)
        if current_pid != ring.owner_pid:
            return 0  # the handler forked: the child leaves the parent's CQ
    return 0


cdef int walk_wide(Ring ring, uint32_t tail) except -1:
    """Every slot 32 bytes (CQE32)."""
    cdef const char *cqes = ring.cqes
    cdef uint32_t *cq_head = ring.cq_head
    cdef uint32_t mask = ring.cq_mask
    cdef uint32_t h = cq_head[0]
    cdef const iouz_cqe *cqe
    cdef uint64_t user_data, extra
    cdef int32_t res
    cdef uint32_t flags
    while h != tail:
        cqe = <const iouz_cqe *>(cqes + ((h & mask) << 5))
        user_data = cqe.user_data
        res = cqe.res
        flags = cqe.flags
        extra = (<const iouz_zcrx_cqe *>(cqe + 1)).off
        h += 1
        iouz_store_release(cq_head, h)
        ring.cqes_reaped += 1
        hand_over(ring, user_data, res, flags, extra)
        if current_pid != ring.owner_pid:
            return 0  # the handler forked: the child leaves the parent's CQ
    return 0


cdef inline int hand_over(Ring ring, uint64_t user_data, int32_t res, uint32_t flags,
                          uint64_t extra) except -1:
    cdef PyObject *target = <PyObject *><uintptr_t>user_data
    if target == NULL:
        return 0  # a request nobody waits for (close's cancel of everything)
    if flags & IOUZ_CQE_F_MORE:
        # Borrowed: the ring's in-flight set holds the request while it may
        # post more, and nothing takes it out before this CQE's complete()
        # returns.  A reference of its own per CQE costs as much as a tenth
        # of the whole path of a chunk.
        return (<Request>target).complete(res, flags, extra)
    return complete_last(ring, target, res, flags, extra)


cdef int complete_last(Ring ring, PyObject *target, int32_t res, uint32_t flags,
                       uint64_t extra) except -1:
    """The request's last CQE: the ring lets go of it first (complete() may
    submit it again), and the local reference keeps it alive meanwhile."""
    cdef Request request = <Request>target
    ring.inflight.discard(request)
    return request.complete(res, flags, extra)


cdef class Request:
    """Base of every operation in flight.  While a request may still post CQEs
    the ring holds a reference to it, and its address is the SQE's user_data."""

    cdef int complete(self, int32_t res, uint32_t flags, uint64_t extra) except -1:
        return 0


cdef class RingClient:
    cdef int before_enter(self) except -1:
        return 0

    cdef int after_reap(self, bint last) except -1:
        return 0

    cdef int ring_closed(self) except -1:
        return 0

    cdef int add_watched_fds(self, list fds) except -1:
        return 0

    cdef bint awaits_returns(self) noexcept:
        return False


# Sends, cancels and no-ops come and go at the rate of the traffic: reuse
# their memory rather than go through the allocator for each.
@cython.freelist(64)
@cython.final
cdef class Completion(Request):
    """A request whose CQEs are collected (or passed to a callback).

    ``results`` holds ``(res, flags)`` for every CQE not taken by the callback;
    ``done`` turns true with the last CQE (the one without IORING_CQE_F_MORE).
    """
    cdef readonly list results
    cdef readonly bint done
    cdef object callback
    cdef object keepalive       # the buffer the kernel reads or writes
    cdef object target          # what the SQE names (a socket, a request)

    def __cinit__(self):
        self.results = []

    cdef int complete(self, int32_t res, uint32_t flags, uint64_t extra) except -1:
        if self.fd_gone:
            res = -EBADF  # the no-op its SQE became (Ring.drop_stale_fds)
        if not (flags & IOUZ_CQE_F_MORE):
            self.done = True
            self.keepalive = None
            self.target = None
            self.fd_owner = None
        if self.callback is not None:
            self.callback(res, flags)
        else:
            self.results.append((res, flags))
        return 0

    def wait(self, timeout=None):
        """Drive the ring until the last CQE arrives; return its ``res``.

        A negative ``res`` is raised as OSError; ``TimeoutError`` if the
        request is still running after ``timeout`` seconds.
        """
        if self.ring is None:
            raise RuntimeError("this Completion was never submitted to a ring; get one "
                               "from a Ring method (ring.nop(), ring.send(...)...)")
        self.ring.wait_for(lambda: self.done, timeout)
        res = self.results[-1][0] if self.results else 0
        if res < 0:
            raise kernel_error(-res, "request failed")
        return res

    def cancel(self):
        """Ask the kernel to cancel this request (its last CQE says -ECANCELED).
        Nothing on a closed ring: closing it ended every request."""
        if self.ring is None:
            raise RuntimeError("this Completion was never submitted to a ring")
        if not self.done and not self.ring.closed:
            self.ring.cancel(self)


@cython.final
cdef class Ring:
    """An io_uring instance set up for zero-copy receive.

    Flags: SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG | SUBMIT_ALL | CQSIZE,
    plus CQE_MIXED (6.18+) or else CQE32, and NO_SQARRAY where the kernel has it.
    An eventfd is registered so an event loop can watch it: with DEFER_TASKRUN,
    polling the ring fd itself does not wake before Linux 7.3.2.

    ``defer_taskrun=False`` sets COOP_TASKRUN instead of DEFER_TASKRUN and
    TASKRUN_FLAG: the kernel then runs a receive's work when the thread next
    returns from the kernel (a system call, or an interrupt such as the
    timer tick; it wakes the thread if it sleeps, and sends no interrupt of
    its own while it runs) and posts the completion itself, so a drain
    after the event loop's wait needs no io_uring_enter, and the ring fd
    turns readable without one. A drain that finds nothing enters once, so
    that a program polling with ``drain()`` alone gets the work too.
    Such a ring is watched through ``fd`` (``on_ring_readable``); the kernel
    does not signal its eventfd, which only ``wake()`` writes. Zero-copy
    receive cannot be registered on it.
    """

    def __cinit__(self, sq_entries=DEFAULT_SQ_ENTRIES, cq_entries=DEFAULT_CQ_ENTRIES, *,
                  bint defer_taskrun=True):
        self.fd = -1
        self.eventfd = -1
        self.closed = True
        self.inflight = set()
        self.kernel_refs = []
        self.clients = []
        self.dropped_buffer_groups = []
        self.callback_errors = []
        self.owner_thread = PyThread_get_thread_ident()
        self.owner_pid = current_pid
        # A ring without DEFER_TASKRUN leaves no work behind a readable socket.
        self.watch_client_fds = -1 if defer_taskrun else 0
        cdef unsigned sq = entries_argument("sq_entries", sq_entries, MAX_SQ_ENTRIES)
        cdef unsigned cq = entries_argument("cq_entries", cq_entries, MAX_CQ_ENTRIES)

        cdef iouz_params params
        cdef uint32_t base = (IOUZ_SETUP_SINGLE_ISSUER | IOUZ_SETUP_SUBMIT_ALL
                              | IOUZ_SETUP_CQSIZE | IOUZ_SETUP_CLAMP)
        if defer_taskrun:
            base |= IOUZ_SETUP_DEFER_TASKRUN | IOUZ_SETUP_TASKRUN_FLAG
        else:
            # The receive's work waits for the thread's next return from the
            # kernel (or wakes it where it sleeps) instead of interrupting it
            # with an IPI while it runs: on one streaming connection the
            # interrupts cost about an eighth of the receiver's CPU
            # (benchmarks/cpu_profile.py, irqentry_exit_to_user_mode).
            base |= IOUZ_SETUP_COOP_TASKRUN
        # Newest layout first; EINVAL means the kernel does not know a flag.
        cdef uint32_t[3] ladder
        ladder[0] = base | IOUZ_SETUP_NO_SQARRAY | IOUZ_SETUP_CQE_MIXED   # 6.18+
        ladder[1] = base | IOUZ_SETUP_NO_SQARRAY | IOUZ_SETUP_CQE32       # 6.6+
        ladder[2] = base | IOUZ_SETUP_CQE32                                # 6.1+
        cdef int fd = -EINVAL
        cdef int i
        if cq < sq:
            cq = sq
        if cq < 2:
            # A 32-byte CQE takes two slots of a CQE_MIXED ring, which the
            # kernel refuses (EOVERFLOW) to make with one.
            cq = 2
        for i in range(3):
            memset(&params, 0, sizeof(params))
            params.flags = ladder[i]
            params.cq_entries = cq
            fd = iouz_setup(sq, &params)
            if fd != -EINVAL:
                break
        if fd < 0:
            raise setup_error(-fd)
        self.fd = fd
        self.closed = False
        self.setup_flags = params.flags
        self.features = params.features
        self.sq_entries = params.sq_entries
        self.cq_entries = params.cq_entries
        self.cqe_mixed = (params.flags & IOUZ_SETUP_CQE_MIXED) != 0
        self.defer_taskrun = defer_taskrun
        self.cqe_stride = 16 if self.cqe_mixed else 32
        self.next_buffer_group = 1
        try:
            self.map_rings(&params)
            self.setup_eventfd()
        except BaseException:
            self.release_resources()
            raise

    cdef int map_rings(self, iouz_params *p) except -1:
        if not (p.features & IOUZ_FEAT_SINGLE_MMAP):
            raise kernel_error(_errno.EOPNOTSUPP, "io_uring without SINGLE_MMAP (Linux < 5.4)")
        cdef size_t sq_size = 0
        if not (p.flags & IOUZ_SETUP_NO_SQARRAY):
            sq_size = p.sq_off.array + p.sq_entries * sizeof(uint32_t)
        cdef size_t cq_size = p.cq_off.cqes + p.cq_entries * self.cqe_stride
        self.ring_map_size = sq_size if sq_size > cq_size else cq_size
        cdef void *ring = mmap(NULL, self.ring_map_size, PROT_READ | PROT_WRITE,
                               MAP_SHARED | MAP_POPULATE, self.fd, IOUZ_OFF_SQ_RING)
        if ring == MAP_FAILED:
            raise kernel_error(errno, "mapping the io_uring SQ/CQ rings")
        self.ring_map = <char *>ring
        self.sqes_size = p.sq_entries * sizeof(iouz_sqe)
        cdef void *sqes = mmap(NULL, self.sqes_size, PROT_READ | PROT_WRITE,
                               MAP_SHARED | MAP_POPULATE, self.fd, IOUZ_OFF_SQES)
        if sqes == MAP_FAILED:
            raise kernel_error(errno, "mapping the io_uring SQE array")
        self.sqes = <iouz_sqe *>sqes

        self.sq_head = <uint32_t *>(self.ring_map + p.sq_off.head)
        self.sq_tail = <uint32_t *>(self.ring_map + p.sq_off.tail)
        self.sq_flags = <uint32_t *>(self.ring_map + p.sq_off.flags)
        self.sq_mask = (<uint32_t *>(self.ring_map + p.sq_off.ring_mask))[0]
        self.cq_head = <uint32_t *>(self.ring_map + p.cq_off.head)
        self.cq_tail = <uint32_t *>(self.ring_map + p.cq_off.tail)
        self.cq_mask = (<uint32_t *>(self.ring_map + p.cq_off.ring_mask))[0]
        self.cq_flags = <uint32_t *>(self.ring_map + p.cq_off.flags)
        self.cqes = self.ring_map + p.cq_off.cqes
        self.local_sq_tail = self.sq_tail[0]
        self.submitted_tail = self.local_sq_tail
        cdef uint32_t *array
        cdef uint32_t i
        if not (p.flags & IOUZ_SETUP_NO_SQARRAY):
            # Identity index array, written once: slot i always names SQE i.
            array = <uint32_t *>(self.ring_map + p.sq_off.array)
            for i in range(p.sq_entries):
                array[i] = i
        return 0

    cdef int setup_eventfd(self) except -1:
        self.eventfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.eventfd < 0:
            raise kernel_error(errno, "creating the ring's eventfd")
        cdef int32_t efd = self.eventfd
        self.register(IOUZ_REGISTER_EVENTFD, &efd, 1)
        if not self.defer_taskrun:
            # Its fd tells of completions; the eventfd is left to wake().
            iouz_atomic_or(self.cq_flags, IOUZ_CQ_EVENTFD_DISABLED)
        return 0

    cdef void release_resources(self) noexcept:
        if self.sqes != NULL:
            munmap(self.sqes, self.sqes_size)
            self.sqes = NULL
        if self.ring_map != NULL:
            munmap(self.ring_map, self.ring_map_size)
            self.ring_map = NULL
        if self.eventfd >= 0:
            close(self.eventfd)
            self.eventfd = -1
        if self.fd >= 0:
            # Closing the ring fd cancels whatever is still in flight and
            # releases zcrx queues (asynchronously, in the kernel).
            close(self.fd)
            self.fd = -1
        self.closed = True

    def __dealloc__(self):
        self.release_resources()

    # -- guards --------------------------------------------------------------

    cdef int check_open(self) except -1:
        if self.closed:
            raise ValueError("the ring is closed")
        return 0

    cdef int check_owner(self) except -1:
        self.check_open()
        return self.check_thread()

    cdef int check_thread(self) except -1:
        if current_pid != self.owner_pid:
            # After fork the thread id can match; the ring is still the parent's.
            raise WrongProcess(
                f"this io_uring ring belongs to the parent process (pid {self.owner_pid}), "
                "not to this forked child: the child may only close() it, and must "
                "create its own Ring (and event loop) to do I/O")
        if PyThread_get_thread_ident() != self.owner_thread:
            # The kernel would answer EEXIST (SINGLE_ISSUER); say why instead.
            raise WrongThread(
                "this io_uring ring belongs to another thread: with SINGLE_ISSUER "
                "only the thread that created it may submit, reap or register")
        return 0

    # -- submission ----------------------------------------------------------

    cdef uint32_t pending_submissions(self) noexcept:
        return self.local_sq_tail - self.submitted_tail

    cdef bint kernel_has_work(self) noexcept:
        """Deferred task work waits for an enter, or CQEs overflowed the CQ."""
        return (iouz_load_acquire(self.sq_flags)
                & (IOUZ_SQ_TASKRUN | IOUZ_SQ_CQ_OVERFLOW)) != 0

    cdef iouz_sqe *get_sqe(self) except NULL:
        cdef uint32_t head = iouz_load_acquire(self.sq_head)
        if self.local_sq_tail - head >= self.sq_entries:
            self.enter(0, False)
            head = iouz_load_acquire(self.sq_head)
            if self.local_sq_tail - head >= self.sq_entries:
                raise kernel_error(EBUSY, "the submission queue is full")
        cdef iouz_sqe *sqe = &self.sqes[self.local_sq_tail & self.sq_mask]
        memset(sqe, 0, sizeof(iouz_sqe))
        self.local_sq_tail += 1
        return sqe

    cdef iouz_sqe *prepare(self, Request request, int opcode, int fd,
                           object fd_owner=None) except NULL:
        """An SQE for ``request``; the ring keeps the request alive until its
        last CQE. ``fd_owner``: the object ``fd`` was read from (a socket),
        asked again just before the SQE is submitted."""
        self.check_owner()
        cdef iouz_sqe *sqe = self.get_sqe()
        sqe.opcode = opcode
        sqe.fd = fd
        sqe.user_data = <uintptr_t><void *>request
        request.ring = self
        if fd_owner is not None and checkable_owner(fd_owner):
            request.fd_owner = fd_owner
            self.fd_owners_pending = True
        self.inflight.add(request)
        return sqe

    cdef int drop_stale_fds(self) except -1:
        """Turn each unsubmitted SQE whose fd number its owner no longer
        names into a no-op, whose completion the request reads as EBADF.

        An SQE carries a number, which the kernel looks up when it is
        submitted: a socket the program closed after queueing an operation
        on it, and a new socket that got the same number, would otherwise
        get the operation (a receive of its data, a send to its peer).  Run
        with the GIL held up to the submission and no Python code of the
        program's (checkable_owner), so that no close comes between the check
        and the submission.  Covers what happens before the submission only:
        an operation the kernel runs later in a worker (a SHUTDOWN) looks the
        number up then, so its socket must stay open until it completes."""
        cdef uint32_t i = self.submitted_tail
        cdef iouz_sqe *sqe
        cdef Request request
        cdef uint64_t user_data
        while i != self.local_sq_tail:
            sqe = &self.sqes[i & self.sq_mask]
            i += 1
            if sqe.fd < 0 or sqe.user_data == 0:
                continue
            request = <Request><void *><uintptr_t>sqe.user_data
            if request.fd_owner is None or fd_now(request.fd_owner) == sqe.fd:
                continue
            user_data = sqe.user_data
            memset(sqe, 0, sizeof(iouz_sqe))
            sqe.opcode = IOUZ_OP_NOP
            sqe.fd = -1
            sqe.user_data = user_data
            request.fd_gone = True
        return 0

    cdef int enter(self, uint32_t min_complete, bint getevents) except -1:
        cdef uint32_t to_submit = self.local_sq_tail - self.submitted_tail
        if to_submit == 0 and not getevents:
            return 0
        if self.fd_owners_pending and to_submit:
            self.drop_stale_fds()
        iouz_store_release(self.sq_tail, self.local_sq_tail)
        cdef unsigned flags = IOUZ_ENTER_GETEVENTS if getevents else 0
        cdef int ret = iouz_enter(self.fd, to_submit, min_complete, flags, NULL, 8)
        self.enters += 1
        if ret < 0:
            # EAGAIN/EBUSY: no room for more completions right now; the CQ is
            # reaped and the submission retried on the next pass.
            if ret == -EINTR or ret == -EAGAIN or ret == -EBUSY:
                return 0
            raise kernel_error(-ret, "io_uring_enter")
        self.submitted_tail += <uint32_t>ret
        if self.submitted_tail == self.local_sq_tail:
            self.fd_owners_pending = False
        return ret

    cdef int register(self, unsigned opcode, void *arg, unsigned nr_args) except? -1:
        self.check_owner()
        cdef int ret = iouz_register(self.fd, opcode, arg, nr_args)
        if ret < 0:
            raise kernel_error(-ret, f"io_uring_register(opcode {opcode})")
        return ret

    # -- completion ----------------------------------------------------------

    cdef int reap(self) except -1:
        cdef uint32_t tail = iouz_load_acquire(self.cq_tail)
        cdef uint64_t reaped = self.cqes_reaped
        while self.cq_head[0] != tail:
            # One try per batch rather than per CQE: entering a try block
            # costs more than the dispatch of a completion itself.  A handler
            # that raises is reported and the walk goes on after its CQE.
            try:
                if self.cqe_mixed:
                    walk_mixed(self, tail)
                else:
                    walk_wide(self, tail)
            except BaseException as exc:
                self.report_callback_error(exc)
            if current_pid != self.owner_pid:
                # A handler forked and this is the child, which may have
                # unmapped its copy of the rings: stop before the head is
                # read again, and say why.
                self.check_thread()
        if self.cqes_reaped == reaped:
            return 0
        self.clients_after_reap(False)
        return <int>(self.cqes_reaped - reaped)

    cdef int report_callback_error(self, object exc) except -1:
        """User code raised inside a completion: report it and keep going.
        Anything but an Exception (KeyboardInterrupt, SystemExit) is raised
        again once the drain is over."""
        if self.error_handler is not None and isinstance(exc, Exception):
            try:
                self.error_handler(exc)
            except BaseException as error:
                # Raised here it would cut the walk short: the rest of the
                # batch, the receive's own bookkeeping and the other clients'
                # end-of-batch deliveries would wait for a drain that may
                # never come.  It is raised once the drain is over instead.
                self.callback_errors.append(error)
        else:
            self.callback_errors.append(exc)
        return 0

    cdef int drain_completions(self, int max_passes) except -1:
        """Submit, run deferred task work and reap until nothing is left.

        Returns 1 if it stopped after ``max_passes`` with work still pending
        (call again), 0 when the ring is idle.
        """
        self.check_owner()
        if self.draining:
            raise RuntimeError("the ring is already being drained (re-entrant call)")
        if self.close_requested:
            self.close_now(1.0)
            return 0
        self.draining = True
        cdef int passes = 0
        cdef int more = 0
        cdef int fruitless = 0
        cdef int reaped
        cdef bint entered
        try:
            if self.dropped_buffer_groups:
                self.release_dropped()
            while True:
                self.pass_requested = False
                self.clients_before_enter()
                # The first pass on a DEFER_TASKRUN ring always enters: that
                # runs the deferred task work the caller was woken for (without
                # it the kernel has run it already). Later passes enter only
                # when there is something to submit or the kernel flags more
                # work; returned buffers are published in shared memory and
                # need no syscall.
                entered = ((passes == 0 and self.defer_taskrun) or self.pending_submissions()
                           or self.kernel_has_work())
                if entered:
                    self.enter(0, True)
                reaped = self.reap()
                if self.close_requested:
                    break  # closed from a callback: the walk is over, close now
                if reaped or self.pending_submissions():
                    fruitless = 0
                elif passes == 0 and not entered and not self.defer_taskrun:
                    # COOP_TASKRUN: work the kernel queued while this thread
                    # ran user code waits for its next return from the
                    # kernel, which a drain called in a busy loop would
                    # never make. One enter runs it (a drain the ring fd's
                    # readiness calls finds completions and does not get here).
                    self.enter(0, True)
                elif not self.kernel_has_work():
                    break  # idle: no completion, submission, task work or overflow
                else:
                    # SQ_TASKRUN is a hint, and it can be stale: a completion
                    # that queues task work sets it just after adding the work,
                    # so an enter on the other CPU can run that work in between
                    # and the flag stays up with nothing behind it until the
                    # next task work runs. Trusting it would spin here for as
                    # long as the connection is quiet (holding the GIL, so a
                    # thread that would send more data cannot). Work left over
                    # from a full batch (an enter runs at most 20 items) shows
                    # up as completions, so after MAX_FRUITLESS_ENTERS enters
                    # that post none the flag is taken for stale: task work
                    # queued from now on signals the eventfd.
                    fruitless += 1
                    if fruitless >= MAX_FRUITLESS_ENTERS:
                        self.stale_taskrun_flags += 1
                        break
                passes += 1
                if passes >= max_passes:
                    more = 1
                    break
        finally:
            try:
                # What the clients held back for a next batch that this drain
                # will not reap goes out now, still inside the drain (not in
                # a child a handler forked: the buffers are the parent's).
                if current_pid == self.owner_pid:
                    self.clients_after_reap(True)
                    if self.pass_requested and not self.close_requested:
                        # Buffers given back after the last pass published
                        # the returns (by what after_reap delivered, above
                        # all): publish them too, in shared memory, with no
                        # system call. A receive this starts again is
                        # submitted by the next drain.
                        self.pass_requested = False
                        self.clients_before_enter()
                        if self.pending_submissions():
                            more = 1
            finally:
                self.draining = False
                self.drains += 1
                if self.close_requested and not self.closing:
                    more = 0
                    self.close_now(1.0)
                elif self.pass_requested:
                    # From another thread, after that: no drain is coming.
                    self.pass_requested = False
                    self.wake()
        if self.callback_errors:
            errors, self.callback_errors = self.callback_errors, []
            # A KeyboardInterrupt or SystemExit first: raising an error
            # handler's own failure instead would lose it.
            for error in errors:
                if not isinstance(error, Exception):
                    raise error
            raise errors[0]
        return more

    cdef int wait_readable(self, double timeout) except -1:
        """Sleep until the eventfd fires (or, without DEFER_TASKRUN, the ring
        fd turns readable) or ``timeout`` (seconds, < 0: forever) passes; 1
        if one did.

        Where the kernel signals the eventfd late (Linux 7.3 defers it to an
        RCU callback when a socket wake-up queues the work), the sockets of
        armed receives are watched too, as the asyncio layer does: one
        turning readable returns at once, and the drain that follows runs
        the work."""
        cdef list fds = [self.eventfd]
        if not self.defer_taskrun:
            fds.append(self.fd)  # readable while completions wait in the CQ
        cdef RingClient client
        if self.watching_sockets():
            for client in self.live_clients():
                client.add_watched_fds(fds)
        cdef size_t count = len(fds)
        cdef pollfd *pfds = <pollfd *>PyMem_Malloc(count * sizeof(pollfd))
        if pfds == NULL:
            raise MemoryError()
        cdef size_t i
        for i in range(count):
            pfds[i].fd = fds[i]
            pfds[i].events = POLLIN
            pfds[i].revents = 0
        # +inf is no limit; a finite timeout past poll's int milliseconds
        # is cut short rather than wrapped negative (forever) or undefined.
        cdef int ms = -1
        if 0 <= timeout < _math.inf:
            ms = <int>min(timeout * 1000.0 + 0.999, <double>INT_MAX)
        cdef int ret
        cdef int step
        cdef uint64_t counter
        # See iouzcrx._freethreading: views dropped on other threads go
        # back only once this thread runs Python code.
        cdef bint sliced = FREE_THREADED and self.awaiting_returns()
        try:
            while True:
                step = ms
                if sliced and (ms < 0 or ms > FREE_THREADED_WAKE_MS):
                    step = FREE_THREADED_WAKE_MS
                with nogil:
                    ret = poll(pfds, count, step)
                if ret != 0 or step == ms:
                    break
                if ms > 0:
                    ms -= step
                # A return it frees signals the eventfd: the next poll sees it.
                _freethreading.run_deferred_frees()
            if ret < 0:
                if errno == EINTR:
                    return 0
                raise kernel_error(errno, "poll on the ring eventfd")
            if ret > 0:
                if pfds[0].revents:
                    read(self.eventfd, &counter, sizeof(counter))
                return 1
            return 0
        finally:
            PyMem_Free(pfds)

    cdef bint awaiting_returns(self) noexcept:
        """Whether a client waits for buffers the program still holds."""
        cdef PyObject *target
        for ref in self.clients:
            target = PyWeakref_GetObject(ref)
            if target != <PyObject *>None and (<RingClient>target).awaits_returns():
                return True
        return False

    cdef int client_awaits_returns(self) except -1:
        """A client started waiting for buffers the program holds: under an
        event loop on a free-threaded build, the loop must wake now and then
        while it waits (iouzcrx._freethreading)."""
        if FREE_THREADED and self.awaiting_returns_handler is not None:
            self.awaiting_returns_handler()
        return 0

    @property
    def awaits_returns(self):
        """Whether a receive on this ring waits for buffers that views still
        hold (it starts again once enough of them are released)."""
        return self.awaiting_returns()

    cdef int wake(self) noexcept:
        """Make the eventfd readable; safe from any thread."""
        cdef uint64_t one = 1
        # Before the write: an eventfd callback that reads this wake-up away
        # after its drain sees the flag (on_eventfd_readable).
        iouz_store_release(&self.wake_pending, 1)
        # Never from a forked child: the eventfd is the parent's too, and a
        # view the child lets go would wake the parent's loop for nothing.
        if self.eventfd >= 0 and current_pid == self.owner_pid:
            write(self.eventfd, &one, sizeof(one))
        return 0

    cdef int add_client(self, RingClient client) except -1:
        # Rebound rather than appended: a drain walks the list it started with.
        self.clients = self.clients + [PyWeakref_NewRef(client, None)]
        return 0

    cdef int detach_client(self, RingClient client) except -1:
        self.clients = [ref for ref in self.clients
                        if ref() is not None and ref() is not client]
        return 0

    # The clients' hooks are called on every pass of a drain: they walk the
    # list in place (add/detach rebind it, so the walk keeps the list it
    # started with) instead of building a list of the live ones each time.

    cdef int clients_before_enter(self) except -1:
        return self.call_clients(False, False)

    cdef int clients_after_reap(self, bint last) except -1:
        return self.call_clients(True, last)

    cdef int call_clients(self, bint after_reap, bint last) except -1:
        """before_enter() (or after_reap(last)) on every live client."""
        cdef list clients = self.clients
        cdef bint dead = False
        cdef PyObject *target
        cdef RingClient client
        for ref in clients:
            target = PyWeakref_GetObject(ref)
            if target == <PyObject *>None:
                dead = True
                continue
            client = <RingClient>target  # a strong reference for the call
            if after_reap:
                client.after_reap(last)
            else:
                client.before_enter()
        if dead:
            self.forget_dead_clients()
        return 0

    cdef int forget_dead_clients(self) except -1:
        self.clients = [ref for ref in self.clients if ref() is not None]
        return 0

    cdef list live_clients(self):
        cdef list live = []
        cdef bint dead = False
        for ref in self.clients:
            client = ref()
            if client is None:
                dead = True
            else:
                live.append(client)
        if dead:
            self.clients = [ref for ref in self.clients if ref() is not None]
        return live

    cdef int buffer_group_dropped(self, uint16_t group) noexcept:
        """A buffer ring's queue was freed while registered, maybe on another
        thread: the owner unregisters it at its next drain."""
        if self.closed or current_pid != self.owner_pid:
            return 0  # gone with the ring, or a forked child's copy
        if self.dropped_buffer_groups is None:
            return 0  # the ring is being collected in the same cycle: its fd goes too
        self.dropped_buffer_groups.append(group)
        self.wake()
        return 0

    cdef int release_dropped(self) except -1:
        cdef iouz_buf_reg reg
        groups, self.dropped_buffer_groups = self.dropped_buffer_groups, []
        for group in groups:
            memset(&reg, 0, sizeof(reg))
            reg.bgid = group
            # Nothing is armed on it (its receives held the queue alive).
            iouz_register(self.fd, IOUZ_UNREGISTER_PBUF_RING, &reg, 1)
        return 0

    cdef uint16_t allocate_buffer_group(self) noexcept:
        self.next_buffer_group += 1
        return self.next_buffer_group - 1

    # -- Python API ------------------------------------------------------------

    @property
    def in_flight(self):
        """Number of requests that may still post completions."""
        return len(self.inflight)

    @property
    def unsubmitted(self):
        """Number of queued requests the kernel has not taken yet (a submit
        it refused for a full CQ leaves them queued)."""
        return self.local_sq_tail - self.submitted_tail

    @property
    def setup_flag_names(self):
        names = []
        for flag, name in ((IOUZ_SETUP_SINGLE_ISSUER, "SINGLE_ISSUER"),
                           (IOUZ_SETUP_DEFER_TASKRUN, "DEFER_TASKRUN"),
                           (IOUZ_SETUP_TASKRUN_FLAG, "TASKRUN_FLAG"),
                           (IOUZ_SETUP_COOP_TASKRUN, "COOP_TASKRUN"),
                           (IOUZ_SETUP_SUBMIT_ALL, "SUBMIT_ALL"),
                           (IOUZ_SETUP_CQSIZE, "CQSIZE"),
                           (IOUZ_SETUP_CLAMP, "CLAMP"),
                           (IOUZ_SETUP_NO_SQARRAY, "NO_SQARRAY"),
                           (IOUZ_SETUP_CQE_MIXED, "CQE_MIXED"),
                           (IOUZ_SETUP_CQE32, "CQE32")):
            if self.setup_flags & flag:
                names.append(name)
        return names

    def submit(self):
        """Hand every queued SQE to the kernel; returns how many it took."""
        self.check_owner()
        return self.enter(0, False)

    def drain(self):
        """Submit, run the kernel's deferred work and dispatch every completion.

        Returns True if work is still pending (call again). An exception raised
        by a completion handler goes to ``error_handler(exc)`` if set (an event
        loop's exception handler, say), else is re-raised here after the CQ
        was drained.
        """
        return bool(self.drain_completions(DEFAULT_DRAIN_PASSES))

    def on_eventfd_readable(self):
        """For event loops watching ``eventfd``: drain, then consume the wake-up.

        Meant to be the reader callback itself, so a wake-up costs no Python
        frame of its own: when work is left after the drain, it calls
        ``more_work_handler()`` (to schedule another drain) if set, and returns
        True.
        """
        cdef uint64_t counter
        if not self.reader_may_drain():
            return False
        iouz_store_release(&self.wake_pending, 0)
        cdef int more = self.drain_completions(DEFAULT_DRAIN_PASSES)
        if self.closed:
            return False  # closed from a completion handler: the eventfd went too
        # Read after the drain, not before: the CQEs it posted signalled the
        # eventfd again, and reading first would leave that signal to wake the
        # loop once more for nothing (an epoll wait, a read and an enter per
        # request). What the read may have taken away instead is a signal for
        # work that arrived after the drain's last enter (the kernel sets
        # SQ_TASKRUN before it signals) or a wake() from another thread (it
        # sets wake_pending before it writes): either one, drain again.
        read(self.eventfd, &counter, sizeof(counter))
        if not more and (iouz_load_acquire(&self.wake_pending) or self.kernel_has_work()):
            more = self.drain_completions(DEFAULT_DRAIN_PASSES)
        return self.work_left(more)

    def on_ring_readable(self):
        """For event loops watching ``fd`` of a ring made with
        ``defer_taskrun=False``: drain. Like ``on_eventfd_readable``, it
        calls ``more_work_handler()`` and returns True when work is left.

        Nothing is read: the fd stays readable while completions wait in the
        CQ, and the drain reaps them."""
        if not self.reader_may_drain():
            return False
        cdef int more = self.drain_completions(DEFAULT_DRAIN_PASSES)
        return False if self.closed else self.work_left(more)

    cdef bint reader_may_drain(self) except -1:
        """Whether a reader callback runs where it may drain: open, on the
        owner thread of the owner process.  Else, with a
        ``refused_reader_handler``, that is called with the ring and the
        error (which is raised without one): a level-triggered fd left
        readable would call a reader that only raised again at once, for
        ever."""
        if (not self.closed and current_pid == self.owner_pid
                and PyThread_get_thread_ident() == self.owner_thread):
            return True
        handler = self.refused_reader_handler
        try:
            self.check_owner()
        except (ValueError, WrongThread) as exc:
            if handler is None:
                raise
            handler(self, exc)
        return False

    cdef bint work_left(self, int more) except -1:
        """The end of a reader callback: when its drain left work, ask for
        another (more_work_handler) and say so."""
        if more and self.more_work_handler is not None:
            self.more_work_handler()
        return more != 0

    cdef bint watching_sockets(self) except -1:
        if self.watch_client_fds < 0:
            from iouzcrx._probe import kernel_features  # it imports this module
            self.watch_client_fds = not kernel_features().eventfd_prompt
        return self.watch_client_fds

    @property
    def watches_sockets(self):
        """Whether a blocking wait also watches the sockets of armed receives
        (see wait_readable); by default where the kernel signals the
        eventfd late (``kernel_features().eventfd_prompt`` false)."""
        return self.watching_sockets()

    @watches_sockets.setter
    def watches_sockets(self, bint on):
        self.watch_client_fds = on

    @property
    def kernel_signals_eventfd(self):
        """Whether the kernel signals ``eventfd`` when work arrives
        (IORING_CQ_EVENTFD_DISABLED clear); wake() signals it either way."""
        self.check_open()
        return not (iouz_load_acquire(self.cq_flags) & IOUZ_CQ_EVENTFD_DISABLED)

    @kernel_signals_eventfd.setter
    def kernel_signals_eventfd(self, bint on):
        self.check_owner()
        cdef uint32_t flags = iouz_load_acquire(self.cq_flags)
        if on:
            flags &= ~IOUZ_CQ_EVENTFD_DISABLED
        else:
            flags |= IOUZ_CQ_EVENTFD_DISABLED
        iouz_store_release(self.cq_flags, flags)

    def wait(self, timeout=None):
        """Drain, then sleep until the kernel signals new work or ``timeout``
        seconds pass, then drain again. Returns True if woken by the kernel.
        ``timeout`` None waits for ever; NaN or negative raises ValueError."""
        seconds = _checks.timeout(timeout)
        self.check_owner()
        if self.drain_completions(DEFAULT_DRAIN_PASSES):
            return True
        if self.closed:
            return False  # closed by a callback of that drain
        woke = self.wait_readable(-1.0 if seconds is None else seconds)
        self.drain_completions(DEFAULT_DRAIN_PASSES)
        return bool(woke)

    def wait_for(self, predicate, timeout=None):
        """Drive the ring until ``predicate()`` is true; TimeoutError after
        ``timeout`` seconds (None: no limit; NaN or negative: ValueError)."""
        seconds = _checks.timeout(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        self.drain()
        while not predicate():
            if deadline is None:
                self.wait(None)
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the ring did not complete the request in time")
                self.wait(remaining)

    def _raise_stale_taskrun_flag(self):
        """Testing aid: set SQ_TASKRUN with no task work behind it, the state
        the kernel's own race leaves (see drain_completions), on demand."""
        self.check_owner()
        iouz_atomic_or(<uint32_t *>self.sq_flags, IOUZ_SQ_TASKRUN)

    def _buffer_group_registered(self, int group):
        """Testing aid: whether the kernel holds a buffer ring for ``group``
        (IORING_REGISTER_PBUF_STATUS, Linux 6.8+; ENOENT when it does not)."""
        cdef uint32_t status[10]   # struct io_uring_buf_status
        memset(status, 0, sizeof(status))
        status[0] = group
        self.check_owner()
        cdef int ret = iouz_register(self.fd, PBUF_STATUS, status, 1)
        if ret == -ENOENT:
            return False
        if ret < 0:
            raise kernel_error(-ret, "IORING_REGISTER_PBUF_STATUS")
        return True

    def probe_opcodes(self):
        """The set of IORING_OP_* numbers this kernel supports."""
        cdef iouz_probe probe
        memset(&probe, 0, sizeof(probe))
        self.register(IOUZ_REGISTER_PROBE, &probe, IOUZ_PROBE_OPS)
        cdef int i
        return {probe.ops[i].op for i in range(probe.ops_len)
                if probe.ops[i].flags & IOUZ_PROBE_OP_SUPPORTED}

    def nop(self):
        """Queue a no-op; its CQE has res 0. Useful to test the plumbing."""
        cdef Completion request = Completion()
        self.prepare(request, IOUZ_OP_NOP, -1)
        return request

    def read(self, fd, buffer):
        """Queue a read into ``buffer`` (a writable buffer) from ``fd``; both
        are kept alive until the read completes. It reads at most
        0x7FFFF000 bytes, as read(2)."""
        cdef Completion request = Completion()
        cdef unsigned char[::1] view = buffer
        cdef iouz_sqe *sqe = self.prepare(request, IOUZ_OP_READ, fileno_of(fd), fd)
        sqe.addr = <uintptr_t>&view[0] if view.shape[0] else 0
        sqe.len = min(<size_t>view.shape[0], MAX_IO_LENGTH)
        sqe.off = <uint64_t>-1    # current file position: works on pipes
        request.keepalive = view
        request.target = fd
        return request

    def send(self, sock, data, *, callback=None, int flags=0):
        """Queue a send of ``data`` (any buffer); ``data`` and ``sock`` are
        kept alive until the send completes, so the fd it names stays open.
        It sends at most 0x7FFFF000 bytes, as send(2): the result says how
        many went."""
        cdef Completion request = Completion()
        cdef const unsigned char[::1] view = data
        cdef iouz_sqe *sqe = self.prepare(request, IOUZ_OP_SEND, fileno_of(sock), sock)
        sqe.addr = <uintptr_t>&view[0] if view.shape[0] else 0
        sqe.len = min(<size_t>view.shape[0], MAX_IO_LENGTH)
        sqe.op_flags = flags
        request.keepalive = view
        request.target = sock
        request.callback = callback
        return request

    def accept(self, sock, *, multishot=True, callback=None):
        """Queue an accept (multishot by default): each CQE's res is a new fd.
        ``sock`` is kept alive until the accept's last completion."""
        cdef Completion request = Completion()
        cdef iouz_sqe *sqe = self.prepare(request, IOUZ_OP_ACCEPT, fileno_of(sock), sock)
        sqe.op_flags = _socket.SOCK_CLOEXEC | _socket.SOCK_NONBLOCK
        if multishot:
            sqe.ioprio = IOUZ_ACCEPT_MULTISHOT
        request.target = sock
        request.callback = callback
        return request

    def shutdown(self, sock, int how=_socket.SHUT_WR):
        """Queue shutdown(2); SHUT_RD ends pending receives with res 0.
        ``sock`` is kept alive (its fd open) until the shutdown completes: the
        kernel may look the fd up only when it runs the request."""
        cdef Completion request = Completion()
        cdef iouz_sqe *sqe = self.prepare(request, IOUZ_OP_SHUTDOWN, fileno_of(sock), sock)
        sqe.len = how
        request.target = sock
        return request

    def poll(self, sock, int events, *, callback=None):
        """Queue a one-shot poll of ``sock`` for ``events`` (``select.POLLIN``
        and so on; the kernel always adds POLLERR and POLLHUP): the
        completion's res is the events that were ready.  ``sock`` is kept
        alive until it completes."""
        cdef Completion request = Completion()
        cdef iouz_sqe *sqe = self.prepare(request, IOUZ_OP_POLL_ADD, fileno_of(sock), sock)
        sqe.op_flags = <uint32_t>events  # poll32_events shares the field
        request.target = sock
        request.callback = callback
        return request

    def cancel(self, Request target not None):
        """Queue a cancel of ``target``; the target's last CQE says -ECANCELED."""
        cdef Completion request = Completion()
        cdef iouz_sqe *sqe = self.prepare(request, IOUZ_OP_ASYNC_CANCEL, -1)
        sqe.addr = <uintptr_t><void *>target
        request.target = target
        return request

    def cancel_fd(self, sock):
        """Queue a cancel of every request on ``sock`` (kept alive until the
        cancel completes)."""
        cdef Completion request = Completion()
        cdef iouz_sqe *sqe = self.prepare(request, IOUZ_OP_ASYNC_CANCEL, fileno_of(sock), sock)
        sqe.op_flags = IOUZ_ASYNC_CANCEL_FD | IOUZ_ASYNC_CANCEL_ALL
        request.target = sock
        return request

    def close(self, timeout=1.0):
        """Cancel everything in flight, wait (up to ``timeout`` s) for the
        cancellations to complete, then unmap the rings and close the fds.

        Close is a request that takes effect when nothing walks the rings:
        called from a completion callback (``on_data``, ``on_end``, a send or
        accept callback) it takes effect when that drain has dispatched its
        batch; called from a thread other than the owner it only records the
        request and wakes the eventfd, and the owner closes at its next drain
        (``closed`` turns true then; a ring whose owner never drains again is
        released when it is collected).  In a process forked from the owner it
        submits nothing: it only releases the child's copies of the mappings
        and fds, and the parent's ring goes on.  Closing twice is harmless.

        The kernel reclaims zcrx buffers still held by the program when the
        ring goes; memoryviews over the area stay readable.
        """
        seconds = _checks.timeout(timeout)
        if self.closed or self.closing:
            return
        if current_pid != self.owner_pid:
            self.forget()
        elif PyThread_get_thread_ident() != self.owner_thread:
            self.close_requested = True
            self.wake()
        elif self.draining:
            self.close_requested = True
        else:
            self.close_now(_math.inf if seconds is None else seconds)

    cdef int close_now(self, double timeout) except -1:
        """On the owner thread, outside any drain."""
        cdef iouz_sqe *sqe
        self.closing = True
        self.close_requested = False
        try:
            if self.inflight:
                sqe = self.get_sqe()
                sqe.opcode = IOUZ_OP_ASYNC_CANCEL
                sqe.op_flags = IOUZ_ASYNC_CANCEL_ANY | IOUZ_ASYNC_CANCEL_ALL
                sqe.fd = -1
                deadline = time.monotonic() + timeout
                self.drain_completions(DEFAULT_DRAIN_PASSES)
                while self.inflight and time.monotonic() < deadline:
                    self.drain_completions(DEFAULT_DRAIN_PASSES)
                    if self.inflight:
                        self.wait_readable(0.01)
        finally:
            self.finish_close()
        return 0

    cdef int finish_close(self) except -1:
        cdef RingClient client
        clients = self.live_clients()
        self.clients = []
        self.inflight.clear()
        error = None
        handler = self.closing_handler
        if handler is not None:
            # Before the fds go: whoever watches them stops now, while the
            # numbers still name this ring's files and no other.
            self.closing_handler = None
            try:
                handler(self)
            except BaseException as exc:
                error = exc  # raised once the ring is closed all the same
        self.release_resources()
        self.kernel_refs = []
        for client in clients:
            try:
                client.ring_closed()
            except BaseException as exc:
                # A receive's on_end failed: every client still hears of
                # the close, and the first failure is raised after.
                if error is None:
                    error = exc
        if error is not None:
            raise error
        return 0

    def close_from_any_thread(self):
        """Close now, on whichever thread of the owner process calls, for a
        ring its owner will never walk again (its event loop closed while
        not running, say), where ``close()`` would only ask the owner to.
        Nothing is submitted (only the owner may submit): closing the fd
        makes the kernel cancel what is in flight, and the clients hear of
        the close as from ``close()``.  RuntimeError while a drain runs."""
        if self.closed or self.closing:
            return
        if current_pid != self.owner_pid:
            self.forget()
            return
        if self.draining:
            raise RuntimeError("the ring is being drained: close() it instead, which "
                               "takes effect when that drain is over")
        self.closing = True
        self.close_requested = False
        self.finish_close()

    cdef int forget(self) except -1:
        """In a forked child: drop this process's copies of the mappings and
        fds; the requests and clients are the parent's, left untouched."""
        cdef list kept = []
        if self.draining:
            # Called from a handler that forked: the walk it returns into
            # runs that handler's request through a borrowed pointer, which
            # the in-flight set may hold alone.  The child's copies stay
            # until the ring goes.
            kept = [self.inflight, self.clients]
            self.inflight = set()
        else:
            self.inflight.clear()
        self.clients = []
        self.dropped_buffer_groups = []
        self.release_resources()
        self.kernel_refs = kept
        return 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
