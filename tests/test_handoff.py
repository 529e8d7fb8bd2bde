"""forward: handoff without a network: the link's lines, the master's adoption, the LB's side.

Descriptors are real (sockets that never connect anywhere, or a Unix socket
pair); reactors are MemoryReactor/Clock; transports are StringTransport.
The real handoff between processes is in tests/integration/test_lb_process.py.
"""

from __future__ import annotations

import inspect
import os
import socket
from typing import Any, Optional

import pytest
from twisted.internet import address, tcp
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
from kvha.master import handoff as master_handoff
from kvha.master.handoff import HandoffReceiver, plain_tcp

# The link's lines ---------------------------------------------------------------------------


def test_lines_parse_and_bad_ones_are_link_errors() -> None:
    assert split_lines(b"a 1\nc 2\nh 3") == ([b"a 1", b"c 2"], b"h 3")
    assert parse(b"h 12 redis 127.0.0.9:40000") == (b"h", 12, "redis", "127.0.0.9:40000")
    assert parse(b"h 1 http ::1:5") == (b"h", 1, "http", "::1:5")
    assert parse(b"c 5") == (b"c", 5, None, None)
    greeting = hello("m1", frozenset({"redis", "http"}))
    assert greeting == b"kvha-handoff 1 m1 http,redis\n"
    assert parse_hello(greeting[:-1]) == ("m1", {"redis", "http"})
    assert parse_hello(b"kvha-handoff 1 m2 ") == ("m2", frozenset())
    for bad in (
        b"h 1 redis",
        b"h 1 gopher 1.2.3.4:5",
        b"h 1 redis 1.2.3.4",
        b"x one",
        b"z 1",
        b"a 1 2",
        b"c -1",
        b"a " + b"9" * 21,
    ):
        with pytest.raises(LinkError):
            parse(bad)
    for bad in (
        b"kvha-handoff 2 m1 redis",
        b"hello m1 redis",
        b"kvha-handoff 1 m1 redis,smtp",
        b"kvha-handoff 1 redis",
    ):
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
    _shouldShutdown = True

    def __init__(self) -> None:
        self.lost_with: list[Any] = []
        self.lose_calls = 0
        self.reading = True

    def pauseProducing(self) -> None:
        self.reading = False

    def resumeProducing(self) -> None:
        self.reading = True

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


#: The client address each test descriptor stands for (``peer_address`` is faked:
#: these sockets never connect, there being no network in unit tests).
PEERS: dict[int, tuple[str, int]] = {}


@pytest.fixture(autouse=True)
def fake_peers(monkeypatch: Any) -> Any:
    def peer_address(sock: socket.socket) -> tuple[str, int]:
        try:
            return PEERS[sock.fileno()]
        except KeyError:
            raise OSError(107, "Transport endpoint is not connected") from None

    monkeypatch.setattr(master_handoff, "peer_address", peer_address)
    yield
    PEERS.clear()


def tcp_fd(peer: Optional[tuple[str, int]] = ("127.0.0.9", 40000)) -> int:
    """A descriptor of a TCP socket (the kind the master adopts), said to come from ``peer``."""
    fd = socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach()
    if peer is not None:
        PEERS[fd] = peer
    return fd


def closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def master_link(refuse: bool = False) -> tuple[Any, StringTransport, AdoptingReactor, Any]:
    reactor = AdoptingReactor(refuse)
    redis_factory, mc_factory = Factory(), Factory()
    receiver = HandoffReceiver(reactor, "m1", {"redis": redis_factory, "memcached": mc_factory})
    link = receiver.buildProtocol(address.UNIXAddress(None))
    transport = StringTransport()
    link.makeConnection(transport)
    return link, transport, reactor, redis_factory


def test_master_greets_with_what_it_adopts_and_adopts_a_handed_socket() -> None:
    link, transport, reactor, redis_factory = master_link()
    assert transport.value() == b"kvha-handoff 1 m1 memcached,redis\n"
    transport.clear()
    fd = tcp_fd()
    link.fileDescriptorReceived(fd)
    link.dataReceived(b"h 7 red")  # a line split across reads
    assert reactor.adopted == []
    link.dataReceived(b"is 127.0.0.9:40000\n")
    [(dup, family, factory)] = reactor.adopted
    assert family == socket.AF_INET and factory is redis_factory
    assert transport.value() == b"a 7\n"
    assert closed(fd), "the master's copy is closed; the adopted transport holds its own"
    os.close(dup)
    # Not read from until the load balancer confirms.
    adopted = reactor.transports[0]
    assert not adopted.reading and link.unconfirmed == {7}
    link.dataReceived(b"k 7\nk 99\n")  # an unknown id is ignored
    assert adopted.reading and link.unconfirmed == set()
    transport.clear()
    # x closes it; its close is reported.
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
    link.dataReceived(b"h 1 http 127.0.0.9:40000\n")  # no plain-TCP http listener offered
    a, b = socket.socketpair()
    link.fileDescriptorReceived(a.detach())
    link.dataReceived(b"h 2 redis 127.0.0.9:40000\n")  # not a TCP socket
    assert transport.value() == b"r 1\nr 2\n"
    assert reactor.adopted == [] and closed(fd)
    b.close()
    assert not transport.disconnecting


