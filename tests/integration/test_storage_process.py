"""Real twistd data nodes on every durable engine: kill -9 and torn tails.

For ``log``, ``disk``, ``mmap`` and ``mmap-index``, each with ``fsync:
always``:

* a node killed with SIGKILL in the middle of a stream of pipelined writes
  (overwrites included, so compaction has garbage to work on) comes back
  with every acknowledged write, and a write that was in flight is either
  absent or whole, never garbage;
* a file cut in the middle of its last record (a torn tail, made here by
  truncating it) is detected, dropped and logged at the next start: the node
  starts, serves everything else, and never returns the torn record.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from kvha.data.client import DataNodeClient
from kvha.data.logengine import OP_PUT, scan_entries
from tests.conftest import SECRET

pytestmark = pytest.mark.process

ENGINES = ("log", "disk", "mmap", "mmap-index")
ACKED = 10_000
KEYS = 3_000
WINDOW = 200

#: Small files, so that segments rotate, snapshots run and compaction starts mid-test.
STORAGE = {
    "log": {"segment_bytes": "256KiB", "snapshot_log_bytes": "1MiB"},
    "disk": {"segment_bytes": "256KiB", "compaction_min_bytes": "128KiB"},
    "mmap": {"map_size": "4MiB"},
    "mmap-index": {"segment_bytes": "256KiB", "compaction_min_bytes": "128KiB"},
}

#: What the node logs when it finds a torn tail.
TORN_MESSAGE = {
    "log": "torn or corrupt tail",
    "disk": "torn or corrupt tail",
    "mmap": "is damaged",
    "mmap-index": "shorter than the index says",
}


def _client(node) -> DataNodeClient:  # type: ignore[no-untyped-def]
    client = DataNodeClient(reactor, f"tcp:127.0.0.1:{node.port}", SECRET.encode(), "test")
    client.start()
    return client


def value_of(i: int) -> bytes:
    return b"value-%d-" % i + b"x" * (i % 300)


def key_of(i: int) -> bytes:
    return b"key-%06d" % (i % KEYS)


@defer.inlineCallbacks
def write_stream(client: DataNodeClient, node, kill_after: int):  # type: ignore[no-untyped-def]
    """Pipelined sets until ``kill_after`` are acknowledged, then kill -9 with more in flight.

    Returns ``{key: (i, version)}`` of the newest acknowledged write per key.
    """
    acked: dict[bytes, tuple[int, int]] = {}
    count = [0]
    in_flight: set[defer.Deferred] = set()
    killed = False

    def on_ack(result, i):  # type: ignore[no-untyped-def]
        count[0] += 1
        key = key_of(i)
        if key not in acked or acked[key][1] < result.record.version:
            acked[key] = (i, result.record.version)

    i = 0
    while i < 3 * kill_after and not killed:
        while len(in_flight) < WINDOW and i < 3 * kill_after:
            d = client.set(b"p1", key_of(i), value_of(i), i % 65536)
            d.addCallback(on_ack, i)
            d.addErrback(lambda f: None)  # in flight when killed
            in_flight.add(d)
            d.addBoth(lambda _, d=d: in_flight.discard(d))
            i += 1
        yield defer.DeferredList(list(in_flight)[:1])
        if count[0] >= kill_after:
            node.kill()  # with requests still in flight
            killed = True
    assert killed, "the load ended before the kill"
    return acked


@defer.inlineCallbacks
def read_all(client: DataNodeClient):  # type: ignore[no-untyped-def]
    keys = [key_of(i) for i in range(KEYS)]
    found = {}
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        records = yield client.mget(b"p1", chunk)
        for key, record in zip(chunk, records):
            found[key] = record
    return found


def check_record(key: bytes, record, acked_i: int) -> None:  # type: ignore[no-untyped-def]
    """A record is a whole write of this key at least as new as the acknowledged one."""
    i = int(record.value.split(b"-")[1])
    assert key_of(i) == key, (key, record.value[:40])
    assert record.value == value_of(i), f"garbage for {key!r}: {record.value[:40]!r}"
    assert record.flags == i % 65536
    assert i >= acked_i, f"{key!r} went back from write {acked_i} to {i}"


@pytest.mark.parametrize("engine", ENGINES)
@pytest_twisted.inlineCallbacks
def test_kill_9_keeps_every_acknowledged_write(nodes, engine):  # type: ignore[no-untyped-def]
    """kill -9 in the middle of a write stream loses no acknowledged write (fsync always)."""
    node = nodes.data("d1", engine=engine, fsync="always", **STORAGE[engine])
    node.start()
    client = _client(node)
    yield client.when_ready()
    acked = yield write_stream(client, node, ACKED)
    yield client.stop()

    node.start()
    client = _client(node)
    yield client.when_ready()
    found = yield read_all(client)
    for key, (i, version) in acked.items():
        record = found[key]
        assert record is not None, f"acknowledged {key!r} lost"
        check_record(key, record, i)
        assert record.version >= version
    for key, record in found.items():
        if record is not None and key not in acked:
            check_record(key, record, 0)  # never acknowledged: whole, or absent
    stats = yield client.stats()
    assert stats["engine"] == engine
    assert int(stats["high_water"]) >= max(v for _, v in acked.values())
    yield client.stop()
    assert "Traceback" not in node.log()


def cut_last_record(state_dir: Path, engine: str) -> bytes:
    """Truncate the engine's newest file in the middle of its last record; return that key.

    For ``mmap`` (one LMDB file, no records in order) half of its last page is cut.
    """
    if engine == "mmap":
        path = state_dir / "mmap" / "data.mdb"
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 2048)
        return b""
    pattern = "segment-*.log" if engine == "log" else "data-*.seg"
    files = [p for p in sorted((state_dir / engine).glob(pattern)) if p.stat().st_size]
    path = files[-1]
    data = path.read_bytes()
    puts = [(at, size, key) for at, size, op, _p, key, _r in scan_entries(data) if op == OP_PUT]
    at, size, key = puts[-1]
    with open(path, "r+b") as f:
        f.truncate(at + size // 2)
    return key


@pytest.mark.parametrize("engine", ENGINES)
@pytest_twisted.inlineCallbacks
def test_torn_tail_is_dropped_and_logged(nodes, tmp_path, engine):  # type: ignore[no-untyped-def]
    """A record cut in half is dropped and logged at restart; the node serves everything else."""
    node = nodes.data("d1", engine=engine, fsync="always", **STORAGE[engine])
    node.start()
    client = _client(node)
    yield client.when_ready()
    acked = {}
    for start in range(0, 2000, 250):  # unique keys: each key has exactly one write
        results = yield defer.gatherResults(
            [
                client.set(b"p1", key_of(i), value_of(i), i % 65536)
                for i in range(start, start + 250)
            ]
        )
        for i, result in zip(range(start, start + 250), results):
            acked[key_of(i)] = (i, result.record.version)
    yield client.stop()
    node.kill()
    torn = cut_last_record(tmp_path / "d1", engine)
    assert engine == "mmap" or torn in acked

    node.start()
    client = _client(node)
    yield client.when_ready()
    found = yield read_all(client)
    stats = yield client.stats()
    yield client.stop()
    log = node.log()
    assert TORN_MESSAGE[engine] in log
    assert "Traceback" not in log
    if engine == "mmap":
        # The damaged file was moved aside whole: the node is empty, says so with a
        # high water of 0, and merge refills it from its replicas.
        assert all(record is None for record in found.values())
        assert int(stats["high_water"]) == 0
        assert [p.name for p in (tmp_path / "d1").iterdir() if ".corrupt-" in p.name]
        return
    assert found[torn] is None
    for key, (i, _version) in acked.items():
        if key != torn:
            assert found[key] is not None, f"{key!r} lost with the torn tail"
            check_record(key, found[key], i)
    assert int(stats["records:p1"]) == len(acked) - 1
    assert os.path.isdir(tmp_path / "d1" / engine)
