"""The ASGI app that answers the Ximilar Remove Background API, field for field, with a local engine."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from http import HTTPStatus
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from removebg_provider.engines import MODES, Engine, Mode, engine_details, get_engines
from removebg_provider.errors import FetchRefused
from removebg_provider.guarded_fetch import (
    NOT_PUBLIC,
    FetchLimits,
    allow_any_address,
    fetch_url,
    is_public_address,
)
from removebg_provider.server.errors import RecordRejected, RequestRejected
from removebg_provider.server.files import MEDIA_TYPES, Clock, FileStore
from removebg_provider.server.imaging import (
    ImageLimits,
    declared_pixels,
    decode_base64,
    decode_image,
    encode_outputs,
)
from removebg_provider.server.pool import EnginePool, PixelBudget
from removebg_provider.server.records import OutputOptions, RecordJob, parse_request
from removebg_provider.server.settings import ServerSettings

log = logging.getLogger(__name__)

_SWEEP_INTERVAL_SECONDS = 300.0


@dataclass
class Counters:
    """What `GET /stats` reports, so tests can prove no record is billed twice.

    `requests` counts removebg POSTs that passed auth, `requests_rejected` those refused whole
    (400, 413, 429). A record is billed once it is decoded and handed to the engine; records refused
    before that (bad data, limits, unreachable `_url`) count as failed but not billed.
    """

    requests: int = 0
    requests_rejected: int = 0
    records_billed: int = 0
    records_ok: int = 0
    records_failed: int = 0


def create_app(settings: ServerSettings, engine: Engine | None = None, clock: Clock = time.time) -> FastAPI:
    """Build the app; `engine`, if given, serves both modes instead of the engines `settings` name.

    `clock` (seconds since the epoch) decides when output files expire, so tests can fake time.
    """
    engines: dict[Mode, Engine] = (
        dict.fromkeys(MODES, engine)
        if engine is not None
        else get_engines(settings.engine_names, settings.model, settings.model_preset, settings.model_home)
    )
    service = _Service(settings, engines, clock)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(service.sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            service.pool.shutdown()
            service.store.close()

    app = FastAPI(title="removebg local server (Ximilar Remove Background API)", lifespan=lifespan)
    # Where the outputs go, for the startup log: without `storage_dir` a fresh folder is made here.
    app.state.storage_dir = service.store.directory

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error_response(error.status_code, str(error.detail))

    @app.post("/removebg/{mode}/removebg")
    async def removebg(mode: str, request: Request) -> JSONResponse:
        if mode not in MODES:
            return _error_response(
                404, f"unknown mode {mode!r}; use /removebg/fast/removebg or /removebg/precise/removebg"
            )
        return await service.handle(_as_mode(mode), request)

    @app.api_route("/files/{name}", methods=["GET", "HEAD"])
    async def files(name: str) -> Response:
        path = service.store.open_path(name)
        if path is None:
            return _error_response(404, f"file {name!r} does not exist or has expired")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lstrip(".")])

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        # Liveness needs no token; a caller that sends one learns whether it is valid (a connection test).
        if request.headers.get("authorization") is not None and not service.authorized(request):
            return _error_response(401, _AUTH_HELP)
        return JSONResponse(_health(service, settings))

    _add_account_routes(app, service, settings)

    @app.get("/stats")
    async def stats(request: Request) -> JSONResponse:
        # Billing counters are the account's business, like the public API's usage pages.
        if not service.authorized(request):
            return _error_response(401, _AUTH_HELP)
        return JSONResponse(asdict(service.counters))

    @app.post("/stats/reset")
    async def reset_stats(request: Request) -> JSONResponse:
        if not service.authorized(request):
            return _error_response(401, _AUTH_HELP)
        service.counters = Counters()
        return JSONResponse(asdict(service.counters))

    return app


def _add_account_routes(app: FastAPI, service: _Service, settings: ServerSettings) -> None:
    """The account endpoints a preflight and the official client call: token, credits, service check."""

    @app.get("/account/v2/user/")
    async def account(request: Request) -> JSONResponse:
        # The public API's free token check (ximilar-client's get_user_details), so a connection
        # test against this server verifies the token exactly as against the real service.
        if not service.authorized(request):
            return _error_response(401, _AUTH_HELP)
        return JSONResponse({"username": "removebg-local", "auth": "token" if settings.token else "off"})

    @app.get("/account/v2/details/")
    async def account_details(request: Request) -> JSONResponse:
        # The account's credits, as a preflight reads them before a run; null means unlimited.
        if not service.authorized(request):
            return _error_response(401, _AUTH_HELP)
        return JSONResponse(
            {"username": "removebg-local", "credits": service.credits_left, "credits_total": settings.credits}
        )

    @app.post("/authorization/v2/authorize")
    async def authorize(request: Request) -> JSONResponse:
        # ximilar-client's resource check: is the service activated for the token's account?
        if not service.authorized(request):
            return JSONResponse({"detail": "Invalid token."}, status_code=401)
        try:
            asked = (await request.json()).get("service")
        except (ValueError, AttributeError):
            asked = None
        if asked != SERVICE_NAME:
            return JSONResponse({"detail": f"User has no access for service {asked!r}."}, status_code=403)
        return JSONResponse({"user_id": "removebg-local", "service": SERVICE_NAME})


def _health(service: _Service, settings: ServerSettings) -> dict[str, Any]:
    """The /health body: the engines, the workers, whether a token is needed, how full the queue is."""
    return {
        "status": {"code": 200, "text": "OK"},
        "engine": _engine_summary(service.engines),
        "engines": {mode: engine_details(service.engines[mode]) for mode in MODES},
        "workers": service.pool.workers,
        "auth": "token" if settings.token else "off",
        "queue": {"admitted_records": service.pool.admitted, "capacity": service.pool.capacity},
        "pixels": {"in_flight": service.pixels.in_use, "capacity": service.pixels.capacity},
    }


# The engines model the backdrop from a border band; below this there is no photo to cut out.
MIN_SIDE_PIXELS = 8
_AUTH_HELP = "missing or invalid token; send the header 'Authorization: Token <your token>'"
# The service name ximilar-client asks the authorization endpoint about for Remove Background.
SERVICE_NAME = "remove-bg"


class _Service:
    """The state behind the routes: engine pool, file store, limits and counters."""

    def __init__(self, settings: ServerSettings, engines: dict[Mode, Engine], clock: Clock) -> None:
        self.settings = settings
        self.engines = engines
        self.store = FileStore(settings.storage_dir, settings.ttl_seconds, clock)
        self.pool = EnginePool(settings.workers, settings.queue_records, settings.retry_after_seconds)
        self.pixels = PixelBudget(settings.pixels_in_flight)
        self.counters = Counters()
        self.credits_used = 0  # unlike the counters, never reset: the account's balance
        self.image_limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.fetch_limits = FetchLimits(
            settings.max_image_bytes, settings.fetch_timeout_seconds, settings.max_redirects
        )
        self.address_policy = allow_any_address if settings.allow_private_urls else is_public_address

    @property
    def credits_left(self) -> int | None:
        """The local account's credits not yet spent; None when unlimited."""
        if self.settings.credits is None:
            return None
        return max(0, self.settings.credits - self.credits_used)

    def check_credits(self, records: int) -> None:
        """Refuse a request (402) that could bill more records than the account has credits.

        Records admitted but not yet billed count as spent, so concurrent requests never overdraw.
        """
        left = self.credits_left
        if left is not None and self.pool.admitted + records > left:
            raise RequestRejected(
                402,
                f"the account has {left} credit(s) left and {self.pool.admitted} record(s) in progress; "
                f"this request of {records} record(s) could pass them",
            )

    def authorized(self, request: Request) -> bool:
        if self.settings.token is None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "token" and hmac.compare_digest(
            value.strip().encode(), self.settings.token.encode()
        )

    async def handle(self, mode: Mode, request: Request) -> JSONResponse:
        if not self.authorized(request):
            return _error_response(401, _AUTH_HELP)
        self.counters.requests += 1
        started = time.perf_counter()
        request_id = str(uuid.uuid4())
        try:
            jobs = parse_request(await self._read_body(request), self.settings.max_records)
            self.check_credits(len(jobs))
            self.pool.admit(len(jobs))
        except RequestRejected as rejection:
            self.counters.requests_rejected += 1
            headers = None
            if rejection.code == 429:
                headers = {"Retry-After": str(self.pool.retry_after_seconds)}
            elif rejection.code == 408:
                # The body is still (slowly) arriving: this connection cannot carry another request.
                headers = {"Connection": "close"}
            return _error_response(rejection.code, rejection.message, request_id, headers)
        try:
            base_url = self.settings.public_url or str(request.base_url).rstrip("/")
            results = await asyncio.gather(*(self._process(job, mode, request_id, base_url) for job in jobs))
        finally:
            self.pool.release(len(jobs))
        failed = sum(1 for result in results if result["_status"]["code"] != 200)
        elapsed = time.perf_counter() - started
        log.info(
            "request %s: %s mode, %d record(s), %d failed, %.2f s",
            request_id,
            mode,
            len(jobs),
            failed,
            elapsed,
        )
        return JSONResponse(
            {
                "records": results,
                "status": {
                    "code": 200,
                    "text": "OK",
                    "request_id": request_id,
                    "proc_id": str(uuid.uuid4()),
                },
                "statistics": {"processing time": elapsed},
            }
        )

    async def sweep_forever(self) -> None:
        interval = min(self.settings.ttl_seconds, _SWEEP_INTERVAL_SECONDS)
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.store.sweep)
            except OSError:
                log.exception("could not sweep expired files from %s", self.store.directory)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestRejected(413, f"the request body is larger than the limit of {limit} bytes")
        seconds = self.settings.body_timeout_seconds
        try:
            # A total deadline: a client that trickles its body would otherwise hold the connection.
            return await asyncio.wait_for(self._receive_body(request, limit), seconds)
        except asyncio.TimeoutError as error:
            raise RequestRejected(408, f"the request body did not arrive within {seconds:g} s") from error

    async def _receive_body(self, request: Request, limit: int) -> bytes:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            # Chunked uploads declare no length, so the limit is also enforced while reading.
            if len(body) > limit:
                raise RequestRejected(413, f"the request body is larger than the limit of {limit} bytes")
        return bytes(body)

    async def _process(self, job: RecordJob, mode: Mode, request_id: str, base_url: str) -> dict[str, Any]:
        result: dict[str, Any] = dict(job.echo)
        result["_id"] = job.record_id
        try:
            raw = await self._read(job)
            pixels = await asyncio.to_thread(declared_pixels, raw, self.image_limits)
            # Decoding on an engine thread, inside the pixel budget, keeps decoded images in flight
            # bounded: records wait here as compressed bytes, not as pixels.
            async with self.pixels.reserve(pixels):
                rgb = await self.pool.run(decode_image, raw, self.image_limits)
                del raw  # the compressed bytes are not needed while the engine works
                result["_width"], result["_height"] = int(rgb.shape[1]), int(rgb.shape[0])
                if min(rgb.shape[:2]) < MIN_SIDE_PIXELS:
                    raise RecordRejected(
                        422,
                        f"image is {rgb.shape[1]}x{rgb.shape[0]} pixels; "
                        f"it needs at least {MIN_SIDE_PIXELS} on each side",
                    )
                self.counters.records_billed += 1
                self.credits_used += 1
                names = await self.pool.run(_render, self.engines[mode], self.store, rgb, mode, job.options)
                del rgb  # the pixels are freed before their share of the budget is
        except RecordRejected as rejection:
            self.counters.records_failed += 1
            result["_status"] = {"code": rejection.code, "text": rejection.message, "request_id": request_id}
            return result
        except Exception:
            self.counters.records_failed += 1
            log.exception("request %s: record %s failed in the %s engine", request_id, job.record_id, mode)
            result["_status"] = {
                "code": 500,
                "text": "the engine failed on this image; see the server log",
                "request_id": request_id,
            }
            return result
        self.counters.records_ok += 1
        result["_status"] = {"code": 200, "text": "OK", "request_id": request_id}
        result["_output_url"] = f"{base_url}/files/{names[0]}"
        if names[1] is not None:
            result["_output_url_mask"] = f"{base_url}/files/{names[1]}"
        if names[2] is not None:
            result["_output_url_whitebg"] = f"{base_url}/files/{names[2]}"
        return result

    async def _read(self, job: RecordJob) -> bytes:
        """The record's encoded image bytes, from `_base64` or by fetching `_url`."""
        if job.problem is not None:
            raise RecordRejected(400, job.problem)
        if job.base64_data is not None:
            return decode_base64(job.base64_data, self.image_limits)
        if job.url is not None:
            try:
                return await asyncio.to_thread(fetch_url, job.url, self.fetch_limits, self.address_policy)
            except FetchRefused as refusal:
                hint = "start the server with --allow-private-urls to permit this"
                text = f"_url: {refusal} ({hint})" if refusal.code == NOT_PUBLIC else f"_url: {refusal}"
                raise RecordRejected(refusal.code, text) from refusal
        raise RecordRejected(400, "the record has no image: give it a '_base64' or a '_url' field")


