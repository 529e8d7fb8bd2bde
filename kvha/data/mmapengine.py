"""The ``mmap`` engine: the whole store in one memory-mapped LMDB file.

K2HASH's "full mapping": every record lives in a B+tree in one file that is
mapped into memory, and reads are served from the map.  LMDB (see
:mod:`kvha.data.lmdbtables`) makes it crash-safe without a log: a write
transaction becomes visible, and durable under ``fsync: always``, all at
once at commit, so a restart opens the file and replays nothing.  Record
counts, bytes and tombstones per partition and the high-water version are
kept in the same file and updated in the same transaction as the records,
so they are exact after a crash and opening never has to count.

Files under the node's state directory (``mmap/``): LMDB's ``data.mdb`` and
``lock.mdb``.  A ``data.mdb`` that cannot be trusted (truncated, or not LMDB)
is moved aside to ``mmap.corrupt-<time>``, logged, and the node starts empty
with a high water of 0, so that merge refills it from its replicas.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kvha.data.counted import CountedPartitions
from kvha.data.engine import Engine
from kvha.data.lmdbtables import CorruptStore, LmdbTables, quarantine
from kvha.data.logengine import check_fsync
from kvha.record import HEADER, HEADER_SIZE, TOMBSTONE

log = Logger()

#: meta table: ``c<partition>`` -> records, bytes used, tombstones; ``h`` -> high water
COUNTS = struct.Struct("<QQQ")
HIGH = struct.Struct("<Q")
META_COUNTS = b"c"
META_HIGH = b"h"

_BITS = HEADER_SIZE - 1
_unpack_header = HEADER.unpack_from


def open_tables(
    directory: str, lmdb_dir: str, fsync: str, map_size: int, clock: IReactorTime
) -> tuple[LmdbTables, Optional[str]]:
    """Open the LMDB tables in ``lmdb_dir``; quarantine ``directory`` if they are damaged.

    Returns the tables and, when a damaged store was moved aside, where to.
    """
    tables = LmdbTables(lmdb_dir, fsync, map_size)
    try:
        tables.open()
        return tables, None
    except CorruptStore as e:
        moved = quarantine(directory, clock.seconds())
        log.error(
            "storage in {directory} is damaged ({why}); moved to {moved} and starting "
            "empty with high water 0, so that merge refills this node from its replicas",
            directory=directory,
            why=str(e),
            moved=moved,
        )
    os.makedirs(directory, exist_ok=True)
    tables = LmdbTables(lmdb_dir, fsync, map_size)
    tables.open()
    return tables, moved


class MmapEngine(CountedPartitions, Engine):
    """Records in an LMDB environment; nothing to replay on open."""

    name = "mmap"
    durable = True
    needs_commit = True

    def __init__(
        self,
        directory: str,
        clock: IReactorTime,
        fsync: str = "everysec",
        map_size: int = 1 << 30,
    ) -> None:
        check_fsync(fsync)
        self.directory = directory
        self._clock = clock
        self.fsync = fsync
        self.map_size = map_size
        self._tables: Any = None
        self._parts: dict[bytes, list[int]] = {}  # partition -> [records, bytes, tombstones]
        self._dirty: set[bytes] = set()
        self._max_version = 0
        self._durable_high = 0
        self._unsynced = False
        self._last_sync = 0.0
        self.quarantined: Optional[str] = None

    def open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._tables, self.quarantined = open_tables(
            self.directory, self.directory, self.fsync, self.map_size, self._clock
        )
        for key, value in self._tables.meta_items():
            if key[:1] == META_COUNTS:
                self._parts[key[1:]] = list(COUNTS.unpack(value))
            elif key == META_HIGH:
                (self._durable_high,) = HIGH.unpack(value)
        self._max_version = self._durable_high
        self._last_sync = self._clock.seconds()

    def close(self) -> None:
        if self._tables is None:
            return
        self.commit()
        if self.fsync != "always":
            self._tables.sync()
        self._tables.close()
        self._tables = None

    # Records ----------------------------------------------------------------

    def get(self, partition: bytes, key: bytes) -> Optional[bytes]:
        return self._tables.get(partition, key)  # type: ignore[no-any-return]

    def put(self, partition: bytes, key: bytes, packed: bytes) -> None:
        old = self._tables.replace(partition, key, packed)
        counts = self._parts.get(partition)
        if counts is None:
            counts = self._parts[partition] = [0, 0, 0]
        if old is None:
            counts[0] += 1
            counts[1] += len(key) + len(packed)
        else:
            counts[1] += len(packed) - len(old)
            counts[2] -= old[_BITS] & TOMBSTONE
        counts[2] += packed[_BITS] & TOMBSTONE
        self._dirty.add(partition)
        version = _unpack_header(packed)[0]
        if version > self._max_version:
            self._max_version = version

    def remove(self, partition: bytes, key: bytes) -> None:
        old = self._tables.pop(partition, key)
        if old is None:
            return
        counts = self._parts[partition]
        counts[0] -= 1
        counts[1] -= len(key) + len(old)
        counts[2] -= old[_BITS] & TOMBSTONE
        if counts[0] == 0:
            del self._parts[partition]
        self._dirty.add(partition)

    def drop_partition(self, partition: bytes) -> int:
        counts = self._parts.pop(partition, None)
        self._tables.drop(partition)
        self._dirty.add(partition)
        return 0 if counts is None else counts[0]

    def partitions(self) -> list[bytes]:
        return list(self._parts)

    def keys(self, partition: bytes) -> list[bytes]:
        if partition not in self._parts:
            return []
        return self._tables.keys(partition)  # type: ignore[no-any-return]

    def iter_keys(self, partition: bytes) -> Iterator[bytes]:
        if partition not in self._parts:
            return iter(())
        return self._tables.iter_keys(partition)  # type: ignore[no-any-return]

    # Durability ---------------------------------------------------------------

    def commit(self) -> None:
        tables = self._tables
        if self._dirty:
            for partition in self._dirty:
                counts = self._parts.get(partition)
                if counts is None:
                    tables.meta_delete(META_COUNTS + partition)
                else:
                    tables.meta_put(META_COUNTS + partition, COUNTS.pack(*counts))
            self._dirty.clear()
        if self._max_version > self._durable_high:
            tables.meta_put(META_HIGH, HIGH.pack(self._max_version))
        if tables.pending:
            tables.commit()
            self._unsynced = self.fsync != "always"
        self._durable_high = self._max_version

    def maintenance(self, now: float) -> None:
        if self._unsynced and self.fsync == "everysec" and now - self._last_sync >= 1.0:
            self._tables.sync()
            self._unsynced = False
            self._last_sync = now

    @property
    def high_water(self) -> int:
        return self._durable_high

    @property
    def max_version(self) -> int:
        return self._max_version

    def disk_bytes(self) -> int:
        return self._tables.file_bytes()  # type: ignore[no-any-return]

    def stats(self) -> dict[str, int]:
        out = self._tables.stats()
        out["disk_bytes"] = self.disk_bytes()
        out["quarantined"] = int(self.quarantined is not None)
        return out
