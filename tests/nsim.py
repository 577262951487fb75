"""The simulated NIC of the VM tests, set up once for a test session or a
benchmark: netdevsim, the kernel's software NIC, rebuilt by
tests/vm/netdevsim/build so that io_uring zcrx binds to its RX queues.

What it is: two linked ports of one netdevsim device, the second in the
network namespace ``PEER_NS``; what a port sends on TX queue q arrives on
its peer's RX queue q, so the peer's XPS setting (``steer``) or, without
one, each flow's hash chooses the RX queue. With header split on, the
receiving port writes each TCP payload into buffers of the RX queue's page
pool (io_uring's area when the queue is bound) and drops the packet when the
pool is empty; its debugfs ``hds_stats`` counts, per queue, the payload bytes
placed in memory-provider buffers (zero copy) or in ordinary pages (which a
zcrx receive can only copy), and the drops.

As a command (root, in the VM: ``tests/vm/run`` sets ``IOUZCRX_VM=1``)::

    python3 tests/nsim.py up [--ko PATH]   # prints the NIC as one JSON object
    python3 tests/nsim.py down

``up`` loads the module (``--ko``, default ``$IOUZCRX_NETDEVSIM_KO``) unless
it is loaded, replaces any earlier device of this setup and prints
``interface``, ``ifindex``, ``peer``, ``peer_netns``, ``addresses`` (``local``,
``peer``, ``local6``, ``peer6``), ``queues``, ``mtu`` and ``hds_stats``;
flows are spread by hash (no XPS steering), each kept on its queue (the
peer does not rehash a flow onto another TX queue when it retransmits). A
client reaches ``local`` from the peer namespace (``ip netns exec
PEER_NETNS ...``). ``down`` removes the device and the namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

try:
    import nlclient
except ModuleNotFoundError:
    # Run as a script: the checkout (iouzcrx) is beside this directory.
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import nlclient

KO_ENV = "IOUZCRX_NETDEVSIM_KO"
DEVICE_ID = 7  # netdevsim device numbers are global; an unusual one avoids clashes
NUM_QUEUES = 4
PEER_NS = "iouzcrx-nsim-peer"
LOCAL_ADDR = "192.0.2.1"  # TEST-NET-1: never routed anywhere real
PEER_ADDR = "192.0.2.2"
LOCAL_ADDR6 = "2001:db8:7::1"  # the documentation prefix
PEER_ADDR6 = "2001:db8:7::2"
CLONE_NEWNET = 0x40000000
MTU = 9000
SETUP_TIMEOUT = 30.0
DEVICE = f"/sys/bus/netdevsim/devices/netdevsim{DEVICE_ID}"


class NsimUnavailable(RuntimeError):
    """The simulated NIC cannot be set up here; the message says why."""


@dataclass
class Nsim:
    """The simulated NIC: ``interface`` (this namespace) linked to ``peer``
    (in the ``PEER_NS`` namespace)."""

    interface: str
    ifindex: int
    peer: str
    queues: int
    hds_stats: str
    """debugfs file of ``interface``'s header-split counters."""

    def describe(self) -> dict[str, Any]:
        """What ``up`` prints: enough for a client to reach the NIC."""
        out = asdict(self)
        out["peer_netns"] = PEER_NS
        out["addresses"] = {
            "local": LOCAL_ADDR,
            "peer": PEER_ADDR,
            "local6": LOCAL_ADDR6,
            "peer6": PEER_ADDR6,
        }
        out["mtu"] = MTU
        return out


