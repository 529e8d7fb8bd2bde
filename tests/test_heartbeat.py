"""Tests for kvha.lb.heartbeat: the election state machine on a Clock, and the wire format.

Two Elections are wired together through fake send functions that sign,
encode and decode every heartbeat (as the UDP protocol does), so each
scenario below runs the real state machine end to end without a network.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Optional

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from kvha.lb.heartbeat import (
    ACTIVE,
    BACKUP,
    HEADER,
    INIT,
    MAGIC,
    Election,
    Heartbeat,
    HeartbeatProtocol,
)

SECRET = b"heartbeat-test-secret"
INTERVAL = 0.1


class Node:
    """One load balancer of a simulated pair: an Election plus a log of VIP changes."""

    def __init__(
        self, pair: Pair, node_id: str, priority: int, preempt: bool = True, epoch: int = 0
    ) -> None:
        self.pair = pair
        self.node_id = node_id
        self.priority = priority
        self.preempt = preempt
        self.epoch = epoch
        self.sent: list[Heartbeat] = []
        self.vip_log: list[tuple[float, str]] = []
        self.peer_epochs: list[int] = []
        self.outranked: list[float] = []
        self.election = self._new_election()

    def _new_election(self) -> Election:
        return Election(
            self.node_id,
            self.priority,
            self.pair.clock,
            send=self._send,
            on_active=lambda: self.vip_log.append((self.pair.clock.seconds(), "acquire")),
            on_backup=lambda: self.vip_log.append((self.pair.clock.seconds(), "release")),
            interval=INTERVAL,
            preempt=self.preempt,
            epoch=lambda: self.epoch,
            on_peer_epoch=self.peer_epochs.append,
            on_outranked_peer=lambda: self.outranked.append(self.pair.clock.seconds()),
        )

    def _send(self, hb: Heartbeat) -> None:
        self.sent.append(hb)
        self.pair.deliver(self, hb.encode(SECRET))

    @property
    def state(self) -> str:
        return self.election.state

    def crash(self) -> None:
        """Like kill -9: timers stop, nothing more is sent, no resign."""
        for call in (self.election._tick, self.election._down):
            if call is not None and call.active():
                call.cancel()
        self.pair.alive.discard(self)

    def restart(self, preempt: Optional[bool] = None) -> None:
        """A new process: a fresh Election (same id), started now."""
        if preempt is not None:
            self.preempt = preempt
        self.election = self._new_election()
        self.pair.alive.add(self)
        self.election.start()


class Pair:
    """Two nodes on a Clock; heartbeats travel with ``latency`` unless the link is cut."""

    def __init__(self, a: tuple[Any, ...], b: tuple[Any, ...], latency: float = 0.001) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)  # sequence numbers are microsecond timestamps
        self.latency = latency
        self.linked = True
        self.alive: set[Node] = set()
        self.a = Node(self, *a)
        self.b = Node(self, *b)
        self.delivered = 0

    def other(self, node: Node) -> Node:
        return self.b if node is self.a else self.a

    def deliver(self, sender: Node, data: bytes) -> None:
        if not self.linked or sender not in self.alive:
            return
        target = self.other(sender)

        def arrive() -> None:
            if target in self.alive and self.linked:
                hb = Heartbeat.decode(data, SECRET)
                assert hb is not None
                self.delivered += 1
                target.election.received(hb)

        self.clock.callLater(self.latency, arrive)

    def start(self, *nodes: Node) -> None:
        for node in nodes or (self.a, self.b):
            self.alive.add(node)
            node.election.start()

    def run(self, seconds: float, step: float = 0.001) -> None:
        """Advance the clock in small steps so callLater chains fire in order."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))

    def holders(self) -> list[str]:
        """Ids of the live nodes that are ACTIVE (a crashed node holds nothing)."""
        return [n.node_id for n in (self.a, self.b) if n in self.alive and n.state == ACTIVE]


def transition_times(node: Node, state: str) -> list[float]:
    return [t for t, s in node.election.transitions if s == state]


# Timing -----------------------------------------------------------------------------------


