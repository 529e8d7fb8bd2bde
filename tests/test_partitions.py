"""Partitions through all three protocols, in process: credentials, isolation, anonymous access.

Four partitions behind one in-process cluster: ``default`` and ``public``
(anonymous), ``alpha`` and ``beta`` (passwords), and ``private`` (no
password, not anonymous: reachable only through a port bound to it).  The
same key is written in several partitions through Redis, memcached and HTTP,
and each protocol must see only its own partition's record.  Password hashes
use a tiny scrypt cost so the tests stay fast; the cost travels with the hash.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from kvha.master.auth import Authenticator, verify_now
from kvha.master.memcache import MemcacheFactory
from kvha.master.resp import RespFactory
from kvha.master.router import PartitionPolicy
from kvha.passwords import hash_password
from tests.inprocess import Cluster
from tests.test_http_api import Web

ALPHA_PW = "alpha-secret-1"
BETA_PW = "beta-secret-22"
CHEAP = {"n": 16, "r": 1, "p": 1}


def policies() -> list[PartitionPolicy]:
    return [
        PartitionPolicy("default"),
        PartitionPolicy("public"),
        PartitionPolicy("alpha", password_hash=hash_password(ALPHA_PW, **CHEAP)),
        PartitionPolicy("beta", password_hash=hash_password(BETA_PW, **CHEAP)),
        PartitionPolicy("private", anonymous=False),
    ]


class Line:
    """One client connection of a line protocol over a StringTransport."""

    def __init__(self, factory: Any, peer: str = "192.168.1.1") -> None:
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", peer, 40000))
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def close(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


def resp(*args: Any) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def bulk(value: Optional[bytes]) -> bytes:
    return b"$-1\r\n" if value is None else b"$%d\r\n%s\r\n" % (len(value), value)


def mc_auth(partition: str, password: str, key: bytes = b"auth") -> bytes:
    data = f"{partition} {password}".encode()
    return b"set %s 0 0 %d\r\n%s\r\n" % (key, len(data), data)


OK = b"+OK\r\n"
NOAUTH = b"-NOAUTH Authentication required.\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"


class Verifier:
    """A password check that answers only when the test says so (a slow thread pool)."""

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred, bytes, str]] = []
        self.calls = 0

    def __call__(self, password: bytes, encoded: str) -> Deferred:
        self.calls += 1
        d: Deferred = Deferred()
        self.pending.append((d, password, encoded))
        return d

    def finish(self) -> None:
        pending, self.pending = self.pending, []
        for d, password, encoded in pending:
            verify_now(password, encoded).chainDeferred(d)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(n=3, replicas=1, partitions=policies())
    yield c
    c.stop()


def redis_port(cluster: Cluster, partition: bytes = b"default", **kw: Any) -> RespFactory:
    return cluster.resp_factory(partition, **kw)


def memcached_port(cluster: Cluster, partition: bytes = b"default", **kw: Any) -> MemcacheFactory:
    return cluster.memcache_factory(partition, **kw)


def stored(cluster: Cluster, partition: bytes, key: bytes) -> list[Optional[bytes]]:
    """The value of ``(partition, key)`` on each of its copies, read straight from the nodes."""
    out = []
    for link in cluster.router.copies_of(partition, key):
        record = cluster.nodes[link.node_id].store.get(partition, key)
        out.append(None if record is None else record.value)
    return out


# Redis --------------------------------------------------------------------------------------


def test_redis_auth_chooses_the_partition_and_keys_do_not_cross(cluster: Cluster) -> None:
    """The same key in alpha, beta and default is three records; AUTH switches between them."""
    port = redis_port(cluster)
    a, b, anon = Line(port), Line(port), Line(port)
    assert a.send(resp("AUTH", "alpha", ALPHA_PW)) == OK
    assert b.send(resp("HELLO", "2", "AUTH", "beta", BETA_PW)).startswith(b"*14\r\n")
    assert a.send(resp("SET", "k", "in-alpha")) == OK
    assert b.send(resp("GET", "k")) == bulk(None)
    assert b.send(resp("SET", "k", "in-beta")) == OK
    assert anon.send(resp("SET", "k", "in-default")) == OK
    assert a.send(resp("GET", "k")) == bulk(b"in-alpha")
    assert b.send(resp("GET", "k")) == bulk(b"in-beta")
    assert anon.send(resp("GET", "k")) == bulk(b"in-default")
    assert stored(cluster, b"alpha", b"k") == [b"in-alpha", b"in-alpha"]
    assert stored(cluster, b"beta", b"k") == [b"in-beta", b"in-beta"]
    # Switching a connection to another partition switches what it sees.
    assert a.send(resp("AUTH", "beta", BETA_PW)) == OK
    assert a.send(resp("GET", "k")) == bulk(b"in-beta")


def test_redis_wrong_password_is_refused_and_changes_nothing(cluster: Cluster) -> None:
    """A wrong password, an unknown partition or a password-less private one: WRONGPASS."""
    port = redis_port(cluster)
    conn = Line(port)
    assert conn.send(resp("SET", "k", "anon")) == OK
    assert conn.send(resp("AUTH", "alpha", "not-the-password")) == WRONGPASS
    assert conn.send(resp("AUTH", "nosuch", "whatever1")) == WRONGPASS
    assert conn.send(resp("AUTH", "private", "whatever1")) == WRONGPASS
    assert conn.send(resp("HELLO", "2", "AUTH", "beta", ALPHA_PW)) == WRONGPASS
    # Still in the partition it had: Redis keeps the old login on a failed AUTH.
    assert conn.send(resp("GET", "k")) == bulk(b"anon")
    assert cluster.router.policies[b"alpha"].verified == set()


def test_redis_unauthenticated_port_answers_noauth(cluster: Cluster) -> None:
    """On a port whose partition needs a password, only AUTH, HELLO AUTH, PING and QUIT work."""
    conn = Line(redis_port(cluster, b"alpha"))
    assert conn.send(resp("GET", "k")) == NOAUTH
    assert conn.send(resp("KEYS", "*")) == NOAUTH
    assert conn.send(resp("FLUSHALL")) == NOAUTH
    assert conn.send(resp("INFO")) == NOAUTH
    assert conn.send(resp("PING")) == b"+PONG\r\n"  # load-balancer health checks
    assert conn.send(resp("HELLO", "2")).startswith(b"-NOAUTH HELLO must be called")
    # Errors Redis reports before NOAUTH keep their order.
    assert conn.send(resp("NOSUCHCOMMAND")).startswith(b"-ERR unknown command")
    assert conn.send(resp("GET")).startswith(b"-ERR wrong number of arguments")
    # AUTH <password> is for the port's own partition.
    assert conn.send(resp("AUTH", "wrong-password")) == WRONGPASS
    assert conn.send(resp("AUTH", ALPHA_PW)) == OK
    assert conn.send(resp("SET", "k", "v")) == OK
    assert stored(cluster, b"alpha", b"k") == [b"v", b"v"]


def test_redis_noauth_comes_before_loading(cluster: Cluster) -> None:
    """While the master starts, an unauthenticated connection still gets NOAUTH first (as
    Redis), PING gets LOADING, and AUTH works, so a client can log in and wait."""
    cluster.router.loading = True
    conn = Line(redis_port(cluster, b"alpha"))
    assert conn.send(resp("GET", "k")) == NOAUTH
    assert conn.send(resp("PING")).startswith(b"-LOADING ")
    assert conn.send(resp("AUTH", ALPHA_PW)) == OK
    assert conn.send(resp("GET", "k")).startswith(b"-LOADING ")
    cluster.router.loading = False
    assert conn.send(resp("GET", "k")) == bulk(None)


def test_redis_anonymous_port_keeps_the_no_password_replies(cluster: Cluster) -> None:
    """With an anonymous default partition, AUTH behaves as Redis without requirepass."""
    conn = Line(redis_port(cluster))
    assert conn.send(resp("AUTH", "secret")).startswith(b"-ERR AUTH <password> called without")
    assert conn.send(resp("AUTH", "default", "anything")) == OK
    assert conn.send(resp("AUTH", "public", "anything")) == OK


def test_redis_isolation_of_keys_scan_dbsize_flush_and_info(cluster: Cluster) -> None:
    """KEYS, SCAN, DBSIZE, INFO keyspace and FLUSHALL see only the connection's partition."""
    port = redis_port(cluster)
    a, b = Line(port), Line(port)
    a.send(resp("AUTH", "alpha", ALPHA_PW))
    b.send(resp("AUTH", "beta", BETA_PW))
    for i in range(5):
        assert a.send(resp("SET", f"a{i}", "x")) == OK
    for i in range(3):
        assert b.send(resp("SET", f"b{i}", "x")) == OK
    keys = a.send(resp("KEYS", "*"))
    assert keys.startswith(b"*5\r\n") and b"b0" not in keys
    scan = b.send(resp("SCAN", "0", "COUNT", "100"))
    assert b"b0" in scan and b"a0" not in scan
    assert a.send(resp("DBSIZE")) == b":5\r\n"
    assert b.send(resp("DBSIZE")) == b":3\r\n"
    assert b"db0:keys=3," in b.send(resp("INFO", "keyspace"))
    assert b.send(resp("FLUSHALL")) == OK
    assert b.send(resp("DBSIZE")) == b":0\r\n"
    assert a.send(resp("DBSIZE")) == b":5\r\n"


