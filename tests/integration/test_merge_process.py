"""Automatic Merge with real processes: a data node killed with kill -9 comes back whole."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest
import pytest_twisted
from pymemcache.client.base import Client
from twisted.internet import defer, reactor

from kvha.data.client import DataNodeClient
from kvha.record import unpack
from kvha.ring import Ring
from tests.conftest import SECRET, memcache_stats

pytestmark = pytest.mark.process

KEYS = 20_000
CHANGED = 2_000


def _client(port: int) -> Client:
    return Client(("127.0.0.1", port), timeout=5, connect_timeout=5, default_noreply=False)


def _load(port: int, keys: list[str], value: str) -> None:
    client = _client(port)
    for start in range(0, len(keys), 500):
        failed = client.set_many({k: f"{value}:{k}" for k in keys[start : start + 500]})
        assert not failed, failed
    client.close()


def _restart_on_log_engine(master: Any, data: list[Any]) -> None:
    """Restart every data node on the ``log`` engine (fsync always); wait until all are up."""
    for node in data:
        node.kill()
    for node in data:
        with open(node.config_path, "a") as f:
            f.write("  storage: {engine: log, fsync: always}\n")
        node.start(wait=False)
    _wait_up(master.port, len(data))


def _wait_up(port: int, n: int, timeout: float = 60.0) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if memcache_stats(port).get("data_nodes_up") == str(n):
                return time.monotonic() - began
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError("the merge did not finish in time")


@defer.inlineCallbacks
def _dump(port: int) -> Any:
    """Every record on a data node, tombstones included: {key: record}."""
    client = DataNodeClient(reactor, f"tcp:127.0.0.1:{port}", SECRET.encode(), "dump")
    client.start()
    yield client.when_ready()
    out: dict[bytes, Any] = {}

    def take(batch: list[tuple[bytes, bytes, bytes]]) -> None:
        for partition, key, packed in batch:
            if partition == b"default":
                out[key] = unpack(packed)

    yield client.stream([], 0, take)
    stats = yield client.stats()
    yield client.stop()
    return out, stats


def _change_while_down(port: int, keys: list[str]) -> dict[str, Any]:
    """Overwrite, create and delete CHANGED keys; return the expected final values."""
    client = _client(port)
    expected: dict[str, Any] = {}
    third = CHANGED // 3
    for k in keys[:third]:
        assert client.set(k, f"new:{k}")
        expected[k] = f"new:{k}"
    for i in range(third):
        k = f"fresh-{i:05d}"
        assert client.set(k, f"fresh:{k}")
        expected[k] = f"fresh:{k}"
    for k in keys[third : 2 * third]:
        assert client.delete(k)
        expected[k] = None
    client.close()
    return expected


@pytest_twisted.inlineCallbacks
def test_merge_restores_exactly_the_latest_value_or_tombstone_on_every_copy(nodes):  # type: ignore[no-untyped-def]
    """After kill -9, changes and a restart, all copies of every key agree; no read was stale."""
    master, data = nodes.cluster(3, replicas=1, timeout=30)
    keys = [f"key-{i:05d}" for i in range(KEYS)]
    _load(master.port, keys, "v1")
    victim = data[1]
    victim.kill()
    expected = _change_while_down(master.port, keys)

    stale: list[str] = []
    reads = [0]
    stop = threading.Event()

    def reader() -> None:
        client = _client(master.port)
        changed = sorted(expected)
        deadline = time.monotonic() + 60
        i = 0
        while not stop.is_set() and time.monotonic() < deadline and reads[0] < 200_000:
            k = changed[i % len(changed)]
            i += 1
            got = client.get(k)
            reads[0] += 1
            want = expected[k]
            if (got.decode() if got is not None else None) != want:
                stale.append(f"{k}: got {got!r}, want {want!r}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    victim.start()
    merge_seconds = _wait_up(master.port, 3)
    time.sleep(0.5)  # keep reading a little after the node is readable again
    stop.set()
    thread.join(10)
    assert not stale, stale[:10]
    assert reads[0] > 100

    ring = Ring.build([(f"data{i + 1}", 1.0) for i in range(3)], 128)
    dumps = {}
    for i, node in enumerate(data):
        records, stats = yield _dump(node.port)
        dumps[f"data{i + 1}"] = records
    every_key = set(keys) | set(expected)
    for k in every_key:
        key = k.encode()
        copies = ring.nodes_for(b"default", key, 2)
        held = [dumps[n].get(key) for n in copies]
        assert all(r is not None for r in held), f"{k} missing on a copy"
        a, b = held
        assert (a.version, a.tombstone, a.value) == (b.version, b.tombstone, b.value), k
        want = expected.get(k, f"v1:{k}")
        if want is None:
            assert a.tombstone, f"{k} should be deleted"
        else:
            assert not a.tombstone and a.value.decode() == want, k
    print(f"merge of a memory node: {merge_seconds:.2f}s with {reads[0]} reads during it")


@pytest_twisted.inlineCallbacks
def test_durable_merge_transfers_only_the_difference(nodes, record_property):  # type: ignore[no-untyped-def]
    """A log node with 1% of keys changed while down merges under 5% of the data set's bytes."""
    master, data = nodes.cluster(
        3, replicas=1, timeout=30, merge={"skew_window": "1s", "grace": "500ms"}
    )
    _restart_on_log_engine(master, data)
    keys = [f"key-{i:05d}" for i in range(KEYS)]
    _load(master.port, keys, "x" * 100)
    # The node re-receives what was written in the skew window before its own
    # last write; in a live cluster writes keep coming, so its last write is
    # recent.  Wait past the window, then write once more, as traffic would.
    time.sleep(1.5)
    marker = _client(master.port)
    for i in range(20):
        assert marker.set(f"marker-{i}", "m")
    marker.close()
    victim = data[2]
    victim.kill()
    client = _client(master.port)
    changed = keys[: KEYS // 100]
    for k in changed:
        assert client.set(k, f"changed:{k}")
    client.close()
    victim.start()
    _wait_up(master.port, 3)
    records, stats = yield _dump(victim.port)
    merged_bytes = int(stats["merge_done_bytes"])
    dataset_bytes = int(stats["bytes"])
    share = merged_bytes / dataset_bytes
    record_property("merged_bytes", merged_bytes)
    record_property("dataset_bytes", dataset_bytes)
    print(
        f"durable merge sent {merged_bytes} of {dataset_bytes} bytes ({share:.2%}), "
        f"{stats['merge_done_keys']} records"
    )
    assert share < 0.05
    for k in changed:
        record = records.get(k.encode())
        ring = Ring.build([(f"data{i + 1}", 1.0) for i in range(3)], 128)
        if "data3" in ring.nodes_for(b"default", k.encode(), 2):
            assert record is not None and record.value == f"changed:{k}".encode(), k
    log = victim.log()
    assert re.search(r"opened log store: \d+ records", log)


def _readable(port: int, keys: list[str]) -> int:
    """How many of ``keys`` a master returns (reads spread over every live copy)."""
    client = _client(port)
    found = 0
    for start in range(0, len(keys), 100):
        found += len(client.get_many(keys[start : start + 100]))
    client.close()
    return found


@pytest_twisted.inlineCallbacks
def test_flush_all_with_a_durable_node_down_is_refused_and_nothing_comes_back(nodes):  # type: ignore[no-untyped-def]
    """flush_all with a log node down flushes nothing; once it is back, a flush empties all.

    Without the refusal the node came back from kill -9 with the flushed
    keys, merge (which only adds) kept them, and reads served them again.
    """
    master, data = nodes.cluster(3, replicas=1, timeout=30, merge={"grace": "500ms"})
    _restart_on_log_engine(master, data)
    keys = [f"key-{i:04d}" for i in range(600)]
    _load(master.port, keys, "v")
    victim = data[2]
    victim.kill()
    client = _client(master.port)
    deadline = time.monotonic() + 5
    while memcache_stats(master.port).get("data_nodes_up") != "2":
        assert time.monotonic() < deadline, "the master did not see the node go down"
        time.sleep(0.05)
    with pytest.raises(Exception, match="data node data3 down"):
        client.flush_all(noreply=False)
    client.close()
    assert _readable(master.port, keys) == len(keys)  # nothing was flushed
    victim.start()
    _wait_up(master.port, 3)
    client = _client(master.port)
    assert client.flush_all(noreply=False)
    client.close()
    assert _readable(master.port, keys) == 0
    for node in data:
        records, _stats = yield _dump(node.port)
        assert not records, f"{node.node_id} still holds {len(records)} records"
