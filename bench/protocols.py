"""Client-protocol benchmarks: kvha beside redis-server and memcached, same run.

``redis-benchmark`` (SET, GET, INCR, MSET; 50 clients; unpipelined and
``-P 16``) and ``memcslap`` (get, set; 50 threads) against:

1. redis-server / memcached directly;
2. one kvha master directly, in front of three ``memory`` data nodes, with
   ``replicas: 0`` and with ``replicas: 1``;
3. the full path through the VIP (load balancer -> masters -> data nodes) with
   ``replicas: 1``: the local cluster of ``kvha up`` (two masters behind the
   load-balancer pair) on free ports, with its default ``forward: handoff``,
   with ``forward: proxy``, and with ``forward: kernel`` where nftables can run.

Each kvha run also records the CPU of every kvha process and the machine's
idle share, which tells a saturated process from a saturated machine.

Every kvha node runs under the interpreter running this script, so
``make bench PY=pypy3`` measures kvha on PyPy.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import random
import subprocess
import sys
import time
from typing import Any, Optional

from kvha.config import LocalConfig, LocalDataNode
from kvha.lb.nat import kernel_unavailable
from kvha.local import node_healthy, plan, taken_ports, write_configs
from kvha.procs import NodeProcess, free_port, wait_for_port

SECRET = "bench-cluster-secret-0123456789"
TOKEN = "bench-admin-token-0123456789"
REDIS_TESTS = ("set", "get", "incr", "mset")
#: The label of bench/floor.py's relay in the results.
FLOOR = "floor: Python relay, no work"
#: Masters in the local cluster of ``kvha up`` (the VIP target runs that cluster).
_DEFAULT_MASTERS = next(f.default for f in dataclasses.fields(LocalConfig) if f.name == "masters")


class Server:
    def __init__(self, argv: list[str], port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def redis_benchmark(
    host: str,
    port: int,
    requests: int,
    pipeline: int,
    clients: int = 50,
    tests: tuple[str, ...] = REDIS_TESTS,
) -> dict[str, dict[str, float]]:
    """{test: {rps, p50, p99}} from redis-benchmark's CSV output."""
    out = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            host,
            "-p",
            str(port),
            "-t",
            ",".join(tests),
            "-c",
            str(clients),
            "-n",
            str(requests),
            "-P",
            str(pipeline),
            "--csv",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    ).stdout
    rows = list(csv.reader(io.StringIO(out)))
    header = rows[0] if rows and rows[0][0] == "test" else None
    result = {}
    for row in rows:
        if not row or row[0] == "test":
            continue
        name = row[0].split(" ")[0].lower()
        if name not in REDIS_TESTS:
            continue
        if header:
            cols = dict(zip(header, row))
            result[name] = {
                "rps": float(cols["rps"]),
                "p50": float(cols.get("p50_latency_ms", "nan")),
                "p99": float(cols.get("p99_latency_ms", "nan")),
            }
        else:
            result[name] = {"rps": float(row[1]), "p50": float("nan"), "p99": float("nan")}
    return result


