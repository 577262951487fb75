"""Exceptions raised by iouzcrx, and the one place that turns an errno into one.

Every error that comes from the kernel is an ``OSError`` subclass carrying the
errno, with a message that says what is wrong and how to fix it.
"""

from __future__ import annotations

import errno
import os
import resource

__all__ = [
    "IouzcrxError",
    "IoUringUnavailable",
    "KernelTooOld",
    "MissingCapability",
    "InterfaceNotFound",
    "QueueOutOfRange",
    "NicUnsupported",
    "NicMisconfigured",
    "QueueBusy",
    "MemoryLimit",
    "InvalidConfiguration",
    "WrongThread",
    "WrongProcess",
    "setup_error",
    "zcrx_register_error",
    "buffer_ring_error",
    "kernel_error",
]


class IouzcrxError(Exception):
    """Base class of every error iouzcrx raises itself."""


class IoUringUnavailable(IouzcrxError, OSError):
    """io_uring is missing from the kernel or blocked (sysctl, seccomp)."""


class KernelTooOld(IouzcrxError, OSError):
    """The running kernel lacks a feature the requested mode needs."""


class MissingCapability(IouzcrxError, PermissionError):
    """Zero-copy receive needs CAP_NET_ADMIN."""


class InterfaceNotFound(IouzcrxError, OSError):
    """No network interface of that name in this network namespace."""


class QueueOutOfRange(IouzcrxError, OSError):
    """The RX queue index is not below the interface's queue count."""


class NicUnsupported(IouzcrxError, OSError):
    """The NIC (or its driver) cannot host a zero-copy receive queue."""


class NicMisconfigured(IouzcrxError, OSError):
    """The NIC could host zcrx but is not set up for it (header split, XDP...)."""


class QueueBusy(IouzcrxError, OSError):
    """The RX queue is already bound to another memory provider or to AF_XDP."""


class MemoryLimit(IouzcrxError, OSError):
    """The receive area cannot be had: pinning it failed (usually
    RLIMIT_MEMLOCK), or it is larger than the memory the process may use."""


class InvalidConfiguration(IouzcrxError, ValueError):
    """An argument (size, count, mode) is out of the range the kernel accepts."""


class WrongThread(IouzcrxError, RuntimeError):
    """A ring was entered from a thread other than the one that created it."""


class WrongProcess(WrongThread):
    """A forked child touched a ring of its parent (the thread id can match
    after fork, the ring is still the parent's)."""


_NIC_SETUP = (
    "ethtool -L IF combined N (N >= 2); "
    "ethtool -G IF tcp-data-split on hds-thresh 0; "
    "ethtool -X IF equal N-1; ethtool -K IF ntuple on; "
    "ethtool -N IF flow-type tcp6 dst-port PORT action QUEUE"
)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _seccomp_filtered() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Seccomp:"):
                    return line.split()[1] == "2"
    except OSError:
        pass
    return False


def _memlock_hint(smaller: str) -> str:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    limit = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
    return (
        f"RLIMIT_MEMLOCK is {limit}; raise it (ulimit -l, LimitMEMLOCK= in systemd, "
        f"--ulimit memlock=-1 in containers), grant CAP_IPC_LOCK, or use {smaller}"
    )


def setup_error(err: int) -> OSError:
    """Explain a failed io_uring_setup()."""
    if err == errno.ENOSYS:
        if _seccomp_filtered():
            return IoUringUnavailable(
                err,
                "io_uring_setup is blocked by a seccomp filter (the default profile "
                "of Docker and some sandboxes); allow io_uring_setup, io_uring_enter "
                "and io_uring_register in the profile, or use mode='socket'",
            )
        return IoUringUnavailable(
            err,
            "this kernel has no io_uring (built without CONFIG_IO_URING); "
            "use a kernel with io_uring or mode='socket'",
        )
    if err == errno.EPERM:
        disabled = _read_int("/proc/sys/kernel/io_uring_disabled")
        if disabled == 2:
            return IoUringUnavailable(
                err,
                "io_uring is disabled by sysctl kernel.io_uring_disabled=2; "
                "run 'sysctl -w kernel.io_uring_disabled=0' or use mode='socket'",
            )
        if disabled == 1:
            return IoUringUnavailable(
                err,
                "io_uring is restricted by sysctl kernel.io_uring_disabled=1 to "
                "CAP_SYS_ADMIN and the group in kernel.io_uring_group; join that "
                "group, set the sysctl to 0, or use mode='socket'",
            )
        return IoUringUnavailable(
            err,
            "io_uring_setup was refused (seccomp or an LSM policy); allow the "
            "io_uring syscalls for this process or use mode='socket'",
        )
    if err == errno.ENOMEM:
        return MemoryLimit(
            err, "io_uring_setup could not allocate the rings; " + _memlock_hint("smaller rings")
        )
    if err == errno.EINVAL:
        return KernelTooOld(
            err,
            "io_uring_setup refused SINGLE_ISSUER|DEFER_TASKRUN: iouzcrx needs "
            f"Linux >= 6.1 (this is {os.uname().release})",
        )
    return kernel_error(err, "io_uring_setup")


