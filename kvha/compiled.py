"""Which modules the build compiles with mypyc, and whether the loaded ones are.

``setup.py`` compiles :data:`HOT_SOURCES` on CPython (unless ``KVHA_PURE=1``
or the compiler is missing).  Each compiled module is an extension file
beside its source, and Python imports the extension first, so an
extension built from an older source silently runs the old code:
:func:`status` reports that (setup.py records every module's digest when
it compiles), the nodes log it at start, and a test fails ``make test``
on it.

This module must not import anything from kvha: setup.py reads it before
kvha is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from typing import Any

#: The modules every request passes through, master, data node and load
#: balancer: parsing, routing, the wire codec, the data-node client and
#: server, the store, the load balancer's forwarding.
HOT_SOURCES = (
    "kvha/clock.py",
    "kvha/events.py",
    "kvha/flush.py",
    "kvha/record.py",
    "kvha/ring.py",
    "kvha/wire.py",
    "kvha/data/client.py",
    "kvha/data/engine.py",
    "kvha/data/server.py",
    "kvha/data/store.py",
    "kvha/lb/forward.py",
    "kvha/master/memcache.py",
    "kvha/master/pipeline.py",
    "kvha/master/resp.py",
    "kvha/master/router.py",
)

HOT_MODULES = tuple(p[:-3].replace("/", ".") for p in HOT_SOURCES)


#: Written by setup.py beside this module after a build: the SHA-256 of
#: every kvha module's source as the build saw it (see digests()).
BUILD_RECORD = "hot_build.json"


def source_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _package_sources(package_dir: str) -> dict[str, str]:
    """Every kvha module's source under ``package_dir``: {module name: path}."""
    out = {}
    for base, _dirs, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                rel = os.path.relpath(path, os.path.dirname(package_dir))[:-3]
                out[rel.replace(os.sep, ".")] = path
    return out


def digests(package_dir: str) -> dict[str, str]:
    """What setup.py records: the digest of every module in the package.

    Not only the compiled ones: mypyc builds the types of the modules they
    use (a NodeLink's attributes, an engine's methods) into the checks of
    the compiled code, so a change there is a change to the build too.
    """
    return {name: source_digest(path) for name, path in _package_sources(package_dir).items()}


def status() -> dict[str, Any]:
    """``{"compiled": [...], "plain": [...], "stale": [...]}`` over the hot modules.

    ``stale``: when something is compiled, the modules whose source differs
    from the one the build saw (per :data:`BUILD_RECORD`; a missing record
    makes every compiled module stale).  Nothing is imported to find out.
    """
    compiled: list[str] = []
    plain: list[str] = []
    here = os.path.dirname(os.path.abspath(__file__))
    for name in HOT_MODULES:
        module = sys.modules.get(name)
        if module is not None:
            path = getattr(module, "__file__", "") or ""
        else:
            spec = importlib.util.find_spec(name)
            path = (spec.origin if spec is not None else "") or ""
        (plain if path.endswith((".py", ".pyc")) else compiled).append(name)
    stale: list[str] = []
    if compiled:
        try:
            with open(os.path.join(here, BUILD_RECORD)) as f:
                built = json.load(f)
        except (OSError, ValueError):
            built = None
        if built is None:
            stale = list(compiled)
        else:
            now = digests(here)
            stale = sorted(n for n in set(now) | set(built) if now.get(n) != built.get(n))
    return {"compiled": compiled, "plain": plain, "stale": stale}


def describe() -> str:
    """One line for logs and benchmark reports."""
    s = status()
    if not s["compiled"]:
        return "plain Python (no module compiled)"
    text = f"compiled with mypyc ({len(s['compiled'])} of {len(HOT_MODULES)} hot modules)"
    if s["stale"]:
        text += f"; STALE, rebuild with make: {', '.join(s['stale'])}"
    return text


def log_build(log: Any, role: str) -> None:
    """Say at a node's start whether it runs compiled (a warning when stale)."""
    s = status()
    if s["stale"]:
        log.warn(
            "{role}: kvha sources changed since the compiled build, which may run "
            "OLD code: {stale}; rebuild (make, or setup.py build_ext --inplace)",
            role=role,
            stale=", ".join(s["stale"]),
        )
    else:
        log.info("{role} hot path: {build}", role=role, build=describe())