def test_a_descriptor_that_is_not_the_lines_closes_the_link() -> None:
    """A dropped descriptor (MSG_CTRUNC at the master's limit) puts lines and descriptors
    out of step: the client address in the line catches it before anything is adopted."""
    link, transport, reactor, _ = master_link()
    other = tcp_fd(("127.0.0.9", 40001))
    left = tcp_fd(("127.0.0.9", 40002))
    link.fileDescriptorReceived(other)  # the one for line 1 never came
    link.fileDescriptorReceived(left)
    link.dataReceived(b"h 1 redis 127.0.0.9:40000\n")
    assert transport.disconnecting and reactor.adopted == []
    assert closed(other)
    link.connectionLost(None)
    assert closed(left)


def test_a_client_gone_before_adoption_is_refused() -> None:
    link, transport, reactor, _ = master_link()
    transport.clear()
    fd = tcp_fd(peer=None)  # getpeername fails: not connected any more
    link.fileDescriptorReceived(fd)
    link.dataReceived(b"h 5 redis 127.0.0.9:40000\n")
    assert transport.value() == b"r 5\n" and closed(fd) and not transport.disconnecting


def test_master_reports_a_connection_its_factory_turned_away_as_closed() -> None:
    link, transport, reactor, _ = master_link(refuse=True)
    transport.clear()
    link.fileDescriptorReceived(tcp_fd())
    link.dataReceived(b"h 3 memcached 127.0.0.9:40000\n")
    assert transport.value() == b"a 3\nc 3\n"
    assert link.conns == {}


@pytest.mark.parametrize(
    "data", [b"h 1 redis 127.0.0.9:40000\n", b"bogus\n", b"a 1\n", b"h 1 " + b"r" * 300 + b"\n"]
)
def test_master_closes_a_link_that_breaks_the_rules(data: bytes) -> None:
    link, transport, reactor, _ = master_link()
    link.dataReceived(data)  # no descriptor came with the h line, or a bad line
    assert transport.disconnecting and reactor.adopted == []


def test_a_failed_adoption_is_reported_adopted_and_closed_never_refused() -> None:
    """Its protocol may have read from it: relaying it as well would give it two readers."""
    link, transport, reactor, _ = master_link()

    def broken(fd: int, family: int, factory: Any) -> None:
        raise RuntimeError("connectionMade blew up")

    reactor.adoptStreamConnection = broken  # type: ignore[method-assign]
    transport.clear()
    fd = tcp_fd()
    link.fileDescriptorReceived(fd)
    link.dataReceived(b"h 4 redis 127.0.0.9:40000\n")
    assert transport.value() == b"a 4\nc 4\n" and closed(fd)
    assert not transport.disconnecting


def test_master_closes_descriptors_left_on_a_lost_link_and_keeps_its_clients() -> None:
    link, transport, reactor, _ = master_link()
    link.fileDescriptorReceived(tcp_fd())
    link.dataReceived(b"h 1 redis 127.0.0.9:40000\n")
    link.fileDescriptorReceived(tcp_fd())
    link.dataReceived(b"k 1\nh 2 redis 127.0.0.9:40000\n")  # 2 is never confirmed
    left = tcp_fd()
    link.fileDescriptorReceived(left)  # its line never came
    link.connectionLost(None)
    assert closed(left)
    confirmed, unconfirmed = reactor.transports
    assert confirmed.lose_calls == 0  # the client stays connected
    # The load balancer relays the unconfirmed one: let go without a shutdown.
    assert unconfirmed.lose_calls == 1 and unconfirmed._shouldShutdown is False
    assert not unconfirmed.reading
    transport.clear()
    reactor.transports[0].connectionLost("later")
    assert transport.value() == b""  # nobody to tell any more
    for dup, _, _ in reactor.adopted:
        os.close(dup)


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
    offered: bytes = b"kvha-handoff 1 m1 memcached,redis\n", handoff: Optional[str] = "/run/m1.hs"
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
    assert lt.fds == [client.transport.fd] and lt.value() == b"h 1 redis 127.0.0.9:40000\n"
    assert backend.conns["redis"] == 1 and reactor.tcpClients == []
    lt.clear()
    link.dataReceived(b"a 1\n")
    assert lt.value() == b"k 1\n"  # the master may read it now
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
    pool, links, reactor, link, lt = lb_with_link(offered=b"kvha-handoff 1 m1 redis\n")
    client = connect_client(reactor, pool, links)
    link.dataReceived(b"r 1\n")
    [(host, port, _f, _t, _b)] = reactor.tcpClients  # relayed to the same master
    assert (host, port) == ("127.0.0.1", 7001)
    assert not client.transport.disconnecting
    connect_client(reactor, pool, links, "memcached")  # not in the greeting
    assert [c[:2] for c in reactor.tcpClients][1] == ("127.0.0.1", 7002)
    assert lt.fds == [client.transport.fd]


