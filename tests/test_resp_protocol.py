"""The Redis protocol (RESP2), byte for byte, over a StringTransport and an in-process cluster.

Expected replies are what Redis 7 sends for the same input (the examples of
the Redis command documentation, and real redis-server 7.0 for the error
words); where kvha deliberately differs (one database, no RESP3) the test
says so.  Time is the cluster's ``Clock``, so TTLs are exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from kvha.master.resp import COMMANDS, RespFactory, RespParser, glob_match, split_inline
from tests.inprocess import Cluster

P = b"default"
NOW = 1_700_000_000  # the in-process cluster's clock, in seconds


def encode(*args: Any) -> bytes:
    """One command as a RESP multibulk."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def parse_reply(data: bytes, pos: int = 0) -> tuple[Any, int]:
    """Decode one RESP2 reply (for order-free checks): errors come back as ``("ERR", text)``."""
    kind = data[pos : pos + 1]
    nl = data.index(b"\r\n", pos)
    head = data[pos + 1 : nl]
    pos = nl + 2
    if kind == b"+":
        return head, pos
    if kind == b"-":
        return ("ERR", head), pos
    if kind == b":":
        return int(head), pos
    if kind == b"$":
        n = int(head)
        if n < 0:
            return None, pos
        return data[pos : pos + n], pos + n + 2
    assert kind == b"*", data
    n = int(head)
    if n < 0:
        return None, pos
    items = []
    for _ in range(n):
        item, pos = parse_reply(data, pos)
        items.append(item)
    return items, pos


def parse_all(data: bytes) -> list[Any]:
    out = []
    pos = 0
    while pos < len(data):
        item, pos = parse_reply(data, pos)
        out.append(item)
    return out


class Conn:
    """One client connection: commands in, the bytes written back since the last call out."""

    def __init__(self, factory: RespFactory) -> None:
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()

    def cmd(self, *args: Any) -> bytes:
        return self.send(encode(*args))

    def value(self, *args: Any) -> Any:
        reply, end = parse_reply(self.cmd(*args))
        return reply

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster(n=3, replicas=1)
    yield c
    c.stop()


@pytest.fixture
def conn(cluster: Cluster) -> Conn:
    return Conn(cluster.resp_factory())


def copy_ids(cluster: Cluster, key: bytes) -> list[str]:
    return [link.node_id for link in cluster.router.copies_of(P, key)]


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


OK = b"+OK\r\n"
NIL = b"$-1\r\n"
SYNTAX = b"-ERR syntax error\r\n"
NOT_INT = b"-ERR value is not an integer or out of range\r\n"


# Parser ---------------------------------------------------------------------------------------

ARGS = st.lists(st.lists(st.binary(max_size=40), min_size=1, max_size=6), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(commands=ARGS, data=st.data())
def test_parser_multibulk_round_trips_in_any_chunking(commands: list[list[bytes]], data) -> None:  # type: ignore[no-untyped-def]
    """Any byte-string arguments encoded as multibulk, fed in random chunks, parse back exactly."""
    stream = b"".join(encode(*c) for c in commands)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    parser = RespParser(max_bulk=1 << 20)
    out: list[list[bytes]] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += parser.feed(stream[start:cut])
        start = cut
    assert out == commands
    assert not parser.failed


@settings(max_examples=200, deadline=None)
@given(
    commands=st.lists(
        st.lists(st.binary(max_size=30), min_size=1, max_size=4), min_size=1, max_size=6
    ),
    data=st.data(),
)
def test_parser_skips_oversized_args_in_any_chunking(commands: list[list[bytes]], data) -> None:  # type: ignore[no-untyped-def]
    """A command with an argument over the limit comes out as TOO_LARGE, the others intact."""
    limit = 10
    stream = b"".join(encode(*c) for c in commands)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    parser = RespParser(max_bulk=limit)
    out: list[list[bytes]] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += parser.feed(stream[start:cut])
        start = cut
    expected = [
        c
        if all(len(a) <= limit for a in c)
        else [RespParser.TOO_LARGE, c[0] if len(c[0]) <= limit else b"?"]
        for c in commands
    ]
    assert out == expected


ODD_PIECES = [
    b"*0\r\n",
    b"*-1\r\n",
    b"PING\r\n",
    b"set a 'b c'\r\n",
    b"*02\r\n$3\r\nGET\r\n$1\r\na\r\n",  # a leading zero: a protocol error in Redis
    b"*+1\r\n$4\r\nPING\r\n",
    b"*1\r\n$04\r\nPING\r\n",
    b"*1\r\n$-1\r\n",
    b"*2\r\n$3\r\nGET\r\n$0\r\n\r\n",
    b"*1\r\n+PING\r\n",
    b"*99999999999999999999\r\n",
    b"*2\r\n$3\r\nSET\r\n$20\r\n" + b"x" * 20 + b"\r\n",  # over max_bulk below
    b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$6\r\na\r\nb\r\n\r\n",  # CR LF inside an argument
    b"*1\r\n$0000000000000004\r\nPING\r\n",  # a long length header
    b"*1\r\n$4\r\nPING",  # no final CR LF
]


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(
        st.one_of(
            st.sampled_from(ODD_PIECES),
            st.lists(st.binary(max_size=12), min_size=1, max_size=4).map(lambda c: encode(*c)),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_parser_whole_reads_parse_as_byte_by_byte(pieces: list[bytes]) -> None:
    """Whole commands in one read take a fast path; it must agree with the general one.

    Fed one byte at a time, every command goes through the general path;
    fed at once, ordinary commands go through the fast path until the first
    unusual one.  Errors and oversized arguments come out the same either way.
    """
    stream = b"".join(pieces)
    whole = RespParser(max_bulk=16)
    at_once = whole.feed(stream)
    bytewise = RespParser(max_bulk=16)
    one_by_one: list[list[bytes]] = []
    for i in range(len(stream)):
        one_by_one += bytewise.feed(stream[i : i + 1])
    assert at_once == one_by_one
    assert whole.failed == bytewise.failed


def test_parser_inline_commands() -> None:
    """Inline commands split on whitespace and end at \\n or \\r\\n; blank lines are skipped."""
    parser = RespParser(max_bulk=100)
    assert parser.feed(b"SET a  b\r\n\r\nGET a\nPI") == [[b"SET", b"a", b"b"], [b"GET", b"a"]]
    assert parser.feed(b"NG\r\n") == [[b"PING"]]


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"set a b", [b"set", b"a", b"b"]),
        (b"  set\ta   b  ", [b"set", b"a", b"b"]),
        (b'set a "b c"', [b"set", b"a", b"b c"]),
        (b'set a "x\\n\\x41\\q"', [b"set", b"a", b"x\nAq"]),
        (b"set a 'it\\'s'", [b"set", b"a", b"it's"]),
        (b"set a 'no \\n escapes'", [b"set", b"a", b"no \\n escapes"]),
        (b'set "" ""', [b"set", b"", b""]),
        (b'a"b c"', [b"ab c"]),
        (b"", []),
        (b'set a "open', None),
        (b"set a 'open", None),
        (b'set a "x"y', None),
        (b"set a 'x'y", None),
    ],
)
def test_split_inline_like_redis(line: bytes, args: Any) -> None:
    """Inline arguments split as Redis's sdssplitargs: quotes, escapes; unbalanced is None."""
    assert split_inline(line) == args


def test_inline_commands_answered(conn: Conn) -> None:
    """A telnet user typing inline commands gets the same replies, quotes included."""
    assert conn.send(b'SET greeting "hello world"\r\nGET greeting\r\nPING\n') == (
        OK + bulk(b"hello world") + b"+PONG\r\n"
    )


def test_unbalanced_quotes_close_the_connection(conn: Conn) -> None:
    """Unbalanced quotes in an inline command are a protocol error: reply, then close."""
    out = conn.send(b'PING\r\nSET a "b\r\n')
    assert out == b"+PONG\r\n-ERR Protocol error: unbalanced quotes in request\r\n"
    assert conn.closed


def test_empty_multibulk_is_ignored(conn: Conn) -> None:
    """``*0`` and ``*-1`` are no command at all: no reply, and the next command runs."""
    assert conn.send(b"*0\r\n") == b""
    assert conn.send(b"*-1\r\n*0\r\n*1\r\n$4\r\nPING\r\n") == b"+PONG\r\n"
    assert not conn.closed


