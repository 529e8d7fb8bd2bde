"""Configuration files: YAML in, typed and validated frozen dataclasses out.

Every node reads one YAML document whose single top-level key names its role
(``data:``; later ``master:`` and ``lb:``).  The loader is generic: it walks
the fields of the role's dataclass, recursing into nested dataclasses, and
checks each value against its type hint and the field's ``metadata`` (the
``kind`` of value, and bounds).  Mistakes are reported once, up front, as a
:class:`ConfigError` naming the key path, so a node never starts half-way on
a bad file.  Adding a role means adding one dataclass, one ``Optional`` field
on :class:`Config` and one entry in :data:`ROLES`.

Paths in the file (``state_dir``, ``secret_file``) are used as written, so
relative paths are relative to the node's working directory.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import math
import os
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Optional

import yaml

ENGINES = ("memory", "log", "disk", "mmap", "mmap-index")
FSYNC_MODES = ("always", "everysec", "os")
ENDPOINT_PREFIXES = ("tcp:", "tcp6:", "unix:", "ssl:")
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SECRET_MIN_LENGTH = 16
#: Shortest partition password: these are service credentials, not human logins.
PASSWORD_MIN_LENGTH = 8
#: What a partition does when a write would take it over ``max_bytes``.
FULL_POLICIES = ("reject", "evict")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
#: Room a frame needs beyond its value for the key and request header.
FRAME_OVERHEAD = 64 * KiB

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*")
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1024 * GiB,
}
_ID_RE = re.compile(ID_PATTERN)
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


class ConfigError(Exception):
    """A configuration mistake, located by its key path inside the document."""

    def __init__(self, path: tuple[str, ...], message: str) -> None:
        super().__init__(path, message)
        self.path = tuple(path)
        self.message = message

    def __str__(self) -> str:
        where = format_path(self.path)
        return f"{where}: {self.message}" if where else self.message


def format_path(path: tuple[str, ...]) -> str:
    """Render ``("master", "nodes", "[2]", "id")`` as ``master.nodes[2].id``."""
    return "".join(p if p.startswith("[") or i == 0 else "." + p for i, p in enumerate(path))


def _show(value: Any, limit: int = 80) -> str:
    """``repr`` for messages, cut short so a pasted blob cannot flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _opt(default: Any = dataclasses.MISSING, **metadata: Any) -> Any:
    """A dataclass field with validation metadata (``kind``, ``min``, ...)."""
    # Secrets stay out of repr() so a logged config does not leak them.
    return field(default=default, metadata=metadata, repr=metadata.get("kind") != "secret")


def _section(cls: type) -> Any:
    """A nested section: absent from the file means all of its defaults."""
    return field(default_factory=cls)


@dataclass(frozen=True)
class StorageConfig:
    """How a data node keeps its records (see docs/storage.md for the engines)."""

    engine: str = _opt("memory", kind="enum", choices=ENGINES)
    #: log, disk, mmap, mmap-index: when writes reach the disk.
    fsync: str = _opt("everysec", kind="enum", choices=FSYNC_MODES)
    #: log only.
    snapshot_interval: float = _opt(300.0, kind="duration", min=0, min_exclusive=True)
    snapshot_log_bytes: int = _opt(64 * MiB, kind="size", min=4096)
    #: log, disk, mmap-index: the size at which a file is sealed and a new one begun.
    segment_bytes: int = _opt(16 * MiB, kind="size", min=4096)
    #: disk, mmap-index: compact once sealed segments hold this share of dead bytes...
    compaction_garbage_ratio: float = _opt(0.5, min=0, min_exclusive=True, max=1)
    #: ...and at least this many.
    compaction_min_bytes: int = _opt(64 * MiB, kind="size", min=0)
    #: mmap, mmap-index: the initial LMDB map (address space, not disk); doubles when full.
    map_size: int = _opt(1 * GiB, kind="size", min=1 * MiB)


@dataclass(frozen=True)
class DataLimits:
    """Bounds that keep one client or one request from exhausting a data node."""

    max_frame_bytes: int = _opt(32 * MiB, kind="size", min=64 * KiB)
    max_value_bytes: int = _opt(1 * MiB, kind="size", min=1)
    max_connections: int = _opt(1024, min=1)
    max_in_flight: int = _opt(1024, min=1)
    request_timeout: float = _opt(5.0, kind="duration", min=0, min_exclusive=True)

    def _validate(self) -> None:
        """A value must fit in a frame together with its key and header."""
        limit = self.max_frame_bytes - FRAME_OVERHEAD
        if self.max_value_bytes >= limit:
            raise ConfigError(
                ("max_value_bytes",),
                f"must be less than max_frame_bytes - 64KiB ({limit}); got {self.max_value_bytes}",
            )


