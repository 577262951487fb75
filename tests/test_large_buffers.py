"""Receive chunks larger than a page (``rx_buf_len`` > 4 KiB).

The kernel cuts an area into ``rx_buf_len`` chunks only where the area is
physically contiguous in those units, so such an area is made of huge pages:
reserved ones (``hugepages=True``) or transparent ones, mapped 2 MiB-aligned
and checked after faulting in; an area the kernel did not back with huge
pages is refused with ``MemoryLimit`` naming the fix, never cut into smaller
chunks than asked.

On the host: the area itself (THP as this machine has it, THP switched off
for one process, bad values). In the VM: registration on the simulated NIC
(netdevsim, rebuilt to advertise QCFG_RX_PAGE_SIZE and honour the page size
in its page pools), the binding as the kernel reports it, data through it,
and each refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import nlclient
import pytest
from conftest import FEATURES, IN_VM, Sender, Verifier
from nsim import DEVICE_ID, PEER_NS, SETUP_TIMEOUT, Nsim, bound, wait_unbound
from test_zcrx_nic import _pair_across_the_link

import iouzcrx
from iouzcrx._area import Area, _thp_refusal, _thp_setting
from iouzcrx._netlink import as_u32, attrs
from iouzcrx.errors import zcrx_register_error

MIB = 1 << 20
HUGE = 2 * MIB
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
NETDEV_A_PAGE_POOL_IO_URING = 8
NETDEV_A_QUEUE_IO_URING = 6
NETDEV_A_IO_URING_PROVIDER_INFO_RX_BUF_LEN = 1
# Attributes of a page pool (or queue) dump that identify it.
NETDEV_A_PAGE_POOL_IFINDEX = 2


def _anon_huge_bytes(area_size: int) -> int:
    """AnonHugePages of the process's mappings of exactly ``area_size``
    bytes (a second opinion next to the pagemap scan)."""
    total = 0
    size = 0
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and not head.endswith(":"):
                lo, _, hi = head.partition("-")
                try:
                    size = int(hi, 16) - int(lo, 16)
                except ValueError:
                    size = 0
            elif head == "AnonHugePages:" and size == area_size:
                total += int(line.split()[1]) * 1024
    return total


# -- the area, on any kernel ----------------------------------------------------------


def test_a_large_chunk_area_is_made_of_transparent_huge_pages_or_refused_naming_the_fix():
    why = _thp_refusal()
    if why is not None:
        # This machine has THP off: the refusal is what must happen, and say how.
        with pytest.raises(iouzcrx.MemoryLimit, match="echo madvise >"):
            Area(8 * MIB, contiguous=16384)
        return
    area = Area(8 * MIB, contiguous=16384)
    assert area.transparent_hugepages and not area.hugepages
    assert area.page_size == HUGE and area.size == 8 * MIB
    assert area.small_page_bytes() == 0
    assert _anon_huge_bytes(8 * MIB) >= 8 * MIB
    assert "transparent hugepages" in repr(area)


def test_an_area_not_a_multiple_of_2_mib_is_backed_by_whole_huge_pages():
    if _thp_refusal() is not None:
        pytest.skip(f"THP is off here ({_thp_setting('enabled')}); the refusal is tested above")
    size = 2 * MIB + 3 * 16384
    area = Area(size, contiguous=16384)
    assert area.size == size and area.page_size == HUGE
    assert area.small_page_bytes() == 0


def test_an_ordinary_area_stays_in_small_pages():
    area = Area(4 * MIB)
    assert not area.transparent_hugepages and area.page_size == 4096
    assert area.small_page_bytes() == 4 * MIB
    # One page of contiguity is what every area has: no huge pages for it.
    assert Area(4 * MIB, contiguous=4096).small_page_bytes() == 4 * MIB


_NO_THP_CHILD = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_THP_DISABLE = 41
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        print("prctl failed", ctypes.get_errno()); sys.exit(3)
    import iouzcrx
    from iouzcrx._area import Area
    try:
        Area(4 << 20, contiguous=16384)
    except iouzcrx.MemoryLimit as exc:
        print(exc); sys.exit(0)
    print("an area without huge pages was accepted"); sys.exit(1)
    """
)


