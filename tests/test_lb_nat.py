"""kvha.lb.nat and kvha.lb.watch without a kernel: the nftables table, when it is
written, conntrack's part, and the open connections that see a master die.

The ``nft`` and ``conntrack`` commands are replaced by a fake that keeps the
tables a real kernel would hold, so the steps of a fail-over can be followed.
The real commands run in ``tests/integration/test_lb_kernel_process.py``.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
from typing import Any, Optional

import pytest
import yaml
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from kvha.config import ConfigError, LocalConfig, load_config_string
from kvha.lb import nat, tap
from kvha.lb.heartbeat import Heartbeat
from kvha.lb.nat import WRR_SLOTS, KernelForwarder, table_prefix, weighted_ranges
from kvha.lb.pool import Pool
from kvha.lb.service import LoadBalancer
from kvha.lb.watch import MasterWatcher
from kvha.local import plan
from tests.conftest import ADMIN_TOKEN, lb_config

VIP = "10.1.2.100"
PORTS = {"redis": 6379, "memcached": 11211}


def _entry(state: str, sport: int, dport: int, master: str, mport: int) -> str:
    return (
        f"tcp      6 431999 {state} src=10.0.0.9 dst=10.1.2.100 sport={sport} dport={dport} "
        f"src={master} dst=10.0.0.9 sport={mport} dport={sport} [ASSURED] mark=0 use=1\n"
    )


CONNTRACK_LIST = (
    _entry("ESTABLISHED", 40001, 6379, "10.0.0.1", 7001)
    + _entry("ESTABLISHED", 40002, 6379, "10.0.0.1", 7001)
    + _entry("ESTABLISHED", 40003, 11211, "10.0.0.2", 7102)
    + _entry("TIME_WAIT", 40004, 6379, "10.0.0.2", 7002)
    + "conntrack v1.4.7 (conntrack-tools): 4 flow entries have been shown.\n"
)


class FakeKernel:
    """``nft`` and ``conntrack`` as far as the forwarder uses them."""

    def __init__(self) -> None:
        self.tables: dict[str, str] = {}
        self.calls: list[list[str]] = []
        self.scripts: list[str] = []
        self.fail_nft = False
        self.conntrack_installed = True

    def __call__(self, argv: list[str], stdin: Optional[bytes]) -> str:
        self.calls.append(argv)
        if argv[0] == "conntrack":
            if not self.conntrack_installed:
                raise FileNotFoundError("conntrack")
            if argv[1] == "-L":
                return CONNTRACK_LIST
            return "conntrack v1.4.7 (conntrack-tools): 2 flow entries have been deleted.\n"
        if self.fail_nft:
            raise subprocess.CalledProcessError(1, argv, b"", b"Error: Could not process rule")
        if argv[1:] == ["list", "tables", "ip"]:
            return "".join(f"table ip {name}\n" for name in self.tables)
        if argv[1] == "delete":
            if argv[-1] not in self.tables:
                raise subprocess.CalledProcessError(1, argv, b"", b"No such file or directory")
            del self.tables[argv[-1]]
            return ""
        assert argv[1:] == ["-f", "-"] and stdin is not None
        script = stdin.decode()
        self.scripts.append(script)
        # One transaction, as nft runs it: a delete of a missing table aborts it all.
        tables = dict(self.tables)
        for line in script.splitlines():
            word = line.split()
            if word[:2] == ["table", "ip"] and len(word) == 3:
                tables.setdefault(word[2], "")
            elif word[:3] == ["delete", "table", "ip"]:
                if word[3] not in tables:
                    raise subprocess.CalledProcessError(1, argv, b"", b"No such file or directory")
                del tables[word[3]]
        for name, body in re.findall(r"^table ip (\S+) \{\n(.*?)^\}", script, re.M | re.S):
            tables[name] = body
        self.tables = tables
        return ""

    def rules(self, table: str) -> list[str]:
        return [line.strip() for line in self.tables[table].splitlines() if "dnat to" in line]


def pool(scheduler: str = "rr", masters: int = 2) -> Pool:
    p = Pool(scheduler)
    p.replace(
        [
            {
                "id": f"m{i}",
                "host": f"10.0.0.{i}",
                "ports": {"redis": 7000 + i, "memcached": 7100 + i},
                "weight": float(i),
            }
            for i in range(1, masters + 1)
        ],
        0,
        persist=False,
    )
    return p


def forwarder(p: Pool, kernel: FakeKernel, lb_id: str = "lb1", **kw: Any) -> KernelForwarder:
    """A forwarder that follows ``p``'s changes, as the load balancer wires it."""
    sysctl = kw.pop("sysctl", _no_sysctl)
    fwd = KernelForwarder(lb_id, VIP, PORTS, p, run=kernel, sysctl=sysctl, **kw)
    p.on_change.append(fwd.sync)
    return fwd


