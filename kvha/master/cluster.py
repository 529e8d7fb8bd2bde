"""The shared cluster map, and Automatic Scaling (joining and leaving data nodes).

One map for all masters: the data nodes with their ring tokens, replicas,
the partitions (see :mod:`kvha.master.partitions`; passwords only as hashes)
and at most one change in progress, under an ``epoch``.  Every master keeps
it in ``state_dir/cluster.json``; the map in a master's configuration only
seeds a master that has none.

Spreading: a change made at any master bumps the epoch and is pushed to every
peer master at once; every master also polls its peers each ping interval, so
a master that missed a push catches up within one heartbeat.  Two changes made
at the same time on two masters carry the same epoch; everywhere the one from
the master with the smaller id wins, and the other master answers its admin
with 409 naming the winner.

Scaling: ``node add`` records the new node and the ring after it joins (its
tokens allocated as in :mod:`kvha.ring`) as the pending change; ``node
remove`` records the ring without the node.  While a change is pending,
writes go to the copies under both rings and reads use the current ring.
The master that made the change streams every range a node gains from its
current copies (newest wins, tombstones included), then cuts over: the new
ring becomes current and every node drops the ranges it no longer holds.

Take-over: a change is driven by one master, named in the map.  If this
master dies for good the change would stay pending, with every write going to
both rings.  So each master notes when it last heard each peer (every poll's
answer names the master that sent it, in a ``Kvha-Master`` header); when the
driver has not been heard for ``takeover_after`` (``merge.lease``), the
smallest id among the masters heard within that time drives the change too,
from the start, without changing the map.  A driver that was only slow may
finish as well: both stream the same ranges (newest wins) and propose the
same cut-over, so whichever lands first gives the same ring, and the other
finds the change done.  Two drivers cost time, not data.
"""

from __future__ import annotations

import copy
import hmac
import json
import os
from typing import Any, Callable, Optional

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from kvha.config import ConfigError
from kvha.master.partitions import parse_admin, public_entry
from kvha.ring import Ring, TokenRange
from kvha.webclient import BytesBody

log = Logger()

#: Seconds a poll of a peer's map may take before it is given up.
POLL_TIMEOUT = 2.0


class Conflict(Exception):
    """Another change won; the message names it."""


class NoSuchPartition(Exception):
    """The admin named a partition the map does not have."""

    def __str__(self) -> str:
        return f"no partition {self.args[0]!r}"


def _key(m: dict[str, Any]) -> tuple[int, str]:
    return int(m["epoch"]), str(m.get("proposer", ""))


