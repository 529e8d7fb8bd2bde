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
