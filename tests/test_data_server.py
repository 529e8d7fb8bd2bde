"""Tests for the data node's protocol server and the master's client of it.

Everything runs in memory: a ``DataNode`` on a ``MemoryEngine`` (or a
``LogEngine`` in a temporary directory) driven by a ``Clock``, server
protocols on ``StringTransportWithDisconnection``, and a real
``DataClientProtocol`` connected to a real ``DataServerProtocol`` through
``twisted.test.iosim``.  Nothing sleeps and nothing touches the network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient

from kvha import wire
from kvha.clock import version_from_millis
from kvha.data.client import (
    AuthenticationFailed,
    DataClientProtocol,
    DataNodeError,
    NodeUnavailable,
    RequestTimeout,
)
from kvha.data.engine import Engine, MemoryEngine
from kvha.data.logengine import LogEngine
from kvha.data.server import DataNode, DataServerFactory, DataServerProtocol
from kvha.data.store import Status
from kvha.record import HEADER_SIZE, pack, unpack
from kvha.ring import MAX_TOKEN, in_range, token

SECRET = b"s" * 16
NOW = 1_700_000_000.0
NOW_MS = int(NOW * 1000)


def fixed_urandom(n: int) -> bytes:
    return bytes(range(n))


@pytest.fixture
def clock() -> Clock:
    c = Clock()
    c.advance(NOW)
    return c


@pytest.fixture
def make_node(clock: Clock) -> Iterator[Callable[..., DataNode]]:
    nodes: list[DataNode] = []

    def make(engine: Optional[Engine] = None, **kwargs: Any) -> DataNode:
        node = DataNode(
            "data-1",
            engine if engine is not None else MemoryEngine(),
            SECRET,
            clock,
            urandom=fixed_urandom,
            **kwargs,
        )
        node.startService()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.running:
            node.stopService()


@pytest.fixture
def node(make_node: Callable[..., DataNode]) -> DataNode:
    return make_node()


@contextlib.contextmanager
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


class Conn:
    """A server protocol on a string transport, with a reader for its replies."""

    def __init__(self, node: DataNode) -> None:
        self.node = node
        self.proto: DataServerProtocol = DataServerFactory(node).buildProtocol(None)
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.proto
        self.reader = wire.FrameReader()
        self.writes = 0
        write = self.transport.write

        def counting_write(data: bytes) -> None:
            self.writes += 1
            write(data)

        self.transport.write = counting_write  # type: ignore[method-assign]
        self.proto.makeConnection(self.transport)

    @property
    def closed(self) -> bool:
        return not self.transport.connected

    def send(self, *frames: bytes) -> None:
        """Deliver all of ``frames`` in one dataReceived."""
        self.proto.dataReceived(b"".join(frames))

    def replies(self) -> list[tuple[int, wire.Message]]:
        data = self.transport.value()
        self.transport.clear()
        return [(rid, wire.decode(op, body)) for op, rid, body in self.reader.feed(data)]

    def call(self, msg: wire.Message, request_id: int = 1) -> wire.Message:
        """Send one request and return its only reply."""
        self.send(msg.frame(request_id))
        [(rid, reply)] = self.replies()
        assert rid == request_id
        return reply

    def hello(
        self, secret: bytes = SECRET, version: int = wire.PROTOCOL_VERSION
    ) -> list[tuple[int, wire.Message]]:
        [(_, challenge)] = self.replies()
        assert isinstance(challenge, wire.Challenge)
        proof = wire.proof(secret, wire.CLIENT_LABEL, challenge.nonce)
        self.send(wire.Hello(version, "master-1", proof).frame(0))
        return self.replies()


def authed(node: DataNode) -> Conn:
    conn = Conn(node)
    [(_, welcome)] = conn.hello()
    assert isinstance(welcome, wire.Welcome)
    return conn


def apply_msg(key: bytes, value: bytes = b"v", partition: bytes = b"p") -> wire.Apply:
    return wire.Apply(partition, key, pack(value, 0))


def assert_error(reply: wire.Message, code: int) -> None:
    assert isinstance(reply, wire.Error), reply
    assert reply.code == code, reply


# Handshake -------------------------------------------------------------------------


def test_connection_starts_with_a_challenge(node: DataNode) -> None:
    """The server speaks first: a Challenge with its version, node id and a fresh nonce."""
    conn = Conn(node)
    [(rid, challenge)] = conn.replies()
    assert rid == 0
    assert challenge == wire.Challenge(wire.PROTOCOL_VERSION, "data-1", fixed_urandom(32))
    assert conn.proto in node.connections


def test_correct_hello_gets_welcome_with_valid_server_proof(node: DataNode) -> None:
    """A Hello proving the secret is answered by a Welcome proving it back."""
    conn = Conn(node)
    [(rid, welcome)] = conn.hello()
    assert rid == 0
    assert isinstance(welcome, wire.Welcome)
    assert welcome.node_id == "data-1"
    assert welcome.state == "up"
    assert wire.proof_ok(SECRET, wire.SERVER_LABEL, fixed_urandom(32), welcome.proof)
    assert conn.proto.peer_id == "master-1"
    assert isinstance(conn.call(wire.Ping(), 5), wire.Pong)


def test_wrong_secret_is_refused_closed_and_logged(node: DataNode) -> None:
    """A Hello under another secret gets E_AUTH, the connection closes and a warning is logged."""
    conn = Conn(node)
    with captured_logs() as events:
        [(_, reply)] = conn.hello(secret=b"t" * 16)
    assert_error(reply, wire.E_AUTH)
    assert conn.closed
    assert conn.proto not in node.connections
    assert node.auth_failures == 1
    texts = [formatEvent(e) for e in events]
    assert any("wrong cluster secret" in t for t in texts), texts


def test_wrong_protocol_version_is_refused(node: DataNode) -> None:
    """A Hello of another protocol version gets E_VERSION and the connection closes."""
    conn = Conn(node)
    [(_, reply)] = conn.hello(version=wire.PROTOCOL_VERSION + 1)
    assert_error(reply, wire.E_VERSION)
    assert conn.closed
    assert node.auth_failures == 1


def test_request_before_hello_is_refused(node: DataNode) -> None:
    """Any request before Hello gets E_NOT_AUTHENTICATED with its id and closes, unanswered."""
    conn = Conn(node)
    conn.replies()
    conn.send(apply_msg(b"k").frame(9), wire.Ping().frame(10))
    [(rid, reply)] = conn.replies()
    assert rid == 9
    assert_error(reply, wire.E_NOT_AUTHENTICATED)
    assert conn.closed
    assert node.store.engine.count() == 0


def test_malformed_hello_is_refused(node: DataNode) -> None:
    """A Hello whose body does not decode gets E_BAD_REQUEST and closes."""
    conn = Conn(node)
    conn.replies()
    conn.send(wire.FRAME.pack(5 + 3, wire.Hello.OPCODE, 0) + b"\x01\x00\x05")
    [(_, reply)] = conn.replies()
    assert_error(reply, wire.E_BAD_REQUEST)
    assert conn.closed


def test_hello_and_requests_in_one_chunk_are_all_answered(node: DataNode) -> None:
    """Requests pipelined right behind the Hello are served once it is accepted."""
    conn = Conn(node)
    [(_, challenge)] = conn.replies()
    proof = wire.proof(SECRET, wire.CLIENT_LABEL, challenge.nonce)
    conn.send(
        wire.Hello(wire.PROTOCOL_VERSION, "m", proof).frame(0),
        apply_msg(b"k").frame(1),
        wire.Get(b"p", b"k", 0).frame(2),
    )
    replies = conn.replies()
    assert [rid for rid, _ in replies] == [0, 1, 2]
    assert isinstance(replies[0][1], wire.Welcome)
    assert replies[2][1].status == Status.OK


# Bad frames after authentication --------------------------------------------------


def test_oversized_frame_is_refused_before_its_body(make_node: Callable[..., DataNode]) -> None:
    """A frame over max_frame_bytes gets E_TOO_LARGE from its header alone and closes."""
    node = make_node(max_frame_bytes=1024)
    conn = authed(node)
    framed = apply_msg(b"k", b"x" * 2000).frame(3)
    conn.send(framed[: wire.FRAME_SIZE])
    [(_, reply)] = conn.replies()
    assert_error(reply, wire.E_TOO_LARGE)
    assert conn.closed
    conn.send(framed[wire.FRAME_SIZE :])  # the rest arrives anyway: ignored
    assert conn.replies() == []
    assert node.store.engine.count() == 0
    assert node.bad_frames == 1


def test_whole_oversized_frame_stores_nothing(make_node: Callable[..., DataNode]) -> None:
    """An oversized frame delivered whole is refused and nothing of it is stored."""
    node = make_node(max_frame_bytes=1024)
    conn = authed(node)
    conn.send(apply_msg(b"k", b"x" * 2000).frame(3))
    [(_, reply)] = conn.replies()
    assert_error(reply, wire.E_TOO_LARGE)
    assert conn.closed
    assert node.store.engine.count() == 0


def test_frame_length_shorter_than_header_closes(node: DataNode) -> None:
    """A length prefix below the 5 header bytes is a broken stream: error and close."""
    conn = authed(node)
    conn.send(wire.FRAME.pack(2, wire.Ping.OPCODE, 4) + b"\x00" * 8)
    [(_, reply)] = conn.replies()
    assert_error(reply, wire.E_BAD_REQUEST)
    assert conn.closed
    assert node.bad_frames == 1


def test_malformed_body_is_answered_and_the_connection_kept(node: DataNode) -> None:
    """A truncated Apply gets E_BAD_REQUEST with its id and stores nothing; the next one works."""
    conn = authed(node)
    body = apply_msg(b"k").body()[:-3]
    conn.send(wire.FRAME.pack(5 + len(body), wire.Apply.OPCODE, 41) + body)
    [(rid, reply)] = conn.replies()
    assert rid == 41
    assert_error(reply, wire.E_BAD_REQUEST)
    assert not conn.closed
    assert node.store.engine.count() == 0
    assert conn.call(apply_msg(b"k"), 42).status == Status.STORED
    assert node.store.engine.count() == 1


def test_malformed_body_among_pipelined_requests(node: DataNode) -> None:
    """A bad request in the middle of a pipeline fails alone; its neighbours are served."""
    conn = authed(node)
    body = b"\x01\x00\x00\x00"  # Get: a partition length and nothing else
    conn.send(
        apply_msg(b"a").frame(1),
        wire.FRAME.pack(5 + len(body), wire.Get.OPCODE, 2) + body,
        apply_msg(b"b").frame(3),
    )
    replies = dict(conn.replies())
    assert replies[1].status == Status.STORED
    assert_error(replies[2], wire.E_BAD_REQUEST)
    assert replies[3].status == Status.STORED
    assert node.store.engine.count() == 2


@pytest.mark.parametrize("opcode", [0, 99, 255, wire.Challenge.OPCODE, wire.Hello.OPCODE])
def test_unknown_opcode_is_answered_and_the_connection_kept(node: DataNode, opcode: int) -> None:
    """An opcode the server does not serve gets E_UNKNOWN_OP and the connection stays usable."""
    conn = authed(node)
    conn.send(wire.FRAME.pack(5 + 3, opcode, 17) + b"abc")
    [(rid, reply)] = conn.replies()
    assert rid == 17
    assert_error(reply, wire.E_UNKNOWN_OP)
    assert not conn.closed
    assert isinstance(conn.call(wire.Ping(), 18), wire.Pong)


def test_apply_with_packed_shorter_than_header_is_refused(node: DataNode) -> None:
    """An Apply whose packed record cannot hold the record header gets E_BAD_REQUEST."""
    conn = authed(node)
    reply = conn.call(wire.Apply(b"p", b"k", b"\x00" * (HEADER_SIZE - 1)), 8)
    assert_error(reply, wire.E_BAD_REQUEST)
    assert not conn.closed
    assert node.store.engine.count() == 0


def test_hot_path_requests_are_counted_before_a_stats_behind_them(node: DataNode) -> None:
    """Applies and Gets read in place are counted, and a Stats in the same chunk sees them."""
    conn = authed(node)
    conn.send(
        apply_msg(b"a").frame(1),
        wire.Get(b"p", b"a", 0).frame(2),
        wire.Get(b"p", b"nope", 0).frame(3),
        wire.Stats().frame(4),
        wire.Get(b"p", b"a", 0).frame(5),
    )
    replies = dict(conn.replies())
    pairs = replies[4].pairs
    stats = {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs), 2)}
    assert (stats["cmd_apply"], stats["cmd_get"]) == ("1", "2")
    assert (stats["get_hits"], stats["get_misses"]) == ("1", "1")
    assert replies[5].status == Status.OK
    assert node.ops["get"] == 3 and node.get_hits == 2


def test_apply_with_stray_bytes_is_refused_and_its_neighbours_served(node: DataNode) -> None:
    """An Apply body longer than its fields is E_BAD_REQUEST; nothing of it is stored."""
    conn = authed(node)
    body = apply_msg(b"bad").body() + b"!!"
    conn.send(
        apply_msg(b"a").frame(1),
        wire.FRAME.pack(5 + len(body), wire.Apply.OPCODE, 2) + body,
        wire.Get(b"p", b"a", 0).frame(3),
    )
    replies = dict(conn.replies())
    assert replies[1].status == Status.STORED
    assert_error(replies[2], wire.E_BAD_REQUEST)
    assert "2 stray bytes after Apply" in replies[2].message
    assert replies[3].status == Status.OK
    assert node.store.engine.count() == 1
    assert node.bad_frames == 1 and node.ops["apply"] == 1


def test_an_apply_the_store_fails_is_an_internal_error(
    node: DataNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that raises on a write gets E_INTERNAL for that Apply only."""
    conn = authed(node)

    class Broken(MemoryEngine):
        def put(self, partition: bytes, key: bytes, packed: bytes) -> None:
            raise RuntimeError("disk on fire")

    monkeypatch.setattr(node.store, "engine", Broken())
    with captured_logs() as logs:
        conn.send(apply_msg(b"a").frame(1), wire.Ping().frame(2))
    replies = dict(conn.replies())
    assert_error(replies[1], wire.E_INTERNAL)
    assert "disk on fire" in replies[1].message
    assert isinstance(replies[2], wire.Pong)
    assert any("internal error handling apply" in formatEvent(e) for e in logs)