def _no_sysctl(name: str, value: str) -> None:
    raise AssertionError(f"sysctl {name} set in bind mode")


# The ruleset -------------------------------------------------------------------------------------


def test_rr_spreads_new_connections_over_the_live_masters_with_numgen_inc() -> None:
    kernel = FakeKernel()
    fwd = forwarder(pool("rr"), kernel)
    assert fwd.table == "kvha_10_1_2_100_lb1" and fwd.table.startswith(table_prefix(VIP))
    fwd.acquire()
    assert kernel.rules(fwd.table) == [
        "ip daddr 10.1.2.100 tcp dport 6379 dnat to numgen inc mod 2 map "
        "{ 0 : 10.0.0.1 . 7001, 1 : 10.0.0.2 . 7002 }",
        "ip daddr 10.1.2.100 tcp dport 11211 dnat to numgen inc mod 2 map "
        "{ 0 : 10.0.0.1 . 7101, 1 : 10.0.0.2 . 7102 }",
    ]
    body = kernel.tables[fwd.table]
    # Clients elsewhere (prerouting) and on this host (output); replies from masters on
    # other hosts come back through here (masquerade), loopback ones need not.
    assert "type nat hook prerouting priority dstnat" in body
    assert "type nat hook output priority -100" in body
    assert 'ct status dnat ct original ip daddr 10.1.2.100 oifname != "lo" masquerade' in body


def test_wrr_gives_each_master_a_share_of_numgen_random_by_weight() -> None:
    kernel = FakeKernel()
    fwd = forwarder(pool("wrr", masters=3), kernel)  # weights 1, 2, 3
    fwd.acquire()
    rule = kernel.rules(fwd.table)[0]
    assert f"numgen random mod {WRR_SLOTS} map" in rule
    assert "0-166 : 10.0.0.1 . 7001, 167-499 : 10.0.0.2 . 7002, 500-999 : 10.0.0.3 . 7003" in rule


@pytest.mark.parametrize(
    "weights", [[1.0], [1.0, 1.0], [1.0, 2.0, 3.0], [0.001, 1000.0], [0.01] * 7, [1e-6] * 999]
)
def test_weighted_ranges_cover_every_slot_once_and_give_each_weight_a_slot(
    weights: list[float],
) -> None:
    ranges = weighted_ranges(weights)
    assert len(ranges) == len(weights)
    assert ranges[0][0] == 0 and ranges[-1][1] == WRR_SLOTS - 1
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        assert lo == hi + 1
    assert all(hi >= lo for lo, hi in ranges)


def test_a_single_live_master_is_a_plain_dnat_and_none_is_no_rule() -> None:
    p = pool("rr")
    kernel = FakeKernel()
    fwd = forwarder(p, kernel)
    fwd.acquire()
    p.drain("m1", 0.0)
    assert kernel.rules(fwd.table) == [
        "ip daddr 10.1.2.100 tcp dport 6379 dnat to 10.0.0.2:7002",
        "ip daddr 10.1.2.100 tcp dport 11211 dnat to 10.0.0.2:7102",
    ]
    # Nothing live for redis: no rule, so the connection meets a closed port and is refused.
    p.observed_failure(p.backends["m2"], "redis", "reset")
    assert kernel.rules(fwd.table) == ["ip daddr 10.1.2.100 tcp dport 11211 dnat to 10.0.0.2:7102"]


# When it is written ------------------------------------------------------------------------------


