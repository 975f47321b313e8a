"""`removebg serve`: run the local Ximilar-compatible Remove Background server."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from removebg_provider.cli import subcommand_help
from removebg_provider.cli.models import MODEL_HOME_HELP, pull_with_progress
from removebg_provider.engines import ENGINE_NAMES, Mode
from removebg_provider.engines.model_store import model_home
from removebg_provider.engines.presets import PRESETS
from removebg_provider.errors import ConfigurationError, RemoveBgError
from removebg_provider.server.settings import MIB, ServerSettings

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger(__name__)

TOKEN_ENV = "REMOVEBG_SERVER_TOKEN"

_DEFAULTS = ServerSettings()


def add_parser(subcommands: Any) -> None:
    """Register the `serve` subcommand on `subcommands` (the result of `add_subparsers`)."""
    parser: argparse.ArgumentParser = subcommands.add_parser(
        "serve",
        help=subcommand_help("serve"),
        description=(
            "Serve POST /removebg/fast/removebg and POST /removebg/precise/removebg exactly like the Ximilar "
            "Remove Background API, plus GET /files/{name} (outputs, until their TTL), GET /health and "
            "GET /stats. Point the provider or the official ximilar-client at the URL it logs on start, "
            "http://localhost:PORT/ on this machine (the official client sends the token to Ximilar's "
            "authorization endpoint unless the URL says localhost)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8765, help="TCP port to listen on")
    parser.add_argument(
        "--token",
        default=None,
        help=(
            f"API token clients must send as 'Authorization: Token <token>'; prefer the {TOKEN_ENV} "
            "environment variable, which other users cannot see in the process list. Without a token, "
            "auth is off, which is only allowed on a loopback address"
        ),
    )
    parser.add_argument(
        "--storage",
        type=Path,
        default=None,
        help=(
            "directory for output images, kept across restarts; files are deleted once their TTL has "
            "passed. It must belong to you and not be writable by others (created 0700 when missing). "
            "Default: a fresh private directory under the system temp dir, removed when the server stops"
        ),
    )
    parser.add_argument(
        "--public-url",
        default=None,
        help="base URL clients reach this server at, used in _output_url (default: the request's own URL)",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINE_NAMES,
        default=None,
        help="background-removal engine of both modes; without it, onnx when --model is given, else classic",
    )
    parser.add_argument(
        "--fast-engine",
        choices=ENGINE_NAMES,
        default=None,
        help="engine of /removebg/fast; without it, --engine's",
    )
    parser.add_argument(
        "--precise-engine",
        choices=ENGINE_NAMES,
        default=None,
        help="engine of /removebg/precise; without it, --engine's (e.g. classic for fast, onnx for precise)",
    )
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME|PATH",
        help=(
            "the onnx engine's model: a name from `removebg models list` (downloaded beforehand with "
            "`removebg models pull NAME`, or add --pull) or the path of a .onnx file"
        ),
    )
    parser.add_argument(
        "--model-preset",
        choices=tuple(PRESETS),
        default=None,
        metavar="NAME",
        help=(
            "the conventions (input size, normalisation, resize filter, output scaling) to run a model file "
            "with, by model name; without it, the named model's own, else guessed from the file's name"
        ),
    )
    parser.add_argument("--model-home", type=Path, default=None, metavar="DIR", help=MODEL_HOME_HELP)
    parser.add_argument(
        "--pull",
        action="store_true",
        help="download the --model NAME first if it is not in the cache (never done without this flag)",
    )
    parser.add_argument(
        "--workers", type=int, default=_DEFAULTS.workers, help="engine threads processing records in parallel"
    )
    parser.add_argument(
        "--ttl-hours", type=float, default=_DEFAULTS.ttl_hours, help="how long output files stay downloadable"
    )
    parser.add_argument(
        "--max-records", type=int, default=_DEFAULTS.max_records, help="most records accepted per request"
    )
    parser.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let _url point at loopback, private, link-local and reserved addresses (refused by default)",
    )
    parser.add_argument(
        "--queue-records",
        type=int,
        default=_DEFAULTS.queue_records,
        help="most records admitted at once (running or waiting); beyond it requests get 429 + Retry-After; "
        "the default admits what `removebg run` sends at its defaults (concurrency x batch size)",
    )
    parser.add_argument(
        "--credits",
        type=int,
        default=_DEFAULTS.credits,
        help="the local account's credits, one per billed record, shown by /account/v2/details/; a request "
        "that could pass them gets 402 (default: unlimited)",
    )
    parser.add_argument(
        "--max-body-mb", type=float, default=_DEFAULTS.max_body_bytes / MIB, help="largest request body (413)"
    )
    parser.add_argument(
        "--max-image-mb",
        type=float,
        default=_DEFAULTS.max_image_bytes / MIB,
        help="largest encoded image per record, from _base64 or _url",
    )
    parser.add_argument(
        "--max-megapixels",
        type=float,
        default=_DEFAULTS.max_image_pixels / 1e6,
        help="largest decoded image per record, checked before decoding",
    )
    parser.add_argument(
        "--fetch-timeout",
        type=float,
        default=_DEFAULTS.fetch_timeout_seconds,
        help="seconds allowed to download one _url, in total (connect, redirects, headers and body)",
    )
    parser.add_argument(
        "--max-megapixels-in-flight",
        type=float,
        default=None,
        help=(
            "most decoded megapixels held at once; records wait as compressed bytes until theirs fit "
            "(default: workers x max-megapixels)"
        ),
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=_DEFAULTS.max_connections,
        help=(
            "most open connections; at the limit, a new one closes the connection that has waited "
            "longest for a request head"
        ),
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=_DEFAULTS.header_timeout_seconds,
        help="seconds a connection has to send a complete request head before it is closed",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=_DEFAULTS.body_timeout_seconds,
        help="seconds a request has to deliver its whole body once its head has arrived (else 408)",
    )
    parser.add_argument(
        "--keep-alive",
        type=int,
        default=_DEFAULTS.keep_alive_seconds,
        help="seconds an idle kept-alive connection stays open between requests",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Start the server and block until it is stopped; returns the exit code."""
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if token is None:
        if not _is_loopback(args.host):
            log.error(
                "refusing to listen on %s without a token: set %s or pass --token, or bind 127.0.0.1",
                args.host,
                TOKEN_ENV,
            )
            return 2
        log.warning("no token set: authentication is OFF (allowed only because %s is loopback)", args.host)
    try:
        settings = ServerSettings(
            storage_dir=args.storage,
            token=token,
            public_url=args.public_url,
            engine=args.engine,
            fast_engine=args.fast_engine,
            precise_engine=args.precise_engine,
            model=args.model,
            model_preset=args.model_preset,
            model_home=model_home(args.model_home),
            workers=args.workers,
            ttl_hours=args.ttl_hours,
            max_records=args.max_records,
            allow_private_urls=args.allow_private_urls,
            max_body_bytes=int(args.max_body_mb * MIB),
            max_image_bytes=int(args.max_image_mb * MIB),
            max_image_pixels=int(args.max_megapixels * 1e6),
            queue_records=args.queue_records,
            credits=args.credits,
            fetch_timeout_seconds=args.fetch_timeout,
            max_pixels_in_flight=(
                None if args.max_megapixels_in_flight is None else int(args.max_megapixels_in_flight * 1e6)
            ),
            max_connections=args.max_connections,
            header_timeout_seconds=args.header_timeout,
            body_timeout_seconds=args.body_timeout,
            keep_alive_seconds=args.keep_alive,
        )
    except ValueError as error:
        log.error("invalid server option: %s", error)
        return 2
    engines = settings.engine_names
    if args.pull and _named_model_missing(settings):
        try:
            pull_with_progress(str(settings.model), model_home(args.model_home), None, show_progress=True)
        except RemoveBgError as error:
            log.error("cannot pull model %s: %s", settings.model, error)
            return 2
    import uvicorn

    from removebg_provider.server.app import create_app
    from removebg_provider.server.connections import ensure_descriptor_room, server_config

    try:
        ensure_descriptor_room(settings)
        app = create_app(settings)
    except ConfigurationError as error:
        log.error("cannot start the server: %s", error)
        return 2
    except (RemoveBgError, ValueError, ImportError, OSError) as error:
        log.error("cannot start the engines (%s): %s", _describe(engines), error)
        return 2
    log.info(
        "serving the Remove Background API on %s (bound to %s; %s, outputs in %s for %g h)",
        _client_url(args.host, args.port),
        args.host,
        _describe(engines),
        app.state.storage_dir,
        settings.ttl_hours,
    )
    server = uvicorn.Server(
        server_config(app, settings, host=args.host, port=args.port, log_level="info", access_log=True)
    )
    return 0 if _run_until_stopped(server, _client_url(args.host, args.port)) else 1


