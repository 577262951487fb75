"""``python -m iouzcrx doctor``: can this machine run each receive mode, and
what to change where it cannot.

The report is a list of :class:`Check` records in a fixed order (kernel,
io_uring, privileges, NIC, mode). Status words:

- ``OK``: the prerequisite is met.
- ``FAIL``: a prerequisite of some mode is missing; ``fix`` says what to do.
- ``WARN``: works, but degraded, or the fact could not be learnt.
- ``INFO``: a plain fact.

The command always exits 0 because it reports rather than tests; 2 means the
command line was wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import platform
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from iouzcrx import nic
from iouzcrx._probe import KernelFeatures, kernel_features
from iouzcrx._ring import Ring
from iouzcrx.modes import DEFAULT_AREA_SIZE, ModeSelection, select_mode

__all__ = [
    "Check",
    "Report",
    "gather",
    "kernel_checks",
    "io_uring_checks",
    "privilege_checks",
    "nic_checks",
    "mode_checks",
    "render_text",
    "render_json",
    "main",
]

STATUSES = ("OK", "WARN", "FAIL", "INFO")

CAP_NET_ADMIN = 12
CAP_IPC_LOCK = 14
CAP_SYS_ADMIN = 21

# Small enough to be cheap, large enough to need a real registration.
PROBE_AREA_SIZE = 4 << 20
PAGE_SIZE = 4096
ZCRX_RQE_SIZE = 16

ZCRX_DRIVER_LIST = ", ".join(nic.ZCRX_DRIVERS)


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str
    fix: str | None = None


@dataclass
class Report:
    checks: list[Check]
    facts: dict[str, Any]


# --- facts about the process ---------------------------------------------------------------


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def parse_proc_status(text: str) -> dict[str, str]:
    """``/proc/self/status`` as ``{field: value}``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def has_capability(cap_eff: int | None, bit: int) -> bool | None:
    return None if cap_eff is None else bool(cap_eff >> bit & 1)


def initial_user_namespace(uid_map: str | None) -> bool | None:
    """Whether the uid map is the initial namespace's identity map: the kernel
    checks CAP_NET_ADMIN for zcrx there, not in a container's namespace."""
    if uid_map is None:
        return None
    return uid_map.split() == ["0", "0", "4294967295"]


def kernel_config_option(release: str, option: str) -> str | None:
    """``y``/``m``/``n`` for ``option`` from the running kernel's config, or
    None when no config is readable."""
    text: str | None = None
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            text = f.read()
    except OSError:
        text = _read(f"/boot/config-{release}")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith(f"{option}="):
            return line.partition("=")[2]
        if line == f"# {option} is not set":
            return "n"
    return "n"


def _bytes(size: int) -> str:
    if size >= 1 << 30 and size % (1 << 30) == 0:
        return f"{size >> 30} GiB"
    if size >= 1 << 20:
        return f"{size / (1 << 20):.4g} MiB"
    return f"{size >> 10} KiB"


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else _bytes(value)


def zcrx_pinned_bytes(area_size: int) -> int:
    """Memory a zcrx queue charges to RLIMIT_MEMLOCK: the area plus a refill
    ring with one 16-byte entry per 4 KiB chunk and a header page."""
    return area_size + area_size // PAGE_SIZE * ZCRX_RQE_SIZE + PAGE_SIZE


# --- the checks ----------------------------------------------------------------------------


def _feature(
    name: str, present: bool, what: str, version: str, missing: str, status: str = "FAIL"
) -> Check:
    if present:
        return Check(name, "OK", f"{what} (Linux {version}+)")
    fix = f"run Linux >= {version}" if status != "INFO" else None
    return Check(name, status, f"no {what}: {missing} (needs Linux {version})", fix)