def test_oversized_bulk_is_skipped_without_buffering() -> None:
    """A bulk longer than the limit is dropped as it arrives and its command is marked."""
    parser = RespParser(max_bulk=10)
    out = parser.feed(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100000\r\n")
    assert out == []
    for _ in range(100):
        assert parser.feed(b"x" * 1000) == []
        assert len(parser._buf) == 0  # nothing of the big value is kept
    assert parser.feed(b"\r\n*1\r\n$4\r\nPING\r\n") == [[RespParser.TOO_LARGE, b"SET"], [b"PING"]]


def test_oversized_bulk_is_answered_and_the_connection_kept(cluster: Cluster) -> None:
    """A value over max_value_bytes gets an error; the connection goes on and nothing is stored."""
    conn = Conn(cluster.resp_factory(max_value_bytes=16))
    data = encode("SET", "k", b"v" * 100) + encode("GET", "k")
    out = b""
    for i in range(0, len(data), 7):
        out += conn.send(data[i : i + 7])
    assert out == b"-ERR argument exceeds the maximum value size (16 bytes)\r\n" + NIL
    assert not conn.closed
    assert conn.cmd("SET", "k", b"v" * 16) == OK


def test_malformed_multibulk_length_closes(conn: Conn) -> None:
    """``*x`` is a protocol error: commands before it are answered, then the error, then close."""
    out = conn.send(b"*1\r\n$4\r\nPING\r\n*x\r\n*1\r\n$4\r\nPING\r\n")
    assert out == b"+PONG\r\n-ERR Protocol error: invalid multibulk length\r\n"
    assert conn.closed
    assert conn.send(b"*1\r\n$4\r\nPING\r\n") == b""


def test_expected_dollar_closes(conn: Conn) -> None:
    """An argument that does not start with ``$`` is a protocol error naming the byte found."""
    assert conn.send(b"*1\r\nx3\r\n") == b"-ERR Protocol error: expected '$', got 'x'\r\n"
    assert conn.closed


@pytest.mark.parametrize("length", [b"x", b"-1", b"+4", b" 4", b"536870913"])
def test_invalid_bulk_length_closes(cluster: Cluster, length: bytes) -> None:
    """A bulk length that is not a number, negative, or over 512 MB closes, as Redis does."""
    conn = Conn(cluster.resp_factory())
    assert conn.send(b"*1\r\n$" + length + b"\r\n") == (
        b"-ERR Protocol error: invalid bulk length\r\n"
    )
    assert conn.closed


def test_too_big_inline_request_closes(conn: Conn) -> None:
    """An inline request over 64 KB without a newline is refused and the connection closed."""
    assert conn.send(b"x" * (64 * 1024 + 1)) == b"-ERR Protocol error: too big inline request\r\n"
    assert conn.closed


# Connection commands --------------------------------------------------------------------------


def test_ping_and_echo(conn: Conn) -> None:
    """PING answers PONG or echoes its argument; ECHO echoes."""
    assert conn.cmd("PING") == b"+PONG\r\n"
    assert conn.cmd("PING", "hello") == bulk(b"hello")
    assert conn.cmd("PING", "a", "b") == b"-ERR wrong number of arguments for 'ping' command\r\n"
    assert conn.cmd("ECHO", "Hello World!") == bulk(b"Hello World!")
    assert conn.cmd("ECHO") == b"-ERR wrong number of arguments for 'echo' command\r\n"


def test_select(conn: Conn) -> None:
    """SELECT 0 is OK; kvha has one database, so any other index is out of range."""
    assert conn.cmd("SELECT", "0") == OK
    assert conn.cmd("SELECT", "1") == b"-ERR DB index is out of range\r\n"
    assert conn.cmd("SELECT", "x") == NOT_INT


def test_auth_without_password(conn: Conn) -> None:
    """AUTH answers as Redis does with no password set: the default user needs none."""
    assert conn.cmd("AUTH", "secret") == (
        b"-ERR AUTH <password> called without any password configured for the default user. "
        b"Are you sure your configuration is correct?\r\n"
    )
    assert conn.cmd("AUTH", "default", "anything") == OK
    assert conn.cmd("AUTH", "bob", "pw") == (
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    )
    assert conn.cmd("AUTH", "a", "b", "c") == SYNTAX


def test_hello(conn: Conn) -> None:
    """HELLO and HELLO 2 describe the server; HELLO 4 is refused (RESP3 is tested below)."""
    for args in [("HELLO",), ("HELLO", "2")]:
        reply = conn.value(*args)
        fields = dict(zip(reply[::2], reply[1::2]))
        assert fields[b"server"] == b"redis"
        assert fields[b"proto"] == 2
        assert fields[b"id"] == conn.proto.client_id
        assert fields[b"mode"] == b"standalone"
        assert fields[b"role"] == b"master"
        assert fields[b"modules"] == []
    assert conn.cmd("HELLO", "4") == b"-NOPROTO unsupported protocol version\r\n"
    assert conn.cmd("HELLO", "x") == (
        b"-ERR Protocol version is not an integer or out of range\r\n"
    )
    assert conn.cmd("HELLO", "2", "FOO") == b"-ERR Syntax error in HELLO option 'FOO'\r\n"
    assert conn.cmd("HELLO", "2", "AUTH", "bob", "pw").startswith(b"-WRONGPASS ")
    assert conn.cmd("HELLO", "2", "AUTH", "default", "pw").startswith(b"*14\r\n")
    assert conn.cmd("HELLO", "2", "SETNAME", "a b") == (
        b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    )
    assert conn.cmd("HELLO", "2", "SETNAME", "worker").startswith(b"*14\r\n")
    assert conn.cmd("CLIENT", "GETNAME") == bulk(b"worker")


def test_client_subcommands(cluster: Cluster) -> None:
    """CLIENT SETNAME GETNAME ID INFO LIST SETINFO answer as in Redis 7.2."""
    factory = cluster.resp_factory()
    conn = Conn(factory)
    other = Conn(factory)
    assert conn.cmd("CLIENT", "GETNAME") == NIL
    assert conn.cmd("CLIENT", "SETNAME", "app-1") == OK
    assert conn.cmd("CLIENT", "GETNAME") == bulk(b"app-1")
    for bad in ["a b", "a\nb", "caf\xe9", "\x01"]:
        assert conn.cmd("CLIENT", "SETNAME", bad) == (
            b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
        )
    assert conn.cmd("CLIENT", "SETNAME", "") == OK  # clears the name
    assert conn.cmd("CLIENT", "GETNAME") == NIL
    assert conn.value("CLIENT", "ID") == conn.proto.client_id
    assert other.value("CLIENT", "ID") == conn.proto.client_id + 1
    assert conn.cmd("CLIENT", "SETINFO", "lib-name", "redis-py") == OK
    assert conn.cmd("CLIENT", "SETINFO", "LIB-VER", "5.0") == OK
    assert conn.cmd("CLIENT", "SETINFO", "foo", "1") == b"-ERR Unrecognized option 'foo'\r\n"
    info = conn.value("CLIENT", "INFO")
    assert info.startswith(b"id=%d addr=" % conn.proto.client_id) and info.endswith(b"\n")
    assert b" lib-name=redis-py lib-ver=5.0" in info
    lines = conn.value("CLIENT", "LIST").splitlines()
    assert len(lines) == 2
    assert conn.cmd("CLIENT", "FOO") == b"-ERR unknown subcommand 'FOO'. Try CLIENT HELP.\r\n"
    assert conn.cmd("CLIENT", "SETNAME") == (
        b"-ERR wrong number of arguments for 'client|setname' command\r\n"
    )


# COMMAND INFO get, byte for byte as redis-server 7.0 sends it.
GET_INFO = (
    b"*10\r\n$3\r\nget\r\n:2\r\n*2\r\n+readonly\r\n+fast\r\n:1\r\n:1\r\n:1\r\n"
    b"*3\r\n+@read\r\n+@string\r\n+@fast\r\n*0\r\n"
    b"*1\r\n*6\r\n$5\r\nflags\r\n*2\r\n+RO\r\n+access\r\n"
    b"$12\r\nbegin_search\r\n*4\r\n$4\r\ntype\r\n$5\r\nindex\r\n$4\r\nspec\r\n"
    b"*2\r\n$5\r\nindex\r\n:1\r\n"
    b"$9\r\nfind_keys\r\n*4\r\n$4\r\ntype\r\n$5\r\nrange\r\n$4\r\nspec\r\n"
    b"*6\r\n$7\r\nlastkey\r\n:0\r\n$7\r\nkeystep\r\n:1\r\n$5\r\nlimit\r\n:0\r\n*0\r\n"
)


def test_command_count_info_docs(conn: Conn) -> None:
    """COMMAND COUNT, INFO and DOCS describe the command table in Redis 7's format."""
    count = len({c.name for c in COMMANDS.values()})
    assert conn.cmd("COMMAND", "COUNT") == b":%d\r\n" % count
    assert conn.cmd("COMMAND", "COUNT", "x") == (
        b"-ERR wrong number of arguments for 'command|count' command\r\n"
    )
    assert conn.cmd("COMMAND", "INFO", "get") == b"*1\r\n" + GET_INFO
    assert conn.cmd("COMMAND", "INFO", "GET", "nosuch") == b"*2\r\n" + GET_INFO + NIL
    everything = conn.value("COMMAND")
    assert len(everything) == count
    assert all(len(row) == 10 for row in everything)
    mset = conn.value("COMMAND", "INFO", "mset")[0]
    assert mset[:6] == [b"mset", -3, [b"write", b"denyoom"], 1, -1, 2]
    spec = dict(zip(mset[8][0][::2], mset[8][0][1::2]))
    assert spec[b"flags"] == [b"OW", b"update"]
    assert spec[b"find_keys"][3] == [b"lastkey", -1, b"keystep", 2, b"limit", 0]
    docs = conn.value("COMMAND", "DOCS", "get", "nosuch")
    assert docs[0] == b"get" and docs[1][0] == b"summary" and len(docs) == 2
    assert conn.value("COMMAND", "LIST") == [c.encode() for c in sorted_names()]
    assert conn.cmd("COMMAND", "FOO") == b"-ERR unknown subcommand 'FOO'. Try COMMAND HELP.\r\n"


def sorted_names() -> list[str]:
    seen: list[str] = []
    for c in COMMANDS.values():
        if c.name not in seen:
            seen.append(c.name)
    return seen


def test_info_sections(cluster: Cluster, conn: Conn) -> None:
    """INFO has Redis's section headers and fields; a section name picks only that section."""
    conn.cmd("MSET", "a", "1", "b", "2", "c", "3")
    text = conn.value("INFO").decode()
    for header in ["# Server", "# Clients", "# Stats", "# Keyspace"]:
        assert header in text
    assert "\r\nredis_version:7.0.0\r\n" in text
    assert "\r\nconnected_clients:1\r\n" in text
    assert "\r\ndb0:keys=3,expires=0,avg_ttl=0\r\n" in text
    assert "data_nodes_up:3" in text
    server = conn.value("INFO", "server").decode()
    assert server.startswith("# Server\r\n") and "# Clients" not in server
    assert conn.value("INFO", "keyspace") == b"# Keyspace\r\ndb0:keys=3,expires=0,avg_ttl=0\r\n"
    conn.cmd("FLUSHALL")
    assert conn.value("INFO", "keyspace") == b"# Keyspace\r\n"
    both = conn.value("INFO", "clients", "stats").decode()
    assert "# Clients" in both and "# Stats" in both and "# Server" not in both


def test_dbsize_flushdb_flushall(conn: Conn) -> None:
    """DBSIZE counts live keys once (not per copy); FLUSHDB and FLUSHALL empty the keyspace."""
    assert conn.cmd("DBSIZE") == b":0\r\n"
    conn.cmd("MSET", *[x for i in range(20) for x in (f"k{i}", "v")])
    assert conn.cmd("DBSIZE") == b":20\r\n"
    assert conn.cmd("FLUSHDB") == OK
    assert conn.cmd("DBSIZE") == b":0\r\n"
    conn.cmd("SET", "a", "1")
    assert conn.cmd("FLUSHALL", "ASYNC") == OK
    assert conn.cmd("GET", "a") == NIL
    assert conn.cmd("FLUSHDB", "SYNC") == OK
    assert conn.cmd("FLUSHDB", "NOW") == SYNTAX


# Strings: GET and SET ---------------------------------------------------------------------------


def test_get_and_set_docs_example(conn: Conn) -> None:
    """SET mykey "Hello"; GET mykey is "Hello"; a missing key is nil."""
    assert conn.cmd("GET", "nonexisting") == NIL
    assert conn.cmd("SET", "mykey", "Hello") == OK
    assert conn.cmd("GET", "mykey") == bulk(b"Hello")
    assert conn.cmd("SET", "anotherkey", "will expire in a minute", "EX", "60") == OK
    assert conn.cmd("TTL", "anotherkey") == b":60\r\n"


def test_set_binary_and_empty_values(conn: Conn) -> None:
    """Keys and values are binary-safe: CR LF, NUL and the empty string round-trip."""
    value = b"\r\n\x00\xff\r\n"
    assert conn.cmd("SET", b"k\r\n\x00", value) == OK
    assert conn.cmd("GET", b"k\r\n\x00") == bulk(value)
    assert conn.cmd("SET", "", "") == OK
    assert conn.cmd("GET", "") == b"$0\r\n\r\n"


def test_set_expiry_options(cluster: Cluster, conn: Conn) -> None:
    """EX, PX, EXAT and PXAT set the expiry; the key is gone once it passes."""
    assert conn.cmd("SET", "ex", "v", "EX", "10") == OK
    assert conn.cmd("SET", "px", "v", "PX", "2500") == OK
    assert conn.cmd("SET", "exat", "v", "EXAT", NOW + 30) == OK
    assert conn.cmd("SET", "pxat", "v", "PXAT", NOW * 1000 + 40_000) == OK
    assert conn.cmd("TTL", "ex") == b":10\r\n"
    assert conn.cmd("PTTL", "px") == b":2500\r\n"
    assert conn.cmd("TTL", "exat") == b":30\r\n"
    assert conn.cmd("PTTL", "pxat") == b":40000\r\n"
    cluster.clock.advance(10)
    assert conn.cmd("GET", "ex") == NIL
    assert conn.cmd("GET", "exat") == bulk(b"v")
    assert conn.cmd("SET", "past", "v", "EXAT", "1") == OK
    assert conn.cmd("GET", "past") == NIL


def test_set_nx_xx(conn: Conn) -> None:
    """NX sets only a missing key, XX only an existing one; a refused SET is nil."""
    assert conn.cmd("SET", "k", "1", "XX") == NIL
    assert conn.cmd("GET", "k") == NIL
    assert conn.cmd("SET", "k", "1", "NX") == OK
    assert conn.cmd("SET", "k", "2", "NX") == NIL
    assert conn.cmd("GET", "k") == bulk(b"1")
    assert conn.cmd("SET", "k", "3", "XX") == OK
    assert conn.cmd("GET", "k") == bulk(b"3")
    assert conn.cmd("SET", "k", "4", "nx", "NX") == NIL  # repeating a flag is allowed


def test_set_keepttl(conn: Conn) -> None:
    """A plain SET clears the TTL; KEEPTTL keeps it."""
    conn.cmd("SET", "k", "v", "EX", "100")
    assert conn.cmd("SET", "k", "w", "KEEPTTL") == OK
    assert conn.cmd("TTL", "k") == b":100\r\n"
    assert conn.cmd("SET", "k", "x") == OK
    assert conn.cmd("TTL", "k") == b":-1\r\n"
    assert conn.cmd("SET", "new", "v", "KEEPTTL") == OK
    assert conn.cmd("TTL", "new") == b":-1\r\n"


def test_set_get_option(conn: Conn) -> None:
    """SET ... GET returns the old value (nil if none), also with NX and XX as in Redis 7."""
    assert conn.cmd("SET", "k", "1", "GET") == NIL
    assert conn.cmd("SET", "k", "2", "GET") == bulk(b"1")
    assert conn.cmd("SET", "k", "3", "NX", "GET") == bulk(b"2")  # refused: old value
    assert conn.cmd("GET", "k") == bulk(b"2")
    assert conn.cmd("SET", "k", "4", "XX", "GET") == bulk(b"2")
    assert conn.cmd("GET", "k") == bulk(b"4")
    assert conn.cmd("SET", "missing", "v", "XX", "GET") == NIL
    assert conn.cmd("GET", "missing") == NIL
    assert conn.cmd("SET", "k", "5", "GET", "EX", "50") == bulk(b"4")
    assert conn.cmd("TTL", "k") == b":50\r\n"


@pytest.mark.parametrize(
    ("options", "reply"),
    [
        (["NX", "XX"], SYNTAX),
        (["XX", "NX"], SYNTAX),
        (["EX", "10", "PX", "100"], SYNTAX),
        (["PX", "10", "EXAT", "100"], SYNTAX),
        (["KEEPTTL", "EX", "10"], SYNTAX),
        (["EX", "10", "KEEPTTL"], SYNTAX),
        (["EX"], SYNTAX),
        (["FOO"], SYNTAX),
        (["PERSIST"], SYNTAX),
        (["EX", "-1", "NX", "XX"], SYNTAX),  # the syntax is checked before the number
        (["EX", "0"], b"-ERR invalid expire time in 'set' command\r\n"),
        (["EX", "-5"], b"-ERR invalid expire time in 'set' command\r\n"),
        (["PX", "0"], b"-ERR invalid expire time in 'set' command\r\n"),
        (["EXAT", "0"], b"-ERR invalid expire time in 'set' command\r\n"),
        (["EX", "9223372036854775807"], b"-ERR invalid expire time in 'set' command\r\n"),
        (["PX", "9223372036854775807"], b"-ERR invalid expire time in 'set' command\r\n"),
        (["EX", "x"], NOT_INT),
        (["EX", "1.5"], NOT_INT),
        (["EX", "10", "EX", "0"], b"-ERR invalid expire time in 'set' command\r\n"),
    ],
)
def test_set_invalid_options(conn: Conn, options: list[str], reply: bytes) -> None:
    """Conflicting or malformed SET options are refused with Redis's error, and nothing is set."""
    assert conn.cmd("SET", "k", "v", *options) == reply
    assert conn.cmd("GET", "k") == NIL


def test_set_repeated_expire_last_wins(conn: Conn) -> None:
    """The same expire option twice is allowed and the last one counts, as in Redis."""
    assert conn.cmd("SET", "k", "v", "EX", "x", "EX", "20") == OK
    assert conn.cmd("TTL", "k") == b":20\r\n"


def test_setnx_docs_example(conn: Conn) -> None:
    """SETNX mykey "Hello" is 1, SETNX mykey "World" is 0, GET mykey is "Hello"."""
    assert conn.cmd("SETNX", "mykey", "Hello") == b":1\r\n"
    assert conn.cmd("SETNX", "mykey", "World") == b":0\r\n"
    assert conn.cmd("GET", "mykey") == bulk(b"Hello")


def test_setex_and_psetex_docs_examples(cluster: Cluster, conn: Conn) -> None:
    """SETEX mykey 10 "Hello" gives TTL 10; PSETEX mykey 1000 "Hello" gives PTTL 1000."""
    assert conn.cmd("SETEX", "mykey", "10", "Hello") == OK
    assert conn.cmd("TTL", "mykey") == b":10\r\n"
    assert conn.cmd("GET", "mykey") == bulk(b"Hello")
    assert conn.cmd("PSETEX", "pkey", "1000", "Hello") == OK
    assert conn.cmd("PTTL", "pkey") == b":1000\r\n"
    assert conn.cmd("GET", "pkey") == bulk(b"Hello")
    cluster.clock.advance(1)
    assert conn.cmd("GET", "pkey") == NIL
    assert conn.cmd("SETEX", "k", "0", "v") == b"-ERR invalid expire time in 'setex' command\r\n"
    assert conn.cmd("PSETEX", "k", "-1", "v") == (
        b"-ERR invalid expire time in 'psetex' command\r\n"
    )
    assert conn.cmd("SETEX", "k", "x", "v") == NOT_INT


def test_getset_docs_example(conn: Conn) -> None:
    """INCR mycounter; GETSET mycounter "0" is "1"; GET mycounter is "0"."""
    assert conn.cmd("INCR", "mycounter") == b":1\r\n"
    assert conn.cmd("GETSET", "mycounter", "0") == bulk(b"1")
    assert conn.cmd("GET", "mycounter") == bulk(b"0")
    assert conn.cmd("GETSET", "fresh", "x") == NIL


def test_getset_clears_ttl(conn: Conn) -> None:
    """GETSET, like SET, removes the key's TTL."""
    conn.cmd("SET", "k", "v", "EX", "100")
    conn.cmd("GETSET", "k", "w")
    assert conn.cmd("TTL", "k") == b":-1\r\n"


def test_getdel_docs_example(conn: Conn) -> None:
    """SET mykey "Hello"; GETDEL mykey is "Hello"; then GET mykey is nil."""
    conn.cmd("SET", "mykey", "Hello")
    assert conn.cmd("GETDEL", "mykey") == bulk(b"Hello")
    assert conn.cmd("GET", "mykey") == NIL
    assert conn.cmd("GETDEL", "mykey") == NIL


def test_getex_docs_example_and_options(cluster: Cluster, conn: Conn) -> None:
    """GETEX returns the value and sets (EX PX EXAT PXAT) or removes (PERSIST) the TTL."""
    conn.cmd("SET", "mykey", "Hello")
    assert conn.cmd("GETEX", "mykey") == bulk(b"Hello")
    assert conn.cmd("TTL", "mykey") == b":-1\r\n"
    assert conn.cmd("GETEX", "mykey", "EX", "60") == bulk(b"Hello")
    assert conn.cmd("TTL", "mykey") == b":60\r\n"
    assert conn.cmd("GETEX", "mykey", "PX", "1500") == bulk(b"Hello")
    assert conn.cmd("PTTL", "mykey") == b":1500\r\n"
    assert conn.cmd("GETEX", "mykey", "EXAT", NOW + 90) == bulk(b"Hello")
    assert conn.cmd("TTL", "mykey") == b":90\r\n"
    assert conn.cmd("GETEX", "mykey", "PXAT", NOW * 1000 + 5000) == bulk(b"Hello")
    assert conn.cmd("PTTL", "mykey") == b":5000\r\n"
    assert conn.cmd("GETEX", "mykey", "PERSIST") == bulk(b"Hello")
    assert conn.cmd("TTL", "mykey") == b":-1\r\n"
    assert conn.cmd("GETEX", "mykey", "EXAT", "1") == bulk(b"Hello")  # in the past: deleted
    assert conn.cmd("EXISTS", "mykey") == b":0\r\n"
    cluster.clock.advance(1)
    assert conn.cmd("GETEX", "nokey", "EX", "10") == NIL


def test_getex_errors(conn: Conn) -> None:
    """GETEX refuses bad options; like Redis it answers nil for a missing key before the time."""
    conn.cmd("SET", "k", "v")
    assert conn.cmd("GETEX", "k", "EX", "0") == b"-ERR invalid expire time in 'getex' command\r\n"
    assert conn.cmd("GETEX", "k", "EX", "x") == NOT_INT
    assert conn.cmd("GETEX", "k", "EX") == SYNTAX
    assert conn.cmd("GETEX", "k", "EX", "1", "PX", "1") == SYNTAX
    assert conn.cmd("GETEX", "k", "PERSIST", "EX", "1") == SYNTAX
    assert conn.cmd("GETEX", "k", "KEEPTTL") == SYNTAX
    assert conn.cmd("GETEX", "k", "NX") == SYNTAX
    assert conn.cmd("GETEX", "nokey", "EX", "-1") == NIL
    assert conn.cmd("GETEX", "nokey", "FOO") == SYNTAX
    assert conn.cmd("TTL", "k") == b":-1\r\n"


def test_mget_mset_docs_examples(conn: Conn) -> None:
    """MSET key1 "Hello" key2 "World"; MGET key1 key2 nonexisting is Hello, World, nil."""
    assert conn.cmd("MSET", "key1", "Hello", "key2", "World") == OK
    assert conn.cmd("MGET", "key1", "key2", "nonexisting") == (
        b"*3\r\n" + bulk(b"Hello") + bulk(b"World") + NIL
    )
    assert conn.cmd("MSET", "a") == b"-ERR wrong number of arguments for 'mset' command\r\n"
    assert conn.cmd("MSET", "a", "1", "b") == (
        b"-ERR wrong number of arguments for 'mset' command\r\n"
    )
    assert conn.cmd("MSET", "d", "1", "d", "2") == OK
    assert conn.cmd("GET", "d") == bulk(b"2")


def test_mset_sends_one_request_per_data_node(cluster: Cluster, conn: Conn) -> None:
    keys = [f"key{i}" for i in range(30)]
    args: list[str] = []
    for i, k in enumerate(keys):
        args += [k, f"v{i}"]
    assert conn.cmd("MSET", *args) == OK
    for client in cluster.clients.values():
        assert client.calls.get("apply_many") == 1
        assert client.calls.get("apply", 0) == 0
    for i, k in enumerate(keys):
        for node_id in copy_ids(cluster, k.encode()):
            assert cluster.nodes[node_id].store.get(P, k.encode()).value == f"v{i}".encode()


def test_mset_cuts_large_values_into_several_requests_per_node(
    cluster: Cluster, conn: Conn
) -> None:
    """No ApplyMany grows past APPLY_MANY_BYTES, which any data node's frame limit allows."""
    from kvha.master.router import APPLY_MANY_BYTES

    big = b"x" * (APPLY_MANY_BYTES // 3)
    keys = [f"big{i}" for i in range(12)]
    assert conn.cmd("MSET", *[x for k in keys for x in (k, big)]) == OK
    sizes = []
    for node_id, client in cluster.clients.items():
        held = sum(1 for k in keys if node_id in copy_ids(cluster, k.encode()))
        # two records a request (a third would pass the limit), so about held / 2 requests
        assert client.calls.get("apply_many", 0) == (held + 1) // 2, (node_id, held)
        sizes.append(held)
    assert sum(sizes) == 24
    huge = b"y" * (APPLY_MANY_BYTES + 10)  # larger than the limit: alone, like an Apply
    assert conn.cmd("MSET", "h1", huge, "h2", huge, "small", "1") == OK
    assert conn.cmd("GET", "h2") == bulk(huge)


def test_mset_survives_a_copy_lost_in_flight_and_fails_without_enough_copies(
    cluster: Cluster, conn: Conn
) -> None:
    """write_acks all: a copy that goes down during the write is skipped (merge repairs it);
    with every copy of a key down, MSET fails, and says why."""
    cluster.clients["data1"].hold()
    assert conn.send(encode("MSET", *[x for i in range(20) for x in (f"k{i}", "v")])) == b""
    cluster.kill("data1")
    assert conn.take() == OK
    on_data1 = next(k for k in (b"k%d" % i for i in range(20)) if "data1" in copy_ids(cluster, k))
    other = next(i for i in copy_ids(cluster, on_data1) if i != "data1")
    cluster.kill(other)
    reply = conn.cmd("MSET", "x", "1", on_data1, "2")
    assert reply.startswith(b"-ERR") and b"live copies" in reply


def test_msetnx_is_all_or_nothing(conn: Conn) -> None:
    """MSETNX key1 Hello key2 there is 1; MSETNX key2 new key3 world is 0 and sets nothing."""
    assert conn.cmd("MSETNX", "key1", "Hello", "key2", "there") == b":1\r\n"
    assert conn.cmd("MSETNX", "key2", "new", "key3", "world") == b":0\r\n"
    assert conn.cmd("MGET", "key1", "key2", "key3") == (
        b"*3\r\n" + bulk(b"Hello") + bulk(b"there") + NIL
    )
    assert conn.cmd("MSETNX", "a", "1", "b") == (
        b"-ERR wrong number of arguments for 'msetnx' command\r\n"
    )


def test_msetnx_repeated_key_sets_the_last_value(conn: Conn) -> None:
    """A key given twice to MSETNX is set once, to its last value, as Redis does."""
    assert conn.cmd("MSETNX", "a", "1", "b", "2", "a", "3") == b":1\r\n"
    assert conn.cmd("MGET", "a", "b") == b"*2\r\n" + bulk(b"3") + bulk(b"2")


def test_msetnx_undoes_its_writes_if_a_key_appears() -> None:
    """If a key is created between MSETNX's check and its write, the keys it created are removed."""
    probe = Cluster(n=3, replicas=1)
    primary = copy_ids(probe, b"late")[0]
    probe.stop()
    # Reads never go to the primary of "late", so its check passes while its create waits.
    weights = [0.0 if f"data{i + 1}" == primary else 1.0 for i in range(3)]
    cluster = Cluster(n=3, replicas=1, read_weights=weights)
    try:
        conn = Conn(cluster.resp_factory())
        cluster.clients[primary].hold()
        assert conn.cmd("MSETNX", "early", "1", "late", "2") == b""
        # Another writer gets there first.
        cluster.nodes[primary].store.set(P, b"late", b"theirs")
        cluster.clients[primary].release()
        assert conn.take() == b":0\r\n"
        assert conn.cmd("GET", "early") == NIL
        assert cluster.nodes[primary].store.get(P, b"late").value == b"theirs"
    finally:
        cluster.stop()


def test_del_unlink_docs_example(conn: Conn) -> None:
    """SET key1 "Hello"; SET key2 "World"; DEL key1 key2 key3 is 2; UNLINK works alike."""
    conn.cmd("SET", "key1", "Hello")
    conn.cmd("SET", "key2", "World")
    assert conn.cmd("DEL", "key1", "key2", "key3") == b":2\r\n"
    assert conn.cmd("MGET", "key1", "key2") == b"*2\r\n" + NIL + NIL
    conn.cmd("MSET", "a", "1", "b", "2")
    assert conn.cmd("UNLINK", "a", "b", "c") == b":2\r\n"
    assert conn.cmd("EXISTS", "a", "b") == b":0\r\n"
    assert conn.cmd("DEL") == b"-ERR wrong number of arguments for 'del' command\r\n"


def test_del_counts_a_repeated_key_once(conn: Conn) -> None:
    """DEL a a removes one key and answers 1."""
    conn.cmd("SET", "a", "1")
    assert conn.cmd("DEL", "a", "a") == b":1\r\n"


def test_exists_docs_example_counts_duplicates(conn: Conn) -> None:
    """EXISTS counts every argument that exists, so a repeated key counts each time."""
    conn.cmd("SET", "key1", "Hello")
    assert conn.cmd("EXISTS", "key1") == b":1\r\n"
    assert conn.cmd("EXISTS", "nosuchkey") == b":0\r\n"
    conn.cmd("SET", "key2", "World")
    assert conn.cmd("EXISTS", "key1", "key2", "nosuchkey") == b":2\r\n"
    assert conn.cmd("EXISTS", "key1", "key1", "key1") == b":3\r\n"


def test_type(conn: Conn) -> None:
    """TYPE is string for a key and none for a missing one."""
    conn.cmd("SET", "key1", "value")
    assert conn.cmd("TYPE", "key1") == b"+string\r\n"
    assert conn.cmd("TYPE", "nokey") == b"+none\r\n"


# Expiry ----------------------------------------------------------------------------------------


def test_expire_docs_example(conn: Conn) -> None:
    """The EXPIRE docs example: NX and XX against a key without, then with, a TTL."""
    assert conn.cmd("SET", "mykey", "Hello") == OK
    assert conn.cmd("EXPIRE", "mykey", "10") == b":1\r\n"
    assert conn.cmd("TTL", "mykey") == b":10\r\n"
    assert conn.cmd("SET", "mykey", "Hello World") == OK
    assert conn.cmd("TTL", "mykey") == b":-1\r\n"
    assert conn.cmd("EXPIRE", "mykey", "10", "XX") == b":0\r\n"
    assert conn.cmd("TTL", "mykey") == b":-1\r\n"
    assert conn.cmd("EXPIRE", "mykey", "10", "NX") == b":1\r\n"
    assert conn.cmd("TTL", "mykey") == b":10\r\n"
    assert conn.cmd("EXPIRE", "nokey", "10") == b":0\r\n"


def test_expire_gt_lt(conn: Conn) -> None:
    """GT sets only a later expiry, LT only an earlier one; no TTL counts as infinite."""
    conn.cmd("SET", "k", "v")
    assert conn.cmd("EXPIRE", "k", "100", "GT") == b":0\r\n"  # infinite > 100
    assert conn.cmd("EXPIRE", "k", "100", "LT") == b":1\r\n"
    assert conn.cmd("EXPIRE", "k", "50", "GT") == b":0\r\n"
    assert conn.cmd("EXPIRE", "k", "200", "GT") == b":1\r\n"
    assert conn.cmd("TTL", "k") == b":200\r\n"
    assert conn.cmd("EXPIRE", "k", "500", "LT") == b":0\r\n"
    assert conn.cmd("EXPIRE", "k", "50", "LT") == b":1\r\n"
    assert conn.cmd("TTL", "k") == b":50\r\n"
    assert conn.cmd("EXPIRE", "k", "60", "XX", "GT") == b":1\r\n"
    assert conn.cmd("TTL", "k") == b":60\r\n"


def test_expire_option_errors(conn: Conn) -> None:
    """Incompatible or unknown EXPIRE options are refused with Redis's words."""
    conn.cmd("SET", "k", "v")
    assert conn.cmd("EXPIRE", "k", "10", "NX", "XX") == (
        b"-ERR NX and XX, GT or LT options at the same time are not compatible\r\n"
    )
    assert conn.cmd("EXPIRE", "k", "10", "GT", "LT") == (
        b"-ERR GT and LT options at the same time are not compatible\r\n"
    )
    assert conn.cmd("EXPIRE", "k", "10", "FOO") == b"-ERR Unsupported option FOO\r\n"
    assert conn.cmd("EXPIRE", "k", "x") == NOT_INT
    assert conn.cmd("EXPIRE", "k", "9223372036854775807") == (
        b"-ERR invalid expire time in 'expire' command\r\n"
    )
    assert conn.cmd("EXPIRE", "k") == b"-ERR wrong number of arguments for 'expire' command\r\n"
    assert conn.cmd("TTL", "k") == b":-1\r\n"


def test_expire_in_the_past_deletes(conn: Conn) -> None:
    """A zero, negative or past expiry deletes the key at once and answers 1."""
    for args in [("EXPIRE", "0"), ("EXPIRE", "-5"), ("PEXPIRE", "-1"), ("EXPIREAT", "1")]:
        conn.cmd("SET", "k", "v")
        assert conn.cmd(args[0], "k", args[1]) == b":1\r\n"
        assert conn.cmd("EXISTS", "k") == b":0\r\n"


def test_pexpire_docs_example(cluster: Cluster, conn: Conn) -> None:
    """SET mykey "Hello"; PEXPIRE mykey 1500 is 1; a moment later TTL is 1 and PTTL 1499."""
    conn.cmd("SET", "mykey", "Hello")
    assert conn.cmd("PEXPIRE", "mykey", "1500") == b":1\r\n"
    cluster.clock.advance(0.001)
    assert conn.cmd("TTL", "mykey") == b":1\r\n"
    assert conn.cmd("PTTL", "mykey") == b":1499\r\n"


def test_expireat_docs_example(conn: Conn) -> None:
    """SET mykey "Hello"; EXISTS is 1; EXPIREAT mykey 1293840000 (the past) is 1; EXISTS is 0."""
    conn.cmd("SET", "mykey", "Hello")
    assert conn.cmd("EXISTS", "mykey") == b":1\r\n"
    assert conn.cmd("EXPIREAT", "mykey", "1293840000") == b":1\r\n"
    assert conn.cmd("EXISTS", "mykey") == b":0\r\n"
    conn.cmd("SET", "mykey", "Hello")
    assert conn.cmd("EXPIREAT", "mykey", NOW + 100) == b":1\r\n"
    assert conn.cmd("TTL", "mykey") == b":100\r\n"


def test_pexpireat_docs_example(conn: Conn) -> None:
    """PEXPIREAT mykey 1555555555005 (the past) is 1; then TTL and PTTL are -2."""
    conn.cmd("SET", "mykey", "Hello")
    assert conn.cmd("PEXPIREAT", "mykey", "1555555555005") == b":1\r\n"
    assert conn.cmd("TTL", "mykey") == b":-2\r\n"
    assert conn.cmd("PTTL", "mykey") == b":-2\r\n"
    conn.cmd("SET", "mykey", "Hello")
    assert conn.cmd("PEXPIREAT", "mykey", NOW * 1000 + 2500) == b":1\r\n"
    assert conn.cmd("PTTL", "mykey") == b":2500\r\n"


def test_ttl_and_pttl(cluster: Cluster, conn: Conn) -> None:
    """TTL and PTTL are -2 for a missing key, -1 without expiry, else the time left."""
    assert conn.cmd("TTL", "k") == b":-2\r\n"
    assert conn.cmd("PTTL", "k") == b":-2\r\n"
    conn.cmd("SET", "k", "v")
    assert conn.cmd("TTL", "k") == b":-1\r\n"
    assert conn.cmd("PTTL", "k") == b":-1\r\n"
    conn.cmd("EXPIRE", "k", "10")
    cluster.clock.advance(2.5)
    assert conn.cmd("PTTL", "k") == b":7500\r\n"
    assert conn.cmd("TTL", "k") == b":8\r\n"  # rounded, as Redis does
    cluster.clock.advance(7.5)
    assert conn.cmd("TTL", "k") == b":-2\r\n"


def test_persist_docs_example(conn: Conn) -> None:
    """SET mykey "Hello"; EXPIRE mykey 10; TTL 10; PERSIST is 1; TTL -1; PERSIST again is 0."""
    conn.cmd("SET", "mykey", "Hello")
    assert conn.cmd("EXPIRE", "mykey", "10") == b":1\r\n"
    assert conn.cmd("TTL", "mykey") == b":10\r\n"
    assert conn.cmd("PERSIST", "mykey") == b":1\r\n"
    assert conn.cmd("TTL", "mykey") == b":-1\r\n"
    assert conn.cmd("PERSIST", "mykey") == b":0\r\n"
    assert conn.cmd("PERSIST", "nokey") == b":0\r\n"


# Counters ----------------------------------------------------------------------------------------


def test_incr_decr_docs_examples(conn: Conn) -> None:
    """SET mykey "10"; INCR is 11; DECR of a 30-digit number is not an integer."""
    conn.cmd("SET", "mykey", "10")
    assert conn.cmd("INCR", "mykey") == b":11\r\n"
    assert conn.cmd("GET", "mykey") == bulk(b"11")
    conn.cmd("SET", "mykey", "10")
    assert conn.cmd("DECR", "mykey") == b":9\r\n"
    conn.cmd("SET", "mykey", "234293482390480948029348230948")
    assert conn.cmd("DECR", "mykey") == NOT_INT
    assert conn.cmd("INCR", "fresh") == b":1\r\n"
    assert conn.cmd("DECR", "fresh2") == b":-1\r\n"


def test_incrby_decrby_docs_examples(conn: Conn) -> None:
    """SET mykey "10"; INCRBY mykey 5 is 15; DECRBY mykey 3 is 12."""
    conn.cmd("SET", "mykey", "10")
    assert conn.cmd("INCRBY", "mykey", "5") == b":15\r\n"
    assert conn.cmd("DECRBY", "mykey", "3") == b":12\r\n"
    assert conn.cmd("INCRBY", "mykey", "-20") == b":-8\r\n"


def test_incr_keeps_the_ttl(conn: Conn) -> None:
    """INCR changes the value and keeps the key's TTL, as Redis does."""
    conn.cmd("SET", "n", "1", "EX", "100")
    conn.cmd("INCR", "n")
    assert conn.cmd("TTL", "n") == b":100\r\n"


@pytest.mark.parametrize(
    ("start", "command", "reply"),
    [
        (b"9223372036854775807", ("INCR",), b"-ERR increment or decrement would overflow\r\n"),
        (b"-9223372036854775808", ("DECR",), b"-ERR increment or decrement would overflow\r\n"),
        (
            b"1",
            ("INCRBY", "9223372036854775807"),
            b"-ERR increment or decrement would overflow\r\n",
        ),
        (b"0", ("DECRBY", "-9223372036854775808"), b"-ERR decrement would overflow\r\n"),
        (b"0", ("INCRBY", "9223372036854775808"), NOT_INT),
        (b"0", ("INCRBY", "1.0"), NOT_INT),
        (b"0", ("INCRBY", "x"), NOT_INT),
        (b"x", ("INCR",), NOT_INT),
        (b" 1", ("INCR",), NOT_INT),
        (b"01", ("INCR",), NOT_INT),
        (b"+1", ("INCR",), NOT_INT),
        (b"1.5", ("INCR",), NOT_INT),
        (b"", ("INCR",), NOT_INT),
    ],
)
def test_incr_errors(conn: Conn, start: bytes, command: tuple[str, ...], reply: bytes) -> None:
    """Overflow and non-integers are refused with Redis's words and leave the value alone."""
    conn.cmd("SET", "n", start)
    assert conn.cmd(command[0], "n", *command[1:]) == reply
    assert conn.cmd("GET", "n") == bulk(start)


def test_incrbyfloat_docs_example(conn: Conn) -> None:
    """10.50 + 0.1 is "10.6", then -5 is "5.6"; 5.0e3 + 2.0e2 is "5200"."""
    conn.cmd("SET", "mykey", "10.50")
    assert conn.cmd("INCRBYFLOAT", "mykey", "0.1") == bulk(b"10.6")
    assert conn.cmd("INCRBYFLOAT", "mykey", "-5") == bulk(b"5.6")
    conn.cmd("SET", "mykey", "5.0e3")
    assert conn.cmd("INCRBYFLOAT", "mykey", "2.0e2") == bulk(b"5200")
    assert conn.cmd("GET", "mykey") == bulk(b"5200")
    assert conn.cmd("INCRBYFLOAT", "fresh", "3") == bulk(b"3")


def test_incrbyfloat_errors(conn: Conn) -> None:
    """A non-float value or increment, and infinity, are refused as in Redis."""
    conn.cmd("SET", "s", "abc")
    assert conn.cmd("INCRBYFLOAT", "s", "1") == b"-ERR value is not a valid float\r\n"
    assert conn.cmd("INCRBYFLOAT", "n", "x") == b"-ERR value is not a valid float\r\n"
    assert conn.cmd("INCRBYFLOAT", "n", " 1") == b"-ERR value is not a valid float\r\n"
    assert conn.cmd("INCRBYFLOAT", "n", "inf") == (
        b"-ERR increment would produce NaN or Infinity\r\n"
    )
    assert conn.cmd("GET", "n") == NIL


# Ranges and APPEND ------------------------------------------------------------------------------


def test_append_docs_example(conn: Conn) -> None:
    """EXISTS mykey 0; APPEND "Hello" is 5; APPEND " World" is 11; GET is "Hello World"."""
    assert conn.cmd("EXISTS", "mykey") == b":0\r\n"
    assert conn.cmd("APPEND", "mykey", "Hello") == b":5\r\n"
    assert conn.cmd("APPEND", "mykey", " World") == b":11\r\n"
    assert conn.cmd("GET", "mykey") == bulk(b"Hello World")


def test_append_keeps_ttl(conn: Conn) -> None:
    """APPEND keeps the key's TTL."""
    conn.cmd("SET", "k", "a", "EX", "100")
    conn.cmd("APPEND", "k", "b")
    assert conn.cmd("TTL", "k") == b":100\r\n"


def test_strlen_docs_example(conn: Conn) -> None:
    """SET mykey "Hello world"; STRLEN is 11; STRLEN nonexisting is 0."""
    conn.cmd("SET", "mykey", "Hello world")
    assert conn.cmd("STRLEN", "mykey") == b":11\r\n"
    assert conn.cmd("STRLEN", "nonexisting") == b":0\r\n"


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        # The GETRANGE documentation's examples.
        (0, 3, b"This"),
        (-3, -1, b"ing"),
        (0, -1, b"This is a string"),
        (10, 100, b"string"),
        # Edges, as redis-server 7 answers them.
        (5, 2, b""),
        (-1, -5, b""),
        (100, 200, b""),
        (-100, 2, b"Thi"),
        (-100, -50, b"T"),  # Redis 7 clamps an end before the string to 0
        (0, -100, b"T"),
        (15, 15, b"g"),
        (16, 16, b""),
    ],
)
def test_getrange(conn: Conn, start: int, end: int, expected: bytes) -> None:
    """GETRANGE on "This is a string" counts negative indexes from the end and clamps."""
    conn.cmd("SET", "mykey", "This is a string")
    assert conn.cmd("GETRANGE", "mykey", start, end) == bulk(expected)


