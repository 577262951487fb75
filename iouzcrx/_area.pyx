# cython: language_level=3
"""The receive area and the buffer objects exported over it."""

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.errno cimport EINVAL, ENOMEM, errno
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.string cimport memset
from posix.fcntl cimport O_CLOEXEC, O_RDONLY, open as c_open
from posix.ioctl cimport ioctl
from posix.mman cimport (MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE,
                         mmap, munmap)
from posix.unistd cimport close as c_close

from iouzcrx._ring cimport RingClient


import os as _os
import resource

from iouzcrx.errors import InvalidConfiguration, MemoryLimit, kernel_error


cdef extern from "<sys/mman.h>" nogil:
    enum:
        MAP_HUGETLB
        MADV_HUGEPAGE
        MADV_NOHUGEPAGE
    int madvise(void *addr, size_t length, int advice)


cdef extern from "<sys/prctl.h>" nogil:
    int prctl(int option, ...)


cdef enum:
    IOUZ_PR_GET_THP_DISABLE = 42


cdef enum:
    PAGE_SIZE = 4096
    HUGE_PAGE_SIZE = 2 * 1024 * 1024
    # Linux 5.14; spelled out for C libraries whose headers predate it.
    IOUZ_MADV_POPULATE_WRITE = 23
    # The pagemap scan (Linux 6.7), from the uapi <linux/fs.h>; spelled out
    # for the same reason: _IOWR('f', 16, struct pm_scan_arg of 96 bytes).
    IOUZ_PAGE_IS_HUGE = 1 << 6


cdef unsigned long IOUZ_PAGEMAP_SCAN = 0xC0606610UL


cdef struct iouz_page_region:
    uint64_t start
    uint64_t end
    uint64_t categories


cdef struct iouz_pm_scan_arg:
    uint64_t size
    uint64_t flags
    uint64_t start
    uint64_t end
    uint64_t walk_end
    uint64_t vec
    uint64_t vec_len
    uint64_t max_pages
    uint64_t category_inverted
    uint64_t category_mask
    uint64_t category_anyof_mask
    uint64_t return_mask

THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"


