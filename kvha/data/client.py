"""The master's side of the internal protocol: a pipelined, reconnecting client.

``DataClientProtocol`` keeps every request in flight in one dict keyed by
request id (in the manner of ``twisted.protocols.memcache``'s pending
deque, but matched by id so replies may come in any order).  A request
that has waited longer than ``request_timeout`` fails with
:class:`RequestTimeout`; when the connection goes, every pending request
fails with :class:`NodeUnavailable`.  Timeouts are checked by one periodic
scan of the oldest requests rather than a timer per request, which keeps the
hot path to a dict insert and a ``transport.write``.

``DataNodeClient`` wraps a ``ClientService`` that reconnects with backoff and
hands out the protocol only after the handshake proved both sides hold the
cluster secret.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable, Optional

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from kvha import wire
from kvha.data.store import IncrMode, Result, Status, StoreMode
from kvha.flush import BufferedWrites, TurnFlusher, no_delay, read_directly
from kvha.record import Record, pack, tombstone, unpack
from kvha.ring import TokenRange

log = Logger(namespace=__name__)  # compiled (mypyc): no frame to take the name from


class DataNodeError(Exception):
    """The data node answered a request with an error."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message


class NodeUnavailable(Exception):
    """No connection to the data node, or it was lost with the request pending."""


class RequestTimeout(Exception):
    """The data node did not answer in time."""


class AuthenticationFailed(Exception):
    """The handshake failed: wrong secret or protocol version."""


Consumer = Callable[[list[tuple[bytes, bytes, bytes]]], Any]


class _StreamState:
    __slots__ = ("busy", "consumer", "done", "end", "last_activity", "window")

    def __init__(self, consumer: Consumer, done: Deferred, now: float, window: int) -> None:
        self.consumer = consumer
        self.done = done
        self.last_activity = now
        self.window = window
        self.busy = 0  # batches whose consumer Deferred has not fired yet
        self.end: Optional[tuple[int, int]] = None  # StreamEnd's totals, once received


#: Requests a data-node connection gathers before it sends them mid-turn.
EARLY_FLUSH_FRAMES = 32


