"""A master's end of the handoff link: client connections passed in by the load balancer.

The master listens on a Unix socket (``master.handoff``, mode 0600, so only
the same user can hand it connections, who could as well connect to its
ports).  Each descriptor that arrives is adopted into the listener factory
of its protocol, exactly as if the master had accepted it, and is then
served with no load balancer in between; the connection's peer address is
the client's own.  The master reports when an adopted connection closes, so
the load balancer's connection counts (``leastconn``, drain) stay right.

Only plain-TCP listeners take handoffs: a TLS listener's protocol is left out
of the greeting, and the load balancer relays those connections instead.
See :mod:`kvha.handoff` for the link's lines.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from typing import Any, Callable

from twisted.internet.interfaces import IFileDescriptorReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from kvha.handoff import LinkError, address_text, hello, parse, split_lines

log = Logger()


@implementer(IFileDescriptorReceiver)
class HandoffServer(Protocol):
    """One load balancer's link: adopts the descriptors it sends."""

    transport: Any  # a UNIX transport (IUNIXTransport), None only before connectionMade

    def __init__(self, receiver: HandoffReceiver) -> None:
        self.receiver = receiver
        self.fds: deque[int] = deque()
        self.buffer = b""
        #: Adopted connections by the load balancer's id, until they close.
        self.conns: dict[int, Any] = {}
        #: Adopted, not read from until the load balancer's ``k``: until then
        #: it may still relay them elsewhere (if this link breaks).
        self.unconfirmed: set[int] = set()
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.write(hello(self.receiver.master_id, frozenset(self.receiver.factories)))

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self.fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        try:
            lines, self.buffer = split_lines(self.buffer + data)
            for line in lines:
                op, conn_id, proto, peer = parse(line)
                if op == b"h":
                    if not self.fds:
                        raise LinkError(f"handoff {conn_id} came without a descriptor")
                    assert proto is not None and peer is not None
                    self._adopt(conn_id, proto, peer, self.fds.popleft())
                elif op == b"k":
                    if conn_id in self.unconfirmed:
                        self.unconfirmed.discard(conn_id)
                        transport = self.conns[conn_id]
                        self.receiver.confirmed.add(transport)
                        transport.resumeProducing()
                elif op == b"z":
                    confirmed = list(self.receiver.confirmed)
                    log.info("closing {n} handed-over connections", n=len(confirmed))
                    for transport in confirmed:
                        transport.loseConnection()
                elif op == b"x":
                    transport = self.conns.get(conn_id)
                    if transport is not None:
                        transport.loseConnection()
                else:
                    raise LinkError(f"unexpected line {line[:60]!r} from the load balancer")
        except LinkError as e:
            log.warn("closing the handoff link: {why}", why=str(e))
            self.transport.loseConnection()

    def _adopt(self, conn_id: int, proto: str, peer: str, fd: int) -> None:
        factory = self.receiver.factories.get(proto)
        if factory is None:
            os.close(fd)
            self.transport.write(b"r %d\n" % conn_id)
            return
        try:
            sock = socket.socket(fileno=fd)  # owns fd from here: closed below
        except OSError as e:
            os.close(fd)
            log.warn("handed descriptor {fd} is not a socket: {e}", fd=fd, e=e)
            self.transport.write(b"r %d\n" % conn_id)
            return
        try:
            if sock.type != socket.SOCK_STREAM or sock.family not in (
                socket.AF_INET,
                socket.AF_INET6,
            ):
                log.warn(
                    "handed descriptor {id} is not a TCP socket ({family!r}, {type!r})",
                    id=conn_id,
                    family=sock.family,
                    type=sock.type,
                )
                self.transport.write(b"r %d\n" % conn_id)  # untouched: relayed instead
                return
            try:
                got = peer_address(sock)
            except OSError as e:  # the client has gone already
                log.info("handed connection {id} is closed: {e}", id=conn_id, e=e)
                self.transport.write(b"r %d\n" % conn_id)
                return
            if address_text(got[0], got[1]) != peer:
                # Not the socket this line is about: descriptors and lines are
                # out of step (one was dropped).  Nothing here can be trusted.
                raise LinkError(
                    f"handoff {conn_id} is for {peer}, the descriptor is {got[0]}:{got[1]}"
                )
            sock.setblocking(False)
            try:
                transport = self.receiver.reactor.adoptStreamConnection(
                    sock.fileno(), sock.family, factory
                )
            except Exception:
                # Its protocol may exist and may have read: not safe to relay.
                # Ours now; the load balancer's copy closes, and with it the socket.
                log.failure("adopting handed connection {id} failed", id=conn_id)
                transport = None
        finally:
            sock.close()  # the adopted transport holds its own duplicate
        self.transport.write(b"a %d\n" % conn_id)
        if transport is None:  # turned away by the factory (and closed), or failed
            self.transport.write(b"c %d\n" % conn_id)
            return
        # Not a byte read before the load balancer confirms (``k``): until then
        # it may relay the connection to another master if this link breaks.
        transport.pauseProducing()
        self.unconfirmed.add(conn_id)
        self.conns[conn_id] = transport
        transport.connectionLost = _on_lost(transport.connectionLost, self, conn_id, transport)

    def closed(self, conn_id: int) -> None:
        self.unconfirmed.discard(conn_id)
        if self.conns.pop(conn_id, None) is not None and not self.lost:
            self.transport.write(b"c %d\n" % conn_id)

    def connectionLost(self, reason: Any = None) -> None:
        # The load balancer went away.  Confirmed clients stay connected to
        # us.  Unconfirmed ones it relays elsewhere (or has closed): we let go
        # of our copy without a shutdown, which would end them for it too.
        self.lost = True
        for conn_id in list(self.unconfirmed):
            transport = self.conns.get(conn_id)
            if transport is not None:
                transport._shouldShutdown = False
                transport.loseConnection()
        self.unconfirmed.clear()
        self.conns.clear()
        while self.fds:
            os.close(self.fds.popleft())


def peer_address(sock: socket.socket) -> tuple[str, int]:
    """The client's address of a handed socket (a seam for the tests)."""
    name = sock.getpeername()
    return name[0], name[1]


def _on_lost(
    lost: Callable[[Any], Any], link: HandoffServer, conn_id: int, transport: Any
) -> Callable[[Any], Any]:
    """``transport.connectionLost`` that also reports the close over ``link``.

    Wrapping the transport's method (an instance attribute, Twisted's code
    calls it by name) leaves the protocols and their compiled hot path alone.
    It is installed once ``adoptStreamConnection`` returns, so a protocol
    whose ``connectionMade`` aborted the connection would go unreported
    (kvha's protocols refuse with a reply and ``loseConnection``, which
    closes later, through the wrapper).
    """

    def connectionLost(reason: Any) -> Any:
        try:
            return lost(reason)
        finally:
            link.receiver.confirmed.discard(transport)
            link.closed(conn_id)

    return connectionLost


class HandoffReceiver(Factory):
    """The master's handoff listener: the listener factory of each protocol it adopts."""

    noisy = False

    def __init__(self, reactor: Any, master_id: str, factories: dict[str, Factory]) -> None:
        self.reactor = reactor
        self.master_id = master_id
        self.factories = dict(factories)
        #: Every confirmed handed-over connection still open, whichever link
        #: (or load balancer) handed it: what ``z`` closes.
        self.confirmed: set[Any] = set()

    def buildProtocol(self, addr: Any) -> HandoffServer:
        return HandoffServer(self)


def plain_tcp(endpoint: str) -> bool:
    """Whether a listening endpoint string is plain TCP (its connections can be adopted)."""
    kind = endpoint.split(":", 1)[0].strip().lower()
    return kind in ("tcp", "tcp6")
