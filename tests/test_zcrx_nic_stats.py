"""On a NIC queue (the simulated NIC, in the VM) the kernel's own zcrx
counters tell zero copy from the copy fallback, checked against what the NIC
did. Where the simulated NIC writes payloads into the bound queue's buffers
(header/data split, its debugfs ``hds_stats``), nothing may be counted as
copied; where it hands the sender's pages over, every byte must be."""

from __future__ import annotations

import pytest
from conftest import FEATURES, Sender, Verifier, receive_all
from nsim import wait_unbound
from test_zcrx_nic import _pair_across_the_link, zerocopy

import iouzcrx

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(
        not FEATURES.zcrx_events,
        reason=f"kernel zcrx counters need Linux >= 7.2; this kernel is {FEATURES.release}. "
        "They run in the VM: tests/vm/run",
    ),
]


def test_the_kernel_counters_say_whether_the_nic_queue_received_by_zero_copy(nsim):
    total = 512 << 10
    # The NIC itself places payloads into the area only with header split.
    nic_writes_payloads = getattr(nsim, "hds_stats", None) is not None
    client, server = _pair_across_the_link()
    with iouzcrx.Ring() as ring, server:
        queue = zerocopy(ring, nsim, 0, area_size=1 << 20)
        receiver = queue.recv_multishot(server)
        sender = Sender(client, seed=51, total=total)
        sender.start()
        assert receive_all(receiver, Verifier(51), timeout=60.0) == total
        sender.join(30)
        assert sender.error is None
        ring.drain()  # event CQEs the last receive left behind
        stats = queue.stats()
    wait_unbound(nsim, 0)
    assert stats["kernel_stats"] is True and stats["bytes"] == total
    if nic_writes_payloads:
        assert stats["copied_bytes"] == 0 and stats["copies"] == 0, stats
        assert stats["zero_copy_share"] == 1.0 and stats["copy_events"] == 0, stats
    else:
        assert stats["copied_bytes"] == total, stats
        assert stats["zero_copy_share"] == 0.0 and stats["copy_events"] >= 1, stats
    assert stats["alloc_fail_events"] == 0
