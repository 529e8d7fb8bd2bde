"""Routing: which data nodes a request goes to, and when it is done.

The protocols (memcached now; Redis and HTTP later) call this module and
never talk to data nodes themselves, so every client protocol gets the same
guarantees (DESIGN §3):

* **Reads** go to one live copy chosen by ``read_weight`` and fall over to
  the next copy, within the same request, on error or timeout.  With
  ``read: quorum`` a majority is read, the newest version wins, and stale
  copies are repaired.
* **Writes** go to every live copy at once, with a version from this master's
  hybrid logical clock, and are acknowledged per ``write_acks``.  A copy that
  is down is skipped and counted, for merge to repair.
* **Conditional operations** run on the primary (the first live copy in
  ring order), which issues the version; the record it returns is then
  replicated like a write.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Callable, Optional, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kvha.clock import HybridLogicalClock
from kvha.data.api import DataClient
from kvha.data.client import ApplyWaiter, DataNodeError, NodeUnavailable, RequestTimeout
from kvha.data.store import IncrMode, Result, Status, StoreMode
from kvha.master.health import NodeLink
from kvha.record import HEADER, Record, pack
from kvha.ring import Ring


class NodeOp(Protocol):
    """``op(client)``: one request to one data node.

    A callback protocol rather than ``Callable[[DataClient], Deferred]``
    so that mypy accepts the lambdas that bind a loop variable as a default
    (``lambda c, k=k: ...``).  Defined at run time, not only for type
    checkers: mypyc (see setup.py) compiles this module against it.
    """

    def __call__(self, client: DataClient, /) -> Deferred: ...


log = Logger(namespace=__name__)  # compiled (mypyc): no frame to take the name from

#: Why a starting master refuses clients (Router.loading), in every protocol's error.
LOADING_WHY = "too few data nodes are up yet to read every key"

#: Errors after which a read tries the next copy.
RETRYABLE = (NodeUnavailable, RequestTimeout, DataNodeError)


class Unavailable(Exception):
    """Not enough live copies to serve the request."""


class OutOfSpace(Exception):
    """The partition is at its quota and refuses writes (policy ``reject``)."""

    def __init__(self, message: str = "out of memory storing object") -> None:
        super().__init__(message)


class Change:
    """What a read-modify-write decided: store a new value, or delete."""

    __slots__ = ("delete", "value", "flags", "expires_ms")

    def __init__(self, delete: bool, value: bytes = b"", flags: int = 0, expires_ms: int = 0):
        self.delete = delete
        self.value = value
        self.flags = flags
        self.expires_ms = expires_ms

    @classmethod
    def store(cls, value: bytes, flags: int = 0, expires_ms: int = 0) -> Change:
        return cls(False, value, flags, expires_ms)

    @classmethod
    def remove(cls) -> Change:
        return cls(True)


class PartitionPolicy:
    """One partition's settings as the master applies them (from the cluster map).

    ``verified`` remembers, as keyed MACs, passwords already checked against
    ``password_hash`` (see :mod:`kvha.master.auth`); a new policy object, made
    when the map changes, starts with none.
    """

    __slots__ = (
        "name",
        "write_acks",
        "read",
        "password_hash",
        "anonymous",
        "max_bytes",
        "when_full",
        "default_ttl_ms",
        "reject_at_primary",
        "verified",
    )

    def __init__(
        self,
        name: str,
        write_acks: str = "all",
        read: str = "one",
        *,
        password_hash: Optional[str] = None,
        anonymous: Optional[bool] = None,
        max_bytes: Optional[int] = None,
        when_full: str = "reject",
        default_ttl_ms: int = 0,
    ) -> None:
        self.name = name
        self.write_acks = write_acks
        self.read = read
        self.password_hash = password_hash
        self.anonymous = password_hash is None if anonymous is None else anonymous
        self.max_bytes = max_bytes
        self.when_full = when_full
        self.default_ttl_ms = default_ttl_ms
        #: Writes are decided by the key's primary, so that a full partition
        #: refuses a write on every copy or on none.
        self.reject_at_primary = max_bytes is not None and when_full == "reject"
        self.verified: set[bytes] = set()


#: Bytes of keys and records one ApplyMany carries at most (a data node's
#: max_frame_bytes leaves at least 64 KiB beside its largest value).
APPLY_MANY_BYTES = 64 * 1024

#: Results of an operation at the primary that leave a record to copy to the others.
_REPLICATED = frozenset((Status.STORED, Status.TOUCHED, Status.DELETED))


class _ApplyBatch:
    """The records of one ApplyMany to one data node, and each one's fan-out."""

    __slots__ = ("keys", "records", "fans", "size")

    def __init__(self) -> None:
        self.keys: list[bytes] = []
        self.records: list[bytes] = []
        self.fans: list[_Fanout] = []
        self.size = 0

    def add(self, key: bytes, packed: bytes, fan: _Fanout, size: int) -> None:
        self.keys.append(key)
        self.records.append(packed)
        self.fans.append(fan)
        self.size += size


