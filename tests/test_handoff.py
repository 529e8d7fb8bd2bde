"""forward: handoff without a network: the link's lines, the master's adoption, the LB's side.

Descriptors are real (sockets that never connect anywhere, or a Unix socket
pair); reactors are MemoryReactor/Clock; transports are StringTransport.
The real handoff between processes is in tests/integration/test_lb_process.py.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Optional

import pytest
from twisted.internet import address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from kvha.config import ConfigError, LocalConfig, load_config_string
from kvha.handoff import LinkError, hello, parse, parse_hello, split_lines
from kvha.lb.forward import ForwardFactory
from kvha.lb.handoff import HandoffLinks
from kvha.lb.pool import Pool
from kvha.local import handoff_path, plan
from kvha.master.handoff import HandoffReceiver, plain_tcp

# The link's lines ---------------------------------------------------------------------------


def test_lines_parse_and_bad_ones_are_link_errors() -> None:
    assert split_lines(b"a 1\nc 2\nh 3") == ([b"a 1", b"c 2"], b"h 3")
    assert parse(b"h 12 redis") == (b"h", 12, "redis")
    assert parse(b"c 5") == (b"c", 5, None)
    assert parse_hello(hello(frozenset({"redis", "http"}))[:-1]) == {"redis", "http"}
    assert parse_hello(b"kvha-handoff 1 ") == frozenset()
    for bad in (b"h 1", b"h 1 gopher", b"x one", b"z 1", b"a 1 2", b"c -1", b"a " + b"9" * 21):
        with pytest.raises(LinkError):
            parse(bad)
    for bad in (b"kvha-handoff 2 redis", b"hello redis", b"kvha-handoff 1 redis,smtp"):
        with pytest.raises(LinkError):
            parse_hello(bad)
    with pytest.raises(LinkError):
        split_lines(b"x" * 300)  # no newline in sight, and too long to be one line
    with pytest.raises(LinkError):
        split_lines(b"a " + b"1" * 300 + b"\n")


def test_plain_tcp_listeners_only() -> None:
    assert plain_tcp("tcp:6379:interface=127.0.0.1") and plain_tcp("tcp6:port=6379")
    assert not plain_tcp("ssl:6380:privateKey=k.pem") and not plain_tcp("unix:/tmp/x")


# The master's side --------------------------------------------------------------------------


class FakeAdopted:
    def __init__(self) -> None:
        self.lost_with: list[Any] = []
        self.lose_calls = 0

    def connectionLost(self, reason: Any) -> None:
        self.lost_with.append(reason)

    def loseConnection(self) -> None:
        self.lose_calls += 1


class AdoptingReactor:
    """adoptStreamConnection as the reactor's: duplicates the descriptor, builds the protocol."""

    def __init__(self, refuse: bool = False) -> None:
        self.adopted: list[tuple[int, int, Any]] = []
        self.transports: list[FakeAdopted] = []
        self.refuse = refuse

    def adoptStreamConnection(self, fd: int, family: int, factory: Any) -> Optional[FakeAdopted]:
        dup = os.dup(fd)
        self.adopted.append((dup, family, factory))
        if self.refuse:
            os.close(dup)
            return None
        t = FakeAdopted()
        self.transports.append(t)
        return t


def tcp_fd() -> int:
    """A descriptor of an unconnected TCP socket: the kind the master adopts."""
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach()


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def master_link(refuse: bool = False) -> tuple[Any, StringTransport, AdoptingReactor, Any]:
    reactor = AdoptingReactor(refuse)
    redis_factory, mc_factory = Factory(), Factory()
    receiver = HandoffReceiver(reactor, {"redis": redis_factory, "memcached": mc_factory})
    link = receiver.buildProtocol(address.UNIXAddress(None))
    transport = StringTransport()
    link.makeConnection(transport)
    return link, transport, reactor, redis_factory


def test_master_greets_with_what_it_adopts_and_adopts_a_handed_socket() -> None:
    link, transport, reactor, redis_factory = master_link()
    assert transport.value() == b"kvha-handoff 1 memcached,redis\n"
    transport.clear()
    fd = tcp_fd()
    link.fileDescriptorReceived(fd)
    link.dataReceived(b"h 7 red")  # a line split across reads
    assert reactor.adopted == []
    link.dataReceived(b"is\n")
    [(dup, family, factory)] = reactor.adopted
    assert family == socket.AF_INET and factory is redis_factory
    assert transport.value() == b"a 7\n"
    assert closed(fd), "the master's copy is closed; the adopted transport holds its own"
    os.close(dup)
    transport.clear()
    # x closes it; its close is reported once.
    link.dataReceived(b"x 7\n")
    assert reactor.transports[0].lose_calls == 1
    reactor.transports[0].connectionLost("done")
    assert reactor.transports[0].lost_with == ["done"]
    assert transport.value() == b"c 7\n"
    assert link.conns == {}


