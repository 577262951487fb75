"""The suite tests the iouzcrx it means to test.

CI installs the wheel built from the sdist into a fresh environment and runs
the suite from outside the checkout; there, the checkout's uncompiled
``iouzcrx/`` must not shadow the installed package (``tests/run`` sets
IOUZCRX_REQUIRE_INSTALLED=1).  In a developer's editable install the package
must come from the directory that install points at.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import COMPILED_MODULES

import iouzcrx


def distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution("iouzcrx")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("iouzcrx is importable but not installed: install it (see README)")


def editable_source(dist: importlib.metadata.Distribution) -> Path | None:
    """The source directory of an editable install, None for a real one."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    url = json.loads(text)
    if not url.get("dir_info", {}).get("editable"):
        return None
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(url["url"]).path))


def test_the_imported_package_is_the_installed_distribution() -> None:
    dist = distribution()
    assert iouzcrx.__version__ == dist.version
    package = Path(iouzcrx.__file__).resolve().parent
    modules = [Path(iouzcrx.__file__).resolve()] + [
        Path(importlib.import_module(f"iouzcrx.{name}").__file__ or "").resolve()
        for name in COMPILED_MODULES
    ]
    source = editable_source(dist)
    if os.environ.get("IOUZCRX_REQUIRE_INSTALLED") == "1":
        assert source is None, f"an editable install of {source} is under test, not the wheel"
    if source is not None:
        assert package == (source / "iouzcrx").resolve()
        return
    installed = {Path(str(dist.locate_file(f))).resolve() for f in dist.files or ()}
    for module in modules:
        assert module in installed, f"{module} is not a file of the installed distribution"
    for module in modules[1:]:
        assert module.suffix == ".so", f"{module} is not a compiled extension"
