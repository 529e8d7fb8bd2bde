"""The handoff link between a load balancer and a master on the same host.

With ``forward: handoff`` the load balancer accepts a client's connection on
the VIP and passes its file descriptor to the chosen master over a Unix
socket (``SCM_RIGHTS``).  The master serves the client on that socket
directly, so the load balancer's process is out of the data path, as with
``forward: kernel``, but unprivileged, with ``leastconn``, and with a
refused handoff passed to the next master without the client noticing.

The link carries lines of ASCII, at most :data:`MAX_LINE` bytes each:

- master -> load balancer, once, on connecting: ``kvha-handoff 1 <id>
  <protocols>``, its master id (a load balancer whose list gives that path to
  another master refuses the link: socket paths are per host, master lists are
  shared between hosts) and the comma-separated protocols it takes by handoff
  (its plain-TCP listeners);
- load balancer -> master: ``h <id> <protocol> <host>:<port>`` with one
  descriptor attached (the n-th descriptor belongs to the n-th ``h`` line;
  ``<host>:<port>`` is the client's address, which the master checks against
  the descriptor it got, so that a descriptor the kernel dropped, for one,
  at the master's descriptor limit, cannot pair a line with the wrong
  socket: a mismatch closes the link); ``k <id>``: confirmed,
  serve it; ``x <id>``: close that connection; ``z``: close every confirmed
  connection any load balancer handed over, on any link, now or before (a
  drain that timed out, a removed master: what a load balancer handed before
  a restart or a broken link is closed too);
- master -> load balancer: ``a <id>`` adopted (and paused); ``r <id>`` refused
  (the load balancer still holds the connection and forwards it another
  way); ``c <id>`` the adopted connection has closed.

A master reads nothing from an adopted connection before its ``k``.  So when
a link breaks before the load balancer heard ``a``, no master has read from
the connection: the load balancer passes it to the next master, and the
master (if it lives) closes its copy without a shutdown.  A master that dies
while connections are handed to it is as invisible to new clients as in
proxy mode, where a refused connect is passed to the next master.

``<id>`` is a decimal number chosen by the load balancer, unique per link.
"""

from __future__ import annotations

from typing import Optional

#: Version 1 of the link's greeting.
HELLO = b"kvha-handoff 1"
#: Longest line either side accepts; a longer one is a broken peer.
MAX_LINE = 256
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


def parse(line: bytes) -> tuple[bytes, int, Optional[str], Optional[str]]:
    """``(op, id, protocol, peer)`` of one ``h``/``k``/``x``/``z``/``a``/``r``/``c`` line.

    ``protocol`` and ``peer`` (``host:port``) are set for ``h`` only.
    Raises :class:`LinkError`.
    """
    parts = line.split(b" ")
    op = parts[0]
    if op == b"z" and len(parts) == 1:
        return op, 0, None, None
    want = 4 if op == b"h" else 2
    if op not in (b"h", b"k", b"x", b"a", b"r", b"c") or len(parts) != want:
        raise LinkError(f"unexpected line {line[:60]!r}")
    if not parts[1].isdigit() or len(parts[1]) > 20:
        raise LinkError(f"bad connection id in {line[:60]!r}")
    proto: Optional[str] = None
    peer: Optional[str] = None
    if op == b"h":
        proto = parts[2].decode("ascii", "replace")
        if proto not in PROTOCOLS:
            raise LinkError(f"unknown protocol in {line[:60]!r}")
        peer = parts[3].decode("ascii", "replace")
        if not peer.rpartition(":")[2].isdigit():
            raise LinkError(f"bad client address in {line[:60]!r}")
    return op, int(parts[1]), proto, peer


def address_text(host: str, port: int) -> str:
    """A client address as ``h`` lines carry it."""
    return f"{host}:{port}"


def parse_hello(line: bytes) -> tuple[str, frozenset[str]]:
    """The master id and the protocols of a master's greeting.  Raises :class:`LinkError`."""
    head, _, protos = line.rpartition(b" ")
    head, _, master_id = head.rpartition(b" ")
    if head != HELLO or not master_id:
        raise LinkError(f"not a handoff greeting: {line[:60]!r}")
    offered = frozenset(p for p in protos.decode("ascii", "replace").split(",") if p)
    unknown = offered - set(PROTOCOLS)
    if unknown:
        raise LinkError(f"unknown protocols {sorted(unknown)} in the greeting")
    return master_id.decode("utf-8", "replace"), offered


def hello(master_id: str, protocols: frozenset[str]) -> bytes:
    """A master's greeting (ids are letters, digits and ``_.-``: no spaces)."""
    return b"%s %s %s\n" % (
        HELLO,
        master_id.encode("utf-8"),
        ",".join(sorted(protocols)).encode("ascii"),
    )
