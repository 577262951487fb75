"""Builds the Cython extensions of iouzcrx (metadata lives in pyproject.toml).

The extensions list their ``.pyx`` files as sources and are cythonized when
they are built, not when this file is read: an sdist then carries the ``.pyx``
and never a stale generated ``.c``, and making the sdist runs no Cython.
"""

import sys

from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    sys.exit("iouzcrx needs Linux: it is built on io_uring")

try:
    # setuptools' build_ext cythonizes .pyx sources only when Cython imports;
    # without it, it would look for .c files that the sdist does not ship.
    import Cython.Distutils  # noqa: F401
except ImportError:
    sys.exit("building iouzcrx needs Cython >= 3.1 (a build requirement in pyproject.toml)")

MODULES = ["_ring", "_area", "_receive", "_zcrx", "_bufring", "_socket_pool", "_probe", "_reader",
           "_readiness", "_transport"]


def extension(name: str) -> Extension:
    ext = Extension(
        f"iouzcrx.{name}",
        [f"iouzcrx/{name}.pyx"],
        include_dirs=["iouzcrx"],
        # The C headers: an in-place build recompiles when one changes.
        depends=["iouzcrx/_abi.h", "iouzcrx/_copy.h"],
        extra_compile_args=[
            "-O2",
            "-Wall",
            "-Wextra",
            "-Wno-unused-parameter",
            "-Wno-unused-function",
            "-Wno-missing-field-initializers",
        ],
    )
    # Read by Cython's build_ext, which setuptools' build_ext extends.
    # auto_pickle off: a copy of an object that owns a buffer, an fd or a
    # mapping would give it back twice. Such objects refuse pickling instead.
    ext.cython_directives = {"language_level": 3, "embedsignature": True, "auto_pickle": False}
    return ext


setup(ext_modules=[extension(name) for name in MODULES])
