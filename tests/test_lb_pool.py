"""Tests for kvha.lb.pool (schedulers, health, drain, persistence) and kvha.lb.forward.

The pool tests are plain logic.  The forwarder and health-checker tests run on
the real reactor over loopback (pytest-twisted), against tiny in-process
stand-ins for masters, with every wait bounded by a timeout.
"""

from __future__ import annotations

import json
import random
import socket
import struct
from collections import Counter
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientFactory, Factory, Protocol

from kvha.lb.forward import ForwardFactory, HealthChecker
from kvha.lb.pool import Pool
from kvha.procs import free_port

PORTS = {"redis": 1, "memcached": 2, "http": 3}


def _pool(*specs: tuple[str, float], scheduler: str = "leastconn", **kw: Any) -> Pool:
    pool = Pool(scheduler, rng=random.Random(1), **kw)
    pool.load({"id": i, "host": "127.0.0.1", "ports": PORTS, "weight": w} for i, w in specs)
    return pool


def _picks(pool: Pool, n: int, proto: str = "redis") -> list[str]:
    out = []
    for _ in range(n):
        b = pool.choose(proto)
        assert b is not None
        out.append(b.id)
    return out


# Schedulers ----------------------------------------------------------------------------------


def test_leastconn_picks_the_fewest_connections_per_unit_of_weight() -> None:
    """leastconn compares open connections divided by weight, per protocol."""
    pool = _pool(("a", 1.0), ("b", 2.0), ("c", 1.0))
    a, b, c = (pool.backends[i] for i in "abc")
    a.conns["redis"], b.conns["redis"], c.conns["redis"] = 1, 1, 2
    assert pool.choose("redis") is b  # 1/2 beats 1/1 and 2/1
    b.conns["redis"] = 3  # 1.5
    assert pool.choose("redis") is a
    assert pool.choose("memcached") is not None  # other protocols count separately
    assert pool.choose("redis", exclude=["a"]) is b  # 1.5 < 2
    # Simulate a stream of long-lived connections: the weight-2 master gets twice as many.
    for backend in (a, b, c):
        backend.conns["redis"] = 0
    for _ in range(300):
        chosen = pool.choose("redis")
        assert chosen is not None
        chosen.conns["redis"] += 1
    assert (a.conns["redis"], b.conns["redis"], c.conns["redis"]) == (75, 150, 75)


def test_leastconn_breaks_ties_at_random_among_the_tied_only() -> None:
    """Equal load is shared at random between the tied masters, never to a busier one."""
    pool = _pool(("a", 1.0), ("b", 1.0), ("c", 1.0))
    pool.backends["c"].conns["redis"] = 1
    counts = Counter(_picks(pool, 400))
    assert set(counts) == {"a", "b"}
    assert 120 < counts["a"] < 280


def test_round_robin_cycles_through_the_live_masters() -> None:
    """rr takes each live master in turn and skips a master that is down."""
    pool = _pool(("a", 1.0), ("b", 5.0), ("c", 1.0), scheduler="rr")
    picks = _picks(pool, 9)
    assert Counter(picks) == {"a": 3, "b": 3, "c": 3}
    assert len(set(picks[:3])) == 3
    pool.observed_failure(pool.backends["b"], "redis", "refused")
    assert Counter(_picks(pool, 10)) == {"a": 5, "c": 5}


@pytest.mark.parametrize(
    ("weights", "per_cycle"),
    [
        ((5.0, 1.0, 1.0), (5, 1, 1)),
        ((3.0, 2.0), (3, 2)),
        ((1.0, 1.0, 1.0), (1, 1, 1)),
        ((0.5, 1.5), (1, 3)),
        ((2.0, 4.0, 6.0), (1, 2, 3)),
    ],
)
def test_smooth_wrr_gives_exact_ratios(
    weights: tuple[float, ...], per_cycle: tuple[int, ...]
) -> None:
    """wrr picks each master exactly in proportion to its weight over every full cycle."""
    ids = [f"m{i}" for i in range(len(weights))]
    pool = _pool(*zip(ids, weights), scheduler="wrr")
    for _ in range(100):
        assert Counter(_picks(pool, sum(per_cycle))) == dict(zip(ids, per_cycle))


def test_smooth_wrr_spreads_picks_evenly() -> None:
    """wrr is nginx's smooth variant: 5:1:1 gives a a b a c a a, not a a a a a b c."""
    pool = _pool(("a", 5.0), ("b", 1.0), ("c", 1.0), scheduler="wrr")
    assert "".join(_picks(pool, 14)) == "aabacaa" * 2


def test_unknown_scheduler_is_refused() -> None:
    """Only leastconn, rr and wrr exist."""
    with pytest.raises(ValueError):
        Pool("random")


# Health ---------------------------------------------------------------------------------------


