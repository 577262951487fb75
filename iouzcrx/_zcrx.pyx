# cython: language_level=3
"""zcrx: an interface queue (ifq) registered with the ring, its refill ring,
and multishot RECV_ZC completions.

Two modes share this code: ``zerocopy`` binds the ifq to a NIC RX queue (the
NIC writes payloads into the area), ``copy`` registers it with ZCRX_REG_NODEV
(Linux 7.1+) so the kernel copies any TCP socket's data into the area.
"""

cimport cython
from libc.errno cimport errno
from libc.stdint cimport int32_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memmove, memset
from libc.stdlib cimport qsort
from posix.mman cimport (MAP_ANONYMOUS, MAP_FAILED, MAP_POPULATE, MAP_PRIVATE,
                         PROT_READ, PROT_WRITE, mmap, munmap)
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close as close_fd
from cpython.pythread cimport (NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock)

from iouzcrx._abi cimport *
from iouzcrx._area cimport Area
from iouzcrx._receive cimport ReceiveQueue, Receiver, ReturnedBuffer
from iouzcrx._ring cimport Request, Ring

import errno as _errno
import socket as _socket
import weakref as _weakref

from iouzcrx import _checks
from iouzcrx._probe import kernel_features, zcrx_events_missing, zcrx_export_missing
from iouzcrx.errors import (InterfaceNotFound, InvalidConfiguration, KernelTooOld,
                            QueueOutOfRange, kernel_error, zcrx_register_error)


cdef enum:
    PAGE_SIZE = 4096
    RQ_HEADER_RESERVE = 128   # covers the 7.3 layout (entries at 128) and older (64)
    DEFAULT_AREA_SIZE = 64 * 1024 * 1024
    HUGE_PAGE_SIZE = 2 * 1024 * 1024

ZCRX_MODES = ("zerocopy", "copy")


def rx_queue_count(str interface):
    """The interface's real RX queue count from sysfs, or None if unknown."""
    import os
    try:
        return sum(1 for name in os.listdir(f"/sys/class/net/{interface}/queues")
                   if name.startswith("rx-"))
    except OSError:
        return None


cdef inline size_t page_align(size_t n) noexcept:
    return (n + PAGE_SIZE - 1) & ~(<size_t>PAGE_SIZE - 1)


cdef uint32_t round_up_pow2(uint64_t n) noexcept:
    cdef uint64_t p = 1
    while p < n:
        p <<= 1
    return <uint32_t>p


cdef enum:
    # An event type fires once and stays silent until re-armed; re-arming
    # costs a register syscall, so a flood of copies re-arms at most this
    # often (the kernel's counters keep counting in between).
    EVENT_REARM_INTERVAL_NS = 100 * 1000 * 1000


cdef inline uint64_t monotonic_ns() noexcept:
    cdef timespec now
    clock_gettime(CLOCK_MONOTONIC, &now)
    return <uint64_t>now.tv_sec * 1000000000 + <uint64_t>now.tv_nsec


@cython.final
@cython.no_gc_clear
cdef class RefillRing:
    """The refill ring's region (user memory the kernel pinned at
    registration) and the producer side of the ring.

    The kernel reads the ring as single-producer. A queue imported into
    another ring (export_queue) shares this object, so every producer step
    (read the head, write entries, publish the tail, flush) happens under
    ``lock``, taken without the GIL held: the queues live on different
    threads and, with free-threaded Python, without a GIL at all."""

    def __cinit__(self):
        self.lock = PyThread_allocate_lock()
        if self.lock == NULL:
            raise MemoryError()
        self.sharers = []

    def __dealloc__(self):
        # The kernel pinned the region's pages: unmapping only drops our
        # view of them, whatever rings still use the queue.
        if self.region != NULL:
            munmap(self.region, self.region_size)
            self.region = NULL
        if self.lock != NULL:
            PyThread_free_lock(self.lock)
            self.lock = NULL

    cdef int acquire(self) except -1:
        if not PyThread_acquire_lock(self.lock, NOWAIT_LOCK):
            with nogil:
                PyThread_acquire_lock(self.lock, WAIT_LOCK)
        return 0

    cdef void release(self) noexcept:
        PyThread_release_lock(self.lock)

    cdef int returns_reached_kernel(self, ZcrxQueue by) except -1:
        """Chunks went back to the kernel: any sharer starved for them
        may receive again; wake the rings of the others."""
        cdef ZcrxQueue queue
        self.epoch += 1
        if len(self.sharers) < 2:
            return 0
        for ref in self.sharers:
            queue = ref()
            if queue is not None and queue is not by and queue.starved and not queue.closed:
                queue.ring.wake()
        return 0