@dataclass(frozen=True)
class StreamConfig:
    """Replication stream batching and flow control."""

    batch_records: int = _opt(512, min=1)
    window_batches: int = _opt(8, min=1)
    max_bytes_per_second: int = _opt(0, kind="size")


@dataclass(frozen=True)
class DataConfig:
    """A data node: stores partitions and serves the internal protocol."""

    id: str = _opt(kind="id")
    listen: str = _opt(kind="endpoint")
    state_dir: str = _opt()
    secret: str = _opt(kind="secret")
    storage: StorageConfig = _section(StorageConfig)
    tombstone_ttl: float = _opt(7 * 86400.0, kind="duration", min=0, min_exclusive=True)
    expiry_sweep_interval: float = _opt(0.1, kind="duration", min=0, min_exclusive=True)
    expiry_sweep_batch: int = _opt(2000, min=1)
    #: Start "merging" (written, not read) until a master has merged this node's
    #: ranges from the other copies.  Turn off only for a node used on its own.
    merge_on_start: bool = _opt(True)
    limits: DataLimits = _section(DataLimits)
    stream: StreamConfig = _section(StreamConfig)


WRITE_ACKS = ("all", "quorum", "one")
READ_MODES = ("one", "quorum")


@dataclass(frozen=True)
class DataNodeRef:
    """A data node as the masters see it: where it is and how much it takes."""

    id: str = _opt(kind="id")
    #: Twisted client endpoint string, e.g. ``tcp:127.0.0.1:7101`` or, with TLS,
    #: ``ssl:host=10.0.0.1:port=7101:caCertsDir=/etc/kvha/ca:hostname=10.0.0.1``.
    address: str = _opt(kind="client_endpoint")
    #: Share of the ring (virtual nodes in proportion).
    weight: float = _opt(1.0, min=0, min_exclusive=True)
    #: Share of reads among a key's live copies (okuyama's access-balance ratio).
    read_weight: float = _opt(1.0, min=0)


@dataclass(frozen=True)
class PartitionConfig:
    """A namespace of keys: who may reach it, how big it may grow, how it is replicated."""

    name: str = _opt(kind="id")
    write_acks: str = _opt("all", kind="enum", choices=WRITE_ACKS)
    read: str = _opt("one", kind="enum", choices=READ_MODES)
    #: Credential clients give to reach the partition (AUTH, memcached auth, HTTP
    #: bearer token); hashed when the master starts, never stored in the clear.
    password: Optional[str] = _opt(
        None, kind="secret", optional=True, min_length=PASSWORD_MIN_LENGTH
    )
    #: Or its hash, as printed by ``kvha partition hash``.
    password_hash: Optional[str] = _opt(None, kind="password_hash")
    #: Whether connections that give no credentials reach it; by default, only
    #: when it has no password.
    anonymous: Optional[bool] = _opt(None)
    #: Quota: bytes of keys and records (one copy counted); unset means unlimited.
    max_bytes: Optional[int] = _opt(None, kind="size", min=1)
    #: When full: ``reject`` writes (stores), or ``evict`` the least recently used (caches).
    policy: str = _opt("reject", kind="enum", choices=FULL_POLICIES)
    #: Expiry given to records written without one; 0 means none.
    default_ttl: float = _opt(0.0, kind="duration", min=0)

    @property
    def allows_anonymous(self) -> bool:
        if self.anonymous is not None:
            return self.anonymous
        return self.password is None and self.password_hash is None

    def _validate(self) -> None:
        if self.password is not None and self.password_hash is not None:
            raise ConfigError(("password_hash",), "give password or password_hash, not both")