def test_master_refuses_what_it_cannot_adopt_and_closes_the_descriptor() -> None:
    link, transport, reactor, _ = master_link()
    transport.clear()
    fd = tcp_fd()
    link.fileDescriptorReceived(fd)
    link.dataReceived(b"h 1 http\n")  # no plain-TCP http listener offered
    a, b = socket.socketpair()
    link.fileDescriptorReceived(a.detach())
    link.dataReceived(b"h 2 redis\n")  # not a TCP socket
    assert transport.value() == b"r 1\nr 2\n"
    assert reactor.adopted == [] and closed(fd)
    b.close()
    assert not transport.disconnecting


def test_master_reports_a_connection_its_factory_turned_away_as_closed() -> None:
    link, transport, reactor, _ = master_link(refuse=True)
    transport.clear()
    link.fileDescriptorReceived(tcp_fd())
    link.dataReceived(b"h 3 memcached\n")
    assert transport.value() == b"a 3\nc 3\n"
    assert link.conns == {}


@pytest.mark.parametrize(
    "data", [b"h 1 redis\n", b"bogus\n", b"a 1\n", b"h 1 " + b"r" * 300 + b"\n"]
)
def test_master_closes_a_link_that_breaks_the_rules(data: bytes) -> None:
    link, transport, reactor, _ = master_link()
    link.dataReceived(data)  # no descriptor came with the h line, or a bad line
    assert transport.disconnecting and reactor.adopted == []


def test_master_closes_descriptors_left_on_a_lost_link_and_keeps_its_clients() -> None:
    link, transport, reactor, _ = master_link()
    link.fileDescriptorReceived(tcp_fd())
    link.dataReceived(b"h 1 redis\n")
    left = tcp_fd()
    link.fileDescriptorReceived(left)  # its line never came
    link.connectionLost(None)
    assert closed(left)
    assert reactor.transports[0].lose_calls == 0  # the client stays connected
    transport.clear()
    reactor.transports[0].connectionLost("later")
    assert transport.value() == b""  # nobody to tell any more
    os.close(reactor.adopted[0][0])


# The load balancer's side ----------------------------------------------------------------------


