"""Partition quotas and default TTLs: the data node's rules, and the whole path through a master.

Store-level tests pin the rules down (CLOCK eviction, refusal, what a write
counts); the in-process cluster tests drive a write load larger than the
quota through the memcached, Redis and HTTP protocols and check the bound
across all copies.  Sizes are ``len(key) + len(packed record)``, the unit
every engine reports in ``bytes:{partition}``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.task import Clock

from kvha import wire
from kvha.data.engine import MemoryEngine
from kvha.data.quota import PartitionRule
from kvha.data.store import IncrMode, Status, Store, StoreMode
from kvha.master.partitions import copy_shares, node_tables
from kvha.master.router import OutOfSpace, PartitionPolicy
from kvha.record import HEADER_SIZE, pack
from kvha.ring import Ring
from tests.inprocess import Cluster
from tests.test_data_server import authed, make_node  # noqa: F401  (fixture)
from tests.test_http_api import Web
from tests.test_partitions import Line, bulk, resp

START = 1_700_000_000.0
P = b"cache"


def size(key: bytes, value: bytes) -> int:
    return len(key) + HEADER_SIZE + len(value)


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def store(clock: Clock) -> Store:
    s = Store(MemoryEngine(), clock.seconds)
    s.open()
    return s


# Evict ------------------------------------------------------------------------------


def test_evict_keeps_a_node_within_its_limit_under_any_load(store: Store) -> None:
    """Writing 20 times the limit never leaves the partition above it after a write."""
    limit = 20_000
    store.configure_partitions({P: PartitionRule(limit, evict=True)})
    rng = random.Random(7)
    peak = 0
    for i in range(4000):
        key = b"k%d" % rng.randrange(3000)
        store.set(P, key, b"x" * rng.randrange(1, 200), version=i + 1)
        peak = max(peak, store.engine.bytes_used(P))
    assert peak <= limit
    assert store.rules[P].evicted > 0
    assert store.stats()["evictions"] == store.rules[P].evicted


def test_evict_is_approximately_lru(store: Store) -> None:
    """A cache-aside client reading hot keys while cold ones churn keeps hitting the hot ones."""
    store.configure_partitions({P: PartitionRule(30_000, evict=True)})  # ~230 records
    hot = [b"hot%d" % i for i in range(50)]
    version = 0
    hits = misses = 0
    for i in range(5000):
        version += 1
        store.set(P, b"cold%d" % i, b"c" * 100, version=version)
        if i % 20 == 0:
            for key in hot:
                if store.get(P, key) is not None:
                    hits += 1 if i >= 1000 else 0
                    continue
                misses += 1 if i >= 1000 else 0
                version += 1
                store.set(P, key, b"h" * 100, version=version)  # read-through refill
    assert hits / (hits + misses) > 0.95, (hits, misses)
    assert store.get(P, b"cold100") is None  # written once, never read: long gone


def test_evict_never_evicts_the_key_just_written(store: Store) -> None:
    """A record larger than the limit evicts everything else and stays."""
    store.configure_partitions({P: PartitionRule(1000, evict=True)})
    for i in range(5):
        store.set(P, b"k%d" % i, b"x" * 100, version=i + 1)
    store.set(P, b"big", b"y" * 2000, version=10)
    assert store.engine.keys(P) == [b"big"]


def test_other_partitions_are_not_evicted(store: Store) -> None:
    """Eviction removes only the full partition's records."""
    store.configure_partitions({P: PartitionRule(2000, evict=True)})
    store.set(b"other", b"k", b"v" * 500, version=1)
    for i in range(100):
        store.set(P, b"k%d" % i, b"x" * 100, version=i + 2)
    assert store.get(b"other", b"k") is not None


def test_lowering_a_limit_evicts_at_once(store: Store) -> None:
    """A new, lower limit is enforced when it arrives, not at the next write."""
    for i in range(100):
        store.set(P, b"k%d" % i, b"x" * 100, version=i + 1)
    store.configure_partitions({P: PartitionRule(3000, evict=True)})
    assert store.engine.bytes_used(P) <= 3000