def test_redis_client_list_shows_only_the_callers_partition(cluster: Cluster) -> None:
    """CLIENT LIST does not reveal other tenants' connections."""
    port = redis_port(cluster)
    a, b, c = Line(port), Line(port), Line(port)
    a.send(resp("AUTH", "alpha", ALPHA_PW))
    b.send(resp("AUTH", "alpha", ALPHA_PW))
    c.send(resp("AUTH", "beta", BETA_PW))
    assert a.send(resp("CLIENT", "LIST")).count(b"id=") == 2
    assert c.send(resp("CLIENT", "LIST")).count(b"id=") == 1


def test_redis_pipelined_commands_wait_for_a_slow_password_check(cluster: Cluster) -> None:
    """Commands sent right after AUTH run in the partition AUTH chose, once it is checked."""
    verifier = Verifier()
    port = redis_port(cluster, authenticator=Authenticator(cluster.router, verifier))
    conn = Line(port)
    out = conn.send(resp("AUTH", "alpha", ALPHA_PW) + resp("SET", "k", "v") + resp("GET", "k"))
    assert out == b""
    assert conn.transport.producerState == "paused"
    verifier.finish()
    assert conn.take() == OK + OK + bulk(b"v")
    assert conn.transport.producerState == "producing"
    assert stored(cluster, b"alpha", b"k") == [b"v", b"v"]
    assert stored(cluster, b"default", b"k") == [None, None]


