"""The internal protocol between masters and data nodes: framing and messages.

Why binary and not RESP: every request carries binary fields (packed records
with their 21-byte header, 64-bit versions and token ranges) that RESP would
have to turn into decimal text and back, and a fixed header lets the reader
match a reply to its request by id without parsing the body.  Frames are::

    u32 length   bytes that follow: 1 + 4 + len(body)
    u8  opcode   which message
    u32 id       request id; a reply carries the id of its request
    body         the message's fields, in order

All integers are little-endian.  Field encodings: ``u8/u16/u32/u64``;
``bytes`` (u32 length + data); ``str`` (u16 length + UTF-8); ``list``
(u32 count + ``bytes`` each); ``u64s`` (u32 count + u64 each); ``ranges``
(u32 count + u64 lo, u64 hi each); ``records`` (u32 count + u16, u32, u32
lengths + partition, key, packed).

A connection starts with the server's CHALLENGE (protocol version, node id,
random nonce).  The client answers HELLO with an HMAC-SHA256 of the nonce
under the cluster secret; the server answers WELCOME with its own proof, so
each side knows the other holds the secret and the secret never crosses the
wire.  Nothing else is accepted before that.

Each message is one class with an ``OPCODE`` and a ``FIELDS`` table, in the
manner of Synapse's replication commands; :data:`MESSAGES` maps opcodes to
classes.  Decoding a frame either yields a whole message or raises
:class:`WireError`: nothing is ever half-parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any, ClassVar, Final, TypeVar

from mypy_extensions import mypyc_attr

PROTOCOL_VERSION = 1

FRAME = struct.Struct("<IBI")
FRAME_SIZE: Final = 9  # Final: compiled code reads it as a constant
_FRAME_BODY: Final = 5  # opcode + id, counted by the length field
assert FRAME.size == FRAME_SIZE

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_pack_u32: Final = _U32.pack  # bound once: compiled code calls it without a method look-up
_U64 = struct.Struct("<Q")
_RANGE = struct.Struct("<QQ")
_REC = struct.Struct("<HII")

DEFAULT_MAX_FRAME = 32 << 20


class WireError(Exception):
    """A frame or message that cannot be decoded."""


class FrameTooLarge(WireError):
    pass


# Field codecs ------------------------------------------------------------


def _enc(kind: str, value: Any, out: list[bytes]) -> None:
    if kind == "bytes":
        out.append(_U32.pack(len(value)))
        out.append(value)
    elif kind == "u64":
        out.append(_U64.pack(value))
    elif kind == "u8":
        out.append(_U8.pack(value))
    elif kind == "u32":
        out.append(_U32.pack(value))
    elif kind == "u16":
        out.append(_U16.pack(value))
    elif kind == "str":
        data = value.encode("utf-8")
        out.append(_U16.pack(len(data)))
        out.append(data)
    elif kind == "list":
        out.append(_U32.pack(len(value)))
        for item in value:
            out.append(_U32.pack(len(item)))
            out.append(item)
    elif kind == "u64s":
        out.append(_U32.pack(len(value)))
        out.append(struct.pack(f"<{len(value)}Q", *value))
    elif kind == "ranges":
        out.append(_U32.pack(len(value)))
        for lo, hi in value:
            out.append(_RANGE.pack(lo, hi))
    elif kind == "records":
        out.append(_U32.pack(len(value)))
        for partition, key, packed in value:
            out.append(_REC.pack(len(partition), len(key), len(packed)))
            out.append(partition)
            out.append(key)
            out.append(packed)
    else:  # pragma: no cover - a typo in a FIELDS table
        raise AssertionError(kind)


def _need(data: bytes, offset: int, n: int) -> int:
    end = offset + n
    if n < 0 or end > len(data):
        raise WireError("message body is truncated")
    return end


def _dec(kind: str, data: bytes, offset: int) -> tuple[Any, int]:
    if kind == "bytes":
        end = _need(data, offset, 4)
        (n,) = _U32.unpack_from(data, offset)
        stop = _need(data, end, n)
        return data[end:stop], stop
    if kind in ("u8", "u16", "u32", "u64"):
        codec = {"u8": _U8, "u16": _U16, "u32": _U32, "u64": _U64}[kind]
        end = _need(data, offset, codec.size)
        return codec.unpack_from(data, offset)[0], end
    if kind == "str":
        end = _need(data, offset, 2)
        (n,) = _U16.unpack_from(data, offset)
        stop = _need(data, end, n)
        try:
            return data[end:stop].decode("utf-8"), stop
        except UnicodeDecodeError:
            raise WireError("string field is not valid UTF-8") from None
    if kind == "list":
        end = _need(data, offset, 4)
        (count,) = _U32.unpack_from(data, offset)
        _need(data, end, count * 4)  # refuse absurd counts before allocating
        items = []
        for _ in range(count):
            item, end = _dec("bytes", data, end)
            items.append(item)
        return items, end
    if kind == "u64s":
        end = _need(data, offset, 4)
        (count,) = _U32.unpack_from(data, offset)
        stop = _need(data, end, count * 8)
        return list(struct.unpack_from(f"<{count}Q", data, end)), stop
    if kind == "ranges":
        end = _need(data, offset, 4)
        (count,) = _U32.unpack_from(data, offset)
        stop = _need(data, end, count * _RANGE.size)
        return [_RANGE.unpack_from(data, end + i * _RANGE.size) for i in range(count)], stop
    if kind == "records":
        end = _need(data, offset, 4)
        (count,) = _U32.unpack_from(data, offset)
        _need(data, end, count * _REC.size)
        records = []
        for _ in range(count):
            start = _need(data, end, _REC.size)
            plen, klen, vlen = _REC.unpack_from(data, end)
            p_end = _need(data, start, plen)
            k_end = _need(data, p_end, klen)
            end = _need(data, k_end, vlen)
            records.append((data[start:p_end], data[p_end:k_end], data[k_end:end]))
        return records, end
    raise AssertionError(kind)  # pragma: no cover


def _bytes_enc(value: bytes, out: list[bytes]) -> None:
    out.append(_U32.pack(len(value)))
    out.append(value)


def u32_at(data: bytes, offset: int) -> int:
    """The little-endian u32 at ``offset``, which the caller has checked is there.

    Byte arithmetic: compiled, no method call, tuple or Struct look-up.
    """
    return data[offset] | data[offset + 1] << 8 | data[offset + 2] << 16 | data[offset + 3] << 24


def _bytes_dec(data: bytes, offset: int) -> tuple[bytes, int]:
    end = offset + 4
    if end > len(data):
        raise WireError("message body is truncated")
    n = u32_at(data, offset)
    stop = end + n
    if stop > len(data):
        raise WireError("message body is truncated")
    return data[end:stop], stop


def _list_enc(value: list[bytes], out: list[bytes]) -> None:
    pack = _U32.pack
    append = out.append
    append(pack(len(value)))
    for item in value:
        append(pack(len(item)))
        append(item)


def _list_dec(data: bytes, offset: int) -> tuple[list[bytes], int]:
    """``list``, unrolled (multi-key requests and replies); same errors as :func:`_dec`."""
    size = len(data)
    end = offset + 4
    if end > size:
        raise WireError("message body is truncated")
    (count,) = _U32.unpack_from(data, offset)
    if end + count * 4 > size:  # refuse absurd counts before allocating
        raise WireError("message body is truncated")
    unpack = _U32.unpack_from
    items: list[bytes] = []
    append = items.append
    for _ in range(count):
        start = end + 4
        if start > size:
            raise WireError("message body is truncated")
        stop = start + unpack(data, end)[0]
        if stop > size:
            raise WireError("message body is truncated")
        append(data[start:stop])
        end = stop
    return items, end


def _fixed_dec(codec: struct.Struct) -> Any:
    size = codec.size
    unpack = codec.unpack_from

    def dec(data: bytes, offset: int) -> tuple[int, int]:
        end = offset + size
        if end > len(data):
            raise WireError("message body is truncated")
        return unpack(data, offset)[0], end

    return dec


def _fixed_enc(codec: struct.Struct) -> Any:
    pack = codec.pack

    def enc(value: int, out: list[bytes]) -> None:
        out.append(pack(value))

    return enc


def _generic_enc(kind: str) -> Any:
    return lambda value, out: _enc(kind, value, out)


def _generic_dec(kind: str) -> Any:
    return lambda data, offset: _dec(kind, data, offset)


#: Per-kind codecs, looked up once per message class instead of once per field.
_ENCODERS: dict[str, Any] = {
    "bytes": _bytes_enc,
    "u8": _fixed_enc(_U8),
    "u16": _fixed_enc(_U16),
    "u32": _fixed_enc(_U32),
    "u64": _fixed_enc(_U64),
}
_DECODERS: dict[str, Any] = {
    "bytes": _bytes_dec,
    "u8": _fixed_dec(_U8),
    "u16": _fixed_dec(_U16),
    "u32": _fixed_dec(_U32),
    "u64": _fixed_dec(_U64),
}
_ENCODERS["list"] = _list_enc
_DECODERS["list"] = _list_dec
for _kind in ("str", "u64s", "ranges", "records"):
    _ENCODERS[_kind] = _generic_enc(_kind)
    _DECODERS[_kind] = _generic_dec(_kind)


# Messages ----------------------------------------------------------------


_M = TypeVar("_M", bound="Message")


@mypyc_attr(native_class=False)  # a plain class when compiled: @message sets its fields
class Message:
    """A message: an opcode and named, typed fields."""

    OPCODE: ClassVar[int] = 0
    FIELDS: ClassVar[tuple[tuple[str, str], ...]] = ()
    _NAMES: ClassVar[tuple[str, ...]] = ()
    _CODECS: ClassVar[tuple[tuple[str, Any, Any], ...]] = ()
    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._NAMES
        if not kwargs and len(args) == len(names):
            for name, value in zip(names, args):
                setattr(self, name, value)
            return
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} fields")
        values = dict(zip(names, args))
        values.update(kwargs)
        for name in names:
            setattr(self, name, values.pop(name))
        if values:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(values)}")

    def body(self) -> bytes:
        out: list[bytes] = []
        for name, enc, _dec in self._CODECS:
            enc(getattr(self, name), out)
        return b"".join(out)

    def frame(self, request_id: int) -> bytes:
        body = self.body()
        return FRAME.pack(len(body) + _FRAME_BODY, self.OPCODE, request_id) + body

    @classmethod
    def decode(cls: type[_M], body: bytes) -> _M:
        offset = 0
        values = []
        for _name, _enc, dec in cls._CODECS:
            value, offset = dec(body, offset)
            values.append(value)
        if offset != len(body):
            raise WireError(f"{len(body) - offset} stray bytes after {cls.__name__}")
        return cls(*values)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, n) == getattr(other, n) for n, _ in self.FIELDS
        )

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n, _ in self.FIELDS)
        return f"{type(self).__name__}({fields})"


MESSAGES: dict[int, type[Message]] = {}


def message(opcode: int, *fields: tuple[str, str]) -> Any:
    """Class decorator: give a message its opcode and fields and register it."""

    def register(cls: type[Message]) -> type[Message]:
        if opcode in MESSAGES:  # pragma: no cover
            raise AssertionError(f"opcode {opcode} used twice")
        cls.OPCODE = opcode
        cls.FIELDS = fields
        cls._NAMES = tuple(name for name, _ in fields)
        cls._CODECS = tuple((name, _ENCODERS[kind], _DECODERS[kind]) for name, kind in fields)
        MESSAGES[opcode] = cls
        return cls

    return register


# Requests: master -> data node.


@message(1, ("version", "u16"), ("node_id", "str"), ("proof", "bytes"))
class Hello(Message):
    version: int
    node_id: str
    proof: bytes
    __slots__ = ("version", "node_id", "proof")


@message(2)
class Ping(Message):
    __slots__ = ()


def _two_bytes_at(data: bytes, start: int, stop: int) -> tuple[bytes, bytes, int]:
    """The two length-prefixed byte strings the body ``data[start:stop]`` starts
    with, and where they end (an offset into ``data``)."""
    if start + 4 > stop:
        raise WireError("message body is truncated")
    mid = start + 4 + u32_at(data, start)
    if mid + 4 > stop:
        raise WireError("message body is truncated")
    end = mid + 4 + u32_at(data, mid)
    if end > stop:
        raise WireError("message body is truncated")
    return data[start + 4 : mid], data[mid + 4 : end], end


def get_fields(data: bytes, start: int, stop: int) -> tuple[bytes, bytes, int]:
    """``(partition, key, tombstones)`` of the Get whose body is ``data[start:stop]``.

    The data node's read hot path decodes the frame in place with this: no
    body copy, no Message.  Raises what :meth:`Get.decode` raises.
    """
    partition, key, end = _two_bytes_at(data, start, stop)
    if end >= stop:
        raise WireError("message body is truncated")
    if end + 1 != stop:
        raise WireError(f"{stop - end - 1} stray bytes after Get")
    return partition, key, data[end]


def apply_fields(data: bytes, start: int, stop: int) -> tuple[bytes, bytes, bytes]:
    """``(partition, key, packed)`` of the Apply whose body is ``data[start:stop]``.

    The write hot path's counterpart of :func:`get_fields`.
    """
    partition, key, end = _two_bytes_at(data, start, stop)
    if end + 4 > stop:
        raise WireError("message body is truncated")
    last = end + 4 + u32_at(data, end)
    if last > stop:
        raise WireError("message body is truncated")
    if last != stop:
        raise WireError(f"{stop - last} stray bytes after Apply")
    return partition, key, data[end + 4 : last]


@message(3, ("partition", "bytes"), ("key", "bytes"), ("tombstones", "u8"))
class Get(Message):
    partition: bytes
    key: bytes
    tombstones: int
    __slots__ = ("partition", "key", "tombstones")

    def __init__(self, partition: bytes, key: bytes, tombstones: int) -> None:
        self.partition = partition
        self.key = key
        self.tombstones = tombstones

    @classmethod
    def decode(cls, body: bytes) -> Get:
        """The generic decode, unrolled (see :func:`get_fields`); same errors."""
        partition, key, tombstones = get_fields(body, 0, len(body))
        return cls(partition, key, tombstones)


_GET_HEAD = struct.Struct("<IBII")
_pack_get_head: Final = _GET_HEAD.pack  # bound once (see _pack_u32)


def get_frame(request_id: int, partition: bytes, key: bytes, tombstones: int) -> bytes:
    """The frame of a Get without building a Message (the read hot path)."""
    size = 4 + len(partition) + 4 + len(key) + 1
    return (
        _pack_get_head(size + _FRAME_BODY, 3, request_id, len(partition))
        + partition
        + _pack_u32(len(key))
        + key
        + (b"\x01" if tombstones else b"\x00")
    )


@message(4, ("partition", "bytes"), ("keys", "list"), ("tombstones", "u8"))
class MultiGet(Message):
    partition: bytes
    keys: list[bytes]
    tombstones: int
    __slots__ = ("partition", "keys", "tombstones")


@message(5, ("partition", "bytes"), ("key", "bytes"), ("packed", "bytes"))
class Apply(Message):
    """Store a versioned record or tombstone if newer (version 0: node issues one)."""

    partition: bytes
    key: bytes
    packed: bytes
    __slots__ = ("partition", "key", "packed")

    def __init__(self, partition: bytes, key: bytes, packed: bytes) -> None:
        self.partition = partition
        self.key = key
        self.packed = packed

    @classmethod
    def decode(cls, body: bytes) -> Apply:
        """The generic decode, unrolled (see :func:`apply_fields`); same errors."""
        partition, key, packed = apply_fields(body, 0, len(body))
        return cls(partition, key, packed)


class _ApplyTail:
    """The last Apply's frame after its partition length, and what it was made of.

    A write goes to every copy with the same partition, key and record
    objects, and only the request id differs: the copies after the first
    reuse this.  Identity is the test, and the objects are held here, so
    they cannot be freed and their addresses reused while cached.
    """

    def __init__(self) -> None:
        self.partition = b""
        self.key = b""
        self.packed = b""
        self.tail = b"\x00" * 8  # the tail of exactly these: two empty lengths


_TAIL: Final = _ApplyTail()
#: Tails up to this size are cached in _TAIL (a larger one costs its copy anyway).
_TAIL_CACHED: Final = 4096


def apply_frame(request_id: int, partition: bytes, key: bytes, packed: bytes) -> bytes:
    """The frame of an Apply without building a Message (the write hot path)."""
    cache = _TAIL
    if packed is cache.packed and key is cache.key and partition is cache.partition:
        tail = cache.tail
    else:
        tail = b"".join((partition, _pack_u32(len(key)), key, _pack_u32(len(packed)), packed))
        if len(tail) <= _TAIL_CACHED:
            cache.partition = partition
            cache.key = key
            cache.packed = packed
            cache.tail = tail
    # The length counts the partition's u32 (in the head), the tail, opcode and id.
    return _pack_get_head(len(tail) + 4 + _FRAME_BODY, 5, request_id, len(partition)) + tail


@message(19, ("partition", "bytes"), ("keys", "list"), ("packed", "list"))
class ApplyMany(Message):
    """Apply for several keys of one partition, in order: one frame, one Results reply.

    A master sends one per data node for a multi-key write (MSET) instead of
    one Apply per key.  ``keys`` and ``packed`` are parallel.
    """

    partition: bytes
    keys: list[bytes]
    packed: list[bytes]
    __slots__ = ("partition", "keys", "packed")


@message(
    6,
    ("mode", "u8"),
    ("partition", "bytes"),
    ("key", "bytes"),
    ("value", "bytes"),
    ("flags", "u32"),
    ("expires_ms", "u64"),
    ("cas", "u64"),
)
class Store(Message):
    """add / replace / append / prepend / cas, run on the primary."""

    mode: int
    partition: bytes
    key: bytes
    value: bytes
    flags: int
    expires_ms: int
    cas: int
    __slots__ = ("mode", "partition", "key", "value", "flags", "expires_ms", "cas")


@message(7, ("mode", "u8"), ("partition", "bytes"), ("key", "bytes"), ("delta", "bytes"))
class Incr(Message):
    mode: int
    partition: bytes
    key: bytes
    delta: bytes
    __slots__ = ("mode", "partition", "key", "delta")


@message(8, ("partition", "bytes"), ("key", "bytes"), ("expires_ms", "u64"))
class Touch(Message):
    partition: bytes
    key: bytes
    expires_ms: int
    __slots__ = ("partition", "key", "expires_ms")


@message(9, ("partition", "bytes"), ("key", "bytes"), ("version", "u64"))
class Delete(Message):
    partition: bytes
    key: bytes
    version: int
    __slots__ = ("partition", "key", "version")


@message(10)
class Stats(Message):
    __slots__ = ()


@message(
    11, ("ranges", "ranges"), ("min_version", "u64"), ("partitions", "list"), ("window", "u32")
)
class Stream(Message):
    """Send every record in the token ranges newer than min_version, in batches.

    ``window`` is the number of batches the receiver takes before it must
    grant more with Credit (flow control); an empty range list means all.
    """

    ranges: list[tuple[int, int]]
    min_version: int
    partitions: list[bytes]
    window: int
    __slots__ = ("ranges", "min_version", "partitions", "window")


@message(12, ("batches", "u32"))
class Credit(Message):
    """Flow control: the receiver of a stream may take this many more batches."""

    batches: int
    __slots__ = ("batches",)


@message(13)
class Cancel(Message):
    __slots__ = ()


@message(14, ("partition", "bytes"))
class Flush(Message):
    partition: bytes
    __slots__ = ("partition",)


@message(15, ("partition", "bytes"), ("after", "u64"), ("count", "u32"))
class Scan(Message):
    """The live keys with the smallest tokens above ``after`` (a SCAN cursor)."""

    partition: bytes
    after: int
    count: int
    __slots__ = ("partition", "after", "count")


@message(
    16,
    ("action", "u8"),
    ("holder", "str"),
    ("lease_ms", "u64"),
    ("done_keys", "u64"),
    ("done_bytes", "u64"),
    ("total_keys", "u64"),
)
class Control(Message):
    """Merge coordination: claim or renew the merge lease, finish, or release it.

    Only one master at a time drives a node's merge; it holds a lease that it
    renews with its progress, and ends the merge with FINISH (the node turns
    ``up``) or gives it up with RELEASE.
    """

    action: int
    holder: str
    lease_ms: int
    done_keys: int
    done_bytes: int
    total_keys: int
    __slots__ = ("action", "holder", "lease_ms", "done_keys", "done_bytes", "total_keys")


@message(17, ("ranges", "ranges"))
class Retain(Message):
    """Drop, in the background, every record whose token is outside ``ranges``.

    Sent after a join or leave is cut over, so that a node keeps only the
    ranges it owns under the new ring.
    """

    ranges: list[tuple[int, int]]
    __slots__ = ("ranges",)


@message(
    18,
    ("epoch", "u64"),
    ("names", "list"),
    ("limits", "u64s"),
    ("evict", "bytes"),
    ("ttls", "u64s"),
)
class Partitions(Message):
    """The partition rules this node enforces, replacing any earlier table.

    One entry per partition, in four parallel fields: the name, this node's
    byte limit (its share of the partition's quota; 0 means none), whether
    it evicts (1) or refuses writes (0) when full, and the default TTL in
    milliseconds for records written without one (0 means none).  ``epoch``
    is the cluster map's: a table from an older map than one already held is
    ignored.
    """

    epoch: int
    names: list[bytes]
    limits: list[int]
    evict: bytes
    ttls: list[int]
    __slots__ = ("epoch", "names", "limits", "evict", "ttls")


CONTROL_CLAIM = 1
CONTROL_FINISH = 2
CONTROL_RELEASE = 3


# Replies: data node -> master.


@message(64, ("version", "u16"), ("node_id", "str"), ("nonce", "bytes"))
class Challenge(Message):
    version: int
    node_id: str
    nonce: bytes
    __slots__ = ("version", "node_id", "nonce")


@message(65, ("node_id", "str"), ("proof", "bytes"), ("state", "str"))
class Welcome(Message):
    node_id: str
    proof: bytes
    state: str
    __slots__ = ("node_id", "proof", "state")


@message(66, ("status", "u8"), ("packed", "bytes"))
class Result(Message):
    """A status (kvha.data.store.Status) and a packed record, empty for none."""

    status: int
    packed: bytes
    __slots__ = ("status", "packed")

    def __init__(self, status: int, packed: bytes) -> None:  # the reply hot path
        self.status = status
        self.packed = packed


_RESULT_HEAD = struct.Struct("<IBIBI")
_pack_result_head: Final = _RESULT_HEAD.pack  # bound once (see _pack_u32)


def result_fields(data: bytes, start: int, stop: int) -> tuple[int, bytes]:
    """``(status, packed)`` of the Result whose body is ``data[start:stop]``.

    The master reads replies in place with this (see :func:`get_fields`).
    """
    if stop - start < 5:
        raise WireError("message body is truncated")
    if start + 5 + u32_at(data, start + 1) != stop:
        raise WireError("malformed Result")
    return data[start], data[start + 5 : stop]


def result_frame(request_id: int, status: int, packed: bytes) -> bytes:
    """The frame of a Result without building a Message (the reply hot path)."""
    return _pack_result_head(len(packed) + 10, 66, request_id, status, len(packed)) + packed


@message(67, ("records", "records"))
class Records(Message):
    """Multi-get reply: one (partition, key, packed) per key asked, packed empty if absent."""

    records: list[tuple[bytes, bytes, bytes]]
    __slots__ = ("records",)


@message(68, ("pairs", "list"))
class StatsReply(Message):
    """Alternating names and values, as ASCII."""

    pairs: list[bytes]
    __slots__ = ("pairs",)


@message(69, ("code", "u16"), ("message", "str"))
class Error(Message):
    code: int
    message: str
    __slots__ = ("code", "message")


@message(70, ("records", "records"))
class StreamBatch(Message):
    records: list[tuple[bytes, bytes, bytes]]
    __slots__ = ("records",)


@message(71, ("count", "u64"), ("bytes", "u64"))
class StreamEnd(Message):
    count: int
    bytes: int
    __slots__ = ("count", "bytes")


@message(72, ("state", "str"), ("high_water", "u64"))
class Pong(Message):
    state: str
    high_water: int
    __slots__ = ("state", "high_water")


@message(73, ("tokens", "u64s"), ("keys", "list"))
class ScanReply(Message):
    tokens: list[int]
    keys: list[bytes]
    __slots__ = ("tokens", "keys")


@message(74, ("granted", "u8"), ("state", "str"), ("high_water", "u64"))
class ControlReply(Message):
    granted: int
    state: str
    high_water: int
    __slots__ = ("granted", "state", "high_water")


@message(75, ("statuses", "bytes"), ("packed", "list"))
class Results(Message):
    """ApplyMany reply: a status byte per record, in order, and per record the
    record the node holds where it is not the one sent (else empty), as in Result.
    """

    statuses: bytes
    packed: list[bytes]
    __slots__ = ("statuses", "packed")


# Error codes carried by Error.
E_BAD_REQUEST = 1
E_AUTH = 2
E_VERSION = 3
E_TOO_LARGE = 4
E_UNKNOWN_OP = 5
E_NOT_AUTHENTICATED = 6
E_INTERNAL = 7
E_LIMIT = 8


def decode(opcode: int, body: bytes) -> Message:
    """Decode one message body, or raise WireError."""
    cls = MESSAGES.get(opcode)
    if cls is None:
        raise WireError(f"unknown opcode {opcode}")
    return cls.decode(body)


def frame_at(chunk: bytes, offset: int) -> tuple[int, int, int, int]:
    """``(opcode, request_id, body_start, frame_end)`` of the frame at ``offset``.

    For walking a chunk from :meth:`FrameReader.take`, whose frames are whole
    and checked; the next frame starts at ``frame_end``.  (Compiled callers
    get the tuple as a C struct: nothing is allocated.)
    """
    return (
        chunk[offset + 4],
        u32_at(chunk, offset + 5),
        offset + FRAME_SIZE,
        offset + 4 + u32_at(chunk, offset),
    )


class FrameReader:
    """Splits a byte stream into ``(opcode, request_id, body)`` frames.

    Raises :class:`FrameTooLarge` as soon as a length prefix exceeds the
    limit, before buffering the body, and :class:`WireError` on a length too
    short to hold a header.  Either leaves the stream unusable: close it.
    """

    __slots__ = ("_buffer", "_need", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._need = FRAME_SIZE  # bytes needed before parsing is worth trying
        self.max_frame = max_frame

    def take(self, data: bytes) -> tuple[bytes, int]:
        """``(chunk, end)``: the stream's whole frames are ``chunk[:end]``.

        ``chunk`` is ``data`` itself unless part of a frame was buffered
        before it (no copy on the common path).  What follows ``end`` is kept
        for the next call.  Every whole frame's length has been checked, so
        a caller walks ``chunk`` up to ``end`` with :func:`frame_at` without
        checking them again.
        """
        buf = self._buffer
        if buf:
            buf += data
            if len(buf) < self._need:
                return b"", 0
            data = bytes(buf)
            buf.clear()
        end = len(data)
        offset = 0
        max_frame = self.max_frame
        while end - offset >= FRAME_SIZE:
            length = u32_at(data, offset)
            if length < _FRAME_BODY:
                raise WireError(f"frame length {length} is shorter than its header")
            if length > max_frame:
                raise FrameTooLarge(f"frame of {length} bytes exceeds the {max_frame} limit")
            stop = offset + 4 + length
            if stop > end:
                break
            offset = stop
        if offset < end:
            if offset:
                buf += memoryview(data)[offset:]
            else:
                buf += data
            left = end - offset
            self._need = u32_at(data, offset) + 4 if left >= FRAME_SIZE else FRAME_SIZE
        else:
            self._need = FRAME_SIZE
        return data, offset

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """The whole frames so far as ``(opcode, request_id, body)``."""
        chunk, end = self.take(data)
        frames = []
        offset = 0
        while offset < end:
            opcode, request_id, start, offset = frame_at(chunk, offset)
            frames.append((opcode, request_id, chunk[start:offset]))
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)


def proof(secret: bytes, label: bytes, nonce: bytes) -> bytes:
    """HMAC-SHA256 of ``label + nonce`` under the cluster secret."""
    return hmac.new(secret, label + nonce, hashlib.sha256).digest()


def proof_ok(secret: bytes, label: bytes, nonce: bytes, given: bytes) -> bool:
    return hmac.compare_digest(proof(secret, label, nonce), given)


CLIENT_LABEL = b"kvha-hello-v1:"
SERVER_LABEL = b"kvha-welcome-v1:"
