"""Writes that cost one ``send()`` per connection per reactor turn.

Twisted's ``transport.write`` never sends at once: it buffers, registers the
socket for writability (an ``epoll_ctl``), sends when the next poll reports
the socket writable, then unregisters it (another ``epoll_ctl``).  For a
server that answers each request with a few dozen bytes that is three system
calls and a pass through the reactor per reply, and a profile of a master
showed them as its largest cost.

:func:`send_now` sends straight to the socket when nothing is queued ahead
(what Twisted itself would do on the next turn) and hands any rest to the
transport, so order and back-pressure are unchanged.

:class:`TurnFlusher` gathers what protocols write during one reactor turn and
sends each connection's bytes once, at the turn's end (:func:`at_turn_end`),
so the sixteen replies of a pipelined batch leave in one ``send()`` even when
they were completed one by one.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from mypy_extensions import mypyc_attr
from twisted.internet import tcp
from twisted.internet.endpoints import _WrappingProtocol
from twisted.internet.interfaces import IReactorTime


def direct_socket(transport: Any) -> Any:
    """The socket of a plain TCP transport, or None (TLS, test transports, ...).

    Only :class:`twisted.internet.tcp.Connection` qualifies: a TLS transport
    forwards unknown attributes to the TCP transport under it, so asking it
    for ``socket`` would bypass the encryption.
    """
    if isinstance(transport, tcp.Connection):
        return transport.socket
    return None


def read_directly(transport: Any, protocol: Any) -> bool:
    """Have ``transport`` hand its reads straight to ``protocol``; True if it will.

    A connection made through a client endpoint has the endpoint's
    ``_WrappingProtocol`` as its transport's protocol, and under a
    ``ClientService`` that forwards to a proxy whose ``__getattr__`` finds
    ``dataReceived`` only after a failed look-up has built an AttributeError:
    two interpreted calls and an exception per read, which a master makes
    once per data-node reply batch.  Both only pass the bytes on, so the
    wrapper's instance gets ``protocol.dataReceived`` as its own; the
    connection's other events (connectionLost above all, which the proxy
    reports to the service) still take the usual way.  Plain TCP only, and
    only when the chain ends at ``protocol``.
    """
    if not isinstance(transport, tcp.Connection):
        return False
    wrapper = transport.protocol
    if type(wrapper) is not _WrappingProtocol:
        return False
    inner = wrapper._wrappedProtocol
    if inner is not protocol and getattr(inner, "__dict__", {}).get("_protocol") is not protocol:
        return False
    wrapper.__dict__["dataReceived"] = protocol.dataReceived  # shadows the method
    return True


def no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off on a TCP connection (other transports: nothing).

    kvha writes whole requests and replies, once per turn: holding a small
    write back until the peer acknowledges the previous one (Nagle) only adds
    a round trip, or a delayed-ACK timeout, to pipelined and multiplexed
    connections.  Redis and memcached do the same for their clients.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass  # not a TCP socket after all (a UNIX socket)


def send_now(transport: Any, sock: Any, data: bytes) -> None:
    """Write ``data``: straight to ``sock`` if nothing is queued, else via the transport.

    ``sock`` is :func:`direct_socket` of ``transport`` (None: always the
    transport).  A partial send queues the rest in the transport, which then
    applies its usual back-pressure; an error is left to the transport too,
    which reports it as a lost connection.
    """
    if (
        sock is None
        or transport._tempDataLen
        or len(transport.dataBuffer) != transport.offset
        or not transport.connected
        or transport.disconnecting
    ):
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        transport.write(data)  # the transport notices the error and closes
        return
    if sent < len(data):
        transport.write(data[sent:])


def at_turn_end(clock: Any) -> Callable[[Callable[[], None]], Any]:
    """How to run a call once the reactor turn is over, for ``clock``.

    On :class:`kvha.reactor.KvhaEPollReactor` that is its turn-end list: no
    timed call per turn.  Any other clock (another reactor, a test
    :class:`~twisted.internet.task.Clock`) gets ``callLater(0, f)``.
    """
    hook = getattr(clock, "call_at_turn_end", None)
    if hook is not None:
        return hook  # type: ignore[no-any-return]
    return lambda f: clock.callLater(0, f)


class Flushable(Protocol):
    def flush_out(self) -> None: ...


class TurnFlusher:
    """Flushes every protocol that wrote during a reactor turn, once, at its end."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._at_end = at_turn_end(clock)
        self._queued: list[Flushable] = []
        #: The pending turn-end flush: a DelayedCall, True (the reactor's
        #: turn-end list), or None (none pending).
        self._call: Optional[Any] = None
        #: Turns that flushed something, and protocols flushed (for tests, metrics).
        self.turns = 0
        self.flushes = 0

    def queue(self, proto: Flushable) -> None:
        """``proto`` has bytes to write: its ``flush_out`` runs once this turn is over."""
        self._queued.append(proto)
        if self._call is None:
            self._call = self._at_end(self.flush) or True

    def flush(self) -> None:
        call, self._call = self._call, None
        if call is not None and call is not True and call.active():
            call.cancel()  # flushed early (shutdown): the turn's end has nothing left
        if not self._queued:
            return  # flushed early already; this was the turn-end call
        queued, self._queued = self._queued, []
        self.turns += 1
        self.flushes += len(queued)
        for proto in queued:
            proto.flush_out()

    def flush_before_shutdown(self, reactor: Any) -> None:
        """Send what this turn gathered when ``reactor`` stops, before connections close.

        A reactor that is stopping closes every connection in its
        ``during shutdown`` phase; without this the replies completed in
        the last turn (and gathered for its end) would never leave.
        """
        reactor.addSystemEventTrigger("before", "shutdown", self.flush)


# Mixed into protocols of modules that are not compiled (the load balancer's) too.
@mypyc_attr(allow_interpreted_subclasses=True)
class BufferedWrites:
    """Mixin for protocols: ``out(data)`` writes once per turn with a :class:`TurnFlusher`.

    Without a flusher (unit tests on ``StringTransport``) ``out`` writes at
    once.  Before closing the connection call :meth:`flush_out`, or the bytes
    gathered this turn would be lost.
    """

    flusher: Optional[TurnFlusher] = None
    #: Send what was gathered once it holds this many writes, without waiting
    #: for the turn's end (0: never).  For a connection whose peer can start
    #: on the first requests while this process is still reading the rest of
    #: a busy turn: a master's data-node links.
    early_flush: int = 0
    _out: Optional[list[bytes]] = None
    _sock: Any = None
    _sock_known = False

    def out(self, data: bytes) -> None:
        flusher = self.flusher
        if flusher is None:
            self.write_now(data)
            return
        buf = self._out
        if buf is None:
            self._out = [data]
            flusher.queue(self)
        else:
            buf.append(data)
            if self.early_flush and len(buf) >= self.early_flush:
                # Sent now; the list stays, so this turn's later writes join it
                # without queueing this connection with the flusher again.
                self.write_now(b"".join(buf))
                buf.clear()

    def flush_out(self) -> None:
        buf = self._out
        if buf is None:
            return
        self._out = None
        if buf:
            self.write_now(b"".join(buf) if len(buf) > 1 else buf[0])

    def write_now(self, data: bytes) -> None:
        """Write ``data`` now, ahead of anything gathered by :meth:`out` this turn."""
        transport = self.transport  # type: ignore[attr-defined]
        if transport is None:
            return
        if not self._sock_known:
            self._sock = direct_socket(transport)
            self._sock_known = True
        send_now(transport, self._sock, data)
