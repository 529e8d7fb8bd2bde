"""Storage engines: where a data node keeps its packed records.

An engine is a plain map ``(partition, key) -> packed record`` plus
durability.  It knows nothing of versions, expiry or memcached semantics:
those live in :mod:`kvha.data.store`, once, for every engine.  Every
mutation an engine accepts is a whole-record write or a removal, so replaying
a log of them is idempotent and order is the only thing that matters.

The contract is tested once (``tests/test_engine_contract.py``) and run
against every engine, restarts included.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Optional

from mypy_extensions import mypyc_attr

from kvha.record import HEADER, HEADER_SIZE, TOMBSTONE

_BITS = HEADER_SIZE - 1  # offset of the bits byte in a packed record


@mypyc_attr(allow_interpreted_subclasses=True)
class Engine:
    """The interface every storage engine implements.

    ``durable`` engines keep what was committed across a restart; a
    ``memory`` engine comes back empty and is refilled by merge.

    This module is compiled with the hot path (a data node calls ``get`` and
    ``put`` per request); the engines in other modules subclass these
    classes from plain Python, which the compiled classes allow.  A compiled
    engine's methods cannot be replaced on an instance: subclass it instead.
    """

    name: ClassVar[str] = "abstract"
    durable: ClassVar[bool] = False

    def open(self) -> None:
        """Load persisted state.  Called once before any other method."""

    def close(self) -> None:
        """Commit what is pending and release files."""

    def get(self, partition: bytes, key: bytes) -> Optional[bytes]:
        raise NotImplementedError

    def put(self, partition: bytes, key: bytes, packed: bytes) -> None:
        raise NotImplementedError

    def remove(self, partition: bytes, key: bytes) -> None:
        """Physically forget a key (expired record, collected tombstone)."""
        raise NotImplementedError

    def drop_partition(self, partition: bytes) -> int:
        """Forget every record of a partition; return how many there were."""
        raise NotImplementedError

    def partitions(self) -> list[bytes]:
        raise NotImplementedError

    def keys(self, partition: bytes) -> list[bytes]:
        """A snapshot of a partition's keys, safe to walk while writes go on."""
        raise NotImplementedError

    def iter_keys(self, partition: bytes) -> Iterator[bytes]:
        """Walk a partition's keys lazily, while writes go on.

        Every key present for the whole walk is yielded exactly once; one
        written or removed meanwhile may or may not be.  Engines that keep
        their keys on disk walk them in batches instead of copying them all
        into memory as :meth:`keys` does.
        """
        return iter(self.keys(partition))

    def count(self, partition: Optional[bytes] = None) -> int:
        raise NotImplementedError

    def bytes_used(self, partition: Optional[bytes] = None) -> int:
        """Bytes of keys and packed records held (the unit quotas will use)."""
        raise NotImplementedError

    def tombstones(self, partition: Optional[bytes] = None) -> int:
        """How many of the records counted by :meth:`count` are tombstones."""
        raise NotImplementedError

    def items(self) -> Iterator[tuple[bytes, bytes, bytes]]:
        """Every ``(partition, key, packed)``, walking snapshots of the key sets."""
        for partition in self.partitions():
            for key in self.keys(partition):
                packed = self.get(partition, key)
                if packed is not None:
                    yield partition, key, packed

    # Durability -----------------------------------------------------------

    #: True when :meth:`commit` does real I/O, so that the server batches
    #: replies behind one commit per reactor turn (group commit).
    needs_commit: ClassVar[bool] = False

    def commit(self) -> None:
        """Make every write accepted so far durable under the fsync policy.

        Replies to writes are sent only after this returns.
        """

    def maintenance(self, now: float) -> None:
        """Periodic work: timed fsync, snapshots, compaction.  Never blocks long."""

    @property
    def high_water(self) -> int:
        """The highest record version this engine holds durably (0 if none)."""
        return 0

    def stats(self) -> dict[str, int]:
        return {}


@mypyc_attr(allow_interpreted_subclasses=True)
class MemoryEngine(Engine):
    """Records in nested dicts: ``{partition: {key: packed}}``.

    One ``bytes`` object per record (see :mod:`kvha.record`) and one dict
    per partition, so a key costs its own bytes object plus a dict slot and
    no tuple.
    """

    name: ClassVar[str] = "memory"

    def __init__(self) -> None:
        self._data: dict[bytes, dict[bytes, bytes]] = {}
        self._bytes: dict[bytes, int] = {}
        self._tombs: dict[bytes, int] = {}
        self._high_water = 0

    def get(self, partition: bytes, key: bytes) -> Optional[bytes]:
        part = self._data.get(partition)
        if part is None:
            return None
        return part.get(key)

    def put(self, partition: bytes, key: bytes, packed: bytes) -> None:
        part = self._data.get(partition)
        if part is None:
            part = self._data[partition] = {}
            self._bytes[partition] = 0
            self._tombs[partition] = 0
        old = part.get(key)
        part[key] = packed
        tomb = packed[_BITS] & TOMBSTONE
        if old is None:
            self._bytes[partition] += len(key) + len(packed)
            if tomb:
                self._tombs[partition] += 1
        else:
            self._bytes[partition] += len(packed) - len(old)
            if tomb != old[_BITS] & TOMBSTONE:
                self._tombs[partition] += 1 if tomb else -1
        version = HEADER.unpack_from(packed)[0]
        if version > self._high_water:
            self._high_water = version

    def remove(self, partition: bytes, key: bytes) -> None:
        part = self._data.get(partition)
        if part is None:
            return
        old = part.pop(key, None)
        if old is not None:
            self._bytes[partition] -= len(key) + len(old)
            if old[_BITS] & TOMBSTONE:
                self._tombs[partition] -= 1
            if not part:
                del self._data[partition]
                del self._bytes[partition]
                del self._tombs[partition]

    def drop_partition(self, partition: bytes) -> int:
        part = self._data.pop(partition, None)
        self._bytes.pop(partition, None)
        self._tombs.pop(partition, None)
        return 0 if part is None else len(part)

    def partitions(self) -> list[bytes]:
        return list(self._data)

    def keys(self, partition: bytes) -> list[bytes]:
        part = self._data.get(partition)
        return [] if part is None else list(part)

    def count(self, partition: Optional[bytes] = None) -> int:
        if partition is not None:
            part = self._data.get(partition)
            return 0 if part is None else len(part)
        return sum(len(part) for part in self._data.values())

    def bytes_used(self, partition: Optional[bytes] = None) -> int:
        if partition is not None:
            return self._bytes.get(partition, 0)
        return sum(self._bytes.values())

    def tombstones(self, partition: Optional[bytes] = None) -> int:
        if partition is not None:
            return self._tombs.get(partition, 0)
        return sum(self._tombs.values())

    @property
    def high_water(self) -> int:
        # Nothing survives a restart, so nothing is held durably.
        return 0

    @property
    def max_version(self) -> int:
        """The highest version ever put, durable or not."""
        return self._high_water

    def clear(self) -> None:
        self._data.clear()
        self._bytes.clear()
        self._tombs.clear()
        self._high_water = 0