def test_marks_do_not_outlive_their_keys(store: Store, clock: Clock) -> None:
    """Expired, swept, flushed or retained-away keys leave no GCLOCK counts behind."""
    store.configure_partitions({P: PartitionRule(1 << 30, evict=True)})
    now_ms = int(clock.seconds() * 1000)
    for i in range(100):
        store.set(P, b"k%d" % i, b"x", expires_ms=now_ms + 1000, version=i + 1)
    assert len(store.rules[P].referenced) == 100
    clock.advance(2)
    store.sweep(1000)
    assert store.rules[P].referenced == {}
    store.set(P, b"a", b"x", version=500)
    store.flush(P)
    assert store.rules[P].referenced == {}


def test_unchanged_rules_keep_their_marks(store: Store) -> None:
    """Re-sending the same table (every map change does) keeps the GCLOCK state."""
    store.configure_partitions({P: PartitionRule(10_000, evict=True)})
    store.set(P, b"k", b"v", version=1)
    rule = store.rules[P]
    store.configure_partitions({P: PartitionRule(10_000, evict=True)})
    assert store.rules[P] is rule and b"k" in rule.referenced


# Reject -----------------------------------------------------------------------------


def test_reject_refuses_a_write_that_would_pass_the_limit(store: Store) -> None:
    """At the primary a growing write over the limit is NO_SPACE and nothing changes."""
    limit = 1000
    store.configure_partitions({P: PartitionRule(limit, evict=False)})
    i = 0
    while True:
        key = b"k%d" % i
        result = store.store(StoreMode.SET, P, key, b"x" * 100)
        if result.status is Status.NO_SPACE:
            break
        assert result.status is Status.STORED
        i += 1
    assert store.get(P, key) is None
    used = store.engine.bytes_used(P)
    assert used <= limit < used + size(key, b"x" * 100)
    assert store.rules[P].rejected == 1
    # Writes that do not grow the partition pass; so do deletes.
    assert store.store(StoreMode.SET, P, b"k0", b"y" * 50).status is Status.STORED
    assert store.delete(P, b"k1").status is Status.DELETED
    assert store.store(StoreMode.ADD, P, b"new", b"z" * 10).status is Status.STORED
    assert store.incr(P, b"n", IncrMode.REDIS_INT, b"1").status in (
        Status.STORED,
        Status.NO_SPACE,
    )
    assert store.engine.bytes_used(P) <= limit


def test_reject_checks_every_conditional_write(store: Store) -> None:
    """add, replace, append, prepend, cas and incr all refuse to grow a full partition."""
    store.configure_partitions({P: PartitionRule(200, evict=False)})
    assert store.store(StoreMode.SET, P, b"a", b"1" * 100).status is Status.STORED
    assert store.store(StoreMode.APPEND, P, b"a", b"2" * 100).status is Status.NO_SPACE
    assert store.store(StoreMode.PREPEND, P, b"a", b"2" * 100).status is Status.NO_SPACE
    assert store.store(StoreMode.REPLACE, P, b"a", b"2" * 200).status is Status.NO_SPACE
    assert store.store(StoreMode.ADD, P, b"b", b"2" * 100).status is Status.NO_SPACE
    version = store.get(P, b"a").version  # type: ignore[union-attr]
    assert store.store(StoreMode.CAS, P, b"a", b"2" * 200, cas=version).status is Status.NO_SPACE
    assert store.incr(P, b"counter" * 20, IncrMode.REDIS_INT, b"5").status is Status.NO_SPACE
    assert store.get(P, b"a").value == b"1" * 100  # type: ignore[union-attr]


def test_replicated_writes_are_not_refused(store: Store) -> None:
    """A copy applies what its primary accepted, so copies never disagree on a refusal."""
    store.configure_partitions({P: PartitionRule(100, evict=False)})
    assert store.apply(P, b"k", pack(b"x" * 500, 5)).status is Status.STORED


# Default TTL ------------------------------------------------------------------------


def test_default_ttl_applies_to_primary_writes_without_expiry(store: Store, clock: Clock) -> None:
    """set/add/cas and a new counter get the default TTL; an explicit expiry wins; append keeps."""
    store.configure_partitions({P: PartitionRule(0, ttl_ms=60_000)})
    now_ms = int(clock.seconds() * 1000)
    assert store.store(StoreMode.SET, P, b"a", b"v").record.expires_ms == now_ms + 60_000  # type: ignore[union-attr]
    assert (
        store.store(StoreMode.ADD, P, b"b", b"v", expires_ms=now_ms + 5).record.expires_ms
        == now_ms + 5
    )  # type: ignore[union-attr]
    assert store.incr(P, b"c", IncrMode.REDIS_INT, b"1").record.expires_ms == now_ms + 60_000  # type: ignore[union-attr]
    clock.advance(10)
    assert store.store(StoreMode.APPEND, P, b"a", b"w").record.expires_ms == now_ms + 60_000  # type: ignore[union-attr]
    assert store.store(StoreMode.SET, b"other", b"a", b"v").record.expires_ms == 0  # type: ignore[union-attr]