@cython.final
cdef class ZcrxExport:
    """A zcrx queue exported from its ring (ZCRX_CTRL_EXPORT, Linux 6.19+):
    owns the ``[zcrx]`` file descriptor the kernel made, which keeps the
    queue registered even after its ring closes.  ``ZcrxQueue.imported()``
    registers the same queue on another ring of this process.  ``close()``
    is idempotent; the fd is also closed when the object is collected."""

    def __cinit__(self, *args, **kwargs):
        self.fd = -1

    def __init__(self, *args, **kwargs):
        # Arguments were silently dropped: ZcrxExport(fd) looked like it
        # adopted an fd, and left an empty export.
        if args or kwargs:
            raise TypeError(
                "ZcrxExport() takes no arguments: get one from queue.export_queue(); "
                "it cannot adopt an fd")

    def __reduce__(self):
        raise TypeError(
            "a ZcrxExport owns a file descriptor of this process and cannot be pickled "
            "or copied: export the queue again for another ring (an fd to send to "
            "another process comes from detach())")

    def __dealloc__(self):
        if self.fd >= 0:
            close_fd(self.fd)
            self.fd = -1

    def fileno(self):
        """The exported queue's fd (ValueError once closed)."""
        if self.fd < 0:
            raise ValueError("the zcrx export is closed")
        return self.fd

    @property
    def closed(self):
        return self.fd < 0

    def close(self):
        """Close the fd. The queue stays registered with the rings that
        use it. Closing twice is harmless."""
        cdef int fd = iouz_exchange_int(&self.fd, -1)
        if fd >= 0:
            close_fd(fd)

    def detach(self):
        """Hand over the fd (to send it to another process, say): the
        caller closes it; this object no longer does."""
        cdef int fd = iouz_exchange_int(&self.fd, -1)
        if fd < 0:
            raise ValueError("the zcrx export is closed")
        return fd

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        state = "closed" if self.fd < 0 else f"fd={self.fd}"
        return f"<ZcrxExport {self.mode} {state}>"


@cython.final
cdef class ZcrxEvents(Request):
    """The user_data of one queue's zcrx event descriptor (Linux 7.2+).

    The kernel posts a 16-byte CQE carrying this object's address when an
    armed event type fires: ``res`` is the type (copy fallback, allocation
    failure).  The ring dispatches it like any completion; it never has
    IORING_CQE_F_MORE and is never in the ring's in-flight set, so the ring
    keeps it in ``kernel_refs`` until it closes: the queue may be gone by
    then, the registration is not.  It holds no reference to the queue."""

    cdef int complete(self, int32_t res, uint32_t flags, uint64_t extra) except -1:
        if res == IOUZ_ZCRX_EVENT_COPY:
            self.copy_events += 1
        elif res == IOUZ_ZCRX_EVENT_ALLOC_FAIL:
            self.alloc_fail_events += 1
        else:
            self.unknown_events += 1
            return 0
        self.fired |= 1u << res
        return 0


cdef int _highest_first(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<const ReturnedBuffer *>a).token
    cdef uint64_t y = (<const ReturnedBuffer *>b).token
    return (x < y) - (x > y)


