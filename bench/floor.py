"""The floor under any Python master: a relay that does nothing but relay.

``make bench`` runs this beside kvha to show what the architecture costs
before kvha does any work of its own.  Two processes on the same reactor as
kvha's nodes (``kvha.reactor``), with TCP_NODELAY on every connection:

- ``backend PORT``: answers ``+OK`` to every RESP command it is sent;
- ``relay PORT BACKEND_PORT``: accepts Redis clients and sends everything
  they write, in order, over one connection to the backend, batched once per
  reactor turn like a master's data-node link; each client gets back as many
  replies as it sent commands, gathered and sent once per turn straight to
  its socket, the way a master sends replies (:mod:`kvha.flush`).

Until the seventh session the relay answered clients with Twisted's
``transport.write``, which a master does not use: it registers the socket
for writability and sends a turn later, two ``epoll_ctl`` and a pass
through the reactor per reply.  That relay reached about half of
redis-server, and was reported as the floor; sending like a master roughly
doubled it.

Neither parses: a command is counted by its leading ``*``, which holds for
``redis-benchmark``'s SET, GET, INCR and MSET with their fixed values, and for
nothing else.  The replies are not what Redis would answer (``+OK`` to a GET);
``redis-benchmark`` only counts them.  What this measures is one extra hop
through a Python process and back: the two ``recv()`` / ``send()`` pairs and
the reactor's dispatch that every request through a master pays, with no
parsing, routing, storage or encoding at all.

Usage: ``python bench/floor.py backend 7001`` and
``python bench/floor.py relay 7000 7001``.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from typing import Any, Callable

from twisted.internet import protocol

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kvha.flush import BufferedWrites, TurnFlusher  # noqa: E402


class Backend(protocol.Protocol):
    """``+OK`` for every command."""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"+OK\r\n" * data.count(b"*"))


class Link(protocol.Protocol):
    """The relay's one connection to the backend: requests out once per turn, replies in order."""

    def __init__(self, at_turn_end: Callable[[Callable[[], None]], None]) -> None:
        self.at_turn_end = at_turn_end
        self.waiting: deque[list[Any]] = deque()  # [client, replies still due]
        self.out: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def send(self, client: protocol.Protocol, data: bytes, commands: int) -> None:
        self.waiting.append([client, commands])
        if not self.out:
            self.at_turn_end(self.flush)
        self.out.append(data)

    def flush(self) -> None:
        self.transport.write(b"".join(self.out))
        self.out = []

    def dataReceived(self, data: bytes) -> None:
        replies = data.count(b"\n")  # every reply is a whole "+OK\r\n", and reads keep order
        waiting = self.waiting
        while replies:
            entry = waiting[0]
            n = min(entry[1], replies)
            entry[0].out(b"+OK\r\n" * n)
            replies -= n
            entry[1] -= n
            if not entry[1]:
                waiting.popleft()


class Client(BufferedWrites, protocol.Protocol):
    """One Redis client: what it sends goes to the link; replies leave once per turn."""

    def __init__(self, link: Link, flusher: TurnFlusher | None) -> None:
        self.link = link
        self.flusher = flusher  # per connection: compiled, BufferedWrites ignores class attributes

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        self.link.send(self, data, data.count(b"*"))


def main(argv: list[str]) -> None:
    from twisted.internet import endpoints

    from kvha.reactor import install

    reactor = install()
    role, port = argv[0], int(argv[1])
    listen = f"tcp:{port}:interface=127.0.0.1"
    if role == "backend":
        endpoints.serverFromString(reactor, listen).listen(protocol.Factory.forProtocol(Backend))
    elif role == "relay":
        backend = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", int(argv[2]))

        def linked(link: Link) -> None:
            flusher = TurnFlusher(reactor)
            factory = protocol.Factory.forProtocol(lambda: Client(link, flusher))
            endpoints.serverFromString(reactor, listen).listen(factory)

        link = Link(reactor.call_at_turn_end)
        endpoints.connectProtocol(backend, link).addCallback(linked)
    else:
        raise SystemExit(f"unknown role {role!r}: backend or relay")
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