# The table on the wire --------------------------------------------------------------


def test_data_node_takes_the_table_from_the_newest_map(make_node: Any) -> None:  # noqa: F811
    """Partitions installs the rules; an older epoch is ignored; ragged fields are refused."""
    node = make_node()
    conn = authed(node)
    reply = conn.call(wire.Partitions(5, [P, b"t"], [4096, 0], b"\x01\x00", [0, 1000]))
    assert isinstance(reply, wire.Result) and reply.status == Status.OK
    assert node.store.rules[P].limit == 4096 and node.store.rules[P].evict
    assert node.store.rules[b"t"].ttl_ms == 1000
    stale = conn.call(wire.Partitions(4, [], [], b"", []))
    assert isinstance(stale, wire.Result) and stale.status == Status.STALE
    assert P in node.store.rules
    bad = conn.call(wire.Partitions(6, [P], [1, 2], b"\x00", [0]))
    assert isinstance(bad, wire.Error) and bad.code == wire.E_BAD_REQUEST
    stats = node.stats()
    assert stats[f"limit:{P.decode()}"] == 4096


def test_node_shares_add_up_to_the_copies() -> None:
    """Per-node limits are the quota times each node's share; the shares sum to the copy count."""
    ring = Ring.build([("a", 1.0), ("b", 1.0), ("c", 2.0)], 64)
    shares = copy_shares(ring, 2)
    assert sum(shares.values()) == pytest.approx(2.0)
    tables = node_tables([PartitionPolicy("q", max_bytes=1_000_000, when_full="evict")], [ring], 2)
    total = sum(t[0][1] for t in tables.values())
    assert 2_000_000 <= total <= 2_000_000 + 3
    assert tables["c"][0][1] > tables["a"][0][1]
    assert node_tables([PartitionPolicy("free")], [ring], 2) == {"a": [], "b": [], "c": []}


# Through a master, in process --------------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(n=3, replicas=1)
    c.set_partitions(
        PartitionPolicy("default"),
        PartitionPolicy("cache", max_bytes=64 * 1024, when_full="evict"),
        PartitionPolicy("store", max_bytes=16 * 1024, when_full="reject"),
        PartitionPolicy("ttl", default_ttl_ms=30_000),
    )
    yield c
    c.stop()


def partition_bytes(cluster: Cluster, partition: bytes) -> list[int]:
    return [node.store.engine.bytes_used(partition) for node in cluster.nodes.values()]