def test_getrange_missing_key_and_errors(conn: Conn) -> None:
    """GETRANGE of a missing key is the empty string; SUBSTR is its old name."""
    assert conn.cmd("GETRANGE", "nokey", "0", "-1") == b"$0\r\n\r\n"
    conn.cmd("SET", "k", "abc")
    assert conn.cmd("SUBSTR", "k", "0", "1") == bulk(b"ab")
    assert conn.cmd("GETRANGE", "k", "x", "1") == NOT_INT


def test_setrange_docs_examples(conn: Conn) -> None:
    """SETRANGE key1 6 Redis makes "Hello World" "Hello Redis"; a missing key is zero-padded."""
    conn.cmd("SET", "key1", "Hello World")
    assert conn.cmd("SETRANGE", "key1", "6", "Redis") == b":11\r\n"
    assert conn.cmd("GET", "key1") == bulk(b"Hello Redis")
    assert conn.cmd("SETRANGE", "key2", "6", "Redis") == b":11\r\n"
    assert conn.cmd("GET", "key2") == bulk(b"\x00\x00\x00\x00\x00\x00Redis")


def test_setrange_edges(conn: Conn) -> None:
    """An empty patch changes nothing and answers the length; a negative offset is refused."""
    assert conn.cmd("SETRANGE", "k", "5", "") == b":0\r\n"
    assert conn.cmd("EXISTS", "k") == b":0\r\n"
    conn.cmd("SET", "k", "abc", "EX", "100")
    assert conn.cmd("SETRANGE", "k", "10", "") == b":3\r\n"
    assert conn.cmd("SETRANGE", "k", "1", "XYZ") == b":4\r\n"
    assert conn.cmd("GET", "k") == bulk(b"aXYZ")
    assert conn.cmd("TTL", "k") == b":100\r\n"
    assert conn.cmd("SETRANGE", "k", "-1", "x") == b"-ERR offset is out of range\r\n"
    assert conn.cmd("SETRANGE", "k", "536870912", "x") == (
        b"-ERR string exceeds maximum allowed size (proto-max-bulk-len)\r\n"
    )


