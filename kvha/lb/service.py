"""A load balancer of the pair: election, VIP, forwarding, health checks, admin API.

The admin API (HTTP JSON, ``Authorization: Bearer <token>``)::

    GET    /v1/status                 this node, its peer, the VIP, every master
    GET    /v1/masters                the master list and its epoch
    POST   /v1/masters                add {id, host, redis, memcached, http, weight}
    POST   /v1/masters/{id}/drain     no new connections; old ones finish or are
                                      closed after drain_timeout
    DELETE /v1/masters/{id}           remove
    PUT    /v1/masters                {epoch, masters}: the peer's newer list

Every change bumps the list's epoch, is saved under ``state_dir`` (so it
survives a restart) and is pushed to the peer.  Heartbeats carry the epoch
too, so a peer that missed a push (it was down) fetches the newer list as
soon as it hears a heartbeat.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import random
import subprocess
from typing import Any, Optional

from twisted.application import service, strports
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web import server
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from kvha.config import UNIX_PATH_MAX, LbConfig, is_ipv4, unix_path_problem
from kvha.lb.forward import ForwardFactory, HealthChecker
from kvha.lb.handoff import HandoffLinks
from kvha.lb.heartbeat import Election, HeartbeatProtocol
from kvha.lb.nat import KernelForwarder
from kvha.lb.pool import PROTOCOLS, Pool
from kvha.lb.vip import VipHolder, run_command
from kvha.lb.watch import MasterWatcher
from kvha.webclient import BytesBody

log = Logger()

#: Seconds between checks, while ACTIVE with forward: kernel, that our table is there.
KERNEL_CHECK_INTERVAL = 1.0


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def master_dict(m: Any) -> dict[str, Any]:
    ports = {p: getattr(m, p) for p in PROTOCOLS if getattr(m, p)}
    out = {"id": m.id, "host": m.host, "ports": ports, "weight": m.weight}
    if m.handoff:
        out["handoff"] = m.handoff
    return out


class LoadBalancer(service.MultiService):
    def __init__(self, config: LbConfig, reactor: Any, rng: Optional[random.Random] = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        os.makedirs(config.state_dir, exist_ok=True)
        self.pool = Pool(
            config.scheduler,
            config.health.rise,
            config.health.fall,
            rng,
            state_path=os.path.join(config.state_dir, "masters.json"),
        )
        self.pool.load(master_dict(m) for m in config.masters)
        vip = config.vip
        self.kernel: Optional[KernelForwarder] = None
        self.factories = {}
        #: forward: handoff: a Unix-socket link to each master on this host.
        self.links: Optional[HandoffLinks] = None
        if config.forward == "handoff":
            self.links = HandoffLinks(reactor, self.pool, reactor)
        if config.forward == "kernel":
            ports = {proto: getattr(vip, proto) for proto in PROTOCOLS if getattr(vip, proto)}
            self.kernel = KernelForwarder(config.id, vip.address, ports, self.pool, mode=vip.mode)
            self.pool.on_change.append(self._kernel_sync)
        else:
            self.factories = {
                proto: ForwardFactory(
                    reactor, self.pool, proto, config.connect_timeout, links=self.links
                )
                for proto in PROTOCOLS
                if getattr(vip, proto)
            }
        self.vip = VipHolder(
            reactor,
            vip.address,
            [(getattr(vip, proto), f) for proto, f in self.factories.items()],
            mode=vip.mode,
            interface=vip.interface,
            prefix=vip.prefix,
            run=run_command,
        )
        self.heartbeat = HeartbeatProtocol(
            config.secret.encode("utf-8"), _host_port(config.heartbeat.peer)
        )
        self.election = Election(
            config.id,
            config.priority,
            reactor,
            send=self.heartbeat.send,
            on_active=self._acquire,
            on_backup=self._release,
            interval=config.heartbeat.interval,
            preempt=config.preempt,
            epoch=lambda: self.pool.epoch,
            on_peer_epoch=self._peer_epoch,
            on_outranked_peer=self._reassert,
        )
        self.heartbeat.election = self.election
        self.health = HealthChecker(
            reactor, self.pool, reactor, config.health.interval, config.health.timeout
        )
        # Kernel forwarding sees no traffic: an open connection per master
        # stands in for the proxy's observation of resets.
        self.watcher: Optional[MasterWatcher] = None
        if self.kernel is not None:
            self.watcher = MasterWatcher(reactor, self.pool, reactor, config.health.interval)
        self.agent = Agent(reactor, connectTimeout=2)
        self._fetching = False
        self._udp: Any = None
        self._drain_loop = LoopingCall(self._drain_tick)
        self._drain_loop.clock = reactor
        self._kernel_retry: Any = None
        #: The masters as of the last table write (to see which ones left).
        self._known = dict(self.pool.backends)
        #: conntrack runs in a thread: a big table must not stall heartbeats.
        self._in_thread: Any = threads.deferToThread
        self._counts: dict[str, dict[str, int]] = {}
        self._counting = False
        self._kernel_check = LoopingCall(self._kernel_verify)
        self._kernel_check.clock = reactor
        self.admin = AdminApi(self)
        strports.service(config.admin.listen, AdminSite(self.admin)).setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        host, port = _host_port(self.config.heartbeat.bind)
        self._udp = self.reactor.listenUDP(port, self.heartbeat, interface=host)
        self.vip.clear_stale()
        if self.kernel is not None:
            # Our own table, left by a run killed with -9; a peer's is not ours to touch.
            self.kernel.drop_own()
        self.health.start()
        if self.watcher is not None:
            self.watcher.start()
        if self.links is not None:
            self.links.start()
        self.election.start()
        self._drain_loop.start(0.5, now=False)
        if self.kernel is not None:
            self._kernel_check.start(KERNEL_CHECK_INTERVAL, now=False)

    def stopService(self) -> Any:
        self.election.stop()  # resigns: the peer takes the VIP at once
        self.health.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.links is not None:
            self.links.stop()
        for loop in (self._drain_loop, self._kernel_check):
            if loop.running:
                loop.stop()
        d = self._release()
        if self._udp is not None:
            d.addCallback(lambda _: self._udp.stopListening())
        return d.addCallback(lambda _: super(LoadBalancer, self).stopService())

    # Holding the VIP ---------------------------------------------------------------------

    def _acquire(self) -> None:
        self.vip.acquire()
        if self.kernel is not None:
            self.kernel.acquire()
            self._kernel_retry_if_failed()

    def _release(self) -> Any:
        if self.kernel is not None and self.kernel.held:
            self.kernel.release(keep=self._peer_alive())
        return self.vip.release()

    def _peer_alive(self) -> bool:
        """Whether the peer was heard, not resigning, within the time it takes to declare
        it dead (when both stop, as ``kvha up`` does, the last one deletes its table)."""
        election = self.election
        if election.peer is None or election.peer.resign:
            return False
        return self.reactor.seconds() - election.peer_seen < election.down_interval

    @property
    def holds_vip(self) -> bool:
        if self.kernel is not None:
            return self.kernel.applied is not None  # written, and not released since
        return self.vip.held

    def _reassert(self) -> None:
        """A peer that was ACTIVE too is about to yield: it may have deleted our table."""
        if self.kernel is not None and self.kernel.held:
            log.info("rewriting table {t} after a split brain", t=self.kernel.table)
            self._kernel_write(force=True)

    def _kernel_verify(self) -> None:
        """While ACTIVE, put our table back if something deleted it (a peer during a
        split brain, a firewall reload flushing the ruleset)."""
        kernel = self.kernel
        if kernel is None or not kernel.held or kernel.applied is None:
            return
        try:
            present = kernel.table in kernel.tables()
        except (OSError, subprocess.SubprocessError) as e:
            log.error("nft could not list tables: {why}", why=str(e))
            return
        if not present:
            log.warn("table {t} was deleted from outside: writing it again", t=kernel.table)
            self._kernel_write(force=True)

    def _kernel_write(self, force: bool = False) -> None:
        """Write the table (if it changed, or ``force``); on failure, again in a second."""
        assert self.kernel is not None
        self.kernel.sync(force=force)
        self._kernel_retry_if_failed()

    def _kernel_sync(self) -> None:
        """After a change of the pool: the table, and the connections of masters gone."""
        kernel = self.kernel
        assert kernel is not None
        self._kernel_write()
        # Masters that left the pool (removed here, or in a list adopted from
        # the peer): their open connections are cut by the node holding the VIP.
        gone = [b for i, b in self._known.items() if self.pool.backends.get(i) is not b]
        self._known = dict(self.pool.backends)
        if kernel.held:
            for backend in gone:
                self._cut(backend, "master {m} removed")

    def _cut(self, backend: Any, why: str) -> None:
        """Cut ``backend``'s kernel-forwarded connections (conntrack, in a thread)."""
        assert self.kernel is not None
        d = self._in_thread(self.kernel.close_connections, backend)
        d.addCallback(lambda n: log.info(why + ": closed {n} connections", m=backend.id, n=n))

    def _kernel_retry_if_failed(self) -> None:
        """While ACTIVE with no table written (nft failed), try again every second."""
        kernel = self.kernel
        if kernel is None or not kernel.held or kernel.applied is not None:
            return
        if self._kernel_retry is None or not self._kernel_retry.active():
            self._kernel_retry = self.reactor.callLater(1.0, self._kernel_sync)

    # Drain ---------------------------------------------------------------------------

    def _drain_tick(self) -> None:
        now = self.reactor.seconds()
        for backend in self.pool.backends.values():
            if not backend.draining:
                continue
            if backend.drain_started is None:
                # A drain adopted from the peer's list: its timeout runs from now.
                backend.drain_started = now
            if now - backend.drain_started < self.config.drain_timeout:
                continue
            if self.kernel is not None:
                if self.kernel.held and not backend.drain_closed:
                    backend.drain_closed = True
                    self._cut(backend, "drain of {m} timed out")
            else:
                if self.links is not None and not backend.drain_closed:
                    # Every connection handed to it, also by the peer or
                    # before a restart, which this process no longer counts.
                    backend.drain_closed = self.links.close_all(backend.id)
                if backend.pairs:
                    log.info(
                        "drain of {m} timed out: closing {n} connections",
                        m=backend.id,
                        n=len(backend.pairs),
                    )
                    for pair in list(backend.pairs):
                        pair.close()

    # Status --------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        peer = self.election.peer
        return {
            "id": self.config.id,
            "role": "lb",
            "pid": os.getpid(),
            "state": self.election.state,
            "priority": self.config.priority,
            "vip": self.config.vip.address,
            "holds_vip": self.holds_vip,
            "forward": self.config.forward,
            "peer": None
            if peer is None
            else {
                "id": peer.node_id,
                "state": peer.state,
                "priority": peer.priority,
                "seconds_since_heard": round(self.reactor.seconds() - self.election.peer_seen, 3),
            },
            "epoch": self.pool.epoch,
            "masters": self._master_status(),
        }

    def _master_status(self) -> list[dict[str, Any]]:
        out = [b.status() for b in self.pool.backends.values()]
        if self.kernel is not None:
            # The kernel's connections, from conntrack, while this node forwards:
            # counted in a thread, so each status shows the count that the one
            # before it started (at most a status call old).
            counts = self._counts if self.holds_vip else {}
            if self.holds_vip and not self._counting:
                self._counting = True
                d = self._in_thread(
                    self.kernel.connection_counts, list(self.pool.backends.values())
                )

                def done(result: dict[str, dict[str, int]]) -> None:
                    self._counts = result

                d.addCallback(done)
                d.addErrback(lambda f: log.failure("counting connections failed", f))
                d.addBoth(lambda _: setattr(self, "_counting", False))
            for doc in out:
                per = counts.get(doc["id"], {})
                doc["connections"] = {p: per.get(p, 0) for p in doc["connections"]}
                doc.pop("total_connections", None)
        return out

    # Peer sync -------------------------------------------------------------------------

    def changed(self) -> None:
        """After a local change: push the list to the peer (best effort)."""
        peer = self.config.admin.peer
        if not peer:
            return
        body = json.dumps({"epoch": self.pool.epoch, "masters": self.pool.export()}).encode()
        d = self.agent.request(
            b"PUT",
            (peer.rstrip("/") + "/v1/masters").encode(),
            self._headers(),
            BytesBody(body),
        )
        d.addCallback(readBody)
        d.addErrback(
            lambda f: log.info(
                "peer not told of epoch {e}: {why}", e=self.pool.epoch, why=f.getErrorMessage()
            )
        )

    def _headers(self) -> Headers:
        return Headers(
            {
                b"Authorization": [b"Bearer " + self.config.admin.token.encode()],
                b"Content-Type": [b"application/json"],
            }
        )

    def _peer_epoch(self, epoch: int) -> None:
        if epoch <= self.pool.epoch or self._fetching or not self.config.admin.peer:
            return
        self._fetching = True
        url = (self.config.admin.peer.rstrip("/") + "/v1/masters").encode()
        d: Deferred[Any] = self.agent.request(b"GET", url, self._headers())
        d.addCallback(readBody)

        def adopt(body: bytes) -> None:
            doc = json.loads(body)
            if int(doc["epoch"]) > self.pool.epoch:
                self.pool.replace(doc["masters"], int(doc["epoch"]))
                log.info("adopted the peer's master list, epoch {e}", e=self.pool.epoch)

        d.addCallback(adopt)
        d.addErrback(
            lambda f: log.info("could not fetch peer list: {why}", why=f.getErrorMessage())
        )
        d.addBoth(lambda _: setattr(self, "_fetching", False))