def test_a_verified_password_is_remembered_until_it_changes(cluster: Cluster) -> None:
    """The slow check runs once per password; a new hash (changed password) forgets it."""
    verifier = Verifier()
    auth = Authenticator(cluster.router, verifier)
    port = redis_port(cluster, authenticator=auth)
    first = Line(port)
    first.send(resp("AUTH", "alpha", ALPHA_PW))
    verifier.finish()
    assert first.take() == OK
    second = Line(port)
    assert second.send(resp("AUTH", "alpha", ALPHA_PW)) == OK  # no check: remembered
    assert verifier.calls == 1
    assert second.send(resp("AUTH", "alpha", "wrong-one")) == b""
    verifier.finish()
    assert second.take() == WRONGPASS
    assert verifier.calls == 2
    # The password changes: the map brings a new policy with a new hash.
    new = [p for p in policies() if p.name != "alpha"]
    new.append(PartitionPolicy("alpha", password_hash=hash_password("changed-pw", **CHEAP)))
    cluster.router.set_partitions(new)
    third = Line(port)
    third.send(resp("AUTH", "alpha", ALPHA_PW))
    verifier.finish()
    assert third.take() == WRONGPASS
    assert (auth.successes, auth.failures) == (2, 2)


# memcached ----------------------------------------------------------------------------------


