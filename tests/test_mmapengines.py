"""The LMDB engines' own promises: ``mmap`` and ``mmap-index``.

Opening replays nothing (counts come from the meta table, not from a walk);
a map that fills up grows and the transaction is redone; keys LMDB cannot
hold directly (empty, or longer than 511 bytes) work; a damaged LMDB file is
moved aside and logged, never read; the fsync policy maps to LMDB's sync
flags; and for ``mmap-index`` the active segment's length is checked against
what the index acknowledged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from kvha.data import lmdbtables
from kvha.data.engine import Engine
from kvha.data.lmdbtables import LmdbTables
from kvha.data.mmapengine import MmapEngine
from kvha.data.mmapindex import MmapIndexEngine
from kvha.data.segments import SegmentEngine, split_loc
from kvha.record import pack

START = 1_700_000_000.0

Factory = Callable[..., Any]


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture(params=["mmap", "mmap-index"])
def make(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Factory:
    cls = MmapEngine if request.param == "mmap" else MmapIndexEngine

    def factory(**options: Any) -> Any:
        engine = cls(str(tmp_path / "e"), clock, **options)
        engine.open()
        return engine

    return factory


@pytest.fixture
def log_events():  # type: ignore[no-untyped-def]
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def logged(events: list[dict], level: LogLevel, text: str) -> bool:
    return any(e.get("log_level") == level and text in formatEvent(e) for e in events)


def state(engine: Engine) -> dict[tuple[bytes, bytes], bytes]:
    return {(p, k): packed for p, k, packed in engine.items()}


def lmdb_file(engine: Any) -> Path:
    tables: LmdbTables = engine._tables
    return Path(tables.path) / "data.mdb"


def crash(engine: Any) -> None:
    """kill -9: the open write transaction is lost, nothing else happens."""
    if isinstance(engine, SegmentEngine):
        engine._stop_compaction()
        for fd in engine._fds.values():
            os.close(fd)
        engine._fds.clear()
        engine._opened = False
    engine._tables.env.close()


def test_open_replays_nothing(make: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reopening walks no keys and reads no values: counts and high water come from meta."""
    engine = make(fsync="os")
    for i in range(500):
        engine.put(b"p%d" % (i % 3), b"k%d" % i, pack(b"v" * (i % 40), i + 1, i % 2 == 0))
    engine.remove(b"p0", b"k3")
    engine.commit()
    counts = [(p, engine.count(p), engine.bytes_used(p), engine.tombstones(p)) for p in (b"p0",)]
    engine.close()

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("open must not walk the data")

    monkeypatch.setattr(LmdbTables, "keys", forbidden)
    monkeypatch.setattr(LmdbTables, "items", forbidden)
    monkeypatch.setattr(SegmentEngine, "_read_entry", forbidden)
    engine = make()
    assert [(p, engine.count(p), engine.bytes_used(p), engine.tombstones(p)) for p in (b"p0",)] == (
        counts
    )
    assert engine.count() == 499
    assert engine.high_water == 500
    engine._tables.close()


def test_a_full_map_grows_and_the_transaction_is_redone(make: Factory) -> None:
    """Writes far beyond the initial map in one transaction succeed; nothing is lost."""
    engine = make(fsync="os", map_size=64 * 1024)
    written = {}
    for i in range(300):
        packed = pack(bytes([i % 256]) * 3000, i + 1)
        engine.put(b"p", b"k%d" % i, packed)
        written[(b"p", b"k%d" % i)] = packed
        if i == 150:
            engine.drop_partition(b"p")  # a drop inside the transaction that is redone
            written.clear()
            engine.put(b"q", b"other", pack(b"x", 999))
            written[(b"q", b"other")] = pack(b"x", 999)
    engine.remove(b"p", b"k160")
    del written[(b"p", b"k160")]
    assert state(engine) == written
    engine.commit()
    assert engine._tables.map_grown > 0
    assert engine._tables.map_size > 64 * 1024
    engine.close()
    engine = make(fsync="os", map_size=64 * 1024)
    assert state(engine) == written
    assert engine.count() == len(written)
    engine.close()


