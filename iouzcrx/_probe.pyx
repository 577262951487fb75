# cython: language_level=3
"""Kernel feature probing: the one place that asks the kernel what it can do.

Order (kernel-abi §9): IORING_REGISTER_QUERY without a ring (6.18+), the zcrx
query entry (6.19+), then IORING_REGISTER_PROBE on a real ring for opcodes.
"""


from libc.string cimport memset

from iouzcrx._abi cimport *
from iouzcrx._ring cimport Ring

import errno as _errno
import os as _os
import select as _select
import threading as _threading

from iouzcrx.errors import IoUringUnavailable

OP_RECV = IOUZ_OP_RECV
OP_RECV_ZC = IOUZ_OP_RECV_ZC
OP_ACCEPT = IOUZ_OP_ACCEPT
OP_SEND = IOUZ_OP_SEND


cdef bint _query(uint32_t op, void *data, uint32_t size):
    """Ask IORING_REGISTER_QUERY for one entry; whether the kernel answered
    it (the call succeeds even where one entry is unknown: see its result)."""
    cdef iouz_query_hdr hdr
    memset(data, 0, size)
    memset(&hdr, 0, sizeof(hdr))
    hdr.query_data = <uint64_t>data
    hdr.query_op = op
    hdr.size = size
    cdef int ret = iouz_register(-1, IOUZ_REGISTER_QUERY, &hdr, 0)
    return ret >= 0 and hdr.result >= 0


def query_opcodes():
    """IO_URING_QUERY_OPCODES as a dict, or None before Linux 6.18."""
    cdef iouz_query_opcodes data
    if not _query(IOUZ_QUERY_OPCODES, &data, sizeof(data)):
        return None
    return {
        "nr_request_opcodes": data.nr_request_opcodes,
        "nr_register_opcodes": data.nr_register_opcodes,
        "feature_flags": data.feature_flags,
        "ring_setup_flags": data.ring_setup_flags,
        "enter_flags": data.enter_flags,
        "sqe_flags": data.sqe_flags,
        "nr_query_opcodes": data.nr_query_opcodes,
    }


def query_zcrx():
    """IO_URING_QUERY_ZCRX as a dict, or None where the kernel cannot answer
    (before 6.19; 6.18 has zcrx but only the flags=0 registration)."""
    cdef iouz_query_zcrx data
    if not _query(IOUZ_QUERY_ZCRX, &data, sizeof(data)):
        return None
    return {
        "register_flags": data.register_flags,
        "area_flags": data.area_flags,
        "nr_ctrl_opcodes": data.nr_ctrl_opcodes,
        "features": data.features,
        "rq_hdr_size": data.rq_hdr_size,
        "rq_hdr_alignment": data.rq_hdr_alignment,
    }


def query_zcrx_event():
    """IO_URING_QUERY_ZCRX_EVENT as a dict, or None before Linux 7.2 (no
    zcrx events or kernel statistics)."""
    cdef iouz_query_zcrx_event data
    if not _query(IOUZ_QUERY_ZCRX_EVENT, &data, sizeof(data)):
        return None
    return {
        "event_flags": data.event_flags,
        "stats_size": data.stats_size,
        "stats_off_alignment": data.stats_off_alignment,
    }


