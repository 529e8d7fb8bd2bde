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
    record.write_text(json.dumps(compiled.digests(str(package))))
    assert compiled.status()["stale"] == []
    assert compiled.describe().startswith("compiled with mypyc (1 of 1")
    source.write_text("x = 2\n")  # edited after the build
    assert compiled.status() == stale
    assert "STALE" in compiled.describe()
    record.write_text(json.dumps(compiled.digests(str(package))))  # rebuilt
    (package / "health.py").write_text("")  # a module the compiled code uses, added
    assert compiled.status()["stale"] == ["kvha.health"]


def test_a_plain_build_says_so(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    class Module:
        __file__ = "/somewhere/kvha/clock.py"

    monkeypatch.setattr(compiled, "HOT_MODULES", ("kvha.clock",))
    monkeypatch.setitem(sys.modules, "kvha.clock", Module)
    assert compiled.status() == {"compiled": [], "plain": ["kvha.clock"], "stale": []}
    assert compiled.describe() == "plain Python (no module compiled)"


def _miscompiled_patterns(source: str, path: str) -> list[str]:
    """What mypyc compiled wrongly in this code base (each found by a test, then fixed)."""
    import ast

    found = []
    tree = ast.parse(source)

    def walk(node: ast.AST, scopes: int) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if scopes and any(
                    isinstance(n, (ast.Yield, ast.YieldFrom)) for n in ast.walk(child)
                ):
                    found.append(f"{path}:{child.lineno} generator nested in a function")
                names: dict[str, set[str]] = {}
                for n in ast.walk(child):
                    if isinstance(n, ast.ExceptHandler) and n.name:
                        kind = ast.get_source_segment(source, n.type) if n.type else ""
                        names.setdefault(n.name, set()).add(kind or "")
                found.extend(
                    f"{path}:{child.lineno} `except ... as {name}` with types {sorted(kinds)}"
                    for name, kinds in names.items()
                    if len(kinds) > 1
                )
                walk(child, scopes + 1)
            elif isinstance(child, ast.Lambda):
                walk(child, scopes + 1)
            elif isinstance(child, (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                if scopes >= 2 and any(isinstance(n, ast.Lambda) for n in ast.walk(child)):
                    found.append(f"{path}:{child.lineno} lambda in a comprehension in a closure")
                walk(child, scopes)
            else:
                walk(child, scopes)

    walk(tree, 0)
    return found


def test_hot_sources_avoid_what_mypyc_miscompiles() -> None:
    """Three patterns compiled without error that failed at run time (mypyc's closures
    and exception variables): a generator nested in a function, a lambda inside a
    comprehension inside a closure, and one `except ... as NAME` used with two types."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(compiled.__file__)))
    found = []
    for source in compiled.HOT_SOURCES:
        with open(os.path.join(root, source)) as f:
            found += _miscompiled_patterns(f.read(), source)
    assert found == []


def test_the_pattern_check_finds_each_pattern() -> None:
    bad = """
def scan(self):
    def candidates():
        yield 1
    return candidates()

def gat(keys):
    def start():
        return [lambda c, k=k: c for k in keys]
    return start

def handle():
    try:
        pass
    except ValueError as e:
        pass
    try:
        pass
    except Exception as e:
        pass
"""
    found = _miscompiled_patterns(bad, "x.py")
    assert len(found) == 3, found
