"""The router and node links on an in-process cluster: replication, fail-over, quorum, health.

Every test runs real DataNodes behind a real Router through LocalDataClient,
with a Clock for time, so "the node is slow" is ``hold()`` and "the node
died" is ``kill()``: no network, no sleeping.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from kvha.data.client import NodeUnavailable
from kvha.data.store import IncrMode, Result, Status, StoreMode
from kvha.master.router import PartitionPolicy, Unavailable
from kvha.record import Record, pack, tombstone
from tests.inprocess import Cluster

P = b"default"


# Helpers --------------------------------------------------------------------------------------


def result_of(d: Deferred) -> Any:
    """The result of a Deferred that has already fired successfully."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure_of(d: Deferred, *kinds: type) -> Failure:
    """The Failure of a Deferred that has already failed with one of ``kinds``."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    assert isinstance(out[0], Failure), f"expected a failure, got {out[0]!r}"
    assert out[0].check(*kinds), out[0]
    return out[0]


def find_key(cluster: Cluster, want: Callable[[list[str]], bool], prefix: str = "k") -> bytes:
    """The first key ``prefix:i`` whose copies (ids in ring order) satisfy ``want``."""
    for i in range(100_000):
        key = f"{prefix}:{i}".encode()
        if want(copy_ids(cluster, key)):
            return key
    raise AssertionError("no such key")


def copy_ids(cluster: Cluster, key: bytes) -> list[str]:
    return [link.node_id for link in cluster.router.copies_of(P, key)]


def stored(cluster: Cluster, node_id: str, key: bytes, partition: bytes = P) -> Optional[Record]:
    return cluster.nodes[node_id].store.get(partition, key, include_tombstones=True)


def favour(cluster: Cluster, node_id: str) -> None:
    """Make every read choose ``node_id`` first when it holds the key."""
    for nid, link in cluster.links.items():
        link.read_weight = 1.0 if nid == node_id else 0.0


def drop_connection_quietly(cluster: Cluster, node_id: str) -> None:
    """The connection is gone but the link has not noticed yet (still "up")."""
    cluster.clients[node_id].protocol = None


@pytest.fixture(params=["deferred", "callbacks"])
def api(request: pytest.FixtureRequest) -> str:
    """Each read/write test runs on the Deferred API and on the callback hot path."""
    return str(request.param)


def r_get(router: Any, api: str, partition: bytes, key: bytes) -> Deferred:
    if api == "deferred":
        return router.get(partition, key)
    d: Deferred = Deferred()
    router.get_cb(partition, key, d.callback, d.errback)
    return d


def r_set(
    router: Any, api: str, partition: bytes, key: bytes, value: bytes, flags: int = 0
) -> Deferred:
    if api == "deferred":
        return router.set(partition, key, value, flags)
    d: Deferred = Deferred()
    router.set_cb(partition, key, value, d.callback, d.errback, flags)
    return d


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(n=3, replicas=1)
    yield c
    c.stop()


# Basic reads and writes -----------------------------------------------------------------------


def test_set_then_get(cluster: Cluster, api: str) -> None:
    """A set is stored on both copies with one version and read back with flags and value."""
    r = result_of(r_set(cluster.router, api, P, b"k", b"v", flags=7))
    assert r.status is Status.STORED
    record = result_of(r_get(cluster.router, api, P, b"k"))
    assert (record.value, record.flags) == (b"v", 7)
    a, b = copy_ids(cluster, b"k")
    assert stored(cluster, a, b"k") == stored(cluster, b, b"k") == record
    third = ({"data1", "data2", "data3"} - {a, b}).pop()
    assert stored(cluster, third, b"k") is None


def test_get_of_missing_key_is_none(cluster: Cluster, api: str) -> None:
    """A key never written reads as None, not an error."""
    assert result_of(r_get(cluster.router, api, P, b"nope")) is None


def test_unknown_partition_is_refused(cluster: Cluster) -> None:
    """A partition without a policy is a KeyError, not a silent write."""
    with pytest.raises(KeyError):
        cluster.router.get(b"other", b"k")


def test_callback_api_reports_an_unknown_partition_instead_of_raising(cluster: Cluster) -> None:
    """The callback entry points never raise: a protocol has already taken a reply slot."""
    errors: list[BaseException] = []
    cluster.router.get_cb(b"other", b"k", errors.append, errors.append)
    cluster.router.set_cb(b"other", b"k", b"v", errors.append, errors.append)
    cluster.router.set_many_cb(b"other", [(b"a", b"1"), (b"b", b"2")], errors.append, errors.append)
    assert [type(e) for e in errors] == [KeyError, KeyError, KeyError]


# Read fail-over -------------------------------------------------------------------------------


def test_read_falls_over_when_chosen_copy_has_lost_its_connection(
    cluster: Cluster, api: str
) -> None:
    """A read sent to a copy whose connection just dropped is retried on the next copy."""
    key = b"k"
    result_of(r_set(cluster.router, api, P, key, b"v"))
    first, second = copy_ids(cluster, key)
    favour(cluster, first)
    drop_connection_quietly(cluster, first)
    assert cluster.links[first].state == "up"
    record = result_of(r_get(cluster.router, api, P, key))
    assert record.value == b"v"
    assert cluster.clients[first].calls["get"] == 1  # it was tried first
    assert cluster.nodes[second].get_hits == 1
    assert cluster.links[first].state == "down"  # and marked down by the failure


def test_read_falls_over_when_held_copy_disconnects(cluster: Cluster, api: str) -> None:
    """A read waiting on a slow copy completes from the next copy when that copy dies."""
    key = b"k"
    result_of(r_set(cluster.router, api, P, key, b"v"))
    first, second = copy_ids(cluster, key)
    favour(cluster, second)
    cluster.clients[second].hold()
    d = r_get(cluster.router, api, P, key)
    assert not d.called
    cluster.kill(second)
    assert result_of(d).value == b"v"
    assert cluster.nodes[first].get_hits == 1
    assert cluster.links[second].state == "down"


def test_read_skips_a_down_copy(cluster: Cluster, api: str) -> None:
    """After a kill, reads go straight to the live copy."""
    result_of(r_set(cluster.router, api, P, b"k", b"v"))
    first, second = copy_ids(cluster, b"k")
    cluster.kill(first)
    for _ in range(20):
        assert result_of(r_get(cluster.router, api, P, b"k")).value == b"v"
    assert cluster.clients[first].calls.get("get", 0) == 0


# Writes after a kill --------------------------------------------------------------------------


def test_writes_after_kill_succeed_on_live_copies_and_count_skips(cluster: Cluster) -> None:
    """With write_acks all, a dead copy is skipped and counted; the live copies store it."""
    cluster.kill("data1")
    keys = [b"w:%d" % i for i in range(300)]
    expected_skips = 0
    for key in keys:
        r = result_of(cluster.router.set(P, key, b"val-" + key))
        assert r.status is Status.STORED
        ids = copy_ids(cluster, key)
        expected_skips += "data1" in ids
        for nid in ids:
            if nid != "data1":
                assert stored(cluster, nid, key).value == b"val-" + key
    assert expected_skips > 0
    assert cluster.links["data1"].skipped_writes == expected_skips
    assert cluster.nodes["data1"].store.engine.count() == 0


def test_every_acknowledged_write_is_readable_after_a_kill(cluster: Cluster) -> None:
    """Writes acknowledged before and after a node dies are all readable afterwards."""
    before = {b"b:%d" % i: b"%d" % i for i in range(200)}
    for key, value in before.items():
        result_of(cluster.router.set(P, key, value))
    cluster.kill("data2")
    after = {b"a:%d" % i: b"%d" % i for i in range(200)}
    for key, value in after.items():
        result_of(cluster.router.set(P, key, value))
    for key, value in {**before, **after}.items():
        assert result_of(cluster.router.get(P, key)).value == value
    records = result_of(cluster.router.get_many(P, list(before)))
    assert [r.value for r in records] == list(before.values())


# write_acks -----------------------------------------------------------------------------------


def acks_cluster(write_acks: str) -> Cluster:
    return Cluster(n=3, replicas=2, partitions=[PartitionPolicy("default", write_acks=write_acks)])


def test_write_acks_one_answers_before_slow_copies(api: str) -> None:
    """write_acks one acknowledges on the first answer; held copies catch up on release."""
    c = acks_cluster("one")
    _a, b, d3 = copy_ids(c, b"k")
    c.clients[b].hold()
    c.clients[d3].hold()
    d = r_set(c.router, api, P, b"k", b"v")
    assert result_of(d).status is Status.STORED
    assert stored(c, b, b"k") is None
    c.clients[b].release()
    c.clients[d3].release()
    assert stored(c, b, b"k").value == stored(c, d3, b"k").value == b"v"


def test_write_acks_all_waits_for_every_live_copy(api: str) -> None:
    """write_acks all does not answer while any live copy is still writing."""
    c = acks_cluster("all")
    held = copy_ids(c, b"k")[2]
    c.clients[held].hold()
    d = r_set(c.router, api, P, b"k", b"v")
    assert not d.called
    c.clients[held].release()
    assert result_of(d).status is Status.STORED


def test_write_acks_quorum_needs_two_of_three(api: str) -> None:
    """With three copies, quorum answers after two stores and not after one."""
    c = acks_cluster("quorum")
    a, b, d3 = copy_ids(c, b"k")
    c.clients[d3].hold()
    assert result_of(r_set(c.router, api, P, b"k", b"v1")).status is Status.STORED
    c.clients[d3].release()
    c.clients[b].hold()
    c.clients[d3].hold()
    d = r_set(c.router, api, P, b"k", b"v2")
    assert not d.called
    c.clients[b].release()
    assert result_of(d).status is Status.STORED
    c.clients[d3].release()


def test_write_acks_quorum_fails_without_a_majority_live(api: str) -> None:
    """Quorum writes are refused when only one of three copies is up; all accepts it."""
    c = acks_cluster("quorum")
    a, b, d3 = copy_ids(c, b"k")
    c.kill(b)
    c.kill(d3)
    failure_of(r_set(c.router, api, P, b"k", b"v"), Unavailable)
    c2 = acks_cluster("all")
    c2.kill(b)
    c2.kill(d3)
    assert result_of(r_set(c2.router, api, P, b"k", b"v")).status is Status.STORED


def test_write_that_fails_on_every_copy_is_unavailable(api: str) -> None:
    """When every copy's connection drops mid-write the write fails with Unavailable."""
    c = acks_cluster("one")
    for nid in copy_ids(c, b"k"):
        c.clients[nid].hold()
    d = r_set(c.router, api, P, b"k", b"v")
    for nid in copy_ids(c, b"k"):
        c.kill(nid)
    failure_of(d, Unavailable)


