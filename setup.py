"""Only here to name the cffi extension; everything else lives in pyproject.toml.

The C kernels (``nmopt.backends._kernels``) are optional: if they cannot be compiled the
install still succeeds, prints a warning saying why, and the numpy backend serves (nmopt
warns again at run time). Build switches, as environment variables since pip cannot pass
arguments:

- ``NMOPT_NO_EXTENSION=1``: do not build the C kernels at all;
- ``NMOPT_CFLAGS="..."``: extra compiler flags (e.g. ``-march=native``);
- ``NMOPT_PORTABLE=1``: no per-CPU SIMD clones (toolchains without ifunc support);
- ``NMOPT_REQUIRE_EXTENSION=1``: make a failed build an error instead of a warning.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _warn(message: str) -> None:
    bar = "!" * 78
    sys.stderr.write(f"\n{bar}\nWARNING: {message}\n{bar}\n\n")


class OptionalBuildExt(build_ext):
    """build_ext that turns a failed compile into a warning (the numpy backend then serves).

    The extension is also marked ``optional`` (see build_kernels.py), so that an editable
    install does not try to copy a module that was not built.
    """

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure must not fail the install
            self._skip(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if "-DNMOPT_PORTABLE" not in ext.extra_compile_args:
                # Toolchains without ifunc support reject the SIMD clones: retry without them.
                ext.extra_compile_args = [*ext.extra_compile_args, "-DNMOPT_PORTABLE"]
                try:
                    super().build_extension(ext)
                    _warn(f"nmopt: built {ext.name} without SIMD clones (NMOPT_PORTABLE) after: "
                          f"{exc}")
                    return
                except Exception as exc2:  # noqa: BLE001
                    exc = exc2
            self._skip(exc)

    def _skip(self, exc):
        if _flag("NMOPT_REQUIRE_EXTENSION"):
            raise exc
        _warn("nmopt: the C kernels (nmopt.backends._kernels) could not be built; installing "
              f"without them, the numpy backend will serve. Reason: {type(exc).__name__}: {exc}")


if _flag("NMOPT_NO_EXTENSION"):
    _warn("nmopt: NMOPT_NO_EXTENSION is set; installing without the C kernels "
          "(the numpy backend will serve)")
    setup()
else:
    setup(cffi_modules=["backends/csrc/build_kernels.py:ffibuilder"],
          cmdclass={"build_ext": OptionalBuildExt})
