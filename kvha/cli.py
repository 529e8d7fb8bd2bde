"""The ``kvha`` command line: one argparse subcommand per task.

Each command group registers itself through an ``_add_<group>`` function that
attaches a parser and a handler (``set_defaults(func=...)``); ``main`` only
parses and dispatches.  Adding ``up``, ``status``, ``node``, ``master``,
``partition`` or ``bench`` later means writing one more such function and
listing it in ``_COMMANDS``.  Handlers take the parsed arguments and return
the exit status, so ``main`` is callable from tests without spawning a process.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from kvha import __version__
from kvha.config import ConfigError, load_config


def _config_check(args: argparse.Namespace) -> int:
    """Validate each file; the status says whether all of them are usable."""
    status = 0
    for path in args.files:
        try:
            config = load_config(path)
        except ConfigError as exc:
            print(f"{path}: {exc}", file=sys.stderr)
            status = 1
        else:
            print(f"{path}: ok (role {config.role})")
    return status


def _add_config(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("config", help="work with configuration files")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate configuration files")
    check.add_argument("files", nargs="+", metavar="FILE", help="YAML configuration file")
    check.set_defaults(func=_config_check)


_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_config]


def build_parser() -> argparse.ArgumentParser:
    """The full parser; separate from ``main`` so tests and docs can inspect it."""
    parser = argparse.ArgumentParser(prog="kvha", description="kvha key-value store")
    parser.add_argument("--version", action="version", version=f"kvha {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _COMMANDS:
        add(commands)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; returns the exit status instead of exiting."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
