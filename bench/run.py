"""``make bench``: kvha beside real redis-server and memcached, in one run.

Measures, on this machine and in this run:

1. pipelined set/get throughput of one data node through the internal client
   (``memory`` engine, and ``log`` with fsync ``everysec`` and ``always``);
2. ``redis-benchmark -t set,get -c 50 -P 16`` against a real redis-server;
3. resident memory after loading 1,000,000 records (16-byte keys, 100-byte
   values) into a ``memory`` data node and into a real memcached.

Prints a table and writes ``bench/results/latest.md`` and ``latest.json``.
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
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import defer, task  # noqa: E402

from kvha.data.client import DataNodeClient  # noqa: E402
from kvha.procs import NodeProcess, free_port, rss_bytes, wait_for_port  # noqa: E402

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


class Server:
    """A real redis-server or memcached child on a free loopback port."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def start_kvha(workdir: str, name: str, engine: str, fsync: str = "everysec") -> NodeProcess:
    port = free_port()
    state = os.path.join(workdir, name)
    os.makedirs(state, exist_ok=True)
    config = os.path.join(workdir, f"{name}.yaml")
    data_config(config, name, port, state, engine, fsync)
    node = NodeProcess("data", config, os.path.join(workdir, f"{name}.log"), port=port)
    node.start()
    return node


def start_cluster(workdir: str, replicas: int, engines: tuple[str, ...]) -> list[NodeProcess]:
    """Data nodes with ``engines`` and one master; the master is last."""
    procs = []
    addresses = []
    for i, engine in enumerate(engines, 1):
        node = start_kvha(workdir, f"c{replicas}-data{i}", engine)
        procs.append(node)
        addresses.append((f"data{i}", node.port))
    port = free_port()
    config = os.path.join(workdir, f"c{replicas}-master.yaml")
    nodes = "\n".join(
        f"      - {{id: {nid}, address: 'tcp:127.0.0.1:{p}'}}" for nid, p in addresses
    )
    with open(config, "w") as f:
        f.write(
            f"master:\n  id: bench-master\n  secret: '{SECRET}'\n"
            f"  memcached: {{listen: 'tcp:{port}:interface=127.0.0.1'}}\n"
            f"  cluster:\n    replicas: {replicas}\n    nodes:\n{nodes}\n"
        )
    master = NodeProcess(
        "master", config, os.path.join(workdir, f"c{replicas}-master.log"), port=port
    )
    master.start()
    wait_until_up(port, len(engines))
    procs.append(master)
    return procs


def wait_until_up(port: int, nodes: int, timeout: float = 20.0) -> None:
    from pymemcache.client.base import Client

    deadline = time.monotonic() + timeout
    client = Client(("127.0.0.1", port), timeout=2)
    while time.monotonic() < deadline:
        try:
            if int(client.stats().get(b"data_nodes_up", 0)) == nodes:
                client.close()
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise TimeoutError("the master's data nodes did not come up")


