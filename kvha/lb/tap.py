"""``twistd kvha-lb --config FILE``: a load balancer of the active/standby pair."""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger

from kvha.config import warn_placeholders
from kvha.gctune import tune_gc
from kvha.tapoptions import RoleOptions

log = Logger()


class Options(RoleOptions):
    ROLE = "lb"


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from kvha.lb.service import LoadBalancer

    warn_placeholders(options["lb"], "lb", log)
    balancer = LoadBalancer(options["lb"], reactor)
    tune_gc()
    return balancer