def test_evict_partition_stays_within_max_bytes_under_a_larger_load(
    cluster: Cluster, record_property: Any
) -> None:
    """16x the quota written through memcached: the partition stays within max_bytes + slack."""
    conn = Line(cluster.memcache_factory(b"cache"))
    max_bytes = 64 * 1024
    copies = cluster.router.copies
    rng = random.Random(3)
    written = 0
    worst = 0
    for i in range(8000):
        value = b"v" * rng.randrange(50, 200)
        assert conn.send(b"set key%d 0 0 %d\r\n%s\r\n" % (i, len(value), value)) == b"STORED\r\n"
        written += size(b"key%d" % i, value)
        if i % 100 == 0:
            worst = max(worst, sum(partition_bytes(cluster, b"cache")) // copies)
    per_node = partition_bytes(cluster, b"cache")
    held = sum(per_node) // copies
    worst = max(worst, held)
    limits = {n: node.store.rules[b"cache"].limit for n, node in cluster.nodes.items()}
    assert all(b <= limits[n] for b, n in zip(per_node, cluster.nodes))
    assert written > 16 * max_bytes
    # The slack: rounding of the per-node shares (a few bytes per node).
    assert worst <= max_bytes + len(cluster.nodes)
    assert held > 0.9 * max_bytes  # and it is used, not emptied
    evicted = sum(n.store.rules[b"cache"].evicted for n in cluster.nodes.values())
    record_property("evict_written_bytes", written)
    record_property("evict_worst_held_bytes", worst)
    record_property("evict_evictions", evicted)
    print(
        f"\nevict: wrote {written} B into a {max_bytes} B quota; worst held {worst} B "
        f"({worst / max_bytes:.3f} of quota), per node {per_node} of {list(limits.values())}, "
        f"{evicted} evictions"
    )
    # The master's stats agree with the nodes.
    stats = conn.send(b"stats\r\n")
    assert b"STAT bytes %d\r\n" % held in stats


def test_reject_partition_refuses_in_every_protocol_and_stores_nothing(cluster: Cluster) -> None:
    """Full: memcached SERVER_ERROR, Redis -OOM, HTTP 507; the refused key is on no copy."""
    mc = Line(cluster.memcache_factory(b"store"))
    value = b"x" * 200
    i = 0
    while True:
        reply = mc.send(b"set k%d 0 0 %d\r\n%s\r\n" % (i, len(value), value))
        if reply != b"STORED\r\n":
            break
        i += 1
    assert reply == b"SERVER_ERROR out of memory storing object\r\n"
    refused = b"k%d" % i
    assert all(n.store.engine.get(b"store", refused) is None for n in cluster.nodes.values())
    assert mc.send(b"get %s\r\n" % refused) == b"END\r\n"
    copies = cluster.router.copies
    assert sum(partition_bytes(cluster, b"store")) // copies <= 16 * 1024
    # Every copy of every stored key holds it: nothing was half-stored.
    for j in range(i):
        key = b"k%d" % j
        values = [
            cluster.nodes[link.node_id].store.get(b"store", key)
            for link in cluster.router.copies_of(b"store", key)
        ]
        assert all(v is not None and v.value == value for v in values), key
    # Each node enforces its own share: fill every node's remaining room with
    # small keys, so that a larger write is refused whichever node is primary.
    for n in range(1000):
        mc.send(b"set s%d 0 0 1\r\nx\r\n" % n)
    redis = Line(cluster.resp_factory(b"store"))
    assert redis.send(resp("SET", "r", "y" * 100)) == (
        b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
    )
    assert redis.send(resp("APPEND", "k0", "more" * 20)).startswith(b"-OOM ")
    assert redis.send(resp("GET", "r")) == bulk(None)
    web = Web(cluster)
    full = web.request("PUT", "/v1/p/store/k/h", b"z" * 100)
    assert full.status == 507 and full.error()["status"] == "insufficient_storage"
    assert web.request("GET", "/v1/p/store/k/h").status == 404
    assert redis.send(resp("SET", "k0", "short")) == b"+OK\r\n"  # shrinking is fine
    # Deleting makes room again (on the node that decides: h's primary).
    primary = cluster.router.copies_of(b"store", b"h")[0]
    same = [
        b"k%d" % j
        for j in range(1, i)
        if cluster.router.copies_of(b"store", b"k%d" % j)[0] is primary
    ]
    for key in same[:2]:
        assert mc.send(b"delete %s\r\n" % key) == b"DELETED\r\n"
    assert web.request("PUT", "/v1/p/store/k/h", b"z" * 100).status == 200


def test_router_raises_out_of_space(cluster: Cluster) -> None:
    """The router turns a primary's NO_SPACE into OutOfSpace for every protocol."""
    failures: list[Any] = []
    for i in range(200):
        cluster.router.set(b"store", b"k%d" % i, b"v" * 200).addErrback(failures.append)
    assert failures and failures[0].check(OutOfSpace)


def test_default_ttl_through_the_master(cluster: Cluster) -> None:
    """A value set without expiry gets the partition's default_ttl, the same on every copy."""
    conn = Line(cluster.resp_factory(b"ttl"))
    assert conn.send(resp("SET", "k", "v")) == b"+OK\r\n"
    assert conn.send(resp("TTL", "k")) == b":30\r\n"
    assert conn.send(resp("SET", "k2", "v", "EX", "5")) == b"+OK\r\n"
    assert conn.send(resp("TTL", "k2")) == b":5\r\n"
    expiries = {
        cluster.nodes[link.node_id].store.get(b"ttl", b"k").expires_ms  # type: ignore[union-attr]
        for link in cluster.router.copies_of(b"ttl", b"k")
    }
    assert len(expiries) == 1
    assert conn.send(resp("INCR", "n")) == b":1\r\n"
    assert conn.send(resp("TTL", "n")) == b":30\r\n"