def _run(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SETUP_TIMEOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def load_module(ko: str) -> None:
    if os.path.isdir("/sys/module/netdevsim"):
        # Loaded by an earlier run in this boot (a chroot cannot see the file).
        return
    if not os.path.isfile(ko):
        raise NsimUnavailable(f"{KO_ENV}={ko} does not exist (run tests/vm/netdevsim/build)")
    if not (shutil.which("modinfo") and shutil.which("modprobe") and shutil.which("insmod")):
        # A chroot (tests/chroot/run --exec) has neither kmod nor the booted
        # kernel's modules: the suite's first run, on the guest's own root,
        # loads the module for the runs that follow.
        raise NsimUnavailable(f"netdevsim is not loaded and kmod's tools are missing to load {ko}")
    # Its dependencies come from the booted kernel's own modules.
    for dep in _run("modinfo", "-F", "depends", ko).strip().split(","):
        if dep:
            _run("modprobe", dep)
    _run("insmod", ko)


def wait_for(what: str, predicate: Any) -> None:
    deadline = time.monotonic() + SETUP_TIMEOUT
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _ports(device: str) -> list[str]:
    """The device's ports by port index (udev may rename them as they come)."""
    netdir = f"{device}/net"
    names = sorted(os.listdir(netdir)) if os.path.isdir(netdir) else []
    ports = []
    for name in names:
        try:
            with open(f"{netdir}/{name}/phys_port_name", encoding="ascii") as f:
                ports.append((f.read().strip(), name))
        except OSError:
            return []
    return [name for _, name in sorted(ports)]


def _settled_ports(device: str) -> list[str]:
    """The ports' names once udev has renamed them (a rename under the
    setup's feet would make it act on a name that no longer exists)."""
    if shutil.which("udevadm"):
        subprocess.run(["udevadm", "settle", "-t", "10"], timeout=SETUP_TIMEOUT, check=False)
        return _ports(device)
    # Without udevadm (in a chroot) the guest's udev still renames: wait a
    # little for names the kernel enumerated (NET_NAME_ENUM) to change, and
    # keep them if udev's policy leaves them as they are.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        ports = _ports(device)
        types = []
        for name in ports:
            try:
                with open(f"/sys/class/net/{name}/name_assign_type", encoding="ascii") as f:
                    types.append(f.read().strip())
            except OSError:
                types.append("?")
        if len(ports) == 2 and "1" not in types and "?" not in types:
            return ports
        time.sleep(0.1)
    return _ports(device)


def enter_peer_ns() -> None:
    """Move the calling thread into the peer namespace (setns is per-thread
    for network namespaces): sockets it makes from then on are the peer's."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{PEER_NS}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_peer_ns(fn: Any, timeout: float = SETUP_TIMEOUT) -> Any:
    """Run ``fn()`` on a thread that joined the peer namespace; return its
    result. Sockets it makes stay in that namespace."""
    result: dict[str, Any] = {}

    def body() -> None:
        try:
            enter_peer_ns()
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{fn!r} in the peer namespace took longer than {timeout} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def down() -> None:
    """Remove the device and the peer namespace, if there."""
    if os.path.exists(DEVICE):
        with open("/sys/bus/netdevsim/del_device", "w", encoding="ascii") as f:
            f.write(f"{DEVICE_ID}")
    if os.path.exists(f"/run/netns/{PEER_NS}"):
        subprocess.run(["ip", "netns", "del", PEER_NS], timeout=SETUP_TIMEOUT, check=False)


def up(ko: str) -> Nsim:
    """Load the module (from ``ko``) if needed and set the NIC up afresh,
    flows spread by hash. On failure nothing of it is left."""
    load_module(ko)
    down()
    try:
        with open("/sys/bus/netdevsim/new_device", "w", encoding="ascii") as f:
            f.write(f"{DEVICE_ID} 2 {NUM_QUEUES}")
        wait_for("two netdevsim ports", lambda: len(_ports(DEVICE)) == 2)
        local, peer = _settled_ports(DEVICE)
        _run("ip", "netns", "add", PEER_NS)
        _run("ip", "link", "set", peer, "netns", PEER_NS)
        local_index = socket.if_nametoindex(local)
        peer_index = in_peer_ns(lambda: socket.if_nametoindex(peer))
        # link_device takes "netns-fd:ifindex" for both ends, fds of the writer.
        own_ns = os.open("/proc/self/ns/net", os.O_RDONLY)
        peer_ns = os.open(f"/run/netns/{PEER_NS}", os.O_RDONLY)
        try:
            with open("/sys/bus/netdevsim/link_device", "w", encoding="ascii") as f:
                f.write(f"{own_ns}:{local_index} {peer_ns}:{peer_index}")
        finally:
            os.close(own_ns)
            os.close(peer_ns)
        _run("ip", "addr", "add", f"{LOCAL_ADDR}/24", "dev", local)
        _run("ip", "addr", "add", f"{LOCAL_ADDR6}/64", "dev", local, "nodad")
        # Jumbo frames, as zero-copy deployments use: a full segment's
        # payload spans several 4 KiB buffers, whatever the sender batches.
        _run("ip", "link", "set", local, "mtu", str(MTU), "up")
        _run("ip", "-n", PEER_NS, "addr", "add", f"{PEER_ADDR}/24", "dev", peer)
        _run("ip", "-n", PEER_NS, "addr", "add", f"{PEER_ADDR6}/64", "dev", peer, "nodad")
        _run("ip", "-n", PEER_NS, "link", "set", peer, "mtu", str(MTU), "up")
        _run("ip", "-n", PEER_NS, "link", "set", "lo", "up")
        # The NIC delivers on the RX queue the peer sent on, and TCP picks a
        # new TX queue for a flow when it retransmits: off, so that a flow
        # stays on one queue, as RSS (a hash of addresses and ports) keeps it.
        _run("ip", "netns", "exec", PEER_NS, "sh", "-c", "echo 0 > /proc/sys/net/core/txrehash")
        # What zcrx requires of the receiving NIC: header split, threshold 0.
        nlclient.rings_set(local, tcp_data_split=True, hds_thresh=0)
        nic = Nsim(
            interface=local,
            ifindex=local_index,
            peer=peer,
            queues=NUM_QUEUES,
            hds_stats=_hds_stats_path(DEVICE, local),
        )
        steer(nic, None)
    except BaseException:
        down()
        raise
    return nic


def _hds_stats_path(device: str, port: str) -> str:
    """The port's debugfs directory is named by its port index; its
    phys_port_name ("p1") carries the index plus one."""
    if not os.path.isdir("/sys/kernel/debug/netdevsim"):
        if not os.path.ismount("/sys/kernel/debug"):
            _run("mount", "-t", "debugfs", "debugfs", "/sys/kernel/debug")
    with open(f"{device}/net/{port}/phys_port_name", encoding="ascii") as f:
        index = int(f.read().strip().lstrip("p")) - 1
    path = f"/sys/kernel/debug/netdevsim/netdevsim{DEVICE_ID}/ports/{index}/hds_stats"
    if not os.path.exists(path):
        raise NsimUnavailable(
            f"{path} is missing: the module lacks the header-split edits of edit.py"
        )
    return path


def hds_stats(nsim: Nsim) -> dict[int, dict[str, int]]:
    """Per RX queue: what the simulated NIC's header split did so far."""
    out: dict[int, dict[str, int]] = {}
    with open(nsim.hds_stats, encoding="ascii") as f:
        for line in f:
            words = line.split()
            values = {k: int(v) for k, v in zip(words[2::2], words[3::2], strict=True)}
            out[int(words[1])] = values
    return out


def hds_delta(
    before: dict[int, dict[str, int]], after: dict[int, dict[str, int]]
) -> dict[int, dict[str, int]]:
    return {q: {k: after[q][k] - before[q][k] for k in after[q]} for q in after}


def steer(nsim: Nsim, queue: int | None) -> None:
    """Make the peer send every new flow on TX queue ``queue`` (arriving on
    our RX queue ``queue``) through XPS, or by flow hash with ``None``."""
    cpus = os.cpu_count() or 1
    # The kernel reads a CPU mask as comma-separated 32-bit hex words.
    words = [(((1 << cpus) - 1) >> shift) & 0xFFFFFFFF for shift in range(0, cpus, 32)]
    mask = ",".join(format(word, "x") for word in reversed(words))
    script = []
    for q in range(nsim.queues):
        value = mask if q == queue else "0"
        script.append(f"echo {value} > /sys/class/net/{nsim.peer}/queues/tx-{q}/xps_cpus")
    _run("ip", "netns", "exec", PEER_NS, "sh", "-c", " && ".join(script))


def bound(nsim: Nsim, queue: int) -> bool:
    return bool(nlclient.queue_get(nsim.ifindex, queue)["io_uring"])


def wait_unbound(nsim: Nsim, queue: int) -> None:
    """The kernel detaches an ifq from its queue when the ring is freed, which
    it finishes in a worker after close() returns."""
    wait_for(f"{nsim.interface} queue {queue} to be released", lambda: not bound(nsim, queue))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tests/nsim.py", description="Set the simulated NIC up (or down) in the VM."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    cmd_up = sub.add_parser("up", help="set it up; print it as JSON")
    cmd_up.add_argument(
        "--ko", default=os.environ.get(KO_ENV), help=f"netdevsim.ko (default ${KO_ENV})"
    )
    sub.add_parser("down", help="remove it")
    args = parser.parse_args(argv)
    if os.environ.get("IOUZCRX_VM") != "1":
        # It loads a module built for the VM's kernel and makes devices.
        print(f"tests/nsim.py {args.command}: runs in the VM only (tests/vm/run)", file=sys.stderr)
        return 2
    try:
        if args.command == "down":
            down()
            return 0
        if not args.ko and not os.path.isdir("/sys/module/netdevsim"):
            raise NsimUnavailable(
                f"netdevsim is not loaded: pass --ko or set {KO_ENV} to the path "
                "tests/vm/netdevsim/build prints"
            )
        nic = up(args.ko or "")
    except (NsimUnavailable, RuntimeError, OSError) as exc:
        print(f"tests/nsim.py {args.command}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(nic.describe()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