# No live copy ---------------------------------------------------------------------------------


def test_no_live_copy_is_unavailable(cluster: Cluster, api: str) -> None:
    """With both copies down, reads, writes, deletes and conditional ops fail with Unavailable."""
    key = b"k"
    for nid in copy_ids(cluster, key):
        cluster.kill(nid)
    router = cluster.router
    failure_of(r_get(router, api, P, key), Unavailable)
    failure_of(router.get_many(P, [key, b"other"]), Unavailable)
    failure_of(r_set(router, api, P, key, b"v"), Unavailable)
    failure_of(router.delete(P, key), Unavailable)
    failure_of(
        router.conditional(P, key, lambda c: c.store(StoreMode.ADD, P, key, b"v")), Unavailable
    )


# Conditional operations -----------------------------------------------------------------------


def same_on_both(cluster: Cluster, key: bytes) -> Record:
    a, b = copy_ids(cluster, key)
    ra, rb = stored(cluster, a, key), stored(cluster, b, key)
    assert ra is not None and ra == rb
    return ra


def test_add_runs_on_primary_and_replicates_its_record(cluster: Cluster) -> None:
    """ADD is executed by the primary only; the other copy receives the identical record."""
    key = b"k"
    primary, other = copy_ids(cluster, key)
    op = lambda c: c.store(StoreMode.ADD, P, key, b"v", 3)  # noqa: E731
    r = result_of(cluster.router.conditional(P, key, op))
    assert r.status is Status.STORED
    assert cluster.clients[primary].calls == {"store": 1}
    assert cluster.clients[other].calls == {"apply": 1}
    record = same_on_both(cluster, key)
    assert record == r.record and record.flags == 3
    # A second ADD is refused at the primary and nothing is replicated.
    r2 = result_of(cluster.router.conditional(P, key, op))
    assert r2.status is Status.NOT_STORED
    assert cluster.clients[other].calls == {"apply": 1}


