"""Records with `_url` are fetched over http(s), capped in size and time, and never from private networks."""

from __future__ import annotations

import contextlib
import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from removebg_provider.errors import FetchRefused
from removebg_provider.guarded_fetch import FetchLimits, fetch_url, head_url, is_public_address
from support.servers import LocalApiServer, sample_photo, sample_photo_base64, start_api_server
from support.tls import make_certificates

PHOTO = sample_photo(96, 64, "JPEG")
RELEASE_SLOW_HANDLER = threading.Event()


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    """Serves the sample photo, a redirect to a private address, a big body, a 404 and a stalled body."""

    def do_GET(self) -> None:
        if self.path == "/photo.jpg":
            self._send(200, PHOTO, "image/jpeg")
        elif self.path == "/host":
            self._send(200, self.headers["Host"].encode(), "text/plain")
        elif self.path == "/to-private":
            self.send_response(302)
            self.send_header("Location", "http://10.11.12.13/photo.jpg")
            self.end_headers()
        elif self.path == "/to-photo":
            self.send_response(301)
            self.send_header("Location", "/photo.jpg")
            self.end_headers()
        elif self.path == "/big-unannounced":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            self.wfile.write(b"\xff" * 50_000)
        elif self.path == "/slow-headers":
            # One byte of the headers at a time, more often than a read times out: only the
            # total deadline stops it.
            # The client hangs up at its deadline: the writes after that fail.
            with contextlib.suppress(OSError):
                self.wfile.write(b'HTTP/1.1 200 OK\r\nETag: "version-')
                for byte in b'2-of-the-photo"\r\nContent-Length: 0\r\n\r\n':
                    if RELEASE_SLOW_HANDLER.wait(timeout=0.25):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
        elif self.path == "/stall":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"\xff" * 10)
            self.wfile.flush()
            RELEASE_SLOW_HANDLER.wait(timeout=30)
        else:
            self._send(404, b"nothing here", "text/plain")

    def do_HEAD(self) -> None:
        # The same status and headers as a GET; the client reads no body after a HEAD.
        self.do_GET()

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A real http.server on 127.0.0.1 that hosts the test images."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        RELEASE_SLOW_HANDLER.set()
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def private_url_server(tmp_path: Path, **settings: Any) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path, allow_private_urls=True, **settings) as server:
        yield server


def remove_background(server: LocalApiServer, *records: dict[str, object]) -> list[dict[str, object]]:
    response = requests.post(
        f"{server.base_url}/removebg/fast/removebg",
        json={"records": list(records)},
        headers=server.auth_headers(),
        timeout=60,
    )
    response.raise_for_status()
    result: list[dict[str, object]] = response.json()["records"]
    return result


def status_of(record: dict[str, object]) -> dict[str, object]:
    status = record["_status"]
    assert isinstance(status, dict)
    return status


def test_url_is_fetched_when_private_urls_are_allowed(tmp_path: Path, image_host: str) -> None:
    with private_url_server(tmp_path) as server:
        [record] = remove_background(server, {"_url": f"{image_host}/photo.jpg"})

    assert status_of(record)["code"] == 200
    assert record["_url"] == f"{image_host}/photo.jpg"
    assert (record["_width"], record["_height"]) == (96, 64)


def test_redirects_are_followed(tmp_path: Path, image_host: str) -> None:
    with private_url_server(tmp_path) as server:
        [record] = remove_background(server, {"_url": f"{image_host}/to-photo"})

    assert status_of(record)["code"] == 200


def test_loopback_url_is_refused_by_default_and_the_batch_goes_on(
    api_server: LocalApiServer, image_host: str
) -> None:
    refused, ok = remove_background(
        api_server, {"_url": f"{image_host}/photo.jpg"}, {"_base64": sample_photo_base64()}
    )

    assert status_of(refused)["code"] == 403
    assert "--allow-private-urls" in str(status_of(refused)["text"])
    assert status_of(ok)["code"] == 200
    assert api_server.stats()["records_billed"] == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost/x.jpg",
        "http://10.0.0.1/x.jpg",
        "http://192.168.1.1/x.jpg",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/x.jpg",
        "http://[::ffff:127.0.0.1]/x.jpg",
        "http://0.0.0.0/x.jpg",
        "http://[fec0::1]/x.jpg",
    ],
)
def test_private_link_local_and_reserved_addresses_are_refused(url: str) -> None:
    with pytest.raises(FetchRefused) as refused:
        fetch_url(url, FetchLimits(max_bytes=10_000, timeout_seconds=2, max_redirects=2))

    assert refused.value.code == 403


