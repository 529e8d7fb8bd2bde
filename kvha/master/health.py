"""Each master's view of each data node: a connection, pings and a state.

A node is ``up`` (read and written), ``merging`` (written, never read),
or ``down`` (skipped).  A refused or reset connection marks it down at once;
otherwise a node that has not answered a ping for ``ping_timeout`` is marked
down.  It comes back as soon as a ping succeeds again, in whatever state it
reports (``merging`` until a merge is done).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kvha.data.api import DataClient
from kvha.data.client import DataClientProtocol

log = Logger()

UP = "up"
DOWN = "down"
MERGING = "merging"


class NodeLink:
    """One data node as seen from one master."""

    def __init__(
        self,
        node_id: str,
        client: DataClient,
        clock: IReactorTime,
        ping_interval: float = 0.25,
        ping_timeout: float = 0.75,
        weight: float = 1.0,
        read_weight: float = 1.0,
        on_change: Optional[Callable[[NodeLink, str, str], None]] = None,
    ) -> None:
        self.node_id = node_id
        self.client = client
        self.clock = clock
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.weight = weight
        self.read_weight = read_weight
        self.state = DOWN
        self.reported_state = "?"
        self.high_water = 0
        self.last_answer = 0.0
        self.down_since: Optional[float] = clock.seconds()
        self.skipped_writes = 0
        self.on_change = on_change
        self._loop: Optional[LoopingCall] = None
        self._ping_outstanding = False
        client.on_lost = self._connection_lost
        client.on_ready = self._connection_ready

    @property
    def readable(self) -> bool:
        return self.state == UP

    @property
    def writable(self) -> bool:
        return self.state != DOWN

    def start(self) -> None:
        self.client.start()
        loop = LoopingCall(self._ping)
        loop.clock = self.clock
        loop.start(self.ping_interval, now=False)
        self._loop = loop

    def stop(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self.client.stop()

    def _set(self, state: str, why: str) -> None:
        old = self.state
        if old == state:
            return
        self.state = state
        now = self.clock.seconds()
        if state == DOWN:
            self.down_since = now
        else:
            self.down_since = None
        log.info(
            "data node {node} is {state} (was {old}): {why}",
            node=self.node_id,
            state=state,
            old=old,
            why=why,
        )
        if self.on_change is not None:
            self.on_change(self, old, state)

    def _connection_lost(self, proto: DataClientProtocol) -> None:
        self._ping_outstanding = False
        self._set(DOWN, "connection lost")

    def _connection_ready(self, proto: DataClientProtocol) -> None:
        self.last_answer = self.clock.seconds()
        self.reported_state = proto.node_state
        self._set(_state_for(proto.node_state), f"connected ({proto.node_state})")

    def _ping(self) -> None:
        now = self.clock.seconds()
        if self.state != DOWN and now - self.last_answer > self.ping_timeout:
            self._set(DOWN, f"no answer to pings for {now - self.last_answer:.2f}s")
        if not self.client.connected or self._ping_outstanding:
            return
        self._ping_outstanding = True
        self.client.ping().addCallbacks(self._pong, self._ping_failed)

    def _pong(self, answer: tuple[str, int]) -> None:
        self._ping_outstanding = False
        state, high_water = answer
        self.last_answer = self.clock.seconds()
        self.reported_state = state
        self.high_water = high_water
        self._set(_state_for(state), f"ping answered ({state})")

    def _ping_failed(self, failure: Any) -> None:
        self._ping_outstanding = False

    def mark_failed(self, why: str) -> None:
        """A request saw the connection reset: do not wait for the pings."""
        if not self.client.connected:
            self._set(DOWN, why)


def _state_for(reported: str) -> str:
    """How a master treats a node from the state it reports."""
    if reported == MERGING:
        return MERGING  # written, never read
    if reported == "up":
        return UP
    return DOWN  # "stale" (away too long) and anything unknown: neither read nor written