# KEYS and SCAN ---------------------------------------------------------------------------------


def test_keys_docs_example(conn: Conn) -> None:
    """MSET firstname Jack lastname Stuntman age 35; KEYS *name*, a?? and * as in the docs."""
    conn.cmd("MSET", "firstname", "Jack", "lastname", "Stuntman", "age", "35")
    assert sorted(conn.value("KEYS", "*name*")) == [b"firstname", b"lastname"]
    assert conn.value("KEYS", "a??") == [b"age"]
    assert sorted(conn.value("KEYS", "*")) == [b"age", b"firstname", b"lastname"]


def test_keys_and_scan_star_include_the_empty_key(conn: Conn) -> None:
    """KEYS * and SCAN MATCH * list every key, the empty key too, as Redis does."""
    conn.cmd("MSET", "", "empty", "a", "1")
    assert sorted(conn.value("KEYS", "*")) == [b"", b"a"]
    assert sorted(conn.value("SCAN", "0", "MATCH", "*", "COUNT", "100")[1]) == [b"", b"a"]
    assert conn.value("KEYS", "?") == [b"a"]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("h?llo", ["hallo", "hbllo", "hello", "hxllo"]),
        ("h*llo", ["hallo", "hbllo", "heeeello", "hello", "hllo", "hxllo"]),
        ("h[ae]llo", ["hallo", "hello"]),
        ("h[^e]llo", ["hallo", "hbllo", "hxllo"]),
        ("h[a-b]llo", ["hallo", "hbllo"]),
        ("h\\*llo", []),
        ("nomatch*", []),
    ],
)
def test_keys_glob_patterns(conn: Conn, pattern: str, expected: list[str]) -> None:
    """The KEYS documentation's glob patterns match what Redis says they match."""
    conn.cmd(
        "MSET",
        *[x for k in ["hello", "hallo", "hxllo", "hllo", "heeeello", "hbllo"] for x in (k, "1")],
    )
    assert sorted(conn.value("KEYS", pattern)) == [e.encode() for e in expected]


