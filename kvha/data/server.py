"""The data node's side of the internal protocol.

``DataNode`` holds the store and the node's timers; ``DataServerProtocol`` is
the thin adapter that turns frames into store calls and results into frames
(the split Tahoe-LAFS makes between ``StorageServer`` and its wire servers).

Replies are gathered per connection and written once per reactor turn.  With
a durable engine every reply, reads included, waits for the engine's
``commit`` that the turn ends with, so nothing is acknowledged or shown to a
reader before it is durable under the fsync policy, and one ``fdatasync``
covers every connection's writes in that turn (group commit).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Final, Optional

from twisted.application import service
from twisted.internet import interfaces
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from kvha import __version__, wire
from kvha.data.engine import Engine
from kvha.data.quota import PartitionRule
from kvha.data.store import IncrMode, Result, Status, Store, StoreMode
from kvha.flush import at_turn_end, direct_socket, no_delay, send_now
from kvha.record import HEADER_SIZE

log = Logger(namespace=__name__)  # compiled (mypyc): no frame to take the name from

#: How often the node runs engine maintenance and the expiry sweep.
TICK_SECONDS = 0.1
#: Cap on bytes in one stream batch, whatever batch_records says.
STREAM_BATCH_BYTES = 1 << 20


class DataNode(service.Service):
    """A data node: one store, its timers, and the counters behind ``stats``."""

    def __init__(
        self,
        node_id: str,
        engine: Engine,
        secret: bytes,
        clock: IReactorTime,
        *,
        tombstone_ttl: float = 7 * 86400.0,
        max_value_bytes: int = 1 << 20,
        max_frame_bytes: int = wire.DEFAULT_MAX_FRAME,
        max_connections: int = 1024,
        max_in_flight: int = 1024,
        sweep_interval: float = 1.0,
        sweep_batch: int = 1000,
        stream_batch_records: int = 512,
        stream_max_bytes_per_second: int = 0,
        urandom: Callable[[int], bytes] = os.urandom,
        merge_on_start: bool = False,
        state_dir: Optional[str] = None,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.secret = secret
        self.store = Store(engine, clock.seconds, tombstone_ttl, max_value_bytes)
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.max_in_flight = max_in_flight
        self.sweep_interval = sweep_interval
        self.sweep_batch = sweep_batch
        self.stream_batch_records = stream_batch_records
        self.stream_max_bytes_per_second = stream_max_bytes_per_second
        self.urandom = urandom
        # A node that starts (or restarts) may have missed writes: it is
        # "merging", written but never read, until a master has merged its
        # ranges from the other copies and tells it it is up.
        self.state = "merging" if merge_on_start else "up"
        self.state_dir = state_dir
        self.merge_holder: Optional[str] = None
        self.merge_expires = 0.0
        self.merge_progress = (0, 0, 0)  # keys, bytes, estimated total keys
        self.merges_completed = 0
        self.retain_running = 0
        self.retain_removed = 0
        #: Epoch of the cluster map the partition rules came from (-1: none yet).
        self.partitions_epoch = -1
        self._last_alive_write = 0.0
        self.started = clock.seconds()
        self.connections: set[DataServerProtocol] = set()
        self.total_connections = 0
        self.rejected_connections = 0
        self.auth_failures = 0
        self.bad_frames = 0
        self.ops: dict[str, int] = {}
        self.get_hits = 0
        self.get_misses = 0
        self._dirty: list[DataServerProtocol] = []
        self._at_end = at_turn_end(self.clock)
        self._flush_pending = False
        self._loops: list[LoopingCall] = []
        self._last_sweep = 0.0

    # Service ----------------------------------------------------------------

    def startService(self) -> None:
        began = time.monotonic()
        self.store.open()
        log.info(
            "data node {node} opened {engine} store: {records} records, high water {high}, "
            "in {seconds:.3f}s",
            node=self.node_id,
            engine=self.store.engine.name,
            records=self.store.engine.count(),
            high=self.store.engine.high_water,
            seconds=time.monotonic() - began,
        )
        self.started = self.clock.seconds()
        self._check_absence()
        loop = LoopingCall(self._tick)
        loop.clock = self.clock
        loop.start(TICK_SECONDS, now=False)
        self._loops.append(loop)
        service.Service.startService(self)

    def stopService(self) -> Any:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        for proto in list(self.connections):
            proto.transport.loseConnection()
        self.flush()
        self.store.close()
        log.info("data node {node} stopped", node=self.node_id)
        return service.Service.stopService(self)

    # Absence: a durable node away longer than tombstone_ttl must not rejoin.

    def _alive_path(self) -> Optional[str]:
        if not self.state_dir or not self.store.engine.durable:
            return None
        return os.path.join(self.state_dir, "alive")

    def _check_absence(self) -> None:
        """Refuse to rejoin after an absence longer than tombstone_ttl.

        Tombstones of deletes made meanwhile may already be collected on the
        other copies, so merging this node back would resurrect deleted keys.
        """
        path = self._alive_path()
        if path is None or not os.path.exists(path):
            return
        try:
            with open(path) as f:
                last = float(f.read().strip() or 0)
        except (OSError, ValueError):
            return
        away = self.clock.seconds() - last
        if away > self.store.tombstone_ttl and self.store.engine.count() > 0:
            self.state = "stale"
            log.error(
                "data node {node} was away for {away:.0f}s, longer than tombstone_ttl "
                "({ttl:.0f}s): deletes made meanwhile may be forgotten by the other copies, "
                "so it will not merge back.  Wipe {dir} and restart it to rejoin empty.",
                node=self.node_id,
                away=away,
                ttl=self.store.tombstone_ttl,
                dir=self.state_dir,
            )

    def _mark_alive(self, now: float) -> None:
        path = self._alive_path()
        if path is None or now - self._last_alive_write < 1.0 or self.state == "stale":
            return
        self._last_alive_write = now
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                f.write(repr(now))
            os.replace(tmp, path)
        except OSError as e:
            log.warn("could not record liveness in {path}: {why}", path=path, why=str(e))

    # Dropping moved ranges ----------------------------------------------------------

    def retain(self, ranges: list[tuple[int, int]]) -> None:
        """Keep only ``ranges``; the rest is removed in small steps between requests."""
        if not ranges:
            return  # an empty list would mean "everything" to in_ranges: never drop all
        steps = self.store.retain_steps(ranges)
        self.retain_running += 1
        log.info(
            "data node {node}: dropping records outside {n} ranges",
            node=self.node_id,
            n=len(ranges),
        )

        def step() -> None:
            try:
                removed = next(steps)
            except StopIteration:
                self.retain_running -= 1
                self.store.engine.commit()
                log.info("data node {node}: moved ranges dropped", node=self.node_id)
                return
            self.retain_removed = removed
            self.store.engine.commit()
            self.clock.callLater(0, step)

        self.clock.callLater(0, step)

    # Partition rules ----------------------------------------------------------------

    def set_partitions(self, msg: wire.Partitions) -> wire.Message:
        """Adopt a master's partition table (quotas and default TTLs) unless it is older."""
        n = len(msg.names)
        if not (len(msg.limits) == len(msg.evict) == len(msg.ttls) == n):
            return wire.Error(wire.E_BAD_REQUEST, "partition table fields differ in length")
        if msg.epoch < self.partitions_epoch:
            return wire.Result(Status.STALE, b"")
        rules = {
            name: PartitionRule(limit, bool(evict), ttl)
            for name, limit, evict, ttl in zip(msg.names, msg.limits, msg.evict, msg.ttls)
        }
        changed = msg.epoch != self.partitions_epoch or any(
            name not in self.store.rules or not self.store.rules[name].same_as(rule)
            for name, rule in rules.items()
        )
        self.partitions_epoch = msg.epoch
        self.store.configure_partitions(rules)
        if changed:
            log.info(
                "data node {node}: partition rules of map epoch {epoch}: {rules}",
                node=self.node_id,
                epoch=msg.epoch,
                rules=", ".join(
                    f"{k.decode('utf-8', 'replace')}={v!r}" for k, v in sorted(rules.items())
                )
                or "none",
            )
        return wire.Result(Status.OK, b"")

    # Merge coordination ---------------------------------------------------------

    def control(self, msg: wire.Control) -> wire.ControlReply:
        now = self.clock.seconds()
        granted = 0
        if msg.action == wire.CONTROL_CLAIM:
            free = self.merge_holder in (None, msg.holder) or now > self.merge_expires
            if self.state == "merging" and free:
                if self.merge_holder != msg.holder:
                    log.info(
                        "merge of {node} claimed by {holder}", node=self.node_id, holder=msg.holder
                    )
                self.merge_holder = msg.holder
                self.merge_expires = now + msg.lease_ms / 1000.0
                self.merge_progress = (msg.done_keys, msg.done_bytes, msg.total_keys)
                granted = 1
        elif msg.action == wire.CONTROL_FINISH:
            if self.state == "merging" and self.merge_holder == msg.holder:
                self.merge_progress = (msg.done_keys, msg.done_bytes, msg.total_keys)
                self.state = "up"
                self.merge_holder = None
                self.merges_completed += 1
                log.info(
                    "data node {node} is up: merge by {holder} done ({keys} records, "
                    "{bytes} bytes)",
                    node=self.node_id,
                    holder=msg.holder,
                    keys=msg.done_keys,
                    bytes=msg.done_bytes,
                )
                granted = 1
        elif msg.action == wire.CONTROL_RELEASE and self.merge_holder == msg.holder:
            self.merge_holder = None
            granted = 1
        return wire.ControlReply(granted, self.state, self.store.engine.high_water)

    def _tick(self) -> None:
        now = self.clock.seconds()
        self._mark_alive(now)
        if now - self._last_sweep >= self.sweep_interval:
            self._last_sweep = now
            self.store.sweep(self.sweep_batch)
        self.store.engine.maintenance(now)
        if self.store.engine.needs_commit:
            # The sweep's removals are logged like any other write.
            self.store.engine.commit()

    # Group commit -------------------------------------------------------------

    def reply_ready(self, proto: DataServerProtocol) -> None:
        """A connection has replies to send once the current turn is committed."""
        self._dirty.append(proto)
        if not self._flush_pending:
            self._flush_pending = True
            self._at_end(self._turn_end)

    def _turn_end(self) -> None:
        if self._flush_pending:  # not flushed early (stopService)
            self.flush()

    def flush(self) -> None:
        self._flush_pending = False
        try:
            self.store.engine.commit()
        except OSError:
            log.failure("commit failed; closing the connections waiting on it")
            for proto in self._dirty:
                proto.abort_pending()
            self._dirty.clear()
            return
        dirty, self._dirty = self._dirty, []
        for proto in dirty:
            proto.send_pending()

    # Stats --------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node_id": self.node_id,
            "pid": os.getpid(),
            "version": __version__,
            "uptime": int(self.clock.seconds() - self.started),
            "state": self.state,
            "engine": self.store.engine.name,
            "curr_connections": len(self.connections),
            "total_connections": self.total_connections,
            "rejected_connections": self.rejected_connections,
            "auth_failures": self.auth_failures,
            "bad_frames": self.bad_frames,
            "get_hits": self.get_hits,
            "get_misses": self.get_misses,
            "merge_holder": self.merge_holder or "",
            "merge_done_keys": self.merge_progress[0],
            "merge_done_bytes": self.merge_progress[1],
            "merge_total_keys": self.merge_progress[2],
            "merges_completed": self.merges_completed,
            "map_epoch": self.partitions_epoch,
            "retain_running": self.retain_running,
            "retain_removed": self.retain_removed,
        }
        for name, count in sorted(self.ops.items()):
            out[f"cmd_{name}"] = count
        engine = self.store.engine
        for partition in engine.partitions():
            name = partition.decode("utf-8", "replace")
            out[f"records:{name}"] = engine.count(partition) - engine.tombstones(partition)
            out[f"bytes:{name}"] = engine.bytes_used(partition)
        for partition, rule in self.store.rules.items():
            if rule.limit:
                name = partition.decode("utf-8", "replace")
                out[f"limit:{name}"] = rule.limit
                out[f"evicted:{name}"] = rule.evicted
                out[f"rejected:{name}"] = rule.rejected
        out.update(self.store.stats())
        out.update(self.store.engine.stats())
        return out


