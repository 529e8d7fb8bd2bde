"""The memcached text protocol, byte for byte, over a StringTransport and an in-process cluster.

Replies are compared with what memcached 1.6 sends for the same input, so a
memcached client cannot tell the difference; where kvha deliberately differs
(errors are not silenced by ``noreply``), the test says so.
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

from kvha import __version__
from kvha.master.memcache import MemcacheFactory
from kvha.master.router import PartitionPolicy
from kvha.record import RELATIVE_EXPTIME_LIMIT
from tests.inprocess import Cluster

P = b"default"


class Conn:
    """One client connection: bytes in, the bytes written back since the last call out."""

    def __init__(self, factory: MemcacheFactory) -> None:
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.take()

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
    return Conn(cluster.memcache_factory())


def copy_ids(cluster: Cluster, key: bytes) -> list[str]:
    return [link.node_id for link in cluster.router.copies_of(P, key)]


def version_of(cluster: Cluster, key: bytes) -> int:
    record = cluster.nodes[copy_ids(cluster, key)[0]].store.get(P, key)
    assert record is not None
    return record.version


def stats_of(conn: Conn) -> dict[str, str]:
    out = conn.send(b"stats\r\n")
    assert out.endswith(b"END\r\n")
    lines = out[: -len(b"END\r\n")].decode().split("\r\n")[:-1]
    parsed: dict[str, str] = {}
    for line in lines:
        word, name, value = line.split(" ", 2)
        assert word == "STAT"
        parsed[name] = value
    return parsed


# Retrieval ------------------------------------------------------------------------------------


def test_get_miss_and_hit(conn: Conn) -> None:
    """get answers END for a miss and VALUE key flags bytes, data, END for a hit."""
    assert conn.send(b"get k\r\n") == b"END\r\n"
    assert conn.send(b"set k 5 0 3\r\nabc\r\n") == b"STORED\r\n"
    assert conn.send(b"get k\r\n") == b"VALUE k 5 3\r\nabc\r\nEND\r\n"


def test_multi_get_returns_hits_in_request_order(conn: Conn) -> None:
    """A multi-key get lists only the hits, in the order asked, then one END."""
    conn.send(b"set a 1 0 1\r\nA\r\nset c 3 0 2\r\nCC\r\n")
    assert conn.send(b"get c b a\r\n") == b"VALUE c 3 2\r\nCC\r\nVALUE a 1 1\r\nA\r\nEND\r\n"


def test_gets_shows_version_as_cas(cluster: Cluster, conn: Conn) -> None:
    """gets adds the record's version as the cas unique."""
    conn.send(b"set k 0 0 1\r\nv\r\n")
    version = version_of(cluster, b"k")
    assert conn.send(b"gets k\r\n") == b"VALUE k 0 1 %d\r\nv\r\nEND\r\n" % version


def test_get_without_key_is_error(conn: Conn) -> None:
    """get with no key is ERROR, as memcached."""
    assert conn.send(b"get\r\n") == b"ERROR\r\n"


def test_gat_and_gats_touch_and_return(cluster: Cluster, conn: Conn) -> None:
    """gat returns the value and sets a new expiry; gats also returns the new cas."""
    conn.send(b"set k 2 0 1\r\nv\r\n")
    assert conn.send(b"gat 100 k missing\r\n") == b"VALUE k 2 1\r\nv\r\nEND\r\n"
    now_ms = int(cluster.clock.seconds() * 1000)
    for nid in copy_ids(cluster, b"k"):
        assert cluster.nodes[nid].store.get(P, b"k").expires_ms == now_ms + 100_000
    out = conn.send(b"gats 0 k\r\n")
    version = version_of(cluster, b"k")
    assert out == b"VALUE k 2 1 %d\r\nv\r\nEND\r\n" % version
    cluster.clock.advance(101)
    assert conn.send(b"get k\r\n") == b"VALUE k 2 1\r\nv\r\nEND\r\n"  # gats 0: never expires
    assert conn.send(b"gat 10 missing\r\n") == b"END\r\n"


def test_gat_argument_errors(conn: Conn) -> None:
    """gat with no key is ERROR and with a non-numeric exptime an exptime CLIENT_ERROR."""
    assert conn.send(b"gat 10\r\n") == b"ERROR\r\n"
    assert conn.send(b"gat soon k\r\n") == b"CLIENT_ERROR invalid exptime argument\r\n"


# Storage --------------------------------------------------------------------------------------


def test_add_replace_append_prepend(conn: Conn) -> None:
    """Each storage mode answers STORED or NOT_STORED exactly as memcached does."""
    assert conn.send(b"replace k 0 0 1\r\nx\r\n") == b"NOT_STORED\r\n"
    assert conn.send(b"append k 0 0 1\r\nx\r\n") == b"NOT_STORED\r\n"
    assert conn.send(b"prepend k 0 0 1\r\nx\r\n") == b"NOT_STORED\r\n"
    assert conn.send(b"add k 9 0 2\r\nmm\r\n") == b"STORED\r\n"
    assert conn.send(b"add k 0 0 1\r\nx\r\n") == b"NOT_STORED\r\n"
    assert conn.send(b"append k 0 0 2\r\n>>\r\n") == b"STORED\r\n"
    assert conn.send(b"prepend k 0 0 2\r\n<<\r\n") == b"STORED\r\n"
    # append/prepend keep the record's flags.
    assert conn.send(b"get k\r\n") == b"VALUE k 9 6\r\n<<mm>>\r\nEND\r\n"
    assert conn.send(b"replace k 1 0 1\r\nr\r\n") == b"STORED\r\n"
    assert conn.send(b"get k\r\n") == b"VALUE k 1 1\r\nr\r\nEND\r\n"