def test_unknown_store_and_incr_modes_are_refused(node: DataNode) -> None:
    """A Store or Incr with a mode number the store does not know gets E_BAD_REQUEST."""
    conn = authed(node)
    assert_error(conn.call(wire.Store(99, b"p", b"k", b"v", 0, 0, 0), 1), wire.E_BAD_REQUEST)
    assert_error(conn.call(wire.Incr(99, b"p", b"k", b"1"), 2), wire.E_BAD_REQUEST)
    assert node.store.engine.count() == 0


def test_handler_exception_is_an_internal_error_not_a_crash(
    node: DataNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler that raises gets E_INTERNAL for that request only; the connection goes on."""
    conn = authed(node)

    class Broken(MemoryEngine):
        def get(self, partition: bytes, key: bytes) -> Optional[bytes]:
            raise RuntimeError("disk on fire")

    # A subclass, not a patched method: compiled classes' methods cannot be replaced.
    monkeypatch.setattr(node.store, "engine", Broken())
    with captured_logs():
        conn.send(wire.Get(b"p", b"k", 0).frame(1), wire.Ping().frame(2))
    replies = dict(conn.replies())
    assert_error(replies[1], wire.E_INTERNAL)
    assert isinstance(replies[2], wire.Pong)
    assert not conn.closed


def test_other_connections_keep_working_while_one_gets_garbage(node: DataNode) -> None:
    """Garbage on one connection closes that connection only; another keeps being served."""
    good = authed(node)
    garbage = [
        b"\xff" * 64,  # a 4 GiB length
        wire.FRAME.pack(1, 2, 3) + b"\x00" * 16,  # a length shorter than the header
        bytes(range(256)) * 4,
    ]
    for i, junk in enumerate(garbage):
        bad = authed(node)
        bad.send(junk)
        assert bad.closed
        assert good.call(apply_msg(b"k%d" % i), 100 + i).status == Status.STORED
        reply = good.call(wire.Get(b"p", b"k%d" % i, 0), 200 + i)
        assert unpack(reply.packed).value == b"v"
    assert node.connections == {good.proto}


def test_max_connections_refuses_the_extra_connection(make_node: Callable[..., DataNode]) -> None:
    """Beyond max_connections a connection gets E_LIMIT and is closed; the first is unaffected."""
    node = make_node(max_connections=1)
    first = authed(node)
    second = Conn(node)
    [(_, reply)] = second.replies()
    assert_error(reply, wire.E_LIMIT)
    assert second.closed
    assert node.rejected_connections == 1
    assert node.connections == {first.proto}
    assert isinstance(first.call(wire.Ping()), wire.Pong)
    first.transport.loseConnection()
    third = Conn(node)
    [(_, challenge)] = third.replies()
    assert isinstance(challenge, wire.Challenge)


# Pipelining and group commit --------------------------------------------------------


def test_pipelined_requests_are_answered_in_one_write(node: DataNode) -> None:
    """Many requests in one chunk get every reply, matched by id, in a single transport write."""
    conn = authed(node)
    frames = [apply_msg(b"k%d" % i, b"v%d" % i).frame(1000 + i) for i in range(50)]
    frames += [wire.Get(b"p", b"k%d" % i, 0).frame(2000 + i) for i in range(50)]
    frames.append(wire.Get(b"p", b"missing", 0).frame(3000))
    frames.append(wire.Ping().frame(3001))
    conn.writes = 0
    conn.send(*frames)
    assert conn.writes == 1
    replies = dict(conn.replies())
    assert len(replies) == 102
    for i in range(50):
        assert replies[1000 + i].status == Status.STORED
        assert unpack(replies[2000 + i].packed).value == b"v%d" % i
    assert replies[3000].status == Status.NOT_FOUND
    assert isinstance(replies[3001], wire.Pong)
    assert node.get_hits == 50 and node.get_misses == 1


def test_durable_engine_replies_only_after_the_commit(
    make_node: Callable[..., DataNode], clock: Clock, tmp_path: Any
) -> None:
    """With a log engine no reply, reads included, is written before the turn's commit."""
    engine = LogEngine(str(tmp_path / "log"), clock, fsync="always")
    node = make_node(engine)
    conn = authed(node)
    at_commit: list[bytes] = []
    commit = engine.commit

    def watched_commit() -> None:
        at_commit.append(conn.transport.value())
        commit()

    engine.commit = watched_commit  # type: ignore[method-assign]
    conn.writes = 0
    conn.send(apply_msg(b"k").frame(1), wire.Get(b"p", b"k", 0).frame(2), wire.Ping().frame(3))
    assert conn.transport.value() == b""
    assert engine.high_water == 0
    clock.advance(0)  # the turn ends: node.flush commits, then replies
    assert at_commit == [b""]
    assert conn.writes == 1
    replies = dict(conn.replies())
    assert replies[1].status == Status.STORED
    assert unpack(replies[2].packed).value == b"v"
    assert isinstance(replies[3], wire.Pong)

    conn.send(wire.Ping().frame(4))  # a read alone waits for the turn too
    assert conn.transport.value() == b""
    clock.advance(0)
    [(rid, pong)] = conn.replies()
    assert rid == 4
    assert pong.high_water == engine.high_water == unpack(replies[1].packed).version


def test_one_commit_covers_every_connection_in_a_turn(
    make_node: Callable[..., DataNode], clock: Clock, tmp_path: Any
) -> None:
    """Writes from several connections in one turn share a single commit (group commit)."""
    engine = LogEngine(str(tmp_path / "log"), clock, fsync="always")
    node = make_node(engine)
    conns = [authed(node) for _ in range(3)]
    commits = []
    commit = engine.commit

    def counted_commit() -> None:
        commits.append(1)
        commit()

    engine.commit = counted_commit  # type: ignore[method-assign]
    for i, conn in enumerate(conns):
        conn.send(apply_msg(b"k%d" % i).frame(i + 1))
    assert all(c.transport.value() == b"" for c in conns)
    clock.advance(0)
    assert len(commits) == 1
    for i, conn in enumerate(conns):
        [(rid, reply)] = conn.replies()
        assert rid == i + 1 and reply.status == Status.STORED


# Streams on a raw connection ----------------------------------------------------------


def fill(node: DataNode, n: int, partition: bytes = b"p", size: int = 50) -> None:
    for i in range(n):
        node.store.set(partition, b"key-%04d" % i, b"x" * size)


def stream_frames(conn: Conn) -> tuple[list[list[Any]], Optional[wire.StreamEnd]]:
    batches = []
    end = None
    for _, msg in conn.replies():
        if isinstance(msg, wire.StreamBatch):
            batches.append(msg.records)
        else:
            assert isinstance(msg, wire.StreamEnd), msg
            end = msg
    return batches, end


def test_stream_stops_without_credit_and_resumes_with_it(
    make_node: Callable[..., DataNode], clock: Clock
) -> None:
    """A stream sends at most ``window`` batches until Credit grants more."""
    node = make_node(stream_batch_records=10)
    fill(node, 45)
    conn = authed(node)
    conn.send(wire.Stream([], 0, [], 2).frame(7))
    clock.advance(0)
    clock.advance(0)
    clock.advance(0)
    batches, end = stream_frames(conn)
    assert [len(b) for b in batches] == [10, 10] and end is None
    clock.advance(1)
    assert conn.replies() == []
    conn.send(wire.Credit(3).frame(7))
    for _ in range(5):
        clock.advance(0)
    batches, end = stream_frames(conn)
    assert [len(b) for b in batches] == [10, 10, 5]
    assert end is not None and end.count == 45
    assert 7 not in conn.proto.streams


def test_stream_cancel_stops_it(make_node: Callable[..., DataNode], clock: Clock) -> None:
    """Cancel ends a stream: no more batches and no StreamEnd, whatever credit follows."""
    node = make_node(stream_batch_records=10)
    fill(node, 45)
    conn = authed(node)
    conn.send(wire.Stream([], 0, [], 1).frame(7))
    clock.advance(0)
    assert len(stream_frames(conn)[0]) == 1
    conn.send(wire.Cancel().frame(7), wire.Credit(10).frame(7))
    for _ in range(5):
        clock.advance(0)
    assert conn.replies() == []
    assert conn.proto.streams == {}


def test_stream_request_errors(make_node: Callable[..., DataNode], clock: Clock) -> None:
    """A zero window, a duplicate stream id and too many streams are refused with errors."""
    node = make_node(max_in_flight=1, stream_batch_records=10)
    fill(node, 30)
    conn = authed(node)
    assert_error(conn.call(wire.Stream([], 0, [], 0), 1), wire.E_BAD_REQUEST)
    conn.send(wire.Stream([], 0, [], 1).frame(2))
    assert conn.replies() == []
    assert_error(conn.call(wire.Stream([], 0, [], 1), 2), wire.E_BAD_REQUEST)
    assert_error(conn.call(wire.Stream([], 0, [], 1), 3), wire.E_LIMIT)


def test_stream_stops_when_the_connection_is_lost(
    make_node: Callable[..., DataNode], clock: Clock
) -> None:
    """A lost connection cancels its streams: nothing more is scheduled or written."""
    node = make_node(stream_batch_records=10)
    fill(node, 100)
    conn = authed(node)
    conn.send(wire.Stream([], 0, [], 100).frame(7))
    clock.advance(0)
    conn.transport.loseConnection()
    writes = conn.writes
    for _ in range(20):
        clock.advance(0)
    assert conn.writes == writes
    assert conn.proto.streams == {}


def test_stream_throttle_waits_size_over_rate(
    make_node: Callable[..., DataNode], clock: Clock
) -> None:
    """With stream_max_bytes_per_second the next batch waits its predecessor's size / rate."""
    rate = 10_000
    node = make_node(stream_batch_records=10, stream_max_bytes_per_second=rate)
    fill(node, 40, size=80)
    conn = authed(node)
    conn.send(wire.Stream([], 0, [], 100).frame(7))
    clock.advance(0)
    [first], _ = stream_frames(conn)
    size = sum(len(p) + len(k) + len(v) + 10 for p, k, v in first)
    delay = size / rate
    assert delay > 0.1
    [sender] = conn.proto.streams.values()
    assert sender._call.getTime() - clock.seconds() == pytest.approx(delay)
    # Four batches of the same size: each waits for its predecessor, then the end.
    for expect_batch in (True, True, True, False):
        clock.advance(delay * 0.95)
        assert conn.replies() == []
        clock.advance(delay * 0.1)
        batches, end = stream_frames(conn)
        if expect_batch:
            assert [len(b) for b in batches] == [10] and end is None
        else:
            assert batches == [] and end is not None and end.count == 40


# A real client against a real server --------------------------------------------------


def connect(
    node: DataNode, clock: Clock, secret: bytes = SECRET, request_timeout: float = 5.0
) -> tuple[DataClientProtocol, DataServerProtocol, IOPump]:
    factory = DataServerFactory(node)
    client, server, pump = connectedServerAndClient(
        lambda: factory.buildProtocol(None),
        lambda: DataClientProtocol(secret, "master-1", clock, request_timeout),
        clock=clock,
    )
    return client, server, pump


def test_client_handshake_through_iosim(node: DataNode, clock: Clock) -> None:
    """A client with the right secret is ready after the greeting and can make requests."""
    client, server, pump = connect(node, clock)
    assert client.ready.called and client.connected_ok
    assert client.node_id == "data-1" and client.node_state == "up"
    d = client.request(apply_msg(b"k"))
    pump.flush()
    assert d.result.status == Status.STORED
    d = client.request(wire.Get(b"p", b"k", 0))
    pump.flush()
    assert unpack(d.result.packed).value == b"v"


def test_client_with_wrong_secret_fails_to_authenticate(node: DataNode, clock: Clock) -> None:
    """A client holding another secret gets AuthenticationFailed and the connection closes."""
    client, server, pump = connect(node, clock, secret=b"t" * 16)
    failures: list[Failure] = []
    client.ready.addErrback(failures.append)
    assert failures and failures[0].check(AuthenticationFailed)
    assert node.auth_failures == 1
    assert node.connections == set()


def test_client_rejects_a_server_without_the_secret(clock: Clock) -> None:
    """A Welcome whose proof does not verify fails the handshake on the client side."""
    client = DataClientProtocol(SECRET, "m", clock)
    transport = StringTransport()
    client.makeConnection(transport)
    nonce = b"n" * 32
    client.dataReceived(wire.Challenge(wire.PROTOCOL_VERSION, "d", nonce).frame(0))
    [(op, _, body)] = wire.FrameReader().feed(transport.value())
    hello = wire.decode(op, body)
    assert wire.proof_ok(SECRET, wire.CLIENT_LABEL, nonce, hello.proof)
    bad = wire.proof(b"t" * 16, wire.SERVER_LABEL, nonce)
    failures: list[Failure] = []
    client.ready.addErrback(failures.append)
    with captured_logs():
        client.dataReceived(wire.Welcome("d", bad, "up").frame(0))
    assert failures and failures[0].check(AuthenticationFailed)
    assert transport.disconnecting
    assert not client.connected_ok
    client.connectionLost(None)


def test_data_node_error_reaches_the_caller(node: DataNode, clock: Clock) -> None:
    """An Error reply fails that request's Deferred with DataNodeError carrying the code."""
    client, server, pump = connect(node, clock)
    d = client.request(wire.Apply(b"p", b"k", b"short"))
    pump.flush()
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures[0].check(DataNodeError)
    assert failures[0].value.code == wire.E_BAD_REQUEST


PARTITIONS = (b"users", b"sessions")


def populate_for_stream(node: DataNode, n: int = 3000) -> tuple[int, set[tuple[bytes, bytes]]]:
    """Store ``n`` records of every kind; return min_version and the keys a stream must send."""
    store = node.store
    min_version = version_from_millis(NOW_MS - 10_000)
    expected: set[tuple[bytes, bytes]] = set()
    for i in range(n):
        partition = PARTITIONS[i % 2]
        key = b"key-%05d" % i
        kind = i % 10
        if kind == 0:  # older than min_version: not sent
            store.set(partition, key, b"old", version=version_from_millis(NOW_MS - 20_000, i))
        elif kind == 1:  # expired but not yet swept: not sent
            store.set(partition, key, b"gone", expires_ms=NOW_MS - 1)
        elif kind == 2:  # a tombstone: sent, so the copy learns of the delete
            store.set(partition, key, b"doomed")
            assert store.delete(partition, key).status == Status.DELETED
            expected.add((partition, key))
        elif kind == 3:  # expires later: sent
            store.set(partition, key, b"later", expires_ms=NOW_MS + 60_000)
            expected.add((partition, key))
        else:
            store.set(partition, key, b"value-%d" % i)
            expected.add((partition, key))
    assert store.engine.count() == n  # the expired ones are still physically there
    return min_version, expected


def test_stream_through_iosim_with_flow_control(
    make_node: Callable[..., DataNode], clock: Clock
) -> None:
    """The server pauses when the consumer holds its window and resumes as credit returns."""
    node = make_node(stream_batch_records=100)
    min_version, expected = populate_for_stream(node)
    client, server, pump = connect(node, clock)
    got: list[tuple[bytes, bytes, bytes]] = []
    waiting: list[Deferred] = []

    def consumer(records: list[tuple[bytes, bytes, bytes]]) -> Deferred:
        got.extend(records)
        d: Deferred = Deferred()
        waiting.append(d)
        return d

    done = client.stream([], min_version, consumer, window=2)
    pump.flush()
    assert len(waiting) == 2
    [sender] = server.streams.values()
    assert sender.credit == 0
    pump.flush()
    clock.advance(1)  # time passing grants nothing either
    pump.flush()
    assert len(waiting) == 2

    fired = 0
    while fired < len(waiting):
        assert len(waiting) - fired <= 2  # never more than the window outstanding
        waiting[fired].callback(None)
        fired += 1
        pump.flush()
        if fired < len(waiting):
            assert not done.called
    assert fired == len(waiting) == 24  # 2400 records, 100 a batch

    count, nbytes = done.result
    assert count == len(got) == len(expected) == 2400
    assert {(p, k) for p, k, _ in got} == expected
    assert len(got) == len(set((p, k) for p, k, _ in got))
    for partition, key, packed in got:
        assert packed == node.store.engine.get(partition, key)
        record = unpack(packed)
        assert record.version > min_version
        assert record.tombstone or record.value != b"gone"
    assert sum(1 for _, _, packed in got if unpack(packed).tombstone) == 300
    assert server.streams == {} and client.streams == {}


def test_stream_result_waits_for_the_consumer(
    make_node: Callable[..., DataNode], clock: Clock
) -> None:
    """The stream's Deferred fires only after the consumer has finished every batch."""
    node = make_node(stream_batch_records=10)
    fill(node, 25)
    client, server, pump = connect(node, clock)
    waiting: list[Deferred] = []

    def consumer(records: list[Any]) -> Deferred:
        d: Deferred = Deferred()
        waiting.append(d)
        return d

    done = client.stream([], 0, consumer, window=8)
    pump.flush()
    assert len(waiting) == 3  # all batches and the StreamEnd have arrived
    assert not done.called
    waiting[0].callback(None)
    waiting[2].callback(None)
    assert not done.called
    waiting[1].callback(None)
    assert done.result == (25, sum(len(b"p") + len(b"key-0000") + 50 + 21 + 10 for _ in range(25)))


def test_stream_consumer_failure_after_the_end_fails_the_stream(
    make_node: Callable[..., DataNode], clock: Clock
) -> None:
    """A consumer Deferred that fails after StreamEnd arrived still fails the stream's result."""
    node = make_node(stream_batch_records=10)
    fill(node, 15)
    client, server, pump = connect(node, clock)
    waiting: list[Deferred] = []

    def consumer(records: list[Any]) -> Deferred:
        d: Deferred = Deferred()
        waiting.append(d)
        return d

    done = client.stream([], 0, consumer, window=8)
    pump.flush()
    assert len(waiting) == 2
    waiting[0].callback(None)
    waiting[1].errback(ValueError("target refused"))
    failures: list[Failure] = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(ValueError)


def test_stream_consumer_failure_cancels_the_stream(
    make_node: Callable[..., DataNode], clock: Clock
) -> None:
    """A consumer that fails mid-stream fails the result and cancels the server's sender."""
    node = make_node(stream_batch_records=10)
    fill(node, 100)
    client, server, pump = connect(node, clock)
    waiting: list[Deferred] = []

    def consumer(records: list[Any]) -> Deferred:
        d: Deferred = Deferred()
        waiting.append(d)
        return d

    done = client.stream([], 0, consumer, window=2)
    pump.flush()
    waiting[0].errback(KeyError("boom"))
    pump.flush()
    failures: list[Failure] = []
    done.addErrback(failures.append)
    assert failures[0].check(KeyError)
    assert server.streams == {} and client.streams == {}
    waiting[1].callback(None)  # late: grants nothing
    pump.flush()
    assert len(waiting) == 2


def test_stream_token_ranges_select_exactly_the_tokens_in_them(
    make_node: Callable[..., DataNode], clock: Clock
) -> None:
    """A stream returns exactly the records whose token lies in one of the (lo, hi] ranges."""
    node = make_node(stream_batch_records=64)
    for i in range(1500):
        node.store.set(PARTITIONS[i % 2], b"k%d" % i, b"v")
    client, server, pump = connect(node, clock)
    everything = {(PARTITIONS[i % 2], b"k%d" % i) for i in range(1500)}

    def stream(ranges: list[tuple[int, int]], partitions: tuple[bytes, ...] = ()) -> set[Any]:
        got: list[Any] = []
        done = client.stream(ranges, 0, got.extend, partitions=partitions, window=3)
        pump.flush()
        assert done.result[0] == len(got)
        keys = {(p, k) for p, k, _ in got}
        assert len(keys) == len(got)
        return keys

    cases = [
        [(2**62, 2**63)],
        [(MAX_TOKEN - 2**61, 2**60)],  # wraps past zero
        [(0, 2**61), (2**63, 2**63 + 2**62)],
        [(MAX_TOKEN, 0)],  # just token 0
        [(12345, 12345)],  # (x, x] is the whole ring
    ]
    for ranges in cases:
        want = {
            (p, k) for p, k in everything if any(in_range(token(p, k), lo, hi) for lo, hi in ranges)
        }
        assert stream(ranges) == want, ranges
    assert stream([]) == everything
    half = [(2**62, 2**63 + 2**62)]
    assert stream(half, (b"users",)) == {
        (p, k) for p, k in everything if p == b"users" and in_range(token(p, k), *half[0])
    }
    assert 0 < len(stream(half)) < len(everything)


# Client timeouts and lost connections ---------------------------------------------------


def bare_client(
    clock: Clock, request_timeout: float = 5.0, connected: bool = False
) -> tuple[DataClientProtocol, StringTransport]:
    """A client on a string transport with no server behind it."""
    client = DataClientProtocol(SECRET, "m", clock, request_timeout)
    client.ready.addErrback(lambda f: None)  # no handshake will ever happen
    transport = StringTransport()
    client.makeConnection(transport)
    client.connected_ok = connected
    return client, transport


def test_unanswered_request_times_out(clock: Clock) -> None:
    """A request the server never answers fails with RequestTimeout, and not before its time."""
    client, _ = bare_client(clock, 5.0)
    first = client.request(wire.Ping())
    clock.advance(3.0)
    second = client.request(wire.Ping())
    failures: list[Failure] = []
    first.addErrback(failures.append)
    second.addErrback(failures.append)
    clock.advance(1.9)  # 4.9 s after the first request
    assert failures == []
    clock.advance(5.0 * 0.25 + 0.01)  # past the deadline plus one scan interval
    assert len(failures) == 1 and failures[0].check(RequestTimeout)
    assert not second.called
    clock.advance(5.0)
    assert len(failures) == 2 and failures[1].check(RequestTimeout)
    assert client.pending == {}
    client.connectionLost(None)


def test_late_reply_after_timeout_is_ignored(clock: Clock) -> None:
    """A reply arriving after its request timed out is dropped without error."""
    client, _ = bare_client(clock, 1.0, connected=True)
    d = client.request(wire.Ping())
    failures: list[Failure] = []
    d.addErrback(failures.append)
    clock.advance(2.0)
    assert failures[0].check(RequestTimeout)
    client.dataReceived(wire.Pong("up", 0).frame(1))
    assert client.pending == {}
    client.connectionLost(None)


def test_result_frames_split_anywhere_reach_their_requests(clock: Clock) -> None:
    """Results read in place, however the stream is cut, answer the right requests."""
    client, _ = bare_client(clock, 5.0, connected=True)
    got: list[Any] = []
    first, second = client.request(wire.Ping()), client.request(wire.Ping())
    first.addCallback(got.append)
    second.addCallback(got.append)
    data = wire.Result(Status.STORED, b"").frame(2) + wire.Result(Status.OK, b"rec").frame(1)
    client.dataReceived(data[:11])
    client.dataReceived(data[11:20])
    client.dataReceived(data[20:])
    assert [(r.status, r.packed) for r in got] == [(Status.STORED, b""), (Status.OK, b"rec")]
    assert client.pending == {}
    client.connectionLost(None)


def test_a_connection_lost_mid_batch_answers_each_request_once(clock: Clock) -> None:
    """A reply handler that loses the connection fails the rest once; their replies later
    in the same chunk find nothing pending."""
    client, _ = bare_client(clock, 5.0, connected=True)
    first, second = client.request(wire.Ping()), client.request(wire.Ping())
    outcomes: list[Any] = []
    first.addCallback(lambda r: (outcomes.append(r.status), client.connectionLost(None)))
    second.addBoth(outcomes.append)
    client.dataReceived(wire.Result(Status.OK, b"").frame(1) + wire.Result(Status.OK, b"").frame(2))
    assert outcomes[0] == Status.OK
    assert len(outcomes) == 2 and outcomes[1].check(NodeUnavailable)


def test_a_malformed_result_closes_the_connection(clock: Clock) -> None:
    """A Result whose inner length disagrees with its frame is a broken stream: abort."""
    client, transport = bare_client(clock, 5.0, connected=True)
    d = client.request(wire.Ping())
    failures: list[Failure] = []
    d.addErrback(failures.append)
    body = bytes([Status.OK]) + (10).to_bytes(4, "little") + b"abc"
    with captured_logs() as logs:
        client.dataReceived(wire.FRAME.pack(5 + len(body), wire.Result.OPCODE, 1) + body)
    assert transport.disconnecting or not transport.connected
    assert any("malformed Result" in formatEvent(e) for e in logs)
    client.connectionLost(None)
    assert failures and failures[0].check(NodeUnavailable)


def test_a_result_during_a_stream_still_answers_its_request(clock: Clock) -> None:
    """With a stream open, a Result goes the general way and still reaches its request."""
    client, _ = bare_client(clock, 5.0, connected=True)
    client.stream([], 0, lambda records: None)
    d = client.request(wire.Ping())
    got: list[Any] = []
    d.addCallback(got.append)
    client.dataReceived(wire.Result(Status.OK, b"x").frame(2))
    assert got and got[0].packed == b"x"
    client.connectionLost(None)


def test_stalled_stream_times_out_and_is_cancelled(clock: Clock) -> None:
    """A stream that receives nothing while owed batches fails and sends Cancel."""
    client, transport = bare_client(clock, 2.0, connected=True)
    done = client.stream([], 0, lambda records: None, window=2)
    transport.clear()
    failures: list[Failure] = []
    done.addErrback(failures.append)
    clock.advance(3.0)
    assert failures and failures[0].check(RequestTimeout)
    [(op, rid, _)] = wire.FrameReader().feed(transport.value())
    assert op == wire.Cancel.OPCODE and rid == 1
    client.connectionLost(None)


def test_connection_lost_fails_everything_pending(clock: Clock) -> None:
    """Losing the connection fails requests, streams and the handshake with NodeUnavailable."""
    client = DataClientProtocol(SECRET, "m", clock)
    client.makeConnection(StringTransport())
    lost: list[DataClientProtocol] = []
    client.on_lost = lost.append
    results: list[Failure] = []
    for _ in range(3):
        client.request(wire.Ping()).addErrback(results.append)
    client.stream([], 0, lambda records: None).addErrback(results.append)
    client.ready.addErrback(results.append)
    client.connectionLost(None)
    assert len(results) == 5
    assert all(f.check(NodeUnavailable) for f in results)
    assert client.pending == {} and client.streams == {}
    assert lost == [client]
    assert not clock.getDelayedCalls()  # the timeout scan stopped


def test_server_loss_through_iosim_fails_pending_requests(node: DataNode, clock: Clock) -> None:
    """When the node closes the connection, requests still in flight fail with NodeUnavailable."""
    client, server, pump = connect(node, clock)
    d = client.request(wire.Ping())
    failures: list[Failure] = []
    d.addErrback(failures.append)
    server.transport.loseConnection()
    pump.flush()
    assert failures and failures[0].check(NodeUnavailable)
    assert node.connections == set()


def test_stats_reply_lists_the_counters(node: DataNode) -> None:
    """Stats answers with name/value pairs including the connection and error counters."""
    conn = authed(node)
    conn.call(apply_msg(b"k"), 1)
    reply = conn.call(wire.Stats(), 2)
    pairs = reply.pairs
    stats = {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs), 2)}
    assert stats["node_id"] == "data-1"
    assert stats["curr_connections"] == "1"
    assert stats["cmd_apply"] == "1"
    assert stats["records"] == "1"
    assert stats["engine"] == "memory"


