"""A starting master refuses data commands until it can read every key (Router.loading).

Real MasterNode objects on a MemoryReactorClock: no sockets.  The data nodes'
connections are driven through the links' client callbacks, as the network
client calls them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import yaml
from twisted.internet.testing import MemoryReactorClock

from kvha.config import load_config_string
from kvha.master.service import MasterNode


def master(replicas: int = 1, **health: Any) -> tuple[MasterNode, MemoryReactorClock]:
    doc = {
        "master": {
            "id": "m1",
            "secret": "0123456789abcdef0123",
            "memcached": {"listen": "tcp:0:interface=127.0.0.1"},
            "redis": {"listen": "tcp:0:interface=127.0.0.1"},
            "health": health,
            "cluster": {
                "replicas": replicas,
                "nodes": [
                    {"id": f"d{i}", "address": f"tcp:127.0.0.1:{7100 + i}"} for i in range(3)
                ],
            },
        }
    }
    config = load_config_string(yaml.safe_dump(doc)).master
    assert config is not None
    reactor = MemoryReactorClock()
    node = MasterNode(config, reactor)
    node.startService()
    return node, reactor


def connected(node: MasterNode, node_id: str, state: str = "up") -> None:
    """The data node's connection is up and it reports ``state`` (as the client tells the link)."""
    link = node.links[node_id]
    link.client.on_ready(SimpleNamespace(node_state=state))


def test_loading_until_enough_nodes_are_up_to_read_every_key() -> None:
    """Replicas 1, three nodes: any two up hold a copy of every key."""
    node, _reactor = master(replicas=1)
    assert node.router.loading
    connected(node, "d0")
    assert node.router.loading
    connected(node, "d1", "merging")  # written, never read: no help
    assert node.router.loading
    connected(node, "d2")
    assert not node.router.loading
    node.stopService()


def test_replicas_0_waits_for_every_node() -> None:
    node, _reactor = master(replicas=0)
    connected(node, "d0")
    connected(node, "d1")
    assert node.router.loading
    connected(node, "d2")
    assert not node.router.loading
    node.stopService()


def test_loading_ends_after_startup_wait_and_stays_ended() -> None:
    """After health.startup_wait the master serves what it can; a node lost later does
    not bring the loading state back (requests for its keys fail as before)."""
    node, reactor = master(replicas=1, startup_wait="3s")
    connected(node, "d0")
    reactor.advance(2.9)
    assert node.router.loading
    reactor.advance(0.2)
    assert not node.router.loading
    connected(node, "d1")
    connected(node, "d2")
    node.links["d1"].client.on_lost(None)
    assert node.links["d1"].state == "down"
    assert not node.router.loading
    node.stopService()


def test_startup_wait_0_serves_at_once() -> None:
    node, reactor = master(replicas=1, startup_wait=0)
    assert not node.router.loading
    assert node._startup_timer is None
    node.stopService()


def test_stopping_cancels_the_startup_timer() -> None:
    node, reactor = master(replicas=1)
    timer = node._startup_timer
    assert timer is not None and timer.active()
    node.stopService()
    assert not timer.active()