def kernel_checks(features: KernelFeatures, zcrx_config: str | None) -> list[Check]:
    checks = [Check("kernel.release", "INFO", f"{features.release} ({platform.machine()})")]
    if not features.io_uring:
        checks.append(
            Check(
                "kernel.io_uring",
                "FAIL",
                f"io_uring cannot be set up: {features.io_uring_error}",
                "see io_uring.ring below; socket mode works without io_uring",
            )
        )
    else:
        flags = ", ".join(features.setup_flags) or "none"
        checks.append(Check("kernel.io_uring", "OK", f"io_uring works; setup flags: {flags}"))
    if zcrx_config is None:
        checks.append(
            Check(
                "kernel.config",
                "INFO",
                "CONFIG_IO_URING_ZCRX unknown: no /proc/config.gz or "
                f"/boot/config-{features.release} to read",
            )
        )
    elif zcrx_config in ("y", "m"):
        checks.append(Check("kernel.config", "OK", "CONFIG_IO_URING_ZCRX=y"))
    else:
        checks.append(
            Check(
                "kernel.config",
                "FAIL",
                "CONFIG_IO_URING_ZCRX is not set: zerocopy and copy modes cannot register",
                "use a kernel built with CONFIG_IO_URING_ZCRX=y",
            )
        )
    checks += [
        _feature(
            "kernel.recv_zc",
            features.recv_zc,
            "IORING_OP_RECV_ZC",
            "6.15",
            "zerocopy and copy modes are unavailable",
        ),
        _feature(
            "kernel.zcrx_nodev",
            features.zcrx_nodev,
            "ZCRX_REG_NODEV",
            "7.1",
            "copy mode is unavailable",
        ),
        _feature(
            "kernel.zcrx_flush",
            features.zcrx_ctrl_flush,
            "ZCRX_CTRL_FLUSH_RQ",
            "6.19",
            "returned buffers wait until the NIC refills from the refill ring",
            status="WARN",
        ),
        _feature(
            "kernel.zcrx_rx_buf_len",
            features.zcrx_rx_buf_len,
            "zcrx rx_buf_len",
            "7.0",
            "zerocopy chunks stay at one page, one completion per 4 KiB",
            status="WARN",
        ),
        _feature(
            "kernel.zcrx_events",
            features.zcrx_events,
            "zcrx events and copy statistics",
            "7.2",
            "stats() cannot show how much the kernel copied instead of the NIC "
            "(zero copy is unverifiable)",
            status="WARN",
        ),
        _feature(
            "kernel.zcrx_export",
            features.zcrx_export,
            "zcrx queue export/import",
            "6.19",
            "one NIC queue cannot be shared by several rings",
            status="INFO",
        ),
        _feature(
            "kernel.zcrx_query",
            features.zcrx_query is not None,
            "IO_URING_QUERY_ZCRX",
            "6.19",
            "zcrx features are inferred from registration errors",
            status="INFO",
        ),
        _feature(
            "kernel.recvsend_bundle",
            features.recvsend_bundle,
            "IORING_RECVSEND_BUNDLE",
            "6.10",
            "bufring mode completes one buffer per completion",
            status="WARN",
        ),
    ]
    if features.io_uring and not features.eventfd_prompt:
        checks.append(
            Check(
                "kernel.eventfd_wakeup",
                "INFO",
                "the ring's eventfd is signalled late (an RCU callback after a socket "
                "wakes): iouzcrx also watches each receiving socket with the event loop",
            )
        )
    return checks


