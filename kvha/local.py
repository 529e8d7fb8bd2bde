"""A whole cluster on one machine: ``kvha up`` and ``kvha status``.

``etc/local.yaml`` describes the cluster in a few lines; every node's own
configuration is derived from it and written to ``<state_dir>/<id>/config.yaml``
so that it can be read, checked and reused.  ``kvha up`` starts each node as
a ``twistd`` child (pid in ``<state_dir>/<id>/twistd.pid``), prefixes each
line a node logs with its id, waits until every node is healthy, prints the
endpoints, and stops them all on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Optional

from twisted.internet.protocol import ProcessProtocol

from kvha import wire
from kvha.config import LocalConfig

#: The directory holding the kvha package (and, beside it, twisted/plugins/).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PORT_LAYOUT = """\
Ports derived from base_port B: data node i on B+i; master j on B+20+j (memcached),
B+40+j (redis), B+60+j (http); load balancer k heartbeats on B+80+k, admin on B+90+k.
"""


class Node:
    """One node of the local cluster: its role, id, ports and derived config."""

    def __init__(self, role: str, node_id: str, host: str, port: int, text: str) -> None:
        self.role = role
        self.id = node_id
        self.host = host
        self.port = port  # the port that shows it is alive
        self.text = text
        self.extra_ports: list[tuple[str, str, int]] = []  # (what, host, port)

    def directory(self, state_dir: str) -> str:
        return os.path.join(state_dir, self.id)

    def config_path(self, state_dir: str) -> str:
        return os.path.join(self.directory(state_dir), "config.yaml")

    def pid_path(self, state_dir: str) -> str:
        return os.path.join(self.directory(state_dir), "twistd.pid")


def handoff_path(config: LocalConfig, master_id: str) -> str:
    """Where master ``master_id`` of the local cluster takes handed-over connections."""
    return os.path.join(os.path.abspath(config.state_dir), master_id, "handoff.sock")


def plan(config: LocalConfig) -> list[Node]:
    """Every node of the cluster, data nodes first, with its derived configuration."""
    b = config.base_port
    host = config.host
    secret = json.dumps(config.secret)
    state = config.state_dir
    nodes: list[Node] = []
    for i, d in enumerate(config.data, 1):
        port = b + i
        text = (
            f"data:\n  id: {d.id}\n  listen: 'tcp:{port}:interface={host}'\n"
            f"  state_dir: {json.dumps(os.path.join(state, d.id))}\n  secret: {secret}\n"
            f"  storage: {{engine: {d.engine}, fsync: {d.fsync}}}\n"
        )
        nodes.append(Node("data", d.id, host, port, text))
    data_list = "".join(
        f"      - {{id: {d.id}, address: 'tcp:{host}:{b + i}', weight: {d.weight}, "
        f"read_weight: {d.read_weight}}}\n"
        for i, d in enumerate(config.data, 1)
    )
    origins = json.dumps(list(config.cors_origins))
    masters = []
    for j in range(1, config.masters + 1):
        mid = f"master{j}"
        mc, rd, ht = b + 20 + j, b + 40 + j, b + 60 + j
        peers = json.dumps(
            [f"http://{host}:{b + 60 + k}" for k in range(1, config.masters + 1) if k != j]
        )
        handoff = ""
        if config.forward == "handoff":
            handoff = f"  handoff: {json.dumps(handoff_path(config, mid))}\n"
        text = (
            f"master:\n  id: {mid}\n  secret: {secret}\n{handoff}"
            f"  state_dir: {json.dumps(os.path.join(state, mid))}\n"
            f"  admin_token: {json.dumps(config.admin_token)}\n  peers: {peers}\n"
            f"  cluster:\n    replicas: {config.replicas}\n    nodes:\n{data_list}"
            f"  memcached: {{listen: 'tcp:{mc}:interface={host}'}}\n"
            f"  redis: {{listen: 'tcp:{rd}:interface={host}'}}\n"
            f"  http: {{listen: 'tcp:{ht}:interface={host}', cors_origins: {origins}}}\n"
        )
        node = Node("master", mid, host, mc, text)
        node.extra_ports = [("redis", host, rd), ("http", host, ht)]
        nodes.append(node)
        masters.append((mid, mc, rd, ht))
    master_list = "".join(
        f"    - {{id: {mid}, host: {host}, memcached: {mc}, redis: {rd}, http: {ht}"
        + (
            f", handoff: {json.dumps(handoff_path(config, mid))}"
            if config.forward == "handoff"
            else ""
        )
        + "}\n"
        for mid, mc, rd, ht in masters
    )
    for k in (1, 2):
        other = 3 - k
        lid = f"lb{k}"
        text = (
            f"lb:\n  id: {lid}\n  secret: {secret}\n"
            f"  state_dir: {json.dumps(os.path.join(state, lid))}\n"
            f"  priority: {150 if k == 1 else 100}\n  preempt: true\n"
            + ("  forward: kernel\n  scheduler: rr\n" if config.forward == "kernel" else "")
            + ("  forward: handoff\n" if config.forward == "handoff" else "")
            + f"  heartbeat: {{bind: '{host}:{b + 80 + k}', peer: '{host}:{b + 80 + other}'}}\n"
            f"  vip: {{address: {config.vip}, mode: bind, redis: {config.redis_port}, "
            f"memcached: {config.memcached_port}, http: {config.http_port}}}\n"
            f"  admin: {{listen: 'tcp:{b + 90 + k}:interface={host}', "
            f"token: {json.dumps(config.admin_token)}, peer: 'http://{host}:{b + 90 + other}'}}\n"
            f"  masters:\n{master_list}"
        )
        node = Node("lb", lid, host, b + 90 + k, text)
        node.extra_ports = [("heartbeat (udp)", host, b + 80 + k)]
        nodes.append(node)
    return nodes


def vip_ports(config: LocalConfig) -> list[tuple[str, int]]:
    return [
        ("redis", config.redis_port),
        ("memcached", config.memcached_port),
        ("http", config.http_port),
    ]


def taken_ports(config: LocalConfig, nodes: Sequence[Node]) -> list[str]:
    """A message for every port the cluster needs that something else holds."""
    problems = []
    wanted: list[tuple[str, str, int, socket.SocketKind]] = []
    for node in nodes:
        wanted.append((node.id, node.host, node.port, socket.SOCK_STREAM))
        for what, host, port in node.extra_ports:
            kind = socket.SOCK_DGRAM if "udp" in what else socket.SOCK_STREAM
            wanted.append((f"{node.id} ({what})", host, port, kind))
    for what, port in vip_ports(config):
        wanted.append((f"the VIP ({what})", config.vip, port, socket.SOCK_STREAM))
    for owner, host, port, kind in wanted:
        s = socket.socket(socket.AF_INET, kind)
        if kind == socket.SOCK_STREAM:
            # As listenTCP does: connections of a cluster just stopped linger in
            # TIME_WAIT on these ports, which must not count as taken.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            problems.append(f"{owner} needs {host}:{port}, which is taken ({e.strerror})")
        finally:
            s.close()
    return problems


def write_configs(config: LocalConfig, nodes: Sequence[Node]) -> None:
    for node in nodes:
        os.makedirs(node.directory(config.state_dir), exist_ok=True)
        with open(node.config_path(config.state_dir), "w") as f:
            f.write("# Derived from the local cluster file by `kvha up`; edits are overwritten.\n")
            f.write(node.text)


def read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return None
    except OSError:
        return None
    return pid


# Probes used by `kvha up` and `kvha status` (blocking; loopback only) -----------


def memcached_stats(host: str, port: int, timeout: float = 1.0) -> dict[str, str]:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    out = {}
    for line in data.decode(errors="replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            out[parts[1]] = parts[2]
    return out


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def vip_answers(config: LocalConfig, timeout: float = 1.0) -> bool:
    """The VIP answers RESP PING, memcached version and HTTP /health (200)."""
    vip = config.vip
    try:
        if not redis_ping(vip, config.redis_port, timeout):
            return False
        with socket.create_connection((vip, config.memcached_port), timeout=timeout) as s:
            s.sendall(b"version\r\n")
            if not s.recv(64).startswith(b"VERSION "):
                return False
        url = f"http://{vip}:{config.http_port}/health"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except Exception:  # refused, reset, closed without an answer, HTTP error
        return False


def admin_get(host: str, port: int, token: str, path: str, timeout: float = 1.0) -> Any:
    request = urllib.request.Request(
        f"http://{host}:{port}{path}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def admin_call(url: str, token: str, method: str, path: str, body: Optional[dict] = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except Exception:
            message = str(e)
        raise RuntimeError(f"{e.code}: {message}") from None


def data_stats(host: str, port: int, secret: bytes, timeout: float = 1.0) -> dict[str, str]:
    """A data node's stats over the internal protocol (handshake included)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        reader = wire.FrameReader()

        def next_message() -> wire.Message:
            while True:
                frames = reader.feed(s.recv(65536) or b"")
                if frames:
                    opcode, _rid, body = frames[0]
                    return wire.decode(opcode, body)

        challenge = next_message()
        assert isinstance(challenge, wire.Challenge)
        proof = wire.proof(secret, wire.CLIENT_LABEL, challenge.nonce)
        s.sendall(wire.Hello(wire.PROTOCOL_VERSION, "kvha-status", proof).frame(0))
        welcome = next_message()
        if not isinstance(welcome, wire.Welcome):
            raise RuntimeError(getattr(welcome, "message", "handshake refused"))
        s.sendall(wire.Stats().frame(1))
        reply = next_message()
        pairs = reply.pairs  # type: ignore[attr-defined]
        return {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs) - 1, 2)}