@pytest.mark.parametrize("size", [0, 1, 511, 512, 600, 5000])
def test_keys_lmdb_cannot_hold_directly(make: Factory, size: int) -> None:
    """Empty keys and keys past LMDB's 511 bytes are stored, listed, removed and kept."""
    engine = make(fsync="os")
    key = bytes(range(256)) * (size // 256) + b"k" * (size % 256)
    other = key + b"2"
    engine.put(b"p", key, pack(b"one", 1))
    engine.put(b"p", other, pack(b"two", 2))
    assert engine.get(b"p", key) == pack(b"one", 1)
    assert sorted(engine.keys(b"p")) == sorted([key, other])
    engine.commit()
    engine.close()
    engine = make()
    assert state(engine) == {(b"p", key): pack(b"one", 1), (b"p", other): pack(b"two", 2)}
    engine.remove(b"p", key)
    assert engine.get(b"p", key) is None and engine.count(b"p") == 1
    engine.close()


def test_crash_keeps_committed_writes_only(make: Factory) -> None:
    """An uncommitted transaction is lost in a crash; every committed one is intact."""
    engine = make(fsync="always")
    engine.put(b"p", b"a", pack(b"committed", 1))
    engine.commit()
    engine.put(b"p", b"b", pack(b"pending", 2))
    engine.remove(b"p", b"a")
    crash(engine)
    engine = make()
    assert state(engine) == {(b"p", b"a"): pack(b"committed", 1)}
    assert engine.count() == 1
    engine.close()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_lmdb_file_is_moved_aside_and_logged(
    make: Factory, tmp_path: Path, log_events: list[dict], damage: str
) -> None:
    """A truncated or foreign LMDB file is never mapped: moved aside, logged, node starts empty."""
    engine = make(fsync="always")
    for i in range(2000):
        engine.put(b"p", b"k%d" % i, pack(b"v" * 100, i + 1))
    engine.commit()
    path = lmdb_file(engine)
    crash(engine)
    size = path.stat().st_size
    if damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(size - 2048)  # half of the last page
    elif damage == "garbage":
        path.write_bytes(b"not an lmdb file" * 1000)
    else:
        path.write_bytes(b"")
    engine = make(fsync="always")
    assert engine.quarantined is not None
    assert Path(engine.quarantined).is_dir()
    assert logged(log_events, LogLevel.error, "is damaged")
    assert state(engine) == {}
    assert engine.count() == 0 and engine.high_water == 0  # merge pulls everything back
    engine.put(b"p", b"fresh", pack(b"v", 1))
    engine.commit()
    engine.close()
    engine = make()
    assert state(engine) == {(b"p", b"fresh"): pack(b"v", 1)}
    engine.close()


@pytest.mark.parametrize("policy", ["always", "everysec", "os"])
def test_fsync_policy_maps_to_lmdb_sync_flags(
    make: Factory, clock: Clock, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """always syncs on commit; everysec and os do not, and everysec syncs once a second."""
    engine = make(fsync=policy)
    flags = engine._tables.env.flags()
    assert flags["sync"] is (policy == "always")
    assert flags["metasync"] is (policy == "always")
    synced: list[bool] = []
    monkeypatch.setattr(LmdbTables, "sync", lambda self: synced.append(True))
    if isinstance(engine, SegmentEngine):
        monkeypatch.setattr(os, "fdatasync", lambda fd: None)
    engine.put(b"p", b"k", pack(b"v", 1))
    engine.commit()
    engine.maintenance(clock.seconds() + 2)
    assert synced == ([True] if policy == "everysec" else [])
    engine.maintenance(clock.seconds() + 4)  # nothing new since
    assert len(synced) <= 1
    engine.close()


def test_invalid_fsync_policy_raises(tmp_path: Path, clock: Clock) -> None:
    with pytest.raises(ValueError, match="fsync"):
        MmapEngine(str(tmp_path), clock, fsync="sometimes")


def test_too_many_partitions_is_a_clear_error(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the partition limit a write fails with a message naming it, not an LMDB code."""
    monkeypatch.setattr(lmdbtables, "MAX_PARTITIONS", 3)
    engine = MmapEngine(str(tmp_path), clock, fsync="os")
    engine.open()
    with pytest.raises(ValueError, match="too many partitions"):
        for i in range(100):
            engine.put(b"p%d" % i, b"k", pack(b"v", 1))
    assert engine.count() >= 3
    engine.commit()  # what was written before stays good
    held = state(engine)
    engine.close()
    engine = MmapEngine(str(tmp_path), clock, fsync="os")
    engine.open()
    assert state(engine) == held
    engine.close()


# mmap-index: the active segment against the index --------------------------------------


def index_engine(path: Path, clock: Clock, **options: Any) -> MmapIndexEngine:
    engine = MmapIndexEngine(str(path), clock, **options)
    engine.open()
    return engine


def test_segment_created_after_the_last_index_commit_is_removed(
    tmp_path: Path, clock: Clock, log_events: list[dict]
) -> None:
    """A segment newer than the index's active one holds nothing acknowledged: removed."""
    engine = index_engine(tmp_path, clock, fsync="always")
    engine.put(b"p", b"a", pack(b"v", 1))
    engine.commit()
    crash(engine)
    stray = tmp_path / "data-000000000002.seg"
    stray.write_bytes(b"anything")
    engine = index_engine(tmp_path, clock)
    assert not stray.exists()
    assert logged(log_events, LogLevel.warn, "created after the last index commit")
    assert state(engine) == {(b"p", b"a"): pack(b"v", 1)}
    engine.close()


def test_missing_segment_drops_its_records_from_the_index(
    tmp_path: Path, clock: Clock, log_events: list[dict]
) -> None:
    """Records in a deleted segment read as missing, are uncounted, and the rest is served."""
    engine = index_engine(tmp_path, clock, fsync="always", segment_bytes=4096)
    written = {}
    for i in range(100):
        packed = pack(b"x" * 100, i + 1)
        engine.put(b"p", b"k%d" % i, packed)
        written[(b"p", b"k%d" % i)] = packed
        engine.commit()
    engine.close()
    first = tmp_path / "data-000000000001.seg"
    lost = {k for k in written if engine_segment(tmp_path, clock, k) == 1}
    first.unlink()
    engine = index_engine(tmp_path, clock)
    assert engine.records_lost == len(lost) > 0
    assert state(engine) == {k: v for k, v in written.items() if k not in lost}
    assert engine.count() == len(written) - len(lost)
    assert logged(log_events, LogLevel.error, "is missing")
    engine.close()


def engine_segment(path: Path, clock: Clock, pk: tuple[bytes, bytes]) -> int:
    engine = index_engine(path, clock)
    loc = engine._get_loc(*pk)
    engine.close()
    assert loc is not None
    return split_loc(loc)[0]


def test_damaged_index_moves_the_whole_store_aside(
    tmp_path: Path, clock: Clock, log_events: list[dict]
) -> None:
    """Without a trustworthy index the segments mean nothing: everything is moved aside."""
    engine = index_engine(tmp_path / "e", clock, fsync="always")
    engine.put(b"p", b"a", pack(b"v", 1))
    engine.commit()
    crash(engine)
    (tmp_path / "e" / "index" / "data.mdb").write_bytes(b"")
    engine = index_engine(tmp_path / "e", clock)
    assert engine.quarantined is not None
    assert (Path(engine.quarantined) / "data-000000000001.seg").exists()
    assert state(engine) == {} and engine.high_water == 0
    engine.close()