def test_an_area_the_kernel_backs_with_small_pages_is_refused_naming_the_fixes():
    # THP switched off for one process (as a container runtime may do): the
    # kernel hands out 4 KiB pages however the area is advised.
    proc = subprocess.run(
        [sys.executable, "-c", _NO_THP_CHILD],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    message = proc.stdout
    assert "16384-byte chunks needs 2 MiB pages" in message
    assert "PR_SET_THP_DISABLE" in message or "echo madvise" in message
    assert "hugepages=True" in message and "rx_buf_len=0" in message


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"contiguous": 3}, "not 3"),
        ({"contiguous": 12288}, "not 12288"),
        ({"contiguous": 4 * MIB}, "not 4194304"),
        ({"size": 2 * MIB + 4096, "contiguous": 8192}, "multiple of 8192"),
    ],
)
def test_bad_contiguity_is_refused_naming_the_value(kwargs, named):
    size = kwargs.pop("size", 4 * MIB)
    with pytest.raises(iouzcrx.InvalidConfiguration, match=named):
        Area(size, **kwargs)


def test_rx_buf_len_beyond_a_huge_page_is_refused_before_anything_is_allocated(ring):
    with pytest.raises(iouzcrx.InvalidConfiguration, match="at most 2097152"):
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="lo", queue=0, rx_buf_len=4 * MIB)


async def test_the_server_refuses_rx_buf_len_beyond_a_huge_page():
    loop = asyncio.get_running_loop()
    with pytest.raises(iouzcrx.InvalidConfiguration, match="larger than a 2 MiB page"):
        await loop.create_zcrx_server(
            asyncio.Protocol, "127.0.0.1", 0, area_size=8 * MIB, rx_buf_len=4 * MIB
        )


@pytest.mark.vm
def test_rx_buf_len_of_one_page_is_the_default_chunk(ring):
    """4096 is what every kernel and driver does: it must not need the 7.0
    rx_buf_len field, nor a driver that takes a page size."""
    errors = []
    for rx_buf_len in (0, 4096):
        try:
            iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="lo", queue=0, rx_buf_len=rx_buf_len)
        except OSError as exc:
            errors.append((type(exc), exc.errno))
    assert len(errors) == 2 and errors[0] == errors[1], errors
    assert errors[0][0] is not iouzcrx.KernelTooOld


# -- the simulated NIC (VM) -----------------------------------------------------------


def _provider_rx_buf_len(reply: bytes, nest: int) -> int | None:
    for kind, value in attrs(reply):
        if kind == nest:
            for inner, payload in attrs(value):
                if inner == NETDEV_A_IO_URING_PROVIDER_INFO_RX_BUF_LEN:
                    return int.from_bytes(payload[:8], sys.byteorder)
            return 0
    return None


def page_pool_rx_buf_lens(ifindex: int) -> list[int]:
    """The io-uring rx-buf-len of every page pool of ``ifindex`` that
    io_uring's memory provider backs (netdev page-pool-get)."""
    replies = nlclient._ask("netdev", nlclient.NETDEV_CMD_PAGE_POOL_GET, b"", dump=True)
    found = []
    for reply in replies:
        owner = [as_u32(v) for k, v in attrs(reply) if k == NETDEV_A_PAGE_POOL_IFINDEX]
        if owner == [ifindex]:
            value = _provider_rx_buf_len(reply, NETDEV_A_PAGE_POOL_IO_URING)
            if value is not None:
                found.append(value)
    return found


def queue_rx_buf_len(ifindex: int, queue: int) -> int | None:
    """The io-uring rx-buf-len the kernel reports for an RX queue (queue-get)."""
    payload = (
        nlclient.attr(nlclient.NETDEV_A_QUEUE_IFINDEX, nlclient.u32(ifindex))
        + nlclient.attr(nlclient.NETDEV_A_QUEUE_TYPE, nlclient.u32(nlclient.NETDEV_QUEUE_TYPE_RX))
        + nlclient.attr(nlclient.NETDEV_A_QUEUE_ID, nlclient.u32(queue))
    )
    replies = nlclient._ask("netdev", nlclient.NETDEV_CMD_QUEUE_GET, payload)
    return _provider_rx_buf_len(replies[0], NETDEV_A_QUEUE_IO_URING)


def _send_on(nsim: Nsim, queue: int) -> None:
    """New flows of the peer leave on its TX queue ``queue`` (XPS), which
    the simulated link hands to our RX queue ``queue``."""
    every_cpu = format((1 << (os.cpu_count() or 1)) - 1, "x")
    xps = f"/sys/class/net/{nsim.peer}/queues/tx-{{}}/xps_cpus"
    writes = " && ".join(
        f"echo {every_cpu if q == queue else '0'} > {xps.format(q)}" for q in range(nsim.queues)
    )
    subprocess.run(
        ["ip", "netns", "exec", PEER_NS, "sh", "-c", writes],
        check=True,
        capture_output=True,
        timeout=SETUP_TIMEOUT,
    )