def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether map ``a`` replaces map ``b``: a higher epoch, or at the same epoch
    the smaller proposer id (so concurrent changes resolve the same everywhere)."""
    ea, pa = _key(a)
    eb, pb = _key(b)
    if ea != eb:
        return ea > eb
    return pa != pb and (pb == "" or (pa != "" and pa < pb))


def ring_of(m: dict[str, Any], after: bool = False) -> Ring:
    if after and m.get("pending"):
        nodes, tokens = m["pending"]["nodes_after"], m["pending"]["tokens_after"]
    else:
        nodes, tokens = m["nodes"], m["tokens"]
    weights = {n["id"]: float(n.get("weight", 1.0)) for n in nodes}
    return Ring.from_tokens(weights, {k: list(v) for k, v in tokens.items()}, int(m["vnodes"]))


def initial_map(
    nodes: list[dict[str, Any]],
    replicas: int,
    vnodes: int,
    partitions: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    ring = Ring.build([(n["id"], float(n.get("weight", 1.0))) for n in nodes], vnodes)
    return {
        "epoch": 0,
        "proposer": "",
        "replicas": replicas,
        "vnodes": vnodes,
        "nodes": nodes,
        "tokens": ring.tokens_by_node(),
        "pending": None,
        "partitions": list(partitions or []),
    }


def gained_ranges(before: Ring, after: Ring, copies: int) -> dict[str, dict[str, list[TokenRange]]]:
    """For each node, the arcs it holds after but not before, by a current copy to pull from.

    Returns ``{gainer: {source: [arcs]}}``.  Arcs are cut at every token of both
    rings, so each piece has one set of copies before and one after.
    """
    tokens = sorted(set(before._tokens) | set(after._tokens))
    out: dict[str, dict[str, list[TokenRange]]] = {}
    for i, hi in enumerate(tokens):
        lo = tokens[i - 1]
        old = before.preference(hi)[:copies]
        new = after.preference(hi)[:copies]
        for node in new:
            if node in old:
                continue
            for source in old:
                out.setdefault(node, {}).setdefault(source, []).append((lo, hi))
    return out


class ClusterManager:
    """Keeps this master's copy of the map, spreads changes, and drives scaling."""

    def __init__(
        self,
        master: Any,
        initial: dict[str, Any],
        state_dir: Optional[str],
        peers: list[str],
        token: str,
        poll_interval: float = 0.25,
        grace: float = 1.0,
        takeover_after: float = 5.0,
    ) -> None:
        self.master = master
        self.reactor = master.reactor
        self.id = master.config.id
        self.state_path = os.path.join(state_dir, "cluster.json") if state_dir else None
        self.peers = [p.rstrip("/") for p in peers]
        self.token = token
        self.poll_interval = poll_interval
        self.grace = grace
        self.takeover_after = takeover_after
        self.map = initial
        if self.state_path and os.path.exists(self.state_path):
            with open(self.state_path) as f:
                self.map = json.load(f)
            # A map saved before partitions were part of it takes the configured ones.
            self.map.setdefault("partitions", initial.get("partitions", []))
            log.info(
                "cluster map epoch {e} loaded from {path}",
                e=self.map["epoch"],
                path=self.state_path,
            )
        self.agent = Agent(self.reactor, connectTimeout=2)
        self.peer_epochs: dict[str, Optional[int]] = {p: None for p in self.peers}
        #: When this master last heard each peer master, by id (from a poll's answer).
        self.heard: dict[str, float] = {}
        #: Peers with a poll out.
        self._polling: set[str] = set()
        #: The pending change (epoch, driver) seen, and since when: a take-over waits
        #: ``takeover_after`` from then, so a master that just started does not take over.
        self._pending_seen: tuple[Any, float] = (None, 0.0)
        #: (kind, node) of the pending change this master drives for a silent driver.
        self.taken_over: Optional[tuple[str, str]] = None
        #: After a failed scaling step, no new attempt before this time.
        self._retry_at = 0.0
        self.driving: Optional[Deferred] = None
        self.progress: dict[str, Any] = {}
        self._loop: Optional[task.LoopingCall] = None

    # Life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.master.adopt_map(self.map)
        self._maybe_drive()
        loop = task.LoopingCall(self._poll)
        loop.clock = self.reactor
        loop.start(self.poll_interval, now=False)
        self._loop = loop

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def save(self) -> None:
        if not self.state_path:
            return
        os.makedirs(os.path.dirname(self.state_path), exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.map, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def adopt(self, new: dict[str, Any], why: str) -> bool:
        if not beats(new, self.map):
            return False
        self.map = new
        self.save()
        log.info(
            "cluster map epoch {e} by {p} adopted ({why}); pending: {pending}",
            e=new["epoch"],
            p=new.get("proposer") or "config",
            why=why,
            pending=(new.get("pending") or {}).get("kind", "none"),
        )
        self.master.adopt_map(new)
        self._maybe_drive()
        return True

    # Peers --------------------------------------------------------------------------

    def _headers(self) -> Headers:
        return Headers(
            {
                b"Authorization": [b"Bearer " + self.token.encode()],
                b"Content-Type": [b"application/json"],
            }
        )

    def _poll(self) -> None:
        self._maybe_take_over()
        for peer in self.peers:
            if peer in self._polling:
                continue  # the last poll is still out: one at a time per peer
            d = self.agent.request(b"GET", (peer + "/v1/admin/cluster").encode(), self._headers())
            d.addCallback(self._answered)
            # A peer that accepts and never answers must not pile up requests.
            d.addTimeout(POLL_TIMEOUT, self.reactor)
            self._polling.add(peer)

            def got(body: bytes, peer: str = peer) -> None:
                doc = json.loads(body)
                self.peer_epochs[peer] = int(doc["epoch"])
                self.adopt(doc, f"polled from {peer}")

            def failed(f: Any, peer: str = peer) -> None:
                self.peer_epochs[peer] = None

            def done(_: Any, peer: str = peer) -> None:
                self._polling.discard(peer)

            def broke(f: Any, peer: str = peer) -> None:
                log.failure("taking the map polled from {peer} failed", f, peer=peer)

            d.addCallbacks(got, failed)
            d.addErrback(broke)
            d.addBoth(done)

    def _answered(self, response: Any) -> Deferred:
        """A peer answered a poll: note which master it is, then read the map."""
        if response.code == 200:
            for name in response.headers.getRawHeaders(b"kvha-master", []):
                self.heard[name.decode("utf-8", "replace")] = self.reactor.seconds()
        return readBody(response)  # type: ignore[no-any-return]

    def _maybe_take_over(self) -> None:
        """Drive the pending change too if its driver has been silent for ``takeover_after``.

        The map is not changed: a claim proposed in a new epoch could tie with a
        cut-over by a driver that was only slow, and undo it.  Both drivers
        stream the same ranges (newest wins) and propose the same cut-over, so
        whichever lands is the same ring.
        """
        pending = self.map.get("pending")
        if not pending or pending.get("driver") == self.id:
            self.taken_over = None
            return
        now = self.reactor.seconds()
        change = (pending["kind"], pending["node"])
        key = (pending.get("driver"), *change)
        if self._pending_seen[0] != key:
            self._pending_seen = (key, now)
            self.taken_over = None
        if self.driving is not None or now < self._retry_at:
            return
        driver = pending.get("driver", "")
        last = max(self.heard.get(driver, 0.0), self._pending_seen[1])
        if now - last < self.takeover_after:
            return
        live = [i for i, t in self.heard.items() if now - t < self.takeover_after]
        if min([self.id, *live]) != self.id:
            return  # a smaller live master takes over
        if self.taken_over != change:
            log.warn(
                "the {kind} of {node} is driven by {driver}, not heard for {silent:.1f}s: "
                "this master takes it over",
                kind=pending["kind"],
                node=pending["node"],
                driver=driver,
                silent=now - last,
            )
        self.taken_over = change
        self._start_driving()

    def propose(self, change: Callable[[dict[str, Any]], dict[str, Any]]) -> Deferred:
        """Apply ``change`` to a copy of the map at the next epoch and spread it.

        Fires with the new map, or fails with Conflict if a concurrent change won.
        """
        new = change(copy.deepcopy(self.map))
        new["epoch"] = int(self.map["epoch"]) + 1
        new["proposer"] = self.id
        self.map = new
        self.save()
        self.master.adopt_map(new)
        log.info("cluster map epoch {e} proposed by this master", e=new["epoch"])
        body = json.dumps(new).encode()
        ds = []
        for peer in self.peers:
            d: Deferred[Any] = self.agent.request(
                b"POST", (peer + "/v1/admin/cluster").encode(), self._headers(), BytesBody(body)
            )
            d.addCallback(readBody)
            d.addCallback(json.loads)
            d.addErrback(lambda f: None)  # an unreachable peer catches up by polling
            ds.append(d)

        def settle(answers: list[Any]) -> dict[str, Any]:
            for answer in answers:
                if answer and beats(answer, new):
                    self.adopt(answer, "a concurrent change won")
                    raise Conflict(
                        f"a concurrent change by {answer.get('proposer')} won epoch "
                        f"{answer['epoch']}; this change was not applied, retry it"
                    )
            if self.map is not new and beats(self.map, new):
                raise Conflict(
                    f"a concurrent change by {self.map.get('proposer')} won epoch "
                    f"{self.map['epoch']}; this change was not applied, retry it"
                )
            self._maybe_drive()
            return new

        return defer.gatherResults(ds).addCallback(settle)

    # Scaling ------------------------------------------------------------------------

    def add_node(self, node: dict[str, Any]) -> Deferred:
        if self.map.get("pending"):
            return defer.fail(Conflict(f"a {self.map['pending']['kind']} is already in progress"))
        if any(n["id"] == node["id"] for n in self.map["nodes"]):
            return defer.fail(Conflict(f"data node {node['id']} is already in the cluster"))

        def change(m: dict[str, Any]) -> dict[str, Any]:
            after = ring_of(m)
            after.add_node(node["id"], float(node.get("weight", 1.0)))
            m["pending"] = {
                "kind": "join",
                "node": node["id"],
                "driver": self.id,
                "nodes_after": m["nodes"] + [node],
                "tokens_after": after.tokens_by_node(),
            }
            return m

        return self.propose(change)

    def remove_node(self, node_id: str) -> Deferred:
        if self.map.get("pending"):
            return defer.fail(Conflict(f"a {self.map['pending']['kind']} is already in progress"))
        if not any(n["id"] == node_id for n in self.map["nodes"]):
            return defer.fail(Conflict(f"no data node {node_id} in the cluster"))
        if len(self.map["nodes"]) - 1 <= int(self.map["replicas"]):
            return defer.fail(Conflict("too few data nodes would remain for the replicas"))

        def change(m: dict[str, Any]) -> dict[str, Any]:
            after = ring_of(m)
            after.remove_node(node_id)
            m["pending"] = {
                "kind": "leave",
                "node": node_id,
                "driver": self.id,
                "nodes_after": [n for n in m["nodes"] if n["id"] != node_id],
                "tokens_after": after.tokens_by_node(),
            }
            return m

        return self.propose(change)

    def _maybe_drive(self) -> None:
        pending = self.map.get("pending")
        if not pending or pending.get("driver") != self.id or self.driving is not None:
            return
        self._start_driving()

    def _start_driving(self) -> None:
        self.driving = self._drive(self.map)
        self.driving.addErrback(self._drive_failed)
        self.driving.addBoth(self._drive_over)

    def _drives(self, pending: dict[str, Any]) -> bool:
        """Whether ``pending`` is still the map's pending change, and this master its driver
        (named in the map, or taking over for a silent one)."""
        cur = self.map.get("pending")
        if cur is None or cur["kind"] != pending["kind"] or cur["node"] != pending["node"]:
            return False
        return cur.get("driver") == self.id or self.taken_over == (cur["kind"], cur["node"])

    def _drive_over(self, result: Any) -> Any:
        self.driving = None
        return result

    def _drive_failed(self, failure: Any) -> None:
        log.failure("scaling step failed; retrying in 2 s", failure)
        self._retry_at = self.reactor.seconds() + 2.0  # a take-over waits as long
        self.reactor.callLater(2.0, self._maybe_drive)

    @defer.inlineCallbacks
    def _drive(self, m: dict[str, Any]) -> Any:
        pending = m["pending"]
        copies = int(m["replicas"]) + 1
        before, after = ring_of(m), ring_of(m, after=True)
        # Every master must be writing to both rings before anything is copied.
        yield task.deferLater(self.reactor, self.grace, lambda: None)
        if not self._drives(pending):
            return  # meanwhile done, or taken over by another master
        gains = gained_ranges(before, after, copies)
        links = self.master.links
        self.progress = {
            "kind": pending["kind"],
            "node": pending["node"],
            "keys": 0,
            "bytes": 0,
            "done": False,
        }
        log.info(
            "{kind} of {node}: streaming ranges to {gainers}",
            kind=pending["kind"],
            node=pending["node"],
            gainers=",".join(sorted(gains)) or "nobody",
        )
        merge = self.master.config.merge
        for gainer, by_source in sorted(gains.items()):
            target = links[gainer]
            if not target.client.connected:
                raise RuntimeError(f"data node {gainer} is not connected")
            for source_id, ranges in sorted(by_source.items()):
                source = links[source_id]
                if not source.client.connected or source.state == "down":
                    continue  # another current copy of these arcs is a source too

                def apply(batch: list[tuple[bytes, bytes, bytes]], target: Any = target) -> Any:
                    ds = []
                    for partition, key, packed in batch:
                        self.progress["keys"] += 1
                        self.progress["bytes"] += len(partition) + len(key) + len(packed)
                        ds.append(target.client.apply(partition, key, packed))
                    d = defer.gatherResults(ds, consumeErrors=True)
                    if merge.max_bytes_per_second:
                        size = sum(len(p) + len(k) + len(v) for p, k, v in batch)
                        d.addCallback(
                            lambda _: task.deferLater(
                                self.reactor, size / merge.max_bytes_per_second, lambda: None
                            )
                        )
                    return d

                yield source.client.stream(ranges, 0, apply, window=merge.window)
        log.info(
            "{kind} of {node}: {keys} records ({bytes} bytes) streamed; cutting over",
            kind=pending["kind"],
            node=pending["node"],
            keys=self.progress["keys"],
            bytes=self.progress["bytes"],
        )

        if not self._drives(pending):
            log.info(
                "{kind} of {node}: another master drives it now; leaving the cut-over to it",
                kind=pending["kind"],
                node=pending["node"],
            )
            return

        def cut_over(cur: dict[str, Any]) -> dict[str, Any]:
            if not self._drives(pending):
                raise Conflict("the change is no longer driven by this master")
            cur["nodes"] = cur["pending"]["nodes_after"]
            cur["tokens"] = cur["pending"]["tokens_after"]
            cur["pending"] = None
            return cur

        yield self.propose(cut_over)
        yield task.deferLater(self.reactor, self.grace, lambda: None)
        # Each node keeps only what it holds under the new ring.
        for node_id in after.nodes:
            ranges = after.ranges_for(node_id, copies)
            if ranges and links[node_id].client.connected:
                yield links[node_id].client.retain(ranges)
        self.progress["done"] = True
        log.info("{kind} of {node} complete", kind=pending["kind"], node=pending["node"])

    # Partitions ---------------------------------------------------------------------

    def partition(self, name: str) -> Optional[dict[str, Any]]:
        for e in self.map.get("partitions", []):
            if e["name"] == name:
                return dict(e)
        return None

    def create_partition(self, doc: Any) -> Deferred:
        """Add a partition; fails with ConfigError (bad input) or Conflict (exists)."""
        try:
            entry = parse_admin(doc)
        except ConfigError as e:
            return defer.fail(e)
        if self.partition(entry["name"]) is not None:
            return defer.fail(Conflict(f"partition {entry['name']} already exists"))

        def change(m: dict[str, Any]) -> dict[str, Any]:
            m.setdefault("partitions", []).append(entry)
            return m

        log.info("creating partition {name}", name=entry["name"])
        return self.propose(change)

    def update_partition(self, name: str, doc: Any) -> Deferred:
        """Change a partition's settings; keys absent from ``doc`` keep their values."""
        current = self.partition(name)
        if current is None:
            return defer.fail(NoSuchPartition(name))
        if isinstance(doc, dict) and doc.get("name", name) != name:
            return defer.fail(ConfigError(("partition", "name"), "a partition cannot be renamed"))
        try:
            entry = parse_admin(doc, current)
        except ConfigError as e:
            return defer.fail(e)

        def change(m: dict[str, Any]) -> dict[str, Any]:
            m["partitions"] = [entry if e["name"] == name else e for e in m["partitions"]]
            return m

        log.info("changing partition {name}", name=name)
        return self.propose(change)

    def delete_partition(self, name: str) -> Deferred:
        """Remove a partition from the map, then its records from every data node."""
        if self.partition(name) is None:
            return defer.fail(NoSuchPartition(name))
        config = self.master.config
        served = {config.memcached.partition, config.redis.partition}
        served |= {b.partition for b in config.bound_listeners}
        if name in served:
            return defer.fail(
                Conflict(
                    f"partition {name} is served by a port of master {self.id}; "
                    "change that master's configuration first"
                )
            )

        def change(m: dict[str, Any]) -> dict[str, Any]:
            m["partitions"] = [e for e in m["partitions"] if e["name"] != name]
            return m

        def flush(m: dict[str, Any]) -> Any:
            log.info("deleted partition {name}; removing its records", name=name)
            d = self.master.router.flush(name.encode(), every_node=False)
            d.addErrback(
                lambda f: log.warn(
                    "records of deleted partition {name} not all removed: {why}",
                    name=name,
                    why=f.getErrorMessage(),
                )
            )
            return d.addCallback(lambda _: m)

        return self.propose(change).addCallback(flush)

    def partitions_status(self) -> Deferred:
        """Every partition without its hash, with its bytes and keys from the data nodes."""
        router = self.master.router

        def add_usage(stats: dict[str, dict[str, str]]) -> dict[str, Any]:
            copies = max(1, min(router.copies, len(stats) or 1))
            out = []
            for e in self.map.get("partitions", []):
                doc = public_entry(e)
                name = e["name"]
                doc["used_bytes"] = sum(int(st.get(f"bytes:{name}", 0)) for st in stats.values())
                doc["used_bytes"] //= copies
                doc["keys"] = router.count_from_stats(name.encode(), stats)
                out.append(doc)
            return {"epoch": self.map["epoch"], "partitions": out}

        return router.node_stats().addCallback(add_usage)

    def status(self) -> dict[str, Any]:
        m = self.map
        pending = m.get("pending")
        share = None
        if pending and pending["kind"] == "join":
            ring = ring_of(m, after=True)
            share = ring.ownership().get(pending["node"])
        return {
            "id": self.id,
            "epoch": m["epoch"],
            "proposer": m.get("proposer"),
            "nodes": [n["id"] for n in m["nodes"]],
            "pending": None
            if not pending
            else {
                "kind": pending["kind"],
                "node": pending["node"],
                "driver": pending["driver"],
                "taken_over_here": self.taken_over == (pending["kind"], pending["node"]),
                "new_node_share": share,
            },
            "progress": self.progress,
            "peers": self.peer_epochs,
        }


class AdminResource(Resource):
    """``/v1/admin/...`` on the master's HTTP port, with a bearer token."""

    isLeaf = True

    def __init__(self, manager: ClusterManager) -> None:
        super().__init__()
        self.manager = manager

    def render(self, request: Any) -> Any:
        request.setHeader("Content-Type", b"application/json")
        header = request.getHeader(b"authorization") or b""
        if not self.manager.token or not hmac.compare_digest(
            header, b"Bearer " + self.manager.token.encode()
        ):
            request.setResponseCode(401)
            return b'{"error": {"code": 401, "message": "a valid bearer token is required"}}\n'
        # Peers learn from this which master answered (ClusterManager.heard).
        request.setHeader("Kvha-Master", self.manager.id.encode())
        parts = [p for p in request.path.split(b"?")[0].split(b"/") if p][2:]
        method = request.method
        manager = self.manager
        try:
            if parts == [b"cluster"] and method == b"GET":
                return json.dumps(manager.map).encode()
            if parts == [b"cluster"] and method == b"POST":
                doc = json.loads(request.content.read())
                manager.adopt(doc, "pushed by a peer")
                return json.dumps(manager.map).encode()
            if parts == [b"status"] and method == b"GET":
                return json.dumps(manager.status()).encode()
            if parts == [b"nodes"] and method == b"POST":
                doc = json.loads(request.content.read())
                node = {
                    "id": str(doc["id"]),
                    "address": str(doc["address"]),
                    "weight": float(doc.get("weight", 1.0)),
                    "read_weight": float(doc.get("read_weight", 1.0)),
                }
                return self._deferred(request, manager.add_node(node))
            if len(parts) == 2 and parts[0] == b"nodes" and method == b"DELETE":
                return self._deferred(request, manager.remove_node(parts[1].decode()))
            if parts == [b"partitions"] and method == b"GET":
                return self._deferred(request, manager.partitions_status(), raw=True)
            if parts == [b"partitions"] and method == b"POST":
                doc = json.loads(request.content.read())
                return self._deferred(request, manager.create_partition(doc))
            if len(parts) == 2 and parts[0] == b"partitions":
                name = parts[1].decode("utf-8", "replace")
                if method == b"GET":
                    entry = manager.partition(name)
                    if entry is None:
                        raise NoSuchPartition(name)
                    return json.dumps(public_entry(entry)).encode()
                if method in (b"PATCH", b"PUT"):
                    doc = json.loads(request.content.read())
                    return self._deferred(request, manager.update_partition(name, doc))
                if method == b"DELETE":
                    return self._deferred(request, manager.delete_partition(name))
        except NoSuchPartition as e:
            request.setResponseCode(404)
            return json.dumps({"error": {"code": 404, "message": str(e)}}).encode()
        except (ValueError, KeyError, TypeError) as e:
            request.setResponseCode(400)
            return json.dumps({"error": {"code": 400, "message": str(e)}}).encode()
        request.setResponseCode(404)
        return b'{"error": {"code": 404, "message": "no such admin resource"}}\n'

    def _deferred(self, request: Any, d: Deferred, raw: bool = False) -> Any:
        from twisted.web import server

        def ok(m: dict[str, Any]) -> None:
            if raw:
                request.write(json.dumps(m).encode())
                request.finish()
                return
            request.write(
                json.dumps(
                    {
                        "epoch": m["epoch"],
                        "pending": m.get("pending")
                        and {"kind": m["pending"]["kind"], "node": m["pending"]["node"]},
                    }
                ).encode()
            )
            request.finish()

        def failed(f: Any) -> None:
            if f.check(ConfigError, NoSuchPartition):
                code = 400 if f.check(ConfigError) else 404
                message = str(f.value)
                request.setResponseCode(code)
                request.write(json.dumps({"error": {"code": code, "message": message}}).encode())
                request.finish()
                return
            code = 409 if f.check(Conflict) else 500
            request.setResponseCode(code)
            request.write(
                json.dumps({"error": {"code": code, "message": f.getErrorMessage()}}).encode()
            )
            request.finish()

        d.addCallbacks(ok, failed)
        return server.NOT_DONE_YET


__all__ = ["ClusterManager", "AdminResource", "Conflict", "NoSuchPartition"]