# The callback hot path: requests answered by plain functions instead of Deferreds.


def attached_client(client: DataClientProtocol, clock: Clock) -> Any:
    """A DataNodeClient whose connection is ``client`` (its own service never starts)."""
    from twisted.internet.testing import MemoryReactor

    from kvha.data.client import DataNodeClient

    owner = DataNodeClient(MemoryReactor(), "tcp:127.0.0.1:1", SECRET, clock=clock)
    owner.protocol = client
    return owner


def test_callback_requests_store_and_read_through_iosim(node: DataNode, clock: Clock) -> None:
    client, server, pump = connect(node, clock)
    owner = attached_client(client, clock)
    got: list[Any] = []
    packed = pack(b"value", version_from_millis(NOW_MS), 7, 0)
    owner.apply_cb(b"p", b"k", packed, got.append, got.append)
    pump.flush()
    owner.get_cb(b"p", b"k", got.append, got.append)
    owner.get_cb(b"p", b"missing", got.append, got.append)
    pump.flush()
    assert got[0].status is Status.STORED
    assert (got[1].value, got[1].flags) == (b"value", 7)
    assert got[2] is None
    assert client.pending == {}


def test_an_apply_stored_as_sent_is_not_sent_back(node: DataNode, clock: Clock) -> None:
    """The Result of an Apply carries no record when the node stored the one it was sent.

    The client gives its caller the record it sent; a STALE reply still
    carries the newer record the node kept, and a version-0 record the one
    the node versioned.
    """
    conn = authed(node)
    value = b"v" * 10_000
    sent = pack(value, version_from_millis(NOW_MS), 3, 0)
    reply = conn.call(wire.Apply(b"p", b"k", sent))
    assert (reply.status, reply.packed) == (Status.STORED, b"")
    older = pack(b"old", version_from_millis(NOW_MS - 1000), 0, 0)
    reply = conn.call(wire.Apply(b"p", b"k", older))
    assert reply.status == Status.STALE and reply.packed == sent
    reply = conn.call(wire.Apply(b"p", b"fresh", pack(b"x", 0)))
    assert reply.status == Status.STORED and unpack(reply.packed).version > 0

    client, server, pump = connect(node, clock)
    owner = attached_client(client, clock)
    got: list[Any] = []
    newer = pack(value, version_from_millis(NOW_MS + 1), 4, 0)
    owner.apply_cb(b"p", b"k", newer, got.append, got.append)
    d = owner.apply(b"p", b"k2", sent)
    pump.flush()
    assert got[0].status is Status.STORED and got[0].packed is newer
    assert d.result.status is Status.STORED and d.result.record.flags == 3
    assert d.result.packed is sent


