"""``python -m iouzcrx doctor``: the real command on this machine, checked
against facts the test reads itself, and the ethtool/ip parsers on captured
sample outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
from isolation import TESTS, child_env

import iouzcrx
from iouzcrx import doctor, nic
from iouzcrx.modes import MODES, ModeSelection, select_mode

FEATURES = iouzcrx.kernel_features()
LINE = re.compile(r"^  (OK|WARN|FAIL|INFO)\s+(\S+)\s+(.*)$")


def run_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "iouzcrx", "doctor", *args],
        cwd=TESTS,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def text_report(*args: str) -> dict[str, tuple[str, str]]:
    """``{check name: (status, rest of the line)}`` of a text report."""
    done = run_doctor(*args)
    assert done.returncode == 0, done.stderr
    checks: dict[str, tuple[str, str]] = {}
    for line in done.stdout.splitlines():
        match = LINE.match(line)
        if match:
            status, name, rest = match.groups()
            assert name not in checks, f"{name} reported twice"
            checks[name] = (status, rest)
    assert checks, done.stdout
    return checks


def json_report(*args: str) -> dict[str, Any]:
    done = run_doctor(*args, "--json")
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def cap_eff() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapEff in /proc/self/status")


def expected_selection(interface: str | None, queue: int | None) -> ModeSelection:
    """What select_mode picks in this process, as the doctor should report."""
    try:
        ring: iouzcrx.Ring | None = iouzcrx.Ring()
        error: OSError | None = None
    except OSError as exc:
        ring, error = None, exc
    try:
        selection = select_mode(
            ring,
            mode="auto",
            interface=interface,
            queue=queue,
            area_size=doctor.PROBE_AREA_SIZE,
            ring_error=error,
        )
        # Keep only plain data: the backend dies with the ring.
        return ModeSelection(selection.mode, None, dict(selection.refused))
    finally:
        if ring is not None:
            ring.close()


# --- the real command ----------------------------------------------------------------------


def test_kernel_release_is_this_kernel() -> None:
    checks = text_report()
    status, rest = checks["kernel.release"]
    assert status == "INFO"
    assert rest.split()[0] == os.uname().release


def test_io_uring_is_available() -> None:
    checks = text_report()
    assert checks["io_uring.ring"][0] == "OK", checks["io_uring.ring"]
    assert checks["kernel.io_uring"][0] == "OK", checks["kernel.io_uring"]
    with open("/proc/sys/kernel/io_uring_disabled") as f:
        disabled = int(f.read())
    assert f"kernel.io_uring_disabled={disabled}:" in checks["io_uring.sysctl"][1]
    # Missing kernel features name the version that brings them.
    for name, version in (
        ("kernel.recv_zc", "6.15"),
        ("kernel.zcrx_nodev", "7.1"),
        ("kernel.zcrx_flush", "6.19"),
        ("kernel.zcrx_rx_buf_len", "7.0"),
        ("kernel.zcrx_events", "7.2"),
        ("kernel.zcrx_export", "6.19"),
    ):
        assert f"Linux {version}" in checks[name][1], (name, checks[name])
    assert (checks["kernel.recv_zc"][0] == "OK") is FEATURES.recv_zc
    assert (checks["kernel.zcrx_nodev"][0] == "OK") is FEATURES.zcrx_nodev
    assert (checks["kernel.zcrx_events"][0] == "OK") is FEATURES.zcrx_events
    assert (checks["kernel.zcrx_export"][0] == "OK") is FEATURES.zcrx_export


def test_capabilities_match_capeff() -> None:
    checks = text_report()
    caps = cap_eff()
    net_admin = bool(caps >> 12 & 1)
    assert (checks["privileges.cap_net_admin"][0] == "OK") is net_admin
    assert (checks["privileges.cap_ipc_lock"][0] == "OK") is bool(caps >> 14 & 1)
    if os.geteuid() == 0:
        assert net_admin, "root without CAP_NET_ADMIN: the doctor must have said FAIL"
        assert checks["privileges.cap_net_admin"][0] == "OK"


def test_loopback_cannot_host_zero_copy() -> None:
    checks = text_report("--interface", "lo", "--queue", "0")
    assert checks["nic.interface"][0] == "OK"
    status, rest = checks["nic.driver"]
    assert status == "FAIL"
    assert "cannot host zero-copy" in rest
    assert "no queue API / DMA device" in rest
    assert "fix:" in rest


def test_unknown_interface_is_reported_not_raised() -> None:
    checks = text_report("--interface", "nosuchif0", "--queue", "0")
    assert checks["nic.interface"][0] == "FAIL"
    assert "nosuchif0" in checks["nic.interface"][1]
    assert "mode.selected" in checks


def test_selected_mode_is_what_select_mode_picks() -> None:
    checks = text_report("--interface", "lo", "--queue", "0")
    expected = expected_selection("lo", 0)
    # This machine's facts decide the mode: no NODEV (before 7.1) or no
    # CAP_NET_ADMIN leaves bufring, and lo never takes zerocopy.
    if not FEATURES.io_uring:
        mode = "socket"
    elif FEATURES.zcrx_nodev and cap_eff() >> 12 & 1:
        mode = "copy"
    else:
        mode = "bufring"
    assert expected.mode == mode
    status, rest = checks["mode.selected"]
    assert status == "OK"
    assert f"picks {mode} for lo queue 0" in rest
    prefix = "mode.refused."
    refused = {
        name[len(prefix) :]: rest for name, (_, rest) in checks.items() if name.startswith(prefix)
    }
    assert set(refused) == set(MODES[: MODES.index(mode)])
    assert set(refused) == set(expected.refused)
    for candidate, reason in expected.refused.items():
        assert reason in refused[candidate]
        assert checks[f"mode.refused.{candidate}"][0] == "WARN"


def test_json_has_the_same_facts() -> None:
    report = json_report("--interface", "lo", "--queue", "0")
    text = text_report("--interface", "lo", "--queue", "0")
    assert [c["name"] for c in report["checks"]] == list(text)
    for check in report["checks"]:
        assert set(check) == {"name", "status", "detail", "fix"}
        assert check["status"] == text[check["name"]][0]
        assert text[check["name"]][1].startswith(check["detail"])
    facts = report["facts"]
    assert facts["kernel"]["release"] == os.uname().release
    assert facts["kernel"]["io_uring"] is True
    assert facts["io_uring"]["ring"] is True
    assert facts["privileges"]["cap_net_admin"] is bool(cap_eff() >> 12 & 1)
    assert facts["privileges"]["cap_eff"] == f"{cap_eff():016x}"
    assert facts["nic"]["interface"] == "lo"
    assert facts["nic"]["driver"] == "loopback"
    assert facts["nic"]["loopback"] is True
    expected = expected_selection("lo", 0)
    assert facts["mode"]["selected"] == expected.mode
    assert facts["mode"]["refused"] == expected.refused


def test_without_interface_there_is_no_nic_section() -> None:
    report = json_report()
    names = [c["name"] for c in report["checks"]]
    assert not [n for n in names if n.startswith("nic.")]
    assert report["facts"]["nic"] is None
    expected = expected_selection(None, None)
    assert report["facts"]["mode"]["selected"] == expected.mode
    assert "zerocopy" not in report["facts"]["mode"]["refused"]
    order = [name.split(".")[0] for name in names]
    assert order == sorted(order, key=["kernel", "io_uring", "privileges", "mode"].index)


@pytest.mark.parametrize(
    "args",
    [
        ["--queue", "0"],
        ["--interface", "lo"],
        ["--interface", "lo", "--queue", "-1"],
        ["--interface", "a/b", "--queue", "0"],
        ["--bogus"],
    ],
)
def test_bad_usage_exits_2(args: list[str]) -> None:
    done = run_doctor(*args)
    assert done.returncode == 2
    assert "usage:" in done.stderr
    assert done.stdout == ""


def test_other_commands_still_work() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "iouzcrx", "features"],
        cwd=TESTS,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["release"] == os.uname().release


def test_gather_without_ethtool_does_not_crash() -> None:
    facts = nic.gather("lo", find=lambda name: None if name == "ethtool" else nic.find_tool(name))
    assert facts.exists and facts.ethtool is None
    assert facts.driver == "loopback"
    assert facts.channels is None and facts.rings is None and facts.ntuple is None
    assert not [cmd for cmd in facts.errors if cmd.startswith("ethtool")]
    checks = {c.name: c for c in doctor.nic_checks(facts, 0)}
    assert checks["nic.ethtool"].status == "INFO"
    assert "apt-get install ethtool" in checks["nic.ethtool"].detail
    assert checks["nic.driver"].status == "FAIL"


def test_gather_reads_this_machine() -> None:
    facts = nic.gather("lo")
    with open("/sys/class/net/lo/ifindex") as f:
        assert facts.ifindex == int(f.read())
    assert facts.rx_queues == len(
        [q for q in os.listdir("/sys/class/net/lo/queues") if q.startswith("rx-")]
    )
    assert facts.has_device is False
    assert nic.zcrx_support(facts)[0] is False
    # ethtool is part of the test set-up (tests/run installs it).
    assert facts.ethtool is not None
    assert facts.ntuple is not None and facts.ntuple.enabled is False
    assert facts.xdp is False


# --- NIC checks on NICs this machine does not have ------------------------------------------


def ready_mlx5(**changes: Any) -> nic.NicFacts:
    """An mlx5 NIC set up as the reference doc says, for queue 7 of 8."""
    facts = nic.NicFacts(
        interface="eth9",
        exists=True,
        ifindex=5,
        driver="mlx5_core",
        has_device=True,
        loopback=False,
        rx_queues=8,
        channels=nic.Channels(combined=8, combined_max=63),
        rings=nic.RingParams(rx=1024, rx_max=8192, tcp_data_split="on", hds_thresh=0),
        ntuple=nic.Feature(enabled=True, fixed=False),
        rx_gro_hw=nic.Feature(enabled=True, fixed=False),
        rss=nic.RssTable(rings=8, table=[i % 7 for i in range(64)]),
        ntuple_rules=nic.NtupleRules(
            rings=8, rules=[nic.NtupleRule(1023, "TCP over IPv6", 9999, 7)]
        ),
        xdp=False,
        ethtool="ethtool",
        ip="ip",
    )
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def test_ready_nic_passes_every_check() -> None:
    checks = doctor.nic_checks(ready_mlx5(), 7)
    assert [c.status for c in checks] == ["OK"] * len(checks), checks
    names = [c.name for c in checks]
    for name in ("nic.driver", "nic.rx_queues", "nic.tcp_data_split", "nic.hds_thresh"):
        assert name in names
    for name in ("nic.ntuple", "nic.rx_gro_hw", "nic.rss", "nic.steering", "nic.xdp"):
        assert name in names
    assert not [c for c in checks if c.fix]


def test_unready_nic_gets_the_reference_fixes() -> None:
    facts = ready_mlx5(
        channels=nic.Channels(combined=8, combined_max=63),
        rings=nic.RingParams(tcp_data_split="off", hds_thresh=256),
        ntuple=nic.Feature(enabled=False, fixed=False),
        rx_gro_hw=nic.Feature(enabled=False, fixed=False),
        rss=nic.RssTable(rings=8, table=[i % 8 for i in range(64)]),
        ntuple_rules=nic.NtupleRules(rings=8, rules=[]),
        xdp=True,
    )
    fixes = {c.name: c.fix for c in doctor.nic_checks(facts, 7) if c.status == "FAIL"}
    assert fixes == {
        "nic.tcp_data_split": "ethtool -G eth9 tcp-data-split on hds-thresh 0",
        "nic.hds_thresh": "ethtool -G eth9 tcp-data-split on hds-thresh 0",
        "nic.ntuple": "ethtool -K eth9 ntuple on",
        "nic.rx_gro_hw": "ethtool -K eth9 rx-gro-hw on",
        "nic.rss": "ethtool -X eth9 equal 7",
        "nic.steering": "ethtool -N eth9 flow-type tcp6 dst-port PORT action 7",
        "nic.xdp": "ip link set dev eth9 xdp off",
    }


def test_queue_out_of_range_and_middle_queue_rss() -> None:
    out = {c.name: c for c in doctor.nic_checks(ready_mlx5(), 8)}
    assert out["nic.rx_queues"].status == "FAIL"
    assert out["nic.rx_queues"].fix == "ethtool -L eth9 combined 9"
    middle = {c.name: c for c in doctor.nic_checks(ready_mlx5(), 2)}
    assert middle["nic.rss"].status == "FAIL"
    assert middle["nic.rss"].fix == "ethtool -X eth9 weight 1 1 0 1 1 1 1 1"


def test_unknown_nic_facts_are_warnings() -> None:
    facts = ready_mlx5(rings=nic.RingParams(), rss=None, ntuple_rules=None, ntuple=None, xdp=None)
    checks = {c.name: c for c in doctor.nic_checks(facts, 7)}
    for name in ("nic.tcp_data_split", "nic.hds_thresh", "nic.rss", "nic.steering", "nic.xdp"):
        assert checks[name].status == "WARN", checks[name]
        assert "unknown" in checks[name].detail


def test_driver_verdicts() -> None:
    def verdict(driver: str | None, has_device: bool | None = True) -> bool | None:
        facts = nic.NicFacts("x0", True, driver=driver, has_device=has_device)
        return nic.zcrx_support(facts)[0]

    for driver in ("mlx5_core", "bnxt_en", "gve", "fbnic", "netdevsim"):
        assert verdict(driver) is True
    for driver in ("virtio_net", "veth", "loopback", "ifb"):
        assert verdict(driver) is False
        reason = nic.zcrx_support(nic.NicFacts("x0", True, driver=driver))[1]
        assert "no queue API / DMA device" in reason
    assert verdict("bridge", has_device=False) is False
    assert verdict("e1000e") is None
    assert verdict("netkit", has_device=False) is None


def test_io_uring_checks_explain_each_block() -> None:
    def statuses(**kw: Any) -> dict[str, doctor.Check]:
        args: dict[str, Any] = dict(
            disabled=0, group=-1, groups=[0], seccomp=0, cap_sys_admin=False, ring=None
        )
        args.update(kw)
        args.setdefault("ring_error", OSError(1, "io_uring is disabled by sysctl"))
        return {c.name: c for c in doctor.io_uring_checks(**args)}

    off = statuses(disabled=2)
    assert off["io_uring.sysctl"].status == "FAIL"
    assert "sysctl -w kernel.io_uring_disabled=0" in (off["io_uring.sysctl"].fix or "")
    assert off["io_uring.ring"].status == "FAIL"
    assert "io_uring is disabled by sysctl" in off["io_uring.ring"].detail
    assert statuses(disabled=1, group=1000, groups=[1000])["io_uring.sysctl"].status == "OK"
    assert statuses(disabled=1, cap_sys_admin=True)["io_uring.sysctl"].status == "OK"
    assert statuses(disabled=1)["io_uring.sysctl"].status == "FAIL"
    filtered = statuses(seccomp=2)["io_uring.seccomp"]
    assert filtered.status == "WARN" and filtered.fix
    assert statuses(disabled=None)["io_uring.sysctl"].status == "INFO"


def test_memlock_advice_without_cap_ipc_lock() -> None:
    small = {
        c.name: c
        for c in doctor.privilege_checks(
            cap_net_admin=False, cap_ipc_lock=False, initial_userns=True, memlock=(8 << 20, 8 << 20)
        )
    }
    assert small["privileges.cap_net_admin"].status == "FAIL"
    assert small["privileges.memlock"].status == "WARN"
    assert "ulimit -l" in (small["privileges.memlock"].fix or "")
    nested = doctor.privilege_checks(
        cap_net_admin=True, cap_ipc_lock=True, initial_userns=False, memlock=(0, 0)
    )
    assert nested[0].status == "FAIL" and "user namespace" in nested[0].detail


def test_mode_checks_list_every_refusal() -> None:
    selection = ModeSelection("socket", None, {"copy": "no ring", "bufring": "no ring"})
    checks = doctor.mode_checks(selection, None, None, None)
    assert [c.name for c in checks] == [
        "mode.selected",
        "mode.refused.copy",
        "mode.refused.bufring",
    ]
    assert "picks socket" in checks[0].detail


# --- parsers on captured outputs -----------------------------------------------------------

# ethtool 6.x on an mlx5 NIC set up for zcrx (a newer ethtool prints HDS thresh).
RINGS_READY = """\
Ring parameters for eth2:
Pre-set maximums:
RX:			8192
RX Mini:		n/a
RX Jumbo:		n/a
TX:			8192
TX push buff len:	n/a
HDS thresh:		1023
Current hardware settings:
RX:			1024
RX Mini:		n/a
RX Jumbo:		n/a
TX:			1024
RX Buf Len:		n/a
CQE Size:		n/a
TX Push:		off
RX Push:		off
TX push buff len:	n/a
TCP data split:		on
HDS thresh:		0
"""

RINGS_SPLIT_OFF = """\
Ring parameters for enp3s0f0np0:
Pre-set maximums:
RX:			2047
RX Mini:		n/a
RX Jumbo:		8188
TX:			2047
HDS thresh:		1023
Current hardware settings:
RX:			511
RX Mini:		n/a
RX Jumbo:		2044
TX:			511
RX Buf Len:		n/a
CQE Size:		n/a
TX Push:		off
TCP data split:		off
HDS thresh:		256
"""

# ethtool 6.1 on virtio-net: no HDS thresh line at all.
RINGS_VIRTIO = """\
Ring parameters for eth0:
Pre-set maximums:
RX:		256
RX Mini:	n/a
RX Jumbo:	n/a
TX:		256
Current hardware settings:
RX:		256
RX Mini:	n/a
RX Jumbo:	n/a
TX:		256
RX Buf Len:		n/a
CQE Size:		n/a
TX Push:	off
TCP data split:	n/a
"""

# ethtool 5.10: neither line.
RINGS_OLD = """\
Ring parameters for eno1:
Pre-set maximums:
RX:		4096
RX Mini:	0
RX Jumbo:	0
TX:		4096
Current hardware settings:
RX:		256
RX Mini:	0
RX Jumbo:	0
TX:		256
"""


def test_parse_rings() -> None:
    ready = nic.parse_rings(RINGS_READY)
    assert ready.tcp_data_split == "on"
    assert ready.hds_thresh == 0
    assert ready.hds_thresh_max == 1023
    assert (ready.rx, ready.rx_max) == (1024, 8192)
    off = nic.parse_rings(RINGS_SPLIT_OFF)
    assert (off.tcp_data_split, off.hds_thresh) == ("off", 256)
    virtio = nic.parse_rings(RINGS_VIRTIO)
    assert (virtio.tcp_data_split, virtio.hds_thresh) == ("n/a", None)
    assert virtio.rx == 256
    old = nic.parse_rings(RINGS_OLD)
    assert (old.tcp_data_split, old.hds_thresh, old.rx) == (None, None, 256)
    assert nic.parse_rings("") == nic.RingParams()


CHANNELS_MLX5 = """\
Channel parameters for eth2:
Pre-set maximums:
RX:		n/a
TX:		n/a
Other:		n/a
Combined:	63
Current hardware settings:
RX:		n/a
TX:		n/a
Other:		n/a
Combined:	8
"""

CHANNELS_SPLIT = """\
Channel parameters for ens5:
Pre-set maximums:
RX:		16
TX:		16
Other:		1
Combined:	n/a
Current hardware settings:
RX:		4
TX:		4
Other:		1
Combined:	n/a
"""


def test_parse_channels() -> None:
    assert nic.parse_channels(CHANNELS_MLX5) == nic.Channels(
        rx=None, rx_max=None, combined=8, combined_max=63
    )
    assert nic.parse_channels(CHANNELS_SPLIT) == nic.Channels(
        rx=4, rx_max=16, combined=None, combined_max=None
    )


FEATURES_MLX5 = """\
Features for eth2:
rx-checksumming: on
tx-checksumming: on
	tx-checksum-ipv4: off [fixed]
	tx-checksum-ip-generic: on