@cython.final
@cython.no_gc_clear
cdef class ZcrxQueue(ReceiveQueue):
    """An ifq on ``ring``: area, refill ring and RECV_ZC receives.

    ``mode="copy"`` needs Linux >= 7.1 and CAP_NET_ADMIN; ``mode="zerocopy"``
    needs a NIC queue set up for zcrx (``interface``, ``queue``).  Views over
    the area come out of ``recv_multishot(sock)``.

    The kernel frees an ifq (and unpins its area) only with its ring:
    ``close()`` stops the receives and detaches the queue, but the ifq and its
    pinned area stay registered until the ring closes.
    """

    def __init__(self, Ring ring not None, *, str mode="copy", interface=None, queue=None,
                 area_size=DEFAULT_AREA_SIZE, rq_entries=None, rx_buf_len=0,
                 bint hugepages=False):
        ring.check_owner()  # before anything is allocated
        self.begin_setup()
        if mode not in ZCRX_MODES:
            raise InvalidConfiguration(f"zcrx mode must be one of {ZCRX_MODES}, not {mode!r}")
        # The arguments first: a value that can never do is named as such,
        # not hidden behind what the kernel lacks.
        cdef uint32_t buf_len = _checks.integer(
            "rx_buf_len", rx_buf_len, 0, 1 << 31, "0 (page-sized chunks) or a power of two")
        if buf_len and (buf_len < PAGE_SIZE or buf_len & (buf_len - 1)):
            raise InvalidConfiguration(
                f"rx_buf_len must be 0 or a power of two >= {PAGE_SIZE}, not {buf_len}")
        if buf_len > HUGE_PAGE_SIZE:
            raise InvalidConfiguration(
                f"rx_buf_len {buf_len} is larger than a 2 MiB page, the largest physically "
                f"contiguous unit an area can be made of: use at most {HUGE_PAGE_SIZE}")
        cdef uint32_t chunk = buf_len or PAGE_SIZE
        cdef uint64_t chunks = _checks.size("area_size", area_size, chunk) // chunk
        cdef uint32_t entries
        if rq_entries is None:
            # Room to return every chunk at once (kernel-abi §8.7 sizing).
            entries = round_up_pow2(chunks if chunks < IOUZ_RQ_MAX_ENTRIES else IOUZ_RQ_MAX_ENTRIES)
        else:
            try:
                rq_count = _checks.integer("rq_entries", rq_entries, 1, IOUZ_RQ_MAX_ENTRIES,
                                           "a number of entries or None")
            except TypeError as exc:
                # InvalidConfiguration is what this parameter has always raised.
                raise InvalidConfiguration(str(exc)) from None
            entries = round_up_pow2(rq_count)
        if queue is not None:
            _checks.integer("queue", queue, 0, 0xFFFFFFFE, "an RX queue index or None")
        if interface is not None and not isinstance(interface, str):
            raise TypeError(f"interface must be a network interface name or None, "
                            f"not {interface!r}")
        features = kernel_features()
        cdef uint32_t if_idx = 0
        cdef uint32_t if_rxq = 0
        cdef uint32_t reg_flags = 0
        if mode == "zerocopy":
            if interface is None or queue is None:
                raise InvalidConfiguration(
                    "zerocopy mode needs interface= (e.g. 'eth0') and queue= (the RX "
                    "queue index your flow is steered to)")
            try:
                if_idx = _socket.if_nametoindex(interface)
            except (OSError, ValueError):
                raise InterfaceNotFound(
                    _errno.ENODEV,
                    f"no network interface {interface!r} in this network namespace "
                    "(see 'ip link')") from None
            rx_queues = rx_queue_count(interface)
            if rx_queues is not None and queue >= rx_queues:
                # The kernel checks queue ops before the range, so a NIC
                # without them would say EOPNOTSUPP; name the real mistake.
                raise QueueOutOfRange(
                    _errno.ERANGE,
                    f"RX queue {queue} does not exist on {interface}, which has "
                    f"{rx_queues} (valid: 0..{rx_queues - 1}); see 'ethtool -l {interface}'")
            if_rxq = queue
        else:
            if interface is not None or queue is not None:
                raise InvalidConfiguration("copy mode takes no interface or queue")
            # Without the zcrx query (6.18) there is no NODEV either: it
            # came later (7.1); saying so beats the EPERM a non-root caller
            # would get from the registration itself.
            if not features.zcrx_nodev:
                raise KernelTooOld(
                    _errno.EOPNOTSUPP,
                    f"copy mode needs ZCRX_REG_NODEV (Linux >= 7.1); this kernel "
                    f"({features.release}) does not offer it")
            reg_flags = IOUZ_ZCRX_REG_NODEV
        if buf_len == PAGE_SIZE:
            # The default chunk: asked for explicitly, 7.3 would demand
            # QCFG_RX_PAGE_SIZE of the driver for what every driver does.
            buf_len = 0
        if buf_len and not features.zcrx_rx_buf_len:
            raise KernelTooOld(
                _errno.EOPNOTSUPP,
                f"rx_buf_len needs Linux >= 7.0; this kernel ({features.release}) "
                "only has page-sized chunks (leave rx_buf_len=0)")

        self.ring = ring
        self.mode = mode
        self.interface = interface
        self.queue = queue
        # Chunks beyond a page must be physically contiguous (the kernel checks
        # the area's segments): huge pages, reserved or transparent.
        self.area = Area(area_size, hugepages, buf_len)
        header = max(RQ_HEADER_RESERVE, features.rq_hdr_size)
        cdef size_t rqes_end = header + entries * sizeof(iouz_zcrx_rqe)
        cdef size_t stats_offset = 0
        cdef size_t stats_align = features.zcrx_stats_alignment
        if features.zcrx_events:
            # The kernel's counters live in the refill ring's region, past
            # every entry (kernel-abi §8.2): memory this queue owns and
            # unmaps only after the kernel let go of it.
            stats_offset = (rqes_end + stats_align - 1) // stats_align * stats_align
            rqes_end = stats_offset + max(<size_t>features.zcrx_stats_size,
                                          sizeof(iouz_zcrx_stats))
        cdef RefillRing refill = RefillRing.__new__(RefillRing)
        refill.region_size = page_align(rqes_end)
        cdef void *region = mmap(NULL, refill.region_size, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0)
        if region == MAP_FAILED:
            raise kernel_error(errno, "mapping the refill ring")
        refill.region = <char *>region
        self.refill = refill

        cdef iouz_zcrx_area_reg area_reg
        cdef iouz_region_desc region_desc
        cdef iouz_zcrx_ifq_reg reg
        memset(&area_reg, 0, sizeof(area_reg))
        memset(&region_desc, 0, sizeof(region_desc))
        memset(&reg, 0, sizeof(reg))
        area_reg.addr = <uintptr_t>self.area.base
        area_reg.len = self.area.size
        region_desc.user_addr = <uintptr_t>refill.region
        region_desc.size = refill.region_size
        region_desc.flags = IOUZ_MEM_REGION_TYPE_USER
        reg.if_idx = if_idx
        reg.if_rxq = if_rxq
        reg.rq_entries = entries
        reg.flags = reg_flags
        reg.area_ptr = <uintptr_t>&area_reg
        reg.region_ptr = <uintptr_t>&region_desc
        reg.rx_buf_len = buf_len
        cdef iouz_zcrx_event_desc event_desc
        memset(&event_desc, 0, sizeof(event_desc))
        cdef ZcrxEvents events = None
        if features.zcrx_events:
            events = ZcrxEvents.__new__(ZcrxEvents)
            event_desc.user_data = <uintptr_t><void *>events
            event_desc.type_mask = features.zcrx_event_types & (
                (1u << IOUZ_ZCRX_EVENT_ALLOC_FAIL) | (1u << IOUZ_ZCRX_EVENT_COPY))
            event_desc.flags = IOUZ_ZCRX_EVENT_DESC_FLAG_STATS
            event_desc.stats_offset = stats_offset
            reg.event_desc = <uintptr_t>&event_desc
        ring.check_owner()
        cdef int ret = iouz_register(ring.fd, IOUZ_REGISTER_ZCRX_IFQ, &reg, 1)
        if ret == -EINVAL and events is not None:
            # The query promised events; a kernel that still refuses the
            # descriptor gets a queue without them rather than no queue
            # (a mistake of ours elsewhere fails again, and is reported).
            reg.event_desc = 0
            events = None
            self.kernel_stats_missing = (
                f"this kernel ({features.release}) refused the zcrx event "
                "descriptor its query offers (EINVAL)")
            ret = iouz_register(ring.fd, IOUZ_REGISTER_ZCRX_IFQ, &reg, 1)
        elif events is None:
            self.kernel_stats_missing = zcrx_events_missing(features)
        if ret < 0:
            raise zcrx_register_error(-ret, mode=mode, interface=interface, queue=queue,
                                      rx_buf_len=buf_len, nodev=features.zcrx_nodev)

        self.zcrx_id = reg.zcrx_id
        self.rq_entries = reg.rq_entries
        refill.rq_entries = reg.rq_entries
        refill.rq_mask = reg.rq_entries - 1
        # 6.18/6.19 leave rx_buf_len untouched (reserved): chunks are pages.
        self.chunk_size = reg.rx_buf_len or chunk
        refill.rq_head = <uint32_t *>(refill.region + reg.offsets.head)
        refill.rq_tail = <uint32_t *>(refill.region + reg.offsets.tail)
        refill.rqes = <iouz_zcrx_rqe *>(refill.region + reg.offsets.rqes)
        refill.local_tail = refill.rq_tail[0]
        refill.flushed_tail = refill.local_tail
        if events is not None:
            ring.kernel_refs.append(events)
            self.events = events
            self.kernel_stats = <iouz_zcrx_stats *>(refill.region + stats_offset)
        self.attach(features)

    cdef int attach(self, features) except -1:
        """What a registered queue and an imported one set up alike."""
        self.buffer_unit = self.chunk_size
        self.tokens_are_offsets = True
        self.flush_after_publish = self.mode == "copy"
        self.total_buffers = self.area.size // self.chunk_size
        self.can_flush = features.zcrx_ctrl_flush
        self.setup_returns(max(<uint64_t>self.rq_entries, self.total_buffers))
        self.refill.acquire()
        try:
            self.refill.sharers = [ref for ref in self.refill.sharers if ref() is not None]
            self.refill.sharers.append(_weakref.ref(self))
            self.refill_epoch = self.refill.epoch
        finally:
            self.refill.release()
        self.ring.add_client(self)
        return 0

    # -- one queue, several rings (Linux 6.19+) -----------------------------------

    def export_queue(self):
        """Export this queue (ZCRX_CTRL_EXPORT): a ZcrxExport owning the
        kernel's fd for it, to pass to ``ZcrxQueue.imported()`` on another
        ring of this process.  Owner thread only."""
        if self.closed or self.ring is None:
            raise ValueError(f"the {self.mode} receive queue is closed")
        self.ring.check_owner()
        missing = zcrx_export_missing(kernel_features())
        if missing is not None:
            raise KernelTooOld(_errno.EOPNOTSUPP, missing)
        cdef iouz_zcrx_ctrl ctrl
        memset(&ctrl, 0, sizeof(ctrl))
        ctrl.zcrx_id = self.zcrx_id
        ctrl.op = IOUZ_ZCRX_CTRL_EXPORT
        cdef int ret = iouz_register(self.ring.fd, IOUZ_REGISTER_ZCRX_CTRL, &ctrl, 0)
        if ret < 0:
            raise kernel_error(-ret, "ZCRX_CTRL_EXPORT")
        cdef ZcrxExport export = ZcrxExport.__new__(ZcrxExport)
        # zc_export.zcrx_fd: the low 32 bits of the union's first word.
        export.fd = <int>(ctrl.payload[0] & 0xFFFFFFFF)
        export.source = self
        export.mode = self.mode
        return export

    @staticmethod
    def imported(Ring ring not None, export):
        """The queue of ``export`` (a ZcrxExport of this process) registered
        on ``ring`` (ZCRX_REG_IMPORT, Linux 6.19+): the same area and refill
        ring, a receive queue of its own on that ring's thread.  Call it on
        ``ring``'s owner thread.  Returns go to the shared refill ring under
        a lock; the kernel's copy counters and events stay with the
        exporting queue."""
        ring.check_owner()
        if not isinstance(export, ZcrxExport):
            raise TypeError(
                f"export must be the ZcrxExport of a queue of this process (from "
                f"queue.export_queue()), not {export!r}; a queue cannot be imported "
                "from another process: its area and refill ring are this process's "
                "private memory")
        features = kernel_features()
        missing = zcrx_export_missing(features)
        if missing is not None:
            raise KernelTooOld(_errno.EOPNOTSUPP, missing)
        cdef ZcrxExport source = export
        if source.fd < 0 or source.source is None:
            raise ValueError("the zcrx export is closed: export the queue again")
        cdef ZcrxQueue origin = source.source
        cdef iouz_zcrx_ifq_reg reg
        memset(&reg, 0, sizeof(reg))
        reg.if_idx = source.fd
        reg.flags = IOUZ_ZCRX_REG_IMPORT
        cdef int ret = iouz_register(ring.fd, IOUZ_REGISTER_ZCRX_IFQ, &reg, 1)
        if ret < 0:
            raise kernel_error(-ret, "importing a zcrx queue (ZCRX_REG_IMPORT)")
        cdef ZcrxQueue queue = ZcrxQueue.__new__(ZcrxQueue)
        queue.ring = ring
        queue.mode = origin.mode
        queue.interface = origin.interface
        queue.queue = origin.queue
        queue.area = origin.area
        queue.refill = origin.refill
        queue.zcrx_id = reg.zcrx_id
        queue.rq_entries = origin.rq_entries
        queue.chunk_size = origin.chunk_size
        queue.kernel_stats_missing = (
            "an imported queue: the kernel counts copies on the exporting queue "
            "(its stats())")
        queue.attach(features)
        return queue

    # -- refill ring ---------------------------------------------------------

    cdef int publish_returns(self) except -1:
        """Move pending returns into the refill ring and publish the tail once
        per batch; when the ring is full, ask the kernel to drain it.

        Without a NIC (copy mode) nothing else ever drains the ring, so every
        batch is flushed. On a NIC queue the page pool takes entries when the
        NIC needs buffers, but the copy fallback (data that did not arrive
        through this queue) allocates only from chunks the kernel already
        took: while a receive waits for buffers, flush as well."""
        cdef RefillRing refill = self.refill
        cdef bint copy_mode = self.flush_after_publish
        if copy_mode:
            self.order_for_freelist()
        refill.acquire()
        try:
            self.publish_locked(refill, copy_mode)
        finally:
            refill.release()
        return 0

    cdef int publish_locked(self, RefillRing refill, bint copy_mode) except -1:
        cdef size_t done = 0
        cdef uint32_t head, free, n, i
        cdef iouz_zcrx_rqe *rqe
        cdef bint flushed_when_full = False
        while done < self.pending_count:
            head = iouz_load_acquire(refill.rq_head)
            free = refill.rq_entries - (refill.local_tail - head)
            if free == 0:
                # Full: in copy mode nothing else will ever drain it, and on a
                # NIC it only drains when the NIC needs buffers.
                if not self.can_flush or flushed_when_full:
                    break
                self.flush_refill_ring()
                flushed_when_full = True
                continue
            flushed_when_full = False
            n = <uint32_t>min(<size_t>free, self.pending_count - done)
            for i in range(n):
                rqe = &refill.rqes[(refill.local_tail + i) & refill.rq_mask]
                rqe.off = self.pending[done + i].token
                rqe.len = self.pending[done + i].length
                rqe.pad = 0
            refill.local_tail += n
            iouz_store_release(refill.rq_tail, refill.local_tail)
            done += n
            self.refills += 1
        if done:
            self.pending_count -= done
            if self.pending_count:
                memmove(self.pending, self.pending + done,
                        self.pending_count * sizeof(self.pending[0]))
            if (copy_mode or self.starved) and self.can_flush:
                self.flush_refill_ring()
        return 0

    cdef int order_for_freelist(self) except -1:
        """Put the pending returns in descending address order.

        In copy mode the kernel keeps free chunks on a stack, filled from the
        refill ring in ring order and popped from the top for each copy: what
        goes in last comes out first. Returned highest address first, the
        chunks come back out lowest first, so the data of one receive lands
        in consecutive chunks and joins into one view (a few times fewer
        deliveries). Views are mostly released in the order they were
        delivered, which is then ascending: a reversal suffices, and a full
        sort is the fallback."""
        cdef size_t n = self.pending_count
        cdef size_t i
        cdef ReturnedBuffer swap
        if n < 2:
            return 0
        if self.pending_ascending:
            for i in range(n // 2):
                swap = self.pending[i]
                self.pending[i] = self.pending[n - 1 - i]
                self.pending[n - 1 - i] = swap
        else:
            qsort(self.pending, n, sizeof(ReturnedBuffer), _highest_first)
        self.pending_ascending = False
        return 0

    cdef int flush_with_lock(self) except -1:
        self.refill.acquire()
        try:
            self.flush_refill_ring()
        finally:
            self.refill.release()
        return 0

    cdef int flush_refill_ring(self) except -1:
        """ZCRX_CTRL_FLUSH_RQ; the caller holds the refill ring's lock."""
        cdef iouz_zcrx_ctrl ctrl
        memset(&ctrl, 0, sizeof(ctrl))
        ctrl.zcrx_id = self.zcrx_id
        ctrl.op = IOUZ_ZCRX_CTRL_FLUSH_RQ
        self.ring.check_owner()
        cdef int ret = iouz_register(self.ring.fd, IOUZ_REGISTER_ZCRX_CTRL, &ctrl, 0)
        if ret < 0:
            raise kernel_error(-ret, "ZCRX_CTRL_FLUSH_RQ")
        self.flushes += 1
        cdef RefillRing refill = self.refill
        if refill.flushed_tail != refill.local_tail:
            # Entries the kernel had not taken are now free chunks.
            refill.flushed_tail = refill.local_tail
            self.return_epoch += 1
            refill.returns_reached_kernel(self)
        return 0

    # -- kernel events and statistics (Linux 7.2+) -------------------------------

    cdef int before_enter(self) except -1:
        cdef RefillRing refill = self.refill
        if refill.epoch != self.refill_epoch:
            # Another ring sharing this queue put chunks back: a receive
            # starved here may find them.
            self.refill_epoch = refill.epoch
            self.return_epoch += 1
        ReceiveQueue.before_enter(self)
        if self.events is not None and self.events.fired and not self.closed:
            self.rearm_events(False)
        return 0

    cdef int rearm_events(self, bint now) except -1:
        """Arm again the event types that fired, at most once per
        EVENT_REARM_INTERVAL_NS unless ``now``."""
        cdef ZcrxEvents events = self.events
        cdef uint64_t clock = monotonic_ns()
        cdef iouz_zcrx_ctrl ctrl
        cdef uint32_t event_type
        cdef int ret
        if not now and clock - self.events_armed_at < EVENT_REARM_INTERVAL_NS:
            return 0
        self.events_armed_at = clock
        self.ring.check_owner()
        for event_type in range(<uint32_t>IOUZ_ZCRX_EVENT_TYPES):
            if not (events.fired & (1u << event_type)):
                continue
            events.fired &= ~(1u << event_type)
            memset(&ctrl, 0, sizeof(ctrl))
            ctrl.zcrx_id = self.zcrx_id
            ctrl.op = IOUZ_ZCRX_CTRL_ARM_EVENT
            ctrl.payload[0] = event_type
            ret = iouz_register(self.ring.fd, IOUZ_REGISTER_ZCRX_CTRL, &ctrl, 0)
            # EINVAL: not fired as far as the kernel knows (armed already).
            if ret < 0 and ret != -EINVAL:
                raise kernel_error(-ret, "ZCRX_CTRL_ARM_EVENT")
            self.event_rearms += 1
        return 0

    def arm_events(self):
        """Arm again, now, the event types that fired since they were last
        armed (the ring does it by itself, at most ten times a second).
        Owner thread only; nothing to do without kernel events."""
        if self.events is None or self.closed:
            return
        self.rearm_events(True)

    def kernel_counters(self):
        """The kernel's own counters of this queue's zcrx instance (Linux
        7.2+): ``copies`` (copy operations: one per piece of a packet the
        kernel copied, which may fill several chunks) and ``copied_bytes``
        (data the kernel copied
        into the area instead of the NIC writing it there: all of it in
        ``copy`` mode, off-queue traffic in ``zerocopy`` mode), and the event
        CQEs seen: ``copy_events``, ``alloc_fail_events``.  None where the
        kernel does not keep them (``kernel_stats_missing`` says why)."""
        if self.kernel_stats == NULL:
            return None
        return {
            "copies": iouz_load_relaxed64(&self.kernel_stats.copy_count),
            "copied_bytes": iouz_load_relaxed64(&self.kernel_stats.copy_bytes),
            "copy_events": self.events.copy_events,
            "alloc_fail_events": self.events.alloc_fail_events,
            "event_rearms": self.event_rearms,
        }

    # -- receives ------------------------------------------------------------

    cdef int arm(self, Receiver receiver) except -1:
        cdef iouz_sqe *sqe = self.ring.prepare(receiver, IOUZ_OP_RECV_ZC, receiver.fd,
                                               receiver.sock)
        sqe.ioprio = IOUZ_RECV_MULTISHOT
        sqe.file_index = self.zcrx_id
        receiver.armed = True
        return 0

    cdef int receive(self, Receiver receiver, int32_t res, uint32_t flags,
                     uint64_t extra) except -1:
        cdef uint64_t offset
        if res > 0:
            offset = extra & ~IOUZ_ZCRX_AREA_MASK
            if (extra >> IOUZ_ZCRX_AREA_SHIFT) != 0 or offset + <uint64_t>res > self.area.size:
                # Never hand out a view outside the area (kernels before 7.3.2
                # truncate offsets of areas >= 4 GiB).
                raise kernel_error(_errno.EFAULT,
                                   f"RECV_ZC completion points outside the area (off={extra:#x}, "
                                   f"len={res})")
            self.buffers_in_use += 1
            self.bytes_received += res
            self.chunks_received += 1
            # Each completion keeps its own refill entry (one user_ref per
            # CQE), so joining adjacent ones into one view changes nothing for
            # the kernel; a chunk joins a run only from a chunk boundary.
            # (chunk_size is a power of two: a mask, not a division per CQE.)
            receiver.add_chunk(self.area.base + offset, res, extra,
                               ((offset + <uint64_t>res) & (self.chunk_size - 1)) == 0)
            if not (flags & IOUZ_CQE_F_MORE):
                return self.rearm(receiver)
            return 0
        if flags & IOUZ_CQE_F_MORE:
            return 0
        receiver.armed = False
        if res == -ENOSPC:
            # CQ was full; nothing beyond the reported data left the socket.
            return self.rearm(receiver)
        if res == -ENOMEM:
            # The copy path found no free chunk. Chunks returned to the refill
            # ring since the last flush are not free yet: on a NIC queue only
            # the page pool's refill or a flush takes them, and the pool may
            # never refill for a flow that does not arrive on this queue.
            if self.can_flush and self.refill.flushed_tail != self.refill.local_tail:
                self.flush_with_lock()
            return self.starve(receiver)
        if res == -EFAULT and self.mode == "zerocopy":
            # The kernel found the socket's payload in net_iov buffers of
            # another ifq's page pool, which this ifq cannot hand out: the
            # connection's packets arrive on an RX queue bound to another
            # zcrx queue. The bare errno would not say so.
            return receiver.finish(kernel_error(
                EFAULT,
                f"zerocopy receive on fd {receiver.fd} through {self.interface} queue "
                f"{self.queue}: its packets arrive on an RX queue bound to another zcrx "
                "queue, whose buffers this one cannot hand out; steer the flow onto RX "
                f"queue {self.queue} (an ntuple rule or RSS), or receive it through the "
                "queue it arrives on (create_zcrx_server(queues=[...]) routes each "
                "connection by its RX queue)"), False)
        return self.end_by_kernel(receiver, res)

    def flush(self):
        """Publish pending returns and have the kernel take the refill ring now
        (ZCRX_CTRL_FLUSH_RQ, Linux 6.19+)."""
        if self.closed or self.ring is None:
            return
        self.ring.check_owner()
        self.publish_returns()
        if self.can_flush:
            self.flush_with_lock()

    def _emulate_nic_refill(self, bint flush=True):
        """Test aid: refill like a queue bound to a NIC (no flush after
        every return), and with ``flush=False`` like a kernel without
        ZCRX_CTRL_FLUSH_RQ, so that a copy-mode queue exercises the
        starvation handling of zerocopy mode."""
        if self.ring is None:
            raise ValueError("the zcrx queue was never set up")
        self.ring.check_owner()
        self.flush_after_publish = False
        if not flush:
            self.can_flush = False

    def stats(self):
        stats = self.zero_copy_stats()
        stats.update(ReceiveQueue.stats(self))
        stats.update(zcrx_id=self.zcrx_id, rq_entries=self.rq_entries,
                     chunk_size=self.chunk_size, flushes=self.flushes)
        stats["area_page_size"] = self.area.page_size if self.area is not None else None
        return stats

    def zero_copy_stats(self):
        """What shows whether zero copy happens: ``kernel_counters()``
        (each None without them), ``zero_copy_bytes`` and
        ``zero_copy_share`` (against the bytes every ring sharing the queue
        received: the kernel counts its copies per queue, not per ring),
        ``kernel_stats`` and ``kernel_stats_missing``."""
        counters = self.kernel_counters()
        if counters is None:
            return dict(kernel_stats=False, kernel_stats_missing=self.kernel_stats_missing,
                        copies=None, copied_bytes=None, zero_copy_bytes=None,
                        zero_copy_share=None, copy_events=None, alloc_fail_events=None,
                        event_rearms=None)
        cdef ZcrxQueue sharer
        received = 0
        for ref in self.refill.sharers:
            sharer = ref()
            if sharer is not None:
                received += sharer.bytes_received
        copied = counters["copied_bytes"]
        zero_copy = received - copied if received > copied else 0
        return dict(kernel_stats=True, kernel_stats_missing=None, zero_copy_bytes=zero_copy,
                    zero_copy_share=zero_copy / received if received else None, **counters)

    def __repr__(self):
        where = f" {self.interface}:{self.queue}" if self.interface is not None else ""
        area = self.area.size if self.area is not None else None
        return (f"<ZcrxQueue {self.mode}{where} area={area} "
                f"chunks={self.total_buffers} in_use={self.buffers_in_use}>")
