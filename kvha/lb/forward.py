"""TCP forwarding from a VIP port to a master, with back-pressure both ways.

A client connection is accepted, reading from it is paused, and a master is
chosen; if connecting to it fails (refused, timed out) the next master is
tried, so the client never notices a dead master.  Once connected each side
is registered as the other's producer: when one side's send buffer fills,
reading from the other side stops, so a slow client cannot make the load
balancer buffer a fast master's output without bound (and the reverse).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional

from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from kvha.flush import BufferedWrites, no_delay, read_directly
from kvha.lb.pool import Backend, Pool

if TYPE_CHECKING:
    from kvha.lb.handoff import HandoffLinks

log = Logger(namespace=__name__)  # compiled (mypyc): no frame to take the name from


class ClientSide(BufferedWrites, Protocol):
    """The client's connection to the VIP."""

    #: Producer and consumer as well as a TCP/TLS transport (registerProducer,
    #: pauseProducing, abortConnection): no one Twisted interface covers all of it.
    transport: Any

    def __init__(self, factory: ForwardFactory) -> None:
        self.factory = factory
        self.backend: Optional[Backend] = None
        self.peer: Optional[BackendSide] = None
        self.tried: list[str] = []
        self.pending: list[bytes] = []
        self.closed = False

    def connectionMade(self) -> None:
        self.factory.accepted += 1
        no_delay(self.transport)
        self.transport.pauseProducing()
        self._connect()

    def _connect(self) -> None:
        factory = self.factory
        backend = factory.pool.choose(factory.proto, exclude=self.tried)
        if backend is None:
            factory.no_backend += 1
            log.warn(
                "no live master for {proto}; closing client {peer}",
                proto=factory.proto,
                peer=self.transport.getPeer(),
            )
            self.transport.loseConnection()
            return
        self.tried.append(backend.id)
        backend.conns[factory.proto] += 1
        self.backend = backend
        links = factory.links
        if links is not None and backend.handoff:
            link = links.link_for(backend, factory.proto)
            if link is not None:
                link.hand(self)
                return
        self._relay(backend)

    def _relay(self, backend: Backend) -> None:
        factory = self.factory
        endpoint = endpoints.TCP4ClientEndpoint(
            factory.reactor,
            backend.host,
            backend.ports[factory.proto],
            timeout=factory.connect_timeout,
        )
        d = endpoint.connect(_BackendFactory(self))
        d.addCallbacks(self._connected, self._failed, errbackArgs=(backend,))

    def _connected(self, peer: BackendSide) -> None:
        if self.closed:  # the client left while we were connecting
            peer.transport.loseConnection()
            if self.backend is not None:
                self.backend.conns[self.factory.proto] -= 1
                self.backend = None
            return
        assert self.backend is not None
        self.peer = peer
        no_delay(peer.transport)
        self.backend.total[self.factory.proto] += 1
        self.backend.pairs.add(self)
        peer.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(peer.transport, True)
        if self.pending:
            peer.transport.write(b"".join(self.pending))
            self.pending = []
        self.transport.resumeProducing()

    def handing_over(self) -> None:
        """Its descriptor is about to go to a master: never shut the socket down from here.

        A ``shutdown()`` would end the connection for the master too, which
        may hold it from now on; with ``_shouldShutdown`` false Twisted only
        closes this process's descriptor (as it does for a socket it adopted),
        and the client sees the end only when no process holds it any more.
        Pinned by tests/test_handoff.py (the flag) and by the process test
        that kills the load balancer and goes on using handed connections.
        """
        self.transport._shouldShutdown = False

    def handed_over(self) -> None:
        """The master adopted this connection: close our copy of its descriptor."""
        self.backend = None  # counted by the link from now on, until the master reports the close
        self.transport.loseConnection()

    def handoff_refused(self) -> None:
        """The master did not adopt it: relay it to that master instead."""
        backend = self.backend
        if backend is None:
            return
        if self.closed:
            backend.conns[self.factory.proto] -= 1
            self.backend = None
            return
        self._relay(backend)

    def handoff_failed(self) -> None:
        """The link broke before the master's answer: no master has read from
        the connection (masters wait for the load balancer's confirmation), so
        it goes to the next master, as after a refused connect."""
        backend = self.backend
        if backend is not None:
            backend.conns[self.factory.proto] -= 1
            self.backend = None
        # That link is gone, so no master will ever be told to read this
        # connection: ending it from here must reach the client again (a hung
        # master's unread queue may still hold a copy of the descriptor).
        self.transport._shouldShutdown = True
        if not self.closed:
            self._connect()

    def _failed(self, failure: Any, backend: Backend) -> None:
        backend.conns[self.factory.proto] -= 1
        self.factory.pool.observed_failure(
            backend, self.factory.proto, f"connect failed: {failure.getErrorMessage()}"
        )
        self.backend = None
        if self.closed:
            return
        self._connect()

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write_now(data)
        else:
            self.pending.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        if self.peer is not None:
            self.peer.transport.loseConnection()
        self._release()

    def _release(self) -> None:
        backend = self.backend
        if backend is not None and self.peer is not None:
            backend.pairs.discard(self)
            backend.conns[self.factory.proto] -= 1
            self.backend = None

    def close(self) -> None:
        """Close both sides (drain timeout, shutdown)."""
        self.transport.loseConnection()
        if self.peer is not None:
            self.peer.transport.loseConnection()


