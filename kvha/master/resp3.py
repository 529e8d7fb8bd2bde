"""RESP3 for clients that ask for it with ``HELLO 3`` (redis-py 8 does by default).

The command handlers produce RESP2.  For a connection that switched to
RESP3, :func:`to_resp3` rewrites each reply structurally: it walks the reply
by its own length prefixes (never searching inside bulk payloads) and turns
the RESP2 null bulk and null array into the RESP3 null ``_``.  Replies whose
RESP3 form is a map (``HELLO``, ``CONFIG GET``) are built as maps by the
handlers themselves through :func:`map_reply`.
"""

from __future__ import annotations

from collections.abc import Sequence

NULL3 = b"_\r\n"


def map_reply(pairs: Sequence[tuple[bytes, bytes]], resp3: bool) -> bytes:
    """A map of already encoded keys and values: ``%n`` in RESP3, a flat array in RESP2."""
    head = b"%%%d\r\n" % len(pairs) if resp3 else b"*%d\r\n" % (2 * len(pairs))
    return head + b"".join(k + v for k, v in pairs)


def to_resp3(data: bytes) -> bytes:
    """Rewrite one or more complete RESP2 replies for a RESP3 client."""
    if b"$-1\r\n" not in data and b"*-1\r\n" not in data:
        return data  # nothing to change (a null can only appear as one of these)
    out: list[bytes] = []
    pos = 0
    end = len(data)
    while pos < end:
        pos = _convert(data, pos, out)
    return b"".join(out)


def _convert(data: bytes, pos: int, out: list[bytes]) -> int:
    """Copy the reply at ``pos`` to ``out`` in RESP3 form; return where it ends."""
    kind = data[pos : pos + 1]
    nl = data.index(b"\r\n", pos)
    if kind in (b"$", b"*", b"%", b"~") and data[pos + 1 : nl] == b"-1":
        out.append(NULL3)
        return nl + 2
    if kind == b"$":
        length = int(data[pos + 1 : nl])
        stop = nl + 2 + length + 2
        out.append(data[pos:stop])
        return stop
    if kind in (b"*", b"%", b"~"):
        count = int(data[pos + 1 : nl])
        out.append(data[pos : nl + 2])
        pos = nl + 2
        for _ in range(count * (2 if kind == b"%" else 1)):
            pos = _convert(data, pos, out)
        return pos
    out.append(data[pos : nl + 2])  # + - : _ , # and the like: one line
    return nl + 2
