"""The Redis protocol (RESP2) on a master's client port.

Enough of Redis for redis-cli, redis-py, txredisapi and redis-benchmark to
work unchanged: the connection commands, the string and key commands, KEYS
and SCAN.  Replies and error words follow Redis 7.  An unknown command never
closes the connection; a protocol error (a malformed multibulk header) does,
after the error reply, as Redis does.

Read-modify-write commands that the data nodes have no single operation for
(SET with GET or KEEPTTL, GETSET, GETDEL, GETEX, SETRANGE, APPEND, EXPIRE and
friends, PERSIST) run as an optimistic loop at the key's primary: read the
record, compute, write back with a compare-and-set on its version, and retry
if another writer got there first (:meth:`Router.modify`).
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Sequence
from typing import Any, Callable, ClassVar, Final, Optional, Union

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
from kvha.master.resp3 import map_reply, to_resp3
from kvha.master.router import LOADING_WHY, Change, OutOfSpace, Router
from kvha.record import Record

log = Logger(namespace=__name__)  # compiled (mypyc): no frame to take the name from

Reply = Union[bytes, Deferred]

MAX_MULTIBULK = 1024 * 1024

#: ``b"$%d" % n`` for the lengths most arguments have: the header the fast
#: parser compares an argument's with, without formatting one per argument.
_BULK_HEADERS: Final = [b"$%d" % n for n in range(4096)]
MAX_INLINE = 64 * 1024
MAX_BULK = 512 * 1024 * 1024  # Redis's proto-max-bulk-len
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NULL = b"$-1\r\n"
NULL_ARRAY = b"*-1\r\n"
EMPTY_ARRAY = b"*0\r\n"
QUEUED_CLOSE = b""

E_SYNTAX = b"-ERR syntax error\r\n"
E_NOT_INT = b"-ERR value is not an integer or out of range\r\n"
E_NOT_FLOAT = b"-ERR value is not a valid float\r\n"
E_OVERFLOW = b"-ERR increment or decrement would overflow\r\n"
E_NAN = b"-ERR increment would produce NaN or Infinity\r\n"
E_DB_RANGE = b"-ERR DB index is out of range\r\n"
E_NOAUTH_CONFIG = (
    b"-ERR AUTH <password> called without any password configured for the default user. "
    b"Are you sure your configuration is correct?\r\n"
)
E_WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
E_NOAUTH = b"-NOAUTH Authentication required.\r\n"
E_NOAUTH_HELLO = (
    b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the "
    b"HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and "
    b"select the RESP protocol version at the same time\r\n"
)
E_OOM = b"-OOM command not allowed when used memory > 'maxmemory'.\r\n"
#: While the master is starting (Router.loading), as Redis while it loads its dataset.
E_LOADING = f"-LOADING kvha is starting: {LOADING_WHY}\r\n".encode()
#: Commands a connection may send before it has a partition.  PING is one
#: (Redis refuses it) so that load-balancer health checks need no password.
NO_AUTH_COMMANDS = frozenset(("auth", "hello", "quit", "ping"))
E_CLIENT_NAME = b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
E_INVALID_CURSOR = b"-ERR invalid cursor\r\n"
E_OFFSET = b"-ERR offset is out of range\r\n"


class RespError(Exception):
    """A malformed request stream; the connection is closed after the reply."""


# Encoding -------------------------------------------------------------------


def simple(text: str) -> bytes:
    return b"+" + text.encode() + b"\r\n"


def error(text: str) -> bytes:
    return b"-" + text.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


def integer(n: int) -> bytes:
    return b":%d\r\n" % n


def _ok(_result: Any) -> bytes:
    return OK


def bulk(data: Optional[bytes]) -> bytes:
    if data is None:
        return NULL
    return b"$%d\r\n%s\r\n" % (len(data), data)


def array(items: Sequence[bytes]) -> bytes:
    """An array of already encoded replies."""
    return b"*%d\r\n" % len(items) + b"".join(items)


def bulk_array(items: Sequence[Optional[bytes]]) -> bytes:
    return array([bulk(i) for i in items])


def wrong_args(name: bytes) -> bytes:
    return error(
        f"ERR wrong number of arguments for '{name.decode(errors='replace').lower()}' command"
    )


def _int(token: bytes) -> Optional[int]:
    """Redis's string2ll: optional minus, digits, no leading zeros or spaces."""
    if not token or len(token) > 20:
        return None
    body = token[1:] if token[:1] == b"-" else token
    if not body.isdigit() or (len(body) > 1 and body[:1] == b"0") or token == b"-0":
        return None
    n = int(token)
    return n if I64_MIN <= n <= I64_MAX else None


def _valid_client_name(name: bytes) -> bool:
    """Redis allows only printable ASCII without spaces ('!' to '~') in client names."""
    return all(33 <= c <= 126 for c in name)


def _float(token: bytes) -> Optional[float]:
    try:
        x = float(token)
    except ValueError:
        return None
    if token != token.strip() or x != x:
        return None
    return x


# Parsing --------------------------------------------------------------------


