"""The ``mmap-index`` engine: only the index is memory-mapped; values stay in files.

K2HASH's "partial mapping": an LMDB index (see :mod:`kvha.data.lmdbtables`)
maps each key to the location of its record in append-only segment files
(see :mod:`kvha.data.segments`), and values are read with ``os.pread``.
Values pass through the page cache, which the kernel can drop at will, and
never through the process's own memory beyond the request at hand, so
resident memory follows the index (tens of bytes a key), not the data.

Files under the node's state directory (``mmap-index/``)::

    index/data.mdb, index/lock.mdb   the LMDB index and its bookkeeping
    data-000000000007.seg            record entries, appended, never rewritten

A commit first writes the turn's records to the active segment (and syncs
it under ``fsync: always``), then commits the index transaction, which also
records how far the active segment is acknowledged.  Nothing is replayed on
open: the index is opened as it is, and only the active segment's length is
checked against it.  Bytes beyond it were never acknowledged (a crash between
the two steps, or a torn write) and are cut off; a segment *shorter* than
the index says lost acknowledged records (damage to the file), and the index
entries pointing past its end are dropped, counted and logged, so a damaged
record is reported missing and never returned.

Compaction picks every sealed segment whose own garbage passes
``compaction_garbage_ratio``: the index is the truth, so segments can be
compacted in any order.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kvha.data.lmdbtables import quarantine
from kvha.data.logengine import fsync_dir
from kvha.data.mmapengine import COUNTS, HIGH, META_COUNTS, META_HIGH, open_tables
from kvha.data.segments import SegmentEngine, segment_name, split_loc

log = Logger()

#: meta table, besides counts and high water (see :mod:`kvha.data.mmapengine`):
#: ``l<partition>`` -> live bytes per segment, as (segment u32, bytes u64) pairs
META_LIVE = b"l"
LIVE_PAIR = struct.Struct("<IQ")
#: ``e`` -> the active segment and how many of its bytes the index covers
META_END = b"e"
END = struct.Struct("<IQ")
#: ``f<segment u32 big-endian>`` -> the size of a sealed segment
META_SEALED = b"f"
SEG = struct.Struct(">I")
SIZE = struct.Struct("<Q")

#: Bytes of a location in the index.
LOC_BYTES = 14


class MmapIndexEngine(SegmentEngine):
    """An LMDB index of locations; records in append-only segments."""

    name = "mmap-index"

    def __init__(
        self,
        directory: str,
        clock: IReactorTime,
        fsync: str = "everysec",
        segment_bytes: int = 16 << 20,
        compaction_garbage_ratio: float = 0.5,
        compaction_min_bytes: int = 64 << 20,
        map_size: int = 1 << 30,
    ) -> None:
        super().__init__(
            directory,
            clock,
            fsync=fsync,
            segment_bytes=segment_bytes,
            compaction_garbage_ratio=compaction_garbage_ratio,
            compaction_min_bytes=compaction_min_bytes,
        )
        self.map_size = map_size
        self._tables: Any = None
        self._durable_end: tuple[int, int] = (0, 0)
        self.quarantined: Optional[str] = None
        self.records_lost = 0

    # The index ------------------------------------------------------------------

    def get(self, partition: bytes, key: bytes) -> Optional[bytes]:
        raw = self._tables.get(partition, key)
        if raw is None:
            return None
        return self._read(partition, key, int.from_bytes(raw, "little"))

    def _get_loc(self, partition: bytes, key: bytes) -> Optional[int]:
        raw = self._tables.get(partition, key)
        return None if raw is None else int.from_bytes(raw, "little")

    def _set_loc(self, partition: bytes, key: bytes, loc: int) -> Optional[int]:
        old = self._tables.replace(partition, key, loc.to_bytes(LOC_BYTES, "little"))
        return None if old is None else int.from_bytes(old, "little")

    def _pop_loc(self, partition: bytes, key: bytes) -> Optional[int]:
        old = self._tables.pop(partition, key)
        return None if old is None else int.from_bytes(old, "little")

    def _drop_locs(self, partition: bytes) -> None:
        self._tables.drop(partition)

    def keys(self, partition: bytes) -> list[bytes]:
        if partition not in self._parts:
            return []
        return self._tables.keys(partition)  # type: ignore[no-any-return]

    def iter_keys(self, partition: bytes) -> Iterator[bytes]:
        if partition not in self._parts:
            return iter(())
        return self._tables.iter_keys(partition)  # type: ignore[no-any-return]

    # Commit: segment first, then the index that points into it -----------------------

    def _commit_index(self) -> None:
        tables = self._tables
        for partition in self._dirty:
            counts = self._parts.get(partition)
            if counts is None:
                tables.meta_delete(META_COUNTS + partition)
                tables.meta_delete(META_LIVE + partition)
                continue
            tables.meta_put(META_COUNTS + partition, COUNTS.pack(*counts))
            live = self._live[partition]
            tables.meta_put(
                META_LIVE + partition,
                b"".join(LIVE_PAIR.pack(seq, n) for seq, n in live.items() if n),
            )
        self._dirty.clear()
        end = (self._active, self._written)
        if not tables.pending and end == self._durable_end:
            return
        tables.meta_put(META_HIGH, HIGH.pack(self._max_version))
        tables.meta_put(META_END, END.pack(*end))
        tables.commit()
        self._durable_end = end

    def _sync_index(self) -> None:
        self._tables.sync()

    def _sealed(self, seq: int) -> None:
        self._tables.meta_put(META_SEALED + SEG.pack(seq), SIZE.pack(self._sizes[seq]))

    def _forget_segment(self, seq: int) -> None:
        self._tables.meta_delete(META_SEALED + SEG.pack(seq))

    def _choose_victims(self, force: bool) -> list[int]:
        ratio = self.compaction_garbage_ratio
        return [
            seq
            for seq, size, dead in self._segment_garbage()
            if dead and (force or dead >= ratio * size)
        ]

    # Opening: no replay, only the active segment's length is checked ---------------------

    def open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        index_dir = os.path.join(self.directory, "index")
        self._tables, self.quarantined = open_tables(
            self.directory, index_dir, self.fsync, self.map_size, self._clock
        )
        meta = self._tables.meta_items()
        sealed: dict[int, int] = {}
        end: Optional[tuple[int, int]] = None
        for key, value in meta:
            tag = key[:1]
            if tag == META_COUNTS:
                self._parts[key[1:]] = list(COUNTS.unpack(value))
            elif tag == META_LIVE:
                self._live[key[1:]] = {seq: n for seq, n in LIVE_PAIR.iter_unpack(value) if n}
            elif key == META_HIGH:
                (self._max_version,) = HIGH.unpack(value)
            elif key == META_END:
                end = END.unpack(value)
            elif tag == META_SEALED:
                sealed[SEG.unpack(key[1:])[0]] = SIZE.unpack(value)[0]
        for partition in self._parts:
            self._live.setdefault(partition, {})
        self._durable_high = self._max_version
        segments = self._segment_files()
        if end is None:
            if segments:
                # Segments without an index: nothing says which records are current.
                self._tables.close()
                self._close_files()
                moved = self._quarantine("segments without their index")
                self.open()
                self.quarantined = moved
                return
            self._open_active(1)
        else:
            self._open_existing(segments, sealed, end)
        self._durable_end = (self._active, self._written)
        self._dirty.clear()
        self._last_sync = self._clock.seconds()
        self._opened = True

    def _quarantine(self, why: str) -> str:
        moved = quarantine(self.directory, self._clock.seconds())
        log.error(
            "storage in {directory} is damaged ({why}); moved to {moved} and starting empty "
            "with high water 0, so that merge refills this node from its replicas",
            directory=self.directory,
            why=why,
            moved=moved,
        )
        self._parts.clear()
        self._live.clear()
        self._max_version = self._durable_high = 0
        return moved

    def _open_existing(
        self, segments: list[int], sealed: dict[int, int], end: tuple[int, int]
    ) -> None:
        active, acknowledged = end
        damaged: dict[int, int] = {}  # segment -> bytes of it still there
        live = self.segment_live()
        present = set(segments)
        for seq in segments:
            path = self._path(seq)
            size = os.path.getsize(path)
            if seq > active:
                log.warn(
                    "removing {segment}: created after the last index commit, so it holds "
                    "no acknowledged record",
                    segment=segment_name(seq),
                )
                os.unlink(path)
                continue
            expected = acknowledged if seq == active else sealed.get(seq, size)
            if size > expected and seq == active:
                self.torn_bytes_dropped += size - expected
                log.warn(
                    "dropped a torn or unacknowledged tail of {dropped} bytes from {path} at "
                    "offset {offset} (beyond what the index acknowledged)",
                    dropped=size - expected,
                    path=path,
                    offset=expected,
                )
                with open(path, "r+b") as f:
                    f.truncate(expected)
                    f.flush()
                    os.fsync(f.fileno())
            elif size < expected:
                damaged[seq] = size
                log.error(
                    "{path} is {missing} bytes shorter than the index says ({size} of "
                    "{expected}): the records past its end are lost",
                    path=path,
                    missing=expected - size,
                    size=size,
                    expected=expected,
                )
            if seq != active and not live.get(seq):
                # Emptied by a compaction that a crash cut short before it deleted it.
                os.unlink(path)
                self._tables.meta_delete(META_SEALED + SEG.pack(seq))
                continue
            if seq != active:
                self._open_sealed(seq)
        for seq in sealed:
            if seq not in present:
                self._tables.meta_delete(META_SEALED + SEG.pack(seq))
        for seq, n in live.items():
            if n and seq not in present:
                log.error(
                    "{segment} is missing, and the index points at {bytes} bytes in it",
                    segment=segment_name(seq),
                    bytes=n,
                )
                damaged[seq] = 0
        self._open_active(active)
        if damaged:
            self._repair(damaged)
        if self._tables.pending:
            self._tables.commit()
        fsync_dir(self.directory)

    def _repair(self, damaged: dict[int, int]) -> None:
        """Drop the index entries pointing past what is left of damaged segments.

        Walks the whole index, so it takes time in proportion to the data; it
        runs only after damage, never on a normal open.
        """
        lost = 0
        for partition in list(self._parts):
            for key, raw in self._tables.items(partition):
                loc = int.from_bytes(raw, "little")
                seq, offset, size, _tomb = split_loc(loc)
                if seq in damaged and offset + size > damaged[seq]:
                    self._tables.pop(partition, key)
                    self._account(partition, loc, None)
                    lost += 1
        self.records_lost += lost
        log.error(
            "dropped {lost} index entries whose records were lost with the damaged "
            "segments {segments}; they read as missing, and merge brings them back from "
            "their replicas",
            lost=lost,
            segments=sorted(segment_name(s) for s in damaged),
        )
        self._commit_index()

    def close(self) -> None:
        if not self._opened:
            return
        self._stop_compaction()
        self.commit()
        self.sync()
        self._close_files()
        self._tables.close()
        self._tables = None
        self._opened = False

    def stats(self) -> dict[str, int]:
        out = super().stats()
        out.update(self._tables.stats())
        out["disk_bytes"] = self.disk_bytes() + self._tables.file_bytes()
        out["records_lost"] = self.records_lost
        out["quarantined"] = int(self.quarantined is not None)
        return out