def io_uring_checks(
    *,
    disabled: int | None,
    group: int | None,
    groups: Sequence[int],
    seccomp: int | None,
    cap_sys_admin: bool | None,
    ring_error: BaseException | None,
    ring: Ring | None,
) -> list[Check]:
    checks: list[Check] = []
    sysctl = "kernel.io_uring_disabled"
    enable = f"sysctl -w {sysctl}=0"
    if disabled is None:
        checks.append(
            Check("io_uring.sysctl", "INFO", f"no {sysctl} (before Linux 6.6): not restricted")
        )
    elif disabled == 0:
        checks.append(Check("io_uring.sysctl", "OK", f"{sysctl}=0: every process may create rings"))
    elif disabled == 1:
        in_group = group is not None and group >= 0 and group in groups
        allowed = bool(cap_sys_admin) or in_group
        who = f"group {group}" if group is not None and group >= 0 else "no group (-1)"
        detail = (
            f"{sysctl}=1: only CAP_SYS_ADMIN and kernel.io_uring_group ({who}) may create "
            f"rings; this process {'may' if allowed else 'may not'}"
        )
        if allowed:
            checks.append(Check("io_uring.sysctl", "OK", detail))
        else:
            checks.append(
                Check(
                    "io_uring.sysctl",
                    "FAIL",
                    detail,
                    f"{enable}, or set kernel.io_uring_group to a group of this user",
                )
            )
    else:
        checks.append(
            Check(
                "io_uring.sysctl",
                "FAIL",
                f"{sysctl}={disabled}: io_uring is disabled for every process",
                f"{enable}; socket mode works meanwhile",
            )
        )

    if seccomp is None:
        checks.append(Check("io_uring.seccomp", "INFO", "seccomp mode unknown"))
    elif seccomp == 0:
        checks.append(Check("io_uring.seccomp", "OK", "no seccomp filter"))
    elif seccomp == 2 and ring is not None:
        checks.append(
            Check("io_uring.seccomp", "INFO", "a seccomp filter is active; it allows io_uring")
        )
    else:
        kind = "strict mode" if seccomp == 1 else "a seccomp filter"
        checks.append(
            Check(
                "io_uring.seccomp",
                "WARN",
                f"{kind} is active (container default profiles block io_uring)",
                "allow io_uring_setup, io_uring_enter and io_uring_register in the profile",
            )
        )

    if ring is not None:
        checks.append(
            Check("io_uring.ring", "OK", f"iouzcrx.Ring() created ({ring.sq_entries} SQ entries)")
        )
    else:
        checks.append(Check("io_uring.ring", "FAIL", f"iouzcrx.Ring() failed: {ring_error}"))
    return checks


def privilege_checks(
    *,
    cap_net_admin: bool | None,
    cap_ipc_lock: bool | None,
    initial_userns: bool | None,
    memlock: tuple[int, int],
) -> list[Check]:
    checks: list[Check] = []
    grant = (
        "run as root or grant CAP_NET_ADMIN (setcap cap_net_admin+ep on the interpreter, "
        "AmbientCapabilities=CAP_NET_ADMIN in systemd, --cap-add NET_ADMIN in containers)"
    )
    if cap_net_admin is None:
        checks.append(Check("privileges.cap_net_admin", "WARN", "capabilities unknown"))
    elif not cap_net_admin:
        checks.append(
            Check(
                "privileges.cap_net_admin",
                "FAIL",
                "CAP_NET_ADMIN missing: zerocopy and copy modes need it",
                grant,
            )
        )
    elif initial_userns is False:
        checks.append(
            Check(
                "privileges.cap_net_admin",
                "FAIL",
                "CAP_NET_ADMIN is held only in a user namespace; zcrx checks it in the "
                "initial one, so zerocopy and copy modes get EPERM",
                grant + ", outside the user namespace",
            )
        )
    else:
        checks.append(Check("privileges.cap_net_admin", "OK", "CAP_NET_ADMIN in the effective set"))

    soft, hard = memlock
    needed = zcrx_pinned_bytes(DEFAULT_AREA_SIZE)
    if cap_ipc_lock:
        checks.append(
            Check(
                "privileges.cap_ipc_lock",
                "OK",
                "CAP_IPC_LOCK in the effective set: areas are not charged to RLIMIT_MEMLOCK",
            )
        )
    else:
        checks.append(
            Check(
                "privileges.cap_ipc_lock",
                "INFO",
                "CAP_IPC_LOCK missing: each area + refill ring must fit under RLIMIT_MEMLOCK",
            )
        )
    limits = f"RLIMIT_MEMLOCK {_limit(soft)} (hard {_limit(hard)})"
    if cap_ipc_lock:
        checks.append(Check("privileges.memlock", "INFO", f"{limits}; not applied (CAP_IPC_LOCK)"))
    elif soft == resource.RLIM_INFINITY or soft >= needed:
        checks.append(
            Check(
                "privileges.memlock",
                "OK",
                f"{limits}: room for the default {_bytes(DEFAULT_AREA_SIZE)} area + refill ring",
            )
        )
    else:
        checks.append(
            Check(
                "privileges.memlock",
                "WARN",
                f"{limits}: the default {_bytes(DEFAULT_AREA_SIZE)} area + refill ring needs "
                f"{_bytes(needed)} without CAP_IPC_LOCK",
                "raise it (ulimit -l unlimited, LimitMEMLOCK=infinity in systemd, "
                "--ulimit memlock=-1 in containers), grant CAP_IPC_LOCK, or pass a smaller "
                "area_size",
            )
        )
    return checks