class RespParser:
    """Splits a byte stream into commands (lists of bytes), resumably.

    Multibulk (``*N`` then ``$len`` arguments) and inline commands (one line,
    space-separated, for people typing into telnet).  A bulk argument longer
    than ``max_bulk`` is skipped as it arrives, never buffered, and its
    command comes out as ``[TOO_LARGE, name]`` so the server can answer it.
    A malformed stream ends with ``[PROTOCOL_ERROR, message]`` after the
    commands before it, and the parser reads nothing more.
    """

    TOO_LARGE: ClassVar[bytes] = b"\x00too-large"
    PROTOCOL_ERROR: ClassVar[bytes] = b"\x00protocol-error"

    def __init__(self, max_bulk: int, max_inline: int = MAX_INLINE) -> None:
        self.max_bulk = max_bulk
        #: Longest inline command or ``*``/``$`` header line.
        self.max_inline = max_inline
        self._buf = bytearray()
        self._args: list[bytes] = []
        self._left = 0
        self._bulk = -1
        self._skip = 0
        self._too_large = False
        self.failed = False

    def feed(self, data: bytes) -> list[list[bytes]]:
        if self.failed:
            return []
        buf = self._buf
        if not buf and not self._left and not self._skip and not self._args:
            # The common case: whole commands at the start of a read.  Parse
            # them straight from ``data``; the general path below takes over
            # at the first thing that is not a complete, ordinary command.
            out, pos = self._whole_commands(data)
            if pos == len(data):
                return out
            buf += data[pos:] if pos else data
            return out + self._feed_buffered()
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if self._skip == 0:
                self._arg_done(None)
        buf += data
        return self._feed_buffered()

    def _whole_commands(self, data: bytes) -> tuple[list[list[bytes]], int]:
        """Complete multibulk commands at the start of ``data``, and where they end.

        Stops, consuming nothing of it, at the first command that is
        incomplete or in any way unusual (inline, an argument too large, a
        count with a sign or a leading zero, a header over 15 bytes, an
        argument holding CR LF): :meth:`_feed_buffered` handles those, with
        every check and error of Redis.  ``data`` is cut at every CR LF in
        one call; an argument is taken when the piece after its ``$len``
        header is exactly ``len`` bytes long (one that holds CR LF is split
        across pieces, and the general path takes over there), which one
        comparison per argument tells: its header must be exactly ``$`` and
        its length.
        """
        out: list[list[bytes]] = []
        if data[:1] != b"*":
            return out, 0
        parts = data.split(b"\r\n")
        last = len(parts) - 1  # the piece after the final CR LF: never a whole line
        max_bulk = self.max_bulk
        i = 0
        while i < last:
            head = parts[i]
            count = head[1:]
            # '*', then 1-14 digits, no sign, no leading zero, not 0.
            if head[:1] != b"*" or not count.isdigit() or count[0] == 48 or len(count) > 14:
                break
            n = int(count)
            end = i + 1 + 2 * n
            if n > MAX_MULTIBULK or end > last:
                break  # too many, or not all here yet
            args = parts[i + 2 : end : 2]
            for header, value in zip(parts[i + 1 : end : 2], args):
                # The header an argument of this length has: anything else
                # (a sign, a leading zero, CR LF inside the value) is unusual.
                size = len(value)
                if size > max_bulk or header != (
                    _BULK_HEADERS[size] if size < 4096 else b"$%d" % size
                ):
                    break
            else:
                out.append(args)
                i = end
                continue
            break
        if i == last:
            return out, len(data) - len(parts[last])
        return out, sum(map(len, parts[:i])) + 2 * i

    def _feed_buffered(self) -> list[list[bytes]]:
        buf = self._buf
        out: list[list[bytes]] = []
        pos = 0
        end = len(buf)
        try:
            while True:
                if self._skip:
                    break
                if self._left == 0:
                    if self._args or self._too_large:
                        out.append(self._finish())
                    if pos >= end:
                        break
                    if buf[pos] == 42:  # '*'
                        nl = buf.find(b"\r\n", pos)
                        if nl < 0:
                            if end - pos > self.max_inline:
                                raise RespError("Protocol error: too big mbulk count string")
                            break
                        n = _int(bytes(buf[pos + 1 : nl]))
                        if n is None or n > MAX_MULTIBULK:
                            raise RespError("Protocol error: invalid multibulk length")
                        pos = nl + 2
                        if n > 0:
                            self._left = n
                        continue
                    nl = buf.find(b"\n", pos)
                    if nl < 0:
                        if end - pos > self.max_inline:
                            raise RespError("Protocol error: too big inline request")
                        break
                    line = bytes(buf[pos:nl])
                    pos = nl + 1
                    args = split_inline(line[:-1] if line.endswith(b"\r") else line)
                    if args is None:
                        raise RespError("Protocol error: unbalanced quotes in request")
                    if args:
                        out.append(args)
                    continue
                if self._bulk < 0:
                    if pos >= end:
                        break
                    if buf[pos] != 36:  # '$'
                        got = chr(buf[pos])
                        raise RespError(f"Protocol error: expected '$', got '{got}'")
                    nl = buf.find(b"\r\n", pos)
                    if nl < 0:
                        if end - pos > self.max_inline:
                            raise RespError("Protocol error: too big bulk count string")
                        break
                    length = _int(bytes(buf[pos + 1 : nl]))
                    if length is None or length < 0 or length > MAX_BULK:
                        raise RespError("Protocol error: invalid bulk length")
                    pos = nl + 2
                    if length > self.max_bulk:
                        self._too_large = True
                        have = min(end - pos, length + 2)
                        pos += have
                        self._skip = length + 2 - have
                        if self._skip == 0:
                            self._arg_done(None)
                        continue
                    self._bulk = length
                if end - pos < self._bulk + 2:
                    break
                length = self._bulk
                self._arg_done(bytes(buf[pos : pos + length]))
                pos += length + 2
        except RespError as e:
            self.failed = True
            out.append([self.PROTOCOL_ERROR, str(e).encode()])
        finally:
            if pos:
                del buf[:pos]
        return out

    def _arg_done(self, arg: Optional[bytes]) -> None:
        if arg is not None:
            self._args.append(arg)
        elif not self._args:
            self._args.append(b"?")
        self._bulk = -1
        self._left -= 1

    def _finish(self) -> list[bytes]:
        args, self._args = self._args, []
        if self._too_large:
            self._too_large = False
            return [self.TOO_LARGE, args[0] if args else b"?"]
        return args


def split_inline(line: bytes) -> Optional[list[bytes]]:
    """Redis's sdssplitargs: words, "double quoted" with escapes, 'single quoted'.

    None if a quote is unbalanced or a closing quote is followed by more than
    a space.  A NUL byte ends the line, as in C.
    """
    line = line.split(b"\0", 1)[0]
    n = len(line)
    args: list[bytes] = []
    i = 0
    while True:
        while i < n and line[i] in b" \t\n\v\f\r":
            i += 1
        if i >= n:
            return args
        word = bytearray()
        quote = 0
        while True:
            c = line[i] if i < n else 0
            if quote == 34:  # in "..."
                if c == 92 and line[i + 1 : i + 2] == b"x" and _is_hex(line[i + 2 : i + 4]):
                    word.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    word.append(_ESCAPES.get(line[i], line[i]))
                elif c == 34:
                    if i + 1 < n and line[i + 1] not in b" \t\n\v\f\r":
                        return None
                    i += 1
                    break
                elif c == 0:
                    return None
                else:
                    word.append(c)
            elif quote == 39:  # in '...'
                if c == 92 and line[i + 1 : i + 2] == b"'":
                    i += 1
                    word.append(39)
                elif c == 39:
                    if i + 1 < n and line[i + 1] not in b" \t\n\v\f\r":
                        return None
                    i += 1
                    break
                elif c == 0:
                    return None
                else:
                    word.append(c)
            elif c in b" \n\r\t" or c == 0:
                break
            elif c in (34, 39):
                quote = c
            else:
                word.append(c)
            i += 1
        args.append(bytes(word))


_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}


def _is_hex(two: bytes) -> bool:
    return len(two) == 2 and all(c in b"0123456789abcdefABCDEF" for c in two)


# Commands -------------------------------------------------------------------


class Command:
    """A row of the command table: what COMMAND INFO reports, and the handler.

    ``categories`` are the ACL categories without the ``@``; ``key_flags``
    the flags of the one key specification (commands with keys), derived
    like Redis 7's from ``first_key``, ``last_key`` and ``step``.
    """

    __slots__ = (
        "name",
        "handler",
        "arity",
        "flags",
        "first_key",
        "last_key",
        "step",
        "categories",
        "key_flags",
        "tips",
        "notes",
    )

    def __init__(
        self,
        name: str,
        handler: Callable[..., Reply],
        arity: int,
        flags: tuple[str, ...],
        first_key: int = 0,
        last_key: int = 0,
        step: int = 0,
        categories: str = "",
        key_flags: str = "",
        tips: tuple[str, ...] = (),
        notes: str = "",
    ) -> None:
        self.name = name
        self.handler = handler
        self.arity = arity
        self.flags = flags
        self.first_key = first_key
        self.last_key = last_key
        self.step = step
        self.categories = categories.split()
        self.key_flags = key_flags.split()
        self.tips = tips
        self.notes = notes

    def info(self) -> bytes:
        """The 10-element reply of Redis 7's COMMAND INFO."""
        specs = []
        if self.first_key:
            last = self.last_key if self.last_key < 0 else self.last_key - self.first_key
            spec = [bulk(b"notes"), bulk(self.notes.encode())] if self.notes else []
            spec += [
                bulk(b"flags"),
                array([simple(f) for f in self.key_flags]),
                bulk(b"begin_search"),
                array(
                    [
                        bulk(b"type"),
                        bulk(b"index"),
                        bulk(b"spec"),
                        array([bulk(b"index"), integer(self.first_key)]),
                    ]
                ),
                bulk(b"find_keys"),
                array(
                    [
                        bulk(b"type"),
                        bulk(b"range"),
                        bulk(b"spec"),
                        array(
                            [
                                bulk(b"lastkey"),
                                integer(last),
                                bulk(b"keystep"),
                                integer(self.step),
                                bulk(b"limit"),
                                integer(0),
                            ]
                        ),
                    ]
                ),
            ]
            specs.append(array(spec))
        return array(
            [
                bulk(self.name.encode()),
                integer(self.arity),
                array([simple(f) for f in self.flags]),
                integer(self.first_key),
                integer(self.last_key),
                integer(self.step),
                array([simple("@" + c) for c in self.categories]),
                bulk_array([t.encode() for t in self.tips]),
                array(specs),
                EMPTY_ARRAY,
            ]
        )