def test_health_falls_after_fall_failures_and_rises_after_rise_successes() -> None:
    """A master goes down after ``fall`` failed checks in a row and up after ``rise`` good ones."""
    pool = Pool(rise=3, fall=2)
    pool.load([{"id": "a", "host": "h", "ports": {"redis": 1, "http": 2}}])
    a = pool.backends["a"]
    pool.check_result(a, "redis", False)
    pool.check_result(a, "redis", True)  # resets the failure count
    pool.check_result(a, "redis", False)
    assert a.up["redis"]
    pool.check_result(a, "redis", False)
    assert not a.up["redis"] and a.up["http"]  # health is per protocol
    assert pool.choose("redis") is None and pool.choose("http") is a
    pool.check_result(a, "redis", True)
    pool.check_result(a, "redis", True)
    pool.check_result(a, "redis", False)  # resets the success count
    pool.check_result(a, "redis", True)
    pool.check_result(a, "redis", True)
    assert not a.up["redis"]
    pool.check_result(a, "redis", True)
    assert a.up["redis"] and pool.choose("redis") is a


def test_observed_failure_marks_down_at_once() -> None:
    """A refused or reset connection on real traffic marks the master down without waiting."""
    pool = _pool(("a", 1.0), ("b", 1.0))
    pool.fall = 5
    a = pool.backends["a"]
    pool.observed_failure(a, "redis", "refused")
    assert not a.up["redis"] and a.up["memcached"]
    assert _picks(pool, 5) == ["b"] * 5
    for _ in range(pool.rise - 1):
        pool.check_result(a, "redis", True)
    assert not a.up["redis"]
    pool.check_result(a, "redis", True)
    assert a.up["redis"]


def test_a_draining_master_takes_no_new_connections() -> None:
    """Draining excludes a master from every scheduler while leaving it in the list."""
    for scheduler in ("leastconn", "rr", "wrr"):
        pool = _pool(("a", 1.0), ("b", 1.0), scheduler=scheduler)
        epoch = pool.epoch
        pool.drain("a", now=12.0)
        assert pool.epoch == epoch + 1
        assert set(_picks(pool, 20)) == {"b"}
        assert pool.backends["a"].drain_started == 12.0
        assert [m["draining"] for m in pool.export()] == [True, False]
        pool.drain("b", now=13.0)
        assert pool.choose("redis") is None


# Membership and persistence --------------------------------------------------------------------


def test_changes_persist_to_the_state_file_and_reload(tmp_path: Any) -> None:
    """add, drain and remove bump the epoch and are saved; a new pool loads them, not the config."""
    path = str(tmp_path / "masters.json")
    initial = [{"id": "m1", "host": "127.0.0.1", "ports": PORTS}]
    pool = Pool(state_path=path)
    pool.load(initial)
    assert pool.epoch == 0 and list(pool.backends) == ["m1"]
    pool.add("m2", "127.0.0.2", {"redis": 7000}, weight=2.0)
    pool.add("m3", "127.0.0.3", {"redis": 7001})
    with pytest.raises(KeyError):
        pool.add("m2", "127.0.0.9", {"redis": 1})
    pool.drain("m2", now=1.0)
    pool.remove("m3")
    assert pool.epoch == 4
    with open(path) as f:
        assert json.load(f)["epoch"] == 4
    assert not (tmp_path / "masters.json.tmp").exists()

    again = Pool(state_path=path)
    again.load(initial)  # the file wins over the configured list
    assert again.epoch == 4
    assert again.export() == pool.export()
    assert again.backends["m2"].draining and again.backends["m2"].weight == 2.0
    assert again.choose("redis").id == "m1"  # type: ignore[union-attr]

    fresh = Pool(state_path=str(tmp_path / "other.json"))
    fresh.load(initial)
    assert fresh.epoch == 0 and list(fresh.backends) == ["m1"]
    assert not (tmp_path / "other.json").exists()  # loading alone writes nothing


def test_replace_keeps_the_health_of_unchanged_masters(tmp_path: Any) -> None:
    """Adopting the peer's list keeps state of unchanged masters and resets changed ones."""
    pool = Pool(state_path=str(tmp_path / "m.json"))
    pool.load(
        [
            {"id": "same", "host": "h", "ports": {"redis": 1}},
            {"id": "moved", "host": "h", "ports": {"redis": 2}},
            {"id": "gone", "host": "h", "ports": {"redis": 3}},
        ]
    )
    same = pool.backends["same"]
    pool.observed_failure(same, "redis", "refused")
    same.conns["redis"] = 4
    pool.observed_failure(pool.backends["moved"], "redis", "refused")
    pool.replace(
        [
            {"id": "same", "host": "h", "ports": {"redis": 1}, "weight": 3.0},
            {"id": "moved", "host": "h", "ports": {"redis": 9}},
            {"id": "new", "host": "h", "ports": {"redis": 4}, "draining": True},
        ],
        epoch=7,
    )
    assert pool.backends["same"] is same
    assert not same.up["redis"] and same.conns["redis"] == 4 and same.weight == 3.0
    assert pool.backends["moved"].up["redis"] and pool.backends["moved"].ports == {"redis": 9}
    assert "gone" not in pool.backends and pool.backends["new"].draining
    assert pool.epoch == 7
    with open(tmp_path / "m.json") as f:
        assert json.load(f)["epoch"] == 7


