"""Placement of keys on the token ring.

Only the token function lives here for now; the ring of virtual nodes that
maps tokens to data nodes joins it with the master node.  Tokens are the
unsigned 64-bit murmur3 hash of ``partition NUL key``; partition names never
contain NUL, so two different ``(partition, key)`` pairs never hash the same
input.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import mmh3

TOKEN_BITS = 64
TOKEN_SPACE = 1 << TOKEN_BITS
MAX_TOKEN = TOKEN_SPACE - 1

TokenRange = tuple[int, int]


def token(partition: bytes, key: bytes) -> int:
    """The ring position of ``(partition, key)``: an unsigned 64-bit int."""
    return mmh3.hash64(partition + b"\x00" + key, seed=0, x64arch=True, signed=False)[0]


def in_range(tok: int, lo: int, hi: int) -> bool:
    """Whether ``tok`` lies in the ring arc ``(lo, hi]``, which wraps if ``lo >= hi``.

    ``(x, x]`` is the whole ring, the convention a single-token ring needs.
    """
    if lo < hi:
        return lo < tok <= hi
    return tok > lo or tok <= hi


def in_ranges(tok: int, ranges: Sequence[TokenRange]) -> bool:
    """Whether ``tok`` lies in any of ``ranges``; an empty list means everything."""
    if not ranges:
        return True
    return any(in_range(tok, lo, hi) for lo, hi in ranges)


def validate_ranges(ranges: Iterable[TokenRange]) -> list[TokenRange]:
    out = []
    for lo, hi in ranges:
        if not (0 <= lo <= MAX_TOKEN and 0 <= hi <= MAX_TOKEN):
            raise ValueError(f"token range ({lo}, {hi}] is outside 0..2**64-1")
        out.append((lo, hi))
    return out