class _Fanout:
    """Counts answers to one write sent to several copies.

    The outcome goes to ``on_done(result)`` / ``on_fail(exception)``; without
    them, to the Deferred ``d``.
    """

    __slots__ = (
        "d",
        "on_done",
        "on_fail",
        "required",
        "wait_all",
        "pending",
        "ok",
        "errors",
        "first",
        "fired",
    )

    def __init__(
        self,
        required: int,
        pending: int,
        wait_all: bool,
        on_done: Optional[Callable[[Any], None]] = None,
        on_fail: Optional[Callable[[BaseException], None]] = None,
    ) -> None:
        if on_done is None or on_fail is None:
            self.d: Optional[Deferred] = Deferred()
            on_done, on_fail = self.d.callback, self.d.errback
        else:
            self.d = None
        self.on_done = on_done
        self.on_fail = on_fail
        self.required = required
        self.wait_all = wait_all
        self.pending = pending
        self.ok = 0
        self.errors: Optional[list[Any]] = None  # made at the first error
        self.first: Optional[Result] = None
        self.fired = False

    def answer(self, result: Any, good: bool) -> None:
        self.pending -= 1
        if good:
            self.ok += 1
            if self.first is None:
                self.first = result
        elif self.errors is None:
            self.errors = [result]
        else:
            self.errors.append(result)
        if self.fired:
            return
        if self.ok >= self.required and (not self.wait_all or self.pending == 0):
            self.fired = True
            self.on_done(self.first)
        elif self.pending == 0:
            self.fired = True
            why = str(self.errors[0]) if self.errors else "no live copy"
            self.on_fail(
                Unavailable(f"{self.ok} of {self.required} required copies stored it ({why})")
            )

    def stored(self, result: Any) -> None:
        self.answer(result, True)


class _CopyWrite(ApplyWaiter):
    """One copy's Apply of a write (Router._fanout_cb): its answer goes to the fan."""

    __slots__ = ("router", "fan", "link")

    def __init__(self, router: Router, fan: _Fanout, link: NodeLink) -> None:
        super().__init__()
        self.router = router
        self.fan = fan
        self.link = link

    def applied(self, result: Result) -> None:
        self.fan.answer(result, True)

    def failed(self, error: BaseException) -> None:
        self.router._write_failed(error, self.fan, self.link)


def _note_deleted(r: Result, seen_live: list[bool]) -> Result:
    """Note whether a copy held the key a delete reached (Router.delete)."""
    seen_live.append(r.status is Status.DELETED)
    return r