scatter-gather: on
	tx-scatter-gather: on
	tx-scatter-gather-fraglist: off [fixed]
generic-receive-offload: on
large-receive-offload: off
ntuple-filters: on
receive-hashing: on
rx-gro-hw: off [requested on]
hw-tc-offload: off
"""

FEATURES_VIRTIO = """\
Features for eth0:
rx-checksumming: on [fixed]
ntuple-filters: off [fixed]
receive-hashing: off [fixed]
rx-gro-hw: on [fixed]
"""


def test_parse_features() -> None:
    mlx5 = nic.parse_features(FEATURES_MLX5)
    assert mlx5["ntuple-filters"] == nic.Feature(enabled=True, fixed=False)
    assert mlx5["rx-gro-hw"] == nic.Feature(enabled=False, fixed=False)
    assert mlx5["tx-checksum-ipv4"] == nic.Feature(enabled=False, fixed=True)
    assert "Features for eth2" not in mlx5
    virtio = nic.parse_features(FEATURES_VIRTIO)
    assert virtio["ntuple-filters"] == nic.Feature(enabled=False, fixed=True)


# `ethtool -X eth2 equal 7` on 8 queues: queue 7 is out of the table.
RSS_EQUAL_7 = """\
RX flow hash indirection table for eth2 with 8 RX ring(s):
    0:      0     1     2     3     4     5     6     0
    8:      1     2     3     4     5     6     0     1
   16:      2     3     4     5     6     0     1     2
   24:      3     4     5     6     0     1     2     3
   32:      4     5     6     0     1     2     3     4
   40:      5     6     0     1     2     3     4     5
   48:      6     0     1     2     3     4     5     6
   56:      0     1     2     3     4     5     6     0
