"""A durable node away longer than tombstone_ttl refuses to merge back."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet.task import Clock

from kvha import wire
from kvha.data.logengine import LogEngine
from kvha.data.server import DataNode
from kvha.master.health import DOWN, MERGING, UP, _state_for

SECRET = b"absence-secret-0123456789"


def _node(path: Path, clock: Clock, ttl: float) -> DataNode:
    engine = LogEngine(str(path / "log"), clock, fsync="os")
    return DataNode(
        "d1", engine, SECRET, clock, tombstone_ttl=ttl, merge_on_start=True, state_dir=str(path)
    )


def test_node_back_within_tombstone_ttl_merges(tmp_path: Path) -> None:
    """A node that was away less than tombstone_ttl starts merging, as usual."""
    clock = Clock()
    clock.advance(1_700_000_000)
    node = _node(tmp_path, clock, ttl=3600)
    node.startService()
    node.store.set(b"p", b"k", b"v")
    clock.advance(2)  # the node records that it is alive
    node.stopService()
    clock.advance(600)
    again = _node(tmp_path, clock, ttl=3600)
    again.startService()
    assert again.state == "merging"
    again.stopService()


def test_node_away_longer_than_tombstone_ttl_is_stale(tmp_path: Path) -> None:
    """Back after more than tombstone_ttl, a node with data is stale: never read or written."""
    clock = Clock()
    clock.advance(1_700_000_000)
    node = _node(tmp_path, clock, ttl=60)
    node.startService()
    node.store.set(b"p", b"k", b"v")
    clock.advance(2)
    assert os.path.exists(tmp_path / "alive")
    node.stopService()
    clock.advance(3600)
    again = _node(tmp_path, clock, ttl=60)
    again.startService()
    assert again.state == "stale"
    # Nothing claims a merge of it, and masters treat it as down.
    reply = again.control(wire.Control(wire.CONTROL_CLAIM, "m1", 5000, 0, 0, 0))
    assert not reply.granted and reply.state == "stale"
    assert _state_for("stale") == DOWN
    assert _state_for("merging") == MERGING and _state_for("up") == UP
    again.stopService()


def test_wiped_node_rejoins(tmp_path: Path) -> None:
    """After its state directory is wiped, the same node starts merging again."""
    clock = Clock()
    clock.advance(1_700_000_000)
    node = _node(tmp_path, clock, ttl=60)
    node.startService()
    node.store.set(b"p", b"k", b"v")
    clock.advance(2)
    node.stopService()
    clock.advance(3600)
    for name in os.listdir(tmp_path):
        target = tmp_path / name
        if target.is_dir():
            for f in os.listdir(target):
                os.unlink(target / f)
            os.rmdir(target)
        else:
            os.unlink(target)
    again = _node(tmp_path, clock, ttl=60)
    again.startService()
    assert again.state == "merging"
    again.stopService()
