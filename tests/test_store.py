"""Record semantics in detail: expiry, versions, counters, conditional writes, sweep, stream.

The model-based test in ``test_engine_contract.py`` checks that these rules
hold together under random operations; this file pins down each rule on its
own, with the exact edge cases memcached and Redis clients depend on.
"""

from __future__ import annotations

from typing import Optional

import pytest
from twisted.internet.task import Clock

from kvha.clock import (
    COUNTER_MASK,
    HybridLogicalClock,
    version_from_millis,
    version_millis,
)
from kvha.data.engine import MemoryEngine
from kvha.data.store import IncrMode, Status, Store, StoreMode, format_redis_float
from kvha.record import (
    RELATIVE_EXPTIME_LIMIT,
    Record,
    absolute_expiry_ms,
    pack,
    packed_meta,
    packed_version,
    tombstone,
    unpack,
)
from kvha.ring import MAX_TOKEN, in_range, in_ranges, token, validate_ranges

START = 1_700_000_000.0
START_MS = int(START * 1000)
MAX_VALUE = 64
P = b"p"


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(START)
    return c


@pytest.fixture
def store(clock: Clock) -> Store:
    s = Store(MemoryEngine(), clock.seconds, tombstone_ttl=3600.0, max_value_bytes=MAX_VALUE)
    s.open()
    return s


def value(store: Store, key: bytes, partition: bytes = P) -> Optional[bytes]:
    record = store.get(partition, key)
    return None if record is None else record.value


# Records -----------------------------------------------------------------------


def test_pack_roundtrip() -> None:
    """A packed record unpacks to the same fields, and the header helpers read them in place."""
    packed = pack(b"value", 12345, flags=0xFFFFFFFF, expires_ms=99, tombstone=False)
    assert unpack(packed) == Record(b"value", 12345, 0xFFFFFFFF, 99)
    assert packed_version(packed) == 12345
    assert packed_meta(packed) == (12345, 99, 0xFFFFFFFF, 0)
    dead = unpack(tombstone(77))
    assert dead.tombstone and dead.version == 77 and dead.value == b""
    assert "Tombstone" in repr(dead)
    assert Record(b"v").__eq__(object()) is NotImplemented


# memcached exptime -----------------------------------------------------------


def test_exptime_zero_never_expires() -> None:
    """An exptime of 0 means no expiry at all."""
    assert absolute_expiry_ms(0, START) == 0


def test_exptime_up_to_30_days_is_relative() -> None:
    """An exptime of up to 30 days counts from now, at millisecond precision."""
    assert absolute_expiry_ms(1, 1000.25) == 1_001_250
    assert absolute_expiry_ms(RELATIVE_EXPTIME_LIMIT, START) == START_MS + 2_592_000_000


def test_exptime_above_30_days_is_absolute() -> None:
    """An exptime above 30 days is an absolute unix time, even one in the past."""
    assert absolute_expiry_ms(RELATIVE_EXPTIME_LIMIT + 1, START) == 2_592_001_000
    assert absolute_expiry_ms(1_800_000_000, START) == 1_800_000_000_000


def test_exptime_negative_is_already_expired(store: Store) -> None:
    """A negative exptime stores a record that no reader ever sees."""
    assert absolute_expiry_ms(-1, START) == 1
    store.set(P, b"k", b"v", expires_ms=absolute_expiry_ms(-1, START))
    assert store.get(P, b"k") is None


def test_absolute_exptime_in_the_past_is_expired(store: Store) -> None:
    """An absolute exptime earlier than now (but above 30 days) is expired at once."""
    store.set(P, b"k", b"v", expires_ms=absolute_expiry_ms(RELATIVE_EXPTIME_LIMIT + 5, START))
    assert store.get(P, b"k") is None


# The hybrid logical clock ---------------------------------------------------------


def test_version_layout() -> None:
    """A version is milliseconds in the upper 48 bits and a 16-bit counter below."""
    v = version_from_millis(123456, 7)
    assert version_millis(v) == 123456 and v & COUNTER_MASK == 7
    assert version_from_millis(1, COUNTER_MASK + 3) == version_from_millis(1, 2)  # masked
    assert version_from_millis(-50) == 0


def test_hlc_follows_the_wall_clock() -> None:
    """While the wall clock moves forward a version is just its milliseconds."""
    now = [10.0]
    hlc = HybridLogicalClock(lambda: now[0])
    assert hlc.next() == version_from_millis(10_000)
    now[0] = 11.5
    assert hlc.next() == version_from_millis(11_500)
    assert hlc.last == version_from_millis(11_500)