RSS hash key:
12:34:56:78:9a:bc:de:f0:11:22:33:44:55:66:77:88:99:00:aa:bb:cc:dd:ee:ff:01:02:03:04:05:06:07:08:09:0a:0b:0c:0d:0e:0f:10
RSS hash function:
    toeplitz: on
    xor: off
    crc32: off
RSS input transformation:
    symmetric-xor: off
"""

RSS_DEFAULT = """\
RX flow hash indirection table for eth2 with 8 RX ring(s):
    0:      0     1     2     3     4     5     6     7
    8:      0     1     2     3     4     5     6     7
   16:      0     1     2     3     4     5     6     7
   24:      0     1     2     3     4     5     6     7
RSS hash key:
7e:3a:91:5c:0d:44:b2:19:e8:6f:20:a7:53:c1:8e:0b:64:f5:2d:99:3c:71:d8:05:aa:16:4b:e2:87:30:5f:c9:12:68:bd:07:e4:9f:21:56
RSS hash function:
    toeplitz: on
    xor: off
    crc32: off
"""

RSS_UNSUPPORTED = """\
RX flow hash indirection table for eth0 with 1 RX ring(s):
Operation not supported
RSS hash key:
Operation not supported
RSS hash function:
    toeplitz: on
    xor: off
    crc32: off
