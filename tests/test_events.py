"""kvha.events.dispatch handles a plain read exactly as Twisted's own path does.

Each case runs twice over a fresh UNIX socket pair wrapped in a real
``tcp.Server`` on an unstarted KvhaEPollReactor (no network): once through
:func:`dispatch`, once through the reactor's ``_doReadOrWrite``, and the
protocol must see the same calls both times.
"""

from __future__ import annotations

import select
import socket
from typing import Any, Callable

import pytest
from twisted.internet import error, tcp
from twisted.internet.protocol import Protocol
from twisted.python import failure

from kvha import events
from kvha.reactor import KvhaEPollReactor

CLEAN = failure.Failure(error.ConnectionDone())


class Recorder(Protocol):
    def __init__(self, fail_on: bytes = b"") -> None:
        self.seen: list[Any] = []
        self.fail_on = fail_on

    def dataReceived(self, data: bytes) -> None:
        self.seen.append(("data", data))
        if self.fail_on and self.fail_on in data:
            raise ValueError("bad input")

    def connectionLost(self, reason: failure.Failure = CLEAN) -> None:
        self.seen.append(("lost", reason.type))


@pytest.fixture
def reactor() -> Any:
    r = KvhaEPollReactor()
    yield r
    r.removeAll()
    r._poller.close()


def server_over_pair(reactor: Any, proto: Protocol) -> tuple[tcp.Server, socket.socket]:
    ours, theirs = socket.socketpair()
    transport = tcp.Server(ours, proto, ("peer", 0), None, 1, reactor)
    proto.makeConnection(transport)
    return transport, theirs


def run_case(
    reactor: Any,
    how: str,
    feed: Callable[[socket.socket], None],
    event: int = select.EPOLLIN,
    fail_on: bytes = b"",
) -> tuple[list[Any], tcp.Server]:
    proto = Recorder(fail_on)
    transport, peer = server_over_pair(reactor, proto)
    feed(peer)
    fd = transport.fileno()
    if how == "kvha":
        events.dispatch(reactor, [(fd, event)], reactor._selectables)
    else:
        reactor._doReadOrWrite(transport, fd, event)
    peer.close()
    return proto.seen, transport


def both(reactor: Any, feed: Callable[[socket.socket], None], **kw: Any) -> list[Any]:
    ours, _ = run_case(reactor, "kvha", feed, **kw)
    twisted, _ = run_case(reactor, "twisted", feed, **kw)
    assert ours == twisted
    return ours


def test_bytes_reach_the_protocol(reactor: Any) -> None:
    seen = both(reactor, lambda peer: peer.sendall(b"*1\r\n$4\r\nPING\r\n"))
    assert seen == [("data", b"*1\r\n$4\r\nPING\r\n")]


def test_a_close_is_a_clean_connection_lost(reactor: Any) -> None:
    seen = both(reactor, lambda peer: peer.shutdown(socket.SHUT_WR))
    assert seen == [("lost", error.ConnectionDone)]


def test_nothing_to_read_is_no_event(reactor: Any) -> None:
    proto = Recorder()
    transport, peer = server_over_pair(reactor, proto)
    events.dispatch(reactor, [(transport.fileno(), select.EPOLLIN)], reactor._selectables)
    assert proto.seen == []
    assert transport.connected and not transport.disconnected
    assert transport in reactor.getReaders()
    peer.close()


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
    reactor: Any, logged: list[Any]
) -> None:
    seen = both(reactor, lambda peer: peer.sendall(b"boom"), fail_on=b"boom")
    assert seen == [("data", b"boom"), ("lost", ValueError)]
    assert [e["failure"].type for e in logged] == [ValueError, ValueError]  # one per path


def test_other_events_take_twisteds_path(reactor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, int, int]] = []
    monkeypatch.setattr(reactor, "_doReadOrWrite", lambda s, fd, ev: calls.append((s, fd, ev)))
    proto = Recorder()
    transport, peer = server_over_pair(reactor, proto)
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
    peer.close()


def test_an_aborted_connection_reads_nothing(reactor: Any) -> None:
    proto = Recorder()
    transport, peer = server_over_pair(reactor, proto)
    peer.sendall(b"late")
    transport.abortConnection()
    fd = transport.fileno()
    events.dispatch(reactor, [(fd, select.EPOLLIN)], {fd: transport})
    assert proto.seen == []
    peer.close()