def test_hlc_strictly_increases_within_a_millisecond() -> None:
    """Many versions in the same millisecond still strictly increase, past the counter's range."""
    hlc = HybridLogicalClock(lambda: 5.0)
    versions = [hlc.next() for _ in range(COUNTER_MASK + 10)]
    assert all(b > a for a, b in zip(versions, versions[1:]))


def test_hlc_never_goes_backwards_when_the_clock_does() -> None:
    """A wall clock stepped back does not make versions go back."""
    now = [100.0]
    hlc = HybridLogicalClock(lambda: now[0])
    first = hlc.next()
    now[0] = 40.0
    second = hlc.next()
    third = hlc.next()
    assert first < second < third
    now[0] = 200.0
    assert hlc.next() == version_from_millis(200_000)


def test_hlc_observe_moves_past_remote_versions() -> None:
    """Observing a remote version makes the next one larger; an older one changes nothing."""
    hlc = HybridLogicalClock(lambda: 1.0)
    remote = version_from_millis(9_000_000, 5)
    hlc.observe(remote)
    assert hlc.last == remote
    assert hlc.next() == remote + 1
    hlc.observe(3)
    assert hlc.last == remote + 1
    assert HybridLogicalClock(lambda: 1.0, last=remote).next() == remote + 1


def test_store_versions_survive_clock_going_back(store: Store, clock: Clock) -> None:
    """Store versions keep increasing when the reactor's clock jumps backwards."""
    first = store.set(P, b"k", b"1").record
    clock.advance(-3600)
    second = store.set(P, b"k", b"2").record
    assert first is not None and second is not None
    assert second.version > first.version
    assert value(store, b"k") == b"2"


def test_store_moves_past_applied_versions(store: Store) -> None:
    """A replicated write from a node whose clock runs ahead pushes later local versions past it."""
    remote = version_from_millis(START_MS + 3_600_000)
    assert store.apply(P, b"a", pack(b"remote", remote)).status is Status.STORED
    local = store.set(P, b"b", b"local").record
    assert local is not None and local.version > remote


def test_apply_with_version_zero_issues_one(store: Store) -> None:
    """apply() of a record carrying version 0 stores it under a freshly issued version."""
    result = store.apply(P, b"k", pack(b"v", 0, flags=3, expires_ms=START_MS + 5000))
    assert result.status is Status.STORED
    record = store.get(P, b"k")
    assert record == result.record
    assert record is not None and record.version == version_from_millis(START_MS)
    assert (record.flags, record.expires_ms) == (3, START_MS + 5000)


# memcached incr / decr ------------------------------------------------------------


def incr(store: Store, mode: IncrMode, delta: bytes, key: bytes = b"n") -> tuple[Status, bytes]:
    result = store.incr(P, key, mode, delta)
    return result.status, value(store, key) or b""


@pytest.mark.parametrize(
    "start,mode,delta,expected",
    [
        (b"0", IncrMode.MEMCACHED_INCR, b"1", b"1"),
        (b"41", IncrMode.MEMCACHED_INCR, b"1", b"42"),
        (b"18446744073709551615", IncrMode.MEMCACHED_INCR, b"1", b"0"),
        (
            b"18446744073709551615",
            IncrMode.MEMCACHED_INCR,
            b"18446744073709551615",
            b"18446744073709551614",
        ),
        (b"10", IncrMode.MEMCACHED_DECR, b"3", b"7"),
        (b"3", IncrMode.MEMCACHED_DECR, b"10", b"0"),
        (b"0", IncrMode.MEMCACHED_DECR, b"1", b"0"),
        (b"12  ", IncrMode.MEMCACHED_INCR, b"1", b"13"),  # spaces left by an in-place decr
        (b"007", IncrMode.MEMCACHED_INCR, b"1", b"8"),
    ],
)
def test_memcached_counters(
    store: Store, start: bytes, mode: IncrMode, delta: bytes, expected: bytes
) -> None:
    """memcached incr wraps at 2**64, decr stops at 0, and trailing spaces are accepted."""
    store.set(P, b"n", start)
    assert incr(store, mode, delta) == (Status.STORED, expected)


