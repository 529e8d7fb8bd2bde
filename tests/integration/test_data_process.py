"""Real twistd data nodes: acknowledged writes survive kill -9 of a log-engine node."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from kvha.data.client import DataNodeClient
from tests.conftest import SECRET

pytestmark = pytest.mark.process

RECORDS = 10_000
WINDOW = 200


def _client(node) -> DataNodeClient:  # type: ignore[no-untyped-def]
    client = DataNodeClient(reactor, f"tcp:127.0.0.1:{node.port}", SECRET.encode(), "test")
    client.start()
    return client


@pytest_twisted.inlineCallbacks
def test_log_engine_keeps_every_acknowledged_write_across_kill_9(nodes):  # type: ignore[no-untyped-def]
    """kill -9 in the middle of a write stream loses no acknowledged record (fsync always)."""
    node = nodes.data(
        "d1", engine="log", fsync="always", segment_bytes="256KiB", snapshot_log_bytes="1MiB"
    )
    node.start()
    client = _client(node)
    yield client.when_ready()

    acked: dict[bytes, tuple[bytes, int, int]] = {}
    sent: dict[bytes, bytes] = {}
    killed = False
    in_flight: set[defer.Deferred] = set()

    def on_ack(result, key, value, flags):  # type: ignore[no-untyped-def]
        acked[key] = (value, result.record.version, flags)

    i = 0
    # A bounded load: stop at RECORDS acknowledged (kill) or 3 x RECORDS sent.
    while i < 3 * RECORDS and not killed:
        while len(in_flight) < WINDOW and i < 3 * RECORDS:
            key = b"key-%06d" % i
            value = b"value-%d-" % i + b"x" * (i % 200)
            flags = i % 65536
            sent[key] = value
            d = client.set(b"p1", key, value, flags)
            d.addCallback(on_ack, key, value, flags)
            d.addErrback(lambda f: None)  # in flight when killed
            in_flight.add(d)
            d.addBoth(lambda _, d=d: in_flight.discard(d))
            i += 1
        yield defer.DeferredList(list(in_flight)[:1])
        if len(acked) >= RECORDS:
            node.kill()  # with requests still in flight
            killed = True
    assert killed, "the load ended before the kill"
    yield client.stop()
    assert len(acked) >= RECORDS

    node.start()
    client = _client(node)
    yield client.when_ready()
    keys = sorted(sent)
    found = 0
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        records = yield client.mget(b"p1", chunk)
        for key, record in zip(chunk, records):
            if key in acked:
                value, version, flags = acked[key]
                assert record is not None, f"acknowledged {key!r} lost"
                assert (record.value, record.version, record.flags) == (value, version, flags)
                found += 1
            elif record is not None:
                # Written but not acknowledged before the kill: whole or absent, never garbage.
                assert record.value == sent[key]
    assert found == len(acked)
    stats = yield client.stats()
    assert int(stats["high_water"]) >= max(v for _, v, _ in acked.values())
    yield client.stop()
    assert "Traceback" not in node.log()


@pytest_twisted.inlineCallbacks
def test_wrong_secret_is_refused_and_node_keeps_serving(nodes):  # type: ignore[no-untyped-def]
    """A client with the wrong secret is refused with a log line; others are unaffected."""
    node = nodes.data("d2")
    node.start()
    good = _client(node)
    yield good.when_ready()
    bad = DataNodeClient(reactor, f"tcp:127.0.0.1:{node.port}", b"not-the-secret-at-all", "bad")
    bad.start()
    d = defer.Deferred()
    reactor.callLater(0.5, d.callback, None)
    yield d
    assert not bad.connected
    result = yield good.set(b"p", b"k", b"v")
    assert result.record.value == b"v"
    yield bad.stop()
    yield good.stop()
    assert "wrong cluster secret" in node.log()
