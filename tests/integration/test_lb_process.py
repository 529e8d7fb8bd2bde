"""The load-balancer pair as real twistd processes, under client load.

a-c: three data nodes, two (or three) masters and two load balancers in bind
mode on a loopback VIP, all on free ports.  Clients use raw RESP sockets (and
redis-py to read back) through the VIP and reconnect on error.
d: ip mode between network namespaces (a bridge, lb1, lb2 and a client), with
tiny RESP stand-ins for masters.  e: ``kvha up`` with a temporary local.yaml.
Every load loop is bounded in operations and in time; every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Optional

import pytest
import redis
import yaml

from kvha import cli
from kvha.procs import SOURCE_ROOT, NodeProcess
from tests.conftest import ADMIN_TOKEN, SECRET, NodeFactory, lb_status

pytestmark = pytest.mark.process

#: Seconds any single client socket operation may take before it counts as an error.
CLIENT_TIMEOUT = 2.0


def wait_until(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.02) -> Any:
    """Poll ``pred`` until it returns something true, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (OSError, ValueError, KeyError) as e:
            last_error = e
        time.sleep(step)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error})"
    )


def status_or_none(lb: NodeProcess) -> Optional[dict[str, Any]]:
    try:
        return lb_status(lb, timeout=0.5)  # type: ignore[no-any-return]
    except OSError:
        return None


def all_masters_up(status: Optional[dict[str, Any]], n: int) -> bool:
    return (
        status is not None
        and len(status["masters"]) == n
        and all(all(m["up"].values()) for m in status["masters"])
    )


def start_cluster(
    nodes: NodeFactory,
    n_masters: int = 2,
    extra_masters: int = 0,
    forward: str = "proxy",
    **lb_extra: Any,
) -> tuple[list[NodeProcess], list[NodeProcess], NodeProcess, NodeProcess]:
    """3 data nodes, masters (the first ``n_masters`` behind the VIP) and an LB pair, ready.

    ``forward: handoff`` gives every master a handoff socket.  Returns once
    lb1 holds the VIP, lb2 is BACKUP and both see every master up (and, with
    handoff, linked).
    """
    data = [nodes.data(f"data{i}") for i in (1, 2, 3)]
    handoff = forward == "handoff"
    masters = [
        nodes.full_master(f"master{j + 1}", data, handoff=handoff)
        for j in range(n_masters + extra_masters)
    ]
    if forward != "proxy":
        lb_extra["forward"] = forward
    lb1, lb2 = nodes.lb_pair(masters[:n_masters], **lb_extra)
    everything = [*data, *masters, lb1, lb2]
    for node in everything:
        node.start(wait=False)
    deadline = time.monotonic() + 20
    for node in everything:
        node._wait_listening(max(0.1, deadline - time.monotonic()))

    def ready() -> bool:
        s1, s2 = status_or_none(lb1), status_or_none(lb2)
        return (
            s1 is not None
            and s2 is not None
            and s1["holds_vip"]
            and s2["state"] == "BACKUP"
            and all_masters_up(s1, n_masters)
            and all_masters_up(s2, n_masters)
        )

    wait_until(ready, max(1.0, deadline - time.monotonic()), "the LB pair to be ready")
    if handoff:
        for lb in (lb1, lb2):
            wait_until(
                lambda lb=lb: count_in_log(lb, "up; it adopts") >= n_masters,
                max(1.0, deadline - time.monotonic()),
                f"{lb.node_id}'s handoff links",  # type: ignore[attr-defined]
            )
    return data, masters, lb1, lb2


# Client load --------------------------------------------------------------------------------------


def _read_line(sock: socket.socket, buffer: bytearray) -> bytes:
    while b"\r\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed by the server")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\r\n")
    buffer[:] = rest
    return line


