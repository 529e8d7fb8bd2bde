"""The ``disk`` engine's own promises: hint files make a restart read no values.

What every engine does is in ``test_engine_contract.py`` and what both
segment engines do in ``test_segment_engines.py``; this file covers the key
directory's rebuild from hints, and what happens when a hint is missing,
stale or incomplete.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from kvha.data.diskengine import DiskEngine, hint_name
from kvha.record import pack

START = 1_700_000_000.0


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


def logged(events: list[dict], level: LogLevel, text: str) -> bool:
    return any(e.get("log_level") == level and text in formatEvent(e) for e in events)


def open_engine(path: Path, clock: Clock, **options: object) -> DiskEngine:
    engine = DiskEngine(str(path), clock, **options)  # type: ignore[arg-type]
    engine.open()
    return engine


def state(engine: DiskEngine) -> dict[tuple[bytes, bytes], bytes]:
    return {(p, k): packed for p, k, packed in engine.items()}


def write(engine: DiskEngine, n: int, start: int = 0) -> dict[tuple[bytes, bytes], bytes]:
    written = {}
    for i in range(start, start + n):
        packed = pack(b"value-%d-" % i + b"v" * 200, i + 1)
        engine.put(b"p%d" % (i % 2), b"k%d" % i, packed)
        written[(b"p%d" % (i % 2), b"k%d" % i)] = packed
        if i % 10 == 0:
            engine.remove(b"p0", b"k%d" % (i // 2))
            written.pop((b"p0", b"k%d" % (i // 2)), None)
        engine.commit()
    return written


@pytest.fixture
def scanned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the segments a restart had to read in full."""
    sizes: list[int] = []
    real = DiskEngine._scan_segment

    def scan(self: DiskEngine, seq: int, last: bool):  # type: ignore[no-untyped-def]
        sizes.append(os.path.getsize(self._path(seq)))
        return real(self, seq, last)

    monkeypatch.setattr(DiskEngine, "_scan_segment", scan)
    return sizes


def test_clean_restart_reads_hints_and_no_values(
    tmp_path: Path, clock: Clock, scanned: list[int]
) -> None:
    """After close() every segment has a hint: reopening reads no segment with data in it."""
    engine = open_engine(tmp_path, clock, segment_bytes=8192)
    written = write(engine, 300)
    segments = len(list(tmp_path.glob("data-*.seg")))
    assert segments > 5
    engine.close()
    scanned.clear()
    engine = open_engine(tmp_path, clock, segment_bytes=8192)
    assert state(engine) == written
    assert engine.hints_loaded == segments
    assert scanned == [0]  # only the new, empty active segment
    assert engine.high_water == 300
    engine.close()


def test_crash_restart_reads_only_the_last_segment(
    tmp_path: Path, clock: Clock, scanned: list[int]
) -> None:
    """After a crash only the segment that was being written has no hint and is read."""
    engine = open_engine(tmp_path, clock, segment_bytes=8192, fsync="always")
    written = write(engine, 300)
    sizes = {p.name: p.stat().st_size for p in tmp_path.glob("data-*.seg")}
    for fd in engine._fds.values():  # kill -9: nothing is closed or sealed
        os.close(fd)
    os.close(engine._hint_fd)
    engine = open_engine(tmp_path, clock, segment_bytes=8192)
    assert state(engine) == written
    assert scanned == [sizes[max(sizes)]]
    assert engine.segments_scanned == 1
    # The rebuilt hint of that segment is sealed like any other at the next close.
    engine.close()
    scanned.clear()
    engine = open_engine(tmp_path, clock)
    assert state(engine) == written
    assert scanned == [0]
    engine.close()


@pytest.mark.parametrize("damage", ["missing", "stale", "incomplete", "garbage"])
def test_unusable_hint_is_replaced_by_reading_the_segment(
    tmp_path: Path, clock: Clock, scanned: list[int], log_events: list[dict], damage: str
) -> None:
    """A missing, stale or cut hint is ignored (logged), the segment is read, a new hint written."""
    engine = open_engine(tmp_path, clock, segment_bytes=8192)
    written = write(engine, 200)
    engine.close()
    hint = tmp_path / hint_name(1)
    data = hint.read_bytes()
    if damage == "missing":
        hint.unlink()
    elif damage == "stale":
        with open(tmp_path / "data-000000000001.seg", "ab") as f:
            f.write(b"\x00" * 7)  # the segment no longer has the size the hint describes
    elif damage == "incomplete":
        hint.write_bytes(data[: len(data) // 2])
    else:
        hint.write_bytes(b"\xff" * 100)
    scanned.clear()
    engine = open_engine(tmp_path, clock, segment_bytes=8192)
    assert state(engine) == written
    assert len(scanned) == 2  # segment 1 and the empty active one
    if damage != "missing":
        assert logged(log_events, LogLevel.warn, "hint file")
    if damage == "stale":
        assert engine.torn_bytes_dropped == 7
    engine.close()
    scanned.clear()
    engine = open_engine(tmp_path, clock)
    assert state(engine) == written
    assert scanned == [0]  # the hint was rewritten
    engine.close()


def test_dropped_partition_stays_dropped_across_restarts(tmp_path: Path, clock: Clock) -> None:
    """A partition drop recorded in a segment and its hint empties it on replay."""
    engine = open_engine(tmp_path, clock, segment_bytes=4096)
    write(engine, 100)
    engine.drop_partition(b"p1")
    engine.put(b"p1", b"after", pack(b"new", 1000))
    engine.commit()
    live = state(engine)
    assert {p for p, _k in live} == {b"p0", b"p1"}
    assert [k for p, k in live if p == b"p1"] == [b"after"]
    engine.close()
    engine = open_engine(tmp_path, clock)
    assert state(engine) == live
    assert engine.count(b"p1") == 1
    engine.close()


def test_keydir_holds_one_int_per_key(tmp_path: Path, clock: Clock) -> None:
    """Memory holds keys and a packed int location each, not values."""
    engine = open_engine(tmp_path, clock)
    write(engine, 50)
    for part in engine._keydir.values():
        assert all(type(loc) is int for loc in part.values())
    engine.close()
