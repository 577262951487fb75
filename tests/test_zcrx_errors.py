"""Every zcrx registration error this kernel can produce reaches the caller as
a clear exception naming the problem and the fix."""

from __future__ import annotations

import os

import pytest
from conftest import FEATURES, requires_copy_mode
from isolation import run_restricted

import iouzcrx


def test_zerocopy_on_loopback_says_the_nic_has_no_queue_api(ring):
    with pytest.raises(iouzcrx.NicUnsupported, match="no queue API") as info:
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="lo", queue=0, area_size=1 << 20)
    assert isinstance(info.value, OSError) and info.value.errno == 95  # EOPNOTSUPP
    assert "mode='copy'" in str(info.value)


@pytest.mark.skipif(not os.path.exists("/sys/class/net/eth0"), reason="no eth0 here")
def test_zerocopy_on_a_virtual_nic_says_the_nic_has_no_queue_api(ring):
    with pytest.raises(iouzcrx.NicUnsupported, match="no queue API"):
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="eth0", queue=0, area_size=1 << 20)


def test_unknown_interface(ring):
    with pytest.raises(iouzcrx.InterfaceNotFound, match="nosuchif0"):
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="nosuchif0", queue=0)


def test_queue_out_of_range(ring):
    queues = len([n for n in os.listdir("/sys/class/net/lo/queues") if n.startswith("rx-")])
    with pytest.raises(iouzcrx.QueueOutOfRange, match=f"has {queues}") as info:
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="lo", queue=queues + 7)
    assert info.value.errno == 34  # ERANGE


def test_zerocopy_needs_interface_and_queue(ring):
    with pytest.raises(iouzcrx.InvalidConfiguration, match="interface="):
        iouzcrx.ZcrxQueue(ring, mode="zerocopy")


def test_invalid_sizes_are_refused_before_the_kernel(ring):
    with pytest.raises(iouzcrx.InvalidConfiguration, match="multiple"):
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="lo", queue=0, area_size=5000)
    with pytest.raises(iouzcrx.InvalidConfiguration, match="rq_entries"):
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="lo", queue=0, rq_entries=0)
    with pytest.raises(iouzcrx.InvalidConfiguration, match="rx_buf_len"):
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="lo", queue=0, rx_buf_len=5000)
    with pytest.raises(iouzcrx.InvalidConfiguration, match="mode"):
        iouzcrx.ZcrxQueue(ring, mode="fast")
    with pytest.raises(iouzcrx.InvalidConfiguration, match="buffer_size"):
        iouzcrx.BufRingQueue(ring, area_size=1 << 20, buffer_size=1000)
    with pytest.raises(iouzcrx.InvalidConfiguration, match="buffer ring holds"):
        iouzcrx.BufRingQueue(ring, area_size=1 << 30, buffer_size=4096)


@pytest.mark.skipif(FEATURES.zcrx_rx_buf_len, reason="this kernel supports rx_buf_len")
def test_rx_buf_len_on_a_kernel_without_it_says_kernel_too_old(ring):
    with pytest.raises(iouzcrx.KernelTooOld, match="7.0"):
        iouzcrx.ZcrxQueue(ring, mode="zerocopy", interface="lo", queue=0, rx_buf_len=8192)


@pytest.mark.skipif(FEATURES.zcrx_nodev, reason="this kernel has copy mode")
def test_copy_mode_on_a_kernel_without_nodev_says_kernel_too_old(ring):
    with pytest.raises(iouzcrx.KernelTooOld, match="7.1"):
        iouzcrx.ZcrxQueue(ring, mode="copy", area_size=1 << 20)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hold CAP_NET_ADMIN first")
def test_missing_cap_net_admin_is_named_with_the_fix():
    out = run_restricted(
        """
        import isolation
        isolation.drop_capabilities(isolation.CAP_NET_ADMIN)
        import iouzcrx
        ring = iouzcrx.Ring()
        for kwargs in ({"mode": "zerocopy", "interface": "lo", "queue": 0}, {"mode": "copy"}):
            try:
                iouzcrx.ZcrxQueue(ring, area_size=1 << 20, **kwargs)
                print(kwargs["mode"], "no-error - -")
            except iouzcrx.MissingCapability as exc:
                print(kwargs["mode"], "MissingCapability", exc.errno, exc)
            except Exception as exc:
                print(kwargs["mode"], "other", type(exc).__name__, exc)
        """
    )
    assert len(out) == 2, out
    for line in out:
        mode, kind, errno_value, message = line.split(" ", 3)
        if mode == "copy" and not FEATURES.zcrx_nodev:
            # The capability would not help: the kernel cannot do copy mode.
            assert kind == "other" and "KernelTooOld" in errno_value, line
            assert "7.1" in message
            continue
        assert kind == "MissingCapability", line
        assert errno_value == "1"  # EPERM
        assert "CAP_NET_ADMIN" in message and "setcap" in message


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an unprivileged user")
@pytest.mark.skipif(FEATURES.zcrx_nodev, reason="this kernel can do copy mode")
def test_copy_mode_as_non_root_on_a_kernel_without_it_names_the_kernel_limit():
    out = run_restricted(
        """
        import os
        import iouzcrx  # first: the interpreter's files may be root's alone
        os.setgid(65534)
        os.setuid(65534)
        ring = iouzcrx.Ring()
        try:
            iouzcrx.ZcrxQueue(ring, mode="copy", area_size=1 << 20)
            print("no-error")
        except Exception as exc:
            print(type(exc).__name__, exc)
        """
    )
    assert len(out) == 1, out
    kind, message = out[0].split(" ", 1)
    assert kind == "KernelTooOld", out
    assert "ZCRX_REG_NODEV" in message and "7.1" in message


@pytest.mark.skipif(
    open("/proc/sys/vm/nr_hugepages").read().strip() != "0", reason="huge pages are reserved here"
)
def test_a_huge_page_area_without_reserved_pages_says_how_to_reserve(ring):
    with pytest.raises(iouzcrx.MemoryLimit, match="nr_hugepages"):
        iouzcrx.BufRingQueue(ring, area_size=4 << 20, hugepages=True)


@pytest.mark.vm
@requires_copy_mode
def test_copy_mode_refusing_large_chunks_names_rx_buf_len_not_the_kernel_config(ring):
    if not FEATURES.zcrx_rx_buf_len:
        pytest.skip("this kernel has no rx_buf_len at all")
    try:
        queue = iouzcrx.ZcrxQueue(ring, mode="copy", area_size=1 << 20, rx_buf_len=8192)
    except iouzcrx.InvalidConfiguration as exc:
        assert "rx_buf_len=8192" in str(exc) and "CONFIG_IO_URING_ZCRX" not in str(exc)
    else:
        assert queue.chunk_size == 8192  # a kernel that takes it