"""


def test_parse_rss() -> None:
    carved = nic.parse_rss(RSS_EQUAL_7)
    assert carved.rings == 8
    assert carved.table is not None and len(carved.table) == 64
    assert set(carved.table) == set(range(7))
    default = nic.parse_rss(RSS_DEFAULT)
    assert default.table is not None and len(default.table) == 32
    assert 7 in default.table
    assert nic.parse_rss(RSS_UNSUPPORTED) == nic.RssTable(rings=1, table=None)


RULES = """\
8 RX rings available
Total 2 rules

Filter: 1022
	Rule Type: TCP over IPv6
	Src IP addr: :: mask: ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff
	Dest IP addr: :: mask: ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff
	Traffic Class: 0x0 mask: 0xff
	Protocol: 6
	Src port: 0 mask: 0xffff
	Dest port: 9999 mask: 0x0
	Action: Direct to queue 7

Filter: 1023
	Rule Type: TCP over IPv4
	Src IP addr: 0.0.0.0 mask: 255.255.255.255
	Dest IP addr: 0.0.0.0 mask: 255.255.255.255
	TOS: 0x0 mask: 0xff
	Src port: 0 mask: 0xffff
	Dest port: 80 mask: 0x0
	Action: Drop

"""

NO_RULES = """\
8 RX rings available
Total 0 rules