def _split_payload_bytes(queue: int) -> int | None:
    """Payload bytes the simulated NIC's header/data split wrote into
    memory-provider buffers of RX ``queue`` (its debugfs hds_stats), or None
    for a module without the split."""
    path = f"/sys/kernel/debug/netdevsim/netdevsim{DEVICE_ID}/ports/0/hds_stats"
    if not os.path.isdir("/sys/kernel/debug/netdevsim"):
        subprocess.run(
            ["mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug"],
            capture_output=True,
            timeout=SETUP_TIMEOUT,
            check=False,
        )
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        words = line.split()
        if words[:2] == ["queue", str(queue)]:
            fields = dict(zip(words[2::2], words[3::2], strict=False))
            return int(fields["niov_bytes"])
    return None


def _needs_rx_buf_len() -> None:
    if not FEATURES.zcrx_rx_buf_len:
        pytest.skip(f"rx_buf_len needs Linux >= 7.0; this is {FEATURES.release}")


@contextlib.contextmanager
def _thp(setting: str) -> Iterator[None]:
    """THP switched machine-wide for a block: only ever in the VM, which is
    this test run's own machine."""
    assert IN_VM, "changes a machine-wide setting: VM only"
    before = _thp_setting("enabled")
    with open(THP_ENABLED, "w", encoding="ascii") as f:
        f.write(setting)
    try:
        yield
    finally:
        with open(THP_ENABLED, "w", encoding="ascii") as f:
            f.write(before or "madvise")


def _zerocopy(ring: iouzcrx.Ring, nsim: Nsim, queue: int, **kw) -> iouzcrx.ZcrxQueue:
    kw.setdefault("area_size", 4 * MIB)
    return iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface=nsim.interface, queue=queue, **kw)


@pytest.mark.vm
@pytest.mark.netdevsim
@pytest.mark.parametrize("rx_buf_len", [8192, 16384, 65536])
def test_the_nic_takes_large_chunks_on_a_transparent_huge_page_area(nsim, rx_buf_len):
    _needs_rx_buf_len()
    with iouzcrx.Ring() as ring:
        queue = _zerocopy(ring, nsim, 1, rx_buf_len=rx_buf_len)
        assert queue.chunk_size == rx_buf_len
        assert queue.total_buffers == (4 * MIB) // rx_buf_len
        stats = queue.stats()
        assert stats["chunk_size"] == rx_buf_len and stats["area_page_size"] == HUGE
        assert queue.area.transparent_hugepages and queue.area.small_page_bytes() == 0
        assert bound(nsim, 1)
        # The kernel's own report of the binding: the queue's memory
        # provider and the page pool the driver made for it.
        assert queue_rx_buf_len(nsim.ifindex, 1) == rx_buf_len
        assert rx_buf_len in page_pool_rx_buf_lens(nsim.ifindex)
    wait_unbound(nsim, 1)


@pytest.mark.vm
@pytest.mark.netdevsim
def test_the_nic_takes_large_chunks_on_reserved_huge_pages(nsim):
    _needs_rx_buf_len()
    with open("/proc/sys/vm/nr_hugepages", encoding="ascii") as f:
        before = int(f.read())
    with open("/proc/sys/vm/nr_hugepages", "w", encoding="ascii") as f:
        f.write(str(before + 2))
    try:
        with iouzcrx.Ring() as ring:
            queue = _zerocopy(ring, nsim, 1, area_size=4 * MIB, rx_buf_len=65536, hugepages=True)
            assert queue.chunk_size == 65536 and queue.area.hugepages
            assert queue_rx_buf_len(nsim.ifindex, 1) == 65536
        wait_unbound(nsim, 1)
    finally:
        with open("/proc/sys/vm/nr_hugepages", "w", encoding="ascii") as f:
            f.write(str(before))


@pytest.mark.vm
@pytest.mark.netdevsim
def test_data_through_a_queue_of_16k_chunks_arrives_byte_exact(nsim):
    _needs_rx_buf_len()
    total = 3 * MIB  # more than the area: chunks go back and are used again
    _send_on(nsim, 0)
    client, server = _pair_across_the_link()
    split_before = _split_payload_bytes(0)
    with iouzcrx.Ring() as ring, server:
        queue = _zerocopy(ring, nsim, 0, area_size=2 * MIB, rx_buf_len=16384)
        receiver = queue.recv_multishot(server)
        sender = Sender(client, seed=47, total=total)
        sender.start()
        verifier = Verifier(47)
        received = 0
        try:
            while True:
                view = receiver.get(30.0)
                if view is None:
                    break
                verifier.feed(view)
                received += len(view)
                view.release()
        finally:
            server.shutdown(socket.SHUT_RDWR)
            sender.join(SETUP_TIMEOUT)
        assert sender.error is None
        assert received == total and verifier.pos == total
        stats = queue.stats()
        assert stats["chunk_size"] == 16384
        split_after = _split_payload_bytes(0)
        if split_before is not None and split_after is not None and split_after > split_before:
            # The NIC wrote the payload into the area (true zero copy): a
            # completion never spans chunks, so completions averaging more
            # than a page prove the chunks are larger than pages.
            assert stats["bytes"] / stats["chunks"] > 4096, stats
    wait_unbound(nsim, 0)


