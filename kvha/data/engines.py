"""Build the storage engine a data node's configuration names."""

from __future__ import annotations

import os

from twisted.internet.interfaces import IReactorTime

from kvha.config import StorageConfig
from kvha.data.engine import Engine, MemoryEngine
from kvha.data.logengine import LogEngine


def make_engine(storage: StorageConfig, state_dir: str, clock: IReactorTime) -> Engine:
    if storage.engine == "memory":
        return MemoryEngine()
    if storage.engine == "log":
        return LogEngine(
            os.path.join(state_dir, "log"),
            clock,
            fsync=storage.fsync,
            segment_bytes=storage.segment_bytes,
            snapshot_interval=storage.snapshot_interval,
            snapshot_log_bytes=storage.snapshot_log_bytes,
        )
    raise ValueError(f"unknown storage engine {storage.engine!r}")  # config rejects it first