def test_the_table_follows_health_and_membership_and_is_rewritten_only_on_change() -> None:
    p = pool("rr")
    kernel = FakeKernel()
    fwd = forwarder(p, kernel)
    p.check_result(p.backends["m1"], "redis", False)  # not yet ACTIVE: nothing written
    assert kernel.scripts == []
    fwd.acquire()
    assert len(kernel.scripts) == 1
    p.check_result(p.backends["m1"], "redis", False)  # fall 2: m1 redis is down
    assert "10.0.0.1 . 7001" not in kernel.tables[fwd.table]
    assert "10.0.0.1 . 7101" in kernel.tables[fwd.table]
    written = len(kernel.scripts)
    p.check_result(p.backends["m1"], "redis", False)  # still down: no change, no write
    p.check_result(p.backends["m2"], "redis", True)
    assert len(kernel.scripts) == written
    p.check_result(p.backends["m1"], "redis", True)
    p.check_result(p.backends["m1"], "redis", True)  # rise 2: back
    assert "10.0.0.1 . 7001" in kernel.tables[fwd.table]
    p.add("m3", "10.0.0.3", {"redis": 7003}, 1.0)
    assert "10.0.0.3 . 7003" in kernel.tables[fwd.table]
    p.remove("m3")
    assert "10.0.0.3" not in kernel.tables[fwd.table]


def test_acquire_replaces_a_peers_table_for_the_vip_and_leaves_other_tables_alone() -> None:
    kernel = FakeKernel()
    kernel.tables["kvha_10_1_2_100_lb2"] = "the peer's, killed with -9"
    kernel.tables["kvha_10_1_2_101_lb9"] = "another VIP's"
    kernel.tables["nat"] = "somebody else's"
    fwd = forwarder(pool(), kernel)
    fwd.acquire()
    assert sorted(kernel.tables) == ["kvha_10_1_2_100_lb1", "kvha_10_1_2_101_lb9", "nat"]
    # One transaction: the peer's table goes in the same `nft -f` that writes ours.
    assert kernel.scripts[0].startswith(
        "table ip kvha_10_1_2_100_lb2\ndelete table ip kvha_10_1_2_100_lb2\n"
    )


def test_release_deletes_only_our_table() -> None:
    kernel = FakeKernel()
    p = pool()
    lb1, lb2 = forwarder(p, kernel, "lb1"), forwarder(p, kernel, "lb2")
    lb1.acquire()
    lb2.acquire()  # the peer took over before lb1 let go (preemption, split brain)
    lb1.release()  # lb1 yields: it must not delete lb2's table
    assert list(kernel.tables) == ["kvha_10_1_2_100_lb2"]
    lb1.release()  # twice, or with nothing there: no error
    assert list(kernel.tables) == ["kvha_10_1_2_100_lb2"]
    p.drain("m1", 0.0)  # a change after release writes nothing for lb1
    assert list(kernel.tables) == ["kvha_10_1_2_100_lb2"]


def test_ip_mode_turns_on_forwarding_for_masters_on_other_hosts() -> None:
    kernel = FakeKernel()
    set_: list[tuple[str, str]] = []
    fwd = forwarder(pool(), kernel, mode="ip", sysctl=lambda n, v: set_.append((n, v)))
    fwd.acquire()
    assert set_ == [("net/ipv4/ip_forward", "1")]


def test_a_failed_nft_leaves_nothing_applied_and_is_retried_while_active(tmp_path: Any) -> None:
    reactor = MemoryReactorClock()
    lb, kernel = _lb(reactor, tmp_path)
    kernel.fail_nft = True
    lb._acquire()
    assert lb.kernel is not None and lb.kernel.applied is None
    assert "Could not process rule" in lb.kernel.failed
    assert not lb.status()["holds_vip"]
    kernel.fail_nft = False
    reactor.advance(1.0)
    assert lb.kernel.applied is not None and lb.status()["holds_vip"]
    assert lb.kernel.table in kernel.tables


# The load balancer around it ---------------------------------------------------------------------


