"""The load balancer's end of the handoff links (``forward: handoff``).

One Unix-socket link to every master that has a ``handoff`` socket.  A
client accepted on the VIP is not read from: its descriptor goes to the
chosen master with an ``h`` line.  When the master answers ``a`` (adopted),
the load balancer closes its own copy of the descriptor without shutting
the socket down, and is out of that connection's path.  When it answers
``r`` (refused), the load balancer still holds the untouched connection and
relays it to that master as ``forward: proxy`` does.  A master reads nothing
from an adopted connection before the load balancer's ``k``, so a link that
breaks before the ``a`` arrived (a master that died, or hung for
:data:`ANSWER_TIMEOUT`) passes its waiting clients on to the next master, and
a dying master is no more visible to new clients than with ``proxy``.  Masters without a
``handoff`` socket, or whose link is down, are relayed the same way.

The master reports each adopted connection's close (``c``), which keeps the
connection counts right for ``leastconn`` and for draining, and the load
balancer closes adopted connections through the link (``x``) when a drain
times out or the master is removed.

The link is also a watch: a master whose process dies closes it at once.
The load balancer connects again at once, and a refused connection marks
every protocol of that master down, as an observed reset does in proxy mode.
Connections a master adopted outlive the load balancer: a take-over by the
peer leaves them alone.  See :mod:`kvha.handoff` for the lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from kvha.handoff import LinkError, address_text, parse, parse_hello, split_lines
from kvha.lb.forward import OneProtocolFactory
from kvha.lb.pool import Backend, Pool

if TYPE_CHECKING:
    from kvha.lb.forward import ClientSide

log = Logger()

#: Seconds before the first new attempt after a link could not connect;
#: it doubles up to :data:`RETRY_MAX` (per master) until a greeting is accepted.
RETRY = 0.1
RETRY_MAX = 5.0
#: A master that has not answered a handoff in this long is taken for hung:
#: its link is closed (it is relayed to, if at all, until a new one is up).
ANSWER_TIMEOUT = 2.0


class Handed:
    """An adopted connection, as the drain and removal code sees it (``close()``)."""

    __slots__ = ("link", "conn_id", "proto", "closing")

    def __init__(self, link: HandoffLink, conn_id: int, proto: str) -> None:
        self.link = link
        self.conn_id = conn_id
        self.proto = proto
        self.closing = False

    def close(self) -> None:
        if not self.closing:  # once: the drain calls this every tick until ``c``
            self.closing = True
            self.link.close_handed(self.conn_id)


class HandoffLink(Protocol):
    """The link to one master's ``handoff`` socket."""

    transport: Any  # a UNIX transport (IUNIXTransport), None only before connectionMade

    def __init__(self, links: HandoffLinks, backend: Backend, path: str) -> None:
        self.links = links
        self.backend = backend
        self.path = path
        #: The protocols the master adopts, once its greeting came.
        self.offered: Optional[frozenset[str]] = None
        self.buffer = b""
        self.next_id = 0
        #: Sent, not yet answered (with when): the master may or may not hold them.
        self.waiting: dict[int, tuple[ClientSide, float]] = {}
        #: Adopted by the master, not yet closed.
        self.handed: dict[int, Handed] = {}
        self.closing = False
        #: Closed by us over a broken rule (a bad line, the wrong master, no answer).
        self.broken = False
        self.connected = False
        self.opened_at = 0.0
        self._answer_check: Any = None

    def connectionMade(self) -> None:
        self.connected = True
        self.opened_at = self.links.clock.seconds()

    def takes(self, proto: str) -> bool:
        return bool(
            self.connected
            and not self.closing
            and not self.broken
            and self.offered is not None
            and proto in self.offered
        )

    def hand(self, client: ClientSide) -> None:
        """Send ``client``'s descriptor; :meth:`ClientSide.handed_over` or
        :meth:`ClientSide.handoff_refused` follows when the master answers."""
        self.next_id += 1
        conn_id = self.next_id
        now = self.links.clock.seconds()
        self.waiting[conn_id] = (client, now)
        client.handing_over()
        # The descriptor must stay open until it is sent: the client's
        # transport keeps it until the master's answer.
        peer = client.transport.getPeer()
        self.transport.sendFileDescriptor(client.transport.fileno())
        self.transport.write(
            b"h %d %s %s\n"
            % (
                conn_id,
                client.factory.proto.encode("ascii"),
                address_text(peer.host, peer.port).encode("ascii"),
            )
        )
        if self._answer_check is None:
            self._answer_check = self.links.clock.callLater(ANSWER_TIMEOUT, self._check_answers)

    def _check_answers(self) -> None:
        self._answer_check = None
        if not self.waiting or not self.connected:
            return
        now = self.links.clock.seconds()
        oldest = min(sent for _, sent in self.waiting.values())
        if now - oldest >= ANSWER_TIMEOUT:
            log.warn(
                "master {m} left {n} handoffs unanswered for {t}s: closing its handoff link",
                m=self.backend.id,
                n=len(self.waiting),
                t=ANSWER_TIMEOUT,
            )
            self._break()
            return
        self._answer_check = self.links.clock.callLater(
            oldest + ANSWER_TIMEOUT - now, self._check_answers
        )

    def close_handed(self, conn_id: int) -> None:
        if conn_id in self.handed and self.connected:
            self.transport.write(b"x %d\n" % conn_id)

    def close_all(self) -> bool:
        """Have the master close every connection handed to it, by anyone, ever.

        False if the link cannot carry it now.
        """
        if not self.connected or self.closing:
            return False
        self.transport.write(b"z\n")
        return True

    def _break(self) -> None:
        """Close at once, dropping what is unsent: a master that stopped reading
        would otherwise hold a graceful close (and the waiting clients) for ever."""
        self.broken = True
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        try:
            lines, self.buffer = split_lines(self.buffer + data)
            for line in lines:
                if self.offered is None:
                    master_id, offered = parse_hello(line)
                    if master_id != self.backend.id:
                        raise LinkError(
                            f"{self.path} belongs to master {master_id!r} "
                            f"(on this host), not to {self.backend.id!r}"
                        )
                    self.offered = offered
                    self.links.greeted(self.backend.id)
                    log.info(
                        "handoff link to {m} up; it adopts {protos}",
                        m=self.backend.id,
                        protos=",".join(sorted(self.offered)) or "nothing",
                    )
                    continue
                op, conn_id, _, _ = parse(line)
                if op == b"a":
                    self._adopted(conn_id)
                elif op == b"r":
                    entry = self.waiting.pop(conn_id, None)
                    if entry is None:
                        raise LinkError(f"refused unknown connection {conn_id}")
                    entry[0].handoff_refused()
                elif op == b"c":
                    self._closed(conn_id)
                else:
                    raise LinkError(f"unexpected line {line[:60]!r} from the master")
        except LinkError as e:
            log.warn("closing the handoff link to {m}: {why}", m=self.backend.id, why=str(e))
            self._break()

    def _adopted(self, conn_id: int) -> None:
        entry = self.waiting.pop(conn_id, None)
        if entry is None:
            raise LinkError(f"adopted unknown connection {conn_id}")
        client = entry[0]
        proto = client.factory.proto
        handed = Handed(self, conn_id, proto)
        self.handed[conn_id] = handed
        self.backend.total[proto] += 1
        self.backend.pairs.add(handed)
        self.transport.write(b"k %d\n" % conn_id)  # the master may read it from now on
        client.handed_over()

    def _closed(self, conn_id: int) -> None:
        handed = self.handed.pop(conn_id, None)
        if handed is None:
            raise LinkError(f"closed unknown connection {conn_id}")
        self.backend.conns[handed.proto] -= 1
        self.backend.pairs.discard(handed)

    def close(self) -> None:
        self.closing = True
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        if self._answer_check is not None and self._answer_check.active():
            self._answer_check.cancel()
        self._answer_check = None
        # Not answered: the master, alive or not, has not read from them (it
        # waits for our ``k``) and lets go of its copy; the next master gets them.
        waiting, self.waiting = self.waiting, {}
        for client, _ in waiting.values():
            client.handoff_failed()
        # Adopted: no longer counted (their master is gone, or will not report them).
        handed, self.handed = self.handed, {}
        for h in handed.values():
            self.backend.conns[h.proto] -= 1
            self.backend.pairs.discard(h)
        self.links.lost(self)