@pytest.mark.parametrize(
    "start",
    [b"abc", b"", b"-1", b"1.5", b"1e3", b"18446744073709551616", b"1" * 21, b"12 3", b"\xd9\xa3"],
)
@pytest.mark.parametrize("mode", [IncrMode.MEMCACHED_INCR, IncrMode.MEMCACHED_DECR])
def test_memcached_counter_non_numeric_value(store: Store, start: bytes, mode: IncrMode) -> None:
    """incr/decr of a value that is no unsigned 64-bit decimal is NON_NUMERIC, changing nothing."""
    before = store.set(P, b"n", start).record
    result = store.incr(P, b"n", mode, b"1")
    assert result.status is Status.NON_NUMERIC
    assert store.get(P, b"n") == before


@pytest.mark.parametrize("delta", [b"x", b"", b"-1", b"1.0", b"18446744073709551616", b"1" * 21])
def test_memcached_counter_invalid_delta(store: Store, delta: bytes) -> None:
    """An invalid delta is NON_NUMERIC and changes nothing."""
    before = store.set(P, b"n", b"5").record
    assert store.incr(P, b"n", IncrMode.MEMCACHED_INCR, delta).status is Status.NON_NUMERIC
    assert store.get(P, b"n") == before


def test_memcached_counter_missing_key(store: Store) -> None:
    """memcached incr/decr of a missing, deleted or expired key is NOT_FOUND and creates nothing."""
    assert store.incr(P, b"n", IncrMode.MEMCACHED_INCR, b"1").status is Status.NOT_FOUND
    store.set(P, b"d", b"5")
    store.delete(P, b"d")
    assert store.incr(P, b"d", IncrMode.MEMCACHED_DECR, b"1").status is Status.NOT_FOUND
    store.set(P, b"e", b"5", expires_ms=1)
    assert store.incr(P, b"e", IncrMode.MEMCACHED_INCR, b"1").status is Status.NOT_FOUND
    assert store.get(P, b"n") is None and store.get(P, b"e") is None


def test_counter_keeps_flags_and_expiry(store: Store) -> None:
    """A counter update keeps the record's flags and expiry and gets a new version."""
    expires = START_MS + 60_000
    old = store.set(P, b"n", b"5", flags=9, expires_ms=expires).record
    new = store.incr(P, b"n", IncrMode.MEMCACHED_INCR, b"2").record
    assert old is not None and new is not None
    assert (new.value, new.flags, new.expires_ms) == (b"7", 9, expires)
    assert new.version > old.version
    redis = store.incr(P, b"n", IncrMode.REDIS_INT, b"1").record
    assert redis is not None and (redis.flags, redis.expires_ms) == (9, expires)


# Redis INCR / INCRBY -------------------------------------------------------------


@pytest.mark.parametrize(
    "start,delta,expected",
    [
        (b"10", b"5", b"15"),
        (b"-5", b"-10", b"-15"),
        (b"0", b"-1", b"-1"),
        (b"9223372036854775806", b"1", b"9223372036854775807"),
        (b"-9223372036854775807", b"-1", b"-9223372036854775808"),
    ],
)
def test_redis_int(store: Store, start: bytes, delta: bytes, expected: bytes) -> None:
    """Redis INCRBY adds signed 64-bit integers."""
    store.set(P, b"n", start)
    assert incr(store, IncrMode.REDIS_INT, delta) == (Status.STORED, expected)


def test_redis_int_missing_key_starts_at_zero(store: Store) -> None:
    """Redis INCRBY of a missing or deleted key starts from 0 with no flags and no expiry."""
    result = store.incr(P, b"n", IncrMode.REDIS_INT, b"-4")
    assert result.status is Status.STORED
    assert result.record == store.get(P, b"n")
    assert store.get(P, b"n") == Record(b"-4", result.record.version)  # type: ignore[union-attr]
    store.set(P, b"d", b"100")
    store.delete(P, b"d")
    assert incr(store, IncrMode.REDIS_INT, b"1", key=b"d") == (Status.STORED, b"1")


@pytest.mark.parametrize(
    "start",
    [
        b"007",
        b"00",
        b" 7",
        b"7 ",
        b"-0",
        b"+7",
        b"",
        b"-",
        b"1.5",
        b"abc",
        b"9223372036854775808",
        b"1" * 21,
    ],
)
def test_redis_int_rejects_non_canonical_value(store: Store, start: bytes) -> None:
    """Redis only counts canonical integers: no leading zeros, spaces, plus sign or -0."""
    before = store.set(P, b"n", start).record
    assert store.incr(P, b"n", IncrMode.REDIS_INT, b"1").status is Status.NON_NUMERIC
    assert store.get(P, b"n") == before


