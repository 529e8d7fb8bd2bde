"""A master node: links to every data node, the ring, the router, the listeners.

It also keeps the data nodes' partition rules (quotas, default TTLs) in step
with the cluster map: the table is pushed to a node whenever its link comes
up and to every node whenever the map changes.
"""

from __future__ import annotations

import os
import random
from typing import Any, Optional

from twisted.application import service, strports
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger, LogLevel
from twisted.web.resource import Resource

from kvha.config import MasterConfig
from kvha.data.client import DataNodeClient
from kvha.flush import TurnFlusher
from kvha.master.auth import Authenticator, thread_verifier
from kvha.master.cluster import AdminResource, ClusterManager, initial_map, ring_of
from kvha.master.handoff import HandoffReceiver, plain_tcp
from kvha.master.health import DOWN, NodeLink
from kvha.master.http import Api, ApiSite
from kvha.master.limits import ConnectionBudget
from kvha.master.memcache import MemcacheFactory, MemcacheStats
from kvha.master.merge import Merger
from kvha.master.metrics import registry_for, render
from kvha.master.partitions import entry_from_config, node_tables, policy_from_entry
from kvha.master.resp import RespFactory
from kvha.master.router import PartitionPolicy, Router
from kvha.ring import Ring

log = Logger()


class MasterNode(service.MultiService):
    """Everything one master runs; the listeners are child services."""

    def __init__(self, config: MasterConfig, reactor: Any, rng: Optional[random.Random] = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        cluster = config.cluster
        health = config.health
        #: One send per connection per reactor turn, for clients and data nodes alike.
        self.flusher = TurnFlusher(reactor)
        self.flusher.flush_before_shutdown(reactor)
        self.links: dict[str, NodeLink] = {}
        for node in cluster.nodes:
            self._link(node.id, node.address, node.read_weight)
        self.ring = Ring.build([(n.id, n.weight) for n in cluster.nodes], cluster.vnodes)
        #: The partitions of the map this master routes by, and the epoch of that map.
        self.partition_entries: list[dict[str, Any]] = [
            entry_from_config(p) for p in cluster.partitions
        ]
        self.map_epoch = 0
        self._policies: dict[str, tuple[dict[str, Any], PartitionPolicy]] = {}
        self.router = Router(
            self.ring,
            self.links,
            cluster.replicas,
            self._policies_for(self.partition_entries),
            reactor,
            rng,
        )
        # Until enough data nodes are up (or health.startup_wait passes), refuse
        # data commands: see Router.loading.
        self.router.loading = health.startup_wait > 0
        self._startup_timer: Any = None
        self.authenticator = Authenticator(
            self.router,
            thread_verifier(reactor),
            max_failures=config.limits.auth_failures,
            window=config.limits.auth_window,
        )
        self.budget = ConnectionBudget(config.limits.max_connections)
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
                    self.partition_entries,
                ),
                config.state_dir,
                list(config.peers),
                config.admin_token,
                poll_interval=health.ping_interval,
                grace=merge.grace,
                takeover_after=merge.lease,
            )
        self.memcache_stats = MemcacheStats(reactor)
        self.resp_factory: Optional[RespFactory] = None
        self.api: Optional[Api] = None
        limits = config.limits
        #: The client listeners whose connections a load balancer may hand over.
        adoptable: dict[str, Any] = {}
        if config.memcached.listen:
            factory = self._memcache_factory(config.memcached.partition, bound=False)
            strports.service(config.memcached.listen, factory).setServiceParent(self)
            if plain_tcp(config.memcached.listen):
                adoptable["memcached"] = factory
        if config.redis.listen:
            resp = self._resp_factory(config.redis.partition, config.redis.listen, bound=False)
            strports.service(config.redis.listen, resp).setServiceParent(self)
            self.resp_factory = resp
            if plain_tcp(config.redis.listen):
                adoptable["redis"] = resp
        for bound in config.bound_listeners:
            if bound.protocol == "memcached":
                listener: Any = self._memcache_factory(bound.partition, bound=True)
            else:
                listener = self._resp_factory(bound.partition, bound.listen, bound=True)
            strports.service(bound.listen, listener).setServiceParent(self)
        if config.http.listen:
            registry = registry_for(self)
            self.api = Api(
                self.router,
                reactor,
                cors_origins=config.http.cors_origins,
                max_value_bytes=limits.max_value_bytes,
                max_list=config.http.max_list,
                metrics=lambda: render(registry),
                authenticator=self.authenticator,
            )
            root: Any = self.api
            if self.cluster_manager is not None:
                root = _Root(self.api, AdminResource(self.cluster_manager))
            site = ApiSite(
                root,
                budget=self.budget,
                idle_timeout=limits.idle_timeout,
                max_line_bytes=limits.max_line_bytes,
            )
            strports.service(config.http.listen, site).setServiceParent(self)
            if plain_tcp(config.http.listen):
                adoptable["http"] = site
        self.handoff: Optional[HandoffReceiver] = None
        if config.handoff:
            self.handoff = HandoffReceiver(reactor, config.id, adoptable)
            os.makedirs(os.path.dirname(config.handoff), exist_ok=True)
            # wantPID: a lock file beside the socket, so a socket file left by
            # a killed master is removed rather than blocking the restart.
            endpoint = UNIXServerEndpoint(reactor, config.handoff, mode=0o600, wantPID=True)
            StreamServerEndpointService(endpoint, self.handoff).setServiceParent(self)

    def _memcache_factory(self, partition: str, bound: bool) -> MemcacheFactory:
        limits = self.config.limits
        return MemcacheFactory(
            self.router,
            partition.encode(),
            self.reactor,
            self.memcache_stats,
            max_connections=limits.max_connections,
            max_in_flight=limits.max_in_flight,
            max_line_bytes=limits.max_line_bytes,
            max_value_bytes=limits.max_value_bytes,
            idle_timeout=limits.idle_timeout,
            authenticator=self.authenticator,
            budget=self.budget,
            bound=bound,
            flusher=self.flusher,
        )

    def _resp_factory(self, partition: str, listen: str, bound: bool) -> RespFactory:
        limits = self.config.limits
        return RespFactory(
            self.router,
            partition.encode(),
            self.reactor,
            port=_port_of(listen),
            max_connections=limits.max_connections,
            max_in_flight=limits.max_in_flight,
            max_value_bytes=limits.max_value_bytes,
            max_line_bytes=limits.max_line_bytes,
            idle_timeout=limits.idle_timeout,
            authenticator=self.authenticator,
            budget=self.budget,
            bound=bound,
            flusher=self.flusher,
        )

    # Partitions ----------------------------------------------------------------------

    def _policies_for(self, entries: list[dict[str, Any]]) -> list[PartitionPolicy]:
        """Policies for map entries; an unchanged entry keeps its policy (and what it verified)."""
        policies = {}
        out = []
        for e in entries:
            old = self._policies.get(e["name"])
            policy = old[1] if old is not None and old[0] == e else policy_from_entry(e)
            policies[e["name"]] = (e, policy)
            out.append(policy)
        self._policies = policies
        return out

    def push_partitions(self, links: Optional[list[NodeLink]] = None) -> None:
        """Send each connected data node its partition rules (its shares of the quotas)."""
        router = self.router
        rings = [router.ring] + ([router.write_ring] if router.write_ring is not None else [])
        tables = node_tables(router.policies.values(), rings, router.copies)
        for link in links if links is not None else list(self.links.values()):
            if not link.client.connected:
                continue
            d = link.client.partitions(self.map_epoch, tables.get(link.node_id, []))
            d.addErrback(self._push_failed, link.node_id)

    def _push_failed(self, failure: Any, node_id: str) -> None:
        log.warn(
            "could not send partition rules to data node {node}: {why}",
            node=node_id,
            why=failure.getErrorMessage(),
        )

    def _link_changed(self, link: NodeLink, old: str, state: str) -> None:
        if state != DOWN:
            self.push_partitions([link])
        self._maybe_end_loading()

    def _maybe_end_loading(self) -> None:
        if self.router.loading and self.router.serving():
            self._end_loading("enough data nodes are up to read every key")

    def _cancel_startup_timer(self) -> None:
        if self._startup_timer is not None and self._startup_timer.active():
            self._startup_timer.cancel()
        self._startup_timer = None

    def _end_loading(self, why: str, level: LogLevel = LogLevel.info) -> None:
        """Start serving data commands (see Router.loading)."""
        self._cancel_startup_timer()
        if not self.router.loading:
            return
        self.router.loading = False
        log.emit(
            level,
            "serving clients: {why} ({up} of {nodes} data nodes up)",
            why=why,
            up=self.router.links_up(),
            nodes=len(self.links),
        )

    def _startup_wait_over(self) -> None:
        self._startup_timer = None
        self._end_loading(
            f"health.startup_wait ({self.config.health.startup_wait}s) passed; "
            "keys without a live copy fail",
            LogLevel.warn,
        )

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
            flusher=self.flusher,
        )
        link = self.links[node_id] = NodeLink(
            node_id,
            client,
            self.reactor,
            ping_interval=health.ping_interval,
            ping_timeout=health.ping_timeout,
            read_weight=read_weight,
            on_change=self._link_changed,
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
        self.map_epoch = int(m.get("epoch", 0))
        entries = m.get("partitions")
        if entries is not None:
            self.partition_entries = list(entries)
            self.router.set_partitions(self._policies_for(self.partition_entries))
        self.push_partitions()
        self._maybe_end_loading()

    def startService(self) -> None:
        for link in self.links.values():
            link.start()
        if self.router.loading:
            self._startup_timer = self.reactor.callLater(
                self.config.health.startup_wait, self._startup_wait_over
            )
        self.merger.start()
        if self.cluster_manager is not None:
            self.cluster_manager.start()
        super().startService()

    def stopService(self) -> Any:
        self._cancel_startup_timer()
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
