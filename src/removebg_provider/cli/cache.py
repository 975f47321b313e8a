"""`removebg cache`: look into a result store and prune it, from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from typing import Any

from removebg_provider.cli import subcommand_help
from removebg_provider.errors import RemoveBgError
from removebg_provider.pipeline import store_index
from removebg_provider.pipeline.store import ResultStore
from removebg_provider.storage import Storage

EXIT_OK, EXIT_BAD_INPUT = 0, 2

_EPILOG = """
The result store is where `removebg run` keeps finished results by image content and options
(default <output prefix>/_removebg_cache; --cache-prefix of `run`). `stats` counts its entries,
claims and index files; `prune` removes entries that can no longer be served (their outputs were
overwritten or deleted) once older than --older-than days, claims left by dead runs, and index files
older than that except the newest complete run's. Prints JSON.
Exit codes: 0 done; 2 the store cannot be read or written.
"""


def add_parser(subcommands: Any) -> None:
    """Register `removebg cache stats` and `removebg cache prune`."""
    parser = subcommands.add_parser(
        "cache",
        help=subcommand_help("cache"),
        description="Look into a result store and prune it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="cache_command", required=True)
    stats = actions.add_parser("stats", help="count the entries and claims of a store")
    stats.add_argument("store", help="the store's URI or folder (e.g. s3://bucket/cutouts/_removebg_cache)")
    stats.set_defaults(handler=_stats)
    prune = actions.add_parser("prune", help="remove entries that can no longer be served, and dead claims")
    prune.add_argument("store", help="the store's URI or folder (e.g. s3://bucket/cutouts/_removebg_cache)")
    prune.add_argument(
        "--older-than",
        type=float,
        required=True,
        metavar="DAYS",
        help="only entries stored more than DAYS ago",
    )
    prune.add_argument(
        "--even-if-current",
        action="store_true",
        help="also remove old entries that could still be served (their images are billed again when met)",
    )
    prune.set_defaults(handler=_prune)


def _stats(args: argparse.Namespace) -> int:
    try:
        storage = Storage()
        found = ResultStore(args.store, storage, holder="removebg cache").stats()
        index_files = len(store_index.files(args.store, storage))
    except RemoveBgError as exc:
        return _fail(str(exc))
    print(json.dumps({"store": args.store, **found.to_dict(), "index_files": index_files}, indent=2))
    return EXIT_OK


def _prune(args: argparse.Namespace) -> int:
    if args.older_than < 0:
        return _fail(f"--older-than must not be negative, not {args.older_than}")
    storage = Storage()
    store = ResultStore(args.store, storage, holder="removebg cache")
    older_than = timedelta(days=args.older_than)
    try:
        done = store.prune(older_than, even_if_current=args.even_if_current)
        index_files = store_index.prune(args.store, storage, older_than, even_if_current=args.even_if_current)
    except RemoveBgError as exc:
        return _fail(str(exc))
    print(json.dumps({"store": args.store, **done.to_dict(), "index_files_removed": index_files}, indent=2))
    return EXIT_OK


def _fail(message: str) -> int:
    print(f"removebg cache: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