def test_cas_replicates_the_primary_version(cluster: Cluster) -> None:
    """A CAS with the current version stores a new version on both copies; a stale one is EXISTS."""
    key = b"k"
    result_of(cluster.router.set(P, key, b"v1"))
    version = same_on_both(cluster, key).version
    r = result_of(
        cluster.router.conditional(
            P, key, lambda c: c.store(StoreMode.CAS, P, key, b"v2", cas=version)
        )
    )
    assert r.status is Status.STORED
    record = same_on_both(cluster, key)
    assert record.value == b"v2" and record.version == r.record.version > version
    stale = result_of(
        cluster.router.conditional(
            P, key, lambda c: c.store(StoreMode.CAS, P, key, b"v3", cas=version)
        )
    )
    assert stale.status is Status.EXISTS
    assert same_on_both(cluster, key).value == b"v2"


def test_incr_replicates_the_counter(cluster: Cluster) -> None:
    """incr runs once at the primary and both copies hold the new value and version."""
    key = b"n"
    result_of(cluster.router.set(P, key, b"5"))
    r = result_of(
        cluster.router.conditional(P, key, lambda c: c.incr(P, key, IncrMode.MEMCACHED_INCR, b"3"))
    )
    assert r.status is Status.STORED and r.record.value == b"8"
    assert same_on_both(cluster, key) == r.record
    primary, other = copy_ids(cluster, key)
    assert cluster.clients[primary].calls.get("incr") == 1
    assert "incr" not in cluster.clients[other].calls