@pytest.mark.vm
@pytest.mark.netdevsim
def test_a_page_size_beyond_the_driver_s_largest_is_refused_naming_rx_buf_len(nsim):
    _needs_rx_buf_len()
    with iouzcrx.Ring() as ring, pytest.raises(iouzcrx.NicMisconfigured, match="rx_buf_len=131072"):
        _zerocopy(ring, nsim, 1, rx_buf_len=131072)
    assert not bound(nsim, 1)


@pytest.mark.vm
@pytest.mark.netdevsim
def test_without_transparent_huge_pages_large_chunks_are_refused_naming_the_fix(nsim):
    _needs_rx_buf_len()
    with _thp("never"), iouzcrx.Ring() as ring:
        with pytest.raises(iouzcrx.MemoryLimit, match="echo madvise >") as info:
            _zerocopy(ring, nsim, 1, rx_buf_len=16384)
        assert "hugepages=True" in str(info.value)
        assert not bound(nsim, 1)
        # Page-sized chunks need no huge page: the documented way out works.
        queue = _zerocopy(ring, nsim, 1, rx_buf_len=0)
        assert queue.chunk_size == 4096 and queue.stats()["area_page_size"] == 4096
    wait_unbound(nsim, 1)


@pytest.mark.vm
def test_large_chunks_on_a_device_without_a_queue_api_name_rx_buf_len(ring):
    _needs_rx_buf_len()
    with pytest.raises(iouzcrx.NicUnsupported, match="rx_buf_len=16384") as info:
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="lo", queue=0, rx_buf_len=16384)
    assert "QCFG_RX_PAGE_SIZE" in str(info.value) and "rx_buf_len=0" in str(info.value)


@pytest.mark.vm
def test_large_chunks_in_copy_mode_are_refused_naming_rx_buf_len(ring):
    _needs_rx_buf_len()
    if not FEATURES.zcrx_nodev:
        pytest.skip(f"copy mode needs Linux >= 7.1; this is {FEATURES.release}")
    try:
        queue = iouzcrx.ZcrxQueue(ring, mode="copy", area_size=4 * MIB, rx_buf_len=16384)
    except iouzcrx.InvalidConfiguration as exc:
        assert "rx_buf_len=16384" in str(exc) and "rx_buf_len=0" in str(exc)
    else:
        assert queue.chunk_size == 16384  # a kernel that copies into large chunks


@pytest.mark.vm
def test_auto_falls_back_from_large_chunks_on_the_nic_to_page_chunks_in_copy_mode(ring):
    """rx_buf_len tunes the NIC's buffers: when auto cannot have the NIC
    queue, the copy-mode fallback copies into pages rather than failing."""
    selection = iouzcrx.select_mode(
        ring, interface="lo", queue=0, area_size=4 * MIB, rx_buf_len=16384
    )
    assert "zerocopy" in selection.refused
    if FEATURES.zcrx_nodev:
        assert selection.mode == "copy"
        assert selection.backend.chunk_size == 4096
        assert not selection.backend.area.transparent_hugepages
    else:
        assert selection.mode == "bufring" and "copy" in selection.refused
    selection.backend.close()


@pytest.mark.parametrize(
    ("err", "kind", "named"),
    [
        (errno.ERANGE, iouzcrx.MemoryLimit, "not physically contiguous in 16384-byte units"),
        (errno.EOPNOTSUPP, iouzcrx.NicUnsupported, "QCFG_RX_PAGE_SIZE"),
        (errno.EINVAL, iouzcrx.NicMisconfigured, "largest receive buffer is smaller"),
    ],
)
def test_each_kernel_refusal_of_large_chunks_names_rx_buf_len(err, kind, named):
    # The kernel's errno for each refusal the simulated NIC cannot produce
    # here (ERANGE: an area whose huge pages were split before it was pinned).
    exc = zcrx_register_error(err, mode="zerocopy", interface="eth1", queue=3, rx_buf_len=16384)
    assert isinstance(exc, kind) and exc.errno == err
    assert named in str(exc) and "rx_buf_len=16384" in str(exc)
