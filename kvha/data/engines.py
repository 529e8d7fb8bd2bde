"""Build the storage engine a data node's configuration names."""

from __future__ import annotations

import os

from twisted.internet.interfaces import IReactorTime

from kvha.config import StorageConfig
from kvha.data.engine import Engine, MemoryEngine
from kvha.data.logengine import LogEngine


def make_engine(storage: StorageConfig, state_dir: str, clock: IReactorTime) -> Engine:
    """The engine ``storage.engine`` names, keeping its files in a subdirectory of ``state_dir``.

    Each engine has its own subdirectory (``log/``, ``disk/``, ``mmap/``,
    ``mmap-index/``), so switching a node's engine never misreads another's files.
    """
    if storage.engine == "memory":
        return MemoryEngine()
    directory = os.path.join(state_dir, storage.engine)
    if storage.engine == "log":
        return LogEngine(
            directory,
            clock,
            fsync=storage.fsync,
            segment_bytes=storage.segment_bytes,
            snapshot_interval=storage.snapshot_interval,
            snapshot_log_bytes=storage.snapshot_log_bytes,
        )
    if storage.engine == "disk":
        from kvha.data.diskengine import DiskEngine

        return DiskEngine(
            directory,
            clock,
            fsync=storage.fsync,
            segment_bytes=storage.segment_bytes,
            compaction_garbage_ratio=storage.compaction_garbage_ratio,
            compaction_min_bytes=storage.compaction_min_bytes,
        )
    if storage.engine == "mmap":
        # Imported here: only the LMDB engines need the lmdb package.
        from kvha.data.mmapengine import MmapEngine

        return MmapEngine(directory, clock, fsync=storage.fsync, map_size=storage.map_size)
    if storage.engine == "mmap-index":
        from kvha.data.mmapindex import MmapIndexEngine

        return MmapIndexEngine(
            directory,
            clock,
            fsync=storage.fsync,
            segment_bytes=storage.segment_bytes,
            compaction_garbage_ratio=storage.compaction_garbage_ratio,
            compaction_min_bytes=storage.compaction_min_bytes,
            map_size=storage.map_size,
        )
    raise ValueError(f"unknown storage engine {storage.engine!r}")  # config rejects it first
