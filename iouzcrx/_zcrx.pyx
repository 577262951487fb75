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

from iouzcrx._abi cimport *
from iouzcrx._area cimport Area
from iouzcrx._receive cimport ReceiveQueue, Receiver, ReturnedBuffer
from iouzcrx._ring cimport Ring

import errno as _errno
import socket as _socket

from iouzcrx import _checks
from iouzcrx._probe import kernel_features
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
        self.region_size = page_align(header + entries * sizeof(iouz_zcrx_rqe))
        cdef void *region = mmap(NULL, self.region_size, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0)
        if region == MAP_FAILED:
            raise kernel_error(errno, "mapping the refill ring")
        self.region = <char *>region

        cdef iouz_zcrx_area_reg area_reg
        cdef iouz_region_desc region_desc
        cdef iouz_zcrx_ifq_reg reg
        memset(&area_reg, 0, sizeof(area_reg))
        memset(&region_desc, 0, sizeof(region_desc))
        memset(&reg, 0, sizeof(reg))
        area_reg.addr = <uintptr_t>self.area.base
        area_reg.len = self.area.size
        region_desc.user_addr = <uintptr_t>self.region
        region_desc.size = self.region_size
        region_desc.flags = IOUZ_MEM_REGION_TYPE_USER
        reg.if_idx = if_idx
        reg.if_rxq = if_rxq
        reg.rq_entries = entries
        reg.flags = reg_flags
        reg.area_ptr = <uintptr_t>&area_reg
        reg.region_ptr = <uintptr_t>&region_desc
        reg.rx_buf_len = buf_len
        ring.check_owner()
        cdef int ret = iouz_register(ring.fd, IOUZ_REGISTER_ZCRX_IFQ, &reg, 1)
        if ret < 0:
            raise zcrx_register_error(-ret, mode=mode, interface=interface, queue=queue,
                                      rx_buf_len=buf_len, nodev=features.zcrx_nodev)

        self.zcrx_id = reg.zcrx_id
        self.rq_entries = reg.rq_entries
        self.rq_mask = reg.rq_entries - 1
        # 6.18/6.19 leave rx_buf_len untouched (reserved): chunks are pages.
        self.chunk_size = reg.rx_buf_len or chunk
        self.buffer_unit = self.chunk_size
        self.tokens_are_offsets = True
        self.rq_head = <uint32_t *>(self.region + reg.offsets.head)
        self.rq_tail = <uint32_t *>(self.region + reg.offsets.tail)
        self.rqes = <iouz_zcrx_rqe *>(self.region + reg.offsets.rqes)
        self.local_rq_tail = self.rq_tail[0]
        self.flushed_tail = self.local_rq_tail
        self.flush_after_publish = mode == "copy"
        self.total_buffers = self.area.size // self.chunk_size
        self.can_flush = features.zcrx_ctrl_flush
        self.setup_returns(max(<uint64_t>self.rq_entries, self.total_buffers))
        ring.add_client(self)

    def __dealloc__(self):
        if self.region != NULL:
            munmap(self.region, self.region_size)
            self.region = NULL

    # -- refill ring ---------------------------------------------------------

    cdef int publish_returns(self) except -1:
        """Move pending returns into the refill ring and publish the tail once
        per batch; when the ring is full, ask the kernel to drain it.

        Without a NIC (copy mode) nothing else ever drains the ring, so every
        batch is flushed. On a NIC queue the page pool takes entries when the
        NIC needs buffers, but the copy fallback (data that did not arrive
        through this queue) allocates only from chunks the kernel already
        took: while a receive waits for buffers, flush as well."""
        cdef size_t done = 0
        cdef uint32_t head, free, n, i
        cdef iouz_zcrx_rqe *rqe
        cdef bint flushed_when_full = False
        cdef bint copy_mode = self.flush_after_publish
        if copy_mode:
            self.order_for_freelist()
        while done < self.pending_count:
            head = iouz_load_acquire(self.rq_head)
            free = self.rq_entries - (self.local_rq_tail - head)
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
                rqe = &self.rqes[(self.local_rq_tail + i) & self.rq_mask]
                rqe.off = self.pending[done + i].token
                rqe.len = self.pending[done + i].length
                rqe.pad = 0
            self.local_rq_tail += n
            iouz_store_release(self.rq_tail, self.local_rq_tail)
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

    cdef int flush_refill_ring(self) except -1:
        cdef iouz_zcrx_ctrl ctrl
        memset(&ctrl, 0, sizeof(ctrl))
        ctrl.zcrx_id = self.zcrx_id
        ctrl.op = IOUZ_ZCRX_CTRL_FLUSH_RQ
        self.ring.check_owner()
        cdef int ret = iouz_register(self.ring.fd, IOUZ_REGISTER_ZCRX_CTRL, &ctrl, 0)
        if ret < 0:
            raise kernel_error(-ret, "ZCRX_CTRL_FLUSH_RQ")
        self.flushes += 1
        if self.flushed_tail != self.local_rq_tail:
            # Entries the kernel had not taken are now free chunks.
            self.flushed_tail = self.local_rq_tail
            self.return_epoch += 1
        return 0

    # -- receives ------------------------------------------------------------

    cdef int arm(self, Receiver receiver) except -1:
        cdef iouz_sqe *sqe = self.ring.prepare(receiver, IOUZ_OP_RECV_ZC, receiver.fd)
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
            if self.can_flush and self.flushed_tail != self.local_rq_tail:
                self.flush_refill_ring()
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
        self.ring.check_owner()
        if self.closed:
            return
        self.publish_returns()
        if self.can_flush:
            self.flush_refill_ring()

    def _emulate_nic_refill(self, bint flush=True):
        """Test aid: refill like a queue bound to a NIC (no flush after
        every return), and with ``flush=False`` like a kernel without
        ZCRX_CTRL_FLUSH_RQ, so that a copy-mode queue exercises the
        starvation handling of zerocopy mode."""
        self.ring.check_owner()
        self.flush_after_publish = False
        if not flush:
            self.can_flush = False

    def stats(self):
        stats = ReceiveQueue.stats(self)
        stats.update(zcrx_id=self.zcrx_id, rq_entries=self.rq_entries,
                     chunk_size=self.chunk_size, flushes=self.flushes)
        stats["area_page_size"] = self.area.page_size
        return stats

    def __repr__(self):
        where = f" {self.interface}:{self.queue}" if self.interface is not None else ""
        return (f"<ZcrxQueue {self.mode}{where} area={self.area.size} "
                f"chunks={self.total_buffers} in_use={self.buffers_in_use}>")
