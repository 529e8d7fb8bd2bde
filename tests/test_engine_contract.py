"""The storage engine contract, written once and run against every engine.

``EngineContract`` holds every test; each engine gets a subclass that says
how to build it (``make_engine``) and how to open a fresh instance on the
same directory after a restart (``reopen``).  A new engine (disk, mmap,
mmap-index) joins by adding one subclass at the bottom of this file, the way
Tahoe-LAFS runs ``test_istorageserver.py`` against every storage server.

The heart of it is a model-based test: a hypothesis state machine drives a
:class:`~kvha.data.store.Store` over the engine and a plain dict side by side
through every operation, clock advances, sweeps and (for durable engines)
restarts, and checks after every step that the two agree.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.task import Clock

from kvha.clock import version_millis
from kvha.data import logengine, segments
from kvha.data.diskengine import DiskEngine
from kvha.data.engine import Engine, MemoryEngine
from kvha.data.logengine import LogEngine
from kvha.data.mmapengine import MmapEngine
from kvha.data.mmapindex import MmapIndexEngine
from kvha.data.store import IncrMode, Result, Status, Store, StoreMode
from kvha.record import Record, pack, unpack

#: A realistic wall clock (November 2023), so versions carry real milliseconds.
START = 1_700_000_000.0

PARTITIONS = (b"p0", b"p1")
KEYS = (b"a", b"b", b"c")
MAX_VALUE = 300
TOMBSTONE_TTL = 60.0
U64 = 1 << 64
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1

NUMBERS = (
    b"0",
    b"7",
    b"12  ",
    b"007",
    b"-3",
    b"-0",
    b" 5",
    b"abc",
    b"",
    b"18446744073709551615",
    b"18446744073709551616",
    b"9223372036854775807",
    b"-9223372036854775808",
)
DELTAS = (
    b"1",
    b"5",
    b"0",
    b"-1",
    b"x",
    b"",
    b"007",
    b"18446744073709551615",
    b"9223372036854775807",
)

partitions = st.sampled_from(PARTITIONS)
keys = st.sampled_from(KEYS)
values = st.one_of(st.sampled_from(NUMBERS), st.binary(max_size=12))
any_values = st.one_of(values, st.sampled_from([b"M" * MAX_VALUE, b"L" * (MAX_VALUE + 1)]))
flag_values = st.sampled_from([0, 1, 0xFFFFFFFF])
expiries = st.tuples(st.sampled_from(["none", "future", "past"]), st.integers(1, 120))


def now_ms(clock: Clock) -> int:
    return int(clock.seconds() * 1000)


# Models of the numeric semantics: what memcached and Redis accept.


def memcached_number(value: bytes) -> Optional[int]:
    digits = value.rstrip(b" ")
    if not digits or len(digits) > 20 or any(c not in b"0123456789" for c in digits):
        return None
    n = int(digits)
    return n if n < U64 else None


def redis_int(value: bytes) -> Optional[int]:
    text = value.decode("latin-1")
    body = text[1:] if text.startswith("-") else text
    if not body or any(c not in "0123456789" for c in body):
        return None
    if (body.startswith("0") and body != "0") or text == "-0":
        return None
    n = int(text)
    return n if I64_MIN <= n <= I64_MAX else None


class EngineContract:
    """Every engine must pass these.  Subclasses say how to build the engine."""

    #: Whether the engine keeps committed state across close/reopen.
    durable = False

    #: Hypothesis budget for the model-based test.
    max_examples = 50
    step_count = 40

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        """A new, unopened engine keeping its files (if any) under ``path``."""
        raise NotImplementedError

    def reopen(self, path: Path, clock: Clock) -> Engine:
        """A fresh, unopened engine on the directory a closed one used."""
        return self.make_engine(path, clock)

    def opened(self, path: Path, clock: Clock) -> Engine:
        engine = self.make_engine(path, clock)
        engine.open()
        return engine

    # The model-based test -------------------------------------------------

    def test_store_matches_model(self, tmp_path: Path) -> None:
        """A Store over this engine behaves exactly like a dict model under random operations."""
        contract = self
        counter = itertools.count()

        class Machine(StoreMachine):
            def make_engine(self, path: Path, clock: Clock) -> Engine:
                return contract.make_engine(path, clock)

            def reopen_engine(self, path: Path, clock: Clock) -> Engine:
                return contract.reopen(path, clock)

            def new_path(self) -> Path:
                return tmp_path / f"example-{next(counter)}"

        Machine.durable = self.durable
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=self.max_examples,
                stateful_step_count=self.step_count,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            ),
        )

    # Plain tests -----------------------------------------------------------

    def test_empty_engine(self, tmp_path: Path) -> None:
        """A new engine holds nothing and tolerates removes and drops of missing things."""
        engine = self.opened(tmp_path / "e", Clock())
        assert engine.get(b"p", b"k") is None
        engine.remove(b"p", b"k")
        assert engine.drop_partition(b"p") == 0
        assert engine.partitions() == []
        assert engine.keys(b"p") == []
        assert engine.count() == 0 and engine.count(b"p") == 0
        assert engine.bytes_used() == 0 and engine.bytes_used(b"p") == 0
        assert list(engine.items()) == []
        engine.commit()
        engine.maintenance(0.0)
        engine.close()

    def test_put_get_overwrite_remove(self, tmp_path: Path) -> None:
        """An engine returns exactly the packed bytes last put under (partition, key)."""
        engine = self.opened(tmp_path / "e", Clock())
        first = pack(b"one", 5, flags=3, expires_ms=99)
        engine.put(b"p", b"k", first)
        assert engine.get(b"p", b"k") == first
        assert engine.get(b"q", b"k") is None  # partitions are separate namespaces
        second = pack(b"two", 6)
        engine.put(b"p", b"k", second)
        assert engine.get(b"p", b"k") == second
        engine.put(b"p", b"", pack(b"", 7, tombstone=True))  # empty key, tombstone
        assert unpack(engine.get(b"p", b"") or b"").tombstone
        engine.remove(b"p", b"k")
        assert engine.get(b"p", b"k") is None
        assert sorted(engine.keys(b"p")) == [b""]
        engine.commit()
        engine.close()

    def test_count_and_bytes_used_track_writes(self, tmp_path: Path) -> None:
        """count() and bytes_used() follow puts, overwrites, removes and partition drops."""
        engine = self.opened(tmp_path / "e", Clock())
        a = pack(b"xxxx", 1)
        b = pack(b"yy", 2)
        engine.put(b"p", b"a", a)
        engine.put(b"p", b"bb", b)
        engine.put(b"q", b"a", a)
        assert engine.count() == 3
        assert engine.count(b"p") == 2 and engine.count(b"q") == 1
        assert engine.bytes_used(b"p") == (1 + len(a)) + (2 + len(b))
        assert engine.bytes_used() == engine.bytes_used(b"p") + 1 + len(a)
        bigger = pack(b"z" * 100, 3)
        engine.put(b"p", b"a", bigger)  # overwrite: count unchanged, bytes follow
        assert engine.count(b"p") == 2
        assert engine.bytes_used(b"p") == (1 + len(bigger)) + (2 + len(b))
        engine.remove(b"p", b"bb")
        assert engine.count(b"p") == 1
        assert engine.bytes_used(b"p") == 1 + len(bigger)
        engine.remove(b"p", b"bb")  # removing twice changes nothing
        assert engine.bytes_used(b"p") == 1 + len(bigger)
        assert engine.drop_partition(b"p") == 1
        assert engine.count(b"p") == 0 and engine.bytes_used(b"p") == 0
        assert engine.count() == 1 and engine.bytes_used() == 1 + len(a)
        assert engine.partitions() == [b"q"]
        engine.commit()
        engine.close()

    def test_keys_snapshot_safe_while_writing(self, tmp_path: Path) -> None:
        """keys() and items() are snapshots: writes during a walk neither break nor alter it."""
        engine = self.opened(tmp_path / "e", Clock())
        for i in range(50):
            engine.put(b"p", b"k%d" % i, pack(b"v", i + 1))
        snapshot = engine.keys(b"p")
        walked = []
        for n, key in enumerate(snapshot):
            walked.append(key)
            engine.put(b"p", b"new%d" % n, pack(b"v", 100 + n))
            engine.remove(b"p", key)
        assert sorted(walked) == sorted(b"k%d" % i for i in range(50))
        assert sorted(engine.keys(b"p")) == sorted(b"new%d" % n for n in range(50))
        seen = []
        for partition, key, packed in engine.items():
            seen.append((partition, key))
            assert engine.get(partition, key) == packed
            engine.put(b"other", key, packed)  # a partition born mid-walk is not walked
            if len(seen) == 10:
                engine.drop_partition(b"p")  # the rest of the walk is gone: skipped
        assert len(seen) == 10
        assert all(partition == b"p" for partition, _key in seen)
        assert engine.count(b"p") == 0 and engine.count(b"other") == 10
        engine.commit()
        engine.close()

    def test_iter_keys_walks_while_writing(self, tmp_path: Path) -> None:
        """iter_keys() yields each key present throughout exactly once, across commits."""
        engine = self.opened(tmp_path / "e", Clock())
        stable = [b"s%04d" % i for i in range(2500)]
        stable += [b"L" * 600 + b"%d" % i for i in range(30)] + [b""]  # long and empty keys
        for i, key in enumerate(stable):
            engine.put(b"p", key, pack(b"v", i + 1))
        for i in range(300):
            engine.put(b"p", b"t%03d" % i, pack(b"v", 5000 + i))
        engine.commit()
        seen = []
        for n, key in enumerate(engine.iter_keys(b"p")):
            seen.append(key)
            if n % 50 == 0:
                engine.put(b"p", b"a-new%d" % n, pack(b"v", 10_000 + n))  # before the cursor
                engine.put(b"p", b"z-new%d" % n, pack(b"v", 20_000 + n))  # after it
                engine.remove(b"p", b"t%03d" % (n % 300))
                engine.commit()
        assert len(seen) == len(set(seen))
        assert sorted(k for k in seen if not k.startswith((b"t", b"a-", b"z-"))) == sorted(stable)
        assert list(engine.iter_keys(b"missing")) == []
        engine.drop_partition(b"p")
        assert list(engine.iter_keys(b"p")) == []
        engine.close()

    def test_high_water(self, tmp_path: Path) -> None:
        """A durable engine's high_water covers every committed version; a memory one's is 0."""
        clock = Clock()
        engine = self.opened(tmp_path / "e", clock)
        engine.put(b"p", b"a", pack(b"v", 40))
        engine.put(b"p", b"b", pack(b"v", 1000))
        engine.put(b"q", b"c", pack(b"v", 7))
        engine.put(b"q", b"d", pack(b"", 900, tombstone=True))
        engine.remove(b"p", b"b")  # the highest version is no longer held...
        engine.drop_partition(b"q")
        engine.commit()
        if not self.durable:
            assert engine.high_water == 0
            engine.close()
            return
        assert engine.high_water >= 1000  # ...but must not be handed out again
        clock.advance(10**6)  # whatever compaction the engine does in the meantime
        engine.maintenance(clock.seconds())
        clock.advance(0)
        assert engine.high_water >= 1000
        engine.close()
        engine = self.reopen(tmp_path / "e", clock)
        engine.open()
        assert engine.high_water >= 1000
        engine.put(b"p", b"e", pack(b"v", 2000))
        engine.commit()
        engine.close()
        engine = self.reopen(tmp_path / "e", clock)
        engine.open()
        assert engine.high_water >= 2000
        engine.close()

    def test_restart_keeps_committed_state(self, tmp_path: Path) -> None:
        """Reopened, a durable engine holds exactly what it held; a memory one holds nothing."""
        clock = Clock()
        engine = self.opened(tmp_path / "e", clock)
        for i in range(30):
            engine.put(PARTITIONS[i % 2], b"k%d" % i, pack(b"v%d" % i, i + 1, flags=i))
        engine.put(b"p0", b"k0", pack(b"again", 99, expires_ms=12345))
        engine.remove(b"p1", b"k1")
        engine.put(b"gone", b"x", pack(b"v", 100))
        engine.drop_partition(b"gone")
        engine.put(b"gone", b"y", pack(b"back", 101))  # a partition refilled after a drop
        engine.commit()
        before = sorted(engine.items())
        used = engine.bytes_used()
        engine.close()
        engine = self.reopen(tmp_path / "e", clock)
        engine.open()
        if self.durable:
            assert sorted(engine.items()) == before
            assert engine.bytes_used() == used
            assert engine.count() == len(before)
        else:
            assert list(engine.items()) == []
        engine.close()


class StoreMachine(RuleBasedStateMachine):
    """A Store over an engine, checked step by step against a dict of Records.

    The model tracks physical presence exactly: an expired record stays in the
    model (as in the engine) until a read or a conditional operation touches
    it (the store's lazy expiry) or a sweep removes it.
    """

    durable = False

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        raise NotImplementedError

    def reopen_engine(self, path: Path, clock: Clock) -> Engine:
        raise NotImplementedError

    def new_path(self) -> Path:
        raise NotImplementedError

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.clock.advance(START)
        self.path = self.new_path()
        self.engine = self.make_engine(self.path, self.clock)
        self.store = self._open_store(self.engine)
        self.model: dict[tuple[bytes, bytes], Record] = {}
        self.last_version = 0  # highest version stored so far, issued or applied

    def _open_store(self, engine: Engine) -> Store:
        store = Store(
            engine, self.clock.seconds, tombstone_ttl=TOMBSTONE_TTL, max_value_bytes=MAX_VALUE
        )
        store.open()
        return store

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.path, ignore_errors=True)

    # Model helpers ---------------------------------------------------------

    def _expires(self, expiry: tuple[str, int]) -> int:
        kind, seconds = expiry
        if kind == "none":
            return 0
        if kind == "future":
            return now_ms(self.clock) + seconds * 1000
        return max(1, now_ms(self.clock) - seconds * 1000)

    def _live(self, partition: bytes, key: bytes) -> Optional[Record]:
        """The model's live record; an expired one is dropped, as the store's read does."""
        record = self.model.get((partition, key))
        if record is None or record.tombstone:
            return None
        if record.expired(now_ms(self.clock)):
            del self.model[(partition, key)]
            return None
        return record

    def _issued(self, result: Result) -> Record:
        """Check a store-issued version is newer than everything before it, and remember it."""
        record = result.record
        assert record is not None
        assert record.version > self.last_version, (record.version, self.last_version)
        self.last_version = record.version
        return record

    def _stored(self, partition: bytes, key: bytes, result: Result, expected: Record) -> None:
        record = self._issued(result)
        expected.version = record.version
        assert record == expected
        self.model[(partition, key)] = expected

    def _unchanged(self, partition: bytes, key: bytes) -> None:
        raw = self.engine.get(partition, key)
        model = self.model.get((partition, key))
        assert (None if raw is None else unpack(raw)) == model

    # Writes ----------------------------------------------------------------

    @rule(p=partitions, k=keys, value=any_values, flags=flag_values, expiry=expiries)
    def set(self, p: bytes, k: bytes, value: bytes, flags: int, expiry: tuple[str, int]) -> None:
        expires_ms = self._expires(expiry)
        result = self.store.set(p, k, value, flags=flags, expires_ms=expires_ms)
        if len(value) > MAX_VALUE:
            assert result.status is Status.TOO_LARGE
            self._unchanged(p, k)
            return
        assert result.status is Status.STORED
        self._stored(p, k, result, Record(value, 0, flags, expires_ms))

    @rule(
        p=partitions,
        k=keys,
        value=values,
        flags=flag_values,
        expiry=expiries,
        age=st.sampled_from(["older", "same", "newer"]),
        delta=st.integers(1, 5000),
        is_tombstone=st.booleans(),
    )
    def apply_versioned(
        self,
        p: bytes,
        k: bytes,
        value: bytes,
        flags: int,
        expiry: tuple[str, int],
        age: str,
        delta: int,
        is_tombstone: bool,
    ) -> None:
        current = self.model.get((p, k))  # expired or tombstone: still what the key holds
        base = current.version if current is not None else self.last_version
        version = {"older": max(1, base - delta), "same": max(1, base), "newer": base + delta}[age]
        if is_tombstone:
            expected = Record(b"", version, 0, 0, tombstone=True)
        else:
            expected = Record(value, version, flags, self._expires(expiry))
        result = self.store.apply(p, k, expected.pack())
        if current is not None and version <= current.version:
            assert result.status is Status.STALE
            assert result.record == current
            self._unchanged(p, k)
            return
        assert result.status is Status.STORED
        assert result.record == expected
        self.model[(p, k)] = expected
        self.last_version = max(self.last_version, version)

    @rule(
        p=partitions,
        k=keys,
        mode=st.sampled_from(
            [StoreMode.ADD, StoreMode.REPLACE, StoreMode.APPEND, StoreMode.PREPEND]
        ),
        value=any_values,
        flags=flag_values,
        expiry=expiries,
    )
    def conditional_store(
        self,
        p: bytes,
        k: bytes,
        mode: StoreMode,
        value: bytes,
        flags: int,
        expiry: tuple[str, int],
    ) -> None:
        expires_ms = self._expires(expiry)
        live = self._live(p, k)
        result = self.store.store(mode, p, k, value, flags=flags, expires_ms=expires_ms)
        if (mode is StoreMode.ADD) == (live is not None):
            # add needs no live record; replace, append and prepend need one
            assert result.status is Status.NOT_STORED
        else:
            if mode is StoreMode.APPEND:
                assert live is not None
                expected = Record(live.value + value, 0, live.flags, live.expires_ms)
            elif mode is StoreMode.PREPEND:
                assert live is not None
                expected = Record(value + live.value, 0, live.flags, live.expires_ms)
            else:
                expected = Record(value, 0, flags, expires_ms)
            if len(expected.value) > MAX_VALUE:
                assert result.status is Status.TOO_LARGE
            else:
                assert result.status is Status.STORED
                self._stored(p, k, result, expected)
                return
        self._unchanged(p, k)

    @rule(
        p=partitions,
        k=keys,
        value=values,
        flags=flag_values,
        expiry=expiries,
        which=st.sampled_from(["zero", "right", "wrong"]),
    )
    def cas(
        self, p: bytes, k: bytes, value: bytes, flags: int, expiry: tuple[str, int], which: str
    ) -> None:
        expires_ms = self._expires(expiry)
        live = self._live(p, k)
        if which == "zero":
            cas = 0
        elif live is None:
            cas = self.last_version + 1
        else:
            cas = live.version if which == "right" else live.version + 1
        result = self.store.store(
            StoreMode.CAS, p, k, value, flags=flags, expires_ms=expires_ms, cas=cas
        )
        if cas == 0:
            ok = live is None
            refusal = Status.EXISTS
        else:
            ok = live is not None and live.version == cas
            refusal = Status.NOT_FOUND if live is None else Status.EXISTS
        if ok:
            assert result.status is Status.STORED
            self._stored(p, k, result, Record(value, 0, flags, expires_ms))
        else:
            assert result.status is refusal
            self._unchanged(p, k)

    @rule(
        p=partitions,
        k=keys,
        mode=st.sampled_from(
            [IncrMode.MEMCACHED_INCR, IncrMode.MEMCACHED_DECR, IncrMode.REDIS_INT]
        ),
        delta=st.sampled_from(DELTAS),
    )
    def incr(self, p: bytes, k: bytes, mode: IncrMode, delta: bytes) -> None:
        live = self._live(p, k)
        result = self.store.incr(p, k, mode, delta)
        if mode is IncrMode.REDIS_INT:
            old = redis_int(live.value if live is not None else b"0")
            d = redis_int(delta)
            if old is None or d is None:
                assert result.status is Status.NON_NUMERIC
                self._unchanged(p, k)
                return
            n = old + d
            if not I64_MIN <= n <= I64_MAX:
                assert result.status is Status.OVERFLOW
                self._unchanged(p, k)
                return
        else:
            if live is None:
                assert result.status is Status.NOT_FOUND
                self._unchanged(p, k)
                return
            old = memcached_number(live.value)
            d = memcached_number(delta)
            if old is None or d is None:
                assert result.status is Status.NON_NUMERIC
                self._unchanged(p, k)
                return
            n = (old + d) % U64 if mode is IncrMode.MEMCACHED_INCR else max(0, old - d)
        assert result.status is Status.STORED
        flags = live.flags if live is not None else 0
        expires_ms = live.expires_ms if live is not None else 0
        self._stored(p, k, result, Record(str(n).encode(), 0, flags, expires_ms))

    @rule(p=partitions, k=keys, expiry=expiries)
    def touch(self, p: bytes, k: bytes, expiry: tuple[str, int]) -> None:
        expires_ms = self._expires(expiry)
        live = self._live(p, k)
        result = self.store.touch(p, k, expires_ms)
        if live is None:
            assert result.status is Status.NOT_FOUND
            self._unchanged(p, k)
            return
        assert result.status is Status.TOUCHED
        self._stored(p, k, result, Record(live.value, 0, live.flags, expires_ms))

    @rule(p=partitions, k=keys)
    def delete(self, p: bytes, k: bytes) -> None:
        live = self._live(p, k)
        result = self.store.delete(p, k)
        assert result.status is (Status.DELETED if live is not None else Status.NOT_FOUND)
        self._stored(p, k, result, Record(b"", 0, 0, 0, tombstone=True))
        assert self.store.get(p, k) is None
        assert self.store.get(p, k, include_tombstones=True) == self.model[(p, k)]

    @rule(
        p=partitions, size=st.integers(100, MAX_VALUE), rounds=st.integers(1, 10), expiry=expiries
    )
    def burst(self, p: bytes, size: int, rounds: int, expiry: tuple[str, int]) -> None:
        # Many large writes, so that small log segments rotate and snapshots run.
        for r in range(rounds):
            for i, k in enumerate(KEYS):
                self.set(p, k, bytes([65 + r + i]) * size, i, expiry)

    @rule(p=partitions)
    def flush(self, p: bytes) -> None:
        doomed = [pk for pk in self.model if pk[0] == p]
        assert self.store.flush(p) == len(doomed)
        for pk in doomed:
            del self.model[pk]

    # Reads, time and housekeeping -------------------------------------------

    @rule(p=partitions, k=keys)
    def read(self, p: bytes, k: bytes) -> None:
        record = self.model.get((p, k))
        live = self._live(p, k)
        assert self.store.get(p, k) == live
        if record is not None and record.tombstone:
            assert self.store.get(p, k, include_tombstones=True) == record

    @rule(seconds=st.sampled_from([0, 0, 0.001, 0.5, 1, 5, 30, 61, 3600]), tick=st.booleans())
    def advance(self, seconds: float, tick: bool) -> None:
        # Time passes (running any delayed calls, such as snapshot steps), and
        # maybe the node's periodic maintenance runs, as its timer would.
        self.clock.advance(seconds)
        if tick:
            self.engine.maintenance(self.clock.seconds())

    @rule(budget=st.one_of(st.integers(1, 4), st.just(1000)))
    def sweep(self, budget: int) -> None:
        now = now_ms(self.clock)
        ttl_ms = int(TOMBSTONE_TTL * 1000)
        removed = self.store.sweep(budget)
        assert 0 <= removed <= budget
        gone = 0
        for (p, k), record in list(self.model.items()):
            if record.tombstone:
                collectible = now - version_millis(record.version) >= ttl_ms
            else:
                collectible = record.expired(now)
            if collectible and self.engine.get(p, k) is None:
                del self.model[(p, k)]
                gone += 1
        assert gone == removed

    @rule()
    def reactor_turn(self) -> None:
        # One reactor iteration: the delayed calls due now run (a snapshot step,
        # say) but not the ones they schedule, so writes interleave with them.
        due = [c for c in self.clock.getDelayedCalls() if c.getTime() <= self.clock.seconds()]
        for call in due:
            self.clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)

    @rule()
    def commit(self) -> None:
        self.engine.commit()

    @rule()
    def maintenance(self) -> None:
        self.engine.maintenance(self.clock.seconds())

    @precondition(lambda self: self.durable)
    @rule()
    def restart(self) -> None:
        self.store.close()
        self.engine = self.reopen_engine(self.path, self.clock)
        self.store = self._open_store(self.engine)
        assert self.engine.high_water >= self.last_version
        # Every key reads back identically: checked by the invariant below.

    # Invariants ---------------------------------------------------------------

    @invariant()
    def engine_matches_model(self) -> None:
        now = now_ms(self.clock)
        used = 0
        for p in PARTITIONS:
            in_partition = 0
            for k in KEYS:
                expected = self.model.get((p, k))
                raw = self.engine.get(p, k)
                if expected is None:
                    assert raw is None, (p, k, unpack(raw) if raw else None)
                    continue
                assert raw is not None, (p, k, expected)
                assert unpack(raw) == expected
                in_partition += 1
                used += len(k) + len(raw)
                if expected.tombstone:
                    assert self.store.get(p, k) is None
                    assert self.store.get(p, k, include_tombstones=True) == expected
                elif not expected.expired(now):  # reading an expired one would remove it
                    assert self.store.get(p, k) == expected
            assert self.engine.count(p) == in_partition
        assert self.engine.count() == len(self.model)
        assert self.engine.bytes_used() == used
        assert self.store.clock.last >= self.last_version


# The engines -------------------------------------------------------------------


class TestMemoryEngine(EngineContract):
    durable = False

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        return MemoryEngine()


class TestLogEngine(EngineContract):
    durable = True

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        # A short snapshot interval so that maintenance starts snapshots mid-test.
        return LogEngine(str(path), clock, fsync="always", snapshot_interval=30.0)


class TestLogEngineTinySegments(EngineContract):
    """fsync os and tiny files: rotation and size-triggered snapshots happen all the time."""

    durable = True

    @pytest.fixture(autouse=True)
    def _small_snapshot_steps(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # Two records per snapshot step, so writes interleave with running snapshots.
        monkeypatch.setattr(logengine, "SNAPSHOT_STEP", 2)

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        return LogEngine(
            str(path),
            clock,
            fsync="os",
            segment_bytes=4096,
            snapshot_log_bytes=8192,
            snapshot_interval=30.0,
        )


class TestDiskEngine(EngineContract):
    durable = True

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        return DiskEngine(str(path), clock, fsync="always")


class TestDiskEngineCompacting(EngineContract):
    """fsync os, tiny segments and no minimum: compaction runs, in two-entry steps, all the time."""

    durable = True
    max_examples = 100

    @pytest.fixture(autouse=True)
    def _small_compaction_steps(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(segments, "COMPACTION_STEP_ENTRIES", 2)

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        return DiskEngine(str(path), clock, fsync="os", segment_bytes=4096, compaction_min_bytes=0)


class TestMmapEngine(EngineContract):
    durable = True

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        return MmapEngine(str(path), clock, fsync="always")


class TestMmapEngineTinyMap(EngineContract):
    """fsync everysec and a map of 32 pages: the map grows and transactions are redone."""

    durable = True

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        return MmapEngine(str(path), clock, fsync="everysec", map_size=32 * 4096)


class TestMmapIndexEngine(EngineContract):
    durable = True

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        return MmapIndexEngine(str(path), clock, fsync="always")


class TestMmapIndexEngineCompacting(EngineContract):
    """fsync os, tiny segments, a tiny map and no minimum: compaction and map growth."""

    durable = True
    max_examples = 100

    @pytest.fixture(autouse=True)
    def _small_compaction_steps(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(segments, "COMPACTION_STEP_ENTRIES", 2)

    def make_engine(self, path: Path, clock: Clock) -> Engine:
        return MmapIndexEngine(
            str(path),
            clock,
            fsync="os",
            segment_bytes=4096,
            compaction_min_bytes=0,
            map_size=32 * 4096,
        )