def test_touch_replicates_the_new_expiry(cluster: Cluster) -> None:
    """touch sets a new expiry and version at the primary and the copy receives both."""
    key = b"t"
    result_of(cluster.router.set(P, key, b"v"))
    expires = int(cluster.clock.seconds() * 1000) + 60_000
    r = result_of(cluster.router.conditional(P, key, lambda c: c.touch(P, key, expires)))
    assert r.status is Status.TOUCHED
    record = same_on_both(cluster, key)
    assert record.expires_ms == expires and record.version == r.record.version
    missing = result_of(
        cluster.router.conditional(P, b"absent", lambda c: c.touch(P, b"absent", expires))
    )
    assert missing.status is Status.NOT_FOUND


def test_conditional_versions_move_the_router_clock(cluster: Cluster) -> None:
    """A later plain set wins over a record versioned by the primary's clock."""
    key = b"k"
    primary = copy_ids(cluster, key)[0]
    # The primary's clock runs far ahead of the master's.
    cluster.nodes[primary].store.clock.observe(cluster.router.hlc.next() + (1 << 30))
    r = result_of(
        cluster.router.conditional(P, key, lambda c: c.store(StoreMode.ADD, P, key, b"a"))
    )
    result_of(cluster.router.set(P, key, b"b"))
    record = same_on_both(cluster, key)
    assert record.value == b"b" and record.version > r.record.version


def test_disconnected_primary_is_passed_over(cluster: Cluster) -> None:
    """A primary that is down or not connected is skipped; the next copy runs the operation."""
    key = b"k"
    primary, other = copy_ids(cluster, key)
    cluster.kill(primary)
    op = lambda c: c.store(StoreMode.ADD, P, key, b"v")  # noqa: E731
    r = result_of(cluster.router.conditional(P, key, op))
    assert r.status is Status.STORED
    assert cluster.clients[other].calls.get("store") == 1
    assert stored(cluster, other, key).value == b"v"
    assert stored(cluster, primary, key) is None
    assert cluster.links[primary].skipped_writes == 1


def test_not_connected_primary_still_marked_up_is_passed_over(cluster: Cluster) -> None:
    """A primary whose link still says up but whose connection is gone is not asked."""
    key = b"k"
    primary, other = copy_ids(cluster, key)
    cluster.clients[primary].protocol = None
    cluster.clients[primary].on_lost = None  # the link has not heard yet
    op = lambda c: c.incr(P, key, IncrMode.MEMCACHED_INCR, b"1")  # noqa: E731
    result_of(cluster.router.conditional(P, key, op).addErrback(lambda f: None))
    assert "incr" not in cluster.clients[primary].calls
    assert cluster.clients[other].calls.get("incr") == 1


def test_primary_failing_after_send_fails_the_request(cluster: Cluster) -> None:
    """A primary that dies once the operation was sent fails it: it may have been applied."""
    key = b"k"
    primary, other = copy_ids(cluster, key)
    cluster.clients[primary].hold()
    d = cluster.router.conditional(P, key, lambda c: c.store(StoreMode.ADD, P, key, b"v"))
    cluster.kill(primary)
    failure_of(d, NodeUnavailable)
    assert "store" not in cluster.clients[other].calls


# Merging --------------------------------------------------------------------------------------


def test_merging_node_is_written_but_never_read() -> None:
    """A node reporting merging in a ping gets every write and no read."""
    c = Cluster(n=2, replicas=1)
    c.nodes["data1"].state = "merging"
    c.clock.advance(0.25)  # one ping
    assert c.links["data1"].state == "merging"
    assert not c.links["data1"].readable and c.links["data1"].writable
    favour(c, "data1")
    keys = [b"m:%d" % i for i in range(50)]
    for key in keys:
        result_of(c.router.set(P, key, b"v"))
        assert stored(c, "data1", key).value == b"v"
    for key in keys:
        assert result_of(c.router.get(P, key)).value == b"v"
    assert result_of(c.router.get_many(P, keys)) == [stored(c, "data2", k) for k in keys]
    calls = c.clients["data1"].calls
    assert calls.get("get", 0) == calls.get("mget", 0) == 0
    assert c.nodes["data1"].get_hits == 0
    # With the only readable copy gone, a read is unavailable rather than served by merging.
    c.kill("data2")
    failure_of(c.router.get(P, keys[0]), Unavailable)
    c.nodes["data1"].state = "up"
    c.clock.advance(0.25)
    assert c.links["data1"].state == "up"
    assert result_of(c.router.get(P, keys[0])).value == b"v"


# Quorum reads ---------------------------------------------------------------------------------


def quorum_cluster() -> Cluster:
    return Cluster(n=3, replicas=2, partitions=[PartitionPolicy("default", read="quorum")])


