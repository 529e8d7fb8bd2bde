"""The memcached text protocol on a master's client port.

Commands and their replies follow memcached 1.6's ``proto_text.c`` word for
word, so that memcached clients and ``memccapable -a`` cannot tell the
difference: storage commands (set, add, replace, append, prepend, cas, all
with ``noreply``), retrieval (get, gets, gat, gats), incr, decr, touch,
delete, flush_all (of the connection's partition only), stats, version,
verbosity and quit.

Partitions: a connection starts in its port's partition if that partition
allows anonymous access (or the port is bound to it).  Otherwise it must
first authenticate as memcached 1.6 does with ``-Y``: a ``set`` whose data
is ``partition password`` answers ``STORED`` (now in that partition) or
``CLIENT_ERROR authentication failure``, and any other command but
``version``, ``verbosity`` and ``quit`` answers ``CLIENT_ERROR
unauthenticated``.  On a port whose partition is anonymous, the first command
may also be such a ``set`` naming a partition that has a password; it then
authenticates instead of storing anything.

Requests are pipelined: each gets a slot in an ordered queue as it is read,
its reply fills the slot when the data nodes answer, and the filled slots at
the head go out in one write.  Operations on the same key from the same
connection run one after another, so a client always reads its own writes.
When ``max_in_flight`` replies are pending the master stops reading the
connection (back-pressure) rather than buffer without bound.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any, Callable, ClassVar, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kvha import __version__
from kvha.data.store import IncrMode, Result, Status, StoreMode
from kvha.flush import TurnFlusher, no_delay
from kvha.master.auth import NO_PARTITION, Authenticator, TooManyFailures, peer_host
from kvha.master.limits import ConnectionBudget
from kvha.master.pipeline import ClientFactory, OrderedReplies
from kvha.master.router import LOADING_WHY, Router
from kvha.record import Record, absolute_expiry_ms

log = Logger(namespace=__name__)  # compiled (mypyc): no frame to take the name from

#: What ``version`` answers: a memcached-style number first, for clients that parse it.
VERSION_LINE = f"VERSION 1.6.0 kvha/{__version__}\r\n".encode()
KEY_MAX = 250
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

ERROR = b"ERROR\r\n"
BAD_FORMAT = b"CLIENT_ERROR bad command line format\r\n"
BAD_CHUNK = b"CLIENT_ERROR bad data chunk\r\n"
TOO_LARGE = b"SERVER_ERROR object too large for cache\r\n"
#: While the master is starting (Router.loading): every command but these fails,
#: ``version`` too, so that a load balancer's probe fails until data can be read.
LOADING = f"SERVER_ERROR loading: {LOADING_WHY}\r\n".encode()
OK_LOADING = frozenset((b"stats", b"quit", b"verbosity"))
LINE_TOO_LONG = b"CLIENT_ERROR line too long\r\n"
BAD_DELTA = b"CLIENT_ERROR invalid numeric delta argument\r\n"
NON_NUMERIC = b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
BAD_EXPTIME = b"CLIENT_ERROR invalid exptime argument\r\n"
DELETE_USAGE = b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
UNAUTHENTICATED = b"CLIENT_ERROR unauthenticated\r\n"
AUTH_FAILURE = b"CLIENT_ERROR authentication failure\r\n"
AUTH_FORMAT = b"CLIENT_ERROR bad authentication token format\r\n"
#: Commands an unauthenticated connection may use (health checks, polite goodbyes).
_BEFORE_AUTH = frozenset((b"version", b"verbosity", b"quit"))

STORED = b"STORED\r\n"
NOT_STORED = b"NOT_STORED\r\n"
EXISTS = b"EXISTS\r\n"
NOT_FOUND = b"NOT_FOUND\r\n"
DELETED = b"DELETED\r\n"
TOUCHED = b"TOUCHED\r\n"
END = b"END\r\n"
OK = b"OK\r\n"

_STORE_MODES = {
    b"add": StoreMode.ADD,
    b"replace": StoreMode.REPLACE,
    b"append": StoreMode.APPEND,
    b"prepend": StoreMode.PREPEND,
    b"cas": StoreMode.CAS,
}

_CONTROL = bytes(range(33)) + b"\x7f"


def valid_key(key: bytes) -> bool:
    """At most 250 bytes, none of them a control character or space."""
    return 0 < len(key) <= KEY_MAX and key == key.translate(None, _CONTROL)


def _u32(token: bytes) -> Optional[int]:
    if not token.isdigit() or len(token) > 10:
        return None
    n = int(token)
    return n if n <= U32_MAX else None


def _i32(token: bytes) -> Optional[int]:
    body = token[1:] if token[:1] == b"-" else token
    if not body.isdigit() or len(body) > 10:
        return None
    n = int(token)
    return n if -(1 << 31) <= n < (1 << 31) else None


def _u64(token: bytes) -> Optional[int]:
    if not token.isdigit() or len(token) > 20:
        return None
    n = int(token)
    return n if n <= U64_MAX else None


class MemcacheStats:
    """Counters behind ``stats``, shared by every connection of one master."""

    COUNTERS: ClassVar[tuple[str, ...]] = (
        "cmd_get",
        "cmd_set",
        "cmd_flush",
        "cmd_touch",
        "get_hits",
        "get_misses",
        "delete_misses",
        "delete_hits",
        "incr_misses",
        "incr_hits",
        "decr_misses",
        "decr_hits",
        "cas_misses",
        "cas_hits",
        "cas_badval",
        "touch_hits",
        "touch_misses",
        "total_connections",
        "rejected_connections",
        "server_errors",
    )

    # The COUNTERS, set to 0 by __init__ (declared here for type checkers).
    cmd_get: int
    cmd_set: int
    cmd_flush: int
    cmd_touch: int
    get_hits: int
    get_misses: int
    delete_misses: int
    delete_hits: int
    incr_misses: int
    incr_hits: int
    decr_misses: int
    decr_hits: int
    cas_misses: int
    cas_hits: int
    cas_badval: int
    touch_hits: int
    touch_misses: int
    total_connections: int
    rejected_connections: int
    server_errors: int

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.started = clock.seconds()
        self.curr_connections = 0
        for name in self.COUNTERS:
            setattr(self, name, 0)
        #: Command counters of each partition; ``stats`` shows a client only its own.
        self.partitions: dict[bytes, MemcacheStats] = {}

    def for_partition(self, partition: bytes) -> MemcacheStats:
        stats = self.partitions.get(partition)
        if stats is None:
            stats = self.partitions[partition] = MemcacheStats(self.clock)
            stats.started = self.started
        return stats

    def total(self, name: str) -> int:
        """A counter summed over this object and every partition's (for /metrics)."""
        return int(getattr(self, name)) + sum(
            int(getattr(s, name)) for s in self.partitions.values()
        )

    def reset(self) -> None:
        for name in self.COUNTERS:
            if name != "total_connections":
                setattr(self, name, 0)