def _render(
    engine: Engine, store: FileStore, rgb: np.ndarray, mode: Mode, options: OutputOptions
) -> tuple[str, str | None, str | None]:
    """Matte, encode and store one image (on an engine thread); returns cutout, mask, white-bg names."""
    alpha = np.asarray(engine.matte(rgb, mode))
    if alpha.shape != rgb.shape[:2] or alpha.dtype != np.uint8:
        raise TypeError(
            f"engine {engine.name!r} returned a {alpha.dtype} matte of shape {alpha.shape}; "
            f"expected uint8 of shape {rgb.shape[:2]}"
        )
    outputs = encode_outputs(
        rgb, alpha, options.image_format, options.image_quality, options.binary_mask, options.white_background
    )
    cutout = store.save(outputs.cutout, options.image_format)
    mask = store.save(outputs.mask, "jpg") if outputs.mask is not None else None
    whitebg = store.save(outputs.whitebg, "jpg") if outputs.whitebg is not None else None
    return cutout, mask, whitebg


def _engine_summary(engines: dict[Mode, Engine]) -> str:
    """One engine's name when both modes share it, else "mixed" (`engines` in /health says which)."""
    names = {engine.name for engine in engines.values()}
    return names.pop() if len(names) == 1 else "mixed"


def _as_mode(name: str) -> Mode:
    return "fast" if name == "fast" else "precise"


def _error_response(
    code: int, description: str, request_id: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    status: dict[str, Any] = {"code": code, "text": HTTPStatus(code).phrase, "error_description": description}
    if request_id is not None:
        status["request_id"] = request_id
    return JSONResponse({"status": status}, status_code=code, headers=headers)
