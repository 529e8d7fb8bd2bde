"""Bounds one master keeps across all of its client ports."""

from __future__ import annotations


class ConnectionBudget:
    """Client connections open on one master, whatever the protocol or port.

    Every listener of a master shares one budget, so ``master.limits.max_connections``
    bounds the master as a whole; a listener made on its own (in tests) gets
    its own.
    """

    __slots__ = ("limit", "open", "refused")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0

    def acquire(self) -> bool:
        """Take a slot for a new connection; False (and counted) when none is left."""
        if self.open >= self.limit:
            self.refused += 1
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1
