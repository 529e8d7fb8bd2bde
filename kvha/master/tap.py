"""``twistd kvha-master --config FILE``: the master node as a twistd service."""

from __future__ import annotations

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from kvha.config import ConfigError, load_config, warn_placeholders
from kvha.master.service import MasterNode

log = Logger()


class Options(usage.Options):
    optParameters = [["config", "c", None, "YAML configuration file with a `master:` section"]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            config = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(f"{self['config']}: {e}") from None
        if config.master is None:
            raise usage.UsageError(
                f"{self['config']}: this is a {config.role} configuration; "
                "kvha-master needs `master:`"
            )
        self["master"] = config.master


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    warn_placeholders(options["master"], "master", log)
    return MasterNode(options["master"], reactor)