"""


def test_parse_ntuple_rules() -> None:
    parsed = nic.parse_ntuple_rules(RULES)
    assert parsed.rings == 8
    assert parsed.rules == [
        nic.NtupleRule(1022, "TCP over IPv6", 9999, 7),
        nic.NtupleRule(1023, "TCP over IPv4", 80, None),
    ]
    assert parsed.rules[0].describe() == "rule 1022 TCP over IPv6 dst-port 9999 -> queue 7"
    assert nic.parse_ntuple_rules(NO_RULES) == nic.NtupleRules(rings=8, rules=[])


DRIVER_INFO = """\
driver: mlx5_core
version: 6.18.44
firmware-version: 28.39.1002 (MT_0000000838)
expansion-rom-version:
bus-info: 0000:03:00.0
supports-statistics: yes
"""


def test_parse_driver_info() -> None:
    info = nic.parse_driver_info(DRIVER_INFO)
    assert info["driver"] == "mlx5_core"
    assert info["bus-info"] == "0000:03:00.0"
    assert info["expansion-rom-version"] == ""


LINK_XDP = """\
5: eth2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 xdp qdisc mq state UP mode DEFAULT group default qlen 1000
    link/ether 0c:42:a1:5e:10:2a brd ff:ff:ff:ff:ff:ff promiscuity 0 allmulti 0 minmtu 68 maxmtu 9978 addrgenmode eui64 numtxqueues 8 numrxqueues 8 gso_max_size 65536 gso_max_segs 65535 parentbus pci parentdev 0000:03:00.0
    prog/xdp id 42 name xdp_pass tag 3b185187f1855c4c jited
