"""twistd plugins for kvha.  Each role's module is imported only when it runs."""

from twisted.application.service import ServiceMaker

kvha_data = ServiceMaker(
    "kvha-data",
    "kvha.data.tap",
    "kvha data node: storage engine and the internal protocol",
    "kvha-data",
)

kvha_master = ServiceMaker(
    "kvha-master",
    "kvha.master.tap",
    "kvha master node: memcached protocol, ring, replication and fail-over",
    "kvha-master",
)

kvha_lb = ServiceMaker(
    "kvha-lb",
    "kvha.lb.tap",
    "kvha load balancer: heartbeats, virtual IP and forwarding to masters",
    "kvha-lb",
)

# ``twistd --reactor=kvha``: the epoll reactor without the per-event legacy log
# context (kvha/reactor.py).  Reactor plugins are found by their type, so this
# needs no import of the module until it is chosen.
from twisted.application.reactors import Reactor  # noqa: E402

kvha_reactor = Reactor(
    "kvha",
    "kvha.reactor",
    "epoll, dispatching events without the legacy log context (for kvha nodes)",
)