class DataClientProtocol(BufferedWrites, Protocol):
    """One authenticated, pipelined connection to a data node."""

    transport: ITCPTransport  # TCP or TLS; None only before connectionMade

    def __init__(
        self,
        secret: bytes,
        client_id: str,
        clock: IReactorTime,
        request_timeout: float = 5.0,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
    ) -> None:
        self.secret = secret
        self.client_id = client_id
        self.clock = clock
        self.request_timeout = request_timeout
        self.reader = wire.FrameReader(max_frame)
        #: request id: (its waiter, when it was sent)
        self.pending: dict[int, tuple[_Waiter, float]] = {}
        self.streams: dict[int, _StreamState] = {}
        self.ready: Deferred = Deferred()
        self.node_id = "?"
        self.node_state = "?"
        self.connected_ok = False
        self._next_id = 1
        self._nonce = b""
        self._timeouts: Optional[LoopingCall] = None
        self.on_lost: Optional[Callable[[DataClientProtocol], None]] = None
        # A busy turn's requests leave in groups, so that the data node starts
        # on the first while the master still parses the rest (BufferedWrites).
        self.early_flush = EARLY_FLUSH_FRAMES

    # Connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        read_directly(self.transport, self)
        loop = LoopingCall(self._check_timeouts)
        loop.clock = self.clock
        loop.start(max(0.01, self.request_timeout / 4), now=False)
        self._timeouts = loop

    def connectionLost(self, reason: Any = None) -> None:
        if self._timeouts is not None and self._timeouts.running:
            self._timeouts.stop()
        self.connected_ok = False
        # Tell the owner first, so that callers falling over see the node gone.
        if self.on_lost is not None:
            self.on_lost(self)
        failure = NodeUnavailable(f"connection to data node {self.node_id} lost")
        pending, self.pending = self.pending, {}
        for d, _ in pending.values():
            d.errback(failure)
        streams, self.streams = self.streams, {}
        for state in streams.values():
            state.done.errback(failure)
        if not self.ready.called:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self.ready.errback(NodeUnavailable(f"lost before the handshake: {why}"))

    def _check_timeouts(self) -> None:
        now = self.clock.seconds()
        deadline = now - self.request_timeout
        expired = []
        for request_id, (_d, sent) in self.pending.items():
            if sent > deadline:
                break  # the dict is in send order: the rest are younger
            expired.append(request_id)
        for request_id in expired:
            d, _ = self.pending.pop(request_id)
            d.errback(RequestTimeout(f"data node {self.node_id} did not answer in time"))
        for request_id, state in list(self.streams.items()):
            if state.last_activity <= deadline and state.window > 0:
                del self.streams[request_id]
                self._send(wire.Cancel(), request_id)
                state.done.errback(RequestTimeout(f"stream from {self.node_id} stalled"))

    # Frames ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        try:
            chunk, end = self.reader.take(data)
        except wire.WireError as e:
            log.error("bad frame from data node {node}: {why}", node=self.node_id, why=str(e))
            self.transport.abortConnection()
            return
        offset = 0
        while offset < end:
            opcode, request_id, start, stop = wire.frame_at(chunk, offset)
            offset = stop
            if opcode == _RESULT_OPCODE and self.connected_ok and not self.streams:
                # The hot path: a Result, read in place (no body copy, no Message).
                try:
                    status, packed = wire.result_fields(chunk, start, stop)
                except wire.WireError as e:
                    self._bad_reply(e)
                    return
                # self.pending each time: a lost connection swaps in a new dict.
                entry = self.pending.pop(request_id, None)
                if entry is not None:  # else it timed out already
                    entry[0].result(status, packed)
                continue
            body = chunk[start:stop]
            try:
                if opcode == _RESULT_OPCODE:
                    msg = _decode_result(body)
                else:
                    msg = wire.decode(opcode, body)
            except wire.WireError as e:
                self._bad_reply(e)
                return
            if not self.connected_ok:
                self._handshake(msg)
                continue
            stream = self.streams.get(request_id)
            if stream is not None:
                self._stream_frame(request_id, stream, msg)
                continue
            entry = self.pending.pop(request_id, None)
            if entry is None:
                continue  # it timed out already
            if type(msg) is wire.Error:
                entry[0].errback(DataNodeError(msg.code, msg.message))
            else:
                entry[0].callback(msg)

    def _bad_reply(self, e: wire.WireError) -> None:
        log.error("bad reply from data node {node}: {why}", node=self.node_id, why=str(e))
        self.transport.abortConnection()

    def _handshake(self, msg: wire.Message) -> None:
        if isinstance(msg, wire.Challenge):
            if msg.version != wire.PROTOCOL_VERSION:
                self._refused(f"data node speaks protocol version {msg.version}")
                return
            self.node_id = msg.node_id
            self._nonce = msg.nonce
            proof = wire.proof(self.secret, wire.CLIENT_LABEL, msg.nonce)
            self.transport.write(wire.Hello(wire.PROTOCOL_VERSION, self.client_id, proof).frame(0))
        elif isinstance(msg, wire.Welcome):
            if not wire.proof_ok(self.secret, wire.SERVER_LABEL, self._nonce, msg.proof):
                self._refused("data node failed to prove it holds the cluster secret")
                return
            self.connected_ok = True
            self.node_state = msg.state
            self.ready.callback(self)
        elif isinstance(msg, wire.Error):
            self._refused(msg.message)
        else:
            self._refused(f"unexpected {type(msg).__name__} during handshake")

    def _refused(self, why: str) -> None:
        log.error("handshake with data node {node} failed: {why}", node=self.node_id, why=why)
        if not self.ready.called:
            self.ready.errback(AuthenticationFailed(why))
        self.transport.abortConnection()

    # Requests ----------------------------------------------------------------------

    def _send(self, msg: wire.Message, request_id: int) -> None:
        self.out(msg.frame(request_id))

    def _new_id(self) -> int:
        request_id = self._next_id
        self._next_id = (request_id + 1) & 0xFFFFFFFF or 1
        return request_id

    def _pend(self, waiter: _Waiter) -> int:
        """A new request id whose reply goes to ``waiter``."""
        request_id = self._new_id()
        self.pending[request_id] = (waiter, self.clock.seconds())
        return request_id

    def request_frame(self, build: Callable[..., bytes], *args: Any) -> Deferred:
        """Like request(), with the frame built by ``build(request_id, *args)``."""
        d: Deferred = Deferred()
        self.out(build(self._pend(_DeferredWaiter(d)), *args))
        return d

    def request_cb(
        self,
        build: Callable[..., bytes],
        on_reply: Callable[[Any], None],
        on_error: Callable[[BaseException], None],
        *args: Any,
    ) -> None:
        """Like request_frame(), answered by plain functions instead of a Deferred."""
        self.out(build(self._pend(_Callbacks(on_reply, on_error)), *args))

    def apply_cb(
        self,
        partition: bytes,
        key: bytes,
        packed: bytes,
        on_done: Callable[[Result], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        """One Apply, answered by plain functions (the write hot path, in one call)."""
        self.apply_to(partition, key, packed, _AppliedCallbacks(on_done, on_fail))

    def apply_to(self, partition: bytes, key: bytes, packed: bytes, waiter: ApplyWaiter) -> None:
        """One Apply, answered to ``waiter`` (the write hot path: no function built)."""
        waiter.sent = packed
        self.out(wire.apply_frame(self._pend(waiter), partition, key, packed))

    def get_cb(
        self,
        partition: bytes,
        key: bytes,
        on_done: Callable[[Optional[Record]], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        """One Get without tombstones, answered by plain functions (the read hot path)."""
        self.out(wire.get_frame(self._pend(_RecordCallbacks(on_done, on_fail)), partition, key, 0))

    def request(self, msg: wire.Message) -> Deferred:
        """Send ``msg``; the Deferred fires with the reply message."""
        d: Deferred = Deferred()
        self.out(msg.frame(self._pend(_DeferredWaiter(d))))
        return d

    def stream(
        self,
        ranges: Sequence[TokenRange],
        min_version: int,
        consumer: Consumer,
        partitions: Sequence[bytes] = (),
        window: int = 8,
    ) -> Deferred:
        """Receive every matching record, batch by batch, with flow control.

        ``consumer`` gets each batch; if it returns a Deferred, no credit is
        granted for that batch until it fires, so a slow consumer slows the
        sender.  The result fires with ``(records, bytes)`` at the end, once
        the consumer has finished with every batch.
        """
        request_id = self._new_id()
        done: Deferred = Deferred()
        self.streams[request_id] = _StreamState(consumer, done, self.clock.seconds(), window)
        self._send(wire.Stream(list(ranges), min_version, list(partitions), window), request_id)
        return done

    def _stream_frame(self, request_id: int, state: _StreamState, msg: wire.Message) -> None:
        state.last_activity = self.clock.seconds()
        if isinstance(msg, wire.StreamBatch):
            state.window -= 1
            try:
                result = state.consumer(msg.records)
            except Exception as e:
                self.streams.pop(request_id, None)
                self._send(wire.Cancel(), request_id)
                state.done.errback(e)
                return
            if isinstance(result, Deferred):
                state.busy += 1
                result.addCallbacks(
                    lambda _: self._batch_done(request_id, state),
                    lambda f: self._stream_failed(request_id, state, f),
                )
            else:
                self._grant(request_id)
        elif isinstance(msg, wire.StreamEnd):
            self.streams.pop(request_id, None)
            state.end = (msg.count, msg.bytes)
            if not state.busy:
                state.done.callback(state.end)
        elif isinstance(msg, wire.Error):
            self.streams.pop(request_id, None)
            state.done.errback(DataNodeError(msg.code, msg.message))

    def _grant(self, request_id: int) -> None:
        state = self.streams.get(request_id)
        if state is not None and self.connected_ok:
            state.window += 1
            state.last_activity = self.clock.seconds()
            self._send(wire.Credit(1), request_id)

    def _batch_done(self, request_id: int, state: _StreamState) -> None:
        state.busy -= 1
        if state.end is None:
            self._grant(request_id)
        elif not state.busy and not state.done.called:
            state.done.callback(state.end)

    def _stream_failed(self, request_id: int, state: _StreamState, failure: Any) -> None:
        state.busy -= 1
        if self.streams.get(request_id) is state:
            del self.streams[request_id]
            if self.connected_ok:
                self._send(wire.Cancel(), request_id)
        if not state.done.called:
            state.done.errback(failure)


class _Waiter:
    """What a pending request's reply goes to.

    ``result`` takes a Result frame's fields, read in place on the hot path;
    ``callback`` any other reply message; ``errback`` an error.  None may
    raise into the protocol, whose other requests would be lost with it.
    """

    def result(self, status: int, packed: bytes) -> None:
        self.callback(wire.Result(status, packed))

    def callback(self, msg: Any) -> None:
        raise NotImplementedError

    def errback(self, error: BaseException) -> None:
        raise NotImplementedError


class _DeferredWaiter(_Waiter):
    """A Deferred fired with the reply message."""

    __slots__ = ("d",)

    def __init__(self, d: Deferred) -> None:
        self.d = d

    def callback(self, msg: Any) -> None:
        self.d.callback(msg)

    def errback(self, error: BaseException) -> None:
        self.d.errback(error)


class _Callbacks(_Waiter):
    """A pending request's outcome as two plain functions: what a Deferred does, cheaper.

    A function that raises is logged (see :class:`_Waiter`).
    """

    __slots__ = ("on_reply", "on_error")

    def __init__(
        self, on_reply: Callable[[Any], None], on_error: Callable[[BaseException], None]
    ) -> None:
        self.on_reply = on_reply
        self.on_error = on_error

    def callback(self, msg: Any) -> None:
        try:
            self.on_reply(msg)
        except Exception:
            log.failure("a data-node reply handler failed")

    def errback(self, error: BaseException) -> None:
        try:
            self.on_error(error)
        except Exception:
            log.failure("a data-node error handler failed")


class DataClientFactory(Factory):
    noisy = False
    protocol = DataClientProtocol
    #: Set by the owner: gathers request frames into one send per reactor turn.
    flusher: Optional[TurnFlusher] = None

    def __init__(
        self,
        secret: bytes,
        client_id: str,
        clock: IReactorTime,
        request_timeout: float,
        max_frame: int,
    ) -> None:
        self.secret = secret
        self.client_id = client_id
        self.clock = clock
        self.request_timeout = request_timeout
        self.max_frame = max_frame

    def buildProtocol(self, addr: Any) -> DataClientProtocol:
        proto = DataClientProtocol(
            self.secret, self.client_id, self.clock, self.request_timeout, self.max_frame
        )
        proto.factory = self
        proto.flusher = self.flusher
        return proto


_RESULT_OPCODE = wire.Result.OPCODE
_STATUSES = {int(s): s for s in Status}


def _decode_result(body: bytes) -> wire.Message:
    status, packed = wire.result_fields(body, 0, len(body))
    return wire.Result(status, packed)


class ApplyWaiter(_Waiter):
    """An Apply's waiter: subclass it, and override ``applied`` and ``failed``.

    A compiled class (kvha.compiled): its subclasses must be compiled too,
    as the router's ``_CopyWrite`` is.

    ``applied`` gets the Result (a record stored as sent comes back as
    ``sent``, see :func:`_applied`), ``failed`` the exception.  Neither may
    raise; what does is logged.
    """

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = b""

    def applied(self, result: Result) -> None:
        raise NotImplementedError

    def failed(self, error: BaseException) -> None:
        raise NotImplementedError

    def result(self, status: int, packed: bytes) -> None:
        try:
            self.applied(_applied_fields(status, packed, self.sent))
        except Exception:
            log.failure("a data-node reply handler failed")

    def callback(self, msg: Any) -> None:
        self.result(msg.status, msg.packed)

    def errback(self, error: BaseException) -> None:
        try:
            self.failed(error)
        except Exception:
            log.failure("a data-node error handler failed")


class _AppliedCallbacks(ApplyWaiter):
    """An Apply's outcome to two plain functions (``apply_cb``)."""

    __slots__ = ("on_reply", "on_error")

    def __init__(
        self, on_reply: Callable[[Result], None], on_error: Callable[[BaseException], None]
    ) -> None:
        super().__init__()
        self.on_reply = on_reply
        self.on_error = on_error

    def applied(self, result: Result) -> None:
        self.on_reply(result)

    def failed(self, error: BaseException) -> None:
        self.on_error(error)


class _RecordCallbacks(_Callbacks):
    """A Get's waiter: ``on_reply`` gets the Record, or None."""

    __slots__ = ()

    def result(self, status: int, packed: bytes) -> None:
        try:
            self.on_reply(unpack(packed) if packed else None)
        except Exception:
            log.failure("a data-node reply handler failed")

    def callback(self, msg: Any) -> None:
        self.result(msg.status, msg.packed)


def _result(msg: wire.Result) -> Result:
    return Result(_STATUSES[msg.status], msg.packed or None)


def _applied_fields(status: int, packed: bytes, sent: bytes) -> Result:
    """An Apply's Result.  A record stored as sent is not sent back: it is ``sent``."""
    code = _STATUSES[status]
    if not packed and code is Status.STORED:
        return Result(code, sent)
    return Result(code, packed or None)


def _applied(msg: wire.Result, sent: bytes) -> Result:
    return _applied_fields(msg.status, msg.packed, sent)


def _apply_many_frame(
    request_id: int, partition: bytes, keys: Sequence[bytes], records: Sequence[bytes]
) -> bytes:
    return wire.ApplyMany(partition, list(keys), list(records)).frame(request_id)


def _many_results(msg: wire.Message, sent: Sequence[bytes]) -> list[Result]:
    """The Results of an ApplyMany, one per record sent (see :func:`_applied`)."""
    if not isinstance(msg, wire.Results):
        raise wire.WireError(f"expected Results, got {type(msg).__name__}")
    statuses, back = msg.statuses, msg.packed
    if len(statuses) != len(sent) or len(back) != len(sent):
        raise wire.WireError(f"{len(statuses)} results for {len(sent)} records")
    out = []
    stored = Status.STORED
    for status_byte, packed, mine in zip(statuses, back, sent):
        status = _STATUSES[status_byte]
        out.append(Result(status, mine if not packed and status is stored else packed or None))
    return out


def _incr_frame(
    request_id: int, partition: bytes, key: bytes, mode: IncrMode, delta: bytes
) -> bytes:
    return wire.Incr(int(mode), partition, key, delta).frame(request_id)


def _record(msg: wire.Result) -> Optional[Record]:
    return _result(msg).record


class DataNodeClient:
    """A reconnecting client of one data node, with the operations as methods.

    Every method returns a Deferred.  While there is no authenticated
    connection the Deferred fails at once with :class:`NodeUnavailable`,
    so callers can fall over to another copy without waiting.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        secret: bytes,
        client_id: str = "",
        request_timeout: float = 5.0,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
        clock: Optional[IReactorTime] = None,
        retry_max_delay: float = 2.0,
        flusher: Optional[TurnFlusher] = None,
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock if clock is not None else reactor
        #: Whether the node takes ApplyMany (False once it answered "unknown opcode").
        self.apply_many_supported = True
        self.protocol: Optional[DataClientProtocol] = None
        self._waiting: list[Deferred] = []
        self._warned = False
        #: Called with the protocol once a connection is authenticated, and lost.
        self.on_ready: Optional[Callable[[DataClientProtocol], None]] = None
        self.on_lost: Optional[Callable[[DataClientProtocol], None]] = None
        factory = _ReadyFactory(
            self,
            secret,
            client_id or f"client-{os.getpid()}",
            self.clock,
            request_timeout,
            max_frame,
        )
        factory.flusher = flusher
        self._service = ClientService(
            endpoints.clientFromString(reactor, endpoint),
            factory,
            retryPolicy=backoffPolicy(initialDelay=0.05, factor=1.5, maxDelay=retry_max_delay),
            clock=self.clock,
        )

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> Deferred:
        return defer.maybeDeferred(self._service.stopService)

    @property
    def connected(self) -> bool:
        return self.protocol is not None

    def when_ready(self) -> Deferred:
        """Fires with the protocol once an authenticated connection exists."""
        if self.protocol is not None:
            return defer.succeed(self.protocol)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d

    def _not_ready(self, failure: Any) -> None:
        """A connection lost before its handshake (TLS, secret); logged once per streak."""
        if not self._warned and not failure.check(AuthenticationFailed):  # that one is logged
            self._warned = True
            log.warn(
                "connection to data node at {endpoint} failed: {why}",
                endpoint=self.endpoint,
                why=failure.getErrorMessage(),
            )

    def _ready(self, proto: DataClientProtocol) -> None:
        self._warned = False
        self.protocol = proto
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(proto)
        if self.on_ready is not None:
            self.on_ready(proto)

    def _lost(self, proto: DataClientProtocol) -> None:
        if self.protocol is proto:
            self.protocol = None
            if self.on_lost is not None:
                self.on_lost(proto)

    def _call(self, msg: wire.Message) -> Deferred:
        proto = self.protocol
        if proto is None:
            return defer.fail(NodeUnavailable(f"not connected to {self.endpoint}"))
        return proto.request(msg)

    # Operations --------------------------------------------------------------------

    def get(self, partition: bytes, key: bytes, tombstones: bool = False) -> Deferred:
        """Fires with the Record, or None."""
        proto = self.protocol
        if proto is None:
            return defer.fail(NodeUnavailable(f"not connected to {self.endpoint}"))
        d = proto.request_frame(wire.get_frame, partition, key, 1 if tombstones else 0)
        return d.addCallback(_record)

    def _request_cb(
        self,
        build: Callable[..., bytes],
        on_reply: Callable[[Any], None],
        on_fail: Callable[[BaseException], None],
        *args: Any,
    ) -> None:
        """``request_cb`` on the connection, or ``on_fail`` at once if there is none."""
        proto = self.protocol
        if proto is None:
            on_fail(NodeUnavailable(f"not connected to {self.endpoint}"))
            return
        proto.request_cb(build, on_reply, on_fail, *args)

    def get_cb(
        self,
        partition: bytes,
        key: bytes,
        on_done: Callable[[Optional[Record]], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        """:meth:`get` without a Deferred: ``on_done(record or None)`` or ``on_fail(error)``."""
        proto = self.protocol
        if proto is None:
            on_fail(NodeUnavailable(f"not connected to {self.endpoint}"))
            return
        proto.get_cb(partition, key, on_done, on_fail)

    def apply_cb(
        self,
        partition: bytes,
        key: bytes,
        packed: bytes,
        on_done: Callable[[Result], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        """:meth:`apply` without a Deferred."""
        proto = self.protocol
        if proto is None:
            on_fail(NodeUnavailable(f"not connected to {self.endpoint}"))
            return
        proto.apply_cb(partition, key, packed, on_done, on_fail)

    def apply_to(self, partition: bytes, key: bytes, packed: bytes, waiter: ApplyWaiter) -> None:
        """:meth:`apply` answered to ``waiter`` (see :class:`ApplyWaiter`)."""
        proto = self.protocol
        if proto is None:
            waiter.errback(NodeUnavailable(f"not connected to {self.endpoint}"))
            return
        proto.apply_to(partition, key, packed, waiter)

    def apply_many_cb(
        self,
        partition: bytes,
        keys: Sequence[bytes],
        records: Sequence[bytes],
        on_done: Callable[[list[Result]], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        """Apply ``records[i]`` to ``keys[i]`` for every i, in one request.

        ``on_done`` gets one Result per record, in order.  A data node that
        does not know the request (an older version) gets one Apply per
        record instead, from then on.
        """
        if not self.apply_many_supported:
            self._apply_each(partition, keys, records, on_done, on_fail)
            return

        def replied(msg: wire.Message) -> None:
            try:
                results = _many_results(msg, records)
            except (wire.WireError, KeyError) as e:
                on_fail(wire.WireError(f"malformed Results from {self.endpoint}: {e}"))
                return
            on_done(results)

        def failed(error: BaseException) -> None:
            if isinstance(error, DataNodeError) and error.code == wire.E_UNKNOWN_OP:
                self.apply_many_supported = False
                self._apply_each(partition, keys, records, on_done, on_fail)
                return
            on_fail(error)

        self._request_cb(_apply_many_frame, replied, failed, partition, keys, records)

    def _apply_each(
        self,
        partition: bytes,
        keys: Sequence[bytes],
        records: Sequence[bytes],
        on_done: Callable[[list[Result]], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        results: list[Any] = [None] * len(keys)
        state = [len(keys), False]  # answers left, failed already

        def one(i: int) -> Callable[[Result], None]:
            def done(result: Result) -> None:
                results[i] = result
                state[0] -= 1
                if state[0] == 0 and not state[1]:
                    on_done(results)

            return done

        def failed(error: BaseException) -> None:
            if not state[1]:
                state[1] = True
                on_fail(error)

        for i, (key, packed) in enumerate(zip(keys, records)):
            self.apply_cb(partition, key, packed, one(i), failed)

    def mget(self, partition: bytes, keys: Sequence[bytes], tombstones: bool = False) -> Deferred:
        """Fires with a list of Record-or-None, in the order of ``keys``."""
        d = self._call(wire.MultiGet(partition, list(keys), int(tombstones)))
        return d.addCallback(
            lambda msg: [Result(Status.OK, p).record if p else None for _, _, p in msg.records]
        )

    def apply(self, partition: bytes, key: bytes, packed: bytes) -> Deferred:
        """Store a versioned record if newer.  Fires with a Result."""
        proto = self.protocol
        if proto is None:
            return defer.fail(NodeUnavailable(f"not connected to {self.endpoint}"))
        d = proto.request_frame(wire.apply_frame, partition, key, packed)
        return d.addCallback(_applied, packed)

    def set(
        self,
        partition: bytes,
        key: bytes,
        value: bytes,
        flags: int = 0,
        expires_ms: int = 0,
        version: int = 0,
    ) -> Deferred:
        return self.apply(partition, key, pack(value, version, flags, expires_ms))

    def store(
        self,
        mode: StoreMode,
        partition: bytes,
        key: bytes,
        value: bytes,
        flags: int = 0,
        expires_ms: int = 0,
        cas: int = 0,
    ) -> Deferred:
        msg = wire.Store(int(mode), partition, key, value, flags, expires_ms, cas)
        return self._call(msg).addCallback(_result)

    def incr(self, partition: bytes, key: bytes, mode: IncrMode, delta: bytes) -> Deferred:
        return self._call(wire.Incr(int(mode), partition, key, delta)).addCallback(_result)

    def incr_cb(
        self,
        partition: bytes,
        key: bytes,
        mode: IncrMode,
        delta: bytes,
        on_done: Callable[[Result], None],
        on_fail: Callable[[BaseException], None],
    ) -> None:
        """:meth:`incr` without a Deferred."""
        self._request_cb(
            _incr_frame, lambda msg: on_done(_result(msg)), on_fail, partition, key, mode, delta
        )

    def touch(self, partition: bytes, key: bytes, expires_ms: int) -> Deferred:
        return self._call(wire.Touch(partition, key, expires_ms)).addCallback(_result)

    def delete(self, partition: bytes, key: bytes, version: int = 0) -> Deferred:
        return self._call(wire.Delete(partition, key, version)).addCallback(_result)

    def delete_replica(self, partition: bytes, key: bytes, version: int) -> Deferred:
        """Replicate a delete: apply a tombstone of ``version`` if newer."""
        return self.apply(partition, key, tombstone(version))

    def flush(self, partition: bytes) -> Deferred:
        return self._call(wire.Flush(partition)).addCallback(lambda _: None)

    def scan(self, partition: bytes, after: int, count: int) -> Deferred:
        """Fires with up to ``count`` ``(token, key)`` pairs above ``after``, in token order."""
        d = self._call(wire.Scan(partition, after, count))
        return d.addCallback(lambda m: list(zip(m.tokens, m.keys)))

    def retain(self, ranges: Sequence[TokenRange]) -> Deferred:
        """Ask the node to drop every record outside ``ranges`` (in the background)."""
        return self._call(wire.Retain(list(ranges))).addCallback(lambda _: None)

    def control(
        self,
        action: int,
        holder: str,
        lease_ms: int = 0,
        done_keys: int = 0,
        done_bytes: int = 0,
        total_keys: int = 0,
    ) -> Deferred:
        """Merge coordination (see wire.Control).  Fires with (granted, state, high_water)."""
        msg = wire.Control(action, holder, lease_ms, done_keys, done_bytes, total_keys)
        return self._call(msg).addCallback(lambda m: (bool(m.granted), m.state, m.high_water))

    def partitions(self, epoch: int, table: Sequence[tuple[bytes, int, bool, int]]) -> Deferred:
        """Push the partition rules: ``(name, byte limit, evict, default TTL ms)`` each."""
        msg = wire.Partitions(
            epoch,
            [t[0] for t in table],
            [t[1] for t in table],
            bytes(int(t[2]) for t in table),
            [t[3] for t in table],
        )
        return self._call(msg).addCallback(lambda _: None)

    def ping(self) -> Deferred:
        """Fires with ``(state, high_water)``."""
        return self._call(wire.Ping()).addCallback(lambda m: (m.state, m.high_water))

    def stats(self) -> Deferred:
        """Fires with a dict of str -> str."""

        def to_dict(msg: wire.StatsReply) -> dict[str, str]:
            pairs = msg.pairs
            return {pairs[i].decode(): pairs[i + 1].decode() for i in range(0, len(pairs) - 1, 2)}

        return self._call(wire.Stats()).addCallback(to_dict)

    def stream(
        self,
        ranges: Sequence[TokenRange],
        min_version: int,
        consumer: Consumer,
        partitions: Sequence[bytes] = (),
        window: int = 8,
    ) -> Deferred:
        proto = self.protocol
        if proto is None:
            return defer.fail(NodeUnavailable(f"not connected to {self.endpoint}"))
        return proto.stream(ranges, min_version, consumer, partitions, window)


class _ReadyFactory(DataClientFactory):
    def __init__(
        self,
        owner: DataNodeClient,
        secret: bytes,
        client_id: str,
        clock: IReactorTime,
        request_timeout: float,
        max_frame: int,
    ) -> None:
        super().__init__(secret, client_id, clock, request_timeout, max_frame)
        self.owner = owner

    def buildProtocol(self, addr: Any) -> DataClientProtocol:
        proto = super().buildProtocol(addr)
        proto.ready.addCallbacks(self.owner._ready, self.owner._not_ready)
        proto.on_lost = self.owner._lost
        return proto