def _queue_count(facts: nic.NicFacts) -> int | None:
    if facts.rx_queues is not None:
        return facts.rx_queues
    if facts.channels is not None:
        return facts.channels.combined or facts.channels.rx
    return None


def _rss_fix(interface: str, queue: int, count: int | None) -> str:
    if count is None or count < 2:
        return f"ethtool -L {interface} combined 2, then ethtool -X {interface} equal 1"
    if queue == count - 1:
        return f"ethtool -X {interface} equal {count - 1}"
    weights = " ".join("0" if i == queue else "1" for i in range(count))
    return f"ethtool -X {interface} weight {weights}"


def nic_checks(facts: nic.NicFacts, queue: int) -> list[Check]:
    """The NIC part of the report for ``queue`` of ``facts.interface``."""
    name = facts.interface
    if not facts.exists:
        return [
            Check(
                "nic.interface",
                "FAIL",
                f"no interface {name!r} in this network namespace",
                "pick one listed by 'ip link'",
            )
        ]
    checks = [Check("nic.interface", "OK", f"{name} exists (ifindex {facts.ifindex})")]
    supported, why = nic.zcrx_support(facts)
    if supported is True:
        checks.append(Check("nic.driver", "OK", why))
    elif supported is False:
        checks.append(
            Check(
                "nic.driver",
                "FAIL",
                why,
                f"use a NIC whose driver supports zcrx ({ZCRX_DRIVER_LIST}), "
                "or copy mode (Linux >= 7.1)",
            )
        )
    else:
        checks.append(Check("nic.driver", "WARN", why))

    count = _queue_count(facts)
    channels = facts.channels
    channel_text = ""
    if channels is not None and channels.combined is not None:
        channel_text = f"; ethtool channels: combined {channels.combined}"
        if channels.combined_max is not None:
            channel_text += f" (max {channels.combined_max})"
    if count is None:
        checks.append(Check("nic.rx_queues", "WARN", f"RX queue count unknown{channel_text}"))
    elif queue >= count:
        checks.append(
            Check(
                "nic.rx_queues",
                "FAIL",
                f"{count} RX queue(s){channel_text}: queue {queue} does not exist",
                f"ethtool -L {name} combined {queue + 1}",
            )
        )
    elif count < 2 and supported is not False:
        checks.append(
            Check(
                "nic.rx_queues",
                "WARN",
                f"{count} RX queue{channel_text}: all traffic would share the zero-copy queue",
                f"ethtool -L {name} combined 2",
            )
        )
    else:
        plural = "s" if count != 1 else ""
        checks.append(
            Check(
                "nic.rx_queues",
                "OK",
                f"{count} RX queue{plural}{channel_text}; queue {queue} exists",
            )
        )

    if facts.ethtool is None:
        checks.append(
            Check(
                "nic.ethtool", "INFO", "install ethtool (apt-get install ethtool) for NIC details"
            )
        )
    if supported is False:
        checks.append(
            Check(
                "nic.setup",
                "INFO",
                f"header split, RSS, flow steering and XDP checks skipped: {name} can never "
                "host zero-copy",
            )
        )
        return checks
    if facts.ethtool is not None:
        checks += _ethtool_checks(facts, queue, count)
    checks.append(_xdp_check(facts))
    return checks


def _error(facts: nic.NicFacts, option: str) -> str:
    return facts.errors.get(f"ethtool {option} {facts.interface}", "no output")


