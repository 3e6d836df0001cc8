"""The `cellray` command line. Each group of subcommands lives in jobs/commands/<group>.py.

Every error reaches the user as one line on stderr (`error: ...`) with exit status 2: cellray's own errors name
the file, field and expectation; errors raised inside Ray tasks and actors are unwrapped to the error behind them;
OS errors name the path. `--debug` prints the Python traceback as well.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from engine.errors import CellrayError, causes
from engine.runtime import INSECURE_ENV

# Modules under jobs.commands, each with `register(subparsers)` adding its subcommands.
COMMAND_MODULES = ["store", "stats", "train", "evaluate", "job", "cluster"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellray", description="Single-cell ML on Ray: ingest, stats, train, embed.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    parser.add_argument("--debug", action="store_true", help="print the Python traceback of an error too")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="accept an embedded Ray without token auth (RAY_AUTH_MODE=disabled): its ports then accept anyone",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"jobs.commands.{name}").register(sub)
    return parser


def user_error(error: BaseException) -> tuple[str, bool]:
    """(one line for the user, whether it is an expected error rather than a bug in cellray)."""
    for e in causes(error):  # the error behind Ray's wrappers
        if isinstance(e, CellrayError):
            return str(e), True
        if isinstance(e, OSError) and e.strerror:
            where = f"{e.filename}: " if e.filename else ""
            return f"{where}{e.strerror}", True
    text = str(error).strip().splitlines()
    return f"internal error: {type(error).__name__}: {text[0] if text else ''} (rerun with --debug for details)", False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.insecure:
        os.environ[INSECURE_ENV] = "1"
    from jobs.scheduler.client import use_token_auth

    use_token_auth()  # `--address` clusters started with token auth refuse a client without it (Ray's own rule)
    if getattr(args, "address", None):
        from jobs.cluster.local import join_as_local

        join_as_local(args.address, getattr(args, "state_dir", None))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from rich.console import Console
        from rich.markup import escape

        if args.debug:
            traceback.print_exc()
        message, expected = user_error(e)
        first, *rest = message.splitlines() or [""]
        # one line per problem (a spec with three bad fields gives three), each `error: ...`
        Console(stderr=True, soft_wrap=True).print(
            "\n".join(f"[bold red]error:[/] {escape(line)}" for line in [first, *rest]), highlight=False
        )
        return 2 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