def _config(state_dir: Any, masters: Any = (), **extra: Any) -> str:
    """An lb1 document for VIP (redis 6379; memcached 11211 if given) and ``masters``."""
    return lb_config(
        "lb1",
        vip=extra.pop("vip", VIP),
        vip_ports=extra.pop("vip_ports", {"redis": 6379}),
        heartbeat=("127.0.0.1:7001", "127.0.0.1:7002"),
        admin=("tcp:7101:interface=127.0.0.1", ""),
        state_dir=str(state_dir),
        masters=list(masters),
        **extra,
    )


def _lb(reactor: Any, state_dir: Any, **extra: Any) -> tuple[LoadBalancer, FakeKernel]:
    text = _config(
        state_dir,
        [
            {"id": "m1", "host": "10.0.0.1", "redis": 7001, "memcached": 7101},
            {"id": "m2", "host": "10.0.0.2", "redis": 7002, "memcached": 7102},
        ],
        vip_ports={"redis": 6379, "memcached": 11211, "http": None},
        forward="kernel",
        scheduler="rr",
        **extra,
    )
    config = load_config_string(text).lb
    assert config is not None
    lb = LoadBalancer(config, reactor)
    kernel = FakeKernel()
    assert lb.kernel is not None
    lb.kernel.run = kernel
    lb._in_thread = defer.maybeDeferred  # conntrack at once, not in a thread
    return lb, kernel


def test_kernel_mode_listens_on_nothing_and_reports_conntrack_connections(tmp_path: Any) -> None:
    reactor = MemoryReactorClock()
    lb, kernel = _lb(reactor, tmp_path)
    assert lb.factories == {}
    lb._acquire()
    assert reactor.tcpServers == []  # the kernel forwards: no VIP listener in this process
    # Counted in a thread: a status shows what the one before it counted.
    assert all(sum(m["connections"].values()) == 0 for m in lb.status()["masters"])
    status = lb.status()
    assert status["forward"] == "kernel" and status["holds_vip"]
    rows = {m["id"]: m for m in status["masters"]}
    # Established entries only (TIME_WAIT is not a connection), matched on the reply source.
    assert rows["m1"]["connections"] == {"redis": 2, "memcached": 0}
    assert rows["m2"]["connections"] == {"redis": 0, "memcached": 1}
    lb._release()
    assert kernel.tables == {} and not lb.status()["holds_vip"]


def test_drain_timeout_cuts_the_masters_kernel_connections_once(tmp_path: Any) -> None:
    reactor = MemoryReactorClock()
    lb, kernel = _lb(reactor, tmp_path, drain_timeout=2.0)
    lb._acquire()
    lb._drain_loop.start(0.5, now=False)
    lb.pool.drain("m1", reactor.seconds())
    assert "10.0.0.1" not in kernel.tables[lb.kernel.table]  # type: ignore[union-attr]
    reactor.advance(1.5)
    assert not [c for c in kernel.calls if c[:2] == ["conntrack", "-D"]]
    reactor.advance(1.0)
    deletes = [c for c in kernel.calls if c[:2] == ["conntrack", "-D"]]
    assert deletes == [
        ["conntrack", "-D", "-p", "tcp", "--orig-dst", VIP, "--orig-port-dst", "6379"]
        + ["--reply-src", "10.0.0.1", "--reply-port-src", "7001"],
        ["conntrack", "-D", "-p", "tcp", "--orig-dst", VIP, "--orig-port-dst", "11211"]
        + ["--reply-src", "10.0.0.1", "--reply-port-src", "7101"],
    ]
    reactor.advance(5.0)  # once only
    assert len([c for c in kernel.calls if c[:2] == ["conntrack", "-D"]]) == 2
    assert lb.kernel is not None
    assert lb.kernel.close_connections(lb.pool.backends["m2"]) == 4  # 2 per protocol
    kernel.conntrack_installed = False
    assert lb.kernel.close_connections(lb.pool.backends["m2"]) is None
    lb._drain_loop.stop()


# Configuration -----------------------------------------------------------------------------------


def test_leastconn_is_refused_with_kernel_forwarding() -> None:
    text = _config("/tmp/unused", forward="kernel")
    with pytest.raises(ConfigError) as e:
        load_config_string(text)
    assert "leastconn" in str(e.value) and "rr or wrr" in str(e.value)
    with pytest.raises(ConfigError):
        load_config_string(text.replace("forward: kernel", "forward: nat"))


