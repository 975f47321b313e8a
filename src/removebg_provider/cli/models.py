"""`removebg models`: list the models known by name, download one into the cache, print its path."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from removebg_provider.cli import subcommand_help
from removebg_provider.engines.model_store import MIRROR_ENV, MODEL_HOME_ENV, cached_path, model_home, pull
from removebg_provider.engines.presets import PRESETS
from removebg_provider.errors import RemoveBgError
from removebg_provider.progress import format_seconds

log = logging.getLogger(__name__)

MIB = 1024 * 1024

EXIT_OK = 0
EXIT_NOT_DOWNLOADED = 1
EXIT_BAD_INPUT = 2

MODEL_HOME_HELP = (
    f"the model cache; without it ${MODEL_HOME_ENV}, else $XDG_CACHE_HOME/removebg/models, "
    "else ~/.cache/removebg/models"
)
MIRROR_HELP = (
    f"base URL to download model files from instead of their public address, under the same file name "
    f"(without it ${MIRROR_ENV}, if set); the checksum is still the table's"
)


def add_parser(subcommands: Any) -> None:
    """Register the `models` subcommand on `subcommands` (the result of `add_subparsers`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model-home", type=Path, default=None, metavar="DIR", help=MODEL_HOME_HELP)
    parser: argparse.ArgumentParser = subcommands.add_parser(
        "models",
        help=subcommand_help("models"),
        description=(
            "Models known by name (rembg's names) with their conventions, public download and checksum. "
            "`pull` downloads into the cache with progress, resumes after a cut and refuses a file whose "
            "checksum differs; `serve --model NAME` then runs it."
        ),
    )
    actions = parser.add_subparsers(dest="models_command", required=True)
    listing = actions.add_parser(
        "list", parents=[common], help="the models known by name, and which are here"
    )
    listing.set_defaults(handler=run_list)
    pulling = actions.add_parser(
        "pull", parents=[common], help="download models into the cache (a file already there is verified)"
    )
    pulling.add_argument(
        "names", nargs="+", metavar="NAME", help="model names, as `removebg models list` shows"
    )
    pulling.add_argument("--mirror", default=None, metavar="URL", help=MIRROR_HELP)
    pulling.add_argument("--no-progress", action="store_true", help="no progress bar")
    pulling.set_defaults(handler=run_pull)
    locating = actions.add_parser(
        "path", parents=[common], help="print where a model's file is (exit 1 if it is not downloaded yet)"
    )
    locating.add_argument("name", metavar="NAME", help="a model name, as `removebg models list` shows")
    locating.set_defaults(handler=run_path)


def run_list(args: argparse.Namespace) -> int:
    """Print every model known by name: family, input size, output scaling, whether it is cached."""
    home = model_home(args.model_home)
    print(f"model cache: {home}")
    rows = [("NAME", "FAMILY", "INPUT", "OUTPUT", "HERE", "ABOUT")]
    for preset in PRESETS.values():
        size = preset.convention.size
        here = "yes" if (home / preset.file_name).is_file() else ("-" if preset.url else "own file")
        rows.append(
            (preset.name, preset.family, f"{size}x{size}", preset.convention.output, here, preset.summary)
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return EXIT_OK


def run_pull(args: argparse.Namespace) -> int:
    """Download each named model into the cache (verified); print each file's path."""
    home = model_home(args.model_home)
    for name in args.names:
        try:
            path = pull_with_progress(name, home, args.mirror, show_progress=not args.no_progress)
        except RemoveBgError as error:
            print(f"removebg models pull: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(path)
    return EXIT_OK


def run_path(args: argparse.Namespace) -> int:
    """Print where the model's file is or will be; exit 1 if it is not there yet."""
    try:
        path = cached_path(args.name, model_home(args.model_home))
    except RemoveBgError as error:
        print(f"removebg models path: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(path)
    if not path.is_file():
        print(f"not downloaded yet: removebg models pull {args.name}", file=sys.stderr)
        return EXIT_NOT_DOWNLOADED
    return EXIT_OK


def pull_with_progress(name: str, home: Path, mirror: str | None, show_progress: bool) -> Path:
    """`model_store.pull` reporting done/total bytes, rate and ETA: a bar on a terminal, else log lines."""
    on_terminal = show_progress and sys.stderr.isatty()
    bar = tqdm(
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not on_terminal,
    )
    lines = _ProgressLines(name) if show_progress and not on_terminal else None

    def advance(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)
        if lines is not None:
            lines.update(done, total)

    try:
        path = pull(name, home, advance, mirror)
    finally:
        bar.close()
    log.info("model %s is at %s (checksum verified)", name, path)
    return path


class _ProgressLines:
    """Download progress as log lines (for logs and pipes, where a bar would be noise), every few seconds."""

    def __init__(self, name: str, every_seconds: float = 5.0) -> None:
        self.name = name
        self.every_seconds = every_seconds
        self.started = time.monotonic()
        self.first_done: int | None = None
        self.last_line = self.started

    def update(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if self.first_done is None:
            self.first_done = done  # a resumed download starts past zero; the rate counts this run only
        if now - self.last_line < self.every_seconds and done != total:
            return
        self.last_line = now
        rate = (done - self.first_done) / max(now - self.started, 1e-9)
        eta = format_seconds((total - done) / rate) if total is not None and rate > 0 else "unknown"
        of_total = f"/{total / MIB:.1f}" if total is not None else ""
        log.info("%s: %.1f%s MiB, %.1f MiB/s, ETA %s", self.name, done / MIB, of_total, rate / MIB, eta)
