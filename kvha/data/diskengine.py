"""The ``disk`` engine: keys in memory, values on disk (bitcask style).

okuyama's "Key=memory, Value=disk" storage: a dict in memory maps every key
to where its value lies in append-only segment files, so a read is one dict
lookup and one ``pread``, and memory holds only keys and locations (an
``int`` each; see :mod:`kvha.data.segments`).  Files under the node's state
directory::

    data-000000000007.seg   record entries, removals and partition drops, in order
    data-000000000007.hint  where each entry of segment 7 is, without its value

Every change is appended to the active segment, so replaying the segments
oldest to newest rebuilds the key directory exactly.  A *hint file* lists a
sealed segment's entries with their offsets, sizes, versions and tombstone
bits but without values, so a restart reads hints instead of every value:
the active segment's hint is written as it grows (``.hint.tmp``) and renamed
into place when the segment is sealed.  A hint is checked whole (checksums,
counts, the size of its segment) before it is used, so one lost or cut short
by a crash is simply ignored and its segment read instead.  After a crash
only the last segment, which has no hint yet, is read in full, and a torn
tail there (a crash mid-append) is dropped and logged.

Compaction (see :mod:`kvha.data.segments`) takes the oldest sealed segments
as victims, as many as carry ``compaction_garbage_ratio`` of garbage
between them.  Oldest first matters here: a removal recorded in a victim is
dropped with it, which is only safe once every older segment, where the
removed value may be, is gone too.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kvha.data.logengine import (
    END,
    ENTRY,
    OP_DROP,
    OP_END,
    OP_PUT,
    OP_REMOVE,
    drop_torn_tail,
    encode_entry,
    fsync_dir,
    scan_entries,
)
from kvha.data.segments import (
    ENTRY_OVERHEAD,
    SEQ_SHIFT,
    SegmentEngine,
    segment_name,
    split_loc,
)
from kvha.record import HEADER, HEADER_SIZE, TOMBSTONE

log = Logger()

HINT_MAGIC = b"KVHAHINT1\n"
#: One change in a hint block: op, partition length, key length, and for a put
#: the entry's offset and size in the segment, the record's version and bits byte.
HINT_REC = struct.Struct("<BHIQIQB")
#: The end block of a complete hint: changes listed, high-water version, and the
#: size of the segment it describes (a hint for another size is stale).
HINT_END = struct.Struct("<QQQ")
_COUNT = struct.Struct("<I")
BLOCK_CHANGES = 1
BLOCK_END = 2

_BITS = HEADER_SIZE - 1
_unpack_header = HEADER.unpack_from
_pack_rec = HINT_REC.pack
_SIZE_MASK = (1 << 32) - 1


class HintBuilder:
    """Gathers a segment's changes and cuts them into checksummed hint blocks.

    A block is ``u32 length, u32 crc32, payload`` (the entry framing of the
    segments); a payload of changes is ``1, u32 count``, then ``count``
    fixed-size :data:`HINT_REC` structs, then every partition and key one
    after the other, so a restart unpacks a block with one ``iter_unpack``.
    """

    __slots__ = ("recs", "blob", "pending", "count", "high")

    def __init__(self) -> None:
        self.recs = bytearray()
        self.blob = bytearray()
        self.pending = 0
        self.count = 0
        self.high = 0

    def add(
        self,
        op: int,
        partition: bytes,
        key: bytes,
        offset: int = 0,
        size: int = 0,
        version: int = 0,
        bits: int = 0,
    ) -> None:
        self.recs += _pack_rec(op, len(partition), len(key), offset, size, version, bits)
        self.blob += partition
        self.blob += key
        self.pending += 1
        self.count += 1
        if version > self.high:
            self.high = version

    def block(self) -> bytes:
        """The changes added since the last block, framed (empty if none)."""
        if not self.pending:
            return b""
        payload = bytes((BLOCK_CHANGES,)) + _COUNT.pack(self.pending) + self.recs + self.blob
        self.recs = bytearray()
        self.blob = bytearray()
        self.pending = 0
        return _frame(payload)

    def end(self, segment_size: int) -> bytes:
        """The last block: what a reader checks the whole hint against."""
        payload = bytes((BLOCK_END,)) + HINT_END.pack(self.count, self.high, segment_size)
        return self.block() + _frame(payload)


def _frame(payload: bytes) -> bytes:
    return ENTRY.pack(len(payload), zlib.crc32(payload)) + payload


def parse_hint(data: bytes) -> tuple[list[tuple[bytes, bytes]], int, int]:
    """Check a whole hint file; return its ``(records, names)`` blocks, high water, size.

    Raises ValueError saying why a hint cannot be used.  Nothing is applied
    before the whole file has been checked.
    """
    if not data.startswith(HINT_MAGIC):
        raise ValueError("bad magic")
    view = memoryview(data)
    pos = len(HINT_MAGIC)
    blocks = []
    total = 0
    while pos + ENTRY.size <= len(data):
        length, crc = ENTRY.unpack_from(data, pos)
        start = pos + ENTRY.size
        end = start + length
        if length < 1 or end > len(data):
            raise ValueError(f"block at {pos} cut short")
        payload = view[start:end]
        if zlib.crc32(payload) != crc:
            raise ValueError(f"checksum mismatch in the block at {pos}")
        if payload[0] == BLOCK_CHANGES:
            (n,) = _COUNT.unpack_from(payload, 1)
            fixed = 1 + _COUNT.size + n * HINT_REC.size
            if fixed > length:
                raise ValueError(f"block at {pos} lists more changes than it holds")
            blocks.append((bytes(payload[1 + _COUNT.size : fixed]), bytes(payload[fixed:])))
            total += n
        elif payload[0] == BLOCK_END and length == 1 + HINT_END.size:
            count, high, size = HINT_END.unpack_from(payload, 1)
            if end != len(data) or count != total:
                raise ValueError(f"end block counts {count} changes, found {total}")
            return blocks, int(high), int(size)
        else:
            raise ValueError(f"unknown block at {pos}")
        pos = end
    raise ValueError("no end block (incomplete)")


def hint_name(seq: int) -> str:
    return f"data-{seq:012d}.hint"


class DiskEngine(SegmentEngine):
    """Keys in a dict, values in append-only segments, hint files for fast restarts."""

    name = "disk"

    def __init__(
        self,
        directory: str,
        clock: IReactorTime,
        fsync: str = "everysec",
        segment_bytes: int = 16 << 20,
        compaction_garbage_ratio: float = 0.5,
        compaction_min_bytes: int = 64 << 20,
    ) -> None:
        super().__init__(
            directory,
            clock,
            fsync=fsync,
            segment_bytes=segment_bytes,
            compaction_garbage_ratio=compaction_garbage_ratio,
            compaction_min_bytes=compaction_min_bytes,
        )
        self._keydir: dict[bytes, dict[bytes, int]] = {}
        self._hint_fd = -1
        self._hint = HintBuilder()
        self.hints_loaded = 0
        self.segments_scanned = 0

    # The index: a dict per partition ----------------------------------------------

    def get(self, partition: bytes, key: bytes) -> Optional[bytes]:
        part = self._keydir.get(partition)
        if part is None:
            return None
        loc = part.get(key)
        if loc is None:
            return None
        return self._read(partition, key, loc)

    def _get_loc(self, partition: bytes, key: bytes) -> Optional[int]:
        part = self._keydir.get(partition)
        return None if part is None else part.get(key)

    def _set_loc(self, partition: bytes, key: bytes, loc: int) -> Optional[int]:
        part = self._keydir.get(partition)
        if part is None:
            part = self._keydir[partition] = {}
        old = part.get(key)
        part[key] = loc
        return old

    def _pop_loc(self, partition: bytes, key: bytes) -> Optional[int]:
        part = self._keydir.get(partition)
        if part is None:
            return None
        old = part.pop(key, None)
        if not part:
            del self._keydir[partition]
        return old

    def _drop_locs(self, partition: bytes) -> None:
        self._keydir.pop(partition, None)

    def keys(self, partition: bytes) -> list[bytes]:
        part = self._keydir.get(partition)
        return [] if part is None else list(part)

    # What the replay and the hints need ----------------------------------------------

    def _note_put(
        self, partition: bytes, key: bytes, offset: int, size: int, version: int, bits: int
    ) -> None:
        self._hint.add(OP_PUT, partition, key, offset, size, version, bits)

    def _note_remove(self, partition: bytes, key: bytes) -> None:
        self._buf += encode_entry(OP_REMOVE, partition, key)
        self._hint.add(OP_REMOVE, partition, key)

    def _note_drop(self, partition: bytes) -> None:
        self._buf += encode_entry(OP_DROP, partition, b"")
        self._hint.add(OP_DROP, partition, b"")

    def _before_victims_deleted(self) -> None:
        # The victims may hold the only trace of the highest version (a record
        # since removed): the active segment records it before they go.
        high = max(self._max_version, self._durable_high)
        self._buf += encode_entry(OP_END, b"", b"", END.pack(0, high))
        self._hint.high = max(self._hint.high, high)

    def _after_write(self) -> None:
        block = self._hint.block()
        if block:
            _write_all(self._hint_fd, block)

    def _opened_active(self, seq: int) -> None:
        path = os.path.join(self.directory, hint_name(seq) + ".tmp")
        self._hint_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        _write_all(self._hint_fd, HINT_MAGIC)
        self._hint = HintBuilder()

    def _sealed(self, seq: int) -> None:
        """Complete the sealed segment's hint: end block, sync, rename into place."""
        # Not synced: a hint lost or cut short by a machine crash fails its
        # checks at the next open, and the segment is read instead.
        _write_all(self._hint_fd, self._hint.end(self._sizes[seq]))
        os.close(self._hint_fd)
        self._hint_fd = -1
        tmp = os.path.join(self.directory, hint_name(seq) + ".tmp")
        os.replace(tmp, os.path.join(self.directory, hint_name(seq)))

    def _forget_segment(self, seq: int) -> None:
        try:
            os.unlink(os.path.join(self.directory, hint_name(seq)))
        except FileNotFoundError:
            pass

    def _choose_victims(self, force: bool) -> list[int]:
        """The longest run of oldest sealed segments with enough garbage between them."""
        victims: list[int] = []
        size = dead = 0
        chosen: list[int] = []
        for seq, seg_size, seg_dead in self._segment_garbage():
            victims.append(seq)
            size += seg_size
            dead += seg_dead
            if dead and (force or dead >= self.compaction_garbage_ratio * size):
                chosen = list(victims)
        return chosen

    # Opening: hints, then the segments without one ----------------------------------------

    def open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):
            if name.endswith(".tmp"):  # the hint of the segment that was active
                os.unlink(os.path.join(self.directory, name))
        segments = self._segment_files()
        high = 0
        active: Optional[int] = None
        for i, seq in enumerate(segments):
            last = i == len(segments) - 1
            path = self._path(seq)
            size = os.path.getsize(path)
            hint_high = self._load_hint(seq, size)
            if hint_high is not None:
                high = max(high, hint_high)
                self.hints_loaded += 1
                self._open_sealed(seq)
                continue
            if size == 0 and not last:
                os.unlink(path)
                continue
            hint = self._scan_segment(seq, last)
            high = max(high, hint.high)
            self.segments_scanned += 1
            if last:
                # It was the active segment: carry on appending to it, with its
                # hint rebuilt from what was just read.
                self._open_active(seq)
                self._hint = hint
                self._after_write()
                active = seq
            else:
                self._write_hint(seq, hint)
                self._open_sealed(seq)
        if active is None:
            self._open_active((segments[-1] if segments else 0) + 1)
        self._max_version = self._durable_high = high
        self._dirty.clear()
        self._last_sync = self._clock.seconds()
        self._opened = True

    def _load_hint(self, seq: int, size: int) -> Optional[int]:
        """Apply segment ``seq``'s hint file if it is whole and current; its high water."""
        path = os.path.join(self.directory, hint_name(seq))
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            blocks, high, described = parse_hint(data)
            if described != size:
                raise ValueError(f"it describes {described} bytes and the segment has {size}")
        except ValueError as e:
            log.warn(
                "ignoring unusable hint file {path} ({why}); reading its segment",
                path=path,
                why=str(e),
            )
            return None
        for fixed, names in blocks:
            self._apply_hint_block(seq, fixed, names)
        return high

    def _apply_hint_block(self, seq: int, fixed: bytes, names: bytes) -> None:
        """Replay one hint block into the key directory (the hot loop of a restart)."""
        keydir = self._keydir
        parts = self._parts
        lives = self._live
        base = seq << 40
        pos = 0
        last: Optional[bytes] = None
        part: dict[bytes, int] = {}
        counts: list[int] = []
        live: dict[int, int] = {}
        overhead = 0
        for op, plen, klen, offset, esize, _version, bits in HINT_REC.iter_unpack(fixed):
            partition = names[pos : pos + plen]
            pos += plen
            key = names[pos : pos + klen]
            pos += klen
            if op == OP_PUT:
                if partition != last:
                    found = keydir.get(partition)
                    if found is None:
                        found = keydir[partition] = {}
                        parts[partition] = [0, 0, 0]
                        lives[partition] = {}
                    part = found
                    counts = parts[partition]
                    live = lives[partition]
                    overhead = ENTRY_OVERHEAD + plen
                    last = partition
                tomb = bits & TOMBSTONE
                old = part.get(key)
                part[key] = ((base | offset) << 32 | esize) << 1 | tomb
                if old is None:
                    counts[0] += 1
                    counts[1] += esize - overhead
                    counts[2] += tomb
                else:
                    osize = (old >> 1) & _SIZE_MASK
                    counts[1] += esize - osize
                    counts[2] += tomb - (old & 1)
                    live[old >> SEQ_SHIFT] -= osize
                live[seq] = live.get(seq, 0) + esize
            elif op == OP_REMOVE:
                old = self._pop_loc(partition, key)
                if old is not None:
                    self._account(partition, old, None)
                last = None
            elif op == OP_DROP:
                self._forget_partition(partition)
                last = None

    def _forget_partition(self, partition: bytes) -> None:
        self._keydir.pop(partition, None)
        self._parts.pop(partition, None)
        self._live.pop(partition, None)

    def _scan_segment(self, seq: int, last: bool) -> HintBuilder:
        """Replay a segment that has no hint; drop a torn tail; return its hint."""
        path = self._path(seq)
        with open(path, "rb") as f:
            data = f.read()
        keydir = self._keydir
        account = self._account
        hint = HintBuilder()
        end = 0
        base = seq << 40
        for at, size, op, partition, key, rest in scan_entries(data):
            end = at + size
            if op == OP_PUT:
                version, _expires, _flags, bits = _unpack_header(rest)
                loc = ((base | at) << 32 | size) << 1 | (bits & TOMBSTONE)
                part = keydir.get(partition)
                if part is None:
                    part = keydir[partition] = {}
                old = part.get(key)
                part[key] = loc
                account(partition, old, loc)
                hint.add(OP_PUT, partition, key, at, size, version, bits)
            elif op == OP_REMOVE:
                old = self._pop_loc(partition, key)
                if old is not None:
                    account(partition, old, None)
                hint.add(OP_REMOVE, partition, key)
            elif op == OP_DROP:
                self._forget_partition(partition)
                hint.add(OP_DROP, partition, b"")
            else:  # OP_END: a high-water mark left by compaction
                hint.high = max(hint.high, END.unpack(rest[: END.size])[1])
        if end < len(data):
            self.torn_bytes_dropped += drop_torn_tail(path, end, len(data), hint.count, last, log)
        return hint

    def _write_hint(self, seq: int, hint: HintBuilder) -> None:
        """Write a complete hint for a sealed segment that lacked one."""
        path = os.path.join(self.directory, hint_name(seq))
        size = os.path.getsize(self._path(seq))
        with open(path + ".tmp", "wb") as f:
            f.write(HINT_MAGIC)
            f.write(hint.end(size))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        fsync_dir(self.directory)

    def close(self) -> None:
        """Commit, then seal the active segment so that the next open reads only hints."""
        if not self._opened:
            return
        self._stop_compaction()
        self.commit()
        if self._written:
            self._rotate()
        self._sync_data()
        os.close(self._hint_fd)
        self._hint_fd = -1
        self._close_files()
        self._opened = False

    def stats(self) -> dict[str, int]:
        out = super().stats()
        out["hints_loaded"] = self.hints_loaded
        out["segments_scanned"] = self.segments_scanned
        return out

    def segment_of(self, partition: bytes, key: bytes) -> Optional[str]:
        """The segment file holding a key's record (tests, debugging)."""
        loc = self._get_loc(partition, key)
        return None if loc is None else segment_name(split_loc(loc)[0])


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    try:
        while view:
            written = os.write(fd, view)
            view = view[written:]
    finally:
        view.release()
