"""When the next API request may start: spaced within one client, or one budget shared through Redis.

`requests_per_minute` is the account's request budget. Without a Redis URL each client keeps it on
its own (`LocalRequestLimiter`): right for one process, but eight shard tasks on three workers then
send up to 24 times the budget together. With a Redis URL every client of the same account (API base
URL and token) on every machine takes its requests from one budget kept in Redis
(`RedisRequestLimiter`, the `limits` library's moving window), so together they stay within it.

    limiter = request_limiter(120, "redis://redis:6379/1", account="https://api.ximilar.com <token>")
    limiter.acquire()   # blocks until one more request fits the budget
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Protocol
from urllib.parse import urlsplit

from removebg_provider.errors import ConfigurationError

REDIS_URL_SCHEMES = ("redis", "rediss", "redis+unix")
# Seconds one Redis call may take before the limiter reports Redis as unreachable.
REDIS_TIMEOUT_SECONDS = 10.0
# A waiting caller retries at least this often, so a slot freed early is not missed for long.
_MAX_WAIT_SECONDS = 5.0
_MIN_WAIT_SECONDS = 0.005


class RequestLimiter(Protocol):
    """Anything that blocks the caller until one more request fits the budget."""

    def acquire(self) -> None:
        """Return when the caller may start one request (counted against the budget)."""


def request_limiter(
    requests_per_minute: float | None,
    redis_url: str | None = None,
    *,
    account: str = "",
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> RequestLimiter | None:
    """The limiter for a budget: None without one, shared through `redis_url` when set, else local.

    `account` names whose budget it is (the API base URL and token); only a digest of it reaches Redis.
    """
    if redis_url is not None and requests_per_minute is None:
        raise ConfigurationError(
            f"rate_limit_redis_url is set ({redact(redis_url)}) but requests_per_minute is not: "
            "set the account's requests per minute, the budget the workers share"
        )
    if requests_per_minute is None:
        return None
    if redis_url is not None:
        return RedisRequestLimiter(redis_url, requests_per_minute, account=account, sleep=sleep)
    return LocalRequestLimiter(requests_per_minute, clock, sleep)


class LocalRequestLimiter:
    """Spaces requests at least 60/requests_per_minute seconds apart across all threads of one process."""

    def __init__(
        self,
        requests_per_minute: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval = 60.0 / requests_per_minute
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_slot: float | None = None

    def acquire(self) -> None:
        """Reserve the next free slot under the lock, then sleep until it outside the lock."""
        with self._lock:
            now = self._clock()
            slot = now if self._next_slot is None else max(now, self._next_slot)
            self._next_slot = slot + self._interval
        if slot > now:
            self._sleep(slot - now)


class RedisRequestLimiter:
    """One budget for every process of the account, kept in Redis by the `limits` library.

    The budget is enforced as a moving window of `amount` requests per `seconds`, the smallest
    whole-second window that holds exactly `requests_per_minute` (120/min: 2 per 1 s; 45/min: 3 per
    4 s; 7/min: 7 per 60 s), so requests are spread over the minute instead of all leaving at its
    start, and no 60 s stretch ever holds more than the budget. The window is checked and taken in
    one Redis script, so concurrent workers never both take the last slot. Timestamps come from each
    worker's clock: keep the workers' clocks in sync (NTP), as Airflow itself requires.
    """

    def __init__(
        self,
        redis_url: str,
        requests_per_minute: float,
        *,
        account: str = "",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        _check_redis_url(redis_url)
        try:
            from limits import RateLimitItemPerSecond
            from limits.errors import ConfigurationError as LimitsConfigurationError
            from limits.errors import StorageError
            from limits.storage import RedisStorage
            from limits.strategies import MovingWindowRateLimiter
        except ImportError as exc:
            raise ConfigurationError(
                "rate_limit_redis_url needs the limits and redis packages: "
                "pip install 'airflow-provider-removebg[redis]'"
            ) from exc
        self.amount, self.seconds = budget_window(requests_per_minute)
        self._url = redact(redis_url)
        self._item = RateLimitItemPerSecond(self.amount, self.seconds, namespace="removebg")
        # Only a digest of the account (base URL and token) is stored, never the token itself.
        self._key = hashlib.blake2b(account.encode(), digest_size=12).hexdigest()
        try:
            storage = RedisStorage(
                redis_url,
                wrap_exceptions=True,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
            )
        except (ValueError, LimitsConfigurationError) as exc:
            raise ConfigurationError(f"rate_limit_redis_url {self._url} is not usable: {exc}") from exc
        self._limiter = MovingWindowRateLimiter(storage)
        self._unreachable = StorageError
        self._sleep = sleep

    def acquire(self) -> None:
        """Take one request from the shared budget, waiting for the window to move when it is spent."""
        try:
            while not self._limiter.hit(self._item, self._key):
                reset_at, _ = self._limiter.get_window_stats(self._item, self._key)
                wait = min(max(reset_at - time.time(), _MIN_WAIT_SECONDS), _MAX_WAIT_SECONDS)
                self._sleep(wait)
        except self._unreachable as exc:
            raise ConfigurationError(
                f"the shared rate limit's Redis at {self._url} did not answer ({exc.storage_error!r}); "
                "start it, fix rate_limit_redis_url, or remove it to limit each process on its own"
            ) from exc

    def __repr__(self) -> str:
        return f"RedisRequestLimiter({self._url}, {self.amount} per {self.seconds} s)"


def budget_window(requests_per_minute: float) -> tuple[int, int]:
    """(amount, seconds): the smallest whole-second moving window that holds `requests_per_minute`."""
    per_second = Fraction(requests_per_minute).limit_denominator(1000) / 60
    if per_second <= 0:
        raise ConfigurationError(f"requests_per_minute must be positive, got {requests_per_minute!r}")
    return per_second.numerator, per_second.denominator


def redact(url: str) -> str:
    """`url` with any password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _check_redis_url(redis_url: str) -> None:
    scheme = urlsplit(redis_url).scheme
    if scheme not in REDIS_URL_SCHEMES:
        raise ConfigurationError(
            f"rate_limit_redis_url must be a {', '.join(s + '://' for s in REDIS_URL_SCHEMES)} URL "
            f"such as redis://redis:6379/1, got {redact(redis_url)!r}"
        )