def test_kvha_up_can_run_its_load_balancers_with_kernel_forwarding() -> None:
    config = LocalConfig(secret="s" * 32, admin_token=ADMIN_TOKEN, forward="kernel")
    lbs = [n for n in plan(config) if n.role == "lb"]
    for node in lbs:
        section = yaml.safe_load(node.text)["lb"]
        assert section["forward"] == "kernel" and section["scheduler"] == "rr"
        assert load_config_string(node.text).lb is not None
    proxied = LocalConfig(secret="s" * 32, admin_token=ADMIN_TOKEN, forward="proxy")
    plain = [n for n in plan(proxied) if n.role == "lb"]
    assert "forward" not in yaml.safe_load(plain[0].text)["lb"]  # proxy: the lb default


def test_kernel_forwarding_needs_ipv4_addresses_for_the_vip_and_every_master(
    tmp_path: Any,
) -> None:
    """nft translates to addresses: a name or an IPv6 address would fail the whole table."""

    def config(vip: str, host: str) -> str:
        return _config(
            tmp_path,
            [{"id": "m1", "host": host, "redis": 7001}],
            vip=vip,
            forward="kernel",
            scheduler="rr",
        )

    assert load_config_string(config("10.1.2.100", "10.0.0.1")).lb is not None
    with pytest.raises(ConfigError, match="vip.address.*IPv4"):
        load_config_string(config("fd00::100", "10.0.0.1"))
    with pytest.raises(ConfigError, match="masters.0.host.*'master1.example'"):
        load_config_string(config("10.1.2.100", "master1.example"))
    # The proxy connects by name, and keeps accepting one.
    proxied = config("10.1.2.100", "master1.example").replace("forward: kernel", "forward: proxy")
    assert load_config_string(proxied).lb is not None

    # At run time: the admin API refuses such a master, and one that arrives
    # anyway (a peer's list) is left out of the table instead of breaking it.
    reactor = MemoryReactorClock()
    lb, kernel = _lb(reactor, tmp_path)
    lb._acquire()
    code, doc = _admin(lb, b"POST", "/v1/masters", {"id": "m3", "host": "m3.example", "redis": 1})
    assert code == 400 and "IPv4" in doc["error"]["message"]
    assert "m3" not in lb.pool.backends
    code, doc = _admin(lb, b"POST", "/v1/masters", {"id": "m3", "host": "10.0.0.3", "redis": 7003})
    assert code == 201
    assert "10.0.0.3 . 7003" in kernel.tables[lb.kernel.table]  # type: ignore[union-attr]
    masters = lb.pool.export() + [
        {"id": "m4", "host": "m4.example", "ports": {"redis": 7004}, "weight": 1.0}
    ]
    lb.pool.replace(masters, lb.pool.epoch + 1, persist=False)
    table = kernel.tables[lb.kernel.table]  # type: ignore[union-attr]
    assert "m4.example" not in table and "10.0.0.3 . 7003" in table


def _admin(lb: LoadBalancer, method: bytes, path: str, doc: Any) -> tuple[int, Any]:
    request = DummyRequest(path.strip("/").split("/"))
    request.method = method
    request.path = path.encode()
    request.requestHeaders.addRawHeader(b"authorization", f"Bearer {ADMIN_TOKEN}".encode())
    request.content = io.BytesIO(json.dumps(doc).encode())
    body = lb.admin.render(request)
    return request.responseCode or 200, json.loads(body)


# The watch connections (kvha/lb/watch.py) ------------------------------------------------------


