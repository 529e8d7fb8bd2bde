"""The commands' paths through a master leave no reference cycles behind.

Garbage in a cycle outlives its request until CPython's cyclic collector
finds it, and that collector's passes cost time in proportion to what is
alive.  A profile of a master serving pipelined GETs with ``replicas: 1``
had 23% of its time in the collector: each read built a compiled closure
that held itself.  (mypyc keeps a nested function in its scope's
environment when another nested function refers to it, or when it nests
one itself, so the pair refer to each other.)

Each command runs through bench/hotpath.py's master (the real protocol,
router, data-node client and wire, over in-memory transports, with three
real data nodes) with the collector off; then a collection must find
nothing that was unreachable.
"""

from __future__ import annotations

import collections
import gc
from typing import Any, Callable

import pytest

KEY = b"key:__rand_int__"


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


COMMANDS = {
    "SET": ("redis", resp(b"SET", KEY, b"xxx")),
    "GET": ("redis", resp(b"GET", KEY)),
    "INCR": ("redis", resp(b"INCR", b"counter")),
    "DEL": ("redis", resp(b"DEL", KEY)),
    "MGET": ("redis", resp(b"MGET", KEY, b"other")),
    "MSET": ("redis", resp(b"MSET", KEY, b"a", b"other", b"b")),
    "EXISTS": ("redis", resp(b"EXISTS", KEY)),
    "TTL": ("redis", resp(b"TTL", KEY)),
    "EXPIRE": ("redis", resp(b"EXPIRE", KEY, b"100")),
    "GETSET": ("redis", resp(b"GETSET", KEY, b"v")),
    "APPEND": ("redis", resp(b"APPEND", b"appended", b"v")),
    "mc set": ("memcached", b"set " + KEY + b" 0 0 3\r\nxxx\r\n"),
    "mc get": ("memcached", b"get " + KEY + b"\r\n"),
    "mc gets": ("memcached", b"gets " + KEY + b"\r\n"),
    "mc get two": ("memcached", b"get " + KEY + b" other\r\n"),
    "mc gat": ("memcached", b"gat 100 " + KEY + b"\r\n"),
    "mc delete": ("memcached", b"delete " + KEY + b"\r\n"),
    "mc incr": ("memcached", b"incr counter 1\r\n"),
    "MSETNX": ("redis", resp(b"MSETNX", b"new1", b"a", b"new2", b"b")),
}

#: Sent before each round, so that reads hit, deletes delete and writes
#: replicate (the command list above alone would mostly miss).
PRELOAD = {
    "redis": resp(b"SET", KEY, b"xxx")
    + resp(b"SET", b"other", b"y")
    + resp(b"SET", b"counter", b"1"),
    "memcached": b"set " + KEY + b" 0 0 3\r\nxxx\r\nset other 0 0 1\r\ny\r\n"
    b"set counter 0 0 1\r\n1\r\n",
}


def cyclic_garbage(run: Callable[[], Any], times: int = 5) -> collections.Counter[str]:
    """The types of the unreachable objects ``times`` calls of ``run`` leave."""
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(times):
            run()
        gc.collect()
        return collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


@pytest.mark.parametrize("replicas", [0, 1])
@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_command_leaves_no_cycle(name: str, replicas: int) -> None:
    from bench.hotpath import Master

    protocol, command = COMMANDS[name]
    master = Master(replicas, 4, protocol)

    def run() -> None:
        master.turn(PRELOAD[protocol])
        master.turn(command)

    for _ in range(3):  # connections, caches and first-use state settle
        run()
    assert cyclic_garbage(run) == collections.Counter()


def test_the_check_sees_a_cycle() -> None:
    """The check can fail: a list that holds itself is found."""

    def run() -> None:
        cycle: list[Any] = []
        cycle.append(cycle)

    assert cyclic_garbage(run) == collections.Counter({"list": 5})
