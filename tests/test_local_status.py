"""``kvha status`` rows for masters (kvha.local.node_status), without sockets."""

from __future__ import annotations

from typing import Any

import pytest

from kvha import local
from kvha.config import LocalConfig


@pytest.mark.parametrize(
    ("stats", "state"),
    [
        ({"data_nodes_up": "3", "data_nodes": "3", "loading": "0"}, "up"),
        ({"data_nodes_up": "2", "data_nodes": "3", "loading": "0"}, "degraded (2/3 data nodes up)"),
        ({"data_nodes_up": "0", "data_nodes": "3", "loading": "1"}, "loading (0/3 data nodes up)"),
    ],
)
def test_a_master_row_says_up_degraded_or_loading(
    monkeypatch: Any, tmp_path: Any, stats: dict[str, str], state: str
) -> None:
    config = LocalConfig(secret="s" * 32, admin_token="t" * 24, state_dir=str(tmp_path))
    master = next(n for n in local.plan(config) if n.role == "master")
    monkeypatch.setattr(local, "read_pid", lambda path: 4242)
    monkeypatch.setattr(local, "memcached_stats", lambda host, port: stats)
    cluster = {"epoch": 3, "pending": None, "progress": {}}
    monkeypatch.setattr(local, "admin_get", lambda host, port, token, path: cluster)
    row = local.node_status(config, master)
    assert row["state"] == state
    assert row["epoch"] == 3
