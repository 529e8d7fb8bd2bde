"""Tests for kvha.wire: framing, every message's codec, and hostile input.

The decoder faces bytes from the network, so besides round trips the tests
check that no input, however truncated or malformed, makes it raise anything
but :class:`WireError`, and that a hostile length or count is refused before
anything is allocated for it.
"""

from __future__ import annotations

import time
import tracemalloc
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvha import wire
from kvha.wire import FRAME, FRAME_SIZE, MESSAGES, FrameReader, FrameTooLarge, WireError

ALL_CLASSES = sorted(MESSAGES.values(), key=lambda cls: cls.OPCODE)
CLASS_IDS = [cls.__name__ for cls in ALL_CLASSES]

U64 = st.integers(0, 2**64 - 1)
SMALL_BYTES = st.binary(max_size=40)

#: One strategy per field kind of the FIELDS tables.
FIELD_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "u8": st.integers(0, 2**8 - 1),
    "u16": st.integers(0, 2**16 - 1),
    "u32": st.integers(0, 2**32 - 1),
    "u64": U64,
    "bytes": SMALL_BYTES,
    "str": st.text(max_size=30).filter(lambda s: len(s.encode("utf-8")) <= 65535),
    "list": st.lists(SMALL_BYTES, max_size=6),
    "ranges": st.lists(st.tuples(U64, U64), max_size=6),
    "u64s": st.lists(U64, max_size=8),
    "records": st.lists(st.tuples(SMALL_BYTES, SMALL_BYTES, SMALL_BYTES), max_size=5),
}

#: A fixed, non-empty value of each kind, for the deterministic tests.
SAMPLE_VALUES: dict[str, Any] = {
    "u8": 200,
    "u16": 40000,
    "u32": 3_000_000_000,
    "u64": 2**63 + 5,
    "bytes": b"some\x00bytes",
    "str": "n\u00f6de-\u2603",
    "list": [b"a", b"", b"ccc"],
    "ranges": [(1, 2), (2**64 - 1, 0)],
    "u64s": [0, 2**64 - 1, 7],
    "records": [(b"p", b"k", b"packed"), (b"", b"k2", b"")],
}

REQUEST_ID = st.integers(0, 2**32 - 1)


def test_field_strategies_cover_every_kind() -> None:
    """Every field kind used by any message has a strategy and a sample value."""
    kinds = {kind for cls in ALL_CLASSES for _, kind in cls.FIELDS}
    assert kinds <= set(FIELD_STRATEGIES)
    assert kinds <= set(SAMPLE_VALUES)


def message_of(cls: type[wire.Message]) -> st.SearchStrategy[wire.Message]:
    """A strategy for instances of ``cls`` built from its FIELDS table."""
    return st.tuples(*[FIELD_STRATEGIES[kind] for _, kind in cls.FIELDS]).map(
        lambda values: cls(*values)
    )


any_message = st.sampled_from(ALL_CLASSES).flatmap(message_of)


def sample(cls: type[wire.Message]) -> wire.Message:
    return cls(*[SAMPLE_VALUES[kind] for _, kind in cls.FIELDS])


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """Split ``data`` at the given offsets (any order, duplicates allowed)."""
    points = sorted({min(c, len(data)) for c in cuts})
    chunks = []
    start = 0
    for p in points + [len(data)]:
        chunks.append(data[start:p])
        start = p
    return chunks


def read_all(reader: FrameReader, chunks: list[bytes]) -> list[tuple[int, int, bytes]]:
    frames = []
    for chunk in chunks:
        frames.extend(reader.feed(chunk))
    return frames


# Round trips -------------------------------------------------------------


# pytest-twisted cannot run a hypothesis test that is also parametrized, so
# the tests below that must cover every message loop over ALL_CLASSES inside
# each example instead.


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_message_round_trips_through_any_chunking(data: st.DataObject) -> None:
    """Each message survives frame -> FrameReader (split anywhere) -> decode unchanged."""
    for cls in ALL_CLASSES:
        msg = data.draw(message_of(cls), label=cls.__name__)
        request_id = data.draw(REQUEST_ID, label="request_id")
        framed = msg.frame(request_id)
        cuts = data.draw(st.lists(st.integers(0, len(framed)), max_size=8), label="cuts")
        reader = FrameReader()
        frames = read_all(reader, chunked(framed, cuts))
        assert len(frames) == 1
        opcode, got_id, body = frames[0]
        assert opcode == cls.OPCODE
        assert got_id == request_id
        decoded = wire.decode(opcode, body)
        assert type(decoded) is cls
        assert decoded == msg
        assert reader.buffered == 0