def test_quorum_read_returns_newest_and_repairs_stale_copy() -> None:
    """A copy holding an older version is outvoted by version and rewritten with the newest."""
    c = quorum_cluster()
    key = b"k"
    result_of(c.router.set(P, key, b"new"))
    newest = stored(c, "data1", key)
    stale_node = copy_ids(c, key)[0]
    c.nodes[stale_node].store.engine.put(P, key, pack(b"old", newest.version - 5))
    assert stored(c, stale_node, key).value == b"old"
    assert result_of(c.router.get(P, key)) == newest
    assert c.router.repairs == 1
    assert stored(c, stale_node, key) == newest


def missed_write(c: Cluster, key: bytes) -> list[str]:
    """Store ``key`` while its last copy is down, then revive that copy: it lacks the key."""
    ids = copy_ids(c, key)
    c.kill(ids[-1])
    result_of(c.router.set(P, key, b"v"))
    c.revive(ids[-1])
    assert stored(c, ids[-1], key) is None
    return ids


def test_quorum_read_repairs_a_copy_that_missed_the_write() -> None:
    """A copy without the key is given the newest record."""
    c = quorum_cluster()
    key = b"k"
    a, b, d3 = missed_write(c, key)
    assert result_of(c.router.get(P, key)).value == b"v"
    assert stored(c, d3, key) == stored(c, a, key)


def test_quorum_read_newer_tombstone_hides_older_value() -> None:
    """A tombstone newer than the value on other copies makes the key absent and spreads."""
    c = quorum_cluster()
    key = b"k"
    result_of(c.router.set(P, key, b"v"))
    version = stored(c, "data1", key).version
    deleter = copy_ids(c, key)[1]
    c.nodes[deleter].store.apply(P, key, tombstone(version + 1))
    assert result_of(c.router.get(P, key)) is None
    for nid in copy_ids(c, key):
        assert stored(c, nid, key).tombstone
        assert stored(c, nid, key).version == version + 1


def test_quorum_read_older_tombstone_loses_to_newer_value() -> None:
    """A tombstone older than a value elsewhere is repaired with the value, not obeyed."""
    c = quorum_cluster()
    key = b"k"
    result_of(c.router.set(P, key, b"v"))
    version = stored(c, "data1", key).version
    lagging = copy_ids(c, key)[2]
    c.nodes[lagging].store.engine.put(P, key, tombstone(version - 1))
    assert result_of(c.router.get(P, key)).value == b"v"
    assert stored(c, lagging, key).value == b"v"


def test_quorum_read_needs_a_majority() -> None:
    """With two of three copies down, a quorum read is Unavailable; with one down it works."""
    c = quorum_cluster()
    key = b"k"
    result_of(c.router.set(P, key, b"v"))
    a, b, d3 = copy_ids(c, key)
    c.kill(d3)
    assert result_of(c.router.get(P, key)).value == b"v"
    c.kill(b)
    failure_of(c.router.get(P, key), Unavailable)


def test_quorum_read_of_expired_record_is_none() -> None:
    """The newest record is still subject to expiry."""
    c = quorum_cluster()
    expires = int(c.clock.seconds() * 1000) + 1000
    result_of(c.router.set(P, b"k", b"v", expires_ms=expires))
    assert result_of(c.router.get(P, b"k")).value == b"v"
    c.clock.advance(1.0)
    assert result_of(c.router.get(P, b"k")) is None


# Read balancing -------------------------------------------------------------------------------


def test_read_weights_balance_reads_seventy_thirty() -> None:
    """Over 10,000 reads, read_weights 7:3 send 70% ± 5 points to the first node."""
    c = Cluster(n=2, replicas=1, read_weights=[7.0, 3.0])
    result_of(c.router.set(P, b"k", b"v"))
    for _ in range(10_000):
        result_of(c.router.get(P, b"k"))
    hits = {nid: node.get_hits for nid, node in c.nodes.items()}
    assert sum(hits.values()) == 10_000
    assert hits["data1"] == c.nodes["data1"].ops["get"]
    assert abs(hits["data1"] / 10_000 - 0.70) <= 0.05, hits


# get_many -------------------------------------------------------------------------------------


def test_get_many_sends_one_mget_per_node(cluster: Cluster) -> None:
    """Many keys make one mget per node chosen, no single gets, results in key order."""
    keys = [b"g:%d" % i for i in range(120)]
    for key in keys[::2]:
        result_of(cluster.router.set(P, key, key.upper()))
    records = result_of(cluster.router.get_many(P, keys))
    assert [r.value if r else None for r in records] == [
        k.upper() if i % 2 == 0 else None for i, k in enumerate(keys)
    ]
    for client in cluster.clients.values():
        assert client.calls.get("mget") == 1
        assert "get" not in client.calls


