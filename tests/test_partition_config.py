"""Partition settings in a master's file and through the admin API, validated the same way.

Also the other security settings of ``master:``: bound listeners, the admin
token, and ``ssl:`` endpoints that must say how the peer is verified.
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import pytest
import yaml

from kvha.config import ConfigError, MasterConfig, load_config_string
from kvha.master.partitions import entry_from_config, parse_admin, policy_from_entry, public_entry
from kvha.passwords import hash_password, verify_password

SECRET = "0123456789abcdef0123"
CHEAP_HASH = hash_password("pw-123456", n=16, r=1, p=1)


def master(**section: Any) -> MasterConfig:
    doc: dict[str, Any] = {
        "id": "m1",
        "secret": SECRET,
        "cluster": {
            "nodes": [
                {"id": "a", "address": "tcp:127.0.0.1:7101"},
                {"id": "b", "address": "tcp:127.0.0.1:7102"},
            ],
        },
    }
    cluster = section.pop("cluster", {})
    doc["cluster"].update(cluster)
    doc.update(section)
    config = load_config_string(yaml.safe_dump({"master": doc}))
    assert config.master is not None
    return config.master


def master_error(**section: Any) -> str:
    with pytest.raises(ConfigError) as info:
        master(**section)
    return str(info.value)


def test_default_partition_is_anonymous_and_unlimited() -> None:
    """Without partitions there is one, ``default``: anonymous, no quota, no TTL."""
    (p,) = master().cluster.partitions
    assert (p.name, p.allows_anonymous, p.max_bytes, p.policy, p.default_ttl) == (
        "default",
        True,
        None,
        "reject",
        0.0,
    )


def test_partition_settings() -> None:
    """Every setting is read, with units, and a password makes a partition non-anonymous."""
    m = master(
        cluster={
            "partitions": [
                {"name": "default"},
                {
                    "name": "sessions",
                    "password": "s3ssions-pw",
                    "max_bytes": "64MiB",
                    "policy": "evict",
                    "default_ttl": "1h",
                    "write_acks": "one",
                },
                {"name": "public", "password_hash": CHEAP_HASH, "anonymous": True},
            ]
        }
    )
    _, sessions, public = m.cluster.partitions
    assert sessions.max_bytes == 64 << 20 and sessions.default_ttl == 3600.0
    assert not sessions.allows_anonymous and public.allows_anonymous
    assert "s3ssions-pw" not in repr(sessions)
    entry = entry_from_config(sessions, lambda pw: hash_password(pw, n=16, r=1, p=1))
    assert verify_password(b"s3ssions-pw", entry["password_hash"])
    policy = policy_from_entry(entry)
    assert (policy.max_bytes, policy.when_full, policy.default_ttl_ms) == (
        64 << 20,
        "evict",
        3600_000,
    )
    assert policy.reject_at_primary is False
    assert public_entry(entry)["has_password"] is True
    assert "password_hash" not in public_entry(entry)


def test_password_from_a_file(tmp_path: Any) -> None:
    """password_file keeps the password out of the configuration."""
    path = tmp_path / "pw"
    path.write_text("from-a-file-123\n")
    m = master(
        cluster={"partitions": [{"name": "default"}, {"name": "x", "password_file": str(path)}]}
    )
    assert m.cluster.partitions[1].password == "from-a-file-123"


@pytest.mark.parametrize(
    ("partition", "message"),
    [
        (
            {"name": "x", "password": "short"},
            "master.cluster.partitions[1].password: must be at least 8 characters; got 5",
        ),
        (
            {"name": "x", "password": "long-enough", "password_hash": CHEAP_HASH},
            "master.cluster.partitions[1].password_hash: give password or password_hash, not both",
        ),
        (
            {"name": "x", "password_hash": "md5$abc"},
            "master.cluster.partitions[1].password_hash: expected a hash printed by",
        ),
        (
            {"name": "x", "max_bytes": 0},
            "master.cluster.partitions[1].max_bytes: must be at least 1; got 0",
        ),
        (
            {"name": "x", "policy": "lru"},
            "master.cluster.partitions[1].policy: expected one of reject, evict; got 'lru'",
        ),
        (
            {"name": "x", "default_ttl": "soon"},
            "master.cluster.partitions[1].default_ttl: expected a duration",
        ),
        (
            {"name": "x", "anonymous": "yes"},
            "master.cluster.partitions[1].anonymous: expected true or false; got 'yes'",
        ),
    ],
)
def test_partition_errors_name_the_key(partition: dict[str, Any], message: str) -> None:
    assert master_error(cluster={"partitions": [{"name": "default"}, partition]}).startswith(
        message
    )


def test_bound_listeners() -> None:
    """Extra ports bound to a partition; the partition must exist."""
    m = master(
        cluster={"partitions": [{"name": "default"}, {"name": "legacy", "anonymous": False}]},
        bound_listeners=[
            {
                "protocol": "memcached",
                "listen": "tcp:11411:interface=10.0.0.5",
                "partition": "legacy",
            }
        ],
    )
    assert m.bound_listeners[0].partition == "legacy"
    assert master_error(
        bound_listeners=[{"protocol": "redis", "listen": "tcp:1", "partition": "nope"}]
    ) == ("master.bound_listeners[0].partition: unknown partition 'nope'; expected one of default")
    assert master_error(
        bound_listeners=[{"protocol": "http", "listen": "tcp:1", "partition": "default"}]
    ).startswith("master.bound_listeners[0].protocol: expected one of memcached, redis")


def test_admin_token_is_a_secret() -> None:
    """The admin token may come from a file, must be long enough, and is optional."""
    assert master().admin_token is None
    assert master(admin_token="x" * 20).admin_token == "x" * 20
    assert master_error(admin_token="short") == (
        "master.admin_token: must be at least 16 characters; got 5"
    )
    assert "x" * 20 not in repr(master(admin_token="x" * 20))


def test_ssl_endpoints_must_verify_their_peer() -> None:
    """A data node reached over ssl: needs caCertsDir and hostname; a TLS port needs a key."""
    ok = "ssl:host=10.0.0.1:port=7101:caCertsDir=/etc/kvha/ca:hostname=10.0.0.1"
    nodes = [{"id": "a", "address": ok}, {"id": "b", "address": "tcp:127.0.0.1:7102"}]
    assert master(cluster={"nodes": nodes}).cluster.nodes[0].address == ok
    nodes[0]["address"] = "ssl:host=10.0.0.1:port=7101"
    assert master_error(cluster={"nodes": nodes}).startswith(
        "master.cluster.nodes[0].address: an ssl: client endpoint needs caCertsDir= and "
        "hostname= so that the server's certificate is verified"
    )
    assert master_error(redis={"listen": "ssl:6380"}) == (
        "master.redis.listen: an ssl: listening endpoint needs privateKey= (and certKey=)"
    )
    tls = "ssl:6380:privateKey=/k.pem:certKey=/c.pem"
    assert master(redis={"listen": tls}).redis.listen == tls


def test_production_secrets_are_required() -> None:
    """The cluster secret (internal protocol) cannot be left out or be short."""
    text = textwrap.dedent(
        """\
        master:
          id: m1
          cluster:
            nodes: [{id: a, address: "tcp:127.0.0.1:7101"}]
            replicas: 0
        """
    )
    with pytest.raises(ConfigError) as info:
        load_config_string(text)
    assert str(info.value) == "master.secret: exactly one of secret or secret_file must be given"


# The admin API's input ----------------------------------------------------------------


def cheap(password: str) -> str:
    return hash_password(password, n=16, r=1, p=1)


def test_admin_create_and_change() -> None:
    """create validates like the file; set keeps what it does not mention."""
    entry = parse_admin(
        {"name": "cache", "password": "cache-pw-1", "max_bytes": "1MiB", "policy": "evict"},
        hasher=cheap,
    )
    assert entry["max_bytes"] == 1 << 20 and verify_password(b"cache-pw-1", entry["password_hash"])
    changed = parse_admin({"default_ttl": "30s"}, entry, hasher=cheap)
    assert changed["password_hash"] == entry["password_hash"]
    assert changed["default_ttl"] == 30.0 and changed["policy"] == "evict"
    new_pw = parse_admin({"password": "another-pw"}, changed, hasher=cheap)
    assert verify_password(b"another-pw", new_pw["password_hash"])
    assert not verify_password(b"cache-pw-1", new_pw["password_hash"])
    no_pw = parse_admin({"password": None, "max_bytes": None}, new_pw, hasher=cheap)
    assert no_pw["password_hash"] is None and no_pw["max_bytes"] is None
    assert policy_from_entry(no_pw).anonymous  # anonymous unset: open once it has no password


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"name": "x", "password_file": "/etc/shadow"}, "partition: unknown key 'password_file'"),
        ({"name": "x", "password_hash": CHEAP_HASH}, "partition: unknown key 'password_hash'"),
        ({"name": "bad name"}, "partition.name: expected an id"),
        ({"name": "x", "max_bytes": "lots"}, "partition.max_bytes: expected a size"),
        ("not an object", "partition: expected a JSON object"),
    ],
)
def test_admin_input_errors(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_admin(doc, hasher=cheap)
    assert str(info.value).startswith(message)


def test_example_secrets_are_found() -> None:
    """Secrets still holding the examples' ``change-me`` value are named, nested ones too."""
    from kvha.config import load_config, placeholder_secrets

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shipped = load_config(os.path.join(root, "etc", "master.yaml")).master
    assert placeholder_secrets(shipped, ("master",)) == ["master.secret"]
    assert placeholder_secrets(master(admin_token="change-me-admin-token"), ("master",)) == [
        "master.admin_token"
    ]
    assert placeholder_secrets(master(), ("master",)) == []