"""  # noqa: E501

LINK_XDP_GENERIC = """\
6: veth0@if5: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 xdpgeneric/id:17 qdisc noqueue state UP mode DEFAULT group default qlen 1000
    link/ether 3a:1f:00:00:00:02 brd ff:ff:ff:ff:ff:ff link-netnsid 0
"""  # noqa: E501

LINK_PLAIN = """\
1: xdp0: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000
    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00 promiscuity 0 allmulti 0 minmtu 0 maxmtu 0
"""  # noqa: E501


def test_parse_xdp() -> None:
    assert nic.parse_xdp(LINK_XDP) is True
    assert nic.parse_xdp(LINK_XDP_GENERIC) is True
    # An interface merely named like XDP has none attached.
    assert nic.parse_xdp(LINK_PLAIN) is False
    assert nic.parse_xdp('Device "eth9" does not exist.') is None


def test_io_uring_enter_blocked_alone_is_reported_not_raised() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import errno, sys, isolation\n"
            "isolation.block_io_uring(errno.EPERM, 426, 426)  # io_uring_enter only\n"
            "from iouzcrx.__main__ import main\n"
            "sys.exit(main(['doctor']))\n",
        ],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), done.stderr
    ring = next(line for line in done.stdout.splitlines() if "io_uring.ring" in line)
    assert "FAIL" in ring and "io_uring_enter" in ring and "seccomp" in ring
    assert "mode='auto' picks socket" in done.stdout