def test_apply_many_applies_every_record_in_order(node: DataNode) -> None:
    conn = authed(node)
    v1, v2 = version_from_millis(NOW_MS), version_from_millis(NOW_MS + 1)
    keep = pack(b"newer", v2)
    node.store.apply(b"p", b"kept", keep)
    records = [pack(b"a", v1), pack(b"b", v1), pack(b"first", v1), pack(b"second", v2)]
    records.append(pack(b"old", v1))
    keys = [b"a", b"b", b"dup", b"dup", b"kept"]
    reply = conn.call(wire.ApplyMany(b"p", keys, records))
    assert isinstance(reply, wire.Results)
    assert list(reply.statuses) == [Status.STORED] * 4 + [Status.STALE]
    assert reply.packed == [b"", b"", b"", b"", keep]  # only the record the node kept instead
    store = node.store
    assert [store.get(b"p", k).value for k in (b"a", b"b", b"dup", b"kept")] == [
        b"a",
        b"b",
        b"second",
        b"newer",
    ]


@pytest.mark.parametrize(
    "keys, records, why",
    [
        ([b"a", b"b"], [b"x" * HEADER_SIZE], "2 keys but 1 records"),
        ([b"a", b"b"], [b"x" * HEADER_SIZE, b"short"], "shorter than its header"),
    ],
)
def test_a_bad_apply_many_stores_nothing(
    node: DataNode, keys: list[bytes], records: list[bytes], why: str
) -> None:
    conn = authed(node)
    v = pack(b"v", version_from_millis(NOW_MS))
    records = [v if len(r) == HEADER_SIZE else r for r in records]
    reply = conn.call(wire.ApplyMany(b"p", keys, records))
    assert_error(reply, wire.E_BAD_REQUEST)
    assert why in reply.message
    assert node.store.get(b"p", b"a") is None
    assert conn.call(wire.Ping()).__class__ is wire.Pong  # the connection stays usable