def test_a_lone_backup_becomes_active_after_three_intervals_plus_skew() -> None:
    """With no heartbeats at all, a backup becomes ACTIVE exactly 3 intervals + skew after start."""
    clock = Clock()
    got: list[str] = []
    e = Election(
        "lb1",
        100,
        clock,
        send=lambda hb: None,
        on_active=lambda: got.append("active"),
        on_backup=lambda: got.append("backup"),
        interval=INTERVAL,
    )
    e.start()
    assert e.state == BACKUP
    expected = 3 * INTERVAL + (256 - 100) / 256 * INTERVAL
    assert e.down_interval == pytest.approx(expected)
    clock.advance(expected - 0.0005)
    assert e.state == BACKUP and got == []
    clock.advance(0.0005)
    assert e.state == ACTIVE and got == ["active"]
    assert e.transitions[-1][0] == pytest.approx(expected, abs=1e-9)


def test_higher_priority_has_shorter_skew_and_wins_the_start_race() -> None:
    """Skew shrinks as priority grows, so of two fresh backups the higher priority goes ACTIVE."""
    clock = Clock()

    def election(priority: int) -> Election:
        return Election("x", priority, clock, lambda hb: None, lambda: None, lambda: None)

    skews = [election(p).skew for p in (1, 50, 100, 150, 254)]
    assert skews == sorted(skews, reverse=True)
    assert all(0 < s < INTERVAL for s in skews)

    pair = Pair(("lb1", 200), ("lb2", 100))
    pair.start()
    pair.run(1.0)
    assert pair.a.state == ACTIVE and pair.b.state == BACKUP
    (t_active,) = transition_times(pair.a, ACTIVE)
    assert t_active - 1_700_000_000 == pytest.approx(pair.a.election.down_interval, abs=0.002)
    assert transition_times(pair.b, ACTIVE) == []


def test_backup_takes_over_three_intervals_plus_skew_after_the_last_heartbeat() -> None:
    """After the active node crashes, the backup takes over down_interval after its last beat."""
    pair = Pair(("lb1", 200), ("lb2", 100))
    pair.start()
    pair.run(1.0)
    assert pair.holders() == ["lb1"]
    pair.a.crash()
    crashed = pair.clock.seconds()
    last_heard = pair.b.election.peer_seen
    pair.run(1.0)
    assert pair.b.state == ACTIVE
    (t_active,) = transition_times(pair.b, ACTIVE)
    assert t_active - last_heard == pytest.approx(pair.b.election.down_interval, abs=0.002)
    assert t_active - crashed <= pair.b.election.down_interval + 0.002
    assert [what for _, what in pair.b.vip_log] == ["acquire"]


def test_equal_priorities_at_start_settle_on_one_active_node() -> None:
    """Two backups of equal priority may both go ACTIVE at once, but the larger id yields."""
    pair = Pair(("lb-b", 100), ("lb-a", 100))
    pair.start()
    pair.run(2.0)
    assert pair.holders() == ["lb-a"]
    pair.run(2.0)
    assert pair.holders() == ["lb-a"]


# Preemption --------------------------------------------------------------------------------


def test_preemption_on_gives_the_vip_back_to_the_returning_higher_priority() -> None:
    """A restarted higher-priority node with preempt on takes over, and the other yields once."""
    pair = Pair(("lb1", 200), ("lb2", 100))
    pair.start()
    pair.run(1.0)
    pair.a.crash()
    pair.run(1.0)
    assert pair.holders() == ["lb2"]
    pair.a.restart(preempt=True)
    restarted = pair.clock.seconds()
    pair.run(1.0)
    assert pair.holders() == ["lb1"]
    # lb1 preempted on the first heartbeat it heard, well before its own down timer.
    (t_back,) = transition_times(pair.a, ACTIVE)
    assert t_back - restarted < pair.a.election.down_interval
    assert [s for _, s in pair.b.election.transitions] == [BACKUP, ACTIVE, BACKUP]
    assert [what for _, what in pair.b.vip_log] == ["acquire", "release"]


def test_preemption_off_leaves_the_vip_where_it_is() -> None:
    """A restarted higher-priority node with preempt off stays BACKUP behind the active peer."""
    pair = Pair(("lb1", 200, False), ("lb2", 100, False))
    pair.start()
    pair.run(1.0)
    pair.a.crash()
    pair.run(1.0)
    pair.a.restart()
    pair.run(3.0)
    assert pair.holders() == ["lb2"]
    assert pair.a.state == BACKUP
    assert transition_times(pair.a, ACTIVE) == []


