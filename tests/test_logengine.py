"""The ``log`` engine's own promises: snapshots, bounded disk use, crash recovery, fsync.

What every engine must do is in ``test_engine_contract.py``; this file covers
what only a transaction log with fuzzy snapshots has to get right: a snapshot
taken while writes go on, old files removed, a torn or corrupt tail dropped
(and logged) without losing a complete entry, incomplete snapshots ignored,
and the three fsync policies.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from kvha.data import logengine
from kvha.data.logengine import (
    END,
    OP_END,
    OP_PUT,
    SNAPSHOT_MAGIC,
    LogEngine,
    decode_entries,
    encode_entry,
)
from kvha.record import pack

START = 1_700_000_000.0


def open_engine(path: Path, clock: Clock, **options: object) -> LogEngine:
    engine = LogEngine(str(path), clock, **options)  # type: ignore[arg-type]
    engine.open()
    return engine


def segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("segment-*.log"))


def snapshot_files(path: Path) -> list[Path]:
    return sorted(path.glob("snapshot-*.snap"))


def seq_of(file: Path) -> int:
    return int(file.stem.split("-")[1])


def reactor_turn(clock: Clock) -> None:
    """Run the delayed calls due now, but not those they schedule: one reactor iteration.

    ``Clock.advance(0)`` would also run the ``callLater(0)`` each snapshot step
    schedules, so a whole snapshot would run at once with no writes between.
    """
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def state(engine: LogEngine) -> dict[tuple[bytes, bytes], bytes]:
    return {(p, k): packed for p, k, packed in engine.items()}


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def log_events():  # type: ignore[no-untyped-def]
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip real syncs in tests that reopen an engine hundreds of times."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    monkeypatch.setattr(os, "fdatasync", lambda fd: None)


def logged(events: list[dict], level: LogLevel, text: str) -> bool:
    return any(e.get("log_level") == level and text in formatEvent(e) for e in events)


def write_records(path: Path, clock: Clock, n: int) -> dict[tuple[bytes, bytes], bytes]:
    """n puts, one commit each, in a fresh engine; return what was written."""
    engine = open_engine(path, clock)
    written = {}
    for i in range(n):
        packed = pack(b"value-%d" % i, i + 1, flags=i)
        engine.put(b"p", b"k%d" % i, packed)
        engine.commit()
        written[(b"p", b"k%d" % i)] = packed
    engine.close()
    return written


# Configuration ---------------------------------------------------------------


def test_invalid_fsync_policy_raises(tmp_path: Path, clock: Clock) -> None:
    """An fsync policy outside always/everysec/os is refused when the engine is built."""
    with pytest.raises(ValueError, match="fsync"):
        LogEngine(str(tmp_path), clock, fsync="sometimes")


def test_first_open_creates_directory_and_segment(tmp_path: Path, clock: Clock) -> None:
    """Opening on a missing directory creates it and a first, empty log segment."""
    engine = open_engine(tmp_path / "new" / "log", clock)
    assert [f.name for f in segment_files(tmp_path / "new" / "log")] == ["segment-000000000001.log"]
    assert engine.disk_bytes() == 0
    engine.close()
    engine.close()  # closing twice is harmless


# Snapshots -----------------------------------------------------------------------


def test_snapshot_while_writing(
    tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot taken in steps while writes go on, plus the log after it, rebuilds the state."""
    monkeypatch.setattr(logengine, "SNAPSHOT_STEP", 7)
    engine = open_engine(tmp_path, clock, fsync="os")
    for i in range(200):
        engine.put(b"p%d" % (i % 3), b"k%d" % i, pack(b"old-%d" % i, i + 1))
    engine.commit()
    engine.start_snapshot()
    engine.start_snapshot()  # a second request while one runs is a no-op
    version = 1000
    steps = 0
    while engine.snapshots_taken == 0:
        # Between steps: overwrite keys already copied and keys not yet
        # reached, create keys, remove some, and drop a whole partition once.
        for j in range(5):
            version += 1
            i = (steps * 37 + j * 11) % 250
            engine.put(b"p%d" % (i % 3), b"k%d" % i, pack(b"new-%d" % version, version))
        engine.remove(b"p1", b"k%d" % (steps * 3 + 1))
        if steps == 4:
            engine.drop_partition(b"p2")
        engine.commit()
        reactor_turn(clock)
        steps += 1
        assert steps < 1000
    assert steps > 5  # it really did run in small steps
    for i in range(10):  # and writes after it completed
        version += 1
        engine.put(b"p2", b"late%d" % i, pack(b"late", version))
    engine.remove(b"p0", b"k0")
    engine.commit()
    live = state(engine)
    (snap,) = snapshot_files(tmp_path)
    assert all(seq_of(s) >= seq_of(snap) for s in segment_files(tmp_path))
    engine.close()

    reopened = open_engine(tmp_path, clock)
    assert state(reopened) == live
    assert reopened.high_water >= version
    reopened.close()


