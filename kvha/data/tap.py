"""``twistd kvha-data --config FILE``: the data node as a twistd service."""

from __future__ import annotations

from typing import Any, Optional

from twisted.application import service, strports
from twisted.logger import Logger

from kvha.compiled import log_build
from kvha.config import DataConfig, warn_placeholders
from kvha.data.engines import make_engine
from kvha.data.server import DataNode, DataServerFactory
from kvha.gctune import tune_gc
from kvha.tapoptions import RoleOptions

log = Logger()


class Options(RoleOptions):
    ROLE = "data"


def build_node(config: DataConfig, reactor: Optional[Any] = None) -> DataNode:
    """The data node service described by ``config`` (without its listener)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    engine = make_engine(config.storage, config.state_dir, reactor)
    return DataNode(
        config.id,
        engine,
        config.secret.encode("utf-8"),
        reactor,
        tombstone_ttl=config.tombstone_ttl,
        max_value_bytes=config.limits.max_value_bytes,
        max_frame_bytes=config.limits.max_frame_bytes,
        max_connections=config.limits.max_connections,
        max_in_flight=config.limits.max_in_flight,
        sweep_interval=config.expiry_sweep_interval,
        sweep_batch=config.expiry_sweep_batch,
        stream_batch_records=config.stream.batch_records,
        stream_max_bytes_per_second=config.stream.max_bytes_per_second,
        merge_on_start=config.merge_on_start,
        state_dir=config.state_dir,
    )


def makeService(options: Options) -> service.MultiService:
    config: DataConfig = options["data"]
    warn_placeholders(config, "data", log)
    top = service.MultiService()
    node = build_node(config)
    node.setServiceParent(top)  # opens the store before the port listens
    strports.service(config.listen, DataServerFactory(node)).setServiceParent(top)
    log_build(log, "data node")
    tune_gc()
    return top
