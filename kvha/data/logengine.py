"""The ``log`` engine: records in memory, every change in a transaction log.

This is okuyama's default storage: a dict for reads and an append-only log
for durability.  Files under the node's state directory::

    segment-000000000007.log    log entries, oldest to newest by number
    snapshot-000000000007.snap  every record as of the start of segment 7

Each entry is ``u32 length, u32 crc32, payload`` and its payload is a whole
record write, a removal or a partition drop, so replay is idempotent.  A
snapshot is taken in small steps between requests: the log is first rotated
to a new segment, then the key set is copied and the current record of each
key written out.  Records that change meanwhile are also in the new segment,
and replaying it over the snapshot gives the exact state (a "fuzzy snapshot
plus redo log").  Once the snapshot is renamed into place, older segments and
snapshots are deleted, so the log never grows without bound.

Writes are buffered until :meth:`LogEngine.commit`, which the server calls
once per reactor turn before it sends any reply: one ``write`` and, with
``fsync: always``, one ``fdatasync`` for every reply in that turn.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from collections.abc import Iterator
from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kvha.data.engine import MemoryEngine
from kvha.record import HEADER

log = Logger()

ENTRY = struct.Struct("<II")  # payload length, crc32 of payload
PAYLOAD = struct.Struct("<BHI")  # op, partition length, key length
END = struct.Struct("<QQ")  # record count, high-water version

OP_PUT = 1
OP_REMOVE = 2
OP_DROP = 3
OP_END = 4  # last entry of a complete snapshot

SNAPSHOT_MAGIC = b"KVHASNAP1\n"
SEGMENT_RE = re.compile(r"^segment-(\d{12})\.log$")
SNAPSHOT_RE = re.compile(r"^snapshot-(\d{12})\.snap$")

FSYNC_POLICIES = ("always", "everysec", "os")


def check_fsync(fsync: str) -> None:
    """Refuse an unknown fsync policy (every durable engine takes the same three)."""
    if fsync not in FSYNC_POLICIES:
        raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}; got {fsync!r}")


#: Records written per snapshot step: small enough that a step takes a few
#: milliseconds, so requests keep being served while a snapshot runs.
SNAPSHOT_STEP = 2000

#: Largest entry replay will accept; anything larger is corruption.
MAX_ENTRY = 1 << 31


class CorruptLog(Exception):
    """A log or snapshot that cannot be read back."""


def encode_entry(op: int, partition: bytes, key: bytes, packed: bytes = b"") -> bytes:
    payload = PAYLOAD.pack(op, len(partition), len(key)) + partition + key + packed
    return ENTRY.pack(len(payload), zlib.crc32(payload)) + payload


def scan_entries(
    data: bytes, start: int = 0
) -> Iterator[tuple[int, int, int, bytes, bytes, bytes]]:
    """Yield ``(offset, size, op, partition, key, rest)`` for each whole entry in ``data``.

    ``size`` counts the entry's header too, so the next entry starts at
    ``offset + size``.  The walk stops at the first short or corrupt entry:
    what follows it cannot be trusted.  The caller finds where it stopped from
    the last entry yielded (``start`` when none was).
    """
    offset = start
    end = len(data)
    view = memoryview(data)
    while offset < end:
        if end - offset < ENTRY.size:
            return
        length, crc = ENTRY.unpack_from(data, offset)
        body_start = offset + ENTRY.size
        if length < PAYLOAD.size or length > MAX_ENTRY or body_start + length > end:
            return
        payload = view[body_start : body_start + length]
        if zlib.crc32(payload) != crc:
            return
        op, plen, klen = PAYLOAD.unpack_from(payload)
        body = PAYLOAD.size
        if body + plen + klen > length or op not in (OP_PUT, OP_REMOVE, OP_DROP, OP_END):
            return
        partition = bytes(payload[body : body + plen])
        key = bytes(payload[body + plen : body + plen + klen])
        rest = bytes(payload[body + plen + klen :])
        if op == OP_PUT and len(rest) < HEADER.size:
            return
        yield offset, ENTRY.size + length, op, partition, key, rest
        offset = body_start + length


def decode_entries(data: bytes) -> tuple[list[tuple[int, bytes, bytes, bytes]], int]:
    """Parse entries from ``data``; return them and the offset of the first bad byte.

    The offset equals ``len(data)`` when every entry is whole and its checksum
    matches.  A short or corrupt entry ends the parse: what follows it cannot
    be trusted.
    """
    entries = []
    offset = 0
    for at, size, op, partition, key, rest in scan_entries(data):
        entries.append((op, partition, key, rest))
        offset = at + size
    return entries, offset


def drop_torn_tail(
    path: str, offset: int, size: int, good_entries: int, last: bool, logger: Logger = log
) -> int:
    """Truncate ``path`` to ``offset``, the end of its last whole entry; log what went.

    A crash in the middle of an append leaves a partial last entry (a torn
    tail); damage elsewhere leaves a bad checksum.  Either way the entries
    before it are kept and the rest is dropped, logged, and never replayed.
    Returns the number of bytes dropped.
    """
    dropped = size - offset
    logger.warn(
        "dropped a torn or corrupt tail of {dropped} bytes from {path} at offset "
        "{offset} ({entries} good entries kept; last segment: {last})",
        dropped=dropped,
        path=path,
        offset=offset,
        entries=good_entries,
        last=last,
    )
    with open(path, "r+b") as f:
        f.truncate(offset)
        f.flush()
        os.fsync(f.fileno())
    return dropped


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LogEngine(MemoryEngine):
    """Memory plus a transaction log with periodic snapshots."""

    name = "log"
    durable = True
    needs_commit = True

    def __init__(
        self,
        directory: str,
        clock: IReactorTime,
        fsync: str = "everysec",
        segment_bytes: int = 16 << 20,
        snapshot_interval: float = 300.0,
        snapshot_log_bytes: int = 64 << 20,
    ) -> None:
        super().__init__()
        check_fsync(fsync)
        self.directory = directory
        self._clock = clock
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.snapshot_interval = snapshot_interval
        self.snapshot_log_bytes = snapshot_log_bytes
        self._pending: list[bytes] = []
        self._fd = -1
        self._segment = 0
        self._segment_size = 0
        self._log_bytes = 0  # bytes logged since the last complete snapshot
        self._unsynced = False
        self._last_sync = 0.0
        self._last_snapshot = 0.0
        self._durable_high = 0
        self._snapshot: Optional[Any] = None  # the running snapshot's step generator
        self.snapshots_taken = 0
        self.torn_bytes_dropped = 0

    # Opening and replay ---------------------------------------------------

    def _files(self, pattern: re.Pattern[str]) -> list[tuple[int, str]]:
        found = []
        for name in os.listdir(self.directory):
            m = pattern.match(name)
            if m:
                found.append((int(m.group(1)), os.path.join(self.directory, name)))
        return sorted(found)

    def open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):
            if name.endswith(".tmp"):  # a snapshot interrupted by a crash
                os.unlink(os.path.join(self.directory, name))
        start_seq = 0
        high = 0
        for seq, path in reversed(self._files(SNAPSHOT_RE)):
            try:
                high = self._load_snapshot(path)
            except CorruptLog as e:
                log.error("unusable snapshot {path}: {why}; trying an older one", path=path, why=e)
                self.clear()
                continue
            start_seq = seq
            break
        segments = [(s, p) for s, p in self._files(SEGMENT_RE) if s >= start_seq]
        if start_seq == 0 and segments and segments[0][0] > 1:
            # No usable snapshot, and the segments before the first one left
            # were deleted after a snapshot that is now unreadable: replaying
            # what is left would serve a partial, older state as if complete.
            raise CorruptLog(
                f"{self.directory}: no usable snapshot and log segments before "
                f"{segments[0][0]} were removed, so the stored state cannot be "
                "rebuilt; move the directory away to start this node empty "
                "(its replicas hold the data)"
            )
        for i, (_seq, path) in enumerate(segments):
            self._replay_segment(path, last=i == len(segments) - 1)
        # What the log holds beyond the snapshot counts toward the next one, or
        # a node restarted more often than it fills snapshot_log_bytes never
        # takes a snapshot and its log grows without bound.
        self._log_bytes = sum(os.path.getsize(path) for _seq, path in segments)
        self._durable_high = max(high, self.max_version)
        self._high_water = self._durable_high
        now = self._clock.seconds()
        self._last_snapshot = self._last_sync = now
        self._open_segment((segments[-1][0] if segments else start_seq) + 1)

    def _load_snapshot(self, path: str) -> int:
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(SNAPSHOT_MAGIC):
            raise CorruptLog("bad magic")
        entries, offset = decode_entries(data[len(SNAPSHOT_MAGIC) :])
        if not entries or entries[-1][0] != OP_END:
            raise CorruptLog(f"incomplete (no end marker; {len(entries)} entries read)")
        count, high = END.unpack(entries[-1][3][: END.size])
        if count != len(entries) - 1:
            raise CorruptLog(f"end marker counts {count} records, found {len(entries) - 1}")
        put = MemoryEngine.put
        for _op, partition, key, packed in entries[:-1]:
            put(self, partition, key, packed)
        return int(high)

    def _replay_segment(self, path: str, last: bool) -> None:
        with open(path, "rb") as f:
            data = f.read()
        entries, offset = decode_entries(data)
        for op, partition, key, packed in entries:
            if op == OP_PUT:
                MemoryEngine.put(self, partition, key, packed)
            elif op == OP_REMOVE:
                MemoryEngine.remove(self, partition, key)
            elif op == OP_DROP:
                MemoryEngine.drop_partition(self, partition)
        if offset < len(data):
            self.torn_bytes_dropped += drop_torn_tail(path, offset, len(data), len(entries), last)

    def _open_segment(self, seq: int) -> None:
        path = os.path.join(self.directory, f"segment-{seq:012d}.log")
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._segment = seq
        self._segment_size = os.fstat(self._fd).st_size
        fsync_dir(self.directory)

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        self._open_segment(self._segment + 1)

    # Writes -----------------------------------------------------------------

    def put(self, partition: bytes, key: bytes, packed: bytes) -> None:
        super().put(partition, key, packed)
        self._pending.append(encode_entry(OP_PUT, partition, key, packed))

    def remove(self, partition: bytes, key: bytes) -> None:
        if self.get(partition, key) is None:
            return
        super().remove(partition, key)
        self._pending.append(encode_entry(OP_REMOVE, partition, key))

    def drop_partition(self, partition: bytes) -> int:
        n = super().drop_partition(partition)
        self._pending.append(encode_entry(OP_DROP, partition, b""))
        return n

    def commit(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._segment_size += len(data)
        self._log_bytes += len(data)
        if self.fsync == "always":
            os.fdatasync(self._fd)
        else:
            self._unsynced = True
        self._durable_high = self.max_version
        if self._segment_size >= self.segment_bytes and self._snapshot is None:
            self._rotate()

    @property
    def high_water(self) -> int:
        return self._durable_high

    # Maintenance: timed fsync and snapshots --------------------------------

    def maintenance(self, now: float) -> None:
        if self._unsynced and self.fsync == "everysec" and now - self._last_sync >= 1.0:
            os.fdatasync(self._fd)
            self._unsynced = False
            self._last_sync = now
        if self._snapshot is None and self._log_bytes > 0:
            due = now - self._last_snapshot >= self.snapshot_interval
            if due or self._log_bytes >= self.snapshot_log_bytes:
                self.start_snapshot()

    def start_snapshot(self) -> None:
        """Begin a snapshot that runs in small steps between requests."""
        if self._snapshot is not None:
            return
        self._snapshot = self._snapshot_steps()
        self._clock.callLater(0, self._snapshot_step)

    def _snapshot_step(self) -> None:
        if self._snapshot is None:
            return
        try:
            next(self._snapshot)
        except StopIteration:
            self._snapshot = None
            return
        except Exception:
            log.failure("snapshot failed; the log is kept and the next one will retry")
            self._snapshot = None
            return
        self._clock.callLater(0, self._snapshot_step)

    def snapshot_now(self) -> None:
        """Take a whole snapshot at once (tests and shutdown tools)."""
        if self._snapshot is None:
            self._snapshot = self._snapshot_steps()
        for _ in self._snapshot:
            pass
        self._snapshot = None

    def _snapshot_steps(self):  # type: ignore[no-untyped-def]
        self.commit()
        self._rotate()
        seq = self._segment
        logged_before = self._log_bytes
        high = self.max_version
        tmp = os.path.join(self.directory, f"snapshot-{seq:012d}.tmp")
        final = os.path.join(self.directory, f"snapshot-{seq:012d}.snap")
        plan = [(p, self.keys(p)) for p in self.partitions()]
        count = 0
        with open(tmp, "wb") as f:
            f.write(SNAPSHOT_MAGIC)
            chunk: list[bytes] = []
            for partition, keys in plan:
                for key in keys:
                    packed = self.get(partition, key)
                    if packed is None:
                        continue
                    chunk.append(encode_entry(OP_PUT, partition, key, packed))
                    count += 1
                    if len(chunk) >= SNAPSHOT_STEP:
                        f.write(b"".join(chunk))
                        chunk = []
                        yield
            chunk.append(encode_entry(OP_END, b"", b"", END.pack(count, high)))
            f.write(b"".join(chunk))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.directory)
        for old_seq, path in self._files(SEGMENT_RE):
            if old_seq < seq:
                os.unlink(path)
        for old_seq, path in self._files(SNAPSHOT_RE):
            if old_seq < seq:
                os.unlink(path)
        # Bytes logged while the snapshot ran are not covered by it.
        self._log_bytes -= logged_before
        self._last_snapshot = self._clock.seconds()
        self.snapshots_taken += 1
        log.info(
            "snapshot {seq} written: {count} records; older log segments removed",
            seq=seq,
            count=count,
        )

    def close(self) -> None:
        if self._fd < 0:
            return
        self.commit()
        self._snapshot = None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1

    def disk_bytes(self) -> int:
        total = 0
        for _seq, path in self._files(SEGMENT_RE) + self._files(SNAPSHOT_RE):
            total += os.path.getsize(path)
        return total

    def stats(self) -> dict[str, int]:
        return {
            "log_segment": self._segment,
            "log_bytes_since_snapshot": self._log_bytes,
            "snapshots_taken": self.snapshots_taken,
            "disk_bytes": self.disk_bytes(),
            "torn_bytes_dropped": self.torn_bytes_dropped,
        }
