"""The record store: versions, expiry, tombstones and the conditional operations.

Every engine sees only whole-record writes; everything that gives a record
its meaning is here, once:

* **Versions.**  Each write carries a hybrid-logical-clock version.  A
  replicated write (``set`` with a version) is applied only if it is newer
  than what the key holds, tombstones included, so copies converge on the
  last writer whatever order writes arrive in.
* **Conditional operations** (add, replace, cas, append, prepend, incr/decr,
  touch) run here on the key's primary copy, which issues the new version;
  the master then replicates the resulting record.
* **Expiry** follows memcached: a record past its absolute expiry is gone to
  every reader (lazy), and a background sweep removes it from memory.
* **Deletes** write a tombstone carrying the delete's version, kept for
  ``tombstone_ttl`` so that merge can tell a deleted key from a missed write.
* **Partition rules** (:mod:`kvha.data.quota`): a node's share of a
  partition's quota, enforced on every write (``evict``: evict until under
  it; ``reject``: the primary refuses a write that would pass it), and a
  default TTL for records the primary writes without one.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Callable, Optional

from kvha.clock import HybridLogicalClock, version_millis
from kvha.data.engine import Engine
from kvha.data.quota import READ_COUNT, WRITE_COUNT, PartitionRule
from kvha.record import HEADER, HEADER_SIZE, TOMBSTONE, Record, pack, tombstone, unpack
from kvha.ring import TokenRange, in_ranges, token

_unpack_header = HEADER.unpack_from

U64_MASK = (1 << 64) - 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1


class Status(enum.IntEnum):
    """Outcomes of store operations, shared with the internal protocol."""

    OK = 0
    STORED = 1
    NOT_STORED = 2
    EXISTS = 3
    NOT_FOUND = 4
    DELETED = 5
    TOUCHED = 6
    STALE = 7  # a replicated write older than what the key holds
    NON_NUMERIC = 8
    OVERFLOW = 9
    TOO_LARGE = 10
    NO_SPACE = 11  # the partition is at its quota and refuses writes


class StoreMode(enum.IntEnum):
    """The conditional store operations of memcached, run at the primary."""

    ADD = 1
    REPLACE = 2
    APPEND = 3
    PREPEND = 4
    CAS = 5  # cas == 0 means "only if absent", which gives Redis NX for free
    CAS_DELETE = 6  # delete only if the live record still has version ``cas``
    SET = 7  # store unconditionally, at the primary (partitions that reject when full)


class IncrMode(enum.IntEnum):
    """memcached counters are unsigned and wrap; Redis counters are signed and checked."""

    MEMCACHED_INCR = 0
    MEMCACHED_DECR = 1
    REDIS_INT = 2
    REDIS_FLOAT = 3


class Result:
    """What an operation did, and the record it left (for replication)."""

    __slots__ = ("status", "packed")

    def __init__(self, status: Status, packed: Optional[bytes] = None) -> None:
        self.status = status
        self.packed = packed

    @property
    def record(self) -> Optional[Record]:
        return None if self.packed is None else unpack(self.packed)

    def __repr__(self) -> str:
        return f"Result({self.status.name}, {self.record!r})"


def _parse_memcached_number(value: bytes) -> Optional[int]:
    # memcached uses strtoull: digits, optionally followed by spaces (left by an
    # in-place decr); nothing else, and the result must fit in 64 bits.
    digits = value.rstrip(b" ")
    if not digits or not digits.isdigit() or len(digits) > 20:
        return None
    n = int(digits)
    return n if n <= U64_MASK else None


def _parse_redis_int(value: bytes) -> Optional[int]:
    # Redis's string2ll: an optional minus and digits, no leading zeros, no spaces.
    if not value or len(value) > 20:
        return None
    body = value[1:] if value[:1] == b"-" else value
    if not body.isdigit() or (len(body) > 1 and body[:1] == b"0") or body == b"" or value == b"-0":
        return None
    n = int(value)
    return n if I64_MIN <= n <= I64_MAX else None


def _parse_redis_float(value: bytes) -> Optional[float]:
    # Redis's string2ld: the whole string, no surrounding spaces, finite.  Python's
    # float() also accepts surrounding spaces and digit underscores ("1_0"): refuse them.
    if value != value.strip() or b"_" in value:
        return None
    try:
        x = float(value)
    except ValueError:
        return None
    return x if _finite(x) else None


def format_redis_float(x: float) -> bytes:
    """Format like Redis's INCRBYFLOAT: plain notation, no trailing zeros.

    Redis prints a long double with 17 decimals and trims zeros; the shortest
    repr of a double gives the same text for the values people use
    (``10.5 + 0.1`` is ``10.6``), and never an exponent.
    """
    text = repr(x)
    if "e" in text or "E" in text:
        text = format(Decimal(text), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text.encode()


class Store:
    """Record semantics over one engine.

    ``now`` returns seconds (``reactor.seconds``; a ``Clock`` in tests).
    """

    def __init__(
        self,
        engine: Engine,
        now: Callable[[], float],
        tombstone_ttl: float = 7 * 86400.0,
        max_value_bytes: int = 1 << 20,
    ) -> None:
        self.engine = engine
        self._now = now
        self.tombstone_ttl = tombstone_ttl
        self.max_value_bytes = max_value_bytes
        self.clock = HybridLogicalClock(now)
        self._sweep: Optional[Iterator[tuple[bytes, bytes]]] = None
        self.expired_removed = 0
        self.tombstones_collected = 0
        #: Partition rules by name, and the subsets the hot paths look at: rules
        #: with a quota, and the GCLOCK use counts of partitions that evict.
        self.rules: dict[bytes, PartitionRule] = {}
        self._limited: dict[bytes, PartitionRule] = {}
        self._marks: dict[bytes, dict[bytes, int]] = {}

    def open(self) -> None:
        self.engine.open()
        # Versions must never go backwards across a restart.
        self.clock.observe(max(self.engine.high_water, getattr(self.engine, "max_version", 0)))

    def close(self) -> None:
        self.engine.close()

    def _now_ms(self) -> int:
        return int(self._now() * 1000)

    # Reads ------------------------------------------------------------------

    def get_packed(
        self, partition: bytes, key: bytes, include_tombstones: bool = False
    ) -> Optional[bytes]:
        """The packed record, or None when absent, expired or (unless asked) deleted."""
        packed = self.engine.get(partition, key)
        if packed is None:
            return None
        _version, expires_ms, _flags, bits = _unpack_header(packed)
        if bits & TOMBSTONE:
            return packed if include_tombstones else None
        if expires_ms and expires_ms <= self._now_ms():
            self._expire(partition, key)
            return None
        if self._marks:
            marks = self._marks.get(partition)
            if marks is not None:
                marks[key] = READ_COUNT
        return packed

    def get(
        self, partition: bytes, key: bytes, include_tombstones: bool = False
    ) -> Optional[Record]:
        packed = self.get_packed(partition, key, include_tombstones)
        return None if packed is None else unpack(packed)

    def _live(self, partition: bytes, key: bytes) -> Optional[bytes]:
        return self.get_packed(partition, key, False)

    def _expire(self, partition: bytes, key: bytes) -> None:
        # An expired record needs no tombstone: every copy holds the same
        # absolute expiry and so expires it at the same moment.
        self.engine.remove(partition, key)
        self.expired_removed += 1
        if self._marks:
            self._forget(partition, key)

    # Replicated writes -------------------------------------------------------

    def apply(self, partition: bytes, key: bytes, packed: bytes) -> Result:
        """Store a versioned record (or tombstone) if it is newer than the key's.

        A version of 0 asks the store to issue one.  Tombstones are accepted
        here too: that is how a delete reaches the other copies.
        """
        version, expires_ms, flags, bits = _unpack_header(packed)
        if len(packed) - HEADER_SIZE > self.max_value_bytes:
            return Result(Status.TOO_LARGE)
        if version == 0:
            packed = pack(
                packed[HEADER_SIZE:], self.clock.next(), flags, expires_ms, bool(bits & TOMBSTONE)
            )
        else:
            current = self.engine.get(partition, key)
            if current is not None and _unpack_header(current)[0] >= version:
                return Result(Status.STALE, current)
            self.clock.observe(version)
        self.engine.put(partition, key, packed)
        if self._limited:
            self._written(partition, key)
        return Result(Status.STORED, packed)

    def set(
        self,
        partition: bytes,
        key: bytes,
        value: bytes,
        flags: int = 0,
        expires_ms: int = 0,
        version: int = 0,
    ) -> Result:
        return self.apply(partition, key, pack(value, version, flags, expires_ms))

    def delete(self, partition: bytes, key: bytes, version: int = 0) -> Result:
        """Write a tombstone.  DELETED if a live record was there, else NOT_FOUND.

        The tombstone is written either way (unless stale), so a copy that
        missed the original write still learns the key is deleted.
        """
        live = self._live(partition, key) is not None
        result = self.apply(partition, key, tombstone(version))
        if result.status is Status.STALE:
            return result
        return Result(Status.DELETED if live else Status.NOT_FOUND, result.packed)

    # Conditional operations (at the primary) --------------------------------

    def store(
        self,
        mode: StoreMode,
        partition: bytes,
        key: bytes,
        value: bytes,
        flags: int = 0,
        expires_ms: int = 0,
        cas: int = 0,
    ) -> Result:
        current = self._live(partition, key)
        if mode is StoreMode.CAS_DELETE:
            if current is None:
                return Result(Status.NOT_FOUND)
            if _unpack_header(current)[0] != cas:
                return Result(Status.EXISTS, current)
            packed = tombstone(self.clock.next())
            self.engine.put(partition, key, packed)
            if self._limited:
                self._written(partition, key)
            return Result(Status.DELETED, packed)
        rule = self.rules.get(partition) if self.rules else None
        if rule is not None and rule.ttl_ms and not expires_ms:
            expires_ms = self._now_ms() + rule.ttl_ms  # APPEND / PREPEND keep the record's below
        if mode is StoreMode.SET:
            pass
        elif mode is StoreMode.ADD:
            if current is not None:
                return Result(Status.NOT_STORED, current)
        elif mode is StoreMode.REPLACE:
            if current is None:
                return Result(Status.NOT_STORED)
        elif mode is StoreMode.CAS:
            if cas == 0:
                if current is not None:
                    return Result(Status.EXISTS, current)
            elif current is None:
                return Result(Status.NOT_FOUND)
            elif _unpack_header(current)[0] != cas:
                return Result(Status.EXISTS, current)
        else:  # APPEND / PREPEND keep the record's flags and expiry
            if current is None:
                return Result(Status.NOT_STORED)
            _v, expires_ms, flags, _b = _unpack_header(current)
            old = current[HEADER_SIZE:]
            value = old + value if mode is StoreMode.APPEND else value + old
        if len(value) > self.max_value_bytes:
            return Result(Status.TOO_LARGE, current)
        if rule is not None and rule.limit and self._refuse(partition, key, rule, len(value)):
            return Result(Status.NO_SPACE, current)
        packed = pack(value, self.clock.next(), flags, expires_ms)
        self.engine.put(partition, key, packed)
        if self._limited:
            self._written(partition, key)
        return Result(Status.STORED, packed)

    def incr(self, partition: bytes, key: bytes, mode: IncrMode, delta: bytes) -> Result:
        """Add ``delta`` (ASCII) to a counter.  The new value is the record's value."""
        current = self._live(partition, key)
        flags = 0
        expires_ms = 0
        rule = self.rules.get(partition) if self.rules else None
        if current is not None:
            _v, expires_ms, flags, _b = _unpack_header(current)
            old = current[HEADER_SIZE:]
        elif mode in (IncrMode.MEMCACHED_INCR, IncrMode.MEMCACHED_DECR):
            return Result(Status.NOT_FOUND)
        else:
            old = b"0"
            if rule is not None and rule.ttl_ms:
                expires_ms = self._now_ms() + rule.ttl_ms
        value: bytes
        if mode in (IncrMode.MEMCACHED_INCR, IncrMode.MEMCACHED_DECR):
            n = _parse_memcached_number(old)
            d = _parse_memcached_number(delta)
            if n is None or d is None:
                return Result(Status.NON_NUMERIC, current)
            if mode is IncrMode.MEMCACHED_INCR:
                n = (n + d) & U64_MASK
            else:
                n = max(0, n - d)
            value = str(n).encode()
        elif mode is IncrMode.REDIS_INT:
            n = _parse_redis_int(old)
            d = _parse_redis_int(delta)
            if n is None or d is None:
                return Result(Status.NON_NUMERIC, current)
            n += d
            if not I64_MIN <= n <= I64_MAX:
                return Result(Status.OVERFLOW, current)
            value = str(n).encode()
        else:
            x = _parse_redis_float(old)
            dx = _parse_redis_float(delta)
            if x is None or dx is None:
                return Result(Status.NON_NUMERIC, current)
            x += dx
            if not _finite(x):
                return Result(Status.OVERFLOW, current)
            value = format_redis_float(x)
        if rule is not None and rule.limit and self._refuse(partition, key, rule, len(value)):
            return Result(Status.NO_SPACE, current)
        packed = pack(value, self.clock.next(), flags, expires_ms)
        self.engine.put(partition, key, packed)
        if self._limited:
            self._written(partition, key)
        return Result(Status.STORED, packed)

    def touch(self, partition: bytes, key: bytes, expires_ms: int) -> Result:
        """Give a live record a new expiry (and a new version)."""
        current = self._live(partition, key)
        if current is None:
            return Result(Status.NOT_FOUND)
        _v, _e, flags, _b = _unpack_header(current)
        packed = pack(current[HEADER_SIZE:], self.clock.next(), flags, expires_ms)
        self.engine.put(partition, key, packed)
        if self._limited:
            self._written(partition, key)
        return Result(Status.TOUCHED, packed)

    def flush(self, partition: bytes) -> int:
        """Remove every record of one partition (memcached flush_all, FLUSHDB)."""
        rule = self.rules.get(partition)
        if rule is not None:
            rule.referenced.clear()
            rule.hand = iter(())
        return self.engine.drop_partition(partition)

    # Partition rules: quotas and default TTLs ---------------------------------

    def configure_partitions(self, rules: dict[bytes, PartitionRule]) -> None:
        """Adopt a new rule table; a partition whose rule is unchanged keeps its marks.

        A partition now over a lowered ``evict`` limit is evicted down at once.
        """
        table: dict[bytes, PartitionRule] = {}
        for name, rule in rules.items():
            old = self.rules.get(name)
            table[name] = old if old is not None and old.same_as(rule) else rule
        self.rules = table
        self._limited = {name: r for name, r in table.items() if r.limit}
        self._marks = {name: r.referenced for name, r in table.items() if r.limit and r.evict}
        for name, rule in self._limited.items():
            if rule.evict and self.engine.bytes_used(name) > rule.limit:
                self._evict(name, rule, None)

    def _refuse(self, partition: bytes, key: bytes, rule: PartitionRule, value_len: int) -> bool:
        """Whether a ``reject`` partition refuses a write that would take it over its limit.

        Writes that do not grow the partition (smaller values, deletes) always pass.
        """
        if rule.evict:
            return False
        old = self.engine.get(partition, key)
        grow = HEADER_SIZE + value_len - (len(old) if old is not None else -len(key))
        if grow > 0 and self.engine.bytes_used(partition) + grow > rule.limit:
            rule.rejected += 1
            return True
        return False

    def _written(self, partition: bytes, key: bytes) -> None:
        """After a write to a partition with a quota: mark the key, evict if over."""
        rule = self._limited.get(partition)
        if rule is None or not rule.evict:
            return
        rule.referenced.setdefault(key, WRITE_COUNT)
        if self.engine.bytes_used(partition) > rule.limit:
            self._evict(partition, rule, key)

    def _evict(self, partition: bytes, rule: PartitionRule, keep: Optional[bytes]) -> None:
        """GCLOCK: evict keys whose use count is 0, lowering counts on the way, until under.

        ``keep`` (the key just written) is never evicted; if it alone is over
        the limit, everything else goes and it stays.
        """
        engine = self.engine
        marks = rule.referenced
        laps = 0  # laps of the hand in a row that evicted nothing
        used = engine.bytes_used(partition)
        while used > rule.limit:
            key = next(rule.hand, None)
            if key is None:
                laps += 1
                if laps > 2:
                    break  # nothing left to evict but ``keep``
                rule.hand = iter(engine.keys(partition))
                continue
            if key == keep:
                continue
            count = marks.get(key)
            if count is not None:
                if count > 1:
                    marks[key] = count - 1
                else:
                    del marks[key]
                continue
            engine.remove(partition, key)
            now_used = engine.bytes_used(partition)
            if now_used < used:
                rule.evicted += 1
                laps = 0
            used = now_used

    def _forget(self, partition: bytes, key: bytes) -> None:
        marks = self._marks.get(partition)
        if marks is not None:
            marks.pop(key, None)

    # Streaming for merge and scaling ----------------------------------------

    def stream(
        self,
        ranges: Sequence[TokenRange],
        min_version: int,
        partitions: Sequence[bytes] = (),
    ) -> Iterator[tuple[bytes, bytes, bytes]]:
        """Every record (tombstones too) whose token is in ``ranges`` and version > min.

        Walks each partition's keys with ``engine.iter_keys``, so writes may go
        on while a stream is consumed: a key present throughout is sent once,
        with its value at the moment it is reached, and a key written meanwhile
        reaches the new copy by replication anyway.
        """
        wanted = list(partitions) if partitions else self.engine.partitions()
        now_ms = self._now_ms()
        for partition in wanted:
            for key in self.engine.iter_keys(partition):
                packed = self.engine.get(partition, key)
                if packed is None:
                    continue
                version, expires_ms, _flags, bits = _unpack_header(packed)
                if version <= min_version:
                    continue
                if not bits & TOMBSTONE and expires_ms and expires_ms <= now_ms:
                    continue
                if ranges and not in_ranges(token(partition, key), ranges):
                    continue
                yield partition, key, packed

    def scan(self, partition: bytes, after: int, count: int) -> list[tuple[int, bytes]]:
        """The ``count`` live keys with the smallest tokens above ``after``, in token order.

        A cursor over the ring that stays valid across calls however the
        key set changes meanwhile (Redis SCAN's guarantee: a key present for
        the whole scan is returned).  It walks the whole partition, so it
        costs O(records) per call.
        """
        return heapq.nsmallest(count, self._scan_candidates(partition, after, self._now_ms()))

    def _scan_candidates(
        self, partition: bytes, after: int, now_ms: int
    ) -> Iterator[tuple[int, bytes]]:
        # A method, not a generator nested in scan(): mypyc (setup.py)
        # miscompiles generators that close over their caller's variables.
        get = self.engine.get
        for key in self.engine.keys(partition):
            tok = token(partition, key)
            if tok <= after:
                continue
            packed = get(partition, key)
            if packed is None:
                continue
            _v, expires_ms, _f, bits = _unpack_header(packed)
            if bits & TOMBSTONE or (expires_ms and expires_ms <= now_ms):
                continue
            yield tok, key

    def retain_steps(self, ranges: Sequence[TokenRange], step: int = 2000) -> Iterator[int]:
        """Remove every record outside ``ranges``, yielding after each ``step`` keys.

        Yields the number removed so far.  Keys written meanwhile are left alone
        if they are in the ranges, and removed if they are not.
        """
        removed = 0
        examined = 0
        for partition in self.engine.partitions():
            for key in self.engine.keys(partition):
                examined += 1
                if not in_ranges(token(partition, key), ranges):
                    self.engine.remove(partition, key)
                    removed += 1
                    if self._marks:
                        self._forget(partition, key)
                if examined % step == 0:
                    yield removed
        yield removed

    # Background sweep ---------------------------------------------------------

    def sweep(self, budget: int) -> int:
        """Examine up to ``budget`` records: drop expired ones and old tombstones.

        Walks snapshots of the key sets in turn, resuming where the previous
        call stopped, so a full pass over N records takes N / budget calls and
        no single call holds the reactor for long.
        """
        if self._sweep is None:
            self._sweep = self._sweep_keys()
        now_ms = self._now_ms()
        ttl_ms = int(self.tombstone_ttl * 1000)
        get = self.engine.get
        examined = 0
        removed = 0
        while examined < budget:
            try:
                partition, key = next(self._sweep)
            except StopIteration:
                self._sweep = None
                break
            examined += 1
            packed = get(partition, key)
            if packed is None:
                continue
            version, expires_ms, _flags, bits = _unpack_header(packed)
            if bits & TOMBSTONE:
                if now_ms - version_millis(version) >= ttl_ms:
                    self.engine.remove(partition, key)
                    self.tombstones_collected += 1
                    removed += 1
                    if self._marks:
                        self._forget(partition, key)
            elif expires_ms and expires_ms <= now_ms:
                self._expire(partition, key)
                removed += 1
        return removed

    def _sweep_keys(self) -> Iterator[tuple[bytes, bytes]]:
        for partition in self.engine.partitions():
            for key in self.engine.iter_keys(partition):
                yield partition, key

    def stats(self) -> dict[str, int]:
        return {
            "records": self.engine.count(),
            "tombstones": self.engine.tombstones(),
            "bytes": self.engine.bytes_used(),
            "high_water": self.engine.high_water,
            "expired_removed": self.expired_removed,
            "tombstones_collected": self.tombstones_collected,
            "evictions": sum(r.evicted for r in self.rules.values()),
            "rejected_writes": sum(r.rejected for r in self.rules.values()),
        }


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))