def test_scan_returns_every_key_once_while_keys_are_added(conn: Conn) -> None:
    """A full SCAN returns each key present throughout exactly once, with writes between pages."""
    original = {b"key:%d" % i for i in range(300)}
    conn.cmd("MSET", *[x for k in sorted(original) for x in (k, b"v")])
    seen: list[bytes] = []
    cursor = b"0"
    pages = 0
    added = 0
    while True:
        cursor, keys = conn.value("SCAN", cursor, "COUNT", "10")
        seen += keys
        pages += 1
        conn.cmd("SET", b"new:%d" % added, "v")
        added += 1
        if cursor == b"0":
            break
        assert pages < 1000
    assert len(seen) == len(set(seen)), "a key came back twice"
    assert original <= set(seen)
    assert set(seen) <= original | {b"new:%d" % i for i in range(added)}
    assert pages > 10


def test_scan_match_count_type(conn: Conn) -> None:
    """MATCH filters each page, COUNT sizes it, TYPE string keeps all and other types none."""
    conn.cmd("MSET", *[x for i in range(50) for x in (f"user:{i}", "v", f"item:{i}", "v")])
    found: set[bytes] = set()
    cursor = b"0"
    while True:
        cursor, keys = conn.value("SCAN", cursor, "MATCH", "user:*", "COUNT", "1000")
        found |= set(keys)
        if cursor == b"0":
            break
    assert found == {b"user:%d" % i for i in range(50)}
    cursor, keys = conn.value("SCAN", "0", "COUNT", "5")
    assert len(keys) == 5 and cursor != b"0"
    assert conn.value("SCAN", "0", "COUNT", "1000", "TYPE", "string")[1].__len__() == 100
    assert conn.cmd("SCAN", "0", "TYPE", "list") == b"*2\r\n$1\r\n0\r\n*0\r\n"


