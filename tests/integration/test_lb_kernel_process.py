"""``forward: kernel``: the load-balancer pair writes nftables DNAT; real processes, real kernel.

Three data nodes, two masters and two load balancers on a loopback VIP, as in
``test_lb_process.py``, but the ACTIVE load balancer forwards nothing itself:
its nftables table sends each new connection to a master.  These tests need
root, ``nft`` and ``conntrack`` (``.ci/run`` installs them); outside CI they
are skipped without.  Each test deletes the tables its load balancers leave
behind (a process killed with -9 leaves its table).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

from kvha.lb.nat import table_prefix
from tests.conftest import ADMIN_TOKEN, lb_status
from tests.integration.test_lb_process import (
    PROBE_CLIENT,
    STANDIN,
    Load,
    Memcached,
    Namespaces,
    _ip_lb_config,
    _probe_results,
    kvha,
    namespaces_for,
    read_back,
    record,
    start_cluster,
    wait_until,
)

pytestmark = pytest.mark.process

KERNEL = {"forward": "kernel", "scheduler": "rr"}


def nft_tables(vip: str) -> list[str]:
    out = subprocess.run(
        ["nft", "list", "tables", "ip"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    names = [line.split()[-1] for line in out.splitlines() if line.startswith("table ip ")]
    return sorted(n for n in names if n.startswith(table_prefix(vip)))


def nft_table(name: str) -> str:
    return subprocess.run(
        ["nft", "list", "table", "ip", name], capture_output=True, text=True, timeout=10, check=True
    ).stdout


def sockets_on_port(port: int) -> int:
    """Established TCP sockets whose local port is ``port`` (this host, every process)."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return len([line for line in out.splitlines() if line.strip()])