def test_apply_many_through_the_client(node: DataNode, clock: Clock) -> None:
    client, server, pump = connect(node, clock)
    owner = attached_client(client, clock)
    got: list[Any] = []
    records = [pack(b"v%d" % i, version_from_millis(NOW_MS, i)) for i in range(3)]
    owner.apply_many_cb(b"p", [b"k0", b"k1", b"k2"], records, got.append, got.append)
    pump.flush()
    [results] = got
    assert [r.status for r in results] == [Status.STORED] * 3
    assert [r.packed for r in results] == records
    assert node.store.get(b"p", b"k2").value == b"v2"
    assert node.ops["apply_many"] == 1 and "apply" not in node.ops


def test_apply_many_falls_back_to_one_apply_each_on_an_older_node(
    node: DataNode, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node that answers "unknown opcode" gets single Applies, now and later."""
    from kvha.data import server as server_module

    handlers = dict(server_module._HANDLERS)
    del handlers[wire.ApplyMany.OPCODE]
    monkeypatch.setattr(server_module, "_HANDLERS", handlers)
    client, server, pump = connect(node, clock)
    owner = attached_client(client, clock)
    got: list[Any] = []
    for round_ in range(2):
        records = [pack(b"r%d" % round_, version_from_millis(NOW_MS, round_))] * 2
        owner.apply_many_cb(b"p", [b"a", b"b"], records, got.append, got.append)
        pump.flush()
        assert [r.status for r in got[-1]] == [Status.STORED] * 2
    assert not owner.apply_many_supported
    assert node.store.get(b"p", b"b").value == b"r1"
    assert node.ops["apply"] == 4


def test_apply_many_fails_every_record_when_the_connection_is_lost(clock: Clock) -> None:
    bare, _ = bare_client(clock, 5.0, connected=True)
    owner = attached_client(bare, clock)
    errors: list[BaseException] = []
    owner.apply_many_cb(b"p", [b"a"], [b"x" * HEADER_SIZE], errors.append, errors.append)
    bare.connectionLost(None)
    assert [type(e) for e in errors] == [NodeUnavailable]


def test_callback_request_without_a_connection_fails_at_once(clock: Clock) -> None:
    from twisted.internet.testing import MemoryReactor

    from kvha.data.client import DataNodeClient

    owner = DataNodeClient(MemoryReactor(), "tcp:127.0.0.1:1", SECRET, clock=clock)
    errors: list[BaseException] = []
    owner.get_cb(b"p", b"k", lambda r: None, errors.append)
    owner.apply_cb(b"p", b"k", b"x" * HEADER_SIZE, lambda r: None, errors.append)
    assert [type(e) for e in errors] == [NodeUnavailable, NodeUnavailable]


def test_callback_requests_fail_on_error_timeout_and_loss(node: DataNode, clock: Clock) -> None:
    client, server, pump = connect(node, clock)
    owner = attached_client(client, clock)
    errors: list[BaseException] = []
    owner.apply_cb(b"p", b"k", b"short", lambda r: None, errors.append)  # shorter than a header
    pump.flush()
    assert isinstance(errors[0], DataNodeError) and errors[0].code == wire.E_BAD_REQUEST
    bare, _ = bare_client(clock, 1.0, connected=True)
    lonely = attached_client(bare, clock)
    lonely.get_cb(b"p", b"k", lambda r: None, errors.append)
    clock.advance(2.0)
    assert isinstance(errors[1], RequestTimeout)
    lonely.get_cb(b"p", b"k", lambda r: None, errors.append)
    bare.connectionLost(None)
    assert isinstance(errors[2], NodeUnavailable)


def test_a_raising_reply_function_is_logged_and_spares_the_connection(
    node: DataNode, clock: Clock
) -> None:
    client, server, pump = connect(node, clock)
    owner = attached_client(client, clock)
    got: list[Any] = []

    def broken(result: Any) -> None:
        raise RuntimeError("bug in a reply handler")

    with captured_logs() as logs:
        owner.get_cb(b"p", b"a", broken, got.append)
        owner.get_cb(b"p", b"b", got.append, got.append)
        pump.flush()
    assert got == [None]  # the second request is still answered
    assert client.connected_ok and client.pending == {}
    assert any("reply handler failed" in formatEvent(e) for e in logs)
