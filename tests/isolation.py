"""Ways to take a privilege away from a test subprocess: capabilities, an
RLIMIT, or the io_uring syscalls themselves (seccomp).  Each changes only the
calling process, so tests run the code under test in a child.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import resource
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))
# The directory holding the iouzcrx package under test: the installed one in
# CI, the checkout in a developer's editable or in-place build.  Found without
# importing it, since children import this module before they restrict
# themselves.
_spec = importlib.util.find_spec("iouzcrx")
assert _spec is not None and _spec.origin is not None, "iouzcrx is not importable"
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(_spec.origin)))

CAP_NET_ADMIN = 12
CAP_IPC_LOCK = 14

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_capabilities(*caps: int) -> None:
    """Remove ``caps`` from this process's capability sets for good."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for cap in caps:
        word, bit = divmod(cap, 32)
        for field in ("effective", "permitted", "inheritable"):
            setattr(data[word], field, getattr(data[word], field) & ~(1 << bit))
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def limit_memlock(limit: int) -> None:
    """Lower RLIMIT_MEMLOCK; binds only without CAP_IPC_LOCK."""
    drop_capabilities(CAP_IPC_LOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def block_io_uring(errno_value: int, first: int = 425, last: int = 427) -> None:
    """Install a seccomp filter failing io_uring_setup/enter/register (425-427,
    or the syscalls ``first``..``last`` of them) with ``errno_value``, as
    container runtimes' default profiles do."""
    ld_nr = 0x20  # BPF_LD | BPF_W | BPF_ABS, seccomp_data.nr at offset 0
    jge, jgt, ret = 0x35, 0x25, 0x06
    program = (_SockFilter * 5)(
        _SockFilter(ld_nr, 0, 0, 0),
        _SockFilter(jge, 0, 2, first),  # nr < first: allow
        _SockFilter(jgt, 1, 0, last),  # nr > last: allow
        _SockFilter(ret, 0, 0, 0x00050000 | errno_value),  # SECCOMP_RET_ERRNO
        _SockFilter(ret, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    )
    fprog = _SockFprog(len(program), program)
    if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if _libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child interpreter that must import the very
    iouzcrx this process tests, and this directory's helper modules.  Start
    the child with ``cwd=TESTS`` too: a ``-c`` or ``-m`` child puts its working
    directory first on sys.path, and a checkout there would shadow the
    installed package with its uncompiled sources."""
    inherited = os.environ.get("PYTHONPATH", "")
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, TESTS, inherited) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def run_python(code: str, timeout: float = 60) -> list[str]:
    """Run ``code`` in a child interpreter that imports the iouzcrx under
    test and this directory's helpers; it must exit 0. Its stdout lines."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=TESTS,
        env=child_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def run_restricted(code: str) -> list[str]:
    """Run ``code`` (which restricts itself first) in a child process with
    this module importable; returns its stdout lines."""
    return run_python(code)