def test_scan_errors(conn: Conn) -> None:
    """A cursor that is not a number is invalid; COUNT must be a positive integer."""
    assert conn.cmd("SCAN", "x") == b"-ERR invalid cursor\r\n"
    assert conn.cmd("SCAN", " 1") == b"-ERR invalid cursor\r\n"
    assert conn.cmd("SCAN", "18446744073709551616") == b"-ERR invalid cursor\r\n"
    assert conn.cmd("SCAN", "0", "COUNT", "0") == SYNTAX
    assert conn.cmd("SCAN", "0", "COUNT", "x") == NOT_INT
    assert conn.cmd("SCAN", "0", "MATCH") == SYNTAX
    assert conn.cmd("SCAN", "0", "FOO", "1") == SYNTAX
    assert conn.cmd("SCAN", "-1") == b"*2\r\n$1\r\n0\r\n*0\r\n"  # strtoul: wraps to the end


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        (b"*", b"", False),  # as stringmatchlen; KEYS * and MATCH * do not call it
        (b"*", b"anything", True),
        (b"a*", b"a", True),
        (b"a*b", b"axxb", True),
        (b"a*b", b"axxc", False),
        (b"a**b", b"ab", True),
        (b"?", b"", False),
        (b"h?llo", b"hello", True),
        (b"h?llo", b"hllo", False),
        (b"h[ae]llo", b"hello", True),
        (b"h[ae]llo", b"hillo", False),
        (b"h[^e]llo", b"hello", False),
        (b"h[^e]llo", b"hallo", True),
        (b"h[a-b]llo", b"hbllo", True),
        (b"h[b-a]llo", b"hallo", True),  # a reversed range is swapped
        (b"h[a-b]llo", b"hcllo", False),
        (b"h\\*llo", b"h*llo", True),
        (b"h\\*llo", b"hello", False),
        (b"h\\?llo", b"h?llo", True),
        (b"h\\?llo", b"hallo", False),
        (b"h[\\]]llo", b"h]llo", True),
        (b"h[\\^]llo", b"h^llo", True),
        (b"h[\\-a]llo", b"h-llo", True),
        (b"\\\\", b"\\", True),
        (b"a\\", b"a\\", True),  # a trailing backslash is literal
        (b"h[a-]llo", b"hallo", False),  # Redis reads "a-]" as a range, leaving the class open
        (b"h[", b"h[", False),
        (b"[", b"a", False),
        (b"*llo*", b"hello world", True),
        (b"a*a*a*a*a*a*a*a*a*b", b"a" * 60, False),  # no exponential backtracking
    ],
)
def test_glob_match(pattern: bytes, key: bytes, matches: bool) -> None:
    """glob_match is Redis's stringmatchlen: classes, ranges, negation and backslash escapes."""
    assert glob_match(pattern, key) is matches


# Errors -----------------------------------------------------------------------------------------