def test_equal_priority_does_not_preempt() -> None:
    """Preemption needs a strictly higher priority: the id tie-break is for split brain only."""
    pair = Pair(("lb-a", 100), ("lb-b", 100))
    pair.start()
    pair.run(1.0)
    assert pair.holders() == ["lb-a"]
    pair.a.crash()
    pair.run(1.0)
    assert pair.holders() == ["lb-b"]
    changes = len(pair.b.vip_log)
    pair.a.restart(preempt=True)
    pair.run(3.0)
    assert pair.holders() == ["lb-b"]
    assert pair.b.vip_log[changes:] == []
    assert pair.a.state == BACKUP and len(pair.a.election.transitions) == 1


# Resign -------------------------------------------------------------------------------------


def test_a_clean_stop_resigns_and_the_peer_takes_over_at_once() -> None:
    """Stopping the ACTIVE node sends a resign; the backup is ACTIVE after one network hop."""
    pair = Pair(("lb1", 200), ("lb2", 100), latency=0.0005)
    pair.start()
    pair.run(1.0)
    assert pair.holders() == ["lb1"]
    stopped = pair.clock.seconds()
    pair.a.election.stop()
    resign = pair.a.sent[-1]
    assert resign.resign and resign.state == ACTIVE
    assert pair.a.state == INIT
    assert [what for _, what in pair.a.vip_log] == ["acquire", "release"]
    pair.alive.discard(pair.a)  # the process is gone after sending it
    pair.run(0.002)
    assert pair.b.state == ACTIVE
    (t_active,) = transition_times(pair.b, ACTIVE)
    assert t_active - stopped <= 0.001 + 1e-6  # one hop (and one run step)


def test_a_stopping_backup_says_it_leaves_and_the_active_peer_is_unmoved() -> None:
    """A BACKUP that stops sends one resign (it holds nothing): the ACTIVE peer stays
    ACTIVE, and knows there is nobody left to hand over to."""
    pair = Pair(("lb1", 200), ("lb2", 100))
    pair.start()
    pair.run(1.0)
    n = len(pair.b.sent)
    pair.b.election.stop()
    assert [hb.resign for hb in pair.b.sent[n:]] == [True]
    pair.run(1.0)
    assert pair.holders() == ["lb1"]
    assert pair.a.election.peer is not None and pair.a.election.peer.resign


# Split brain ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "winner"),
    [
        (("lb1", 200), ("lb2", 100), "lb1"),  # the lower priority yields
        (("lb1", 100), ("lb2", 200), "lb2"),
        (("lb-z", 100), ("lb-a", 100), "lb-a"),  # equal priority: the larger id yields
    ],
)
def test_split_brain_resolves_as_soon_as_they_hear_each_other(a: Any, b: Any, winner: str) -> None:
    """Both ACTIVE after a partition: on healing, the loser yields on the first heartbeat heard."""
    pair = Pair(a, b, latency=0.0005)
    pair.start()
    pair.run(1.0)
    pair.linked = False
    pair.run(1.0)
    assert sorted(pair.holders()) == sorted([pair.a.node_id, pair.b.node_id])
    loser = pair.a if pair.b.node_id == winner else pair.b
    pair.linked = True
    healed = pair.clock.seconds()
    pair.run(INTERVAL + 0.01)
    assert pair.holders() == [winner]
    (t_yield,) = [t for t, s in loser.election.transitions if s == BACKUP and t > healed]
    # At most one interval (the next heartbeat either way) plus the hop.
    assert t_yield - healed <= INTERVAL + 0.002
    assert loser.vip_log[-1][1] == "release"
    pair.run(2.0)
    assert pair.holders() == [winner]


