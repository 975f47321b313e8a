"""Specification of the retry schedule: what is retried, how long it waits, and when it gives up.

Sleeping is injected (FakeClock), so no test waits for a backoff. Two tests replace `random.uniform`
(tenacity's jitter source) with the upper bound, the only way to make a full-jitter schedule exact.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from removebg_provider.client import ImageRecord, RemoveBgClient, RetryPolicy, parse_retry_after
from removebg_provider.errors import ApiRequestError, ConfigurationError, TransientApiError
from support.fake_time import FakeClock
from support.replay_server import ReplayServer, Reply, api_body, ok_record, serve_replays

FAST = "/removebg/fast/removebg"
RECORD = ImageRecord("sku-1", url="https://shop.example/sku-1.jpg")
SUCCESS = Reply(200, api_body(ok_record("sku-1")))


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    with serve_replays() as replay:
        yield replay


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def _client(server: ReplayServer, clock: FakeClock, **settings: object) -> RemoveBgClient:
    settings.setdefault("timeout", (2, 5))
    return RemoveBgClient(server.base_url, token="tok", sleep=clock.sleep, clock=clock.now, **settings)  # type: ignore[arg-type]


@pytest.fixture
def upper_bound_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_retryable_status_is_retried(server: ReplayServer, clock: FakeClock, status: int) -> None:
    server.script(FAST, Reply(status), SUCCESS)

    with _client(server, clock) as client:
        (result,) = client.remove_batch([RECORD])

    assert (result.ok, result.attempts, len(clock.sleeps)) == (True, 2, 1)


def test_retry_after_in_seconds_is_waited_instead_of_the_backoff(
    server: ReplayServer, clock: FakeClock
) -> None:
    server.script(
        FAST,
        Reply(429, {"status": {"code": 429, "text": "Too Many Requests"}}, {"Retry-After": "7"}),
        SUCCESS,
    )

    with _client(server, clock) as client:
        client.remove_batch([RECORD])

    assert clock.sleeps == [7.0]


def test_retry_after_as_http_date_is_waited_until(server: ReplayServer, clock: FakeClock) -> None:
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=120), usegmt=True)
    server.script(FAST, Reply(503, headers={"Retry-After": later}), SUCCESS)

    with _client(server, clock) as client:
        client.remove_batch([RECORD])

    (wait,) = clock.sleeps
    assert 100 < wait <= 120


def test_retry_after_of_a_failure_past_the_deadline_gives_up_without_waiting(
    server: ReplayServer, clock: FakeClock
) -> None:
    server.script(FAST, Reply(502, headers={"Retry-After": "3600"}))

    with (
        _client(server, clock, retry_policy=RetryPolicy(deadline=300)) as client,
        pytest.raises(
            TransientApiError,
            match=r"asked to wait 3600s \(Retry-After\), which would pass the 300s deadline",
        ),
    ):
        client.remove_batch([RECORD])

    assert (clock.sleeps, len(server.requests_to(FAST))) == ([], 1)


def test_service_unavailable_then_success_returns_the_results(server: ReplayServer, clock: FakeClock) -> None:
    server.script(FAST, Reply(503, b"<html>busy</html>", {"Content-Type": "text/html"}), SUCCESS)

    with _client(server, clock) as client:
        (result,) = client.remove_batch([RECORD])

    assert result.output_url == "https://files.example/sku-1.png"


def test_connection_reset_is_retried(server: ReplayServer, clock: FakeClock) -> None:
    server.script(FAST, Reply(reset=True), SUCCESS)

    with _client(server, clock) as client:
        (result,) = client.remove_batch([RECORD])

    assert (result.ok, result.attempts) == (True, 2)


def test_read_timeout_is_retried(server: ReplayServer, clock: FakeClock) -> None:
    server.script(FAST, Reply(delay=1.0), SUCCESS)

    with _client(server, clock, timeout=(2, 0.2)) as client:
        (result,) = client.remove_batch([RECORD])

    assert (result.ok, result.attempts) == (True, 2)


def test_malformed_json_is_retried(server: ReplayServer, clock: FakeClock) -> None:
    server.script(FAST, Reply(200, b'{"records": [{"_id": "sku-1", '), SUCCESS)

    with _client(server, clock) as client:
        (result,) = client.remove_batch([RECORD])

    assert (result.ok, result.attempts) == (True, 2)


def test_body_cut_short_of_its_content_length_is_retried(server: ReplayServer, clock: FakeClock) -> None:
    server.script(FAST, Reply(200, api_body(ok_record("sku-1")), truncate_to=25), SUCCESS)

    with _client(server, clock) as client:
        (result,) = client.remove_batch([RECORD])

    assert (result.ok, result.attempts) == (True, 2)


def test_error_body_with_a_server_error_code_is_retried(server: ReplayServer, clock: FakeClock) -> None:
    server.script(FAST, Reply(200, api_body(code=500, text="unknown error")), SUCCESS)

    with _client(server, clock) as client:
        (result,) = client.remove_batch([RECORD])

    assert result.attempts == 2


def test_client_error_is_not_retried(server: ReplayServer, clock: FakeClock) -> None:
    server.script(FAST, Reply(400, api_body(code=400, text="invalid records")))

    with _client(server, clock) as client, pytest.raises(ApiRequestError):
        client.remove_batch([RECORD])

    assert len(server.requests_to(FAST)) == 1


def test_exhausted_retries_raise_transient_error_with_the_last_cause(
    server: ReplayServer, clock: FakeClock
) -> None:
    server.script(FAST, *[Reply(503, api_body(code=503, text="overloaded"))] * 3)

    with _client(server, clock, max_retries=2) as client, pytest.raises(TransientApiError) as raised:
        client.remove_batch([RECORD])

    message = str(raised.value)
    assert "gave up after 3 attempts (max_retries=2)" in message
    assert "HTTP 503: overloaded" in message
    assert "on attempt 3" in message
    assert len(server.requests_to(FAST)) == 3


@pytest.mark.usefixtures("upper_bound_jitter")
def test_backoff_doubles_from_the_base_up_to_the_cap(server: ReplayServer, clock: FakeClock) -> None:
    server.script(FAST, *[Reply(502)] * 6, SUCCESS)
    policy = RetryPolicy(max_retries=6, backoff_base=0.5, backoff_cap=5.0, deadline=300)

    with _client(server, clock, retry_policy=policy) as client:
        client.remove_batch([RECORD])

    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_backoff_waits_are_fully_jittered_below_the_exponential_bound(
    server: ReplayServer, clock: FakeClock
) -> None:
    server.script(FAST, *[Reply(502)] * 5, SUCCESS)

    with _client(server, clock) as client:
        client.remove_batch([RECORD])

    bounds = [1.0, 2.0, 4.0, 8.0, 16.0]
    assert all(0 <= wait <= bound for wait, bound in zip(clock.sleeps, bounds, strict=True))


@pytest.mark.usefixtures("upper_bound_jitter")
def test_deadline_stops_before_a_wait_would_pass_it(server: ReplayServer, clock: FakeClock) -> None:
    server.script(FAST, *[Reply(504)] * 4)
    policy = RetryPolicy(max_retries=10, backoff_base=1.0, backoff_cap=30.0, deadline=10.0)

    with (
        _client(server, clock, retry_policy=policy) as client,
        pytest.raises(
            TransientApiError, match=r"the next wait of 8\.0s would pass the 10s deadline after 4 attempt"
        ),
    ):
        client.remove_batch([RECORD])

    assert clock.sleeps == [1.0, 2.0, 4.0]


def test_retry_after_date_is_measured_from_now() -> None:
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)

    assert parse_retry_after("Sat, 01 Mar 2025 12:00:30 GMT", now) == 30.0


def test_retry_after_in_the_past_means_no_wait() -> None:
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)

    assert parse_retry_after("Sat, 01 Mar 2025 11:00:00 GMT", now) == 0.0


@pytest.mark.parametrize("header", [None, "", "soon", "nan", "inf"])
def test_unusable_retry_after_falls_back_to_the_backoff(header: str | None) -> None:
    assert parse_retry_after(header) is None


# --- backpressure: "busy, retry after N s" is waited out, not counted as a failure ---------------------

BUSY = Reply(429, {"status": {"code": 429, "text": "Too Many Requests"}}, {"Retry-After": "3"})
UNAVAILABLE_FOR_NOW = Reply(503, {"status": {"code": 503, "text": "busy"}}, {"Retry-After": "3"})


@pytest.mark.parametrize("busy", [BUSY, UNAVAILABLE_FOR_NOW], ids=["429", "503-with-retry-after"])
def test_busy_answers_for_45_seconds_do_not_spend_the_retries(
    server: ReplayServer, clock: FakeClock, busy: Reply
) -> None:
    server.script(FAST, *[busy] * 15, SUCCESS)

    with _client(server, clock, max_retries=2) as client:
        (result,) = client.remove_batch([RECORD])

    assert (result.ok, clock.sleeps) == (True, [3.0] * 15)


@pytest.mark.usefixtures("upper_bound_jitter")
def test_failures_after_busy_answers_still_have_all_their_retries(
    server: ReplayServer, clock: FakeClock
) -> None:
    server.script(FAST, *[BUSY] * 4, Reply(502), Reply(502), SUCCESS)

    with _client(server, clock, max_retries=2) as client:
        (result,) = client.remove_batch([RECORD])

    assert (result.ok, result.attempts) == (True, 7)


def test_busy_answers_are_waited_out_at_most_the_backpressure_deadline(
    server: ReplayServer, clock: FakeClock
) -> None:
    server.script(FAST, *[BUSY] * 10)

    with (
        _client(server, clock, backpressure_deadline=10) as client,
        pytest.raises(TransientApiError, match=r"answered busy 4 time\(s\).*10s backpressure deadline"),
    ):
        client.remove_batch([RECORD])

    assert clock.sleeps == [3.0, 3.0, 3.0]


def test_the_backpressure_deadline_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="backpressure_deadline"):
        RetryPolicy(backpressure_deadline=0)
