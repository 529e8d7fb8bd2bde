"""kvha.flush: direct sends that keep Twisted's order and back-pressure, one send per turn."""

from __future__ import annotations

from typing import Any, Optional

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from kvha.flush import BufferedWrites, TurnFlusher, direct_socket, send_now
from tests.inprocess import Cluster
from tests.test_resp_protocol import encode


class FakeSocket:
    """A socket whose send() takes at most ``room`` bytes, or raises ``error``."""

    def __init__(self, room: int = 1 << 20, error: Optional[OSError] = None) -> None:
        self.room = room
        self.error = error
        self.sent = b""

    def send(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        n = min(self.room, len(data))
        self.room -= n
        self.sent += data[:n]
        return n


class FakeTCP(StringTransport):
    """What send_now reads of a twisted.internet.tcp.Connection, over a StringTransport."""

    def __init__(self) -> None:
        super().__init__()
        self._tempDataLen = 0
        self.dataBuffer = b""
        self.offset = 0
        self.connected = True

    def write(self, data: bytes) -> None:
        super().write(data)
        self._tempDataLen += len(data)  # queued, as Twisted would until the next turn


def test_send_now_goes_straight_to_the_socket_when_nothing_is_queued() -> None:
    transport, sock = FakeTCP(), FakeSocket()
    send_now(transport, sock, b"+OK\r\n")
    assert sock.sent == b"+OK\r\n"
    assert transport.value() == b""


def test_a_partial_send_queues_the_rest_in_the_transport() -> None:
    transport, sock = FakeTCP(), FakeSocket(room=3)
    send_now(transport, sock, b"abcdefgh")
    assert sock.sent == b"abc"
    assert transport.value() == b"defgh"
    # Later writes must queue behind the rest, never overtake it.
    send_now(transport, sock, b"XYZ")
    assert sock.sent == b"abc"
    assert transport.value() == b"defghXYZ"


def test_a_full_socket_queues_everything() -> None:
    transport, sock = FakeTCP(), FakeSocket(error=BlockingIOError())
    send_now(transport, sock, b"data")
    assert transport.value() == b"data"


def test_a_socket_error_is_left_to_the_transport() -> None:
    transport, sock = FakeTCP(), FakeSocket(error=ConnectionResetError())
    send_now(transport, sock, b"data")
    assert transport.value() == b"data"  # its doWrite will see the error and close


@pytest.mark.parametrize(
    "state",
    [
        {"dataBuffer": b"old", "offset": 0},  # unsent bytes from an earlier turn
        {"connected": False},
        {"disconnecting": True},
    ],
)
def test_send_now_writes_through_the_transport_when_it_must(state: dict[str, Any]) -> None:
    transport, sock = FakeTCP(), FakeSocket()
    for name, value in state.items():
        setattr(transport, name, value)
    send_now(transport, sock, b"new")
    assert sock.sent == b""
    assert transport.value() == b"new"


def test_only_plain_tcp_transports_expose_their_socket() -> None:
    assert direct_socket(StringTransport()) is None
    # A wrapping transport (TLS is one) forwards unknown attributes to the TCP
    # transport under it; its socket would bypass the wrapper.
    inner = StringTransport()
    inner.socket = FakeSocket()  # type: ignore[attr-defined]
    wrapper = ProtocolWrapper(WrappingFactory(Protocol), Protocol())
    wrapper.makeConnection(inner)
    assert wrapper.socket is inner.socket  # type: ignore[attr-defined]
    assert direct_socket(wrapper) is None


class Writer(BufferedWrites, Protocol):
    pass


def test_the_flusher_sends_each_connections_bytes_once_per_turn() -> None:
    clock = Clock()
    flusher = TurnFlusher(clock)
    a, b = Writer(), Writer()
    for proto in (a, b):
        proto.flusher = flusher
        proto.makeConnection(StringTransport())
    a.out(b"1")
    b.out(b"x")
    a.out(b"2")
    a.out(b"3")
    assert a.transport.value() == b"" and b.transport.value() == b""
    clock.advance(0)
    assert a.transport.value() == b"123"
    assert b.transport.value() == b"x"
    assert (flusher.turns, flusher.flushes) == (1, 2)
    a.out(b"4")
    clock.advance(0)
    assert a.transport.value() == b"1234"
    assert (flusher.turns, flusher.flushes) == (2, 3)


def test_early_flush_sends_a_busy_turns_writes_in_groups_in_order() -> None:
    """With early_flush n, every n gathered writes leave at once; the rest at the turn's end."""
    clock = Clock()
    flusher = TurnFlusher(clock)
    w = Writer()
    w.flusher = flusher
    w.early_flush = 3
    w.makeConnection(StringTransport())
    for i in range(7):
        w.out(b"%d" % i)
    assert w.transport.value() == b"012345"  # two groups of three, mid-turn
    clock.advance(0)
    assert w.transport.value() == b"0123456"  # the seventh at the turn's end
    assert (flusher.turns, flusher.flushes) == (1, 1)  # queued once, not per group
    for i in range(3):  # a group that fills exactly: nothing left for the turn's end
        w.out(b"%d" % (7 + i))
    assert w.transport.value() == b"0123456789"
    clock.advance(0)
    assert (flusher.turns, flusher.flushes) == (2, 2)
    w.out(b"a")  # the next turn queues it again
    clock.advance(0)
    assert w.transport.value() == b"0123456789a"


def test_a_data_node_connection_flushes_early_and_others_do_not() -> None:
    from kvha.data.client import EARLY_FLUSH_FRAMES, DataClientProtocol

    assert EARLY_FLUSH_FRAMES > 1
    assert DataClientProtocol(b"s", "m", Clock()).early_flush == EARLY_FLUSH_FRAMES
    assert Writer().early_flush == 0  # client replies: one send per connection per turn


def test_a_stopping_reactor_sends_what_the_last_turn_gathered() -> None:
    # Twisted closes every connection during shutdown; replies gathered for
    # the end of the current turn must leave before that.
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    flusher = TurnFlusher(reactor)
    flusher.flush_before_shutdown(reactor)
    w = Writer()
    w.flusher = flusher
    w.makeConnection(StringTransport())
    w.out(b"+OK\r\n")
    assert w.transport.value() == b""
    [(trigger, args, kwargs)] = reactor.triggers["before"]["shutdown"]
    trigger(*args, **kwargs)
    assert w.transport.value() == b"+OK\r\n"
    # The end-of-turn call is cancelled: nothing is sent twice, nothing is pending.
    assert not reactor.getDelayedCalls()
    reactor.advance(0)
    assert w.transport.value() == b"+OK\r\n"
    assert (flusher.turns, flusher.flushes) == (1, 1)


def test_without_a_flusher_out_writes_at_once() -> None:
    w = Writer()
    w.makeConnection(StringTransport())
    w.out(b"now")
    assert w.transport.value() == b"now"


def test_quit_sends_the_gathered_replies_before_closing() -> None:
    cluster = Cluster(n=3, replicas=1)
    try:
        factory = cluster.resp_factory()
        factory.flusher = TurnFlusher(cluster.clock)
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(encode("SET", "a", "1") + encode("GET", "a") + encode("QUIT"))
        assert transport.disconnecting
        assert transport.value() == b"+OK\r\n$1\r\n1\r\n+OK\r\n"
    finally:
        cluster.stop()


def test_pipelined_replies_leave_in_one_write() -> None:
    cluster = Cluster(n=3, replicas=1)
    try:
        factory = cluster.resp_factory()
        factory.flusher = TurnFlusher(cluster.clock)
        proto = factory.buildProtocol(None)
        writes: list[bytes] = []
        transport = StringTransport()
        real_write = transport.write
        transport.write = lambda data: (writes.append(data), real_write(data))  # type: ignore[method-assign]
        proto.makeConnection(transport)
        proto.dataReceived(b"".join(encode("SET", f"k{i}", i) for i in range(16)))
        proto.dataReceived(b"".join(encode("GET", f"k{i}") for i in range(16)))
        assert writes == []
        cluster.clock.advance(0)
        assert len(writes) == 1
        assert writes[0] == b"+OK\r\n" * 16 + b"".join(
            b"$%d\r\n%d\r\n" % (len(str(i)), i) for i in range(16)
        )
    finally:
        cluster.stop()


def test_send_now_on_a_real_twisted_connection_keeps_order() -> None:
    """Pins the Twisted internals send_now reads, on a real tcp.Connection over a socketpair."""
    import socket

    from twisted.internet import tcp

    from kvha.reactor import KvhaEPollReactor

    reactor = KvhaEPollReactor()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.settimeout(5)
    try:
        conn = tcp.Connection(ours, Protocol(), reactor)
        conn.connected = True
        sock = direct_socket(conn)
        assert sock is ours
        send_now(conn, sock, b"first ")
        assert theirs.recv(100) == b"first "  # sent at once, nothing queued
        conn.write(b"queued ")  # Twisted keeps this until the socket is writable
        send_now(conn, sock, b"second")
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(100)  # the second write did not overtake the queued one
        conn.doWrite()
        theirs.settimeout(5)
        assert theirs.recv(100) == b"queued second"
        reactor.removeAll()
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()  # type: ignore[attr-defined]


class Recorder(Protocol):
    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.lost = 0

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost += 1


def test_reads_skip_the_endpoint_and_client_service_wrappers() -> None:
    """read_directly: a real tcp.Connection whose protocol is an endpoint's wrapper around
    ClientService's proxy hands reads straight to the protocol; losing the connection still
    reaches the service through the proxy."""
    import socket

    from twisted.application._client_service import _ReconnectingProtocolProxy
    from twisted.internet import tcp
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import _WrappingProtocol
    from twisted.python.failure import Failure

    from kvha.flush import read_directly
    from kvha.reactor import KvhaEPollReactor

    reactor = KvhaEPollReactor()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    try:
        recorder, lost = Recorder(), []
        proxy = _ReconnectingProtocolProxy(recorder, lost.append)
        wrapper = _WrappingProtocol(Deferred(), proxy)
        conn = tcp.Connection(ours, wrapper, reactor)
        conn.connected = True
        other = Recorder()
        assert not read_directly(conn, other)  # the chain does not end at it
        assert not read_directly(StringTransport(), recorder)  # not plain TCP
        assert "dataReceived" not in wrapper.__dict__
        assert read_directly(conn, recorder)
        assert conn.protocol.dataReceived == recorder.dataReceived
        theirs.send(b"abc")
        conn.doRead()
        assert recorder.got == [b"abc"]
        conn.protocol.connectionLost(Failure(Exception("gone")))
        assert recorder.lost == 1 and len(lost) == 1  # the service still hears of it
        reactor.removeAll()
    finally:
        ours.close()
        theirs.close()
        reactor._poller.close()  # type: ignore[attr-defined]
