"""The reactor kvha's processes run on: Twisted's epoll reactor, lighter per event.

``EPollReactor.doPoll`` wraps every I/O event in ``log.callWithLogger``: a
legacy-logging context (the protocol's log prefix) set up and torn down per
event, four Python calls and two dict copies.  A master handles two or three
events per request, and a profile showed that wrapper at 13% of its time.
kvha logs with :mod:`twisted.logger` and explicit fields, so it does not use
that context; this reactor dispatches each event straight to
``_doReadOrWrite``, which already catches and logs what a handler raises and
disconnects that connection, exactly as before.

Select it with ``twistd --reactor=kvha`` (the plugin in
``twisted/plugins/kvha_plugins.py``); every process kvha starts does.
"""

from __future__ import annotations

import errno
from typing import Any, Optional

from twisted.internet.epollreactor import EPollReactor


class KvhaEPollReactor(EPollReactor):
    """:class:`EPollReactor` without the per-event legacy log context."""

    def doPoll(self, timeout: Optional[float]) -> None:
        if timeout is None:
            timeout = -1  # block until an event
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        dispatch = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                dispatch(selectable, fd, event)

    doIteration = doPoll


def install() -> Any:
    """Install :class:`KvhaEPollReactor` as ``twisted.internet.reactor``."""
    from twisted.internet.main import installReactor

    reactor = KvhaEPollReactor()
    installReactor(reactor)
    return reactor


__all__ = ["KvhaEPollReactor", "install"]
