"""Specification of RemoveBgHook: from an Airflow connection (given as an env var) to a ready client."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.log import redact

from removebg_provider.client import DEFAULT_BASE_URL, ImageRecord
from removebg_provider.errors import ConfigurationError
from removebg_provider.hooks import RemoveBgHook
from support.forward_proxy import start_forward_proxy
from support.replay_server import ReplayServer, Reply, echo_ok, serve_replays
from support.servers import LocalApiServer, sample_photo, start_api_server
from support.tls import ServerTls, make_certificates

TOKEN = "tok-hook-spec-5e1d"


@pytest.fixture
def server() -> Iterator[ReplayServer]:
    with serve_replays() as replay:
        yield replay


@pytest.fixture
def set_connection(monkeypatch: pytest.MonkeyPatch) -> Any:
    def set_(conn_id: str = "removebg_default", **fields: Any) -> None:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "removebg", **fields}))

    return set_


def _port(server: ReplayServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def test_get_conn_builds_the_client_the_connection_describes(
    server: ReplayServer, set_connection: Any
) -> None:
    set_connection(
        host="127.0.0.1",
        port=_port(server),
        schema="http",
        password=TOKEN,
        extra={
            "mode": "precise",
            "timeout": [3, 30],
            "max_retries": 2,
            "max_records_per_request": 5,
            "requests_per_minute": 120,
            "concurrency": 3,
        },
    )

    with RemoveBgHook().get_conn() as client:
        assert client.endpoint == f"{server.base_url}/removebg/precise/removebg"
        assert (client.timeout, client.retry_policy.max_retries, client.max_records_per_request) == (
            (3.0, 30.0),
            2,
            5,
        )
        assert (client.requests_per_minute, client.concurrency) == (120.0, 3)


def test_get_conn_sends_the_connection_password_as_token(server: ReplayServer, set_connection: Any) -> None:
    set_connection(host=server.base_url, password=TOKEN)
    server.script("/removebg/fast/removebg", echo_ok)

    with RemoveBgHook().get_conn() as client:
        client.remove_batch([ImageRecord("a", url="https://shop.example/a.jpg")])

    assert server.requests_to("/removebg/fast/removebg")[0].headers["Authorization"] == f"Token {TOKEN}"


def test_extras_given_as_strings_are_accepted(set_connection: Any) -> None:
    set_connection(host="https://api.ximilar.com", extra={"timeout": "45", "concurrency": "2"})

    with RemoveBgHook().get_conn() as client:
        assert (client.timeout, client.concurrency) == (45.0, 2)


@pytest.mark.parametrize(
    ("fields", "base_url"),
    [
        ({}, DEFAULT_BASE_URL),
        ({"host": "removebg.internal"}, "https://removebg.internal"),
        ({"host": "removebg.internal", "schema": "http", "port": 8080}, "http://removebg.internal:8080"),
        ({"host": "http://removebg.internal:9000/", "port": 8080}, "http://removebg.internal:9000"),
        ({"host": "https://gateway.example/ximilar"}, "https://gateway.example/ximilar"),
    ],
)
def test_host_becomes_the_api_base_url(set_connection: Any, fields: dict[str, Any], base_url: str) -> None:
    set_connection(**fields)

    with RemoveBgHook().get_conn() as client:
        assert client.base_url == base_url


def test_hook_arguments_win_over_the_connection(set_connection: Any) -> None:
    set_connection(extra={"mode": "precise", "concurrency": 3})

    with RemoveBgHook(mode="fast", concurrency=1).get_conn() as client:
        assert (client.mode, client.concurrency) == ("fast", 1)


def test_hook_reads_the_connection_it_is_given(set_connection: Any) -> None:
    set_connection("removebg_precise", extra={"mode": "precise"})

    with RemoveBgHook(removebg_conn_id="removebg_precise").get_conn() as client:
        assert client.mode == "precise"


def test_creating_the_hook_does_not_read_the_connection() -> None:
    hook = RemoveBgHook(removebg_conn_id="not_defined_anywhere")

    assert hook.removebg_conn_id == "not_defined_anywhere"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"mode": "turbo"}, "extra 'mode'='turbo': must be one of fast, precise"),
        ({"timeout": [1, 2, 3]}, "extra 'timeout'"),
        ({"max_retries": -1}, "extra 'max_retries'=-1: must be an integer >= 0"),
        ({"concurrency": "many"}, "extra 'concurrency'='many'"),
        ({"requests_per_minute": 0}, "extra 'requests_per_minute'=0: must be a positive number"),
        ({"verify": "/nonexistent/ca.pem"}, "extra 'verify'='/nonexistent/ca.pem': verify names a CA bundle"),
        ({"cert": ["/nonexistent/c.pem"]}, "extra 'cert'=['/nonexistent/c.pem']: cert names a file"),
        ({"proxies": ["http://proxy:3128"]}, "extra 'proxies'=['http://proxy:3128']: proxies must map"),
    ],
)
def test_invalid_extra_is_reported_naming_the_connection(
    set_connection: Any, extra: dict[str, Any], message: str
) -> None:
    set_connection(extra=extra)

    with pytest.raises(ConfigurationError, match="Connection 'removebg_default' is invalid") as raised:
        RemoveBgHook().get_conn()
    assert message in str(raised.value)


def test_the_backpressure_deadline_extra_sets_how_long_busy_answers_are_waited_out(
    set_connection: Any,
) -> None:
    set_connection(extra={"backpressure_deadline": 60})

    with RemoveBgHook().get_conn() as client:
        assert client.retry_policy.backpressure_deadline == 60.0


def test_test_connection_succeeds_against_a_healthy_server(server: ReplayServer, set_connection: Any) -> None:
    set_connection(host="127.0.0.1", port=_port(server), schema="http", password=TOKEN)
    server.script("/health", Reply(200, {"status": "ok"}))
    server.script("/account/v2/user/", Reply(200, {"id": "user-1"}))
    server.script("/account/v2/details/", Reply(200, {"credits": 1200}))
    server.script("/authorization/v2/authorize", Reply(200, {"user_id": "user-1"}))

    assert RemoveBgHook().test_connection() == (
        True,
        f"{server.base_url} is reachable and accepted the API token; "
        "the Remove Background service is activated; 1200 credits left",
    )


def test_test_connection_fails_when_the_token_is_refused(server: ReplayServer, set_connection: Any) -> None:
    set_connection(host=server.base_url, password="wrong")
    server.script("/health", Reply(200, {"status": "ok"}))
    server.script("/account/v2/user/", Reply(403, {"detail": "forbidden"}))

    assert RemoveBgHook().test_connection() == (False, f"{server.base_url} refused the API token (HTTP 403)")


def test_test_connection_reports_an_invalid_connection(set_connection: Any) -> None:
    set_connection(extra={"mode": "turbo"})

    ok, message = RemoveBgHook().test_connection()

    assert (ok, message.startswith("Connection 'removebg_default' is invalid")) == (False, True)


def test_token_is_masked_in_airflow_logs(set_connection: Any) -> None:
    set_connection(password=TOKEN)

    RemoveBgHook().get_conn().close()

    assert TOKEN not in str(redact(f"request failed with {TOKEN}"))


def test_password_of_the_rate_limit_redis_url_is_masked_in_airflow_logs(set_connection: Any) -> None:
    secret = "redis-pass-91f3"
    set_connection(
        extra={"requests_per_minute": 60, "rate_limit_redis_url": f"redis://:{secret}@redis:6379/1"}
    )

    RemoveBgHook().get_conn().close()

    assert secret not in str(redact(f"could not reach redis with {secret}"))


def test_rate_limit_redis_url_without_requests_per_minute_is_reported(set_connection: Any) -> None:
    set_connection(extra={"rate_limit_redis_url": "redis://redis:6379/1"})

    with pytest.raises(ConfigurationError, match="requests_per_minute is not"):
        RemoveBgHook().get_conn()


def test_test_connection_checks_the_token_against_the_local_server(
    api_server: LocalApiServer, set_connection: Any
) -> None:
    set_connection(host=api_server.base_url, password="not-the-token")
    refused = RemoveBgHook().test_connection()
    set_connection(host=api_server.base_url, password=api_server.token)

    assert refused == (False, f"{api_server.base_url} refused the API token (HTTP 401)")
    assert RemoveBgHook().test_connection() == (
        True,
        f"{api_server.base_url} is reachable and accepted the API token; the Remove Background service "
        "is activated; credits not limited or not reported by /account/v2/details/",
    )


def test_unknown_extras_are_logged_by_name(set_connection: Any, caplog: pytest.LogCaptureFixture) -> None:
    set_connection(extra={"mode": "fast", "proxy": "http://proxy:3128", "verify_ssl": False})

    with caplog.at_level(logging.WARNING, logger="removebg_provider"):
        RemoveBgHook().get_conn().close()

    assert "unknown removebg connection extras: proxy, verify_ssl" in caplog.text


def test_verify_and_cert_extras_reach_a_server_that_requires_a_client_certificate(
    set_connection: Any, tmp_path: Path
) -> None:
    certificates = make_certificates(tmp_path / "tls")
    tls = ServerTls(certificates, require_client_cert=True)
    with start_api_server(tmp_path, token=TOKEN, tls=tls) as server:
        set_connection(
            host=server.base_url,
            password=TOKEN,
            extra={"verify": str(certificates.ca), "cert": list(certificates.client_pair)},
        )
        with RemoveBgHook().get_conn() as client:
            (result,) = client.remove_batch([ImageRecord("a", data=sample_photo())])
        ok, message = RemoveBgHook().test_connection()

    assert result.status_code == 200
    assert ok is True, message


def test_the_proxies_extra_routes_the_api_requests_and_its_password_is_masked(
    api_server: LocalApiServer, set_connection: Any
) -> None:
    secret = "proxy-pass-5b7e"
    with start_forward_proxy("catalog", secret) as proxy:
        set_connection(
            host=api_server.base_url,
            password=api_server.token,
            extra={"proxies": {"http": proxy.url_with("catalog", secret)}},
        )
        with RemoveBgHook().get_conn() as client:
            (result,) = client.remove_batch([ImageRecord("a", data=sample_photo())])

    assert result.status_code == 200
    assert ("POST", f"{api_server.base_url}/removebg/fast/removebg") in proxy.relayed
    assert secret not in str(redact(f"proxy refused {secret}"))
