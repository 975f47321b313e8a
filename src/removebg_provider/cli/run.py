"""`removebg run`: the whole manifest pipeline from the command line, no Airflow needed."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from tqdm import tqdm

from removebg_provider import pipeline
from removebg_provider.client import DEFAULT_BASE_URL, DEFAULT_TIMEOUT, RemoveBgClient
from removebg_provider.errors import (
    AuthenticationError,
    BudgetExceededError,
    FailurePolicyError,
    OutOfCreditsError,
    RemoveBgError,
)
from removebg_provider.storage import Storage

TOKEN_ENV = "REMOVEBG_API_TOKEN"
ENDPOINT_ENV = "REMOVEBG_ENDPOINT"
RATE_LIMIT_REDIS_ENV = "REMOVEBG_RATE_LIMIT_REDIS_URL"
EXIT_OK, EXIT_FAILED_ROWS, EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_ACCOUNT = 0, 1, 2, 3, 4

_EPILOG = f"""
The API token is read from the environment variable {TOKEN_ENV}, never from the command line.
Exit codes: 0 the run met the failure policy; 1 more rows failed than --max-failed-fraction;
2 bad input or configuration; 3 the run would pass --max-billable-records (nothing was sent);
4 the API refused the token or the account is out of credits.
"""

log = logging.getLogger(__name__)


def add_parser(subcommands: Any) -> None:
    """Register `removebg run`."""
    defaults = pipeline.PipelineConfig("-", "-", "-")
    parser = subcommands.add_parser(
        "run",
        help="remove the backgrounds of every image in a manifest",
        description="Read a manifest, remove every background through the API, copy the cutouts into "
        "your storage and write an enriched manifest. Resumable: a rerun bills no image twice.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "manifest", help="manifest URI or path (.parquet, .csv, .jsonl; s3://, gs://, az://, ...)"
    )
    parser.add_argument(
        "--output-prefix", required=True, help="where the cutouts are written (URI or folder)"
    )
    parser.add_argument("--output-manifest", required=True, help="where the enriched manifest is written")
    parser.add_argument(
        "--endpoint",
        default=os.environ.get(ENDPOINT_ENV, DEFAULT_BASE_URL),
        help=f"API base URL (default: ${ENDPOINT_ENV} or {DEFAULT_BASE_URL}); e.g. http://127.0.0.1:8765 "
        "for `removebg serve`",
    )
    parser.add_argument("--mode", choices=("fast", "precise"), default=defaults.mode, help="API endpoint")
    parser.add_argument("--image-column", default=defaults.image_column, help="column with image references")
    parser.add_argument(
        "--id-column",
        default=None,
        help="column with unique row ids (default: derived from the image reference)",
    )
    parser.add_argument(
        "--manifest-format", choices=("parquet", "csv", "jsonl"), help="override the extension"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=defaults.max_records_per_request,
        help="records per API request (default %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="API requests in flight (default %(default)s)",
    )
    parser.add_argument(
        "--shard-size", type=int, default=defaults.shard_size, help="rows per shard (default %(default)s)"
    )
    parser.add_argument("--binary-mask", action="store_true", help="also store a binary mask ({id}.mask.jpg)")
    parser.add_argument(
        "--white-background", action="store_true", help="also store a white-background jpg ({id}.whitebg.jpg)"
    )
    parser.add_argument("--image-format", choices=("png", "jpg", "webp"), help="cutout format (default png)")
    parser.add_argument("--image-quality", type=int, help="cutout quality 1-100 (API default 85)")
    parser.add_argument(
        "--output-key-template",
        default=defaults.output_key_template,
        help="object key of each output: {id}, {kind}, {suffix}, {ext} (default %(default)s)",
    )
    parser.add_argument(
        "--staging-prefix", help="where shards and checkpoints go (default: under the output prefix)"
    )
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=defaults.resume,
        help="reuse checkpointed results of an earlier run of the same job (default on)",
    )
    parser.add_argument(
        "--skip-existing",
        action="store_true",
        help="do not send rows whose outputs already exist under the output prefix",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="report how many records would be billed, without calling the API",
    )
    parser.add_argument(
        "--max-billable-records", type=int, help="refuse to run past this many billed records"
    )
    parser.add_argument(
        "--max-failed-fraction",
        type=float,
        default=defaults.max_failed_fraction,
        help="fail (exit 1) when more than this share of rows failed (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT[1],
        help="seconds to wait for one API response (default %(default)s); a timed-out request is "
        "retried and billed again if the API had processed it, so keep a wide margin",
    )
    parser.add_argument("--max-retries", type=int, default=5, help="retries of one API request")
    parser.add_argument("--requests-per-minute", type=float, help="client-side rate limit for the account")
    parser.add_argument(
        "--rate-limit-redis-url",
        default=os.environ.get(RATE_LIMIT_REDIS_ENV),
        help=f"redis://host:port/db (default: ${RATE_LIMIT_REDIS_ENV}): share --requests-per-minute with "
        "every run and Airflow task of the same account that uses this Redis",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs still report progress)"
    )
    parser.add_argument(
        "--no-quality-check",
        action="store_true",
        help="do not decode outputs for the foreground fraction and quality flags (faster)",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="skip the contact-sheet report next to the enriched manifest"
    )
    parser.add_argument(
        "--report-sample",
        type=int,
        default=defaults.report_sample,
        help="tiles in the report, flagged and failed rows first (default %(default)s)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline for the parsed arguments; print a JSON summary; return the exit code."""
    try:
        config = pipeline.PipelineConfig(
            manifest_uri=args.manifest,
            output_prefix=args.output_prefix,
            output_manifest_uri=args.output_manifest,
            staging_prefix=args.staging_prefix,
            manifest_format=args.manifest_format,
            image_column=args.image_column,
            id_column=args.id_column,
            mode=args.mode,
            binary_mask=args.binary_mask,
            white_background=args.white_background,
            image_format=args.image_format,
            image_quality=args.image_quality,
            output_key_template=args.output_key_template,
            shard_size=args.shard_size,
            max_records_per_request=args.batch_size,
            concurrency=args.concurrency,
            resume=args.resume,
            skip_existing=args.skip_existing,
            max_billable_records=args.max_billable_records,
            max_failed_fraction=args.max_failed_fraction,
            quality_check=not args.no_quality_check,
            report=not args.no_report,
            report_sample=args.report_sample,
        )
    except ValueError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    storage = Storage()
    if args.dry_run:
        return _dry_run(config, storage)
    client = RemoveBgClient(
        base_url=args.endpoint,
        token=os.environ.get(TOKEN_ENV),
        mode=config.mode,
        timeout=args.timeout,
        max_records_per_request=config.max_records_per_request,
        max_retries=args.max_retries,
        concurrency=config.concurrency,
        requests_per_minute=args.requests_per_minute,
        rate_limit_redis_url=args.rate_limit_redis_url,
    )
    bar = tqdm(total=0, unit="row", disable=args.no_progress or None, file=sys.stderr, dynamic_ncols=True)

    def on_plan(plan: pipeline.Plan) -> None:
        bar.total = plan.total_rows - plan.duplicate_rows
        bar.refresh()

    try:
        with client:
            summary = pipeline.run(
                config,
                client,
                storage,
                on_progress=lambda rows, _done, _total: bar.update(rows),
                on_plan=on_plan,
            )
    except FailurePolicyError as exc:
        return _fail(EXIT_FAILED_ROWS, str(exc))
    except BudgetExceededError as exc:
        return _fail(EXIT_BUDGET, str(exc))
    except (AuthenticationError, OutOfCreditsError) as exc:
        return _fail(EXIT_ACCOUNT, str(exc))
    except RemoveBgError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    finally:
        bar.close()
    print(json.dumps(summary.to_dict(), indent=2))
    return EXIT_OK


def _dry_run(config: pipeline.PipelineConfig, storage: Storage) -> int:
    try:
        plan = pipeline.plan(config, storage)
        estimate = pipeline.estimate_billing(plan, storage)
    except RemoveBgError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    print(json.dumps({"dry_run": True, **estimate.to_dict()}, indent=2))
    limit = config.max_billable_records
    if limit is not None and estimate.billable > limit:
        return _fail(EXIT_BUDGET, f"{estimate.billable} billable records exceed max_billable_records={limit}")
    return EXIT_OK


def _fail(code: int, message: str) -> int:
    print(f"removebg run: error: {message}", file=sys.stderr)
    return code