class HandoffLinks:
    """Keeps a :class:`HandoffLink` to every master that has a ``handoff`` socket."""

    def __init__(self, reactor: Any, pool: Pool, clock: IReactorTime) -> None:
        self.reactor = reactor
        self.pool = pool
        self.clock = clock
        self.open: dict[str, HandoffLink] = {}
        self._connecting: set[str] = set()
        #: Links lost while up, not yet connected again: a refusal means a dead master.
        self.suspect: set[str] = set()
        #: Per master: the pending new attempt, and the delay before the next one.
        self._retry: dict[str, Any] = {}
        self._delay: dict[str, float] = {}
        self.stopped = True
        self.lost_count = 0

    def start(self) -> None:
        self.stopped = False
        self.pool.on_change.append(self.connect_missing)
        self.connect_missing()

    def stop(self) -> None:
        self.stopped = True
        for call in self._retry.values():
            if call.active():
                call.cancel()
        self._retry.clear()
        if self.connect_missing in self.pool.on_change:
            self.pool.on_change.remove(self.connect_missing)
        for link in list(self.open.values()):
            link.close()

    def close_all(self, master_id: str) -> bool:
        """:meth:`HandoffLink.close_all` on ``master_id``'s link; False if it has none up."""
        link = self.open.get(master_id)
        return link is not None and link.close_all()

    def link_for(self, backend: Backend, proto: str) -> Optional[HandoffLink]:
        """The link to hand ``backend`` a ``proto`` connection over, if it takes one."""
        link = self.open.get(backend.id)
        if link is None or link.backend is not backend or not link.takes(proto):
            return None
        return link

    def connect_missing(self) -> None:
        """Open a link to every master with a ``handoff`` socket; close stale ones."""
        if self.stopped:
            return
        wanted = set()
        for backend in list(self.pool.backends.values()):
            if not backend.handoff:
                continue
            wanted.add(backend.id)
            link = self.open.get(backend.id)
            if link is not None and (link.backend is not backend or link.path != backend.handoff):
                link.close()  # the master moved or changed its socket
                link = None
            if link is None and backend.id not in self._connecting:
                self._connect(backend)
        for master_id, link in list(self.open.items()):
            if master_id not in wanted:
                link.close()

    def _connect(self, backend: Backend) -> None:
        assert backend.handoff is not None
        self._connecting.add(backend.id)
        link = HandoffLink(self, backend, backend.handoff)
        endpoint = endpoints.UNIXClientEndpoint(self.reactor, backend.handoff, timeout=1)
        d = endpoint.connect(OneProtocolFactory(link))
        d.addCallbacks(self._connected, self._not_connected, errbackArgs=(backend,))

    def greeted(self, master_id: str) -> None:
        """A link's master answered as the one it should be: back to quick retries."""
        self._delay.pop(master_id, None)

    def _connected(self, link: HandoffLink) -> None:
        backend = link.backend
        self._connecting.discard(backend.id)
        self.suspect.discard(backend.id)
        if (
            self.stopped
            or self.pool.backends.get(backend.id) is not backend
            or backend.handoff != link.path
        ):
            link.close()  # removed, moved or given another socket while connecting
            self.connect_missing()
            return
        old = self.open.get(link.backend.id)
        if old is not None and old is not link:
            old.close()
        self.open[link.backend.id] = link

    def _not_connected(self, failure: Any, backend: Backend) -> None:
        self._connecting.discard(backend.id)
        if self.stopped:
            return
        if backend.id in self.suspect and self.pool.backends.get(backend.id) is backend:
            # Its link was closed and a new one is refused: the master is gone.
            self.suspect.discard(backend.id)
            why = "its handoff link was closed and a new one failed: "
            for proto in backend.ports:
                self.pool.observed_failure(backend, proto, why + failure.getErrorMessage())
        else:
            log.debug(
                "no handoff link to {m} yet: {why}", m=backend.id, why=failure.getErrorMessage()
            )
        self._retry_later(backend.id)

    def _retry_later(self, master_id: str) -> None:
        call = self._retry.get(master_id)
        if call is None or not call.active():
            delay = self._delay.get(master_id, RETRY)
            self._retry[master_id] = self.clock.callLater(delay, self._retry_now, master_id)
            self._delay[master_id] = min(delay * 2, RETRY_MAX)

    def _retry_now(self, master_id: str) -> None:
        self._retry.pop(master_id, None)
        self.connect_missing()

    def lost(self, link: HandoffLink) -> None:
        master_id = link.backend.id
        if self.open.get(master_id) is link:
            del self.open[master_id]
        if link.closing or self.stopped:
            return
        if self.pool.backends.get(master_id) is not link.backend:
            return
        self.lost_count += 1
        if link.broken:
            # We closed it (a bad line, the wrong master, no answer): nothing
            # says the master is gone.  Try again later, backing off.
            self._retry_later(master_id)
            return
        log.info("handoff link to {m} lost", m=master_id)
        self.suspect.add(master_id)
        if self.clock.seconds() - link.opened_at < RETRY:
            self._retry_later(master_id)  # one that closes every new link is not hammered
        elif master_id not in self._connecting:
            self._connect(link.backend)