def test_snapshot_now_replaces_older_files(tmp_path: Path, clock: Clock) -> None:
    """After a snapshot only it and the segments it does not cover remain; they reload exactly."""
    engine = open_engine(tmp_path, clock, segment_bytes=512)
    for i in range(100):
        engine.put(b"p", b"k%d" % (i % 30), pack(b"x" * 20, i + 1))
        engine.commit()
    assert len(segment_files(tmp_path)) > 3  # rotation happened
    engine.snapshot_now()
    engine.snapshot_now()  # again: the first snapshot is replaced
    (snap,) = snapshot_files(tmp_path)
    assert [seq_of(s) for s in segment_files(tmp_path)] == [seq_of(snap)]
    engine.put(b"p", b"after", pack(b"y", 500))
    engine.commit()
    live = state(engine)
    engine.close()
    reopened = open_engine(tmp_path, clock)
    assert state(reopened) == live
    assert reopened.high_water >= 500
    reopened.close()


def test_maintenance_starts_snapshots_by_time_and_by_size(tmp_path: Path, clock: Clock) -> None:
    """maintenance() snapshots once snapshot_interval passed or snapshot_log_bytes were logged."""
    engine = open_engine(tmp_path, clock, snapshot_interval=60.0, snapshot_log_bytes=4096)
    engine.maintenance(clock.seconds() + 3600)  # nothing logged: nothing to snapshot
    clock.advance(0)
    assert engine.snapshots_taken == 0
    engine.put(b"p", b"k", pack(b"v", 1))
    engine.commit()
    clock.advance(30)
    engine.maintenance(clock.seconds())
    clock.advance(0)
    assert engine.snapshots_taken == 0  # neither due nor big enough
    clock.advance(30)
    engine.maintenance(clock.seconds())
    clock.advance(0)
    assert engine.snapshots_taken == 1  # due by time
    for i in range(50):
        engine.put(b"p", b"k%d" % i, pack(b"z" * 100, i + 2))
    engine.commit()
    engine.maintenance(clock.seconds())
    clock.advance(0)
    assert engine.snapshots_taken == 2  # due by size, long before the interval
    engine.close()


def test_log_does_not_grow_without_bound(tmp_path: Path, clock: Clock) -> None:
    """Rewriting the same keys over and over keeps the number of files and disk bytes bounded."""
    engine = open_engine(tmp_path, clock, fsync="os", segment_bytes=4096, snapshot_log_bytes=8192)
    most_files = 0
    most_bytes = 0
    version = 0
    for _round in range(150):
        for i in range(50):
            version += 1
            engine.put(b"p", b"k%d" % i, pack(b"v" * 100, version))
        engine.commit()
        engine.maintenance(clock.seconds())
        clock.advance(0)
        files = len(list(tmp_path.iterdir()))
        most_files = max(most_files, files)
        most_bytes = max(most_bytes, engine.disk_bytes())
    live_bytes = engine.bytes_used()
    written = 150 * 50 * len(encode_entry(OP_PUT, b"p", b"k10", pack(b"v" * 100, 1)))
    assert engine.snapshots_taken > 20
    assert most_files <= 6
    assert most_bytes <= 2 * live_bytes + 3 * 8192 + 4096
    assert most_bytes * 10 < written  # bounded, not just a little smaller
    live = state(engine)
    engine.close()
    reopened = open_engine(tmp_path, clock)
    assert state(reopened) == live
    reopened.close()


def test_log_does_not_grow_without_bound_across_restarts(tmp_path: Path, clock: Clock) -> None:
    """A node restarted often still snapshots: bytes logged before a restart count too."""
    version = 0
    most_bytes = 0
    for _cycle in range(40):
        engine = open_engine(tmp_path, clock, fsync="os", snapshot_log_bytes=8192)
        for i in range(20):
            version += 1
            engine.put(b"p", b"k%d" % i, pack(b"v" * 100, version))
        engine.commit()
        engine.maintenance(clock.seconds())
        clock.advance(0)
        most_bytes = max(most_bytes, engine.disk_bytes())
        engine.close()
    live_bytes = engine.bytes_used()
    assert most_bytes <= 2 * live_bytes + 2 * 8192


