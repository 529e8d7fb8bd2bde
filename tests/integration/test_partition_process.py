"""Partitions on real processes: isolation through the VIP, the admin CLI, quotas under load.

Three data nodes, masters and (for the VIP test) a load-balancer pair, all
real ``twistd`` processes on loopback.  Clients are redis-py, raw memcached
sockets (pymemcache has no ASCII authentication) and urllib.  Every wait has
a deadline and every client operation a timeout.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Optional

import pytest
import redis

from kvha import cli
from kvha.procs import NodeProcess, free_port
from tests.conftest import ADMIN_TOKEN, NodeFactory, lb_status

pytestmark = pytest.mark.process

TIMEOUT = 3.0
ALPHA_PW = "alpha-password-1"
BETA_PW = "beta-password-22"
PARTITIONS = [
    {"name": "default", "anonymous": False},
    {"name": "alpha", "password": ALPHA_PW},
    {"name": "beta", "password": BETA_PW},
    {"name": "public", "anonymous": True},
]


def rclient(host: str, port: int, **kwargs: Any) -> redis.Redis:
    """redis-py on RESP2 (kvha's; redis-py 8 would otherwise open with HELLO 3)."""
    return redis.Redis(host=host, port=port, protocol=2, socket_timeout=TIMEOUT, **kwargs)


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (OSError, ValueError, KeyError, redis.RedisError) as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


class Memcached:
    """One memcached text-protocol connection that stays open (logins are per connection)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=TIMEOUT)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def call(self, data: bytes, end: bytes = b"\r\n") -> bytes:
        """Send ``data``; the reply up to ``end``, or its first line if that is an error."""
        self.sock.sendall(data)
        while True:
            line_end = self.buffer.find(b"\r\n")
            if line_end >= 0 and self.buffer.startswith(
                (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")
            ):
                i = line_end + 2
                out, self.buffer = self.buffer[:i], self.buffer[i:]
                return out
            i = self.buffer.find(end)
            if i >= 0:
                i += len(end)
                out, self.buffer = self.buffer[:i], self.buffer[i:]
                return out
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk

    def login(self, partition: str, password: str) -> bytes:
        data = f"{partition} {password}".encode()
        return self.call(b"set auth 0 0 %d\r\n%s\r\n" % (len(data), data))

    def get(self, key: bytes) -> bytes:
        return self.call(b"get %s\r\n" % key, end=b"END\r\n")

    def set(self, key: bytes, value: bytes) -> bytes:
        return self.call(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))


def http(
    base: str, method: str, path: str, body: Optional[bytes] = None, token: Optional[str] = None
) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/octet-stream"
    request = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def start_all(nodes_list: list[NodeProcess], timeout: float = 20.0) -> None:
    for node in nodes_list:
        node.start(wait=False)
    deadline = time.monotonic() + timeout
    for node in nodes_list:
        node._wait_listening(max(0.1, deadline - time.monotonic()))


def test_partitions_are_isolated_in_every_protocol_through_the_vip(nodes: NodeFactory) -> None:
    """Through the VIP: credentials choose the partition, nothing crosses, wrong ones fail."""
    data = [nodes.data(f"data{i}") for i in (1, 2, 3)]
    masters = [
        nodes.full_master(f"master{j}", data, cluster={"partitions": PARTITIONS}) for j in (1, 2)
    ]
    lb1, lb2 = nodes.lb_pair(masters)
    start_all([*data, *masters, lb1, lb2])

    def ready() -> bool:
        status = lb_status(lb1, timeout=0.5)
        return bool(status["holds_vip"]) and all(all(m["up"].values()) for m in status["masters"])

    wait_until(ready, 25, "the VIP with both masters up (health checks need no password)")
    vip = lb1.vip  # type: ignore[attr-defined]
    ports = lb1.vip_ports  # type: ignore[attr-defined]
    web = f"http://{vip}:{ports['http']}"

    # Unauthenticated: every protocol refuses in its own words.
    anon = rclient(vip, ports["redis"])
    with pytest.raises(redis.RedisError, match="Authentication required"):
        anon.get("k")
    with socket.create_connection((vip, ports["redis"]), timeout=TIMEOUT) as raw:
        raw.sendall(b"PING\r\nGET k\r\n")  # PING needs no login: the LB's health check
        assert raw.recv(100) == b"+PONG\r\n-NOAUTH Authentication required.\r\n"
    mc_anon = Memcached(vip, ports["memcached"])
    assert mc_anon.get(b"k") == b"CLIENT_ERROR unauthenticated\r\n"
    assert http(web, "GET", "/v1/p/alpha/k/k")[0] == 401
    assert http(web, "GET", "/v1/p/default/k/k")[0] == 401

    # Wrong passwords are refused.  Without retries: redis-py 8 tries a failed
    # login 11 times, which could spend beta's whole failed-login budget (10 per
    # address per master) on one master, so that the HELLO AUTH and the beta
    # listing below were refused there.  Alpha's budget is kept for the check
    # of that limit at the end.
    with pytest.raises(redis.AuthenticationError):
        rclient(vip, ports["redis"], username="beta", password="wrong-pw", retry=None).ping()
    assert mc_anon.login("alpha", "wrong-pw") == b"CLIENT_ERROR authentication failure\r\n"
    assert http(web, "GET", "/v1/p/alpha/k/k", token="wrong-pw")[0] == 403
    assert http(web, "GET", "/v1/p/alpha/k/k", token=BETA_PW)[0] == 403

    # The same key in alpha and beta, written through two protocols.
    ra = rclient(vip, ports["redis"], username="alpha", password=ALPHA_PW)
    assert ra.set("k", "alpha-value")
    mb = Memcached(vip, ports["memcached"])
    assert mb.login("beta", BETA_PW) == b"STORED\r\n"
    assert mb.get(b"k") == b"END\r\n"
    assert mb.set(b"k", b"beta-value") == b"STORED\r\n"
    assert ra.get("k") == b"alpha-value"
    assert mb.get(b"k") == b"VALUE k 0 10\r\nbeta-value\r\nEND\r\n"
    status, body = http(web, "GET", "/v1/p/alpha/k/k", token=ALPHA_PW)
    assert status == 200 and json.loads(body)["value"] == "alpha-value"
    status, body = http(web, "GET", "/v1/p/beta/k/k", token=BETA_PW)
    assert status == 200 and json.loads(body)["value"] == "beta-value"
    assert http(web, "PUT", "/v1/p/beta/k/k", b"x", token=ALPHA_PW)[0] == 403
    assert http(web, "PUT", "/v1/p/public/k/k", b"public-value")[0] == 200

    # HELLO 2 AUTH on one connection; then everything it sees is beta's.
    with socket.create_connection((vip, ports["redis"]), timeout=TIMEOUT) as raw:
        hello = b"HELLO 2 AUTH beta %s\r\nGET k\r\n" % BETA_PW.encode()
        raw.sendall(hello)
        got = b""
        while not got.endswith(b"$10\r\nbeta-value\r\n"):
            chunk = raw.recv(4096)
            assert chunk, got
            got += chunk
        assert got.startswith(b"*14\r\n$6\r\nserver\r\n")
    rb = rclient(vip, ports["redis"], username="beta", password=BETA_PW)
    assert rb.get("k") == b"beta-value"
    ma = Memcached(vip, ports["memcached"])
    assert ma.login("alpha", ALPHA_PW) == b"STORED\r\n"
    assert ma.get(b"k") == b"VALUE k 0 11\r\nalpha-value\r\nEND\r\n"

    # Listing, counting and flushing cover only the caller's partition.
    for i in range(5):
        ra.set(f"a{i}", "x")
    assert sorted(ra.keys("*")) == sorted([b"k"] + [f"a{i}".encode() for i in range(5)])
    assert rb.keys("*") == [b"k"]
    assert ra.dbsize() == 6 and rb.dbsize() == 1
    status, body = http(web, "GET", "/v1/p/beta/k", token=BETA_PW)
    assert status == 200, (status, body)
    assert json.loads(body)["keys"] == ["k"]
    stats = ma.call(b"stats\r\n", end=b"END\r\n")
    assert b"STAT curr_items 6\r\n" in stats
    assert rb.flushall()
    assert rb.dbsize() == 0 and ra.dbsize() == 6
    assert ma.call(b"flush_all\r\n") == b"OK\r\n"
    assert ra.dbsize() == 0
    status, body = http(web, "GET", "/v1/p/public/k/k")
    assert status == 200 and json.loads(body)["value"] == "public-value"
    for conn in (mc_anon, mb, ma):
        conn.close()

    # Ten failed logins to alpha from one address (all of this test's come from
    # 127.0.0.1, the load balancer's included; straight to master1, whose count it is):
    # alpha logins from there are refused unchecked, in every protocol; beta's are not.
    # One AUTH per attempt, on a raw socket (redis-py retries a failed login).
    m1 = masters[0].ports  # type: ignore[attr-defined]

    def auth(partition: str, password: str) -> bytes:
        with socket.create_connection(("127.0.0.1", m1["redis"]), timeout=TIMEOUT) as raw:
            raw.sendall(f"AUTH {partition} {password}\r\n".encode())
            return raw.recv(200)

    for _ in range(11):  # ten failures at most, counting the test's earlier ones
        answer = auth("alpha", "wrong-pw")
        if not answer.startswith(b"-WRONGPASS"):
            break
    assert answer.startswith(b"-ERR too many failed authentication attempts"), answer
    assert auth("alpha", ALPHA_PW).startswith(b"-ERR too many failed authentication attempts")
    status, body = http(f"http://127.0.0.1:{m1['http']}", "GET", "/v1/p/alpha/k/k", token=ALPHA_PW)
    assert status == 429, body
    assert rclient("127.0.0.1", m1["redis"], username="beta", password=BETA_PW).ping()


def admin(url: str, *args: str) -> int:
    return cli.main(["partition", *args, "--master", url, "--token", ADMIN_TOKEN])


def test_partition_cli_quotas_and_password_changes(
    nodes: NodeFactory, capsys: pytest.CaptureFixture[str], record_property: Any
) -> None:
    """kvha partition create/list/set/delete through one master reach the other; quotas hold."""
    data = [nodes.data(f"data{i}") for i in (1, 2, 3)]
    http_ports = [free_port(), free_port()]
    masters = []
    for j in (0, 1):
        masters.append(
            nodes.full_master(
                f"master{j + 1}",
                data,
                admin_token=ADMIN_TOKEN,
                state_dir=f"{nodes.tmp_path}/master{j + 1}",
                peers=[f"http://127.0.0.1:{http_ports[1 - j]}"],
                http={"listen": f"tcp:{http_ports[j]}:interface=127.0.0.1"},
                # This test polls with stale passwords until changes spread: no
                # failed-login limit (the other test here checks it).
                limits={"auth_failures": 0},
            )
        )
        masters[-1].ports["http"] = http_ports[j]  # type: ignore[attr-defined]
    start_all([*data, *masters])
    urls = [f"http://127.0.0.1:{p}" for p in http_ports]

    def healthy() -> bool:
        return all(http(u, "GET", "/health")[0] == 200 for u in urls)

    wait_until(healthy, 20, "both masters to see every data node")
    capsys.readouterr()
    assert (
        admin(
            urls[0],
            "create",
            "cache",
            "--password",
            "cache-pw-1",
            "--max-bytes",
            "256KiB",
            "--policy",
            "evict",
        )
        == 0
    )
    assert (
        admin(
            urls[0],
            "create",
            "store",
            "--password",
            "store-pw-1",
            "--max-bytes",
            "32KiB",
            "--policy",
            "reject",
            "--default-ttl",
            "1h",
        )
        == 0
    )
    assert "partition store created" in capsys.readouterr().out
    assert admin(urls[0], "create", "cache", "--password", "x" * 10) == 1
    assert "already exists" in capsys.readouterr().err
    assert admin(urls[0], "create", "bad", "--max-bytes", "lots") == 1
    assert "max_bytes: expected a size" in capsys.readouterr().err

    def listed_on_second() -> Any:
        capsys.readouterr()
        assert admin(urls[1], "list", "--json") == 0
        doc = json.loads(capsys.readouterr().out)
        names = {p["name"]: p for p in doc["partitions"]}
        return names if {"cache", "store"} <= set(names) else None

    listed = wait_until(listed_on_second, 5, "the partitions to reach the second master")
    assert listed["cache"]["max_bytes"] == 256 * 1024 and listed["cache"]["policy"] == "evict"
    assert listed["store"]["default_ttl"] == 3600.0 and listed["store"]["has_password"]

    # evict: write 16x the quota through the second master; the partition stays within it.
    mc = Memcached("127.0.0.1", masters[1].port)  # type: ignore[arg-type]
    assert mc.login("cache", "cache-pw-1") == b"STORED\r\n"
    value = b"v" * 1000
    written = 0
    for i in range(4200):
        assert mc.set(b"key%d" % i, value) == b"STORED\r\n"
        written += len(b"key%d" % i) + 21 + len(value)
    capsys.readouterr()
    assert admin(urls[0], "list", "--json") == 0
    cache = {p["name"]: p for p in json.loads(capsys.readouterr().out)["partitions"]}["cache"]
    record_property("evict_written_bytes", written)
    record_property("evict_used_bytes", cache["used_bytes"])
    with capsys.disabled():
        print(
            f"\nevict through a real master: wrote {written} B, "
            f"holds {cache['used_bytes']} B of 262144"
        )
    assert written > 16 * 256 * 1024
    assert 0.9 * 256 * 1024 < cache["used_bytes"] <= 256 * 1024 + 3
    assert mc.get(b"key4199").startswith(b"VALUE key4199 ")  # the newest is there

    # reject: refuse in Redis and HTTP once full, and store nothing.
    rs = rclient(
        "127.0.0.1",
        masters[0].ports["redis"],  # type: ignore[attr-defined]
        username="store",
        password="store-pw-1",
    )
    refused = None
    for i in range(1000):
        try:
            rs.set(f"s{i}", "x" * 500)
        except redis.exceptions.OutOfMemoryError as e:  # redis-py's name for -OOM
            assert "command not allowed when used memory" in str(e)
            refused = f"s{i}"
            break
    assert refused is not None
    assert rs.get(refused) is None
    assert 0 < rs.ttl("s0") <= 3600
    full = http(urls[1], "PUT", f"/v1/p/store/k/{refused}", b"x" * 500, token="store-pw-1")
    assert full[0] == 507
    assert http(urls[1], "GET", f"/v1/p/store/k/{refused}", token="store-pw-1")[0] == 404

    # A changed password: the old one is refused everywhere once the map has spread.
    assert admin(urls[1], "set", "cache", "--password", "cache-pw-2") == 0

    def old_refused() -> bool:
        m = Memcached("127.0.0.1", masters[0].port)  # type: ignore[arg-type]
        try:
            return m.login("cache", "cache-pw-1") == b"CLIENT_ERROR authentication failure\r\n"
        finally:
            m.close()

    wait_until(old_refused, 5, "the old password to be refused by the first master")
    fresh = Memcached("127.0.0.1", masters[0].port)  # type: ignore[arg-type]
    assert fresh.login("cache", "cache-pw-2") == b"STORED\r\n"
    fresh.close()

    # delete: the partition and its records go.
    assert admin(urls[0], "delete", "store") == 0
    assert admin(urls[0], "delete", "default") == 1  # served by the masters' ports
    assert "is served by a port" in capsys.readouterr().err

    def store_gone() -> bool:
        try:
            rclient(
                "127.0.0.1",
                masters[1].ports["redis"],  # type: ignore[attr-defined]
                username="store",
                password="store-pw-1",
            ).ping()
        except redis.AuthenticationError:
            return True
        return False

    wait_until(store_gone, 5, "the deleted partition to refuse logins")
    capsys.readouterr()
    assert admin(urls[1], "list") == 0
    table = capsys.readouterr().out
    assert "cache" in table and "store" not in table
    mc.close()