def _ethtool_checks(facts: nic.NicFacts, queue: int, count: int | None) -> list[Check]:
    name = facts.interface
    split_fix = f"ethtool -G {name} tcp-data-split on hds-thresh 0"
    checks: list[Check] = []

    rings = facts.rings
    split = rings.tcp_data_split if rings is not None else None
    if rings is None:
        checks.append(Check("nic.tcp_data_split", "WARN", f"unknown ({_error(facts, '-g')})"))
    elif split is None:
        checks.append(
            Check("nic.tcp_data_split", "WARN", "unknown: ethtool -g shows no 'TCP data split'")
        )
    elif split == "on":
        checks.append(Check("nic.tcp_data_split", "OK", "tcp-data-split on"))
    elif split == "off":
        checks.append(
            Check("nic.tcp_data_split", "FAIL", "tcp-data-split off (header split)", split_fix)
        )
    else:
        checks.append(
            Check(
                "nic.tcp_data_split",
                "FAIL",
                f"tcp-data-split {split}: the driver cannot split headers from payload",
                f"use a NIC whose driver supports zcrx ({ZCRX_DRIVER_LIST})",
            )
        )

    thresh = rings.hds_thresh if rings is not None else None
    if thresh is None:
        checks.append(
            Check(
                "nic.hds_thresh",
                "WARN",
                "unknown: ethtool -g shows no 'HDS thresh' (older ethtool or kernel)",
                f"a newer ethtool shows it; set it with: {split_fix}",
            )
        )
    elif thresh == 0:
        checks.append(Check("nic.hds_thresh", "OK", "hds-thresh 0"))
    else:
        checks.append(Check("nic.hds_thresh", "FAIL", f"hds-thresh {thresh}: must be 0", split_fix))

    ntuple = facts.ntuple
    if ntuple is None:
        checks.append(Check("nic.ntuple", "WARN", f"unknown ({_error(facts, '-k')})"))
    elif ntuple.enabled:
        checks.append(Check("nic.ntuple", "OK", "ntuple-filters on"))
    elif ntuple.fixed:
        checks.append(
            Check(
                "nic.ntuple",
                "FAIL",
                "ntuple-filters off [fixed]: the driver cannot steer flows to a queue",
                f"use a NIC whose driver supports zcrx ({ZCRX_DRIVER_LIST})",
            )
        )
    else:
        checks.append(
            Check("nic.ntuple", "FAIL", "ntuple-filters off", f"ethtool -K {name} ntuple on")
        )

    if facts.driver == "mlx5_core":
        gro = facts.rx_gro_hw
        if gro is not None and gro.enabled:
            checks.append(Check("nic.rx_gro_hw", "OK", "rx-gro-hw on (mlx5 needs it)"))
        else:
            state = "unknown" if gro is None else "off"
            checks.append(
                Check(
                    "nic.rx_gro_hw",
                    "FAIL",
                    f"rx-gro-hw {state}: mlx5 header split needs hardware GRO",
                    f"ethtool -K {name} rx-gro-hw on",
                )
            )

    rss = facts.rss
    if rss is None or rss.table is None:
        reason = _error(facts, "-x") if rss is None else "the driver does not show the table"
        checks.append(Check("nic.rss", "WARN", f"RSS indirection table unknown ({reason})"))
    elif queue in rss.table:
        checks.append(
            Check(
                "nic.rss",
                "FAIL",
                f"queue {queue} is in the default RSS table: other flows land on it",
                _rss_fix(name, queue, count),
            )
        )
    else:
        used = sorted(set(rss.table))
        checks.append(
            Check(
                "nic.rss",
                "OK",
                f"queue {queue} is outside the default RSS table (queues {used})",
            )
        )

    steer_fix = f"ethtool -N {name} flow-type tcp6 dst-port PORT action {queue}"
    rules = facts.ntuple_rules
    if rules is None:
        checks.append(
            Check(
                "nic.steering",
                "WARN",
                f"ntuple rules unknown ({_error(facts, '-n')})",
                steer_fix,
            )
        )
    else:
        mine = [rule for rule in rules.rules if rule.queue == queue]
        if mine:
            listed = "; ".join(rule.describe() for rule in mine)
            checks.append(Check("nic.steering", "OK", f"steered to queue {queue}: {listed}"))
        else:
            checks.append(
                Check(
                    "nic.steering",
                    "FAIL",
                    f"no ntuple rule steers a flow to queue {queue} "
                    f"({len(rules.rules)} rule(s) in total)",
                    steer_fix,
                )
            )
    return checks