def test_cas_not_found_exists_stored(cluster: Cluster, conn: Conn) -> None:
    """cas answers NOT_FOUND for no key, EXISTS for a wrong unique, STORED for the right one."""
    assert conn.send(b"cas k 0 0 1 123\r\nx\r\n") == b"NOT_FOUND\r\n"
    conn.send(b"set k 0 0 1\r\nv\r\n")
    version = version_of(cluster, b"k")
    assert conn.send(b"cas k 0 0 1 %d\r\nx\r\n" % (version + 1)) == b"EXISTS\r\n"
    assert conn.send(b"cas k 4 0 1 %d\r\ny\r\n" % version) == b"STORED\r\n"
    assert conn.send(b"cas k 0 0 1 %d\r\nz\r\n" % version) == b"EXISTS\r\n"
    assert conn.send(b"get k\r\n") == b"VALUE k 4 1\r\ny\r\nEND\r\n"
    stats = stats_of(conn)
    assert (stats["cas_misses"], stats["cas_badval"], stats["cas_hits"]) == ("1", "2", "1")


def test_storage_commands_with_noreply_are_silent(cluster: Cluster, conn: Conn) -> None:
    """Every storage command with noreply writes nothing back but still takes effect."""
    assert conn.send(b"set k 0 0 1 noreply\r\na\r\n") == b""
    assert conn.send(b"add k 0 0 1 noreply\r\nx\r\n") == b""  # NOT_STORED, silently
    assert conn.send(b"add n 0 0 1 noreply\r\n1\r\n") == b""
    assert conn.send(b"replace k 0 0 1 noreply\r\nb\r\n") == b""
    assert conn.send(b"append k 0 0 1 noreply\r\nc\r\n") == b""
    assert conn.send(b"prepend k 0 0 1 noreply\r\nd\r\n") == b""
    version = version_of(cluster, b"k")
    assert conn.send(b"cas k 0 0 1 %d noreply\r\ne\r\n" % version) == b""
    assert conn.send(b"cas k 0 0 1 1 noreply\r\nf\r\n") == b""  # EXISTS, silently
    assert conn.send(b"get k n\r\n") == b"VALUE k 0 1\r\ne\r\nVALUE n 0 1\r\n1\r\nEND\r\n"


def test_other_commands_with_noreply_are_silent(conn: Conn) -> None:
    """incr, decr, touch, delete, flush_all and verbosity with noreply write nothing."""
    conn.send(b"set n 0 0 2\r\n10\r\n")
    assert conn.send(b"incr n 5 noreply\r\n") == b""
    assert conn.send(b"decr n 3 noreply\r\n") == b""
    assert conn.send(b"incr missing 1 noreply\r\n") == b""
    assert conn.send(b"touch n 100 noreply\r\n") == b""
    assert conn.send(b"get n\r\n") == b"VALUE n 0 2\r\n12\r\nEND\r\n"
    assert conn.send(b"delete n noreply\r\n") == b""
    assert conn.send(b"delete n 0 noreply\r\n") == b""
    assert conn.send(b"get n\r\n") == b"END\r\n"
    assert conn.send(b"flush_all noreply\r\n") == b""
    assert conn.send(b"verbosity 1 noreply\r\n") == b""
    assert conn.send(b"version\r\n").startswith(b"VERSION ")


# incr / decr ----------------------------------------------------------------------------------


def test_incr_decr_values(conn: Conn) -> None:
    """incr and decr answer the new value; incr wraps at 2**64 and decr stops at 0."""
    conn.send(b"set n 3 0 2\r\n10\r\n")
    assert conn.send(b"incr n 5\r\n") == b"15\r\n"
    assert conn.send(b"decr n 20\r\n") == b"0\r\n"
    assert conn.send(b"get n\r\n") == b"VALUE n 3 1\r\n0\r\nEND\r\n"  # flags kept
    conn.send(b"set big 0 0 20\r\n18446744073709551615\r\n")
    assert conn.send(b"incr big 1\r\n") == b"0\r\n"
    conn.send(b"set big 0 0 20\r\n18446744073709551610\r\n")
    assert conn.send(b"incr big 18446744073709551615\r\n") == b"18446744073709551609\r\n"
    assert conn.send(b"incr missing 1\r\n") == b"NOT_FOUND\r\n"
    assert conn.send(b"decr missing 1\r\n") == b"NOT_FOUND\r\n"


