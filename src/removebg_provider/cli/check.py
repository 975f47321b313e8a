"""`removebg check`: the account preflight: token, service activation, credits left, and a manifest's bill."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from removebg_provider import pipeline
from removebg_provider.cli import subcommand_help
from removebg_provider.cli.run import (
    EXIT_ACCOUNT,
    EXIT_BAD_INPUT,
    EXIT_BUDGET,
    EXIT_OK,
    HelpFormatter,
    add_client_arguments,
    add_setting,
    client_options,
    config_from,
)
from removebg_provider.client import RemoveBgClient
from removebg_provider.errors import RemoveBgError
from removebg_provider.pipeline.config import FIELDS
from removebg_provider.storage import Storage

_EPILOG = """
Spends no credits. With a manifest (and the flags `removebg run` takes) it also counts the records a
run would bill, as `removebg run --dry-run` does, against the credits left.
Exit codes: 0 all checks passed; 2 bad input or configuration; 3 the manifest's billable records
exceed the credits left; 4 the API refused the token or the service is not activated.
"""


def add_parser(subcommands: Any) -> None:
    """Register `removebg check`: the client's flags, plus every `removebg run` setting, all optional."""
    parser = subcommands.add_parser(
        "check",
        help=subcommand_help("check"),
        description="Ask the API whether it accepts the token, whether the Remove Background service is "
        "activated for the account and how many credits are left; given a manifest, whether its "
        "billable records fit those credits.",
        epilog=_EPILOG,
        formatter_class=HelpFormatter,
    )
    for item in FIELDS:
        add_setting(parser, item, optional=True)
    add_client_arguments(parser)
    parser.set_defaults(handler=check)


def check(args: argparse.Namespace) -> int:
    """Print what the account endpoints say (JSON) and, with a manifest, its billable count; the exit code."""
    try:
        config = config_from(args) if args.manifest_uri else None
        client = RemoveBgClient(**client_options(args), **(config.client_settings() if config else {}))
    except ValueError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    with client:
        account = client.account_status()
    report: dict[str, Any] = {"endpoint": client.base_url, **account.to_dict()}
    billable = None
    if config is not None:
        try:
            billable = pipeline.estimate_billing(pipeline.plan(config, Storage()), Storage()).billable
        except RemoveBgError as exc:
            return _fail(EXIT_BAD_INPUT, str(exc))
        report |= {"billable": billable, "enough_credits": account.covers(billable)}
    print(json.dumps(report, indent=2))
    if not account.token_accepted:
        return _fail(EXIT_ACCOUNT, f"{client.base_url} refused the API token")
    if account.service_active is False:
        return _fail(EXIT_ACCOUNT, "; ".join(account.notes))
    if billable is not None and not account.covers(billable):
        return _fail(
            EXIT_BUDGET, f"{billable} billable records exceed the {account.credits_left:g} credits left"
        )
    return EXIT_OK


def _fail(code: int, message: str) -> int:
    print(f"removebg check: error: {message}", file=sys.stderr)
    return code