class AdminError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AdminApi(Resource):
    isLeaf = True

    def __init__(self, lb: LoadBalancer) -> None:
        super().__init__()
        self.lb = lb

    def render(self, request: Any) -> bytes:
        request.setHeader("Content-Type", b"application/json")
        try:
            self._auth(request)
            doc = self._route(request)
        except AdminError as e:
            request.setResponseCode(e.code)
            doc = {"error": {"code": e.code, "message": e.message}}
        return json.dumps(doc).encode() + b"\n"

    def _auth(self, request: Any) -> None:
        header = request.getHeader(b"authorization") or b""
        expected = b"Bearer " + self.lb.config.admin.token.encode()
        if not hmac.compare_digest(header, expected):
            request.setHeader("WWW-Authenticate", b'Bearer realm="kvha-lb"')
            raise AdminError(401, "a valid bearer token is required")

    def _json(self, request: Any) -> Any:
        try:
            return json.loads(request.content.read() or b"{}")
        except ValueError as e:
            raise AdminError(400, f"the body is not valid JSON: {e}") from None

    def _route(self, request: Any) -> Any:
        parts = [p for p in request.path.split(b"?")[0].split(b"/") if p]
        method = request.method
        lb = self.lb
        pool = lb.pool
        if parts == [b"v1", b"status"] and method == b"GET":
            return lb.status()
        if parts == [b"v1", b"masters"]:
            if method == b"GET":
                return {"epoch": pool.epoch, "masters": pool.export()}
            if method == b"POST":
                doc = self._json(request)
                master_id, host = doc.get("id"), doc.get("host")
                ports = {p: doc[p] for p in PROTOCOLS if isinstance(doc.get(p), int)}
                if not isinstance(master_id, str) or not isinstance(host, str) or not ports:
                    raise AdminError(
                        400, "need id, host and at least one of redis, memcached, http"
                    )
                if lb.kernel is not None and not is_ipv4(host):
                    raise AdminError(
                        400, f"forward: kernel needs an IPv4 address as host, not {host!r}"
                    )
                handoff = doc.get("handoff")
                if handoff is not None and (
                    not isinstance(handoff, str) or unix_path_problem(handoff) is not None
                ):
                    raise AdminError(
                        400,
                        f"handoff must be an absolute Unix socket path of at most "
                        f"{UNIX_PATH_MAX} bytes",
                    )
                weight = doc.get("weight", 1.0)
                if (
                    isinstance(weight, bool)
                    or not isinstance(weight, (int, float))
                    or not math.isfinite(weight)
                    or weight <= 0
                ):
                    raise AdminError(400, "weight must be a number above 0")
                try:
                    pool.add(master_id, host, ports, float(weight), handoff or None)
                except KeyError as e:
                    raise AdminError(409, str(e.args[0])) from None
                log.info(
                    "master {m} added at {host}, epoch {e}", m=master_id, host=host, e=pool.epoch
                )
                lb.changed()
                request.setResponseCode(201)
                return {"epoch": pool.epoch, "masters": pool.export()}
            if method == b"PUT":
                doc = self._json(request)
                epoch = int(doc.get("epoch", 0))
                if epoch > pool.epoch:
                    pool.replace(doc["masters"], epoch)
                    log.info("took the peer's master list, epoch {e}", e=epoch)
                return {"epoch": pool.epoch}
        if len(parts) == 3 and parts[:2] == [b"v1", b"masters"]:
            master_id = parts[2].decode(errors="replace")
            if master_id not in pool.backends:
                raise AdminError(404, f"no master {master_id!r}")
            if method == b"DELETE":
                backend = pool.remove(master_id)
                if lb.links is not None:
                    lb.links.close_all(master_id)  # sent before the link closes below
                for pair in list(backend.pairs):
                    pair.close()  # forward: kernel cuts its connections in _kernel_sync
                log.info("master {m} removed, epoch {e}", m=master_id, e=pool.epoch)
                lb.changed()
                return {"epoch": pool.epoch, "masters": pool.export()}
        if len(parts) == 4 and parts[:2] == [b"v1", b"masters"] and parts[3] == b"drain":
            master_id = parts[2].decode(errors="replace")
            if method != b"POST":
                raise AdminError(405, "use POST")
            if master_id not in pool.backends:
                raise AdminError(404, f"no master {master_id!r}")
            backend = pool.drain(master_id, lb.reactor.seconds())
            log.info(
                "draining master {m} ({n} open connections), epoch {e}",
                m=master_id,
                n=len(backend.pairs),
                e=pool.epoch,
            )
            lb.changed()
            return {"epoch": pool.epoch, "masters": pool.export()}
        raise AdminError(404, "no such admin resource")


class AdminSite(server.Site):
    def __init__(self, api: AdminApi) -> None:
        super().__init__(api)
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        pass