class Load:
    """Client threads sending RESP ``SET`` of unique keys through the VIP, reconnecting on error.

    Bounded: each thread stops after ``max_ops`` operations or ``max_seconds``.
    ``ops_per_conn`` closes and reopens the connection every so many operations
    (None: one connection for as long as it works).
    """

    def __init__(
        self,
        host: str,
        port: int,
        threads: int = 2,
        ops_per_conn: Optional[int] = None,
        max_ops: int = 20_000,
        max_seconds: float = 40.0,
        pause: float = 0.002,
        prefix: str = "load",
    ) -> None:
        self.host = host
        self.port = port
        self.n_threads = threads
        self.ops_per_conn = ops_per_conn
        self.max_ops = max_ops
        self.max_seconds = max_seconds
        self.pause = pause
        self.prefix = prefix
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}
        #: (start, end, when its connection was opened) of each acknowledged op
        self.done: list[tuple[float, float, float]] = []
        self.errors: list[tuple[float, str]] = []
        self.connects = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT + 5)
        assert not any(t.is_alive() for t in self._threads), "a load thread is stuck"

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _run(self, n: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        sock: Optional[socket.socket] = None
        buffer = bytearray()
        on_conn = 0
        opened = 0.0
        for i in range(self.max_ops):
            if self._stop.is_set() or time.monotonic() > deadline:
                break
            start = time.monotonic()
            try:
                if sock is None:
                    sock = socket.create_connection((self.host, self.port), timeout=CLIENT_TIMEOUT)
                    opened = time.monotonic()
                    buffer.clear()
                    on_conn = 0
                    with self.lock:
                        self.connects += 1
                key, value = f"{self.prefix}-{n}-{i}", f"v{i}-{random.random()}"
                sock.sendall(
                    b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n"
                    % (len(key), key.encode(), len(value), value.encode())
                )
                reply = _read_line(sock, buffer)
                if reply != b"+OK":
                    raise ValueError(f"unexpected reply {reply!r}")
                end = time.monotonic()
                with self.lock:
                    self.acked[key] = value
                    self.done.append((start, end, opened))
                on_conn += 1
                if self.ops_per_conn and on_conn >= self.ops_per_conn:
                    sock.close()
                    sock = None
            except (OSError, ValueError) as e:
                with self.lock:
                    self.errors.append((time.monotonic(), f"{type(e).__name__}: {e}"))
                if sock is not None:
                    sock.close()
                    sock = None
                time.sleep(0.005)
                continue
            time.sleep(self.pause)
        if sock is not None:
            sock.close()

    def first_success_after(self, t: float) -> Optional[float]:
        """End time of the first acknowledged op on a connection opened after ``t``.

        A connection opened after ``t`` shows the VIP accepting again; ops on older
        connections do not (in bind mode a former holder keeps forwarding them).
        """
        with self.lock:
            ends = [end for _, end, opened in self.done if opened > t]
        return min(ends) if ends else None

    def successes_since(self, t: float, new_connections: bool = False) -> int:
        """Acknowledged ops started after ``t`` (only on connections opened after it)."""
        with self.lock:
            return sum(
                1 for start, _, opened in self.done if (opened if new_connections else start) > t
            )


def read_back(host: str, port: int, expected: dict[str, str]) -> list[str]:
    """Keys whose value read through ``host:port`` with redis-py is not the acknowledged one."""
    client = redis.Redis(
        host=host, port=port, protocol=2, socket_timeout=10, socket_connect_timeout=5
    )
    wrong = []
    try:
        keys = sorted(expected)
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            values = client.mget(chunk)
            for key, got in zip(chunk, values):
                if got is None or got.decode() != expected[key]:
                    wrong.append(key)
    finally:
        client.close()
    return wrong


class VipPoller:
    """Polls both load balancers' /v1/status every ~20 ms (bounded) and keeps the samples."""

    def __init__(self, lbs: list[NodeProcess], period: float = 0.02, max_seconds: float = 40.0):
        self.lbs = lbs
        self.period = period
        self.max_seconds = max_seconds
        self.samples: list[tuple[float, list[bool], list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            holds, states = [], []
            for lb in self.lbs:
                s = status_or_none(lb)
                holds.append(bool(s and s["holds_vip"]))
                states.append(s["state"] if s else "dead")
            self.samples.append((time.monotonic(), holds, states))
            time.sleep(self.period)

    def __enter__(self) -> VipPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def longest(self, both: Callable[[tuple[float, list[bool], list[str]]], bool]) -> float:
        """Longest stretch (upper bound: up to the next sample) during which ``both`` held."""
        longest, run_start = 0.0, None
        for t, holds, states in self.samples:
            if both((t, holds, states)):
                if run_start is None:
                    run_start = t
            elif run_start is not None:
                longest = max(longest, t - run_start)
                run_start = None
        if run_start is not None:
            longest = max(longest, self.samples[-1][0] - run_start + self.period)
        return longest


def only_holder(holder: NodeProcess, other: NodeProcess) -> bool:
    """``holder`` holds the VIP and ``other`` does not (both answering their admin API)."""
    a, b = status_or_none(holder), status_or_none(other)
    return bool(a and b and a["holds_vip"] and not b["holds_vip"])


def count_in_log(node: NodeProcess, text: str) -> int:
    return node.log().count(text)


def record(record_property: Any, name: str, value: Any) -> None:
    print(f"{name}: {value}")
    record_property(name, value)


# a. kill -9 of the active load balancer -----------------------------------------------------------


def test_kill_9_of_the_active_lb_moves_the_vip_in_under_a_second(nodes, record_property):  # type: ignore[no-untyped-def]
    """kill -9 of the active LB under load: the VIP serves again in < 1 s, 5 times over."""
    _, _, lb1, lb2 = start_cluster(nodes)
    vip, port = lb1.vip, lb1.vip_ports["redis"]  # type: ignore[attr-defined]
    failovers: list[float] = []
    # Start-up may already have made lb2 ACTIVE briefly (if it started first): count from here.
    active0 = count_in_log(lb2, "load balancer lb2 is ACTIVE")
    backup0 = count_in_log(lb2, "load balancer lb2 is BACKUP (was ACTIVE)")
    load = Load(vip, port, threads=3, ops_per_conn=50, prefix="a")
    with VipPoller([lb1, lb2]) as poller, load:
        wait_until(lambda: load.successes_since(time.monotonic() - 0.5) > 20, 5, "a steady load")
        for round_no in range(1, 6):
            steady = time.monotonic()
            # Every client on a connection opened since (through the current holder).
            wait_until(
                lambda t=steady: load.successes_since(t, new_connections=True) > 200,
                10,
                "fresh load",
            )
            killed_at = time.monotonic()
            lb1.kill()  # SIGKILL and reap: no resign, its sockets die with it
            dead_at = time.monotonic()
            back = wait_until(
                lambda t=dead_at: load.first_success_after(t),
                5,
                "a client op through the new holder",
            )
            failovers.append(round(back - killed_at, 3))
            s2 = lb_status(lb2)
            assert s2["state"] == "ACTIVE" and s2["holds_vip"]
            # The standby became ACTIVE exactly once for this failure.
            assert count_in_log(lb2, "load balancer lb2 is ACTIVE") == active0 + round_no, lb2.log()
            # Restart the old holder: with preemption it takes the VIP back.
            lb1.start(wait=True)
            wait_until(lambda: only_holder(lb1, lb2), 5, "the VIP to move back to lb1")
            assert count_in_log(lb2, "lb2 is BACKUP (was ACTIVE)") == backup0 + round_no
        moved_back_at = time.monotonic()
        wait_until(lambda: load.successes_since(moved_back_at) > 10, 5, "the load after move-back")
    record(record_property, "lb_failover_seconds", failovers)
    record(record_property, "lb_failover_median_seconds", statistics.median(failovers))
    assert max(failovers) < 1.0, failovers
    assert count_in_log(lb2, "load balancer lb2 is ACTIVE") == active0 + 5
    # Both never held the VIP (or were ACTIVE) for longer than about one heartbeat.
    both_hold = poller.longest(lambda s: all(s[1]))
    both_active = poller.longest(lambda s: s[2] == ["ACTIVE", "ACTIVE"])
    record(record_property, "lb_both_hold_vip_seconds", round(both_hold, 3))
    record(record_property, "lb_both_active_seconds", round(both_active, 3))
    record(record_property, "lb_poll_samples", len(poller.samples))
    assert len(poller.samples) > 100
    assert both_hold <= 0.2 and both_active <= 0.25
    # Nothing acknowledged through either holder was lost.
    assert read_back(vip, port, load.acked) == []
    assert len(load.acked) > 500


def test_masters_take_no_traffic_until_their_data_nodes_are_up(nodes):  # type: ignore[no-untyped-def]
    """Cold start with the data nodes late: each master answers LOADING (Redis),
    SERVER_ERROR loading (memcached) and 503 (HTTP), so the load balancers keep it
    out of the pool, and no client through the VIP gets an OK it cannot read back.
    Once the data nodes are up, the first writes through the VIP read back."""
    from pymemcache.client.base import Client as MemcacheClient
    from pymemcache.exceptions import MemcacheServerError

    data = [nodes.data(f"data{i}") for i in (1, 2, 3)]
    # A start-up wait longer than this test: the masters wait for the data nodes.
    wait = {"startup_wait": "60s"}
    masters = [nodes.full_master(f"master{j}", data, health=wait) for j in (1, 2)]
    lb1, lb2 = nodes.lb_pair(masters)
    for node in [*masters, lb1, lb2]:
        node.start(wait=False)
    for node in [*masters, lb1, lb2]:
        node._wait_listening(20)
    wait_until(lambda: (status_or_none(lb1) or {}).get("holds_vip"), 10, "lb1 to hold the VIP")
    m1 = masters[0]
    direct = redis.Redis("127.0.0.1", m1.ports["redis"], socket_timeout=2)  # type: ignore[attr-defined]
    with pytest.raises(redis.exceptions.BusyLoadingError):
        direct.ping()
    with pytest.raises(redis.exceptions.BusyLoadingError):
        direct.set("k", "v")
    assert direct.info("persistence")["loading"] == 1
    mc = MemcacheClient(("127.0.0.1", m1.ports["memcached"]), timeout=2)  # type: ignore[attr-defined]
    with pytest.raises(MemcacheServerError, match="loading"):
        mc.set("k", b"v", noreply=False)
    with pytest.raises(MemcacheServerError, match="loading"):
        mc.version()  # the load balancers' memcached probe
    mc.close()
    health = f"http://127.0.0.1:{m1.ports['http']}/health"  # type: ignore[attr-defined]
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(health, timeout=2)
    assert info.value.code == 503
    # Several health-check rounds (interval 0.1 s here): every master stays out of the pool.
    time.sleep(1.0)
    for lb in (lb1, lb2):
        status = lb_status(lb)
        assert all(not any(m["up"].values()) for m in status["masters"]), status
    # Through the VIP nothing is accepted: no backend, so no OK for a write.
    vip, port = lb1.vip, lb1.vip_ports["redis"]  # type: ignore[attr-defined]
    with pytest.raises(redis.exceptions.RedisError):
        redis.Redis(vip, port, socket_timeout=2).set("k", "v")
    # The data nodes come up: the masters serve, the pool fills, writes read back at once.
    for node in data:
        node.start(wait=False)
    wait_until(lambda: all_masters_up(status_or_none(lb1), 2), 15, "lb1 to see both masters up")
    client = redis.Redis(vip, port, socket_timeout=2)
    for i in range(50):
        assert client.set(f"cold{i}", f"v{i}")
        assert client.get(f"cold{i}") == f"v{i}".encode()
    assert direct.ping()
    assert direct.info("persistence")["loading"] == 0
    assert "serving clients: enough data nodes are up" in m1.log()


# b. kill -9 of a master ---------------------------------------------------------------------------


@pytest.mark.parametrize("forward", ["proxy", "handoff"])
def test_kill_9_of_a_master_under_load_loses_nothing(nodes, record_property, forward):  # type: ignore[no-untyped-def]
    """kill -9 of a master: no new connection reaches it, clients reconnect, no write is lost."""
    _, masters, lb1, _ = start_cluster(nodes, forward=forward)
    vip, port = lb1.vip, lb1.vip_ports["redis"]  # type: ignore[attr-defined]
    victim = masters[0]
    with Load(vip, port, threads=3, ops_per_conn=10, prefix="b") as load:
        wait_until(lambda: load.successes_since(time.monotonic() - 0.5) > 50, 5, "a steady load")

        def victim_row() -> dict[str, Any]:
            rows = {m["id"]: m for m in lb_status(lb1)["masters"]}
            return rows[victim.node_id]  # type: ignore[attr-defined,no-any-return]

        wait_until(lambda: victim_row()["total_connections"]["redis"] > 5, 5, "load on the victim")
        killed_at = time.monotonic()
        victim.kill()

        def victim_down() -> Optional[dict[str, Any]]:
            row = victim_row()
            return None if any(row["up"].values()) else row

        detected = wait_until(victim_down, 3, "the LB to mark the killed master down")
        detected_at = time.monotonic()
        record(record_property, "master_down_detected_seconds", round(detected_at - killed_at, 3))
        assert detected["connections"] == {"redis": 0, "memcached": 0, "http": 0}
        total_then = detected["total_connections"]
        mark = time.monotonic()
        wait_until(lambda: load.successes_since(mark) > 300, 10, "the load to go on")
        later = victim_row()
        assert later["total_connections"] == total_then  # no new connection reached it
        assert later["connections"] == {"redis": 0, "memcached": 0, "http": 0}
        assert not any(later["up"].values())
    # Only operations in flight on the killed master's connections may have failed
    # (noticed by the client at once, well before detection plus a little slack).
    late = [e for e in load.errors if e[0] > detected_at + 0.1]
    assert late == [], late
    assert len(load.errors) <= load.n_threads, load.errors
    record(record_property, "master_kill_client_errors", len(load.errors))
    assert read_back(vip, port, load.acked) == []
    assert len(load.acked) > 300


def _resp_call(sock: socket.socket, *args: bytes) -> bytes:
    """One RESP command on a raw socket; the reply's first complete element."""
    sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buffer += chunk
        if buffer[:1] in (b"+", b"-", b":") and buffer.endswith(b"\r\n"):
            return buffer
        if buffer[:1] == b"$":
            head, _, rest = buffer.partition(b"\r\n")
            if int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2:
                return buffer


def test_handoff_gives_masters_the_client_socket_which_outlives_the_lb(nodes, record_property):  # type: ignore[no-untyped-def]
    """forward: handoff: the master serves the client's own socket (it sees the client's
    address), the load balancer counts it until it closes, and a kill -9 of the active
    load balancer leaves open connections working while the peer takes new ones."""
    _, masters, lb1, lb2 = start_cluster(nodes, forward="handoff")
    vip = lb1.vip  # type: ignore[attr-defined]
    rport, mport = lb1.vip_ports["redis"], lb1.vip_ports["memcached"]  # type: ignore[attr-defined]
    sock = socket.create_connection((vip, rport), timeout=CLIENT_TIMEOUT)
    mc = Memcached(vip, mport)
    try:
        host, port = sock.getsockname()[:2]
        info = _resp_call(sock, b"CLIENT", b"INFO")
        assert f"addr={host}:{port} ".encode() in info, info  # not the load balancer's socket
        assert _resp_call(sock, b"SET", b"handoff-key", b"before") == b"+OK\r\n"
        mc.roundtrip("handoff-mc", "before")

        def counted(lb: NodeProcess) -> dict[str, int]:
            rows = lb_status(lb)["masters"]
            return {p: sum(m["connections"][p] for m in rows) for p in ("redis", "memcached")}

        assert counted(lb1) == {"redis": 1, "memcached": 1}
        extra = socket.create_connection((vip, rport), timeout=CLIENT_TIMEOUT)
        assert _resp_call(extra, b"PING") == b"+PONG\r\n"
        assert counted(lb1)["redis"] == 2
        extra.close()  # the master reports the close: the count falls
        wait_until(lambda: counted(lb1)["redis"] == 1, 3, "the closed connection to be uncounted")

        killed_at = time.monotonic()
        lb1.kill()
        # The open connections belong to the masters now: they go on, unbroken.
        for i in range(20):
            value = b"after-%d" % i
            assert _resp_call(sock, b"SET", b"handoff-key", value) == b"+OK\r\n"
            assert _resp_call(sock, b"GET", b"handoff-key") == b"$%d\r\n%s\r\n" % (
                len(value),
                value,
            )
            mc.roundtrip(f"handoff-mc-{i}", f"after-{i}")
        # New connections reach a master through the new holder.
        client = redis.Redis(host=vip, port=rport, socket_timeout=CLIENT_TIMEOUT)

        def new_connection_works() -> bool:
            client.connection_pool.disconnect()
            return client.get("handoff-key") == b"after-19"

        wait_until(new_connection_works, 5, "lb2 to take new connections")
        record(record_property, "handoff_takeover_seconds", round(time.monotonic() - killed_at, 3))
        assert lb_status(lb2)["holds_vip"]
        client.close()
    finally:
        sock.close()
        mc.close()


def test_handoff_drain_timeout_closes_what_the_dead_peer_handed_over(nodes):  # type: ignore[no-untyped-def]
    """A drain's timeout closes every connection handed to the master, also those the
    killed active load balancer handed over, which the new holder never counted."""
    _, masters, lb1, lb2 = start_cluster(nodes, forward="handoff", drain_timeout=1.5)
    vip, mport = lb1.vip, lb1.vip_ports["memcached"]  # type: ignore[attr-defined]
    victim = masters[0]
    kept: Optional[Memcached] = None
    others: list[Memcached] = []
    try:
        for _ in range(20):
            candidate = Memcached(vip, mport)
            if candidate.pid() == victim.pid:
                kept = candidate
                break
            others.append(candidate)
        assert kept is not None, "no memcached connection reached master1"
        lb1.kill()
        wait_until(lambda: lb_status(lb2)["holds_vip"], 5, "lb2 to take the VIP")
        kept.roundtrip("drain-kept", "before")
        admin = ["--admin", lb2.admin, "--token", ADMIN_TOKEN]  # type: ignore[attr-defined]
        started = time.monotonic()
        code, out = kvha("master", "drain", victim.node_id, *admin)  # type: ignore[attr-defined]
        assert code == 0, out
        kept.roundtrip("drain-kept", "during")  # open connections work until the timeout
        for other in others:  # the other master's are not touched
            other.roundtrip("drain-other", "during")

        def kept_closed() -> bool:
            try:
                kept.roundtrip("drain-kept", "after")  # type: ignore[union-attr]
            except (ConnectionError, OSError):
                return True
            time.sleep(0.05)
            return False

        wait_until(kept_closed, 6, "the drained master's handed connection to be closed")
        elapsed = time.monotonic() - started
        assert 1.4 <= elapsed <= 4.0, elapsed
        for other in others:
            other.roundtrip("drain-other", "after")
    finally:
        for c in [*others, *([kept] if kept is not None else [])]:
            c.close()


# c. master add and drain at run time -------------------------------------------------------------


class Memcached:
    """One long-lived memcached text connection through the VIP."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=CLIENT_TIMEOUT)
        self.buffer = bytearray()

    def command(self, line: bytes, end: bytes) -> bytes:
        self.sock.sendall(line)
        while end not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        reply, _, rest = bytes(self.buffer).partition(end)
        self.buffer[:] = rest
        return reply + end

    def pid(self) -> int:
        stats = self.command(b"stats\r\n", b"END\r\n")
        for line in stats.split(b"\r\n"):
            if line.startswith(b"STAT pid "):
                return int(line.split()[2])
        raise ValueError("no pid in stats")

    def roundtrip(self, key: str, value: str) -> None:
        assert self.command(f"set {key} 0 0 {len(value)}\r\n{value}\r\n".encode(), b"\r\n") == (
            b"STORED\r\n"
        )
        got = self.command(f"get {key}\r\n".encode(), b"END\r\n")
        assert got == f"VALUE {key} 0 {len(value)}\r\n{value}\r\nEND\r\n".encode(), got

    def close(self) -> None:
        self.sock.close()


def kvha(*argv: str) -> tuple[int, str]:
    """Run the kvha CLI in-process; return its status and what it printed."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


@pytest.mark.parametrize("forward", ["proxy", "handoff"])
def test_master_add_and_drain_at_run_time(nodes, record_property, forward):  # type: ignore[no-untyped-def]
    """kvha master add and drain under load: no client errors, new connections follow the change."""
    _, masters, lb1, lb2 = start_cluster(nodes, n_masters=2, extra_masters=1, forward=forward)
    m3 = masters[2]
    vip = lb1.vip  # type: ignore[attr-defined]
    rport, mport = lb1.vip_ports["redis"], lb1.vip_ports["memcached"]  # type: ignore[attr-defined]
    admin = ["--admin", lb1.admin, "--token", ADMIN_TOKEN]  # type: ignore[attr-defined]
    old = Memcached(vip, mport)
    kept: Optional[Memcached] = None
    try:
        with Load(vip, rport, threads=3, ops_per_conn=20, prefix="c") as load:
            wait_until(lambda: load.successes_since(time.monotonic() - 0.5) > 50, 5, "steady load")
            old.roundtrip("old-conn", "before")
            ports = [f"--{p}={n}" for p, n in m3.ports.items()]  # type: ignore[attr-defined]
            if m3.handoff:  # type: ignore[attr-defined]
                ports.append(f"--handoff={m3.handoff}")  # type: ignore[attr-defined]
            code, out = kvha("master", "add", "master3", "127.0.0.1", *ports, *admin)
            assert code == 0, out
            assert "epoch 1" in out and "master3" in out

            def m3_row(lb: NodeProcess) -> dict[str, Any]:
                return {m["id"]: m for m in lb_status(lb)["masters"]}["master3"]  # type: ignore[no-any-return]

            wait_until(lambda: m3_row(lb1)["total_connections"]["redis"] > 3, 5, "load on master3")
            if forward == "handoff":
                # The added master is linked, and connections are handed over, not relayed.
                for lb in (lb1, lb2):
                    wait_until(
                        lambda lb=lb: count_in_log(lb, "handoff link to master3 up") == 1,
                        5,
                        f"{lb.node_id}'s link to master3",  # type: ignore[attr-defined]
                    )
                probe = socket.create_connection((vip, rport), timeout=CLIENT_TIMEOUT)
                host, port = probe.getsockname()[:2]
                assert f"addr={host}:{port} ".encode() in _resp_call(probe, b"CLIENT", b"INFO")
                probe.close()
            # The standby has the new list too.
            wait_until(lambda: lb_status(lb2, "/v1/masters")["epoch"] == 1, 3, "lb2 at epoch 1")
            # A long-lived connection that reached master3 (leastconn ties are random).
            for _ in range(20):
                candidate = Memcached(vip, mport)
                if candidate.pid() == m3.pid:
                    kept = candidate
                    break
                candidate.close()
            assert kept is not None, "no memcached connection reached master3"
            kept.roundtrip("kept-conn", "added")

            code, out = kvha("master", "drain", "master3", *admin)
            assert code == 0, out
            assert "master3" in out and "draining" in out
            drained_at = time.monotonic()
            time.sleep(0.3)  # connections the load opened before the drain finish their ops
            before = m3_row(lb1)["total_connections"]
            # The existing connection keeps working while new ones go elsewhere.
            for i in range(10):
                kept.roundtrip(f"kept-{i}", f"draining-{i}")
                assert kept.pid() == m3.pid
                old.roundtrip(f"old-{i}", f"still-{i}")
                time.sleep(0.1)
            mark = time.monotonic()
            wait_until(lambda: load.successes_since(mark) > 100, 10, "the load to go on")
            after = m3_row(lb1)
            assert after["total_connections"] == before, (before, after)
            assert after["draining"] and after["connections"]["memcached"] == 1
            record(
                record_property, "drain_observed_seconds", round(time.monotonic() - drained_at, 2)
            )
        assert load.errors == []
        kept.close()
        kept = None
        wait_until(
            lambda: sum(m3_row(lb1)["connections"].values()) == 0, 3, "master3 to have no clients"
        )
        peer = lb_status(lb2, "/v1/masters")
        assert peer == lb_status(lb1, "/v1/masters")
        assert peer["epoch"] == 2
        assert [m["draining"] for m in peer["masters"]] == [False, False, True]
    finally:
        old.close()
        if kept is not None:
            kept.close()
    # Both load balancers come back with the changed list from their state files.
    for lb in (lb1, lb2):
        lb.stop()  # SIGTERM: twistd exits by re-raising it after a clean shutdown
        assert lb.log().rstrip().endswith("Server Shut Down."), lb.log()[-2000:]
    for lb in (lb2, lb1):
        with open(os.path.join(nodes.tmp_path, lb.node_id, "masters.json")) as f:  # type: ignore[attr-defined]
            assert json.load(f)["epoch"] == 2
        lb.start(wait=True)
        got = lb_status(lb, "/v1/masters")
        assert got["epoch"] == 2 and got == peer
    wait_until(lambda: lb_status(lb1)["holds_vip"], 5, "lb1 to hold the VIP again")
    # New connections still avoid the drained master after the restart.
    with Load(vip, rport, threads=2, ops_per_conn=5, max_ops=100, prefix="c2") as after_restart:
        wait_until(lambda: after_restart.successes_since(0) >= 150, 10, "load after restart")
    assert after_restart.errors == []
    assert m3_row(lb1)["total_connections"] == {"redis": 0, "memcached": 0, "http": 0}


# d. ip mode between network namespaces -----------------------------------------------------------

#: A RESP stand-in for a master: PING, and WHO, which answers ``template`` (default: its
#: name; ``{peer}`` is the address the connection came from).
STANDIN = """\
import asyncio, sys
name, port = sys.argv[1], int(sys.argv[2])
host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
template = sys.argv[4] if len(sys.argv) > 4 else "{name}"
async def handle(reader, writer):
    peer = writer.get_extra_info("peername")[0]
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = line.strip().upper()
            if cmd == b"PING":
                writer.write(b"+PONG\\r\\n")
            elif cmd == b"WHO":
                writer.write(("+" + template.format(name=name, peer=peer) + "\\r\\n").encode())
            else:
                writer.write(b"-ERR unknown command\\r\\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, host, port)
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

#: Connects to the VIP once per operation, asks WHO, and prints one JSON line per attempt.
PROBE_CLIENT = """\
import json, os, socket, sys, time
host, port, seconds, stop = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + seconds
for i in range(20000):
    if time.monotonic() > deadline or os.path.exists(stop):
        break
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=0.2) as s:
            s.settimeout(0.5)
            s.sendall(b"WHO\\r\\n")
            reply = s.recv(64).decode().strip().lstrip("+")
    except OSError as e:
        reply = "error: " + type(e).__name__
    print(json.dumps([start, time.monotonic(), reply]), flush=True)
    time.sleep(0.01)
"""


SEND_GARP = "from kvha.lb import vip; vip.send_gratuitous_arp('eth0', '10.77.0.100')"


def ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


class Namespaces:
    """A bridge namespace and lb1, lb2, cl namespaces on 10.77.0.0/24 (unique names).

    Processes started with ``spawn`` are killed (by pid) before the namespaces are deleted.
    """

    ADDRESSES = {"lb1": "10.77.0.1", "lb2": "10.77.0.2", "cl": "10.77.0.9"}

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        suffix = os.urandom(3).hex()
        self.suffix = suffix
        self.ns = {role: f"kv{role}{suffix}" for role in ("sw", *self.ADDRESSES)}
        self.created: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def create(self) -> None:
        for ns in self.ns.values():
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        sw = self.ns["sw"]
        ip("-n", sw, "link", "add", "br0", "type", "bridge")
        ip("-n", sw, "link", "set", "br0", "up")
        for role, address in self.ADDRESSES.items():
            outside, inside = f"v{role}{self.suffix}", f"p{role}{self.suffix}"
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            try:
                ip("link", "set", outside, "netns", sw)
                ip("link", "set", inside, "netns", self.ns[role])
            except RuntimeError:
                ip("link", "del", outside, check=False)  # still in the root namespace
                raise
            ip("-n", self.ns[role], "link", "set", inside, "name", "eth0")
            ip("-n", self.ns[role], "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", self.ns[role], "link", "set", "eth0", "up")
            ip("-n", sw, "link", "set", outside, "master", "br0", "up")

    def spawn(self, role: str, argv: list[str], output: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = SOURCE_ROOT
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns[role], *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        return proc

    def mac(self, role: str) -> str:
        (link,) = json.loads(ip("-n", self.ns[role], "-j", "link", "show", "eth0"))
        return str(link["address"])

    def neighbour(self, address: str) -> str:
        return ip("-n", self.ns["cl"], "neigh", "show", address, "dev", "eth0").strip()

    def addresses(self, role: str) -> str:
        return ip("-n", self.ns[role], "-4", "addr", "show", "dev", "eth0")

    def admin(self, role: str, path: str = "/v1/status") -> Any:
        auth = f"Authorization: Bearer {ADMIN_TOKEN}"
        url = f"http://127.0.0.1:7100{path}"
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns[role], "curl", "-s", "-m", "1", "-H", auth, url],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout else None

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        for ns in reversed(self.created):
            ip("netns", "del", ns, check=False)
        for role in self.ADDRESSES:  # a veth left in the root namespace by a failed create
            if os.path.exists(f"/sys/class/net/v{role}{self.suffix}"):
                ip("link", "del", f"v{role}{self.suffix}", check=False)


def namespaces_for(kind: type[Namespaces], tmp: str, tools: tuple[str, ...] = ()) -> Any:
    """Build ``kind``'s namespaces (skip, or fail in CI, without root and the tools)."""
    missing = [t for t in ("ip", "curl", *tools) if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        why = f"needs root and {', '.join(('ip', 'curl', *tools))} to build network namespaces"
        if os.environ.get("CI"):
            pytest.fail(f"the ip-mode VIP tests are required in CI: they {why}")
        pytest.skip(f"the ip-mode VIP test {why}")
    spaces = kind(tmp)
    try:
        spaces.create()
        yield spaces
    finally:
        spaces.cleanup()
        left = ip("netns", "list")
        assert spaces.suffix not in left, left


@pytest.fixture
def namespaces(tmp_path):  # type: ignore[no-untyped-def]
    yield from namespaces_for(Namespaces, str(tmp_path))


def _ip_lb_config(tmp: str, role: str, priority: int, preempt: bool, **extra: Any) -> str:
    me, peer = ("10.77.0.1", "10.77.0.2") if role == "lb1" else ("10.77.0.2", "10.77.0.1")
    path = os.path.join(tmp, f"{role}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(
            {
                "lb": {
                    "id": role,
                    "secret": SECRET,
                    "state_dir": os.path.join(tmp, role),
                    "priority": priority,
                    "preempt": preempt,
                    "heartbeat": {"bind": f"{me}:7001", "peer": f"{peer}:7001", "interval": 0.1},
                    "vip": {
                        "address": "10.77.0.100",
                        "mode": "ip",
                        "interface": "eth0",
                        "prefix": 24,
                        "redis": 6379,
                        "memcached": None,
                        "http": None,
                    },
                    "admin": {
                        "listen": "tcp:7100:interface=127.0.0.1",
                        "token": ADMIN_TOKEN,
                        "peer": f"http://{peer}:7100",
                    },
                    "health": {"interval": 0.1, "timeout": 0.5, "rise": 2, "fall": 2},
                    "masters": [{"id": f"standin-{role}", "host": "127.0.0.1", "redis": 6390}],
                    **extra,
                }
            },
            f,
        )
    return path


def _probe_results(path: str) -> list[tuple[float, float, str]]:
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f if line.strip()]  # type: ignore[misc]


def test_ip_mode_moves_the_vip_between_namespaces_with_a_gratuitous_arp(
    namespaces, tmp_path, record_property
):  # type: ignore[no-untyped-def]
    """ip mode: kill -9 of the active LB; the client reaches the new holder in < 1 s via GARP."""
    ns = namespaces
    tmp = str(tmp_path)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    standin = os.path.join(tmp, "standin.py")
    probe = os.path.join(tmp, "probe.py")
    with open(standin, "w") as f:
        f.write(STANDIN)
    with open(probe, "w") as f:
        f.write(PROBE_CLIENT)
    lbs: dict[str, subprocess.Popen[bytes]] = {}

    def start_lb(role: str, priority: int) -> None:
        config = _ip_lb_config(tmp, role, priority, preempt=False)
        logfile = os.path.join(tmp, f"{role}.log")
        argv = [twistd, "--nodaemon", "--pidfile=", "--logfile", logfile, "kvha-lb"]
        lbs[role] = ns.spawn(role, [*argv, "--config", config], os.path.join(tmp, f"{role}.out"))

    def log(role: str) -> str:
        with open(os.path.join(tmp, f"{role}.log"), errors="replace") as f:
            return f.read()

    for role in ("lb1", "lb2"):
        ns.spawn(role, [sys.executable, standin, role, "6390"], os.path.join(tmp, f"{role}-m.out"))
    start_lb("lb1", 150)
    wait_until(lambda: (ns.admin("lb1") or {}).get("holds_vip"), 15, "lb1 to hold the VIP")
    start_lb("lb2", 100)
    wait_until(lambda: (ns.admin("lb2") or {}).get("state") == "BACKUP", 15, "lb2 to be BACKUP")
    lb1_mac, lb2_mac = ns.mac("lb1"), ns.mac("lb2")
    assert "10.77.0.100/24" in ns.addresses("lb1") and "10.77.0.100" not in ns.addresses("lb2")

    stop_file = os.path.join(tmp, "stop-probe")
    results = os.path.join(tmp, "probe.out")
    client = ns.spawn(
        "cl", [sys.executable, probe, "10.77.0.100", "6379", "20", stop_file], results
    )
    try:
        wait_until(
            lambda: sum(1 for r in _probe_results(results) if r[2] == "lb1") >= 10,
            10,
            "the client to reach lb1 through the VIP",
        )
        before = ns.neighbour("10.77.0.100")
        assert lb1_mac in before, before
        killed_at = time.monotonic()
        lbs["lb1"].send_signal(signal.SIGKILL)
        lbs["lb1"].wait(10)
        # kill -9 left the address on lb1's interface: lb1's kernel still answers ARP for it.
        assert "10.77.0.100/24" in ns.addresses("lb1")
        reached = wait_until(
            lambda: next(
                (r[1] for r in _probe_results(results) if r[0] > killed_at and r[2] == "lb2"), None
            ),
            5,
            "the client to reach lb2",
        )
        failover = round(reached - killed_at, 3)
        record(record_property, "ip_mode_failover_seconds", failover)
        assert failover < 1.0
        after = ns.neighbour("10.77.0.100")
        record(record_property, "ip_mode_neighbour", [before, after])
        assert lb2_mac in after, after  # the gratuitous ARP re-pointed the client
        assert "10.77.0.100/24" in ns.addresses("lb2")
        assert "gratuitous ARP" not in log("lb2")  # no "gratuitous ARP ... failed"
        mark = time.monotonic()
        wait_until(
            lambda: sum(1 for r in _probe_results(results) if r[0] > mark and r[2] == "lb2") >= 10,
            5,
            "steady service from lb2",
        )
    finally:
        with open(stop_file, "w"):
            pass
        client.wait(25)
    attempts = _probe_results(results)
    after_kill = [r for r in attempts if r[0] > killed_at]
    errors = [r for r in after_kill if r[2] not in ("lb1", "lb2")]
    record(record_property, "ip_mode_client_errors_during_failover", len(errors))
    # Once lb2 answered, every later attempt reached lb2.
    first_lb2 = next(i for i, r in enumerate(after_kill) if r[2] == "lb2")
    assert {r[2] for r in after_kill[first_lb2:]} == {"lb2"}

    # Control: a client that missed the announcement still points at lb1's MAC and fails;
    # one gratuitous ARP from lb2 (the load balancer's own function) fixes it at once.
    def probe_once(tag: str) -> set[str]:
        argv = [sys.executable, probe, "10.77.0.100", "6379", "0.3", stop_file + tag]
        out = subprocess.run(
            ["ip", "netns", "exec", ns.ns["cl"], *argv], capture_output=True, text=True, timeout=10
        )
        return {json.loads(line)[2] for line in out.stdout.splitlines()}

    time.sleep(max(0.0, reached + 0.6 - time.monotonic()))  # lb2's own announcements are over
    cl_neigh = ["neigh", "replace", "10.77.0.100", "lladdr", lb1_mac, "dev", "eth0"]
    ip("-n", ns.ns["cl"], *cl_neigh, "nud", "reachable")
    replies = probe_once("x")
    assert replies and "lb2" not in replies, replies  # refused by lb1's stale address
    garp = subprocess.run(
        ["ip", "netns", "exec", ns.ns["lb2"], sys.executable, "-c", SEND_GARP],
        capture_output=True,
        text=True,
        timeout=10,
        env={**os.environ, "PYTHONPATH": SOURCE_ROOT},
    )
    assert garp.returncode == 0, garp.stderr
    assert lb2_mac in ns.neighbour("10.77.0.100")
    assert probe_once("y") == {"lb2"}

    # lb1 comes back (no preemption here): it must not keep answering ARP for the VIP.
    start_lb("lb1", 150)
    wait_until(lambda: (ns.admin("lb1") or {}).get("state") == "BACKUP", 15, "lb1 as BACKUP")
    stale = "10.77.0.100" in ns.addresses("lb1")
    # A client that resolves the VIP afresh (broadcast ARP) must only ever find lb2.
    seen = []
    for i in range(6):
        ip("-n", ns.ns["cl"], "neigh", "flush", "dev", "eth0")
        seen.append(probe_once(f"flush{i}"))
    record(record_property, "ip_mode_fresh_clients_after_lb1_restart", [sorted(r) for r in seen])
    assert not stale, ns.addresses("lb1")
    assert all(r == {"lb2"} for r in seen), seen
    assert (ns.admin("lb2") or {}).get("holds_vip")


# e. kvha up ---------------------------------------------------------------------------------------


def _local_cluster(tmp: str) -> tuple[str, Any]:
    """A local.yaml under ``tmp`` whose every port (VIP and derived) is free right now."""
    from kvha.cli import _local
    from kvha.local import plan, taken_ports
    from tests.conftest import free_vip

    for attempt in range(20):
        vip = free_vip()
        base = random.randrange(20000, 30000, 100)  # below the ephemeral port range
        doc = {
            "local": {
                "secret": SECRET,
                "admin_token": ADMIN_TOKEN,
                "state_dir": os.path.join(tmp, f"var{attempt}"),
                "vip": vip,
                "redis_port": free_port_on(vip),
                "memcached_port": free_port_on(vip),
                "http_port": free_port_on(vip),
                "base_port": base,
            }
        }
        path = os.path.join(tmp, f"local{attempt}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(doc, f)
        config = _local(path)
        if not taken_ports(config, plan(config)):
            return path, config
    raise AssertionError("no free set of ports for a local cluster in 20 tries")


def free_port_on(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _kvha_up(path: str, output: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SOURCE_ROOT
    with open(output, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kvha", "up", path, "--timeout", "30"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=SOURCE_ROOT,
        )


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return not f.read().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


def test_kvha_up_serves_the_readme_examples_and_stops_cleanly_on_sigint(tmp_path, record_property):  # type: ignore[no-untyped-def]
    """kvha up from a clean state dir: healthy, README examples work, SIGINT leaves nothing."""
    from kvha.local import plan, read_pid, taken_ports

    path, config = _local_cluster(str(tmp_path))
    assert not os.path.exists(config.state_dir)
    output = str(tmp_path / "up.out")
    nodes = plan(config)
    started = time.monotonic()
    proc = _kvha_up(path, output)
    pids: dict[str, int] = {}

    def log() -> str:
        with open(output, errors="replace") as f:
            return f.read()

    try:
        wait_until(
            lambda: "the cluster is up" in log() or proc.poll() is not None,
            40,
            "kvha up to report the cluster up",
            step=0.1,
        )
        assert proc.poll() is None, log()
        record(record_property, "kvha_up_seconds", round(time.monotonic() - started, 2))
        for node in nodes:
            pid = read_pid(node.pid_path(config.state_dir))
            assert pid is not None, node.id
            pids[node.id] = pid
        vip = config.vip

        # The three README examples, against the VIP.
        redis_cli = shutil.which("redis-cli")
        if redis_cli is not None:
            out = subprocess.run(
                [redis_cli, "-h", vip, "-p", str(config.redis_port), "set", "hello", "world"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            assert out.stdout.strip() == "OK", out
        else:
            with socket.create_connection((vip, config.redis_port), timeout=5) as s:
                s.sendall(b"*3\r\n$3\r\nset\r\n$5\r\nhello\r\n$5\r\nworld\r\n")
                assert s.recv(16) == b"+OK\r\n"
        mc = Memcached(vip, config.memcached_port)
        try:
            assert (
                mc.command(b"get hello\r\n", b"END\r\n") == b"VALUE hello 0 5\r\nworld\r\nEND\r\n"
            )
        finally:
            mc.close()
        url = f"http://{vip}:{config.http_port}/v1/p/default/k/hello"
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            assert json.loads(response.read())["value"] == "world"

        # kvha status --json: every node up, exactly one load balancer holding the VIP.
        code, out = kvha("status", path, "--json")
        rows = json.loads(out)
        assert code == 0, out
        assert {r["id"] for r in rows} == {n.id for n in nodes}
        assert all(r["state"] in ("up", "ACTIVE", "BACKUP") for r in rows), rows
        assert all(r["pid"] == pids[r["id"]] for r in rows), rows
        lbs = [r for r in rows if r["role"] == "lb"]
        assert sorted(r["state"] for r in lbs) == ["ACTIVE", "BACKUP"]
        assert [r["holds_vip"] for r in lbs].count(True) == 1, lbs

        # Ctrl-C: every node stops, no pid is left, the pidfiles are gone.
        stop_at = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, log()
        wait_until(lambda: not any(_alive(p) for p in pids.values()), 5, "every node to exit")
        record(record_property, "kvha_up_sigint_seconds", round(time.monotonic() - stop_at, 2))
        left = [n.id for n in nodes if os.path.exists(n.pid_path(config.state_dir))]
        assert left == [], left
        # Right after a stop the same cluster can start again: no port counts as taken.
        assert taken_ports(config, nodes) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for node in nodes:  # anything kvha up started that outlived it
            pid = pids.get(node.id) or read_pid(node.pid_path(config.state_dir))
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_kvha_up_names_the_node_and_port_that_is_taken(tmp_path):  # type: ignore[no-untyped-def]
    """A port already in use stops kvha up at once with exit 1, naming the node and port."""
    path, config = _local_cluster(str(tmp_path))
    port = config.base_port + 41  # master1's redis port
    with socket.socket() as blocker:
        blocker.bind((config.host, port))
        blocker.listen(1)
        output = str(tmp_path / "up.out")
        proc = _kvha_up(path, output)
        try:
            assert proc.wait(20) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    with open(output) as f:
        text = f.read()
    assert f"master1 (redis) needs {config.host}:{port}, which is taken" in text, text
    assert "twistd" not in text and not os.path.exists(config.state_dir)