class StreamSender:
    """One outgoing record stream, paced by credit, back-pressure and a byte rate."""

    def __init__(self, proto: DataServerProtocol, request_id: int, msg: wire.Stream) -> None:
        self.proto = proto
        self.request_id = request_id
        self.records = proto.node.store.stream(msg.ranges, msg.min_version, msg.partitions)
        self.credit = msg.window
        self.count = 0
        self.bytes = 0
        self.done = False
        self._call: Any = None

    def grant(self, batches: int) -> None:
        self.credit += batches
        self.schedule()

    def schedule(self, delay: float = 0.0) -> None:
        if self._call is None and not self.done:
            self._call = self.proto.node.clock.callLater(delay, self._send)

    def cancel(self) -> None:
        self.done = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _send(self) -> None:
        self._call = None
        if self.done or self.credit <= 0 or self.proto.paused:
            return  # resumed by Credit or resumeProducing
        node = self.proto.node
        batch = []
        size = 0
        for record in self.records:
            batch.append(record)
            size += len(record[0]) + len(record[1]) + len(record[2]) + 10
            if len(batch) >= node.stream_batch_records or size >= STREAM_BATCH_BYTES:
                break
        else:
            self.done = True
        if batch:
            if node.store.engine.needs_commit:
                node.store.engine.commit()  # never show a record before it is durable
            self.credit -= 1
            self.count += len(batch)
            self.bytes += size
            self.proto.transport.write(wire.StreamBatch(batch).frame(self.request_id))
        if self.done:
            self.proto.transport.write(
                wire.StreamEnd(self.count, self.bytes).frame(self.request_id)
            )
            self.proto.streams.pop(self.request_id, None)
            return
        rate = node.stream_max_bytes_per_second
        self.schedule(size / rate if rate else 0.0)