class _RetryRead:
    """A read's error handler while other copies remain: :meth:`Router._reread` there.

    An object, not a closure: compiled closures that nest functions keep
    themselves alive in a reference cycle, which only the cyclic collector
    frees (tests/test_no_cycles.py).
    """

    __slots__ = ("router", "order", "partition", "key", "ceiling", "on_done", "on_fail")

    def __init__(
        self,
        router: Router,
        order: list[NodeLink],
        partition: bytes,
        key: bytes,
        ceiling: int,
        on_done: Callable[[Optional[Record]], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        self.router = router
        self.order = order
        self.partition = partition
        self.key = key
        self.ceiling = ceiling
        self.on_done = on_done
        self.on_fail = on_fail

    def failed(self, error: BaseException) -> None:
        if not isinstance(error, RETRYABLE):
            self.on_fail(error)
            return
        d = self.router._reread(error, self.order, self.partition, self.key, self.ceiling)
        d.addCallbacks(self.on_done, self.failed_again)

    def failed_again(self, failure: Any) -> None:
        self.on_fail(failure.value)


class Router:
    """Requests in, data-node operations out."""

    def __init__(
        self,
        ring: Ring,
        links: dict[str, NodeLink],
        replicas: int,
        partitions: Sequence[PartitionPolicy],
        clock: IReactorTime,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.ring = ring
        #: During a join or leave: the ring after it.  Writes go to the copies
        #: under both rings; reads use ``ring`` until the change is cut over.
        self.write_ring: Optional[Ring] = None
        self.links = links
        self.copies = replicas + 1
        self.policies = {p.name.encode(): p for p in partitions}
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.hlc = HybridLogicalClock(clock.seconds)
        self.repairs = 0
        self._copies_cache: dict[tuple[str, ...], list[NodeLink]] = {}
        self._write_cache: dict[tuple[str, ...], list[NodeLink]] = {}
        #: Flushes sent per partition: a quorum read does not repair across one.
        self._flushes: dict[bytes, int] = {}
        #: True while the master is starting and cannot yet read every key (see
        #: :meth:`serving`): the protocols then refuse data commands with their
        #: "loading" error, and fail the load balancers' health probes, instead of
        #: taking writes they could not read back.  Set and cleared by the master.
        self.loading = False

    def serving(self, quorum: bool = True) -> bool:
        """Whether every key can be read: enough data nodes are up.

        A read needs one copy up, or (with ``quorum``, as a starting master
        asks before it leaves LOADING) a majority of the copies in a
        partition with ``read: quorum``.  With ``copies`` copies of each key
        on distinct nodes, any ``nodes - copies + needed`` nodes up hold
        ``needed`` copies of every key.  ``/health`` asks for one copy only:
        a load balancer that dropped every master because one partition
        cannot reach a majority would cut off all the others too.
        """
        needed = 1
        if quorum and any(p.read == "quorum" for p in self.policies.values()):
            needed = self.copies // 2 + 1
        up = self.links_up()
        return up >= needed and up >= len(self.links) - self.copies + needed

    def links_up(self) -> int:
        """How many data nodes are up (readable)."""
        return sum(1 for link in self.links.values() if link.state == "up")

    def policy(self, partition: bytes) -> PartitionPolicy:
        policy = self.policies.get(partition)
        if policy is None:
            raise KeyError(f"unknown partition {partition.decode(errors='replace')!r}")
        return policy

    def set_partitions(self, partitions: Sequence[PartitionPolicy]) -> None:
        """Follow a new cluster map's partitions (connections keep their partition name)."""
        self.policies = {p.name.encode(): p for p in partitions}

    def set_rings(self, ring: Ring, write_ring: Optional[Ring] = None) -> None:
        """Switch to a new cluster map's rings (links must already exist)."""
        self.ring = ring
        self.write_ring = write_ring
        self._copies_cache.clear()
        self._write_cache.clear()

    def write_copies_of(self, partition: bytes, key: bytes) -> list[NodeLink]:
        """Where a write goes: the copies under the current ring, plus the new ring's."""
        if self.write_ring is None:
            return self.copies_of(partition, key)
        ids = self.ring.nodes_for(partition, key, self.copies)
        extra = [n for n in self.write_ring.nodes_for(partition, key, self.copies) if n not in ids]
        both = ids + tuple(extra)
        links = self._write_cache.get(both)
        if links is None:
            links = self._write_cache[both] = [self.links[i] for i in both]
        return links

    def copies_of(self, partition: bytes, key: bytes) -> list[NodeLink]:
        """The key's copies in ring order: main node first."""
        ids = self.ring.nodes_for(partition, key, self.copies)
        links = self._copies_cache.get(ids)
        if links is None:
            links = self._copies_cache[ids] = [self.links[i] for i in ids]
        return links

    # Reads ------------------------------------------------------------------------

    def _read_order(self, copies: list[NodeLink]) -> list[NodeLink]:
        """Live readable copies: the first by read_weight, then the rest in ring order."""
        live = [c for c in copies if c.state == "up"]
        if len(live) <= 1:
            return live
        total = 0.0
        for c in live:
            total += c.read_weight
        if total <= 0:
            first = self.rng.randrange(len(live))
        else:
            pick = self.rng.random() * total
            first = len(live) - 1
            for i, c in enumerate(live):
                pick -= c.read_weight
                if pick < 0:
                    first = i
                    break
        if first == 0:
            return live
        return [live[first]] + live[:first] + live[first + 1 :]

    def get(self, partition: bytes, key: bytes) -> Deferred:
        """Fires with the live Record or None."""
        copies = self.copies_of(partition, key)
        if self.policy(partition).read == "quorum":
            return self._quorum_get(partition, key, copies)
        order = self._read_order(copies)
        if not order:
            return defer.fail(Unavailable("no live copy of the key"))
        d: Deferred = Deferred()
        self._read_cb(order, partition, key, d.callback, d.errback)
        return d

    def set_many_cb(
        self,
        partition: bytes,
        pairs: Sequence[tuple[bytes, bytes]],
        on_done: Callable[[None], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        """:meth:`set_cb` for each ``(key, value)``; ``on_done(None)`` once all are stored.

        The first failure is reported at once (the other writes still run), and
        only it.  Each data node gets one ApplyMany with its share of the
        records; ``write_acks`` is counted per key, as for :meth:`set_cb`.
        """
        state = [len(pairs), False]  # writes left, failed already

        def one_done(_result: Any) -> None:
            state[0] -= 1
            if state[0] == 0 and not state[1]:
                on_done(None)

        def one_failed(error: BaseException) -> None:
            if not state[1]:
                state[1] = True
                on_fail(error)

        try:
            policy = self.policy(partition)
        except KeyError as e:
            on_fail(e)
            return
        if policy.reject_at_primary or len(pairs) == 1:
            for key, value in pairs:
                self.set_cb(partition, key, value, one_done, one_failed)
            return
        expires_ms = 0
        if policy.default_ttl_ms:
            expires_ms = int(self.clock.seconds() * 1000) + policy.default_ttl_ms
        # Per data node, its records in order, cut into requests of at most
        # APPLY_MANY_BYTES (a record larger than that goes alone, as big as
        # its own Apply would be): a node refuses a frame over its
        # max_frame_bytes by closing the connection.
        batches: dict[NodeLink, list[_ApplyBatch]] = {}
        key = packed = b""

        def queue(client: DataClient, fan: _Fanout, link: NodeLink) -> None:
            # Called by _fanout_cb at once, for each copy of the current key.
            size = len(key) + len(packed)
            mine = batches.setdefault(link, [])
            if not mine or mine[-1].size + size > APPLY_MANY_BYTES:
                mine.append(_ApplyBatch())
            mine[-1].add(key, packed, fan, size)

        hlc = self.hlc
        for key, value in pairs:
            packed = pack(value, hlc.next(), 0, expires_ms)
            self._fanout_cb(
                partition, self.write_copies_of(partition, key), queue, one_done, one_failed
            )
        for link, requests in batches.items():
            for batch in requests:
                self._apply_many(partition, link, batch)
        # The batches hold the fans, which hold one_done and one_failed, whose
        # scope holds the batches: let go, or only the cyclic collector would.
        batches.clear()

    def _apply_many(self, partition: bytes, link: NodeLink, batch: _ApplyBatch) -> None:
        write_failed = self._write_failed
        fans = batch.fans

        def done(results: list[Result]) -> None:
            for fan, result in zip(fans, results):
                fan.stored(result)

        def failed(error: BaseException) -> None:
            for fan in fans:
                write_failed(error, fan, link)

        link.client.apply_many_cb(partition, batch.keys, batch.records, done, failed)

    def get_cb(
        self,
        partition: bytes,
        key: bytes,
        on_done: Callable[[Optional[Record]], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        """:meth:`get` reporting to plain functions (the read hot path: no Deferred).

        Falls over to the next copy like :meth:`get`; ``on_done`` gets the live
        Record or None, ``on_fail`` an exception (an unknown partition
        included: this never raises); neither may raise.
        """
        try:
            policy = self.policy(partition)
        except KeyError as e:  # the partition left the map: an error reply, not a lost slot
            on_fail(e)
            return
        if policy.read == "quorum":
            self.get(partition, key).addCallbacks(on_done, lambda f: on_fail(f.value))
            return
        order = self._read_order(self.copies_of(partition, key))
        if not order:
            on_fail(Unavailable("no live copy of the key"))
            return
        self._read_cb(order, partition, key, on_done, on_fail)

    def _read_cb(
        self,
        order: list[NodeLink],
        partition: bytes,
        key: bytes,
        on_done: Callable[[Optional[Record]], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        link = order[0]
        if len(order) == 1:
            link.client.get_cb(partition, key, on_done, on_fail)
            return
        # self.hlc.last: the newest version written before this read.
        retry = _RetryRead(self, order, partition, key, self.hlc.last, on_done, on_fail)
        link.client.get_cb(partition, key, on_done, retry.failed)

    def _reread(
        self,
        error: BaseException,
        order: list[NodeLink],
        partition: bytes,
        key: bytes,
        ceiling: int,
    ) -> Deferred:
        """Read ``key`` from ``order[1:]`` after ``order[0]`` failed with ``error``.

        Writes sent after the read (by this connection above all) may have
        reached the other copies by now, while the failed copy's answer would
        have come from before them.  A read must not return a write that was
        sent after it: a pipelined ``GET k; SET k v2`` never reads ``v2``.
        So the retry reads tombstones too, and refuses a record (or a
        deletion) newer than ``ceiling``, the newest version this master had
        issued when the read was sent: the client gets an error and reads
        again, rather than a value from its future.
        """
        order[0].mark_failed(str(error))
        d = self._read_from(order, 1, lambda c: c.get(partition, key, tombstones=True))
        return d.addCallback(self._not_after, ceiling)

    def _not_after(self, record: Optional[Record], ceiling: int) -> Optional[Record]:
        if record is None:
            return None
        if record.version > ceiling:
            raise Unavailable(
                "the key's copy failed mid-read and a newer write has reached its other "
                "copies; read it again"
            )
        if record.tombstone or record.expired(int(self.clock.seconds() * 1000)):
            return None
        return record

    def _read_from(self, order: list[NodeLink], i: int, op: NodeOp) -> Deferred:
        link = order[i]
        d = op(link.client)
        if i + 1 < len(order):
            d.addErrback(self._read_next, order, i, op)
        return d

    def _read_next(self, failure: Any, order: list[NodeLink], i: int, op: NodeOp) -> Deferred:
        failure.trap(*RETRYABLE)
        order[i].mark_failed(failure.getErrorMessage())
        return self._read_from(order, i + 1, op)

    def _quorum_get(self, partition: bytes, key: bytes, copies: list[NodeLink]) -> Deferred:
        needed = len(copies) // 2 + 1
        live = [c for c in copies if c.state == "up"]
        if len(live) < needed:
            return defer.fail(Unavailable(f"quorum read needs {needed} live copies"))
        ds = [c.client.get(partition, key, tombstones=True) for c in live]
        d = defer.DeferredList(ds, consumeErrors=True)
        flushes = self._flushes.get(partition, 0)
        d.addCallback(self._quorum_done, partition, key, live, needed, flushes)
        return d

    def _quorum_done(
        self,
        results: list[tuple[bool, Any]],
        partition: bytes,
        key: bytes,
        live: list[NodeLink],
        needed: int,
        flushes: int,
    ) -> Optional[Record]:
        answers = [(link, r) for link, (ok, r) in zip(live, results) if ok]
        if len(answers) < needed:
            raise Unavailable(f"only {len(answers)} of {needed} copies answered a quorum read")
        newest: Optional[Record] = None
        for _link, record in answers:
            if record is not None and (newest is None or record.version > newest.version):
                newest = record
        # A flush sent since the read began (FLUSHDB pipelined behind it):
        # the answers are from before it, and a repair now would bring the
        # flushed key back on the copies it reaches.
        if newest is not None and self._flushes.get(partition, 0) == flushes:
            packed = newest.pack()
            for link, record in answers:
                if record is None or record.version < newest.version:
                    self.repairs += 1
                    link.client.apply(partition, key, packed).addErrback(lambda f: None)
        if newest is None or newest.tombstone:
            return None
        if newest.expires_ms and newest.expires_ms <= int(self.clock.seconds() * 1000):
            return None
        return newest

    def get_many(self, partition: bytes, keys: Sequence[bytes]) -> Deferred:
        """Fires with a list of Record-or-None in key order: one MGET per node."""
        if self.policy(partition).read == "quorum" or len(keys) == 1:
            return defer.gatherResults(
                [self.get(partition, k) for k in keys], consumeErrors=True
            ).addErrback(_first_error)
        by_node: dict[str, tuple[list[int], list[bytes], list[NodeLink]]] = {}
        for i, key in enumerate(keys):
            order = self._read_order(self.copies_of(partition, key))
            if not order:
                return defer.fail(Unavailable("no live copy of a key"))
            entry = by_node.get(order[0].node_id)
            if entry is None:
                entry = by_node[order[0].node_id] = ([], [], order)
            entry[0].append(i)
            entry[1].append(key)
        out: list[Optional[Record]] = [None] * len(keys)
        ds = []
        ceiling = self.hlc.last
        for node_id, (indexes, node_keys, _order) in by_node.items():
            d = self.links[node_id].client.mget(partition, node_keys)
            d.addCallback(_scatter, out, indexes)
            # A node failing its share: fetch those keys one by one from other copies.
            d.addErrback(self._mget_fallback, partition, node_keys, indexes, out, node_id, ceiling)
            ds.append(d)
        return (
            defer.gatherResults(ds, consumeErrors=True)
            .addCallback(lambda _: out)
            .addErrback(_first_error)
        )

    def _mget_fallback(
        self,
        failure: Any,
        partition: bytes,
        keys: list[bytes],
        indexes: list[int],
        out: list[Optional[Record]],
        failed: str,
        ceiling: int,
    ) -> Deferred:
        failure.trap(*RETRYABLE)
        self.links[failed].mark_failed(failure.getErrorMessage())
        ds = []
        for key in keys:
            order = [c for c in self._read_order(self.copies_of(partition, key))]
            order = [c for c in order if c.node_id != failed]
            if not order:
                return defer.fail(Unavailable("no other live copy of a key"))
            # As _reread: nothing written after the MGET was sent.
            d = self._read_from(order, 0, lambda c, key=key: c.get(partition, key, tombstones=True))
            ds.append(d.addCallback(self._not_after, ceiling))
        return defer.gatherResults(ds, consumeErrors=True).addCallback(_scatter, out, indexes)

    # Writes -----------------------------------------------------------------------

    def _required(self, partition: bytes, live: int) -> tuple[int, bool]:
        acks = self.policy(partition).write_acks
        if acks == "one":
            return 1, False
        if acks == "quorum":
            return self.copies // 2 + 1, False
        return max(1, live), True

    def _fanout(
        self,
        partition: bytes,
        targets: list[NodeLink],
        send: Callable[[DataClient], Deferred],
    ) -> Deferred:
        d: Deferred = Deferred()

        def send_cb(client: DataClient, fan: _Fanout, link: NodeLink) -> None:
            send(client).addCallbacks(fan.stored, lambda f: self._write_failed(f.value, fan, link))

        self._fanout_cb(partition, targets, send_cb, d.callback, d.errback)
        return d

    def _fanout_cb(
        self,
        partition: bytes,
        targets: list[NodeLink],
        send: Optional[Callable[[DataClient, _Fanout, NodeLink], None]],
        on_done: Callable[[Any], None],
        on_fail: Callable[[BaseException], None],
        done_already: Optional[Result] = None,
        apply: Optional[tuple[bytes, bytes]] = None,
    ) -> None:
        """Send a write to every live copy of ``targets``; the outcome per ``write_acks``.

        ``send(client, fan, link)`` sends it to one copy and reports the answer
        with ``fan.stored(result)`` or ``self._write_failed(exception, fan, link)``.
        With ``send`` None, ``apply`` is ``(key, packed)``: one Apply of that
        record per copy, sent from here (the write hot path: no sender built
        and called per write).
        """
        live = []
        for link in targets:
            if link.state != "down":
                live.append(link)
            else:
                link.skipped_writes += 1
        base = 1 if done_already is not None else 0
        required, wait_all = self._required(partition, len(live) + base)
        if len(live) + base < required or (not live and base == 0):
            on_fail(Unavailable(f"{len(live) + base} live copies; {required} required to write"))
            return
        fan = _Fanout(required, len(live), wait_all, on_done, on_fail)
        if done_already is not None:
            fan.ok = 1
            fan.first = done_already
        if send is None:
            key, packed = apply  # type: ignore[misc]
            for link in live:
                link.client.apply_to(partition, key, packed, _CopyWrite(self, fan, link))
        else:
            for link in live:
                send(link.client, fan, link)
        # Already enough (write_acks one, the primary's own answer): report it
        # only now, once the copies' writes are sent.  Whatever the caller
        # sends next on this key then reaches every copy behind them.
        if (
            done_already is not None
            and not fan.fired
            and fan.ok >= required
            and (not wait_all or fan.pending == 0)
        ):
            fan.fired = True
            on_done(done_already)

    def _write_failed(self, error: BaseException, fan: _Fanout, link: NodeLink) -> None:
        if isinstance(error, NodeUnavailable):
            # The copy went down with the write in flight: it is skipped like a
            # copy that was already down (merge repairs it), so `all` means all
            # copies still live, not all that were live when the write began.
            link.skipped_writes += 1
            link.mark_failed(str(error))
            if fan.wait_all:
                fan.required = max(1, fan.required - 1)
        fan.answer(error, False)

    def set(
        self, partition: bytes, key: bytes, value: bytes, flags: int = 0, expires_ms: int = 0
    ) -> Deferred:
        """Store a value on every live copy.  Fires with the first copy's Result.

        A write without expiry gets the partition's ``default_ttl``.  In a
        partition that rejects writes when full, the primary stores it first
        (and may refuse it), then it is replicated.
        """
        d: Deferred = Deferred()
        self.set_cb(partition, key, value, d.callback, d.errback, flags, expires_ms)
        return d

    def set_cb(
        self,
        partition: bytes,
        key: bytes,
        value: bytes,
        on_done: Callable[[Any], None],
        on_fail: Callable[[BaseException], None],
        flags: int = 0,
        expires_ms: int = 0,
    ) -> None:
        """:meth:`set` reporting to plain functions: no Deferred per copy or per request.

        ``on_done`` gets the first copy's Result, ``on_fail`` an exception
        (an unknown partition included: this never raises); neither may raise.
        """
        try:
            policy = self.policy(partition)
        except KeyError as e:  # the partition left the map: an error reply, not a lost slot
            on_fail(e)
            return
        if not expires_ms and policy.default_ttl_ms:
            expires_ms = int(self.clock.seconds() * 1000) + policy.default_ttl_ms
        if policy.reject_at_primary:
            self.conditional(
                partition,
                key,
                lambda c: c.store(StoreMode.SET, partition, key, value, flags, expires_ms, 0),
            ).addCallbacks(on_done, lambda f: on_fail(f.value))
            return
        packed = pack(value, self.hlc.next(), flags, expires_ms)
        self._fanout_cb(
            partition,
            self.write_copies_of(partition, key),
            None,
            on_done,
            on_fail,
            apply=(key, packed),
        )

    def delete(self, partition: bytes, key: bytes) -> Deferred:
        """Tombstone every live copy.  Fires with DELETED if any copy held the key."""
        version = self.hlc.next()
        targets = self.write_copies_of(partition, key)
        seen_live: list[bool] = []

        def send(client: DataClient) -> Deferred:
            return client.delete(partition, key, version).addCallback(_note_deleted, seen_live)

        d = self._fanout(partition, targets, send)
        return d.addCallback(
            lambda r: Result(Status.DELETED if any(seen_live) else Status.NOT_FOUND, r.packed)
        )

    def conditional(self, partition: bytes, key: bytes, op: NodeOp) -> Deferred:
        """Run ``op`` on the primary, then replicate the record it stored.

        Fires with the primary's Result.  Only a primary that was not
        connected when asked is passed over; a primary that fails once the
        request is sent fails the request, since it may have applied it.
        """
        d: Deferred = Deferred()

        def send(
            client: DataClient,
            on_result: Callable[[Result], None],
            on_error: Callable[[BaseException], None],
        ) -> None:
            op(client).addCallbacks(on_result, lambda f: on_error(f.value))

        self.conditional_cb(partition, key, send, d.callback, d.errback)
        return d

    def conditional_cb(
        self,
        partition: bytes,
        key: bytes,
        send: Callable[
            [DataClient, Callable[[Result], None], Callable[[BaseException], None]], None
        ],
        on_done: Callable[[Result], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        """:meth:`conditional` reporting to plain functions (neither may raise).

        ``send(client, on_result, on_error)`` sends the operation to the
        primary's client (``client.incr_cb(...)``, say).
        """
        primary = self._primary(partition, key)
        if primary is None:
            on_fail(Unavailable("no live primary for the key"))
            return

        def decided(result: Result) -> None:
            status = result.status
            if status is Status.NO_SPACE:
                on_fail(OutOfSpace())
                return
            packed = result.packed
            if packed is None or status not in _REPLICATED:
                on_done(result)
                return
            try:
                self.hlc.observe(HEADER.unpack_from(packed)[0])
                targets = [c for c in self.write_copies_of(partition, key) if c is not primary]
            except Exception as e:  # a malformed record, an unknown partition: an error reply
                on_fail(e)
                return

            self._fanout_cb(
                partition,
                targets,
                None,
                lambda _first: on_done(result),
                on_fail,
                result,
                apply=(key, packed),
            )

        send(primary.client, decided, on_fail)

    def incr_cb(
        self,
        partition: bytes,
        key: bytes,
        mode: IncrMode,
        delta: bytes,
        on_done: Callable[[Result], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        """INCR/DECR (Redis or memcached ``mode``) at the primary, then replicated."""
        self.conditional_cb(
            partition,
            key,
            lambda c, ok, bad: c.incr_cb(partition, key, mode, delta, ok, bad),
            on_done,
            on_fail,
        )

    def primary_connection(self, partition: bytes, key: bytes) -> Any:
        """The data-node connection :meth:`conditional` would use for ``key`` now, or None."""
        link = self._primary(partition, key)
        return link.client.protocol if link is not None else None

    def _primary(self, partition: bytes, key: bytes) -> Optional[NodeLink]:
        for link in self.copies_of(partition, key):
            if link.state == "up" and link.client.connected:
                return link
        return None

    def modify(
        self,
        partition: bytes,
        key: bytes,
        fn: Callable[[Optional[Record]], tuple[Optional[Change], Any]],
        attempts: int = 32,
    ) -> Deferred:
        """Read-modify-write with a compare-and-set on the version, at the primary.

        ``fn`` gets the live record (or None) and returns ``(change, reply)``;
        a change of None writes nothing.  If another writer changed the key
        between the read and the write, ``fn`` runs again on the new record.
        Fires with the reply of the run that took effect.
        """
        primary = self._primary(partition, key)
        if primary is None:
            return defer.fail(Unavailable("no live primary for the key"))
        # Methods, not nested functions: compiled closures that refer to one
        # another keep themselves alive in a cycle (tests/test_no_cycles.py).
        return primary.client.get(partition, key).addCallback(
            self._modify_decide, partition, key, fn, attempts
        )

    def _modify_decide(
        self,
        record: Optional[Record],
        partition: bytes,
        key: bytes,
        fn: Callable[[Optional[Record]], tuple[Optional[Change], Any]],
        attempts: int,
    ) -> Any:
        change, reply = fn(record)
        if change is None:
            return reply
        cas = record.version if record is not None else 0
        if change.delete:
            if record is None:
                return reply

            def op(c: DataClient) -> Deferred:
                return c.store(StoreMode.CAS_DELETE, partition, key, b"", 0, 0, cas)

        else:
            value, flags, expires_ms = change.value, change.flags, change.expires_ms

            def op(c: DataClient) -> Deferred:
                return c.store(StoreMode.CAS, partition, key, value, flags, expires_ms, cas)

        return self.conditional(partition, key, op).addCallback(
            self._modify_check, reply, partition, key, fn, attempts
        )

    def _modify_check(
        self,
        result: Result,
        reply: Any,
        partition: bytes,
        key: bytes,
        fn: Callable[[Optional[Record]], tuple[Optional[Change], Any]],
        attempts: int,
    ) -> Any:
        if result.status in (Status.STORED, Status.DELETED):
            return reply
        if result.status is Status.TOO_LARGE:
            raise ValueError("value exceeds the maximum value size")
        if attempts > 1:
            return self.modify(partition, key, fn, attempts - 1)
        raise Unavailable("the key kept changing; gave up after repeated conflicts")

    def set_if_all_absent(self, partition: bytes, pairs: Sequence[tuple[bytes, bytes]]) -> Deferred:
        """Store every pair only if no key exists (MSETNX).  Fires with True or False.

        Each key is created with "only if absent" at its primary; if any of
        them lost a race, the ones already created are deleted again
        (only if still unchanged), so either all keys are set or none.
        """
        keys = [k for k, _ in pairs]
        # Methods, not nested functions that call one another: those keep
        # themselves alive in a cycle once compiled (tests/test_no_cycles.py).
        return self.get_many(partition, keys).addCallback(self._msetnx_create, partition, pairs)

    def _msetnx_store(
        self, mode: StoreMode, partition: bytes, k: bytes, v: bytes, cas: int
    ) -> Deferred:
        return self.conditional(partition, k, lambda c: c.store(mode, partition, k, v, 0, 0, cas))

    def _msetnx_create(
        self,
        existing: list[Optional[Record]],
        partition: bytes,
        pairs: Sequence[tuple[bytes, bytes]],
    ) -> Any:
        if any(r is not None for r in existing):
            return False
        ds = [self._msetnx_store(StoreMode.CAS, partition, k, v, 0) for k, v in pairs]
        return defer.DeferredList(ds, consumeErrors=True).addCallback(
            self._msetnx_settle, partition, pairs
        )

    def _msetnx_settle(
        self,
        results: list[tuple[bool, Any]],
        partition: bytes,
        pairs: Sequence[tuple[bytes, bytes]],
    ) -> Any:
        created = [
            (k, r.record.version)
            for (k, _), (ok, r) in zip(pairs, results)
            if ok and r.status is Status.STORED and r.record is not None
        ]
        if len(created) == len(pairs):
            return True
        undo = [self._msetnx_store(StoreMode.CAS_DELETE, partition, k, b"", v) for k, v in created]
        failures = [r for ok, r in results if not ok]
        d = defer.DeferredList(undo, consumeErrors=True)
        if failures:
            return d.addCallback(lambda _: failures[0])
        return d.addCallback(lambda _: False)

    def count_from_stats(self, partition: bytes, stats: dict[str, dict[str, str]]) -> int:
        """Live keys of a partition, from the data nodes' per-partition counts."""
        name = f"records:{partition.decode(errors='replace')}"
        total = sum(int(st.get(name, 0)) for st in stats.values())
        return total // max(1, min(self.copies, len(stats) or 1))

    def scan(self, partition: bytes, cursor: int, count: int) -> Deferred:
        """One SCAN page: fires with ``(next_cursor, keys)``; cursor 0 means done.

        The cursor is a ring token.  Every live node returns its keys with the
        smallest tokens above it; the page is their union, deduplicated (a key
        has several copies), cut where the shortest full answer ends so that
        no key is skipped.
        """
        live = [link for link in self.links.values() if link.state == "up"]
        if not live:
            return defer.fail(Unavailable("no live data node"))
        ds = [link.client.scan(partition, cursor, count) for link in live]

        def merge(answers: list[list[tuple[int, bytes]]]) -> tuple[int, list[bytes]]:
            limit: Optional[int] = None
            merged: dict[bytes, int] = {}
            for answer in answers:
                if len(answer) >= count:
                    last = answer[-1][0]
                    limit = last if limit is None else min(limit, last)
                for tok, key in answer:
                    merged[key] = tok
            ordered = sorted((tok, key) for key, tok in merged.items())
            if limit is not None:
                ordered = [(t, k) for t, k in ordered if t <= limit]
            page = ordered[:count]
            more = limit is not None or len(ordered) > count
            next_cursor = page[-1][0] if (page and more) else 0
            return next_cursor, [k for _, k in page]

        return (
            defer.gatherResults(ds, consumeErrors=True).addCallback(merge).addErrback(_first_error)
        )

    def scan_all(self, partition: bytes, pattern: bytes, page: int = 1000) -> Deferred:
        """Every live key matching a Redis glob pattern (KEYS), page by page."""
        from kvha.master.resp import glob_match

        found: list[bytes] = []
        done: Deferred = Deferred()

        def step(result: tuple[int, list[bytes]]) -> None:
            cursor, keys = result
            found.extend(k for k in keys if pattern == b"*" or glob_match(pattern, k))
            if cursor == 0:
                done.callback(found)
            else:
                self.scan(partition, cursor, page).addCallbacks(step, done.errback)

        self.scan(partition, 0, page).addCallbacks(step, done.errback)
        return done

    def flush(self, partition: bytes, every_node: bool = True) -> Deferred:
        """Remove every record of a partition from every data node.

        With a node down nothing is flushed and the flush fails
        (``every_node``): the node would come back with the flushed records
        and serve them again, since merge only adds what it lacks.  The same
        while a node is merging or a node joins or leaves: records being
        copied may have been read before the flush and land after it.
        Without ``every_node`` (removing a deleted partition's records) the
        live nodes are flushed.
        """
        links = self.links.values()
        if every_node:
            why = self._flush_refused()
            if why is not None:
                return defer.fail(Unavailable(why))
        live = [link for link in links if link.state != "down"]
        if not live:
            return defer.fail(Unavailable("no live data node"))
        self._flushes[partition] = self._flushes.get(partition, 0) + 1
        return (
            defer.gatherResults([link.client.flush(partition) for link in live], consumeErrors=True)
            .addCallback(lambda _: None)
            .addErrback(_first_error)
        )

    def _flush_refused(self) -> Optional[str]:
        """Why a flush of every node must not start now, or None."""
        for state, why in (
            (
                "down",
                "down: a flush must reach every data node, or the flushed keys "
                "would come back with it (a node gone for good: kvha node remove ID)",
            ),
            # Records copied to a merging node may have been read before the
            # flush and arrive after it.
            (
                "merging",
                "merging: flush again once it is up, or records copied to it "
                "would bring flushed keys back",
            ),
        ):
            ids = sorted(link.node_id for link in self.links.values() if link.state == state)
            if ids:
                return f"data node {', '.join(ids)} {why}"
        if self.write_ring is not None:
            return (
                "a data node is joining or leaving: flush again once its records have "
                "moved, or records in flight would bring flushed keys back"
            )
        return None

    def node_stats(self) -> Deferred:
        """Fires with {node_id: stats dict} for every node that answers."""
        live = [link for link in self.links.values() if link.client.connected]
        ds = [link.client.stats() for link in live]
        d = defer.DeferredList(ds, consumeErrors=True)
        return d.addCallback(
            lambda results: {link.node_id: r for link, (ok, r) in zip(live, results) if ok}
        )


def _scatter(
    records: list[Optional[Record]], out: list[Optional[Record]], indexes: list[int]
) -> None:
    for i, record in zip(indexes, records):
        out[i] = record


def _first_error(failure: Any) -> Any:
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure
