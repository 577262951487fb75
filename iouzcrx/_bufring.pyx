# cython: language_level=3
"""bufring: multishot IORING_OP_RECV into a provided buffer ring over an area.

Works on any kernel with buffer rings; the kernel copies from the socket into
buffers it picks from the ring, and each buffer is re-added when the last view
over it goes.

An incremental ring is given only a few buffers at a time (``window_size``
bytes of them, about a core's L2 cache).  Buffers that come back while the
window has room go straight back into it, in the order they come, so the
kernel goes round the same buffers in the same order; the others wait as
spares, the last returned on top, and refill the window only when it runs
low (views held for long).  The kernel then fills buffers the program has
just read, still in the cache, instead of cycling through the whole area,
each buffer cold by the time its turn comes again: reading an area of
64 MiB in turn, a copying protocol ran at 0.68-0.88x uvloop's in bulk, and
at 1.14-1.34x from the window (``bash benchmarks/run``, 2026-11-26).

Where the kernel has incremental rings (IOU_PBUF_RING_INC, 6.12+) a receive
takes only what it fills of the buffer at the ring's head, and the next one
continues in the same buffer: a small chunk no longer takes a whole buffer
out of the ring.  Such a buffer goes back once the kernel has finished it
and every view over a part of it is gone.
"""

import os

cimport cython
from libc.errno cimport errno
from libc.stdint cimport int32_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free
from libc.string cimport memset
from posix.mman cimport (MAP_ANONYMOUS, MAP_FAILED, MAP_POPULATE, MAP_PRIVATE,
                         PROT_READ, PROT_WRITE, mmap, munmap)

from iouzcrx._abi cimport *
from iouzcrx._area cimport Area, buffer_count
from iouzcrx._receive cimport ReceiveQueue, Receiver, returns_added
from iouzcrx._ring cimport Ring

from iouzcrx import _checks
from iouzcrx.errors import InvalidConfiguration, buffer_ring_error, kernel_error


cdef enum:
    PAGE_SIZE = 4096
    MAX_RING_ENTRIES = 32768
    DEFAULT_AREA_SIZE = 64 * 1024 * 1024
    DEFAULT_BUFFER_SIZE = 256 * 1024  # as modes.DEFAULT_BUFFER_SIZE
    # About an L2 cache: enough buffers that one batch of receives rarely
    # empties the ring, few enough that they stay warm.
    DEFAULT_WINDOW_SIZE = 1024 * 1024
    MIN_WINDOW_BUFFERS = 2

# The registration flags that ask for an incremental ring; a module global so
# that a test can add a bit the kernel refuses, as an older kernel refuses INC.
_INCREMENTAL_FLAGS = IOUZ_PBUF_RING_INC
# Used when neither the incremental argument nor the environment says.
DEFAULT_INCREMENTAL = True
INCREMENTAL_ENV = "IOUZCRX_BUFRING_INCREMENTAL"
WINDOW_ENV = "IOUZCRX_BUFRING_WINDOW"


def _window_size(window_size):
    if window_size is not None:
        return _checks.size("window_size", window_size, 1)
    value = os.environ.get(WINDOW_ENV, "").strip()
    if not value:
        return DEFAULT_WINDOW_SIZE
    fix = ("set it to the bytes of buffers an incremental ring is given at a time "
           "(e.g. 2097152), or unset it")
    try:
        number = int(value)
    except ValueError:
        raise InvalidConfiguration(
            f"{WINDOW_ENV}={value!r} is not a number of bytes: {fix}") from None
    if number < 1 or number > _checks.SIZE_MAX:
        # A number, but none a window can be: saying "not a number" would
        # send the user looking for a typo.
        raise InvalidConfiguration(
            f"{WINDOW_ENV}={value!r} must be a positive number of bytes, at most "
            f"{_checks.SIZE_MAX}: {fix}")
    return number


def _wants_incremental(incremental):
    if isinstance(incremental, bool):
        return incremental
    if incremental is not None:
        raise InvalidConfiguration(
            f"incremental={incremental!r}: use True (an incremental buffer ring where the "
            f"kernel has one), False (the classic ring) or None (the {INCREMENTAL_ENV} "
            "environment variable, else True)")
    value = os.environ.get(INCREMENTAL_ENV, "").strip().lower()
    if not value:
        return DEFAULT_INCREMENTAL
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off"):
        return False
    raise InvalidConfiguration(
        f"{INCREMENTAL_ENV}={value!r} is neither on nor off: set it to 1 (incremental "
        "buffer ring where the kernel has one) or 0 (classic ring), or unset it")


cdef inline void put_back(BufRingQueue queue, uint32_t bid, uint32_t count) noexcept:
    """Return the ``count`` buffers from ``bid`` on: as many as the window
    has room for straight into the ring's slots after the last one the
    kernel was given (in the order they come back, mostly the order the
    kernel filled them, so the ring keeps going round the same buffers in
    the same order and runs stay adjacent), the rest to the spares, on top.
    publish_returns hands the slots over on the owner thread (moving the
    tail).  Fine on any thread under the GIL: the kernel reads no slot past
    the tail, and never sees the spares."""
    cdef uint64_t in_use = queue.buffers_in_use
    # Buffers in the ring's slots, published or not: neither in use nor spare.
    cdef uint64_t given = queue.total_buffers - in_use - queue.spare_count
    if in_use > queue.peak_in_use:
        queue.peak_in_use = in_use
    queue.buffers_in_use = in_use - count
    queue.buffers_returned += count
    if queue.closed or queue.bufs == NULL:
        # The kernel took every buffer back with the ring (a queue never
        # set up has no ring mapped either).
        return
    if given + count <= queue.window:
        write_slots(queue, bid, count)  # the usual case: the window has room
    else:
        spill(queue, bid, count, given)
    returns_added(queue, count)


cdef void spill(BufRingQueue queue, uint32_t bid, uint32_t count, uint64_t given) noexcept:
    """put_back's case of a window without room for all ``count``: what
    fits into the ring, the rest to the spares (out of line, so that the
    usual case stays small)."""
    cdef uint32_t into_ring = 0
    if given < queue.window:
        into_ring = <uint32_t>(queue.window - given)  # fewer than count
        write_slots(queue, bid, into_ring)
    add_spares(queue, bid + into_ring, count - into_ring)


cdef inline void write_slots(BufRingQueue queue, uint32_t bid, uint32_t count) noexcept:
    """Buffers ``bid`` to ``bid + count - 1`` into the slots from the local
    tail on, which moves past them (the kernel sees them once published)."""
    cdef uint32_t first = queue.local_tail & queue.mask
    # The slots up to the ring's end, then (wrapping) from its start.
    cdef uint32_t before_end = min(count, queue.ring_entries - first)
    cdef char *data = queue.area.base + <uint64_t>bid * queue.buffer_size
    fill_slots(queue.bufs + first, data, queue.buffer_size, bid, before_end)
    if count > before_end:
        fill_slots(queue.bufs, data + <uint64_t>before_end * queue.buffer_size,
                   queue.buffer_size, bid + before_end, count - before_end)
    queue.local_tail = <uint16_t>(queue.local_tail + count)


cdef inline void fill_slots(iouz_buf *slot, char *data, uint32_t size, uint32_t bid,
                            uint32_t count) noexcept:
    cdef iouz_buf *end = slot + count
    while slot != end:
        # Field by field: slot 0's reserved field is the ring tail.  On an
        # incremental ring the kernel moved addr and len along as it filled
        # the buffer, so both are written again.
        slot.addr = <uintptr_t>data
        slot.len = size
        slot.bid = <uint16_t>bid
        data += size
        bid += 1
        slot += 1


cdef inline void add_spares(BufRingQueue queue, uint32_t bid, uint32_t count) noexcept:
    cdef SpareRow *top = queue.spares + queue.spare_rows - 1
    if queue.spare_rows and top.bid + top.count == bid:
        top.count += count  # views released in the order the kernel filled them
    else:
        top += 1
        top.bid = bid
        top.count = count
        queue.spare_rows += 1
    queue.spare_count += count


cdef inline void give_spares(BufRingQueue queue, uint32_t count) noexcept:
    """The ``count`` spares on top into the slots from the local tail on,
    which moves past them (the kernel sees them once the tail is stored).

    A row is taken from its first buffer on, across as many passes as it
    lasts, so that its buffers go to the kernel in order."""
    cdef SpareRow *top
    cdef uint32_t n
    queue.spare_count -= count
    while count:
        top = queue.spares + queue.spare_rows - 1
        n = min(count, top.count)
        write_slots(queue, top.bid, n)
        top.bid += n
        top.count -= n
        if top.count == 0:
            queue.spare_rows -= 1
        count -= n


