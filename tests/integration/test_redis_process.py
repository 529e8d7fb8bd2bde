"""A real master (three data nodes, one replica each) driven by real Redis clients.

redis-py, redis-cli, redis-benchmark and txredisapi talk to the master's
Redis port exactly as they would to redis-server 7; the expected results are
those of the Redis command documentation (and, for redis-cli's output, what
redis-cli prints against redis-server 7.0).  One cluster serves the whole
module; every test starts from FLUSHALL.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import redis
import txredisapi
from pymemcache.client.base import Client as MemcacheClient

from kvha.procs import NodeProcess, free_port
from tests.conftest import NodeFactory, memcache_stats

pytestmark = pytest.mark.process

#: Every client socket operation gives up after this long, so no test can hang on one.
CLIENT_TIMEOUT = 5.0
#: redis-cli and redis-benchmark runs are killed after this long.
TOOL_TIMEOUT = 60.0
BENCH_TIMEOUT = 240.0


class RedisCluster:
    """The running master and its ports."""

    def __init__(self, master: NodeProcess, redis_port: int) -> None:
        self.master = master
        self.memcache_port = master.port
        self.port = redis_port

    def client(self, **kwargs: Any) -> redis.Redis:
        # redis-py 8 opens with HELLO 3 unless told otherwise; both protocols are tested.
        kwargs.setdefault("socket_timeout", CLIENT_TIMEOUT)
        kwargs.setdefault("socket_connect_timeout", CLIENT_TIMEOUT)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    factory = NodeFactory(str(tmp_path_factory.mktemp("redis-cluster")))
    try:
        port = free_port()
        master, _ = factory.cluster(
            n_data=3, replicas=1, redis={"listen": f"tcp:{port}:interface=127.0.0.1"}
        )
        yield RedisCluster(master, port)
        assert "Traceback" not in master.log()
    finally:
        factory.cleanup()


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def r(cluster: RedisCluster, request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """redis-py speaking RESP2, and RESP3 (its default, used unchanged)."""
    kwargs = {"protocol": 2} if request.param == 2 else {}
    client = cluster.client(decode_responses=True, **kwargs)
    client.flushall()
    yield client
    client.close()


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI but is not installed")
        pytest.skip(f"{name} not installed (apt-get install redis-tools)")
    return path


# redis-py ---------------------------------------------------------------------------------------


def test_redis_py_connection_commands(r: redis.Redis) -> None:
    """PING, ECHO, SELECT, AUTH, HELLO, CLIENT, COMMAND, INFO, DBSIZE answer as redis-py expects."""
    assert r.ping() is True
    assert r.echo("Hello World!") == "Hello World!"
    assert r.execute_command("SELECT", 0) is True
    with pytest.raises(redis.ResponseError, match="^DB index is out of range$"):
        r.execute_command("SELECT", 1)
    with pytest.raises(redis.RedisError, match="without any password configured"):
        r.execute_command("AUTH", "secret")
    assert r.execute_command("AUTH", "default", "anything") is True
    hello = r.execute_command("HELLO", 2)
    assert dict(zip(hello[::2], hello[1::2]))["proto"] == 2
    with pytest.raises(redis.ResponseError, match="unsupported protocol version"):
        r.execute_command("HELLO", 4)
    if r.connection_pool.connection_kwargs.get("protocol") != 2:
        # Back to RESP3, which this client expects (a RESP2 client could not read it).
        assert r.execute_command("HELLO", 3)["proto"] == 3
    assert r.client_setname("worker-1") is True
    assert r.client_getname() == "worker-1"
    client_id = r.client_id()
    assert isinstance(client_id, int) and client_id > 0
    info = r.client_info()
    assert info["id"] == client_id and info["name"] == "worker-1" and info["db"] == 0
    assert r.command_count() > 40
    assert r.set("a", "1") is True
    server = r.info("server")
    assert server["redis_version"] == "7.0.0" and server["redis_mode"] == "standalone"
    assert r.info("keyspace") == {"db0": {"keys": 1, "expires": 0, "avg_ttl": 0}}
    assert r.info()["connected_clients"] >= 1
    assert r.dbsize() == 1
    assert r.flushdb() is True
    assert r.dbsize() == 0
    assert r.set("b", "2") is True
    assert r.flushall() is True
    assert r.get("b") is None


def test_redis_py_set_and_get_options(r: redis.Redis) -> None:
    """SET with EX PX EXAT PXAT NX XX KEEPTTL GET, and invalid combinations, through redis-py."""
    assert r.get("nonexisting") is None
    assert r.set("mykey", "Hello") is True
    assert r.get("mykey") == "Hello"
    assert r.set("anotherkey", "will expire in a minute", ex=60) is True
    assert r.ttl("anotherkey") in (59, 60)
    assert r.set("px", "v", px=5000) is True
    assert 4000 < r.pttl("px") <= 5000
    now = int(time.time())
    assert r.set("exat", "v", exat=now + 100) is True
    assert 98 <= r.ttl("exat") <= 100
    assert r.set("pxat", "v", pxat=(now + 100) * 1000) is True
    assert 98 <= r.ttl("pxat") <= 100
    assert r.set("mykey", "World", nx=True) is None
    assert r.set("mykey", "World", xx=True) is True
    assert r.set("nokey", "v", xx=True) is None
    assert r.set("anotherkey", "kept", keepttl=True) is True
    assert r.ttl("anotherkey") in (59, 60)
    assert r.set("mykey", "Again", get=True) == "World"
    assert r.set("fresh", "v", get=True) is None
    assert r.set("mykey", "Nope", nx=True, get=True) == "Again"
    assert r.get("mykey") == "Again"
    with pytest.raises(redis.ResponseError, match="^syntax error$"):
        r.execute_command("SET", "k", "v", "NX", "XX")
    with pytest.raises(redis.ResponseError, match="^syntax error$"):
        r.execute_command("SET", "k", "v", "EX", "10", "PX", "100")
    with pytest.raises(redis.ResponseError, match="^syntax error$"):
        r.execute_command("SET", "k", "v", "KEEPTTL", "EX", "10")
    with pytest.raises(redis.ResponseError, match="^invalid expire time in 'set' command$"):
        r.set("k", "v", ex=0)
    with pytest.raises(redis.ResponseError, match="^invalid expire time in 'set' command$"):
        r.set("k", "v", px=-1)
    assert r.get("k") is None


def test_redis_py_string_commands(r: redis.Redis) -> None:
    """SETNX SETEX PSETEX GETSET GETDEL GETEX MGET MSET MSETNX give the documented results."""
    assert r.setnx("mykey", "Hello") is True
    assert r.setnx("mykey", "World") is False
    assert r.get("mykey") == "Hello"
    assert r.execute_command("SETEX", "ex", 10, "Hello") is True  # r.setex is deprecated
    assert r.ttl("ex") in (9, 10)
    assert r.psetex("pex", 1000, "Hello") is True
    assert 0 < r.pttl("pex") <= 1000
    assert r.incr("mycounter") == 1
    assert r.getset("mycounter", "0") == "1"
    assert r.get("mycounter") == "0"
    assert r.getdel("mykey") == "Hello"
    assert r.get("mykey") is None
    assert r.getdel("mykey") is None
    assert r.set("g", "Hello") is True
    assert r.getex("g") == "Hello"
    assert r.ttl("g") == -1
    assert r.getex("g", ex=60) == "Hello"
    assert r.ttl("g") in (59, 60)
    assert r.getex("g", px=30_000) == "Hello"
    assert 29 <= r.ttl("g") <= 30
    assert r.getex("g", exat=int(time.time()) + 100) == "Hello"
    assert 98 <= r.ttl("g") <= 100
    assert r.getex("g", pxat=int(time.time() * 1000) + 50_000) == "Hello"
    assert 48 <= r.ttl("g") <= 50
    assert r.getex("g", persist=True) == "Hello"
    assert r.ttl("g") == -1
    assert r.getex("nokey", ex=10) is None
    assert r.mset({"key1": "Hello", "key2": "World"}) is True
    assert r.mget("key1", "key2", "nonexisting") == ["Hello", "World", None]
    assert r.msetnx({"m1": "Hello", "m2": "there"}) is True
    assert r.msetnx({"m2": "new", "m3": "world"}) is False
    assert r.mget("m1", "m2", "m3") == ["Hello", "there", None]


def test_redis_py_key_commands(r: redis.Redis) -> None:
    """DEL UNLINK EXISTS TYPE EXPIRE PEXPIRE EXPIREAT PEXPIREAT TTL PTTL PERSIST as documented."""
    r.set("key1", "Hello")
    r.set("key2", "World")
    assert r.delete("key1", "key2", "key3") == 2
    r.mset({"a": "1", "b": "2"})
    assert r.unlink("a", "b", "c") == 2
    r.set("key1", "Hello")
    assert r.exists("key1") == 1
    assert r.exists("nosuchkey") == 0
    r.set("key2", "World")
    assert r.exists("key1", "key2", "nosuchkey") == 2
    assert r.exists("key1", "key1") == 2
    assert r.type("key1") == "string"
    assert r.type("nosuchkey") == "none"
    # The EXPIRE documentation's example.
    r.set("mykey", "Hello")
    assert r.expire("mykey", 10) is True
    assert r.ttl("mykey") in (9, 10)
    r.set("mykey", "Hello World")
    assert r.ttl("mykey") == -1
    assert r.expire("mykey", 10, xx=True) is False
    assert r.ttl("mykey") == -1
    assert r.expire("mykey", 10, nx=True) is True
    assert r.ttl("mykey") in (9, 10)
    assert r.expire("mykey", 5, gt=True) is False
    assert r.expire("mykey", 100, gt=True) is True
    assert r.expire("mykey", 200, lt=True) is False
    assert r.expire("mykey", 50, lt=True) is True
    assert r.ttl("mykey") in (49, 50)
    with pytest.raises(redis.ResponseError, match="GT and LT options at the same time"):
        r.expire("mykey", 10, gt=True, lt=True)
    assert r.expire("nokey", 10) is False
    r.set("p", "Hello")
    assert r.pexpire("p", 1500) is True
    assert r.ttl("p") in (1, 2)
    assert 1000 < r.pttl("p") <= 1500
    assert r.persist("p") is True
    assert r.ttl("p") == -1
    assert r.persist("p") is False
    assert r.expireat("p", 1293840000) is True  # the documentation's date, in the past
    assert r.exists("p") == 0
    r.set("p", "Hello")
    assert r.expireat("p", int(time.time()) + 100) is True
    assert 98 <= r.ttl("p") <= 100
    assert r.pexpireat("p", 1555555555005) is True
    assert r.ttl("p") == -2
    assert r.pttl("p") == -2
    r.set("gone", "v")
    assert r.expire("gone", 0) is True
    assert r.exists("gone") == 0


def test_redis_py_counters(r: redis.Redis) -> None:
    """INCR DECR INCRBY DECRBY INCRBYFLOAT, their overflow and non-number errors."""
    r.set("mykey", "10")
    assert r.incr("mykey") == 11
    assert r.decr("mykey") == 10
    assert r.incrby("mykey", 5) == 15
    assert r.decrby("mykey", 3) == 12
    r.set("mykey", "234293482390480948029348230948")
    with pytest.raises(redis.ResponseError, match="^value is not an integer or out of range$"):
        r.decr("mykey")
    r.set("big", str(2**63 - 1))
    with pytest.raises(redis.ResponseError, match="^increment or decrement would overflow$"):
        r.incr("big")
    r.set("f", "10.50")
    assert r.incrbyfloat("f", 0.1) == 10.6
    assert r.get("f") == "10.6"
    assert r.incrbyfloat("f", -5) == 5.6
    r.set("f", "5.0e3")
    assert r.incrbyfloat("f", 2.0e2) == 5200
    assert r.get("f") == "5200"
    r.set("s", "abc")
    with pytest.raises(redis.ResponseError, match="^value is not a valid float$"):
        r.incrbyfloat("s", 1)


def test_redis_py_ranges_keys_and_scan(r: redis.Redis) -> None:
    """APPEND STRLEN GETRANGE SETRANGE KEYS and SCAN give the documented results."""
    assert r.exists("mykey") == 0
    assert r.append("mykey", "Hello") == 5
    assert r.append("mykey", " World") == 11
    assert r.get("mykey") == "Hello World"
    assert r.strlen("mykey") == 11
    assert r.strlen("nonexisting") == 0
    r.set("s", "This is a string")
    assert r.getrange("s", 0, 3) == "This"
    assert r.getrange("s", -3, -1) == "ing"
    assert r.getrange("s", 0, -1) == "This is a string"
    assert r.getrange("s", 10, 100) == "string"
    assert r.setrange("mykey", 6, "Redis") == 11
    assert r.get("mykey") == "Hello Redis"
    assert r.setrange("key2", 6, "Redis") == 11
    assert r.get("key2") == "\x00\x00\x00\x00\x00\x00Redis"
    r.flushall()
    r.mset({"firstname": "Jack", "lastname": "Stuntman", "age": "35"})
    assert sorted(r.keys("*name*")) == ["firstname", "lastname"]
    assert r.keys("a??") == ["age"]
    assert sorted(r.keys("*")) == ["age", "firstname", "lastname"]
    r.flushall()
    r.mset({k: "1" for k in ["hello", "hallo", "hxllo", "hllo", "heeeello", "hbllo"]})
    assert sorted(r.keys("h?llo")) == ["hallo", "hbllo", "hello", "hxllo"]
    assert sorted(r.keys("h*llo")) == ["hallo", "hbllo", "heeeello", "hello", "hllo", "hxllo"]
    assert sorted(r.keys("h[ae]llo")) == ["hallo", "hello"]
    assert sorted(r.keys("h[^e]llo")) == ["hallo", "hbllo", "hxllo"]
    assert sorted(r.keys("h[a-b]llo")) == ["hallo", "hbllo"]
    r.flushall()
    r.mset({f"key:{i}": "v" for i in range(500)})
    seen = []
    cursor = 0
    while True:
        cursor, keys = r.scan(cursor, count=20)
        seen += keys
        r.set(f"added:{len(seen)}", "v")  # keys added during the scan
        if cursor == 0:
            break
    assert len(seen) == len(set(seen))
    assert {f"key:{i}" for i in range(500)} <= set(seen)
    assert sorted(r.scan_iter(match="key:1??", count=50)) == sorted(
        f"key:{i}" for i in range(100, 200)
    )
    with pytest.raises(redis.ResponseError, match="^invalid cursor$"):
        r.execute_command("SCAN", "x")


def test_redis_py_errors_pipelines_and_binary_values(cluster: RedisCluster) -> None:
    """Errors keep the connection; a pipeline answers in order; binary values round-trip."""
    r = cluster.client()
    try:
        r.flushall()
        with pytest.raises(
            redis.ResponseError, match="^wrong number of arguments for 'get' command$"
        ):
            r.execute_command("GET")
        with pytest.raises(redis.ResponseError) as e:
            r.execute_command("FOO", "a", "b")
        assert str(e.value) == "unknown command 'FOO', with args beginning with: 'a' 'b' "
        assert r.ping() is True
        pipe = r.pipeline(transaction=False)
        for i in range(200):
            pipe.set(f"p{i}", i)
            pipe.incr(f"p{i}")
            pipe.get(f"p{i}")
        results = pipe.execute()
        assert results == [x for i in range(200) for x in (True, i + 1, str(i + 1).encode())]
        value = bytes(range(256)) * 100
        assert r.set(b"bin\r\n\x00", value) is True
        assert r.get(b"bin\r\n\x00") == value
        assert r.mget([b"bin\r\n\x00", b"p0"]) == [value, b"1"]
    finally:
        r.close()


# redis-cli ---------------------------------------------------------------------------------------


def redis_cli(cluster: RedisCluster, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [tool("redis-cli"), "-p", str(cluster.port), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_redis_cli_commands(cluster: RedisCluster) -> None:
    """redis-cli one-shot commands print what they print against redis-server 7."""
    assert redis_cli(cluster, "flushall") == "OK\n"
    assert redis_cli(cluster, "set", "a", "1") == "OK\n"
    assert redis_cli(cluster, "get", "a") == "1\n"
    assert redis_cli(cluster, "get", "missing") == "\n"
    assert redis_cli(cluster, "incr", "a") == "2\n"
    assert redis_cli(cluster, "mget", "a", "missing") == "2\n\n"
    assert redis_cli(cluster, "set", "b", "hello world") == "OK\n"
    assert redis_cli(cluster, "get", "b") == "hello world\n"
    assert redis_cli(cluster, "ttl", "a") == "-1\n"
    assert redis_cli(cluster, "set", "c", "v", "ex", "100", "nx", "get") == "\n"
    assert redis_cli(cluster, "incrbyfloat", "f", "1.5") == "1.5\n"
    assert sorted(redis_cli(cluster, "keys", "*").split()) == ["a", "b", "c", "f"]
    assert redis_cli(cluster, "exists", "a", "b", "c", "zz") == "3\n"
    assert redis_cli(cluster, "type", "a") == "string\n"
    assert redis_cli(cluster, "foo", "x") == (
        "ERR unknown command 'foo', with args beginning with: 'x' \n\n"
    )
    assert redis_cli(cluster, "set", "a", "1", "ex", "0") == (
        "ERR invalid expire time in 'set' command\n\n"
    )
    assert redis_cli(cluster, "ping") == "PONG\n"


COMMAND_FILE = """\
SET greeting "hello world"
GET greeting
INCR counter
INCRBY counter 10
APPEND greeting !
GET greeting
MSET k1 v1 k2 v2
MGET k1 k2 k3
DEL k1 k2 k3
EXISTS k1
SETRANGE greeting 0 J
GETRANGE greeting 0 4
EXPIRE counter 100
TTL counter
PERSIST counter
TTL counter
GET nokey
BADCMD x
PING
ECHO "a b"
DBSIZE
"""

# What redis-cli 7.0 prints for COMMAND_FILE against redis-server 7.0, line by line.
COMMAND_FILE_OUTPUT = [
    "OK",
    "hello world",
    "1",
    "11",
    "12",
    "hello world!",
    "OK",
    "v1",
    "v2",
    "",
    "2",
    "0",
    "12",
    "Jello",
    "1",
    "100",
    "1",
    "-1",
    "",
    "ERR unknown command 'BADCMD', with args beginning with: 'x' ",
    "",
    "PONG",
    "a b",
    "2",
]


def test_redis_cli_reads_a_command_file(cluster: RedisCluster) -> None:
    """``redis-cli < file`` runs every line and prints what it prints against redis-server 7."""
    redis_cli(cluster, "flushall")
    assert redis_cli(cluster, stdin=COMMAND_FILE).split("\n") == [*COMMAND_FILE_OUTPUT, ""]


# redis-benchmark ---------------------------------------------------------------------------------


def redis_flushall(cluster: RedisCluster) -> None:
    r = cluster.client()
    try:
        r.flushall()
    finally:
        r.close()


@pytest.mark.parametrize("pipeline", [1, 16])
def test_redis_benchmark_runs_without_errors(cluster: RedisCluster, pipeline: int) -> None:
    """redis-benchmark SET GET INCR MSET (50 clients, pipelined or not) finishes with no error."""
    redis_flushall(cluster)
    result = subprocess.run(
        [
            tool("redis-benchmark"),
            "-p",
            str(cluster.port),
            "-t",
            "set,get,incr,mset",
            "-n",
            "20000",
            "-c",
            "50",
            "-q",
            "-P",
            str(pipeline),
        ],
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ERR" not in output, output
    lines = re.split(r"[\r\n]+", output)
    for test in ["SET", "GET", "INCR", "MSET (10 keys)"]:
        done = [
            line
            for line in lines
            if re.match(rf"^\s*{re.escape(test)}: [\d.]+ requests per second", line)
        ]
        assert len(done) == 1, (test, output[-2000:])
    r = cluster.client()
    try:
        # INCR ran 20000 times on one key (redis-benchmark's key:__rand_int__ without -r).
        assert r.get("counter:__rand_int__") == b"20000"
    finally:
        r.close()
    assert "Traceback" not in cluster.master.log()


# txredisapi ---------------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_txredisapi(cluster: RedisCluster):  # type: ignore[no-untyped-def]
    """txredisapi, a Twisted client, can set, get, incr, delete and mget."""
    conn = yield txredisapi.Connection(
        "127.0.0.1",
        cluster.port,
        reconnect=False,
        connectTimeout=CLIENT_TIMEOUT,
        replyTimeout=CLIENT_TIMEOUT,
        convertNumbers=False,
    )
    try:
        assert (yield conn.flushdb()) == "OK"
        assert (yield conn.set("a", "1")) == "OK"
        assert (yield conn.get("a")) == "1"
        assert (yield conn.incr("a")) == 2
        assert (yield conn.incr("n")) == 1
        assert (yield conn.set("b", "x", expire=10)) == "OK"
        assert (yield conn.ttl("b")) in (9, 10)
        assert (yield conn.mget(["a", "b", "missing"])) == ["2", "x", None]
        assert (yield conn.delete("a")) == 1
        assert (yield conn.delete("a")) == 0
        assert (yield conn.get("a")) is None
        try:
            yield conn.execute_command("FOO", "a")
        except txredisapi.ResponseError as e:
            assert str(e) == "ERR unknown command 'FOO', with args beginning with: 'a' "
        else:
            pytest.fail("an unknown command did not fail")
        assert (yield conn.ping()) == "PONG"
    finally:
        yield conn.disconnect()


# One value, two protocols ------------------------------------------------------------------------


def test_memcached_and_redis_share_values(cluster: RedisCluster) -> None:
    """A value set over memcached reads back over Redis, and one set over Redis over memcached."""
    r = cluster.client()
    mc = MemcacheClient(
        ("127.0.0.1", cluster.memcache_port),
        default_noreply=False,
        connect_timeout=CLIENT_TIMEOUT,
        timeout=CLIENT_TIMEOUT,
    )
    try:
        r.flushall()
        assert mc.set("from-mc", b"hello from memcached") is True
        assert r.get("from-mc") == b"hello from memcached"
        assert r.strlen("from-mc") == 20
        assert r.set("from-redis", b"hello from redis") is True
        assert mc.raw_command(b"get from-redis", b"END\r\n") == (
            b"VALUE from-redis 0 16\r\nhello from redis\r\n"
        )
        assert mc.get("from-redis") == b"hello from redis"
        assert r.incr("n") == 1
        assert mc.incr("n", 5) == 6
        assert r.get("n") == b"6"
        assert r.append("from-mc", b"!") == 21
        assert mc.get("from-mc") == b"hello from memcached!"
        assert mc.delete("from-redis") is True
        assert r.exists("from-redis") == 0
    finally:
        mc.close()
        r.close()


def test_mset_of_60_mb_through_real_data_nodes(cluster: RedisCluster) -> None:
    """One MSET larger than a data node's frame limit (32 MiB) in total is stored whole.

    The master cuts each node's share into requests that any node's frame
    limit allows; one request of it all would make the node close the
    connection.
    """
    r = cluster.client(socket_timeout=60)
    try:
        values = {f"big-{i}".encode(): bytes([i]) * 1_000_000 for i in range(60)}
        assert r.mset(values) is True
        got = r.mget(list(values))
        assert [g == v for g, v in zip(got, values.values())] == [True] * 60
        assert r.delete(*values) == 60
    finally:
        r.close()
    assert memcache_stats(cluster.memcache_port)["data_nodes_up"] == "3"