def test_get_many_falls_back_per_key_when_a_node_fails(cluster: Cluster) -> None:
    """When one node's mget fails, its keys are read one by one from their other copies."""
    keys = [b"g:%d" % i for i in range(60)]
    for key in keys:
        result_of(cluster.router.set(P, key, key.upper()))
    cluster.clients["data1"].hold()
    d = cluster.router.get_many(P, keys)
    assert not d.called
    cluster.kill("data1")
    records = result_of(d)
    assert [r.value for r in records] == [k.upper() for k in keys]
    assert cluster.clients["data1"].calls.get("mget") == 1
    fallback_gets = sum(cl.calls.get("get", 0) for cl in cluster.clients.values())
    assert fallback_gets > 0
    assert fallback_gets < len(keys)
    assert cluster.links["data1"].state == "down"


def test_get_many_with_quorum_reads_each_key(cluster: Cluster) -> None:
    """Quorum partitions read key by key (each needs its own vote)."""
    c = quorum_cluster()
    result_of(c.router.set(P, b"a", b"1"))
    assert [r and r.value for r in result_of(c.router.get_many(P, [b"a", b"b"]))] == [b"1", None]
    assert all("mget" not in cl.calls for cl in c.clients.values())


# delete and flush -----------------------------------------------------------------------------


def test_delete_is_deleted_if_any_copy_had_it(cluster: Cluster) -> None:
    """A key on only one copy deletes as DELETED and leaves tombstones on both."""
    key = b"k"
    a, b = copy_ids(cluster, key)
    cluster.nodes[b].store.set(P, key, b"v", version=cluster.router.hlc.next())
    r = result_of(cluster.router.delete(P, key))
    assert r.status is Status.DELETED
    ta, tb = stored(cluster, a, key), stored(cluster, b, key)
    assert ta.tombstone and tb.tombstone and ta.version == tb.version
    assert result_of(cluster.router.get(P, key)) is None


def test_delete_of_missing_key_is_not_found_but_tombstoned(cluster: Cluster) -> None:
    """Deleting an absent key is NOT_FOUND and still writes tombstones for merge."""
    r = result_of(cluster.router.delete(P, b"nope"))
    assert r.status is Status.NOT_FOUND
    for nid in copy_ids(cluster, b"nope"):
        assert stored(cluster, nid, b"nope").tombstone


def test_delete_with_a_dead_copy_tombstones_the_live_one(cluster: Cluster) -> None:
    """A delete skips a dead copy (counted) and tombstones the live one."""
    key = b"k"
    result_of(cluster.router.set(P, key, b"v"))
    a, b = copy_ids(cluster, key)
    cluster.kill(a)
    assert result_of(cluster.router.delete(P, key)).status is Status.DELETED
    assert stored(cluster, b, key).tombstone
    assert not stored(cluster, a, key).tombstone
    assert cluster.links[a].skipped_writes == 1


def test_flush_clears_the_partition_on_every_node() -> None:
    """flush drops one partition's records on every node and leaves other partitions."""
    c = Cluster(n=3, replicas=1, partitions=[PartitionPolicy("default"), PartitionPolicy("other")])
    for i in range(50):
        result_of(c.router.set(P, b"k%d" % i, b"v"))
        result_of(c.router.set(b"other", b"k%d" % i, b"w"))
    assert result_of(c.router.flush(P)) is None
    for nid in c.nodes:
        assert c.nodes[nid].store.engine.count(P) == 0
        assert c.nodes[nid].store.engine.count(b"other") > 0
    for i in range(50):
        assert result_of(c.router.get(b"other", b"k%d" % i)).value == b"w"


def test_flush_with_a_node_down_flushes_nothing_and_says_which() -> None:
    """The node would come back with the records and serve them: all nodes or none.

    Removing a deleted partition's records (``every_node=False``) flushes the
    live nodes anyway.
    """
    c = Cluster(n=3, replicas=1)
    for i in range(50):
        result_of(c.router.set(P, b"k%d" % i, b"v"))
    c.kill("data3")
    error = failure_of(c.router.flush(P), Unavailable)
    assert "data node data3 down" in str(error.value)
    for nid in c.nodes:
        assert c.nodes[nid].store.engine.count(P) > 0  # nothing flushed anywhere
    for i in range(50):
        assert result_of(c.router.get(P, b"k%d" % i)).value == b"v"
    assert result_of(c.router.flush(P, every_node=False)) is None
    for nid in ("data1", "data2"):
        assert c.nodes[nid].store.engine.count(P) == 0
    assert c.nodes["data3"].store.engine.count(P) > 0  # down: not reached
    c.revive("data3")
    for _ in range(3):
        c.clock.advance(0.25)  # a ping brings it back
    assert c.links["data3"].state != "down"
    assert result_of(c.router.flush(P)) is None
    assert c.nodes["data3"].store.engine.count(P) == 0


def test_flush_with_every_node_down_is_unavailable(cluster: Cluster) -> None:
    """flush needs at least one live node."""
    for nid in list(cluster.nodes):
        cluster.kill(nid)
    failure_of(cluster.router.flush(P), Unavailable)


