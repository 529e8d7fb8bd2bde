"""The mypyc build of the hot path (setup.py, kvha/compiled.py)."""

from __future__ import annotations

import os
import platform
import sys

import pytest

from kvha import compiled


def test_every_hot_source_exists_and_names_its_module() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(compiled.__file__)))
    for source, module in zip(compiled.HOT_SOURCES, compiled.HOT_MODULES):
        assert os.path.exists(os.path.join(root, source)), source
        assert module == source[:-3].replace("/", ".")


def test_the_build_is_all_or_nothing_and_current() -> None:
    """Either every hot module runs compiled or none does, and none older than its source.

    ``make`` rebuilds when a hot source changes; this fails a test run that
    would otherwise exercise the old code of a stale extension.
    """
    s = compiled.status()
    assert not s["stale"], f"rebuild: {s['stale']}"
    assert not (s["compiled"] and s["plain"]), s


@pytest.mark.skipif(
    platform.python_implementation() != "CPython" or bool(os.environ.get("KVHA_PURE")),
    reason="mypyc builds for CPython only; KVHA_PURE=1 asks for plain Python",
)
def test_ci_tests_the_compiled_build() -> None:
    """In CI (`make test`), the tests run the compiled modules that nodes run."""
    if not os.environ.get("CI"):
        pytest.skip("outside CI a plain build is allowed (no compiler)")
    assert compiled.status()["plain"] == []


def test_a_source_changed_since_its_build_is_reported_stale(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """status() compares each source with the digest setup.py recorded when it compiled it."""
    import json

    package = tmp_path / "kvha"
    package.mkdir()
    ext = package / "clock.cpython-311-x86_64-linux-gnu.so"
    ext.write_bytes(b"")
    source = package / "clock.py"
    source.write_text("x = 1\n")
    record = package / compiled.BUILD_RECORD

    class Module:
        __file__ = str(ext)

    monkeypatch.setattr(compiled, "HOT_MODULES", ("kvha.clock",))
    monkeypatch.setattr(compiled, "__file__", str(package / "compiled.py"))
    monkeypatch.setitem(sys.modules, "kvha.clock", Module)
    stale = {"compiled": ["kvha.clock"], "plain": [], "stale": ["kvha.clock"]}
    assert compiled.status() == stale  # no record: unknown, so stale
    record.write_text(json.dumps({"kvha.clock": compiled.source_digest(str(source))}))
    assert compiled.status()["stale"] == []
    assert compiled.describe().startswith("compiled with mypyc (1 of 1")
    source.write_text("x = 2\n")  # edited after the build
    assert compiled.status() == stale
    assert "STALE" in compiled.describe()


def test_a_plain_build_says_so(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    class Module:
        __file__ = "/somewhere/kvha/clock.py"

    monkeypatch.setattr(compiled, "HOT_MODULES", ("kvha.clock",))
    monkeypatch.setitem(sys.modules, "kvha.clock", Module)
    assert compiled.status() == {"compiled": [], "plain": ["kvha.clock"], "stale": []}
    assert compiled.describe() == "plain Python (no module compiled)"
