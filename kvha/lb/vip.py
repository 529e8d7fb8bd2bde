"""Holding the virtual IP: listening on it, and in ``ip`` mode owning the address.

``bind`` mode (one host, loopback): the ACTIVE load balancer listens on
``VIP:port`` for every forwarded port and the standby does not.  While the
old holder has not let go (split brain, preemption) the bind fails; it is
retried every 50 ms until it succeeds or the node is no longer ACTIVE.

``ip`` mode (real networks): ``ip addr add VIP/prefix dev IFACE``, then a
gratuitous ARP from an ``AF_PACKET`` raw socket, sent a few times so that
switches and clients learn the new MAC at once (without it a client's
neighbour entry still points at the old holder and its connects time out),
then listen.  On release: stop listening, then ``ip addr del``.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Sequence
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

log = Logger()

ETH_P_ARP = 0x0806
ARP_FRAME = struct.Struct("!6s6sH")
ARP_BODY = struct.Struct("!HHBBH6s4s6s4s")
BROADCAST = b"\xff" * 6


def interface_mac(iface: str) -> bytes:
    with open(f"/sys/class/net/{iface}/address") as f:
        return bytes.fromhex(f.read().strip().replace(":", ""))


def gratuitous_arp(vip: str, mac: bytes) -> bytes:
    """One Ethernet frame: an ARP reply announcing that ``vip`` is at ``mac``.

    As RFC 5944 (4.6) asks of a gratuitous ARP *reply*, the target hardware
    address is ``mac`` too (not broadcast): Linux only treats a reply as
    gratuitous when it is, and otherwise ignores it for a neighbour entry
    updated in the last ``locktime`` (1 s), so a client that had just resolved
    the VIP would keep the old holder's MAC.
    """
    ip = socket.inet_aton(vip)
    return ARP_FRAME.pack(BROADCAST, mac, ETH_P_ARP) + ARP_BODY.pack(
        1, 0x0800, 6, 4, 2, mac, ip, mac, ip
    )


def send_gratuitous_arp(iface: str, vip: str) -> None:
    mac = interface_mac(iface)
    frame = gratuitous_arp(vip, mac)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)  # type: ignore[attr-defined]
    try:
        s.bind((iface, 0))
        s.send(frame)
    finally:
        s.close()


class VipHolder:
    """Acquires and releases the VIP and its listeners for one load balancer."""

    def __init__(
        self,
        reactor: Any,
        vip: str,
        ports: Sequence[tuple[int, Factory]],
        mode: str = "bind",
        interface: str = "",
        prefix: int = 32,
        arp_count: int = 3,
        arp_interval: float = 0.1,
        run: Callable[[list[str]], None] = lambda argv: None,
        arp: Optional[Callable[[str, str], None]] = None,
        clock: Optional[IReactorTime] = None,
    ) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.vip = vip
        self.ports = list(ports)
        self.mode = mode
        self.interface = interface
        self.prefix = prefix
        self.arp_count = arp_count
        self.arp_interval = arp_interval
        self.run = run if mode == "ip" else (lambda argv: None)
        self.arp = arp if arp is not None else send_gratuitous_arp
        self.wanted = False
        self.listening: list[Any] = []
        self.address_added = False
        self._retry: Any = None
        self.acquired_at: Optional[float] = None

    @property
    def held(self) -> bool:
        return bool(self.listening) and len(self.listening) == len(self.ports)

    def clear_stale(self) -> None:
        """At start in ip mode: drop the VIP if an earlier run left it on the interface.

        A load balancer killed with -9 never runs ``ip addr del``; restarted as
        BACKUP it would still own the address and answer ARP for it, beside the
        ACTIVE peer.
        """
        if self.mode != "ip":
            return
        try:
            self.run(["ip", "addr", "del", f"{self.vip}/{self.prefix}", "dev", self.interface])
        except subprocess.CalledProcessError:
            return  # not there: the usual case
        log.warn(
            "removed VIP {vip} left on {iface} by an earlier run",
            vip=self.vip,
            iface=self.interface,
        )

    def acquire(self) -> None:
        self.wanted = True
        if self.mode == "ip" and not self.address_added:
            try:
                self.run(["ip", "addr", "add", f"{self.vip}/{self.prefix}", "dev", self.interface])
            except subprocess.CalledProcessError as e:
                if b"File exists" not in (e.stderr or b""):
                    log.error("ip addr add {vip} failed: {why}", vip=self.vip, why=str(e))
            self.address_added = True
            self._announce(self.arp_count)
        self._listen()

    def _announce(self, left: int) -> None:
        if not self.wanted or left <= 0:
            return
        try:
            self.arp(self.interface, self.vip)
        except OSError as e:
            log.error("gratuitous ARP for {vip} failed: {why}", vip=self.vip, why=str(e))
        self.clock.callLater(self.arp_interval, self._announce, left - 1)

    def _listen(self) -> None:
        self._retry = None
        if not self.wanted:
            return
        bound = {p.getHost().port for p in self.listening}
        for port, factory in self.ports:
            if port in bound:
                continue
            try:
                self.listening.append(self.reactor.listenTCP(port, factory, interface=self.vip))
            except Exception as e:  # the old holder still has it: retry shortly
                log.debug("VIP {vip}:{port} not yet free: {why}", vip=self.vip, port=port, why=e)
                self._retry = self.clock.callLater(0.05, self._listen)
                return
        if self.acquired_at is None:
            self.acquired_at = self.clock.seconds()
            if not self.ports:  # forward: kernel: nothing listens on the VIP
                return
            log.info(
                "holding VIP {vip} on ports {ports}",
                vip=self.vip,
                ports=",".join(str(p) for p, _ in self.ports),
            )

    def release(self) -> Deferred:
        self.wanted = False
        self.acquired_at = None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        ports, self.listening = self.listening, []
        d = defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])
        if ports:
            log.info("released VIP {vip}", vip=self.vip)

        def drop_address(_: Any) -> None:
            if self.mode == "ip" and self.address_added:
                try:
                    self.run(
                        ["ip", "addr", "del", f"{self.vip}/{self.prefix}", "dev", self.interface]
                    )
                except subprocess.CalledProcessError as e:
                    log.error("ip addr del {vip} failed: {why}", vip=self.vip, why=str(e))
                self.address_added = False

        return d.addCallback(drop_address)


def run_command(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=10)