# Crash recovery ------------------------------------------------------------------


def test_crash_keeps_committed_writes_only(tmp_path: Path, clock: Clock) -> None:
    """A process that dies without close() loses only writes that were never committed."""
    engine = open_engine(tmp_path, clock, fsync="always")
    engine.put(b"p", b"a", pack(b"committed", 1))
    engine.commit()
    engine.put(b"p", b"b", pack(b"pending", 2))  # buffered: no reply was sent for it
    # "Crash": another process opens the files while this one's buffer is lost.
    survivor = open_engine(tmp_path, clock)
    assert state(survivor) == {(b"p", b"a"): pack(b"committed", 1)}
    survivor.close()
    os.close(engine._fd)  # release the dead engine's file without committing


def test_torn_tail_is_dropped_and_logged(
    tmp_path: Path, clock: Clock, log_events: list[dict]
) -> None:
    """A last entry cut short is dropped, truncated away and logged; complete entries survive."""
    written = write_records(tmp_path, clock, 20)
    (segment,) = segment_files(tmp_path)
    size = segment.stat().st_size
    last_entry = encode_entry(OP_PUT, b"p", b"k19", written[(b"p", b"k19")])
    with open(segment, "r+b") as f:
        f.truncate(size - 3)
    engine = open_engine(tmp_path, clock)
    del written[(b"p", b"k19")]
    assert state(engine) == written
    assert engine.torn_bytes_dropped == len(last_entry) - 3
    assert engine.stats()["torn_bytes_dropped"] == len(last_entry) - 3
    assert segment.stat().st_size == size - len(last_entry)  # the torn bytes are gone for good
    assert logged(log_events, LogLevel.warn, "torn or corrupt tail")
    # Life goes on: new writes after the repaired tail read back after another restart.
    engine.put(b"p", b"k19", pack(b"again", 100))
    engine.commit()
    written[(b"p", b"k19")] = pack(b"again", 100)
    engine.close()
    engine = open_engine(tmp_path, clock)
    assert state(engine) == written
    assert engine.torn_bytes_dropped == 0
    engine.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00",
        b"\x00" * 64,  # a zero-filled block, as some filesystems leave after a crash
        b"\xff" * 9,
        b"\x10\x00\x00\x00\xde\xad\xbe\xef" + b"\x01" * 16,  # a plausible header, wrong crc
        bytes(range(256)),
    ],
)
def test_garbage_after_last_entry_is_dropped(tmp_path: Path, clock: Clock, garbage: bytes) -> None:
    """Bytes after the last complete entry are dropped and every entry is kept."""
    written = write_records(tmp_path, clock, 10)
    (segment,) = segment_files(tmp_path)
    with open(segment, "ab") as f:
        f.write(garbage)
    engine = open_engine(tmp_path, clock)
    assert state(engine) == written
    assert engine.torn_bytes_dropped == len(garbage)
    engine.close()


def test_corrupt_entry_in_the_middle_drops_from_there_on(
    tmp_path: Path, clock: Clock, log_events: list[dict]
) -> None:
    """A bit flipped inside an entry drops it and everything after it, never returning garbage."""
    written = write_records(tmp_path, clock, 10)
    (segment,) = segment_files(tmp_path)
    data = bytearray(segment.read_bytes())
    entries = [encode_entry(OP_PUT, p, k, packed) for (p, k), packed in written.items()]
    offset = sum(len(e) for e in entries[:5])
    data[offset + len(entries[5]) - 2] ^= 0x04  # inside the value of the sixth entry
    segment.write_bytes(bytes(data))
    engine = open_engine(tmp_path, clock)
    assert state(engine) == dict(list(written.items())[:5])
    assert engine.torn_bytes_dropped == len(data) - offset
    assert logged(log_events, LogLevel.warn, "torn or corrupt tail")
    engine.close()


def test_every_cut_point_recovers_exactly_the_complete_prefix(
    tmp_path: Path, clock: Clock, no_fsync: None
) -> None:
    """Wherever a crash cuts the log, recovery yields exactly the entries wholly before the cut."""
    written = write_records(tmp_path / "orig", clock, 6)
    (segment,) = segment_files(tmp_path / "orig")
    data = segment.read_bytes()
    bounds = [0]
    for (p, k), packed in written.items():
        bounds.append(bounds[-1] + len(encode_entry(OP_PUT, p, k, packed)))
    assert bounds[-1] == len(data)
    items = list(written.items())
    for cut in range(len(data) + 1):
        directory = tmp_path / f"cut{cut}"
        directory.mkdir()
        (directory / segment.name).write_bytes(data[:cut])
        engine = open_engine(directory, clock)
        whole = max(i for i, b in enumerate(bounds) if b <= cut)
        assert state(engine) == dict(items[:whole]), cut
        assert engine.torn_bytes_dropped == cut - bounds[whole]
        engine.close()