@pytest.mark.parametrize("delta", [b"01", b" 1", b"-0", b"", b"x", b"9223372036854775808"])
def test_redis_int_rejects_non_canonical_delta(store: Store, delta: bytes) -> None:
    """An increment that is not a canonical 64-bit integer is NON_NUMERIC."""
    store.set(P, b"n", b"1")
    assert store.incr(P, b"n", IncrMode.REDIS_INT, delta).status is Status.NON_NUMERIC
    assert value(store, b"n") == b"1"


@pytest.mark.parametrize(
    "start,delta",
    [
        (b"9223372036854775807", b"1"),
        (b"-9223372036854775808", b"-1"),
        (b"9223372036854775000", b"9223372036854775000"),
    ],
)
def test_redis_int_overflow(store: Store, start: bytes, delta: bytes) -> None:
    """A result outside the signed 64-bit range is OVERFLOW and changes nothing."""
    before = store.set(P, b"n", start).record
    assert store.incr(P, b"n", IncrMode.REDIS_INT, delta).status is Status.OVERFLOW
    assert store.get(P, b"n") == before


# Redis INCRBYFLOAT ---------------------------------------------------------------


@pytest.mark.parametrize(
    "start,delta,expected",
    [
        (b"10.50", b"0.1", b"10.6"),
        (b"5.0e3", b"2.0e2", b"5200"),
        (b"3", b"1.5", b"4.5"),
        (b"1", b"-1", b"0"),
        (b"-2.5", b"0.25", b"-2.25"),
        (b"1e20", b"1", b"100000000000000000000"),
    ],
)
def test_redis_float(store: Store, start: bytes, delta: bytes, expected: bytes) -> None:
    """INCRBYFLOAT adds and prints like Redis: plain notation, no trailing zeros."""
    store.set(P, b"n", start)
    assert incr(store, IncrMode.REDIS_FLOAT, delta) == (Status.STORED, expected)


def test_redis_float_missing_key_starts_at_zero(store: Store) -> None:
    """INCRBYFLOAT of a missing key starts from 0."""
    assert incr(store, IncrMode.REDIS_FLOAT, b"2.5") == (Status.STORED, b"2.5")


@pytest.mark.parametrize(
    "start,delta",
    [
        (b"inf", b"1"),
        (b"nan", b"1"),
        (b"-infinity", b"1"),
        (b"1", b"inf"),
        (b"1", b"nan"),
        (b"abc", b"1"),
        (b"1", b"x"),
        (b"", b"1"),
        (b"1", b""),
        (b" 1", b"1"),
        (b"1 ", b"1"),
        (b"1", b" 1"),
        (b"1", b"1 "),
        (b"1_000", b"1"),
        (b"1", b"1_0"),
    ],
)
def test_redis_float_rejects_non_numbers(store: Store, start: bytes, delta: bytes) -> None:
    """Infinities, NaN, spaces, underscores and junk, in value or increment, are NON_NUMERIC."""
    before = store.set(P, b"n", start).record
    assert store.incr(P, b"n", IncrMode.REDIS_FLOAT, delta).status is Status.NON_NUMERIC
    assert store.get(P, b"n") == before


def test_redis_float_overflow(store: Store) -> None:
    """A sum that overflows to infinity is OVERFLOW and changes nothing."""
    store.set(P, b"n", b"1.7e308")
    assert store.incr(P, b"n", IncrMode.REDIS_FLOAT, b"1.7e308").status is Status.OVERFLOW
    assert value(store, b"n") == b"1.7e308"


@pytest.mark.parametrize(
    "x,text",
    [
        (10.6, b"10.6"),
        (5200.0, b"5200"),
        (0.0, b"0"),
        (-0.5, b"-0.5"),
        (1e-05, b"0.00001"),
        (1e16, b"10000000000000000"),
        (1.5e300, b"15" + b"0" * 299),
    ],
)
def test_format_redis_float(x: float, text: bytes) -> None:
    """Floats print without exponent or trailing zeros, as Redis prints them."""
    assert format_redis_float(x) == text


# Conditional stores ---------------------------------------------------------------


def test_add_replace(store: Store) -> None:
    """add stores only when no live record exists; replace only when one does."""
    assert store.store(StoreMode.REPLACE, P, b"k", b"r").status is Status.NOT_STORED
    assert store.get(P, b"k") is None
    assert store.store(StoreMode.ADD, P, b"k", b"a").status is Status.STORED
    assert store.store(StoreMode.ADD, P, b"k", b"b").status is Status.NOT_STORED
    assert store.store(StoreMode.REPLACE, P, b"k", b"r", flags=4).status is Status.STORED
    assert store.get(P, b"k") == Record(b"r", store.clock.last, 4)
    store.delete(P, b"k")
    assert store.store(StoreMode.ADD, P, b"k", b"again").status is Status.STORED  # over a tombstone
    store.set(P, b"x", b"v", expires_ms=1)
    assert (
        store.store(StoreMode.ADD, P, b"x", b"new").status is Status.STORED
    )  # over an expired one


