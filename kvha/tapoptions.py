"""The ``--config FILE`` option every kvha twistd plugin takes."""

from __future__ import annotations

from typing import ClassVar

from twisted.python import usage

from kvha.config import ConfigError, load_config


class RoleOptions(usage.Options):
    """Loads and validates ``--config`` for one role, so a bad file stops twistd at once.

    The role's section ends up in ``self[ROLE]``; a mistake is a usage error
    naming the key path, which twistd prints before it exits non-zero.
    """

    ROLE: ClassVar[str] = ""
    optParameters = [["config", "c", None, "YAML configuration file of this role"]]

    def postOptions(self) -> None:
        path = self["config"]
        if not path:
            raise usage.UsageError("--config FILE is required")
        try:
            config = load_config(path)
        except ConfigError as e:
            raise usage.UsageError(f"{path}: {e}") from None
        section = getattr(config, self.ROLE)
        if section is None:
            raise usage.UsageError(
                f"{path}: this is a {config.role} configuration; "
                f"kvha-{self.ROLE} needs `{self.ROLE}:`"
            )
        self[self.ROLE] = section
