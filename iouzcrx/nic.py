"""What one network interface offers zero-copy receive, read from sysfs and
from the ``ethtool`` and ``ip`` tools.

Everything here only reads; :func:`gather` never changes the NIC. Every fact
is ``None`` when it could not be learnt (tool missing, driver without the
ethtool operation, interface gone). The ``parse_*`` functions take a tool's
text output so that they can be checked against captured samples.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "NicFacts",
    "NtupleRule",
    "RingParams",
    "Channels",
    "Feature",
    "RssTable",
    "NtupleRules",
    "ZCRX_DRIVERS",
    "gather",
    "find_tool",
    "zcrx_support",
    "parse_driver_info",
    "parse_rings",
    "parse_channels",
    "parse_features",
    "parse_rss",
    "parse_ntuple_rules",
    "parse_xdp",
]

# Drivers that implement the queue-management ops and unreadable netmem that
# zcrx needs (kernel-abi §8.13, Linux 7.3), with what the user should know.
ZCRX_DRIVERS: dict[str, str] = {
    "mlx5_core": "NVIDIA ConnectX; also needs hardware GRO (rx-gro-hw on)",
    "bnxt_en": "Broadcom NetXtreme-C/E, on chips with the queue API",
    "gve": "Google gVNIC, in the DQO queue format",
    "fbnic": "Meta fbnic",
}
TEST_ONLY_DRIVERS = frozenset({"netdevsim"})
# Probed: registration on these fails with EOPNOTSUPP.
VIRTUAL_DRIVERS = frozenset({"virtio_net", "veth", "loopback", "ifb"})

TOOL_TIMEOUT = 5.0
# Where distributions put ethtool and ip; an unprivileged user's PATH often
# lacks the sbin directories.
_SBIN_DIRS = ("/usr/sbin", "/sbin")
_IFF_LOOPBACK = 0x8


@dataclass
class RingParams:
    """``ethtool -g``: ring sizes and header/data split."""

    rx: int | None = None
    rx_max: int | None = None
    tcp_data_split: str | None = None  # "on", "off", "n/a" (driver cannot)
    hds_thresh: int | None = None
    hds_thresh_max: int | None = None


@dataclass
class Channels:
    """``ethtool -l``: current and maximum channel counts."""

    rx: int | None = None
    rx_max: int | None = None
    combined: int | None = None
    combined_max: int | None = None


@dataclass
class Feature:
    """One ``ethtool -k`` line."""

    enabled: bool
    fixed: bool


@dataclass
class RssTable:
    """``ethtool -x``: the default RSS context's indirection table."""

    rings: int | None
    table: list[int] | None  # queue of each entry; None when the driver hides it


@dataclass
class NtupleRule:
    """One ``ethtool -n`` classification rule."""

    location: int
    flow_type: str | None = None
    dst_port: int | None = None
    queue: int | None = None  # None for drop, wake-on-LAN or an RSS context
    context: int | None = None

    def describe(self) -> str:
        parts = [f"rule {self.location}"]
        if self.flow_type:
            parts.append(self.flow_type)
        if self.dst_port is not None:
            parts.append(f"dst-port {self.dst_port}")
        if self.context is not None:
            parts.append(f"context {self.context}")
        if self.queue is not None:
            parts.append(f"-> queue {self.queue}")
        return " ".join(parts)


@dataclass
class NtupleRules:
    """``ethtool -n``: the RX ring count it states and the rules."""

    rings: int | None
    rules: list[NtupleRule]


@dataclass
class NicFacts:
    """Everything known about one interface; ``None`` means unknown."""

    interface: str
    exists: bool
    ifindex: int | None = None
    driver: str | None = None
    has_device: bool | None = None  # a parent device: the only source of a DMA device
    loopback: bool | None = None
    rx_queues: int | None = None  # sysfs: the kernel's real_num_rx_queues
    channels: Channels | None = None
    rings: RingParams | None = None
    ntuple: Feature | None = None
    rx_gro_hw: Feature | None = None
    rss: RssTable | None = None
    ntuple_rules: NtupleRules | None = None
    xdp: bool | None = None
    ethtool: str | None = None  # path of the tool used, None when missing
    ip: str | None = None
    errors: dict[str, str] = field(default_factory=dict)  # command -> why it gave nothing


# --- parsing -------------------------------------------------------------------------------


def _int_or_none(text: str) -> int | None:
    try:
        return int(text.strip(), 0)
    except ValueError:
        return None


def _sections(text: str) -> dict[str, dict[str, str]]:
    """``{section: {key: value}}`` of ethtool's "Pre-set maximums:" /
    "Current hardware settings:" layout; keys before any section go under ""."""
    sections: dict[str, dict[str, str]] = {"": {}}
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        key, sep, value = stripped.partition(":")
        if not sep:
            continue
        if not value.strip():
            # A heading such as "Current hardware settings:"; the title line
            # "Ring parameters for eth0:" lands here too and stays empty.
            current = key.strip().lower()
            sections.setdefault(current, {})
            continue
        sections[current][key.strip().lower()] = value.strip()
    return sections


