"""The Python work of one request through a master, in one process, without sockets.

``make bench`` runs real processes, and on this shared two-core machine a
single figure moves by 20-40% between runs, which hides any change smaller
than that.  This measures what a code change can alter, the Python work, on
its own: a real master's Redis protocol, pipeline and router, the real
data-node client and wire codec, and three real data nodes (``memory``
engine), connected by in-memory transports (``twisted.test.iosim``) and
driven turn by turn on a ``Clock``.  No system call, no scheduler, no other
process: the figure is the CPU time per request of master and data node
together, plus a constant for the in-memory transports.

Each turn, ``--clients`` connections send one command each (``-P 1``) or
sixteen (``-P 16``), like ``redis-benchmark -c 50`` on one key, or the
memcached protocol's ``set`` and ``get`` (``mc``); the replies are read and
thrown away.  Run it twice, before and after a change,
and compare; each figure is the best of ``--repeats`` timed rounds.  Set
``PYTHONHASHSEED=0`` (``make bench`` does): with random hash seeds, runs of
the same code differed by up to a third.

    .venv/bin/python bench/hotpath.py [--replicas 0] [--rounds 200] [--out FILE]

``make bench`` runs it with replicas 0 and 1 and writes
``bench/results/hotpath-r0.json`` and ``hotpath-r1.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import MemoryReactor, StringTransport  # noqa: E402
from twisted.test.iosim import IOPump, connectedServerAndClient  # noqa: E402

from kvha import compiled  # noqa: E402
from kvha.data.client import DataNodeClient, _ReadyFactory  # noqa: E402
from kvha.data.engine import MemoryEngine  # noqa: E402
from kvha.data.server import DataNode, DataServerFactory  # noqa: E402
from kvha.flush import TurnFlusher  # noqa: E402
from kvha.gctune import tune_gc  # noqa: E402
from kvha.master.health import NodeLink  # noqa: E402
from kvha.master.memcache import MemcacheFactory  # noqa: E402
from kvha.master.resp import RespFactory  # noqa: E402
from kvha.master.router import PartitionPolicy, Router  # noqa: E402
from kvha.ring import Ring  # noqa: E402

SECRET = b"hot-path-benchmark-secret-0123"
KEY = b"key:__rand_int__"  # redis-benchmark's key, without -r
#: name: (protocol, one command)
COMMANDS = {
    "SET": ("redis", b"*3\r\n$3\r\nSET\r\n$16\r\n" + KEY + b"\r\n$3\r\nxxx\r\n"),
    "GET": ("redis", b"*2\r\n$3\r\nGET\r\n$16\r\n" + KEY + b"\r\n"),
    "INCR": ("redis", b"*2\r\n$4\r\nINCR\r\n$7\r\ncounter\r\n"),
    "mc set": ("memcached", b"set " + KEY + b" 0 0 3\r\nxxx\r\n"),
    "mc get": ("memcached", b"get " + KEY + b"\r\n"),
}


class Master:
    """A router over three data nodes, its Redis factory, and the pumps between them."""

    def __init__(self, replicas: int, clients: int, protocol: str = "redis") -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        flusher = TurnFlusher(self.clock)
        self.pumps: list[IOPump] = []
        self.nodes: list[DataNode] = []
        links = {}
        for i in range(3):
            node_id = f"data{i + 1}"
            node = DataNode(node_id, MemoryEngine(), SECRET, self.clock)
            node.startService()
            self.nodes.append(node)
            client = DataNodeClient(MemoryReactor(), "tcp:127.0.0.1:1", SECRET, clock=self.clock)
            link = NodeLink(node_id, client, self.clock)
            factory = _ReadyFactory(client, SECRET, "master-1", self.clock, 5.0, 1 << 26)
            factory.flusher = flusher
            server_factory = DataServerFactory(node)
            _client, _server, pump = connectedServerAndClient(
                lambda f=server_factory: f.buildProtocol(None),  # type: ignore[misc]
                lambda f=factory: f.buildProtocol(None),  # type: ignore[misc]
                clock=self.clock,
            )
            self.pumps.append(pump)
            links[node_id] = link
        ring = Ring.build([(n, 1.0) for n in links], 64)
        router = Router(
            ring, links, replicas, [PartitionPolicy("default")], self.clock, random.Random(1)
        )
        kind = RespFactory if protocol == "redis" else MemcacheFactory
        clients_factory = kind(
            router,
            b"default",
            self.clock,
            max_connections=clients + 10,
            max_in_flight=256,
            max_value_bytes=1 << 20,
            flusher=flusher,
        )
        self.conns: list[tuple[Any, StringTransport]] = []
        for _ in range(clients):
            proto = clients_factory.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            self.conns.append((proto, transport))
        self.settle()
        down = [link.node_id for link in links.values() if link.state != "up"]
        if down:
            raise RuntimeError(f"data nodes not up: {down}")

    def settle(self) -> None:
        """Run turns until nothing moves: requests out, replies back, replies sent."""
        for _ in range(50):
            moved = False
            self.clock.advance(0)
            for pump in self.pumps:
                moved = pump.pump() or moved
            self.clock.advance(0)
            if not moved:
                return
        raise RuntimeError("the in-memory cluster did not settle")

    def turn(self, data: bytes) -> int:
        """Every connection sends ``data``; returns the reply bytes they got."""
        for proto, _transport in self.conns:
            proto.dataReceived(data)
        self.settle()
        got = 0
        for _proto, transport in self.conns:
            got += len(transport.value())
            transport.clear()
        return got


def measure(
    replicas: int, clients: int, pipelines: Sequence[int], rounds: int, repeats: int
) -> dict[str, dict[str, float]]:
    """CPU us per request, per pipeline depth and command: the best of ``repeats`` samples.

    The samples of every figure are interleaved over the whole run, so a few
    seconds in which the machine was slow (it is shared) spoil one sample of
    each figure rather than every sample of one.
    """
    cases = []
    for pipeline in pipelines:
        for name, (protocol, command) in COMMANDS.items():
            master = Master(replicas, clients, protocol)
            data = command * pipeline
            if master.turn(data) == 0:  # warm-up, and a check that replies come back
                raise RuntimeError(f"{name}: no reply")
            turns = max(1, rounds // pipeline)
            cases.append((f"P{pipeline}", name, master, data, turns * clients * pipeline, turns))
    best: dict[tuple[str, str], float] = {}
    gc.collect()
    for _ in range(repeats):
        for depth, name, master, data, requests, turns in cases:
            began = time.process_time()
            for _ in range(turns):
                master.turn(data)
            per_request = (time.process_time() - began) / requests * 1e6
            best[depth, name] = min(best.get((depth, name), float("inf")), per_request)
    out: dict[str, dict[str, float]] = {}
    for (depth, name), us in best.items():
        out.setdefault(depth, {})[name] = us
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    tune_gc()  # the collector settings every kvha node runs with
    results = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "build": compiled.describe(),
        "replicas": args.replicas,
        "clients": args.clients,
    }
    results.update(measure(args.replicas, args.clients, (1, 16), args.rounds, args.repeats))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(
        f"{results['python']} ({results['build']}), replicas {args.replicas}, "
        f"{args.clients} connections: CPU us per request (master and data nodes in one"
        " process, no sockets)"
    )
    for pipeline in (1, 16):
        row = results[f"P{pipeline}"]
        print(f"  -P {pipeline:<2}  " + "  ".join(f"{k} {v:6.2f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
