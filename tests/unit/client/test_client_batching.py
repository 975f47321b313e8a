"""Specification of remove_background: splitting into requests, concurrency, order, rate limiting."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from removebg_provider.client import ImageRecord, RemoveBgClient
from removebg_provider.errors import PaymentRequiredError
from support.fake_time import FakeClock
from support.replay_server import CapturedRequest, ReplayServer, Reply, echo_ok, serve_replays

FAST = "/removebg/fast/removebg"


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    with serve_replays() as replay:
        yield replay


def _records(n: int) -> list[ImageRecord]:
    return [ImageRecord(f"sku-{i:02d}", url=f"https://shop.example/{i}.jpg") for i in range(n)]


def test_records_are_split_into_requests_of_the_configured_size(server: ReplayServer) -> None:
    server.script(FAST, *[echo_ok] * 3)

    with RemoveBgClient(server.base_url, max_records_per_request=4, concurrency=1) as client:
        client.remove_background(_records(10))

    sizes = sorted(len(request.json()["records"]) for request in server.requests_to(FAST))
    assert sizes == [2, 4, 4]


def test_options_reach_every_request(server: ReplayServer) -> None:
    server.script(FAST, *[echo_ok] * 2)

    with RemoveBgClient(server.base_url, max_records_per_request=2) as client:
        client.remove_background(_records(3), binary_mask=True, image_format="jpg", image_quality=90)

    bodies = [request.json() for request in server.requests_to(FAST)]
    assert [(b["image_format"], b["image_quality"], b["records"][0]["binary_mask"]) for b in bodies] == [
        ("jpg", 90, True),
        ("jpg", 90, True),
    ]


def test_requests_run_concurrently_up_to_the_limit(server: ReplayServer) -> None:
    # Each reply waits until three requests are in flight at once; a serial client would break it.
    barrier = threading.Barrier(3, timeout=10)

    def together(request: CapturedRequest) -> Reply:
        barrier.wait()
        return echo_ok(request)

    server.script(FAST, *[together] * 3)

    with RemoveBgClient(server.base_url, max_records_per_request=2, concurrency=3) as client:
        results = client.remove_background(_records(6))

    assert all(result.ok for result in results)


def test_results_follow_input_order_whatever_order_requests_finish(server: ReplayServer) -> None:
    second_done = threading.Event()

    def after_the_second(request: CapturedRequest) -> Reply:
        second_done.wait(timeout=10)
        return echo_ok(request)

    def at_once(request: CapturedRequest) -> Reply:
        second_done.set()
        return echo_ok(request)

    server.script(FAST, after_the_second, at_once)
    records = _records(4)

    with RemoveBgClient(server.base_url, max_records_per_request=2, concurrency=2) as client:
        results = client.remove_background(records)

    assert [result.id for result in results] == [record.id for record in records]
    assert [result.output_url for result in results] == [f"https://files.example/{r.id}.png" for r in records]


def test_failed_request_raises_its_error(server: ReplayServer) -> None:
    server.script(FAST, echo_ok, Reply(402, {"status": {"code": 402, "text": "no credits"}}))

    with (
        RemoveBgClient(server.base_url, max_records_per_request=2, concurrency=1) as client,
        pytest.raises(PaymentRequiredError),
    ):
        client.remove_background(_records(4))


def test_no_records_send_no_request(server: ReplayServer) -> None:
    with RemoveBgClient(server.base_url) as client:
        assert client.remove_background([]) == []
    assert server.requests == []


def test_duplicate_ids_are_refused_before_any_request(server: ReplayServer) -> None:
    records = [*_records(3), ImageRecord("sku-00", url="https://shop.example/again.jpg")]

    with (
        RemoveBgClient(server.base_url, max_records_per_request=2) as client,
        pytest.raises(ValueError, match="'sku-00' appears twice"),
    ):
        client.remove_background(records)
    assert server.requests == []


def test_progress_is_logged_as_done_of_total(server: ReplayServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="removebg_provider.progress")
    server.script(FAST, *[echo_ok] * 2)

    with RemoveBgClient(server.base_url, max_records_per_request=2, concurrency=1) as client:
        client.remove_background(_records(3))

    progress = [r.getMessage() for r in caplog.records if r.name == "removebg_provider.progress"]
    assert progress[-1].startswith("removebg: 3/3 records (100%)")
    assert progress[-1].endswith("0 failed")


def test_rate_limit_spaces_requests_evenly(server: ReplayServer) -> None:
    clock = FakeClock()
    server.script(FAST, *[echo_ok] * 3)

    with RemoveBgClient(
        server.base_url,
        max_records_per_request=1,
        concurrency=1,
        requests_per_minute=30,
        sleep=clock.sleep,
        clock=clock.now,
    ) as client:
        client.remove_background(_records(3))

    assert clock.sleeps == [2.0, 2.0]