def test_the_split_brain_winner_announces_again_at_once() -> None:
    """Hearing an outranked ACTIVE peer, the winner sends a heartbeat right away, not next tick."""
    pair = Pair(("lb1", 200), ("lb2", 100), latency=0.0005)
    pair.start()
    pair.run(1.0)
    pair.linked = False
    pair.run(1.0)
    assert sorted(pair.holders()) == ["lb1", "lb2"]
    pair.linked = True
    # Feed lb1 one ACTIVE heartbeat from lb2 directly, between lb1's own ticks.
    hb = Heartbeat("lb2", ACTIVE, 100, int(pair.clock.seconds() * 1_000_000) + 10, 0)
    before = len(pair.a.sent)
    pair.a.election.received(hb)
    assert len(pair.a.sent) == before + 1
    assert pair.a.sent[-1].state == ACTIVE and not pair.a.sent[-1].resign
    # ...and tells its owner, which puts back what the peer may have undone
    # meanwhile (with forward: kernel, a table on a shared host).
    assert pair.a.outranked == [pair.clock.seconds()] and pair.b.outranked == []
    pair.run(0.002)  # the announcement reaches lb2, which yields at once
    assert pair.holders() == ["lb1"]


# What is ignored ------------------------------------------------------------------------------


def _started(priority: int = 100) -> tuple[Clock, Election, list[Heartbeat]]:
    clock = Clock()
    clock.advance(1000)
    sent: list[Heartbeat] = []
    e = Election("me", priority, clock, sent.append, lambda: None, lambda: None)
    e.start()
    return clock, e, sent


def test_replayed_and_older_sequence_numbers_are_ignored() -> None:
    """A sequence number not above the last one accepted from that id is ignored."""
    clock, e, _ = _started(100)
    first = Heartbeat("peer", ACTIVE, 200, 5_000, 0)
    e.received(first)
    assert e.ignored == 0 and e.peer is first
    e.received(first)  # replay
    e.received(Heartbeat("peer", ACTIVE, 200, 4_999, 0))  # older
    assert e.ignored == 2 and e.peer is first
    # A replayed resign from the past cannot make this backup take over.
    e.received(Heartbeat("peer", ACTIVE, 200, 4_000, 0, resign=True))
    assert e.ignored == 3 and e.state == BACKUP
    e.received(Heartbeat("peer", ACTIVE, 200, 5_001, 0))
    assert e.ignored == 3 and e.peer is not None and e.peer.seq == 5_001


def test_a_replayed_heartbeat_does_not_keep_a_dead_peer_alive() -> None:
    """Replaying the dead active peer's last heartbeat does not stop the backup taking over."""
    clock, e, _ = _started(100)
    last = Heartbeat("peer", ACTIVE, 200, 1, 0)
    e.received(last)
    for _ in range(10):
        clock.advance(INTERVAL)
        e.received(last)
    assert e.state == ACTIVE
    assert e.ignored == 10


def test_a_heartbeat_from_our_own_id_is_ignored() -> None:
    """A heartbeat carrying our own id (a loop, a misconfigured peer) is ignored entirely."""
    clock, e, _ = _started(100)
    for seq in (10, 20, 30):
        e.received(Heartbeat("me", ACTIVE, 254, seq, 9, resign=True))
        clock.advance(INTERVAL)
    assert e.ignored == 3 and e.peer is None
    clock.advance(1.0)
    assert e.state == ACTIVE  # nobody outranked it, nothing reset its down timer


def test_an_init_node_ignores_heartbeats() -> None:
    """Before start (and after stop) heartbeats change nothing."""
    clock = Clock()
    e = Election("me", 100, clock, lambda hb: None, lambda: None, lambda: None)
    e.received(Heartbeat("peer", ACTIVE, 200, 1, 0, resign=True))
    assert e.state == INIT and e.peer is None


def test_peer_epochs_are_reported() -> None:
    """Every accepted heartbeat reports the peer's master-list epoch."""
    pair = Pair(("lb1", 200, True, 7), ("lb2", 100, True, 3))
    pair.start()
    pair.run(0.5)
    assert pair.b.peer_epochs and set(pair.b.peer_epochs) == {7}
    assert set(pair.a.peer_epochs) == {3}


def test_priority_out_of_range_is_refused() -> None:
    """Priorities 0 and 255 are VRRP's reserved values and are refused."""
    for bad in (0, 255):
        with pytest.raises(ValueError):
            Election("x", bad, Clock(), lambda hb: None, lambda: None, lambda: None)


