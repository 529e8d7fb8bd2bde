"""Placement of keys on the token ring.

A key's token is the unsigned 64-bit murmur3 hash of ``partition NUL key``
(partition names never contain NUL, so different pairs never hash the same
input).  Each data node holds virtual-node tokens on the ring in proportion
to its weight and owns the arc ``(previous token, its token]``.  A key's main
node is the owner of the first token clockwise from the key's token; its
copies are the next distinct nodes clockwise, as in K2HDKC.

Why tokens are allocated rather than hashed: with 128 random tokens per node
each node's share of the ring varies by about 1/sqrt(128), some 9%, so some
rings would leave one node a fifth busier than another.  Instead a node's
tokens are placed when it joins: the first node's are evenly spaced, and each
later node takes from every existing node exactly what that node holds above
its new fair share, cutting the front off the donor's largest arcs.  Shares
are then exact to within rounding, and a join moves only keys to the new
node, about ``weight / total weight`` of them.  The allocation depends on the
order of joins, which is the order of the node list, so every master
computing the ring from the same list gets the same ring.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Final

import mmh3

TOKEN_BITS = 64
TOKEN_SPACE = 1 << TOKEN_BITS
MAX_TOKEN = TOKEN_SPACE - 1

TokenRange = tuple[int, int]

#: Most copies of one key (replicas + 1) the ring keeps preference lists for.
MAX_COPIES = 8


#: MurmurHash3 x64 128-bit as two unsigned 64-bit ints: hash64(signed=False)'s
#: result, through mmh3's positional-only entry point (half the call's cost).
_hash128: Final = mmh3.mmh3_x64_128_utupledigest


def token(partition: bytes, key: bytes) -> int:
    """The ring position of ``(partition, key)``: an unsigned 64-bit int."""
    return _hash128(partition + b"\x00" + key, 0)[0]


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


def _arc(lo: int, hi: int) -> int:
    """Length of the arc ``(lo, hi]``; ``(x, x]`` is the whole ring."""
    return (hi - lo) % TOKEN_SPACE or TOKEN_SPACE


class Ring:
    """Virtual-node tokens of every data node, and key look-ups against them."""

    def __init__(self, vnodes: int = 128) -> None:
        if vnodes < 1:
            raise ValueError("vnodes must be at least 1")
        self.vnodes = vnodes
        self.weights: dict[str, float] = {}
        self._tokens: list[int] = []
        self._owners: list[str] = []
        self._prefs: list[tuple[str, ...]] = []

    @classmethod
    def build(cls, nodes: Iterable[tuple[str, float]], vnodes: int = 128) -> Ring:
        """A ring with ``nodes`` (id, weight) joined in the given order."""
        ring = cls(vnodes)
        for node_id, weight in nodes:
            ring.add_node(node_id, weight)
        return ring

    @classmethod
    def from_tokens(
        cls, weights: dict[str, float], tokens: dict[str, list[int]], vnodes: int = 128
    ) -> Ring:
        """A ring with exactly these tokens (as recorded in a cluster map)."""
        ring = cls(vnodes)
        ring.weights = dict(weights)
        pairs = sorted((t, n) for n, ts in tokens.items() for t in ts)
        ring._tokens = [t for t, _ in pairs]
        ring._owners = [n for _, n in pairs]
        ring._rebuild()
        return ring

    def tokens_by_node(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {n: [] for n in self.weights}
        for t, n in zip(self._tokens, self._owners):
            out[n].append(t)
        return out

    def copy(self) -> Ring:
        return Ring.from_tokens(self.weights, self.tokens_by_node(), self.vnodes)

    def __len__(self) -> int:
        return len(self.weights)

    @property
    def nodes(self) -> list[str]:
        return list(self.weights)

    def tokens_of(self, node_id: str) -> list[int]:
        return [t for t, o in zip(self._tokens, self._owners) if o == node_id]

    # Membership ---------------------------------------------------------------

    def add_node(self, node_id: str, weight: float = 1.0) -> None:
        if node_id in self.weights:
            raise ValueError(f"node {node_id!r} is already on the ring")
        if weight <= 0:
            raise ValueError("weight must be positive")
        count = max(1, round(self.vnodes * weight))
        if not self._tokens:
            step = TOKEN_SPACE // count
            start = mmh3.hash64(node_id.encode(), seed=0, x64arch=True, signed=False)[0] % step
            new = [(start + i * step, node_id) for i in range(count)]
        else:
            new = self._allocate(node_id, weight, count)
        self.weights[node_id] = weight
        pairs = sorted(list(zip(self._tokens, self._owners)) + new)
        self._tokens = [t for t, _ in pairs]
        self._owners = [o for _, o in pairs]
        self._rebuild()

    def remove_node(self, node_id: str) -> None:
        """Drop a node's tokens: its arcs pass to the next tokens clockwise."""
        if node_id not in self.weights:
            raise KeyError(node_id)
        del self.weights[node_id]
        pairs = [(t, o) for t, o in zip(self._tokens, self._owners) if o != node_id]
        self._tokens = [t for t, _ in pairs]
        self._owners = [o for _, o in pairs]
        self._rebuild()

    def _arcs(self) -> list[tuple[int, int, str]]:
        """Every ``(lo, hi, owner)``: the owner's token is ``hi``."""
        tokens = self._tokens
        return [(tokens[i - 1], tokens[i], self._owners[i]) for i in range(len(tokens))]

    def _allocate(self, node_id: str, weight: float, count: int) -> list[tuple[int, str]]:
        total_weight = sum(self.weights.values()) + weight
        load = self.ownership_tokens()
        excess = {
            n: max(0, load[n] - TOKEN_SPACE * w / total_weight) for n, w in self.weights.items()
        }
        want = TOKEN_SPACE * weight / total_weight
        excess_sum = sum(excess.values()) or 1
        take = {n: e * want / excess_sum for n, e in excess.items() if e > 0}
        # Tokens per donor in proportion to what it gives (largest remainder).
        shares = {n: count * t / want for n, t in take.items()}
        alloc = {n: int(s) for n, s in shares.items()}
        for n in sorted(shares, key=lambda n: (alloc[n] - shares[n], n))[
            : count - sum(alloc.values())
        ]:
            alloc[n] += 1
        arcs_by_owner: dict[str, list[tuple[int, int]]] = {}
        for lo, hi, owner in self._arcs():
            arcs_by_owner.setdefault(owner, []).append((lo, hi))
        new: list[tuple[int, str]] = []
        for donor in sorted(alloc):
            k = alloc[donor]
            if k == 0:
                continue
            arcs = sorted(arcs_by_owner[donor], key=lambda a: (-_arc(*a), a[0]))[:k]
            lengths = [_arc(lo, hi) for lo, hi in arcs]
            available = sum(lengths)
            amount = min(take[donor], available * 0.9)
            for (lo, _hi), length in zip(arcs, lengths):
                cut = int(amount * length / available)
                if 0 < cut < length:
                    new.append(((lo + cut) % TOKEN_SPACE, node_id))
        return new

    def _rebuild(self) -> None:
        owners = self._owners
        n = len(owners)
        # Preference lists stop at MAX_COPIES nodes: no key has more copies, and
        # walking the ring for every node would cost O(tokens x nodes).
        distinct = min(len(self.weights), MAX_COPIES)
        interned: dict[tuple[str, ...], tuple[str, ...]] = {}
        prefs = []
        for i in range(n):
            seen: list[str] = []
            j = i
            while len(seen) < distinct:
                owner = owners[j]
                if owner not in seen:
                    seen.append(owner)
                j = (j + 1) % n
            pref = tuple(seen)
            prefs.append(interned.setdefault(pref, pref))
        self._prefs = prefs

    # Look-ups -------------------------------------------------------------------

    def preference(self, tok: int) -> tuple[str, ...]:
        """Nodes in the order a key at ``tok`` uses them (main node first), up to MAX_COPIES."""
        i = bisect.bisect_left(self._tokens, tok)
        return self._prefs[i if i < len(self._prefs) else 0]

    def nodes_for(self, partition: bytes, key: bytes, copies: int) -> tuple[str, ...]:
        """The main node and the copies of ``(partition, key)``."""
        return self.preference(token(partition, key))[:copies]

    def ownership_tokens(self) -> dict[str, int]:
        """How much of the token space each node owns as main node."""
        out = dict.fromkeys(self.weights, 0)
        for lo, hi, owner in self._arcs():
            out[owner] += _arc(lo, hi)
        return out

    def ownership(self) -> dict[str, float]:
        """Each node's share of the ring as main node, summing to 1."""
        return {n: v / TOKEN_SPACE for n, v in self.ownership_tokens().items()}

    def arcs(self, copies: int) -> list[tuple[int, int, tuple[str, ...]]]:
        """Every arc ``(lo, hi]`` with the nodes holding its keys, main node first."""
        return [
            (lo, hi, self._prefs[i][:copies]) for i, (lo, hi, _owner) in enumerate(self._arcs())
        ]

    def ranges_for(self, node_id: str, copies: int) -> list[TokenRange]:
        """The arcs whose keys ``node_id`` holds as main node or copy."""
        return [(lo, hi) for lo, hi, holders in self.arcs(copies) if node_id in holders]
