"""Shared fixtures: config text builders and real twistd node processes."""

from __future__ import annotations

import json
import os
import random
import socket
import textwrap
import time
import urllib.request
from collections.abc import Sequence
from typing import Any, Optional

import pytest
import yaml

from kvha.procs import NodeProcess, free_port

SECRET = "test-cluster-secret-0123456789"


def data_config(node_id: str, port: int, state_dir: str, **storage: object) -> str:
    lines = [f"    {k}: {v}" for k, v in storage.items()]
    storage_block = ("  storage:\n" + "\n".join(lines)) if lines else ""
    return (
        textwrap.dedent(
            f"""\
        data:
          id: {node_id}
          listen: "tcp:{port}:interface=127.0.0.1"
          state_dir: "{state_dir}"
          secret: "{SECRET}"
        """
        )
        + storage_block
        + "\n"
    )


def master_config(
    node_id: str,
    port: int,
    data_nodes: Sequence[NodeProcess],
    replicas: int = 1,
    read_weights: Optional[Sequence[float]] = None,
    **extra: Any,
) -> str:
    """A ``master:`` document in front of ``data_nodes`` (ids from their config files).

    ``extra`` adds or overrides keys of the ``master:`` section; an ``extra["cluster"]``
    mapping is merged into ``cluster:`` (e.g. ``partitions``, ``vnodes``).
    """
    refs = []
    for i, node in enumerate(data_nodes):
        ref: dict[str, Any] = {"id": node.node_id, "address": f"tcp:127.0.0.1:{node.port}"}
        if read_weights is not None:
            ref["read_weight"] = read_weights[i]
        refs.append(ref)
    cluster: dict[str, Any] = {"replicas": replicas, "nodes": refs}
    cluster.update(extra.pop("cluster", {}))
    section: dict[str, Any] = {
        "id": node_id,
        "secret": SECRET,
        "memcached": {"listen": f"tcp:{port}:interface=127.0.0.1"},
        "cluster": cluster,
    }
    section.update(extra)
    return yaml.safe_dump({"master": section}, sort_keys=False)


def memcache_command(port: int, command: bytes, timeout: float = 2.0) -> bytes:
    """Send one memcached text command and read its reply up to ``END``/one line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(command)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
            if command.startswith(b"stats") or command.startswith(b"get"):
                if data.endswith(b"END\r\n") or data.startswith((b"ERROR", b"SERVER_ERROR")):
                    return data
            elif data.endswith(b"\r\n"):
                return data


def memcache_stats(port: int) -> dict[str, str]:
    """A master's ``stats`` as a dict."""
    reply = memcache_command(port, b"stats\r\n")
    out = {}
    for line in reply.split(b"\r\n"):
        parts = line.split(b" ", 2)
        if len(parts) == 3 and parts[0] == b"STAT":
            out[parts[1].decode()] = parts[2].decode()
    return out