class KernelFeatures:
    """What the running kernel offers iouzcrx.  Built once per process by
    kernel_features(); every mode decision reads it."""

    def __init__(self):
        self.release = _os.uname().release
        self.io_uring = False
        self.io_uring_error = None
        self.setup_flags = []
        self.opcodes = frozenset()
        self.query = query_opcodes()
        self.zcrx_query = query_zcrx()
        zq = self.zcrx_query or {}
        self.zcrx_nodev = bool(zq.get("register_flags", 0) & IOUZ_ZCRX_REG_NODEV)
        self.zcrx_import = bool(zq.get("register_flags", 0) & IOUZ_ZCRX_REG_IMPORT)
        self.zcrx_ctrl_flush = zq.get("nr_ctrl_opcodes", 0) > IOUZ_ZCRX_CTRL_FLUSH_RQ
        self.zcrx_rx_buf_len = bool(zq.get("features", 0) & IOUZ_ZCRX_FEATURE_RX_PAGE_SIZE)
        # Events and the kernel's copy statistics (7.2+) need both the
        # feature bit and the event query; an odd kernel with one and not
        # the other gets neither.
        self.zcrx_event_query = query_zcrx_event() if self.zcrx_query else None
        eq = self.zcrx_event_query or {}
        self.zcrx_events = (bool(zq.get("features", 0) & IOUZ_ZCRX_FEATURE_EVENT)
                            and eq.get("event_flags", 0) != 0
                            and zq.get("nr_ctrl_opcodes", 0) > IOUZ_ZCRX_CTRL_ARM_EVENT)
        self.zcrx_event_types = eq.get("event_flags", 0) if self.zcrx_events else 0
        self.zcrx_stats_size = eq.get("stats_size", 0) if self.zcrx_events else 0
        self.zcrx_stats_alignment = eq.get("stats_off_alignment", 8) or 8
        # Sharing one queue between rings: export on one side, import on
        # the other (6.19+).
        self.zcrx_export = (self.zcrx_import
                            and zq.get("nr_ctrl_opcodes", 0) > IOUZ_ZCRX_CTRL_EXPORT)
        # Before the query existed the refill-queue header was 8 bytes with the
        # entries at offset 64; 128 covers every layout so far.
        self.rq_hdr_size = zq.get("rq_hdr_size", 0)
        self.rq_hdr_alignment = zq.get("rq_hdr_alignment", 64)
        self.recvsend_bundle = False
        self.eventfd_prompt = False
        cdef Ring ring
        try:
            ring = Ring(8, 16)
        except OSError as exc:
            self.io_uring_error = exc
            return
        # A filter may allow io_uring_setup and block io_uring_enter alone:
        # every ring would then set up and fail at its first submission.
        try:
            ring.nop()
            ring.drain()
        except OSError as exc:
            self.io_uring_error = enter_error(exc)
            try:
                ring.close()
            except OSError:
                pass  # close() enters to cancel the NOP; the rings are released anyway
            return
        try:
            self.io_uring = True
            self.setup_flags = ring.setup_flag_names
            self.opcodes = frozenset(ring.probe_opcodes())
            self.recvsend_bundle = bool(ring.features & IOUZ_FEAT_RECVSEND_BUNDLE)
            self.eventfd_prompt = eventfd_wakes_at_once(ring)
        finally:
            ring.close()

    @property
    def recv_zc(self):
        """IORING_OP_RECV_ZC exists (6.15+); says nothing about a NIC."""
        return IOUZ_OP_RECV_ZC in self.opcodes

    @property
    def bufring(self):
        return self.io_uring and IOUZ_OP_RECV in self.opcodes

    def as_dict(self):
        return {
            "release": self.release,
            "io_uring": self.io_uring,
            "io_uring_error": str(self.io_uring_error) if self.io_uring_error else None,
            "setup_flags": list(self.setup_flags),
            "recv_zc": self.recv_zc,
            "zcrx_query": self.zcrx_query is not None,
            "zcrx_nodev": self.zcrx_nodev,
            "zcrx_import": self.zcrx_import,
            "zcrx_ctrl_flush": self.zcrx_ctrl_flush,
            "zcrx_rx_buf_len": self.zcrx_rx_buf_len,
            "zcrx_events": self.zcrx_events,
            "zcrx_stats_size": self.zcrx_stats_size,
            "zcrx_export": self.zcrx_export,
            "rq_hdr_size": self.rq_hdr_size,
            "recvsend_bundle": self.recvsend_bundle,
            "eventfd_prompt": self.eventfd_prompt,
        }

    def __repr__(self):
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"KernelFeatures({fields})"


def zcrx_events_missing(features):
    """Why ``features`` has no zcrx events or kernel statistics, or None
    when it has them."""
    if features.zcrx_events:
        return None
    if features.zcrx_query is None:
        return (f"kernel zcrx statistics and events need Linux >= 7.2; this kernel "
                f"({features.release}) cannot even answer the zcrx query (6.19+)")
    return (f"kernel zcrx statistics and events need Linux >= 7.2; this kernel "
            f"({features.release}) does not report them in its zcrx query")


def zcrx_export_missing(features):
    """Why ``features`` cannot share a zcrx queue between rings (export and
    import), or None when it can."""
    if features.zcrx_export:
        return None
    return (f"sharing a zcrx queue between rings (ZCRX_CTRL_EXPORT, ZCRX_REG_IMPORT) "
            f"needs Linux >= 6.19; this kernel ({features.release}) does not offer it")


def enter_error(exc):
    """Explain io_uring_enter failing on a ring that io_uring_setup made."""
    err = exc.errno or _errno.EPERM
    return IoUringUnavailable(
        err,
        f"io_uring_enter is refused ({_errno.errorcode.get(err, err)}) although "
        "io_uring_setup works: a seccomp filter (or an LSM policy) blocks it; allow "
        "io_uring_setup, io_uring_enter and io_uring_register in the profile, or use "
        "mode='socket'")


def eventfd_wakes_at_once(Ring ring):
    """Whether ``ring``'s eventfd is signalled inside the wake-up that queues
    task work, as on 6.18, or later: Linux 7.3 defers that signal when the
    work comes from a wait-queue wake-up (a socket or pipe becoming
    readable) to an RCU callback, milliseconds later. An event loop woken
    only by the eventfd then sees every receive that much late.

    Measured, not inferred from the version: a READ on an empty pipe waits
    on the pipe's wait queue; writing to the pipe from this thread queues
    its task work, and the eventfd is either readable when write() returns
    or not."""
    readable, writable = _os.pipe()
    try:
        ring.read(readable, bytearray(1))
        ring.drain()  # submits: the read finds the pipe empty and waits
        try:
            _os.read(ring.eventfd, 8)  # the submit's own signal, if any
        except BlockingIOError:
            pass
        _os.write(writable, b"x")
        prompt = bool(_select.select([ring.eventfd], [], [], 0)[0])
        ring.drain()  # completes the read
        return prompt
    finally:
        _os.close(readable)
        _os.close(writable)


_cached = None
_lock = _threading.Lock()


def kernel_features():
    """The KernelFeatures of this kernel (probed once per process)."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = KernelFeatures()
        return _cached