def test_cas(store: Store) -> None:
    """cas stores only with the current version; cas 0 means only-if-absent."""
    assert store.store(StoreMode.CAS, P, b"k", b"v", cas=5).status is Status.NOT_FOUND
    assert store.store(StoreMode.CAS, P, b"k", b"v", cas=0).status is Status.STORED
    assert store.store(StoreMode.CAS, P, b"k", b"w", cas=0).status is Status.EXISTS
    current = store.get(P, b"k")
    assert current is not None
    assert store.store(StoreMode.CAS, P, b"k", b"w", cas=current.version + 1).status is (
        Status.EXISTS
    )
    assert value(store, b"k") == b"v"
    result = store.store(StoreMode.CAS, P, b"k", b"w", cas=current.version)
    assert result.status is Status.STORED
    assert store.store(StoreMode.CAS, P, b"k", b"x", cas=current.version).status is Status.EXISTS
    assert value(store, b"k") == b"w"


@pytest.mark.parametrize(
    "mode,expected", [(StoreMode.APPEND, b"abcXY"), (StoreMode.PREPEND, b"XYabc")]
)
def test_append_prepend_keep_flags_and_expiry(
    store: Store, mode: StoreMode, expected: bytes
) -> None:
    """append/prepend change only the value (and version), never flags or expiry."""
    expires = START_MS + 10_000
    old = store.set(P, b"k", b"abc", flags=7, expires_ms=expires).record
    result = store.store(mode, P, b"k", b"XY", flags=99, expires_ms=0)
    assert result.status is Status.STORED
    new = store.get(P, b"k")
    assert old is not None and new is not None
    assert (new.value, new.flags, new.expires_ms) == (expected, 7, expires)
    assert new.version > old.version


@pytest.mark.parametrize("mode", [StoreMode.APPEND, StoreMode.PREPEND])
def test_append_prepend_need_a_live_record(store: Store, mode: StoreMode) -> None:
    """append/prepend to a missing, deleted or expired key is NOT_STORED and creates nothing."""
    assert store.store(mode, P, b"k", b"x").status is Status.NOT_STORED
    store.set(P, b"d", b"v")
    store.delete(P, b"d")
    assert store.store(mode, P, b"d", b"x").status is Status.NOT_STORED
    store.set(P, b"e", b"v", expires_ms=START_MS)
    assert store.store(mode, P, b"e", b"x").status is Status.NOT_STORED
    assert store.get(P, b"k") is None and store.get(P, b"e") is None


def test_touch(store: Store, clock: Clock) -> None:
    """touch gives a live record a new expiry and version; a missing one is NOT_FOUND."""
    assert store.touch(P, b"k", START_MS + 1000).status is Status.NOT_FOUND
    old = store.set(P, b"k", b"v", flags=2, expires_ms=START_MS + 1000).record
    result = store.touch(P, b"k", START_MS + 5000)
    assert result.status is Status.TOUCHED
    new = store.get(P, b"k")
    assert old is not None and new is not None
    assert (new.value, new.flags, new.expires_ms) == (b"v", 2, START_MS + 5000)
    assert new.version > old.version
    clock.advance(2)
    assert value(store, b"k") == b"v"  # the old expiry has passed, the new one has not
    assert store.touch(P, b"k", 0).status is Status.TOUCHED
    clock.advance(10_000)
    assert value(store, b"k") == b"v"


# Size limit -----------------------------------------------------------------------


def test_too_large_stores_nothing(store: Store) -> None:
    """A value above max_value_bytes is TOO_LARGE for every kind of write, and nothing changes."""
    assert store.set(P, b"k", b"x" * MAX_VALUE).status is Status.STORED  # the limit itself is fine
    before = store.get(P, b"k")
    big = b"y" * (MAX_VALUE + 1)
    assert store.set(P, b"k", big).status is Status.TOO_LARGE
    assert store.apply(P, b"k", pack(big, store.clock.last + 10)).status is Status.TOO_LARGE
    assert store.store(StoreMode.REPLACE, P, b"k", big).status is Status.TOO_LARGE
    assert store.store(StoreMode.CAS, P, b"k", big, cas=before.version).status is (  # type: ignore[union-attr]
        Status.TOO_LARGE
    )
    assert store.store(StoreMode.APPEND, P, b"k", b"z").status is Status.TOO_LARGE
    assert store.store(StoreMode.PREPEND, P, b"k", b"z").status is Status.TOO_LARGE
    assert store.get(P, b"k") == before
    assert store.set(P, b"new", big).status is Status.TOO_LARGE
    assert store.store(StoreMode.ADD, P, b"new", big).status is Status.TOO_LARGE
    assert store.get(P, b"new") is None
    assert store.engine.count() == 1


