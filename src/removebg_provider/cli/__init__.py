"""The `removebg` command line: one module per subcommand, imported only when that subcommand runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from removebg_provider import __version__

# Name -> (module, one-line help). `removebg --help` lists these without importing any of them:
# the subcommands pull in pyarrow, the cloud SDKs, FastAPI and OpenCV, seconds of imports.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("removebg_provider.cli.serve", "run the local Ximilar-compatible Remove Background server"),
    "run": ("removebg_provider.cli.run", "remove the backgrounds of every image in a manifest"),
    "check": ("removebg_provider.cli.check", "check the token, the service and the credits before a run"),
    "report": (
        "removebg_provider.cli.report",
        "write an HTML page and a PNG contact sheet of the rows worth a look",
    ),
    "models": (
        "removebg_provider.cli.models",
        "list, download and locate the ONNX models `removebg serve --model NAME` runs",
    ),
    "cache": ("removebg_provider.cli.cache", "count or prune the result store of earlier runs"),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="removebg",
        description="Remove backgrounds from catalog product photos (Ximilar API or the local server).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    subcommands = parser.add_subparsers(dest="command", required=True)
    chosen = _chosen_subcommand(argv)
    for name, (module, summary) in SUBCOMMANDS.items():
        if name == chosen:
            importlib.import_module(module).add_parser(subcommands)
        else:
            subcommands.add_parser(name, help=summary)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    exit_code: int = args.handler(args)
    return exit_code


def subcommand_help(name: str) -> str:
    """The one-line help of subcommand `name`, as `removebg --help` lists it."""
    return SUBCOMMANDS[name][1]


def _chosen_subcommand(argv: Sequence[str] | None) -> str | None:
    """The first argument naming a subcommand (the options before it take no values)."""
    arguments = sys.argv[1:] if argv is None else argv
    return next((argument for argument in arguments if argument in SUBCOMMANDS), None)
