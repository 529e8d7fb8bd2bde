"""kvha.procs: the environment of the nodes kvha starts (no process is started here)."""

from __future__ import annotations

import os
import sys

from kvha.procs import PYPY_GC_MAX_DEFAULT, SOURCE_ROOT, node_environment

#: A PyPy interpreter, by name (it need not exist: nothing is started).
PYPY = "/opt/pypy/bin/pypy3"


def test_children_import_kvha_from_the_source_tree() -> None:
    env = node_environment("data", sys.executable, {"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"] == SOURCE_ROOT + os.pathsep + "/elsewhere"


def test_cpython_nodes_get_no_pypy_heap_bound() -> None:
    for role in ("master", "lb", "data"):
        assert "PYPY_GC_MAX" not in node_environment(role, sys.executable, {})


def test_pypy_masters_and_load_balancers_get_a_heap_bound_data_nodes_do_not() -> None:
    assert node_environment("master", PYPY, {})["PYPY_GC_MAX"] == PYPY_GC_MAX_DEFAULT
    assert node_environment("lb", PYPY, {})["PYPY_GC_MAX"] == PYPY_GC_MAX_DEFAULT
    assert "PYPY_GC_MAX" not in node_environment("data", PYPY, {})
    # The operator's own setting wins.
    assert node_environment("master", PYPY, {"PYPY_GC_MAX": "1GB"})["PYPY_GC_MAX"] == "1GB"
