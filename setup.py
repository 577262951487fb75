"""Builds the Cython extensions of iouzcrx (metadata lives in pyproject.toml)."""

import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    sys.exit("iouzcrx needs Linux: it is built on io_uring")

MODULES = ["_ring", "_area", "_receive", "_zcrx", "_bufring", "_socket_pool", "_probe"]

extensions = [
    Extension(
        f"iouzcrx.{name}",
        [f"iouzcrx/{name}.pyx"],
        include_dirs=["iouzcrx"],
        extra_compile_args=[
            "-O2",
            "-Wall",
            "-Wextra",
            "-Wno-unused-parameter",
            "-Wno-unused-function",
            "-Wno-missing-field-initializers",
        ],
    )
    for name in MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3, "embedsignature": True},
    ),
)