@dataclass(frozen=True)
class ClusterConfig:
    """The cluster map, static in the master's file for now."""

    nodes: tuple[DataNodeRef, ...] = _opt()
    replicas: int = _opt(1, min=0, max=7)
    vnodes: int = _opt(128, min=1, max=4096)
    partitions: tuple[PartitionConfig, ...] = _opt((PartitionConfig(name="default"),))

    def _validate(self) -> None:
        if not self.nodes:
            raise ConfigError(("nodes",), "at least one data node is required")
        seen: set[str] = set()
        for i, node in enumerate(self.nodes):
            if node.id in seen:
                raise ConfigError(("nodes", f"[{i}]", "id"), f"duplicate node id {node.id!r}")
            seen.add(node.id)
        if self.replicas >= len(self.nodes):
            raise ConfigError(
                ("replicas",),
                f"{self.replicas} replicas need at least {self.replicas + 1} data nodes; "
                f"got {len(self.nodes)}",
            )
        names = [p.name for p in self.partitions]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(("partitions", f"[{i}]", "name"), f"duplicate partition {name!r}")


@dataclass(frozen=True)
class HealthConfig:
    """How masters watch data nodes."""

    ping_interval: float = _opt(0.25, kind="duration", min=0.01, max=1.0)
    #: A node that has not answered a ping for this long is marked down.
    ping_timeout: float = _opt(0.75, kind="duration", min=0, min_exclusive=True)
    #: A data request older than this fails and a read falls over to the next copy.
    request_timeout: float = _opt(2.0, kind="duration", min=0, min_exclusive=True)
    #: At start, how long the master refuses data commands (Redis ``LOADING``,
    #: memcached ``SERVER_ERROR``, HTTP 503) and fails the load balancers'
    #: probes while too few data nodes are up to read every key.  After it, it
    #: serves what it can, as a running master does when nodes fail.  0: never wait.
    startup_wait: float = _opt(10.0, kind="duration", min=0)


@dataclass(frozen=True)
class MemcachedListener:
    """The memcached text-protocol port."""

    listen: Optional[str] = _opt(None, kind="endpoint")
    #: The partition this port serves.
    partition: str = _opt("default", kind="id")


@dataclass(frozen=True)
class RedisListener:
    """The Redis (RESP2) port."""

    listen: Optional[str] = _opt(None, kind="endpoint")
    #: The partition this port serves.
    partition: str = _opt("default", kind="id")


@dataclass(frozen=True)
class BoundListener:
    """An extra client port that serves one partition without credentials.

    For cache clients that cannot authenticate: every connection is in
    ``partition``, whatever its anonymous setting.  Protect the port by
    where it listens (a private interface) or by TLS.
    """

    protocol: str = _opt(kind="enum", choices=("memcached", "redis"))
    listen: str = _opt(kind="endpoint")
    partition: str = _opt(kind="id")


@dataclass(frozen=True)
class HttpListener:
    """The REST Web API port (also /health and /metrics)."""

    listen: Optional[str] = _opt(None, kind="endpoint")
    #: Origins allowed to call the API from browser JavaScript ("*" for any).
    cors_origins: tuple[str, ...] = _opt(())
    #: Largest page of a key listing.
    max_list: int = _opt(1000, min=1, max=100_000)


@dataclass(frozen=True)
class MergeConfig:
    """Automatic Merge of data nodes that (re)start."""

    #: Versions this far below a node's high-water mark are merged again, to
    #: cover clock skew between the masters that issued them.
    skew_window: float = _opt(1.0, kind="duration", min=0)
    #: How long a master's claim on a merge lasts unless renewed.
    lease: float = _opt(5.0, kind="duration", min=0.1)
    #: Wait after claiming, so every master has seen the node back and writes to it.
    grace: float = _opt(1.0, kind="duration", min=0)
    #: Stream batches in flight (flow-control window).
    window: int = _opt(8, min=1)
    #: Merge bandwidth cap; 0 means none.
    max_bytes_per_second: int = _opt(0, kind="size")


@dataclass(frozen=True)
class MasterLimits:
    """Bounds on what one client can make a master hold."""

    max_connections: int = _opt(4096, min=1)
    #: Requests one connection may have in flight before the master stops reading it.
    max_in_flight: int = _opt(256, min=1)
    #: Longest command line; memcached's own limit is 2048 but multi-key gets run longer.
    max_line_bytes: int = _opt(8 * KiB, kind="size", min=512)
    max_value_bytes: int = _opt(1 * MiB, kind="size", min=1)
    #: Close client connections idle this long; 0 keeps them forever.
    idle_timeout: float = _opt(0.0, kind="duration", min=0)
    #: Failed logins (Redis AUTH / HELLO AUTH, memcached's auth set, HTTP bearer
    #: tokens) to one partition from one client address within ``auth_window``
    #: after which those logins are refused unchecked until the window has
    #: passed; 0: no limit.
    auth_failures: int = _opt(10, min=0)
    auth_window: float = _opt(60.0, kind="duration", min=0, min_exclusive=True)


