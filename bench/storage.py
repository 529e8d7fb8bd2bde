"""Storage engine benchmark: every engine through a real data node.

For each engine (``memory``, ``log``, ``disk``, ``mmap``, ``mmap-index``;
fsync ``everysec``) and each size (100,000 and 1,000,000 records of 16-byte
keys and 100-byte values by default), one ``twistd kvha-data`` process is
loaded through the internal protocol and measured:

* set and get throughput (one client, 256 requests in flight; gets in
  random order over the loaded keys);
* bytes on disk per record (every file under the engine's directory);
* resident memory, split into anonymous and file-backed pages;
* restart time, after kill -9 and after a clean stop: the engine's own open
  time from the node's log, and the wall time from starting the process to
  its first reply (Python and Twisted start-up included).

``--big`` adds the ``mmap-index`` run the issue asks for: 1 GB of 10 KiB
values (``--big-records``), resident memory after loading and after reading
every value once.  ``--compaction`` (on by default) times the steps of an
in-process compaction of the two segment engines, to show how long a request
can wait behind one.

Writes ``bench/results/storage.md`` and ``storage.json`` (under PyPy:
``storage-pypy.md`` and ``storage-pypy.json``).  Every load is
bounded in count.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import defer, task  # noqa: E402

from kvha.data.client import DataNodeClient  # noqa: E402
from kvha.procs import NodeProcess, free_port  # noqa: E402

SECRET = "bench-cluster-secret-0123456789"
PARTITION = b"bench"
WINDOW = 256
ENGINES = ("memory", "log", "disk", "mmap", "mmap-index")
OPEN_RE = re.compile(r"opened (\S+) store: (\d+) records, high water \d+, in ([0-9.]+)s")


def memory_of(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                out[name] = int(rest.split()[0]) * 1024
    return out


def dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class Node:
    """One data node process with its config, restartable."""

    def __init__(self, workdir: str, name: str, engine: str, storage: dict[str, Any]) -> None:
        self.engine = engine
        self.port = free_port()
        self.state = os.path.join(workdir, name)
        os.makedirs(self.state, exist_ok=True)
        config = os.path.join(workdir, f"{name}.yaml")
        knobs = "".join(f", {k}: {v}" for k, v in storage.items())
        with open(config, "w") as f:
            f.write(
                f"data:\n  id: {name}\n  listen: 'tcp:{self.port}:interface=127.0.0.1'\n"
                f"  state_dir: '{self.state}'\n  secret: '{SECRET}'\n"
                f"  storage: {{engine: {engine}{knobs}}}\n"
            )
        self.proc = NodeProcess(
            "data", config, os.path.join(workdir, f"{name}.log"), port=self.port
        )
        self.starts = 0

    def start(self) -> None:
        self.proc.start(timeout=600)
        self.starts += 1

    def open_seconds(self) -> float:
        """The engine's open time the node logged at its last start.

        The log file is written with a delay, so wait for that start's line.
        """
        deadline = time.monotonic() + 30
        while True:
            found = OPEN_RE.findall(self.proc.log())
            if len(found) >= self.starts:
                return float(found[self.starts - 1][2])
            if time.monotonic() > deadline:
                raise TimeoutError(f"no 'opened' line for start {self.starts}")
            time.sleep(0.05)

    def engine_bytes(self) -> int:
        if self.engine == "memory":
            return 0
        return dir_bytes(os.path.join(self.state, self.engine))


@defer.inlineCallbacks
def pipelined(client: DataNodeClient, requests: Any, count: int) -> Any:
    """Run ``count`` requests (``requests(i)`` makes the i-th) with WINDOW in flight; ops/s."""
    done = 0
    issued = 0
    finished: defer.Deferred = defer.Deferred()
    began = time.perf_counter()

    def issue() -> None:
        nonlocal issued
        d = requests(issued)
        issued += 1
        d.addCallbacks(complete, finished.errback)

    def complete(_: Any) -> None:
        nonlocal done
        done += 1
        if done == count:
            finished.callback(None)
        elif issued < count:
            issue()

    for _ in range(min(WINDOW, count)):
        issue()
    yield finished
    return count / (time.perf_counter() - began)


def key(i: int) -> bytes:
    return b"k%015d" % i


@defer.inlineCallbacks
def connect(reactor: Any, node: Node) -> Any:
    client = DataNodeClient(reactor, f"tcp:127.0.0.1:{node.port}", SECRET.encode(), "bench")
    client.start()
    yield client.when_ready()
    return client


@defer.inlineCallbacks
def restart(reactor: Any, node: Node) -> Any:
    """Start a stopped node; return the seconds until its first reply, and its stats.

    The port listens before the store opens (twistd binds it first), so the
    time to the first answered request is what a client waits.
    """
    began = time.perf_counter()
    node.start()
    client = yield connect(reactor, node)
    stats = yield client.stats()
    wall = time.perf_counter() - began
    yield client.stop()
    return wall, stats


@defer.inlineCallbacks
def pause(reactor: Any, seconds: float) -> Any:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    yield d


@defer.inlineCallbacks
def bench_engine(
    reactor: Any, workdir: str, engine: str, records: int, value_size: int, gets: int
) -> Any:
    """Load ``records`` into a fresh node and measure everything; return one table row."""
    name = f"{engine}-{records}-{value_size}"
    node = Node(workdir, name, engine, {})
    node.start()
    row: dict[str, Any] = {"engine": engine, "records": records, "value_bytes": value_size}
    client = yield connect(reactor, node)
    try:
        value = bytes(random.Random(records).randrange(256) for _ in range(value_size))
        empty = memory_of(node.proc.pid)
        row["set_ops"] = yield pipelined(
            client, lambda i: client.set(PARTITION, key(i), value), records
        )
        order = random.Random(1)
        row["get_ops"] = yield pipelined(
            client, lambda i: client.get(PARTITION, key(order.randrange(records))), gets
        )
        yield pause(reactor, 1.5)  # a maintenance tick or two: everysec syncs
        stats = yield client.stats()
        assert int(stats["records"]) == records, stats["records"]
        mem = memory_of(node.proc.pid)
        row.update(
            rss=mem["VmRSS"],
            rss_anon=mem["RssAnon"],
            rss_file=mem["RssFile"],
            empty_rss=empty["VmRSS"],
            disk_bytes=node.engine_bytes(),
        )
        row["disk_per_record"] = row["disk_bytes"] / records
    finally:
        yield client.stop()
    if engine != "memory":
        node.proc.kill()
        row["crash_restart_wall"], stats = yield restart(reactor, node)
        row["crash_restart_open"] = node.open_seconds()
        assert int(stats["records"]) == records, stats["records"]
        node.proc.stop()
        row["clean_restart_wall"], stats = yield restart(reactor, node)
        row["clean_restart_open"] = node.open_seconds()
        assert int(stats["records"]) == records, stats["records"]
        row["rss_after_restart"] = memory_of(node.proc.pid)["VmRSS"]
    node.proc.stop()
    shutil.rmtree(node.state, ignore_errors=True)
    return row


@defer.inlineCallbacks
def bench_big(reactor: Any, workdir: str, records: int, value_size: int) -> Any:
    """mmap-index with ~1 GB of large values: resident memory while loading and reading."""
    node = Node(workdir, "big", "mmap-index", {})
    node.start()
    row: dict[str, Any] = {"records": records, "value_bytes": value_size}
    client = yield connect(reactor, node)
    try:
        value = os.urandom(value_size)
        row["set_ops"] = yield pipelined(
            client, lambda i: client.set(PARTITION, key(i), value), records
        )
        yield pause(reactor, 1.5)
        row["rss_loaded"] = memory_of(node.proc.pid)
        row["get_ops"] = yield pipelined(
            client, lambda i: client.get(PARTITION, key(i)), records
        )  # every value read once
        row["rss_read"] = memory_of(node.proc.pid)
        row["disk_bytes"] = node.engine_bytes()
    finally:
        yield client.stop()
    node.proc.kill()
    row["crash_restart_wall"], _stats = yield restart(reactor, node)
    row["crash_restart_open"] = node.open_seconds()
    row["rss_after_restart"] = memory_of(node.proc.pid)
    node.proc.stop()
    shutil.rmtree(node.state, ignore_errors=True)
    return row


def bench_compaction(workdir: str, records: int) -> list[dict[str, Any]]:
    """Time each step of a compaction of half-dead segments, in process, for both engines.

    The engine runs as in a data node: fsync everysec, maintenance every
    100 ms of (measured) time, one compaction step per reactor turn.
    """
    from twisted.internet.task import Clock

    from kvha.data.diskengine import DiskEngine
    from kvha.data.mmapindex import MmapIndexEngine
    from kvha.record import pack

    rows = []
    for cls in (DiskEngine, MmapIndexEngine):
        directory = os.path.join(workdir, f"compact-{cls.name}")
        clock = Clock()
        clock.advance(time.time())
        engine = cls(directory, clock, fsync="everysec")
        engine.open()
        value = b"v" * 100
        version = 0
        for rnd in range(2):
            for i in range(records):
                if rnd and i % 2:
                    continue  # half the records overwritten: half the bytes dead
                version += 1
                engine.put(PARTITION, key(i), pack(value, version))
                if i % 1000 == 0:
                    engine.commit()
        engine.seal()
        engine.sync()
        dead, total = engine.garbage()
        assert engine.start_compaction(force=True)
        steps = []
        ticks = []
        began = time.perf_counter()
        last_tick = clock.seconds()
        while engine.compacting:
            t = time.perf_counter()
            _one_step(clock)
            steps.append(time.perf_counter() - t)
            clock.rightNow += steps[-1]
            if clock.seconds() - last_tick >= 0.1:
                t = time.perf_counter()
                engine.maintenance(clock.seconds())
                ticks.append(time.perf_counter() - t)
                last_tick = clock.seconds()
        steps.sort()
        rows.append(
            {
                "engine": cls.name,
                "records": records,
                "victim_bytes": total,
                "dead_bytes": dead,
                "moved": engine.records_moved,
                "steps": len(steps),
                "step_ms_median": statistics.median(steps) * 1000,
                "step_ms_p99": steps[int(len(steps) * 0.99)] * 1000,
                "step_ms_max": steps[-1] * 1000,
                "maintenance_ms_max": max(ticks, default=0.0) * 1000,
                "seconds": time.perf_counter() - began,
            }
        )
        engine.close()
        shutil.rmtree(directory, ignore_errors=True)
    return rows


def _one_step(clock: Any) -> None:
    """Run the delayed calls due now, not the ones they schedule: one reactor turn."""
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def render(results: dict[str, Any]) -> str:
    lines = [
        f"# kvha storage engines, {results['when']}",
        "",
        f"Machine: {results['machine']}; Python {results['python']}; fsync everysec; "
        f"16-byte keys, {results['value_bytes']}-byte values; one client, {WINDOW} in flight.",
        "",
        "| engine | records | set ops/s | get ops/s | disk / record | RSS (anon + file) "
        "| restart after kill -9: open / first reply | clean restart: open / first reply |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["engines"]:
        restart = clean = "n/a (starts empty)"
        if "crash_restart_open" in r:
            restart = f"{r['crash_restart_open']:.3f} s / {r['crash_restart_wall']:.2f} s"
            clean = f"{r['clean_restart_open']:.3f} s / {r['clean_restart_wall']:.2f} s"
        lines.append(
            f"| {r['engine']} | {r['records']:,} | {r['set_ops']:,.0f} | {r['get_ops']:,.0f} | "
            f"{r['disk_per_record']:.0f} B | {mib(r['rss'])} ({mib(r['rss_anon'])} + "
            f"{mib(r['rss_file'])}) | {restart} | {clean} |"
        )
    big = results.get("big")
    if big:
        gb = big["records"] * big["value_bytes"] / 1e9
        lines += [
            "",
            f"## mmap-index with {gb:.2f} GB of {big['value_bytes'] // 1024} KiB values "
            f"({big['records']:,} records)",
            "",
            "| set ops/s | get ops/s | disk | RSS loaded | RSS after reading every value "
            "| restart after kill -9: open / first reply | RSS after restart |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {big['set_ops']:,.0f} | {big['get_ops']:,.0f} | {mib(big['disk_bytes'])} | "
            f"{mib(big['rss_loaded']['VmRSS'])} | {mib(big['rss_read']['VmRSS'])} | "
            f"{big['crash_restart_open']:.3f} s / {big['crash_restart_wall']:.2f} s | "
            f"{mib(big['rss_after_restart']['VmRSS'])} |",
        ]
    comp = results.get("compaction")
    if comp:
        lines += [
            "",
            "## Compaction steps (in process as in a node: fsync everysec, maintenance every "
            "100 ms; half of the sealed bytes dead)",
            "",
            "| engine | records | victims | moved | steps | step median | p99 | max "
            "| longest maintenance | total |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in comp:
            lines.append(
                f"| {c['engine']} | {c['records']:,} | {mib(c['victim_bytes'])} | "
                f"{c['moved']:,} | {c['steps']:,} | {c['step_ms_median']:.2f} ms | "
                f"{c['step_ms_p99']:.2f} ms | {c['step_ms_max']:.2f} ms | "
                f"{c['maintenance_ms_max']:.2f} ms | {c['seconds']:.1f} s |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--records",
        default="100000,1000000",
        help="comma-separated record counts to load into each engine",
    )
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--gets", type=int, default=100_000, help="gets per throughput run")
    parser.add_argument("--big", action="store_true", help="also the 1 GB mmap-index run")
    parser.add_argument("--big-records", type=int, default=100_000)
    parser.add_argument("--big-value-bytes", type=int, default=10 * 1024)
    parser.add_argument("--compaction-records", type=int, default=200_000, help="0 to skip")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--workdir", default=None, help="where the nodes keep their files")
    args = parser.parse_args()
    sizes = [int(n) for n in args.records.split(",") if n]
    engines = [e for e in args.engines.split(",") if e]

    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "value_bytes": args.value_bytes,
        "engines": [],
    }

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        with tempfile.TemporaryDirectory(prefix="kvha-storage-", dir=args.workdir) as workdir:
            for records in sizes:
                for engine in engines:
                    row = yield bench_engine(
                        reactor, workdir, engine, records, args.value_bytes, args.gets
                    )
                    results["engines"].append(row)
                    print(
                        f"  {engine} {records:,}: set {row['set_ops']:,.0f}/s "
                        f"get {row['get_ops']:,.0f}/s rss {mib(row['rss'])} "
                        f"restart {row.get('crash_restart_open', 0):.3f}s",
                        flush=True,
                    )
            if args.compaction_records:
                results["compaction"] = bench_compaction(workdir, args.compaction_records)
            if args.big:
                results["big"] = yield bench_big(
                    reactor, workdir, args.big_records, args.big_value_bytes
                )
        report = render(results)
        print(report)
        os.makedirs(args.out, exist_ok=True)
        stem = "storage-pypy" if platform.python_implementation() == "PyPy" else "storage"
        with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
            f.write(report)
        with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
            json.dump(results, f, indent=2)

    task.react(lambda reactor: run(reactor))


if __name__ == "__main__":
    main()
