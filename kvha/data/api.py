"""What a master needs of a data-node client, as a structural type.

:class:`kvha.data.client.DataNodeClient` talks to a data node over TCP;
:class:`kvha.data.local.LocalDataClient` calls one in the same process (the
tests' twin).  The master's router and node links accept either, so they
are typed with this protocol rather than with one of the two classes.  It
also matters at run time: in a build whose hot modules are compiled with
mypyc (see ``setup.py``), an argument or attribute typed with a class is
checked against that class, and a protocol is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from kvha.data.client import ApplyWaiter, Consumer
    from kvha.data.store import IncrMode, Result, StoreMode
    from kvha.record import Record
    from kvha.ring import TokenRange


class DataClient(Protocol):
    """The requests a master sends one data node (see DataNodeClient for each)."""

    #: Set by the node's link: called with the connection when it is lost, and when ready.
    on_lost: Any
    on_ready: Any

    @property
    def protocol(self) -> Optional[object]:
        """The current connection (compared by identity: Router.primary_connection), or None."""

    @property
    def connected(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> Deferred: ...

    def when_ready(self) -> Deferred: ...

    def get(self, partition: bytes, key: bytes, tombstones: bool = False) -> Deferred: ...

    def get_cb(
        self,
        partition: bytes,
        key: bytes,
        on_done: Callable[[Optional[Record]], None],
        on_fail: Callable[[BaseException], None],
    ) -> None: ...

    def apply_cb(
        self,
        partition: bytes,
        key: bytes,
        packed: bytes,
        on_done: Callable[[Result], None],
        on_fail: Callable[[BaseException], None],
    ) -> None: ...

    def apply_to(
        self, partition: bytes, key: bytes, packed: bytes, waiter: ApplyWaiter
    ) -> None: ...

    def apply_many_cb(
        self,
        partition: bytes,
        keys: Sequence[bytes],
        records: Sequence[bytes],
        on_done: Callable[[list[Result]], None],
        on_fail: Callable[[BaseException], None],
    ) -> None: ...

    def mget(
        self, partition: bytes, keys: Sequence[bytes], tombstones: bool = False
    ) -> Deferred: ...

    def apply(self, partition: bytes, key: bytes, packed: bytes) -> Deferred: ...

    def store(
        self,
        mode: StoreMode,
        partition: bytes,
        key: bytes,
        value: bytes,
        flags: int = 0,
        expires_ms: int = 0,
        cas: int = 0,
    ) -> Deferred: ...

    def incr(self, partition: bytes, key: bytes, mode: IncrMode, delta: bytes) -> Deferred: ...

    def incr_cb(
        self,
        partition: bytes,
        key: bytes,
        mode: IncrMode,
        delta: bytes,
        on_done: Callable[[Result], None],
        on_fail: Callable[[BaseException], None],
    ) -> None: ...

    def touch(self, partition: bytes, key: bytes, expires_ms: int) -> Deferred: ...

    def delete(self, partition: bytes, key: bytes, version: int = 0) -> Deferred: ...

    def delete_replica(self, partition: bytes, key: bytes, version: int) -> Deferred: ...

    def flush(self, partition: bytes) -> Deferred: ...

    def scan(self, partition: bytes, after: int, count: int) -> Deferred: ...

    def retain(self, ranges: Sequence[TokenRange]) -> Deferred: ...

    def control(
        self,
        action: int,
        holder: str,
        lease_ms: int = 0,
        done_keys: int = 0,
        done_bytes: int = 0,
        total_keys: int = 0,
    ) -> Deferred: ...

    def partitions(self, epoch: int, table: Sequence[tuple[bytes, int, bool, int]]) -> Deferred: ...

    def ping(self) -> Deferred: ...

    def stats(self) -> Deferred: ...

    def stream(
        self,
        ranges: Sequence[TokenRange],
        min_version: int,
        consumer: Consumer,
        partitions: Sequence[bytes] = (),
        window: int = 8,
    ) -> Deferred: ...
