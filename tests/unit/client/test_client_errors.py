"""Specification of request-level errors, request logging, and that the token never leaks."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from removebg_provider.client import ImageRecord, RemoveBgClient, RetryPolicy
from removebg_provider.errors import (
    ApiRequestError,
    AuthenticationError,
    OutOfCreditsError,
    PaymentRequiredError,
    RemoveBgError,
    TransientApiError,
)
from support.fake_time import FakeClock
from support.replay_server import CapturedRequest, ReplayServer, Reply, api_body, ok_record, serve_replays

FAST = "/removebg/fast/removebg"
TOKEN = "tok-must-never-leak-8f3a"
RECORD = ImageRecord("sku-1", url="https://shop.example/sku-1.jpg")


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    with serve_replays() as replay:
        yield replay


@pytest.fixture
def client(server: ReplayServer) -> Iterator[RemoveBgClient]:
    clock = FakeClock()
    with RemoveBgClient(
        server.base_url, token=TOKEN, timeout=(2, 5), max_retries=2, sleep=clock.sleep, clock=clock.now
    ) as api:
        yield api


@pytest.mark.parametrize("status", [401, 403])
def test_refused_token_raises_authentication_error_naming_the_base_url(
    server: ReplayServer, client: RemoveBgClient, status: int
) -> None:
    server.script(FAST, Reply(status, {"detail": "Invalid token."}))

    with pytest.raises(AuthenticationError, match=f"The API at {server.base_url} refused the token"):
        client.remove_batch([RECORD])
    assert len(server.requests_to(FAST)) == 1


def test_payment_required_with_no_credits_left_raises_out_of_credits(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    server.script(
        FAST, Reply(402, api_body(code=402, text="aborted by error", error_description="no credits"))
    )
    server.script("/account/v2/details/", Reply(200, {"credits": 0}))
    server.script("/authorization/v2/authorize", Reply(200, {"user_id": 1}))

    with pytest.raises(OutOfCreditsError, match="aborted by error: no credits"):
        client.remove_batch([RECORD])


def test_other_client_error_raises_api_request_error_with_the_status_text(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    server.script(
        FAST, Reply(400, api_body(code=400, text="Bad Request", error_description="records missing"))
    )

    with pytest.raises(ApiRequestError, match=r"HTTP 400: Bad Request: records missing"):
        client.remove_batch([RECORD])


def test_client_error_without_json_body_quotes_the_body(server: ReplayServer, client: RemoveBgClient) -> None:
    server.script(FAST, Reply(413, b"payload too large", {"Content-Type": "text/plain"}))

    with pytest.raises(ApiRequestError, match="HTTP 413: payload too large"):
        client.remove_batch([RECORD])


def test_error_body_with_http_200_raises_api_request_error(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    server.script(FAST, Reply(200, api_body(code=400, text="invalid image_format", error_description="tiff")))

    with pytest.raises(ApiRequestError, match="HTTP 400: invalid image_format: tiff"):
        client.remove_batch([RECORD])


@pytest.mark.parametrize(
    ("code", "error"), [(401, AuthenticationError), (403, AuthenticationError), (402, PaymentRequiredError)]
)
def test_error_body_with_http_200_maps_its_code(
    server: ReplayServer, client: RemoveBgClient, code: int, error: type[RemoveBgError]
) -> None:
    server.script(FAST, Reply(200, api_body(code=code, text="refused")))

    with pytest.raises(error):
        client.remove_batch([RECORD])


def test_each_request_attempt_is_logged_with_records_status_latency_and_attempt(
    server: ReplayServer, client: RemoveBgClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="removebg_provider.client")
    server.script(FAST, Reply(503), Reply(200, api_body(ok_record("sku-1"))))

    client.remove_batch([RECORD])

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("POST ")]
    assert len(lines) == 2
    assert "records=1 http=503 latency=" in lines[0]
    assert lines[0].endswith("attempt=1")
    assert "records=1 http=200" in lines[1]
    assert lines[1].endswith("attempt=2")


def _echo_authorization(request: CapturedRequest) -> Reply:
    """A hostile server that repeats the credentials it received in its error text."""
    return Reply(401, api_body(code=401, text=f"bad credentials {request.headers.get('Authorization')}"))


def test_token_appears_in_no_log_or_error(
    server: ReplayServer, client: RemoveBgClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.script(FAST, _echo_authorization)
    server.script(
        FAST, Reply(503, f"echo {TOKEN}".encode()), Reply(reset=True), Reply(500, f"{TOKEN}".encode())
    )
    errors: list[BaseException] = []

    for _ in range(2):
        with pytest.raises((AuthenticationError, TransientApiError)) as raised:
            client.remove_batch([ImageRecord("sku-1", data=b"pixels")])
        errors.append(raised.value)
    client.check_connection()

    texts = [caplog.text, repr(client)] + [f"{e!s} {e!r} {e.__cause__!s}" for e in errors]
    assert [TOKEN in text for text in texts] == [False] * len(texts)
    assert "urllib3" in caplog.text


def test_image_bytes_are_never_logged(
    server: ReplayServer, client: RemoveBgClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.script(FAST, Reply(200, api_body(ok_record("sku-1"))))

    client.remove_batch([ImageRecord("sku-1", data=b"very-distinct-pixels" * 20)])

    assert "dmVyeS1kaXN0aW5jdC1waXhlbHM" not in caplog.text


def test_public_api_check_without_token_reports_the_missing_token() -> None:
    with RemoveBgClient() as client:
        ok, message = client.check_connection()

    assert (ok, message) == (
        False,
        "No API token is configured for https://api.ximilar.com; set the connection password",
    )


def test_check_connection_reports_a_refused_token(server: ReplayServer, client: RemoveBgClient) -> None:
    server.script("/health", Reply(200, {"status": "ok"}))
    server.script("/account/v2/user/", Reply(401, {"detail": "Invalid token."}))

    assert client.check_connection() == (False, f"{server.base_url} refused the API token (HTTP 401)")


def test_check_connection_accepts_a_token_the_server_accepts(
    server: ReplayServer, client: RemoveBgClient
) -> None:
    server.script("/health", Reply(200, {"status": "ok"}))
    server.script("/account/v2/user/", Reply(200, {"id": "u-1"}))

    assert client.check_connection() == (True, f"{server.base_url} is reachable and accepted the API token")
    assert server.requests_to("/account/v2/user/")[0].headers["Authorization"] == f"Token {TOKEN}"


def test_check_connection_spends_no_credits(server: ReplayServer, client: RemoveBgClient) -> None:
    server.script("/health", Reply(200, {"status": "ok"}))
    server.script("/account/v2/user/", Reply(404))

    ok, message = client.check_connection()

    assert (ok, "token is unchecked" in message) == (True, True)
    assert server.requests_to(FAST) == []


def test_check_connection_reports_an_unhealthy_server(server: ReplayServer, client: RemoveBgClient) -> None:
    server.script("/health", Reply(503, {"status": "starting"}))

    assert client.check_connection() == (False, f"{server.base_url}/health answered HTTP 503")


def test_check_connection_reports_an_unreachable_server() -> None:
    with serve_replays() as gone:
        base_url = gone.base_url
    with RemoveBgClient(
        base_url, token=TOKEN, timeout=(1, 1), retry_policy=RetryPolicy(max_retries=0)
    ) as client:
        ok, message = client.check_connection()

    assert (ok, message.startswith(f"Cannot reach {base_url}/health: ConnectionError")) == (False, True)
