"""`removebg run`: the whole manifest pipeline from the command line, no Airflow needed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import Any

from tqdm import tqdm

from removebg_provider import pipeline
from removebg_provider.cli import subcommand_help
from removebg_provider.client import DEFAULT_BASE_URL, DEFAULT_TIMEOUT, RemoveBgClient, RetryPolicy
from removebg_provider.errors import (
    AuthenticationError,
    BudgetExceededError,
    CreditsShortError,
    FailurePolicyError,
    PaymentRequiredError,
    RemoveBgError,
    RunStoppedError,
)
from removebg_provider.pipeline.config import CONNECTION_SETTINGS, FIELDS, PipelineConfig, field_type
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus

TOKEN_ENV = "REMOVEBG_API_TOKEN"
ENDPOINT_ENV = "REMOVEBG_ENDPOINT"
RATE_LIMIT_REDIS_ENV = "REMOVEBG_RATE_LIMIT_REDIS_URL"
EXIT_OK, EXIT_FAILED_ROWS, EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_ACCOUNT, EXIT_API_UNAVAILABLE = 0, 1, 2, 3, 4, 5

_EPILOG = f"""
The API token is read from the environment variable {TOKEN_ENV}, never from the command line.
Exit codes: 0 the run met the failure policy; 1 more rows failed than --max-failed-fraction;
2 bad input or configuration, or more billable records than the account's credits left
(nothing was sent); 3 the run would pass --max-billable-records (nothing was sent);
4 the API refused the token or a request for payment (402; the message says what the account says);
5 the API was unavailable: the rows it failed (status 503, after retries) alone pass
--max-failed-fraction (rerun later; nothing that succeeded is billed again);
130 stopped by Ctrl-C (SIGINT), 143 by SIGTERM.
The JSON summary is printed on exit codes 0, 1, 5, 130 and 143.

Ctrl-C (or SIGTERM) stops the run: no new request is sent, the requests in flight finish and are
checkpointed, and the enriched manifest is written with every row, those not reached with status
499. Run the same command again to finish: rows already done are not billed again. A second Ctrl-C
aborts at once (nothing is lost that was checkpointed; no manifest is written).
"""

log = logging.getLogger(__name__)


def add_parser(subcommands: Any) -> None:
    """Register `removebg run`: one flag per PipelineConfig field, plus the client's and the CLI's own."""
    parser = subcommands.add_parser(
        "run",
        help=subcommand_help("run"),
        description="Read a manifest, remove every background through the API, copy the cutouts into "
        "your storage and write an enriched manifest. Resumable: a rerun bills no image twice.",
        epilog=_EPILOG,
        formatter_class=HelpFormatter,
    )
    for item in FIELDS:
        add_setting(parser, item)
    add_client_arguments(parser)
    parser.add_argument(
        "--ignore-credits",
        action="store_true",
        help="start even when the billable records exceed the credits the account reports",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="report how many records would be billed, without calling the API",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs still report progress)"
    )
    parser.set_defaults(handler=run)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The API client's flags (endpoint, timeout, retries, rate limit), shared by `run` and `check`."""
    parser.add_argument(
        "--endpoint",
        default=os.environ.get(ENDPOINT_ENV, DEFAULT_BASE_URL),
        help=f"API base URL (default: ${ENDPOINT_ENV} or {DEFAULT_BASE_URL}); e.g. http://localhost:8765 "
        "for `removebg serve`",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT[1],
        help="seconds to wait for one API response; a timed-out request is retried and billed again "
        "if the API had processed it, so keep a wide margin",
    )
    parser.add_argument(
        "--max-retries", type=int, default=RetryPolicy().max_retries, help="retries of one API request"
    )
    parser.add_argument(
        "--backpressure-deadline",
        type=float,
        default=RetryPolicy().backpressure_deadline,
        help="seconds one API request may wait out 'busy, retry later' answers (429, or 503 with "
        "Retry-After) in total; such answers do not count against --max-retries",
    )
    parser.add_argument("--requests-per-minute", type=float, help="client-side rate limit for the account")
    parser.add_argument(
        "--rate-limit-redis-url",
        default=os.environ.get(RATE_LIMIT_REDIS_ENV),
        help=f"redis://host:port/db (default: ${RATE_LIMIT_REDIS_ENV}): share --requests-per-minute with "
        "every run and Airflow task of the same account that uses this Redis",
    )


