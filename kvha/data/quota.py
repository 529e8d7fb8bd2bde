"""Per-partition rules a data node enforces: its share of a quota, and a default TTL.

Masters push the table (:class:`kvha.wire.Partitions`) whenever they connect
and whenever the cluster map changes.  A partition's ``max_bytes`` is
cluster-wide and counts one copy of each record; each node enforces the part
of it that matches its share of the ring: ``max_bytes x`` the fraction of the
token space for which it holds a copy.  The shares of all nodes add up to
``copies``, so if every node keeps within its limit the partition keeps
within ``max_bytes``.

``evict`` partitions (caches) evict with GCLOCK, an approximation of LRU:
each key has a small use count (a write sets it to 1 if it has none, a read
to 2); eviction walks the partition's keys in a circle, lowers the count of
each key it passes and evicts the first key whose count is already 0.  A
key read since the hand last passed it therefore outlives keys only written,
and a key nobody touched goes first.  (Plain CLOCK, with one bit, degrades
to FIFO when every key was touched in one lap, which a cache under a write
load larger than itself hits every lap.)  The counts are one dict per
partition, of keys with a count above 0; nothing is added to the records.
"""

from __future__ import annotations

from collections.abc import Iterator

#: GCLOCK use counts: what a write gives a key that has none, and what a read gives it.
WRITE_COUNT = 1
READ_COUNT = 2


class PartitionRule:
    """What one node enforces for one partition."""

    __slots__ = ("limit", "evict", "ttl_ms", "referenced", "hand", "evicted", "rejected")

    def __init__(self, limit: int = 0, evict: bool = False, ttl_ms: int = 0) -> None:
        #: Bytes (keys + packed records) this node may hold; 0 means no limit.
        self.limit = limit
        self.evict = evict
        #: Expiry for records written without one; 0 means none.
        self.ttl_ms = ttl_ms
        #: GCLOCK use counts (absent means 0): keys read or written since the hand passed.
        self.referenced: dict[bytes, int] = {}
        #: The clock hand: an iterator over a snapshot of the partition's keys.
        self.hand: Iterator[bytes] = iter(())
        self.evicted = 0
        self.rejected = 0

    def same_as(self, other: PartitionRule) -> bool:
        return (self.limit, self.evict, self.ttl_ms) == (other.limit, other.evict, other.ttl_ms)

    def __repr__(self) -> str:
        policy = "evict" if self.evict else "reject"
        return f"PartitionRule(limit={self.limit}, {policy}, ttl_ms={self.ttl_ms})"