class BackendSide(BufferedWrites, Protocol):
    """The load balancer's connection to the chosen master."""

    #: Producer and consumer as well as a TCP/TLS transport (registerProducer,
    #: pauseProducing, abortConnection): no one Twisted interface covers all of it.
    transport: Any

    def __init__(self, client: ClientSide) -> None:
        self.client = client
        self.got_data = False

    def connectionMade(self) -> None:
        read_directly(self.transport, self)

    def dataReceived(self, data: bytes) -> None:
        self.got_data = True
        self.client.write_now(data)

    def connectionLost(self, reason: Any = None) -> None:
        client = self.client
        if not client.closed:
            from twisted.internet.error import ConnectionDone

            if reason is not None and not reason.check(ConnectionDone) and client.backend:
                # A reset on real traffic counts like a failed health check.
                client.factory.pool.observed_failure(
                    client.backend, client.factory.proto, f"reset: {reason.getErrorMessage()}"
                )
            client.transport.loseConnection()


class _BackendFactory(Factory):
    noisy = False

    def __init__(self, client: ClientSide) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> BackendSide:
        return BackendSide(self.client)


class ForwardFactory(Factory):
    """Accepts clients on one VIP port and forwards them for one protocol."""

    noisy = False

    def __init__(
        self,
        reactor: Any,
        pool: Pool,
        proto: str,
        connect_timeout: float = 1.0,
        links: Optional[HandoffLinks] = None,
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        self.proto = proto
        self.connect_timeout = connect_timeout
        #: forward: handoff: the links to masters that adopt connections.
        self.links = links
        self.accepted = 0
        self.no_backend = 0

    def buildProtocol(self, addr: Any) -> ClientSide:
        return ClientSide(self)


class HealthProbe(Protocol):
    """Connect, send the protocol's probe, and expect its answer in time."""

    transport: ITCPTransport  # None only before connectionMade

    PROBES: ClassVar[dict[str, tuple[bytes, bytes]]] = {
        "redis": (b"PING\r\n", b"+PONG"),
        "memcached": (b"version\r\n", b"VERSION "),
        "http": (b"GET /health HTTP/1.0\r\nHost: kvha\r\n\r\n", b"HTTP/1.0 200"),
    }

    def __init__(self, proto: str) -> None:
        self.probe, self.expect = self.PROBES[proto]
        self.buffer = b""
        self.done: Any = None

    def connectionMade(self) -> None:
        self.transport.write(self.probe)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) >= len(self.expect):
            ok = self.buffer.startswith(self.expect) or (
                self.expect.startswith(b"HTTP/") and self.buffer[9:12] == b"200"
            )
            self._finish(ok, "" if ok else f"unexpected answer {self.buffer[:40]!r}")

    def connectionLost(self, reason: Any = None) -> None:
        self._finish(False, "closed before answering")

    def _finish(self, ok: bool, why: str) -> None:
        if self.done is not None:
            done, self.done = self.done, None
            done(ok, why)
            self.transport.loseConnection()


class HealthChecker:
    """Probes every (master, protocol) every ``interval`` with a ``timeout``."""

    def __init__(
        self, reactor: Any, pool: Pool, clock: IReactorTime, interval: float, timeout: float
    ) -> None:
        self.reactor = reactor
        self.pool = pool
        self.clock = clock
        self.interval = interval
        self.timeout = timeout
        self._call: Any = None
        self._running: set[tuple[str, str]] = set()

    def start(self) -> None:
        self._call = self.clock.callLater(0, self._round)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _round(self) -> None:
        self._call = self.clock.callLater(self.interval, self._round)
        for backend in list(self.pool.backends.values()):
            for proto in backend.ports:
                if (backend.id, proto) not in self._running:
                    self.check(backend, proto)

    def check(self, backend: Backend, proto: str) -> None:
        key = (backend.id, proto)
        self._running.add(key)
        probe = HealthProbe(proto)
        timer: list[Any] = []

        def done(ok: bool, why: str) -> None:
            self._running.discard(key)
            if timer and timer[0].active():
                timer[0].cancel()
            if self.pool.backends.get(backend.id) is backend:
                self.pool.check_result(backend, proto, ok, why)

        probe.done = done

        def timed_out() -> None:
            if probe.done is not None:
                probe.done = None
                if probe.transport is not None:
                    probe.transport.abortConnection()
                done(False, f"no answer in {self.timeout}s")

        timer.append(self.clock.callLater(self.timeout, timed_out))
        endpoint = endpoints.TCP4ClientEndpoint(
            self.reactor, backend.host, backend.ports[proto], timeout=self.timeout
        )

        def failed(failure: Any) -> None:
            if probe.done is not None:
                probe.done = None
                done(False, failure.getErrorMessage())

        endpoint.connect(OneProtocolFactory(probe)).addErrback(failed)


class OneProtocolFactory(Factory):
    """Hands out one protocol instance made beforehand, quietly (no log line per
    connection, unlike ``endpoints.connectProtocol``): for probes that run all the time."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance
