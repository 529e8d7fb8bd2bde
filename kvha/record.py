"""The record: what the cluster stores under ``(partition, key)`` (DESIGN §3).

In memory a record is one packed ``bytes`` object: a 21-byte header
(version, expiry, flags, tombstone bit) followed by the value.  One object per
record instead of a tuple of five keeps the per-record overhead close to
memcached's item header, which is what lets a ``memory`` data node stay
within 2x of memcached's resident memory.  ``Record`` is the unpacked,
read-only view handed to callers.
"""

from __future__ import annotations

import struct
from typing import Optional

#: version u64, expiry (absolute unix milliseconds, 0 = never) u64, flags u32, bits u8
HEADER = struct.Struct("<QQIB")
HEADER_SIZE = HEADER.size
TOMBSTONE = 0x01

_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack

#: memcached treats an exptime above 30 days as an absolute unix time.
RELATIVE_EXPTIME_LIMIT = 60 * 60 * 24 * 30


class Record:
    """One stored record, tombstones included."""

    __slots__ = ("version", "expires_ms", "flags", "tombstone", "value")

    def __init__(
        self,
        value: bytes,
        version: int = 0,
        flags: int = 0,
        expires_ms: int = 0,
        tombstone: bool = False,
    ) -> None:
        self.value = value
        self.version = version
        self.flags = flags
        self.expires_ms = expires_ms
        self.tombstone = tombstone

    def pack(self) -> bytes:
        return pack(self.value, self.version, self.flags, self.expires_ms, self.tombstone)

    def expired(self, now_ms: int) -> bool:
        return self.expires_ms != 0 and self.expires_ms <= now_ms

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return (
            self.value == other.value
            and self.version == other.version
            and self.flags == other.flags
            and self.expires_ms == other.expires_ms
            and self.tombstone == other.tombstone
        )

    def __repr__(self) -> str:
        kind = "Tombstone" if self.tombstone else "Record"
        return (
            f"{kind}(value={self.value[:32]!r}, version={self.version}, "
            f"flags={self.flags}, expires_ms={self.expires_ms})"
        )


def pack(
    value: bytes, version: int, flags: int = 0, expires_ms: int = 0, tombstone: bool = False
) -> bytes:
    """Pack a record into its in-memory and on-disk form."""
    return _pack_header(version, expires_ms, flags, TOMBSTONE if tombstone else 0) + value


def unpack(packed: bytes) -> Record:
    version, expires_ms, flags, bits = _unpack_header(packed)
    return Record(packed[HEADER_SIZE:], version, flags, expires_ms, bool(bits & TOMBSTONE))


def packed_version(packed: bytes) -> int:
    """The version of a packed record without unpacking the value."""
    return _unpack_header(packed)[0]


def packed_meta(packed: bytes) -> tuple[int, int, int, int]:
    """``(version, expires_ms, flags, bits)`` of a packed record."""
    return _unpack_header(packed)


def tombstone(version: int) -> bytes:
    """A packed tombstone carrying ``version``."""
    return _pack_header(version, 0, 0, TOMBSTONE)


def absolute_expiry_ms(exptime: int, now: float) -> int:
    """Convert a memcached ``exptime`` to absolute unix milliseconds.

    memcached's rules: 0 never expires; up to 30 days is relative to now; a
    larger value is an absolute unix time; a negative value is already
    expired (returned as 1, a time long past).
    """
    if exptime == 0:
        return 0
    if exptime < 0:
        return 1
    if exptime <= RELATIVE_EXPTIME_LIMIT:
        return int(now * 1000) + exptime * 1000
    return exptime * 1000


def optional_record(packed: Optional[bytes]) -> Optional[Record]:
    return None if packed is None else unpack(packed)