def test_memcached_ascii_auth_on_a_port_that_needs_it(cluster: Cluster) -> None:
    """As memcached 1.6 with -Y: only set (credentials), version, verbosity and quit before auth."""
    conn = Line(memcached_port(cluster, b"alpha"))
    assert conn.send(b"get k\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    assert conn.send(b"flush_all\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    assert conn.send(b"stats\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    assert conn.send(b"version\r\n").startswith(b"VERSION ")
    assert conn.send(b"set auth 0 0 6\r\nnospac\r\n") == (
        b"CLIENT_ERROR bad authentication token format\r\n"
    )
    assert (
        conn.send(mc_auth("alpha", "wrong-password")) == b"CLIENT_ERROR authentication failure\r\n"
    )
    assert conn.send(mc_auth("beta", ALPHA_PW)) == b"CLIENT_ERROR authentication failure\r\n"
    assert conn.send(b"get k\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    assert conn.send(mc_auth("alpha", ALPHA_PW)) == b"STORED\r\n"
    assert conn.send(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
    assert conn.send(b"get k auth\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"  # auth stored nothing
    assert stored(cluster, b"alpha", b"k") == [b"v", b"v"]
    assert stored(cluster, b"alpha", b"auth") == [None, None]


def test_memcached_auth_works_while_the_master_starts(cluster: Cluster) -> None:
    """While the master starts, a client can still log in; version and data commands
    get SERVER_ERROR loading until it serves."""
    cluster.router.loading = True
    conn = Line(memcached_port(cluster, b"alpha"))
    assert conn.send(b"get k\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    assert conn.send(b"version\r\n").startswith(b"SERVER_ERROR loading")
    assert conn.send(mc_auth("alpha", ALPHA_PW)) == b"STORED\r\n"
    assert conn.send(b"set k 0 0 1\r\nv\r\n").startswith(b"SERVER_ERROR loading")
    assert stored(cluster, b"alpha", b"k") == [None, None]
    cluster.router.loading = False
    assert conn.send(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
    # On an anonymous port the first command goes through the login check too.
    cluster.router.loading = True
    anon = Line(memcached_port(cluster))
    assert anon.send(b"version\r\n").startswith(b"SERVER_ERROR loading")


def test_memcached_first_set_on_an_anonymous_port_may_authenticate(cluster: Cluster) -> None:
    """On the default port a first set naming a password partition logs in, storing nothing."""
    port = memcached_port(cluster)
    conn = Line(port)
    assert conn.send(mc_auth("beta", BETA_PW, key=b"k")) == b"STORED\r\n"
    assert conn.send(b"set k 0 0 2\r\nvb\r\n") == b"STORED\r\n"
    assert stored(cluster, b"beta", b"k") == [b"vb", b"vb"]
    assert stored(cluster, b"default", b"k") == [None, None]
    # A first set with other data is just a set.
    plain = Line(port)
    assert plain.send(b"set k 0 0 11\r\nhello world\r\n") == b"STORED\r\n"
    assert stored(cluster, b"default", b"k") == [b"hello world", b"hello world"]
    # Only the first command may authenticate: later such sets are plain sets.
    data = f"beta {BETA_PW}".encode()
    assert plain.send(b"set k2 0 0 %d\r\n%s\r\n" % (len(data), data)) == b"STORED\r\n"
    assert stored(cluster, b"default", b"k2") == [data, data]


def test_memcached_failed_auth_on_an_anonymous_port_leaves_it_unauthenticated(
    cluster: Cluster,
) -> None:
    """A client whose login failed is not left writing into the anonymous partition."""
    conn = Line(memcached_port(cluster))
    assert (
        conn.send(mc_auth("alpha", "wrong-password")) == b"CLIENT_ERROR authentication failure\r\n"
    )
    assert conn.send(b"set k 0 0 1\r\nv\r\n") == b"CLIENT_ERROR bad authentication token format\r\n"
    assert conn.send(b"get k\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    assert stored(cluster, b"default", b"k") == [None, None]
    assert conn.send(mc_auth("alpha", ALPHA_PW)) == b"STORED\r\n"


def test_memcached_same_key_two_partitions_flush_and_stats(cluster: Cluster) -> None:
    """Two logins see their own value of one key; flush_all and stats cover only their own."""
    port = memcached_port(cluster, b"alpha")
    a, b = Line(port), Line(port)
    a.send(mc_auth("alpha", ALPHA_PW))
    b.send(mc_auth("beta", BETA_PW))
    assert a.send(b"set k 0 0 1\r\na\r\nset only-a 0 0 1\r\nx\r\n") == b"STORED\r\nSTORED\r\n"
    assert b.send(b"set k 0 0 1\r\nb\r\n") == b"STORED\r\n"
    assert a.send(b"get k\r\n") == b"VALUE k 0 1\r\na\r\nEND\r\n"
    assert b.send(b"get k only-a\r\n") == b"VALUE k 0 1\r\nb\r\nEND\r\n"
    stats_a = dict(
        line.split(" ", 2)[1:] for line in a.send(b"stats\r\n").decode().split("\r\n")[:-2]
    )
    stats_b = dict(
        line.split(" ", 2)[1:] for line in b.send(b"stats\r\n").decode().split("\r\n")[:-2]
    )
    assert (stats_a["curr_items"], stats_b["curr_items"]) == ("2", "1")
    assert (stats_a["cmd_set"], stats_b["cmd_set"]) == ("2", "1")
    assert (stats_a["get_hits"], stats_b["get_hits"]) == ("1", "1")
    assert b.send(b"flush_all\r\n") == b"OK\r\n"
    assert b.send(b"get k\r\n") == b"END\r\n"
    assert a.send(b"get k\r\n") == b"VALUE k 0 1\r\na\r\nEND\r\n"
    assert b"STAT partition alpha\r\n" in a.send(b"stats settings\r\n")


def test_memcached_login_waits_for_a_slow_password_check(cluster: Cluster) -> None:
    """Commands after the credentials set run in the new partition, after the check."""
    verifier = Verifier()
    conn = Line(
        memcached_port(cluster, b"alpha", authenticator=Authenticator(cluster.router, verifier))
    )
    assert conn.send(mc_auth("alpha", ALPHA_PW) + b"set k 0 0 1\r\nv\r\nget k\r\n") == b""
    assert conn.transport.producerState == "paused"
    verifier.finish()
    assert conn.take() == b"STORED\r\nSTORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
    assert conn.transport.producerState == "producing"


# Bound ports --------------------------------------------------------------------------------


def test_bound_ports_serve_one_partition_without_credentials(cluster: Cluster) -> None:
    """A port bound to a partition needs no login, cannot leave it, and takes sets literally."""
    mc = Line(memcached_port(cluster, b"private", bound=True))
    data = f"alpha {ALPHA_PW}".encode()
    assert mc.send(b"set k 0 0 %d\r\n%s\r\n" % (len(data), data)) == b"STORED\r\n"
    assert stored(cluster, b"private", b"k") == [data, data]
    rd = Line(redis_port(cluster, b"private", bound=True))
    assert rd.send(resp("GET", "k")) == bulk(data)
    assert rd.send(resp("AUTH", "alpha", ALPHA_PW)) == WRONGPASS
    assert rd.send(resp("GET", "k")) == bulk(data)
    # The same partition is closed to every unbound port.
    assert Line(redis_port(cluster)).send(resp("AUTH", "private", "x" * 8)) == WRONGPASS


# HTTP ---------------------------------------------------------------------------------------


def test_http_bearer_tokens_per_partition(cluster: Cluster) -> None:
    """No token: 401; a wrong one: 403; the partition's password: in, and only that partition."""
    web = Web(cluster)
    alpha = {"Authorization": f"Bearer {ALPHA_PW}"}
    beta = {"Authorization": f"Bearer {BETA_PW}"}
    none = web.request("GET", "/v1/p/alpha/k/k")
    assert none.status == 401 and none.error()["status"] == "unauthorized"
    assert none.headers["WWW-Authenticate"] == 'Bearer realm="kvha"'
    assert web.request("GET", "/v1/p/alpha/k/k", headers=beta).status == 403
    assert (
        web.request("GET", "/v1/p/alpha/k/k", headers={"Authorization": "Basic eDp5"}).status == 401
    )
    assert web.request("PUT", "/v1/p/alpha/k/k", b"va", headers=alpha).status == 200
    assert web.request("PUT", "/v1/p/beta/k/k", b"vb", headers=beta).status == 200
    assert web.request("PUT", "/v1/p/default/k/k", b"vd").status == 200
    assert web.request("GET", "/v1/p/alpha/k/k", headers=alpha).json()["value"] == "va"
    assert web.request("GET", "/v1/p/beta/k/k", headers=beta).json()["value"] == "vb"
    assert web.request("GET", "/v1/p/default/k/k").json()["value"] == "vd"
    assert web.request("PUT", "/v1/p/beta/k/k", b"x", headers=alpha).status == 403
    assert web.request("DELETE", "/v1/p/beta/k/k", headers=alpha).status == 403
    assert web.request("POST", "/v1/p/alpha/mget", {"keys": ["k"]}).status == 401
    listing = web.request("GET", "/v1/p/beta/k", headers=beta).json()
    assert listing["keys"] == ["k"]
    assert web.request("GET", "/v1/p/beta/k", headers=alpha).status == 403
    assert web.request("GET", "/v1/p/private/k/k").status == 401
    assert web.request("GET", "/v1/p/public/k/k").status == 404  # anonymous: no such key
    assert stored(cluster, b"beta", b"k") == [b"vb", b"vb"]


def test_http_waits_for_a_slow_token_check(cluster: Cluster) -> None:
    """A request whose token is being checked is answered once the check is done."""
    verifier = Verifier()
    web = Web(cluster, authenticator=Authenticator(cluster.router, verifier))
    reply = web.start("PUT", "/v1/p/alpha/k/k", b"v", {"Authorization": f"Bearer {ALPHA_PW}"})
    assert verifier.pending
    verifier.finish()
    assert reply().status == 200
    again = web.request("GET", "/v1/p/alpha/k/k", headers={"Authorization": f"Bearer {ALPHA_PW}"})
    assert again.status == 200 and verifier.calls == 1


def test_one_key_three_protocols_three_partitions(cluster: Cluster) -> None:
    """A value written in alpha through Redis is seen in alpha through memcached and HTTP only."""
    rd = Line(redis_port(cluster))
    assert rd.send(resp("AUTH", "alpha", ALPHA_PW)) == OK
    assert rd.send(resp("SET", "shared", "from-redis")) == OK
    mc = Line(memcached_port(cluster, b"beta"))
    assert mc.send(mc_auth("beta", BETA_PW)) == b"STORED\r\n"
    assert mc.send(b"get shared\r\n") == b"END\r\n"
    mc_alpha = Line(memcached_port(cluster, b"beta"))
    mc_alpha.send(mc_auth("alpha", ALPHA_PW))
    assert mc_alpha.send(b"get shared\r\n") == b"VALUE shared 0 10\r\nfrom-redis\r\nEND\r\n"
    web = Web(cluster)
    assert (
        web.request(
            "GET", "/v1/p/beta/k/shared", headers={"Authorization": f"Bearer {BETA_PW}"}
        ).status
        == 404
    )
    assert web.request("GET", "/v1/p/default/k/shared").status == 404
    got = web.request(
        "GET", "/v1/p/alpha/k/shared", headers={"Authorization": f"Bearer {ALPHA_PW}"}
    )
    assert got.json()["value"] == "from-redis"


# Failed logins ------------------------------------------------------------------------------

LIMITED = b"too many failed authentication attempts from this address for this partition"


def test_redis_logins_are_refused_after_ten_failures_per_address_and_partition(
    cluster: Cluster,
) -> None:
    """Ten wrong passwords for alpha from one address: its next alpha logins are refused
    unchecked, the right password too, for the rest of the minute; other partitions and
    other addresses are not affected; a success clears the count."""
    port = redis_port(cluster)
    conn = Line(port)
    for _ in range(10):
        assert conn.send(resp("AUTH", "alpha", "wrong-password")) == WRONGPASS
    refused = conn.send(resp("AUTH", "alpha", ALPHA_PW))
    assert refused.startswith(b"-ERR " + LIMITED) and b"try again in 60 s" in refused
    assert conn.send(resp("SET", "k", "v")) == OK  # still in its old (default) partition
    assert stored(cluster, b"default", b"k") == [b"v", b"v"]
    assert Line(port).send(resp("AUTH", "alpha", ALPHA_PW)).startswith(b"-ERR " + LIMITED)
    assert conn.send(resp("AUTH", "beta", BETA_PW)) == OK  # another partition
    assert Line(port, peer="10.0.0.7").send(resp("AUTH", "alpha", ALPHA_PW)) == OK
    cluster.clock.advance(30)
    assert b"try again in 30 s" in Line(port).send(resp("AUTH", "alpha", ALPHA_PW))
    cluster.clock.advance(30)
    assert Line(port).send(resp("AUTH", "alpha", ALPHA_PW)) == OK  # the window has passed
    # A success does not clear the count (behind a shared address it would clear a
    # guesser's): failures expire with the window only.
    for _ in range(5):
        assert conn.send(resp("AUTH", "alpha", "wrong-password")) == WRONGPASS
    assert conn.send(resp("AUTH", "alpha", ALPHA_PW)) == OK
    for _ in range(5):
        assert conn.send(resp("AUTH", "alpha", "wrong-password")) == WRONGPASS
    assert conn.send(resp("AUTH", "alpha", ALPHA_PW)).startswith(b"-ERR " + LIMITED)


def test_guesses_sent_at_once_get_no_more_checks_than_the_limit(cluster: Cluster) -> None:
    """Checks still running count: 30 AUTHs on 30 connections at once, 10 checked."""
    verifier = Verifier()
    port = redis_port(cluster, authenticator=Authenticator(cluster.router, verifier))
    conns = [Line(port) for _ in range(30)]
    answers = [c.send(resp("AUTH", "alpha", f"guess-{i}")) for i, c in enumerate(conns)]
    assert verifier.calls == 10
    assert sum(a.startswith(b"-ERR " + LIMITED) for a in answers) == 20
    verifier.finish()
    assert [c.take() for c in conns[:10]] == [WRONGPASS] * 10
    assert Line(port).send(resp("AUTH", "alpha", ALPHA_PW)).startswith(b"-ERR " + LIMITED)


def test_made_up_partition_names_count_as_one_and_cannot_flush_the_table(
    cluster: Cluster,
) -> None:
    auth = Authenticator(cluster.router)
    port = redis_port(cluster, authenticator=auth)
    conn = Line(port)
    for _ in range(10):
        assert conn.send(resp("AUTH", "alpha", "wrong-password")) == WRONGPASS
    for i in range(12_000):
        conn.send(resp("AUTH", f"no-such-{i}", "x"))
    assert len(auth._failed) == 2  # (address, alpha) and (address, any unknown name)
    assert conn.send(resp("AUTH", "alpha", ALPHA_PW)).startswith(b"-ERR " + LIMITED)
    assert conn.send(resp("AUTH", "beta", BETA_PW)) == OK


def test_a_refused_login_costs_no_password_check(cluster: Cluster) -> None:
    verifier = Verifier()
    port = redis_port(cluster, authenticator=Authenticator(cluster.router, verifier))
    conn = Line(port)
    out = b""
    for _ in range(10):
        out += conn.send(resp("AUTH", "alpha", "wrong-password"))
        verifier.finish()
    assert verifier.calls == 10
    assert out + conn.take() == WRONGPASS * 10
    assert conn.send(resp("AUTH", "alpha", "another-guess")).startswith(b"-ERR " + LIMITED)
    assert verifier.calls == 10


def test_memcached_logins_are_refused_after_ten_failures(cluster: Cluster) -> None:
    auth = Authenticator(cluster.router)  # one master: its ports share the counts
    conn = Line(memcached_port(cluster, b"alpha", authenticator=auth))
    failure = b"CLIENT_ERROR authentication failure\r\n"
    for _ in range(10):
        assert conn.send(mc_auth("alpha", "wrong-password")) == failure
    assert conn.send(mc_auth("alpha", ALPHA_PW)).startswith(b"CLIENT_ERROR " + LIMITED)
    # The data block was read: the next command is parsed as a command.
    assert conn.send(b"get k\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    other = Line(memcached_port(cluster, b"alpha", authenticator=auth), peer="10.0.0.7")
    assert other.send(mc_auth("alpha", ALPHA_PW)) == b"STORED\r\n"
    # On an anonymous port, a refused first-command login leaves the connection
    # unauthenticated, never in the anonymous partition (as a failed one does).
    anon = Line(memcached_port(cluster, authenticator=auth))
    assert anon.send(mc_auth("alpha", ALPHA_PW)).startswith(b"CLIENT_ERROR " + LIMITED)
    assert anon.send(b"set k 0 0 1\r\nv\r\n") != b"STORED\r\n"
    assert anon.send(b"get k\r\n") == b"CLIENT_ERROR unauthenticated\r\n"
    assert stored(cluster, b"default", b"k") == [None, None]


def test_http_tokens_are_refused_after_ten_failures(cluster: Cluster) -> None:
    web = Web(cluster)
    wrong = {"Authorization": "Bearer wrong-password"}
    right = {"Authorization": f"Bearer {ALPHA_PW}"}
    for _ in range(10):
        assert web.request("GET", "/v1/p/alpha/k/k", headers=wrong).status == 403
    reply = web.request("GET", "/v1/p/alpha/k/k", headers=right)
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "60"
    assert LIMITED.decode() in reply.json()["error"]["message"]
    cluster.clock.advance(60)
    assert web.request("GET", "/v1/p/alpha/k/k", headers=right).status == 404  # in: no key


def test_auth_failures_0_turns_the_limit_off(cluster: Cluster) -> None:
    auth = Authenticator(cluster.router, max_failures=0)
    conn = Line(redis_port(cluster, authenticator=auth))
    for _ in range(30):
        assert conn.send(resp("AUTH", "alpha", "wrong-password")) == WRONGPASS
    assert conn.send(resp("AUTH", "alpha", ALPHA_PW)) == OK
