"""Specification of the request budget: spaced within one process, or shared by every client through Redis.

The Redis tests run a real `redis-server` (tests/backends.py). Separate `RedisRequestLimiter`
objects stand for separate processes: each has its own Redis connection and no state in common
but the budget in Redis. A `sleep` that raises instead of waiting shows, without waiting, whether a
limiter would have had to wait; tests/test_distributed.py counts the shared budget at the API server
with eight shard tasks on two Celery workers.
"""

from __future__ import annotations

import socket
import threading
import time
from bisect import bisect_right
from collections.abc import Iterator

import pytest
import redis

from removebg_provider.client import ImageRecord, RemoveBgClient
from removebg_provider.errors import ConfigurationError
from removebg_provider.ratelimit import (
    LocalRequestLimiter,
    RedisRequestLimiter,
    budget_window,
    request_limiter,
)
from support.backends import RedisServer, start_redis
from support.fake_time import FakeClock
from support.servers import LocalApiServer, sample_photo

TOKEN = "tok-ratelimit-spec-77c1"


class WouldWait(Exception):
    """Raised by `refuse_to_wait` in place of sleeping."""


def refuse_to_wait(seconds: float) -> None:
    raise WouldWait(seconds)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A Redis database emptied after each test, so budgets spent by one test never reach the next."""
    url = redis_server.url(2)
    yield url
    redis.Redis.from_url(url).flushdb()


def test_local_limiter_gives_each_thread_its_own_slot() -> None:
    clock = FakeClock(advance_on_sleep=False)
    limiter = LocalRequestLimiter(120, clock.now, clock.sleep)
    threads = [threading.Thread(target=limiter.acquire) for _ in range(4)]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(clock.sleeps) == [0.5, 1.0, 1.5]


@pytest.mark.parametrize(
    ("requests_per_minute", "window"),
    [(120, (2, 1)), (30, (1, 2)), (45, (3, 4)), (7, (7, 60)), (0.5, (1, 120)), (33.3, (111, 200))],
)
def test_budget_window_is_the_shortest_whole_second_window_holding_the_budget(
    requests_per_minute: float, window: tuple[int, int]
) -> None:
    assert budget_window(requests_per_minute) == window


def test_without_a_budget_there_is_no_limiter() -> None:
    assert request_limiter(None) is None


def test_without_a_redis_url_the_budget_is_kept_locally() -> None:
    assert isinstance(request_limiter(60), LocalRequestLimiter)


def test_a_second_process_of_the_same_account_waits_for_the_shared_budget(redis_url: str) -> None:
    first = RedisRequestLimiter(redis_url, 6, account="api token", sleep=refuse_to_wait)
    second = RedisRequestLimiter(redis_url, 6, account="api token", sleep=refuse_to_wait)

    first.acquire()

    with pytest.raises(WouldWait):
        second.acquire()


def test_other_accounts_keep_budgets_of_their_own(redis_url: str) -> None:
    RedisRequestLimiter(redis_url, 6, account="api token-a", sleep=refuse_to_wait).acquire()

    RedisRequestLimiter(redis_url, 6, account="api token-b", sleep=refuse_to_wait).acquire()


def test_threads_with_limiters_of_their_own_together_stay_within_the_budget(redis_url: str) -> None:
    grants: list[float] = []
    per_second = 20
    limiters = [RedisRequestLimiter(redis_url, per_second * 60, account="api token") for _ in range(3)]

    def take(limiter: RedisRequestLimiter) -> None:
        for _ in range(15):
            limiter.acquire()
            grants.append(time.monotonic())

    threads = [threading.Thread(target=take, args=(limiter,)) for limiter in limiters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    ordered = sorted(grants)
    most_in_a_second = max(bisect_right(ordered, start + 1.0, lo=i) - i for i, start in enumerate(ordered))
    # A grant is stamped a moment after Redis gave it: allow one second of budget for that slack.
    assert len(grants) == 45
    assert most_in_a_second <= 2 * per_second


def test_only_a_digest_of_the_account_reaches_redis(redis_url: str) -> None:
    RedisRequestLimiter(redis_url, 60, account=f"https://api.ximilar.com {TOKEN}").acquire()

    keys = [key.decode() for key in redis.Redis.from_url(redis_url).scan_iter()]
    assert keys
    assert not any(TOKEN in key for key in keys)


def test_a_redis_url_without_a_budget_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="requests_per_minute is not"):
        request_limiter(None, "redis://127.0.0.1:6379/1")


def test_a_url_that_is_not_redis_is_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match=r"http://cache:6379/1"):
        request_limiter(60, "http://cache:6379/1")


def test_unreachable_redis_fails_naming_it_without_its_password() -> None:
    url = f"redis://:hunter2-secret@127.0.0.1:{_closed_port()}/1"
    limiter = RedisRequestLimiter(url, 60)

    with pytest.raises(ConfigurationError, match=r"redis://:\*\*\*@127\.0\.0\.1") as raised:
        limiter.acquire()

    assert "hunter2-secret" not in str(raised.value)


def test_clients_of_one_account_share_the_budget_through_redis(
    api_server: LocalApiServer, redis_url: str
) -> None:
    records = [ImageRecord("sku-1", data=sample_photo())]
    settings = {"token": api_server.token, "requests_per_minute": 6, "rate_limit_redis_url": redis_url}

    with RemoveBgClient(api_server.base_url, sleep=refuse_to_wait, **settings) as first:
        first.remove_batch(records)
    with (
        RemoveBgClient(api_server.base_url, sleep=refuse_to_wait, **settings) as second,
        pytest.raises(WouldWait),
    ):
        second.remove_batch(records)

    assert api_server.stats()["records_billed"] == 1


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