class LinkTransport(StringTransport):
    """A UNIX transport's sendFileDescriptor, recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.fds: list[int] = []

    def sendFileDescriptor(self, fd: int) -> None:
        self.fds.append(fd)


class ClientTransport(StringTransport):
    _shouldShutdown = True

    def __init__(self, fd: int) -> None:
        super().__init__(peerAddress=address.IPv4Address("TCP", "127.0.0.9", 40000))
        self.fd = fd
        self.paused = False

    def fileno(self) -> int:
        return self.fd

    def pauseProducing(self) -> None:
        self.paused = True


def lb_with_link(
    offered: bytes = b"kvha-handoff 1 memcached,redis\n", handoff: Optional[str] = "/run/m1.hs"
) -> tuple[Pool, HandoffLinks, MemoryReactorClock, Any, LinkTransport]:
    reactor = MemoryReactorClock()
    pool = Pool("leastconn")
    pool.add("m1", "127.0.0.1", {"redis": 7001, "memcached": 7002}, handoff=handoff)
    links = HandoffLinks(reactor, pool, reactor)
    links.start()
    if handoff is None:
        assert reactor.unixClients == []
        return pool, links, reactor, None, LinkTransport()
    [(path, factory, _timeout, _)] = reactor.unixClients
    assert path == handoff
    link_transport = LinkTransport()
    proto = factory.buildProtocol(address.UNIXAddress(None))
    proto.makeConnection(link_transport)
    link = links.open["m1"]
    link.dataReceived(offered)
    return pool, links, reactor, link, link_transport


def connect_client(reactor: Any, pool: Pool, links: HandoffLinks, proto: str = "redis") -> Any:
    factory = ForwardFactory(reactor, pool, proto, links=links)
    client = factory.buildProtocol(address.IPv4Address("TCP", "127.0.0.9", 40000))
    transport = ClientTransport(1000 + len(reactor.tcpClients))
    client.makeConnection(transport)
    return client


def test_lb_hands_a_client_over_and_counts_it_until_the_master_reports_its_close() -> None:
    pool, links, reactor, link, lt = lb_with_link()
    backend = pool.backends["m1"]
    client = connect_client(reactor, pool, links)
    assert client.transport.paused  # never read: its bytes are the master's
    assert lt.fds == [client.transport.fd] and lt.value() == b"h 1 redis\n"
    assert backend.conns["redis"] == 1 and reactor.tcpClients == []
    link.dataReceived(b"a 1\n")
    # Our copy of the descriptor is closed without a shutdown.
    assert client.transport._shouldShutdown is False and client.transport.disconnecting
    assert backend.conns["redis"] == 1 and backend.total["redis"] == 1
    [handed] = backend.pairs
    lt.clear()
    handed.close()  # a drain that timed out
    assert lt.value() == b"x 1\n"
    link.dataReceived(b"c 1\n")
    assert backend.conns["redis"] == 0 and backend.pairs == set()
    assert backend.status()["handoff"] == "/run/m1.hs"


def test_lb_relays_what_the_master_refuses_or_does_not_offer() -> None:
    pool, links, reactor, link, lt = lb_with_link(offered=b"kvha-handoff 1 redis\n")
    client = connect_client(reactor, pool, links)
    link.dataReceived(b"r 1\n")
    [(host, port, _f, _t, _b)] = reactor.tcpClients  # relayed to the same master
    assert (host, port) == ("127.0.0.1", 7001)
    assert not client.transport.disconnecting
    connect_client(reactor, pool, links, "memcached")  # not in the greeting
    assert [c[:2] for c in reactor.tcpClients][1] == ("127.0.0.1", 7002)
    assert lt.fds == [client.transport.fd]


def test_lb_relays_to_a_master_without_a_handoff_socket() -> None:
    pool, links, reactor, _, _ = lb_with_link(handoff=None)
    connect_client(reactor, pool, links)
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 7001)]


def test_a_lost_link_closes_unanswered_clients_and_a_refused_relink_marks_the_master_down() -> None:
    pool, links, reactor, link, lt = lb_with_link()
    backend = pool.backends["m1"]
    first = connect_client(reactor, pool, links)
    link.dataReceived(b"a 1\n")
    waiting = connect_client(reactor, pool, links)
    assert backend.conns["redis"] == 2
    reactor.advance(1.0)
    link.connectionLost(Failure(ConnectionRefusedError()))
    assert waiting.transport.disconnecting and waiting.transport._shouldShutdown is True
    assert backend.conns["redis"] == 0 and backend.pairs == set()
    assert first.transport.disconnecting  # (closed at the handover, long before)
    # It connects again at once; the master's socket refuses: down at once.
    assert len(reactor.unixClients) == 2
    connector = reactor.connectors[-1]
    reactor.unixClients[1][1].clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
    assert backend.up == {"redis": False, "memcached": False}
    assert links.lost_count == 1
    # Later attempts back off instead of hammering the socket.
    reactor.advance(0.1)
    assert len(reactor.unixClients) == 3
    reactor.unixClients[2][1].clientConnectionFailed(
        reactor.connectors[-1], Failure(ConnectionRefusedError())
    )
    reactor.advance(0.1)
    assert len(reactor.unixClients) == 3
    reactor.advance(0.1)
    assert len(reactor.unixClients) == 4


def test_links_follow_the_pool() -> None:
    pool, links, reactor, link, lt = lb_with_link()
    pool.remove("m1")
    assert lt.disconnecting
    pool.add("m2", "127.0.0.1", {"redis": 7003}, handoff="/run/m2.hs")
    assert reactor.unixClients[-1][0] == "/run/m2.hs"
    links.stop()


def test_pool_keeps_and_exports_the_handoff_path() -> None:
    pool = Pool()
    pool.replace([{"id": "m1", "host": "h", "ports": {"redis": 1}, "handoff": "/a.hs"}], 1)
    assert pool.export()[0]["handoff"] == "/a.hs"
    pool.replace([{"id": "m1", "host": "h", "ports": {"redis": 1}}], 2)
    assert pool.backends["m1"].handoff is None and "handoff" not in pool.export()[0]


# Configuration --------------------------------------------------------------------------------


LB = """
lb:
  id: lb1
  secret: a-long-enough-heartbeat-secret-0123
  state_dir: /tmp/x
  forward: handoff
  heartbeat: {bind: '127.0.0.1:1', peer: '127.0.0.1:2'}
  vip: {address: 127.0.0.100}
  admin: {listen: 'tcp:7000', token: a-long-enough-admin-token-0123456}
  masters:
    - {id: m1, host: 127.0.0.1, redis: 7001, handoff: %s}
"""


def test_config_takes_absolute_short_handoff_paths_only() -> None:
    cfg = load_config_string(LB % "/run/kvha/m1.hs")
    assert cfg.lb is not None and cfg.lb.forward == "handoff"
    assert cfg.lb.masters[0].handoff == "/run/kvha/m1.hs"
    with pytest.raises(ConfigError, match=r"lb\.masters\[0\]\.handoff: expected an absolute path"):
        load_config_string(LB % "run/m1.hs")
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        load_config_string(LB % ("/" + "d" * 120))


def test_local_cluster_hands_off_by_default(tmp_path: Any) -> None:
    config = LocalConfig(secret="a-long-enough-local-secret-0123456", state_dir=str(tmp_path))
    assert config.forward == "handoff"
    text = {n.id: n.text for n in plan(config)}
    path = handoff_path(config, "master1")
    assert os.path.isabs(path)
    assert f'handoff: "{path}"' in text["master1"]
    assert "forward: handoff" in text["lb1"] and f'handoff: "{path}"' in text["lb1"]
    for node in plan(config):  # every derived config loads
        load_config_string(node.text)
    long_dir = "/" + "s" * 100
    with pytest.raises(ConfigError, match="local.state_dir: forward: handoff puts Unix sockets"):
        load_config_string(
            f"local:\n  secret: a-long-enough-local-secret-0123456\n  state_dir: {long_dir}\n"
        )
    proxied = LocalConfig(
        secret="a-long-enough-local-secret-0123456", state_dir=long_dir, forward="proxy"
    )
    assert "handoff" not in "".join(n.text for n in plan(proxied))