def test_wrong_arity(conn: Conn) -> None:
    """A command with the wrong number of arguments is refused naming it in lower case."""
    assert conn.cmd("GET") == b"-ERR wrong number of arguments for 'get' command\r\n"
    assert conn.cmd("GET", "a", "b") == b"-ERR wrong number of arguments for 'get' command\r\n"
    assert conn.cmd("SET", "a") == b"-ERR wrong number of arguments for 'set' command\r\n"
    assert conn.cmd("MGET") == b"-ERR wrong number of arguments for 'mget' command\r\n"
    assert not conn.closed


def test_unknown_command_keeps_the_connection(conn: Conn) -> None:
    """An unknown command is an error quoting its arguments (and a trailing space), nothing more."""
    assert conn.cmd("foo", "a", "b") == (
        b"-ERR unknown command 'foo', with args beginning with: 'a' 'b' \r\n"
    )
    assert conn.cmd("FOO") == b"-ERR unknown command 'FOO', with args beginning with: \r\n"
    assert not conn.closed
    assert conn.cmd("PING") == b"+PONG\r\n"


def test_quit_replies_ok_and_closes(conn: Conn) -> None:
    """QUIT answers +OK once earlier replies are out, closes, and ignores what follows."""
    assert conn.send(encode("SET", "a", "1") + encode("QUIT") + encode("SET", "b", "2")) == (
        OK + OK
    )
    assert conn.closed
    other = Conn(conn.proto.factory)
    assert other.cmd("MGET", "a", "b") == b"*2\r\n" + bulk(b"1") + NIL


# Pipelining and limits ---------------------------------------------------------------------------


def test_pipelined_commands_answered_in_order(conn: Conn) -> None:
    """Many commands in one write are answered in the order sent."""
    stream = b"".join(
        [
            encode("SET", "a", "1"),
            encode("INCR", "a"),
            encode("GET", "a"),
            encode("APPEND", "a", "x"),
            encode("GET", "a"),
            encode("EXISTS", "a", "b"),
            encode("DEL", "a"),
            encode("GET", "a"),
            encode("PING"),
        ]
    )
    assert (
        conn.send(stream)
        == (OK + b":2\r\n" + bulk(b"2") + b":2\r\n" + bulk(b"2x") + b":1\r\n" + b":1\r\n" + NIL)
        + b"+PONG\r\n"
    )


def test_pipelined_replies_wait_for_a_held_node(cluster: Cluster, conn: Conn) -> None:
    """A reply held up by a slow node holds back the later replies, which then leave in order."""
    held = "data1"
    slow = next(k for k in (b"k%d" % i for i in range(100)) if held in copy_ids(cluster, k))
    fast = next(k for k in (b"f%d" % i for i in range(100)) if held not in copy_ids(cluster, k))
    cluster.clients[held].hold()
    out = conn.send(encode("SET", slow, "1") + encode("SET", fast, "2") + encode("GET", fast))
    assert out == b""
    other_copy = copy_ids(cluster, fast)[0]
    assert cluster.nodes[other_copy].store.get(P, fast).value == b"2"  # done, but waiting its turn
    cluster.clients[held].release()
    assert conn.take() == OK + OK + bulk(b"2")


def test_read_your_writes_on_one_connection(cluster: Cluster, conn: Conn) -> None:
    """A GET after a SET of the same key sees the SET, even while a copy is slow.

    A plain SET is one round trip sent to every copy ahead of the GET on the
    same ordered connections, so the GET is pipelined right behind it.
    """
    conn.cmd("SET", "k", "old")
    ids = copy_ids(cluster, b"k")
    cluster.clients[ids[1]].hold()
    assert conn.send(encode("SET", "k", "new") + encode("GET", "k") + encode("INCR", "n")) == b""
    cluster.clients[ids[1]].release()
    assert conn.take() == OK + bulk(b"new") + b":1\r\n"


def test_reads_wait_behind_multi_step_operations(cluster: Cluster, conn: Conn) -> None:
    """A GET after an INCR of the same key is not sent until the INCR is replicated."""
    conn.cmd("SET", "n", "1")
    ids = copy_ids(cluster, b"n")
    primary = cluster.clients[ids[0]]
    primary.hold()
    reads_before = {i: cluster.clients[i].calls.get("get", 0) for i in ids}
    assert conn.send(encode("INCR", "n") + encode("GET", "n")) == b""
    assert {i: cluster.clients[i].calls.get("get", 0) for i in ids} == reads_before
    primary.release()
    assert conn.take() == b":2\r\n" + bulk(b"2")


def test_pipelined_incrs_on_one_key_reach_the_primary_without_waiting(
    cluster: Cluster, conn: Conn
) -> None:
    """INCRs are decided at the primary in the order sent, so they are not held back.

    Each one's replication to the other copy is still outstanding when the
    next is sent; the replies leave in order once the copy answers.
    """
    ids = copy_ids(cluster, b"n")
    primary, replica = cluster.clients[ids[0]], cluster.clients[ids[1]]
    replica.hold()
    assert conn.send(b"".join(encode("INCR", "n") for _ in range(5))) == b""
    assert primary.calls["incr"] == 5
    assert cluster.nodes[ids[0]].store.get(P, b"n").value == b"5"
    replica.release()
    assert conn.take() == b"".join(b":%d\r\n" % i for i in range(1, 6))
    assert cluster.nodes[ids[1]].store.get(P, b"n").value == b"5"


def test_a_read_after_pipelined_incrs_waits_for_them(cluster: Cluster, conn: Conn) -> None:
    ids = copy_ids(cluster, b"n")
    replica = cluster.clients[ids[1]]
    replica.hold()
    gets = {i: cluster.clients[i].calls.get("get", 0) for i in ids}
    assert conn.send(encode("INCR", "n") + encode("INCRBY", "n", "10") + encode("GET", "n")) == b""
    assert {i: cluster.clients[i].calls.get("get", 0) for i in ids} == gets
    replica.release()
    assert conn.take() == b":1\r\n:11\r\n" + bulk(b"11")


def test_an_incr_lost_with_its_primary_answers_an_error_and_frees_the_key(
    cluster: Cluster, conn: Conn
) -> None:
    ids = copy_ids(cluster, b"n")
    cluster.clients[ids[0]].hold()
    assert conn.send(encode("INCR", "n") + encode("GET", "n")) == b""
    cluster.kill(ids[0])
    out = conn.take()
    assert out.startswith(b"-ERR ") and out.endswith(NIL)  # the GET ran after it, on the copy
    assert conn.cmd("INCR", "n") == b":1\r\n"  # the copy is the primary now


def test_an_incr_is_not_sent_ahead_of_a_write_waiting_for_an_earlier_incr(
    cluster: Cluster, conn: Conn
) -> None:
    """INCR, SET, INCR: the SET waits for the first INCR, and the second INCR for the SET."""
    ids = copy_ids(cluster, b"n")
    replica = cluster.clients[ids[1]]
    replica.hold()
    assert conn.send(encode("INCR", "n") + encode("SET", "n", "5") + encode("INCR", "n")) == b""
    for _ in range(4):
        replica.release()
    assert conn.take() == b":1\r\n" + OK + b":6\r\n"
    assert all(cluster.nodes[i].store.get(P, b"n").value == b"6" for i in ids)


def test_a_write_is_not_sent_ahead_of_a_waiting_mset_of_its_key(
    cluster: Cluster, conn: Conn
) -> None:
    """MSET a b waits for an INCR of a; a later SET of b must still land after it."""
    ids = copy_ids(cluster, b"a")
    cluster.clients[ids[1]].hold()
    stream = encode("INCR", "a") + encode("MSET", "a", "10", "b", "1") + encode("SET", "b", "2")
    assert conn.send(stream + encode("GET", "b")) == b""
    for _ in range(6):
        for client in cluster.clients.values():
            client.release()
    assert conn.take() == b":1\r\n" + OK + OK + bulk(b"2")
    assert conn.cmd("GET", "b") == bulk(b"2")


def test_write_acks_one_still_sends_the_copy_before_what_follows() -> None:
    """With write_acks one the primary's answer is enough to reply, but a GET that
    follows (read from the other copy) must find the INCR's result there."""
    from kvha.master.router import PartitionPolicy

    probe = Cluster(n=3, replicas=1)
    primary, replica = copy_ids(probe, b"n")
    probe.stop()
    weights = [0.0 if f"data{i + 1}" == primary else 1.0 for i in range(3)]
    cluster = Cluster(
        n=3,
        replicas=1,
        partitions=[PartitionPolicy("default", write_acks="one")],
        read_weights=weights,
    )
    try:
        conn = Conn(cluster.resp_factory())
        cluster.clients[primary].hold()
        assert conn.send(encode("INCR", "n") + encode("GET", "n")) == b""
        cluster.clients[primary].release()
        assert conn.take() == b":1\r\n" + bulk(b"1")
    finally:
        cluster.stop()


def test_keys_is_a_barrier_until_its_last_page(cluster: Cluster, conn: Conn) -> None:
    """KEYS reads in pages; a SET sent after it must not show up in its later pages."""
    conn.send(b"".join(encode("SET", f"k{i}", "v") for i in range(3000)))
    cluster.clients["data1"].hold()
    assert conn.send(encode("KEYS", "*") + encode("SET", "zzz-new", "1")) == b""
    for _ in range(20):
        cluster.clients["data1"].release()
    keys, end = parse_reply(conn.take())
    assert len(keys) == 3000 and b"zzz-new" not in keys
    assert conn.cmd("GET", "zzz-new") == bulk(b"1")


def test_writes_after_a_waiting_flushdb_are_not_flushed(cluster: Cluster, conn: Conn) -> None:
    """FLUSHDB waits for the INCR before it; what comes after it waits for it in turn."""
    ids = copy_ids(cluster, b"n")
    cluster.clients[ids[1]].hold()
    stream = encode("INCR", "n") + encode("FLUSHDB") + encode("SET", "a", "2")
    stream += encode("INCR", "n") + encode("GET", "a")
    assert conn.send(stream) == b""
    for _ in range(4):
        cluster.clients[ids[1]].release()
    assert conn.take() == b":1\r\n" + OK + OK + b":1\r\n" + bulk(b"2")
    assert conn.cmd("GET", "a") == bulk(b"2")