# The UDP protocol: signatures -------------------------------------------------------------------


class _FakeUdp:
    def __init__(self) -> None:
        self.written: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, addr: Any) -> None:
        self.written.append((data, addr))


def test_protocol_drops_a_wrong_hmac_before_the_election_sees_it() -> None:
    """A heartbeat signed with another secret, or tampered with, is counted as bad and dropped."""
    clock, e, _ = _started(100)
    proto = HeartbeatProtocol(SECRET, ("127.0.0.1", 9))
    proto.election = e
    hb = Heartbeat("peer", ACTIVE, 200, 10, 0, resign=True)
    proto.datagramReceived(hb.encode(b"another secret"), ("127.0.0.1", 9))
    good = bytearray(hb.encode(SECRET))
    good[6] ^= 0x01  # flip a bit of the priority
    proto.datagramReceived(bytes(good), ("127.0.0.1", 9))
    assert proto.bad == 2 and e.peer is None and e.state == BACKUP
    proto.datagramReceived(hb.encode(SECRET), ("127.0.0.1", 9))
    assert proto.bad == 2 and e.state == ACTIVE  # the genuine resign is obeyed


def test_protocol_signs_what_it_sends_to_the_peer() -> None:
    """Outgoing heartbeats are signed with the secret and sent to the peer address."""
    proto = HeartbeatProtocol(SECRET, ("127.0.0.1", 4242))
    proto.send(Heartbeat("me", BACKUP, 1, 1, 0))  # no transport yet: dropped quietly
    transport = _FakeUdp()
    proto.makeConnection(transport)  # type: ignore[arg-type]
    proto.send(Heartbeat("me", BACKUP, 100, 77, 5))
    ((data, addr),) = transport.written
    assert addr == ("127.0.0.1", 4242)
    hb = Heartbeat.decode(data, SECRET)
    assert hb is not None and (hb.node_id, hb.seq, hb.epoch) == ("me", 77, 5)


# Wire format --------------------------------------------------------------------------------------


heartbeats = st.builds(
    Heartbeat,
    node_id=st.text(max_size=40),
    state=st.sampled_from([INIT, BACKUP, ACTIVE]),
    priority=st.integers(0, 255),
    seq=st.integers(0, 2**64 - 1),
    epoch=st.integers(0, 2**64 - 1),
    resign=st.booleans(),
)


@given(heartbeats, st.binary(min_size=1, max_size=64))
def test_encode_decode_round_trip(hb: Heartbeat, secret: bytes) -> None:
    """Every heartbeat decodes to itself with the right secret, and to None with a wrong one."""
    data = hb.encode(secret)
    back = Heartbeat.decode(data, secret)
    assert back is not None
    assert (back.node_id, back.state, back.priority, back.seq, back.epoch, back.resign) == (
        hb.node_id,
        hb.state,
        hb.priority,
        hb.seq,
        hb.epoch,
        hb.resign,
    )
    assert Heartbeat.decode(data, secret + b"x") is None
    assert Heartbeat.decode(data[:-1], secret) is None


@given(st.binary(max_size=200))
def test_garbage_never_raises(data: bytes) -> None:
    """Arbitrary bytes decode to None (or a heartbeat) and never raise."""
    assert Heartbeat.decode(data, SECRET) is None  # no MAC can match random bytes


@given(
    st.binary(min_size=4, max_size=4) | st.just(MAGIC),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 2**16 - 1),
    st.binary(max_size=40),
)
def test_signed_garbage_never_raises(
    magic: bytes, version: int, state: int, priority: int, flags: int, id_len: int, ident: bytes
) -> None:
    """A correctly signed but malformed body (magic, version, state, length, UTF-8) is refused."""
    body = HEADER.pack(magic, version, state, priority, flags, 1, 2, id_len) + ident
    data = body + hmac.new(SECRET, body, hashlib.sha256).digest()
    hb = Heartbeat.decode(data, SECRET)
    well_formed = magic == MAGIC and version == 1 and state <= 2 and id_len == len(ident)
    if hb is not None:
        assert well_formed
        assert hb.node_id.encode() == ident and hb.resign == bool(flags & 1)
    elif well_formed:
        with pytest.raises(UnicodeDecodeError):
            ident.decode()
