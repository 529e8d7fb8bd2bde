"""Heartbeats between the two load balancers, and who holds the VIP.

A small VRRP: each load balancer sends a signed UDP heartbeat to its peer
every ``interval`` (100 ms by default) carrying its id, priority, state, a
sequence number and the epoch of its master list.

* States are INIT, BACKUP and ACTIVE.  A node starts in INIT, becomes BACKUP
  at once and ACTIVE when it has heard no ACTIVE peer for 3 intervals plus a
  skew that is shorter for higher priorities (so two backups do not race).
* A clean stop sends a resign: the backup takes over at once.
* With ``preempt`` on, a backup of higher priority than the ACTIVE peer takes
  over; the peer, hearing an ACTIVE of higher priority, yields.
* If both are ACTIVE (split brain after a partition heals), the lower
  priority (or, at equal priority, the larger id) yields as soon as they
  hear each other, and the winner announces itself again at once.
* Heartbeats are HMAC-SHA256 signed over a shared secret; a wrong MAC, a
  replayed or older sequence number, or our own id is ignored.  Sequence
  numbers are microsecond timestamps, so they keep growing across restarts.

The state machine is plain logic driven by an injected clock; the UDP
transport is a thin ``DatagramProtocol`` around it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

log = Logger()

INIT = "INIT"
BACKUP = "BACKUP"
ACTIVE = "ACTIVE"
_STATE_CODES = {INIT: 0, BACKUP: 1, ACTIVE: 2}
_STATE_NAMES = {v: k for k, v in _STATE_CODES.items()}

MAGIC = b"KVHB"
VERSION = 1
FLAG_RESIGN = 1
#: magic, version, state, priority, flags, sequence, epoch, id length
HEADER = struct.Struct("!4sBBBBQQH")
MAC_SIZE = 32


class Heartbeat:
    """One decoded heartbeat."""

    __slots__ = ("node_id", "state", "priority", "resign", "seq", "epoch")

    def __init__(
        self, node_id: str, state: str, priority: int, seq: int, epoch: int, resign: bool = False
    ) -> None:
        self.node_id = node_id
        self.state = state
        self.priority = priority
        self.seq = seq
        self.epoch = epoch
        self.resign = resign

    def encode(self, secret: bytes) -> bytes:
        ident = self.node_id.encode()
        body = (
            HEADER.pack(
                MAGIC,
                VERSION,
                _STATE_CODES[self.state],
                self.priority,
                FLAG_RESIGN if self.resign else 0,
                self.seq,
                self.epoch,
                len(ident),
            )
            + ident
        )
        return body + hmac.new(secret, body, hashlib.sha256).digest()

    @classmethod
    def decode(cls, data: bytes, secret: bytes) -> Optional[Heartbeat]:
        """The heartbeat, or None if it is malformed or its MAC is wrong."""
        if len(data) < HEADER.size + MAC_SIZE:
            return None
        body, mac = data[:-MAC_SIZE], data[-MAC_SIZE:]
        if not hmac.compare_digest(hmac.new(secret, body, hashlib.sha256).digest(), mac):
            return None
        magic, version, state, priority, flags, seq, epoch, id_len = HEADER.unpack_from(body)
        if magic != MAGIC or version != VERSION or state not in _STATE_NAMES:
            return None
        if HEADER.size + id_len != len(body):
            return None
        try:
            node_id = body[HEADER.size :].decode()
        except UnicodeDecodeError:
            return None
        return cls(node_id, _STATE_NAMES[state], priority, seq, epoch, bool(flags & FLAG_RESIGN))


class Election:
    """The VRRP-like state machine of one load balancer."""

    def __init__(
        self,
        node_id: str,
        priority: int,
        clock: IReactorTime,
        send: Callable[[Heartbeat], None],
        on_active: Callable[[], None],
        on_backup: Callable[[], None],
        interval: float = 0.1,
        preempt: bool = True,
        epoch: Callable[[], int] = lambda: 0,
        on_peer_epoch: Optional[Callable[[int], None]] = None,
        on_outranked_peer: Optional[Callable[[], None]] = None,
    ) -> None:
        if not 1 <= priority <= 254:
            raise ValueError("priority must be 1..254")
        self.node_id = node_id
        self.priority = priority
        self.clock = clock
        self.send = send
        self.on_active = on_active
        self.on_backup = on_backup
        self.interval = interval
        self.preempt = preempt
        self.epoch = epoch
        self.on_peer_epoch = on_peer_epoch
        #: While ACTIVE: a peer that is ACTIVE too and will yield was heard.
        self.on_outranked_peer = on_outranked_peer
        self.state = INIT
        self.transitions: list[tuple[float, str]] = []
        self.peer: Optional[Heartbeat] = None
        self.peer_seen = 0.0
        self.ignored = 0
        self._last_seq = 0
        self._peer_seq: dict[str, int] = {}
        self._tick: Any = None
        self._down: Any = None

    # Timing ----------------------------------------------------------------------

    @property
    def skew(self) -> float:
        """Higher priorities wait less before taking over (VRRP's skew time)."""
        return (256 - self.priority) / 256 * self.interval

    @property
    def down_interval(self) -> float:
        return 3 * self.interval + self.skew

    def _seq(self) -> int:
        seq = max(int(self.clock.seconds() * 1_000_000), self._last_seq + 1)
        self._last_seq = seq
        return seq

    # Life cycle ------------------------------------------------------------------

    def start(self) -> None:
        self._become(BACKUP, "started")
        self._arm_down()
        self._tick = self.clock.callLater(0, self._heartbeat)

    def stop(self) -> None:
        """A clean stop: an ACTIVE node resigns so the peer takes over at once; a
        BACKUP says it is leaving the same way."""
        for call in (self._tick, self._down):
            if call is not None and call.active():
                call.cancel()
        self._tick = self._down = None
        if self.state == ACTIVE:
            self.send(self._message(resign=True))
            self.state = BACKUP
            self.on_backup()
        elif self.state == BACKUP:
            # Leaving: an ACTIVE peer then knows there is nobody to hand over to
            # (with forward: kernel it deletes its table when it stops).
            self.send(self._message(resign=True))
        self.state = INIT

    def _message(self, resign: bool = False) -> Heartbeat:
        return Heartbeat(self.node_id, self.state, self.priority, self._seq(), self.epoch(), resign)

    def _heartbeat(self) -> None:
        self._tick = self.clock.callLater(self.interval, self._heartbeat)
        self.send(self._message())

    def announce(self) -> None:
        """Send a heartbeat now (after winning a split brain, after taking over)."""
        self.send(self._message())

    def _arm_down(self) -> None:
        if self._down is not None and self._down.active():
            self._down.reset(self.down_interval)
        else:
            self._down = self.clock.callLater(self.down_interval, self._peer_down)

    def _peer_down(self) -> None:
        self._down = None
        if self.state == BACKUP:
            self._become(ACTIVE, "no heartbeat from an active peer")

    def _become(self, state: str, why: str) -> None:
        if state == self.state:
            return
        old = self.state
        self.state = state
        self.transitions.append((self.clock.seconds(), state))
        log.info(
            "load balancer {node} is {state} (was {old}): {why}",
            node=self.node_id,
            state=state,
            old=old,
            why=why,
        )
        if state == ACTIVE:
            self.on_active()
            self.announce()
        elif state == BACKUP and old == ACTIVE:
            self.on_backup()

    # Receiving -------------------------------------------------------------------

    def received(self, hb: Heartbeat) -> None:
        if self.state == INIT:
            return
        if hb.node_id == self.node_id or hb.seq <= self._peer_seq.get(hb.node_id, 0):
            self.ignored += 1
            return
        self._peer_seq[hb.node_id] = hb.seq
        self.peer = hb
        self.peer_seen = self.clock.seconds()
        if self.on_peer_epoch is not None:
            self.on_peer_epoch(hb.epoch)
        if hb.resign:
            if self.state == BACKUP:
                self._become(ACTIVE, f"{hb.node_id} resigned")
            return
        if hb.state != ACTIVE:
            if self.state == BACKUP:
                # Nobody holds the VIP as far as this peer says; keep waiting for
                # the down timer unless this node should hold it anyway.
                return
            return
        # The peer is ACTIVE.
        if self.state == ACTIVE:
            if self._outranks(hb):
                self.announce()  # the peer will yield
                if self.on_outranked_peer is not None:
                    # While it thought itself alone it may have undone some of
                    # what holding the VIP set up here (a shared kernel table).
                    self.on_outranked_peer()
            else:
                self._become(BACKUP, f"split brain: {hb.node_id} outranks this node")
                self._arm_down()
            return
        # This node is BACKUP and hears an ACTIVE peer.  Only a strictly higher
        # priority preempts: the id tie-break is for split brain, not for taking
        # the VIP from a healthy peer of equal priority.
        if self.preempt and self.priority > hb.priority:
            self._become(ACTIVE, f"preempting lower-priority {hb.node_id}")
            return
        self._arm_down()

    def _outranks(self, hb: Heartbeat) -> bool:
        if self.priority != hb.priority:
            return self.priority > hb.priority
        return self.node_id < hb.node_id


class HeartbeatProtocol(DatagramProtocol):
    """UDP transport for an Election: signs outgoing and checks incoming heartbeats."""

    def __init__(self, secret: bytes, peer: tuple[str, int]) -> None:
        self.secret = secret
        self.peer_address = peer
        self.election: Optional[Election] = None
        self.bad = 0

    def send(self, hb: Heartbeat) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(hb.encode(self.secret), self.peer_address)
        except OSError as e:  # no route yet, peer namespace gone: try next time
            log.debug("heartbeat not sent: {why}", why=str(e))

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        hb = Heartbeat.decode(data, self.secret)
        if hb is None:
            self.bad += 1
            log.warn("ignored a heartbeat with a bad signature or format from {addr}", addr=addr)
            return
        if self.election is not None:
            self.election.received(hb)