@cython.final
@cython.no_gc_clear
cdef class BufRingQueue(ReceiveQueue):
    """A provided buffer ring of ``area_size // buffer_size`` buffers on ``ring``,
    incremental where the kernel has it and ``incremental`` (None: the
    environment, else on) asks for it.  An incremental ring is given
    ``window_size`` bytes of buffers at a time (at least two buffers; None:
    the ``IOUZCRX_BUFRING_WINDOW`` environment variable, else 1 MiB).

    ``close()`` unregisters the buffer ring once nothing is armed on it; a
    queue dropped without close() is unregistered by the ring's owner thread
    at its next drain.
    """

    def __init__(self, Ring ring not None, *, area_size=DEFAULT_AREA_SIZE,
                 buffer_size=DEFAULT_BUFFER_SIZE, bint hugepages=False, incremental=None,
                 window_size=None):
        ring.check_owner()  # before anything is allocated
        self.begin_setup()
        cdef bint want_incremental = _wants_incremental(incremental)
        cdef uint64_t count = buffer_count(_checks.size("area_size", area_size, _checks.PAGE_SIZE),
                                           _checks.size("buffer_size", buffer_size,
                                                        _checks.PAGE_SIZE,
                                                        _checks.MAX_BUFFER_SIZE))
        if count > MAX_RING_ENTRIES:
            raise InvalidConfiguration(
                f"{count} buffers is more than a buffer ring holds ({MAX_RING_ENTRIES}); "
                "use a larger buffer_size or a smaller area")
        window_size = _window_size(window_size)
        cdef uint32_t entries = 1
        while entries < count:
            entries <<= 1

        self.ring = ring
        self.mode = "bufring"
        self.area = Area(area_size, hugepages)
        self.buffer_size = <uint32_t>buffer_size
        self.buffer_unit = buffer_size
        self.whole_buffer = buffer_size
        self.ring_entries = entries
        self.mask = entries - 1
        self.bufs_size = (entries * sizeof(iouz_buf) + PAGE_SIZE - 1) & ~(<size_t>PAGE_SIZE - 1)
        cdef void *bufs = mmap(NULL, self.bufs_size, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0)
        if bufs == MAP_FAILED:
            raise kernel_error(errno, "mapping the buffer ring")
        self.bufs = <iouz_buf *>bufs
        # The ring's tail overlays the reserved field of slot 0.
        self.ring_tail = <uint16_t *>((<char *>bufs) + IOUZ_BUF_RING_TAIL_OFFSET)

        # A row per buffer at most (each returned on its own, none adjacent).
        self.spares = <SpareRow *>calloc(count, sizeof(SpareRow))
        if self.spares == NULL:
            raise MemoryError()
        if want_incremental:
            self.consumed = <uint32_t *>calloc(count, sizeof(uint32_t))
            self.refs = <uint32_t *>calloc(count, sizeof(uint32_t))
            if self.consumed == NULL or self.refs == NULL:
                raise MemoryError()

        cdef iouz_buf_reg reg
        memset(&reg, 0, sizeof(reg))
        reg.ring_addr = <uintptr_t>bufs
        reg.ring_entries = entries
        reg.bgid = ring.allocate_buffer_group()
        ring.check_owner()
        cdef int ret = 0
        if want_incremental:
            reg.flags = <uint16_t>_INCREMENTAL_FLAGS
            ret = iouz_register(ring.fd, IOUZ_REGISTER_PBUF_RING, &reg, 1)
            if ret == -EINVAL:
                # A kernel before 6.12 knows no such flag: the classic ring
                # works there (and any other fault shows again below).
                self.incremental_refused = (
                    "the kernel refused an incremental buffer ring (EINVAL; it needs "
                    "Linux 6.12 or later)")
                reg.flags = 0
            else:
                self.incremental = ret == 0
        if not self.incremental:
            ret = iouz_register(ring.fd, IOUZ_REGISTER_PBUF_RING, &reg, 1)
        if ret < 0:
            raise buffer_ring_error(-ret)
        if not self.incremental:
            free(self.consumed)
            free(self.refs)
            self.consumed = self.refs = NULL
        self.lends_parts = self.incremental
        self.buffer_group = reg.bgid
        self.registered = True
        self.total_buffers = count

        # On an incremental ring one batch of receives shares the buffer at
        # the head; on a classic ring each receive takes a buffer of its own,
        # however little it fills, so a few would be gone in one batch of
        # small messages: it is given every buffer.
        self.window = <uint32_t>count
        if self.incremental:
            self.window = <uint32_t>min(count, max(<uint64_t>MIN_WINDOW_BUFFERS,
                                                   <uint64_t>(window_size // buffer_size)))
        self.spares[0].bid = 0
        self.spares[0].count = <uint32_t>count
        self.spare_rows = 1
        self.spare_count = <uint32_t>count
        self.keeps_spares = self.window < count
        # A run holds its buffers until delivered: kept to half the window,
        # runs alone never send the kernel to the spares; and where the
        # window is the whole area (a small one), a view kept while the next
        # is awaited never holds every buffer, which would starve the
        # receive of the data awaited.
        self.max_run_bytes = max(<Py_ssize_t>buffer_size,
                                 min(self.max_run_bytes,
                                     <Py_ssize_t>self.window * buffer_size // 2))
        self.publish_returns()
        ring.add_client(self)

    def __dealloc__(self):
        # Maybe on another thread, where the ring cannot be entered. Nothing
        # is armed on the group (an armed receive holds its queue), so the
        # kernel picks no buffer from it meanwhile, and it pinned the ring's
        # pages: unmapping ours is safe.
        if self.registered and self.ring is not None:
            self.ring.buffer_group_dropped(self.buffer_group)
        if self.bufs != NULL:
            munmap(self.bufs, self.bufs_size)
            self.bufs = NULL
        free(self.consumed)
        free(self.refs)
        free(self.spares)
        self.consumed = self.refs = NULL
        self.spares = NULL

    cdef int release_registration(self) except -1:
        cdef iouz_buf_reg reg
        if not self.registered:
            return 0
        memset(&reg, 0, sizeof(reg))
        reg.bgid = self.buffer_group
        self.registered = False
        self.ring.register(IOUZ_UNREGISTER_PBUF_RING, &reg, 1)
        munmap(self.bufs, self.bufs_size)
        self.bufs = NULL
        return 0

    cdef int publish_returns(self) except -1:
        # put_back wrote the returns the window had room for into the slots;
        # fill it up from the spares, warmest first.  Each buffer is in the
        # ring, in use or spare: the kernel took the ones no longer in the
        # ring since the last pass.
        cdef uint64_t in_ring = self.total_buffers - self.buffers_in_use - self.spare_count
        self.pending_count = 0
        if self.bufs == NULL:
            # Given back to the kernel, and unmapped, by a close() during this
            # very pass (a finalizer the collector ran, say): there is no
            # ring to fill, and the drain still calls the hooks of the clients
            # it started with.
            return 0
        if in_ring * 4 < self.window and self.spare_count:
            give_spares(self, <uint32_t>min(self.window - in_ring, <uint64_t>self.spare_count))
        # The kernel never writes the tail: ours tells what it was last given.
        if self.ring_tail[0] != self.local_tail:
            iouz_store_release16(self.ring_tail, self.local_tail)
            self.refills += 1
        return 0

    cdef int arm(self, Receiver receiver) except -1:
        cdef iouz_sqe *sqe = self.ring.prepare(receiver, IOUZ_OP_RECV, receiver.fd,
                                               receiver.sock)
        sqe.flags = IOUZ_SQE_BUFFER_SELECT
        sqe.buf_group = self.buffer_group
        sqe.ioprio = IOUZ_RECV_MULTISHOT
        receiver.armed = True
        return 0

    cdef int receive(self, Receiver receiver, int32_t res, uint32_t flags,
                     uint64_t extra) except -1:
        cdef uint32_t bid, offset, filled, refs
        if flags & IOUZ_CQE_F_BUFFER:
            bid = flags >> IOUZ_CQE_BUFFER_SHIFT
            if res > 0 and <uint32_t>res == self.buffer_size:
                # A whole buffer in one completion, the usual case in bulk.
                # On an incremental ring it started at the buffer's start and
                # left no room, so the kernel is done with it: its one view
                # is all that holds it, and neither consumed nor refs is
                # touched (a length of buffer_size names it when it goes back).
                self.buffers_in_use += 1
                self.bytes_received += res
                self.chunks_received += 1
                receiver.add_chunk(self.area.base + <uint64_t>bid * self.buffer_size,
                                   res, bid, True)
                return self.after_data(receiver, res, flags)
            offset = 0
            if self.incremental:
                # Part of a buffer.  This completion's data continues where the last one from
                # bid stopped: the kernel advanced the ring entry itself, which
                # is never read back (it may be changing).  The kernel holds a
                # reference while it has filled part of the buffer and will
                # fill more (BUF_MORE); each view over a part holds one.  All
                # counted before the chunk is delivered, whose view may be
                # gone (and the buffer back) when add_chunk returns.
                offset = self.consumed[bid]
                refs = self.refs[bid]
                if offset:
                    refs -= 1  # the kernel's, taken again below if it goes on
                filled = offset + <uint32_t>res if res > 0 else offset
                if flags & IOUZ_CQE_F_BUF_MORE and filled:
                    self.consumed[bid] = filled
                    refs += 1
                else:
                    self.consumed[bid] = 0
                if res > 0:
                    refs += 1
                self.refs[bid] = refs
                if flags & IOUZ_CQE_F_BUF_MORE:
                    if res > 0:
                        self.bytes_received += res
                        self.chunks_received += 1
                        receiver.add_chunk(
                            self.area.base + <uint64_t>bid * self.buffer_size + offset,
                            res, bid, False)
                    return self.after_data(receiver, res, flags)
                if refs == 0:
                    # Finished with no data in this completion and no view
                    # over an earlier part: straight back.
                    self.buffers_in_use += 1
                    put_back(self, bid, 1)
                    return self.after_data(receiver, res, flags)
            # Out of the ring: in use until its views are gone.
            self.buffers_in_use += 1
            if res > 0:
                self.bytes_received += res
                self.chunks_received += 1
                # The ring hands buffers out in the order they went back, so a
                # burst of full buffers is mostly adjacent in the area.
                receiver.add_chunk(self.area.base + <uint64_t>bid * self.buffer_size + offset,
                                   res, bid, offset + <uint32_t>res == self.buffer_size)
            elif not self.incremental:
                self.give_back(bid, 0)
        return self.after_data(receiver, res, flags)

    cdef int after_data(self, Receiver receiver, int32_t res, uint32_t flags) except -1:
        if flags & IOUZ_CQE_F_MORE:
            return 0
        receiver.armed = False
        if res > 0:
            # A full CQ ended the multishot after this data (kernel-abi §10.4).
            return self.rearm(receiver)
        if res == -ENOBUFS:
            return self.starve(receiver)
        return self.end_by_kernel(receiver, res)

    cdef void release_part(self, uint32_t bid) noexcept:
        self.refs[bid] -= 1
        if self.refs[bid] == 0:
            put_back(self, bid, 1)

    cdef void give_back(self, uint64_t token, uint32_t length) noexcept:
        # On an incremental ring a whole buffer (length == buffer_size) was
        # never counted in refs; a part is.
        if self.incremental and length != self.buffer_size:
            self.release_part(<uint32_t>token)
        else:
            put_back(self, <uint32_t>token, 1)

    cdef void give_back_run(self, uint64_t token, uint32_t count, uint32_t first_length,
                            Py_ssize_t length) noexcept:
        cdef uint32_t unit = self.buffer_size
        cdef uint32_t first = <uint32_t>token, last = <uint32_t>(token + count - 1)
        cdef bint first_held = False, last_held = False
        if self.incremental:
            # A run's buffers follow one another (ids token, token + 1, ...);
            # every buffer but the first and the last is whole, and so is
            # either of those when the run covers it entirely.  Only a part
            # counts in refs, and only a part may still be held by another
            # view or by the kernel.
            if first_length != unit:
                self.refs[first] -= 1
                first_held = self.refs[first] != 0
            if count > 1 and length - first_length - <Py_ssize_t>(count - 2) * unit != unit:
                self.refs[last] -= 1
                last_held = self.refs[last] != 0
            if first_held or last_held:
                # The rest (often a long row of whole buffers, when the last
                # part is one the kernel still fills) goes back in one go.
                if first_held:
                    first += 1
                    count -= 1
                if last_held and count:
                    count -= 1
                if count:
                    put_back(self, first, count)
                return
        # The usual case: all back in one go.
        put_back(self, first, count)

    @property
    def peak_buffers_in_use(self):
        """The most buffers out of the ring at once."""
        return max(self.peak_in_use, self.buffers_in_use)

    def stats(self):
        stats = ReceiveQueue.stats(self)
        stats.update(buffer_group=self.buffer_group, buffer_size=self.buffer_size,
                     ring_entries=self.ring_entries, incremental=self.incremental,
                     window=self.window, spare_buffers=self.spare_count,
                     peak_buffers_in_use=self.peak_buffers_in_use)
        return stats

    def __repr__(self):
        return (f"<BufRingQueue bgid={self.buffer_group} {self.total_buffers}x"
                f"{self.buffer_size}{' incremental' if self.incremental else ''} "
                f"in_use={self.buffers_in_use}>")
