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