@implementer(interfaces.IPushProducer, interfaces.IHandshakeListener)
class DataServerProtocol(Protocol):
    """One master's connection to this data node."""

    #: Producer and consumer as well as a TCP/TLS transport (registerProducer,
    #: pauseProducing, abortConnection): no one Twisted interface covers all of it.
    transport: Any

    def __init__(self, node: DataNode) -> None:
        self.node = node
        self.reader = wire.FrameReader(node.max_frame_bytes)
        self.authenticated = False
        self.peer_id = "?"
        self.nonce = b""
        self.out: list[bytes] = []
        self.streams: dict[int, StreamSender] = {}
        self.paused = False
        self.closing = False
        self.sock: Any = None  # the TCP socket, for replies without a reactor round (kvha.flush)

    # Connection -----------------------------------------------------------------

    def connectionMade(self) -> None:
        node = self.node
        node.total_connections += 1
        if len(node.connections) >= node.max_connections:
            node.rejected_connections += 1
            log.warn(
                "refused a connection from {peer}: {limit} connections already open",
                peer=self.transport.getPeer(),
                limit=node.max_connections,
            )
            self._fatal(wire.E_LIMIT, "too many connections")
            return
        node.connections.add(self)
        no_delay(self.transport)
        self.sock = direct_socket(self.transport)
        if not interfaces.ISSLTransport.providedBy(self.transport):
            self.transport.registerProducer(self, True)
        # Over TLS, not before the handshake is done: TLS pauses a registered
        # producer while it buffers the handshake, and pausing would stop the
        # reads the handshake needs (see handshakeCompleted).
        self.nonce = node.urandom(32)
        self.transport.write(
            wire.Challenge(wire.PROTOCOL_VERSION, node.node_id, self.nonce).frame(0)
        )

    def handshakeCompleted(self) -> None:
        """TLS is up: from now on a full write buffer pauses reading requests."""
        if not self.closing:
            self.transport.registerProducer(self, True)

    def connectionLost(self, reason: Any = None) -> None:
        self.node.connections.discard(self)
        for sender in self.streams.values():
            sender.cancel()
        self.streams.clear()
        self.out.clear()

    def _fatal(self, code: int, message: str, request_id: int = 0) -> None:
        """Answer with an error and close: the stream cannot be trusted any more."""
        self.closing = True
        self.out.clear()
        self.transport.write(wire.Error(code, message).frame(request_id))
        self.transport.loseConnection()

    # IPushProducer: the transport's buffer is full, so stop reading requests.

    def pauseProducing(self) -> None:
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.transport.resumeProducing()
        for sender in list(self.streams.values()):
            sender.schedule()

    def stopProducing(self) -> None:
        self.paused = True

    # Requests -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            chunk, end = self.reader.take(data)
        except wire.WireError as e:
            self.node.bad_frames += 1
            log.warn(
                "closing connection from {peer} ({id}): bad frame: {why}",
                peer=self.transport.getPeer(),
                id=self.peer_id,
                why=str(e),
            )
            self._fatal(
                wire.E_TOO_LARGE if isinstance(e, wire.FrameTooLarge) else wire.E_BAD_REQUEST,
                str(e),
            )
            return
        if not end:
            return
        out = self.out
        node = self.node
        store = node.store
        authenticated = self.authenticated
        # Apply and Get, the hot path, are decoded in place (no body copy, no
        # Message) and counted here, into node.ops and the hit counters before
        # any other request (a Stats among them sees them) and at the end.
        applies = gets = hits = misses = 0
        offset = 0
        while offset < end:
            opcode, request_id, start, stop = wire.frame_at(chunk, offset)
            offset = stop
            if opcode == _APPLY and authenticated:
                try:
                    partition, key, packed = wire.apply_fields(chunk, start, stop)
                except wire.WireError as e:
                    out.append(self._bad_request("apply", request_id, e))
                    continue
                applies += 1
                if len(packed) < HEADER_SIZE:
                    out.append(_SHORT_RECORD.frame(request_id))
                    continue
                try:
                    result = store.apply(partition, key, packed)
                    reply = wire.result_frame(request_id, result.status, _sent_back(result, packed))
                except Exception as err:
                    reply = _internal_error("apply", err, request_id)
                out.append(reply)
            elif opcode == _GET and authenticated:
                try:
                    partition, key, tombstones = wire.get_fields(chunk, start, stop)
                except wire.WireError as e:
                    out.append(self._bad_request("get", request_id, e))
                    continue
                gets += 1
                try:
                    found = store.get_packed(partition, key, bool(tombstones))
                    if found is None:
                        reply = wire.result_frame(request_id, Status.NOT_FOUND, b"")
                        misses += 1
                    else:
                        reply = wire.result_frame(request_id, Status.OK, found)
                        hits += 1
                except Exception as err:
                    reply = _internal_error("get", err, request_id)
                out.append(reply)
            else:
                if applies or gets:
                    _count(node, applies, gets, hits, misses)
                    applies = gets = hits = misses = 0
                if not authenticated:
                    self._hello(opcode, request_id, chunk[start:stop])
                    if self.closing:
                        return
                    authenticated = self.authenticated
                    continue
                self._request(opcode, request_id, chunk[start:stop])
        if applies or gets:
            _count(node, applies, gets, hits, misses)
        if out:
            if store.engine.needs_commit:
                node.reply_ready(self)
            else:
                self.send_pending()

    def _request(self, opcode: int, request_id: int, body: bytes) -> None:
        """Any request but the hot path's: decoded to a Message, to its handler."""
        entry = _HANDLERS.get(opcode)
        if entry is None:
            self.node.bad_frames += 1
            self.out.append(
                wire.Error(wire.E_UNKNOWN_OP, f"unknown opcode {opcode}").frame(request_id)
            )
            return
        name, cls, handler = entry
        try:
            msg = cls.decode(body)
        except wire.WireError as e:
            self.out.append(self._bad_request(name, request_id, e))
            return
        ops = self.node.ops
        ops[name] = ops.get(name, 0) + 1
        try:
            reply = handler(self, msg, request_id)
        except Exception as err:  # not `e`: mypyc types one name per function
            reply = _internal_error(name, err, request_id)
        if reply is not None:
            self.out.append(reply if type(reply) is bytes else reply.frame(request_id))

    def _bad_request(self, name: str, request_id: int, e: Exception) -> bytes:
        self.node.bad_frames += 1
        log.warn("bad {op} request from {id}: {why}", op=name, id=self.peer_id, why=str(e))
        return wire.Error(wire.E_BAD_REQUEST, str(e)).frame(request_id)

    def send_pending(self) -> None:
        if self.out and not self.closing:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            send_now(self.transport, self.sock, data)

    def abort_pending(self) -> None:
        self.out.clear()
        self.transport.abortConnection()

    def _hello(self, opcode: int, request_id: int, body: bytes) -> None:
        peer = self.transport.getPeer()
        if opcode != wire.Hello.OPCODE:
            self.node.auth_failures += 1
            log.warn("refused {peer}: request before HELLO", peer=peer)
            self._fatal(wire.E_NOT_AUTHENTICATED, "HELLO required first", request_id)
            return
        try:
            hello = wire.Hello.decode(body)
        except wire.WireError as e:
            self.node.auth_failures += 1
            self._fatal(wire.E_BAD_REQUEST, f"bad HELLO: {e}", request_id)
            return
        if hello.version != wire.PROTOCOL_VERSION:
            self.node.auth_failures += 1
            log.warn(
                "refused {peer}: protocol version {theirs}, this node speaks {ours}",
                peer=peer,
                theirs=hello.version,
                ours=wire.PROTOCOL_VERSION,
            )
            self._fatal(
                wire.E_VERSION,
                f"protocol version {hello.version} is not supported (this node speaks "
                f"{wire.PROTOCOL_VERSION})",
                request_id,
            )
            return
        if not wire.proof_ok(self.node.secret, wire.CLIENT_LABEL, self.nonce, hello.proof):
            self.node.auth_failures += 1
            log.warn("refused {peer} ({id}): wrong cluster secret", peer=peer, id=hello.node_id)
            self._fatal(wire.E_AUTH, "authentication failed: wrong cluster secret", request_id)
            return
        self.authenticated = True
        self.peer_id = hello.node_id
        welcome = wire.Welcome(
            self.node.node_id,
            wire.proof(self.node.secret, wire.SERVER_LABEL, self.nonce),
            self.node.state,
        )
        self.transport.write(welcome.frame(request_id))

    # Handlers: each returns the reply message, or None when it answers later.

    def _mget(self, msg: wire.MultiGet, request_id: int) -> wire.Message:
        get = self.node.store.get_packed
        records = []
        hits = 0
        for key in msg.keys:
            packed = get(msg.partition, key, bool(msg.tombstones))
            if packed is not None:
                hits += 1
            records.append((msg.partition, key, packed or b""))
        self.node.get_hits += hits
        self.node.get_misses += len(msg.keys) - hits
        return wire.Records(records)

    def _apply_many(self, msg: wire.ApplyMany, request_id: int) -> wire.Message:
        keys, records = msg.keys, msg.packed
        if len(keys) != len(records):
            return wire.Error(
                wire.E_BAD_REQUEST, f"ApplyMany has {len(keys)} keys but {len(records)} records"
            )
        # Checked before anything is stored: a bad request stores nothing.
        if any(len(packed) < HEADER_SIZE for packed in records):
            return wire.Error(wire.E_BAD_REQUEST, "a packed record is shorter than its header")
        apply = self.node.store.apply
        partition = msg.partition
        statuses = bytearray()
        back = []
        for key, packed in zip(keys, records):
            result = apply(partition, key, packed)
            statuses.append(result.status)
            back.append(_sent_back(result, packed))
        return wire.Results(bytes(statuses), back)

    def _store(self, msg: wire.Store, request_id: int) -> wire.Message:
        try:
            mode = StoreMode(msg.mode)
        except ValueError:
            return wire.Error(wire.E_BAD_REQUEST, f"unknown store mode {msg.mode}")
        return _result(
            self.node.store.store(
                mode, msg.partition, msg.key, msg.value, msg.flags, msg.expires_ms, msg.cas
            )
        )

    def _incr(self, msg: wire.Incr, request_id: int) -> wire.Message:
        try:
            mode = IncrMode(msg.mode)
        except ValueError:
            return wire.Error(wire.E_BAD_REQUEST, f"unknown incr mode {msg.mode}")
        return _result(self.node.store.incr(msg.partition, msg.key, mode, msg.delta))

    def _touch(self, msg: wire.Touch, request_id: int) -> wire.Message:
        return _result(self.node.store.touch(msg.partition, msg.key, msg.expires_ms))

    def _delete(self, msg: wire.Delete, request_id: int) -> wire.Message:
        return _result(self.node.store.delete(msg.partition, msg.key, msg.version))

    def _flush(self, msg: wire.Flush, request_id: int) -> wire.Message:
        removed = self.node.store.flush(msg.partition)
        log.info(
            "flushed partition {partition}: {removed} records, asked by {id}",
            partition=msg.partition.decode("utf-8", "replace"),
            removed=removed,
            id=self.peer_id,
        )
        return wire.Result(Status.OK, b"")

    def _scan(self, msg: wire.Scan, request_id: int) -> wire.Message:
        found = self.node.store.scan(msg.partition, msg.after, min(msg.count, 100_000))
        return wire.ScanReply([t for t, _ in found], [k for _, k in found])

    def _retain(self, msg: wire.Retain, request_id: int) -> wire.Message:
        self.node.retain(msg.ranges)
        return wire.Result(Status.OK, b"")

    def _control(self, msg: wire.Control, request_id: int) -> wire.Message:
        return self.node.control(msg)

    def _partitions(self, msg: wire.Partitions, request_id: int) -> wire.Message:
        return self.node.set_partitions(msg)

    def _ping(self, msg: wire.Ping, request_id: int) -> wire.Message:
        return wire.Pong(self.node.state, self.node.store.engine.high_water)

    def _stats(self, msg: wire.Stats, request_id: int) -> wire.Message:
        pairs = []
        for name, value in self.node.stats().items():
            pairs.append(name.encode())
            pairs.append(str(value).encode())
        return wire.StatsReply(pairs)

    def _stream(self, msg: wire.Stream, request_id: int) -> Optional[wire.Message]:
        if request_id in self.streams:
            return wire.Error(wire.E_BAD_REQUEST, f"stream {request_id} is already running")
        if len(self.streams) >= self.node.max_in_flight:
            return wire.Error(wire.E_LIMIT, "too many streams on this connection")
        if msg.window < 1:
            return wire.Error(wire.E_BAD_REQUEST, "stream window must be at least 1")
        sender = StreamSender(self, request_id, msg)
        self.streams[request_id] = sender
        log.info(
            "stream {stream} to {id}: {ranges} ranges above version {min}",
            stream=request_id,
            id=self.peer_id,
            ranges=len(msg.ranges) or "all",
            min=msg.min_version,
        )
        sender.schedule()
        return None

    def _credit(self, msg: wire.Credit, request_id: int) -> None:
        sender = self.streams.get(request_id)
        if sender is not None:
            sender.grant(msg.batches)
        return None

    def _cancel(self, msg: wire.Cancel, request_id: int) -> None:
        sender = self.streams.pop(request_id, None)
        if sender is not None:
            sender.cancel()
        return None