@settings(max_examples=60, deadline=None)
@given(
    msgs=st.lists(st.tuples(any_message, REQUEST_ID), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 5000), max_size=12),
)
def test_concatenated_frames_round_trip_in_order(
    msgs: list[tuple[wire.Message, int]], cuts: list[int]
) -> None:
    """Several frames in one byte stream come out whole and in order, however split."""
    stream = b"".join(msg.frame(request_id) for msg, request_id in msgs)
    frames = read_all(FrameReader(), chunked(stream, cuts))
    assert [(op, rid) for op, rid, _ in frames] == [(m.OPCODE, rid) for m, rid in msgs]
    assert [wire.decode(op, body) for op, _, body in frames] == [m for m, _ in msgs]


def test_frame_length_counts_header_and_body() -> None:
    """The length prefix counts the opcode, the id and the body, as documented."""
    msg = wire.Get(b"part", b"key", 1)
    framed = msg.frame(77)
    length, opcode, request_id = FRAME.unpack_from(framed)
    assert length == len(framed) - 4 == 1 + 4 + len(msg.body())
    assert (opcode, request_id) == (wire.Get.OPCODE, 77)


def test_longest_string_field_round_trips() -> None:
    """A str field of exactly 65535 UTF-8 bytes, the u16 limit, round-trips."""
    name = "\u00e9" * 32767 + "x"  # 2 * 32767 + 1 bytes
    assert len(name.encode("utf-8")) == 65535
    msg = wire.Hello(wire.PROTOCOL_VERSION, name, b"p")
    assert wire.decode(wire.Hello.OPCODE, msg.body()) == msg


def test_byte_at_a_time_feed_yields_frames_as_they_complete() -> None:
    """Fed one byte at a time, each frame is returned exactly when its last byte arrives."""
    framed = [wire.Ping().frame(1), wire.Get(b"p", b"k", 0).frame(2), wire.Stats().frame(3)]
    reader = FrameReader()
    stream = b"".join(framed)
    ends = set()
    total = 0
    for f in framed:
        total += len(f)
        ends.add(total)
    for i in range(len(stream)):
        frames = reader.feed(stream[i : i + 1])
        assert bool(frames) == (i + 1 in ends)


# Hostile bodies ------------------------------------------------------------

SAMPLED = [cls for cls in ALL_CLASSES if cls.FIELDS]


@pytest.mark.parametrize("cls", SAMPLED, ids=[c.__name__ for c in SAMPLED])
def test_every_proper_prefix_of_a_body_is_refused(cls: type[wire.Message]) -> None:
    """A truncated body raises WireError, never another exception and never a message."""
    body = sample(cls).body()
    assert wire.decode(cls.OPCODE, body) == sample(cls)
    for n in range(len(body)):
        with pytest.raises(WireError):
            wire.decode(cls.OPCODE, body[:n])


@pytest.mark.parametrize("cls", ALL_CLASSES, ids=CLASS_IDS)
def test_stray_trailing_bytes_are_refused(cls: type[wire.Message]) -> None:
    """Bytes after the last field raise WireError rather than being ignored."""
    body = sample(cls).body()
    for extra in (b"\x00", b"junk"):
        with pytest.raises(WireError, match="stray"):
            wire.decode(cls.OPCODE, body + extra)


@settings(max_examples=60, deadline=None)
@given(garbage=st.binary(max_size=120))
def test_garbage_bodies_decode_or_raise_wire_error(garbage: bytes) -> None:
    """Random bytes under every opcode either decode to that message or raise WireError."""
    for cls in ALL_CLASSES:
        try:
            msg = wire.decode(cls.OPCODE, garbage)
        except WireError:
            continue
        assert type(msg) is cls
        assert msg.body() == garbage  # whatever decodes re-encodes to the same bytes


@settings(max_examples=150, deadline=None)
@given(
    msg=any_message,
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 10_000),
)
def test_mutated_bodies_decode_or_raise_wire_error(
    msg: wire.Message, edits: list[tuple[int, int]], cut: int
) -> None:
    """A valid body with bytes overwritten and its tail cut off never raises anything else."""
    body = bytearray(msg.body())
    for pos, value in edits:
        if body:
            body[pos % len(body)] = value
    mutated = bytes(body[: cut % (len(body) + 1)])
    try:
        wire.decode(msg.OPCODE, mutated)
    except WireError:
        pass


