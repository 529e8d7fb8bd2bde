"""A pending join or leave whose driving master went silent is taken over (ClusterManager).

Real ClusterManager objects over a stand-in master, on a MemoryReactorClock:
no sockets.  The peers' answers are simulated by what ``heard`` records.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.web.test.requesthelper import DummyRequest

from kvha.config import MergeConfig
from kvha.master.cluster import AdminResource, ClusterManager, initial_map

TOKEN = "takeover-token-0123456789"
NODES = [{"id": f"d{i}", "address": f"tcp:127.0.0.1:{7100 + i}"} for i in range(3)]


def manager(master_id: str, reactor: MemoryReactorClock, m: Any = None) -> ClusterManager:
    master = SimpleNamespace(
        reactor=reactor,
        config=SimpleNamespace(id=master_id, merge=MergeConfig()),
        adopt_map=lambda m: None,
        links={},
    )
    initial = m if m is not None else initial_map(NODES, 1, 16, [])
    return ClusterManager(master, copy.deepcopy(initial), None, [], TOKEN, takeover_after=5.0)


def join_driven_by_m1(reactor: MemoryReactorClock) -> dict[str, Any]:
    m1 = manager("m1", reactor)
    m1.add_node({"id": "d9", "address": "tcp:127.0.0.1:7199"})
    assert m1.map["pending"]["driver"] == "m1"
    return m1.map


def test_a_silent_driver_is_taken_over_after_takeover_after() -> None:
    """Not heard for takeover_after: this master drives the change too, leaving the
    map as it is (a claim in a new epoch could tie with the old driver's cut-over)."""
    reactor = MemoryReactorClock()
    m = join_driven_by_m1(reactor)
    m2 = manager("m2", reactor, m)
    m2.heard["m1"] = reactor.seconds()
    m2._poll()
    reactor.advance(4.9)
    m2._poll()
    assert m2.driving is None  # heard 4.9 s ago: not yet
    reactor.advance(0.2)
    m2._poll()
    assert m2.driving is not None
    assert m2.taken_over == ("join", "d9")
    assert m2.map == m  # no claim: same epoch, same driver in the map
    assert m2.status()["pending"]["taken_over_here"] is True


def test_a_driver_that_is_heard_keeps_its_change() -> None:
    reactor = MemoryReactorClock()
    m2 = manager("m2", reactor, join_driven_by_m1(reactor))
    for _ in range(40):
        m2.heard["m1"] = reactor.seconds()
        reactor.advance(0.5)
        m2._poll()
    assert m2.driving is None and m2.taken_over is None
    assert m2.status()["pending"]["taken_over_here"] is False


def test_a_master_that_just_started_waits_before_taking_over() -> None:
    """Never having heard the driver is not enough: the wait counts from when this
    master first saw the pending change."""
    reactor = MemoryReactorClock()
    m2 = manager("m2", reactor, join_driven_by_m1(reactor))
    reactor.advance(100)
    m2._poll()
    assert m2.driving is None
    reactor.advance(5.1)
    m2._poll()
    assert m2.driving is not None


def test_other_map_changes_do_not_restart_the_wait() -> None:
    """The wait is for the change and its driver, not for an epoch."""
    reactor = MemoryReactorClock()
    m = join_driven_by_m1(reactor)
    m2 = manager("m2", reactor, m)
    m2._poll()
    for _ in range(3):
        reactor.advance(2.0)
        newer = copy.deepcopy(m2.map)
        newer["epoch"] += 1  # e.g. a partition created meanwhile, the join still pending
        assert m2.adopt(newer, "pushed by a peer")
        m2._poll()
    assert m2.driving is not None


def test_only_the_smallest_live_master_takes_over() -> None:
    reactor = MemoryReactorClock()
    m = join_driven_by_m1(reactor)
    m2, m3 = manager("m2", reactor, m), manager("m3", reactor, m)
    for mgr in (m2, m3):
        mgr._poll()
    for _ in range(12):
        reactor.advance(0.5)
        m3.heard["m2"] = reactor.seconds()  # m3 hears m2; nobody hears m1
        m2.heard["m3"] = reactor.seconds()
        m2._poll()
        m3._poll()
    assert m3.driving is None and m3.taken_over is None  # m3 leaves it to m2
    assert m2.taken_over == ("join", "d9")


def test_admin_answers_name_the_master_only_to_authorized_callers() -> None:
    reactor = MemoryReactorClock()
    resource = AdminResource(manager("m2", reactor))
    request = DummyRequest([b"v1", b"admin", b"cluster"])
    request.path = b"/v1/admin/cluster"
    request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + TOKEN.encode()])
    body = resource.render(request)
    assert json.loads(body)["epoch"] == 0
    assert request.responseHeaders.getRawHeaders(b"kvha-master") == [b"m2"]
    anonymous = DummyRequest([b"v1", b"admin", b"cluster"])
    anonymous.path = b"/v1/admin/cluster"
    resource.render(anonymous)
    assert anonymous.responseCode == 401
    assert anonymous.responseHeaders.getRawHeaders(b"kvha-master") is None