def node_status(config: LocalConfig, node: Node) -> dict[str, Any]:
    pid = read_pid(node.pid_path(config.state_dir))
    row: dict[str, Any] = {
        "role": node.role,
        "id": node.id,
        "address": f"{node.host}:{node.port}",
        "pid": pid,
        "state": "stopped" if pid is None else "unreachable",
    }
    try:
        if node.role == "data":
            stats = data_stats(node.host, node.port, config.secret.encode())
            row["state"] = stats.get("state", "?")
            row["records"] = int(stats.get("records", 0)) - int(stats.get("tombstones", 0))
            row["engine"] = stats.get("engine")
            row["epoch"] = int(stats.get("map_epoch", -1))
            if row["state"] == "merging":
                row["merge"] = {
                    "by": stats.get("merge_holder") or None,
                    "keys": int(stats.get("merge_done_keys", 0)),
                    "bytes": int(stats.get("merge_done_bytes", 0)),
                    "total_keys": int(stats.get("merge_total_keys", 0)),
                }
        elif node.role == "master":
            stats = memcached_stats(node.host, node.port)
            up, total = stats.get("data_nodes_up", "?"), stats.get("data_nodes", "?")
            row["state"] = "up" if up == total else f"degraded ({up}/{total} data nodes up)"
            if stats.get("loading") == "1":
                row["state"] = f"loading ({up}/{total} data nodes up)"
            row["data_nodes_up"] = f"{up}/{total}"
            http = node.extra_ports[1]
            cluster = admin_get(http[1], http[2], config.admin_token, "/v1/admin/status")
            row["epoch"] = cluster["epoch"]
            row["pending"] = cluster["pending"]
            row["progress"] = cluster["progress"]
        else:
            status = admin_get(node.host, node.port, config.admin_token, "/v1/status")
            row["state"] = status["state"]
            row["holds_vip"] = status["holds_vip"]
            row["vip"] = status["vip"]
            row["epoch"] = status["epoch"]
    except (OSError, RuntimeError, ValueError, AssertionError, KeyError):
        pass
    return row


