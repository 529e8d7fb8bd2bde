"""Partitions in the cluster map: their entries, the policies masters route by,
and the rule table each data node enforces.

A map entry is a JSON object::

    {"name": "sessions", "password_hash": "scrypt$...", "anonymous": null,
     "max_bytes": 67108864, "policy": "evict", "default_ttl": 3600.0,
     "write_acks": "all", "read": "one"}

``password_hash`` is null for a partition without a password; ``anonymous``
null means "only if it has no password".  Entries are made from the master's
configuration (``master.cluster.partitions``, passwords hashed on the way)
and changed through the admin API, which validates input exactly as the
configuration loader does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Callable, Optional

from kvha.config import ConfigError, PartitionConfig, build_section
from kvha.master.router import PartitionPolicy
from kvha.passwords import hash_password
from kvha.ring import TOKEN_SPACE, Ring

Hasher = Callable[[str], str]

#: Keys an admin may send for a partition (a ``*_file`` form would read the master's files).
ADMIN_KEYS = (
    "name",
    "password",
    "anonymous",
    "max_bytes",
    "policy",
    "default_ttl",
    "write_acks",
    "read",
)


def entry_from_config(p: PartitionConfig, hasher: Hasher = hash_password) -> dict[str, Any]:
    """The map entry of a configured partition; a plain password is hashed here."""
    password_hash = p.password_hash
    if p.password is not None:
        password_hash = hasher(p.password)
    return {
        "name": p.name,
        "password_hash": password_hash,
        "anonymous": p.anonymous,
        "max_bytes": p.max_bytes,
        "policy": p.policy,
        "default_ttl": p.default_ttl,
        "write_acks": p.write_acks,
        "read": p.read,
    }


def policy_from_entry(e: dict[str, Any]) -> PartitionPolicy:
    return PartitionPolicy(
        str(e["name"]),
        str(e.get("write_acks", "all")),
        str(e.get("read", "one")),
        password_hash=e.get("password_hash"),
        anonymous=e.get("anonymous"),
        max_bytes=e.get("max_bytes"),
        when_full=str(e.get("policy", "reject")),
        default_ttl_ms=int(round(float(e.get("default_ttl") or 0) * 1000)),
    )


def public_entry(e: dict[str, Any]) -> dict[str, Any]:
    """What ``kvha partition list`` shows: everything but the hash."""
    policy = policy_from_entry(e)
    return {
        "name": policy.name,
        "has_password": policy.password_hash is not None,
        "anonymous": policy.anonymous,
        "max_bytes": policy.max_bytes,
        "policy": policy.when_full,
        "default_ttl": policy.default_ttl_ms / 1000.0,
        "write_acks": policy.write_acks,
        "read": policy.read,
    }


def parse_admin(
    doc: Any, current: Optional[dict[str, Any]] = None, hasher: Hasher = hash_password
) -> dict[str, Any]:
    """A new or changed entry from an admin request, validated like the config file.

    ``current`` is the entry being changed (``set``); keys absent from ``doc``
    keep their value, and ``"password": null`` removes the password.  Raises
    ConfigError naming the bad key.
    """
    if not isinstance(doc, dict):
        raise ConfigError(("partition",), "expected a JSON object")
    for key in doc:
        if key not in ADMIN_KEYS:
            raise ConfigError(
                ("partition",), f"unknown key {key!r}; expected one of {', '.join(ADMIN_KEYS)}"
            )
    raw: dict[str, Any] = {}
    if current is not None:
        raw = {
            k: current.get(k)
            for k in ("name", "anonymous", "max_bytes", "policy", "default_ttl", "write_acks")
        }
        raw["read"] = current.get("read", "one")
        if current.get("password_hash") is not None:
            raw["password_hash"] = current["password_hash"]
        raw = {k: v for k, v in raw.items() if v is not None}
        if "password" in doc:
            raw.pop("password_hash", None)
    raw.update(doc)
    if raw.get("password") is None:
        raw.pop("password", None)
    config = build_section(PartitionConfig, raw, ("partition",))
    return entry_from_config(config, hasher)


def copy_shares(ring: Ring, copies: int) -> dict[str, float]:
    """Each node's share of the records it holds: the fraction of the ring it keeps a copy of."""
    out = {}
    for node in ring.nodes:
        total = sum(
            (hi - lo) % TOKEN_SPACE or TOKEN_SPACE for lo, hi in ring.ranges_for(node, copies)
        )
        out[node] = min(1.0, total / TOKEN_SPACE)
    return out


def node_tables(
    policies: Iterable[PartitionPolicy],
    rings: Sequence[Ring],
    copies: int,
) -> dict[str, list[tuple[bytes, int, bool, int]]]:
    """The rule table (:class:`kvha.wire.Partitions`) for every node of ``rings``.

    A node's limit is the partition's ``max_bytes`` times its share of the
    ring; during a join or leave it is the larger of its shares under the two
    rings, since it is written under both.  Partitions with neither a quota
    nor a default TTL need no rule.
    """
    shares: dict[str, float] = {}
    for ring in rings:
        for node, share in copy_shares(ring, copies).items():
            shares[node] = max(shares.get(node, 0.0), share)
    policies = list(policies)
    tables: dict[str, list[tuple[bytes, int, bool, int]]] = {}
    for node, share in shares.items():
        table = []
        for policy in policies:
            limit = 0
            if policy.max_bytes is not None:
                limit = max(1, math.ceil(policy.max_bytes * share))
            if limit or policy.default_ttl_ms:
                evict = policy.when_full == "evict"
                table.append((policy.name.encode(), limit, evict, policy.default_ttl_ms))
        tables[node] = table
    return tables