def test_a_driver_whose_change_was_cut_over_elsewhere_stands_down() -> None:
    """The old driver (slow, or restarted from its saved map) copies nothing and
    proposes nothing once the map shows the change done by the master that took it
    over."""
    reactor = MemoryReactorClock()
    m1 = manager("m1", reactor)
    m1.add_node({"id": "d9", "address": "tcp:127.0.0.1:7199"})
    assert m1.driving is not None
    done = copy.deepcopy(m1.map)
    done["nodes"] = done["pending"]["nodes_after"]
    done["tokens"] = done["pending"]["tokens_after"]
    done["pending"] = None
    done["epoch"] += 1
    done["proposer"] = "m2"
    assert m1.adopt(done, "pushed by a peer")
    reactor.advance(1.5)  # the grace before streaming passes
    assert m1.driving is None
    assert m1.map == done
    assert m1.progress == {}  # nothing was streamed


def test_a_taken_over_change_is_dropped_when_it_is_done() -> None:
    reactor = MemoryReactorClock()
    m = join_driven_by_m1(reactor)
    m2 = manager("m2", reactor, m)
    m2._poll()
    reactor.advance(5.1)
    m2._poll()
    assert m2.taken_over == ("join", "d9")
    done = copy.deepcopy(m)
    done["pending"] = None
    done["epoch"] += 1
    m2.adopt(done, "pushed by a peer")
    m2._poll()
    assert m2.taken_over is None


def test_a_failed_take_over_waits_before_trying_again() -> None:
    """A drive that fails (here: no links to stream with) is retried after 2 s, not at
    every poll."""
    reactor = MemoryReactorClock()
    m2 = manager("m2", reactor, join_driven_by_m1(reactor))
    m2._poll()
    reactor.advance(5.1)
    m2._poll()
    first = m2.driving
    assert first is not None
    reactor.advance(1.5)  # the grace passes; streaming fails: no link to the new node
    assert m2.driving is None
    m2._poll()
    assert m2.driving is None  # not at once
    reactor.advance(2.1)
    m2._poll()
    assert m2.driving is not None


def test_one_poll_at_a_time_per_peer_and_a_silent_peer_is_given_up() -> None:
    """A peer that accepts and never answers gets one poll at a time, given up after
    POLL_TIMEOUT, instead of a new request every poll interval piling up."""
    from kvha.master.cluster import POLL_TIMEOUT

    reactor = MemoryReactorClock()
    master = SimpleNamespace(
        reactor=reactor,
        config=SimpleNamespace(id="m2", merge=MergeConfig()),
        adopt_map=lambda m: None,
        links={},
    )
    mgr = ClusterManager(master, initial_map(NODES, 1, 16, []), None, ["http://127.0.0.1:9"], TOKEN)
    for _ in range(5):
        mgr._poll()
        reactor.advance(0.25)
    assert len(reactor.tcpClients) == 1  # one request out, not five
    reactor.advance(POLL_TIMEOUT)
    assert mgr.peer_epochs["http://127.0.0.1:9"] is None
    mgr._poll()
    assert len(reactor.tcpClients) == 2  # given up, then polled again