def _xdp_check(facts: nic.NicFacts) -> Check:
    name = facts.interface
    if facts.ip is None:
        return Check("nic.xdp", "INFO", "install iproute2 (apt-get install iproute2) to check XDP")
    if facts.xdp is None:
        error = facts.errors.get(f"ip -d link show dev {name}", "unreadable output")
        return Check("nic.xdp", "WARN", f"XDP state unknown ({error})")
    if facts.xdp:
        return Check(
            "nic.xdp",
            "FAIL",
            "an XDP program is attached: registration fails with EEXIST",
            f"ip link set dev {name} xdp off",
        )
    return Check("nic.xdp", "OK", "no XDP program attached")


def mode_checks(
    selection: ModeSelection | None,
    error: BaseException | None,
    interface: str | None,
    queue: int | None,
) -> list[Check]:
    where = f" for {interface} queue {queue}" if interface is not None else ""
    if selection is None:
        return [Check("mode.selected", "FAIL", f"mode selection failed{where}: {error}")]
    checks = [
        Check(
            "mode.selected",
            "OK",
            f"mode='auto' picks {selection.mode}{where} (probed with a "
            f"{_bytes(PROBE_AREA_SIZE)} area)",
        )
    ]
    for mode, reason in selection.refused.items():
        checks.append(Check(f"mode.refused.{mode}", "WARN", f"{mode} refused: {reason}"))
    return checks


# --- the report ----------------------------------------------------------------------------


def gather(interface: str | None = None, queue: int | None = None) -> Report:
    """Run every check; with ``interface`` and ``queue`` the NIC ones too."""
    features = kernel_features()
    zcrx_config = kernel_config_option(features.release, "CONFIG_IO_URING_ZCRX")
    status = parse_proc_status(_read("/proc/self/status") or "")
    try:
        cap_eff: int | None = int(status["CapEff"], 16)
    except (KeyError, ValueError):
        cap_eff = None
    seccomp_text = status.get("Seccomp")
    seccomp = int(seccomp_text) if seccomp_text and seccomp_text.isdigit() else None
    disabled = _read_int("/proc/sys/kernel/io_uring_disabled")
    group = _read_int("/proc/sys/kernel/io_uring_group")
    cap_net_admin = has_capability(cap_eff, CAP_NET_ADMIN)
    cap_ipc_lock = has_capability(cap_eff, CAP_IPC_LOCK)
    initial_userns = initial_user_namespace(_read("/proc/self/uid_map"))
    memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)

    facts_nic = nic.gather(interface) if interface is not None else None

    ring: Ring | None = None
    ring_error: BaseException | None = None
    selection: ModeSelection | None = None
    selection_error: BaseException | None = None
    try:
        try:
            ring = Ring()
        except OSError as exc:
            ring_error = exc
        if ring is not None and not features.io_uring:
            # Set up but unusable: the probe's io_uring_enter was refused.
            ring.close()
            ring, ring_error = None, features.io_uring_error
        ring_checks = io_uring_checks(
            disabled=disabled,
            group=group,
            groups=[os.getegid(), *os.getgroups()],
            seccomp=seccomp,
            cap_sys_admin=has_capability(cap_eff, CAP_SYS_ADMIN),
            ring_error=ring_error,
            ring=ring,
        )
        try:
            selection = select_mode(
                ring,
                mode="auto",
                interface=interface,
                queue=queue,
                area_size=PROBE_AREA_SIZE,
                ring_error=ring_error,
            )
        except Exception as exc:  # the report must still come out
            selection_error = exc
    finally:
        # The backend is a client of the ring: closing the ring releases it.
        if ring is not None:
            ring.close()

    checks = kernel_checks(features, zcrx_config)
    checks += ring_checks
    checks += privilege_checks(
        cap_net_admin=cap_net_admin,
        cap_ipc_lock=cap_ipc_lock,
        initial_userns=initial_userns,
        memlock=memlock,
    )
    if facts_nic is not None and queue is not None:
        checks += nic_checks(facts_nic, queue)
    checks += mode_checks(selection, selection_error, interface, queue)

    facts: dict[str, Any] = {
        "kernel": {**features.as_dict(), "config_io_uring_zcrx": zcrx_config},
        "io_uring": {
            "disabled": disabled,
            "group": group,
            "seccomp": seccomp,
            "ring": ring_error is None,
            "ring_error": str(ring_error) if ring_error is not None else None,
        },
        "privileges": {
            "cap_eff": f"{cap_eff:016x}" if cap_eff is not None else None,
            "cap_net_admin": cap_net_admin,
            "cap_ipc_lock": cap_ipc_lock,
            "initial_user_namespace": initial_userns,
            "memlock_soft": None if memlock[0] == resource.RLIM_INFINITY else memlock[0],
            "memlock_hard": None if memlock[1] == resource.RLIM_INFINITY else memlock[1],
        },
        "nic": dataclasses.asdict(facts_nic) if facts_nic is not None else None,
        "mode": {
            "interface": interface,
            "queue": queue,
            "selected": selection.mode if selection is not None else None,
            "refused": dict(selection.refused) if selection is not None else None,
            "error": str(selection_error) if selection_error is not None else None,
        },
    }
    return Report(checks, facts)


