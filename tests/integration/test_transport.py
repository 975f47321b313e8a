"""The client's `proxies`, `verify` and `cert` reach the API through a real proxy and real TLS on 127.0.0.1.

The local API server serves https with certificates of a private CA (`support/tls.py`); the proxy is a
real forward proxy (`support/forward_proxy.py`). The environment variables requests also reads
(REQUESTS_CA_BUNDLE, HTTP_PROXY) are set against the setting under test: an explicit setting wins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import certifi
import pytest

from removebg_provider.client import ImageRecord, RemoveBgClient
from removebg_provider.errors import ConfigurationError
from support.forward_proxy import start_forward_proxy
from support.servers import LocalApiServer, sample_photo, start_api_server
from support.tls import Certificates, ServerTls, make_certificates

TOKEN = "tok-transport-7c2e"


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(tmp_path: Path, certificates: Certificates) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path, token=TOKEN, tls=ServerTls(certificates)) as server:
        yield server


@pytest.fixture
def mutual_tls_server(tmp_path: Path, certificates: Certificates) -> Iterator[LocalApiServer]:
    with start_api_server(
        tmp_path, token=TOKEN, tls=ServerTls(certificates, require_client_cert=True)
    ) as server:
        yield server


def _one_image() -> list[ImageRecord]:
    return [ImageRecord("a", data=sample_photo())]


def test_a_ca_bundle_given_as_verify_wins_over_requests_ca_bundle_from_the_environment(
    tls_server: LocalApiServer, certificates: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())  # public CAs only: ours is not in it

    with RemoveBgClient(tls_server.base_url, TOKEN, verify=str(certificates.ca)) as client:
        (result,) = client.remove_batch(_one_image())

    assert result.status_code == 200


def test_without_verify_a_server_of_a_private_ca_is_refused(tls_server: LocalApiServer) -> None:
    with RemoveBgClient(tls_server.base_url, TOKEN) as client:
        ok, message = client.check_connection()

    assert ok is False
    assert "SSLError" in message
    assert TOKEN not in message


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")  # what verify=False means
def test_verify_false_skips_the_certificate_check(tls_server: LocalApiServer) -> None:
    with RemoveBgClient(tls_server.base_url, TOKEN, verify=False) as client:
        ok, _ = client.check_connection()

    assert ok is True


def test_a_client_certificate_given_as_cert_is_presented_to_a_server_that_requires_one(
    mutual_tls_server: LocalApiServer, certificates: Certificates
) -> None:
    ca = str(certificates.ca)
    with RemoveBgClient(
        mutual_tls_server.base_url, TOKEN, verify=ca, cert=certificates.client_pair
    ) as client:
        (result,) = client.remove_batch(_one_image())
    with RemoveBgClient(mutual_tls_server.base_url, TOKEN, verify=ca) as anonymous:
        refused, _ = anonymous.check_connection()

    assert result.status_code == 200
    assert refused is False


def test_proxies_route_every_api_request_through_the_proxy_and_win_over_http_proxy(
    api_server: LocalApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)

    with (
        start_forward_proxy() as proxy,
        RemoveBgClient(api_server.base_url, api_server.token, proxies={"http": proxy.url_with()}) as client,
    ):
        ok, _ = client.check_connection()
        (result,) = client.remove_batch(_one_image())

    assert (ok, result.status_code) == (True, 200)
    assert ("POST", f"{api_server.base_url}/removebg/fast/removebg") in proxy.relayed
    assert ("GET", f"{api_server.base_url}/health") in proxy.relayed


def test_a_proxy_that_wants_credentials_gets_those_of_the_proxy_url_and_never_the_token(
    api_server: LocalApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    assert api_server.token is not None
    with start_forward_proxy("catalog", "proxy-pass-3d9a") as proxy:
        with RemoveBgClient(
            api_server.base_url,
            api_server.token,
            proxies={"http": proxy.url_with("catalog", "proxy-pass-3d9a")},
        ) as client:
            (result,) = client.remove_batch(_one_image())
        with RemoveBgClient(
            api_server.base_url, api_server.token, proxies={"http": proxy.url_with("catalog", "wrong")}
        ) as refused_client:
            caplog.set_level(logging.DEBUG, logger="removebg_provider")
            ok, message = refused_client.check_connection()

    assert result.status_code == 200
    assert (ok, proxy.refused >= 1) == (False, True)
    assert "407" in message
    assert api_server.token not in message + caplog.text


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"proxies": {"https": "proxy-without-scheme"}}, "proxies['https']"),
        ({"proxies": {"https": "http://user:secret-9f1@"}}, "proxies['https']"),
        ({"proxies": "http://proxy:3128"}, "proxies must map a scheme"),
        (
            {"verify": "/nonexistent/ca.pem"},
            "verify names a CA bundle that does not exist: /nonexistent/ca.pem",
        ),
        ({"verify": 0}, "verify must be true, false or the path of a CA bundle"),
        ({"cert": ["/nonexistent/c.pem", "/nonexistent/k.pem"]}, "cert names a file that does not exist"),
        ({"cert": ["a", "b", "c"]}, "cert must be a file path or a [certificate, key] pair"),
    ],
)
def test_a_bad_transport_setting_is_refused_naming_it_and_never_a_proxy_password(
    settings: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigurationError) as refused:
        RemoveBgClient("http://127.0.0.1:8765", TOKEN, **settings)

    assert named in str(refused.value)
    assert "secret-9f1" not in str(refused.value)
