"""``twistd kvha-lb --config FILE``: a load balancer of the active/standby pair."""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from kvha.compiled import log_build
from kvha.config import warn_placeholders
from kvha.gctune import tune_gc
from kvha.lb.nat import kernel_unavailable
from kvha.tapoptions import RoleOptions

log = Logger()


class Options(RoleOptions):
    ROLE = "lb"

    def postOptions(self) -> None:
        super().postOptions()
        if self["lb"].forward == "kernel":
            # Found now, not when the VIP is taken: an ACTIVE node that cannot
            # write its table would hold the VIP and forward nothing.
            why = kernel_unavailable()
            if why:
                raise usage.UsageError(f"{self['config']}: forward: kernel: {why}")


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from kvha.lb.service import LoadBalancer

    warn_placeholders(options["lb"], "lb", log)
    balancer = LoadBalancer(options["lb"], reactor)
    log_build(log, "load balancer")
    tune_gc()
    return balancer