def memcslap(port: int, test: str, concurrency: int, execute: int) -> float:
    """Operations per second that memcslap reports for one test."""
    out = subprocess.run(
        [
            "memcslap",
            f"--servers=127.0.0.1:{port}",
            f"--test={test}",
            f"--concurrency={concurrency}",
            f"--execute-number={execute}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    for line in out.splitlines():
        if line.startswith(f"Time to {test}"):
            words = line.split()
            keys = int(words[3])
            seconds = float(words[-2])
            return keys / seconds
    raise RuntimeError(f"unexpected memcslap output:\n{out}")


def bench_memcslap(workdir: str, execute: int) -> dict[str, Any]:
    """memcslap get/set, 50 threads: real memcached, then a master over 3 data nodes."""
    port = free_port()
    argv = ["memcached", "-p", str(port), "-l", "127.0.0.1", "-m", "1024"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    server = Server(argv, port)
    try:
        direct = {t: memcslap(port, t, 50, execute * 10) for t in ("set", "get")}
    finally:
        server.stop()
    procs = start_cluster(workdir, 1, ("memory", "log", "log"))
    try:
        master = {t: memcslap(procs[-1].port, t, 50, execute) for t in ("set", "get")}
    finally:
        for proc in procs:
            proc.stop()
    return {"memcached": direct, "kvha_master_replicas_1": master}


@defer.inlineCallbacks
def pipelined(client: DataNodeClient, op: str, count: int, window: int, value: bytes) -> Any:
    """Run ``count`` operations with up to ``window`` in flight; return ops/s."""
    done = 0
    issued = 0
    finished: defer.Deferred = defer.Deferred()
    began = time.perf_counter()

    def issue() -> None:
        nonlocal issued
        key = b"key:%012d" % (issued % 100_000)
        issued += 1
        if op == "set":
            d = client.set(b"bench", key, value)
        else:
            d = client.get(b"bench", key)
        d.addCallbacks(complete, finished.errback)

    def complete(_: Any) -> None:
        nonlocal done
        done += 1
        if done == count:
            finished.callback(None)
        elif issued < count:
            issue()

    for _ in range(min(window, count)):
        issue()
    yield finished
    return count / (time.perf_counter() - began)


@defer.inlineCallbacks
def bench_data_node(reactor: Any, workdir: str, engine: str, fsync: str, ops: int) -> Any:
    node = start_kvha(workdir, f"{engine}-{fsync}", engine, fsync)
    client = DataNodeClient(reactor, f"tcp:127.0.0.1:{node.port}", SECRET.encode(), "bench")
    client.start()
    try:
        yield client.when_ready()
        value = b"v" * 100
        set_rate = yield pipelined(client, "set", ops, 256, value)
        get_rate = yield pipelined(client, "get", ops, 256, value)
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
        f"Machine: {results['machine']}; Python {results['python']}.",
        "",
        "## Data node throughput (one client, 256 requests in flight)",
        "",
        "| target | set ops/s | get ops/s | set vs redis -P16 | get vs redis -P16 |",
        "|---|---:|---:|---:|---:|",
    ]
    redis = results["redis"]
    lines.append(
        f"| redis-server (redis-benchmark -c 50 -P 16) | {redis['set_ops']:,.0f} | "
        f"{redis['get_ops']:,.0f} | 1.00 | 1.00 |"
    )
    for row in results["data_node"]:
        lines.append(
            f"| kvha data node, {row['engine']} (fsync {row['fsync']}) | {row['set_ops']:,.0f} | "
            f"{row['get_ops']:,.0f} | {row['set_ops'] / redis['set_ops']:.2f} | "
            f"{row['get_ops'] / redis['get_ops']:.2f} |"
        )
    slap = results.get("memcslap")
    if slap:
        d, k = slap["memcached"], slap["kvha_master_replicas_1"]
        lines += [
            "",
            "## memcslap, 50 threads (memcached text protocol)",
            "",
            "| target | set ops/s | get ops/s | set ratio | get ratio |",
            "|---|---:|---:|---:|---:|",
            f"| memcached | {d['set']:,.0f} | {d['get']:,.0f} | 1.00 | 1.00 |",
            f"| kvha master, 3 data nodes, replicas 1 | {k['set']:,.0f} | {k['get']:,.0f} | "
            f"{k['set'] / d['set']:.2f} | {k['get'] / d['get']:.2f} |",
        ]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", type=int, default=100_000, help="operations per throughput run")
    parser.add_argument("--records", type=int, default=1_000_000, help="records for memory")
    parser.add_argument(
        "--memcslap-execute", type=int, default=400, help="memcslap --execute-number per thread"
    )
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    for tool in ("redis-server", "redis-benchmark", "memcached"):
        if shutil.which(tool) is None:
            sys.exit(
                f"{tool} is not installed (apt-get install redis-server redis-tools memcached)"
            )

    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="kvha-bench-") as workdir:
            results["redis"] = redis_benchmark(args.ops * 4)
            results["data_node"] = []
            for engine, fsync in (("memory", "everysec"), ("log", "everysec"), ("log", "always")):
                row = yield bench_data_node(reactor, workdir, engine, fsync, args.ops)
                results["data_node"].append(row)
                print(
                    f"  {engine}/{fsync}: set {row['set_ops']:,.0f}/s get {row['get_ops']:,.0f}/s"
                )
            if shutil.which("memcslap"):
                results["memcslap"] = bench_memcslap(workdir, args.memcslap_execute)
            if args.records:
                kvha_mem = yield load_kvha_memory(reactor, workdir, args.records)
                results["memory"] = {
                    "records": args.records,
                    "kvha": kvha_mem,
                    "memcached": load_memcached(args.records),
                }
        report = render(results)
        print(report)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "latest.md"), "w") as f:
            f.write(report)
        with open(os.path.join(args.out, "latest.json"), "w") as f:
            json.dump(results, f, indent=2)

    task.react(lambda reactor: run(reactor))


if __name__ == "__main__":
    main()
