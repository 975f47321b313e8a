"""HTTP client for the Ximilar Remove Background API: batching, retries, rate limiting, typed results."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception_type
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_random_exponential

from removebg_provider.errors import (
    ApiRequestError,
    AuthenticationError,
    ConfigurationError,
    OutOfCreditsError,
    PaymentRequiredError,
    TransientApiError,
)
from removebg_provider.progress import Progress
from removebg_provider.ratelimit import request_limiter
from removebg_provider.records import (
    ImageRecord,
    RecordResult,
    RemovalOptions,
    check_unique_ids,
    match_results,
    request_body,
    status_code,
    status_text,
)
from removebg_provider.transport import request_options
from removebg_provider.vocabulary import (
    DEFAULT_MODE,
    MODES,
)

__all__ = [
    "DEFAULT_BACKPRESSURE_DEADLINE",
    "DEFAULT_BASE_URL",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_MAX_RECORDS_PER_REQUEST",
    "DEFAULT_TIMEOUT",
    "AccountStatus",
    "ImageRecord",
    "RecordResult",
    "RemovalOptions",
    "RemoveBgClient",
    "RetryPolicy",
]

DEFAULT_BASE_URL = "https://api.ximilar.com"
DEFAULT_MAX_RECORDS_PER_REQUEST = 10
DEFAULT_CONCURRENCY = 8
RETRYABLE_STATUS_CODES = frozenset({429, 500, 502, 503, 504})
# How long one request may wait out "busy, retry later" answers in total, by default.
DEFAULT_BACKPRESSURE_DEADLINE = 900.0
# The public API documents no side-effect-free endpoint for the removal service; the account
# details endpoint (the one ximilar-client's `get_user_details` calls) checks the token for free.
ACCOUNT_CHECK_PATH = "/account/v2/user/"
# Credits left (read by `account_status`, free of charge).
ACCOUNT_DETAILS_PATH = "/account/v2/details/"
# ximilar-client's resource check: whether the token's account has the service activated.
AUTHORIZE_PATH = "/authorization/v2/authorize"
SERVICE_NAME = "remove-bg"

# (connect, read) seconds. A read timeout is retried and re-bills every record of the request if the
# API had processed it, so the read timeout is a wide margin over an ordinary answer: the API
# documents about 1.4 s per image, about 15 s for a request of 10 records.
DEFAULT_TIMEOUT: tuple[float, float] = (10.0, 120.0)

# A connection check should answer quickly even when removal requests may take minutes.
_PROBE_TIMEOUT = (5.0, 10.0)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How long one request may keep retrying: attempts, backoff (seconds) and deadlines.

    Failures (5xx, resets, timeouts, unreadable bodies) spend `max_retries` and `deadline`.
    Backpressure (a 429, or a 503 with Retry-After: the API is busy, not broken) spends neither:
    it is waited out, as long as the server asks, for up to `backpressure_deadline` seconds in
    total per request.
    """

    max_retries: int = 5
    backoff_base: float = 1.0
    backoff_cap: float = 30.0
    deadline: float = 300.0
    backpressure_deadline: float = DEFAULT_BACKPRESSURE_DEADLINE

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise ConfigurationError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        for name in ("backoff_base", "backoff_cap", "deadline", "backpressure_deadline"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
                raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class AccountStatus:
    """What the API says about the account, asked without spending credits.

    `service_active` is None when the API has no authorization endpoint to ask; `credits_left` is
    None when the account details do not report a number (unlimited, or an API without them);
    `notes` say what could not be checked and why.
    """

    token_accepted: bool
    service_active: bool | None
    credits_left: float | None
    notes: tuple[str, ...] = ()

    def covers(self, records: int) -> bool:
        """Whether `records` billed records fit the credits left (one credit per record; unknown fits)."""
        return self.credits_left is None or records <= self.credits_left

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form, for the CLI and logs."""
        return dataclasses.asdict(self)


_DEFAULT_OPTIONS = RemovalOptions()


class RemoveBgClient:
    """Thread-safe client: one pooled HTTP session, retried requests, results in input order."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        token: str | None = None,
        mode: str = DEFAULT_MODE,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        max_records_per_request: int = DEFAULT_MAX_RECORDS_PER_REQUEST,
        max_retries: int = 5,
        backpressure_deadline: float = DEFAULT_BACKPRESSURE_DEADLINE,
        retry_policy: RetryPolicy | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        requests_per_minute: float | None = None,
        rate_limit_redis_url: str | None = None,
        proxies: Mapping[str, str] | None = None,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Validate the settings and open the session.

        `retry_policy`, when given, wins over `max_retries` and `backpressure_deadline` (see
        RetryPolicy). `sleep` and `clock` are injectable so tests need not wait.

        `requests_per_minute` is kept by this client alone, or, with `rate_limit_redis_url`, shared
        with every client of the same base URL and token that uses that Redis (see `ratelimit`).

        `proxies` (scheme to proxy URL), `verify` (False, or a CA bundle path) and `cert` (a client
        certificate file, or a [certificate, key] pair) go with every API request and win over the
        environment (see `transport`).
        """
        self.base_url = _validated_base_url(base_url)
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.timeout = _validated_timeout(timeout)
        self.max_records_per_request = _positive_int("max_records_per_request", max_records_per_request)
        self.concurrency = _positive_int("concurrency", concurrency)
        self.retry_policy = retry_policy or RetryPolicy(
            max_retries=max_retries, backpressure_deadline=backpressure_deadline
        )
        if requests_per_minute is not None and not (
            isinstance(requests_per_minute, int | float) and requests_per_minute > 0
        ):
            raise ConfigurationError(
                f"requests_per_minute must be a positive number or unset, got {requests_per_minute!r}"
            )
        self.requests_per_minute = requests_per_minute
        self._token = token or None
        self._sleep = sleep
        self._clock = clock
        self._rate_limiter = request_limiter(
            requests_per_minute,
            rate_limit_redis_url or None,
            account=f"{self.base_url} {self._token or ''}",
            clock=clock,
            sleep=sleep,
        )
        self._request_options = request_options(proxies, verify, cert)
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=self.concurrency, pool_maxsize=self.concurrency)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    @property
    def endpoint(self) -> str:
        """URL of the removal endpoint for the configured mode."""
        return f"{self.base_url}/removebg/{self.mode}/removebg"

    def remove_batch(
        self, records: Sequence[ImageRecord], options: RemovalOptions = _DEFAULT_OPTIONS
    ) -> list[RecordResult]:
        """Send one request for `records` (retried as needed); results come back in input order."""
        if not records:
            return []
        if len(records) > self.max_records_per_request:
            raise ConfigurationError(
                f"one request takes at most {self.max_records_per_request} records, got {len(records)}; "
                "use remove_background to split them"
            )
        check_unique_ids(records)
        payload, attempts = self._post_with_retries(request_body(records, options), len(records))
        return [self._redacted(result) for result in match_results(records, payload, attempts)]

    def remove_background(
        self,
        records: Sequence[ImageRecord],
        *,
        binary_mask: bool = False,
        white_background: bool = False,
        image_format: str | None = None,
        image_quality: int | None = None,
    ) -> list[RecordResult]:
        """Process any number of records in requests of `max_records_per_request`, `concurrency` at a time.

        The first request that fails as a whole (after its retries) cancels the requests not yet
        started and its error is raised; use `remove_batch` to keep the results of the others.
        """
        options = RemovalOptions(binary_mask, white_background, image_format, image_quality)
        check_unique_ids(records)
        size = self.max_records_per_request
        chunks = [records[start : start + size] for start in range(0, len(records), size)]
        if not chunks:
            return []
        progress = Progress(len(records), "removebg", clock=self._clock, unit="records")
        with ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(chunks)), thread_name_prefix="removebg"
        ) as pool:
            futures = [pool.submit(self.remove_batch, chunk, options) for chunk in chunks]
            try:
                for future in as_completed(futures):
                    answered = future.result()
                    progress.advance(len(answered), sum(1 for result in answered if not result.ok))
            except BaseException:
                _cancel(futures)
                raise
        return [result for future in futures for result in future.result()]

    def check_connection(self) -> tuple[bool, str]:
        """Check reachability and the token without spending credits; returns (ok, message)."""
        is_public = urlsplit(self.base_url).hostname == urlsplit(DEFAULT_BASE_URL).hostname
        if not is_public:
            health = self._probe(f"{self.base_url}/health", authenticated=False)
            if isinstance(health, str):
                return False, f"Cannot reach {self.base_url}/health: {health}"
            if health.status_code != 200:
                return False, f"{self.base_url}/health answered HTTP {health.status_code}"
        if self._token is None:
            if is_public:
                return False, f"No API token is configured for {self.base_url}; set the connection password"
            return True, f"{self.base_url} is healthy (no token configured, none checked)"
        account = self._probe(f"{self.base_url}{ACCOUNT_CHECK_PATH}", authenticated=True)
        if isinstance(account, str):
            return False, f"Cannot reach {self.base_url}{ACCOUNT_CHECK_PATH}: {account}"
        if account.status_code in (401, 403):
            return False, f"{self.base_url} refused the API token (HTTP {account.status_code})"
        if account.status_code == 404 and not is_public:
            return (
                True,
                f"{self.base_url} is healthy; it has no token check endpoint, so the token is unchecked",
            )
        if account.status_code != 200:
            return False, f"{self.base_url}{ACCOUNT_CHECK_PATH} answered HTTP {account.status_code}"
        return True, f"{self.base_url} is reachable and accepted the API token"

    def account_status(self) -> AccountStatus:
        """Token, service activation and credits left, from the account endpoints; spends no credits."""
        notes: list[str] = []
        details = self._probe(f"{self.base_url}{ACCOUNT_DETAILS_PATH}", authenticated=True)
        if not isinstance(details, str) and details.status_code in (401, 403):
            return AccountStatus(
                False, None, None, (f"HTTP {details.status_code} from {ACCOUNT_DETAILS_PATH}",)
            )
        credits_left = None
        if isinstance(details, str) or details.status_code != 200:
            why = details if isinstance(details, str) else f"HTTP {details.status_code}"
            notes.append(f"credits unknown: {ACCOUNT_DETAILS_PATH} answered {why}")
        else:
            credits_left = _credits_in(_json_object(details))
            if credits_left is None:
                notes.append(f"credits not limited or not reported by {ACCOUNT_DETAILS_PATH}")
        token_accepted, service_active, note = self._service_active()
        if note:
            notes.append(note)
        return AccountStatus(token_accepted, service_active, credits_left, tuple(notes))

    def close(self) -> None:
        """Release the pooled connections."""
        self._session.close()

    def __enter__(self) -> RemoveBgClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        token = "set" if self._token else "none"
        return f"RemoveBgClient(base_url={self.base_url!r}, mode={self.mode!r}, token={token})"

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self._token}"} if self._token else {}

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _redacted(self, result: RecordResult) -> RecordResult:
        """The result with the token taken out of the texts the API sent (an API may echo it)."""
        if not self._token:
            return result
        return dataclasses.replace(
            result,
            status_text=self._redact(result.status_text),
            error=self._redact(result.error) if result.error is not None else None,
        )

    def _post_with_retries(self, body: Mapping[str, Any], n_records: int) -> tuple[dict[str, Any], int]:
        budget = _RetryBudget(self._clock, self.retry_policy)

        def give_up(retry_state: RetryCallState) -> None:
            failure = retry_state.outcome.exception() if retry_state.outcome else None
            raise TransientApiError(
                f"Request of {n_records} record(s) to {self.endpoint} failed: {budget.why}, "
                f"{budget.elapsed():.1f}s after the first attempt; last error: {failure}. "
                "The API may be overloaded or rate limiting: rerun later, lower concurrency or "
                "requests_per_minute, or raise the retry policy's max_retries/deadline."
            ) from failure

        retrying = Retrying(
            sleep=self._sleep,
            stop=budget,
            wait=_RetryAfterOrJitter(self.retry_policy),
            retry=retry_if_exception_type(_RetryableFailure),
            before_sleep=budget.spend,
            retry_error_callback=give_up,
        )
        payload: dict[str, Any] = {}
        attempts = 0
        for attempt in retrying:
            with attempt:
                attempts = attempt.retry_state.attempt_number
                payload = self._post_once(body, n_records, attempts)
        return payload, attempts

    def _post_once(self, body: Mapping[str, Any], n_records: int, attempt: int) -> dict[str, Any]:
        if self._rate_limiter is not None:
            self._rate_limiter.acquire()
        started = self._clock()
        try:
            response = self._session.post(
                self.endpoint,
                json=body,
                headers=self._auth_headers(),
                timeout=self.timeout,
                **self._request_options,
            )
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            requests.exceptions.ContentDecodingError,
        ) as exc:
            latency = self._clock() - started
            log.info(
                "POST %s records=%d http=- latency=%.2fs attempt=%d error=%s",
                self.endpoint,
                n_records,
                latency,
                attempt,
                type(exc).__name__,
            )
            detail = self._redact(str(exc))[:300]
            raise _RetryableFailure(
                f"{type(exc).__name__} after {latency:.2f}s on attempt {attempt}: {detail}"
            ) from exc
        latency = self._clock() - started
        log.info(
            "POST %s records=%d http=%d latency=%.2fs attempt=%d",
            self.endpoint,
            n_records,
            response.status_code,
            latency,
            attempt,
        )
        return self._checked_payload(response, latency, attempt, n_records)

    def _checked_payload(
        self, response: requests.Response, latency: float, attempt: int, n_records: int
    ) -> dict[str, Any]:
        payload = _json_object(response)
        context = f"after {latency:.2f}s on attempt {attempt}"
        http_status = response.status_code
        if not 200 <= http_status < 300:
            text = status_text(payload) or response.text.strip()[:200] or response.reason or ""
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            self._raise_for_code(http_status, self._redact(text), context, retry_after, n_records)
        if payload is None:
            raise _RetryableFailure(
                f"HTTP {http_status} with an unreadable body ({len(response.content)} bytes, not a JSON "
                f"object, possibly truncated) {context}"
            )
        body_code = status_code(payload)
        if body_code is not None and not 200 <= body_code < 300:
            self._raise_for_code(
                body_code, self._redact(status_text(payload) or ""), context, None, n_records
            )
        if not isinstance(payload.get("records"), list):
            raise _RetryableFailure(f"HTTP {http_status} body has no 'records' list {context}")
        return payload

    def _raise_for_code(
        self, code: int, text: str, context: str, retry_after: float | None, n_records: int
    ) -> None:
        described = f"HTTP {code}: {text}" if text else f"HTTP {code}"
        if code in (401, 403):
            raise AuthenticationError(
                f"The API at {self.base_url} refused the token ({described}). Check the API token "
                "and that the Remove Background service is enabled for the account "
                "(`removebg check` tells which)."
            )
        if code == 402:
            raise self._payment_refused(described, n_records)
        if code in RETRYABLE_STATUS_CODES:
            busy = code == 429 or (code == 503 and retry_after is not None)
            raise _RetryableFailure(f"{described} {context}", retry_after, backpressure=busy)
        raise ApiRequestError(
            f"The API at {self.endpoint} rejected the request ({described}). "
            "Check the records and options sent; retrying the same request will not help.",
            status_code=code,
        )

    def _service_active(self) -> tuple[bool, bool | None, str]:
        """(token accepted, service activated, a note): ximilar-client's resource check for the service."""
        answer = self._probe(
            f"{self.base_url}{AUTHORIZE_PATH}",
            authenticated=True,
            json={"service": SERVICE_NAME, "call_type": "authenticate"},
        )
        if isinstance(answer, str):
            return True, None, f"service activation unknown: {AUTHORIZE_PATH} answered {answer}"
        payload = _json_object(answer) or {}
        if answer.status_code == 200 and "user_id" in payload:
            return True, True, ""
        if answer.status_code == 401:
            return False, None, f"{AUTHORIZE_PATH} refused the token (HTTP 401)"
        if answer.status_code not in (200, 403):
            return (
                True,
                None,
                f"service activation unknown: {AUTHORIZE_PATH} answered HTTP {answer.status_code}",
            )
        detail = self._redact(str(payload.get("detail") or answer.text.strip()[:200]))
        return True, False, f"the {SERVICE_NAME} service is not activated for the account: {detail}"

    def _payment_refused(self, described: str, n_records: int) -> PaymentRequiredError:
        """The error for a whole-request 402, worded by what the account details say."""
        account = self.account_status()
        said = f"The API at {self.base_url} refused a request of {n_records} record(s) with {described}"
        if account.service_active is False:
            notes = "; ".join(account.notes)
            return PaymentRequiredError(
                f"{said}: {notes}. Activate the service in the Ximilar app, then rerun."
            )
        if account.credits_left is not None and not account.covers(n_records):
            return OutOfCreditsError(
                f"{said}: the account has {account.credits_left:g} credit(s) left. "
                "Top up the Ximilar account, then rerun."
            )
        if account.credits_left is not None:
            return PaymentRequiredError(
                f"{said}, although the account reports {account.credits_left:g} credit(s) left, enough "
                "for it: not a shortage of credits. Check the account's plan and limits in the Ximilar app."
            )
        return PaymentRequiredError(
            f"{said}; whether credits are short is unknown ({'; '.join(account.notes)}). "
            "Check the account's credits in the Ximilar app, then rerun."
        )

    def _probe(
        self, url: str, *, authenticated: bool, json: Mapping[str, Any] | None = None
    ) -> requests.Response | str:
        method = "GET" if json is None else "POST"
        started = self._clock()
        try:
            response = self._session.request(
                method,
                url,
                json=json,
                headers=self._auth_headers() if authenticated else {},
                timeout=_PROBE_TIMEOUT,
                **self._request_options,
            )
        except requests.RequestException as exc:
            latency = self._clock() - started
            log.info("%s %s http=- latency=%.2fs error=%s", method, url, latency, type(exc).__name__)
            return f"{type(exc).__name__}: {self._redact(str(exc))[:300]}"
        log.info("%s %s http=%d latency=%.2fs", method, url, response.status_code, self._clock() - started)
        return response


class _RetryableFailure(Exception):
    """One failed attempt worth retrying; it stays inside the client, wrapped by TransientApiError."""

    def __init__(self, reason: str, retry_after: float | None = None, *, backpressure: bool = False) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.backpressure = backpressure


class _RetryBudget(stop_base):
    """What one request may still spend on retries; tenacity asks it whether to stop after each failure.

    A failure spends one of `max_retries` and its time counts against `deadline`; backpressure
    spends only the `backpressure_deadline`, by the time waited. `why` says why it stopped.
    """

    def __init__(self, clock: Callable[[], float], policy: RetryPolicy) -> None:
        self._clock = clock
        self._policy = policy
        self._started = clock()
        self._failures = 0
        self._busy_answers = 0
        self._busy_waited = 0.0
        self.why = ""

    def elapsed(self) -> float:
        """Seconds since the first attempt."""
        return self._clock() - self._started

    def __call__(self, retry_state: RetryCallState) -> bool:
        policy = self._policy
        failure = _failure_of(retry_state)
        wait = retry_state.upcoming_sleep
        attempts = retry_state.attempt_number
        if failure is not None and failure.backpressure:
            if self._busy_waited + wait <= policy.backpressure_deadline:
                return False
            self.why = (
                f"the API answered busy {self._busy_answers + 1} time(s); waiting {wait:.0f}s more "
                f"would pass the {policy.backpressure_deadline:.0f}s backpressure deadline "
                f"({self._busy_waited:.0f}s waited)"
            )
            return True
        busy = f", {self._busy_answers} of them busy answers" if self._busy_answers else ""
        if self._failures + 1 > policy.max_retries:
            self.why = f"gave up after {attempts} attempts (max_retries={policy.max_retries}{busy})"
        elif self.elapsed() - self._busy_waited + wait > policy.deadline:
            asked = failure is not None and failure.retry_after == wait
            self.why = (
                f"the API asked to wait {wait:.0f}s (Retry-After), which would pass the "
                f"{policy.deadline:.0f}s deadline after {attempts} attempt(s)"
                if asked
                else f"the next wait of {wait:.1f}s would pass the {policy.deadline:.0f}s deadline "
                f"after {attempts} attempt(s)"
            )
        else:
            return False
        return True

    def spend(self, retry_state: RetryCallState) -> None:
        """Charge the wait about to start to the budget it belongs to, and log it."""
        failure = _failure_of(retry_state)
        if failure is not None and failure.backpressure:
            self._busy_answers += 1
            self._busy_waited += retry_state.upcoming_sleep
        else:
            self._failures += 1
        log.info(
            "waiting %.2fs before attempt %d after: %s",
            retry_state.upcoming_sleep,
            retry_state.attempt_number + 1,
            failure if failure is not None else _outcome_error(retry_state),
        )


def _failure_of(retry_state: RetryCallState) -> _RetryableFailure | None:
    failure = _outcome_error(retry_state)
    return failure if isinstance(failure, _RetryableFailure) else None


def _outcome_error(retry_state: RetryCallState) -> BaseException | None:
    return retry_state.outcome.exception() if retry_state.outcome else None


class _RetryAfterOrJitter(wait_base):
    """Wait as long as the server's Retry-After says, else a fully jittered exponential backoff."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._jitter = wait_random_exponential(multiplier=policy.backoff_base, max=policy.backoff_cap)

    def __call__(self, retry_state: RetryCallState) -> float:
        failure = _failure_of(retry_state)
        if failure is not None and failure.retry_after is not None:
            return failure.retry_after
        return self._jitter(retry_state)


def _validated_base_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(
            f"base_url must be an http(s) URL such as {DEFAULT_BASE_URL}, got {base_url!r}"
        )
    return base_url.rstrip("/")


def _validated_timeout(timeout: float | tuple[float, float]) -> float | tuple[float, float]:
    values = timeout if isinstance(timeout, tuple) else (timeout,)
    if len(values) not in (1, 2) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in values
    ):
        raise ConfigurationError(
            f"timeout must be a positive number of seconds or a (connect, read) pair, got {timeout!r}"
        )
    return timeout


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _credits_in(details: Mapping[str, Any] | None) -> float | None:
    """The credits left in an account-details answer: its numeric `credits` field, else None."""
    value = (details or {}).get("credits")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _json_object(response: requests.Response) -> dict[str, Any] | None:
    try:
        payload = response.json()
    except ValueError:
        return None
    return payload if isinstance(payload, dict) else None


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay seconds or an HTTP date), None if absent or bad."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _cancel(futures: Sequence[Future[list[RecordResult]]]) -> None:
    for future in futures:
        future.cancel()
