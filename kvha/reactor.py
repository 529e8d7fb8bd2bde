"""The reactor kvha's processes run on: Twisted's epoll reactor, lighter per event.

``EPollReactor.doPoll`` wraps every I/O event in ``log.callWithLogger``: a
legacy-logging context (the protocol's log prefix) set up and torn down per
event, four Python calls and two dict copies.  A master handles two or three
events per request, and a profile showed that wrapper at 13% of its time.
kvha logs with :mod:`twisted.logger` and explicit fields, so it does not use
that context; this reactor dispatches each event straight to
``_doReadOrWrite``, which already catches and logs what a handler raises and
disconnects that connection, exactly as before.  A plain read on a TCP
connection, the commonest event by far, it handles in compiled code
(:func:`kvha.events.dispatch`), with the same steps as Twisted's.

It also runs "turn-end" calls (:meth:`KvhaEPollReactor.call_at_turn_end`):
once this turn's events and timed calls are handled, before the reactor
waits again.  kvha sends the replies a turn gathered from there
(:mod:`kvha.flush`).  On any other reactor the same code uses a
``callLater(0)``, which costs a timed call (an object, a heap insertion and
a timeout computation) per turn.

Select it with ``twistd --reactor=kvha`` (the plugin in
``twisted/plugins/kvha_plugins.py``); every process kvha starts does.
"""

from __future__ import annotations

import errno
from typing import Any, Callable, Optional

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

from kvha.events import dispatch

log = Logger()


class KvhaEPollReactor(EPollReactor):
    """:class:`EPollReactor` without the per-event legacy log context, with turn-end calls."""

    def __init__(self) -> None:
        super().__init__()
        self._turn_end: list[Callable[[], None]] = []

    def call_at_turn_end(self, f: Callable[[], None]) -> None:
        """Call ``f`` once, after this turn's I/O events and timed calls, before the next wait.

        Called from a turn-end call, ``f`` runs in the same pass.  What ``f``
        raises is logged, and the other calls still run.
        """
        self._turn_end.append(f)

    def _run_turn_end(self) -> None:
        calls = self._turn_end
        i = 0
        while i < len(calls):  # calls added meanwhile run in this pass too
            try:
                calls[i]()
            except Exception:
                log.failure("turn-end call {call!r} failed", call=calls[i])
            i += 1
        calls.clear()

    def doPoll(self, timeout: Optional[float]) -> None:
        if self._turn_end:
            # After runUntilCurrent, before the wait: a turn-end call that
            # scheduled a timed call must not be held back by a long timeout.
            self._run_turn_end()
            if self._newTimedCalls:
                timeout = self.timeout()
        if timeout is None:
            timeout = -1  # block until an event
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        dispatch(self, events, self._selectables)

    doIteration = doPoll


def install() -> Any:
    """Install :class:`KvhaEPollReactor` as ``twisted.internet.reactor``."""
    from twisted.internet.main import installReactor

    reactor = KvhaEPollReactor()
    installReactor(reactor)
    return reactor


__all__ = ["KvhaEPollReactor", "install"]
