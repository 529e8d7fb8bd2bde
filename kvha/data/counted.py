"""A mixin for engines that keep per-partition counts in ``self._parts``.

Plain Python on purpose: :mod:`kvha.data.engine` is compiled, and a
compiled class can be a base of another class only on its own, not beside
:class:`~kvha.data.engine.Engine`.
"""

from __future__ import annotations

from typing import Optional


class CountedPartitions:
    """count, bytes_used and tombstones of engines that keep
    ``self._parts = {partition: [records, bytes, tombstones]}``."""

    _parts: dict[bytes, list[int]]

    def _total(self, partition: Optional[bytes], i: int) -> int:
        if partition is not None:
            counts = self._parts.get(partition)
            return 0 if counts is None else counts[i]
        return sum(c[i] for c in self._parts.values())

    def count(self, partition: Optional[bytes] = None) -> int:
        return self._total(partition, 0)

    def bytes_used(self, partition: Optional[bytes] = None) -> int:
        return self._total(partition, 1)

    def tombstones(self, partition: Optional[bytes] = None) -> int:
        return self._total(partition, 2)


__all__ = ["CountedPartitions"]
