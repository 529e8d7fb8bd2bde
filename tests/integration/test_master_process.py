"""A real master in front of real data nodes, driven by real memcached clients."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError
from twisted.internet import defer, reactor, threads

from kvha.data.client import DataNodeClient
from tests.conftest import SECRET, memcache_stats

pytestmark = pytest.mark.process

#: Every client socket operation gives up after this long, so no test can hang on one.
CLIENT_TIMEOUT = 5.0


def _client(master: Any, **kwargs: Any) -> Client:
    kwargs.setdefault("default_noreply", False)  # pymemcache's default is noreply
    kwargs.setdefault("connect_timeout", CLIENT_TIMEOUT)
    kwargs.setdefault("timeout", CLIENT_TIMEOUT)
    return Client(("127.0.0.1", master.port), **kwargs)


def _gat(client: Client, key: str, expire: int) -> Any:
    """``gat`` through the client when it has it, else as a raw command on its socket."""
    if hasattr(client, "gat"):
        return client.gat(key, expire)
    reply = client.raw_command(f"gat {expire} {key}".encode(), b"END\r\n")  # END stripped
    if not reply:
        return None
    header, rest = reply.split(b"\r\n", 1)
    length = int(header.split()[3])
    return rest[:length]


# memccapable ---------------------------------------------------------------------------------


def test_memccapable_ascii_suite_passes_against_a_master(nodes):  # type: ignore[no-untyped-def]
    """memccapable -a passes all 27 ASCII tests against a master in front of 3 data nodes."""
    tool = shutil.which("memccapable")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("memccapable (libmemcached-tools) is required in CI but is not installed")
        pytest.skip("memccapable not installed (apt-get install libmemcached-tools)")
    master, _ = nodes.cluster(n_data=3, replicas=1)
    result = subprocess.run(
        [tool, "-a", "-h", "127.0.0.1", "-p", str(master.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All tests passed" in output, output
    assert output.count("[pass]") == 27, output
    assert "Traceback" not in master.log()


# pymemcache: every command --------------------------------------------------------------------


def test_pymemcache_every_command_with_and_without_noreply(nodes):  # type: ignore[no-untyped-def]
    """Every memcached command pymemcache has works through the master, noreply included."""
    master, _ = nodes.cluster(n_data=3, replicas=1)
    c = _client(master)
    try:
        # set / get / get_many
        assert c.set("k1", b"v1") is True
        assert c.get("k1") == b"v1"
        assert c.set("k2", b"v2", noreply=True) is True
        assert c.get("k2") == b"v2"
        assert c.set("k3", b"v3", flags=7) is True
        # raw_command strips the end token.
        assert c.raw_command(b"get k3", b"END\r\n") == b"VALUE k3 7 2\r\nv3\r\n"
        assert c.get_many(["k1", "k2", "missing", "k3"]) == {"k1": b"v1", "k2": b"v2", "k3": b"v3"}
        assert c.get("missing") is None

        # gets / cas
        value, token = c.gets("k1")
        assert value == b"v1" and token.isdigit()
        assert c.cas("k1", b"v1b", token) is True
        assert c.get("k1") == b"v1b"
        assert c.cas("k1", b"stale", token) is False  # EXISTS: the token is spent
        assert c.get("k1") == b"v1b"
        assert c.cas("nokey", b"x", token) is None  # NOT_FOUND
        _, token = c.gets("k1")
        c.cas("k1", b"v1c", token, noreply=True)
        assert c.get("k1") == b"v1c"
        c.cas("k1", b"never", token, noreply=True)  # stale: silently refused
        assert c.get("k1") == b"v1c"

        # add / replace
        assert c.add("k1", b"no") is False
        assert c.add("a1", b"yes") is True
        assert c.get("a1") == b"yes"
        c.add("a2", b"quiet", noreply=True)
        assert c.get("a2") == b"quiet"
        c.add("a2", b"loud", noreply=True)
        assert c.get("a2") == b"quiet"
        assert c.replace("nokey", b"x") is False
        assert c.get("nokey") is None
        assert c.replace("a1", b"replaced") is True
        assert c.get("a1") == b"replaced"
        c.replace("a2", b"replaced2", noreply=True)
        assert c.get("a2") == b"replaced2"

        # append / prepend
        assert c.append("a1", b"+tail") is True
        assert c.prepend("a1", b"head+") is True
        assert c.get("a1") == b"head+replaced+tail"
        c.append("a1", b"!", noreply=True)
        c.prepend("a1", b"!", noreply=True)
        assert c.get("a1") == b"!head+replaced+tail!"
        assert c.append("nokey", b"x") is False
        assert c.prepend("nokey", b"x") is False
        assert c.get("nokey") is None

        # incr / decr
        assert c.incr("n", 1) is None  # NOT_FOUND
        assert c.set("n", b"10") is True
        assert c.incr("n", 5) == 15
        assert c.decr("n", 3) == 12
        assert c.decr("n", 100) == 0  # memcached clamps at zero
        assert c.incr("n", 7, noreply=True) is None
        assert c.get("n") == b"7"
        assert c.decr("n", 2, noreply=True) is None
        assert c.get("n") == b"5"
        assert c.set("big", str(2**64 - 1).encode()) is True
        assert c.incr("big", 1) == 0  # wraps at 2**64 like memcached
        with pytest.raises(MemcacheClientError):
            c.incr("k2", 1)  # non-numeric value

        # touch / gat (a key with an expiry, made permanent; another made to expire)
        assert c.set("t1", b"soon", expire=1) is True
        assert c.set("t2", b"later") is True
        assert c.set("t3", b"later3") is True
        assert c.touch("t2", 1) is True
        c.touch("t3", 1, noreply=True)
        assert c.touch("nokey", 10) is False
        assert _gat(c, "t1", 0) == b"soon"  # exptime 0: never expires
        assert _gat(c, "nokey", 0) is None
        time.sleep(2.1)
        assert c.get("t1") == b"soon"
        assert c.get("t2") is None
        assert c.get("t3") is None

        # delete
        assert c.delete("k3") is True
        assert c.get("k3") is None
        assert c.delete("k3", noreply=False) is False
        c.delete("k2", noreply=True)
        assert c.get("k2") is None

        # stats / version
        stats = c.stats()
        assert stats[b"data_nodes_up"] == 3
        assert stats[b"data_nodes"] == 3
        assert stats[b"cmd_get"] > 0 and stats[b"cas_hits"] >= 2 and stats[b"cas_badval"] >= 1
        assert c.version().startswith(b"1.6.0 kvha/")

        # flush_all
        assert c.flush_all() is True
        assert c.get_many(["k1", "a1", "a2", "n", "t1"]) == {}
        assert c.set("f1", b"x") is True
        c.flush_all(noreply=True)
        assert c.get("f1") is None
    finally:
        c.close()
    assert "Traceback" not in master.log()


def test_pymemcache_cas_races_have_exactly_one_winner(nodes):  # type: ignore[no-untyped-def]
    """Two clients that both ``gets`` a key and race their ``cas``: exactly one wins, 50 times."""
    master, _ = nodes.cluster(n_data=3, replicas=1)
    clients = [_client(master), _client(master)]
    barrier = threading.Barrier(2, timeout=CLIENT_TIMEOUT)
    tokens: list[Any] = [None, None]
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def racer(i: int, key: str) -> None:
        try:
            barrier.wait()
            results[i] = clients[i].cas(key, f"winner-{i}".encode(), tokens[i])
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    try:
        for race in range(50):
            key = f"race-{race}"
            assert clients[0].set(key, b"start") is True
            for i in range(2):
                value, tokens[i] = clients[i].gets(key)
                assert value == b"start"
            assert tokens[0] == tokens[1]
            results[:] = [None, None]
            threads_ = [threading.Thread(target=racer, args=(i, key)) for i in range(2)]
            for t in threads_:
                t.start()
            for t in threads_:
                t.join(2 * CLIENT_TIMEOUT)
            assert not errors, errors
            assert sorted(results, key=repr) == [False, True], f"race {race}: {results}"
            winner = results.index(True)
            assert clients[1 - winner].get(key) == f"winner-{winner}".encode()
    finally:
        for client in clients:
            client.close()


def test_concurrent_incr_from_two_threads_counts_exactly(nodes):  # type: ignore[no-untyped-def]
    """2 threads x 500 ``incr`` on one key end at exactly 1000, each value seen once."""
    master, _ = nodes.cluster(n_data=3, replicas=1)
    setup = _client(master)
    assert setup.set("counter", b"0") is True
    seen: list[list[int]] = [[], []]
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        client = _client(master)
        try:
            for _ in range(500):
                seen[i].append(client.incr("counter", 1))
        except BaseException as e:
            errors.append(e)
        finally:
            client.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(25)
    assert not any(t.is_alive() for t in workers), "incr workers did not finish in time"
    assert not errors, errors
    assert setup.get("counter") == b"1000"
    assert sorted(seen[0] + seen[1]) == list(range(1, 1001))
    setup.close()


# Fail-over ------------------------------------------------------------------------------------

LOAD_THREADS = 3
LOAD_SECONDS = 4.0
KILL_AT = 1.5
#: Each load thread does one set and one get per period: ~3 x 2 x 500 ops/s in all.
PERIOD = 0.002
DETECTION_LIMIT = 1.0


def _kill_under_load(
    load: Any, stop: threading.Event, victim: Any, progress: Any, join_timeout: float
) -> tuple[float, int]:
    """``load(n)`` in LOAD_THREADS threads; kill -9 ``victim`` at KILL_AT; stop at LOAD_SECONDS.

    Returns when the kill happened and ``progress()`` just before it.
    """
    workers = [threading.Thread(target=load, args=(n,)) for n in range(LOAD_THREADS)]
    began = time.monotonic()
    for t in workers:
        t.start()
    try:
        time.sleep(KILL_AT)
        before_kill = progress()
        killed_at = time.monotonic()
        victim.kill()
        time.sleep(max(0.0, LOAD_SECONDS - (time.monotonic() - began)))
    finally:
        stop.set()
        for t in workers:
            t.join(join_timeout)
    assert not any(t.is_alive() for t in workers), "load threads did not stop"
    return killed_at, before_kill


def _detection(failures: list[Any], killed_at: float, record_property: Any) -> float:
    """How long after the kill failures went on (each failure starts with its time), recorded."""
    detection = max((f[0] - killed_at for f in failures), default=0.0)
    detection = max(detection, 0.0)
    record_property("detection_time_s", round(detection, 4))
    record_property("failed_ops", len(failures))
    return detection


def _assert_failover(
    failures: list[Any], wrong: list[Any], killed_at: float, detection: float
) -> None:
    early = [f for f in failures if f[0] < killed_at]
    assert not early, f"operations failed before the kill: {early[:5]}"
    assert not wrong, f"reads of acknowledged keys returned the wrong value: {wrong[:5]}"
    assert detection < DETECTION_LIMIT, f"failures went on for {detection:.3f}s: {failures[-5:]}"


def _assert_readable_by_redis(reader: Any, acked: dict[bytes, bytes]) -> None:
    keys = sorted(acked)
    for start in range(0, len(keys), 200):
        chunk = keys[start : start + 200]
        got = reader.mget(chunk)
        lost = [k for k, v in zip(chunk, got) if v != acked[k]]
        assert not lost, f"acknowledged writes lost or wrong: {lost[:5]}"


def test_kill_9_of_a_data_node_under_load(nodes, record_property):  # type: ignore[no-untyped-def]
    """kill -9 of one of 3 data nodes under load: failures stop within 1 s, no write is lost."""
    master, data = nodes.cluster(n_data=3, replicas=1)
    victim = data[1]
    acked: dict[str, bytes] = {}
    failures: list[tuple[float, str, str]] = []  # (time, op, error)
    wrong: list[tuple[str, Any, bytes]] = []  # a read of an acknowledged key that was wrong
    lock = threading.Lock()
    stop = threading.Event()
    counts = [0] * LOAD_THREADS

    def load(n: int) -> None:
        rng = random.Random(n)
        client = _client(master, timeout=2.0)
        mine: list[str] = []
        next_at = time.monotonic()
        i = 0
        try:
            while not stop.is_set() and i < int(LOAD_SECONDS / PERIOD) + 1:
                key = f"load-{n}-{i}"
                value = f"value-{n}-{i}-".encode() + b"x" * (i % 100)
                try:
                    if client.set(key, value) is True:
                        with lock:
                            acked[key] = value
                        mine.append(key)
                    else:
                        failures.append((time.monotonic(), "set", "not stored"))
                except Exception as e:
                    failures.append((time.monotonic(), "set", repr(e)))
                    client.close()  # a failed request may leave the socket mid-reply
                if mine:
                    old = mine[rng.randrange(len(mine))]
                    try:
                        got = client.get(old)
                        if got != acked[old]:
                            wrong.append((old, got, acked[old]))
                    except Exception as e:
                        failures.append((time.monotonic(), "get", repr(e)))
                        client.close()
                counts[n] += 2
                i += 1
                next_at += PERIOD
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        finally:
            client.close()

    killed_at, before_kill = _kill_under_load(load, stop, victim, lambda: len(acked), 10)
    detection = _detection(failures, killed_at, record_property)
    record_property("ops", sum(counts))
    print(
        f"\nkill -9 detection: {detection * 1000:.1f} ms; {len(failures)} failed ops "
        f"of {sum(counts)}; {len(acked)} writes acknowledged ({before_kill} before the kill)"
    )
    _assert_failover(failures, wrong, killed_at, detection)
    assert len(acked) > before_kill + 500, "the load did not go on after the kill"

    # Every acknowledged write is readable, with its value, from the two survivors.
    stats = memcache_stats(master.port)
    assert stats["data_nodes_up"] == "2"
    reader = _client(master)
    try:
        keys = sorted(acked)
        for start in range(0, len(keys), 100):
            chunk = keys[start : start + 100]
            got = reader.get_many(chunk)
            missing = [k for k in chunk if got.get(k) != acked[k]]
            assert not missing, f"acknowledged writes lost or wrong: {missing[:5]}"
    finally:
        reader.close()
    assert "Traceback" not in master.log()


# Read balancing -------------------------------------------------------------------------------

BALANCE_GETS = 10_000
BALANCE_KEYS = 200


def _pipelined_gets(port: int, keys: list[bytes], total: int, batch: int = 500) -> int:
    """Send ``total`` single-key gets in batches on one socket; return the hits."""
    hits = 0
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as s:
        sent = 0
        while sent < total:
            n = min(batch, total - sent)
            s.sendall(b"".join(b"get %s\r\n" % keys[(sent + j) % len(keys)] for j in range(n)))
            sent += n
            data = b""
            while data.count(b"END\r\n") < n:
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise ConnectionError("master closed the connection")
                data += chunk
            hits += data.count(b"VALUE ")
    return hits


def _reads(stats: dict[str, str]) -> int:
    return int(stats["get_hits"]) + int(stats["get_misses"])


@pytest_twisted.inlineCallbacks
def test_reads_are_balanced_by_read_weight(nodes):  # type: ignore[no-untyped-def]
    """With read_weight 7 and 3 and a copy of every key on both nodes, reads split 70/30 (±5)."""
    master, data = yield threads.deferToThread(
        nodes.cluster, n_data=2, replicas=1, read_weights=[7, 3]
    )
    keys = [b"balance-%d" % i for i in range(BALANCE_KEYS)]

    def write() -> None:
        client = _client(master)
        try:
            for key in keys:
                assert client.set(key, b"value-" + key) is True
        finally:
            client.close()

    yield threads.deferToThread(write)
    clients = []
    for node in data:
        client = DataNodeClient(reactor, f"tcp:127.0.0.1:{node.port}", SECRET.encode(), "test")
        client.start()
        clients.append(client)
    try:
        yield defer.gatherResults([c.when_ready() for c in clients])
        before = yield defer.gatherResults([c.stats() for c in clients])
        hits = yield threads.deferToThread(_pipelined_gets, master.port, keys, BALANCE_GETS)
        after = yield defer.gatherResults([c.stats() for c in clients])
    finally:
        yield defer.gatherResults([c.stop() for c in clients])
    assert hits == BALANCE_GETS
    deltas = [_reads(a) - _reads(b) for a, b in zip(after, before)]
    assert sum(deltas) == BALANCE_GETS, deltas  # each get read exactly one copy
    shares = [100.0 * d / BALANCE_GETS for d in deltas]
    print(f"\nread shares with read_weight 7/3: {shares[0]:.2f}% / {shares[1]:.2f}%")
    assert abs(shares[0] - 70.0) <= 5.0, shares
    assert abs(shares[1] - 30.0) <= 5.0, shares


# Configuration errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"replicas": 3}, "master.cluster.replicas: 3 replicas need at least 4 data nodes"),
        ({"health": {"ping_intervall": 1}}, "master.health: unknown key 'ping_intervall'"),
        ({"limits": {"max_in_flight": 0}}, "master.limits.max_in_flight: must be at least 1"),
    ],
)
def test_bad_master_config_exits_non_zero_naming_the_key(nodes, extra, expected):  # type: ignore[no-untyped-def]
    """A master with a bad config exits non-zero and names the offending key path."""
    data = [nodes.data(f"d{i}") for i in range(2)]  # never started: the master must not get far
    replicas = extra.pop("replicas", 1)
    master = nodes.master("badmaster", data, replicas=replicas, **extra)
    master.start(wait=False)
    try:
        code = master.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("a master with a bad config kept running")
    err = master.output()  # stdout and stderr
    assert code != 0
    assert expected in err + master.log(), err


def test_free_port_stays_below_the_ephemeral_range_and_never_repeats() -> None:
    """Ports handed to test servers cannot be taken by an outgoing connection meanwhile."""
    from kvha.procs import _ephemeral_low, free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(10000 <= p < _ephemeral_low() for p in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[0]))  # and it really is free


def test_kill_9_of_a_data_node_under_pipelined_redis_load(nodes, record_property):  # type: ignore[no-untyped-def]
    """redis-py pipelines of SET and GET (the callback hot path) while a data node is killed.

    Failures stop within a second, no read of an acknowledged key is wrong,
    and every acknowledged SET is readable afterwards from the survivors.
    """
    import redis

    from kvha.procs import free_port

    redis_port = free_port()
    master, data = nodes.cluster(
        n_data=3, replicas=1, redis={"listen": f"tcp:{redis_port}:interface=127.0.0.1"}
    )
    acked: dict[bytes, bytes] = {}
    failures: list[tuple[float, str]] = []
    wrong: list[tuple[bytes, Any, bytes]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(n: int) -> None:
        rng = random.Random(n)
        client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=2.0)
        mine: list[bytes] = []
        i = 0
        deadline = time.monotonic() + LOAD_SECONDS + 5
        try:
            while not stop.is_set() and time.monotonic() < deadline and i < 20_000:
                pipe = client.pipeline(transaction=False)
                keys = [b"pipe-%d-%d" % (n, i + j) for j in range(8)]
                values = [b"v-%d-%d-" % (n, i + j) + b"x" * ((i + j) % 64) for j in range(8)]
                for key, value in zip(keys, values):
                    pipe.set(key, value)
                olds = [mine[rng.randrange(len(mine))] for _ in range(8)] if mine else []
                for old in olds:
                    pipe.get(old)
                i += 8
                try:
                    replies = pipe.execute(raise_on_error=False)
                except redis.RedisError as e:
                    failures.append((time.monotonic(), repr(e)))
                    client.connection_pool.disconnect()
                    continue
                for key, value, reply in zip(keys, values, replies[:8]):
                    if reply is True:
                        with lock:
                            acked[key] = value
                        mine.append(key)
                    else:
                        failures.append((time.monotonic(), repr(reply)))
                for old, reply in zip(olds, replies[8:]):
                    if isinstance(reply, Exception):
                        failures.append((time.monotonic(), repr(reply)))
                    elif reply != acked[old]:
                        wrong.append((old, reply, acked[old]))
                time.sleep(0.002)
        finally:
            client.close()

    killed_at, before_kill = _kill_under_load(load, stop, data[1], lambda: len(acked), 15)
    detection = _detection(failures, killed_at, record_property)
    print(
        f"\npipelined kill -9: {len(failures)} failures, the last {detection * 1000:.1f} ms after "
        f"the kill; {len(acked)} SETs acknowledged ({before_kill} before the kill)"
    )
    _assert_failover(failures, wrong, killed_at, detection)
    assert len(acked) > before_kill + 500, "the load did not go on after the kill"

    assert memcache_stats(master.port)["data_nodes_up"] == "2"  # the kill did happen
    reader = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5.0)
    try:
        _assert_readable_by_redis(reader, acked)
    finally:
        reader.close()
    assert "Traceback" not in master.log()


def test_kill_9_of_a_data_node_under_pipelined_incr_and_mset(nodes, record_property):  # type: ignore[no-untyped-def]
    """redis-py pipelines of MSET and INCR (ApplyMany; INCRs pipelined to the primary).

    Each thread pipelines four INCRs of its own counter with an MSET of
    five keys and a read of an earlier one, while a data node is killed.
    Every acknowledged INCR must count: a counter's acknowledged values rise
    strictly, and its final value is at least the last one acknowledged.
    Every acknowledged MSET is readable afterwards, and no read is wrong.
    """
    import dataclasses

    import redis

    from kvha.config import ClusterConfig
    from kvha.procs import free_port
    from kvha.ring import Ring

    redis_port = free_port()
    master, data = nodes.cluster(
        n_data=3, replicas=1, redis={"listen": f"tcp:{redis_port}:interface=127.0.0.1"}
    )
    # The killed node (data2) is the primary of thread 0's counter, the other
    # copy of thread 1's, and holds nothing of thread 2's: the ring the
    # master builds from its configuration says which names do that.
    vnodes = next(f.default for f in dataclasses.fields(ClusterConfig) if f.name == "vnodes")
    ring = Ring.build([(f"data{i + 1}", 1.0) for i in range(3)], vnodes)
    wanted = [lambda c: c[0] == "data2", lambda c: c[1] == "data2", lambda c: "data2" not in c]
    counters = [
        next(
            name
            for name in (b"counter-%d-%d" % (n, k) for k in range(1000))
            if wanted[n % 3](ring.nodes_for(b"default", name, 2))
        )
        for n in range(LOAD_THREADS)
    ]
    acked: dict[bytes, bytes] = {}
    counted: list[list[int]] = [[] for _ in range(LOAD_THREADS)]
    failures: list[tuple[float, str]] = []
    wrong: list[tuple[bytes, Any, bytes]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def load(n: int) -> None:
        rng = random.Random(n)
        client = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=2.0)
        counter = counters[n]
        mine: list[bytes] = []
        i = 0
        deadline = time.monotonic() + LOAD_SECONDS + 5
        try:
            while not stop.is_set() and time.monotonic() < deadline and i < 20_000:
                pipe = client.pipeline(transaction=False)
                pairs = {b"mset-%d-%d" % (n, i + j): b"m-%d-%d" % (n, i + j) for j in range(5)}
                i += 5
                pipe.mset(pairs)
                for _ in range(4):
                    pipe.incr(counter)
                old = mine[rng.randrange(len(mine))] if mine else None
                if old is not None:
                    pipe.get(old)
                try:
                    replies = pipe.execute(raise_on_error=False)
                except redis.RedisError as e:
                    failures.append((time.monotonic(), repr(e)))
                    client.connection_pool.disconnect()
                    continue
                if replies[0] is True:
                    with lock:
                        acked.update(pairs)
                    mine.extend(pairs)
                else:
                    failures.append((time.monotonic(), repr(replies[0])))
                for reply in replies[1:5]:
                    if isinstance(reply, int):
                        counted[n].append(reply)
                    else:
                        failures.append((time.monotonic(), repr(reply)))
                if old is not None:
                    reply = replies[5]
                    if isinstance(reply, Exception):
                        failures.append((time.monotonic(), repr(reply)))
                    elif reply != acked[old]:
                        wrong.append((old, reply, acked[old]))
                time.sleep(0.002)
        finally:
            client.close()

    killed_at, before_kill = _kill_under_load(
        load, stop, data[1], lambda: sum(len(c) for c in counted), 15
    )
    detection = _detection(failures, killed_at, record_property)
    incrs = sum(len(c) for c in counted)
    print(
        f"\nINCR/MSET kill -9: {len(failures)} failures, the last {detection * 1000:.1f} ms after "
        f"the kill; {incrs} INCRs ({before_kill} before the kill) and {len(acked)} MSET keys "
        "acknowledged"
    )
    _assert_failover(failures, wrong, killed_at, detection)
    assert incrs > before_kill + 200, "the load did not go on after the kill"
    for values in counted:
        assert values == sorted(set(values)), "a counter's acknowledged values did not rise"

    assert memcache_stats(master.port)["data_nodes_up"] == "2"  # the kill did happen
    reader = redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5.0)
    try:
        for n, values in enumerate(counted):
            final = int(reader.get(counters[n]))
            assert values and final >= values[-1], (n, final, values[-3:])
        _assert_readable_by_redis(reader, acked)
    finally:
        reader.close()
    assert "Traceback" not in master.log()