def progress_bar(merge: dict[str, Any], width: int = 20) -> str:
    """``[#######.............]  35%  7000/20000 keys  1.2 MB`` for a merging node."""
    total = merge["total_keys"]
    done = merge["keys"]
    if not merge["by"]:
        return "[waiting for a master to start the merge]"
    share = min(1.0, done / total) if total else 0.0
    filled = int(share * width)
    mb = merge["bytes"] / 1e6
    return (
        f"[{'#' * filled}{'.' * (width - filled)}] {share * 100:3.0f}%  "
        f"{done}/{total or '?'} keys  {mb:.1f} MB  (by {merge['by']})"
    )


def status_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'ROLE':<7} {'ID':<9} {'ADDRESS':<17} {'PID':>7}  STATE"]
    for r in rows:
        extra = ""
        if r["role"] == "lb" and r.get("holds_vip"):
            extra = f"  holds VIP {r['vip']}"
        elif r["role"] == "master" and "epoch" in r:
            extra = f"  map epoch {r['epoch']}"
            if r.get("pending"):
                p, prog = r["pending"], r.get("progress") or {}
                extra += (
                    f", {p['kind']} of {p['node']} by {p['driver']}: "
                    f"{prog.get('keys', 0)} records streamed"
                )
        elif r["role"] == "data" and "merge" in r:
            extra = "  " + progress_bar(r["merge"])
        elif r["role"] == "data" and "records" in r:
            extra = f"  {r['engine']}, {r['records']} keys"
            if r.get("epoch", -1) >= 0:
                extra += f", map epoch {r['epoch']}"
        pid = r["pid"] if r["pid"] is not None else "-"
        lines.append(
            f"{r['role']:<7} {r['id']:<9} {r['address']:<17} {pid:>7}  {r['state']}{extra}"
        )
    return "\n".join(lines)