@pytest.fixture
def vips(nodes):  # type: ignore[no-untyped-def]
    """The VIPs a test used: their kvha tables are deleted after it, whatever happened.

    The test's processes are killed first: a load balancer still running
    would write its table again when it sees the masters die.
    """
    missing = [tool for tool in ("nft", "conntrack", "ss") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        why = f"needs root and nft, conntrack, ss (missing: {', '.join(missing) or 'root'})"
        if os.environ.get("CI"):
            pytest.fail(f"the kernel-forwarding tests are required in CI: it {why}")
        pytest.skip(f"kernel forwarding {why}")
    used: list[str] = []
    yield used
    nodes.cleanup()
    for vip in used:
        for name in nft_tables(vip):
            subprocess.run(["nft", "delete", "table", "ip", name], timeout=10, check=False)
        assert nft_tables(vip) == []


def _kernel_cluster(nodes: Any, vips: list[str], **extra: Any) -> tuple[Any, ...]:
    data, masters, lb1, lb2 = start_cluster(nodes, **KERNEL, **extra)
    vips.append(lb1.vip)
    # With slow health checks the pair counts a master up before it has
    # checked it: wait for every master to say it serves (its data nodes up).
    for master in masters:
        url = f"http://127.0.0.1:{master.ports['http']}/health"
        wait_until(lambda u=url: _http_ok(u), 15, f"{master.node_id} to serve")
    return data, masters, lb1, lb2


def _hand_over(load: Any, end_lb1: Any, lb2: Any, vip: str) -> None:
    """Under a steady ``load``, end lb1 (``kill`` or ``stop``): lb2 holds the VIP with its
    own table alone, and new connections succeed through it."""
    wait_until(lambda: load.successes_since(time.monotonic() - 0.5) > 50, 5, "a steady load")
    end_lb1()
    wait_until(lambda: lb_status(lb2)["holds_vip"], 3, "lb2 to hold the VIP")
    assert nft_tables(vip) == [table_prefix(vip) + "lb2"]
    mark = time.monotonic()
    wait_until(lambda: load.successes_since(mark, new_connections=True) > 100, 10, "load")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def test_kernel_forwarding_survives_kill_9_of_a_master_and_of_the_active_lb(
    nodes, vips, record_property
):  # type: ignore[no-untyped-def]
    """Clients never pass through the LB process; kill -9 of a master, then of lb1, under load.

    The health checks here are slow (every second, three failures to mark a
    master down): the killed master's redis port must still leave the table
    at once, because the load balancer's open connection to it is closed.
    """
    slow = {"interval": 1.0, "timeout": 0.5, "rise": 1, "fall": 3}
    _, masters, lb1, lb2 = _kernel_cluster(nodes, vips, health=slow)
    vip, port = lb1.vip, lb1.vip_ports["redis"]
    prefix = table_prefix(vip)
    assert nft_tables(vip) == [prefix + "lb1"]
    assert lb_status(lb1)["forward"] == "kernel"
    victim = masters[0]
    victim_port = victim.ports["redis"]
    with Load(vip, port, threads=3, ops_per_conn=10, prefix="k") as load:
        wait_until(lambda: load.successes_since(time.monotonic() - 0.5) > 50, 5, "a steady load")
        # The connections are the masters' own sockets: none has the VIP's port at this end.
        wait_until(lambda: sockets_on_port(victim_port) > 1, 5, "load on the victim")
        assert sockets_on_port(port) == 0
        assert f"127.0.0.1 . {victim_port}" in nft_table(prefix + "lb1")
        killed_at = time.monotonic()
        victim.kill()

        def victim_redis_down() -> bool:
            rows = {m["id"]: m for m in lb_status(lb1)["masters"]}
            return not rows[victim.node_id]["up"]["redis"]

        wait_until(victim_redis_down, 3, "the LB to mark the killed master's redis down")
        detected_at = time.monotonic()
        record(record_property, "kernel_master_down_seconds", round(detected_at - killed_at, 3))
        assert detected_at - killed_at < 0.5  # the health checks alone take 2-3 s here
        # The table no longer sends anything to it; the other master takes everything.
        table = nft_table(prefix + "lb1")
        assert f". {victim_port}" not in table and f":{victim_port}" not in table
        assert f"dnat to 127.0.0.1:{masters[1].ports['redis']}" in table
        mark = time.monotonic()
        wait_until(lambda: load.successes_since(mark, new_connections=True) > 200, 10, "load")
    # Operations in flight on the killed master's connections fail, and connections
    # that raced the table's change are refused; none fails after it.
    late = [e for e in load.errors if e[0] > detected_at + 0.1]
    assert late == [], late
    record(record_property, "kernel_master_kill_client_errors", len(load.errors))
    assert read_back(vip, port, load.acked) == []
    assert len(load.acked) > 300

    # kill -9 of the active load balancer: its table goes on forwarding until lb2,
    # ACTIVE, replaces it in one transaction.  No client notices.
    with Load(vip, port, threads=3, ops_per_conn=10, prefix="l") as load:
        _hand_over(load, lb1.kill, lb2, vip)
    assert load.errors == []
    assert read_back(vip, port, load.acked) == []
    # A clean stop deletes the table, and the VIP port is then refused, not hung.
    lb2.stop()
    assert nft_tables(vip) == []
    with pytest.raises(ConnectionRefusedError):
        Memcached(vip, lb2.vip_ports["memcached"])


def test_kernel_forwarding_hands_the_vip_over_cleanly_on_stop_and_preemption(
    nodes, vips, record_property
):  # type: ignore[no-untyped-def]
    """SIGTERM of the active LB under load, then its return (preempt): no client error.

    Deleting the last nat table drops the translation of every open
    connection, so the stopping node leaves its table and the peer, ACTIVE at
    once, replaces it with its own in one transaction (and the same again,
    the other way, when lb1 preempts).
    """
    _, _masters, lb1, lb2 = _kernel_cluster(nodes, vips)
    vip, port = lb1.vip, lb1.vip_ports["redis"]
    prefix = table_prefix(vip)
    with Load(vip, port, threads=3, ops_per_conn=10, prefix="h") as load:
        _hand_over(load, lb1.stop, lb2, vip)
        lb1.start(wait=True)  # priority 150 > 100, preempt: it takes the VIP back
        wait_until(lambda: lb_status(lb1)["holds_vip"], 5, "lb1 to hold the VIP again")
        wait_until(lambda: lb_status(lb2)["state"] == "BACKUP", 3, "lb2 to yield")
        wait_until(lambda: nft_tables(vip) == [prefix + "lb1"], 3, "only lb1's table")
        mark = time.monotonic()
        wait_until(lambda: load.successes_since(mark, new_connections=True) > 100, 10, "load")
    record(record_property, "kernel_handover_client_errors", len(load.errors))
    assert load.errors == []
    assert read_back(vip, port, load.acked) == []


def cut(conn: Memcached) -> bool:
    """Whether ``conn`` is dead: an exchange on it fails."""
    try:
        conn.roundtrip("probe", "alive")
    except OSError:
        return True
    return False


def test_kernel_drain_lets_open_connections_finish_then_cuts_them(nodes, vips, record_property):  # type: ignore[no-untyped-def]
    """Drain: new connections avoid the master at once; open ones work until drain_timeout."""
    _, masters, lb1, lb2 = _kernel_cluster(nodes, vips, drain_timeout=1.5)
    vip, mport = lb1.vip, lb1.vip_ports["memcached"]
    admin = ["--admin", lb1.admin, "--token", ADMIN_TOKEN]
    on: dict[int, Memcached] = {}  # master pid -> a connection that reached it
    try:
        for _ in range(10):
            conn = Memcached(vip, mport)
            pid = conn.pid()
            if pid in on:
                conn.close()
            else:
                on[pid] = conn
            if len(on) == 2:
                break
        assert sorted(on) == sorted(m.pid for m in masters), "round robin reached one master"
        kept, other = on[masters[0].pid], on[masters[1].pid]
        kept.roundtrip("kept", "before")
        # Taken before the command: the load balancer starts the drain's clock
        # when it gets the request, before the command-line process exits.
        drained_at = time.monotonic()
        code, out = kvha("master", "drain", masters[0].node_id, *admin)
        assert code == 0, out
        for i in range(10):
            fresh = Memcached(vip, mport)
            assert fresh.pid() == masters[1].pid
            fresh.roundtrip(f"fresh-{i}", "after")
            fresh.close()
        kept.roundtrip("kept", "draining")  # the open connection still works

        def kept_counted() -> bool:  # from conntrack, counted in a thread
            rows = {m["id"]: m for m in lb_status(lb1)["masters"]}
            return bool(rows[masters[0].node_id]["connections"]["memcached"] == 1)

        wait_until(kept_counted, 1.0, "the kept connection in the status")
        time.sleep(max(0.0, drained_at + 1.4 - time.monotonic()))
        kept.roundtrip("kept", "still draining")
        # After drain_timeout (checked every 0.5 s) its conntrack entry is deleted:
        # the next exchange is reset.
        wait_until(lambda: cut(kept), 2.0, "the drained connection to be cut")
        assert time.monotonic() - drained_at >= 1.5
        other.roundtrip("other", "unaffected")
        # Removing a master cuts its connections at once.
        code, out = kvha("master", "remove", masters[1].node_id, *admin)
        assert code == 0, out
        removed_at = time.monotonic()
        wait_until(lambda: cut(other), 1.0, "the removed master's connection to be cut")
        record(
            record_property, "kernel_removal_cut_seconds", round(time.monotonic() - removed_at, 3)
        )
        assert nft_tables(vip) == [table_prefix(vip) + "lb1"]
        assert "dnat to" not in nft_table(table_prefix(vip) + "lb1")  # nobody left to send to
    finally:
        for conn in on.values():
            conn.close()
    assert lb_status(lb2)["state"] == "BACKUP"


# ip mode between network namespaces, with the master on another host ---------------------------


class WithMasterHost(Namespaces):
    """lb1, lb2 and a client as in the ip-mode test, plus a master's host ``m``."""

    ADDRESSES = {**Namespaces.ADDRESSES, "m": "10.77.0.5"}

    def tables(self, role: str) -> list[str]:
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns[role], "nft", "list", "tables", "ip"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return [line.split()[-1] for line in out.splitlines() if line.startswith("table ip ")]


@pytest.fixture
def master_host_namespaces(tmp_path):  # type: ignore[no-untyped-def]
    yield from namespaces_for(WithMasterHost, str(tmp_path), ("nft",))


def test_ip_mode_kernel_forwarding_reaches_a_master_on_another_host_across_failover(
    master_host_namespaces, tmp_path, record_property
):  # type: ignore[no-untyped-def]
    """VIP on lb1's interface, DNAT + masquerade to 10.77.0.5; kill -9 lb1; lb2 takes it."""
    ns = master_host_namespaces
    tmp = str(tmp_path)
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    standin, probe = os.path.join(tmp, "standin.py"), os.path.join(tmp, "probe.py")
    with open(standin, "w") as f:
        f.write(STANDIN)
    with open(probe, "w") as f:
        f.write(PROBE_CLIENT)
    # The master sees the address the connection came from: the load balancer's (masquerade).
    argv = [sys.executable, standin, "m", "6390", "0.0.0.0", "{name} via {peer}"]
    ns.spawn("m", argv, os.path.join(tmp, "m.out"))
    lbs: dict[str, subprocess.Popen[bytes]] = {}
    master = [{"id": "m", "host": "10.77.0.5", "redis": 6390}]

    def start_lb(role: str, priority: int) -> None:
        config = _ip_lb_config(tmp, role, priority, False, masters=master, **KERNEL)
        argv = [twistd, "--nodaemon", "--pidfile=", "--logfile", os.path.join(tmp, f"{role}.log")]
        out = os.path.join(tmp, f"{role}.out")
        lbs[role] = ns.spawn(role, [*argv, "kvha-lb", "--config", config], out)

    start_lb("lb1", 150)
    wait_until(lambda: (ns.admin("lb1") or {}).get("holds_vip"), 15, "lb1 to hold the VIP")
    start_lb("lb2", 100)
    wait_until(lambda: (ns.admin("lb2") or {}).get("state") == "BACKUP", 15, "lb2 to be BACKUP")
    assert ns.tables("lb1") == ["kvha_10_77_0_100_lb1"] and ns.tables("lb2") == []
    stop_file, results = os.path.join(tmp, "stop-probe"), os.path.join(tmp, "probe.out")
    client = ns.spawn(
        "cl", [sys.executable, probe, "10.77.0.100", "6379", "20", stop_file], results
    )
    try:
        # The client reaches the master on its host, and the master sees lb1 (masquerade).
        wait_until(
            lambda: sum(1 for r in _probe_results(results) if r[2] == "m via 10.77.0.1") >= 10,
            10,
            "the client to reach m through lb1",
        )
        killed_at = time.monotonic()
        lbs["lb1"].send_signal(signal.SIGKILL)
        lbs["lb1"].wait(10)
        reached = wait_until(
            lambda: next(
                (
                    r[1]
                    for r in _probe_results(results)
                    if r[0] > killed_at and r[2] == "m via 10.77.0.2"
                ),
                None,
            ),
            5,
            "the client to reach m through lb2",
        )
        failover = round(reached - killed_at, 3)
        record(record_property, "ip_mode_kernel_failover_seconds", failover)
        assert failover < 1.0
        assert ns.tables("lb2") == ["kvha_10_77_0_100_lb2"]
        mark = time.monotonic()
        wait_until(
            lambda: sum(1 for r in _probe_results(results) if r[0] > mark) >= 10, 5, "more probes"
        )
    finally:
        with open(stop_file, "w"):
            pass
        client.wait(25)
    after_kill = [r for r in _probe_results(results) if r[0] > killed_at]
    first_lb2 = next(i for i, r in enumerate(after_kill) if r[2] == "m via 10.77.0.2")
    assert {r[2] for r in after_kill[first_lb2:]} == {"m via 10.77.0.2"}
    record(
        record_property,
        "ip_mode_kernel_errors_during_failover",
        len([r for r in after_kill if not r[2].startswith("m via")]),
    )
    # lb1 comes back as BACKUP: it drops the table and the address its kill -9 left.
    start_lb("lb1", 150)
    wait_until(lambda: (ns.admin("lb1") or {}).get("state") == "BACKUP", 15, "lb1 as BACKUP")
    assert ns.tables("lb1") == []
    assert "10.77.0.100" not in ns.addresses("lb1")