def memcslap(host: str, port: int, test: str, threads: int, execute: int) -> float:
    out = subprocess.run(
        [
            "memcslap",
            f"--servers={host}:{port}",
            f"--test={test}",
            f"--concurrency={threads}",
            f"--execute-number={execute}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith(f"Time to {test}"):
            words = line.split()
            return int(words[3]) / float(words[-2])
    raise RuntimeError(f"unexpected memcslap output:\n{out}")


def _free_base(vip: str, masters: int, attempts: int = 50) -> LocalConfig:
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20000, 60000, 100)
        ports = [free_port() for _ in range(3)]
        config = LocalConfig(
            secret=SECRET,
            admin_token=TOKEN,
            vip=vip,
            redis_port=ports[0],
            memcached_port=ports[1],
            http_port=ports[2],
            base_port=base,
            masters=masters,
            replicas=1,
            data=(
                LocalDataNode(id="data1", engine="memory"),
                LocalDataNode(id="data2", engine="memory"),
                LocalDataNode(id="data3", engine="memory"),
            ),
        )
        if not taken_ports(config, plan(config)):
            return config
    raise RuntimeError("no free port range found")


class Cluster:
    """Three memory data nodes, ``masters`` masters, and (with the VIP) two load balancers."""

    def __init__(
        self,
        workdir: str,
        name: str,
        replicas: int,
        with_lbs: bool,
        masters: int = 1,
        forward: str = "proxy",
    ) -> None:
        # The kernel-forwarding cluster gets a VIP of its own: its table is named after it.
        vip = {"kernel": "127.0.0.102", "handoff": "127.0.0.103"}.get(forward, "127.0.0.101")
        base = _free_base(vip, masters)
        state = os.path.join(workdir, name)
        self.config = dataclasses.replace(base, replicas=replicas, state_dir=state, forward=forward)
        self.nodes = [n for n in plan(self.config) if with_lbs or n.role != "lb"]
        write_configs(self.config, self.nodes)
        self.procs: list[NodeProcess] = []
        master = next(n for n in self.nodes if n.role == "master")
        self.memcached = (master.host, master.port)
        self.redis = (master.extra_ports[0][1], master.extra_ports[0][2])
        if with_lbs:
            self.memcached = (self.config.vip, self.config.memcached_port)
            self.redis = (self.config.vip, self.config.redis_port)

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            proc = NodeProcess(
                node.role,
                node.config_path(self.config.state_dir),
                os.path.join(node.directory(self.config.state_dir), "log"),
                host=node.host,
                port=node.port,
            )
            proc.start(wait=False)
            self.procs.append(proc)
        # Every node serving, down to each load balancer seeing every master
        # up: otherwise the first connections all go to the master that
        # passed its health checks first.
        deadline = time.monotonic() + timeout
        while not all(node_healthy(self.config, node) for node in self.nodes):
            if time.monotonic() > deadline:
                raise TimeoutError("the benchmark cluster did not come up")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def probe(self) -> CpuProbe:
        return CpuProbe([(p.role, p.pid) for p in self.procs])


class CpuProbe:
    """CPU used by each kvha process, and the machine's idle share, over one run.

    Percent of one core per process (from ``/proc/PID/stat``), and of the
    whole machine for ``idle`` (from ``/proc/stat``): what tells a saturated
    process from a saturated machine.
    """

    def __init__(self, procs: list[tuple[str, int]]) -> None:
        self.procs = procs
        self._start: Optional[tuple[float, list[int], tuple[int, int]]] = None

    @staticmethod
    def _ticks(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])  # utime + stime

    @staticmethod
    def _machine() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    def start(self) -> None:
        self._start = (
            time.monotonic(),
            [self._ticks(pid) for _, pid in self.procs],
            self._machine(),
        )

    def stop(self) -> dict[str, Any]:
        assert self._start is not None
        began, ticks, (total0, idle0) = self._start
        elapsed = max(time.monotonic() - began, 1e-9)
        hz = os.sysconf("SC_CLK_TCK")
        out: dict[str, Any] = {}
        for (role, pid), before in zip(self.procs, ticks):
            share = (self._ticks(pid) - before) / hz / elapsed * 100
            out.setdefault(role, []).append(round(share))
        total1, idle1 = self._machine()
        out["idle"] = round((idle1 - idle0) / max(total1 - total0, 1) * 100)
        return out


def cpu_text(cpu: Optional[dict[str, Any]]) -> str:
    """``master 98, data 20+1+0, lb 40+1, idle 24`` (percent of a core; idle: of the machine)."""
    if not cpu:
        return ""
    parts = [
        f"{role} {'+'.join(str(v) for v in shares)}"
        for role, shares in cpu.items()
        if role != "idle"
    ]
    return ", ".join(parts + [f"idle {cpu.get('idle', 0)}"])