_SECTIONS = {
    "kernel": "Kernel",
    "io_uring": "io_uring",
    "privileges": "Privileges",
    "nic": "NIC",
    "mode": "Receive mode",
}


def render_text(report: Report) -> str:
    width = max(len(check.name) for check in report.checks)
    lines = [f"iouzcrx doctor: Linux {os.uname().release}, Python {platform.python_version()}"]
    section = None
    for check in report.checks:
        prefix = check.name.split(".", 1)[0]
        if prefix != section:
            section = prefix
            title = _SECTIONS.get(prefix, prefix)
            if prefix == "nic" and report.facts.get("nic"):
                title += f" {report.facts['nic']['interface']}"
            lines += ["", title]
        line = f"  {check.status:<4}  {check.name:<{width}}  {check.detail}"
        if check.fix:
            line += f" -- fix: {check.fix}"
        lines.append(line)
    counts = {status: sum(c.status == status for c in report.checks) for status in STATUSES}
    mode = report.facts["mode"]["selected"] or "none"
    summary = ", ".join(f"{n} {status}" for status, n in counts.items())
    lines += ["", f"Summary: mode='auto' picks {mode}; {summary}"]
    return "\n".join(lines)


def render_json(report: Report) -> str:
    return json.dumps(
        {
            "checks": [dataclasses.asdict(check) for check in report.checks],
            "facts": report.facts,
        },
        indent=2,
    )


def _interface_name(text: str) -> str:
    # The kernel's own rule (dev_valid_name); it also keeps the name from
    # leaving /sys/class/net/ when joined to the path.
    if (
        not text
        or len(text.encode()) >= 16
        or text in (".", "..")
        or any(c in text for c in "/:")
        or any(c.isspace() for c in text)
    ):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid interface name")
    return text


def _queue_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a queue index (0, 1, ...)")
    return value


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m iouzcrx doctor",
        description="Report which receive modes this machine can run and what to fix. "
        "With --interface and --queue the mode check registers that RX queue for a "
        "moment, as a server would, which restarts the queue on a NIC that supports it.",
    )
    parser.add_argument(
        "--interface",
        type=_interface_name,
        metavar="IF",
        help="network interface to check for zerocopy mode (needs --queue)",
    )
    parser.add_argument(
        "--queue",
        type=_queue_index,
        metavar="N",
        help="RX queue of IF that would host the zero-copy queue",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    try:
        args = parser.parse_args(list(argv))
        if (args.interface is None) != (args.queue is None):
            parser.error("--interface and --queue go together")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    report = gather(args.interface, args.queue)
    print(render_json(report) if args.json else render_text(report))
    return 0
