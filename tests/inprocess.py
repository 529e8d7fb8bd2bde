"""A whole cluster in one process: real DataNodes and a real Router, no network.

Data nodes are real :class:`DataNode` objects with real engines; the master
reaches them through :class:`LocalDataClient`, the in-process twin of the
network client.  Time is a ``Clock``; randomness a seeded ``Random``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Optional

from twisted.internet.task import Clock

from kvha.data.engine import MemoryEngine
from kvha.data.local import LocalDataClient
from kvha.data.server import DataNode
from kvha.master.health import NodeLink
from kvha.master.memcache import MemcacheFactory
from kvha.master.partitions import node_tables
from kvha.master.resp import RespFactory
from kvha.master.router import PartitionPolicy, Router
from kvha.ring import Ring

SECRET = b"in-process-secret-0123"


class Cluster:
    """``n`` data nodes behind one router."""

    def __init__(
        self,
        n: int = 3,
        replicas: int = 1,
        vnodes: int = 64,
        read_weights: Optional[Sequence[float]] = None,
        partitions: Sequence[PartitionPolicy] = (PartitionPolicy("default"),),
        seed: int = 1,
        clock: Optional[Clock] = None,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.clock.advance(1_700_000_000)  # a realistic wall-clock time
        self.nodes: dict[str, DataNode] = {}
        self.clients: dict[str, LocalDataClient] = {}
        self.links: dict[str, NodeLink] = {}
        weights = list(read_weights) if read_weights is not None else [1.0] * n
        for i in range(n):
            node_id = f"data{i + 1}"
            node = DataNode(node_id, MemoryEngine(), SECRET, self.clock)
            node.startService()
            client = LocalDataClient(node, endpoint=node_id)
            link = NodeLink(node_id, client, self.clock, read_weight=weights[i])  # type: ignore[arg-type]
            link.start()
            self.nodes[node_id] = node
            self.clients[node_id] = client
            self.links[node_id] = link
        self.ring = Ring.build([(node_id, 1.0) for node_id in self.nodes], vnodes)
        self.router = Router(
            self.ring, self.links, replicas, partitions, self.clock, random.Random(seed)
        )

    def memcache_factory(self, partition: bytes = b"default", **limits: object) -> MemcacheFactory:
        return MemcacheFactory(self.router, partition, self.clock, **limits)  # type: ignore[arg-type]

    def resp_factory(self, partition: bytes = b"default", **limits: object) -> RespFactory:
        return RespFactory(self.router, partition, self.clock, **limits)  # type: ignore[arg-type]

    def set_partitions(self, *policies: PartitionPolicy, epoch: int = 1) -> None:
        """Route by these partitions and push their rules to every data node, as a master does."""
        self.router.set_partitions(policies)
        tables = node_tables(policies, [self.ring], self.router.copies)
        for node_id, client in self.clients.items():
            client.partitions(epoch, tables.get(node_id, []))

    def kill(self, node_id: str) -> None:
        """The node's connection resets, as after kill -9."""
        self.clients[node_id].disconnect()

    def revive(self, node_id: str) -> None:
        self.clients[node_id].reconnect()

    def stop(self) -> None:
        for link in self.links.values():
            link.stop()
        for node in self.nodes.values():
            if node.running:
                node.stopService()
