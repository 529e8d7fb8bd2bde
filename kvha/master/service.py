"""A master node: links to every data node, the ring, the router, the listeners."""

from __future__ import annotations

import random
from typing import Any, Optional

from twisted.application import service, strports
from twisted.internet import defer
from twisted.web.resource import Resource

from kvha.config import MasterConfig
from kvha.data.client import DataNodeClient
from kvha.master.cluster import AdminResource, ClusterManager, initial_map, ring_of
from kvha.master.health import NodeLink
from kvha.master.http import Api, ApiSite
from kvha.master.memcache import MemcacheFactory, MemcacheStats
from kvha.master.merge import Merger
from kvha.master.metrics import registry_for, render
from kvha.master.resp import RespFactory
from kvha.master.router import PartitionPolicy, Router
from kvha.ring import Ring


class MasterNode(service.MultiService):
    """Everything one master runs; the listeners are child services."""

    def __init__(self, config: MasterConfig, reactor: Any, rng: Optional[random.Random] = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        cluster = config.cluster
        health = config.health
        self.links: dict[str, NodeLink] = {}
        for node in cluster.nodes:
            self._link(node.id, node.address, node.read_weight)
        self.ring = Ring.build([(n.id, n.weight) for n in cluster.nodes], cluster.vnodes)
        self.router = Router(
            self.ring,
            self.links,
            cluster.replicas,
            [PartitionPolicy(p.name, p.write_acks, p.read) for p in cluster.partitions],
            reactor,
            rng,
        )
        merge = config.merge
        self.merger = Merger(
            config.id,
            self.ring,
            self.links,
            cluster.replicas + 1,
            reactor,
            skew_window=merge.skew_window,
            lease=merge.lease,
            grace=merge.grace,
            window=merge.window,
            max_bytes_per_second=merge.max_bytes_per_second,
        )
        self.cluster_manager: Optional[ClusterManager] = None
        if config.admin_token:
            self.cluster_manager = ClusterManager(
                self,
                initial_map(
                    [
                        {
                            "id": n.id,
                            "address": n.address,
                            "weight": n.weight,
                            "read_weight": n.read_weight,
                        }
                        for n in cluster.nodes
                    ],
                    cluster.replicas,
                    cluster.vnodes,
                ),
                config.state_dir,
                list(config.peers),
                config.admin_token,
                poll_interval=health.ping_interval,
                grace=merge.grace,
            )
        self.memcache_stats = MemcacheStats(reactor)
        self.resp_factory: Optional[RespFactory] = None
        self.api: Optional[Api] = None
        limits = config.limits
        if config.memcached.listen:
            factory = MemcacheFactory(
                self.router,
                config.memcached.partition.encode(),
                reactor,
                self.memcache_stats,
                max_connections=limits.max_connections,
                max_in_flight=limits.max_in_flight,
                max_line_bytes=limits.max_line_bytes,
                max_value_bytes=limits.max_value_bytes,
                idle_timeout=limits.idle_timeout,
            )
            strports.service(config.memcached.listen, factory).setServiceParent(self)
        if config.redis.listen:
            resp = RespFactory(
                self.router,
                config.redis.partition.encode(),
                reactor,
                port=_port_of(config.redis.listen),
                max_connections=limits.max_connections,
                max_in_flight=limits.max_in_flight,
                max_value_bytes=limits.max_value_bytes,
            )
            strports.service(config.redis.listen, resp).setServiceParent(self)
            self.resp_factory = resp
        if config.http.listen:
            registry = registry_for(self)
            self.api = Api(
                self.router,
                reactor,
                cors_origins=config.http.cors_origins,
                max_value_bytes=limits.max_value_bytes,
                max_list=config.http.max_list,
                metrics=lambda: render(registry),
            )
            root: Any = self.api
            if self.cluster_manager is not None:
                root = _Root(self.api, AdminResource(self.cluster_manager))
            strports.service(config.http.listen, ApiSite(root)).setServiceParent(self)

    def _link(self, node_id: str, address: str, read_weight: float) -> NodeLink:
        config = self.config
        health = config.health
        client = DataNodeClient(
            self.reactor,
            address,
            config.secret.encode("utf-8"),
            client_id=config.id,
            request_timeout=health.request_timeout,
            retry_max_delay=max(health.ping_interval * 4, 0.5),
        )
        link = self.links[node_id] = NodeLink(
            node_id,
            client,
            self.reactor,
            ping_interval=health.ping_interval,
            ping_timeout=health.ping_timeout,
            read_weight=read_weight,
        )
        return link

    def adopt_map(self, m: dict[str, Any]) -> None:
        """Route by a (new) cluster map: links for new nodes, rings for the router."""
        wanted: dict[str, dict[str, Any]] = {n["id"]: n for n in m["nodes"]}
        if m.get("pending"):
            for n in m["pending"]["nodes_after"]:
                wanted.setdefault(n["id"], n)
        for node_id, node in wanted.items():
            if node_id not in self.links:
                link = self._link(node_id, node["address"], float(node.get("read_weight", 1.0)))
                if self.running:
                    link.start()
            else:
                self.links[node_id].read_weight = float(node.get("read_weight", 1.0))
        ring = ring_of(m)
        after = ring_of(m, after=True) if m.get("pending") else None
        self.ring = ring
        self.router.set_rings(ring, after)
        self.merger.ring = ring
        for node_id in [n for n in self.links if n not in wanted]:
            link = self.links.pop(node_id)
            link.stop()

    def startService(self) -> None:
        for link in self.links.values():
            link.start()
        self.merger.start()
        if self.cluster_manager is not None:
            self.cluster_manager.start()
        super().startService()

    def stopService(self) -> Any:
        self.merger.stop()
        if self.cluster_manager is not None:
            self.cluster_manager.stop()
        d = defer.maybeDeferred(super().stopService)
        stops = [defer.maybeDeferred(link.stop) for link in self.links.values()]
        return defer.gatherResults([d, *stops], consumeErrors=True)


def _port_of(endpoint: str) -> int:
    """The port number of a ``tcp:PORT:...`` endpoint string, for INFO; 0 if none."""
    parts = endpoint.split(":")
    for part in parts[1:]:
        if part.isdigit():
            return int(part)
        if part.startswith("port="):
            return int(part[5:]) if part[5:].isdigit() else 0
    return 0


class _Root(Resource):
    """``/v1/admin/...`` to the cluster admin API, everything else to the REST API."""

    isLeaf = True

    def __init__(self, api: Resource, admin: Resource) -> None:
        super().__init__()
        self.api = api
        self.admin = admin

    def render(self, request: Any) -> Any:
        if request.path.startswith(b"/v1/admin/"):
            return self.admin.render(request)
        return self.api.render(request)