@pytest.mark.parametrize("request_url", [fetch_url, head_url], ids=["GET", "HEAD"])
def test_a_redirect_to_a_private_address_is_refused_at_that_hop(
    image_host: str, request_url: Callable[..., object]
) -> None:
    def loopback_only(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return address.is_loopback

    with pytest.raises(FetchRefused) as refused:
        request_url(f"{image_host}/to-private", FetchLimits(10_000, 2, 2), is_allowed=loopback_only)

    assert refused.value.code == 403
    assert "10.11.12.13" in str(refused.value)


def test_a_head_request_follows_redirects_and_answers_with_the_final_status_and_headers(
    image_host: str,
) -> None:
    answer = head_url(f"{image_host}/to-photo", FetchLimits(0, 5, 2), is_allowed=_anything)

    assert answer.status == 200
    assert answer.headers["content-length"] == str(len(PHOTO))


def test_a_head_request_whose_headers_are_still_arriving_at_the_deadline_times_out(image_host: str) -> None:
    with pytest.raises(FetchRefused) as refused:
        head_url(f"{image_host}/slow-headers", FetchLimits(0, 2, 2), is_allowed=_anything)

    assert refused.value.code == 408


def test_the_connection_keeps_the_host_name_in_the_host_header(image_host: str) -> None:
    port = image_host.rsplit(":", 1)[1]

    body = fetch_url(f"http://localhost:{port}/host", FetchLimits(10_000, 5, 2), is_allowed=_anything)

    assert body == f"localhost:{port}".encode()


def test_a_host_name_is_resolved_once_so_dns_rebinding_cannot_swap_the_address(
    image_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = image_host.rsplit(":", 1)[1]
    looked_up: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def recording_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording_getaddrinfo)
    fetch_url(f"http://localhost:{port}/host", FetchLimits(10_000, 5, 2), is_allowed=_anything)

    assert looked_up.count("localhost") == 1


def test_public_addresses_pass_the_address_policy() -> None:
    assert is_public_address(ipaddress.ip_address("93.184.216.34"))
    assert is_public_address(ipaddress.ip_address("2606:4700::1111"))


@pytest.mark.parametrize("url", ["ftp://example.com/x.jpg", "file:///etc/passwd", "gopher://x/"])
def test_non_http_schemes_are_refused(url: str) -> None:
    with pytest.raises(FetchRefused) as refused:
        fetch_url(url, FetchLimits(10_000, 2, 2))

    assert refused.value.code == 400


def test_a_url_body_over_the_byte_limit_fails_alone(tmp_path: Path, image_host: str) -> None:
    with private_url_server(tmp_path, max_image_bytes=20_000) as server:
        too_big, ok = remove_background(
            server, {"_url": f"{image_host}/big-unannounced"}, {"_url": f"{image_host}/photo.jpg"}
        )

    assert status_of(too_big)["code"] == 413
    assert status_of(ok)["code"] == 200


def test_a_missing_url_reports_the_http_status(tmp_path: Path, image_host: str) -> None:
    with private_url_server(tmp_path) as server:
        [record] = remove_background(server, {"_url": f"{image_host}/missing.jpg"})

    assert status_of(record)["code"] == 400
    assert "HTTP 404" in str(status_of(record)["text"])


def test_a_stalled_download_times_out(image_host: str) -> None:
    with pytest.raises(FetchRefused) as timed_out:
        fetch_url(f"{image_host}/stall", FetchLimits(10_000, 0.5, 2), is_allowed=_anything)

    assert timed_out.value.code == 408


def test_an_unresolvable_host_fails_alone(tmp_path: Path) -> None:
    with private_url_server(tmp_path) as server:
        [record] = remove_background(server, {"_url": "http://no-such-host.invalid/x.jpg"})

    assert status_of(record)["code"] == 400
    assert "cannot resolve" in str(status_of(record)["text"])


def test_a_refused_connection_is_reported_as_unreachable_not_as_a_timeout() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    with pytest.raises(FetchRefused) as refused:
        fetch_url(f"http://127.0.0.1:{closed_port}/x.jpg", FetchLimits(10_000, 5, 2), is_allowed=_anything)

    assert refused.value.code == 400
    assert "cannot connect" in str(refused.value)


def test_an_https_host_whose_certificate_no_public_authority_signed_is_refused(tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificates.server_cert, certificates.server_key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(FetchRefused) as refused:
            fetch_url(
                f"https://localhost:{server.server_address[1]}/x.jpg",
                FetchLimits(10_000, 10, 2),
                is_allowed=_anything,
            )
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

    assert refused.value.code == 400
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)


def _anything(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return True