def parse_driver_info(text: str) -> dict[str, str]:
    """``ethtool -i``: ``{"driver": ..., "bus-info": ..., ...}``."""
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            info[key.strip()] = value.strip()
    return info


def parse_rings(text: str) -> RingParams:
    """``ethtool -g``. "TCP data split" and "HDS thresh" appear only when the
    ethtool and the kernel are recent enough; absent lines stay ``None``."""
    sections = _sections(text)
    maximums = sections.get("pre-set maximums", {})
    current = sections.get("current hardware settings", {})
    split = current.get("tcp data split")
    return RingParams(
        rx=_int_or_none(current.get("rx", "")),
        rx_max=_int_or_none(maximums.get("rx", "")),
        tcp_data_split=split.lower() if split else None,
        hds_thresh=_int_or_none(current.get("hds thresh", "")),
        hds_thresh_max=_int_or_none(maximums.get("hds thresh", "")),
    )


def parse_channels(text: str) -> Channels:
    """``ethtool -l``; "n/a" counts are ``None``."""
    sections = _sections(text)
    maximums = sections.get("pre-set maximums", {})
    current = sections.get("current hardware settings", {})
    return Channels(
        rx=_int_or_none(current.get("rx", "")),
        rx_max=_int_or_none(maximums.get("rx", "")),
        combined=_int_or_none(current.get("combined", "")),
        combined_max=_int_or_none(maximums.get("combined", "")),
    )


_FEATURE_LINE = re.compile(r"^\s*([\w-]+):\s+(on|off)\b(.*)$")


def parse_features(text: str) -> dict[str, Feature]:
    """``ethtool -k``: every "name: on|off [fixed]" line."""
    features: dict[str, Feature] = {}
    for line in text.splitlines():
        match = _FEATURE_LINE.match(line)
        if match:
            name, state, rest = match.groups()
            features[name] = Feature(enabled=state == "on", fixed="[fixed]" in rest)
    return features


_RSS_HEADER = re.compile(r"indirection table for \S+ with (\d+) RX ring")
_RSS_ROW = re.compile(r"^\s*\d+:((?:\s+\d+)+)\s*$")


def parse_rss(text: str) -> RssTable:
    """``ethtool -x``: the ring count and the queue of every table entry."""
    rings: int | None = None
    table: list[int] = []
    in_table = False
    for line in text.splitlines():
        header = _RSS_HEADER.search(line)
        if header:
            rings = int(header.group(1))
            in_table = True
            continue
        row = _RSS_ROW.match(line)
        if in_table and row:
            table.extend(int(queue) for queue in row.group(1).split())
        elif line.strip() and not line[0].isspace():
            # The next heading ("RSS hash key:") ends the table, so that the
            # key's hex bytes are never read as rows.
            in_table = False
    return RssTable(rings=rings, table=table or None)


_RULES_RINGS = re.compile(r"^\s*(\d+) RX rings available", re.MULTILINE)
_ACTION_QUEUE = re.compile(r"Direct to queue (\d+)")


def parse_ntuple_rules(text: str) -> NtupleRules:
    """``ethtool -n``: the rules, each with its flow type, destination port
    and target queue where the output states them."""
    rings_match = _RULES_RINGS.search(text)
    rules: list[NtupleRule] = []
    rule: NtupleRule | None = None
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "Filter":
            location = _int_or_none(value)
            rule = NtupleRule(location=location if location is not None else -1)
            rules.append(rule)
        elif rule is None:
            continue
        elif key == "Rule Type":
            rule.flow_type = value
        elif key == "Dest port":
            rule.dst_port = _int_or_none(value.split()[0]) if value else None
        elif key == "RSS Context ID":
            rule.context = _int_or_none(value)
        elif key == "Action":
            queue = _ACTION_QUEUE.search(value)
            rule.queue = int(queue.group(1)) if queue else None
    return NtupleRules(
        rings=int(rings_match.group(1)) if rings_match else None,
        rules=rules,
    )


_XDP_WORDS = frozenset({"xdp", "xdpgeneric", "xdpdrv", "xdpoffload", "xdpmulti"})


def parse_xdp(text: str) -> bool | None:
    """``ip -d link show IF``: whether an XDP program is attached, or ``None``
    when the text is not a link listing at all."""
    if "mtu" not in text:
        return None
    for token in text.split():
        if token.startswith("prog/xdp") or token.split("/", 1)[0] in _XDP_WORDS:
            return True
    return False


