"""Specification of what RemoveBgClient sends: records, options, headers, and what it refuses to send."""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from removebg_provider.client import (
    DEFAULT_BASE_URL,
    ImageRecord,
    RemovalOptions,
    RemoveBgClient,
    RetryPolicy,
)
from removebg_provider.errors import ConfigurationError
from support.replay_server import (
    CapturedRequest,
    ReplayServer,
    Reply,
    api_body,
    echo_ok,
    ok_record,
    serve_replays,
)

FAST = "/removebg/fast/removebg"
TOKEN = "tok-request-spec-123"
URL = "https://shop.example/photo.jpg"


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    with serve_replays() as replay:
        yield replay


@pytest.fixture
def client(server: ReplayServer) -> Iterator[RemoveBgClient]:
    with RemoveBgClient(server.base_url, token=TOKEN, timeout=(2, 5)) as api:
        yield api


def test_url_record_is_sent_as_id_and_url(server: ReplayServer, client: RemoveBgClient) -> None:
    server.script(FAST, echo_ok)

    client.remove_batch([ImageRecord("sku-1", url="https://shop.example/sku-1.jpg")])

    (record,) = server.requests_to(FAST)[0].json()["records"]
    assert record["_id"] == "sku-1"
    assert record["_url"] == "https://shop.example/sku-1.jpg"
    assert "_base64" not in record


def test_bytes_record_is_sent_as_base64(server: ReplayServer, client: RemoveBgClient) -> None:
    server.script(FAST, echo_ok)

    client.remove_batch([ImageRecord("sku-2", data=b"\x89PNG fake bytes")])

    (record,) = server.requests_to(FAST)[0].json()["records"]
    assert base64.b64decode(record["_base64"]) == b"\x89PNG fake bytes"
    assert "_url" not in record


def test_mask_and_white_background_are_sent_per_record(server: ReplayServer, client: RemoveBgClient) -> None:
    server.script(FAST, echo_ok)
    records = [
        ImageRecord("a", url="https://x.example/a.jpg"),
        ImageRecord("b", url="https://x.example/b.jpg"),
    ]

    client.remove_batch(records, RemovalOptions(binary_mask=True, white_background=True))

    sent = server.requests_to(FAST)[0].json()["records"]
    assert [(item["binary_mask"], item["white_background"]) for item in sent] == [(True, True), (True, True)]