@dataclass(frozen=True)
class MasterConfig:
    """A master node: client protocols in front, routing to data nodes behind."""

    id: str = _opt(kind="id")
    secret: str = _opt(kind="secret")
    cluster: ClusterConfig = _opt()
    memcached: MemcachedListener = _section(MemcachedListener)
    redis: RedisListener = _section(RedisListener)
    http: HttpListener = _section(HttpListener)
    health: HealthConfig = _section(HealthConfig)
    merge: MergeConfig = _section(MergeConfig)
    limits: MasterLimits = _section(MasterLimits)
    #: Where the shared cluster map is kept (cluster.json).  Needed to share it.
    state_dir: Optional[str] = _opt(None)
    #: Bearer token of the cluster admin API (/v1/admin on the HTTP port).
    #: Without it the map is the static one of this file.
    admin_token: Optional[str] = _opt(None, kind="secret", optional=True)
    #: Base URLs of the other masters' HTTP ports, e.g. http://10.0.0.2:8081.
    peers: tuple[str, ...] = _opt(())
    #: Extra ports, each serving one partition without credentials.
    bound_listeners: tuple[BoundListener, ...] = _opt(())
    #: Unix socket (mode 0600) on which load balancers on this host hand over
    #: client connections (their ``forward: handoff``); None: no handoffs.
    handoff: Optional[str] = _opt(None, kind="unix_path")

    def _validate(self) -> None:
        names = {p.name for p in self.cluster.partitions}
        checks: list[tuple[tuple[str, ...], str]] = [
            (("memcached", "partition"), self.memcached.partition),
            (("redis", "partition"), self.redis.partition),
        ]
        checks += [
            (("bound_listeners", f"[{i}]", "partition"), b.partition)
            for i, b in enumerate(self.bound_listeners)
        ]
        for where, name in checks:
            if name not in names:
                raise ConfigError(
                    where,
                    f"unknown partition {name!r}; expected one of {', '.join(sorted(names))}",
                )


@dataclass(frozen=True)
class LbMaster:
    """A master behind the VIP: its address and a port per protocol."""

    id: str = _opt(kind="id")
    host: str = _opt()
    redis: Optional[int] = _opt(None, min=1, max=65535)
    memcached: Optional[int] = _opt(None, min=1, max=65535)
    http: Optional[int] = _opt(None, min=1, max=65535)
    weight: float = _opt(1.0, min=0, min_exclusive=True)
    #: The master's ``handoff`` socket, when it runs on this load balancer's
    #: host: with ``forward: handoff`` its connections are handed over there.
    handoff: Optional[str] = _opt(None, kind="unix_path")


@dataclass(frozen=True)
class HeartbeatConfig:
    """UDP heartbeats between the two load balancers."""

    #: host:port this load balancer receives heartbeats on.
    bind: str = _opt()
    #: host:port of the peer's heartbeat socket.
    peer: str = _opt()
    interval: float = _opt(0.1, kind="duration", min=0.01, max=5.0)


#: How a load balancer passes connections on: see ``kvha/lb/forward.py``,
#: ``kvha/lb/nat.py`` and ``kvha/lb/handoff.py``.
FORWARD_MODES = ("proxy", "kernel", "handoff")
#: The longest Unix socket path Linux takes (``sun_path`` is 108 bytes with its NUL).
UNIX_PATH_MAX = 107


def is_ipv4(text: str) -> bool:
    """Whether ``text`` is an IPv4 address (what an nftables ``ip`` table translates to)."""
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class VipConfig:
    """The virtual IP and how it is held."""

    address: str = _opt()
    mode: str = _opt("bind", kind="enum", choices=("bind", "ip"))
    #: ip mode: the interface the address is added to.
    interface: str = _opt("")
    #: ip mode: prefix length of the address.
    prefix: int = _opt(24, min=1, max=32)
    redis: Optional[int] = _opt(6379, min=1, max=65535)
    memcached: Optional[int] = _opt(11211, min=1, max=65535)
    http: Optional[int] = _opt(8080, min=1, max=65535)

    def _validate(self) -> None:
        if self.mode == "ip" and not self.interface:
            raise ConfigError(("interface",), "required when mode is ip")


@dataclass(frozen=True)
class LbHealth:
    """Health checks of the masters: RESP PING, memcached version, HTTP /health."""

    interval: float = _opt(0.5, kind="duration", min=0.01)
    timeout: float = _opt(0.5, kind="duration", min=0, min_exclusive=True)
    rise: int = _opt(2, min=1)
    fall: int = _opt(2, min=1)