def test_invalid_utf8_string_field_is_refused() -> None:
    """A str field that is not UTF-8 raises WireError, not UnicodeDecodeError."""
    body = bytes(wire.Hello(1, "ab", b"").body())
    bad = body[:4] + b"\xff\xfe" + body[6:]
    with pytest.raises(WireError, match="UTF-8"):
        wire.decode(wire.Hello.OPCODE, bad)


@pytest.mark.parametrize("opcode", [0, 30, 63, 90, 128, 255])
def test_unknown_opcode_is_refused(opcode: int) -> None:
    """An opcode no message uses raises WireError."""
    assert opcode not in MESSAGES
    with pytest.raises(WireError, match="unknown opcode"):
        wire.decode(opcode, b"")


def _count_prefix(count: int) -> bytes:
    return wire._U32.pack(count)


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [
        (wire.MultiGet, wire._U32.pack(1) + b"p"),  # partition, then the key list
        (wire.StatsReply, b""),
        (wire.Stream, b""),  # ranges come first
        (wire.Records, b""),
        (wire.StreamBatch, b""),
    ],
    ids=["list", "list-first", "ranges", "records", "batch"],
)
def test_absurd_counts_are_refused_without_allocating(
    cls: type[wire.Message], prefix: bytes
) -> None:
    """A count of 2**32-1 over a tiny body raises WireError at once, allocating nothing big."""
    body = prefix + _count_prefix(2**32 - 1) + b"\x01\x00\x00\x00x" * 3
    tracemalloc.start()
    began = time.perf_counter()
    try:
        with pytest.raises(WireError):
            wire.decode(cls.OPCODE, body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - began < 1.0
    assert peak < 1 << 20


def test_record_with_absurd_lengths_is_refused() -> None:
    """A record entry claiming 4 GiB key and value lengths raises WireError."""
    body = _count_prefix(1) + wire._REC.pack(1, 2**32 - 1, 2**32 - 1) + b"pk"
    with pytest.raises(WireError):
        wire.decode(wire.Records.OPCODE, body)


# Framing limits ---------------------------------------------------------------


def test_oversized_length_prefix_raises_before_the_body_arrives() -> None:
    """FrameTooLarge is raised from the header alone, with none of the body sent."""
    reader = FrameReader(max_frame=1000)
    with pytest.raises(FrameTooLarge):
        reader.feed(FRAME.pack(1001, wire.Apply.OPCODE, 9))


def test_oversized_frame_after_a_valid_one_in_the_same_chunk_raises() -> None:
    """A too-large header behind a complete frame is still caught in the same feed."""
    reader = FrameReader(max_frame=1000)
    data = wire.Ping().frame(1) + FRAME.pack(2**32 - 1, 2, 2)
    with pytest.raises(FrameTooLarge):
        reader.feed(data)


def test_frame_of_exactly_max_frame_is_accepted() -> None:
    """A frame whose length equals max_frame is read normally."""
    msg = wire.Flush(b"x" * 91)
    framed = msg.frame(3)
    length = FRAME.unpack_from(framed)[0]
    reader = FrameReader(max_frame=length)
    frames = reader.feed(framed[:20])
    assert frames == []
    frames = reader.feed(framed[20:])
    assert wire.decode(frames[0][0], frames[0][2]) == msg


@pytest.mark.parametrize("length", [0, 1, 4])
def test_length_shorter_than_header_is_refused(length: int) -> None:
    """A length too small to hold opcode and id raises WireError (not FrameTooLarge)."""
    reader = FrameReader()
    with pytest.raises(WireError) as info:
        reader.feed(FRAME.pack(length, 2, 0) + b"\x00" * 8)
    assert not isinstance(info.value, FrameTooLarge)


def test_empty_body_frame_is_the_minimum() -> None:
    """A length of exactly 5 is a frame with an empty body."""
    reader = FrameReader()
    assert reader.feed(FRAME.pack(5, 2, 4)) == [(2, 4, b"")]
    assert FRAME_SIZE == 9


# Handshake proofs ---------------------------------------------------------------

SECRET = b"s" * 16
NONCE = b"n" * 32


def test_proof_accepted_with_the_right_secret_and_nonce() -> None:
    """A proof made with the same secret, label and nonce verifies."""
    p = wire.proof(SECRET, wire.CLIENT_LABEL, NONCE)
    assert len(p) == 32
    assert wire.proof_ok(SECRET, wire.CLIENT_LABEL, NONCE, p)


def test_proof_rejected_with_a_wrong_secret() -> None:
    """A proof made under another secret does not verify."""
    p = wire.proof(b"t" * 16, wire.CLIENT_LABEL, NONCE)
    assert not wire.proof_ok(SECRET, wire.CLIENT_LABEL, NONCE, p)


def test_proof_rejected_with_a_wrong_nonce() -> None:
    """A proof for another nonce (a replayed handshake) does not verify."""
    p = wire.proof(SECRET, wire.CLIENT_LABEL, b"m" * 32)
    assert not wire.proof_ok(SECRET, wire.CLIENT_LABEL, NONCE, p)


def test_proof_labels_keep_the_two_directions_apart() -> None:
    """A client's proof cannot be reflected back as the server's, or vice versa."""
    client = wire.proof(SECRET, wire.CLIENT_LABEL, NONCE)
    assert not wire.proof_ok(SECRET, wire.SERVER_LABEL, NONCE, client)
    assert not wire.proof_ok(SECRET, wire.CLIENT_LABEL, NONCE, b"")
    assert not wire.proof_ok(SECRET, wire.CLIENT_LABEL, NONCE, client[:-1])


# In-place reading: take() and the hot path's field decoders ------------------------


def test_take_hands_back_the_chunk_itself_when_nothing_is_buffered() -> None:
    """With no partial frame held, the chunk is not copied; a cut frame is kept for later."""
    reader = FrameReader()
    first, second = wire.Ping().frame(1), wire.Flush(b"xyz").frame(2)
    data = first + second[:7]
    chunk, end = reader.take(data)
    assert chunk is data and end == len(first)
    assert reader.buffered == 7
    chunk, end = reader.take(second[7:])
    assert chunk == second and end == len(second)
    assert reader.buffered == 0


def test_take_waits_for_a_whole_frame() -> None:
    """A large frame arriving in pieces yields nothing until its last piece."""
    framed = wire.Flush(b"x" * 5000).frame(3)
    reader = FrameReader()
    for i in range(0, 4800, 600):
        assert reader.take(framed[i : i + 600])[1] == 0
    chunk, end = reader.take(framed[4800:])
    assert chunk[:end] == framed


@given(
    st.binary(max_size=60),
    st.binary(max_size=12),
    st.binary(max_size=12),
    st.sampled_from(["get", "apply"]),
)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_fields_read_in_place_match_decode_and_stay_inside_the_body(
    body: bytes, before: bytes, after: bytes, kind: str
) -> None:
    """get_fields/apply_fields on a body inside a larger chunk agree with Get/Apply.decode.

    The bytes after the body belong to the next frame: a length pointing
    past the body must be an error, never a read of them.
    """
    cls, fields = (wire.Get, wire.get_fields) if kind == "get" else (wire.Apply, wire.apply_fields)
    chunk = before + body + after
    start, stop = len(before), len(before) + len(body)
    try:
        expected: Any = cls.decode(body)
    except WireError as e:
        with pytest.raises(WireError) as info:
            fields(chunk, start, stop)
        assert str(info.value) == str(e)
        return
    got = fields(chunk, start, stop)
    if kind == "get":
        assert got == (expected.partition, expected.key, expected.tombstones)
    else:
        assert got == (expected.partition, expected.key, expected.packed)


def test_a_valid_apply_body_decodes_in_place() -> None:
    """A real Apply frame's fields read at their offsets in a pipelined chunk."""
    msg = wire.Apply(b"part", b"key", b"packed-record")
    chunk = wire.Ping().frame(1) + msg.frame(2) + wire.Ping().frame(3)
    start = len(wire.Ping().frame(1)) + FRAME_SIZE
    stop = start + len(msg.body())
    assert wire.apply_fields(chunk, start, stop) == (b"part", b"key", b"packed-record")


@given(st.lists(st.tuples(SMALL_BYTES, SMALL_BYTES, st.binary(max_size=5000)), max_size=4))
def test_apply_frame_is_the_messages_frame_for_every_copy(
    writes: list[tuple[bytes, bytes, bytes]],
) -> None:
    """apply_frame, which reuses the previous call's tail for the same objects, is always
    Apply(...).frame(id): for each copy of a write and across writes, empty ones included."""
    for partition, key, packed in [(b"", b"", b"")] + writes + writes[:1]:
        for request_id in (1, 2, 2**32 - 1):
            framed = wire.apply_frame(request_id, partition, key, packed)
            assert framed == wire.Apply(partition, key, packed).frame(request_id)
