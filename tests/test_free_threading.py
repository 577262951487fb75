"""On a free-threaded CPython (3.13t) iouzcrx does not declare its extension
modules safe without the GIL: buffer returns from other threads are queued
under the GIL (see iouzcrx/_receive.pyx), so importing iouzcrx turns the GIL
back on, and Python says so with a RuntimeWarning."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

import pytest

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))

pytestmark = pytest.mark.skipif(
    not FREE_THREADED, reason="needs a free-threaded CPython build (3.13t); this one has the GIL"
)


def run_python(code: str, cwd: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_importing_iouzcrx_turns_the_gil_back_on_and_warns(tmp_path):
    result = run_python(
        "import sys\n"
        "before = sys._is_gil_enabled()\n"
        "import iouzcrx\n"
        "print(before, sys._is_gil_enabled())\n",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
    assert "RuntimeWarning" in result.stderr
    assert "iouzcrx._" in result.stderr and "GIL" in result.stderr


def test_the_gil_stays_off_only_when_the_user_overrides_it(tmp_path):
    result = run_python(
        "import sys, iouzcrx\nprint(sys._is_gil_enabled())\n", str(tmp_path), PYTHON_GIL="0"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False"]
    assert "RuntimeWarning" not in result.stderr