def _stored(_result: Any) -> bytes:
    return STORED


class MemcacheProtocol(OrderedReplies):
    """One memcached client connection."""

    kind = "memcached"

    def __init__(self, factory: MemcacheFactory) -> None:
        super().__init__()
        self.factory = factory
        self.flusher = factory.flusher
        self.router: Router = factory.router
        partition = factory.partition
        if not factory.bound and not factory.authenticator.anonymous(factory.partition):
            partition = NO_PARTITION
        #: The connection's partition; empty (no partition) until it authenticates.
        self.partition: bytes = partition
        #: Command counters: the partition's own once it has one.
        self.stats = factory.stats.for_partition(partition) if partition else factory.stats
        #: Commands go through :meth:`_gated` while authentication may still happen.
        self._gate = not factory.bound
        self._auth_data = False  # the pending storage command's data is credentials
        self._budgeted = False
        self.clock = factory.clock
        self.idle_timeout = factory.idle_timeout
        self.max_line = factory.max_line_bytes
        self.max_value = factory.max_value_bytes
        self.max_in_flight = factory.max_in_flight
        self._buffer = b""
        #: Where unread input starts in ``_buffer``: commands are consumed by
        #: moving it, and the buffer is cut once per read, not once per command
        #: (which copied the rest of a pipelined read for every line).
        self._pos = 0
        self._pending_data: Optional[tuple[Any, ...]] = None  # a storage command awaiting data
        self._swallow = 0  # bytes of a refused data block still to discard
        self._processing = False

    # Connection -------------------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        stats = self.factory.stats
        stats.total_connections += 1
        if not self.factory.budget.acquire():
            stats.rejected_connections += 1
            log.warn(
                "refused memcached client {peer}: {limit} connections already open",
                peer=self.transport.getPeer(),
                limit=self.factory.budget.limit,
            )
            self.transport.write(b"SERVER_ERROR too many open connections\r\n")
            self.transport.loseConnection()
            self._closed = True
            return
        self._budgeted = True
        stats.curr_connections += 1
        self.touch_idle()

    def connectionLost(self, reason: Any = None) -> None:
        if self._budgeted:
            self._budgeted = False
            self.factory.stats.curr_connections -= 1
            self.factory.budget.release()
        self.cancel_idle()
        self.forget_replies()

    # Output ordering (OrderedReplies) -------------------------------------------

    def is_error(self, data: bytes) -> bool:
        return data.startswith((b"SERVER_ERROR", b"CLIENT_ERROR"))

    def resume_input(self) -> None:
        if len(self._buffer) > self._pos:
            self._process()  # no-op when called from within _process: its loop goes on

    def _server_error(self, failure: Any) -> bytes:
        if not failure.check(Exception):
            log.failure("unexpected failure", failure)
        return self._error_reply(failure.value)

    def _error_reply(self, e: BaseException) -> bytes:
        self.stats.server_errors += 1
        message = str(e).replace("\r", " ").replace("\n", " ")
        return f"SERVER_ERROR {message}\r\n".encode()

    # Input ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._pos:
            self._buffer = self._buffer[self._pos :]
            self._pos = 0
        self._buffer = self._buffer + data if self._buffer else data
        if self.factory.idle_timeout:
            self.touch_idle()
        if not self._paused:
            self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False
            if self._pos:
                self._buffer = self._buffer[self._pos :]
                self._pos = 0

    def _process_buffer(self) -> None:
        while len(self._buffer) > self._pos and not self._paused and not self._quitting:
            buf = self._buffer
            pos = self._pos
            if self._swallow:
                n = min(self._swallow, len(buf) - pos)
                self._pos = pos + n
                self._swallow -= n
                continue
            if self._pending_data is not None:
                if not self._take_data():
                    return
                continue
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos > self.max_line:
                    self.reply(LINE_TOO_LONG)
                    self._quit()
                return
            if end - pos > self.max_line:
                self.reply(LINE_TOO_LONG)
                self._quit()
                return
            line = buf[pos : end - 1] if end > pos and buf[end - 1] == 13 else buf[pos:end]
            self._pos = end + 1
            self._command(line)

    def _quit(self) -> None:
        self._buffer = b""
        self._pos = 0
        self.quit_after_replies()

    def _command(self, line: bytes) -> None:
        tokens = line.split()
        if not tokens:
            self.reply(ERROR)
            return
        cmd = tokens[0]
        handler = _COMMANDS.get(cmd)
        if handler is None:
            self.reply(ERROR)
            return
        if self._gate:
            self._gated(cmd, tokens, handler)
            return
        if self.router.loading and self._loading_refuses(cmd, handler):
            return
        handler(self, tokens)

    def _loading_refuses(self, cmd: bytes, handler: Any) -> bool:
        """Refuse ``cmd`` (the master is starting): storage commands once their data
        block is read, in :meth:`_take_data`."""
        if cmd not in OK_LOADING and handler is not _STORAGE:
            self.reply(LOADING)
            return True
        return False

    # Authentication ----------------------------------------------------------------

    def _gated(
        self,
        cmd: bytes,
        tokens: list[bytes],
        handler: Callable[[MemcacheProtocol, list[bytes]], None],
    ) -> None:
        """A command while the connection may still authenticate."""
        if self.partition:
            # An anonymous port: only the first command may authenticate.
            self._gate = False
            self._auth_data = cmd == b"set"
        elif cmd == b"set":
            self._auth_data = True
        elif cmd not in _BEFORE_AUTH:
            self.reply(UNAUTHENTICATED)
            return
        if self.router.loading and self._loading_refuses(cmd, handler):
            return
        handler(self, tokens)
        if self._pending_data is None:
            self._auth_data = False  # the set was malformed or refused: nothing to read

    def _authenticate(self, value: bytes) -> bool:
        """Take a ``set``'s data as ``partition password``; False: it is a plain set.

        On an anonymous port the data counts as credentials only if it names
        a partition that has a password.
        """
        name, space, password = value.partition(b" ")
        if self.partition:
            policy = self.router.policies.get(name)
            if not space or policy is None or policy.password_hash is None:
                return False
        elif not space or not name:
            self.reply(AUTH_FORMAT)
            return True
        peer = self.transport.getPeer()
        try:
            answer = self.factory.authenticator.check(name, password, peer_host(peer))
        except TooManyFailures as e:
            log.warn("memcached client {peer}: login not checked: {why}", peer=peer, why=str(e))
            self._auth_refused()
            self.reply(b"CLIENT_ERROR %s\r\n" % str(e).encode())
            return True
        if not isinstance(answer, Deferred):
            self.reply(self._auth_done(answer, name))
            return True
        # Commands after this one must run in the partition it chooses.
        self.hold_input()
        slot = self.slot()

        def done(ok: bool) -> None:
            self.fill(slot, self._auth_done(ok, name))
            self.release_input()

        def failed(failure: Any) -> None:
            log.failure("checking a memcached password failed", failure)
            done(False)

        answer.addCallbacks(done, failed)
        return True

    def _auth_refused(self) -> None:
        """A client that tried to authenticate is never left in the anonymous
        partition: it stays unauthenticated and may try again."""
        self.partition = NO_PARTITION
        self.stats = self.factory.stats
        self._gate = True

    def _auth_done(self, ok: bool, name: bytes) -> bytes:
        peer = self.transport.getPeer() if self.transport is not None else None
        if ok:
            self.partition = name
            self.stats = self.factory.stats.for_partition(name)
            self._gate = False
            log.debug(
                "memcached client {peer} is in partition {partition}",
                peer=peer,
                partition=name.decode("utf-8", "replace"),
            )
            return STORED
        self._auth_refused()
        log.warn(
            "memcached client {peer}: authentication to partition {partition} failed",
            peer=peer,
            partition=name.decode("utf-8", "replace")[:64],
        )
        return AUTH_FAILURE

    # Retrieval ------------------------------------------------------------------------

    def _get(self, tokens: list[bytes]) -> None:
        self._retrieve(tokens[1:], with_cas=tokens[0] == b"gets")

    def _gat(self, tokens: list[bytes]) -> None:
        if len(tokens) < 3:
            self.reply(ERROR)
            return
        exptime = _i32(tokens[1])
        if exptime is None:
            self.reply(BAD_EXPTIME)
            return
        self._retrieve(tokens[2:], with_cas=tokens[0] == b"gats", touch=exptime)

    def _retrieve(self, keys: list[bytes], with_cas: bool, touch: Optional[int] = None) -> None:
        if not keys:
            self.reply(ERROR)
            return
        for key in keys:
            if not valid_key(key):
                self.reply(BAD_FORMAT)
                return
        self.stats.cmd_get += len(keys)
        # Methods, not functions nested together: compiled closures that refer
        # to one another keep themselves alive in a cycle (tests/test_no_cycles.py).
        if touch is not None:
            self.stats.cmd_touch += len(keys)
            expires = absolute_expiry_ms(touch, self.clock.seconds())
            # The partition now: a pipelined AUTH may change it before a
            # gated gat runs.
            start: Callable[[], Deferred] = partial(self._touch_all, self.partition, keys, expires)
        elif len(keys) == 1 and not self.gated(keys[0]):
            self._get_one(keys[0], with_cas)  # the hot path: one key, no Deferred
            return
        else:
            start = partial(self.router.get_many, self.partition, keys)
        stats = self.stats

        def render(records: list[Optional[Record]]) -> bytes:
            out = []
            hits = 0
            for key, record in zip(keys, records):
                if record is None:
                    continue
                hits += 1
                if with_cas:
                    out.append(
                        b"VALUE %s %d %d %d\r\n%s\r\n"
                        % (key, record.flags, len(record.value), record.version, record.value)
                    )
                else:
                    out.append(
                        b"VALUE %s %d %d\r\n%s\r\n"
                        % (key, record.flags, len(record.value), record.value)
                    )
            stats.get_hits += hits
            stats.get_misses += len(keys) - hits
            if touch is not None:
                stats.touch_hits += hits
                stats.touch_misses += len(keys) - hits
            out.append(END)
            return b"".join(out)

        self.deferred_reply(
            self.after(keys, start, register=touch is not None), render, self._server_error
        )

    def _get_one(self, key: bytes, with_cas: bool) -> None:
        stats = self.stats

        def render_one(record: Optional[Record]) -> bytes:
            if record is None:
                stats.get_misses += 1
                return END
            stats.get_hits += 1
            value = record.value
            if with_cas:
                return b"VALUE %s %d %d %d\r\n%s\r\nEND\r\n" % (
                    key,
                    record.flags,
                    len(value),
                    record.version,
                    value,
                )
            return b"VALUE %s %d %d\r\n%s\r\nEND\r\n" % (key, record.flags, len(value), value)

        done, fail = self.reply_later(render_one, self._error_reply)
        self.router.get_cb(self.partition, key, done, fail)

    def _touch_all(self, partition: bytes, keys: list[bytes], expires: int) -> Deferred:
        """gat/gats: touch every key at its primary; the records touched (None: a miss)."""
        ds = [self._touch_one(partition, k, expires) for k in keys]
        return defer.gatherResults(ds, consumeErrors=True).addErrback(_unwrap)

    def _touch_one(self, partition: bytes, key: bytes, expires: int) -> Deferred:
        return self.router.conditional(
            partition, key, lambda c: c.touch(partition, key, expires)
        ).addCallback(_touched_record)

    # Storage --------------------------------------------------------------------------

    def _storage(self, tokens: list[bytes]) -> None:
        cmd = tokens[0]
        is_cas = cmd == b"cas"
        base = 6 if is_cas else 5
        if len(tokens) not in (base, base + 1):
            self.reply(ERROR)
            return
        key = tokens[1]
        flags = _u32(tokens[2])
        exptime = _i32(tokens[3])
        length = _i32(tokens[4])
        cas = _u64(tokens[5]) if is_cas else 0
        noreply = len(tokens) == base + 1 and tokens[base] == b"noreply"
        if (
            not valid_key(key)
            or flags is None
            or exptime is None
            or length is None
            or length < 0
            or cas is None
        ):
            self.reply(BAD_FORMAT)
            return
        if length > self.max_value:
            # As memcached: refuse at once and discard the data block as it arrives.
            self.stats.cmd_set += 1
            self.reply(TOO_LARGE)
            self._swallow = length + 2
            return
        self._pending_data = (cmd, key, flags, exptime, length, cas, noreply)
        self._take_data()

    def _take_data(self) -> bool:
        """Consume the data block of a storage command once it has all arrived."""
        assert self._pending_data is not None
        cmd, key, flags, exptime, length, cas, noreply = self._pending_data
        buf = self._buffer
        begin = self._pos
        if len(buf) - begin < length + 2:
            return False
        self._pending_data = None
        value = buf[begin : begin + length]
        terminator = buf[begin + length : begin + length + 2]
        self._pos = begin + length + 2
        if self._auth_data:
            self._auth_data = False
            if terminator != b"\r\n":
                self.reply(BAD_CHUNK)
                return True
            if self._authenticate(value):
                return True
        self.stats.cmd_set += 1
        if terminator != b"\r\n":
            self.reply(BAD_CHUNK)
            return True
        if self.router.loading:
            self.reply(LOADING)
            return True
        expires = absolute_expiry_ms(exptime, self.clock.seconds())
        partition = self.partition
        router = self.router
        stats = self.stats
        policy = router.policies.get(partition)
        if policy is None:  # the partition left the cluster map
            unknown = partition.decode(errors="replace")
            self.reply(self._error_reply(KeyError(f"unknown partition {unknown!r}")))
            return True
        if cmd == b"set" and not self.gated(key) and not policy.reject_at_primary:
            # The hot path: one round trip, no Deferred.
            done, fail = self.reply_later(_stored, self._error_reply, noreply)
            router.set_cb(partition, key, value, done, fail, flags, expires)
            return True
        if cmd == b"set":

            def start() -> Deferred:
                return router.set(partition, key, value, flags, expires)

            def render(result: Result) -> bytes:
                return STORED

        else:
            mode = _STORE_MODES[cmd]

            def start() -> Deferred:
                return router.conditional(
                    partition,
                    key,
                    lambda c: c.store(mode, partition, key, value, flags, expires, cas),
                )

            def render(result: Result) -> bytes:
                status = result.status
                if mode is StoreMode.CAS:
                    if status is Status.STORED:
                        stats.cas_hits += 1
                    elif status is Status.EXISTS:
                        stats.cas_badval += 1
                    elif status is Status.NOT_FOUND:
                        stats.cas_misses += 1
                if status is Status.STORED:
                    return STORED
                if status is Status.EXISTS:
                    return EXISTS
                if status is Status.NOT_FOUND:
                    return NOT_FOUND
                if status is Status.TOO_LARGE:
                    return TOO_LARGE
                return NOT_STORED

        # A plain set is one round trip unless the partition decides it at the primary.
        if cmd != b"set" or policy.reject_at_primary:
            d = self.at_primary(partition, key, start)
        else:
            d = self.after([key], start, register=False)
        self.deferred_reply(d, render, self._server_error, noreply)
        return True

    # Other keyed commands ---------------------------------------------------------------

    def _noreply(self, tokens: list[bytes], base: int) -> Optional[bool]:
        """``noreply`` flag of a command with ``base`` tokens, or None if malformed."""
        if len(tokens) == base:
            return False
        if len(tokens) == base + 1 and tokens[base] == b"noreply":
            return True
        return None

    def _delete(self, tokens: list[bytes]) -> None:
        # delete <key> [0] [noreply]: memcached accepts a zero hold time and nothing else.
        args = tokens[2:]
        noreply = bool(args) and args[-1] == b"noreply"
        if noreply:
            args = args[:-1]
        if len(tokens) < 2 or len(args) > 1 or (args and args[0] != b"0"):
            self.reply(DELETE_USAGE if len(tokens) >= 2 else ERROR)
            return
        key = tokens[1]
        if not valid_key(key):
            self.reply(BAD_FORMAT)
            return
        stats = self.stats

        def render(result: Result) -> bytes:
            if result.status is Status.DELETED:
                stats.delete_hits += 1
                return DELETED
            stats.delete_misses += 1
            return NOT_FOUND

        partition = self.partition
        self.deferred_reply(
            self.after([key], lambda: self.router.delete(partition, key), register=False),
            render,
            self._server_error,
            noreply,
        )

    def _arith(self, tokens: list[bytes]) -> None:
        noreply = self._noreply(tokens, 3)
        if noreply is None:
            self.reply(ERROR)
            return
        key = tokens[1]
        if not valid_key(key):
            self.reply(BAD_FORMAT)
            return
        if _u64(tokens[2]) is None:
            self.reply(BAD_DELTA)
            return
        incr = tokens[0] == b"incr"
        mode = IncrMode.MEMCACHED_INCR if incr else IncrMode.MEMCACHED_DECR
        delta = tokens[2]
        partition = self.partition
        stats = self.stats

        router = self.router

        def send(on_done: Callable[[Any], None], on_fail: Callable[[BaseException], None]) -> None:
            router.incr_cb(partition, key, mode, delta, on_done, on_fail)

        def render(result: Result) -> bytes:
            status = result.status
            if status is Status.NOT_FOUND:
                if incr:
                    stats.incr_misses += 1
                else:
                    stats.decr_misses += 1
                return NOT_FOUND
            if status is Status.NON_NUMERIC:
                return NON_NUMERIC
            if incr:
                stats.incr_hits += 1
            else:
                stats.decr_hits += 1
            record = result.record
            assert record is not None
            return record.value + b"\r\n"

        self.at_primary_cb(partition, key, send, render, self._error_reply, noreply)

    def _touch(self, tokens: list[bytes]) -> None:
        noreply = self._noreply(tokens, 3)
        if noreply is None:
            self.reply(ERROR)
            return
        key = tokens[1]
        if not valid_key(key):
            self.reply(BAD_FORMAT)
            return
        exptime = _i32(tokens[2])
        if exptime is None:
            self.reply(BAD_EXPTIME)
            return
        self.stats.cmd_touch += 1
        expires = absolute_expiry_ms(exptime, self.clock.seconds())
        partition = self.partition
        stats = self.stats

        def render(result: Result) -> bytes:
            if result.status is Status.TOUCHED:
                stats.touch_hits += 1
                return TOUCHED
            stats.touch_misses += 1
            return NOT_FOUND

        router = self.router
        start = lambda: router.conditional(  # noqa: E731
            partition, key, lambda c: c.touch(partition, key, expires)
        )
        d = self.at_primary(partition, key, start)
        self.deferred_reply(d, render, self._server_error, noreply)

    # Whole-server commands -----------------------------------------------------------------

    def _flush_all(self, tokens: list[bytes]) -> None:
        args = tokens[1:]
        noreply = bool(args) and args[-1] == b"noreply"
        if noreply:
            args = args[:-1]
        delay = 0
        if len(args) > 1:
            self.reply(ERROR)
            return
        if args:
            parsed = _i32(args[0])
            if parsed is None or parsed < 0:
                self.reply(BAD_FORMAT)
                return
            delay = parsed
        self.stats.cmd_flush += 1
        partition = self.partition
        if delay:
            when = absolute_expiry_ms(delay, self.clock.seconds()) / 1000.0
            self.clock.callLater(
                max(0.0, when - self.clock.seconds()),
                lambda: self.router.flush(partition).addErrback(
                    lambda f: log.error("delayed flush_all failed: {why}", why=f.getErrorMessage())
                ),
            )
            if not noreply:
                self.reply(OK)
            return
        # A flush must not overtake writes this connection already sent.
        d = self.after_all(lambda: self.router.flush(partition))
        self.deferred_reply(d, lambda _: OK, self._server_error, noreply)

    def _version(self, tokens: list[bytes]) -> None:
        self.reply(VERSION_LINE)

    def _verbosity(self, tokens: list[bytes]) -> None:
        if len(tokens) not in (2, 3):
            self.reply(ERROR)
            return
        if tokens[-1] == b"noreply":  # as memcached: "verbosity noreply" is silent too
            return
        self.reply(OK)

    def _quit_command(self, tokens: list[bytes]) -> None:
        self._quit()

    def _stats(self, tokens: list[bytes]) -> None:
        if len(tokens) == 1:
            self.deferred_reply(self.router.node_stats(), self._render_stats, self._server_error)
            return
        group = tokens[1]
        if group == b"reset" and len(tokens) == 2:
            self.stats.reset()
            self.reply(b"RESET\r\n")
        elif group == b"settings" and len(tokens) == 2:
            policy = self.router.policies.get(self.partition)
            lines = [
                ("maxbytes", (policy.max_bytes or 0) if policy is not None else 0),
                ("maxconns", self.factory.budget.limit),
                ("item_size_max", self.max_value),
                ("partition", self.partition.decode()),
                ("replicas", self.router.copies - 1),
            ]
            self.reply(
                b"".join(b"STAT %s %s\r\n" % (k.encode(), str(v).encode()) for k, v in lines) + END
            )
        elif group in (b"items", b"slabs", b"sizes", b"conns") and len(tokens) == 2:
            self.reply(END)
        else:
            self.reply(ERROR)

    def _render_stats(self, node_stats: dict[str, dict[str, str]]) -> bytes:
        s = self.stats
        conns = self.factory.stats
        now = self.clock.seconds()
        name = self.partition.decode()
        key = f"records:{name}"
        bkey = f"bytes:{name}"
        records = sum(int(st.get(key, 0)) for st in node_stats.values())
        nbytes = sum(int(st.get(bkey, 0)) for st in node_stats.values())
        copies = max(1, min(self.router.copies, len(node_stats) or 1))
        usage = os.times()
        lines: list[tuple[str, Any]] = [
            ("pid", os.getpid()),
            ("uptime", int(now - s.started)),
            ("time", int(time.time())),
            ("version", f"1.6.0 kvha/{__version__}"),
            ("pointer_size", 64),
            ("rusage_user", f"{usage.user:.6f}"),
            ("rusage_system", f"{usage.system:.6f}"),
            ("curr_connections", conns.curr_connections),
            ("total_connections", conns.total_connections),
            ("rejected_connections", conns.rejected_connections),
        ]
        lines += [
            (name, getattr(s, name))
            for name in MemcacheStats.COUNTERS
            if name not in ("total_connections", "rejected_connections")
        ]
        lines += [
            ("threads", 1),
            ("curr_items", records // copies),
            ("bytes", nbytes // copies),
            ("data_nodes_up", self.router.links_up()),
            ("data_nodes", len(self.router.links)),
            ("loading", int(self.router.loading)),  # 1 while the master starts (LOADING)
        ]
        return b"".join(b"STAT %s %s\r\n" % (k.encode(), str(v).encode()) for k, v in lines) + END


def _touched_record(r: Any) -> Optional[Record]:
    return r.record if r.status is Status.TOUCHED else None


def _unwrap(failure: Any) -> Any:
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure


_COMMANDS: dict[bytes, Callable[[MemcacheProtocol, list[bytes]], None]] = {
    b"get": MemcacheProtocol._get,
    b"gets": MemcacheProtocol._get,
    b"gat": MemcacheProtocol._gat,
    b"gats": MemcacheProtocol._gat,
    b"set": MemcacheProtocol._storage,
    b"add": MemcacheProtocol._storage,
    b"replace": MemcacheProtocol._storage,
    b"append": MemcacheProtocol._storage,
    b"prepend": MemcacheProtocol._storage,
    b"cas": MemcacheProtocol._storage,
    b"delete": MemcacheProtocol._delete,
    b"incr": MemcacheProtocol._arith,
    b"decr": MemcacheProtocol._arith,
    b"touch": MemcacheProtocol._touch,
    b"flush_all": MemcacheProtocol._flush_all,
    b"version": MemcacheProtocol._version,
    b"verbosity": MemcacheProtocol._verbosity,
    b"quit": MemcacheProtocol._quit_command,
    b"stats": MemcacheProtocol._stats,
}


_STORAGE = MemcacheProtocol._storage


class MemcacheFactory(ClientFactory):
    def __init__(
        self,
        router: Router,
        partition: bytes,
        clock: IReactorTime,
        stats: Optional[MemcacheStats] = None,
        *,
        max_connections: int = 4096,
        max_in_flight: int = 256,
        max_line_bytes: int = 8192,
        max_value_bytes: int = 1 << 20,
        idle_timeout: float = 0.0,
        authenticator: Optional[Authenticator] = None,
        budget: Optional[ConnectionBudget] = None,
        bound: bool = False,
        flusher: Optional[TurnFlusher] = None,
    ) -> None:
        super().__init__(
            router,
            partition,
            clock,
            max_connections=max_connections,
            max_in_flight=max_in_flight,
            max_line_bytes=max_line_bytes,
            max_value_bytes=max_value_bytes,
            idle_timeout=idle_timeout,
            authenticator=authenticator,
            budget=budget,
            bound=bound,
            flusher=flusher,
        )
        self.stats = stats if stats is not None else MemcacheStats(clock)

    def buildProtocol(self, addr: Any) -> MemcacheProtocol:
        return MemcacheProtocol(self)