def zcrx_register_error(
    err: int,
    *,
    mode: str,
    interface: str | None = None,
    queue: int | None = None,
    rx_buf_len: int = 0,
    nodev: bool = False,
) -> Exception:
    """Explain a failed IORING_REGISTER_ZCRX_IFQ for ``mode`` ('zerocopy' or
    'copy'); ``nodev`` says the kernel offers copy mode (ZCRX_REG_NODEV)."""
    large_chunks = rx_buf_len > 4096
    where = f"{interface} queue {queue}" if interface is not None else "the copy-mode area"
    if err == errno.EPERM:
        return MissingCapability(
            err,
            f"zero-copy receive ({mode} mode) needs CAP_NET_ADMIN in the initial user "
            "namespace; run as root or grant the capability (setcap cap_net_admin+ep, "
            "AmbientCapabilities=CAP_NET_ADMIN, --cap-add NET_ADMIN)",
        )
    if err == errno.ENODEV:
        return InterfaceNotFound(
            err, f"no network interface {interface!r} in this network namespace (see 'ip link')"
        )
    if err == errno.ERANGE and large_chunks:
        # The queue index was checked against sysfs before: with large chunks
        # the kernel's other ERANGE is an area not contiguous in chunk units.
        return MemoryLimit(
            err,
            f"the kernel refused rx_buf_len={rx_buf_len} on {where}: the area is not "
            f"physically contiguous in {rx_buf_len}-byte units (its huge pages were split "
            "or never there: pass hugepages=True with reserved huge pages), or the RX "
            "queue index is out of range",
        )
    if err == errno.ERANGE:
        return QueueOutOfRange(
            err,
            f"RX queue {queue} does not exist on {interface}: the index must be below "
            f"the channel count (see 'ethtool -l {interface}'; raise it with "
            f"'ethtool -L {interface} combined N')",
        )
    if mode == "copy" and nodev and large_chunks and err in (errno.EOPNOTSUPP, errno.EINVAL):
        return InvalidConfiguration(
            f"copy mode refused rx_buf_len={rx_buf_len}: the kernel copies into "
            "page-sized chunks in copy mode; pass rx_buf_len=0 (or 4096)"
        )
    if err in (errno.EOPNOTSUPP, errno.ENOTSUP) and mode == "zerocopy" and large_chunks:
        return NicUnsupported(
            err,
            f"{interface} refused rx_buf_len={rx_buf_len} on queue {queue}: its driver does "
            "not take a receive page size (QCFG_RX_PAGE_SIZE; in Linux 7.3 only bnxt and "
            "mlx5 do), or it cannot host a zero-copy queue at all; pass rx_buf_len=0 "
            "(page-sized chunks) to tell which",
        )
    if err in (errno.EOPNOTSUPP, errno.ENOTSUP):
        if mode == "copy" and nodev:
            return kernel_error(err, "registering the copy-mode area")
        if mode == "copy":
            return KernelTooOld(
                err,
                "copy mode needs a kernel built with CONFIG_IO_URING_ZCRX "
                f"(Linux >= 7.1); this is {os.uname().release}",
            )
        return NicUnsupported(
            err,
            f"{interface} cannot host a zero-copy receive queue: the NIC has no queue "
            "API / DMA device (virtual NICs such as lo, veth and virtio-net never do; "
            "use mlx5, bnxt, gve or fbnic), or the kernel lacks CONFIG_IO_URING_ZCRX; "
            "use mode='copy' or mode='bufring' instead",
        )
    if err == errno.EINVAL and mode == "zerocopy" and large_chunks:
        return NicMisconfigured(
            err,
            f"{interface} refused queue {queue} with rx_buf_len={rx_buf_len}: its driver's "
            "largest receive buffer is smaller (try a smaller power of two, or 0), or "
            f"header split is off or hds-thresh is not 0 (set up with: {_NIC_SETUP})",
        )
    if err == errno.EINVAL:
        if mode == "copy":
            return KernelTooOld(
                err,
                "the kernel refused a device-less (ZCRX_REG_NODEV) registration: copy "
                f"mode needs Linux >= 7.1; this is {os.uname().release}",
            )
        return NicMisconfigured(
            err,
            f"{interface} refused queue {queue}: header split is probably off or "
            "hds-thresh is not 0, or the kernel does not know an option that was "
            f"passed (rx_buf_len needs Linux >= 7.0). Set the NIC up with: {_NIC_SETUP}",
        )
    if err == errno.EEXIST:
        return QueueBusy(
            err,
            f"{where} is already bound to a memory provider (another zcrx instance, "
            "devmem, or one still tearing down after close) or has an XDP program "
            "attached; detach it or pick another queue, and retry after a moment",
        )
    if err == errno.EBUSY:
        return QueueBusy(
            err, f"{where} is used by AF_XDP or leased to a virtual device; pick another queue"
        )
    if err == errno.ENOMEM:
        return MemoryLimit(
            err, "pinning the receive area failed; " + _memlock_hint("a smaller area")
        )
    if err == errno.ENODATA:
        return NicUnsupported(
            err, f"the driver of {interface} restarted the queue without the io_uring page pool"
        )
    return kernel_error(err, "registering the zcrx interface queue")


def buffer_ring_error(err: int) -> OSError:
    """Explain a failed IORING_REGISTER_PBUF_RING."""
    if err == errno.EINVAL:
        return KernelTooOld(
            err,
            f"provided buffer rings need Linux >= 5.19 (this is {os.uname().release})",
        )
    if err == errno.ENOMEM:
        return MemoryLimit(
            err, "registering the buffer ring failed; " + _memlock_hint("a smaller area")
        )
    return kernel_error(err, "registering the buffer ring")


def kernel_error(err: int, what: str) -> OSError:
    """Any other errno: the standard OSError subclass, with what we were doing."""
    return OSError(err, f"{what}: {os.strerror(err)}")