def _read_int(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cgroup_stat(path, name):
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == name:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_headroom():
    """Bytes the memory cgroups of this process (and their ancestors) still
    allow it, or None where there is no limit or it cannot be read."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    dirs = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            dirs.append(("/sys/fs/cgroup", path, "memory.max", "memory.current", "file"))
        elif "memory" in controllers.split(","):
            dirs.append(("/sys/fs/cgroup/memory", path, "memory.limit_in_bytes",
                         "memory.usage_in_bytes", "total_cache"))
    headroom = None
    for root, path, limit_name, usage_name, cache_name in dirs:
        parts = [p for p in path.split("/") if p]
        # A limit anywhere up the tree binds; a cgroup namespace may hide the
        # upper levels, which is then as far as can be seen.
        for depth in range(len(parts), -1, -1):
            where = "/".join([root] + parts[:depth])
            limit = _read_int(f"{where}/{limit_name}")  # "max" reads as None
            usage = _read_int(f"{where}/{usage_name}")
            if limit is None or usage is None or limit >= 1 << 62:
                continue
            # The page cache in the usage gives way under pressure.
            room = max(limit - usage + _cgroup_stat(f"{where}/memory.stat", cache_name), 0)
            if headroom is None or room < headroom:
                headroom = room
    return headroom


def _memory_headroom():
    """(bytes, what limits them): what this process can still fault in
    without the OOM killer stepping in, as far as the kernel tells."""
    meminfo = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                meminfo[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None, None
    room = None
    why = None
    if "MemAvailable" in meminfo:
        room = meminfo["MemAvailable"] + meminfo.get("SwapFree", 0)
        why = (f"the machine has {room >> 20} MiB available (MemAvailable + SwapFree, "
               f"of {meminfo.get('MemTotal', 0) >> 20} MiB of RAM)")
    cgroup = _cgroup_headroom()
    if cgroup is not None and (room is None or cgroup < room):
        room = cgroup
        why = f"its memory cgroup allows {cgroup >> 20} MiB more"
    return room, why


def _address_space_limit():
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return ""
    return f" RLIMIT_AS is {soft >> 20} MiB (ulimit -v);"


def _thp_setting(name):
    """The selected value of a transparent huge page knob ("always",
    "madvise", "never", "inherit"), or None where it cannot be read."""
    try:
        with open(f"{THP_SYSFS}/{name}") as f:
            text = f.read()
    except OSError:
        return None
    start = text.find("[")
    end = text.find("]", start)
    return text[start + 1:end] if 0 <= start < end else None


def _thp_refusal():
    """Why this machine will not back a MADV_HUGEPAGE mapping with 2 MiB
    pages, as far as its settings say, or None."""
    enabled = _thp_setting("enabled")
    pmd = _thp_setting("hugepages-2048kB/enabled")
    if pmd == "never" or (pmd in (None, "inherit") and enabled == "never"):
        knob = "hugepages-2048kB/enabled" if pmd == "never" else "enabled"
        return (f"transparent huge pages are off ({THP_SYSFS}/{knob} is 'never'); "
                f"turn them on with 'echo madvise > {THP_SYSFS}/{knob}'")
    return None


def _smaps_missing(uintptr_t start, size_t length):
    """Bytes of [start, start + length) the kernel may not back with huge
    pages, from /proc/self/smaps (kernels without the pagemap scan), or None
    where the mapping is not found. Conservative where the range shares its
    VMA with a neighbour: the whole VMA must then be huge."""
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    inside = False
    vma_start = vma_end = 0
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and not head.endswith(":"):
            lo, _, hi = head.partition("-")
            try:
                vma_start, vma_end = int(lo, 16), int(hi, 16)
            except ValueError:
                continue
            inside = vma_start <= start < vma_end
        elif inside and head == "AnonHugePages:":
            huge = int(line.split()[1]) * 1024
            if vma_start == start and vma_end == start + length:
                return max(length - huge, 0)
            return 0 if huge >= vma_end - vma_start else length
    return None


cdef Py_ssize_t _pagemap_missing(uintptr_t start, size_t length) except -2:
    """Bytes of [start, start + length) not mapped by huge pages, asked of
    the kernel page by page (PAGEMAP_SCAN, Linux 6.7); -1 where the kernel
    has no such scan."""
    cdef iouz_pm_scan_arg arg
    cdef iouz_page_region regions[64]
    cdef Py_ssize_t missing = 0
    cdef uint64_t end = start + length
    cdef uint64_t at = start
    cdef int fd = c_open(b"/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
    cdef int found, i
    if fd < 0:
        return -1
    try:
        while at < end:
            memset(&arg, 0, sizeof(arg))
            arg.size = sizeof(arg)
            arg.start = at
            arg.end = end
            arg.vec = <uintptr_t>regions
            arg.vec_len = 64
            # Report the pages that are NOT huge: the category inverted.
            arg.category_inverted = IOUZ_PAGE_IS_HUGE
            arg.category_mask = IOUZ_PAGE_IS_HUGE
            arg.return_mask = IOUZ_PAGE_IS_HUGE
            found = ioctl(fd, IOUZ_PAGEMAP_SCAN, &arg)
            if found < 0:
                return -1
            for i in range(found):
                missing += <Py_ssize_t>(regions[i].end - regions[i].start)
            if arg.walk_end <= at:
                break  # no progress: do not spin
            at = arg.walk_end
    finally:
        c_close(fd)
    return missing


cdef class Area:
    """Anonymous, page-aligned memory for received data.

    It stays mapped while anything references it: the receive queue and every
    buffer exported over it, so a view can never outlive its memory.

    ``contiguous`` (0, or a power of two up to 2 MiB) asks that every aligned
    ``contiguous`` bytes of the area be physically contiguous, as zcrx chunks
    larger than a page (``rx_buf_len``) need: reserved huge pages
    (``hugepages=True``) are, and otherwise the area is mapped 2 MiB-aligned
    with transparent huge pages and checked to be backed by them after it is
    faulted in. Where the kernel backs it with small pages instead, the area
    is refused (MemoryLimit naming the fix) rather than carved into chunks
    smaller than asked: a receive path sized for large chunks would quietly
    run several times the per-chunk work.
    """

    def __cinit__(self, size_t size, bint hugepages=False, size_t contiguous=0):
        cdef size_t unit = HUGE_PAGE_SIZE if hugepages else PAGE_SIZE
        if size == 0 or size % unit:
            raise InvalidConfiguration(
                f"area size {size} must be a positive multiple of {unit} bytes")
        if contiguous and (contiguous < PAGE_SIZE or contiguous > HUGE_PAGE_SIZE
                           or contiguous & (contiguous - 1)):
            raise InvalidConfiguration(
                f"contiguous must be 0 or a power of two from {PAGE_SIZE} to "
                f"{HUGE_PAGE_SIZE} (a 2 MiB page is the largest contiguous unit), "
                f"not {contiguous}")
        if contiguous and size % contiguous:
            raise InvalidConfiguration(
                f"area size {size} must be a multiple of {contiguous} bytes")
        # Transparent huge pages cover whole 2 MiB-aligned extents: the mapping
        # is rounded up to them (the kernel pins, and charges, whole folios).
        cdef bint thp = contiguous > PAGE_SIZE and not hugepages
        cdef size_t mapped = size
        if thp:
            mapped = (size + HUGE_PAGE_SIZE - 1) & ~(<size_t>HUGE_PAGE_SIZE - 1)
            why = _thp_refusal()
            if why is not None:
                raise MemoryLimit(
                    ENOMEM, f"an area for {contiguous}-byte chunks needs 2 MiB pages: {why}, "
                    "or reserve huge pages ('sysctl vm.nr_hugepages=N') and pass "
                    "hugepages=True, or use page-sized chunks (rx_buf_len=0)")
        if not hugepages:
            # Faulting in more than the process may use would not fail: the
            # OOM killer would end it. (Huge pages are reserved by mmap itself.)
            room, why = _memory_headroom()
            if room is not None and mapped > room:
                raise MemoryLimit(
                    ENOMEM, f"a {size}-byte ({size >> 20} MiB) receive area does not fit: "
                    f"{why}; use a smaller area_size")
        cdef int flags = MAP_PRIVATE | MAP_ANONYMOUS
        if hugepages:
            flags |= MAP_HUGETLB
        # THP: over-allocate by one huge page and keep the aligned middle, so
        # that every 2 MiB of the area can be one huge page.
        cdef size_t reserve = mapped + HUGE_PAGE_SIZE if thp else mapped
        cdef void *base = mmap(NULL, reserve, PROT_READ | PROT_WRITE, flags, -1, 0)
        cdef uintptr_t raw, aligned
        if base == MAP_FAILED:
            err = errno
            if hugepages:
                raise MemoryLimit(err, f"no {size} bytes of 2 MiB huge pages free: reserve "
                                  "them with 'sysctl vm.nr_hugepages=N'")
            if err == ENOMEM:
                raise MemoryLimit(
                    err, f"the kernel refused to map a {size}-byte ({size >> 20} MiB) receive "
                    f"area:{_address_space_limit()} the machine may not commit that much "
                    "(vm.overcommit_memory); use a smaller area_size")
            raise kernel_error(err, f"mapping a {size}-byte receive area")
        if thp:
            raw = <uintptr_t>base
            aligned = (raw + HUGE_PAGE_SIZE - 1) & ~(<uintptr_t>HUGE_PAGE_SIZE - 1)
            if aligned > raw:
                munmap(base, aligned - raw)
            if raw + reserve > aligned + mapped:
                munmap(<void *>(aligned + mapped), raw + reserve - aligned - mapped)
            base = <void *>aligned
            if madvise(base, mapped, MADV_HUGEPAGE) != 0:
                err = errno
                munmap(base, mapped)
                raise MemoryLimit(
                    err, f"an area for {contiguous}-byte chunks needs 2 MiB pages, and this "
                    "kernel refuses transparent huge pages (MADV_HUGEPAGE: "
                    f"{_os.strerror(err)}; built without CONFIG_TRANSPARENT_HUGEPAGE?): "
                    "reserve huge pages ('sysctl vm.nr_hugepages=N') and pass hugepages=True, "
                    "or use page-sized chunks (rx_buf_len=0)")
        elif not hugepages:
            # Keep the area in 4 KiB pages: the kernel pins and hands out chunks
            # page by page, and a later THP collapse would only add work.
            madvise(base, size, MADV_NOHUGEPAGE)
        # Fault the area in now, as MAP_POPULATE would, but where memory runs
        # out this fails with ENOMEM instead of waking the OOM killer.
        if madvise(base, mapped, IOUZ_MADV_POPULATE_WRITE) != 0:
            err = errno
            if err != EINVAL:  # EINVAL: older than 5.14, pages fault in on first use
                munmap(base, mapped)
                if err == ENOMEM:
                    raise MemoryLimit(
                        err, f"faulting in a {size}-byte ({size >> 20} MiB) receive area ran "
                        "out of memory (the memory cgroup's limit or the machine's RAM); "
                        "use a smaller area_size")
                raise kernel_error(err, f"faulting in a {size}-byte receive area")
            elif thp:
                # Without the populate the pages would come at first use,
                # too late to check what backs them.
                memset(base, 0, mapped)
        self.base = <char *>base
        self.size = size
        self.mapped = mapped
        self.hugepages = hugepages
        self.page_size = HUGE_PAGE_SIZE if hugepages or thp else PAGE_SIZE
        if thp:
            self.transparent_hugepages = True
            self.check_huge(contiguous)

    cdef int check_huge(self, size_t contiguous) except -1:
        """Refuse (and unmap) a THP area the kernel did not back with huge
        pages: THP off for this process, or no free 2 MiB page (fragmented
        memory) even after compaction."""
        missing = _pagemap_missing(<uintptr_t>self.base, self.mapped)
        if missing < 0:
            missing = _smaps_missing(<uintptr_t>self.base, self.mapped)
            if missing is None:
                return 0  # nothing tells; the kernel's own check is the last word
        if missing == 0:
            return 0
        munmap(self.base, self.mapped)
        self.base = NULL
        why = _thp_refusal()
        if why is None and prctl(IOUZ_PR_GET_THP_DISABLE, 0, 0, 0, 0) > 0:
            why = ("transparent huge pages are off for this process (prctl "
                   "PR_SET_THP_DISABLE, inherited from whatever started it)")
        elif why is None:
            why = ("the kernel had no free 2 MiB page to give (memory fragmented: "
                   "'echo 1 > /proc/sys/vm/compact_memory' may help)")
        raise MemoryLimit(
            ENOMEM, f"an area for {contiguous}-byte chunks needs 2 MiB pages, but "
            f"{missing >> 10} KiB of its {self.mapped >> 10} KiB came as small pages: {why}; "
            "or reserve huge pages ('sysctl vm.nr_hugepages=N') and pass hugepages=True, "
            "or use page-sized chunks (rx_buf_len=0)")

    def small_page_bytes(self):
        """Bytes of the area mapped by 4 KiB pages rather than 2 MiB ones now
        (all of it unless huge pages back it), or None where the kernel
        does not tell (no pagemap scan and no smaps)."""
        if self.base == NULL:
            return None
        missing = _pagemap_missing(<uintptr_t>self.base, self.mapped)
        if missing < 0:
            return _smaps_missing(<uintptr_t>self.base, self.mapped)
        return missing

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.mapped)
            self.base = NULL

    def __repr__(self):
        backing = (" hugepages" if self.hugepages else
                   " transparent hugepages" if self.transparent_hugepages else "")
        return f"<Area {self.size} bytes{backing}>"


cdef uint64_t buffer_count(size_t area_size, uint32_t buffer_size) except 0:
    """How many ``buffer_size`` buffers an area of ``area_size`` holds; both
    must be page multiples and the area a whole number of buffers."""
    if buffer_size < 1 or buffer_size % PAGE_SIZE:
        raise InvalidConfiguration(
            f"buffer_size {buffer_size} must be a positive multiple of {PAGE_SIZE}")
    if area_size < buffer_size or area_size % buffer_size:
        raise InvalidConfiguration(
            f"area_size {area_size} must be a positive multiple of buffer_size {buffer_size}")
    return area_size // buffer_size


cdef class BufferOwner(RingClient):

    cdef int begin_setup(self) except -1:
        """Called first by ``__init__``: a second call would map a new area
        and ring over the first while views of them are out."""
        if self.setup_begun:
            raise RuntimeError(f"this {type(self).__name__} is set up already: make a new one")
        self.setup_begun = True
        return 0

    cdef void give_back(self, uint64_t token, uint32_t length) noexcept:
        pass

    cdef void give_back_run(self, uint64_t token, uint32_t count, uint32_t first_length,
                            Py_ssize_t length) noexcept:
        pass

    cdef void pins_released(self) noexcept:
        """A stalled pin account dropped to half its limit: a receive it
        stopped may start again."""
        pass

    def stats(self):
        """Counters since creation, as a dict (the same keys in every mode)."""
        return {
            "mode": self.mode,
            "bytes": self.bytes_received,
            "chunks": self.chunks_received,
            "deliveries": self.deliveries,
            "total_buffers": self.total_buffers,
            "buffers_in_use": self.buffers_in_use,
            "buffers_returned": self.buffers_returned,
            "buffers_pending_return": 0,
            "refills": 0,
            "rearms": 0,
        }

    cdef object export(self, char *data, Py_ssize_t length, uint64_t token):
        return self.export_run(data, length, token, 1, <uint32_t>length)

    cdef object export_run(self, char *data, Py_ssize_t length, uint64_t token,
                           uint32_t count, uint32_t first_length):
        return self.export_pinned(data, length, token, count, first_length, None)

    cdef object export_pinned(self, char *data, Py_ssize_t length, uint64_t token,
                              uint32_t count, uint32_t first_length, PinAccount account):
        """One read-only view over ``count`` adjacent buffers starting at
        ``data``; the first carries ``first_length`` of the ``length`` bytes.
        The buffers count against ``account`` (if any) until they go back."""
        cdef Buffer buf = Buffer.__new__(Buffer)
        if account is not None:
            buf.account = account
            account.pinned += count
        buf.owner = self
        buf.data = data
        buf.length = length
        buf.token = token
        buf.buffers = count
        buf.first_length = first_length
        self.deliveries += 1
        # The memoryview holds the only reference to buf from here on.
        return PyMemoryView_FromObject(buf)


@cython.final
@cython.freelist(16)  # one per connection: made and dropped with it
cdef class PinAccount:
    """How many area buffers the views of one connection pin, and how many it
    may pin (``limit``) before its receive pauses.  A receive that pauses
    waits with its data in the socket (TCP flow control holds the peer) and
    resumes once the views are down to half the limit, so that a peer which
    makes the program hold its views cannot take the area from the others.
    Get one from ``ReceiveQueue.pin_account()``; pass it to every receive of
    the connection."""

    def __init__(self, uint64_t limit):
        if limit < 1:
            raise ValueError(f"a pin limit of {limit} buffers admits no receive: use 1 or more")
        self.limit = limit

    cdef int stall(self) except -1:
        self.stalled = True
        on_stall = self.on_stall
        if on_stall is not None:
            on_stall()
        return 0

    def __repr__(self):
        return (f"<PinAccount {self.pinned}/{self.limit} buffers"
                f"{' stalled' if self.stalled else ''}>")


@cython.final
@cython.freelist(256)
@cython.no_gc_clear
cdef class Buffer:
    # Traversed so the GC sees the path view -> buffer -> queue -> ring (a ring
    # abandoned with views queued in a receiver is a collectable cycle), but
    # never cleared: the owner must still be there when the buffers go back.

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self.owner is None:
            raise BufferError(
                "this memory went back to the kernel when the last view over it was "
                "released: copy the bytes (bytes(view)) to keep them longer")
        # Read-only: the kernel owns the memory's contents until it is returned.
        PyBuffer_FillInfo(view, self, self.data, self.length, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        # The buffers go back with the last export rather than when this
        # object is freed: a view released on another thread of a
        # free-threaded build leaves the freeing of this object (made on the
        # ring's owner thread) to the owner, which may be asleep waiting for
        # exactly these buffers.
        self.exports -= 1
        if self.exports == 0:
            self.return_to_owner()

    def __dealloc__(self):
        self.return_to_owner()  # never exported (the view could not be made)

    cdef void return_to_owner(self) noexcept:
        cdef BufferOwner owner = self.owner
        if owner is None:
            return
        self.owner = None  # once: the memory is not exported again
        cdef PinAccount account = self.account
        cdef bint unstalled = False
        if account is not None:
            # Before the return: the owner thread's next pass, which the
            # return wakes, looks at the account to resume a paused receive.
            account.pinned -= self.buffers
            unstalled = account.stalled and account.pinned <= account.limit // 2
            self.account = None
        if self.buffers == 1:
            owner.give_back(self.token, <uint32_t>self.length)
        else:
            owner.give_back_run(self.token, self.buffers, self.first_length, self.length)
        if unstalled:
            # The return may have woken nobody: a part of an incremental
            # buffer the kernel still fills goes back later, with its last.
            owner.pins_released()
