"""Provider metadata Airflow reads through the `apache_airflow_provider` entry point."""

from __future__ import annotations

from typing import Any

from removebg_provider import __version__
from removebg_provider.client import (
    DEFAULT_BACKPRESSURE_DEADLINE,
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_RECORDS_PER_REQUEST,
)
from removebg_provider.vocabulary import DEFAULT_MODE, MODES


def get_provider_info() -> dict[str, Any]:
    """Return the provider description: package, integration, hook, extra link, `removebg` connection type."""
    return {
        "package-name": "airflow-provider-removebg",
        "name": "Ximilar Remove Background",
        "description": (
            "Remove backgrounds from catalog product photos at scale, through the Ximilar Remove "
            "Background API or an embedded local server.\n"
        ),
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "Ximilar Remove Background",
                "external-doc-url": "https://docs.ximilar.com/image-tools/remove-background",
                "tags": ["service"],
            }
        ],
        "hooks": [
            {
                "integration-name": "Ximilar Remove Background",
                "python-modules": ["removebg_provider.hooks.removebg"],
            }
        ],
        "extra-links": ["removebg_provider.operators.links.RemoveBackgroundReportLink"],
        "connection-types": [
            {
                "hook-class-name": "removebg_provider.hooks.removebg.RemoveBgHook",
                "hook-name": "Ximilar Remove Background",
                "connection-type": "removebg",
                "conn-fields": {
                    "mode": {
                        "label": "Mode",
                        "schema": {
                            "type": ["string", "null"],
                            "default": DEFAULT_MODE,
                            "enum": list(MODES),
                        },
                        "description": "fast or precise removal endpoint",
                    },
                    "timeout": {
                        "label": "Timeout (seconds)",
                        "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
                        "description": (
                            "Connect and read timeout of one HTTP request; empty for 10 s connect, "
                            "120 s read. A [connect, read] pair can be set in the extra JSON."
                        ),
                    },
                    "max_retries": {
                        "label": "Max retries",
                        "schema": {"type": ["integer", "null"], "default": 5, "minimum": 0},
                        "description": "Retries of one request on connection errors, timeouts, 429 and 5xx",
                    },
                    "max_records_per_request": {
                        "label": "Max records per request",
                        "schema": {
                            "type": ["integer", "null"],
                            "default": DEFAULT_MAX_RECORDS_PER_REQUEST,
                            "minimum": 1,
                        },
                    },
                    "backpressure_deadline": {
                        "label": "Backpressure deadline (seconds)",
                        "schema": {
                            "type": ["number", "null"],
                            "default": DEFAULT_BACKPRESSURE_DEADLINE,
                            "exclusiveMinimum": 0,
                        },
                        "description": (
                            "How long one request may wait out busy answers (429, 503 with Retry-After) "
                            "in all; they spend no retries"
                        ),
                    },
                    "requests_per_minute": {
                        "label": "Requests per minute",
                        "schema": {"type": ["number", "null"], "exclusiveMinimum": 0},
                        "description": (
                            "The account's request budget; kept by each task process on its own, "
                            "or shared by all of them through the Redis below; empty for none"
                        ),
                    },
                    "rate_limit_redis_url": {
                        "label": "Rate limit Redis URL",
                        "schema": {"type": ["string", "null"]},
                        "description": (
                            "redis://host:6379/1: every task on every worker shares one "
                            "requests_per_minute budget kept there (needs the [redis] extra)"
                        ),
                    },
                    "concurrency": {
                        "label": "Concurrency",
                        "schema": {"type": ["integer", "null"], "default": DEFAULT_CONCURRENCY, "minimum": 1},
                        "description": "Requests in flight at once",
                    },
                    "proxies": {
                        "label": "Proxies",
                        "schema": {"type": ["object", "null"]},
                        "description": (
                            'Proxy URL per scheme, e.g. {"https": "http://proxy:3128"}; wins over '
                            "HTTPS_PROXY; a password in it is masked in logs"
                        ),
                    },
                    "verify": {
                        "label": "Verify TLS",
                        "schema": {"type": ["boolean", "string", "null"]},
                        "description": (
                            "false to skip certificate checks, or the path of a CA bundle on the "
                            "workers; empty for the system's (REQUESTS_CA_BUNDLE, else certifi)"
                        ),
                    },
                    "cert": {
                        "label": "Client certificate",
                        "schema": {"type": ["string", "array", "null"]},
                        "description": (
                            "Path of a client certificate with its key, or [certificate, key] paths, "
                            "on the workers (mutual TLS)"
                        ),
                    },
                },
                "ui-field-behaviour": {
                    "hidden-fields": ["schema", "login"],
                    "relabeling": {"host": "API base URL", "password": "API token"},
                    "placeholders": {
                        "host": "https://api.ximilar.com (empty for the public API)",
                        "password": "Ximilar API token",
                        "port": "only when the base URL has none",
                    },
                },
            }
        ],
    }
