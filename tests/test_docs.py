"""The documentation site covers the public API and builds without a warning."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import iouzcrx

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"

# The docs are built from a checkout; a copy of the tests elsewhere has none.
needs_docs = pytest.mark.skipif(
    not (ROOT / "mkdocs.yml").is_file() or not REFERENCE.is_dir(),
    reason=f"no mkdocs.yml and docs/reference/ beside the tests (in {ROOT})",
)
MKDOCS_MISSING = [
    module
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "griffe")
    if importlib.util.find_spec(module.split(".")[0]) is None
    or importlib.util.find_spec(module) is None
]
needs_mkdocs = pytest.mark.skipif(
    bool(MKDOCS_MISSING),
    reason=f"{', '.join(MKDOCS_MISSING)} not installed (pip install '.[docs]')",
)


def reference_entries() -> dict[str, str]:
    """``::: iouzcrx.NAME`` directives of the reference pages: name -> page."""
    entries = {}
    for page in sorted(REFERENCE.glob("*.md")):
        for match in re.finditer(r"^::: iouzcrx\.(\w+)\s*$", page.read_text(), re.M):
            entries[match.group(1)] = page.name
    return entries


@needs_docs
def test_every_public_name_has_an_entry_in_the_api_reference():
    entries = reference_entries()
    missing = sorted(set(iouzcrx.__all__) - set(entries))
    assert not missing, f"not in docs/reference/*.md as '::: iouzcrx.NAME': {missing}"
    unknown = sorted(set(entries) - set(iouzcrx.__all__))
    assert not unknown, f"docs/reference/*.md documents names iouzcrx does not export: {unknown}"


@needs_docs
@needs_mkdocs
def test_every_public_name_and_its_public_members_have_docstrings():
    # The same static reading the site is built from: the Cython modules are
    # seen through their .pyi stubs, so a stub without docstrings shows here.
    import griffe

    package = griffe.load(
        "iouzcrx", search_paths=[str(ROOT)], allow_inspection=False, resolve_aliases=True
    )
    undocumented = []
    for name in iouzcrx.__all__:
        obj = package[name]
        target = obj.final_target if obj.is_alias else obj
        if not target.docstring:
            undocumented.append(name)
        if not target.is_class:
            continue
        for member_name, member in target.members.items():
            if member_name.startswith("_"):
                continue
            member = member.final_target if member.is_alias else member
            if not member.docstring:
                undocumented.append(f"{name}.{member_name}")
    assert not undocumented, f"no docstring: {undocumented}"


@needs_docs
@needs_mkdocs
def test_site_builds_with_warnings_as_errors_and_renders_every_public_name(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(site),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rendered = "".join(
        (site / "reference" / page.removesuffix(".md") / "index.html").read_text()
        for page in set(reference_entries().values())
    )
    missing = [name for name in iouzcrx.__all__ if f'id="iouzcrx.{name}"' not in rendered]
    assert not missing, f"no rendered entry for {missing}"