def test_image_format_and_quality_are_sent_at_top_level_when_set(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    server.script(FAST, echo_ok)

    client.remove_batch(
        [ImageRecord("a", url="https://x.example/a.jpg")],
        RemovalOptions(image_format="webp", image_quality=70),
    )

    body = server.requests_to(FAST)[0].json()
    assert (body["image_format"], body["image_quality"]) == ("webp", 70)


def test_image_format_and_quality_are_left_out_when_unset(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    server.script(FAST, echo_ok)

    client.remove_batch([ImageRecord("a", url="https://x.example/a.jpg")])

    assert set(server.requests_to(FAST)[0].json()) == {"records"}


def test_api_request_carries_the_token_and_json_content_type(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    server.script(FAST, echo_ok)

    client.remove_batch([ImageRecord("a", url="https://x.example/a.jpg")])

    headers = server.requests_to(FAST)[0].headers
    assert headers["Authorization"] == f"Token {TOKEN}"
    assert headers["Content-Type"] == "application/json"


def test_client_without_token_sends_no_authorization_header(server: ReplayServer) -> None:
    server.script(FAST, echo_ok)

    with RemoveBgClient(server.base_url) as client:
        client.remove_batch([ImageRecord("a", url="https://x.example/a.jpg")])

    assert "Authorization" not in server.requests_to(FAST)[0].headers


def test_health_probe_carries_no_authorization_header(server: ReplayServer, client: RemoveBgClient) -> None:
    server.script("/health", Reply(200, {"status": "ok"}))
    server.script("/account/v2/user/", Reply(404))

    client.check_connection()

    assert "Authorization" not in server.requests_to("/health")[0].headers


def test_precise_mode_posts_to_the_precise_endpoint(server: ReplayServer) -> None:
    server.script("/removebg/precise/removebg", Reply(200, api_body(ok_record("a"))))

    with RemoveBgClient(server.base_url, mode="precise") as client:
        results = client.remove_batch([ImageRecord("a", url="https://x.example/a.jpg")])

    assert results[0].ok


def test_endpoint_joins_base_url_and_mode() -> None:
    with RemoveBgClient(f"{DEFAULT_BASE_URL}/", mode="precise") as client:
        assert client.endpoint == "https://api.ximilar.com/removebg/precise/removebg"


def test_batch_over_the_request_limit_is_refused(server: ReplayServer) -> None:
    records = [ImageRecord(str(i), url=f"https://x.example/{i}.jpg") for i in range(3)]

    with (
        RemoveBgClient(server.base_url, max_records_per_request=2) as client,
        pytest.raises(ConfigurationError, match="at most 2 records, got 3"),
    ):
        client.remove_batch(records)
    assert server.requests == []


def test_duplicate_ids_in_a_batch_are_refused(client: RemoveBgClient) -> None:
    records = [
        ImageRecord("same", url="https://x.example/1.jpg"),
        ImageRecord("same", url="https://x.example/2.jpg"),
    ]

    with pytest.raises(ConfigurationError, match="'same' appears twice"):
        client.remove_batch(records)


def test_empty_batch_sends_nothing(server: ReplayServer, client: RemoveBgClient) -> None:
    assert client.remove_batch([]) == []
    assert server.requests == []


def test_record_with_url_and_data_is_refused_naming_its_id() -> None:
    with pytest.raises(
        ValueError, match="'sku-9' needs exactly one of a non-empty url or data, got url and data"
    ):
        ImageRecord("sku-9", url="https://x.example/a.jpg", data=b"bytes")


def test_record_with_neither_url_nor_data_is_refused_naming_its_id() -> None:
    with pytest.raises(ValueError, match=r"'sku-9' needs exactly one .* got neither"):
        ImageRecord("sku-9")


def test_record_repr_leaves_out_the_image_bytes() -> None:
    assert "secret-pixels" not in repr(ImageRecord("a", data=b"secret-pixels"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image_format": "gif"}, "image_format must be one of png, jpg, webp"),
        ({"image_quality": 0}, "image_quality must be from 1 to 100, got 0"),
        ({"image_quality": 101}, "image_quality must be from 1 to 100, got 101"),
        ({"image_quality": "85"}, "image_quality must be an integer"),
    ],
)
def test_invalid_removal_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RemovalOptions(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "turbo"}, "mode must be one of fast, precise"),
        ({"base_url": "api.ximilar.com"}, "base_url must be an http"),
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"timeout": (5, -1)}, "timeout must be a positive number"),
        ({"max_records_per_request": 0}, "max_records_per_request must be an integer >= 1"),
        ({"concurrency": 0}, "concurrency must be an integer >= 1"),
        ({"requests_per_minute": 0}, "requests_per_minute must be a positive number"),
        ({"max_retries": -1}, "max_retries must be an integer >= 0"),
    ],
)
def test_invalid_client_settings_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RemoveBgClient(**settings)  # type: ignore[arg-type]


def test_invalid_retry_policy_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="deadline must be a positive number of seconds"):
        RetryPolicy(deadline=0)


def test_retry_policy_wins_over_max_retries() -> None:
    with RemoveBgClient(max_retries=1, retry_policy=RetryPolicy(max_retries=7)) as client:
        assert client.retry_policy.max_retries == 7


def test_repr_does_not_show_the_token() -> None:
    with RemoveBgClient(token=TOKEN) as client:
        assert TOKEN not in repr(client)
        assert "token=set" in repr(client)


def test_as_many_requests_as_the_concurrency_keep_their_connections(
    server: ReplayServer, caplog: pytest.LogCaptureFixture
) -> None:
    """More requests in flight than urllib3's default pool of 10 would discard connections, with a warning."""
    in_flight = 12
    together = threading.Barrier(in_flight, timeout=60)

    def answer_when_all_arrived(request: CapturedRequest) -> Reply:
        together.wait()
        return echo_ok(request)

    server.script(FAST, *[answer_when_all_arrived] * in_flight)
    caplog.set_level(logging.WARNING, logger="urllib3")
    with (
        RemoveBgClient(server.base_url, token=TOKEN, timeout=(10, 120), concurrency=in_flight) as client,
        ThreadPoolExecutor(in_flight) as pool,
    ):
        answers = list(
            pool.map(lambda n: client.remove_batch([ImageRecord(f"sku-{n}", url=URL)]), range(in_flight))
        )

    assert [answer[0].status_code for answer in answers] == [200] * in_flight
    assert [record.message for record in caplog.records if "pool is full" in record.message] == []
