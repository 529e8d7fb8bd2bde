"""The handoff link between a load balancer and a master on the same host.

With ``forward: handoff`` the load balancer accepts a client's connection on
the VIP and passes its file descriptor to the chosen master over a Unix
socket (``SCM_RIGHTS``).  The master serves the client on that socket
directly, so the load balancer's process is out of the data path, as with
``forward: kernel``, but unprivileged, with ``leastconn``, and with a
refused handoff passed to the next master without the client noticing.

The link carries lines of ASCII, at most :data:`MAX_LINE` bytes each:

- master -> load balancer, once, on connecting: ``kvha-handoff 1 <protocols>``,
  the comma-separated protocols it takes by handoff (its plain-TCP listeners);
- load balancer -> master: ``h <id> <protocol>`` with one descriptor attached
  (the n-th descriptor belongs to the n-th ``h`` line); ``x <id>``: close that
  connection (a drain that timed out, a removed master);
- master -> load balancer: ``a <id>`` adopted; ``r <id>`` refused (the load
  balancer still holds the connection and forwards it another way);
  ``c <id>`` the adopted connection has closed.

``<id>`` is a decimal number chosen by the load balancer, unique per link.
"""

from __future__ import annotations

from typing import Optional

#: Version 1 of the link's greeting.
HELLO = b"kvha-handoff 1"
#: Longest line either side accepts; a longer one is a broken peer.
MAX_LINE = 256
#: The longest Unix socket path Linux takes (``sun_path`` is 108 bytes with its NUL).
MAX_PATH = 107
PROTOCOLS = ("redis", "memcached", "http")


class LinkError(Exception):
    """The peer sent something this side cannot parse: the link is closed."""


def split_lines(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete lines in ``buffer`` and what is left after them.

    Raises :class:`LinkError` when a line is longer than :data:`MAX_LINE`.
    """
    lines = buffer.split(b"\n")
    rest = lines.pop()
    for line in lines:
        if len(line) > MAX_LINE:
            raise LinkError(f"line of {len(line)} bytes")
    if len(rest) > MAX_LINE:
        raise LinkError(f"unterminated line of {len(rest)} bytes")
    return lines, rest


def parse(line: bytes) -> tuple[bytes, int, Optional[str]]:
    """``(op, id, protocol)`` of one ``h``/``x``/``a``/``r``/``c`` line.

    ``protocol`` is set for ``h`` only.  Raises :class:`LinkError`.
    """
    parts = line.split(b" ")
    op = parts[0]
    want = 3 if op == b"h" else 2
    if op not in (b"h", b"x", b"a", b"r", b"c") or len(parts) != want:
        raise LinkError(f"unexpected line {line[:60]!r}")
    if not parts[1].isdigit() or len(parts[1]) > 20:
        raise LinkError(f"bad connection id in {line[:60]!r}")
    proto: Optional[str] = None
    if op == b"h":
        proto = parts[2].decode("ascii", "replace")
        if proto not in PROTOCOLS:
            raise LinkError(f"unknown protocol in {line[:60]!r}")
    return op, int(parts[1]), proto


def parse_hello(line: bytes) -> frozenset[str]:
    """The protocols a master's greeting offers.  Raises :class:`LinkError`."""
    head, _, protos = line.rpartition(b" ")
    if head != HELLO:
        raise LinkError(f"not a handoff greeting: {line[:60]!r}")
    offered = frozenset(p for p in protos.decode("ascii", "replace").split(",") if p)
    unknown = offered - set(PROTOCOLS)
    if unknown:
        raise LinkError(f"unknown protocols {sorted(unknown)} in the greeting")
    return offered


def hello(protocols: frozenset[str]) -> bytes:
    return HELLO + b" " + ",".join(sorted(protocols)).encode("ascii") + b"\n"
