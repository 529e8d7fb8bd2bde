"""kvha.events.dispatch handles a plain read exactly as Twisted's own path does.

Each case runs twice over a fresh UNIX socket pair wrapped in a real
``tcp.Server`` on an unstarted KvhaEPollReactor (no network): once through
:func:`dispatch`, once through the reactor's ``_doReadOrWrite``, and the
protocol and the transport must end up the same both times.
"""

from __future__ import annotations

import errno
import select
import socket
from typing import Any, Callable, Optional

import pytest
from twisted.internet import error, tcp
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python import failure
from zope.interface import implementer

from kvha import events
from kvha.reactor import KvhaEPollReactor

CLEAN = failure.Failure(error.ConnectionDone())


class Recorder(Protocol):
    def __init__(self, fail_with: Optional[BaseException] = None, returns: Any = None) -> None:
        self.seen: list[Any] = []
        self.fail_with = fail_with
        self.returns = returns

    def dataReceived(self, data: bytes) -> Any:
        self.seen.append(("data", data))
        if self.fail_with is not None:
            raise self.fail_with
        return self.returns

    def connectionLost(self, reason: failure.Failure = CLEAN) -> None:
        self.seen.append(("lost", reason.type))


@implementer(IHalfCloseableProtocol)
class HalfCloser(Recorder):
    def readConnectionLost(self) -> None:
        self.seen.append("read side closed")

    def writeConnectionLost(self) -> None:
        self.seen.append("write side closed")


@pytest.fixture
def reactor() -> Any:
    r = KvhaEPollReactor()
    yield r
    r.removeAll()
    r._poller.close()


@pytest.fixture
def pairs(reactor: Any) -> Any:
    """Every socket a test opened, closed at its end (once the reactor lets go of them)."""
    opened: list[socket.socket] = []
    yield opened
    reactor.removeAll()
    for s in opened:
        s.close()


def server_over_pair(
    reactor: Any, proto: Protocol, opened: list[socket.socket]
) -> tuple[tcp.Server, socket.socket]:
    ours, theirs = socket.socketpair()
    opened += [ours, theirs]
    transport = tcp.Server(ours, proto, ("peer", 0), None, 1, reactor)
    proto.makeConnection(transport)
    return transport, theirs


def outcome(proto: Recorder, transport: tcp.Server, reactor: Any) -> tuple[Any, ...]:
    return (
        proto.seen,
        bool(transport.connected),
        bool(transport.disconnected),
        transport in reactor.getReaders(),
    )


def run_case(
    reactor: Any,
    opened: list[socket.socket],
    how: str,
    feed: Callable[[socket.socket], None],
    make: Callable[[], Recorder],
    event: int = select.EPOLLIN,
) -> tuple[Any, ...]:
    proto = make()
    transport, peer = server_over_pair(reactor, proto, opened)
    feed(peer)
    fd = transport.fileno()
    if how == "kvha":
        events.dispatch(reactor, [(fd, event)], reactor._selectables)
    else:
        reactor._doReadOrWrite(transport, fd, event)
    return outcome(proto, transport, reactor)


def both(
    reactor: Any,
    opened: list[socket.socket],
    feed: Callable[[socket.socket], None],
    make: Callable[[], Recorder] = Recorder,
) -> tuple[Any, ...]:
    ours = run_case(reactor, opened, "kvha", feed, make)
    twisted = run_case(reactor, opened, "twisted", feed, make)
    assert ours == twisted
    return ours