# Forwarding over loopback ------------------------------------------------------------------------


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.factory.prefix + data)


class _Reset(Protocol):
    """Answers nothing: resets the connection (RST, not FIN) on the first bytes."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.transport.abortConnection()


def _serve(proto: type, prefix: bytes = b"") -> Any:
    factory = Factory.forProtocol(proto)
    factory.prefix = prefix  # type: ignore[attr-defined]
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


class _Client(Protocol):
    """Collects what comes back; ``wait(n)`` fires once n bytes have arrived."""

    def __init__(self) -> None:
        self.buffer = b""
        self.waiting: list[tuple[int, defer.Deferred]] = []
        self.closed = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        for n, d in list(self.waiting):
            if len(self.buffer) >= n:
                self.waiting.remove((n, d))
                d.callback(self.buffer)

    def connectionLost(self, reason: Any = None) -> None:
        for _, d in self.waiting:
            d.errback(reason)
        self.waiting = []
        self.closed.callback(None)

    def wait(self, n: int, timeout: float = 5.0) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((n, d))
        d.addTimeout(timeout, reactor)
        self.dataReceived(b"")
        return d


def _connect(port: int) -> defer.Deferred:
    proto = _Client()
    factory = ClientFactory.forProtocol(lambda: proto)  # type: ignore[arg-type]
    d: defer.Deferred = defer.Deferred()
    factory.clientConnectionFailed = lambda c, r: d.errback(r)  # type: ignore[method-assign]
    reactor.connectTCP("127.0.0.1", port, factory, timeout=5)
    factory.startedConnecting = lambda c: None  # type: ignore[method-assign]
    proto.connectionMade = lambda: d.callback(proto)  # type: ignore[method-assign]
    return d


class _FirstChoice(random.Random):
    """An rng whose choice is always the first candidate, so the order is known."""

    def choice(self, seq: Any) -> Any:
        return seq[0]


def _forwarder(pool: Pool, proto: str = "redis") -> tuple[ForwardFactory, Any]:
    factory = ForwardFactory(reactor, pool, proto, connect_timeout=2.0)
    return factory, reactor.listenTCP(0, factory, interface="127.0.0.1")


@pytest_twisted.inlineCallbacks
def test_a_refused_master_is_skipped_and_the_client_reaches_the_next() -> None:
    """The first master refuses; the client is forwarded to the second without noticing."""
    live = _serve(_Echo, b"m2:")
    dead_port = free_port()  # nothing listens: connect is refused
    pool = Pool("leastconn", rng=_FirstChoice())
    pool.load(
        [
            {"id": "dead", "host": "127.0.0.1", "ports": {"redis": dead_port}},
            {"id": "live", "host": "127.0.0.1", "ports": {"redis": live.getHost().port}},
        ]
    )
    factory, port = _forwarder(pool)
    clients: list[_Client] = []
    try:
        client = yield _connect(port.getHost().port)
        clients.append(client)
        client.transport.write(b"PING\r\n")
        got = yield client.wait(len(b"m2:PING\r\n"))
        assert got == b"m2:PING\r\n"
        dead, alive = pool.backends["dead"], pool.backends["live"]
        assert not dead.up["redis"]  # observed at once, no health check ran
        assert dead.conns["redis"] == 0 and dead.total["redis"] == 0
        assert alive.conns["redis"] == 1 and alive.total["redis"] == 1
        # The next client goes straight to the live master.
        second = yield _connect(port.getHost().port)
        clients.append(second)
        second.transport.write(b"x")
        assert (yield second.wait(4)) == b"m2:x"
        assert alive.conns["redis"] == 2 and factory.no_backend == 0
        client.transport.loseConnection()
        yield client.closed
        yield task.deferLater(reactor, 0.05, lambda: None)
        assert alive.conns["redis"] == 1 and len(alive.pairs) == 1
    finally:
        for c in clients:
            c.transport.loseConnection()
        yield port.stopListening()
        yield live.stopListening()


@pytest_twisted.inlineCallbacks
def test_no_live_master_closes_the_client() -> None:
    """When every master refuses, the client is closed (not left hanging) and counted."""
    pool = Pool()
    pool.load(
        [{"id": f"d{i}", "host": "127.0.0.1", "ports": {"redis": free_port()}} for i in (1, 2)]
    )
    factory, port = _forwarder(pool)
    try:
        client = yield _connect(port.getHost().port)
        yield client.closed.addTimeout(5, reactor)
        assert factory.no_backend == 1
        assert all(not b.up["redis"] and b.conns["redis"] == 0 for b in pool.backends.values())
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_reset_on_real_traffic_marks_the_master_down_at_once() -> None:
    """A master that resets a forwarded connection is marked down (observe layer4)."""
    resetter = _serve(_Reset)
    live = _serve(_Echo, b"ok:")
    pool = Pool("leastconn", rng=_FirstChoice(), fall=3)
    pool.load(
        [
            {"id": "bad", "host": "127.0.0.1", "ports": {"redis": resetter.getHost().port}},
            {"id": "good", "host": "127.0.0.1", "ports": {"redis": live.getHost().port}},
        ]
    )
    _, port = _forwarder(pool)
    try:
        client = yield _connect(port.getHost().port)
        client.transport.write(b"PING\r\n")
        yield client.closed.addTimeout(5, reactor)
        assert not pool.backends["bad"].up["redis"]
        assert pool.backends["bad"].conns["redis"] == 0
        again = yield _connect(port.getHost().port)
        again.transport.write(b"PING\r\n")
        assert (yield again.wait(9)) == b"ok:PING\r\n"
        again.transport.loseConnection()
        yield again.closed
    finally:
        yield port.stopListening()
        yield resetter.stopListening()
        yield live.stopListening()


@pytest_twisted.inlineCallbacks
def test_draining_keeps_open_connections_working() -> None:
    """A connection to a draining master keeps working; new ones go elsewhere."""
    one = _serve(_Echo, b"1:")
    two = _serve(_Echo, b"2:")
    pool = Pool("leastconn", rng=_FirstChoice())
    pool.load(
        [
            {"id": "one", "host": "127.0.0.1", "ports": {"redis": one.getHost().port}},
            {"id": "two", "host": "127.0.0.1", "ports": {"redis": two.getHost().port}},
        ]
    )
    _, port = _forwarder(pool)
    clients: list[_Client] = []
    try:
        old = yield _connect(port.getHost().port)
        clients.append(old)
        old.transport.write(b"a")
        assert (yield old.wait(3)) == b"1:a"
        pool.drain("one", now=reactor.seconds())
        for i in range(3):
            new = yield _connect(port.getHost().port)
            clients.append(new)
            new.transport.write(b"b")
            assert (yield new.wait(3)) == b"2:b", i
        old.transport.write(b"c")
        assert (yield old.wait(6)) == b"1:a1:c"
        assert pool.backends["one"].conns["redis"] == 1
        assert len(pool.backends["one"].pairs) == 1
    finally:
        for c in clients:
            c.transport.loseConnection()
        yield port.stopListening()
        yield one.stopListening()
        yield two.stopListening()


class _Pong(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"+PONG\r\n" if self.factory.healthy else b"-ERR busy\r\n")


@pytest_twisted.inlineCallbacks
def test_health_checker_follows_a_master_going_bad_and_coming_back() -> None:
    """RESP PING checks mark a master down after ``fall`` bad answers and up after ``rise``."""
    factory = Factory.forProtocol(_Pong)
    factory.healthy = True  # type: ignore[attr-defined]
    server = reactor.listenTCP(0, factory, interface="127.0.0.1")
    refused = free_port()
    pool = Pool(rise=2, fall=2)
    pool.load(
        [
            {"id": "m", "host": "127.0.0.1", "ports": {"redis": server.getHost().port}},
            {"id": "gone", "host": "127.0.0.1", "ports": {"memcached": refused}},
        ]
    )
    checker = HealthChecker(reactor, pool, reactor, interval=0.03, timeout=0.5)
    m = pool.backends["m"]

    @defer.inlineCallbacks
    def until(pred: Any, limit: float = 5.0) -> Any:
        deadline = reactor.seconds() + limit
        while not pred():
            assert reactor.seconds() < deadline, "condition not reached in time"
            yield task.deferLater(reactor, 0.01, lambda: None)

    checker.start()
    try:
        yield until(lambda: m.good["redis"] >= 2)
        assert m.up["redis"]
        yield until(lambda: not pool.backends["gone"].up["memcached"])
        factory.healthy = False  # type: ignore[attr-defined]
        yield until(lambda: not m.up["redis"])
        factory.healthy = True  # type: ignore[attr-defined]
        yield until(lambda: m.up["redis"])
    finally:
        checker.stop()
        yield server.stopListening()
        yield task.deferLater(reactor, 0.1, lambda: None)  # let probes in flight finish
