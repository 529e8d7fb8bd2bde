"""``twistd kvha-lb --config FILE``: a load balancer of the active/standby pair."""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from kvha.config import ConfigError, load_config, warn_placeholders

log = Logger()


class Options(usage.Options):
    optParameters = [["config", "c", None, "YAML configuration file with an `lb:` section"]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            config = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"{self['config']}: {e}") from None
        if config.lb is None:
            raise usage.UsageError(
                f"{self['config']}: this is a {config.role} configuration; kvha-lb needs `lb:`"
            )
        self["lb"] = config.lb


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from kvha.lb.service import LoadBalancer

    warn_placeholders(options["lb"], "lb", log)
    return LoadBalancer(options["lb"], reactor)