def _accept(reactor: MemoryReactorClock, index: int) -> tuple[Any, StringTransport]:
    """Complete the ``index``-th connection the reactor was asked for."""
    _host, _port, factory, *_ = reactor.tcpClients[index]
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def test_the_watch_marks_a_master_down_the_moment_its_open_connection_closes() -> None:
    reactor = MemoryReactorClock()
    p = pool("rr")
    changes: list[int] = []
    p.on_change.append(lambda: changes.append(1))
    watcher = MasterWatcher(reactor, p, reactor, interval=1.0)
    watcher.start()
    reactor.advance(0)
    # One connection per master to redis and to memcached (HTTP is left to the checks).
    wanted = [("10.0.0.1", 7001), ("10.0.0.1", 7101), ("10.0.0.2", 7002), ("10.0.0.2", 7102)]
    assert sorted((c[0], c[1]) for c in reactor.tcpClients) == wanted
    opened = {(c[0], c[1]): _accept(reactor, i) for i, c in enumerate(reactor.tcpClients)}
    # Each probes at once and every interval: a master never sees it idle.
    _, m1_redis = opened["10.0.0.1", 7001]
    _, m1_mc = opened["10.0.0.1", 7101]
    assert m1_redis.value() == b"PING\r\n" and m1_mc.value() == b"version\r\n"
    reactor.advance(1.0)
    assert m1_redis.value() == b"PING\r\n" * 2
    # The master closes it: a new connection is tried at once.  A master that only
    # closed that one (an idle timeout) accepts it and stays up...
    protocol, _ = opened["10.0.0.2", 7002]
    protocol.connectionLost(Failure(ConnectionDone()))
    assert (reactor.tcpClients[-1][0], reactor.tcpClients[-1][1]) == ("10.0.0.2", 7002)
    again, _ = _accept(reactor, len(reactor.tcpClients) - 1)
    again.dataReceived(b"+PONG\r\n")  # it answers: alive, no longer suspect
    assert p.backends["m2"].up["redis"] and changes == [] and watcher.lost_count == 1
    assert watcher.suspect == set()
    # ...and one that died refuses it, and is down at once.
    protocol, _ = opened["10.0.0.1", 7001]
    protocol.connectionLost(Failure(ConnectionDone()))
    _host, _port, factory, *_ = reactor.tcpClients[-1]
    assert (_host, _port) == ("10.0.0.1", 7001)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert not p.backends["m1"].up["redis"] and p.backends["m1"].up["memcached"]
    assert changes == [1] and watcher.lost_count == 2
    # A dying master's listening socket may still take the new connection and then
    # reset it: the next connect, refused, still marks it down.
    protocol, _ = opened["10.0.0.1", 7101]
    protocol.connectionLost(Failure(ConnectionDone()))
    racing, _ = _accept(reactor, len(reactor.tcpClients) - 1)
    racing.connectionLost(Failure(ConnectionDone()))  # reset at once, unanswered
    assert p.backends["m1"].up["memcached"]
    reactor.advance(0.1)
    _host, _port, factory, *_ = reactor.tcpClients[-1]
    assert (_host, _port) == ("10.0.0.1", 7101)
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert not p.backends["m1"].up["memcached"] and changes == [1, 1]
    p.check_result(p.backends["m1"], "memcached", True)
    p.check_result(p.backends["m1"], "memcached", True)  # back (rise 2), watched again
    _accept(reactor, len(reactor.tcpClients) - 1)[0].dataReceived(b"VERSION 1\r\n")
    # Down: no new watch until the health checks bring it back (rise 2).
    before = len(reactor.tcpClients)
    reactor.advance(1.0)
    assert len(reactor.tcpClients) == before
    p.check_result(p.backends["m1"], "redis", True)
    p.check_result(p.backends["m1"], "redis", True)
    assert (reactor.tcpClients[-1][0], reactor.tcpClients[-1][1]) == ("10.0.0.1", 7001)
    # A refused connect is tried again 0.1 s later while the master counts as up.
    _host, _port, factory, *_ = reactor.tcpClients[-1]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    reactor.advance(0.1)
    assert len(reactor.tcpClients) == before + 2
    # A connection closed as soon as it opened is not replaced at once
    # (a master at its connection limit accepts and closes every new one).
    quick, _ = _accept(reactor, len(reactor.tcpClients) - 1)
    count = len(reactor.tcpClients)
    quick.connectionLost(Failure(ConnectionDone()))
    assert len(reactor.tcpClients) == count and p.backends["m1"].up["redis"]
    reactor.advance(0.1)  # ...but 0.1 s later
    assert len(reactor.tcpClients) == count + 1
    # A removed master's watches are closed, and that closing marks nothing down.
    removed = p.remove("m2")
    assert opened["10.0.0.1", 7101][1].disconnecting is False
    lost = watcher.lost_count
    for (host, _port), (proto, transport) in opened.items():
        if host == "10.0.0.2" and transport.disconnecting:
            proto.connectionLost(Failure(ConnectionDone()))
    assert removed.up["memcached"] and watcher.lost_count == lost
    still_open = list(watcher.open.values())
    watcher.stop()
    assert still_open and all(c.transport.disconnecting for c in still_open)


