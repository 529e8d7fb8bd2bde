"""Hybrid logical clock: the source of every record version.

A version is a 64-bit integer: the upper 48 bits are wall-clock milliseconds,
the lower 16 bits a counter.  Versions issued by one clock never go backwards
even when the wall clock does, and a clock that observes a version from
another node moves past it, so "newer version wins" orders writes the way
they happened as closely as physical time allows (DESIGN §3).
"""

from __future__ import annotations

from typing import Callable

COUNTER_BITS = 16
COUNTER_MASK = (1 << COUNTER_BITS) - 1
MAX_VERSION = (1 << 64) - 1


def version_millis(version: int) -> int:
    """The wall-clock milliseconds part of a version."""
    return version >> COUNTER_BITS


def version_from_millis(millis: int, counter: int = 0) -> int:
    """Build a version from milliseconds and a counter (used for skew windows)."""
    return (max(0, millis) << COUNTER_BITS) | (counter & COUNTER_MASK)


class HybridLogicalClock:
    """Issues strictly increasing 64-bit versions.

    ``now`` is a callable returning seconds (for example ``reactor.seconds``),
    injected so tests can drive it with ``twisted.internet.task.Clock``.
    """

    def __init__(self, now: Callable[[], float], last: int = 0) -> None:
        self._now = now
        self._last = last

    @property
    def last(self) -> int:
        """The highest version issued or observed so far."""
        return self._last

    def next(self) -> int:
        """Issue a new version greater than every one issued or observed."""
        # version_from_millis, inline (the write hot path); before 1970 the
        # shift is negative, never above ``last``, so the counter takes over.
        physical = int(self._now() * 1000) << COUNTER_BITS
        last = self._last
        version = physical if physical > last else last + 1
        self._last = version
        return version

    def observe(self, version: int) -> None:
        """Move past a version seen from elsewhere (a replica, a restart)."""
        if version > self._last:
            self._last = version
