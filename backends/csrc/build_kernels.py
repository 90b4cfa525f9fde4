"""cffi build script (out-of-line API mode) for ``nmopt.backends._kernels``.

``setup.py`` names ``ffibuilder`` in ``cffi_modules``; ``pip install`` compiles it. Build
switches (environment variables, since pip cannot pass arguments):

- ``NMOPT_CFLAGS``: extra compiler flags appended to the defaults (e.g. ``-march=native``);
- ``NMOPT_PORTABLE=1``: no per-CPU SIMD clones (for toolchains without ifunc support).

The C declarations live in ``nmopt_kernels.h``; its preprocessor lines are stripped for cdef.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "nmopt_kernels.h"
SOURCES = ["nm_parallel.c", "nm_select.c", "nm_exact.c", "nm_exact_general.c", "nm_exact_start.c",
           "nm_exact_warm.c", "nm_exact_q4.c", "nm_exact_fallback.c", "nm_certify.c", "nm_packed.c",
           "nm_descent.c"]
MODULE = "nmopt.backends._kernels"


def cdef_text() -> str:
    """The header without preprocessor lines, as cffi's cdef wants it."""
    text = HEADER.read_text()
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def compile_args(extra: str | None = None) -> list[str]:
    """Default flags plus ``NMOPT_CFLAGS`` (or ``extra``)."""
    args = ["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing", "-Wno-psabi"]
    if sys.platform == "win32":
        args = ["/O2"]
    if os.environ.get("NMOPT_PORTABLE", "").strip() not in ("", "0"):
        args.append("-DNMOPT_PORTABLE")
    args += shlex.split(os.environ.get("NMOPT_CFLAGS", "") if extra is None else extra)
    return args


def _path(path: Path, absolute: bool) -> str:
    """Paths relative to the working directory (the setup.py directory during a pip build,
    so an sdist lists them portably), or absolute for builds run from elsewhere."""
    if absolute:
        return str(path)
    try:
        return os.path.relpath(path)
    except ValueError:  # another drive on Windows
        return str(path)


def make_builder(module: str = MODULE, extra_cflags: str | None = None,
                 extra_ldflags: list[str] | None = None, absolute: bool = False,
                 optional: bool = False) -> FFI:
    """An FFI builder for the kernels.

    ``setup.py`` uses the module-level ``ffibuilder`` (``optional=True``: a failed compile is
    not an install error). Tests build sanitizer variants under another name with
    ``absolute=True``, since ``FFI.compile`` changes directory.
    """
    ffi = FFI()
    ffi.cdef(cdef_text())
    ffi.set_source(
        module,
        '#include "nmopt_kernels.h"',
        sources=[_path(HERE / s, absolute) for s in SOURCES],
        include_dirs=[_path(HERE, absolute)],
        extra_compile_args=compile_args(extra_cflags),
        extra_link_args=["-pthread"] + list(extra_ldflags or []),
        optional=optional,
    )
    return ffi


ffibuilder = make_builder(optional=True)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
