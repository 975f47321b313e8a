"""The `removebg` command line: one module per subcommand."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from removebg_provider import __version__
from removebg_provider.cli import check, models, report, run, serve


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="removebg",
        description="Remove backgrounds from catalog product photos (Ximilar API or the local server).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    subcommands = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(subcommands)
    run.add_parser(subcommands)
    check.add_parser(subcommands)
    report.add_parser(subcommands)
    models.add_parser(subcommands)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    exit_code: int = args.handler(args)
    return exit_code
