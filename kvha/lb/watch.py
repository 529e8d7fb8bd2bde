"""One open connection per master and protocol, so that its death is seen at once.

With ``forward: proxy`` the load balancer sees a master's death on real
traffic: a refused or reset connection marks it down at once (HAProxy's
``observe layer4``).  With ``forward: kernel`` the traffic never reaches the
load balancer, and until the health checks notice (``fall`` x ``interval``)
new connections are sent to a dead master and refused.

So in kernel mode the load balancer keeps one connection open to each
master's redis and memcached port and sends the health probe over it every
``interval`` (which also keeps it from looking idle).  When the master's
process dies its kernel closes that connection and its listening socket: the
load balancer reads the end, connects again at once, is refused, marks the
(master, protocol) down and rewrites the table.  A master that closed only
that connection (an idle timeout, its connection limit) accepts the new one.
A host that vanishes without closing anything is still found by the health
checks and the probe's ``timeout``.  A watch that cannot connect
tries again after 0.1 s while the master counts as up, and a master that
comes back up (``rise`` health checks: bringing it back stays their job) is
watched again at once.  HTTP is left to the health checks: an HTTP
server closes idle keep-alive connections by design.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorTime, ITransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from kvha.lb.forward import HealthProbe, OneProtocolFactory
from kvha.lb.pool import Backend, Pool

log = Logger()

#: The protocols whose servers keep a connection open as long as it is used.
WATCHED = ("redis", "memcached")
#: Seconds before connecting again after a watch could not connect.
RETRY = 0.1


class WatchConnection(Protocol):
    """The load balancer's open connection to one master's port."""

    transport: ITransport  # None only before connectionMade

    def __init__(self, watcher: MasterWatcher, backend: Backend, proto: str) -> None:
        self.watcher = watcher
        self.backend = backend
        self.proto = proto
        self.probe = HealthProbe.PROBES[proto][0]
        self.closing = False
        self.opened_at = 0.0

    def connectionMade(self) -> None:
        self.opened_at = self.watcher.clock.seconds()
        if self.watcher.stopped:
            self.close()
            return
        self.watcher.open[self.backend.id, self.proto] = self

    def dataReceived(self, data: bytes) -> None:
        # An answer (the health checks judge what it says): the master is alive.
        self.watcher.answered(self)

    def ping(self) -> None:
        self.transport.write(self.probe)

    def close(self) -> None:
        self.closing = True
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.watcher.lost(self)


class MasterWatcher:
    """Keeps a :class:`WatchConnection` to every live master's redis and memcached port."""

    def __init__(self, reactor: Any, pool: Pool, clock: IReactorTime, interval: float) -> None:
        self.reactor = reactor
        self.pool = pool
        self.clock = clock
        self.interval = interval
        self.open: dict[tuple[str, str], WatchConnection] = {}
        self._connecting: set[tuple[str, str]] = set()
        self._call: Any = None
        self._retry: Any = None
        self.lost_count = 0
        self.stopped = False
        #: Watches whose connection the master closed, not yet answered again:
        #: a failed connect to one of these means the master is gone.
        self.suspect: set[tuple[str, str]] = set()

    def start(self) -> None:
        self.stopped = False
        self._call = self.clock.callLater(0, self._round)
        self.pool.on_change.append(self.connect_missing)

    def stop(self) -> None:
        self.stopped = True
        for call in (self._call, self._retry):
            if call is not None and call.active():
                call.cancel()
        self._call = self._retry = None
        if self.connect_missing in self.pool.on_change:
            self.pool.on_change.remove(self.connect_missing)
        for conn in list(self.open.values()):
            conn.close()

    def _round(self) -> None:
        """Every ``interval``: probe over each open connection, and open the missing ones."""
        self._call = self.clock.callLater(self.interval, self._round)
        for conn in list(self.open.values()):
            conn.ping()
        self.connect_missing()

    def connect_missing(self) -> None:
        """Open a watch to every (master, protocol) that is up and has none; drop stale ones.

        Also runs on every change of the pool: a master added, or back up.
        """
        wanted = set()
        for backend in list(self.pool.backends.values()):
            for proto in WATCHED:
                if proto not in backend.ports:
                    continue
                key = (backend.id, proto)
                wanted.add(key)
                conn = self.open.get(key)
                if conn is not None and conn.backend is not backend:
                    conn.close()  # the master moved (a new host or port): watch the new one
                    conn = None
                if not backend.up.get(proto):
                    self.suspect.discard(key)  # down already: the checks bring it back
                elif conn is None and key not in self._connecting:
                    self._connect(backend, proto)
        for key, conn in list(self.open.items()):
            if key not in wanted:  # removed from the pool
                conn.close()

    def _connect(self, backend: Backend, proto: str) -> None:
        key = (backend.id, proto)
        self._connecting.add(key)
        conn = WatchConnection(self, backend, proto)
        endpoint = endpoints.TCP4ClientEndpoint(
            self.reactor, backend.host, backend.ports[proto], timeout=self.interval
        )
        d = endpoint.connect(OneProtocolFactory(conn))
        d.addCallbacks(self._connected, self._not_connected, errbackArgs=(backend, proto))
        d.addCallback(lambda _: self._connecting.discard(key))

    def _connected(self, conn: WatchConnection) -> None:
        if not self.stopped:
            conn.ping()  # at once: a master that closes it (or dies) is seen from now on

    def answered(self, conn: WatchConnection) -> None:
        self.suspect.discard((conn.backend.id, conn.proto))

    def _not_connected(self, failure: Any, backend: Backend, proto: str) -> None:
        if self.stopped:
            return
        key = (backend.id, proto)
        if key in self.suspect and self.pool.backends.get(backend.id) is backend:
            # It closed our connection and now refuses a new one: it is gone.
            self.suspect.discard(key)
            why = "its open connection was closed and a new one failed: "
            self.pool.observed_failure(backend, proto, why + failure.getErrorMessage())
            return
        # Counting failures is the health checks' job; try again soon, so that
        # a master that was still starting is watched before it can die.
        self._retry_soon()

    def _retry_soon(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self.clock.callLater(RETRY, self.connect_missing)

    def lost(self, conn: WatchConnection) -> None:
        """The master closed the connection: down if a new one fails.

        A master that dies closes every connection and its listening socket,
        so a new connection is refused (or, if it got in while the listening
        socket was closing, reset and the next one refused) within
        milliseconds.  A master that only closed this one (an idle timeout
        shorter than ``interval``, its connection limit) accepts the new one,
        answers its probe and stays up.  A connection closed within ``RETRY``
        of opening is replaced ``RETRY`` later, not at once, so a master that
        closes every new one is not hammered.
        """
        key = (conn.backend.id, conn.proto)
        if self.open.get(key) is conn:
            del self.open[key]
        if conn.closing or self.stopped:
            return
        backend: Optional[Backend] = self.pool.backends.get(conn.backend.id)
        if backend is not conn.backend:
            return
        self.lost_count += 1
        self.suspect.add(key)
        if self.clock.seconds() - conn.opened_at < RETRY:
            self._retry_soon()
        elif key not in self._connecting:
            self._connect(backend, conn.proto)