# Deletes and tombstones -------------------------------------------------------------


def test_delete_live_record(store: Store) -> None:
    """Deleting a live record is DELETED and leaves a tombstone carrying the delete's version."""
    store.set(P, b"k", b"v", flags=3, expires_ms=START_MS + 99_000)
    result = store.delete(P, b"k")
    assert result.status is Status.DELETED
    assert store.get(P, b"k") is None
    dead = store.get(P, b"k", include_tombstones=True)
    assert dead is not None and dead.tombstone
    assert dead == Record(b"", result.record.version, 0, 0, tombstone=True)  # type: ignore[union-attr]


def test_delete_missing_key_writes_tombstone(store: Store) -> None:
    """Deleting a key that is not there is NOT_FOUND but still leaves a tombstone."""
    result = store.delete(P, b"k")
    assert result.status is Status.NOT_FOUND
    dead = store.get(P, b"k", include_tombstones=True)
    assert dead is not None and dead.tombstone and dead.version == result.record.version  # type: ignore[union-attr]
    again = store.delete(P, b"k")
    assert again.status is Status.NOT_FOUND
    assert again.record.version > dead.version  # type: ignore[union-attr]


def test_delete_expired_record(store: Store, clock: Clock) -> None:
    """Deleting an expired record is NOT_FOUND (it was gone already) and leaves a tombstone."""
    store.set(P, b"k", b"v", expires_ms=START_MS + 1000)
    clock.advance(1)
    assert store.delete(P, b"k").status is Status.NOT_FOUND
    assert store.get(P, b"k", include_tombstones=True).tombstone  # type: ignore[union-attr]


def test_replicated_delete_versions(store: Store) -> None:
    """A delete carrying an old version is STALE; a newer one replaces the record."""
    live = store.set(P, b"k", b"v").record
    assert live is not None
    stale = store.delete(P, b"k", version=live.version - 1)
    assert stale.status is Status.STALE
    assert stale.record == live
    assert store.delete(P, b"k", version=live.version).status is Status.STALE
    assert store.get(P, b"k") == live
    result = store.delete(P, b"k", version=live.version + 5)
    assert result.status is Status.DELETED
    assert store.get(P, b"k", include_tombstones=True) == Record(
        b"", live.version + 5, tombstone=True
    )


def test_apply_orders_records_and_tombstones_by_version(store: Store) -> None:
    """apply keeps whichever record or tombstone has the highest version, in any arrival order."""
    assert store.apply(P, b"k", pack(b"v1", 100)).status is Status.STORED
    stale = store.apply(P, b"k", tombstone(50))
    assert stale.status is Status.STALE
    assert stale.record == Record(b"v1", 100)
    assert store.apply(P, b"k", pack(b"v0", 100)).status is Status.STALE  # same version
    assert store.apply(P, b"k", tombstone(200)).status is Status.STORED
    assert store.get(P, b"k") is None
    assert store.apply(P, b"k", pack(b"late", 150)).status is Status.STALE  # no resurrection
    assert store.get(P, b"k") is None
    assert store.apply(P, b"k", pack(b"v3", 300)).status is Status.STORED
    assert store.get(P, b"k") == Record(b"v3", 300)


# Expiry ------------------------------------------------------------------------------


def test_expired_read_removes_the_record(store: Store, clock: Clock) -> None:
    """A record is readable until its expiry millisecond, then reads return None and remove it."""
    store.set(P, b"k", b"v", expires_ms=START_MS + 1500)
    store.set(P, b"forever", b"v")
    # Binary fractions of a second, so that the fake time adds up exactly.
    clock.advance(1535 / 1024)  # 1.499 s: the last millisecond before expiry
    assert value(store, b"k") == b"v"
    assert store.expired_removed == 0
    clock.advance(1 / 1024)  # 1.5 s exactly
    assert store.get(P, b"k") is None
    assert store.get(P, b"k", include_tombstones=True) is None
    assert store.engine.get(P, b"k") is None  # physically gone
    assert store.expired_removed == 1
    assert store.engine.count() == 1
    assert store.stats()["expired_removed"] == 1


