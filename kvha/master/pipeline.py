"""Ordered replies for pipelined client protocols.

A client may send many requests before reading a reply, and the data nodes
answer them in any order.  Each request takes a slot in a queue as it is
read; its reply fills the slot when ready; the filled slots at the head of the
queue leave in one write.  Requests on the same key from one connection run
one after another, so a client reads its own writes.  When ``max_in_flight``
replies are pending the protocol stops reading the connection, so a client
that pipelines without reading cannot make the master buffer without bound.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from kvha.flush import BufferedWrites, TurnFlusher
from kvha.master.auth import Authenticator
from kvha.master.limits import ConnectionBudget
from kvha.master.router import Router

log = Logger(namespace=__name__)  # compiled (mypyc): no frame to take the name from


class ClientFactory(Factory):
    """What the memcached and Redis listeners share: routing, partition, limits, output."""

    def __init__(
        self,
        router: Router,
        partition: bytes,
        clock: IReactorTime,
        *,
        max_connections: int,
        max_in_flight: int,
        max_line_bytes: int,
        max_value_bytes: int,
        idle_timeout: float,
        authenticator: Optional[Authenticator],
        budget: Optional[ConnectionBudget],
        bound: bool,
        flusher: Optional[TurnFlusher],
    ) -> None:
        self.router = router
        #: Gathers each connection's replies into one send per reactor turn (None: write at once).
        self.flusher = flusher
        #: The partition a connection starts in, if it allows anonymous access or
        #: the port is ``bound``; otherwise connections must authenticate first.
        self.partition = partition
        self.clock = clock
        self.authenticator = authenticator if authenticator is not None else Authenticator(router)
        #: Connection slots; one budget is shared by every port of a master.
        self.budget = budget if budget is not None else ConnectionBudget(max_connections)
        #: Every connection is in ``partition``: no other partition can be chosen.
        self.bound = bound
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.max_line_bytes = max_line_bytes
        self.max_value_bytes = max_value_bytes
        self.idle_timeout = idle_timeout


class OrderedReplies(BufferedWrites, Protocol):
    """Base for client protocols: slots, per-key ordering and back-pressure."""

    #: Producer and consumer as well as a TCP/TLS transport (registerProducer,
    #: pauseProducing, abortConnection): no one Twisted interface covers all of it.
    transport: Any

    max_in_flight = 256

    def __init__(self) -> None:
        self._slots: deque[list[Optional[bytes]]] = deque()
        self._key_tail: dict[bytes, Deferred] = {}
        #: Per key, the last operation decided at the primary: [connection, Deferred].
        self._primary_chain: dict[bytes, list[Any]] = {}
        #: Fires once a whole-partition operation (after_all) is done.
        self._barrier: Optional[Deferred] = None
        self._paused = False
        self._held = False
        self._quitting = False
        self._closed = False

    # Idle timeout ------------------------------------------------------------
    # Subclasses set ``clock`` and ``idle_timeout`` (0 = never) and call
    # touch_idle() on connect and on every read; ``kind`` names them in the log.

    kind = "client"
    idle_timeout = 0.0
    _idle_call: Any = None

    def touch_idle(self) -> None:
        timeout = self.idle_timeout
        if not timeout:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self.clock.callLater(timeout, self._idle)  # type: ignore[attr-defined]

    def cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()

    def _idle(self) -> None:
        if self.pending_replies():
            self.touch_idle()
            return
        log.info("closing idle {kind} client {peer}", kind=self.kind, peer=self.transport.getPeer())
        self.flush_out()
        self.transport.loseConnection()

    # Hooks ------------------------------------------------------------------

    def resume_input(self) -> None:
        """Called when reading resumes: parse what was buffered meanwhile."""

    # Replies ----------------------------------------------------------------

    def reply(self, data: bytes) -> None:
        """A reply that is ready now, in its place in the queue."""
        if self._slots:
            self._slots.append([data])
        elif not self._closed:
            self.out(data)

    def slot(self) -> list[Optional[bytes]]:
        slot: list[Optional[bytes]] = [None]
        self._slots.append(slot)
        if len(self._slots) >= self.max_in_flight and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        return slot

    def fill(self, slot: list[Optional[bytes]], data: bytes) -> None:
        slot[0] = data
        slots = self._slots
        if not slots or slots[0] is not slot:
            return
        out = []
        while slots and slots[0][0] is not None:
            out.append(slots.popleft()[0])
        if self._closed:
            return
        self.out(b"".join(out) if len(out) > 1 else out[0])  # type: ignore[arg-type]
        if self._paused and len(slots) < max(1, self.max_in_flight // 2) and not self._held:
            self._paused = False
            self.transport.resumeProducing()
            self.resume_input()
        if self._quitting and not slots:
            self.flush_out()
            self.transport.loseConnection()

    def deferred_reply(
        self,
        d: Deferred,
        render: Callable[[Any], bytes],
        on_error: Callable[[Any], bytes],
        silent: bool = False,
    ) -> None:
        """Route ``d``'s outcome into a slot; ``silent`` keeps only error replies.

        ``on_error`` gets the Failure.
        """
        done, fail = self.reply_later(render, on_error, silent)
        d.addCallbacks(done, fail)

    def reply_later(
        self,
        render: Callable[[Any], bytes],
        on_error: Callable[[Any], bytes],
        silent: bool = False,
    ) -> tuple[Callable[[Any], None], Callable[[Any], None]]:
        """A slot, and two functions that fill it: with ``render(result)`` or ``on_error(error)``.

        For operations that report to plain functions (``Router.get_cb``,
        ``Router.set_cb``: the error is an exception) as well as, through
        :meth:`deferred_reply`, a Deferred's outcome (a Failure).
        """
        slot = self.slot()
        fill = self.fill
        if silent:
            is_error = self.is_error

            def done(result: Any) -> None:
                data = render(result)
                fill(slot, data if is_error(data) else b"")

        else:

            def done(result: Any) -> None:
                fill(slot, render(result))

        return done, lambda error: fill(slot, on_error(error))

    def gated(self, key: bytes) -> bool:
        """Whether a multi-step operation on ``key`` is still running (see :meth:`after`),
        or a whole-partition one is waiting (see :meth:`after_all`)."""
        return key in self._key_tail or self._barrier is not None

    def is_error(self, data: bytes) -> bool:
        return False

    def hold_input(self) -> None:
        """Read and run nothing more until :meth:`release_input` (a password is being checked).

        Commands after an authentication must run in the partition it chooses,
        so they wait for its outcome; the transport is paused meanwhile.
        """
        self._held = True
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def release_input(self) -> None:
        self._held = False
        if self._paused and len(self._slots) < max(1, self.max_in_flight // 2) and not self._closed:
            self._paused = False
            self.transport.resumeProducing()
            self.resume_input()

    def quit_after_replies(self) -> None:
        """Close once every pending reply is written (QUIT, fatal errors)."""
        self._quitting = True
        if not self._slots:
            self.flush_out()
            self.transport.loseConnection()

    def pending_replies(self) -> int:
        return len(self._slots)

    def forget_replies(self) -> None:
        self._closed = True
        self._slots.clear()
        self._out = None

    # Per-key order ------------------------------------------------------------

    def after(
        self, keys: list[bytes], start: Callable[[], Deferred], register: bool = True
    ) -> Deferred:
        """Run ``start`` once earlier multi-step operations on ``keys`` are done.

        Each key maps to the Deferred of the last multi-step operation on it
        (a conditional operation, a read-modify-write: several round trips); a
        later operation on the key chains behind it with a pass-through
        callback, so the earlier operation's own result is untouched.

        A single-step operation (a read, a plain write or delete, sent to every
        copy at once) registers nothing (``register=False``) when it can be
        sent at once: its frames reach each data node ahead of anything this
        connection sends later, on the same ordered connection, so what comes
        after it sees it anyway.  That is what keeps pipelined reads and writes
        of one key pipelined.  One that has to wait is registered until done,
        so that nothing on its keys overtakes it.
        """
        tails = self._key_tail
        if len(keys) == 1:
            gate = tails.get(keys[0])
            waits = [gate] if gate is not None else []
        else:
            waits = [tails[k] for k in keys if k in tails]
        if self._barrier is not None:
            waits.append(self._barrier)
        if not waits:
            d = start()
            if not register:
                return d
        else:
            d = Deferred()
            # Something now waits behind the last operation on these keys: a
            # later operation at the primary must not be sent ahead of it.
            chains = self._primary_chain
            for k in keys:
                chains.pop(k, None)

            def go(result: Any) -> Any:
                defer.maybeDeferred(start).chainDeferred(d)
                return result

            if len(waits) == 1:
                waits[0].addBoth(go)
            else:
                defer.DeferredList(waits).addBoth(go)
        if register or waits:
            # A single-step operation that waits is registered too: a later
            # one on any of its keys (one that was not gated, say) must not
            # be sent ahead of it.  Even a Deferred that has fired may still
            # be waiting on a chained one (a primary's answer waiting for its
            # replication); one that is truly done releases the keys at once.
            self._register(keys, d)
        return d

    def _register(self, keys: list[bytes], d: Deferred) -> None:
        """Make ``d`` the last multi-step operation on ``keys`` until it is done."""
        tails = self._key_tail
        for k in keys:
            tails[k] = d

        def release(result: Any) -> Any:
            for k in keys:
                if tails.get(k) is d:
                    del tails[k]
            return result

        d.addBoth(release)

    def after_at_primary(
        self, key: bytes, primary_of: Callable[[], Any], start: Callable[[], Deferred]
    ) -> Deferred:
        """:meth:`after` for an operation decided at the key's primary (INCR, CAS, ADD...).

        Such an operation runs at the primary, which applies what one
        connection sends in order, and is then replicated.  When the last
        multi-step operation on ``key`` is one of these, sent on the same
        data-node connection that ``primary_of()`` names now, a new one is
        sent at once instead of after the earlier one's replication: the
        primary applies them in order either way, and replies still leave in
        order.  That is what makes pipelined INCRs on one key pipelined.
        Anything else (a read, a read-modify-write, or a primary that changed
        or reconnected meanwhile) waits, as with :meth:`after`.
        """
        if key in self._primary_chain:
            conn = primary_of()
            if self._follows_primary(key, conn):
                d = start()
                self._chain(key, [conn, d])
                return d
        new: list[Any] = [None, None]

        def start_at_primary() -> Deferred:
            new[0] = primary_of()  # what ``start`` is about to use
            return start()

        d = self.after([key], start_at_primary)
        new[1] = d
        self._chain(key, new)
        return d

    def at_primary(self, partition: bytes, key: bytes, start: Callable[[], Deferred]) -> Deferred:
        """:meth:`after_at_primary` for ``start`` = a ``Router.conditional`` on ``key``."""
        router: Router = self.router  # type: ignore[attr-defined]
        return self.after_at_primary(key, lambda: router.primary_connection(partition, key), start)

    def at_primary_cb(
        self,
        partition: bytes,
        key: bytes,
        send: Callable[[Callable[[Any], None], Callable[[BaseException], None]], None],
        render: Callable[[Any], bytes],
        on_error: Callable[[BaseException], bytes],
        silent: bool = False,
    ) -> None:
        """:meth:`at_primary` answered into a reply slot, without a Deferred per step.

        ``send(on_done, on_fail)`` starts a ``Router.conditional_cb``;
        ``render`` / ``on_error`` make the reply, as for :meth:`reply_later`.
        When it may run at once (nothing earlier on ``key``, or only
        operations at the same primary connection) the one Deferred left is
        the key's gate for what comes after it; otherwise it waits as
        :meth:`at_primary` does.
        """
        done, fail = self.reply_later(render, on_error, silent)
        router: Router = self.router  # type: ignore[attr-defined]
        conn = router.primary_connection(partition, key)
        if (key in self._key_tail or self._barrier is not None) and not self._follows_primary(
            key, conn
        ):

            def start() -> Deferred:
                d: Deferred = Deferred()
                send(d.callback, d.errback)
                return d

            waited = self.at_primary(partition, key, start)
            waited.addCallbacks(done, lambda f: fail(f.value))
            return
        gate: Deferred = Deferred()
        self._chain(key, [conn, gate])

        def ok(result: Any) -> None:
            gate.callback(None)
            done(result)

        def failed(error: BaseException) -> None:
            gate.callback(None)
            fail(error)

        send(ok, failed)

    def _follows_primary(self, key: bytes, conn: Any) -> bool:
        """Whether the last operation on ``key`` is one at the primary sent on ``conn``.

        Then a new one on ``conn`` may be sent at once (see :meth:`after_at_primary`).
        """
        entry = self._primary_chain.get(key)
        return (
            entry is not None
            and conn is not None
            and conn is entry[0]
            and self._key_tail.get(key) is entry[1]
        )

    def _chain(self, key: bytes, entry: list[Any]) -> None:
        """``entry`` = [data-node connection or None until started, Deferred]."""
        d = entry[1]
        if self._key_tail.get(key) is not d:
            self._register([key], d)
        chains = self._primary_chain
        chains[key] = entry

        def release(result: Any) -> Any:
            if chains.get(key) is entry:
                del chains[key]
            return result

        d.addBoth(release)

    def after_all(self, start: Callable[[], Deferred]) -> Deferred:
        """Run ``start`` once every operation this connection started is done.

        Until it is done, it is a barrier: everything read after it waits
        for it (:meth:`gated` is true for every key).  A write that follows a
        FLUSHDB is not sent ahead of it and flushed, and one that follows a
        KEYS is not listed by the KEYS's later pages.
        """
        self._primary_chain.clear()  # nothing at a primary may overtake it
        pending = list(set(self._key_tail.values()))
        if self._barrier is not None:
            pending.append(self._barrier)
        barrier: Deferred = Deferred()
        self._barrier = barrier

        def lift(result: Any) -> Any:
            if self._barrier is barrier:
                self._barrier = None
            barrier.callback(None)
            return result

        if not pending:
            d = defer.maybeDeferred(start)
        else:
            d = Deferred()
            defer.DeferredList(pending).addBoth(
                lambda _: defer.maybeDeferred(start).chainDeferred(d)
            )
        d.addBoth(lift)
        return d
