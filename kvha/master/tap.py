"""``twistd kvha-master --config FILE``: the master node as a twistd service."""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger

from kvha.compiled import log_build
from kvha.config import warn_placeholders
from kvha.gctune import tune_gc
from kvha.master.service import MasterNode
from kvha.tapoptions import RoleOptions

log = Logger()


class Options(RoleOptions):
    ROLE = "master"


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    warn_placeholders(options["master"], "master", log)
    node = MasterNode(options["master"], reactor)
    log_build(log, "master")
    tune_gc()
    return node