# --- gathering -----------------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """The path of ``name`` on PATH or in the usual sbin directories."""
    found = shutil.which(name)
    if found:
        return found
    return shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))


def _run(argv: list[str], errors: dict[str, str]) -> str | None:
    """The command's stdout, or None after recording why it gave nothing."""
    label = " ".join([os.path.basename(argv[0]), *argv[1:]])
    # Tools print English only in the C locale, and the parsers read English.
    env = dict(os.environ, LC_ALL="C")
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        errors[label] = f"timed out after {TOOL_TIMEOUT:g} s"
        return None
    except OSError as exc:
        errors[label] = str(exc)
        return None
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip()).splitlines()
        errors[label] = "; ".join(line.strip() for line in lines) or (
            f"exit status {done.returncode}"
        )
        return None
    return done.stdout


def _read_sysfs(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _sysfs_driver(interface: str) -> str | None:
    try:
        target = os.readlink(f"/sys/class/net/{interface}/device/driver")
    except OSError:
        return None
    return os.path.basename(target)


def _sysfs_rx_queues(interface: str) -> int | None:
    try:
        names = os.listdir(f"/sys/class/net/{interface}/queues")
    except OSError:
        return None
    return sum(1 for name in names if name.startswith("rx-"))


def gather(interface: str, *, find: Callable[[str], str | None] = find_tool) -> NicFacts:
    """Read every fact about ``interface``; ``find`` locates the tools (a
    tool it does not find is skipped, and the facts only it gives stay None)."""
    try:
        ifindex: int | None = socket.if_nametoindex(interface)
    except OSError:
        ifindex = None
    facts = NicFacts(interface=interface, exists=ifindex is not None, ifindex=ifindex)
    if ifindex is None:
        return facts

    sysfs = f"/sys/class/net/{interface}"
    if os.path.isdir(sysfs):
        facts.has_device = os.path.exists(f"{sysfs}/device")
    flags = _int_or_none(_read_sysfs(f"{sysfs}/flags") or "")
    if flags is not None:
        facts.loopback = bool(flags & _IFF_LOOPBACK)
    facts.rx_queues = _sysfs_rx_queues(interface)
    facts.driver = _sysfs_driver(interface)

    facts.ethtool = find("ethtool")
    facts.ip = find("ip")
    if facts.ethtool:
        _gather_ethtool(facts, facts.ethtool)
    if facts.driver is None and facts.loopback:
        # lo has neither a device link nor ethtool driver info; "loopback"
        # is the kernel's own name for its driver.
        facts.driver = "loopback"
    if facts.ip:
        text = _run([facts.ip, "-d", "link", "show", "dev", interface], facts.errors)
        facts.xdp = parse_xdp(text) if text is not None else None
    return facts


def _gather_ethtool(facts: NicFacts, ethtool: str) -> None:
    interface = facts.interface
    errors = facts.errors
    if facts.driver is None:
        text = _run([ethtool, "-i", interface], errors)
        if text is not None:
            facts.driver = parse_driver_info(text).get("driver") or None
    text = _run([ethtool, "-l", interface], errors)
    if text is not None:
        facts.channels = parse_channels(text)
    text = _run([ethtool, "-g", interface], errors)
    if text is not None:
        facts.rings = parse_rings(text)
    text = _run([ethtool, "-k", interface], errors)
    if text is not None:
        features = parse_features(text)
        facts.ntuple = features.get("ntuple-filters")
        facts.rx_gro_hw = features.get("rx-gro-hw")
    text = _run([ethtool, "-x", interface], errors)
    if text is not None:
        facts.rss = parse_rss(text)
    text = _run([ethtool, "-n", interface], errors)
    if text is not None:
        facts.ntuple_rules = parse_ntuple_rules(text)


def zcrx_support(facts: NicFacts) -> tuple[bool | None, str]:
    """Whether the interface's driver can host a zcrx queue: True, False, or
    None when unknown, with the reason."""
    driver = facts.driver
    name = f"{facts.interface} (driver {driver or 'unknown'})"
    if driver in ZCRX_DRIVERS:
        return True, f"{name} supports zero-copy receive: {ZCRX_DRIVERS[driver]}"
    if driver in TEST_ONLY_DRIVERS:
        return True, f"{name} supports zero-copy receive, but only as a kernel test device"
    if driver in VIRTUAL_DRIVERS:
        return False, f"{name} cannot host zero-copy: no queue API / DMA device"
    if driver == "netkit":
        return None, f"{name} can host zero-copy only on an RX queue leased from a physical NIC"
    if facts.has_device is False:
        return False, f"{name} cannot host zero-copy: a virtual device has no DMA device"
    known = ", ".join(ZCRX_DRIVERS)
    return None, f"{name} is not known to support zero-copy receive (known: {known})"
