"""Tests for kvha.lb.vip without a network: the gratuitous ARP frame and VipHolder's steps."""

from __future__ import annotations

import socket
import subprocess
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock

from kvha.lb.vip import ARP_BODY, ARP_FRAME, ETH_P_ARP, VipHolder, gratuitous_arp

MAC = bytes.fromhex("02aabbccddee")


def test_gratuitous_arp_is_an_rfc5944_reply_that_linux_accepts_as_gratuitous() -> None:
    """Broadcast ARP reply with sender and target both the VIP and the holder's MAC."""
    frame = gratuitous_arp("10.77.0.100", MAC)
    assert len(frame) == ARP_FRAME.size + ARP_BODY.size == 42
    dst, src, ethertype = ARP_FRAME.unpack_from(frame)
    assert (dst, src, ethertype) == (b"\xff" * 6, MAC, ETH_P_ARP)
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = ARP_BODY.unpack_from(frame, ARP_FRAME.size)
    assert (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 2)
    assert spa == tpa == socket.inet_aton("10.77.0.100")
    # Linux (arp_is_garp) only takes a *reply* as gratuitous when THA == SHA; otherwise
    # it is ignored for an entry updated within the last second (neigh locktime).
    assert sha == tha == MAC


class _Reactor(MemoryReactorClock):
    """A MemoryReactorClock whose listenTCP fails for ports in ``busy``."""

    def __init__(self) -> None:
        super().__init__()
        self.busy: set[int] = set()
        self.stopped: list[int] = []

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        listening = super().listenTCP(port, factory, backlog, interface)
        listening.stopListening = lambda: self.stopped.append(port)
        return listening


def _holder(mode: str = "ip", **kw: Any) -> tuple[VipHolder, _Reactor, list[Any]]:
    reactor = _Reactor()
    calls: list[Any] = []
    holder = VipHolder(
        reactor,
        "10.77.0.100",
        [(6379, Factory()), (11211, Factory())],
        mode=mode,
        interface="eth0",
        prefix=24,
        run=lambda argv: calls.append(("run", argv[1:3])),
        arp=lambda iface, vip: calls.append(("arp", reactor.seconds())),
        **kw,
    )
    return holder, reactor, calls


def test_ip_mode_adds_the_address_announces_listens_and_undoes_it_on_release() -> None:
    """acquire: ip addr add, 3 gratuitous ARPs 100 ms apart, listen; release: close, addr del."""
    holder, reactor, calls = _holder()
    holder.acquire()
    assert calls[:2] == [("run", ["addr", "add"]), ("arp", 0)]
    assert holder.held
    assert [(p, i) for p, _, _, i in reactor.tcpServers] == [
        (6379, "10.77.0.100"),
        (11211, "10.77.0.100"),
    ]
    reactor.advance(0.1)
    reactor.advance(0.1)
    reactor.advance(0.1)
    assert [c for c in calls if c[0] == "arp"] == [("arp", 0), ("arp", 0.1), ("arp", 0.2)]
    holder.release()
    assert not holder.held and reactor.stopped == [6379, 11211]
    assert calls[-1] == ("run", ["addr", "del"])


def test_release_stops_the_announcements() -> None:
    """A holder released between two gratuitous ARPs sends no more of them."""
    holder, reactor, calls = _holder()
    holder.acquire()
    holder.release()
    reactor.advance(1.0)
    assert [c for c in calls if c[0] == "arp"] == [("arp", 0)]


def test_clear_stale_removes_a_leftover_address_and_tolerates_none() -> None:
    """At start in ip mode a VIP left on the interface (kill -9) is removed; none is fine."""
    holder, _, calls = _holder()
    holder.clear_stale()
    assert calls == [("run", ["addr", "del"])]

    def missing(argv: list[str]) -> None:
        raise subprocess.CalledProcessError(2, argv, stderr=b"Cannot assign requested address")

    holder.run = missing
    holder.clear_stale()  # no exception
    bind, _, bind_calls = _holder(mode="bind")
    bind.clear_stale()
    assert bind_calls == []


def test_bind_mode_retries_until_the_old_holder_lets_go() -> None:
    """In bind mode a busy VIP port is retried every 50 ms until free, without duplicates."""
    holder, reactor, calls = _holder(mode="bind")
    reactor.busy = {11211}
    holder.acquire()
    assert calls == []  # bind mode runs no commands and sends no ARP
    assert not holder.held and holder.acquired_at is None
    reactor.advance(0.05)
    reactor.advance(0.05)
    assert not holder.held
    reactor.busy = set()
    reactor.advance(0.05)
    assert holder.held and holder.acquired_at == reactor.seconds()
    assert [p for p, _, _, _ in reactor.tcpServers] == [6379, 11211]


def test_release_cancels_a_pending_bind_retry() -> None:
    """Once released (no longer ACTIVE), a pending retry does not grab the VIP later."""
    holder, reactor, _ = _holder(mode="bind")
    reactor.busy = {6379}
    holder.acquire()
    holder.release()
    reactor.busy = set()
    reactor.advance(1.0)
    assert not holder.held and reactor.tcpServers == []