# Sweep ---------------------------------------------------------------------------------


def test_sweep_respects_budget_and_resumes(store: Store, clock: Clock) -> None:
    """sweep(budget) examines at most budget keys per call and picks up where it stopped."""
    for i in range(6):
        store.set(b"p0", b"live%d" % i, b"v")
    for i in range(6):
        store.set(b"p1", b"old%d" % i, b"v", expires_ms=START_MS + 1000)
    clock.advance(2)
    # 4 live keys; 2 live and 2 expired; 4 expired; end of the pass.  A sweep that
    # started over each time would examine the same 4 live keys forever.
    assert [store.sweep(4) for _ in range(4)] == [0, 2, 4, 0]
    assert store.engine.count() == 6
    assert store.expired_removed == 6
    assert store.sweep(100) == 0  # a new pass finds nothing more
    assert all(value(store, b"live%d" % i, b"p0") == b"v" for i in range(6))


def test_sweep_pass_over_n_keys_takes_n_over_budget_calls(store: Store, clock: Clock) -> None:
    """With every key expired, each call removes exactly budget keys until the pass ends."""
    for i in range(10):
        store.set(P, b"k%d" % i, b"v", expires_ms=START_MS + 1)
    clock.advance(1)
    assert [store.sweep(3) for _ in range(5)] == [3, 3, 3, 1, 0]
    assert store.engine.count() == 0


def test_sweep_collects_old_tombstones_only(store: Store, clock: Clock) -> None:
    """Tombstones are kept for tombstone_ttl after the delete, then collected by the sweep."""
    store.delete(P, b"old")
    clock.advance(1000)
    store.delete(P, b"young")
    store.set(P, b"live", b"v")
    clock.advance(2599.5)
    assert store.sweep(100) == 0
    clock.advance(0.5)  # "old" is exactly tombstone_ttl old
    assert store.sweep(100) == 1
    assert store.tombstones_collected == 1
    assert store.get(P, b"old", include_tombstones=True) is None
    assert store.get(P, b"young", include_tombstones=True) is not None
    clock.advance(1000)
    assert store.sweep(100) == 1
    assert value(store, b"live") == b"v"
    assert store.stats()["tombstones_collected"] == 2


def test_flush_removes_one_partition(store: Store) -> None:
    """flush drops every record of one partition, tombstones included, and no other."""
    store.set(b"a", b"k1", b"v")
    store.set(b"a", b"k2", b"v")
    store.delete(b"a", b"k3")
    store.set(b"b", b"k1", b"v")
    assert store.flush(b"a") == 3
    assert store.get(b"a", b"k1") is None
    assert store.get(b"a", b"k3", include_tombstones=True) is None
    assert value(store, b"k1", b"b") == b"v"
    assert store.flush(b"missing") == 0


# Stream -------------------------------------------------------------------------------


def test_in_range() -> None:
    """A token range is (lo, hi], wrapping past the top when lo >= hi, and (x, x] is everything."""
    assert not in_range(10, 10, 20) and in_range(11, 10, 20) and in_range(20, 10, 20)
    assert not in_range(21, 10, 20)
    assert in_range(25, 20, 10) and in_range(MAX_TOKEN, 20, 10) and in_range(0, 20, 10)
    assert in_range(10, 20, 10) and not in_range(15, 20, 10) and not in_range(20, 20, 10)
    assert all(in_range(t, 7, 7) for t in (0, 6, 7, 8, MAX_TOKEN))
    assert in_range(0, MAX_TOKEN, 0) and not in_range(MAX_TOKEN, MAX_TOKEN, 0)
    assert (
        in_ranges(5, []) and in_ranges(5, [(0, 1), (4, 5)]) and not in_ranges(3, [(0, 1), (4, 5)])
    )
    assert validate_ranges([(0, MAX_TOKEN)]) == [(0, MAX_TOKEN)]
    with pytest.raises(ValueError):
        validate_ranges([(0, MAX_TOKEN + 1)])
    with pytest.raises(ValueError):
        validate_ranges([(-1, 5)])


def test_token_is_stable_and_partition_scoped() -> None:
    """A token is an unsigned 64-bit hash of partition and key, different across partitions."""
    t = token(b"p", b"key")
    assert 0 <= t <= MAX_TOKEN and token(b"p", b"key") == t
    assert token(b"q", b"key") != t and token(b"pk", b"ey") != t