# kvha up --------------------------------------------------------------------------


def up(config: LocalConfig, source: str, timeout: float = 60.0) -> int:
    """Start the cluster, wait until healthy, serve until Ctrl-C or SIGTERM."""
    from twisted.internet import reactor, task, threads

    nodes = plan(config)
    problems = taken_ports(config, nodes)
    if problems:
        print("kvha up: cannot start the local cluster:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    os.makedirs(config.state_dir, exist_ok=True)
    write_configs(config, nodes)
    exit_code = [0]
    started = [False]
    stopping = [False]
    procs: dict[str, Any] = {}

    def spawn(node: Node) -> None:
        pidfile = node.pid_path(config.state_dir)
        if os.path.exists(pidfile) and read_pid(pidfile) is None:
            os.unlink(pidfile)  # left by a node that died without cleaning up
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        argv = [
            twistd,
            "--nodaemon",
            "--reactor=kvha",
            "--pidfile",
            pidfile,
            "--logfile",
            "-",
            f"kvha-{node.role}",
            "--config",
            node.config_path(config.state_dir),
        ]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        # The twistd plugin lives beside the kvha package (site-packages, or the
        # source tree of an editable install): make sure twistd looks there.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        procs[node.id] = reactor.spawnProcess(  # type: ignore[attr-defined]
            Prefixed(node.id, exited), argv[0], argv, env=env, childFDs={0: "w", 1: "r", 2: "r"}
        )

    def exited(node_id: str, code: Any) -> None:
        if not started[0] and not stopping[0]:
            print(
                f"kvha up: {node_id} exited ({code}) before the cluster was up; stopping",
                file=sys.stderr,
                flush=True,
            )
            exit_code[0] = 1
            stopping[0] = True
            reactor.callLater(0, reactor.stop)  # type: ignore[attr-defined]

    def healthy() -> None:
        deadline = time.monotonic() + timeout
        pending = {n.id: n for n in nodes}
        while pending:
            if stopping[0]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("not healthy in time: " + ", ".join(sorted(pending)))
            for node_id, node in list(pending.items()):
                if node_healthy(config, node):
                    del pending[node_id]
            time.sleep(0.2)
        # Through the VIP on every port: a load balancer counts as healthy before
        # its first health checks, and a master's /health is 503 while data nodes
        # merge, so its http may still be marked down for a moment here.
        while not vip_answers(config):
            if time.monotonic() > deadline:
                raise TimeoutError("the VIP does not answer on every client port")
            time.sleep(0.1)

    def ready(_: Any) -> None:
        started[0] = True
        vip = config.vip
        print(
            f"\nkvha: the cluster is up ({len(nodes)} nodes; state in {config.state_dir}).\n"
            f"  Redis      {vip}:{config.redis_port}   redis-cli -h {vip} -p {config.redis_port} "
            f"set hello world\n"
            f"  memcached  {vip}:{config.memcached_port}  "
            f"printf 'get hello\\r\\nquit\\r\\n' | nc {vip} {config.memcached_port}\n"
            f"  HTTP       {vip}:{config.http_port}   curl http://{vip}:{config.http_port}"
            f"/v1/p/default/k/hello\n"
            f"  status     kvha status {source}\n"
            "Ctrl-C stops every node.\n",
            flush=True,
        )

    def failed(f: Any) -> None:
        if stopping[0]:
            return
        print(f"kvha up: {f.getErrorMessage()}; stopping", file=sys.stderr, flush=True)
        exit_code[0] = 1
        stopping[0] = True
        reactor.stop()  # type: ignore[attr-defined]

    def stop_all() -> Any:
        stopping[0] = True
        alive = [p for p in procs.values() if p.pid is not None]
        for p in alive:
            try:
                p.signalProcess("TERM")
            except Exception:
                pass
        return task.deferLater(reactor, 0, _wait_exit, reactor, alive, 10.0)

    reactor.addSystemEventTrigger("before", "shutdown", stop_all)  # type: ignore[attr-defined]
    # Ctrl-C and SIGTERM both stop the cluster (set explicitly: a shell may
    # have started us with SIGINT ignored, and Twisted keeps an ignored SIGINT).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: reactor.callFromThread(reactor.stop))  # type: ignore[attr-defined]
    for node in nodes:
        spawn(node)
    threads.deferToThread(healthy).addCallbacks(ready, failed)
    reactor.run()  # type: ignore[attr-defined]
    return exit_code[0]