class NodeFactory:
    """Starts data nodes and masters as real twistd processes and kills them all at the end."""

    def __init__(self, tmp_path: str) -> None:
        self.tmp_path = tmp_path
        self.nodes: list[NodeProcess] = []

    def data(self, node_id: str, **storage: object) -> NodeProcess:
        port = free_port()
        state_dir = os.path.join(self.tmp_path, node_id)
        os.makedirs(state_dir, exist_ok=True)
        path = os.path.join(self.tmp_path, f"{node_id}.yaml")
        with open(path, "w") as f:
            f.write(data_config(node_id, port, state_dir, **storage))
        node = NodeProcess("data", path, os.path.join(self.tmp_path, f"{node_id}.log"), port=port)
        node.node_id = node_id  # type: ignore[attr-defined]
        self.nodes.append(node)
        return node

    def master(
        self,
        node_id: str,
        data_nodes: Sequence[NodeProcess],
        replicas: int = 1,
        read_weights: Optional[Sequence[float]] = None,
        **extra: Any,
    ) -> NodeProcess:
        """A master (not started) whose ``.port`` is its memcached port."""
        port = free_port()
        path = os.path.join(self.tmp_path, f"{node_id}.yaml")
        with open(path, "w") as f:
            f.write(master_config(node_id, port, data_nodes, replicas, read_weights, **extra))
        node = NodeProcess("master", path, os.path.join(self.tmp_path, f"{node_id}.log"), port=port)
        node.node_id = node_id  # type: ignore[attr-defined]
        self.nodes.append(node)
        return node

    def cluster(
        self,
        n_data: int = 3,
        replicas: int = 1,
        read_weights: Optional[Sequence[float]] = None,
        timeout: float = 15.0,
        **extra: Any,
    ) -> tuple[NodeProcess, list[NodeProcess]]:
        """Start ``n_data`` data nodes and a master; return once the master sees all up."""
        data = [self.data(f"data{i + 1}") for i in range(n_data)]
        master = self.master("master1", data, replicas, read_weights, **extra)
        assert master.port is not None
        # All at once: the master's links retry until the data nodes listen.
        for node in [*data, master]:
            node.start(wait=False)
        deadline = time.monotonic() + timeout
        for node in [*data, master]:
            node._wait_listening(max(0.1, deadline - time.monotonic()))
        stats: dict[str, str] = {}
        while True:
            try:
                if memcache_command(master.port, b"version\r\n").startswith(b"VERSION "):
                    stats = memcache_stats(master.port)
                    if stats.get("data_nodes_up") == str(n_data):
                        return master, data
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"master did not see {n_data} data nodes up within {timeout}s "
                    f"(data_nodes_up={stats.get('data_nodes_up')})\n{master.log()}"
                )
            time.sleep(0.05)

    def full_master(
        self,
        node_id: str,
        data_nodes: Sequence[NodeProcess],
        handoff: bool = False,
        **extra: Any,
    ) -> NodeProcess:
        """A master (not started) on memcached, redis and http ports; ``.ports`` has all 3.

        ``handoff``: it also takes handed-over connections on a Unix socket,
        which the load balancers of :meth:`lb` are told of (``.handoff``).
        """
        redis_port, http_port = free_port(), free_port()
        extra.setdefault("redis", {"listen": f"tcp:{redis_port}:interface=127.0.0.1"})
        extra.setdefault("http", {"listen": f"tcp:{http_port}:interface=127.0.0.1"})
        path = os.path.join(self.tmp_path, f"{node_id}.handoff") if handoff else None
        if path is not None:
            extra["handoff"] = path
        node = self.master(node_id, data_nodes, **extra)
        node.handoff = path  # type: ignore[attr-defined]
        node.ports = {  # type: ignore[attr-defined]
            "memcached": node.port,
            "redis": redis_port,
            "http": http_port,
        }
        return node

    def lb(
        self,
        node_id: str,
        masters: Sequence[NodeProcess],
        *,
        vip: str,
        vip_ports: dict[str, int],
        heartbeat: tuple[int, int],
        admin: tuple[int, int],
        priority: int = 100,
        **extra: Any,
    ) -> NodeProcess:
        """A load balancer (not started) in front of ``masters`` (from ``full_master``).

        ``heartbeat`` and ``admin`` are (own port, peer port) on 127.0.0.1.  The node's
        ``.port`` is its admin port; it also has ``.admin`` (URL), ``.vip``, ``.vip_ports``.
        """
        path = os.path.join(self.tmp_path, f"{node_id}.yaml")
        master_list = [
            {"id": m.node_id, "host": "127.0.0.1", **m.ports}  # type: ignore[attr-defined]
            for m in masters
        ]
        for row, m in zip(master_list, masters):
            if getattr(m, "handoff", None):
                row["handoff"] = m.handoff  # type: ignore[attr-defined]
        with open(path, "w") as f:
            f.write(
                lb_config(
                    node_id,
                    vip=vip,
                    vip_ports=vip_ports,
                    heartbeat=(f"127.0.0.1:{heartbeat[0]}", f"127.0.0.1:{heartbeat[1]}"),
                    admin=(f"tcp:{admin[0]}:interface=127.0.0.1", f"http://127.0.0.1:{admin[1]}"),
                    state_dir=os.path.join(self.tmp_path, node_id),
                    masters=master_list,
                    priority=priority,
                    **extra,
                )
            )
        node = NodeProcess("lb", path, os.path.join(self.tmp_path, f"{node_id}.log"), port=admin[0])
        node.node_id = node_id  # type: ignore[attr-defined]
        node.admin = f"http://127.0.0.1:{admin[0]}"  # type: ignore[attr-defined]
        node.vip = vip  # type: ignore[attr-defined]
        node.vip_ports = vip_ports  # type: ignore[attr-defined]
        self.nodes.append(node)
        return node

    def lb_pair(
        self,
        masters: Sequence[NodeProcess],
        vip: Optional[str] = None,
        priorities: tuple[int, int] = (150, 100),
        **extra: Any,
    ) -> tuple[NodeProcess, NodeProcess]:
        """lb1 and lb2 (not started) sharing ``vip`` (default: a free 127.0.0.x) in bind mode."""
        vip = vip or free_vip()
        vip_ports = {p: free_port(vip) for p in ("redis", "memcached", "http")}
        hb = (free_port(), free_port())
        adm = (free_port(), free_port())
        first = self.lb(
            "lb1",
            masters,
            vip=vip,
            vip_ports=vip_ports,
            heartbeat=hb,
            admin=adm,
            priority=priorities[0],
            **extra,
        )
        second = self.lb(
            "lb2",
            masters,
            vip=vip,
            vip_ports=vip_ports,
            heartbeat=hb[::-1],
            admin=adm[::-1],
            priority=priorities[1],
            **extra,
        )
        return first, second

    def cleanup(self) -> None:
        """Kill every process started here, by pid, even if one of them fails to die."""
        errors = []
        for node in self.nodes:
            try:
                node.kill()
                node.stop()
            except Exception as e:  # keep going: the others must not outlive the test
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def nodes(tmp_path):  # type: ignore[no-untyped-def]
    factory = NodeFactory(str(tmp_path))
    yield factory
    factory.cleanup()


