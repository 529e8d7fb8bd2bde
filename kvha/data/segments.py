"""Append-only value segments: what the ``disk`` and ``mmap-index`` engines share.

Values live in numbered segment files, ``data-000000000001.seg`` and up,
written only at their end and never rewritten.  Each record is one entry in
the ``log`` engine's format (``u32 length, u32 crc32, payload`` with the
partition, key and packed record in the payload; see
:mod:`kvha.data.logengine`), so every read checks a checksum and a torn
write is recognised the same way everywhere.

An index maps ``(partition, key)`` to a *location*: one Python ``int``
packing the segment number, the entry's offset and size, and the record's
tombstone bit.  Where the index lives is the subclass's business: a dict in
memory (``disk``) or a memory-mapped LMDB file (``mmap-index``).  This class
does the rest: buffered appends made durable by :meth:`commit` (one write
and, with ``fsync: always``, one ``fdatasync`` per commit), rotation to a new
segment at ``segment_bytes``, reads with ``os.pread``, per-partition counts,
and compaction.

**Compaction** reclaims the space of overwritten and removed records.  Each
segment's live bytes are counted as writes come, so the garbage of every
sealed segment is known without reading it.  When enough has piled up the
chosen segments (the *victims*) are read in small steps between requests:
each entry that the index still points to is appended again, verbatim, to
the active segment, and the index moved to the copy.  Once every victim is
empty the active segment is synced and the victims are deleted.  A crash at
any point leaves either the old copy or both, never neither.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Collection, Iterator
from typing import Any, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from kvha.data.counted import CountedPartitions
from kvha.data.engine import Engine
from kvha.data.logengine import (
    ENTRY,
    MAX_ENTRY,
    OP_PUT,
    PAYLOAD,
    CorruptLog,
    check_fsync,
    encode_entry,
    fsync_dir,
    scan_entries,
)
from kvha.record import HEADER, HEADER_SIZE, TOMBSTONE

log = Logger()

SEGMENT_RE = re.compile(r"^data-(\d{12})\.seg$")

#: Bytes of an entry that are neither key nor packed record, partition aside.
ENTRY_OVERHEAD = ENTRY.size + PAYLOAD.size

_BITS = HEADER_SIZE - 1  # offset of the bits byte in a packed record
_unpack_header = HEADER.unpack_from

# A location: segment (32 bits) | offset (40 bits) | entry size (32 bits) | tombstone (1 bit).
SEQ_SHIFT = 73
_OFF_SHIFT = 33
_OFF_MASK = (1 << 40) - 1
_SIZE_MASK = (1 << 32) - 1

#: Segment bytes one compaction step reads at most, and entries it examines at most:
#: a step then takes a few milliseconds and requests are served between steps.
COMPACTION_STEP_BYTES = 512 << 10
COMPACTION_STEP_ENTRIES = 300

#: After a failed compaction, wait this long before trying again.
COMPACTION_RETRY_SECONDS = 60.0


def make_loc(seq: int, offset: int, size: int, tomb: int) -> int:
    """Pack a record's location into one int (the most compact Python object for it)."""
    return (((seq << 40) | offset) << 32 | size) << 1 | tomb


def split_loc(loc: int) -> tuple[int, int, int, int]:
    """``(segment, offset, size, tombstone)`` of a location."""
    return loc >> SEQ_SHIFT, (loc >> _OFF_SHIFT) & _OFF_MASK, (loc >> 1) & _SIZE_MASK, loc & 1


def segment_name(seq: int) -> str:
    return f"data-{seq:012d}.seg"