def _count(node: DataNode, applies: int, gets: int, hits: int, misses: int) -> None:
    """Add a batch's hot-path requests to the node's counters."""
    ops = node.ops
    if applies:
        ops["apply"] = ops.get("apply", 0) + applies
    if gets:
        ops["get"] = ops.get("get", 0) + gets
    node.get_hits += hits
    node.get_misses += misses


def _internal_error(name: str, err: Exception, request_id: int) -> bytes:
    log.failure("internal error handling {op}", op=name)
    return wire.Error(wire.E_INTERNAL, f"internal error: {err}").frame(request_id)


_SHORT_RECORD = wire.Error(wire.E_BAD_REQUEST, "packed record is shorter than its header")


def _sent_back(result: Result, sent: bytes) -> bytes:
    """The record an Apply's reply carries: none when it was stored as sent.

    The sender has that record (the client fills it in); a record the store
    re-versioned, or the newer one it kept (STALE), comes back.
    """
    if result.status is Status.TOO_LARGE or result.packed is sent:
        return b""
    return result.packed or b""


def _result(result: Result) -> wire.Message:
    if result.status is Status.TOO_LARGE:
        return wire.Result(Status.TOO_LARGE, b"")
    return wire.Result(result.status, result.packed or b"")


#: Decoded in place by dataReceived, not through this table.
_APPLY: Final = wire.Apply.OPCODE
_GET: Final = wire.Get.OPCODE
_HANDLERS: dict[int, tuple[str, type[wire.Message], Callable[..., Any]]] = {
    cls.OPCODE: (name, cls, handler)
    for name, cls, handler in (
        ("mget", wire.MultiGet, DataServerProtocol._mget),
        ("apply_many", wire.ApplyMany, DataServerProtocol._apply_many),
        ("store", wire.Store, DataServerProtocol._store),
        ("incr", wire.Incr, DataServerProtocol._incr),
        ("touch", wire.Touch, DataServerProtocol._touch),
        ("delete", wire.Delete, DataServerProtocol._delete),
        ("flush", wire.Flush, DataServerProtocol._flush),
        ("scan", wire.Scan, DataServerProtocol._scan),
        ("control", wire.Control, DataServerProtocol._control),
        ("retain", wire.Retain, DataServerProtocol._retain),
        ("partitions", wire.Partitions, DataServerProtocol._partitions),
        ("ping", wire.Ping, DataServerProtocol._ping),
        ("stats", wire.Stats, DataServerProtocol._stats),
        ("stream", wire.Stream, DataServerProtocol._stream),
        ("credit", wire.Credit, DataServerProtocol._credit),
        ("cancel", wire.Cancel, DataServerProtocol._cancel),
    )
}


class DataServerFactory(Factory):
    def __init__(self, node: DataNode) -> None:
        self.node = node

    def buildProtocol(self, addr: Any) -> DataServerProtocol:
        proto = DataServerProtocol(self.node)
        proto.factory = self
        return proto
