"""Build kvha: the hot path compiled with mypyc on CPython, plain Python elsewhere.

Every module stays plain, typed Python: PyPy, Python 3.9 and a build without
a C compiler import the sources as they are.  On CPython, the modules every
request passes through are also compiled by mypyc (part of mypy, which
checks these same annotations in ``make test``) into C extensions that sit
beside their sources and are imported instead of them.

- ``KVHA_PURE=1`` builds nothing: plain Python everywhere.
- A compiler or header missing does not fail the install: it warns and
  leaves plain Python, the same code, slower.
- After editing a compiled module, rebuild (``make`` does, for every target
  that runs kvha): an extension built from an older source would shadow
  it.  ``kvha.compiled.status()`` tells, and ``make test`` fails on a stale
  build.

Which modules: see ``kvha/compiled.py``.
"""

from __future__ import annotations

import json
import os
import platform
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kvha"))
from compiled import (  # noqa: E402  (kvha/compiled.py, without importing kvha)
    BUILD_RECORD,
    HOT_SOURCES,
    digests,
)

sys.path.pop(0)


class OptionalBuildExt(build_ext):
    """build_ext that falls back to plain Python instead of failing the install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:  # no compiler, no Python.h
            self._fall_back(e)
            return
        if self.extensions:
            self._record()

    def _record(self) -> None:
        """Each compiled source's digest, beside kvha/compiled.py (see status())."""
        root = os.path.dirname(os.path.abspath(__file__))
        target = os.path.join(root if self.inplace else self.build_lib, "kvha", BUILD_RECORD)
        with open(target, "w") as f:
            json.dump(digests(os.path.join(root, "kvha")), f, indent=1, sort_keys=True)

    def _fall_back(self, error: BaseException) -> None:
        for path in self.get_outputs():
            if os.path.exists(path):
                os.remove(path)  # no half-built set: the shims need their shared library
        sys.stderr.write(
            f"\nkvha: compiling the hot path failed ({error}); installing plain Python.\n"
            "      It works the same, about a third slower.  For the compiled build,\n"
            "      install a C compiler and Python's headers (Debian: build-essential\n"
            "      python3-dev) and reinstall.\n\n"
        )


def ext_modules() -> list:
    if platform.python_implementation() != "CPython" or os.environ.get("KVHA_PURE"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.stderr.write("kvha: mypyc is not installed; installing plain Python.\n")
        return []
    try:
        # One shared library, kvha/hot__mypyc.*.so, inside the package (found wherever kvha is).
        return mypycify(list(HOT_SOURCES), opt_level="3", group_name="kvha.hot")  # type: ignore[no-any-return]
    except (Exception, SystemExit) as e:  # mypyc exits on a type error or a missing plugin
        sys.stderr.write(f"kvha: mypyc could not compile the hot path ({e}); plain Python.\n")
        return []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