def test_leftover_snapshot_tmp_is_ignored(tmp_path: Path, clock: Clock) -> None:
    """A .tmp left by a snapshot cut short by a crash is deleted; the state comes from the log."""
    engine = open_engine(tmp_path, clock)
    for i in range(10):
        engine.put(b"p", b"k%d" % i, pack(b"v%d" % i, i + 1))
    engine.commit()
    engine.snapshot_now()
    engine.put(b"p", b"k0", pack(b"newer", 50))
    engine.remove(b"p", b"k1")
    engine.commit()
    live = state(engine)
    engine.close()
    tmp = tmp_path / "snapshot-000000000099.tmp"
    tmp.write_bytes(SNAPSHOT_MAGIC + encode_entry(OP_PUT, b"p", b"k0", pack(b"bogus", 999)))
    engine = open_engine(tmp_path, clock)
    assert state(engine) == live
    assert not tmp.exists()
    engine.close()


def _fake_snapshot(entries: list[bytes], end: bytes = b"") -> bytes:
    return SNAPSHOT_MAGIC + b"".join(entries) + end


@pytest.mark.parametrize("earlier_snapshot", [False, True])
@pytest.mark.parametrize(
    "damage", ["no end marker", "wrong count", "bad magic", "truncated", "empty"]
)
def test_unusable_snapshot_is_ignored(
    tmp_path: Path,
    clock: Clock,
    log_events: list[dict],
    earlier_snapshot: bool,
    damage: str,
) -> None:
    """An incomplete or damaged newest snapshot is skipped: the older state plus the log is used."""
    engine = open_engine(tmp_path, clock)
    for i in range(10):
        engine.put(b"p", b"k%d" % i, pack(b"v%d" % i, i + 1))
    engine.commit()
    if earlier_snapshot:
        engine.snapshot_now()
    engine.put(b"p", b"k0", pack(b"newer", 50))
    engine.remove(b"p", b"k1")
    engine.commit()
    live = state(engine)
    high = engine.high_water
    engine.close()
    newest = max(seq_of(s) for s in segment_files(tmp_path)) + 1
    bogus = [encode_entry(OP_PUT, b"p", b"k%d" % i, pack(b"bogus", 999)) for i in range(3)]
    end = encode_entry(OP_END, b"", b"", END.pack(3, 999))
    content = {
        "no end marker": _fake_snapshot(bogus),
        "wrong count": _fake_snapshot(bogus, encode_entry(OP_END, b"", b"", END.pack(4, 999))),
        "bad magic": b"KVHASNAP0\n" + b"".join(bogus) + end,
        "truncated": _fake_snapshot(bogus, end)[:-5],
        "empty": b"",
    }[damage]
    (tmp_path / f"snapshot-{newest:012d}.snap").write_bytes(content)
    engine = open_engine(tmp_path, clock)
    assert state(engine) == live
    assert engine.high_water == high
    assert logged(log_events, LogLevel.error, "unusable snapshot")
    engine.close()


def test_high_water_survives_snapshot_without_its_record(tmp_path: Path, clock: Clock) -> None:
    """A version whose record was removed before a snapshot still bounds high_water after reopen."""
    engine = open_engine(tmp_path, clock)
    engine.put(b"p", b"a", pack(b"v", 10))
    engine.put(b"p", b"top", pack(b"v", 5000))
    engine.remove(b"p", b"top")
    engine.snapshot_now()  # the segments that logged version 5000 are deleted
    engine.close()
    reopened = open_engine(tmp_path, clock)
    assert reopened.get(b"p", b"top") is None
    assert reopened.high_water == 5000
    reopened.close()


def test_snapshot_file_format(tmp_path: Path, clock: Clock) -> None:
    """A snapshot is the magic, one put per record, and an end marker with count and high water."""
    engine = open_engine(tmp_path, clock)
    engine.put(b"p", b"a", pack(b"1", 10))
    engine.put(b"q", b"b", pack(b"", 30, tombstone=True))
    engine.put(b"q", b"gone", pack(b"2", 40))
    engine.remove(b"q", b"gone")
    engine.snapshot_now()
    (snap,) = snapshot_files(tmp_path)
    data = snap.read_bytes()
    assert data.startswith(SNAPSHOT_MAGIC)
    entries, offset = decode_entries(data[len(SNAPSHOT_MAGIC) :])
    assert offset == len(data) - len(SNAPSHOT_MAGIC)
    assert [(op, p, k) for op, p, k, _rest in entries] == [
        (OP_PUT, b"p", b"a"),
        (OP_PUT, b"q", b"b"),
        (OP_END, b"", b""),
    ]
    assert END.unpack(entries[-1][3]) == (2, 40)  # the removed record's version still counts
    engine.close()


