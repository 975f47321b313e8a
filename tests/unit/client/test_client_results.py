"""Specification of how API answers become RecordResults: per-record statuses and matching to inputs."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from removebg_provider.client import ImageRecord, RecordResult, RemoveBgClient
from support.replay_server import ReplayServer, Reply, api_body, ok_record, serve_replays

FAST = "/removebg/fast/removebg"
RECORDS = [ImageRecord(name, url=f"https://shop.example/{name}.jpg") for name in ("a", "b", "c")]


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    with serve_replays() as replay:
        yield replay


@pytest.fixture
def client(server: ReplayServer) -> Iterator[RemoveBgClient]:
    with RemoveBgClient(server.base_url, token="tok", timeout=(2, 5), sleep=lambda _: None) as api:
        yield api


def _answer(server: ReplayServer, client: RemoveBgClient, *records: object) -> list[RecordResult]:
    server.script(FAST, Reply(200, api_body(*records)))
    return client.remove_batch(RECORDS)


def test_result_carries_urls_size_and_request_id(server: ReplayServer, client: RemoveBgClient) -> None:
    mask = "https://files.example/a-mask.jpg"
    white = "https://files.example/a-white.jpg"
    results = _answer(
        server,
        client,
        ok_record("a", _output_url_mask=mask, _output_url_whitebg=white),
        ok_record("b"),
        ok_record("c"),
    )

    assert results[0] == RecordResult(
        id="a",
        status_code=200,
        status_text="OK",
        error=None,
        outputs={"cutout": "https://files.example/a.png", "mask": mask, "whitebg": white},
        width=640,
        height=480,
        request_id="req-a",
        attempts=1,
    )


def test_results_follow_input_order_when_the_api_answers_out_of_order(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    results = _answer(server, client, ok_record("c"), ok_record("a"), ok_record("b"))

    assert [(r.id, r.output_url) for r in results] == [
        ("a", "https://files.example/a.png"),
        ("b", "https://files.example/b.png"),
        ("c", "https://files.example/c.png"),
    ]


def test_one_failed_record_does_not_lose_the_others(server: ReplayServer, client: RemoveBgClient) -> None:
    failed = {
        "_id": "b",
        "_status": {"code": 400, "text": "Bad Request", "error_description": "cannot download _url"},
    }

    results = _answer(server, client, ok_record("a"), failed, ok_record("c"))

    assert [(r.id, r.ok, r.status_code, r.error) for r in results] == [
        ("a", True, 200, None),
        ("b", False, 400, "cannot download _url"),
        ("c", True, 200, None),
    ]


def test_record_error_falls_back_to_its_status_text(server: ReplayServer, client: RemoveBgClient) -> None:
    failed = {"_id": "c", "_status": {"code": 500, "text": "unknown error"}}

    results = _answer(server, client, ok_record("a"), ok_record("b"), failed)

    assert (results[2].status_code, results[2].error) == (500, "unknown error")


def test_record_missing_from_the_response_is_reported_not_shifted(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    results = _answer(server, client, ok_record("a"), ok_record("c"))

    assert [(r.id, r.ok, r.output_url) for r in results] == [
        ("a", True, "https://files.example/a.png"),
        ("b", False, None),
        ("c", True, "https://files.example/c.png"),
    ]
    assert (results[1].status_code, results[1].error) == (502, "missing from the API response")


def test_extra_record_in_the_response_is_ignored_and_logged(
    server: ReplayServer, client: RemoveBgClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="removebg_provider.client")

    results = _answer(server, client, ok_record("a"), ok_record("b"), ok_record("c"), ok_record("stranger"))

    assert [r.id for r in results if r.ok] == ["a", "b", "c"]
    assert "1 record(s) matching no input (positions [3])" in caplog.text


def test_records_without_echoed_ids_are_matched_by_position(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    anonymous = [{k: v for k, v in ok_record(name).items() if k != "_id"} for name in ("a", "b", "c")]

    results = _answer(server, client, *anonymous)

    assert [(r.id, r.output_url) for r in results] == [
        ("a", "https://files.example/a.png"),
        ("b", "https://files.example/b.png"),
        ("c", "https://files.example/c.png"),
    ]


def test_records_without_ids_and_a_count_mismatch_are_all_reported(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    anonymous = [{k: v for k, v in ok_record(name).items() if k != "_id"} for name in ("a", "b")]

    results = _answer(server, client, *anonymous)

    assert [(r.id, r.ok, r.error) for r in results] == [
        ("a", False, "missing from the API response"),
        ("b", False, "missing from the API response"),
        ("c", False, "missing from the API response"),
    ]


def test_record_without_status_but_with_output_url_is_ok(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    bare = {"_id": "b", "_output_url": "https://files.example/b.png"}

    results = _answer(server, client, ok_record("a"), bare, ok_record("c"))

    assert (results[1].ok, results[1].status_code, results[1].request_id) == (True, 200, "req-batch")


def test_record_reported_ok_without_output_url_is_a_failure(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    hollow = {"_id": "a", "_status": {"code": 200, "text": "OK"}}

    results = _answer(server, client, hollow, ok_record("b"), ok_record("c"))

    assert (results[0].ok, results[0].error) == (False, "the API reported OK but returned no output URL")


def test_a_mask_instead_of_the_cutout_is_a_success(server: ReplayServer, client: RemoveBgClient) -> None:
    """Ximilar documents that `binary_mask: true` returns `_output_url_mask` instead of `_output_url`."""
    mask_only = {
        "_id": "a",
        "_status": {"code": 200, "text": "OK"},
        "_output_url_mask": "https://f.example/a.jpg",
    }

    results = _answer(server, client, mask_only, ok_record("b"), ok_record("c"))

    assert (results[0].ok, results[0].outputs) == (True, {"mask": "https://f.example/a.jpg"})


def test_record_with_neither_status_nor_output_url_is_a_failure(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    results = _answer(server, client, ok_record("a"), {"_id": "b"}, ok_record("c"))

    assert (results[1].ok, results[1].error) == (False, "the API returned neither _status nor an output URL")


def test_results_count_the_http_attempts_of_their_request(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    server.script(
        FAST, Reply(503), Reply(502), Reply(200, api_body(ok_record("a"), ok_record("b"), ok_record("c")))
    )

    results = client.remove_batch(RECORDS)

    assert [r.attempts for r in results] == [3, 3, 3]


def test_a_token_the_api_echoes_in_a_record_status_is_redacted(server: ReplayServer) -> None:
    token = "tok-7f3c9a1b5e"
    echoing = {
        "_id": "a",
        "_status": {"code": 401, "text": f"bad {token}", "error_description": f"got {token}"},
    }
    server.script(FAST, Reply(200, api_body(echoing, ok_record("b"), ok_record("c"))))

    with RemoveBgClient(server.base_url, token=token) as client:
        results = client.remove_batch(RECORDS)

    assert (results[0].status_text, results[0].error) == ("bad ***", "got ***")
