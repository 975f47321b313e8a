"""`removebg report`: the visual QA report of an enriched manifest, from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from removebg_provider.cli import subcommand_help
from removebg_provider.errors import RemoveBgError
from removebg_provider.report import build_report
from removebg_provider.storage import Storage

EXIT_OK, EXIT_BAD_INPUT = 0, 2

_EPILOG = """
Writes <out>.html (self-contained: thumbnails are embedded, so it opens from any bucket or laptop)
and <out>.png (a contact sheet). Each tile shows the original, the cutout on a checkerboard and the
mask, with the row id, status and quality flags. Flagged rows come first, then failed rows, then a
random sample of the rest. Only the shown rows' images are fetched; http(s) images only from public
addresses (--allow-private-urls lifts that), each within 10 s and 64 MiB. Prints the two URIs as JSON.
Exit codes: 0 written; 2 the manifest cannot be read or the report cannot be written.
"""


def add_parser(subcommands: Any) -> None:
    """Register `removebg report`."""
    parser = subcommands.add_parser(
        "report",
        help=subcommand_help("report"),
        description="Build the visual QA report of an enriched manifest written by `removebg run`.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "manifest", help="enriched manifest URI or path (.parquet, .csv, .jsonl; s3://, gs://, az://, ...)"
    )
    parser.add_argument(
        "--out",
        help="report URI without extension; .html and .png are appended "
        "(default: next to the manifest, <manifest stem>.report.html / .report.png)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=48,
        help="most tiles to show: flagged and failed rows first, then random others (default %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random sample, for a repeatable page (default %(default)s)",
    )
    parser.add_argument(
        "--image-column", default="image_url", help="column with the original images (default %(default)s)"
    )
    parser.add_argument(
        "--id-column", help="column with row ids (default: derived from the image reference, as `run` does)"
    )
    parser.add_argument(
        "--manifest-format", choices=("parquet", "csv", "jsonl"), help="override the extension"
    )
    parser.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="fetch http(s) images from loopback, private and reserved addresses too (refused by default)",
    )
    parser.set_defaults(handler=report)


def report(args: argparse.Namespace) -> int:
    """Build the report for the parsed arguments; print its URIs; return the exit code."""
    if args.sample < 1:
        return _fail(f"--sample must be at least 1, not {args.sample}")
    try:
        result = build_report(
            args.manifest,
            Storage(),
            out_prefix=args.out,
            sample=args.sample,
            seed=args.seed,
            image_column=args.image_column,
            id_column=args.id_column,
            manifest_format=args.manifest_format,
            allow_private_urls=args.allow_private_urls,
        )
    except RemoveBgError as exc:
        return _fail(str(exc))
    print(
        json.dumps(
            {"html": result.html_uri, "png": result.png_uri, "tiles": result.tiles, "rows": result.rows},
            indent=2,
        )
    )
    return EXIT_OK


def _fail(message: str) -> int:
    print(f"removebg report: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
