"""An in-process twin of :class:`kvha.data.client.DataNodeClient`.

It calls a real :class:`kvha.data.server.DataNode` directly instead of over
TCP, so master logic (routing, fail-over, the client protocols) can be tested
without a network and without waiting, in the manner of Tahoe-LAFS's
``no_network`` grid.  ``tests/test_local_client.py`` runs the same checks
against this twin and against the real client over ``iosim``, so the two
cannot drift apart.

``disconnect()`` and ``reconnect()`` simulate a lost and a restored
connection; ``hold()`` makes requests hang until ``release()`` (a slow node).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred

from kvha.data.client import ApplyWaiter, Consumer, NodeUnavailable
from kvha.data.server import DataNode
from kvha.data.store import IncrMode, Result, Status, StoreMode
from kvha.record import HEADER_SIZE, pack, tombstone
from kvha.ring import TokenRange


class LocalDataClient:
    """Same methods and results as DataNodeClient, served by a DataNode in-process."""

    def __init__(self, node: DataNode, endpoint: str = "local") -> None:
        self.node = node
        self.endpoint = endpoint
        self.protocol: Optional[object] = object()
        self.on_ready: Optional[Callable[[Any], None]] = None
        self.on_lost: Optional[Callable[[Any], None]] = None
        self._held: Optional[list[tuple[Deferred, Callable[[], Any]]]] = None
        self.calls: dict[str, int] = {}

    # Connection simulation --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.protocol is not None

    def start(self) -> None:
        if self.on_ready is not None and self.protocol is not None:
            self.on_ready(_Proto(self.node.state))

    def stop(self) -> Deferred:
        return defer.succeed(None)

    def when_ready(self) -> Deferred:
        return defer.succeed(self.protocol)

    def disconnect(self) -> None:
        """As if the connection were reset: pending and new requests fail."""
        self.protocol = None
        if self.on_lost is not None:
            self.on_lost(_Proto(self.node.state))
        held, self._held = self._held, None
        for d, _ in held or ():
            d.errback(NodeUnavailable(f"connection to {self.node.node_id} lost"))

    def reconnect(self) -> None:
        self.protocol = object()
        if self.on_ready is not None:
            self.on_ready(_Proto(self.node.state))

    def hold(self) -> None:
        """Requests from now on wait until release() (or fail on disconnect())."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        held, self._held = self._held, None
        for d, work in held or ():
            defer.maybeDeferred(work).chainDeferred(d)

    def _call(self, name: str, work: Callable[[], Any]) -> Deferred:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.protocol is None:
            return defer.fail(NodeUnavailable(f"not connected to {self.endpoint}"))
        self.node.ops[name] = self.node.ops.get(name, 0) + 1
        if self._held is not None:
            d: Deferred = Deferred()
            self._held.append((d, work))
            return d
        return defer.maybeDeferred(work)

    # Operations ----------------------------------------------------------------------

    def get(self, partition: bytes, key: bytes, tombstones: bool = False) -> Deferred:
        store = self.node.store

        def work() -> Any:
            packed = store.get_packed(partition, key, tombstones)
            if packed is None:
                self.node.get_misses += 1
                return None
            self.node.get_hits += 1
            return Result(Status.OK, packed).record

        return self._call("get", work)

    def get_cb(
        self,
        partition: bytes,
        key: bytes,
        on_done: Callable[[Any], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        self.get(partition, key).addCallbacks(on_done, lambda f: on_fail(f.value))

    def apply_cb(
        self,
        partition: bytes,
        key: bytes,
        packed: bytes,
        on_done: Callable[[Any], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        self.apply(partition, key, packed).addCallbacks(on_done, lambda f: on_fail(f.value))

    def apply_to(self, partition: bytes, key: bytes, packed: bytes, waiter: ApplyWaiter) -> None:
        waiter.sent = packed
        self.apply(partition, key, packed).addCallbacks(
            waiter.applied, lambda f: waiter.failed(f.value)
        )

    def apply_many_cb(
        self,
        partition: bytes,
        keys: Sequence[bytes],
        records: Sequence[bytes],
        on_done: Callable[[Any], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        def work() -> Any:
            if len(keys) != len(records):
                raise ValueError("as many records as keys are needed")
            if any(len(packed) < HEADER_SIZE for packed in records):
                raise ValueError("packed record is shorter than its header")
            results = []
            for key, packed in zip(keys, records):
                result = self.node.store.apply(partition, key, packed)
                too_large = result.status is Status.TOO_LARGE
                results.append(Result(result.status, None if too_large else result.packed))
            return results

        self._call("apply_many", work).addCallbacks(on_done, lambda f: on_fail(f.value))

    def mget(self, partition: bytes, keys: Sequence[bytes], tombstones: bool = False) -> Deferred:
        store = self.node.store

        def work() -> Any:
            out = []
            for key in keys:
                packed = store.get_packed(partition, key, tombstones)
                out.append(None if packed is None else Result(Status.OK, packed).record)
            hits = sum(1 for r in out if r is not None)
            self.node.get_hits += hits
            self.node.get_misses += len(keys) - hits
            return out

        return self._call("mget", work)

    def apply(self, partition: bytes, key: bytes, packed: bytes) -> Deferred:
        def work() -> Any:
            if len(packed) < HEADER_SIZE:
                raise ValueError("packed record is shorter than its header")
            result = self.node.store.apply(partition, key, packed)
            return Result(
                result.status, None if result.status is Status.TOO_LARGE else result.packed
            )

        return self._call("apply", work)

    def set(
        self,
        partition: bytes,
        key: bytes,
        value: bytes,
        flags: int = 0,
        expires_ms: int = 0,
        version: int = 0,
    ) -> Deferred:
        return self.apply(partition, key, pack(value, version, flags, expires_ms))

    def store(
        self,
        mode: StoreMode,
        partition: bytes,
        key: bytes,
        value: bytes,
        flags: int = 0,
        expires_ms: int = 0,
        cas: int = 0,
    ) -> Deferred:
        return self._call(
            "store",
            lambda: _clean(
                self.node.store.store(mode, partition, key, value, flags, expires_ms, cas)
            ),
        )

    def incr(self, partition: bytes, key: bytes, mode: IncrMode, delta: bytes) -> Deferred:
        return self._call("incr", lambda: _clean(self.node.store.incr(partition, key, mode, delta)))

    def incr_cb(
        self,
        partition: bytes,
        key: bytes,
        mode: IncrMode,
        delta: bytes,
        on_done: Callable[[Any], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        self.incr(partition, key, mode, delta).addCallbacks(on_done, lambda f: on_fail(f.value))

    def touch(self, partition: bytes, key: bytes, expires_ms: int) -> Deferred:
        return self._call(
            "touch", lambda: _clean(self.node.store.touch(partition, key, expires_ms))
        )

    def delete(self, partition: bytes, key: bytes, version: int = 0) -> Deferred:
        return self._call("delete", lambda: _clean(self.node.store.delete(partition, key, version)))

    def delete_replica(self, partition: bytes, key: bytes, version: int) -> Deferred:
        return self.apply(partition, key, tombstone(version))

    def flush(self, partition: bytes) -> Deferred:
        return self._call("flush", lambda: self.node.store.flush(partition) and None)

    def scan(self, partition: bytes, after: int, count: int) -> Deferred:
        return self._call("scan", lambda: self.node.store.scan(partition, after, count))

    def retain(self, ranges: Sequence[TokenRange]) -> Deferred:
        return self._call("retain", lambda: self.node.retain(list(ranges)))

    def control(
        self,
        action: int,
        holder: str,
        lease_ms: int = 0,
        done_keys: int = 0,
        done_bytes: int = 0,
        total_keys: int = 0,
    ) -> Deferred:
        from kvha import wire

        def work() -> Any:
            reply = self.node.control(
                wire.Control(action, holder, lease_ms, done_keys, done_bytes, total_keys)
            )
            return (bool(reply.granted), reply.state, reply.high_water)

        return self._call("control", work)

    def partitions(self, epoch: int, table: Sequence[tuple[bytes, int, bool, int]]) -> Deferred:
        from kvha import wire

        msg = wire.Partitions(
            epoch,
            [t[0] for t in table],
            [t[1] for t in table],
            bytes(int(t[2]) for t in table),
            [t[3] for t in table],
        )
        return self._call("partitions", lambda: self.node.set_partitions(msg) and None)

    def ping(self) -> Deferred:
        return self._call("ping", lambda: (self.node.state, self.node.store.engine.high_water))

    def stats(self) -> Deferred:
        return self._call("stats", lambda: {k: str(v) for k, v in self.node.stats().items()})

    def stream(
        self,
        ranges: Sequence[TokenRange],
        min_version: int,
        consumer: Consumer,
        partitions: Sequence[bytes] = (),
        window: int = 8,
    ) -> Deferred:
        batch_size = self.node.stream_batch_records

        @defer.inlineCallbacks
        def work() -> Any:
            count = 0
            size = 0
            batch: list[tuple[bytes, bytes, bytes]] = []
            for record in list(self.node.store.stream(ranges, min_version, partitions)):
                batch.append(record)
                count += 1
                size += len(record[0]) + len(record[1]) + len(record[2]) + 10
                if len(batch) >= batch_size:
                    yield consumer(batch)
                    batch = []
            if batch:
                yield consumer(batch)
            return (count, size)

        return self._call("stream", work)


def _clean(result: Result) -> Result:
    # The wire carries no record with TOO_LARGE; keep the twin identical.
    if result.status is Status.TOO_LARGE:
        return Result(Status.TOO_LARGE, None)
    return result


class _Proto:
    """What on_ready/on_lost callbacks receive: enough of DataClientProtocol."""

    def __init__(self, state: str) -> None:
        self.node_state = state