@dataclass(frozen=True)
class AdminConfig:
    """The run-time admin API (HTTP JSON, bearer token)."""

    listen: str = _opt(kind="endpoint")
    token: str = _opt(kind="secret")
    #: The peer load balancer's admin API, e.g. http://127.0.0.1:7302, for syncing.
    peer: str = _opt("")


@dataclass(frozen=True)
class LbConfig:
    """A load balancer of the active/standby pair."""

    id: str = _opt(kind="id")
    secret: str = _opt(kind="secret")
    state_dir: str = _opt()
    heartbeat: HeartbeatConfig = _opt()
    vip: VipConfig = _opt()
    admin: AdminConfig = _opt()
    priority: int = _opt(100, min=1, max=254)
    preempt: bool = _opt(True)
    scheduler: str = _opt("leastconn", kind="enum", choices=("leastconn", "rr", "wrr"))
    #: ``proxy``: the load balancer's process relays every byte.  ``kernel``:
    #: nftables DNAT sends connections straight to a master (root and ``nft``).
    #: ``handoff``: each accepted connection is passed to the master's process
    #: over its ``handoff`` socket (masters on this host); masters without one
    #: are relayed as with ``proxy``.
    forward: str = _opt("proxy", kind="enum", choices=FORWARD_MODES)
    connect_timeout: float = _opt(1.0, kind="duration", min=0, min_exclusive=True)
    drain_timeout: float = _opt(30.0, kind="duration", min=0)
    health: LbHealth = _section(LbHealth)
    masters: tuple[LbMaster, ...] = _opt(())

    def _validate(self) -> None:
        if self.forward != "kernel":
            return
        if self.scheduler == "leastconn":
            raise ConfigError(
                ("scheduler",),
                "leastconn needs connection counts that only forward: proxy has; "
                "with forward: kernel use rr or wrr",
            )
        # nftables translates to addresses: a name or an IPv6 address would
        # make the whole table fail to load.
        if not is_ipv4(self.vip.address):
            raise ConfigError(("vip", "address"), "forward: kernel needs an IPv4 address")
        for i, m in enumerate(self.masters):
            if not is_ipv4(m.host):
                raise ConfigError(
                    ("masters", str(i), "host"),
                    f"forward: kernel needs an IPv4 address, not {m.host!r}",
                )


@dataclass(frozen=True)
class LocalDataNode:
    """One data node of the local cluster."""

    id: str = _opt(kind="id")
    engine: str = _opt("memory", kind="enum", choices=ENGINES)
    fsync: str = _opt("everysec", kind="enum", choices=FSYNC_MODES)
    weight: float = _opt(1.0, min=0, min_exclusive=True)
    read_weight: float = _opt(1.0, min=0)


@dataclass(frozen=True)
class LocalConfig:
    """A whole cluster on one machine, for ``kvha up``: every node's config is derived."""

    secret: str = _opt(kind="secret")
    admin_token: str = _opt("change-me-local-admin-token")
    state_dir: str = _opt("./var")
    vip: str = _opt("127.0.0.100")
    host: str = _opt("127.0.0.1")
    redis_port: int = _opt(6379, min=1, max=65535)
    memcached_port: int = _opt(11211, min=1, max=65535)
    http_port: int = _opt(8080, min=1, max=65535)
    #: Internal ports (data nodes, master client ports, heartbeats, admin) start here.
    base_port: int = _opt(17100, min=1024, max=65000)
    masters: int = _opt(2, min=1, max=16)
    replicas: int = _opt(1, min=0, max=7)
    #: The load balancers' ``forward``: ``handoff`` (the masters serve the
    #: clients' connections themselves), ``proxy``, or ``kernel`` (round robin).
    forward: str = _opt("handoff", kind="enum", choices=FORWARD_MODES)
    data: tuple[LocalDataNode, ...] = _opt(
        (
            LocalDataNode(id="data1", engine="memory", read_weight=7.0),
            LocalDataNode(id="data2", engine="log", read_weight=3.0),
            LocalDataNode(id="data3", engine="log", fsync="always", read_weight=3.0),
        )
    )
    cors_origins: tuple[str, ...] = _opt(("*",))

    def _validate(self) -> None:
        if self.forward == "handoff":
            longest = os.path.join(
                os.path.abspath(self.state_dir), f"master{self.masters}", "handoff.sock"
            )
            if unix_path_problem(longest) is not None:
                raise ConfigError(
                    ("state_dir",),
                    f"forward: handoff puts Unix sockets under it, and {longest!r} is longer "
                    f"than {UNIX_PATH_MAX} bytes; use a shorter state_dir or forward: proxy",
                )
        if self.replicas >= len(self.data):
            raise ConfigError(
                ("replicas",),
                f"{self.replicas} replicas need at least {self.replicas + 1} data nodes",
            )
        if len(self.admin_token) < SECRET_MIN_LENGTH:
            # The derived load-balancer and master configs would refuse it.
            raise ConfigError(
                ("admin_token",),
                f"must be at least {SECRET_MIN_LENGTH} characters; got {len(self.admin_token)}",
            )


