# cython: language_level=3
"""The receive area and the buffer objects exported over it."""

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.memoryview cimport PyMemoryView_FromObject
from libc.errno cimport EINVAL, ENOMEM, errno
from libc.stdint cimport uint32_t, uint64_t
from posix.mman cimport (MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE,
                         mmap, munmap)

from iouzcrx._ring cimport RingClient


import resource

from iouzcrx.errors import InvalidConfiguration, MemoryLimit, kernel_error


cdef extern from "<sys/mman.h>" nogil:
    enum:
        MAP_HUGETLB
        MADV_NOHUGEPAGE
    int madvise(void *addr, size_t length, int advice)


cdef enum:
    PAGE_SIZE = 4096
    HUGE_PAGE_SIZE = 2 * 1024 * 1024
    # Linux 5.14; spelled out for C libraries whose headers predate it.
    IOUZ_MADV_POPULATE_WRITE = 23


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


cdef class Area:
    """Anonymous, page-aligned memory for received data.

    It stays mapped while anything references it: the receive queue and every
    buffer exported over it, so a view can never outlive its memory.
    """

    def __cinit__(self, size_t size, bint hugepages=False):
        cdef size_t unit = HUGE_PAGE_SIZE if hugepages else PAGE_SIZE
        if size == 0 or size % unit:
            raise InvalidConfiguration(
                f"area size {size} must be a positive multiple of {unit} bytes")
        if not hugepages:
            # Faulting in more than the process may use would not fail: the
            # OOM killer would end it. (Huge pages are reserved by mmap itself.)
            room, why = _memory_headroom()
            if room is not None and size > room:
                raise MemoryLimit(
                    ENOMEM, f"a {size}-byte ({size >> 20} MiB) receive area does not fit: "
                    f"{why}; use a smaller area_size")
        cdef int flags = MAP_PRIVATE | MAP_ANONYMOUS
        if hugepages:
            flags |= MAP_HUGETLB
        cdef void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, -1, 0)
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
        if not hugepages:
            # Keep the area in 4 KiB pages: the kernel pins and hands out chunks
            # page by page, and a later THP collapse would only add work.
            madvise(base, size, MADV_NOHUGEPAGE)
        # Fault the area in now, as MAP_POPULATE would, but where memory runs
        # out this fails with ENOMEM instead of waking the OOM killer.
        if madvise(base, size, IOUZ_MADV_POPULATE_WRITE) != 0:
            err = errno
            if err != EINVAL:  # EINVAL: older than 5.14, pages fault in on first use
                munmap(base, size)
                if err == ENOMEM:
                    raise MemoryLimit(
                        err, f"faulting in a {size}-byte ({size >> 20} MiB) receive area ran "
                        "out of memory (the memory cgroup's limit or the machine's RAM); "
                        "use a smaller area_size")
                raise kernel_error(err, f"faulting in a {size}-byte receive area")
        self.base = <char *>base
        self.size = size
        self.hugepages = hugepages

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
            self.base = NULL

    def __repr__(self):
        return f"<Area {self.size} bytes{' hugepages' if self.hugepages else ''}>"


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

    cdef void give_back(self, uint64_t token, uint32_t length) noexcept:
        pass

    cdef void give_back_run(self, uint64_t token, uint32_t count, uint32_t first_length,
                            Py_ssize_t length) noexcept:
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
    # never cleared: the owner must still be there when __dealloc__ returns it.

    def __getbuffer__(self, Py_buffer *view, int flags):
        # Read-only: the kernel owns the memory's contents until it is returned.
        PyBuffer_FillInfo(view, self, self.data, self.length, 1, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        if self.owner is None:
            return
        if self.account is not None:
            # Before the return: the owner thread's next pass, which the
            # return wakes, looks at the account to resume a paused receive.
            self.account.pinned -= self.buffers
        if self.buffers == 1:
            self.owner.give_back(self.token, <uint32_t>self.length)
        else:
            self.owner.give_back_run(self.token, self.buffers, self.first_length, self.length)
