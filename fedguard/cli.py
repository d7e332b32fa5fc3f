"""The ``fedguard`` command.

Subcommands are plug-ins: each component registers its commands through the ``fedguard.commands``
entry-point group (``[project.entry-points."fedguard.commands"]`` in ``pyproject.toml``). An entry point
names a function ``register(commands: Commands) -> None`` that adds its parsers, e.g.::

    def register(commands: Commands) -> None:
        p = commands.subcommand("audit", "ownership", help="is my watermark in this model?")
        p.add_argument("--model", required=True)
        p.set_defaults(handler=run_ownership_audit)   # handler(args) -> exit code

Keep registering modules light: import heavy dependencies inside the handler. Errors derived from
:class:`~fedguard.errors.FedGuardError` are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from fedguard import __version__
from fedguard.errors import FedGuardError

ENTRY_POINT_GROUP = "fedguard.commands"
Handler = Callable[[argparse.Namespace], int | None]


class Commands:
    """What a plug-in sees: top-level commands and commands grouped under a verb (``audit ownership``)."""

    def __init__(self, subparsers: argparse._SubParsersAction) -> None:
        self._subparsers = subparsers
        self._groups: dict[str, argparse._SubParsersAction] = {}

    def command(self, name: str, *, help: str) -> argparse.ArgumentParser:
        return self._subparsers.add_parser(name, help=help, description=help)

    def subcommand(self, group: str, name: str, *, help: str, group_help: str | None = None) -> argparse.ArgumentParser:
        if group not in self._groups:
            parent = self._subparsers.add_parser(group, help=group_help or f"{group} commands")
            parent.set_defaults(handler=_print_help_of(parent))
            self._groups[group] = parent.add_subparsers(metavar="KIND", title=f"{group} kinds")
        return self._groups[group].add_parser(name, help=help, description=help)


def _print_help_of(parser: argparse.ArgumentParser) -> Handler:
    def handler(_: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return handler


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedguard",
        description="Privacy and IP protection for federated fine-tuning of LLMs: watermarks, "
        "secure aggregation, differential privacy, audits and attacks.",
    )
    parser.add_argument("--version", action="version", version=f"fedguard {__version__}")
    sub = parser.add_subparsers(metavar="COMMAND", title="commands")
    commands = Commands(sub)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        ep.load()(commands)
    parser.set_defaults(handler=_print_help_of(parser))
    return parser


def register_info(commands: Commands) -> None:
    """``fedguard info``: versions of fedguard and its optional back-ends."""
    p = commands.command("info", help="show versions of fedguard and of its optional back-ends")
    p.set_defaults(handler=_info)


def _info(_: argparse.Namespace) -> int:
    from importlib import metadata

    from fedguard.federation.registry import available_aggregators

    print(f"fedguard {__version__} (python {sys.version.split()[0]})")
    for dist in ("torch", "numpy", "transformers", "peft", "deepspeed", "opacus", "dp-accounting",
                 "phe", "gmpy2", "crypten", "cryptography"):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {dist:<14} {version}")
    print(f"aggregators: {', '.join(available_aggregators())}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except FedGuardError as err:
        print(f"fedguard: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedguard: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