@dataclass(frozen=True)
class Config:
    """A loaded file: its role and that role's section (the others are None)."""

    role: str
    data: Optional[DataConfig] = None
    master: Optional[MasterConfig] = None
    lb: Optional[LbConfig] = None
    local: Optional[LocalConfig] = None
    source: str = "<string>"


#: Top-level role key -> the dataclass of its section.
ROLES: dict[str, type] = {
    "data": DataConfig,
    "master": MasterConfig,
    "lb": LbConfig,
    "local": LocalConfig,
}


def load_config(path: str) -> Config:
    """Read and validate a config file; every failure is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError((), f"cannot read config file {path!r}: {exc}") from None
    return load_config_string(text, source=path)


def load_config_string(text: str, source: str = "<string>") -> Config:
    """Parse and validate YAML text; ``source`` names it in error messages."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError((), f"invalid YAML in {source}{where}: {problem}") from None
    roles = ", ".join(ROLES)
    if doc is None:
        raise ConfigError((), f"empty document; expected a mapping with one role key ({roles})")
    if not isinstance(doc, dict):
        raise ConfigError((), f"expected a mapping; got {_show(doc)}")
    _check_keys(doc, ROLES, ())
    if len(doc) != 1:
        found = ", ".join(map(str, doc)) or "none"
        raise ConfigError((), f"expected exactly one role key, one of {roles}; got {found}")
    ((role, raw),) = doc.items()
    return Config(role=role, source=source, **{role: _build(ROLES[role], raw, (role,))})


#: How the example configurations mark secrets that must be changed.
PLACEHOLDER_MARK = "change-me"


