"""The `cellray` command line. Each group of subcommands lives in jobs/commands/<group>.py."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from engine.errors import CellrayError

# Modules under jobs.commands, each with `register(subparsers)` adding its subcommands.
COMMAND_MODULES = ["store", "stats", "train", "job", "cluster"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellray", description="Single-cell ML on Ray: ingest, stats, train, embed.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"jobs.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from jobs.scheduler.client import use_token_auth

    use_token_auth()  # `--address` clusters started with token auth refuse a client without it (Ray's own rule)
    try:
        return int(args.func(args) or 0)
    except CellrayError as e:
        from rich.console import Console
        from rich.markup import escape

        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