def client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The RemoveBgClient arguments the client flags give (the token comes from the environment)."""
    return {
        "base_url": args.endpoint,
        "token": os.environ.get(TOKEN_ENV),
        "timeout": args.timeout,
        "max_retries": args.max_retries,
        "backpressure_deadline": args.backpressure_deadline,
        "requests_per_minute": args.requests_per_minute,
        "rate_limit_redis_url": args.rate_limit_redis_url,
    }


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's line breaks and shows every default the help text does not already name."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.required:
            return text
        return f"{text} (default: %(default)s)"


def add_setting(
    parser: argparse.ArgumentParser, item: dataclasses.Field[Any], *, optional: bool = False
) -> None:
    """The flag (or argument) of one PipelineConfig field, from its type, default and help.

    `optional`: nothing is required (the positional manifest may be left out).
    """
    meta: Mapping[str, Any] = item.metadata
    if item.name in CONNECTION_SETTINGS:
        # Left None in the config (an Airflow connection may give it); the command line has only the default.
        meta = {**meta, "help": f"{meta['help']} (default: {CONNECTION_SETTINGS[item.name]})"}
    if meta.get("positional"):
        parser.add_argument(
            item.name, metavar=meta["flag"], help=meta["help"], nargs="?" if optional else None
        )
        return
    flags = [meta.get("flag", "--" + item.name.replace("_", "-")), *meta.get("aliases", ())]
    options: dict[str, Any] = {"dest": item.name, "help": meta["help"]}
    if field_type(item.name) is not bool and "choices" not in meta:
        options["metavar"] = flags[0].lstrip("-").replace("-", "_").upper()
    if meta.get("required"):
        options["required"] = not optional
    else:
        options["default"] = item.default
    kind = field_type(item.name)
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction
    else:
        options["type"] = kind
        if "choices" in meta:
            options["choices"] = meta["choices"]
    parser.add_argument(*flags, **options)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline for the parsed arguments; print a JSON summary; return the exit code."""
    try:
        config = config_from(args)
        # Built before anything is read or billed, so a bad client option is refused up front.
        client = RemoveBgClient(**client_options(args), **config.client_settings())
    except ValueError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    storage = Storage()
    if args.dry_run:
        client.close()
        return _dry_run(config, storage)
    bar = tqdm(total=0, unit="row", disable=args.no_progress or None, file=sys.stderr, dynamic_ncols=True)

    credits_left = None if args.ignore_credits else client.account_status().credits_left

    def on_plan(plan: pipeline.Plan) -> None:
        if credits_left is not None:
            _refuse_past_credits(plan, storage, credits_left, client.base_url)
        bar.total = plan.total_rows - plan.duplicate_rows
        bar.refresh()

    try:
        with client, _stop_on_signals() as stop:
            summary = pipeline.run(
                config,
                client,
                storage,
                on_progress=lambda rows, _done, _total: bar.update(rows),
                on_plan=on_plan,
                stop=stop.requested,
            )
    except RunStoppedError as exc:
        bar.close()
        print(json.dumps(exc.summary.to_dict(), indent=2))
        return _fail(128 + (stop.signal or signal.SIGINT), str(exc))
    except CreditsShortError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    except FailurePolicyError as exc:
        print(json.dumps(exc.summary.to_dict(), indent=2))
        return _fail(_failed_rows_exit(exc.summary, config.max_failed_fraction), str(exc))
    except BudgetExceededError as exc:
        return _fail(EXIT_BUDGET, str(exc))
    except (AuthenticationError, PaymentRequiredError) as exc:
        return _fail(EXIT_ACCOUNT, str(exc))
    except RemoveBgError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    finally:
        bar.close()
    print(json.dumps(summary.to_dict(), indent=2))
    return EXIT_OK


class _SignalStop:
    """What the signal handlers share with the run: the stop request and the signal that made it."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.signal: int | None = None

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            sys.stderr.write(f"removebg run: {name} again: aborting now\n")
            sys.stderr.flush()
            # At once, without waiting for the worker threads: every checkpoint is already atomic.
            os._exit(128 + signum)
        self.signal = signum
        self.requested.set()
        sys.stderr.write(
            f"removebg run: {name} received: stopping; no new request is sent, the requests in flight "
            "finish, then the enriched manifest is written (Ctrl-C again aborts at once)\n"
        )
        sys.stderr.flush()


@contextmanager
def _stop_on_signals() -> Iterator[_SignalStop]:
    """SIGINT and SIGTERM stop the run gracefully while the block runs; a second one aborts."""
    stop = _SignalStop()
    if threading.current_thread() is not threading.main_thread():
        # Python delivers signals to the main thread only; elsewhere the caller's handlers stay.
        yield stop
        return
    previous = {signum: signal.signal(signum, stop.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _failed_rows_exit(summary: pipeline.RunSummary, max_failed_fraction: float) -> int:
    """5 when the rows the API failed as unavailable pass the policy on their own, else 1 (bad rows)."""
    unavailable = summary.by_status.get(RowStatus.API_UNAVAILABLE, 0)
    if summary.rows and unavailable / summary.rows > max_failed_fraction:
        return EXIT_API_UNAVAILABLE
    return EXIT_FAILED_ROWS


def config_from(args: argparse.Namespace) -> PipelineConfig:
    """The resolved pipeline settings the PipelineConfig flags give."""
    return PipelineConfig(**{item.name: getattr(args, item.name) for item in FIELDS}).resolved()


def _refuse_past_credits(plan: pipeline.Plan, storage: Storage, credits_left: float, endpoint: str) -> None:
    billable = pipeline.estimate_billing(plan, storage).billable
    if billable > credits_left:
        raise CreditsShortError(
            f"{billable} billable records exceed the {credits_left:g} credits left on the account at "
            f"{endpoint}; nothing was sent. Top up the account, or pass --ignore-credits"
        )


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
