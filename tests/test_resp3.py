"""RESP3 rewriting of replies for clients that said HELLO 3."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvha.master.resp import array, bulk, integer
from kvha.master.resp3 import NULL3, map_reply, to_resp3

VALUES = st.one_of(st.none(), st.binary(max_size=20))


def test_null_bulk_and_null_array_become_resp3_null() -> None:
    """$-1 and *-1 at the top level become _."""
    assert to_resp3(b"$-1\r\n") == NULL3
    assert to_resp3(b"*-1\r\n") == NULL3


def test_nulls_inside_arrays_are_rewritten_and_payloads_are_not() -> None:
    """A null element becomes _, while a bulk whose bytes spell $-1 stays intact."""
    reply = array([bulk(b"a"), bulk(None), bulk(b"$-1\r\n"), integer(7)])
    assert to_resp3(reply) == (b"*4\r\n$1\r\na\r\n_\r\n$5\r\n$-1\r\n\r\n:7\r\n")


@given(st.lists(VALUES, max_size=12))
def test_arrays_of_optional_values_round_trip(values: list) -> None:  # type: ignore[type-arg]
    """Every element keeps its bytes; only nulls change form."""
    reply = array([bulk(v) for v in values])
    expected = b"*%d\r\n" % len(values) + b"".join(NULL3 if v is None else bulk(v) for v in values)
    assert to_resp3(reply) == expected


def test_replies_without_nulls_are_returned_as_they_are() -> None:
    """The common case costs one scan: no null, no rewriting."""
    data = b"+OK\r\n:3\r\n$2\r\nhi\r\n"
    assert to_resp3(data) is data


def test_map_reply_is_a_map_in_resp3_and_a_flat_array_in_resp2() -> None:
    """HELLO and CONFIG GET answer maps to RESP3 clients and flat arrays to RESP2 ones."""
    pairs = [(bulk(b"proto"), integer(3))]
    assert map_reply(pairs, True) == b"%1\r\n$5\r\nproto\r\n:3\r\n"
    assert map_reply(pairs, False) == b"*2\r\n$5\r\nproto\r\n:3\r\n"