# NodeLink health ------------------------------------------------------------------------------


def test_ping_timeout_marks_node_down_then_a_ping_brings_it_back(cluster: Cluster) -> None:
    """A node silent for longer than ping_timeout is down, and up again when a ping answers."""
    link = cluster.links["data1"]
    assert (link.ping_interval, link.ping_timeout) == (0.25, 0.75)
    changes: list[tuple[str, str]] = []
    link.on_change = lambda _link, old, new: changes.append((old, new))
    cluster.clients["data1"].hold()
    for _ in range(3):  # 0.75 s without an answer: not yet past the timeout
        cluster.clock.advance(0.25)
        assert link.state == "up"
    cluster.clock.advance(0.25)
    assert link.state == "down"
    assert link.down_since == cluster.clock.seconds()
    assert cluster.clients["data1"].calls["ping"] == 1  # one ping outstanding, not a pile
    cluster.clients["data1"].release()  # the held ping answers
    assert link.state == "up"
    assert link.down_since is None
    assert changes == [("up", "down"), ("down", "up")]


def test_connection_loss_marks_down_at_once_and_reconnect_up(cluster: Cluster) -> None:
    """A reset connection marks the node down with no clock advance; reconnecting brings it up."""
    link = cluster.links["data2"]
    cluster.kill("data2")
    assert link.state == "down"
    cluster.clock.advance(1.0)  # pings are not sent on a dead connection
    assert link.state == "down"
    assert "ping" not in cluster.clients["data2"].calls
    cluster.revive("data2")
    assert link.state == "up"
    cluster.clock.advance(0.25)
    assert cluster.clients["data2"].calls["ping"] == 1
    assert link.state == "up"


def test_pings_keep_a_healthy_node_up(cluster: Cluster) -> None:
    """A node that answers every ping stays up indefinitely and reports its high water."""
    link = cluster.links["data3"]
    result_of(cluster.router.set(P, find_key(cluster, lambda ids: "data3" in ids), b"v"))
    cluster.clock.pump([0.25] * 40)
    assert link.state == "up"
    assert link.reported_state == "up"
    assert link.high_water == cluster.nodes["data3"].store.engine.high_water
    assert cluster.clients["data3"].calls["ping"] == 40


def test_mark_failed_only_downs_a_disconnected_node(cluster: Cluster) -> None:
    """A request error on a connected node does not mark it down; a lost connection does."""
    link = cluster.links["data1"]
    link.mark_failed("timeout")
    assert link.state == "up"
    cluster.clients["data1"].protocol = None
    link.mark_failed("reset")
    assert link.state == "down"


def test_result_passthrough_type(cluster: Cluster) -> None:
    """Writes fire with a Result carrying the stored record."""
    r = result_of(cluster.router.set(P, b"k", b"v"))
    assert isinstance(r, Result) and r.record is not None and r.record.value == b"v"


def test_set_many_cb_reports_once_when_every_key_is_stored(cluster: Cluster) -> None:
    """set_many_cb stores every pair on its copies and calls on_done once, after the last."""
    done: list[Any] = []
    failed: list[BaseException] = []
    pairs = [(b"m:%d" % i, b"v%d" % i) for i in range(20)]
    cluster.router.set_many_cb(P, pairs, done.append, failed.append)
    assert done == [None] and failed == []
    for key, value in pairs:
        for nid in copy_ids(cluster, key):
            assert stored(cluster, nid, key).value == value


def test_set_many_cb_reports_the_first_failure_only() -> None:
    """With both copies of some keys down, on_fail is called once and on_done never."""
    c = Cluster(n=3, replicas=1)
    try:
        dead = find_key(c, lambda ids: True, prefix="dead")
        pair = set(copy_ids(c, dead))
        also_dead = find_key(c, lambda ids: set(ids) == pair, prefix="also")
        live = find_key(c, lambda ids: set(ids) != pair, prefix="live")
        for nid in pair:
            c.kill(nid)
        done: list[Any] = []
        failed: list[BaseException] = []
        c.router.set_many_cb(
            P, [(dead, b"1"), (live, b"2"), (also_dead, b"3")], done.append, failed.append
        )
        assert done == []
        assert len(failed) == 1 and isinstance(failed[0], Unavailable)
        assert result_of(c.router.get(P, live)).value == b"2"  # the other writes still ran
    finally:
        c.stop()


# Operations at the primary, reported to plain functions.


def _incr_cb(cluster: Cluster, key: bytes, delta: bytes = b"1") -> list[Any]:
    got: list[Any] = []
    cluster.router.conditional_cb(
        P,
        key,
        lambda c, ok, bad: c.incr_cb(P, key, IncrMode.REDIS_INT, delta, ok, bad),
        got.append,
        got.append,
    )
    return got


