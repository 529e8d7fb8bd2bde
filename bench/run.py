"""``make bench``: kvha beside real redis-server and memcached, in one run.

Measures, on this machine and in this run:

1. pipelined set/get throughput of one data node through the internal client
   (``memory`` engine, and ``log`` with fsync ``everysec`` and ``always``);
2. ``redis-benchmark -t set,get -c 50 -P 16`` against a real redis-server;
3. resident memory after loading 1,000,000 records (16-byte keys, 100-byte
   values) into a ``memory`` data node and into a real memcached.

Prints a table and writes ``bench/results/latest.md`` and ``latest.json``
(under PyPy: ``latest-pypy.md`` and ``latest-pypy.json``).
Every load is bounded in count; nothing here runs without end.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import defer, task  # noqa: E402

from bench import protocols  # noqa: E402
from bench.protocols import Server  # noqa: E402
from bench.storage import pipelined  # noqa: E402
from kvha import compiled  # noqa: E402
from kvha.data.client import DataNodeClient  # noqa: E402
from kvha.procs import NodeProcess, free_port, rss_bytes  # noqa: E402

SECRET = "bench-cluster-secret-0123456789"


def data_config(
    path: str, node_id: str, port: int, state_dir: str, engine: str, fsync: str
) -> None:
    with open(path, "w") as f:
        f.write(
            f"data:\n  id: {node_id}\n  listen: 'tcp:{port}:interface=127.0.0.1'\n"
            f"  state_dir: '{state_dir}'\n  secret: '{SECRET}'\n"
            f"  storage: {{engine: {engine}, fsync: {fsync}}}\n"
        )


def start_kvha(workdir: str, name: str, engine: str, fsync: str = "everysec") -> NodeProcess:
    port = free_port()
    state = os.path.join(workdir, name)
    os.makedirs(state, exist_ok=True)
    config = os.path.join(workdir, f"{name}.yaml")
    data_config(config, name, port, state, engine, fsync)
    node = NodeProcess("data", config, os.path.join(workdir, f"{name}.log"), port=port)
    node.start()
    return node


def _key(i: int) -> bytes:
    return b"key:%012d" % (i % 100_000)


@defer.inlineCallbacks
def bench_data_node(reactor: Any, workdir: str, engine: str, fsync: str, ops: int) -> Any:
    node = start_kvha(workdir, f"{engine}-{fsync}", engine, fsync)
    client = DataNodeClient(reactor, f"tcp:127.0.0.1:{node.port}", SECRET.encode(), "bench")
    client.start()
    try:
        yield client.when_ready()
        value = b"v" * 100
        set_rate = yield pipelined(client, lambda i: client.set(b"bench", _key(i), value), ops)
        get_rate = yield pipelined(client, lambda i: client.get(b"bench", _key(i)), ops)
    finally:
        yield client.stop()
        node.stop()
    return {"engine": engine, "fsync": fsync, "set_ops": set_rate, "get_ops": get_rate}


def redis_benchmark(requests: int) -> dict[str, float]:
    port = free_port()
    server = Server(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], port)
    try:
        out = subprocess.run(
            [
                "redis-benchmark",
                "-p",
                str(port),
                "-t",
                "set,get",
                "-c",
                "50",
                "-P",
                "16",
                "-n",
                str(requests),
                "--csv",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout
    finally:
        server.stop()
    rates = {}
    for row in csv.reader(io.StringIO(out)):
        if len(row) >= 2 and row[0] in ("SET", "GET"):
            rates[row[0].lower() + "_ops"] = float(row[1])
    return rates


@defer.inlineCallbacks
def load_kvha_memory(reactor: Any, workdir: str, records: int) -> Any:
    node = start_kvha(workdir, "memload", "memory")
    client = DataNodeClient(reactor, f"tcp:127.0.0.1:{node.port}", SECRET.encode(), "bench")
    client.start()
    try:
        yield client.when_ready()
        base = rss_bytes(node.pid)
        value = b"v" * 100
        batch = 2000
        for start in range(0, records, batch):
            yield defer.gatherResults(
                [
                    client.set(b"bench", b"k%015d" % i, value)
                    for i in range(start, min(records, start + batch))
                ]
            )
        stats = yield client.stats()
        assert int(stats["records"]) == records, stats["records"]
        rss = rss_bytes(node.pid)
    finally:
        yield client.stop()
        node.stop()
    return {"rss_bytes": rss, "empty_rss_bytes": base}


def load_memcached(records: int) -> dict[str, int]:
    from pymemcache.client.base import Client

    port = free_port()
    argv = ["memcached", "-p", str(port), "-l", "127.0.0.1", "-m", "4096", "-U", "0"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]  # memcached refuses to run as root otherwise
    server = Server(argv, port)
    try:
        base = rss_bytes(server.proc.pid)
        client = Client(("127.0.0.1", port))
        value = b"v" * 100
        batch = 1000
        for start in range(0, records, batch):
            client.set_many(
                {b"k%015d" % i: value for i in range(start, min(records, start + batch))},
                noreply=False,
            )
        items = int(client.stats()[b"curr_items"])
        assert items == records, items
        rss = rss_bytes(server.proc.pid)
        client.close()
    finally:
        server.stop()
    return {"rss_bytes": rss, "empty_rss_bytes": base}


def render(results: dict[str, Any]) -> str:
    lines = [
        f"# kvha benchmark, {results['when']}",
        "",
        f"Machine: {results['machine']}; Python {results['python']}; kvha's hot path"
        f" {results.get('build', 'plain Python')}.",
    ]
    redis = results.get("redis")
    if redis:
        lines += [
            "",
            "## Data node throughput (one client, 256 requests in flight)",
            "",
            "| target | set ops/s | get ops/s | set vs redis -P16 | get vs redis -P16 |",
            "|---|---:|---:|---:|---:|",
            f"| redis-server (redis-benchmark -c 50 -P 16) | {redis['set_ops']:,.0f} | "
            f"{redis['get_ops']:,.0f} | 1.00 | 1.00 |",
        ]
    for row in results.get("data_node", []):
        lines.append(
            f"| kvha data node, {row['engine']} (fsync {row['fsync']}) | {row['set_ops']:,.0f} | "
            f"{row['get_ops']:,.0f} | {row['set_ops'] / redis['set_ops']:.2f} | "
            f"{row['get_ops'] / redis['get_ops']:.2f} |"
        )
    if results.get("protocols"):
        lines += [""] + protocols.render(results["protocols"])
    mem = results.get("memory")
    if mem:
        k, m = mem["kvha"], mem["memcached"]
        lines += [
            "",
            f"## Resident memory with {mem['records']:,} records (16-byte keys, 100-byte values)",
            "",
            "| server | RSS empty | RSS loaded | per record | ratio |",
            "|---|---:|---:|---:|---:|",
            f"| memcached | {m['empty_rss_bytes'] / 2**20:.1f} MiB | "
            f"{m['rss_bytes'] / 2**20:.1f} MiB | {m['rss_bytes'] / mem['records']:.0f} B | 1.00 |",
            f"| kvha memory data node | {k['empty_rss_bytes'] / 2**20:.1f} MiB | "
            f"{k['rss_bytes'] / 2**20:.1f} MiB | {k['rss_bytes'] / mem['records']:.0f} B | "
            f"{k['rss_bytes'] / m['rss_bytes']:.2f} |",
        ]
    return "\n".join(lines) + "\n"


def _stop(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=100_000, help="operations per throughput run")
    parser.add_argument("--records", type=int, default=1_000_000, help="records for memory")
    parser.add_argument(
        "--memcslap-execute", type=int, default=2000, help="memcslap --execute-number per thread"
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument(
        "--sections",
        default="data,protocols,memory",
        help="comma-separated: data (data node throughput), protocols (redis-benchmark and "
        "memcslap against masters and the VIP), memory (1M records vs memcached)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=100_000,
        help="redis-benchmark -n against kvha per test (MSET: a fifth; redis-server: 5x)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per figure; the median is reported"
    )
    parser.add_argument("--quick", action="store_true", help="protocols: replicas 1 only")
    args = parser.parse_args()
    args.sections = set(args.sections.split(","))
    # Stopped with SIGTERM (a timeout, a kill), unwind like Ctrl-C: every
    # section's finally stops the servers and nodes it started.
    signal.signal(signal.SIGTERM, _stop)
    for tool in ("redis-server", "redis-benchmark", "memcached"):
        if shutil.which(tool) is None:
            sys.exit(
                f"{tool} is not installed (apt-get install redis-server redis-tools memcached)"
            )

    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "build": compiled.describe(),
    }

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="kvha-bench-") as workdir:
            if "data" in args.sections:
                results["redis"] = redis_benchmark(args.ops * 4)
                results["data_node"] = []
                for engine, fsync in (
                    ("memory", "everysec"),
                    ("log", "everysec"),
                    ("log", "always"),
                ):
                    row = yield bench_data_node(reactor, workdir, engine, fsync, args.ops)
                    results["data_node"].append(row)
                print(
                    f"  {engine}/{fsync}: set {row['set_ops']:,.0f}/s get {row['get_ops']:,.0f}/s"
                )
            if "protocols" in args.sections:
                results["protocols"] = protocols.run(
                    workdir,
                    args.requests,
                    args.memcslap_execute,
                    quick=args.quick,
                    repeats=args.repeats,
                )
            if args.records and "memory" in args.sections:
                kvha_mem = yield load_kvha_memory(reactor, workdir, args.records)
                results["memory"] = {
                    "records": args.records,
                    "kvha": kvha_mem,
                    "memcached": load_memcached(args.records),
                }
        report = render(results)
        print(report)
        os.makedirs(args.out, exist_ok=True)
        stem = "latest-pypy" if platform.python_implementation() == "PyPy" else "latest"
        with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
            f.write(report)
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump(results, f, indent=2)

    task.react(lambda reactor: run(reactor))


if __name__ == "__main__":
    main()