def _run_until_stopped(server: uvicorn.Server, url: str) -> bool:
    """Serve until Ctrl-C or SIGTERM, uvicorn's startup line naming `url`; whether the server started."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    startup_line = _StartupLineUrl(url)
    uvicorn_log.addFilter(startup_line)
    try:
        # uvicorn raises Ctrl-C again once it has shut down cleanly: that is the normal way to stop.
        with contextlib.suppress(KeyboardInterrupt):
            server.run()
    finally:
        uvicorn_log.removeFilter(startup_line)
    return bool(server.started)


def _client_url(host: str, port: int) -> str:
    """The base URL a client on this machine should use to reach a server bound to `host`.

    A loopback or all-interfaces address is named `localhost`: the official ximilar-client skips its
    call to the public authorization endpoint only when the endpoint contains "localhost", so with
    `127.0.0.1` it would send the local token to Ximilar.
    """
    if _is_loopback(host) or _is_unspecified(host):
        return f"http://localhost:{port}/"
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class _StartupLineUrl(logging.Filter):
    """Makes uvicorn's "Uvicorn running on http://HOST:PORT" line name the URL clients should use.

    Its last line is the one people copy; with a loopback bind it would say 127.0.0.1 again.
    """

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url.rstrip("/")

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Uvicorn running on %s://"):
            record.msg = "Uvicorn running on %s (Press CTRL+C to quit)"
            record.args = (self.url,)
            record.__dict__.pop("color_message", None)
        return True


def _named_model_missing(settings: ServerSettings) -> bool:
    """Whether the onnx engine runs a model given by name that is not in the cache yet."""
    if settings.model not in PRESETS or "onnx" not in settings.engine_names.values():
        return False
    return not (model_home(settings.model_home) / PRESETS[settings.model].file_name).is_file()


def _describe(engines: dict[Mode, str]) -> str:
    return ", ".join(f"{mode}: {name}" for mode, name in engines.items())


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False
