"""What the ``disk`` and ``mmap-index`` engines promise beyond the contract.

Both keep values in append-only segments (:mod:`kvha.data.segments`), so
both must: compact in small steps while reads and writes go on and lose
nothing; survive a crash at any point of a compaction; drop a torn tail and
log it; report a damaged record as missing rather than return it; and honour
the three fsync policies.  Every test runs against both engines.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from kvha.data import segments
from kvha.data.diskengine import DiskEngine
from kvha.data.logengine import OP_PUT, encode_entry, scan_entries
from kvha.data.mmapindex import MmapIndexEngine
from kvha.data.segments import SegmentEngine, segment_name, split_loc
from kvha.record import pack

START = 1_700_000_000.0

Factory = Callable[..., SegmentEngine]


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture(params=["disk", "mmap-index"])
def make(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Factory:
    """Open an engine of the parametrised kind on ``tmp_path / "e"``."""
    cls = DiskEngine if request.param == "disk" else MmapIndexEngine

    def factory(**options: Any) -> SegmentEngine:
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


def reactor_turn(clock: Clock) -> None:
    """Run the delayed calls due now but not those they schedule: one reactor iteration."""
    due = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def state(engine: SegmentEngine) -> dict[tuple[bytes, bytes], bytes]:
    return {(p, k): packed for p, k, packed in engine.items()}


def crash(engine: SegmentEngine) -> None:
    """Let the engine go as kill -9 would: buffered writes lost, nothing closed cleanly."""
    engine._stop_compaction()
    engine._buf = bytearray()
    for fd in engine._fds.values():
        os.close(fd)
    engine._fds.clear()
    if isinstance(engine, DiskEngine):
        os.close(engine._hint_fd)
    else:
        engine._tables.env.close()  # the open write transaction dies with it
    engine._opened = False


def segment_paths(engine: SegmentEngine) -> list[Path]:
    return sorted(Path(engine.directory).glob("data-*.seg"))


def fill(
    engine: SegmentEngine, model: dict[tuple[bytes, bytes], bytes], rounds: int, keys: int
) -> int:
    """Write ``keys`` keys, then overwrite three in four ``rounds - 1`` times; the last version.

    The old segments end up mostly garbage but with live records (the fourth
    key of each four) that compaction has to move.
    """
    version = max([0] + [int.from_bytes(v[:8], "little") for v in model.values()])
    for r in range(rounds):
        for i in range(keys):
            if r and i % 4 == 0:
                continue
            version += 1
            partition = b"p%d" % (i % 3)
            packed = pack(b"r%d-" % r + b"x" * (i % 50), version, flags=i)
            engine.put(partition, b"k%d" % i, packed)
            model[(partition, b"k%d" % i)] = packed
        engine.commit()
    return version


# Compaction ----------------------------------------------------------------------------


def test_compaction_under_concurrent_reads_and_writes_loses_nothing(
    make: Factory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writes, removes, drops and reads between compaction steps all hold; nothing is lost."""
    monkeypatch.setattr(segments, "COMPACTION_STEP_ENTRIES", 7)
    engine = make(fsync="os", segment_bytes=8192, compaction_min_bytes=0)
    model: dict[tuple[bytes, bytes], bytes] = {}
    version = fill(engine, model, rounds=4, keys=300)
    dead, total = engine.garbage()
    assert dead > total / 2
    engine.maintenance(clock.seconds())
    assert engine.compacting
    victims = [Path(engine.directory) / segment_name(s) for s in engine._victims]
    assert victims
    rng = random.Random(7)
    steps = 0
    while engine.compacting:
        for _ in range(6):
            i = rng.randrange(400)
            partition = b"p%d" % (i % 3)
            key = b"k%d" % i
            roll = rng.random()
            if roll < 0.5:
                version += 1
                packed = pack(b"during-%d" % version, version)
                engine.put(partition, key, packed)
                model[(partition, key)] = packed
            elif roll < 0.7:
                engine.remove(partition, key)
                model.pop((partition, key), None)
            else:
                assert engine.get(partition, key) == model.get((partition, key))
        if steps == 40:
            engine.drop_partition(b"p2")
            model = {pk: v for pk, v in model.items() if pk[0] != b"p2"}
        engine.commit()
        reactor_turn(clock)
        steps += 1
        assert steps < 10_000
    assert steps > 40
    assert engine.compactions == 1 and engine.records_moved > 0
    assert state(engine) == model
    assert engine.count() == len(model)
    assert engine.bytes_used() == sum(len(k) + len(v) for (_p, k), v in model.items())
    assert not any(path.exists() for path in victims)
    assert engine.disk_bytes() < total
    engine.close()
    engine = make()
    assert state(engine) == model
    assert engine.count() == len(model)
    assert engine.high_water >= version
    engine.close()