class RespProtocol(OrderedReplies):
    """One Redis client connection."""

    kind = "Redis"

    def __init__(self, factory: RespFactory) -> None:
        super().__init__()
        self.factory = factory
        self.flusher = factory.flusher
        self.router: Router = factory.router
        partition = factory.partition
        if not factory.bound and not factory.authenticator.anonymous(partition):
            partition = NO_PARTITION
        #: The connection's partition; empty until AUTH or HELLO ... AUTH chooses one.
        self.partition: bytes = partition
        self.clock: IReactorTime = factory.clock
        self.idle_timeout = factory.idle_timeout
        self.max_in_flight = factory.max_in_flight
        self.parser = RespParser(factory.max_value_bytes, factory.max_line_bytes)
        self.client_id = 0
        self.client_name: Optional[bytes] = None
        #: Set by HELLO 3: replies are rewritten to RESP3 (see kvha.master.resp3).
        self.resp3 = False
        self.lib_name = b""
        self.lib_ver = b""
        self.created = 0.0
        self._pending: list[list[bytes]] = []
        self._counted = False

    # Connection --------------------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay(self.transport)
        factory = self.factory
        factory.total_connections += 1
        if not factory.budget.acquire():
            factory.rejected_connections += 1
            log.warn(
                "refused Redis client {peer}: {limit} connections already open",
                peer=self.transport.getPeer(),
                limit=factory.budget.limit,
            )
            self.transport.write(b"-ERR max number of clients reached\r\n")
            self.transport.loseConnection()
            self._closed = True
            return
        factory.next_id += 1
        self.client_id = factory.next_id
        self.created = self.clock.seconds()
        factory.clients[self.client_id] = self
        self._counted = True
        self.touch_idle()

    def connectionLost(self, reason: Any = None) -> None:
        if self._counted:
            self._counted = False
            self.factory.clients.pop(self.client_id, None)
            self.factory.budget.release()
        self.cancel_idle()
        self.forget_replies()

    def is_error(self, data: bytes) -> bool:
        return data[:1] == b"-"

    # Input ---------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._quitting or self._closed:
            return
        if self.factory.idle_timeout:
            self.touch_idle()
        commands = self.parser.feed(data)
        if self._pending or self._paused:
            self._pending.extend(commands)
            if not self._paused:
                self.resume_input()
            return
        for i, args in enumerate(commands):
            self.run(args)
            if self._quitting:
                return
            if self._paused:
                self._pending.extend(commands[i + 1 :])
                return

    def resume_input(self) -> None:
        while self._pending and not self._paused and not self._quitting:
            self.run(self._pending.pop(0))

    def run(self, args: list[bytes]) -> None:
        factory = self.factory
        name = args[0].lower()
        if name == RespParser.PROTOCOL_ERROR:
            why = args[1].decode()
            self.reply(error(f"ERR {why}"))
            log.info("closing Redis client {peer}: {why}", peer=self.transport.getPeer(), why=why)
            self.quit_after_replies()
            return
        if name == RespParser.TOO_LARGE:
            self.reply(
                error(
                    f"ERR argument exceeds the maximum value size ({factory.max_value_bytes} bytes)"
                )
            )
            return
        command = COMMANDS.get(name)
        if command is None:
            shown = " ".join(f"'{a[:128].decode(errors='replace')}'" for a in args[1:])
            self.reply(
                error(
                    f"ERR unknown command '{args[0][:128].decode(errors='replace')}', "
                    f"with args beginning with: {shown}" + (" " if shown else "")
                )
            )
            return
        arity = command.arity
        if (arity > 0 and len(args) != arity) or (arity < 0 and len(args) < -arity):
            self.reply(wrong_args(name))
            return
        if not self.partition and command.name not in NO_AUTH_COMMANDS:
            self.reply(E_NOAUTH)
            return
        if self.router.loading and command.name not in OK_LOADING:
            self.reply(E_LOADING)
            return
        factory.calls[command.name] = factory.calls.get(command.name, 0) + 1
        try:
            result = command.handler(self, args)
        except Exception as e:
            log.failure("Redis command {cmd} failed", cmd=command.name)
            result = error(f"ERR internal error: {e}")
        if isinstance(result, bytes):
            if result:
                self.reply(to_resp3(result) if self.resp3 else result)
        else:
            self.deferred_reply(result, self._encode, self._server_error)

    def _encode(self, data: bytes) -> bytes:
        """A handler's RESP2 reply in the protocol this connection speaks."""
        return to_resp3(data) if self.resp3 else data

    def _server_error(self, failure: Any) -> bytes:
        return self._error_reply(failure.value)

    def _error_reply(self, e: BaseException) -> bytes:
        self.factory.errors += 1
        if isinstance(e, OutOfSpace):
            return E_OOM
        return error(f"ERR {e}")

    def _render_get(self, record: Optional[Record]) -> bytes:
        if record is None:
            self.factory.misses += 1
            return to_resp3(NULL) if self.resp3 else NULL
        self.factory.hits += 1
        value = record.value
        return b"$%d\r\n%s\r\n" % (len(value), value)

    def keyed(
        self, keys: list[bytes], start: Callable[[], Deferred], register: bool = True
    ) -> Deferred:
        return self.after(keys, start, register)

    def single_step_writes(self) -> bool:
        """Whether a plain SET here is one round trip (not decided at the primary first)."""
        return not self.router.policy(self.partition).reject_at_primary

    # Helpers -----------------------------------------------------------------------

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def get(self, key: bytes) -> Deferred:
        return self.keyed([key], lambda: self.router.get(self.partition, key), register=False)

    def modify(
        self, key: bytes, fn: Callable[[Optional[Record]], tuple[Optional[Change], bytes]]
    ) -> Deferred:
        return self.keyed([key], lambda: self.router.modify(self.partition, key, fn))

    # Connection commands -------------------------------------------------------------

    def c_ping(self, args: list[bytes]) -> Reply:
        if len(args) > 2:
            return wrong_args(b"ping")
        return PONG if len(args) == 1 else bulk(args[1])

    def c_echo(self, args: list[bytes]) -> Reply:
        return bulk(args[1])

    def c_quit(self, args: list[bytes]) -> Reply:
        self.reply(OK)
        self.quit_after_replies()
        return QUEUED_CLOSE

    def c_select(self, args: list[bytes]) -> Reply:
        n = _int(args[1])
        if n is None:
            return E_NOT_INT
        return OK if n == 0 else E_DB_RANGE

    def c_auth(self, args: list[bytes]) -> Reply:
        """``AUTH partition password`` (Redis's ACL form), or ``AUTH password`` for the port's."""
        if len(args) > 3:
            return E_SYNTAX
        if len(args) == 2:
            name, password = self.factory.partition, args[1]
            policy = self.router.policies.get(name)
            if policy is None or policy.password_hash is None:
                return E_NOAUTH_CONFIG
        else:
            name, password = args[1], args[2]
        return self.authenticate(name, password, lambda: OK)

    def authenticate(self, name: bytes, password: bytes, then: Callable[[], bytes]) -> Reply:
        """Switch to partition ``name`` if ``password`` opens it; ``then()`` is the reply.

        A wrong password leaves the connection as it was.  While the password
        is checked (off the reactor thread) the commands after it wait.
        """
        if self.factory.bound and name != self.factory.partition:
            return E_WRONGPASS
        peer = self.transport.getPeer()
        try:
            answer = self.factory.authenticator.check(name, password, peer_host(peer))
        except TooManyFailures as e:
            log.warn("Redis client {peer}: AUTH not checked: {why}", peer=peer, why=str(e))
            return error(f"ERR {e}")
        if not isinstance(answer, Deferred):
            return self._authenticated(answer, name, then)
        self.hold_input()

        def done(ok: Any) -> bytes:
            reply = self._authenticated(ok is True, name, then)
            self.release_input()
            return reply

        def failed(failure: Any) -> bytes:
            log.failure("checking a Redis password failed", failure)
            return done(False)

        return answer.addCallbacks(done, failed)

    def _authenticated(self, ok: bool, name: bytes, then: Callable[[], bytes]) -> bytes:
        peer = self.transport.getPeer() if self.transport is not None else None
        if not ok:
            log.warn(
                "Redis client {peer}: authentication to partition {partition} failed",
                peer=peer,
                partition=name.decode("utf-8", "replace")[:64],
            )
            return E_WRONGPASS
        self.partition = name
        log.debug(
            "Redis client {peer} is in partition {partition}",
            peer=peer,
            partition=name.decode("utf-8", "replace"),
        )
        return then()

    def c_hello(self, args: list[bytes]) -> Reply:
        i = 1
        wanted = 0
        user: Optional[bytes] = None
        password = b""
        name: Optional[bytes] = None
        if len(args) > 1:
            version = _int(args[1])
            if version is None:
                return b"-ERR Protocol version is not an integer or out of range\r\n"
            if version not in (2, 3):
                return b"-NOPROTO unsupported protocol version\r\n"
            wanted = version
            i = 2
        while i < len(args):
            opt = args[i].lower()
            if opt == b"auth" and i + 2 < len(args):
                user = args[i + 1]
                password = args[i + 2]
                i += 3
                continue
            if opt == b"setname" and i + 1 < len(args):
                name = args[i + 1]
                i += 2
                continue
            return error(f"ERR Syntax error in HELLO option '{args[i].decode(errors='replace')}'")
        if name is not None and not _valid_client_name(name):
            return E_CLIENT_NAME

        def describe() -> bytes:
            # The protocol switches only once HELLO succeeded (a refused login
            # leaves the connection as it was), and HELLO's own reply is
            # already in the new protocol.
            if wanted:
                self.resp3 = wanted == 3
            if name is not None:
                self.client_name = name or None
            return self._hello_reply()

        if user is not None:
            return self.authenticate(user, password, describe)
        if not self.partition:
            return E_NOAUTH_HELLO
        return describe()

    def _hello_reply(self) -> bytes:
        return map_reply(
            [
                (bulk(b"server"), bulk(b"redis")),
                (bulk(b"version"), bulk(b"7.0.0")),
                (bulk(b"proto"), integer(3 if self.resp3 else 2)),
                (bulk(b"id"), integer(self.client_id)),
                (bulk(b"mode"), bulk(b"standalone")),
                (bulk(b"role"), bulk(b"master")),
                (bulk(b"modules"), EMPTY_ARRAY),
            ],
            self.resp3,
        )

    def c_client(self, args: list[bytes]) -> Reply:
        sub = args[1].lower()
        if sub == b"setname" and len(args) == 3:
            if not _valid_client_name(args[2]):
                return E_CLIENT_NAME
            self.client_name = args[2] or None
            return OK
        if sub == b"getname" and len(args) == 2:
            return bulk(self.client_name)
        if sub == b"id" and len(args) == 2:
            return integer(self.client_id)
        if sub == b"info" and len(args) == 2:
            return bulk(self.client_line() + b"\n")
        if sub == b"list" and len(args) == 2:
            # Only the connections of the caller's partition: tenants do not see each other.
            clients = [c for c in self.factory.clients.values() if c.partition == self.partition]
            return bulk(b"".join(c.client_line() + b"\n" for c in clients))
        if sub == b"setinfo" and len(args) == 4:
            attr = args[2].lower()
            if attr == b"lib-name":
                self.lib_name = args[3]
            elif attr == b"lib-ver":
                self.lib_ver = args[3]
            else:
                return error(f"ERR Unrecognized option '{args[2].decode(errors='replace')}'")
            return OK
        if sub in (b"setname", b"getname", b"id", b"info", b"list", b"setinfo"):
            return error(
                f"ERR wrong number of arguments for 'client|{sub.decode(errors='replace')}' command"
            )
        return error(
            f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. Try CLIENT HELP."
        )

    def client_line(self) -> bytes:
        peer = self.transport.getPeer()
        addr = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', 0)}"
        age = int(self.clock.seconds() - self.created)
        name = (self.client_name or b"").decode(errors="replace")
        return (
            f"id={self.client_id} addr={addr} name={name} "
            f"age={age} db=0 lib-name={self.lib_name.decode(errors='replace')} "
            f"lib-ver={self.lib_ver.decode(errors='replace')}"
        ).encode()

    def c_command(self, args: list[bytes]) -> Reply:
        if len(args) == 1:
            return array([c.info() for c in _UNIQUE_COMMANDS])
        sub = args[1].lower()
        if sub == b"count":
            if len(args) != 2:
                return wrong_args(b"command|count")
            return integer(len(_UNIQUE_COMMANDS))
        if sub == b"info":
            names = args[2:] or [c.name.encode() for c in _UNIQUE_COMMANDS]
            out = []
            for n in names:
                c = COMMANDS.get(n.lower())
                out.append(c.info() if c else NULL)
            return array(out)
        if sub == b"docs":
            names = args[2:] or [c.name.encode() for c in _UNIQUE_COMMANDS]
            out = []
            for n in names:
                c = COMMANDS.get(n.lower())
                if c is not None:
                    out.append(bulk(c.name.encode()))
                    out.append(
                        array([bulk(b"summary"), bulk(b"kvha: see the Redis documentation")])
                    )
            return array(out)
        if sub == b"list":
            return bulk_array([c.name.encode() for c in _UNIQUE_COMMANDS])
        return error(
            f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. Try COMMAND HELP."
        )

    def c_config(self, args: list[bytes]) -> Reply:
        sub = args[1].lower()
        if sub == b"get":
            known = {b"save": b"", b"appendonly": b"no", b"databases": b"1"}
            pairs: dict[bytes, tuple[bytes, bytes]] = {}
            for pattern in args[2:]:
                for name, value in known.items():
                    if fnmatch.fnmatchcase(name.decode(), pattern.decode(errors="replace").lower()):
                        pairs[name] = (bulk(name), bulk(value))
            return map_reply(list(pairs.values()), self.resp3)
        if sub in (b"set", b"resetstat", b"rewrite"):
            return b"-ERR CONFIG SET is not supported by kvha; edit the master's configuration\r\n"
        return error(
            f"ERR unknown subcommand '{args[1].decode(errors='replace')}'. Try CONFIG HELP."
        )

    def c_info(self, args: list[bytes]) -> Reply:
        wanted = {a.lower() for a in args[1:]} or {b"default"}
        every = bool(wanted & {b"all", b"everything", b"default"})
        sections = (b"server", b"clients", b"persistence", b"stats", b"keyspace")
        chosen = [s for s in sections if every or s in wanted]

        def render(node_stats: dict[str, dict[str, str]]) -> bytes:
            factory = self.factory
            now = self.clock.seconds()
            up = self.router.links_up()
            lines: list[str] = []
            if b"server" in chosen:
                lines += [
                    "# Server",
                    "redis_version:7.0.0",
                    f"kvha_version:{__version__}",
                    "redis_mode:standalone",
                    f"os:{os.uname().sysname} {os.uname().release}",
                    f"process_id:{os.getpid()}",
                    f"uptime_in_seconds:{int(now - factory.started)}",
                    f"uptime_in_days:{int(now - factory.started) // 86400}",
                    f"tcp_port:{factory.port}",
                    "",
                ]
            if b"clients" in chosen:
                lines += [
                    "# Clients",
                    f"connected_clients:{len(factory.clients)}",
                    f"maxclients:{factory.max_connections}",
                    "",
                ]
            if b"persistence" in chosen:
                # As Redis while it loads its dataset: 1 while the master starts.
                lines += ["# Persistence", f"loading:{int(self.router.loading)}", ""]
            if b"stats" in chosen:
                lines += [
                    "# Stats",
                    f"total_connections_received:{factory.total_connections}",
                    f"total_commands_processed:{sum(factory.calls.values())}",
                    f"rejected_connections:{factory.rejected_connections}",
                    f"keyspace_hits:{factory.hits}",
                    f"keyspace_misses:{factory.misses}",
                    f"errorstats_server:{factory.errors}",
                    f"data_nodes_up:{up}",
                    f"data_nodes:{len(self.router.links)}",
                    "",
                ]
            if b"keyspace" in chosen:
                lines.append("# Keyspace")
                keys = self.router.count_from_stats(self.partition, node_stats)
                if keys:
                    lines.append(f"db0:keys={keys},expires=0,avg_ttl=0")
                lines.append("")
            return bulk("\r\n".join(lines).encode())

        if b"keyspace" in chosen:
            return self.router.node_stats().addCallback(render)
        return render({})

    # Strings ---------------------------------------------------------------------------

    def count_hit(self, record: Optional[Record]) -> Optional[Record]:
        if record is None:
            self.factory.misses += 1
        else:
            self.factory.hits += 1
        return record

    def c_get(self, args: list[bytes]) -> Reply:
        key = args[1]
        if self.gated(key):
            return self.get(key).addCallback(
                lambda r: bulk(None if self.count_hit(r) is None else r.value)
            )
        done, fail = self.reply_later(self._render_get, self._error_reply)
        self.router.get_cb(self.partition, key, done, fail)
        return b""  # the reply is in its slot

    def c_mget(self, args: list[bytes]) -> Reply:
        keys = args[1:]
        d = self.keyed(keys, lambda: self.router.get_many(self.partition, keys), register=False)
        return d.addCallback(
            lambda records: bulk_array(
                [None if self.count_hit(r) is None else r.value for r in records]
            )
        )

    def c_set(self, args: list[bytes]) -> Reply:
        key, value = args[1], args[2]
        if len(args) == 3 and not self.gated(key) and self.single_step_writes():
            done, fail = self.reply_later(_ok, self._error_reply)
            self.router.set_cb(self.partition, key, value, done, fail)
            return b""  # the reply is in its slot
        options = _string_options(args, 3, set_command=True)
        if options is None:
            return E_SYNTAX
        flags, unit, token = options
        expires = 0
        if unit:
            when = _expire_arg(b"set", unit, token, self.now_ms())
            if isinstance(when, bytes):
                return when
            expires = when
        cond = b"NX" if b"NX" in flags else b"XX" if b"XX" in flags else None
        return self._set(key, value, expires, cond, b"KEEPTTL" in flags, b"GET" in flags)

    def _set(
        self,
        key: bytes,
        value: bytes,
        expires: int,
        cond: Optional[bytes],
        keepttl: bool,
        get: bool,
        ok: bytes = OK,
        refused: bytes = NULL,
    ) -> Deferred:
        partition = self.partition
        router = self.router
        if not keepttl and not get:
            if cond is None:
                start = lambda: router.set(partition, key, value, 0, expires)  # noqa: E731
                d = self.keyed([key], start, register=not self.single_step_writes())
                return d.addCallback(lambda _: ok)
            mode = StoreMode.CAS if cond == b"NX" else StoreMode.REPLACE

            def store() -> Deferred:
                return router.conditional(
                    partition, key, lambda c: c.store(mode, partition, key, value, 0, expires, 0)
                )

            return self.keyed([key], store).addCallback(
                lambda r: ok if r.status is Status.STORED else refused
            )

        def fn(record: Optional[Record]) -> tuple[Optional[Change], bytes]:
            old = bulk(record.value if record is not None else None)
            if (cond == b"NX" and record is not None) or (cond == b"XX" and record is None):
                return None, old if get else refused
            exp = record.expires_ms if (keepttl and record is not None) else expires
            return Change.store(value, 0, exp), old if get else ok

        return self.modify(key, fn)

    def c_setnx(self, args: list[bytes]) -> Reply:
        return self._set(args[1], args[2], 0, b"NX", False, False, integer(1), integer(0))

    def c_setex(self, args: list[bytes]) -> Reply:
        name = args[0].lower()
        unit = b"PX" if name == b"psetex" else b"EX"
        expires = _expire_arg(name, unit, args[2], self.now_ms())
        if isinstance(expires, bytes):
            return expires
        return self._set(args[1], args[3], expires, None, False, False)

    def c_getset(self, args: list[bytes]) -> Reply:
        return self._set(args[1], args[2], 0, None, False, True)

    def c_getdel(self, args: list[bytes]) -> Reply:
        def fn(record: Optional[Record]) -> tuple[Optional[Change], bytes]:
            if record is None:
                return None, NULL
            return Change.remove(), bulk(record.value)

        return self.modify(args[1], fn)

    def c_getex(self, args: list[bytes]) -> Reply:
        options = _string_options(args, 2, set_command=False)
        if options is None:
            return E_SYNTAX
        flags, unit, token = options
        persist = b"PERSIST" in flags
        if not unit and not persist:
            return self.c_get(args[:2])
        # As in Redis, a missing key is nil before the expire time is looked at.
        expires = _expire_arg(b"getex", unit, token, self.now_ms()) if unit else 0

        def fn(record: Optional[Record]) -> tuple[Optional[Change], bytes]:
            if record is None:
                return None, NULL
            if isinstance(expires, bytes):
                return None, expires
            if persist:
                if not record.expires_ms:
                    return None, bulk(record.value)
                return Change.store(record.value, record.flags, 0), bulk(record.value)
            return Change.store(record.value, record.flags, expires), bulk(record.value)

        return self.modify(args[1], fn)

    def c_mset(self, args: list[bytes]) -> Reply:
        if len(args) % 2 == 0:
            return wrong_args(args[0])
        pairs = [(args[i], args[i + 1]) for i in range(1, len(args), 2)]
        keys = [k for k, _ in pairs]
        partition = self.partition
        if self.single_step_writes() and not any(self.gated(k) for k in keys):
            done, fail = self.reply_later(_ok, self._error_reply)
            self.router.set_many_cb(partition, pairs, done, fail)
            return b""  # the reply is in its slot

        def start() -> Deferred:
            ds = [self.router.set(partition, k, v) for k, v in pairs]
            return defer.gatherResults(ds, consumeErrors=True).addErrback(_unwrap)

        return self.keyed(keys, start, register=not self.single_step_writes()).addCallback(
            lambda _: OK
        )

    def c_msetnx(self, args: list[bytes]) -> Reply:
        if len(args) % 2 == 0:
            return wrong_args(args[0])
        # A key given twice is set once, to its last value, as in Redis.
        pairs = list(dict((args[i], args[i + 1]) for i in range(1, len(args), 2)).items())
        keys = [k for k, _ in pairs]
        return self.keyed(
            keys, lambda: self.router.set_if_all_absent(self.partition, pairs)
        ).addCallback(lambda done: integer(1 if done else 0))

    def c_append(self, args: list[bytes]) -> Reply:
        extra = args[2]
        limit = self.factory.max_value_bytes

        def fn(record: Optional[Record]) -> tuple[Optional[Change], bytes]:
            if record is None:
                return Change.store(extra, 0, 0), integer(len(extra))
            value = record.value + extra
            if len(value) > limit:
                return None, b"-ERR string exceeds maximum allowed size (proto-max-bulk-len)\r\n"
            return Change.store(value, record.flags, record.expires_ms), integer(len(value))

        return self.modify(args[1], fn)

    def c_strlen(self, args: list[bytes]) -> Reply:
        return self.get(args[1]).addCallback(lambda r: integer(0 if r is None else len(r.value)))

    def c_getrange(self, args: list[bytes]) -> Reply:
        start, end = _int(args[2]), _int(args[3])
        if start is None or end is None:
            return E_NOT_INT

        def render(record: Optional[Record]) -> bytes:
            value = b"" if record is None else record.value
            n = len(value)
            s, e = start, end
            if s < 0 and e < 0 and s > e:
                return bulk(b"")
            s = max(0, s + n if s < 0 else s)
            e = max(0, e + n if e < 0 else e)  # Redis 7: an end before the start is 0
            e = min(e, n - 1)
            if s > e or n == 0:
                return bulk(b"")
            return bulk(value[s : e + 1])

        return self.get(args[1]).addCallback(render)

    def c_setrange(self, args: list[bytes]) -> Reply:
        offset = _int(args[2])
        if offset is None:
            return E_NOT_INT
        if offset < 0:
            return E_OFFSET
        patch = args[3]
        limit = self.factory.max_value_bytes
        if offset + len(patch) > limit:
            return b"-ERR string exceeds maximum allowed size (proto-max-bulk-len)\r\n"

        def fn(record: Optional[Record]) -> tuple[Optional[Change], bytes]:
            value = b"" if record is None else record.value
            if not patch:
                return None, integer(len(value))
            if len(value) < offset:
                value = value + b"\x00" * (offset - len(value))
            value = value[:offset] + patch + value[offset + len(patch) :]
            flags = 0 if record is None else record.flags
            expires = 0 if record is None else record.expires_ms
            return Change.store(value, flags, expires), integer(len(value))

        return self.modify(args[1], fn)

    # Counters ------------------------------------------------------------------------------

    def _incr(self, key: bytes, mode: IncrMode, delta: bytes) -> bytes:
        partition = self.partition

        def render(result: Result) -> bytes:
            status = result.status
            if status is Status.NON_NUMERIC:
                return E_NOT_FLOAT if mode is IncrMode.REDIS_FLOAT else E_NOT_INT
            if status is Status.OVERFLOW:
                return E_NAN if mode is IncrMode.REDIS_FLOAT else E_OVERFLOW
            record = result.record
            assert record is not None
            if mode is IncrMode.REDIS_FLOAT:
                return bulk(record.value)  # never a null: the same in RESP3
            return integer(int(record.value))

        router = self.router

        def send(on_done: Callable[[Any], None], on_fail: Callable[[BaseException], None]) -> None:
            router.incr_cb(partition, key, mode, delta, on_done, on_fail)

        self.at_primary_cb(partition, key, send, render, self._error_reply)
        return b""  # the reply fills its slot

    def c_incr(self, args: list[bytes]) -> Reply:
        return self._incr(args[1], IncrMode.REDIS_INT, b"1")

    def c_decr(self, args: list[bytes]) -> Reply:
        return self._incr(args[1], IncrMode.REDIS_INT, b"-1")

    def c_incrby(self, args: list[bytes]) -> Reply:
        n = _int(args[2])
        if n is None:
            return E_NOT_INT
        if args[0].lower() == b"decrby":
            if n == I64_MIN:
                return b"-ERR decrement would overflow\r\n"
            n = -n
        return self._incr(args[1], IncrMode.REDIS_INT, str(n).encode())

    def c_incrbyfloat(self, args: list[bytes]) -> Reply:
        x = _float(args[2])
        if x is None:
            return E_NOT_FLOAT
        if x in (float("inf"), float("-inf")):
            return E_NAN
        return self._incr(args[1], IncrMode.REDIS_FLOAT, args[2])

    # Keys ----------------------------------------------------------------------------------

    def c_del(self, args: list[bytes]) -> Reply:
        keys = args[1:]
        partition = self.partition

        def start() -> Deferred:
            ds = [self.router.delete(partition, k) for k in keys]
            return defer.gatherResults(ds, consumeErrors=True).addErrback(_unwrap)

        return self.keyed(keys, start, register=False).addCallback(
            lambda results: integer(sum(1 for r in results if r.status is Status.DELETED))
        )

    def c_exists(self, args: list[bytes]) -> Reply:
        keys = args[1:]
        d = self.keyed(keys, lambda: self.router.get_many(self.partition, keys), register=False)
        return d.addCallback(lambda records: integer(sum(1 for r in records if r is not None)))

    def c_type(self, args: list[bytes]) -> Reply:
        return self.get(args[1]).addCallback(
            lambda r: b"+none\r\n" if r is None else b"+string\r\n"
        )

    def _expire(self, args: list[bytes], unit: bytes) -> Reply:
        n = _int(args[2])
        if n is None:
            return E_NOT_INT
        flags = {a.upper() for a in args[3:]}
        for flag in flags:
            if flag not in (b"NX", b"XX", b"GT", b"LT"):
                return error(f"ERR Unsupported option {flag.decode(errors='replace')}")
        if b"NX" in flags and flags & {b"XX", b"GT", b"LT"}:
            return b"-ERR NX and XX, GT or LT options at the same time are not compatible\r\n"
        if b"GT" in flags and b"LT" in flags:
            return b"-ERR GT and LT options at the same time are not compatible\r\n"
        now = self.now_ms()
        if unit in (b"EX", b"PX"):
            scale = 1000 if unit == b"EX" else 1
            if abs(n) > I64_MAX // 1000:
                return error(f"ERR invalid expire time in '{args[0].decode().lower()}' command")
            when = now + n * scale
        else:
            if unit == b"EXAT" and abs(n) > I64_MAX // 1000:
                return error(f"ERR invalid expire time in '{args[0].decode().lower()}' command")
            when = n * 1000 if unit == b"EXAT" else n

        def fn(record: Optional[Record]) -> tuple[Optional[Change], bytes]:
            if record is None:
                return None, integer(0)
            current = record.expires_ms  # 0 = no expiry, which is an infinite TTL
            if b"NX" in flags and current:
                return None, integer(0)
            if b"XX" in flags and not current:
                return None, integer(0)
            if b"GT" in flags and (not current or when <= current):
                return None, integer(0)
            if b"LT" in flags and current and when >= current:
                return None, integer(0)
            if when <= now:
                return Change.remove(), integer(1)
            return Change.store(record.value, record.flags, max(1, when)), integer(1)

        return self.modify(args[1], fn)

    def c_expire(self, args: list[bytes]) -> Reply:
        return self._expire(args, b"EX")

    def c_pexpire(self, args: list[bytes]) -> Reply:
        return self._expire(args, b"PX")

    def c_expireat(self, args: list[bytes]) -> Reply:
        return self._expire(args, b"EXAT")

    def c_pexpireat(self, args: list[bytes]) -> Reply:
        return self._expire(args, b"PXAT")

    def _ttl(self, args: list[bytes], millis: bool) -> Reply:
        def render(record: Optional[Record]) -> bytes:
            if record is None:
                return integer(-2)
            if not record.expires_ms:
                return integer(-1)
            left = max(0, record.expires_ms - self.now_ms())
            return integer(left if millis else (left + 500) // 1000)

        return self.get(args[1]).addCallback(render)

    def c_ttl(self, args: list[bytes]) -> Reply:
        return self._ttl(args, False)

    def c_pttl(self, args: list[bytes]) -> Reply:
        return self._ttl(args, True)

    def c_persist(self, args: list[bytes]) -> Reply:
        def fn(record: Optional[Record]) -> tuple[Optional[Change], bytes]:
            if record is None or not record.expires_ms:
                return None, integer(0)
            return Change.store(record.value, record.flags, 0), integer(1)

        return self.modify(args[1], fn)

    # Whole keyspace ------------------------------------------------------------------------

    def c_dbsize(self, args: list[bytes]) -> Reply:
        return self.after_all(lambda: self.router.node_stats()).addCallback(
            lambda stats: integer(self.router.count_from_stats(self.partition, stats))
        )

    def c_flushdb(self, args: list[bytes]) -> Reply:
        for opt in args[1:]:
            if opt.upper() not in (b"ASYNC", b"SYNC"):
                return E_SYNTAX
        return self.after_all(lambda: self.router.flush(self.partition)).addCallback(lambda _: OK)

    def c_keys(self, args: list[bytes]) -> Reply:
        pattern = args[1]
        return self.after_all(lambda: self.router.scan_all(self.partition, pattern)).addCallback(
            bulk_array
        )

    def c_scan(self, args: list[bytes]) -> Reply:
        cursor = _scan_cursor(args[1])
        if cursor is None:
            return E_INVALID_CURSOR
        pattern = None
        count = 10
        i = 2
        while i < len(args):
            opt = args[i].upper()
            if opt == b"MATCH" and i + 1 < len(args):
                pattern = args[i + 1]
            elif opt == b"COUNT" and i + 1 < len(args):
                n = _int(args[i + 1])
                if n is None:
                    return E_NOT_INT
                if n < 1:
                    return E_SYNTAX
                count = n
            elif opt == b"TYPE" and i + 1 < len(args):
                if args[i + 1].lower() != b"string":
                    return array([bulk(b"0"), EMPTY_ARRAY])
            else:
                return E_SYNTAX
            i += 2

        def render(page: tuple[int, list[bytes]]) -> bytes:
            next_cursor, keys = page
            if pattern is not None and pattern != b"*":
                keys = [k for k in keys if glob_match(pattern, k)]
            return array([bulk(str(next_cursor).encode()), bulk_array(keys)])

        return self.after_all(
            lambda: self.router.scan(self.partition, cursor, min(count, 100_000))
        ).addCallback(render)


def _scan_cursor(token: bytes) -> Optional[int]:
    """The cursor as Redis reads it (strtoul): an optional sign, a negative wraps around."""
    body = token[1:] if token[:1] in (b"+", b"-") else token
    if not token:
        return 0
    if not body.isdigit():
        return None
    n = int(body)
    if n >= 1 << 64:
        return None
    return (-n) % (1 << 64) if token[:1] == b"-" else n


def _string_options(
    args: list[bytes], start: int, set_command: bool
) -> Optional[tuple[set[bytes], bytes, bytes]]:
    """SET's or GETEX's options as Redis parses them, or None for a syntax error.

    Returns the flags (NX XX GET KEEPTTL PERSIST), the expire unit (EX PX EXAT
    PXAT, or b"") and its unparsed argument.  As in Redis, an option may repeat
    (the last expire wins) but the expire units exclude each other.
    """
    flags: set[bytes] = set()
    unit = token = b""
    i = start
    while i < len(args):
        opt = args[i].upper()
        if set_command:
            flag = (
                (opt == b"NX" and b"XX" not in flags)
                or (opt == b"XX" and b"NX" not in flags)
                or opt == b"GET"
                or (opt == b"KEEPTTL" and not unit)
            )
        else:
            flag = opt == b"PERSIST" and not unit
        if flag:
            flags.add(opt)
        elif (
            opt in (b"EX", b"PX", b"EXAT", b"PXAT")
            and unit in (b"", opt)
            and not flags & {b"KEEPTTL", b"PERSIST"}
            and i + 1 < len(args)
        ):
            unit, token = opt, args[i + 1]
            i += 1
        else:
            return None
        i += 1
    return flags, unit, token


def _expire_arg(command: bytes, unit: bytes, token: bytes, now_ms: int) -> Union[int, bytes]:
    """An expire option's absolute time in ms, or the error reply Redis gives for it."""
    n = _int(token)
    if n is None:
        return E_NOT_INT
    expires = _expiry(unit, n, now_ms) if n > 0 else None
    if expires is None:
        return error(f"ERR invalid expire time in '{command.decode()}' command")
    return expires


def _expiry(unit: bytes, n: int, now_ms: int) -> Optional[int]:
    """Absolute expiry in ms for SET-style options, or None if out of range."""
    if unit == b"EX":
        if n > I64_MAX // 1000 - now_ms // 1000:
            return None
        return now_ms + n * 1000
    if unit == b"PX":
        if n > I64_MAX - now_ms:
            return None
        return now_ms + n
    if unit == b"EXAT":
        if n > I64_MAX // 1000:
            return None
        return n * 1000
    return n  # PXAT


def glob_match(pattern: bytes, key: bytes) -> bool:
    """Redis's stringmatchlen: * ? [abc] [^a] [a-z] and backslash escapes.

    A port of Redis 7's matcher, quirks included: a class may use ``]`` as a
    range end (``[a-]``), an unterminated ``[`` runs to the end of the
    pattern, and ``*`` gives up early once the rest cannot match anywhere.
    """
    return _glob(pattern, 0, key, 0, [False], 0)


def _glob(p: bytes, pi: int, s: bytes, si: int, skip_longer: list[bool], nesting: int) -> bool:
    if nesting > 1000:
        return False
    plen = len(p)
    slen = len(s)
    while pi < plen and si < slen:
        c = p[pi]
        if c == 42:  # *
            while pi + 1 < plen and p[pi + 1] == 42:
                pi += 1
            if pi + 1 == plen:
                return True
            while si < slen:
                if _glob(p, pi + 1, s, si, skip_longer, nesting + 1):
                    return True
                if skip_longer[0]:
                    return False
                si += 1
            skip_longer[0] = True
            return False
        if c == 63:  # ?
            si += 1
        elif c == 91:  # [
            pi += 1
            negate = pi < plen and p[pi] == 94  # ^
            if negate:
                pi += 1
            matched = False
            while True:
                if pi >= plen:  # unterminated: the class ends with the pattern
                    pi -= 1
                    break
                if p[pi] == 92 and plen - pi >= 2:  # backslash
                    pi += 1
                    if p[pi] == s[si]:
                        matched = True
                elif p[pi] == 93:  # ]
                    break
                elif plen - pi >= 3 and p[pi + 1] == 45:  # a-z
                    lo, hi = sorted((p[pi], p[pi + 2]))
                    pi += 2
                    if lo <= s[si] <= hi:
                        matched = True
                elif p[pi] == s[si]:
                    matched = True
                pi += 1
            if matched == negate:
                return False
            si += 1
        else:
            if c == 92 and plen - pi >= 2:  # backslash
                pi += 1
            if p[pi] != s[si]:
                return False
            si += 1
        pi += 1
        if si == slen:
            while pi < plen and p[pi] == 42:
                pi += 1
            break
    return pi == plen and si == slen


def _unwrap(failure: Any) -> Any:
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure


_W = ("write", "denyoom")
_R = ("readonly", "fast")
_CONN = ("loading", "stale", "fast")
_NOAUTH = ("noscript", "loading", "stale", "fast", "no_auth", "allow_busy")
_STR_R = "read string fast"
_STR_RS = "read string slow"
_STR_W = "write string fast"
_STR_WS = "write string slow"
_KEY_R = "keyspace read fast"
_KEY_W = "keyspace write fast"
_RAU = "RW access update"
# name, handler, arity, flags, first key, last key, step, ACL categories, key-spec flags
_TABLE: list[tuple[Any, ...]] = [
    ("ping", RespProtocol.c_ping, -1, ("fast",), 0, 0, 0, "fast connection"),
    ("echo", RespProtocol.c_echo, 2, _CONN, 0, 0, 0, "fast connection"),
    ("quit", RespProtocol.c_quit, -1, _NOAUTH, 0, 0, 0, "fast connection"),
    ("select", RespProtocol.c_select, 2, _CONN, 0, 0, 0, "fast connection"),
    ("auth", RespProtocol.c_auth, -2, _NOAUTH, 0, 0, 0, "fast connection"),
    ("hello", RespProtocol.c_hello, -1, _NOAUTH, 0, 0, 0, "fast connection"),
    ("client", RespProtocol.c_client, -2, (), 0, 0, 0, "slow"),
    ("command", RespProtocol.c_command, -1, ("loading", "stale"), 0, 0, 0, "slow connection"),
    ("config", RespProtocol.c_config, -2, (), 0, 0, 0, "slow"),
    ("info", RespProtocol.c_info, -1, ("loading", "stale"), 0, 0, 0, "slow dangerous"),
    ("dbsize", RespProtocol.c_dbsize, 1, _R, 0, 0, 0, _KEY_R),
    ("flushdb", RespProtocol.c_flushdb, -1, ("write",), 0, 0, 0, "keyspace write slow dangerous"),
    ("flushall", RespProtocol.c_flushdb, -1, ("write",), 0, 0, 0, "keyspace write slow dangerous"),
    ("get", RespProtocol.c_get, 2, _R, 1, 1, 1, _STR_R, "RO access"),
    ("set", RespProtocol.c_set, -3, _W, 1, 1, 1, _STR_WS, _RAU + " variable_flags"),
    ("setnx", RespProtocol.c_setnx, 3, _W + ("fast",), 1, 1, 1, _STR_W, "OW insert"),
    ("setex", RespProtocol.c_setex, 4, _W, 1, 1, 1, _STR_WS, "OW update"),
    ("psetex", RespProtocol.c_setex, 4, _W, 1, 1, 1, _STR_WS, "OW update"),
    ("getset", RespProtocol.c_getset, 3, _W + ("fast",), 1, 1, 1, _STR_W, _RAU),
    ("getdel", RespProtocol.c_getdel, 2, ("write", "fast"), 1, 1, 1, _STR_W, "RW access delete"),
    ("getex", RespProtocol.c_getex, -2, ("write", "fast"), 1, 1, 1, _STR_W, _RAU),
    ("mget", RespProtocol.c_mget, -2, _R, 1, -1, 1, _STR_R, "RO access"),
    ("mset", RespProtocol.c_mset, -3, _W, 1, -1, 2, _STR_WS, "OW update"),
    ("msetnx", RespProtocol.c_msetnx, -3, _W, 1, -1, 2, _STR_WS, "OW insert"),
    ("del", RespProtocol.c_del, -2, ("write",), 1, -1, 1, "keyspace write slow", "RM delete"),
    ("unlink", RespProtocol.c_del, -2, ("write", "fast"), 1, -1, 1, _KEY_W, "RM delete"),
    ("exists", RespProtocol.c_exists, -2, _R, 1, -1, 1, _KEY_R, "RO"),
    ("type", RespProtocol.c_type, 2, _R, 1, 1, 1, _KEY_R, "RO"),
    ("expire", RespProtocol.c_expire, -3, ("write", "fast"), 1, 1, 1, _KEY_W, "RW update"),
    ("pexpire", RespProtocol.c_pexpire, -3, ("write", "fast"), 1, 1, 1, _KEY_W, "RW update"),
    ("expireat", RespProtocol.c_expireat, -3, ("write", "fast"), 1, 1, 1, _KEY_W, "RW update"),
    ("pexpireat", RespProtocol.c_pexpireat, -3, ("write", "fast"), 1, 1, 1, _KEY_W, "RW update"),
    ("ttl", RespProtocol.c_ttl, 2, _R, 1, 1, 1, _KEY_R, "RO access"),
    ("pttl", RespProtocol.c_pttl, 2, _R, 1, 1, 1, _KEY_R, "RO access"),
    ("persist", RespProtocol.c_persist, 2, ("write", "fast"), 1, 1, 1, _KEY_W, "RW update"),
    ("incr", RespProtocol.c_incr, 2, _W + ("fast",), 1, 1, 1, _STR_W, _RAU),
    ("decr", RespProtocol.c_decr, 2, _W + ("fast",), 1, 1, 1, _STR_W, _RAU),
    ("incrby", RespProtocol.c_incrby, 3, _W + ("fast",), 1, 1, 1, _STR_W, _RAU),
    ("decrby", RespProtocol.c_incrby, 3, _W + ("fast",), 1, 1, 1, _STR_W, _RAU),
    ("incrbyfloat", RespProtocol.c_incrbyfloat, 3, _W + ("fast",), 1, 1, 1, _STR_W, _RAU),
    ("append", RespProtocol.c_append, 3, _W + ("fast",), 1, 1, 1, _STR_W, "RW insert"),
    ("strlen", RespProtocol.c_strlen, 2, _R, 1, 1, 1, _STR_R, "RO"),
    ("getrange", RespProtocol.c_getrange, 4, ("readonly",), 1, 1, 1, _STR_RS, "RO access"),
    ("substr", RespProtocol.c_getrange, 4, ("readonly",), 1, 1, 1, _STR_RS, "RO access"),
    ("setrange", RespProtocol.c_setrange, 4, _W, 1, 1, 1, _STR_WS, "RW update"),
    ("keys", RespProtocol.c_keys, 2, ("readonly",), 0, 0, 0, "keyspace read slow dangerous"),
    ("scan", RespProtocol.c_scan, -2, ("readonly",), 0, 0, 0, "keyspace read slow"),
]
_ALL_SHARDS = ("request_policy:all_shards", "response_policy:all_succeeded")
_MULTI_SUM = ("request_policy:multi_shard", "response_policy:agg_sum")
_TIPS: dict[str, tuple[str, ...]] = {
    "ping": _ALL_SHARDS,
    "info": ("nondeterministic_output", "request_policy:all_shards", "response_policy:special"),
    "dbsize": ("request_policy:all_shards", "response_policy:agg_sum"),
    "flushdb": _ALL_SHARDS,
    "flushall": _ALL_SHARDS,
    "mget": ("request_policy:multi_shard",),
    "mset": ("request_policy:multi_shard", "response_policy:all_succeeded"),
    "msetnx": ("request_policy:multi_shard", "response_policy:agg_min"),
    "del": _MULTI_SUM,
    "unlink": _MULTI_SUM,
    "exists": _MULTI_SUM,
    "ttl": ("nondeterministic_output",),
    "pttl": ("nondeterministic_output",),
    "keys": ("request_policy:all_shards", "nondeterministic_output_order"),
    "scan": ("nondeterministic_output", "request_policy:special"),
}
_NOTES = {
    "set": "RW and ACCESS due to the optional `GET` argument",
    "getex": "RW and UPDATE because it changes the TTL",
}
# Rows have 8 or 9 fields, so tips and notes are never also given by position;
# mypy cannot tell that from tuple[Any, ...].
_UNIQUE_COMMANDS = [
    Command(  # type: ignore[misc]
        *row, tips=_TIPS.get(row[0], ()), notes=_NOTES.get(row[0], "")
    )
    for row in _TABLE
]
COMMANDS: dict[bytes, Command] = {c.name.encode(): c for c in _UNIQUE_COMMANDS}
#: What runs while the master is starting (Router.loading): as in Redis, the
#: commands flagged ``loading``, and CLIENT and CONFIG (whose subcommands are).
#: PING is not one: a load balancer's probe must fail until data can be read.
OK_LOADING = frozenset(
    [c.name for c in _UNIQUE_COMMANDS if "loading" in c.flags] + ["client", "config"]
)


class RespFactory(ClientFactory):
    def __init__(
        self,
        router: Router,
        partition: bytes,
        clock: IReactorTime,
        *,
        port: int = 0,
        max_connections: int = 4096,
        max_in_flight: int = 256,
        max_value_bytes: int = 1 << 20,
        max_line_bytes: int = MAX_INLINE,
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
        self.port = port
        self.clients: dict[int, RespProtocol] = {}
        self.next_id = 0
        self.total_connections = 0
        self.rejected_connections = 0
        self.calls: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.started = clock.seconds()
        self.wall_started = time.time()

    def buildProtocol(self, addr: Any) -> RespProtocol:
        return RespProtocol(self)