class SegmentEngine(CountedPartitions, Engine):
    """Values in append-only segments behind an index the subclass keeps."""

    durable = True
    needs_commit = True

    def __init__(
        self,
        directory: str,
        clock: IReactorTime,
        fsync: str = "everysec",
        segment_bytes: int = 16 << 20,
        compaction_garbage_ratio: float = 0.5,
        compaction_min_bytes: int = 64 << 20,
    ) -> None:
        check_fsync(fsync)
        if not 0.0 < compaction_garbage_ratio <= 1.0:
            raise ValueError(
                f"compaction_garbage_ratio must be in (0, 1]; got {compaction_garbage_ratio!r}"
            )
        self.directory = directory
        self._clock = clock
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.compaction_garbage_ratio = compaction_garbage_ratio
        self.compaction_min_bytes = compaction_min_bytes
        self._fds: dict[int, int] = {}  # segment -> fd (the active one is O_APPEND)
        self._sizes: dict[int, int] = {}  # segment -> bytes written to the file
        self._active = 0
        self._written = 0  # bytes of the active segment already in the file
        self._buf = bytearray()  # appended to the active segment, not yet written
        #: partition -> [records, bytes used, tombstones]; present only while non-empty
        self._parts: dict[bytes, list[int]] = {}
        #: partition -> {segment: bytes of its live entries there}
        self._live: dict[bytes, dict[int, int]] = {}
        #: partitions whose counters changed since the last commit
        self._dirty: set[bytes] = set()
        self._max_version = 0
        self._durable_high = 0
        self._unsynced = False
        self._unsynced_sealed: list[int] = []  # sealed segments not yet synced
        self._last_sync = 0.0
        self._compaction: Optional[Iterator[None]] = None
        self._compaction_call: Optional[IDelayedCall] = None
        self._victims: list[int] = []
        self._compaction_retry_at = 0.0
        self._opened = False
        self.compactions = 0
        self.compaction_failures = 0
        self.compacted_bytes = 0
        self.records_moved = 0
        self.torn_bytes_dropped = 0
        self.corrupt_reads = 0

    # Subclass hooks: the index ------------------------------------------------

    def _get_loc(self, partition: bytes, key: bytes) -> Optional[int]:
        raise NotImplementedError

    def _set_loc(self, partition: bytes, key: bytes, loc: int) -> Optional[int]:
        """Point ``key`` at ``loc``; return the location it had."""
        raise NotImplementedError

    def _pop_loc(self, partition: bytes, key: bytes) -> Optional[int]:
        raise NotImplementedError

    def _drop_locs(self, partition: bytes) -> None:
        raise NotImplementedError

    # Subclass hooks: what else happens at each step (all optional) -------------

    def _note_put(
        self, partition: bytes, key: bytes, offset: int, size: int, version: int, bits: int
    ) -> None:
        """A record entry was appended to the active segment at ``offset``."""

    def _note_remove(self, partition: bytes, key: bytes) -> None:
        """A key was removed (the ``disk`` engine logs it for its replay)."""

    def _note_drop(self, partition: bytes) -> None:
        """A partition was dropped."""

    def _after_write(self) -> None:
        """The buffered bytes were just written to the active segment."""

    def _commit_index(self) -> None:
        """End of :meth:`commit`: make the index changes durable too."""

    def _sync_index(self) -> None:
        """Force the index to disk whatever the fsync policy."""

    def _sealed(self, seq: int) -> None:
        """Segment ``seq`` was synced and will never be written again."""

    def _opened_active(self, seq: int) -> None:
        """Segment ``seq`` is the new active segment."""

    def _before_victims_deleted(self) -> None:
        """Compaction moved every live record out of its victims; they go next."""

    def _forget_segment(self, seq: int) -> None:
        """Segment ``seq`` was deleted."""

    def _choose_victims(self, force: bool) -> list[int]:
        raise NotImplementedError

    # Files ------------------------------------------------------------------

    def _path(self, seq: int) -> str:
        return os.path.join(self.directory, segment_name(seq))

    def _segment_files(self) -> list[int]:
        found = []
        for name in os.listdir(self.directory):
            m = SEGMENT_RE.match(name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def _open_sealed(self, seq: int) -> None:
        self._fds[seq] = os.open(self._path(seq), os.O_RDONLY)
        self._sizes[seq] = os.fstat(self._fds[seq]).st_size

    def _open_active(self, seq: int) -> None:
        fd = os.open(self._path(seq), os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        self._fds[seq] = fd
        self._active = seq
        self._written = self._sizes[seq] = os.fstat(fd).st_size
        fsync_dir(self.directory)
        self._opened_active(seq)

    def _rotate(self) -> None:
        """Seal the active segment and begin the next.

        No sync here, so that sealing never stalls the reactor: under
        ``always`` every byte is already synced; under ``everysec`` the next
        timed sync covers sealed segments too; under ``os`` nothing is
        promised.  (Compaction syncs what it moved before deleting anything.)
        """
        seq = self._active
        self._sizes[seq] = self._written
        if self.fsync != "always":
            self._unsynced_sealed.append(seq)
        self._sealed(seq)
        self._open_active(seq + 1)

    def _close_files(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # Reads --------------------------------------------------------------------

    def get(self, partition: bytes, key: bytes) -> Optional[bytes]:
        loc = self._get_loc(partition, key)
        if loc is None:
            return None
        return self._read(partition, key, loc)

    def _read_entry(self, loc: int) -> bytes:
        seq = loc >> SEQ_SHIFT
        offset = (loc >> _OFF_SHIFT) & _OFF_MASK
        size = (loc >> 1) & _SIZE_MASK
        if seq == self._active and offset >= self._written:
            start = offset - self._written
            return bytes(self._buf[start : start + size])
        fd = self._fds.get(seq)
        if fd is None:
            return b""
        return os.pread(fd, size, offset)

    def _read(self, partition: bytes, key: bytes, loc: int) -> Optional[bytes]:
        """The packed record at ``loc``, checked; None (and an error logged) if damaged."""
        try:
            entry = self._read_entry(loc)
        except OSError as e:
            entry = b""
            why = str(e)
        else:
            why = ""
        size = (loc >> 1) & _SIZE_MASK
        plen = len(partition)
        start = ENTRY_OVERHEAD + plen + len(key)
        if not why:
            if len(entry) != size or size < start + HEADER_SIZE:
                why = f"short read ({len(entry)} of {size} bytes)"
            else:
                length, crc = ENTRY.unpack_from(entry)
                if (
                    length != size - ENTRY.size
                    or zlib.crc32(memoryview(entry)[ENTRY.size :]) != crc
                ):
                    why = "checksum mismatch"
                elif (
                    PAYLOAD.unpack_from(entry, ENTRY.size) != (OP_PUT, plen, len(key))
                    or entry[ENTRY_OVERHEAD : ENTRY_OVERHEAD + plen] != partition
                    or entry[ENTRY_OVERHEAD + plen : start] != key
                ):
                    why = "entry belongs to another key"
        if why:
            self.corrupt_reads += 1
            seq, offset, _size, _tomb = split_loc(loc)
            log.error(
                "unreadable record {partition!r}/{key!r} in {segment} at offset {offset}: "
                "{why}; reporting it missing",
                partition=partition,
                key=key[:64],
                segment=segment_name(seq),
                offset=offset,
                why=why,
            )
            return None
        return entry[start:]

    # Writes -------------------------------------------------------------------

    def put(self, partition: bytes, key: bytes, packed: bytes) -> None:
        entry = encode_entry(OP_PUT, partition, key, packed)
        size = len(entry)
        offset = self._written + len(self._buf)
        self._buf += entry
        bits = packed[_BITS]
        loc = (((self._active << 40) | offset) << 32 | size) << 1 | (bits & TOMBSTONE)
        old = self._set_loc(partition, key, loc)
        self._account(partition, old, loc)
        version = _unpack_header(packed)[0]
        if version > self._max_version:
            self._max_version = version
        self._note_put(partition, key, offset, size, version, bits)

    def remove(self, partition: bytes, key: bytes) -> None:
        old = self._pop_loc(partition, key)
        if old is None:
            return
        self._account(partition, old, None)
        self._note_remove(partition, key)

    def drop_partition(self, partition: bytes) -> int:
        counts = self._parts.pop(partition, None)
        self._live.pop(partition, None)
        self._dirty.add(partition)
        if counts is None:
            return 0
        self._drop_locs(partition)
        self._note_drop(partition)
        return counts[0]

    def _account(self, partition: bytes, old: Optional[int], new: Optional[int]) -> None:
        """Follow one index change in the partition's counters and the live bytes."""
        counts = self._parts.get(partition)
        if counts is None:
            counts = self._parts[partition] = [0, 0, 0]
            live = self._live[partition] = {}
        else:
            live = self._live[partition]
        overhead = ENTRY_OVERHEAD + len(partition)
        if old is not None:
            size = (old >> 1) & _SIZE_MASK
            counts[0] -= 1
            counts[1] -= size - overhead
            counts[2] -= old & 1
            live[old >> SEQ_SHIFT] -= size
        if new is not None:
            size = (new >> 1) & _SIZE_MASK
            counts[0] += 1
            counts[1] += size - overhead
            counts[2] += new & 1
            seq = new >> SEQ_SHIFT
            live[seq] = live.get(seq, 0) + size
        elif counts[0] == 0:
            del self._parts[partition]
            del self._live[partition]
        self._dirty.add(partition)

    def commit(self) -> None:
        if self._buf:
            fd = self._fds[self._active]
            view = memoryview(self._buf)
            try:
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            finally:
                view.release()
            self._written += len(self._buf)
            self._sizes[self._active] = self._written
            self._buf = bytearray()
            self._after_write()
            if self.fsync == "always":
                os.fdatasync(fd)
            else:
                self._unsynced = True
            if self._written >= self.segment_bytes:
                self._rotate()
        self._durable_high = self._max_version
        self._commit_index()

    # Counts ---------------------------------------------------------------------

    def partitions(self) -> list[bytes]:
        return list(self._parts)

    @property
    def high_water(self) -> int:
        return self._durable_high

    @property
    def max_version(self) -> int:
        """The highest version ever put, committed or not."""
        return self._max_version

    # Maintenance ------------------------------------------------------------------

    def maintenance(self, now: float) -> None:
        if not self._opened:
            return
        if self._unsynced and self.fsync == "everysec" and now - self._last_sync >= 1.0:
            self.sync()
            self._last_sync = now
        if self._compaction is None and now >= self._compaction_retry_at:
            dead, _total = self.garbage()
            if dead >= max(1, self.compaction_min_bytes):
                self.start_compaction()

    def _sync_data(self, skip: Collection[int] = ()) -> None:
        """Sync the active segment and the sealed segments not synced yet but ``skip``."""
        kept = []
        for seq in self._unsynced_sealed:
            fd = self._fds.get(seq)
            if seq in skip:
                kept.append(seq)
            elif fd is not None:
                os.fdatasync(fd)
        self._unsynced_sealed = kept
        os.fdatasync(self._fds[self._active])

    def sync(self) -> None:
        """Force the segments and the index to disk, whatever the policy."""
        self._sync_data()
        self._sync_index()
        self._unsynced = False

    def segment_live(self) -> dict[int, int]:
        """Live entry bytes per segment."""
        totals: dict[int, int] = {}
        for live in self._live.values():
            for seq, n in live.items():
                totals[seq] = totals.get(seq, 0) + n
        return totals

    def _sealed_segments(self) -> list[int]:
        return sorted(s for s in self._sizes if s != self._active)

    def garbage(self) -> tuple[int, int]:
        """``(dead bytes, total bytes)`` of the sealed segments (compaction's candidates)."""
        live = self.segment_live()
        total = dead = 0
        for seq in self._sealed_segments():
            size = self._sizes[seq]
            total += size
            dead += size - live.get(seq, 0)
        return dead, total

    def _segment_garbage(self) -> list[tuple[int, int, int]]:
        """``(segment, size, dead bytes)`` of each sealed segment, oldest first."""
        live = self.segment_live()
        return [
            (seq, self._sizes[seq], self._sizes[seq] - live.get(seq, 0))
            for seq in self._sealed_segments()
        ]

    # Compaction -------------------------------------------------------------------

    @property
    def compacting(self) -> bool:
        return self._compaction is not None

    def start_compaction(self, force: bool = False) -> bool:
        """Begin a compaction that runs in small steps between requests.

        Without ``force`` the victims must carry ``compaction_garbage_ratio``
        of garbage; with it every sealed segment holding any is taken.
        Returns whether a compaction started.
        """
        if self._compaction is not None or not self._opened:
            return False
        victims = self._choose_victims(force)
        if not victims:
            return False
        self._victims = victims
        self._compaction = self._compaction_steps(victims)
        self._compaction_call = self._clock.callLater(0, self._compaction_step)
        return True

    def seal(self) -> None:
        """Commit and seal the active segment if it holds anything (tests, tools)."""
        self.commit()
        if self._written:
            self._rotate()

    def compact_now(self) -> None:
        """Seal the active segment and compact everything at once (tests, tools)."""
        if self._compaction is None:
            self.seal()
            if not self.start_compaction(force=True):
                return
        if self._compaction_call is not None and self._compaction_call.active():
            self._compaction_call.cancel()
        self._compaction_call = None
        steps, self._compaction = self._compaction, None
        assert steps is not None
        try:
            for _ in steps:
                pass
        finally:
            self._victims = []

    def _compaction_step(self) -> None:
        self._compaction_call = None
        if self._compaction is None:
            return
        try:
            next(self._compaction)
        except StopIteration:
            self._compaction = None
            self._victims = []
            return
        except Exception:
            log.failure(
                "compaction of {segments} failed; every record stays where it was and "
                "compaction retries in {retry:.0f}s",
                segments=[segment_name(s) for s in self._victims],
                retry=COMPACTION_RETRY_SECONDS,
            )
            self.compaction_failures += 1
            self._compaction = None
            self._victims = []
            self._compaction_retry_at = self._clock.seconds() + COMPACTION_RETRY_SECONDS
            return
        self._compaction_call = self._clock.callLater(0, self._compaction_step)

    def _compaction_steps(self, victims: list[int]) -> Iterator[None]:
        """Move the live entries out of ``victims``, then delete them.

        A generator: each ``next`` is one step of at most
        :data:`COMPACTION_STEP_ENTRIES` entries or :data:`COMPACTION_STEP_BYTES`.
        """
        reclaimed = sum(self._sizes[s] for s in victims)
        moved_before = self.records_moved
        live = self.segment_live()
        for seq in victims:
            if live.get(seq, 0) == 0:
                continue  # nothing live: deleted without being read
            fd = self._fds[seq]
            size = self._sizes[seq]
            offset = 0
            need = 0
            while offset < size:
                data = os.pread(fd, min(max(COMPACTION_STEP_BYTES, need), size - offset), offset)
                consumed = 0
                entries = enumerate(scan_entries(data), 1)
                for examined, (at, esize, op, partition, key, packed) in entries:
                    consumed = at + esize
                    if op == OP_PUT:
                        self._move_if_live(seq, offset, at, esize, partition, key, packed, data)
                    if examined % COMPACTION_STEP_ENTRIES == 0:
                        self._step_commit()
                        yield
                if consumed == 0:
                    # Not one whole entry: either one larger than a step, or damage.
                    if len(data) >= ENTRY.size:
                        length = ENTRY.unpack_from(data)[0]
                        whole = ENTRY.size + length
                        if whole > len(data) and length <= MAX_ENTRY and offset + whole <= size:
                            need = whole
                            continue
                    raise CorruptLog(
                        f"{self._path(seq)}: unreadable entry at offset {offset}; the segment "
                        "is kept and so are the records it holds"
                    )
                need = 0
                offset += consumed
                self._step_commit()
                yield
        self._before_victims_deleted()
        self.commit()
        # The copies must be on disk before the originals go (not the originals).
        self._sync_data(skip=victims)
        self._sync_index()
        self._unsynced = False
        yield
        deleted = []
        for seq in victims:  # oldest first, so a replay of what is left stays exact
            live = self.segment_live()
            if live.get(seq, 0):
                log.error(
                    "compaction left {bytes} live bytes in {segment}; it and the newer "
                    "victims are kept",
                    bytes=live[seq],
                    segment=segment_name(seq),
                )
                reclaimed -= sum(self._sizes[s] for s in victims[victims.index(seq) :])
                break
            os.unlink(self._path(seq))
            os.close(self._fds.pop(seq))
            del self._sizes[seq]
            if seq in self._unsynced_sealed:
                self._unsynced_sealed.remove(seq)
            for per_partition in self._live.values():
                per_partition.pop(seq, None)
            self._forget_segment(seq)
            deleted.append(seq)
            yield  # one unlink a step: freeing a big file takes a few milliseconds
        fsync_dir(self.directory)
        self.compactions += 1
        self.compacted_bytes += reclaimed
        log.info(
            "compaction deleted {count} segments ({bytes} bytes); {moved} live records moved",
            count=len(deleted),
            bytes=reclaimed,
            moved=self.records_moved - moved_before,
        )

    def _step_commit(self) -> None:
        """End of a compaction step: commit, and sync what was moved a step at a time.

        Syncing as it goes keeps the sync before the victims are deleted
        short, and spares ``everysec`` one large sync a second.
        """
        self.commit()
        if self.fsync != "always" and (self._unsynced or self._unsynced_sealed):
            self._sync_data(skip=self._victims)  # victims are about to go: not worth it

    def _move_if_live(
        self,
        seq: int,
        base: int,
        at: int,
        size: int,
        partition: bytes,
        key: bytes,
        packed: bytes,
        data: bytes,
    ) -> None:
        """Copy the entry at ``data[at:]`` (offset ``base + at`` of segment ``seq``) if live.

        Live means the index still points at this very entry; then it is
        appended verbatim (its checksum still holds) to the active segment
        and the index moved to the copy.
        """
        bits = packed[_BITS]
        tomb = bits & TOMBSTONE
        if self._get_loc(partition, key) != make_loc(seq, base + at, size, tomb):
            return
        new_offset = self._written + len(self._buf)
        self._buf += data[at : at + size]
        self._set_loc(partition, key, make_loc(self._active, new_offset, size, tomb))
        live = self._live[partition]
        live[seq] -= size
        live[self._active] = live.get(self._active, 0) + size
        self._dirty.add(partition)
        self._note_put(partition, key, new_offset, size, _unpack_header(packed)[0], bits)
        self.records_moved += 1

    # Lifecycle ----------------------------------------------------------------------

    def _stop_compaction(self) -> None:
        if self._compaction_call is not None and self._compaction_call.active():
            self._compaction_call.cancel()
        self._compaction_call = None
        self._compaction = None
        self._victims = []

    def disk_bytes(self) -> int:
        return sum(self._sizes.values())

    def stats(self) -> dict[str, Any]:
        dead, total = self.garbage()
        return {
            "segments": len(self._sizes),
            "active_segment": self._active,
            "disk_bytes": self.disk_bytes(),
            "garbage_bytes": dead,
            "sealed_bytes": total,
            "compacting": int(self.compacting),
            "compactions": self.compactions,
            "compaction_failures": self.compaction_failures,
            "compacted_bytes": self.compacted_bytes,
            "records_moved": self.records_moved,
            "torn_bytes_dropped": self.torn_bytes_dropped,
            "corrupt_reads": self.corrupt_reads,
        }