def test_lb_never_shuts_down_a_socket_once_its_descriptor_is_sent() -> None:
    pool, links, reactor, link, lt = lb_with_link()
    client = connect_client(reactor, pool, links)
    assert client.transport._shouldShutdown is False  # from the send on, not from the answer
    # Twisted's own flag, which _closeSocket honours: a rename must fail here.
    assert tcp.Connection._shouldShutdown is True
    assert "_shouldShutdown" in inspect.getsource(tcp.Connection._closeSocket)


def test_a_refusal_after_the_client_left_uncounts_it() -> None:
    pool, links, reactor, link, lt = lb_with_link()
    client = connect_client(reactor, pool, links)
    client.connectionLost(None)
    link.dataReceived(b"r 1\n")
    assert pool.backends["m1"].conns["redis"] == 0 and reactor.tcpClients == []


def test_a_master_that_does_not_answer_loses_its_link() -> None:
    pool, links, reactor, link, lt = lb_with_link()
    first = connect_client(reactor, pool, links)
    reactor.advance(1.5)
    second = connect_client(reactor, pool, links)
    reactor.advance(0.5)  # the first is 2 s old
    # Aborted, not closed gracefully: a master that stopped reading would hold
    # a graceful close, and these clients, for as long as it sleeps.
    assert lt.disconnected and link.broken and not link.takes("redis")  # (set by abort)
    third = connect_client(reactor, pool, links)  # relayed, not handed to a closing link
    assert lt.fds == [first.transport.fd, second.transport.fd]
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 7001)]
    link.connectionLost(None)
    for c in (first, second):
        # No other master: closed, and this time with a shutdown, since no master
        # will be told to serve them (the hung one may still hold a copy).
        assert c.transport.disconnecting and c.transport._shouldShutdown is True
    assert pool.backends["m1"].conns["redis"] == 1  # the relayed one
    assert pool.backends["m1"].up["redis"]  # a hung master is the health checks' to judge
    assert not third.transport.disconnecting


def test_removing_a_master_closes_its_handed_connections_through_the_link() -> None:
    pool, links, reactor, link, lt = lb_with_link()
    connect_client(reactor, pool, links)
    link.dataReceived(b"a 1\n")
    lt.clear()
    link.close_all()  # as the admin API's DELETE does, before the removal closes the link
    backend = pool.remove("m1")
    for pair in list(backend.pairs):
        pair.close()
        pair.close()  # (the drain calls it every tick): sent once
    assert lt.value() == b"z\nx 1\n" and lt.disconnecting


def test_master_closes_every_confirmed_handed_connection_on_z() -> None:
    """z reaches connections handed by another link (the peer, or before a restart)."""
    link, transport, reactor, _ = master_link()
    link.fileDescriptorReceived(tcp_fd())
    link.dataReceived(b"h 1 redis 127.0.0.9:40000\nk 1\n")
    link.connectionLost(None)  # the link that handed it is gone; the client is not
    other = link.receiver.buildProtocol(address.UNIXAddress(None))
    other_transport = StringTransport()
    other.makeConnection(other_transport)
    other.fileDescriptorReceived(tcp_fd())
    other.dataReceived(b"h 1 memcached 127.0.0.9:40000\n")  # not confirmed: left alone
    old, unconfirmed = reactor.transports
    other.dataReceived(b"z\n")
    assert old.lose_calls == 1 and unconfirmed.lose_calls == 0
    old.connectionLost("closed")
    assert link.receiver.confirmed == set()
    for dup, _, _ in reactor.adopted:
        os.close(dup)


def test_lb_relays_to_a_master_without_a_handoff_socket() -> None:
    pool, links, reactor, _, _ = lb_with_link(handoff=None)
    connect_client(reactor, pool, links)
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 7001)]


