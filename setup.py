"""Build the optional Cython hot path (``_fastmatch``).

The extension is an accelerator, never a requirement: if Cython or a C compiler is missing the
build logs a warning and the pure-Python twin in ``server/matching`` is used at run time.
``FASTMATCH_NO_EXTENSIONS=1`` skips the build on purpose.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Turn a failed compile into a warning so installation still succeeds."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "use the twin"
            print(f"WARNING: _fastmatch extension not built ({exc}); using the pure-Python twin",
                  file=sys.stderr)

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"WARNING: could not compile {ext.name} ({exc}); using the pure-Python twin",
                  file=sys.stderr)


def extensions() -> list:  # type: ignore[type-arg]
    if os.environ.get("FASTMATCH_NO_EXTENSIONS") == "1":
        print("FASTMATCH_NO_EXTENSIONS=1: skipping the Cython extension", file=sys.stderr)
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("WARNING: Cython not available; using the pure-Python twin", file=sys.stderr)
        return []
    return cythonize(
        ["_fastmatch/kernel.pyx", "_fastmatch/pool.pyx"],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
        quiet=True,
    )


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