# Load balancers -------------------------------------------------------------------------------

ADMIN_TOKEN = "test-admin-token-0123456789"


def lb_config(
    node_id: str,
    *,
    vip: str,
    vip_ports: dict[str, int],
    heartbeat: tuple[str, str],
    admin: tuple[str, str],
    state_dir: str,
    masters: Sequence[dict[str, Any]],
    priority: int = 100,
    preempt: bool = True,
    mode: str = "bind",
    interface: str = "",
    **extra: Any,
) -> str:
    """An ``lb:`` document; ``heartbeat`` and ``admin`` are (own listen, peer) pairs.

    ``masters`` are dicts with id, host and a port per protocol; ``extra`` adds or
    overrides keys of the ``lb:`` section (``health``, ``drain_timeout``, ...).
    """
    section: dict[str, Any] = {
        "id": node_id,
        "secret": SECRET,
        "state_dir": state_dir,
        "priority": priority,
        "preempt": preempt,
        "heartbeat": {"bind": heartbeat[0], "peer": heartbeat[1], "interval": 0.1},
        "vip": {"address": vip, "mode": mode, **vip_ports},
        "admin": {"listen": admin[0], "token": ADMIN_TOKEN, "peer": admin[1]},
        "health": {"interval": 0.1, "timeout": 0.5, "rise": 2, "fall": 2},
        "masters": list(masters),
    }
    if mode == "ip":
        section["vip"]["interface"] = interface
    section.update(extra)
    return yaml.safe_dump({"lb": section}, sort_keys=False)


def free_vip() -> str:
    """A loopback address 127.0.0.101..249 for a test's VIP (any 127/8 address works)."""
    return f"127.0.0.{random.randint(101, 249)}"


def lb_status(node: NodeProcess, path: str = "/v1/status", timeout: float = 1.0) -> Any:
    """GET an admin resource of a load balancer from ``lb_pair`` (JSON)."""
    request = urllib.request.Request(
        node.admin + path,  # type: ignore[attr-defined]
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())