def test_compaction_runs_in_small_steps(
    make: Factory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No step examines more than COMPACTION_STEP_ENTRIES entries or reads more than its bytes."""
    monkeypatch.setattr(segments, "COMPACTION_STEP_ENTRIES", 50)
    monkeypatch.setattr(segments, "COMPACTION_STEP_BYTES", 4096)
    engine = make(fsync="os", segment_bytes=16384, compaction_min_bytes=0)
    model: dict[tuple[bytes, bytes], bytes] = {}
    fill(engine, model, rounds=3, keys=500)
    reads: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(segments.os, "pread", pread)
    assert engine.start_compaction()
    steps = 0
    moved_per_step = []
    while engine.compacting:
        moved = engine.records_moved
        reactor_turn(clock)
        moved_per_step.append(engine.records_moved - moved)
        steps += 1
    assert max(moved_per_step) <= 50
    assert max(reads) <= 4096
    assert steps >= engine.records_moved // 50
    assert state(engine) == model
    engine.close()


def test_compaction_reclaims_space_and_keeps_the_high_water(make: Factory, clock: Clock) -> None:
    """After compaction the victims are gone, and a removed record's version still counts."""
    engine = make(fsync="os", segment_bytes=4096, compaction_min_bytes=0)
    engine.put(b"p", b"top", pack(b"v", 10**12))
    engine.commit()
    model: dict[tuple[bytes, bytes], bytes] = {}
    fill(engine, model, rounds=5, keys=100)
    engine.remove(b"p", b"top")
    engine.commit()
    used_before = engine.disk_bytes()
    first = segment_paths(engine)[0]
    engine.compact_now()
    assert not first.exists()
    assert engine.disk_bytes() < used_before / 2
    assert state(engine) == model
    assert engine.high_water >= 10**12
    crash(engine)  # not even a clean close
    engine = make()
    assert state(engine) == model
    assert engine.high_water >= 10**12
    engine.close()


def test_crash_in_the_middle_of_compaction_loses_nothing(
    make: Factory, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash between compaction steps leaves old and new copies; reopening finds every record."""
    monkeypatch.setattr(segments, "COMPACTION_STEP_ENTRIES", 3)
    engine = make(fsync="always", segment_bytes=4096, compaction_min_bytes=0)
    model: dict[tuple[bytes, bytes], bytes] = {}
    version = fill(engine, model, rounds=4, keys=120)
    assert engine.start_compaction()
    for _ in range(6):
        reactor_turn(clock)
        version += 1
        packed = pack(b"mid", version)
        engine.put(b"p0", b"k0", packed)
        model[(b"p0", b"k0")] = packed
        engine.commit()
    assert engine.compacting and engine.records_moved > 0
    crash(engine)
    engine = make(fsync="always", segment_bytes=4096, compaction_min_bytes=0)
    assert state(engine) == model
    assert engine.count() == len(model)
    engine.compact_now()  # and a compaction after the crash finishes the job
    assert state(engine) == model
    engine.close()
    engine = make()
    assert state(engine) == model
    engine.close()


def test_crash_while_deleting_victims_loses_nothing(
    make: Factory, clock: Clock, monkeypatch: pytest.MonkeyPatch, log_events: list[dict]
) -> None:
    """A compaction that fails after moving everything, mid-deletion, is logged; state holds."""
    engine = make(fsync="os", segment_bytes=4096, compaction_min_bytes=0)
    model: dict[tuple[bytes, bytes], bytes] = {}
    fill(engine, model, rounds=4, keys=120)
    real_unlink = os.unlink
    deleted: list[str] = []

    def unlink(path: str) -> None:
        if path.endswith(".seg") and deleted:
            raise OSError(5, "Input/output error", path)
        deleted.append(path)
        real_unlink(path)

    monkeypatch.setattr(segments.os, "unlink", unlink)
    assert engine.start_compaction()
    clock.advance(0)
    assert not engine.compacting
    assert engine.compaction_failures == 1
    assert logged(log_events, LogLevel.critical, "compaction of")
    assert state(engine) == model
    monkeypatch.setattr(segments.os, "unlink", real_unlink)
    crash(engine)
    engine = make()
    assert state(engine) == model
    assert engine.count() == len(model)
    engine.close()


def test_maintenance_compacts_only_past_the_thresholds(make: Factory, clock: Clock) -> None:
    """No compaction below compaction_min_bytes of garbage; one once it is passed."""
    engine = make(fsync="os", segment_bytes=4096, compaction_min_bytes=40_000)
    model: dict[tuple[bytes, bytes], bytes] = {}
    fill(engine, model, rounds=2, keys=100)
    engine.maintenance(clock.seconds())
    assert not engine.compacting and engine.garbage()[0] < 40_000
    fill(engine, model, rounds=8, keys=100)
    assert engine.garbage()[0] >= 40_000
    engine.maintenance(clock.seconds())
    assert engine.compacting
    clock.advance(0)
    assert engine.compactions == 1
    assert state(engine) == model
    engine.close()


# Crashes, torn tails and damage ------------------------------------------------------------


def test_crash_keeps_committed_writes_only(make: Factory) -> None:
    """A crash loses the writes buffered since the last commit, and only those."""
    engine = make(fsync="always")
    engine.put(b"p", b"a", pack(b"committed", 1))
    engine.commit()
    engine.put(b"p", b"b", pack(b"pending", 2))
    crash(engine)
    engine = make()
    assert state(engine) == {(b"p", b"a"): pack(b"committed", 1)}
    engine.close()


def test_every_cut_of_the_last_segment_keeps_exactly_the_whole_entries(
    make: Factory, log_events: list[dict]
) -> None:
    """Wherever the last segment is cut, the records wholly before the cut survive, only those."""
    engine = make(fsync="always")
    written = []
    for i in range(5):
        packed = pack(b"value-%d" % i, i + 1)
        engine.put(b"p", b"k%d" % i, packed)
        engine.commit()
        written.append(((b"p", b"k%d" % i), packed))
    crash(engine)
    (segment,) = segment_paths(engine)
    data = segment.read_bytes()
    bounds = [0]
    for (p, k), packed in written:
        bounds.append(bounds[-1] + len(encode_entry(OP_PUT, p, k, packed)))
    assert bounds[-1] == len(data)
    index_copy = segment.parent / "index.copy"
    if isinstance(engine, MmapIndexEngine):
        os.rename(segment.parent / "index", index_copy)
    for cut in range(len(data) - 1, -1, -7):
        if isinstance(engine, MmapIndexEngine):
            import shutil

            shutil.rmtree(segment.parent / "index", ignore_errors=True)
            shutil.copytree(index_copy, segment.parent / "index")
        segment.write_bytes(data[:cut])
        engine = make()
        whole = max(i for i, b in enumerate(bounds) if b <= cut)
        assert state(engine) == dict(written[:whole]), cut
        assert engine.count() == whole
        crash(engine)
    assert logged(log_events, LogLevel.warn, "torn") or logged(
        log_events, LogLevel.error, "shorter than the index says"
    )


def test_torn_tail_is_dropped_and_logged_and_life_goes_on(
    make: Factory, log_events: list[dict]
) -> None:
    """Half a last record is dropped with a log line; new writes after it survive a restart."""
    engine = make(fsync="always")
    model = {}
    for i in range(20):
        packed = pack(b"value-%d" % i, i + 1)
        engine.put(b"p", b"k%d" % i, packed)
        model[(b"p", b"k%d" % i)] = packed
        engine.commit()
    crash(engine)
    segment = segment_paths(engine)[-1]
    size = segment.stat().st_size
    with open(segment, "r+b") as f:
        f.truncate(size - 5)
    engine = make()
    del model[(b"p", b"k19")]
    assert state(engine) == model
    assert engine.get(b"p", b"k19") is None
    if isinstance(engine, DiskEngine):
        assert engine.torn_bytes_dropped > 0
        assert logged(log_events, LogLevel.warn, "torn or corrupt tail")
    else:
        assert engine.records_lost == 1
        assert logged(log_events, LogLevel.error, "shorter than the index says")
    engine.put(b"p", b"k19", pack(b"again", 100))
    engine.commit()
    model[(b"p", b"k19")] = pack(b"again", 100)
    crash(engine)
    engine = make()
    assert state(engine) == model
    engine.close()


def test_unacknowledged_bytes_after_the_last_commit_are_dropped(
    make: Factory, log_events: list[dict]
) -> None:
    """Garbage or a half-written entry after the last commit is cut off and logged."""
    engine = make(fsync="always")
    engine.put(b"p", b"a", pack(b"kept", 1))
    engine.commit()
    crash(engine)
    segment = segment_paths(engine)[-1]
    with open(segment, "ab") as f:
        f.write(encode_entry(OP_PUT, b"p", b"b", pack(b"never acknowledged", 2))[:-4])
    engine = make()
    assert state(engine) == {(b"p", b"a"): pack(b"kept", 1)}
    assert engine.torn_bytes_dropped > 0
    assert logged(log_events, LogLevel.warn, "torn")
    engine.close()


def test_damaged_record_reads_as_missing_never_as_garbage(
    make: Factory, log_events: list[dict]
) -> None:
    """A flipped bit inside a stored value makes that record read as missing, with an error."""
    engine = make(fsync="always", segment_bytes=4096)
    model: dict[tuple[bytes, bytes], bytes] = {}
    fill(engine, model, rounds=1, keys=100)
    loc = engine._get_loc(b"p1", b"k4")
    assert loc is not None
    seq, offset, size, _tomb = split_loc(loc)
    path = Path(engine.directory) / segment_name(seq)
    data = bytearray(path.read_bytes())
    data[offset + size - 3] ^= 0x20
    path.write_bytes(bytes(data))
    assert engine.get(b"p1", b"k4") is None
    assert engine.corrupt_reads == 1
    assert logged(log_events, LogLevel.error, "checksum mismatch")
    assert engine.get(b"p1", b"k7") == model[(b"p1", b"k7")]
    engine.close()


# fsync policies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "per_commit", "after_a_second"),
    [("always", 1, 0), ("everysec", 0, 1), ("os", 0, 0)],
)
def test_fsync_policies(
    make: Factory,
    clock: Clock,
    monkeypatch: pytest.MonkeyPatch,
    policy: str,
    per_commit: int,
    after_a_second: int,
) -> None:
    """always: one data fdatasync per commit; everysec: one a second from maintenance; os: none."""
    engine = make(fsync=policy)
    calls: list[int] = []
    monkeypatch.setattr(segments.os, "fdatasync", lambda fd: calls.append(fd))
    for i in range(3):
        engine.put(b"p", b"k%d" % i, pack(b"v", i + 1))
    engine.commit()
    assert len(calls) == per_commit
    engine.maintenance(clock.seconds() + 0.5)
    assert len(calls) == per_commit
    engine.maintenance(clock.seconds() + 1.0)
    assert len(calls) == per_commit + after_a_second
    engine.commit()  # nothing new: no sync
    assert len(calls) == per_commit + after_a_second
    engine.close()


def test_invalid_options_are_refused(tmp_path: Path, clock: Clock) -> None:
    """A bad fsync policy or garbage ratio is refused when the engine is built."""
    for cls in (DiskEngine, MmapIndexEngine):
        with pytest.raises(ValueError, match="fsync"):
            cls(str(tmp_path), clock, fsync="sometimes")
        with pytest.raises(ValueError, match="compaction_garbage_ratio"):
            cls(str(tmp_path), clock, compaction_garbage_ratio=0.0)


def test_large_records_cross_step_boundaries(
    make: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries larger than a compaction step are read whole and moved intact."""
    monkeypatch.setattr(segments, "COMPACTION_STEP_BYTES", 1000)
    engine = make(fsync="os", segment_bytes=20_000)
    model = {}
    for i in range(12):
        packed = pack(bytes([65 + i]) * 5000, i + 1)
        engine.put(b"p", b"big%d" % (i % 4), packed)
        model[(b"p", b"big%d" % (i % 4))] = packed
        engine.commit()
    engine.compact_now()
    assert engine.compactions == 1
    assert state(engine) == model
    for path in segment_paths(engine):
        entries = list(scan_entries(path.read_bytes()))
        assert sum(size for _at, size, *_rest in entries) == path.stat().st_size
    engine.close()