@pytest.fixture
def streamed(store: Store, clock: Clock) -> dict:
    """Records of every kind in two partitions, with the version before the last two writes."""
    for i in range(20):
        store.set(b"a", b"k%d" % i, b"a%d" % i)
        store.set(b"b", b"k%d" % i, b"b%d" % i)
    store.delete(b"a", b"k0")
    store.delete(b"b", b"never-existed")
    store.set(b"a", b"short", b"v", expires_ms=START_MS + 500)
    cut = store.clock.last
    store.set(b"b", b"k1", b"newer")
    store.delete(b"a", b"k2")
    clock.advance(1)  # "short" is now expired but still held
    assert store.engine.get(b"a", b"short") is not None
    return {"cut": cut}


def expected_stream(
    store: Store, ranges: list, min_version: int, partitions: tuple = ()
) -> set[tuple[bytes, bytes, bytes]]:
    now = int(store._now() * 1000)
    out = set()
    for p, k, packed in store.engine.items():
        r = unpack(packed)
        if partitions and p not in partitions:
            continue
        if r.version <= min_version or (not r.tombstone and r.expired(now)):
            continue
        t = token(p, k)
        if ranges and not any(
            (lo < t <= hi) if lo < hi else (t > lo or t <= hi) for lo, hi in ranges
        ):
            continue
        out.add((p, k, packed))
    return out


def test_stream_everything(store: Store, streamed: dict) -> None:
    """Unfiltered, stream yields every record and tombstone but no expired record."""
    got = list(store.stream([], 0))
    assert len(got) == len(set(got))
    keys = {(p, k) for p, k, _ in got}
    assert len(keys) == 41  # 40 records (2 now tombstones) + the tombstone of a never-existing key
    assert (b"a", b"short") not in keys
    assert (b"b", b"never-existed") in keys and (b"a", b"k0") in keys
    assert set(got) == expected_stream(store, [], 0)


def test_stream_min_version_and_partitions(store: Store, streamed: dict) -> None:
    """min_version is exclusive and the partition filter restricts the walk."""
    cut = streamed["cut"]
    got = {(p, k) for p, k, _ in store.stream([], cut)}
    assert got == {(b"b", b"k1"), (b"a", b"k2")}
    got = {(p, k) for p, k, _ in store.stream([], cut, partitions=[b"b"])}
    assert got == {(b"b", b"k1")}
    assert len(list(store.stream([], 0, partitions=[b"b"]))) == 21
    assert list(store.stream([], 0, partitions=[b"nope"])) == []
    assert list(store.stream([], store.clock.last)) == []


def test_stream_token_ranges(store: Store, streamed: dict) -> None:
    """Only records whose token lies in one of the (lo, hi] ranges are streamed, wrapping too."""
    tokens = sorted(token(p, k) for p, k, _ in store.stream([], 0))
    cases = [
        [(tokens[3], tokens[10])],  # a plain arc: tokens[4..10]
        [(tokens[-4], tokens[2])],  # wraps past the top: tokens[-3:] and tokens[..2]
        [(tokens[5], tokens[5])],  # the whole ring
        [(tokens[0], tokens[1]), (tokens[20], tokens[25])],
        [(tokens[7] - 1, tokens[7])],  # exactly one
        [(tokens[7], tokens[7] + 1)],  # an arc holding no token (unless tokens[8] is next)
    ]
    sizes = [7, 6, len(tokens), 6, 1, 1 if tokens[8] == tokens[7] + 1 else 0]
    for ranges, size in zip(cases, sizes):
        got = list(store.stream(ranges, 0))
        assert set(got) == expected_stream(store, ranges, 0)
        assert len(got) == size
        got_min = set(store.stream(ranges, streamed["cut"], partitions=[b"a"]))
        assert got_min == expected_stream(store, ranges, streamed["cut"], (b"a",))


def test_stream_while_writing(store: Store, streamed: dict) -> None:
    """Writes while a stream is consumed neither break it nor make it yield a key twice."""
    seen = []
    for i, (p, k, packed) in enumerate(store.stream([], 0)):
        seen.append((p, k))
        assert store.engine.get(p, k) == packed or store.engine.get(p, k) is None
        store.set(p, b"new%d" % i, b"x")
        if i == 5:
            store.engine.remove(b"b", b"k19")
            store.flush(b"a")
    assert len(seen) == len(set(seen))
    assert (b"b", b"k19") not in seen