def _wait_exit(reactor: Any, procs: list[Any], limit: float) -> Any:
    from twisted.internet import task

    deadline = time.monotonic() + limit

    def check() -> Any:
        alive = [p for p in procs if p.pid is not None]
        if not alive:
            return None
        if time.monotonic() > deadline:
            for p in alive:
                try:
                    p.signalProcess("KILL")
                except Exception:
                    pass
            return None
        return task.deferLater(reactor, 0.1, check)

    return check()


def node_healthy(config: LocalConfig, node: Node) -> bool:
    """Whether ``node`` serves: a data node up, a master seeing every data node, and a
    load balancer ACTIVE or BACKUP with every master up."""
    try:
        if node.role == "data":
            return data_stats(node.host, node.port, config.secret.encode()).get("state") == "up"
        if node.role == "master":
            stats = memcached_stats(node.host, node.port)
            return stats.get("data_nodes_up") == stats.get("data_nodes") and redis_ping(
                node.extra_ports[0][1], node.extra_ports[0][2]
            )
        status = admin_get(node.host, node.port, config.admin_token, "/v1/status")
        return status["state"] in ("ACTIVE", "BACKUP") and all(
            all(m["up"].values()) for m in status["masters"]
        )
    except Exception:
        return False


class Prefixed(ProcessProtocol):
    """Prints a child's output line by line, each line prefixed with its id."""

    def __init__(self, node_id: str, on_exit: Optional[Any] = None) -> None:
        self.node_id = node_id
        self.on_exit = on_exit
        self.partial = b""

    def outReceived(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            sys.stdout.write(f"[{self.node_id:<8}] {line.decode(errors='replace')}\n")
        sys.stdout.flush()

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if self.partial:
            self.outReceived(b"\n")
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"signal {sig}" if sig else f"status {code}"
        sys.stdout.write(f"[{self.node_id:<8}] exited ({how})\n")
        sys.stdout.flush()
        if self.on_exit is not None:
            self.on_exit(self.node_id, how)