def placeholder_secrets(section: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Key paths of secrets still holding an example value (``change-me...``).

    Nodes log a warning for each when they start: such a secret is public,
    so the internal protocol's and the heartbeats' authentication mean nothing.
    """
    found: list[str] = []
    if not dataclasses.is_dataclass(section):
        return found
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        where = path + (f.name,)
        if f.metadata.get("kind") == "secret" and isinstance(value, str):
            if value.startswith(PLACEHOLDER_MARK):
                found.append(format_path(where))
        elif dataclasses.is_dataclass(value):
            found += placeholder_secrets(value, where)
        elif isinstance(value, tuple):
            for i, item in enumerate(value):
                found += placeholder_secrets(item, where + (f"[{i}]",))
    return found


def warn_placeholders(section: Any, role: str, log: Any) -> None:
    """Log a warning for every example secret in a node's configuration."""
    for where in placeholder_secrets(section, (role,)):
        log.warn(
            "{key} is an example value (starts with {mark!r}): anyone can read it, so it "
            "protects nothing.  Set a random secret of your own before production.",
            key=where,
            mark=PLACEHOLDER_MARK,
        )


def build_section(cls: type, raw: Any, path: tuple[str, ...] = ()) -> Any:
    """Validate one section (a mapping from JSON or YAML) into dataclass ``cls``.

    For input that arrives at run time, such as a partition sent to the admin
    API: the same checks, and the same ConfigError naming the key, as a file.
    """
    return _build(cls, raw, path)


def _check_keys(raw: dict, allowed: Iterable[str], path: tuple[str, ...]) -> None:
    """Reject keys the schema does not know; typos must not pass silently."""
    names = sorted(allowed)
    for key in raw:
        if key not in names:
            raise ConfigError(path, f"unknown key {_show(key)}; expected one of {', '.join(names)}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, raw: Any, path: tuple[str, ...]) -> Any:
    """Build dataclass ``cls`` from mapping ``raw``, validating every field.

    A null section (every key commented out) counts as empty, so defaults apply.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping; got {_show(raw)}")
    fields = dataclasses.fields(cls)
    keys = [f.name for f in fields]
    keys += [f.name + "_file" for f in fields if f.metadata.get("kind") == "secret"]
    _check_keys(raw, keys, path)
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in fields:
        fpath = path + (f.name,)
        if f.metadata.get("kind") == "secret":
            values[f.name] = _secret(
                raw,
                f.name,
                path,
                optional=f.metadata.get("optional", False),
                min_length=f.metadata.get("min_length", SECRET_MIN_LENGTH),
            )
        elif f.name in raw:
            values[f.name] = _value(hints[f.name], f.metadata, raw[f.name], fpath)
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = _build(hints[f.name], {}, fpath)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(fpath, "required key is missing")
    obj = cls(**values)
    validate = getattr(obj, "_validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as exc:
            raise ConfigError(path + exc.path, exc.message) from None
    return obj


def _value(hint: Any, meta: Mapping[str, Any], raw: Any, path: tuple[str, ...]) -> Any:
    """Convert and check one value against its type hint and field metadata."""
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if raw is None:
            return None
        hint = args[0] if len(args) == 1 else hint
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type, hint), raw, path)
    if typing.get_origin(hint) in (list, tuple):
        # Metadata applies to each element; tuples keep frozen configs immutable.
        if not isinstance(raw, list):
            raise ConfigError(path, f"expected a list; got {_show(raw)}")
        item = typing.get_args(hint)[0]
        items = [_value(item, meta, v, path + (f"[{i}]",)) for i, v in enumerate(raw)]
        return typing.get_origin(hint)(items)
    kind = meta.get("kind")
    if kind == "duration":
        value: Any = _duration(raw, path)
    elif kind == "size":
        value = _size(raw, path)
    elif hint is bool:
        if not isinstance(raw, bool):
            raise ConfigError(path, f"expected true or false; got {_show(raw)}")
        value = raw
    elif hint is int:
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise ConfigError(path, f"expected an integer; got {_show(raw)}")
        value = raw
    elif hint is float:
        value = _number(raw, path)
    elif hint is str:
        value = _string(raw, kind, meta, path)
    else:  # pragma: no cover - a schema bug, not a user mistake
        raise TypeError(f"unsupported config type {hint!r} at {format_path(path)}")
    _check_bounds(value, raw, meta, path)
    return value


def _string(raw: Any, kind: Optional[str], meta: Mapping[str, Any], path: tuple) -> str:
    if kind == "enum":
        if not isinstance(raw, str) or raw not in meta["choices"]:
            choices = ", ".join(meta["choices"])
            raise ConfigError(path, f"expected one of {choices}; got {_show(raw)}")
        return raw
    if not isinstance(raw, str):
        raise ConfigError(path, f"expected a string; got {_show(raw)}")
    if kind == "id" and not _ID_RE.fullmatch(raw):
        raise ConfigError(path, f"expected an id matching {ID_PATTERN}; got {_show(raw)}")
    if kind in ("endpoint", "client_endpoint"):
        _endpoint(raw, kind == "client_endpoint", path)
    if kind == "unix_path":
        _unix_path(raw, path)
    if kind == "password_hash":
        from kvha.passwords import parse_password_hash

        if parse_password_hash(raw) is None:
            raise ConfigError(
                path, "expected a hash printed by `kvha partition hash` (scrypt$N$r$p$salt$hash)"
            )
    return raw


def unix_path_problem(raw: str) -> Optional[str]:
    """What is wrong with ``raw`` as a Unix socket path (absolute, fits ``sun_path``), or None."""
    if not os.path.isabs(raw):
        return f"expected an absolute path; got {_show(raw)}"
    size = len(os.fsencode(raw))
    if size > UNIX_PATH_MAX:
        return f"a Unix socket path is at most {UNIX_PATH_MAX} bytes; this one is {size}"
    return None


def _unix_path(raw: str, path: tuple[str, ...]) -> None:
    problem = unix_path_problem(raw)
    if problem is not None:
        raise ConfigError(path, problem)


def _endpoint(raw: str, client: bool, path: tuple[str, ...]) -> None:
    """A Twisted endpoint string; ``ssl:`` ones must say how their peer is checked."""
    if not any(raw.startswith(p) and len(raw) > len(p) for p in ENDPOINT_PREFIXES):
        prefixes = ", ".join(ENDPOINT_PREFIXES)
        raise ConfigError(
            path, f"expected a Twisted endpoint string starting with {prefixes}; got {_show(raw)}"
        )
    if not raw.startswith("ssl:"):
        return
    options = {part.split("=", 1)[0] for part in raw.split(":")[1:] if "=" in part}
    if client:
        # Without caCertsDir Twisted does not verify the server at all, and
        # without hostname it does not check that the certificate is the node's.
        missing = [o for o in ("caCertsDir", "hostname") if o not in options]
        if missing:
            raise ConfigError(
                path,
                f"an ssl: client endpoint needs {' and '.join(o + '=' for o in missing)} so "
                "that the server's certificate is verified; got " + _show(raw),
            )
    elif "privateKey" not in options:
        raise ConfigError(path, "an ssl: listening endpoint needs privateKey= (and certKey=)")


def _number(raw: Any, path: tuple[str, ...], scale: float = 1.0) -> float:
    """A finite float; ints are accepted, bools (an int subclass) are not."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ConfigError(path, f"expected a number; got {_show(raw)}")
    try:
        value = float(raw) * scale
    except OverflowError:  # an int too large for a float
        value = math.inf
    if not math.isfinite(value):
        raise ConfigError(path, f"expected a finite number; got {_show(raw)}")
    return value


def _duration(raw: Any, path: tuple[str, ...]) -> float:
    """Seconds, from a number or a string such as ``250ms``, ``1.5s`` or ``7d``."""
    if isinstance(raw, str):
        m = _DURATION_RE.fullmatch(raw)
        if m:
            return _number(float(m.group(1)), path, _DURATION_UNITS[m.group(2) or "s"])
    elif isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return _number(raw, path)
    raise ConfigError(
        path, f"expected a duration such as 30, 250ms, 1.5s, 5m, 2h or 7d; got {_show(raw)}"
    )


def _size(raw: Any, path: tuple[str, ...]) -> int:
    """Bytes, from an int or a string such as ``512KiB``, ``64MiB`` or ``10kB``."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw
    if isinstance(raw, str):
        m = _SIZE_RE.fullmatch(raw)
        unit = _SIZE_UNITS.get((m.group(2) or "b").lower()) if m else None
        size = Decimal(m.group(1)) * unit if m and unit is not None else None
        if size is not None and size == int(size):
            return int(size)
    raise ConfigError(
        path, f"expected a size in bytes such as 4096, 512KiB, 64MiB or 1GB; got {_show(raw)}"
    )


def _check_bounds(value: Any, raw: Any, meta: Mapping[str, Any], path: tuple) -> None:
    """Apply ``min``/``min_exclusive``/``max``, quoting both forms of a unit string."""
    got = f"{_show(raw)} ({value})" if isinstance(raw, str) else _show(raw)
    low = meta.get("min")
    if low is not None:
        if meta.get("min_exclusive") and value <= low:
            raise ConfigError(path, f"must be greater than {low}; got {got}")
        if value < low:
            raise ConfigError(path, f"must be at least {low}; got {got}")
    high = meta.get("max")
    if high is not None and value > high:
        raise ConfigError(path, f"must be at most {high}; got {got}")


def _secret(
    raw: dict,
    name: str,
    path: tuple[str, ...],
    optional: bool = False,
    min_length: int = SECRET_MIN_LENGTH,
) -> Optional[str]:
    """The secret comes inline or from a file (to keep it out of the config)."""
    file_key = name + "_file"
    if optional and name not in raw and file_key not in raw:
        return None
    if optional and raw.get(name, 0) is None and file_key not in raw:
        return None
    if (name in raw) == (file_key in raw):
        what = "at most" if optional else "exactly"
        raise ConfigError(path + (name,), f"{what} one of {name} or {file_key} must be given")
    if name in raw:
        secret = raw[name]
        if not isinstance(secret, str):
            # Do not echo the value: it may be a real secret with a typo.
            raise ConfigError(path + (name,), f"expected a string; got {type(secret).__name__}")
        where = path + (name,)
    else:
        filename = raw[file_key]
        where = path + (file_key,)
        if not isinstance(filename, str):
            raise ConfigError(where, f"expected a string; got {_show(filename)}")
        try:
            with open(filename, encoding="utf-8") as f:
                secret = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(where, f"cannot read secret file {_show(filename)}: {exc}") from None
    if len(secret) < min_length:
        raise ConfigError(where, f"must be at least {min_length} characters; got {len(secret)}")
    return secret
