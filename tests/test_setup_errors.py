"""io_uring itself unavailable or limited: each cause gets its own clear
exception.  The restriction is applied to a child process (tests/isolation.py)."""

from __future__ import annotations

import os

import pytest
from conftest import IN_VM, requires_copy_mode
from isolation import run_restricted

import iouzcrx

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop privileges")


def test_io_uring_blocked_by_seccomp_is_named_with_the_fix():
    lines = run_restricted(
        """
        import errno, isolation
        isolation.block_io_uring(errno.ENOSYS)
        import iouzcrx
        try:
            iouzcrx.Ring()
        except iouzcrx.IoUringUnavailable as exc:
            print("IoUringUnavailable", exc.errno, exc)
        features = iouzcrx.kernel_features()
        print("features", features.io_uring, features.bufring)
        """
    )
    kind, errno_value, message = lines[0].split(" ", 2)
    assert kind == "IoUringUnavailable" and errno_value == "38"  # ENOSYS
    assert "seccomp" in message and "mode='socket'" in message
    assert lines[1] == "features False False"


def test_io_uring_refused_with_eperm_is_explained():
    lines = run_restricted(
        """
        import errno, isolation
        isolation.block_io_uring(errno.EPERM)
        import iouzcrx
        try:
            iouzcrx.Ring()
        except iouzcrx.IoUringUnavailable as exc:
            print("IoUringUnavailable", exc.errno, exc)
        """
    )
    kind, errno_value, message = lines[0].split(" ", 2)
    assert kind == "IoUringUnavailable" and errno_value == "1"
    assert "seccomp" in message or "io_uring_disabled" in message


RINGS_CHARGED_TO_MEMLOCK = tuple(int(x) for x in os.uname().release.split(".")[:2]) < (7, 2)


@needs_root
@pytest.mark.skipif(
    not RINGS_CHARGED_TO_MEMLOCK, reason="Linux >= 7.2.10 no longer charges rings to the limit"
)
def test_a_low_memlock_limit_on_rings_is_named_with_the_fix():
    lines = run_restricted(
        """
        import isolation
        isolation.limit_memlock(64 * 1024)
        import iouzcrx
        for make in (lambda: iouzcrx.Ring(256, 8192),
                     lambda: iouzcrx.BufRingQueue(iouzcrx.Ring(8, 16), area_size=64 << 20,
                                                  buffer_size=16384)):
            try:
                make()
                print("no error")
            except iouzcrx.MemoryLimit as exc:
                print("MemoryLimit", exc.errno, exc)
        """
    )
    assert len(lines) == 2, lines
    for line in lines:
        assert line.startswith("MemoryLimit 12 "), line
        assert "RLIMIT_MEMLOCK is 64 KiB" in line and "CAP_IPC_LOCK" in line


@needs_root
@pytest.mark.vm
@requires_copy_mode
def test_a_low_memlock_limit_on_the_zcrx_area_is_named_with_the_fix():
    lines = run_restricted(
        """
        import isolation
        isolation.limit_memlock(256 * 1024)
        import iouzcrx
        ring = iouzcrx.Ring(8, 16)
        try:
            iouzcrx.ZcrxQueue(ring, mode="copy", area_size=16 << 20)
            print("no error")
        except iouzcrx.MemoryLimit as exc:
            print("MemoryLimit", exc.errno, exc)
        """
    )
    assert len(lines) == 1 and lines[0].startswith("MemoryLimit 12 "), lines
    assert "pinning the receive area" in lines[0] and "RLIMIT_MEMLOCK" in lines[0]


@pytest.mark.vm
@pytest.mark.skipif(not IN_VM, reason="changes a kernel-wide sysctl: only in the VM")
def test_io_uring_disabled_by_sysctl_is_named_with_the_fix():
    path = "/proc/sys/kernel/io_uring_disabled"
    with open(path) as f:
        saved = f.read()
    try:
        with open(path, "w") as f:
            f.write("2")
        with pytest.raises(iouzcrx.IoUringUnavailable, match="io_uring_disabled=2"):
            iouzcrx.Ring()
    finally:
        with open(path, "w") as f:
            f.write(saved)
    iouzcrx.Ring().close()


def test_an_area_beyond_rlimit_as_raises_memory_limit_naming_the_sizes():
    lines = run_restricted(
        """
        import resource
        import iouzcrx
        with open("/proc/self/status") as f:
            used = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
        limit = (used >> 20) + 128 << 20  # room for 128 MiB more, in whole MiB
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        print("limit", limit >> 20)
        try:
            iouzcrx.select_mode(None, mode="socket", area_size=256 << 20)
            print("no error")
        except iouzcrx.MemoryLimit as exc:
            print("MemoryLimit", exc.errno, exc)
        """
    )
    assert len(lines) == 2 and lines[1].startswith("MemoryLimit 12 "), lines
    assert "268435456-byte" in lines[1], lines
    assert f"RLIMIT_AS is {lines[0].split()[1]} MiB" in lines[1], lines


def test_an_area_larger_than_the_machine_raises_memory_limit_in_every_mode():
    """Populating an area the machine cannot hold would get the process
    OOM-killed; it must be an exception naming the sizes instead, and auto
    must end on it rather than fall past every mode."""
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    size = (total // (1 << 30) + 2) << 30  # more than all the RAM, in whole GiB
    lines = run_restricted(
        f"""
        import iouzcrx
        ring = iouzcrx.Ring(8, 16)
        for mode in ("bufring", "socket", "auto"):
            try:
                iouzcrx.select_mode(ring, mode=mode, area_size={size}, buffer_size=1 << 20)
                print(mode, "no error")
            except iouzcrx.MemoryLimit as exc:
                print(mode, "MemoryLimit", exc.errno, exc)
        """
    )
    assert len(lines) == 3, lines
    for line in lines:
        assert line.split(" ", 2)[1] == "MemoryLimit", line
        assert f"{size}-byte" in line and "MiB of RAM" in line, line


def test_io_uring_enter_blocked_alone_makes_auto_fall_back_to_socket_mode():
    """A filter that lets rings be set up but refuses io_uring_enter: auto
    serves in socket mode and says why; an explicit ring mode names seccomp."""
    lines = run_restricted(
        """
        import asyncio, errno, isolation
        isolation.block_io_uring(errno.EPERM, 426, 426)  # io_uring_enter only
        import iouzcrx

        class Echo(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
            def data_received(self, data):
                self.transport.write(data)

        async def main():
            loop = asyncio.get_running_loop()
            errors = []
            loop.set_exception_handler(lambda loop, context: errors.append(context))
            server = await iouzcrx.create_zcrx_server(Echo, "127.0.0.1", 0)
            print("mode", server.mode)
            print("refused", server.refused["bufring"])
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            writer.write(b"served")
            print("echo", (await asyncio.wait_for(reader.readexactly(6), 30)).decode())
            writer.close()
            server.close_clients()
            server.close()
            await asyncio.wait_for(server.wait_closed(), 30)
            try:
                await iouzcrx.create_zcrx_server(Echo, "127.0.0.1", 0, mode="bufring")
            except iouzcrx.IoUringUnavailable as exc:
                print("explicit IoUringUnavailable", exc.errno, exc)
            print("errors", len(errors))

        asyncio.run(main())
        """
    )
    assert lines[0] == "mode socket", lines
    assert "io_uring_enter" in lines[1] and "seccomp" in lines[1], lines
    assert lines[2] == "echo served", lines
    assert lines[3].startswith("explicit IoUringUnavailable 1 ") and "seccomp" in lines[3], lines
    assert lines[4] == "errors 0", lines
