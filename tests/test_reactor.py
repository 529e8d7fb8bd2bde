"""kvha.reactor: events dispatched as Twisted's epoll reactor does, without the log context.

The reactor is created, not installed, and polled by hand over a pipe (no
network).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.abstract import FileDescriptor
from twisted.logger import globalLogPublisher

from kvha.reactor import KvhaEPollReactor


class PipeReader(FileDescriptor):
    """Reads a pipe's bytes into ``got``; ``explode`` makes doRead raise."""

    def __init__(self, reactor: Any, fd: int, explode: bool = False) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.explode = explode
        self.got = b""
        self.lost: list[Any] = []
        self.connected = True

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        if self.explode:
            raise RuntimeError("a handler bug")
        self.got += os.read(self.fd, 1024)
        return None

    def connectionLost(self, reason: Any) -> None:
        self.lost.append(reason)


@pytest.fixture
def reactor() -> Iterator[KvhaEPollReactor]:
    r = KvhaEPollReactor()
    yield r
    r._poller.close()  # type: ignore[attr-defined]


def test_a_readable_descriptor_gets_its_doread(reactor: KvhaEPollReactor) -> None:
    rfd, wfd = os.pipe()
    try:
        reader = PipeReader(reactor, rfd)
        reactor.addReader(reader)
        reactor.doPoll(0)
        assert reader.got == b""  # nothing to read yet
        os.write(wfd, b"hello")
        reactor.doPoll(1.0)
        assert reader.got == b"hello"
        assert reactor.doIteration == reactor.doPoll
        reactor.removeReader(reader)
    finally:
        os.close(wfd)
        os.close(rfd)


def test_a_raising_handler_is_logged_and_its_descriptor_dropped(
    reactor: KvhaEPollReactor,
) -> None:
    """As in Twisted's reactor: the error is logged, that connection is lost, others go on."""
    bad_r, bad_w = os.pipe()
    good_r, good_w = os.pipe()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        bad = PipeReader(reactor, bad_r, explode=True)
        good = PipeReader(reactor, good_r)
        reactor.addReader(bad)
        reactor.addReader(good)
        os.write(bad_w, b"x")
        os.write(good_w, b"y")
        reactor.doPoll(1.0)
        assert good.got == b"y"
        assert len(bad.lost) == 1
        assert bad not in reactor.getReaders()
        assert good in reactor.getReaders()
        failures = [e.get("log_failure") or e.get("failure") for e in events]
        assert any(f is not None and f.check(RuntimeError) for f in failures), events
        reactor.removeReader(good)
    finally:
        globalLogPublisher.removeObserver(events.append)
        for fd in (bad_r, bad_w, good_r, good_w):
            os.close(fd)


def test_the_plugin_names_this_module() -> None:
    """``twistd --reactor=kvha`` finds the installer through the plugin."""
    from twisted.application.reactors import getReactorTypes

    kvha = [r for r in getReactorTypes() if r.shortName == "kvha"]
    assert len(kvha) == 1
    assert kvha[0].moduleName == "kvha.reactor"


def test_turn_end_calls_run_once_before_the_next_wait(reactor: KvhaEPollReactor) -> None:
    """After the turn's events, before the poll; a call added by one runs in the same pass."""
    rfd, wfd = os.pipe()
    order: list[str] = []

    class Reader(PipeReader):
        def doRead(self) -> Any:
            order.append("read")
            reactor.call_at_turn_end(lambda: order.append("end"))
            return super().doRead()

    try:
        reader = Reader(reactor, rfd)
        reactor.addReader(reader)
        os.write(wfd, b"x")
        reactor.doPoll(1.0)
        assert order == ["read"]  # held until the turn is over
        reactor.call_at_turn_end(lambda: reactor.call_at_turn_end(lambda: order.append("nested")))
        reactor.doPoll(0)
        assert order == ["read", "end", "nested"]
        reactor.doPoll(0)
        assert order == ["read", "end", "nested"]  # each runs once
        reactor.removeReader(reader)
    finally:
        os.close(wfd)
        os.close(rfd)


def test_a_raising_turn_end_call_is_logged_and_the_rest_still_run(
    reactor: KvhaEPollReactor,
) -> None:
    events: list[dict[str, Any]] = []
    ran: list[int] = []
    globalLogPublisher.addObserver(events.append)
    try:
        reactor.call_at_turn_end(lambda: 1 / 0)  # type: ignore[func-returns-value]
        reactor.call_at_turn_end(lambda: ran.append(1))
        reactor.doPoll(0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert ran == [1]
    failures = [e.get("log_failure") for e in events]
    assert any(f is not None and f.check(ZeroDivisionError) for f in failures), events


def test_a_timed_call_made_at_turn_end_shortens_the_wait(reactor: KvhaEPollReactor) -> None:
    """The wait was computed before the turn-end calls ran; one that schedules must not block."""
    import time

    fired: list[bool] = []
    reactor.call_at_turn_end(lambda: reactor.callLater(0, fired.append, True))
    began = time.monotonic()
    reactor.doPoll(5.0)  # would block 5 s on the stale timeout
    assert time.monotonic() - began < 1.0
    reactor.runUntilCurrent()
    assert fired == [True]


def test_the_flusher_uses_the_turn_end_list_not_a_timed_call(reactor: KvhaEPollReactor) -> None:
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import StringTransport

    from kvha.flush import BufferedWrites, TurnFlusher

    class Writer(BufferedWrites, Protocol):
        pass

    flusher = TurnFlusher(reactor)
    w = Writer()
    w.flusher = flusher
    w.makeConnection(StringTransport())
    w.out(b"a")
    w.out(b"b")
    assert reactor.getDelayedCalls() == []
    assert w.transport.value() == b""
    reactor.doPoll(0)
    assert w.transport.value() == b"ab"
    assert (flusher.turns, flusher.flushes) == (1, 1)
    # Flushed early (shutdown), then the turn-end call finds nothing left.
    w.out(b"c")
    flusher.flush()
    reactor.doPoll(0)
    assert w.transport.value() == b"abc"
    assert (flusher.turns, flusher.flushes) == (2, 2)