def test_a_lost_link_passes_unanswered_clients_on_and_a_refused_relink_marks_the_master_down() -> (
    None
):
    pool, links, reactor, link, lt = lb_with_link()
    backend = pool.backends["m1"]
    first = connect_client(reactor, pool, links)
    link.dataReceived(b"a 1\n")
    waiting = connect_client(reactor, pool, links)
    assert backend.conns["redis"] == 2
    pool.add("m2", "127.0.0.1", {"redis": 7101})  # on another host: relayed to
    reactor.advance(1.0)
    link.connectionLost(Failure(ConnectionRefusedError()))
    # Unanswered: no master read from it (they wait for k), so the next one gets it,
    # as after a refused connect in proxy mode.  The client notices nothing.
    assert not waiting.transport.disconnecting
    assert waiting.transport._shouldShutdown is True  # relayed: its end is ours to send
    assert [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 7101)]
    assert waiting.backend is pool.backends["m2"] and pool.backends["m2"].conns["redis"] == 1
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


def test_lb_refuses_a_link_whose_socket_belongs_to_another_master() -> None:
    """Socket paths are per host and master lists are shared: a path that names another
    master's socket on this host must not get this master's clients."""
    pool, links, reactor, link, lt = lb_with_link(offered=b"kvha-handoff 1 m2 redis\n")
    assert lt.disconnecting and not link.takes("redis")
    link.connectionLost(None)
    connect_client(reactor, pool, links)
    assert lt.fds == [] and [c[:2] for c in reactor.tcpClients] == [("127.0.0.1", 7001)]
    # Reconnects back off (no greeting was accepted) rather than loop every 0.1 s.
    assert len(reactor.unixClients) == 1
    reactor.advance(0.1)
    assert len(reactor.unixClients) == 2
    again = reactor.unixClients[1][1].buildProtocol(address.UNIXAddress(None))
    again_transport = LinkTransport()
    again.makeConnection(again_transport)
    links.open["m1"].dataReceived(b"kvha-handoff 1 m2 redis\n")
    links.open["m1"].connectionLost(None)
    reactor.advance(0.19)
    assert len(reactor.unixClients) == 2  # 0.2 s this time
    reactor.advance(0.01)
    assert len(reactor.unixClients) == 3


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


# The load balancer's service: admin API and drains --------------------------------------------


def _handoff_lb(reactor: Any, state_dir: Any) -> Any:
    from kvha.lb.service import LoadBalancer
    from tests.test_lb_nat import _config

    text = _config(
        state_dir,
        [{"id": "m1", "host": "127.0.0.1", "redis": 7001, "handoff": "/run/m1.hs"}],
        forward="handoff",
        drain_timeout=1.0,
    )
    config = load_config_string(text).lb
    assert config is not None
    return LoadBalancer(config, reactor)


def test_admin_api_refuses_a_bad_handoff_path_and_keeps_a_good_one(tmp_path: Any) -> None:
    from tests.test_lb_nat import _admin

    lb = _handoff_lb(MemoryReactorClock(), tmp_path)
    for bad in ("run/m2.hs", "/" + "p" * 120, 7):
        doc = {"id": "m2", "host": "127.0.0.1", "redis": 7002, "handoff": bad}
        code, out = _admin(lb, b"POST", "/v1/masters", doc)
        assert code == 400 and "handoff must be an absolute" in out["error"]["message"]
        assert "m2" not in lb.pool.backends
    doc = {"id": "m2", "host": "127.0.0.1", "redis": 7002, "handoff": "/run/m2.hs"}
    code, out = _admin(lb, b"POST", "/v1/masters", doc)
    assert code == 201 and lb.pool.backends["m2"].handoff == "/run/m2.hs"
    assert {"id": "m2", "handoff": "/run/m2.hs"}.items() <= out["masters"][1].items()


def test_a_timed_out_drain_sends_z_once_when_the_link_is_up(tmp_path: Any) -> None:
    reactor = MemoryReactorClock()
    lb = _handoff_lb(reactor, tmp_path)
    links = lb.links
    links.start()
    [(_path, factory, _timeout, _)] = reactor.unixClients
    lb.pool.drain("m1", reactor.seconds())
    reactor.advance(1.0)
    lb._drain_tick()  # no link yet: nothing sent, tried again next tick
    assert not lb.pool.backends["m1"].drain_closed
    lt = LinkTransport()
    factory.buildProtocol(address.UNIXAddress(None)).makeConnection(lt)
    links.open["m1"].dataReceived(b"kvha-handoff 1 m1 redis\n")
    lb._drain_tick()
    lb._drain_tick()
    assert lt.value() == b"z\n" and lb.pool.backends["m1"].drain_closed
    links.stop()