def _median_row(rows: list[dict[str, float]]) -> dict[str, Any]:
    """The run with the median ops/s (its own latencies), and every run's ops/s."""
    ordered = sorted(rows, key=lambda r: r["rps"])
    row: dict[str, Any] = dict(ordered[len(ordered) // 2])
    row["runs"] = [r["rps"] for r in rows]
    return row


def redis_suite(
    host: str,
    port: int,
    requests: int,
    pipeline: int,
    probe: Optional[CpuProbe] = None,
) -> dict[str, dict[str, Any]]:
    """One run of each test, one test at a time; MSET (10 keys) gets a fifth as many.

    With a ``probe``, each test's row has the CPU of every kvha process (``cpu``).
    """
    out: dict[str, dict[str, Any]] = {}
    for test in REDIS_TESTS:
        n = requests // 5 if test == "mset" else requests
        if probe is not None:
            probe.start()
        row = redis_benchmark(host, port, n, pipeline, tests=(test,))[test]
        if probe is not None:
            row["cpu"] = probe.stop()
        out[test] = row
    return out


def memcslap_suite(
    host: str, port: int, execute: int, probe: Optional[CpuProbe] = None
) -> dict[str, Any]:
    """One run of set and of get: ``{"set": ops/s, "set_cpu": ..., "get": ..., ...}``."""
    out: dict[str, Any] = {}
    for test in ("set", "get"):
        if probe is not None:
            probe.start()
        out[test] = memcslap(host, port, test, 50, execute)
        if probe is not None:
            out[f"{test}_cpu"] = probe.stop()
    return out


def warm_up(host: str, redis_port: int, memcached_port: int, requests: int) -> None:
    """A run whose figures are thrown away: connections, caches and (PyPy) the JIT warm up."""
    for pipeline in (1, 16):
        redis_benchmark(host, redis_port, requests, pipeline)
    for test in ("set", "get"):
        memcslap(host, memcached_port, test, 50, max(1, requests // 50))


def combine_redis(suites: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The rounds of :func:`redis_suite`: per test the median run, and every run's ops/s."""
    return {test: _median_row([suite[test] for suite in suites]) for test in suites[0]}


def combine_memcslap(suites: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds of :func:`memcslap_suite`: per test the median, every run, the median's CPU."""
    out: dict[str, Any] = {}
    for test in ("set", "get"):
        runs = [suite[test] for suite in suites]
        median = sorted(range(len(runs)), key=lambda i: runs[i])[len(runs) // 2]
        out[test] = runs[median]
        out[f"{test}_runs"] = runs
        if f"{test}_cpu" in suites[median]:
            out[f"{test}_cpu"] = suites[median][f"{test}_cpu"]
    return out


def run(
    workdir: str,
    requests: int,
    memcslap_execute: int,
    quick: bool = False,
    repeats: int = 3,
) -> dict[str, Any]:
    """Every target, one load at a time (two cores), the repeats interleaved.

    redis-server, memcached and every kvha cluster run side by side; each
    round measures every target once, and each figure is the median of
    ``repeats`` rounds.  The machine is shared and its speed drifts by a
    quarter within minutes, so a ratio is only fair between figures taken
    over the same stretch of time: measuring redis-server first and kvha
    ten minutes later was not.  kvha clusters get a warm-up run first
    (redis-server and memcached need none); an idle cluster's pings and
    heartbeats cost little beside the target under load.
    """
    results: dict[str, Any] = {
        "redis": {},
        "memcached": {},
        "repeats": repeats,
        "interleaved": True,
    }
    direct_requests = requests * 5
    servers: list[Server] = []
    clusters: list[tuple[str, Cluster]] = []
    try:
        redis_port = free_port()
        servers.append(
            Server(
                ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                redis_port,
            )
        )
        memcached_port = free_port()
        argv = ["memcached", "-p", str(memcached_port), "-l", "127.0.0.1", "-m", "1024"]
        if os.geteuid() == 0:
            argv += ["-u", "root"]
        servers.append(Server(argv, memcached_port))
        # The floor under any Python master (bench/floor.py): a relay process
        # and a backend process that do nothing but pass requests through.
        floor_port: Optional[int] = None
        if not quick:
            floor = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor.py")
            backend_port = free_port()
            servers.append(
                Server([sys.executable, floor, "backend", str(backend_port)], backend_port)
            )
            floor_port = free_port()
            servers.append(
                Server(
                    [sys.executable, floor, "relay", str(floor_port), str(backend_port)],
                    floor_port,
                )
            )
            for p in (1, 16):  # warm-up (PyPy's JIT)
                redis_benchmark("127.0.0.1", floor_port, requests // 2, p)
        # One master directly; then the local cluster of ``kvha up`` (two
        # masters behind the load-balancer pair) through the VIP.  Each is
        # started before the next picks its ports.
        targets = [
            ("master replicas 0", 0, False, 1, "proxy"),
            ("master replicas 1", 1, False, 1, "proxy"),
            ("VIP replicas 1", 1, True, _DEFAULT_MASTERS, "handoff"),
            ("VIP replicas 1, proxy", 1, True, _DEFAULT_MASTERS, "proxy"),
        ]
        # The same cluster with the load balancers' forward: kernel (nftables),
        # where this machine allows it.
        why_not = kernel_unavailable()
        if why_not:
            results["kernel_forwarding"] = f"not measured: {why_not}"
        else:
            targets.append(("VIP replicas 1, kernel", 1, True, _DEFAULT_MASTERS, "kernel"))
        if quick:
            targets = targets[1:2]
        for label, replicas, lbs, masters, forward in targets:
            name = label.replace(" ", "-").replace(",", "")
            cluster = Cluster(workdir, name, replicas, lbs, masters, forward)
            clusters.append((label, cluster))
            cluster.start()
        for _label, cluster in clusters:
            warm_up(cluster.redis[0], cluster.redis[1], cluster.memcached[1], requests // 2)

        redis_runs: dict[str, list[dict[str, dict[str, Any]]]] = {}
        memcslap_runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(repeats):
            for p in (1, 16):
                redis_runs.setdefault(f"redis-server P{p}", []).append(
                    redis_suite("127.0.0.1", redis_port, direct_requests * (4 if p == 16 else 1), p)
                )
            memcslap_runs.setdefault("memcached", []).append(
                memcslap_suite("127.0.0.1", memcached_port, memcslap_execute * 5)
            )
            if floor_port is not None:
                # As many requests as a kvha target, four times as many with -P 16
                # (at 0.7-1 million a second, 100,000 would last a tenth of a second).
                for p in (1, 16):
                    redis_runs.setdefault(f"{FLOOR} P{p}", []).append(
                        redis_suite("127.0.0.1", floor_port, requests * (4 if p == 16 else 1), p)
                    )
            for label, cluster in clusters:
                probe = cluster.probe()
                host, port = cluster.redis
                for p in (1, 16):
                    redis_runs.setdefault(f"{label} P{p}", []).append(
                        redis_suite(host, port, requests, p, probe)
                    )
                host, port = cluster.memcached
                memcslap_runs.setdefault(label, []).append(
                    memcslap_suite(host, port, memcslap_execute, probe)
                )
        for key, suites in redis_runs.items():
            results["redis"][key] = combine_redis(suites)
        for key, mc_suites in memcslap_runs.items():
            results["memcached"][key] = combine_memcslap(mc_suites)
    finally:
        for _label, cluster in reversed(clusters):
            cluster.stop()
        for server in servers:
            server.stop()
    return results


def render(results: dict[str, Any]) -> list[str]:
    repeats = results.get("repeats", 1)
    lines = [
        "## Redis protocol: redis-benchmark, 50 clients",
        "",
        f"Each figure is the median of {repeats} runs (p50/p99: that run's); kvha targets had a "
        "warm-up run first.  MSET sets 10 keys per command."
        + (
            "  Every server ran throughout, and each round measured every target once, so the"
            " runs of all targets are spread over the same stretch of time."
            if results.get("interleaved")
            else ""
        ),
        "",
        "The VIP targets run the cluster of `kvha up`: two load balancers, two masters, three"
        " data nodes.  `VIP replicas 1` is its default, `forward: handoff`: the load"
        " balancer passes each accepted connection to a master's process over a Unix socket"
        " and is then out of its path.  `VIP replicas 1, proxy` relays every byte through the"
        " load balancer's process (`forward: proxy`, what load balancers whose masters are on"
        " other hosts use); `VIP replicas 1, kernel` has the load balancers write nftables"
        " DNAT instead (`forward: kernel`).  `"
        + FLOOR
        + "` is bench/floor.py: a Python process on kvha's reactor that passes each"
        " request to a second one and the `+OK` back, parsing nothing, and sends replies"
        " as a master does (once per turn, straight to the socket): one hop through"
        " Python and back, the floor under any master before it does any work."
        + (
            f"  Kernel forwarding was {results['kernel_forwarding']}."
            if results.get("kernel_forwarding")
            else ""
        ),
        "",
        "| target | pipeline | test | ops/s | p50 ms | p99 ms | ratio to redis-server | runs |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    redis = results["redis"]
    for label, tests in redis.items():
        target, pipe = label.rsplit(" P", 1)
        direct: Optional[dict[str, Any]] = redis.get(f"redis-server P{pipe}")
        for test, row in tests.items():
            ratio = row["rps"] / direct[test]["rps"] if direct and test in direct else float("nan")
            runs = " / ".join(f"{r:,.0f}" for r in row.get("runs", [row["rps"]]))
            lines.append(
                f"| {target} | {pipe} | {test.upper()} | {row['rps']:,.0f} | {row['p50']:.2f} | "
                f"{row['p99']:.2f} | {ratio:.2f} | {runs} |"
            )
    lines += [
        "",
        "## memcached protocol: memcslap, 50 threads (memcslap reports no latency percentiles)",
        "",
        "| target | set ops/s | get ops/s | set ratio | get ratio | set runs | get runs |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    mc = results["memcached"]
    direct_mc = mc.get("memcached", {})
    for label, row in mc.items():
        sr = row["set"] / direct_mc["set"] if direct_mc else float("nan")
        gr = row["get"] / direct_mc["get"] if direct_mc else float("nan")
        runs = [
            " / ".join(f"{r:,.0f}" for r in row.get(f"{t}_runs", [row[t]])) for t in ("set", "get")
        ]
        lines.append(
            f"| {label} | {row['set']:,.0f} | {row['get']:,.0f} | {sr:.2f} | {gr:.2f} | "
            f"{runs[0]} | {runs[1]} |"
        )
    cpu_rows = [
        (f"{label.rsplit(' P', 1)[0]}, -P {label.rsplit(' P', 1)[1]}", test.upper(), row["cpu"])
        for label, tests in redis.items()
        for test, row in tests.items()
        if row.get("cpu")
    ]
    cpu_rows += [
        (f"{label}, memcslap", test, row[f"{test}_cpu"])
        for label, row in mc.items()
        for test in ("set", "get")
        if row.get(f"{test}_cpu")
    ]
    if cpu_rows:
        lines += [
            "",
            "## CPU of each kvha process during the median run",
            "",
            "Percent of one core per process; idle is the whole machine's idle share "
            "(load generator and kvha together on its cores).",
            "",
            "| target | test | CPU |",
            "|---|---|---|",
        ]
        lines += [f"| {target} | {test} | {cpu_text(cpu)} |" for target, test, cpu in cpu_rows]
    return lines
