"""The reactor's per-event dispatch, compiled with the hot path.

:class:`kvha.reactor.KvhaEPollReactor` hands each turn's epoll events to
:func:`dispatch`.  Twisted handles a read event on a TCP connection in three
interpreted calls, ``_doReadOrWrite``, ``Connection.doRead`` and
``Connection._dataReceived``, around one ``recv`` and one
``protocol.dataReceived``.  A master has one such event per unpipelined
request, so :func:`dispatch` does that case itself, with the same steps in
the same order:

- the descriptor checked (``fileno() == -1`` is "file descriptor lost");
- one ``recv`` of ``bufferSize`` bytes; ``EWOULDBLOCK`` is no event, any
  other error a lost connection, no bytes a clean close;
- the bytes to ``protocol.dataReceived``; what that raises is logged and
  disconnects that connection; what it returns disconnects it too, on the
  Twisted releases whose ``_dataReceived`` passes that on (before 26.10);
- a disconnection through the reactor's ``_disconnectSelectable``, flagged
  as a read when the read itself returned (so a half-closeable transport
  hears of a half close), and not when ``dataReceived`` raised.

Only a plain read (``EPOLLIN`` and nothing else) on a connected
:class:`twisted.internet.tcp.Server` or ``Client`` whose ``doRead`` is
Twisted's own takes that path.  Anything else goes to the reactor's
``_doReadOrWrite``: writes, hang-ups and errors, listening ports, a client
still connecting (its ``doRead`` is ``doConnect``), an aborted connection
(a no-op ``doRead``), and any other kind of descriptor.
"""

from __future__ import annotations

import select
import sys
import warnings
from errno import EWOULDBLOCK
from types import SimpleNamespace
from typing import Any

from twisted.internet import main, tcp
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.python import log as legacy_log

#: Transports whose ``doRead`` is ``tcp.Connection.doRead`` (see the module note).
FAST_READ_TYPES: frozenset[type] = frozenset((tcp.Server, tcp.Client))

_EPOLLIN: int = select.EPOLLIN if hasattr(select, "EPOLLIN") else 1


def _probe_data_received(data: bytes) -> str:
    return "probe"


def _returns_protocol_value() -> bool:
    """Whether this Twisted's ``Connection._dataReceived`` passes on what
    ``dataReceived`` returns (so that a true value disconnects).

    Twisted 26.10 drops the value; earlier releases, PyPy's among them,
    return it after a deprecation warning.
    """

    protocol = SimpleNamespace(dataReceived=_probe_data_received)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            got = tcp.Connection._dataReceived(SimpleNamespace(protocol=protocol), b"x")  # type: ignore[arg-type]
        except Exception:
            return False
    return got == "probe"  # type: ignore[comparison-overlap]


#: See :func:`_returns_protocol_value`.
PASS_ON_RETURN: bool = _returns_protocol_value()


def dispatch(reactor: Any, events: list[tuple[int, int]], selectables: dict[int, Any]) -> None:
    """Handle one turn's ``(fd, event)`` pairs from ``epoll.poll``."""
    slow = reactor._doReadOrWrite
    fast_types = FAST_READ_TYPES
    pass_on = PASS_ON_RETURN
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        if (
            event != _EPOLLIN
            or type(selectable) not in fast_types
            or "doRead" in selectable.__dict__
        ):
            slow(selectable, fd, event)
            continue
        why: Any = None
        in_read = False  # as in _doReadOrWrite: True once the read returned normally
        try:
            if selectable.fileno() == -1:
                why = _NO_FILEDESC
            else:
                try:
                    data = selectable.socket.recv(selectable.bufferSize)
                except OSError as se:
                    if se.args[0] != EWOULDBLOCK:
                        why = main.CONNECTION_LOST
                else:
                    if data:
                        rval = selectable.protocol.dataReceived(data)
                        if pass_on:
                            why = rval
                    else:
                        why = main.CONNECTION_DONE
                in_read = True
        except BaseException:
            why = sys.exc_info()[1]
            legacy_log.err()
        if why:
            reactor._disconnectSelectable(selectable, why, in_read)


__all__ = ["FAST_READ_TYPES", "PASS_ON_RETURN", "dispatch"]