def test_conditional_cb_replicates_the_primarys_record_then_reports() -> None:
    cluster = Cluster(n=3, replicas=1)
    primary, replica = copy_ids(cluster, b"n")
    cluster.clients[replica].hold()
    got = _incr_cb(cluster, b"n", b"41")
    assert got == []  # write_acks all: waiting for the copy
    cluster.clients[replica].release()
    [result] = got
    assert result.status is Status.STORED and result.record.value == b"41"
    assert cluster.nodes[replica].store.get(P, b"n").value == b"41"
    assert cluster.nodes[replica].store.get(P, b"n").version == result.record.version


def test_conditional_cb_without_a_live_primary_fails_at_once() -> None:
    cluster = Cluster(n=3, replicas=1)
    for node_id in copy_ids(cluster, b"n"):
        cluster.kill(node_id)
    [error] = _incr_cb(cluster, b"n")
    assert isinstance(error, Unavailable)


def test_conditional_cb_fails_when_the_primary_is_lost_with_the_request_sent() -> None:
    cluster = Cluster(n=3, replicas=1)
    primary, replica = copy_ids(cluster, b"n")
    cluster.clients[primary].hold()
    got = _incr_cb(cluster, b"n")
    cluster.kill(primary)
    [error] = got
    assert isinstance(error, NodeUnavailable)
    assert cluster.nodes[replica].store.get(P, b"n") is None  # not tried elsewhere


def test_conditional_cb_reports_a_malformed_record_instead_of_raising() -> None:
    cluster = Cluster(n=3, replicas=1)
    primary = copy_ids(cluster, b"n")[0]
    client = cluster.clients[primary]
    client.incr_cb = lambda p, k, m, d, ok, bad: ok(Result(Status.STORED, b"short"))  # type: ignore[method-assign]
    [error] = _incr_cb(cluster, b"n")
    assert isinstance(error, Exception) and not isinstance(error, Result)


def test_a_quorum_read_does_not_repair_across_a_flush_sent_behind_it() -> None:
    """GET (quorum) then FLUSHDB: the read's answers arrive after the flush; no repair then."""
    c = quorum_cluster()
    key = b"k"
    a, b, d3 = missed_write(c, key)  # a read would repair d3
    for _ in range(3):
        c.clock.advance(0.25)
    for nid in (a, b, d3):
        c.clients[nid].hold()
    read = c.router.get(P, key)  # sent first ...
    flushed = c.router.flush(P)  # ... then the flush, on the same connections
    for nid in (d3, a, b):
        # d3 runs the read and the flush; b's answer completes the read, whose
        # repair would reach d3 after its flush.
        c.clients[nid].release()
    assert result_of(read).value == b"v"  # from before the flush
    assert result_of(flushed) is None
    for nid in (a, b, d3):
        assert stored(c, nid, key) is None, nid
    assert result_of(c.router.get(P, key)) is None


def test_flush_waits_for_merges_and_ring_changes_to_finish() -> None:
    """Records being copied (merge, join, leave) may have been read before the flush."""
    c = Cluster(n=3, replicas=1)
    result_of(c.router.set(P, b"k", b"v"))
    c.links["data2"]._set("merging", "restarted")
    error = failure_of(c.router.flush(P), Unavailable)
    assert "data node data2 merging: flush again once it is up" in str(error.value)
    c.links["data2"]._set("up", "merged")
    c.router.set_rings(c.ring, c.ring)  # a change pending: writes go to both rings
    error = failure_of(c.router.flush(P), Unavailable)
    assert "a data node is joining or leaving" in str(error.value)
    assert result_of(c.router.get(P, b"k")).value == b"v"  # nothing was flushed
    c.router.set_rings(c.ring)
    assert result_of(c.router.flush(P)) is None
    assert result_of(c.router.get(P, b"k")) is None


def test_serving_needs_one_copy_of_every_key_or_a_majority_with_quorum_reads() -> None:
    """Router.serving() (a starting master's LOADING, and /health): with replicas 1 on
    three nodes any two up hold a copy of every key; a quorum-read partition with
    replicas 2 needs two copies of every key, so two of three nodes too, and one
    partition with quorum reads is enough to ask for it."""
    c = Cluster(n=3, replicas=1)
    assert c.router.serving()
    c.kill("data1")
    assert c.router.serving()
    c.kill("data2")
    assert not c.router.serving()
    c.stop()
    q = Cluster(
        n=3,
        replicas=2,
        partitions=[PartitionPolicy("default"), PartitionPolicy("q", read="quorum")],
    )
    q.kill("data1")
    assert q.router.serving()  # two copies of every key up: a majority of three
    q.kill("data2")
    assert not q.router.serving()  # one copy would do for "default", not for "q"
    assert q.router.serving(quorum=False)  # /health: every key still has a copy
    q.router.set_partitions([PartitionPolicy("default")])
    assert q.router.serving()
    q.stop()
