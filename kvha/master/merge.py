"""Automatic Merge: bring a data node that (re)started up to date from its copies.

A data node starts ``merging``: masters write to it but never read from it.
One master claims the merge (a lease on the node, renewed with progress, so
that a master that dies mid-merge is replaced), waits ``grace`` so that every
master has seen the node back and is writing to it, then streams from the
other live copies every record of the node's ranges newer than the node's
high-water version minus ``skew_window`` (all of them for a ``memory`` node),
tombstones included.  Each batch is applied with "newer version wins", so
writes that reached the node during the merge are kept, and the next batch is
asked for only once the previous one is applied (flow control).  When every
source is done the master tells the node it is ``up``.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kvha import wire
from kvha.clock import version_from_millis, version_millis
from kvha.master.health import MERGING, UP, NodeLink
from kvha.ring import TOKEN_SPACE, Ring, TokenRange

log = Logger()


def merge_sources(ring: Ring, target: str, copies: int) -> dict[str, list[TokenRange]]:
    """For each other node, the arcs it shares with ``target`` as a copy."""
    out: dict[str, list[TokenRange]] = {}
    for lo, hi, holders in ring.arcs(copies):
        if target not in holders:
            continue
        for node_id in holders:
            if node_id != target:
                out.setdefault(node_id, []).append((lo, hi))
    return out


def _span(ranges: list[TokenRange]) -> float:
    return sum(((hi - lo) % TOKEN_SPACE or TOKEN_SPACE) for lo, hi in ranges) / TOKEN_SPACE


class MergeJob:
    """One merge of one target node, driven by this master."""

    def __init__(self, merger: Merger, target: NodeLink, high_water: int) -> None:
        self.merger = merger
        self.target = target
        self.high_water = high_water
        self.keys = 0
        self.bytes = 0
        self.total = 0
        self.min_version = 0
        if high_water:
            skew_ms = int(merger.skew_window * 1000)
            self.min_version = version_from_millis(version_millis(high_water) - skew_ms)

    def progress(self) -> tuple[int, int, int]:
        return self.keys, self.bytes, self.total

    @defer.inlineCallbacks
    def run(self) -> Any:
        merger = self.merger
        target = self.target
        yield task.deferLater(merger.clock, merger.grace, lambda: None)
        sources = merge_sources(merger.ring, target.node_id, merger.copies)
        live = {
            node_id: ranges
            for node_id, ranges in sources.items()
            if merger.links[node_id].state == UP and merger.links[node_id].client.connected
        }
        missing = sorted(set(sources) - set(live))
        if missing:
            log.warn(
                "merging {node}: copies {missing} are not up; their share is merged from the "
                "other copies only",
                node=target.node_id,
                missing=",".join(missing),
            )
        for node_id, ranges in live.items():
            try:
                stats = yield merger.links[node_id].client.stats()
                self.total += int(int(stats.get("records", 0)) * _span(ranges))
            except Exception:
                pass
        log.info(
            "merging {node} from {sources} (versions above {min}; about {total} records)",
            node=target.node_id,
            sources=",".join(sorted(live)) or "nobody",
            min=self.min_version,
            total=self.total,
        )
        for node_id, ranges in sorted(live.items()):
            source = merger.links[node_id]
            yield source.client.stream(ranges, self.min_version, self._apply, window=merger.window)
        return self.progress()

    def _apply(self, batch: list[tuple[bytes, bytes, bytes]]) -> Deferred:
        client = self.target.client
        ds = []
        for partition, key, packed in batch:
            self.keys += 1
            self.bytes += len(partition) + len(key) + len(packed)
            ds.append(client.apply(partition, key, packed))
        d = defer.gatherResults(ds, consumeErrors=True)
        rate = self.merger.max_bytes_per_second
        if rate:
            size = sum(len(p) + len(k) + len(v) for p, k, v in batch)
            d.addCallback(lambda _: task.deferLater(self.merger.clock, size / rate, lambda: None))
        return d


class Merger:
    """Watches every data node and merges the ones that are ``merging``."""

    def __init__(
        self,
        master_id: str,
        ring: Ring,
        links: dict[str, NodeLink],
        copies: int,
        clock: IReactorTime,
        skew_window: float = 1.0,
        lease: float = 5.0,
        grace: float = 1.0,
        window: int = 8,
        max_bytes_per_second: int = 0,
        check_interval: float = 0.5,
    ) -> None:
        self.master_id = master_id
        self.ring = ring
        self.links = links
        self.copies = copies
        self.clock = clock
        self.skew_window = skew_window
        self.lease = lease
        self.grace = grace
        self.window = window
        self.max_bytes_per_second = max_bytes_per_second
        self.check_interval = check_interval
        self.jobs: dict[str, MergeJob] = {}
        self.completed: list[tuple[str, int, int]] = []  # (node, keys, bytes)
        self._loop: Optional[task.LoopingCall] = None

    def start(self) -> None:
        loop = task.LoopingCall(self._check)
        loop.clock = self.clock
        loop.start(self.check_interval, now=False)
        self._loop = loop

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for node_id in list(self.jobs):
            self.links[node_id].client.control(wire.CONTROL_RELEASE, self.master_id).addErrback(
                lambda f: None
            )

    def _check(self) -> None:
        for node_id, link in self.links.items():
            if node_id in self.jobs:
                self._renew(link)
            elif link.state == MERGING and link.client.connected:
                self._claim(link)

    def _claim(self, link: NodeLink) -> None:
        d = link.client.control(wire.CONTROL_CLAIM, self.master_id, int(self.lease * 1000))

        def claimed(answer: tuple[bool, str, int]) -> None:
            granted, _state, high_water = answer
            if not granted or link.node_id in self.jobs:
                return
            job = MergeJob(self, link, high_water)
            self.jobs[link.node_id] = job
            job.run().addCallbacks(
                self._done, self._failed, callbackArgs=(link,), errbackArgs=(link,)
            )

        d.addCallbacks(claimed, lambda f: None)

    def _renew(self, link: NodeLink) -> None:
        job = self.jobs[link.node_id]
        keys, size, total = job.progress()
        link.client.control(
            wire.CONTROL_CLAIM, self.master_id, int(self.lease * 1000), keys, size, max(total, keys)
        ).addErrback(lambda f: None)

    def _done(self, progress: tuple[int, int, int], link: NodeLink) -> Any:
        keys, size, total = progress
        job = self.jobs.pop(link.node_id, None)
        self.completed.append((link.node_id, keys, size))
        log.info(
            "merge of {node} done: {keys} records, {bytes} bytes",
            node=link.node_id,
            keys=keys,
            bytes=size,
        )
        d = link.client.control(
            wire.CONTROL_FINISH, self.master_id, 0, keys, size, max(total, keys)
        )
        d.addErrback(
            lambda f: log.warn(
                "could not finish merge of {node}: {why}",
                node=link.node_id,
                why=f.getErrorMessage(),
            )
        )
        return job

    def _failed(self, failure: Any, link: NodeLink) -> None:
        self.jobs.pop(link.node_id, None)
        log.warn(
            "merge of {node} failed, will retry: {why}",
            node=link.node_id,
            why=failure.getErrorMessage(),
        )
        if link.client.connected:
            link.client.control(wire.CONTROL_RELEASE, self.master_id).addErrback(lambda f: None)