def test_kernel_mode_runs_the_watch_and_proxy_mode_does_not(tmp_path: Any) -> None:
    reactor = MemoryReactorClock()
    lb, _kernel = _lb(reactor, tmp_path)
    assert lb.watcher is not None
    text = _config(
        tmp_path / "proxy",
        [],
    )
    config = load_config_string(text).lb
    assert config is not None
    assert LoadBalancer(config, reactor).watcher is None


def test_twistd_refuses_to_start_kernel_forwarding_where_nft_cannot_run(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ACTIVE node that cannot write its table would hold the VIP and forward nothing."""
    path = tmp_path / "lb.yaml"
    path.write_text(
        _config(
            tmp_path,
            [],
            forward="kernel",
            scheduler="rr",
        )
    )

    def missing(argv: list[str], stdin: Optional[bytes]) -> str:
        raise FileNotFoundError(argv[0])

    def not_root(argv: list[str], stdin: Optional[bytes]) -> str:
        raise subprocess.CalledProcessError(
            1, argv, b"", b"Operation not permitted (you must be root)"
        )

    for runner, why in ((missing, "nft is not installed"), (not_root, "you must be root")):
        monkeypatch.setattr(nat, "run_tool", runner)
        with pytest.raises(usage.UsageError, match=f"forward: kernel: .*{why}"):
            tap.Options().parseOptions(["--config", str(path)])
    monkeypatch.setattr(nat, "run_tool", FakeKernel())
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    assert options["lb"].forward == "kernel"


def test_after_a_split_brain_on_one_host_the_winner_puts_its_table_back(tmp_path: Any) -> None:
    """Both ACTIVE for a moment (the backup started before it heard the other): the
    loser's acquire deletes the winner's table and its release deletes its own."""
    reactor = MemoryReactorClock()
    lb1, kernel = _lb(reactor, tmp_path / "lb1")
    lb2, _ = _lb(reactor, tmp_path / "lb2")
    assert lb2.kernel is not None and lb1.kernel is not None
    lb2.kernel.table = lb2.kernel.prefix + "lb2"
    lb2.kernel.run = kernel  # one host, one kernel
    lb1._acquire()
    lb2._acquire()  # thought itself alone
    assert list(kernel.tables) == [lb2.kernel.table]
    lb2._release()  # heard lb1, yields
    assert kernel.tables == {}
    lb1._reassert()  # what the election calls when it hears an ACTIVE peer it outranks
    assert list(kernel.tables) == [lb1.kernel.table]
    # A table deleted from outside (a firewall reload) comes back within a check.
    del kernel.tables[lb1.kernel.table]
    lb1._kernel_verify()
    assert list(kernel.tables) == [lb1.kernel.table]
    # A BACKUP writes nothing back.
    lb1._release()
    lb1._kernel_verify()
    assert kernel.tables == {}


def test_a_peer_table_gone_before_our_write_does_not_abort_it() -> None:
    """The peer stops: it resigns, then deletes its own table, while we, ACTIVE at once,
    write ours.  Our transaction deletes its table too; if that delete found nothing,
    nft would abort the whole transaction and leave the VIP with no table."""
    kernel = FakeKernel()
    kernel.tables["kvha_10_1_2_100_lb2"] = "the peer's"
    fwd = forwarder(pool(), kernel)
    listed = fwd.tables

    def peer_deletes_its_own_meanwhile() -> list[str]:
        names = listed()
        kernel.tables.pop("kvha_10_1_2_100_lb2", None)
        return names

    fwd.tables = peer_deletes_its_own_meanwhile  # type: ignore[method-assign]
    fwd.acquire()
    assert list(kernel.tables) == ["kvha_10_1_2_100_lb1"] and fwd.applied is not None


def test_table_names_keep_distinct_ids_distinct() -> None:
    kernel = FakeKernel()
    names = {forwarder(pool(), kernel, lb_id).table for lb_id in ("lb-1", "lb_1", "lb.1", "lb1")}
    assert len(names) == 4
    assert all(n.startswith("kvha_10_1_2_100_") and n.replace("_", "").isalnum() for n in names)


def test_removal_and_drains_adopted_from_the_peer_cut_connections_too(tmp_path: Any) -> None:
    """The change may reach the VIP holder as the peer's list, not as its own API call."""
    reactor = MemoryReactorClock()
    lb, kernel = _lb(reactor, tmp_path, drain_timeout=2.0)
    lb._acquire()
    lb._drain_loop.start(0.5, now=False)
    masters = lb.pool.export()
    masters[0]["draining"] = True  # m1 drained through the peer
    lb.pool.replace(masters, lb.pool.epoch + 1, persist=False)
    reactor.advance(1.0)
    assert not [c for c in kernel.calls if c[:2] == ["conntrack", "-D"]]
    reactor.advance(2.0)
    cut = [c[-3] for c in kernel.calls if c[:2] == ["conntrack", "-D"]]
    assert cut == ["10.0.0.1", "10.0.0.1"]
    lb.pool.replace(masters[:1], lb.pool.epoch + 1, persist=False)  # m2 removed by the peer
    cut = [c[-3] for c in kernel.calls if c[:2] == ["conntrack", "-D"]]
    assert cut[2:] == ["10.0.0.2", "10.0.0.2"]
    lb._drain_loop.stop()


def test_the_admin_api_refuses_weights_that_are_not_above_zero(tmp_path: Any) -> None:
    lb, kernel = _lb(MemoryReactorClock(), tmp_path)
    for weight in (0, -1, "2", None, True, float("inf")):
        doc = {"id": "m3", "host": "10.0.0.3", "redis": 7003, "weight": weight}
        code, out = _admin(lb, b"POST", "/v1/masters", doc)
        assert code == 400 and "weight" in out["error"]["message"], weight
    assert "m3" not in lb.pool.backends


def test_a_node_handing_over_to_a_live_peer_leaves_its_table_for_the_peer(tmp_path: Any) -> None:
    """Deleting the last nat table drops the translation of every open connection; the
    peer's acquire replaces ours in one transaction, which keeps them."""
    reactor = MemoryReactorClock()
    lb1, kernel = _lb(reactor, tmp_path / "lb1")
    lb1._acquire()
    lb1.election.peer = Heartbeat("lb2", "BACKUP", 100, 1, 0)
    lb1.election.peer_seen = reactor.seconds()
    lb1._release()  # a clean stop: resign, then release
    lb1._release()  # stopService releases again: still kept
    assert list(kernel.tables) == [lb1.kernel.table]  # type: ignore[union-attr]
    assert not lb1.status()["holds_vip"]
    peer = forwarder(pool(), kernel, "lb2")
    peer.acquire()
    assert list(kernel.tables) == [peer.table]
    assert kernel.scripts[-1].startswith(f"table ip {lb1.kernel.table}\n")  # type: ignore[union-attr]
    # With the peer silent for longer than it takes to declare it dead: deleted.
    lb3, kernel3 = _lb(reactor, tmp_path / "lb3")
    lb3._acquire()
    lb3.election.peer = Heartbeat("lb2", "BACKUP", 100, 1, 0)
    lb3.election.peer_seen = reactor.seconds()
    reactor.advance(1.0)
    lb3._release()
    assert kernel3.tables == {}
    # Nor is it kept when the peer's last word was its resignation (both stopping).
    lb4, kernel4 = _lb(reactor, tmp_path / "lb4")
    lb4._acquire()
    lb4.election.peer = Heartbeat("lb2", "BACKUP", 100, 2, 0, resign=True)
    lb4.election.peer_seen = reactor.seconds()
    lb4._release()
    assert kernel4.tables == {}
