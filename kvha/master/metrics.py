"""Prometheus metrics of a master, served as text on the HTTP port's /metrics."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvha.master.memcache import MemcacheStats


class MasterCollector:
    """Reads the master's own counters at scrape time; nothing on the hot path."""

    def __init__(self, master: Any) -> None:
        self.master = master

    def collect(self) -> Iterator[Metric]:
        master = self.master
        up = GaugeMetricFamily(
            "kvha_data_node_up", "1 if the data node is up, 0 if down or merging", labels=["node"]
        )
        skipped = CounterMetricFamily(
            "kvha_data_node_skipped_writes",
            "Writes a data node missed while down (for merge to repair)",
            labels=["node"],
        )
        for node_id, link in master.links.items():
            up.add_metric([node_id], 1.0 if link.state == "up" else 0.0)
            skipped.add_metric([node_id], float(link.skipped_writes))
        yield up
        yield skipped
        stats: MemcacheStats = master.memcache_stats
        mc = CounterMetricFamily(
            "kvha_memcached_commands", "memcached protocol counters", labels=["counter"]
        )
        for name in MemcacheStats.COUNTERS:
            mc.add_metric([name], float(stats.total(name)))
        yield mc
        yield GaugeMetricFamily(
            "kvha_memcached_connections", "Open memcached connections", value=stats.curr_connections
        )
        resp = master.resp_factory
        if resp is not None:
            calls = CounterMetricFamily(
                "kvha_redis_commands", "Redis commands processed", labels=["command"]
            )
            for name, count in sorted(resp.calls.items()):
                calls.add_metric([name], float(count))
            yield calls
            yield GaugeMetricFamily(
                "kvha_redis_connections", "Open Redis connections", value=len(resp.clients)
            )
        api = master.api
        if api is not None:
            yield CounterMetricFamily("kvha_http_requests", "HTTP requests", value=api.requests)
            errors = CounterMetricFamily(
                "kvha_http_errors", "HTTP error replies by status", labels=["code"]
            )
            for code, count in sorted(api.errors.items()):
                errors.add_metric([str(code)], float(count))
            yield errors
        yield CounterMetricFamily(
            "kvha_quorum_read_repairs",
            "Stale copies repaired by quorum reads",
            value=master.router.repairs,
        )
        yield GaugeMetricFamily(
            "kvha_master_loading",
            "1 while the master starts and refuses clients (LOADING), until enough data "
            "nodes are up to read every key",
            value=1.0 if master.router.loading else 0.0,
        )
        auth = getattr(master, "authenticator", None)
        if auth is not None:
            logins = CounterMetricFamily(
                "kvha_logins",
                "Logins (Redis AUTH/HELLO, memcached auth set, HTTP bearer tokens: every "
                "HTTP request with one) by outcome; refused: not checked, the address "
                "failed too often",
                labels=["outcome"],
            )
            logins.add_metric(["success"], float(auth.successes))
            logins.add_metric(["failure"], float(auth.failures))
            logins.add_metric(["refused"], float(auth.refused))
            yield logins
        manager = getattr(master, "cluster_manager", None)
        if manager is not None:
            yield GaugeMetricFamily(
                "kvha_scaling_taken_over",
                "1 while this master drives a join or leave for a driver it has not heard",
                value=1.0 if manager.taken_over is not None else 0.0,
            )


def registry_for(master: Any) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MasterCollector(master))  # type: ignore[arg-type]
    return registry


def render(registry: Optional[CollectorRegistry]) -> bytes:
    return generate_latest(registry) if registry is not None else b""