def test_incr_errors(conn: Conn) -> None:
    """A non-numeric value and a bad delta get memcached's exact CLIENT_ERROR lines."""
    conn.send(b"set s 0 0 3\r\nabc\r\n")
    assert (
        conn.send(b"incr s 1\r\n")
        == b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    )
    assert (
        conn.send(b"decr s 1\r\n")
        == b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    )
    conn.send(b"set n 0 0 1\r\n1\r\n")
    for delta in (b"abc", b"-1", b"18446744073709551616", b"1.5"):
        assert (
            conn.send(b"incr n %s\r\n" % delta)
            == b"CLIENT_ERROR invalid numeric delta argument\r\n"
        )
    assert conn.send(b"incr n\r\n") == b"ERROR\r\n"
    assert conn.send(b"get n\r\n") == b"VALUE n 0 1\r\n1\r\nEND\r\n"


# touch and delete -----------------------------------------------------------------------------


def test_touch(cluster: Cluster, conn: Conn) -> None:
    """touch answers TOUCHED or NOT_FOUND and the new expiry takes effect."""
    conn.send(b"set k 0 0 1\r\nv\r\n")
    assert conn.send(b"touch k 10\r\n") == b"TOUCHED\r\n"
    assert conn.send(b"touch missing 10\r\n") == b"NOT_FOUND\r\n"
    assert conn.send(b"touch k later\r\n") == b"CLIENT_ERROR invalid exptime argument\r\n"
    cluster.clock.advance(9)
    assert conn.send(b"get k\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    cluster.clock.advance(1)
    assert conn.send(b"get k\r\n") == b"END\r\n"


def test_delete(conn: Conn) -> None:
    """delete answers DELETED or NOT_FOUND, accepts a zero hold time and refuses any other."""
    conn.send(b"set k 0 0 1\r\nv\r\nset j 0 0 1\r\nv\r\n")
    assert conn.send(b"delete k\r\n") == b"DELETED\r\n"
    assert conn.send(b"delete k\r\n") == b"NOT_FOUND\r\n"
    assert conn.send(b"delete j 0\r\n") == b"DELETED\r\n"
    assert (
        conn.send(b"delete j 5\r\n")
        == b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n"
    )
    assert conn.send(b"delete\r\n") == b"ERROR\r\n"
    assert conn.send(b"get k j\r\n") == b"END\r\n"


# flush_all ------------------------------------------------------------------------------------


def test_flush_all_only_flushes_this_partition() -> None:
    """flush_all on one port's partition leaves another partition's keys in place."""
    c = Cluster(n=3, replicas=1, partitions=[PartitionPolicy("default"), PartitionPolicy("other")])
    one = Conn(c.memcache_factory(b"default"))
    two = Conn(c.memcache_factory(b"other"))
    for i in range(20):
        one.send(b"set k%d 0 0 1\r\na\r\n" % i)
        two.send(b"set k%d 0 0 1\r\nb\r\n" % i)
    assert one.send(b"flush_all\r\n") == b"OK\r\n"
    for i in range(20):
        assert one.send(b"get k%d\r\n" % i) == b"END\r\n"
        assert two.send(b"get k%d\r\n" % i) == b"VALUE k%d 0 1\r\nb\r\nEND\r\n" % i
    c.stop()


def test_flush_all_with_delay(cluster: Cluster, conn: Conn) -> None:
    """flush_all 10 answers OK at once and empties the partition ten seconds later."""
    conn.send(b"set k 0 0 1\r\nv\r\n")
    assert conn.send(b"flush_all 10\r\n") == b"OK\r\n"
    cluster.clock.advance(9.75)
    assert conn.send(b"get k\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    cluster.clock.advance(0.25)
    assert conn.send(b"get k\r\n") == b"END\r\n"


def test_flush_all_waits_for_earlier_writes(cluster: Cluster, conn: Conn) -> None:
    """A flush_all pipelined after a held set is applied after it, so the set is flushed too."""
    for client in cluster.clients.values():
        client.hold()
    assert conn.send(b"set k 0 0 1\r\nv\r\nflush_all\r\n") == b""
    for client in cluster.clients.values():
        client.release()
    assert conn.take() == b"STORED\r\nOK\r\n"
    assert conn.send(b"get k\r\n") == b"END\r\n"


# stats, version, verbosity, quit --------------------------------------------------------------


def test_stats(conn: Conn) -> None:
    """stats lists memcached's core counters as STAT lines and ends with END."""
    conn.send(b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\nset c 0 0 1\r\n3\r\n")
    conn.send(b"get a b zz\r\n")
    stats = stats_of(conn)
    for name in (
        "pid",
        "uptime",
        "version",
        "curr_connections",
        "total_connections",
        "cmd_get",
        "cmd_set",
        "get_hits",
        "get_misses",
        "curr_items",
    ):
        assert name in stats, name
    assert stats["version"] == f"1.6.0 kvha/{__version__}"
    assert int(stats["pid"]) > 0
    assert (stats["cmd_get"], stats["cmd_set"]) == ("3", "3")
    assert (stats["get_hits"], stats["get_misses"]) == ("2", "1")
    assert (stats["curr_connections"], stats["total_connections"]) == ("1", "1")
    assert stats["curr_items"] == "3"  # each record counted once, not per copy


def test_stats_curr_items_drops_on_delete(conn: Conn) -> None:
    """Deleted keys (kept as tombstones for merge) are not counted as items."""
    conn.send(b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\n")
    conn.send(b"delete a\r\n")
    assert stats_of(conn)["curr_items"] == "1"


def test_stats_uptime_follows_the_clock(cluster: Cluster, conn: Conn) -> None:
    """uptime counts seconds of the injected clock since the factory was made."""
    cluster.clock.advance(42)
    assert stats_of(conn)["uptime"] == "42"


def test_stats_reset(conn: Conn) -> None:
    """stats reset answers RESET and zeroes the counters but not total_connections."""
    conn.send(b"set a 0 0 1\r\n1\r\nget a\r\n")
    assert conn.send(b"stats reset\r\n") == b"RESET\r\n"
    stats = stats_of(conn)
    assert (stats["cmd_get"], stats["cmd_set"], stats["get_hits"]) == ("0", "0", "0")
    assert stats["total_connections"] == "1"
    assert conn.send(b"stats nonsense\r\n") == b"ERROR\r\n"


def test_version(conn: Conn) -> None:
    """version answers one VERSION line with a memcached-style number first."""
    assert conn.send(b"version\r\n") == f"VERSION 1.6.0 kvha/{__version__}\r\n".encode()


def test_verbosity(conn: Conn) -> None:
    """verbosity answers OK, nothing with noreply, and ERROR without an argument."""
    assert conn.send(b"verbosity 1\r\n") == b"OK\r\n"
    assert conn.send(b"verbosity 1 noreply\r\n") == b""
    assert conn.send(b"verbosity\r\n") == b"ERROR\r\n"


def test_quit_closes(conn: Conn) -> None:
    """quit closes the connection without a reply and ignores what follows."""
    assert conn.send(b"quit\r\nversion\r\n") == b""
    assert conn.closed


def test_quit_after_pending_replies_sends_them_first(cluster: Cluster, conn: Conn) -> None:
    """A quit pipelined after a slow get closes only once the get's reply is written."""
    conn.send(b"set k 0 0 1\r\nv\r\n")
    for client in cluster.clients.values():
        client.hold()
    assert conn.send(b"get k\r\nquit\r\n") == b""
    assert not conn.closed
    for client in cluster.clients.values():
        client.release()
    assert conn.take() == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    assert conn.closed


# Bad input ------------------------------------------------------------------------------------


def test_unknown_and_empty_commands_are_error(conn: Conn) -> None:
    """An unknown command or an empty line is ERROR and the connection stays usable."""
    assert conn.send(b"bogus 1 2\r\n") == b"ERROR\r\n"
    assert conn.send(b"\r\n") == b"ERROR\r\n"
    assert conn.send(b"GET k\r\n") == b"ERROR\r\n"  # commands are case-sensitive
    assert not conn.closed
    assert conn.send(b"set k 0 0 1\r\nv\r\nget k\r\n") == b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"


def test_bare_newline_terminates_a_line(conn: Conn) -> None:
    """Lines may end in a bare LF, as memcached allows."""
    assert conn.send(b"set k 0 0 1\nv\r\nget k\n") == b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"


def test_key_length_limit(conn: Conn) -> None:
    """A 250-byte key works; a 251-byte key is a bad command line (its data line then ERROR)."""
    ok, bad = b"k" * 250, b"k" * 251
    assert conn.send(b"set %s 0 0 1\r\nv\r\n" % ok) == b"STORED\r\n"
    assert conn.send(b"get %s\r\n" % ok) == b"VALUE %s 0 1\r\nv\r\nEND\r\n" % ok
    assert conn.send(b"get %s\r\n" % bad) == b"CLIENT_ERROR bad command line format\r\n"
    # As memcached: no data block is expected after a refused command line.
    assert (
        conn.send(b"set %s 0 0 1\r\nv\r\n" % bad)
        == b"CLIENT_ERROR bad command line format\r\nERROR\r\n"
    )


def test_key_with_control_character_is_refused(conn: Conn) -> None:
    """Keys containing control characters are a bad command line format."""
    assert conn.send(b"get a\x01b\r\n") == b"CLIENT_ERROR bad command line format\r\n"
    assert conn.send(b"delete a\x7fb\r\n") == b"CLIENT_ERROR bad command line format\r\n"
    assert conn.send(b"touch a\x00b 1\r\n") == b"CLIENT_ERROR bad command line format\r\n"


def test_negative_length_and_bad_numbers(conn: Conn) -> None:
    """A negative length, non-numeric fields and flags above 2**32-1 are bad command lines."""
    bad = b"CLIENT_ERROR bad command line format\r\n"
    assert conn.send(b"set k 0 0 -1\r\n") == bad
    assert conn.send(b"set k x 0 1\r\n") == bad
    assert conn.send(b"set k 0 x 1\r\n") == bad
    assert conn.send(b"cas k 0 0 1 x\r\n") == bad
    assert conn.send(b"set k 4294967296 0 1\r\n") == bad
    assert conn.send(b"set k 0 0\r\n") == b"ERROR\r\n"
    assert conn.send(b"set k 4294967295 0 1\r\nv\r\n") == b"STORED\r\n"
    assert conn.send(b"get k\r\n") == b"VALUE k 4294967295 1\r\nv\r\nEND\r\n"


def test_value_too_large_is_swallowed_and_not_stored(cluster: Cluster) -> None:
    """An oversized value is refused with SERVER_ERROR, its data skipped, and the old value kept."""
    conn = Conn(cluster.memcache_factory(max_value_bytes=10))
    assert conn.send(b"set k 0 0 10\r\n0123456789\r\n") == b"STORED\r\n"
    out = conn.send(b"set k 0 0 11\r\nABCDEFGHIJK\r\nget k\r\n")
    assert (
        out == b"SERVER_ERROR object too large for cache\r\nVALUE k 0 10\r\n0123456789\r\nEND\r\n"
    )
    out = conn.send(b"set new 0 0 11\r\nABCDEFGHIJK\r\nget new\r\n")
    assert out == b"SERVER_ERROR object too large for cache\r\nEND\r\n"
    assert all(node.store.get(P, b"new") is None for node in cluster.nodes.values())


def test_value_too_large_is_refused_before_its_data_arrives(cluster: Cluster) -> None:
    """The refusal is sent at once and the data block is discarded as it streams in."""
    conn = Conn(cluster.memcache_factory(max_value_bytes=10))
    assert conn.send(b"set k 0 0 100000\r\n") == b"SERVER_ERROR object too large for cache\r\n"
    for _ in range(10):
        assert conn.send(b"x" * 10_000) == b""
        assert len(conn.proto._buffer) == 0  # nothing of it is buffered
    assert conn.send(b"\r\nget k\r\n") == b"END\r\n"


def test_bad_data_chunk(cluster: Cluster, conn: Conn) -> None:
    """A data block not followed by CRLF is CLIENT_ERROR bad data chunk and stores nothing."""
    assert conn.send(b"set k 0 0 3\r\nabcXY") == b"CLIENT_ERROR bad data chunk\r\n"
    assert conn.send(b"get k\r\n") == b"END\r\n"
    assert all(node.store.get(P, b"k") is None for node in cluster.nodes.values())


def test_line_too_long_closes(cluster: Cluster) -> None:
    """A line longer than max_line_bytes without a newline is refused and the connection closed."""
    conn = Conn(cluster.memcache_factory(max_line_bytes=600))
    assert conn.send(b"g" * 600) == b""
    assert not conn.closed
    assert conn.send(b"g") == b"CLIENT_ERROR line too long\r\n"
    assert conn.closed
    other = Conn(cluster.memcache_factory(max_line_bytes=600))
    assert other.send(b"get " + b"k" * 700 + b"\r\n") == b"CLIENT_ERROR line too long\r\n"
    assert other.closed


# Expiry ---------------------------------------------------------------------------------------


def test_relative_exptime(cluster: Cluster, conn: Conn) -> None:
    """An exptime up to 30 days is seconds from now."""
    conn.send(b"set k 0 10 1\r\nv\r\n")
    cluster.clock.advance(9.5)
    assert conn.send(b"get k\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    cluster.clock.advance(0.5)
    assert conn.send(b"get k\r\n") == b"END\r\n"


def test_absolute_exptime(cluster: Cluster, conn: Conn) -> None:
    """An exptime above 30 days is an absolute unix time."""
    when = int(cluster.clock.seconds()) + 20
    assert when > RELATIVE_EXPTIME_LIMIT
    conn.send(b"set k 0 %d 1\r\nv\r\n" % when)
    cluster.clock.advance(19)
    assert conn.send(b"get k\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    cluster.clock.advance(1)
    assert conn.send(b"get k\r\n") == b"END\r\n"
    conn.send(b"set past 0 %d 1\r\nv\r\n" % (RELATIVE_EXPTIME_LIMIT + 1))
    assert conn.send(b"get past\r\n") == b"END\r\n"


def test_negative_exptime_is_immediately_invisible(conn: Conn) -> None:
    """A negative exptime stores an already-expired item, as memcached does."""
    assert conn.send(b"set k 0 -1 1\r\nv\r\n") == b"STORED\r\n"
    assert conn.send(b"get k\r\n") == b"END\r\n"
    assert conn.send(b"add k 0 0 1\r\nw\r\n") == b"STORED\r\n"


# Pipelining and ordering ----------------------------------------------------------------------


def test_pipelined_replies_stay_in_order_around_a_slow_get() -> None:
    """Replies come back in request order even when an early get is slower than later commands."""
    c = Cluster(n=3, replicas=0)
    conn = Conn(c.memcache_factory())
    slow = next(b"a%d" % i for i in range(1000) if copy_ids(c, b"a%d" % i) == ["data1"])
    fast = next(b"b%d" % i for i in range(1000) if copy_ids(c, b"b%d" % i) == ["data2"])
    conn.send(b"set %s 0 0 4\r\nslow\r\n" % slow)
    c.clients["data1"].hold()
    out = conn.send(
        b"get %s\r\nset %s 0 0 4\r\nfast\r\nget %s\r\nversion\r\nbogus\r\n" % (slow, fast, fast)
    )
    assert out == b""
    # The later commands already ran; only their replies wait.
    assert c.nodes["data2"].store.get(P, fast).value == b"fast"
    c.clients["data1"].release()
    assert conn.take() == (
        b"VALUE %s 0 4\r\nslow\r\nEND\r\n" % slow
        + b"STORED\r\n"
        + b"VALUE %s 0 4\r\nfast\r\nEND\r\n" % fast
        + f"VERSION 1.6.0 kvha/{__version__}\r\n".encode()
        + b"ERROR\r\n"
    )
    c.stop()


def test_read_your_writes_with_held_writes(cluster: Cluster, conn: Conn) -> None:
    """A get after a set noreply of the same key sees the set, however slow the copies."""
    conn.send(b"set k 0 0 3\r\nold\r\n")
    for client in cluster.clients.values():
        client.hold()
    assert conn.send(b"set k 0 0 3 noreply\r\nnew\r\nget k\r\n") == b""
    a, b = copy_ids(cluster, b"k")
    cluster.clients[a].release()
    assert conn.take() == b""  # write_acks all: still waiting for the second copy
    cluster.clients[b].hold()
    third = ({"data1", "data2", "data3"} - {a, b}).pop()
    cluster.clients[third].release()
    cluster.clients[b].release()
    assert conn.take() == b"VALUE k 0 3\r\nnew\r\nEND\r\n"


def test_pipelined_incr_and_cas_reach_the_primary_without_waiting(
    cluster: Cluster, conn: Conn
) -> None:
    """Operations decided at the primary are sent at once; a get after them waits."""
    conn.send(b"set n 0 0 1\r\n1\r\n")
    primary, replica = (cluster.clients[i] for i in copy_ids(cluster, b"n"))
    replica.hold()
    stream = b"incr n 5\r\ndecr n 2\r\nappend n 0 0 1\r\n0\r\nincr n 1\r\nget n\r\n"
    assert conn.send(stream) == b""
    assert (primary.calls["incr"], primary.calls["store"]) == (3, 1)
    assert primary.calls.get("get", 0) == 0 and replica.calls.get("get", 0) == 0
    for _ in range(5):
        replica.release()
    assert conn.take() == b"6\r\n4\r\nSTORED\r\n41\r\nVALUE n 0 2\r\n41\r\nEND\r\n"


def test_a_set_after_a_waiting_flush_all_is_kept(cluster: Cluster, conn: Conn) -> None:
    conn.send(b"set n 0 0 1\r\n1\r\n")
    replica = cluster.clients[copy_ids(cluster, b"n")[1]]
    replica.hold()
    stream = b"incr n 1\r\nflush_all\r\nset a 0 0 1\r\n2\r\nget a\r\n"
    assert conn.send(stream) == b""
    for _ in range(4):
        replica.release()
    assert conn.take() == b"2\r\nOK\r\nSTORED\r\nVALUE a 0 1\r\n2\r\nEND\r\n"
    assert conn.send(b"get a\r\n") == b"VALUE a 0 1\r\n2\r\nEND\r\n"  # not flushed after all


def test_max_in_flight_pauses_and_resumes_reading(cluster: Cluster) -> None:
    """With max_in_flight pending replies the transport is paused, and resumed as they drain."""
    conn = Conn(cluster.memcache_factory(max_in_flight=4))
    for i in range(10):
        conn.send(b"set k%d 0 0 1\r\n%d\r\n" % (i, i))
    for client in cluster.clients.values():
        client.hold()
    assert conn.send(b"".join(b"get k%d\r\n" % i for i in range(10))) == b""
    assert conn.transport.producerState == "paused"
    issued = sum(client.calls.get("get", 0) for client in cluster.clients.values())
    assert issued == 4  # the rest wait unread in the buffer
    for client in cluster.clients.values():
        client.release()
    assert conn.transport.producerState == "producing"
    assert conn.take() == b"".join(b"VALUE k%d 0 1\r\n%d\r\nEND\r\n" % (i, i) for i in range(10))


def test_max_in_flight_of_one_does_not_stall(cluster: Cluster) -> None:
    """The smallest allowed max_in_flight still answers every pipelined command."""
    conn = Conn(cluster.memcache_factory(max_in_flight=1))
    out = conn.send(b"set k 0 0 1\r\nv\r\nget k\r\nget k\r\n")
    assert out == b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
    assert conn.transport.producerState == "producing"
    # A long pipeline answered synchronously must not recurse once per command.
    assert conn.send(b"get k\r\n" * 3000) == b"VALUE k 0 1\r\nv\r\nEND\r\n" * 3000


def test_max_connections(cluster: Cluster) -> None:
    """A connection over the limit gets SERVER_ERROR and is closed; a freed slot is reusable."""
    factory = cluster.memcache_factory(max_connections=1)
    first = Conn(factory)
    second = Conn(factory)
    assert second.take() == b"SERVER_ERROR too many open connections\r\n"
    assert second.closed and not first.closed
    second.lose()
    first.lose()
    third = Conn(factory)
    assert third.send(b"version\r\n").startswith(b"VERSION")
    assert factory.stats.rejected_connections == 1
    assert factory.stats.curr_connections == 1


def test_idle_timeout_closes_idle_connection(cluster: Cluster) -> None:
    """A connection silent for idle_timeout is closed; activity and pending replies postpone it."""
    conn = Conn(cluster.memcache_factory(idle_timeout=5.0))
    cluster.clock.advance(4.0)
    conn.send(b"version\r\n")
    cluster.clock.advance(4.0)
    assert not conn.closed
    cluster.clock.advance(1.0)
    assert conn.closed
    slow = Conn(cluster.memcache_factory(idle_timeout=5.0))
    for client in cluster.clients.values():
        client.hold()
    slow.send(b"get k\r\n")
    cluster.clock.advance(5.0)
    assert not slow.closed  # a reply is still owed
    for client in cluster.clients.values():
        client.release()


def test_byte_by_byte_input(conn: Conn) -> None:
    """Commands and data split into single bytes are parsed as if sent whole."""
    data = b"set k 1 0 5\r\nhe\r\no\r\nget k\r\nincr n 1\r\n"
    out = b"".join(conn.send(data[i : i + 1]) for i in range(len(data)))
    assert out == b"STORED\r\nVALUE k 1 5\r\nhe\r\no\r\nEND\r\nNOT_FOUND\r\n"


def test_server_error_when_no_copy_is_live(cluster: Cluster, conn: Conn) -> None:
    """With every node down each command gets a SERVER_ERROR line and the connection survives."""
    for nid in list(cluster.nodes):
        cluster.kill(nid)
    for command in (
        b"get k\r\n",
        b"set k 0 0 1\r\nv\r\n",
        b"add k 0 0 1\r\nv\r\n",
        b"incr k 1\r\n",
        b"delete k\r\n",
        b"touch k 1\r\n",
        b"flush_all\r\n",
    ):
        out = conn.send(command)
        assert out.startswith(b"SERVER_ERROR ") and out.endswith(b"\r\n"), (command, out)
        assert out.count(b"\r\n") == 1
    # Unlike memcached, noreply does not hide a failure to store.
    assert conn.send(b"set k 0 0 1 noreply\r\nv\r\n").startswith(b"SERVER_ERROR ")
    assert not conn.closed
    assert conn.send(b"version\r\n").startswith(b"VERSION")
    assert stats_of(conn)["server_errors"] == "8"


def test_any_reply_writes_are_single_line_errors(cluster: Cluster, conn: Conn) -> None:
    """A SERVER_ERROR message never contains a raw CR or LF that would break framing."""
    cluster.kill("data1")
    cluster.kill("data2")
    cluster.kill("data3")
    out: Any = conn.send(b"get a b c\r\n")
    assert out.startswith(b"SERVER_ERROR") and out.count(b"\n") == 1


def test_a_partition_leaving_the_map_gets_server_errors_not_a_stalled_connection(
    cluster: Cluster, conn: Conn
) -> None:
    """get and set (the callback hot path) answer SERVER_ERROR; later commands still run."""
    from kvha.master.router import PartitionPolicy

    assert conn.send(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
    cluster.router.set_partitions([PartitionPolicy("other")])
    out = conn.send(b"get k\r\nset k 0 0 1\r\nw\r\nversion\r\n")
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"SERVER_ERROR") and b"unknown partition" in lines[0]
    assert lines[1].startswith(b"SERVER_ERROR")
    assert lines[2].startswith(b"VERSION ")


_MC_KEYS = [b"a", b"b", b"counter"]
_MC_COMMAND = st.one_of(
    st.tuples(
        st.sampled_from([b"set", b"add", b"replace", b"append", b"prepend"]),
        st.sampled_from(_MC_KEYS),
        st.binary(max_size=20),
        st.booleans(),
    ).map(
        lambda c: (
            b"%s %s 5 0 %d%s\r\n%s\r\n"
            % (c[0], c[1], len(c[2]), b" noreply" if c[3] else b"", c[2])
        )
    ),
    st.lists(st.sampled_from(_MC_KEYS), min_size=1, max_size=3).map(
        lambda keys: b"get " + b" ".join(keys) + b"\r\n"
    ),
    st.sampled_from(_MC_KEYS).map(lambda k: b"delete %s\r\n" % k),
    st.sampled_from([b"incr counter 3\r\n", b"decr counter 1\r\n", b"version\r\n"]),
    st.just(b"set big 0 0 50\r\n" + b"z" * 50 + b"\r\n"),  # over max_value_bytes below
    st.just(b"set a 0 0 2\r\nxyz\r\n"),  # a bad data chunk
    st.just(b"bogus command\r\n"),
    st.just(b"get a b\n"),  # a bare newline ends a line too
)


@settings(max_examples=150, deadline=None)
@given(commands=st.lists(_MC_COMMAND, min_size=1, max_size=12), data=st.data())
def test_any_chunking_of_a_pipelined_stream_gives_the_same_replies(
    commands: list[bytes],
    data: st.DataObject,
) -> None:
    """One read with every command, or the same bytes cut anywhere: the same replies."""
    stream = b"".join(commands)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    outputs = []
    for pieces in ([stream], [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]):
        cluster = Cluster(n=3, replicas=1)
        try:
            conn = Conn(cluster.memcache_factory(max_value_bytes=32))
            out = b""
            for piece in pieces:
                out += conn.send(piece)
            outputs.append(out)
        finally:
            cluster.stop()
    assert outputs[0] == outputs[1]


def test_a_retried_get_never_returns_a_set_sent_after_it() -> None:
    """get k; set k pipelined, and the get's copy dies mid-read: SERVER_ERROR, not the new value."""
    c = Cluster(n=3, replicas=1, read_weights=[1.0, 0.0, 0.0])
    try:
        copies = lambda k: [link.node_id for link in c.router.copies_of(b"default", k)]  # noqa: E731
        key = next(k for k in (b"k%d" % i for i in range(100)) if "data1" in copies(k))
        conn = Conn(c.memcache_factory())
        assert conn.send(b"set " + key + b" 0 0 2\r\nv1\r\n") == b"STORED\r\n"
        c.clients["data1"].hold()
        assert conn.send(b"get " + key + b"\r\nset " + key + b" 0 0 2\r\nv2\r\n") == b""
        c.kill("data1")
        out = conn.take()
        assert out.startswith(b"SERVER_ERROR ") and b"read it again" in out, out
        assert out.endswith(b"\r\nSTORED\r\n")
        assert conn.send(b"get " + key + b"\r\n") == b"VALUE " + key + b" 0 2\r\nv2\r\nEND\r\n"
    finally:
        c.stop()


def test_flush_all_with_a_data_node_down_is_a_server_error_and_flushes_nothing(
    cluster: Cluster, conn: Conn
) -> None:
    assert conn.send(b"set a 0 0 1\r\n1\r\n") == b"STORED\r\n"
    cluster.kill("data3")
    reply = conn.send(b"flush_all\r\n")
    assert reply.startswith(b"SERVER_ERROR data node data3 down: a flush must reach"), reply
    assert conn.send(b"get a\r\n") == b"VALUE a 0 1\r\n1\r\nEND\r\n"


def test_loading_master_refuses_commands_and_swallows_data_blocks(cluster: Cluster) -> None:
    """While the master starts (Router.loading): SERVER_ERROR for every command but
    stats, verbosity and quit, version included (the load balancers' probe); a
    storage command's data block is read and dropped, not taken for a command;
    nothing reaches a data node."""
    conn = Conn(cluster.memcache_factory())
    cluster.router.loading = True
    loading = b"SERVER_ERROR loading: too few data nodes are up yet to read every key\r\n"
    assert conn.send(b"version\r\n") == loading
    assert conn.send(b"get k\r\n") == loading
    assert conn.send(b"set k 0 0 9\r\nget other\r\n") == loading  # one reply: the block is data
    assert conn.send(b"set k 0 0 1 noreply\r\nv\r\n") == loading  # an error, even with noreply
    assert conn.send(b"cas k 0 0 1 5\r\nv\r\n") == loading
    assert conn.send(b"incr n 1\r\n") == loading
    assert conn.send(b"delete k\r\n") == loading
    assert conn.send(b"touch k 10\r\n") == loading
    assert conn.send(b"flush_all\r\n") == loading
    assert conn.send(b"verbosity 1\r\n") == b"OK\r\n"
    assert stats_of(conn)["loading"] == "1"  # kvha status shows the master "loading"
    # Errors of the command line itself come first.
    assert conn.send(b"bogus\r\n") == b"ERROR\r\n"
    assert conn.send(b"set k 0 0 x\r\n") == b"CLIENT_ERROR bad command line format\r\n"
    for node in cluster.nodes.values():
        assert node.store.get(P, b"k") is None
    cluster.router.loading = False
    assert stats_of(conn)["loading"] == "0"
    assert conn.send(b"version\r\n").startswith(b"VERSION ")
    assert conn.send(b"set k 0 0 1\r\nv\r\n") == b"STORED\r\n"
    assert conn.send(b"get k\r\n") == b"VALUE k 0 1\r\nv\r\nEND\r\n"
    assert conn.send(b"quit\r\n") == b""
    assert conn.closed


def test_a_gated_gat_touches_the_partition_it_was_sent_in() -> None:
    """A gat waiting behind an incr on its key runs in the partition of when it
    arrived, not in one a later (pipelined) authentication switched to."""
    from bench.hotpath import Master  # real data-node client: replies come later

    master = Master(0, 1, "memcached")
    proto, transport = master.conns[0]
    proto.dataReceived(b"set counter 0 0 1\r\n5\r\n")
    master.settle()
    transport.clear()
    proto.dataReceived(b"incr counter 1\r\ngat 100 counter\r\n")
    assert proto.gated(b"counter")
    proto.partition = b"elsewhere"  # what a re-authentication does meanwhile
    master.settle()
    assert transport.value() == b"6\r\nVALUE counter 0 1\r\n6\r\nEND\r\n"
