"""Client limits of a master, each configurable: connections, in flight, line, value, idle.

Connections are counted per master, across its memcached, Redis and HTTP
ports (one :class:`ConnectionBudget`).  Requests in flight per connection
stop the master reading (memcached and Redis: ``max_in_flight``, tested in
their protocol tests too; HTTP: one request at a time).  Lines and values
have a length limit, and silent connections are closed after
``idle_timeout``.  Everything runs on a ``Clock`` over StringTransports.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.testing import StringTransport

from kvha.master.http import Api, ApiSite
from kvha.master.limits import ConnectionBudget
from tests.inprocess import Cluster
from tests.test_http_api import Web
from tests.test_partitions import Line, resp


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(n=3, replicas=1)
    yield c
    c.stop()


def http_conn(site: ApiSite) -> tuple[object, StringTransport]:
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def test_connections_are_limited_per_master_across_protocols(cluster: Cluster) -> None:
    """One budget for memcached, Redis and HTTP; over it each protocol refuses in its own words."""
    budget = ConnectionBudget(2)
    mc = cluster.memcache_factory(budget=budget)
    rd = cluster.resp_factory(budget=budget)
    site = ApiSite(Api(cluster.router, cluster.clock), budget=budget)
    first = Line(mc)
    second = Line(rd)
    assert budget.open == 2
    refused_mc = Line(mc)
    assert refused_mc.take() == b"SERVER_ERROR too many open connections\r\n"
    assert refused_mc.transport.disconnecting
    refused_rd = Line(rd)
    assert refused_rd.take() == b"-ERR max number of clients reached\r\n"
    channel, transport = http_conn(site)
    assert transport.value().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert transport.value().endswith(b'"message": "too many connections"}}')
    assert transport.disconnecting
    # Refused connections never held a slot; closing a real one frees one.
    for refused in (refused_mc, refused_rd):
        refused.close()
    assert budget.open == 2 and budget.refused == 3
    first.close()
    channel, transport = http_conn(site)
    assert not transport.disconnecting and budget.open == 2
    channel.connectionLost(None)  # type: ignore[attr-defined]
    assert budget.open == 1
    assert Line(mc).send(b"version\r\n").startswith(b"VERSION")
    second.close()


def test_redis_idle_timeout(cluster: Cluster) -> None:
    """A Redis connection silent for idle_timeout is closed; activity postpones it."""
    conn = Line(cluster.resp_factory(idle_timeout=5.0))
    cluster.clock.advance(4)
    assert conn.send(resp("PING")) == b"+PONG\r\n"
    cluster.clock.advance(4)
    assert not conn.transport.disconnecting
    cluster.clock.advance(1.5)
    assert conn.transport.disconnecting
    forever = Line(cluster.resp_factory())
    cluster.clock.advance(3600)
    assert not forever.transport.disconnecting


def test_redis_idle_timeout_waits_for_pending_replies(cluster: Cluster) -> None:
    """A connection waiting on a slow data node is not idle."""
    conn = Line(cluster.resp_factory(idle_timeout=5.0))
    for client in cluster.clients.values():
        client.hold()
    conn.send(resp("GET", "k"))
    cluster.clock.advance(6)
    assert not conn.transport.disconnecting
    for client in cluster.clients.values():
        client.release()
    assert conn.take() == b"$-1\r\n"
    cluster.clock.advance(5.1)
    assert conn.transport.disconnecting


def test_redis_line_limit(cluster: Cluster) -> None:
    """An inline command or header line longer than max_line_bytes is a protocol error."""
    conn = Line(cluster.resp_factory(max_line_bytes=1024))
    assert conn.send(b"SET k " + b"v" * 900 + b"\r\n") == b"+OK\r\n"
    assert conn.send(b"x" * 1100) == b"-ERR Protocol error: too big inline request\r\n"
    assert conn.transport.disconnecting
    # Bulk values are limited by max_value_bytes, not by the line limit.
    other = Line(cluster.resp_factory(max_line_bytes=1024))
    assert other.send(resp("SET", "k", "v" * 5000)) == b"+OK\r\n"


def test_value_limits_in_all_three_protocols(cluster: Cluster) -> None:
    """A value over max_value_bytes is refused by each protocol and stores nothing."""
    mc = Line(cluster.memcache_factory(max_value_bytes=100))
    assert mc.send(b"set k 0 0 101\r\n" + b"x" * 101 + b"\r\n") == (
        b"SERVER_ERROR object too large for cache\r\n"
    )
    rd = Line(cluster.resp_factory(max_value_bytes=100))
    assert rd.send(resp("SET", "k", "x" * 101)).startswith(b"-ERR argument exceeds the maximum")
    web = Web(cluster, max_value_bytes=100)
    assert web.request("PUT", "/v1/p/default/k/k", b"x" * 101).status == 413
    assert mc.send(b"get k\r\n") == b"END\r\n"


def test_http_line_limit(cluster: Cluster) -> None:
    """A request line or header line over max_line_bytes gets 400 and the connection closes."""
    site = ApiSite(Api(cluster.router, cluster.clock), max_line_bytes=1024)
    channel, transport = http_conn(site)
    channel.dataReceived(  # type: ignore[attr-defined]
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 2000 + b"\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert transport.disconnecting
    channel, transport = http_conn(site)
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Short: a\r\n\r\n")  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.1 200 ")


def test_http_idle_timeout(cluster: Cluster) -> None:
    """An HTTP connection silent for idle_timeout is closed."""
    site = ApiSite(Api(cluster.router, cluster.clock), idle_timeout=5.0)
    site.reactor = cluster.clock  # type: ignore[assignment]
    channel, transport = http_conn(site)
    cluster.clock.advance(4)
    assert not transport.disconnecting
    cluster.clock.advance(2)
    assert transport.disconnecting


def test_http_serves_one_request_at_a_time_per_connection(cluster: Cluster) -> None:
    """Pipelined HTTP requests wait their turn; past 16 KiB buffered the connection is paused."""
    site = ApiSite(Api(cluster.router, cluster.clock))
    for client in cluster.clients.values():
        client.hold()
    channel, transport = http_conn(site)
    request = b"GET /v1/p/default/k/a HTTP/1.1\r\nHost: x\r\n\r\n"
    channel.dataReceived(request * 3)  # type: ignore[attr-defined]
    assert transport.value() == b""
    assert sum(c.calls.get("get", 0) for c in cluster.clients.values()) == 1  # one at a time
    channel.dataReceived(request * 400)  # type: ignore[attr-defined]
    assert transport.producerState == "paused"  # Twisted's bound: 16 KiB beyond the request
    for client in cluster.clients.values():
        client.release()
    assert transport.value().count(b"HTTP/1.1 404 ") == 403