# fsync policies ----------------------------------------------------------------


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch, clock: Clock) -> list[float]:
    """Count fdatasync calls, recording the (fake) time of each."""
    times: list[float] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        times.append(clock.seconds())
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return times


def test_fsync_always_syncs_once_per_commit(
    tmp_path: Path, clock: Clock, syncs: list[float]
) -> None:
    """With fsync always, commit() syncs once however many writes it carries (group commit)."""
    engine = open_engine(tmp_path, clock, fsync="always")
    for i in range(100):
        engine.put(b"p", b"k%d" % i, pack(b"v", i + 1))
    engine.remove(b"p", b"k0")
    engine.drop_partition(b"q")
    assert syncs == []  # nothing is written before commit
    engine.commit()
    assert len(syncs) == 1
    engine.commit()  # nothing pending: no I/O at all
    assert len(syncs) == 1
    engine.put(b"p", b"x", pack(b"v", 200))
    engine.commit()
    assert len(syncs) == 2
    engine.maintenance(clock.seconds() + 10)
    assert len(syncs) == 2
    engine.close()


def test_fsync_everysec_syncs_at_most_once_per_second(
    tmp_path: Path, clock: Clock, syncs: list[float]
) -> None:
    """With fsync everysec, commit never syncs; maintenance syncs at most once a second."""
    # Steps are binary fractions of a second, so the fake time adds up exactly.
    engine = open_engine(tmp_path, clock, fsync="everysec")
    version = 0
    for _ in range(20):  # a burst of commits within the first second after open
        version += 1
        engine.put(b"p", b"k", pack(b"v", version))
        engine.commit()
        clock.advance(0.0390625)
        engine.maintenance(clock.seconds())
    assert syncs == []
    clock.advance(0.21875)  # exactly one second after open
    engine.maintenance(clock.seconds())
    assert syncs == [START + 1.0]
    engine.maintenance(clock.seconds())
    clock.advance(0.5)
    engine.maintenance(clock.seconds())
    assert len(syncs) == 1  # nothing new, and less than a second anyway
    for _ in range(40):  # a write every 1/8 s for 5 s, maintenance after each
        version += 1
        engine.put(b"p", b"k", pack(b"v", version))
        engine.commit()
        clock.advance(0.125)
        engine.maintenance(clock.seconds())
    assert len(syncs) == 6  # once a second while there was something to sync
    assert all(later - earlier >= 1.0 for earlier, later in zip(syncs, syncs[1:]))
    clock.advance(10)
    engine.maintenance(clock.seconds())
    engine.maintenance(clock.seconds())
    assert len(syncs) == 7  # the last pending writes, once
    clock.advance(10)
    engine.maintenance(clock.seconds())
    assert len(syncs) == 7  # nothing unsynced: no sync
    engine.close()


def test_fsync_os_never_syncs_data(tmp_path: Path, clock: Clock, syncs: list[float]) -> None:
    """With fsync os, neither commit nor maintenance calls fdatasync."""
    engine = open_engine(tmp_path, clock, fsync="os")
    for i in range(10):
        engine.put(b"p", b"k%d" % i, pack(b"v", i + 1))
        engine.commit()
        clock.advance(1.5)
        engine.maintenance(clock.seconds())
    assert syncs == []
    engine.close()


def test_refuses_to_start_when_history_is_lost(tmp_path: Path, clock: Clock) -> None:
    """With its only snapshot unreadable and older segments gone, the engine refuses to open."""
    engine = open_engine(tmp_path, clock)
    for i in range(10):
        engine.put(b"p", b"k%d" % i, pack(b"v%d" % i, i + 1))
    engine.commit()
    engine.snapshot_now()  # deletes the segments the snapshot covers
    engine.put(b"p", b"k0", pack(b"newer", 50))
    engine.commit()
    engine.close()
    (snapshot,) = list(tmp_path.glob("snapshot-*.snap"))
    snapshot.write_bytes(snapshot.read_bytes()[:-7])  # damage the only snapshot
    with pytest.raises(logengine.CorruptLog, match="cannot be rebuilt"):
        open_engine(tmp_path, clock)