def test_an_incr_waits_when_the_primary_connection_changed(cluster: Cluster, conn: Conn) -> None:
    """After a reconnect, order on the old connection says nothing: wait as before."""
    ids = copy_ids(cluster, b"n")
    primary, replica = cluster.clients[ids[0]], cluster.clients[ids[1]]
    replica.hold()
    assert conn.send(encode("INCR", "n")) == b""
    primary.disconnect()
    primary.reconnect()
    assert conn.send(encode("INCR", "n")) == b""
    assert primary.calls["incr"] == 1
    replica.release()  # the first INCR is replicated; the second one is sent now
    replica.release()
    assert primary.calls["incr"] == 2
    assert conn.take() == b":1\r\n:2\r\n"


def test_an_incr_after_a_write_of_the_key_is_not_pipelined_past_it(
    cluster: Cluster, conn: Conn
) -> None:
    """A read-modify-write (APPEND) between INCRs keeps them apart: its result is read."""
    conn.cmd("SET", "n", "1")
    ids = copy_ids(cluster, b"n")
    replica = cluster.clients[ids[1]]
    replica.hold()
    stream = encode("INCR", "n") + encode("APPEND", "n", "0") + encode("INCR", "n")
    assert conn.send(stream) == b""
    assert cluster.clients[ids[0]].calls["incr"] == 1
    for _ in range(4):
        replica.release()
    assert conn.take() == b":2\r\n:2\r\n:21\r\n"


def test_max_in_flight_pauses_and_resumes_reading(cluster: Cluster) -> None:
    """With max_in_flight pending replies the transport is paused, and resumed as they drain."""
    conn = Conn(cluster.resp_factory(max_in_flight=4))
    for client in cluster.clients.values():
        client.hold()
    out = conn.send(b"".join(encode("GET", f"k{i}") for i in range(10)))
    assert out == b""
    assert conn.transport.producerState == "paused"
    for client in cluster.clients.values():
        client.release()
    # Released requests were answered; those read while paused run now, and may be held again.
    for _ in range(10):
        for client in cluster.clients.values():
            client.release()
    assert conn.take() == NIL * 10
    assert conn.transport.producerState == "producing"


def test_max_in_flight_of_one_does_not_stall(cluster: Cluster) -> None:
    """The smallest max_in_flight still answers every pipelined command in order."""
    conn = Conn(cluster.resp_factory(max_in_flight=1))
    out = conn.send(b"".join(encode("INCR", "n") for _ in range(5)))
    assert out == b":1\r\n:2\r\n:3\r\n:4\r\n:5\r\n"
    assert conn.transport.producerState == "producing"


def test_max_connections(cluster: Cluster) -> None:
    """Over max_connections a client is told so and disconnected; a freed slot is reused."""
    factory = cluster.resp_factory(max_connections=1)
    first = Conn(factory)
    assert first.cmd("PING") == b"+PONG\r\n"
    second = Conn(factory)
    assert second.take() == b"-ERR max number of clients reached\r\n"
    assert second.closed
    assert second.send(encode("PING")) == b""
    second.lose()
    first.lose()
    third = Conn(factory)
    assert third.cmd("PING") == b"+PONG\r\n"
    assert factory.rejected_connections == 1


def test_node_failure_is_an_error_reply(cluster: Cluster, conn: Conn) -> None:
    """With every copy of a key down the command gets an -ERR and the connection goes on."""
    for node_id in copy_ids(cluster, b"k"):
        cluster.kill(node_id)
    out = conn.cmd("GET", "k")
    assert out.startswith(b"-ERR ") and out.endswith(b"\r\n")
    assert conn.cmd("PING") == b"+PONG\r\n"


def test_hello_3_switches_the_connection_to_resp3(conn: Conn) -> None:
    """After HELLO 3 the reply is a RESP3 map, nulls are _, and HELLO 2 switches back."""
    reply = conn.cmd("HELLO", "3")
    assert reply.startswith(b"%7\r\n$6\r\nserver\r\n$5\r\nredis\r\n")
    assert b"$5\r\nproto\r\n:3\r\n" in reply
    assert conn.cmd("GET", "missing") == b"_\r\n"
    conn.cmd("SET", "here", "$-1\r\n")
    assert conn.cmd("MGET", "here", "missing") == b"*2\r\n$5\r\n$-1\r\n\r\n_\r\n"
    assert conn.cmd("CONFIG", "GET", "appendonly").startswith(b"%1\r\n")
    assert b":2\r\n" in conn.cmd("HELLO", "2")
    assert conn.cmd("GET", "missing") == b"$-1\r\n"


def test_a_partition_leaving_the_map_gets_errors_not_a_stalled_connection(
    cluster: Cluster, conn: Conn
) -> None:
    """GET and SET (the callback hot path) answer with an error; later commands still run."""
    from kvha.master.router import PartitionPolicy

    assert conn.cmd("SET", "k", "v") == OK
    cluster.router.set_partitions([PartitionPolicy("other")])
    out = conn.send(encode("GET", "k") + encode("SET", "k", "w") + encode("PING"))
    replies = parse_all(out)
    assert [r[0] if isinstance(r, tuple) else r for r in replies] == ["ERR", "ERR", b"PONG"]
    assert b"unknown partition" in replies[0][1]


# A read whose copy fails mid-read ------------------------------------------------
# Reads go to data1 (the only copy with a read weight); data1 holds them, then
# dies.  The read is retried on the key's other copy, which by then may hold a
# write this connection sent after the read.


def _read_from_data1() -> tuple[Cluster, Conn, bytes]:
    c = Cluster(n=3, replicas=1, read_weights=[1.0, 0.0, 0.0])
    key = next(k for k in (b"k%d" % i for i in range(100)) if "data1" in copy_ids(c, k))
    return c, Conn(c.resp_factory()), key


def test_a_retried_get_never_returns_a_later_write_from_its_own_connection() -> None:
    """GET k; SET k v2 pipelined and the GET's copy dies: an error, not v2 (v2 on the next GET)."""
    c, conn, key = _read_from_data1()
    try:
        assert conn.cmd("SET", key, "v1") == OK
        c.clients["data1"].hold()
        assert conn.send(encode("GET", key) + encode("SET", key, "v2")) == b""
        c.kill("data1")
        got, stored = parse_all(conn.take())
        assert got[0] == "ERR" and b"read it again" in got[1], got
        assert stored == b"OK"
        assert conn.cmd("GET", key) == bulk(b"v2")
    finally:
        c.stop()


def test_a_retried_get_never_returns_a_later_delete() -> None:
    c, conn, key = _read_from_data1()
    try:
        assert conn.cmd("SET", key, "v1") == OK
        c.clients["data1"].hold()
        assert conn.send(encode("GET", key) + encode("DEL", key)) == b""
        c.kill("data1")
        got, deleted = parse_all(conn.take())
        assert got[0] == "ERR" and b"read it again" in got[1], got
        assert deleted == 1
    finally:
        c.stop()


def test_a_retried_get_with_no_later_write_answers_from_the_other_copy() -> None:
    c, conn, key = _read_from_data1()
    try:
        assert conn.cmd("SET", key, "v1") == OK
        c.clients["data1"].hold()
        assert conn.cmd("GET", key) == b""
        c.kill("data1")
        assert conn.take() == bulk(b"v1")
        c.revive("data1")
        c.clients["data1"].hold()
        assert conn.cmd("GET", "never-set") == b""  # a miss, retried, is still a miss
        c.kill("data1")
        assert conn.take() == NIL
    finally:
        c.stop()


def test_a_retried_mget_never_returns_a_later_write() -> None:
    c, conn, key = _read_from_data1()
    try:
        other = next(
            k for k in (b"o%d" % i for i in range(100)) if "data1" in copy_ids(c, k) and k != key
        )
        assert conn.cmd("MSET", key, "v1", other, "w1") == OK
        c.clients["data1"].hold()
        assert conn.send(encode("MGET", key, other) + encode("SET", key, "v2")) == b""
        c.kill("data1")
        got, stored = parse_all(conn.take())
        assert got[0] == "ERR" and b"read it again" in got[1], got
        assert stored == b"OK"
        c.revive("data1")
        c.clients["data1"].hold()
        assert conn.cmd("MGET", key, other) == b""
        c.kill("data1")
        assert conn.take() == b"*2\r\n" + bulk(b"v2") + bulk(b"w1")
    finally:
        c.stop()


def test_flushdb_with_a_data_node_down_is_an_error_and_flushes_nothing(
    cluster: Cluster, conn: Conn
) -> None:
    assert conn.cmd("SET", "a", "1") == OK
    cluster.kill("data2")
    reply = conn.cmd("FLUSHDB")
    assert reply.startswith(b"-ERR data node data2 down: a flush must reach every data node")
    assert conn.cmd("GET", "a") == bulk(b"1")
    assert conn.cmd("FLUSHALL").startswith(b"-ERR data node data2 down")


def test_loading_master_refuses_data_commands_like_redis_loading(cluster: Cluster) -> None:
    """While the master starts (Router.loading), PING and every data command get
    -LOADING, as Redis while it loads; INFO says loading:1; nothing is written."""
    conn = Conn(cluster.resp_factory())
    cluster.router.loading = True
    loading = b"-LOADING kvha is starting: too few data nodes are up yet to read every key\r\n"
    assert conn.cmd("PING") == loading  # the load balancers' probe fails
    assert conn.cmd("SET", "k", "v") == loading
    assert conn.cmd("GET", "k") == loading
    assert conn.cmd("INCR", "n") == loading
    assert conn.cmd("MSET", "a", "1", "b", "2") == loading
    # Errors of the command itself still come first, as in Redis.
    assert conn.cmd("GET").startswith(b"-ERR wrong number of arguments")
    assert conn.cmd("NOSUCH").startswith(b"-ERR unknown command")
    # What Redis runs while loading runs.
    assert b"loading:1" in conn.value("INFO")
    assert conn.cmd("ECHO", "x") == bulk(b"x")
    assert conn.cmd("SELECT", "0") == b"+OK\r\n"
    assert conn.cmd("CLIENT", "SETNAME", "n") == b"+OK\r\n"
    assert conn.cmd("CONFIG", "GET", "maxmemory").startswith(b"*")
    for node in cluster.nodes.values():
        assert node.store.engine.get(P, b"k") is None  # type: ignore[attr-defined]
    cluster.router.loading = False
    assert conn.cmd("PING") == b"+PONG\r\n"
    assert conn.cmd("SET", "k", "v") == b"+OK\r\n"
    assert conn.cmd("GET", "k") == bulk(b"v")
    assert b"loading:0" in conn.value("INFO")
