"""GCS under mutual TLS: the storage keeps the client certificate google-auth configured for its session.

google-auth mounts an adapter carrying the workload's certificate when mutual TLS is on (with
GOOGLE_API_USE_CLIENT_CERTIFICATE, or on its own where a workload certificate config exists), and
google-cloud-storage then talks to the mTLS endpoint. The server here is a real https server on
127.0.0.1 that refuses a client without a certificate of the test CA; it answers only the object
metadata request that `Storage.version` makes.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from removebg_provider.storage import Storage
from support.tls import Certificates, make_certificates


class _ObjectMetadata(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        name = self.path.split("?")[0].rsplit("/o/", 1)[-1]
        body = json.dumps(
            {"kind": "storage#object", "bucket": "photos", "name": name, "generation": "7", "size": "3"}
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def mutual_tls_gcs(certificates: Certificates) -> Iterator[str]:
    """The https URL of a GCS JSON API stand-in that requires a client certificate of the test CA."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.server_cert, certificates.server_key)
    context.load_verify_locations(certificates.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ObjectMetadata)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_gcs_storage_presents_the_workload_certificate_google_auth_configured(
    mutual_tls_gcs: str, certificates: Certificates, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "certificate_config.json"
    config.write_text(
        json.dumps(
            {
                "cert_configs": {
                    "workload": {
                        "cert_path": str(certificates.client_cert),
                        "key_path": str(certificates.client_key),
                    }
                }
            }
        )
    )
    monkeypatch.setenv("GOOGLE_API_USE_CLIENT_CERTIFICATE", "true")
    monkeypatch.setenv("GOOGLE_API_CERTIFICATE_CONFIG", str(config))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", mutual_tls_gcs)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "test")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificates.ca))

    assert Storage().version("gs://photos/a.jpg") == "generation:7"
