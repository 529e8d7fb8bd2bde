"""The masters behind the VIP, their health per protocol, and how one is chosen.

Each master has a port per protocol (redis, memcached, http).  Health is
tracked per (master, protocol): ``fall`` failed checks in a row mark it down,
``rise`` good ones bring it back, and a connection refused or reset on real
traffic counts as a failed check at once (HAProxy's ``observe layer4``).
A draining master takes no new connections.  Schedulers: ``leastconn``
(fewest open connections, weighted), ``rr`` and ``wrr``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from typing import Any, Callable, Optional

from twisted.logger import Logger

log = Logger()

PROTOCOLS = ("redis", "memcached", "http")
SCHEDULERS = ("leastconn", "rr", "wrr")


class Backend:
    """One master as the load balancer sees it."""

    def __init__(
        self,
        master_id: str,
        host: str,
        ports: dict[str, int],
        weight: float = 1.0,
        handoff: Optional[str] = None,
    ) -> None:
        self.id = master_id
        self.host = host
        self.ports = dict(ports)
        self.weight = weight
        #: The master's handoff socket (forward: handoff), if it is on this host.
        self.handoff = handoff
        self.draining = False
        self.drain_started: Optional[float] = None
        #: forward: kernel: the drain timed out and its connections were cut.
        self.drain_closed = False
        self.up = {proto: True for proto in ports}
        self.good = {proto: 0 for proto in ports}
        self.bad = {proto: 0 for proto in ports}
        self.conns = {proto: 0 for proto in ports}
        self.total = {proto: 0 for proto in ports}
        self.pairs: set[Any] = set()  # open forwarded connections, for drain

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "host": self.host,
            "ports": self.ports,
            "weight": self.weight,
            "draining": self.draining,
        }
        if self.handoff:
            out["handoff"] = self.handoff
        return out

    def status(self) -> dict[str, Any]:
        out = self.to_dict()
        out["up"] = dict(self.up)
        out["connections"] = dict(self.conns)
        out["total_connections"] = dict(self.total)
        return out


class Pool:
    """Every master, with the scheduler that picks one for a new connection."""

    def __init__(
        self,
        scheduler: str = "leastconn",
        rise: int = 2,
        fall: int = 2,
        rng: Optional[random.Random] = None,
        state_path: Optional[str] = None,
    ) -> None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}")
        self.scheduler = scheduler
        self.rise = rise
        self.fall = fall
        self.rng = rng if rng is not None else random.Random()
        self.state_path = state_path
        self.backends: dict[str, Backend] = {}
        self.epoch = 0
        self._rr = 0
        self._wrr_current: dict[str, float] = {}
        #: Called after any change to which masters may take new connections.
        self.on_change: list[Callable[[], None]] = []

    def changed(self) -> None:
        for call in list(self.on_change):
            call()

    # Membership -----------------------------------------------------------------

    def load(self, initial: Iterable[dict[str, Any]]) -> None:
        """The persisted list if there is one, else ``initial`` (from the config)."""
        if self.state_path and os.path.exists(self.state_path):
            with open(self.state_path) as f:
                doc = json.load(f)
            self.replace(doc["masters"], int(doc["epoch"]), persist=False)
            log.info("loaded {n} masters at epoch {epoch}", n=len(self.backends), epoch=self.epoch)
        else:
            self.replace(list(initial), 0, persist=False)

    def replace(self, masters: list[dict[str, Any]], epoch: int, persist: bool = True) -> None:
        """Adopt a whole master list (from a file or from the peer)."""
        seen = set()
        for m in masters:
            seen.add(m["id"])
            current = self.backends.get(m["id"])
            if current is None or current.host != m["host"] or current.ports != m["ports"]:
                self.backends[m["id"]] = backend = Backend(
                    m["id"],
                    m["host"],
                    {k: int(v) for k, v in m["ports"].items()},
                    float(m.get("weight", 1.0)),
                    m.get("handoff") or None,
                )
            else:
                backend = current
                backend.weight = float(m.get("weight", 1.0))
                backend.handoff = m.get("handoff") or None
            backend.draining = bool(m.get("draining", False))
        for master_id in list(self.backends):
            if master_id not in seen:
                del self.backends[master_id]
        self.epoch = epoch
        if persist:
            self.save()
        self.changed()

    def save(self) -> None:
        if not self.state_path:
            return
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"epoch": self.epoch, "masters": self.export()}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    def export(self) -> list[dict[str, Any]]:
        return [b.to_dict() for b in self.backends.values()]

    def add(
        self,
        master_id: str,
        host: str,
        ports: dict[str, int],
        weight: float = 1.0,
        handoff: Optional[str] = None,
    ) -> None:
        if master_id in self.backends:
            raise KeyError(f"master {master_id!r} already exists")
        self.backends[master_id] = Backend(master_id, host, ports, weight, handoff)
        self.epoch += 1
        self.save()
        self.changed()

    def drain(self, master_id: str, now: float) -> Backend:
        backend = self.backends[master_id]
        backend.draining = True
        backend.drain_started = now
        self.epoch += 1
        self.save()
        self.changed()
        return backend

    def remove(self, master_id: str) -> Backend:
        backend = self.backends.pop(master_id)
        self.epoch += 1
        self.save()
        self.changed()
        return backend

    # Health -----------------------------------------------------------------------

    def check_result(self, backend: Backend, proto: str, ok: bool, why: str = "") -> None:
        if ok:
            backend.bad[proto] = 0
            backend.good[proto] += 1
            if not backend.up[proto] and backend.good[proto] >= self.rise:
                backend.up[proto] = True
                log.info("master {m} {proto} is up", m=backend.id, proto=proto)
                self.changed()
        else:
            backend.good[proto] = 0
            backend.bad[proto] += 1
            if backend.up[proto] and backend.bad[proto] >= self.fall:
                backend.up[proto] = False
                log.warn("master {m} {proto} is down: {why}", m=backend.id, proto=proto, why=why)
                self.changed()

    def observed_failure(self, backend: Backend, proto: str, why: str) -> None:
        """Real traffic was refused or reset: down at once, no waiting for checks."""
        backend.good[proto] = 0
        backend.bad[proto] = max(backend.bad[proto] + 1, self.fall)
        if backend.up[proto]:
            backend.up[proto] = False
            log.warn("master {m} {proto} is down: {why}", m=backend.id, proto=proto, why=why)
            self.changed()

    # Scheduling ---------------------------------------------------------------------

    def candidates(self, proto: str, exclude: Iterable[str] = ()) -> list[Backend]:
        skip = set(exclude)
        return [
            b
            for b in self.backends.values()
            if proto in b.ports and b.up.get(proto) and not b.draining and b.id not in skip
        ]

    def choose(self, proto: str, exclude: Iterable[str] = ()) -> Optional[Backend]:
        live = self.candidates(proto, exclude)
        if not live:
            return None
        if self.scheduler == "rr":
            self._rr += 1
            return live[self._rr % len(live)]
        if self.scheduler == "wrr":
            # Smooth weighted round robin (as nginx): even spacing, exact ratios.
            total = 0.0
            best = None
            for b in live:
                cur = self._wrr_current.get(b.id, 0.0) + b.weight
                self._wrr_current[b.id] = cur
                total += b.weight
                if best is None or cur > self._wrr_current[best.id]:
                    best = b
            assert best is not None
            self._wrr_current[best.id] -= total
            return best
        # leastconn: fewest connections per unit of weight; ties broken at random.
        lowest = min(b.conns[proto] / max(b.weight, 1e-9) for b in live)
        tied = [b for b in live if b.conns[proto] / max(b.weight, 1e-9) == lowest]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)