def test_a_plain_read_does_not_go_through_twisteds_path(
    reactor: Any, pairs: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    slow: list[Any] = []
    monkeypatch.setattr(reactor, "_doReadOrWrite", lambda *a: slow.append(a))
    proto = Recorder()
    transport, peer = server_over_pair(reactor, proto, pairs)
    peer.sendall(b"*1\r\n$4\r\nPING\r\n")
    events.dispatch(reactor, [(transport.fileno(), select.EPOLLIN)], reactor._selectables)
    assert slow == []
    assert proto.seen == [("data", b"*1\r\n$4\r\nPING\r\n")]


def test_bytes_reach_the_protocol(reactor: Any, pairs: list[socket.socket]) -> None:
    seen = both(reactor, pairs, lambda peer: peer.sendall(b"*1\r\n$4\r\nPING\r\n"))
    assert seen == ([("data", b"*1\r\n$4\r\nPING\r\n")], True, False, True)


def test_one_read_takes_at_most_bufferSize_bytes(reactor: Any, pairs: list[socket.socket]) -> None:
    proto = Recorder()
    transport, peer = server_over_pair(reactor, proto, pairs)
    transport.bufferSize = 3
    peer.sendall(b"hello")
    fd = transport.fileno()
    for _ in range(2):
        events.dispatch(reactor, [(fd, select.EPOLLIN)], reactor._selectables)
    assert proto.seen == [("data", b"hel"), ("data", b"lo")]


def test_a_close_is_a_clean_connection_lost(reactor: Any, pairs: list[socket.socket]) -> None:
    seen = both(reactor, pairs, lambda peer: peer.shutdown(socket.SHUT_WR))
    assert seen == ([("lost", error.ConnectionDone)], False, True, False)


def test_a_half_closeable_protocol_hears_of_a_half_close(
    reactor: Any, pairs: list[socket.socket]
) -> None:
    seen = both(reactor, pairs, lambda peer: peer.shutdown(socket.SHUT_WR), HalfCloser)
    assert seen == (["read side closed"], True, False, False)


def test_nothing_to_read_is_no_event(reactor: Any, pairs: list[socket.socket]) -> None:
    seen = both(reactor, pairs, lambda peer: None)
    assert seen == ([], True, False, True)


class FailingSocket:
    """A socket whose recv fails with ``code``."""

    def __init__(self, real: socket.socket, code: int) -> None:
        self.real = real
        self.code = code

    def recv(self, size: int) -> bytes:
        raise OSError(self.code, errno.errorcode[self.code])

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_a_reset_is_a_lost_connection(reactor: Any, pairs: list[socket.socket]) -> None:
    results = []
    for how in ("kvha", "twisted"):
        proto = Recorder()
        transport, _peer = server_over_pair(reactor, proto, pairs)
        fd = transport.fileno()
        transport.socket = FailingSocket(transport.socket, errno.ECONNRESET)
        if how == "kvha":
            events.dispatch(reactor, [(fd, select.EPOLLIN)], reactor._selectables)
        else:
            reactor._doReadOrWrite(transport, fd, select.EPOLLIN)
        results.append(outcome(proto, transport, reactor))
    assert results[0] == results[1]
    assert results[0] == ([("lost", error.ConnectionLost)], False, True, False)


@pytest.fixture
def logged() -> Any:
    """Errors reported through Twisted's legacy ``log.err``, as both paths do."""
    from twisted.python import log

    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("isError"):
            seen.append(event)

    log.addObserver(observer)
    yield seen
    log.removeObserver(observer)


def test_what_dataReceived_raises_is_logged_and_disconnects(
    reactor: Any, pairs: list[socket.socket], logged: list[Any]
) -> None:
    seen = both(reactor, pairs, lambda peer: peer.sendall(b"boom"), lambda: Recorder(ValueError()))
    assert seen == ([("data", b"boom"), ("lost", ValueError)], False, True, False)
    assert [e["failure"].type for e in logged] == [ValueError, ValueError]  # one per path


def test_a_raised_connection_done_is_not_taken_for_a_half_close(
    reactor: Any, pairs: list[socket.socket], logged: list[Any]
) -> None:
    """An exception from dataReceived is not a read that ended: the whole connection goes."""
    seen = both(
        reactor,
        pairs,
        lambda peer: peer.sendall(b"x"),
        lambda: HalfCloser(error.ConnectionDone()),
    )
    assert seen == ([("data", b"x"), ("lost", error.ConnectionDone)], False, True, False)


def test_a_value_returned_by_dataReceived_is_treated_as_twisted_does(
    reactor: Any, pairs: list[socket.socket]
) -> None:
    """Before Twisted 26.10 a true value disconnects (PyPy's Twisted); since, it is ignored."""
    with pytest.warns() if events.PASS_ON_RETURN else _nothing():
        seen = both(
            reactor,
            pairs,
            lambda peer: peer.sendall(b"x"),
            lambda: Recorder(returns=error.ConnectionLost()),
        )
    if events.PASS_ON_RETURN:
        assert seen == ([("data", b"x"), ("lost", error.ConnectionLost)], False, True, False)
    else:
        assert seen == ([("data", b"x")], True, False, True)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def test_other_events_take_twisteds_path(
    reactor: Any, pairs: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, int, int]] = []
    monkeypatch.setattr(reactor, "_doReadOrWrite", lambda s, fd, ev: calls.append((s, fd, ev)))
    proto = Recorder()
    transport, peer = server_over_pair(reactor, proto, pairs)
    peer.sendall(b"x")
    fd = transport.fileno()
    both_ways = select.EPOLLIN | select.EPOLLOUT
    events.dispatch(reactor, [(fd, both_ways), (fd, select.EPOLLHUP)], reactor._selectables)
    assert calls == [(transport, fd, both_ways), (transport, fd, select.EPOLLHUP)]
    # A connection whose doRead is replaced (an aborted one, a client still
    # connecting) is not read here either.
    transport.doRead = lambda: None  # type: ignore[method-assign]
    events.dispatch(reactor, [(fd, select.EPOLLIN)], reactor._selectables)
    assert calls[-1] == (transport, fd, select.EPOLLIN)
    assert proto.seen == []
    # An fd the reactor no longer watches is skipped.
    events.dispatch(reactor, [(10_000, select.EPOLLIN)], reactor._selectables)
    assert len(calls) == 3


def test_several_events_in_one_turn_and_a_connection_closed_by_an_earlier_one(
    reactor: Any, pairs: list[socket.socket]
) -> None:
    first, second = Recorder(), Recorder()
    t1, p1 = server_over_pair(reactor, first, pairs)
    t2, p2 = server_over_pair(reactor, second, pairs)
    p1.sendall(b"one")
    p2.sendall(b"two")
    # The first connection's handler closes the second one at once.
    first.dataReceived = lambda data: (  # type: ignore[method-assign]
        first.seen.append(("data", data)),
        reactor.removeReader(t2),
        t2.connectionLost(CLEAN),
    )[0]
    fds = [(t1.fileno(), select.EPOLLIN), (t2.fileno(), select.EPOLLIN)]
    events.dispatch(reactor, fds, reactor._selectables)
    assert first.seen == [("data", b"one")]
    assert second.seen == [("lost", error.ConnectionDone)]  # never read after its close


def test_an_aborted_connection_reads_nothing(reactor: Any, pairs: list[socket.socket]) -> None:
    proto = Recorder()
    transport, peer = server_over_pair(reactor, proto, pairs)
    peer.sendall(b"late")
    transport.abortConnection()
    fd = transport.fileno()
    events.dispatch(reactor, [(fd, select.EPOLLIN)], {fd: transport})
    assert proto.seen == []
