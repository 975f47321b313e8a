"""Presigned URLs: a plain HTTP GET of the URL returns the object, on moto S3, fake-gcs-server and Azurite.

fake-gcs-server does not check signatures, so for gs:// the test shows the URL is V4-signed by the
service account for the asked lifetime and reaches the object; Azurite checks a SAS and refuses a
tampered one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from removebg_provider.errors import ConfigurationError, StorageError
from removebg_provider.storage import Storage
from support.stores import (
    AWS_REGION,
    AWS_TEST_KEY,
    AWS_TEST_SECRET,
    AzuriteBlob,
    FakeGcs,
    MotoS3,
    ObjectStore,
    fresh_store,
)

PAGE = b"<!doctype html><title>removebg report</title>"


@pytest.fixture
def s3_store(moto_s3: MotoS3) -> Iterator[ObjectStore]:
    yield from fresh_store(moto_s3)


@pytest.fixture
def azure_store(azurite: AzuriteBlob) -> Iterator[ObjectStore]:
    yield from fresh_store(azurite)


@pytest.fixture
def gcs_store(fake_gcs: FakeGcs) -> Iterator[ObjectStore]:
    yield from fresh_store(fake_gcs)


def _query(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def test_a_presigned_s3_url_serves_the_object(s3_store: ObjectStore) -> None:
    uri = s3_store.uri("enriched/products.report.html")
    s3_store.storage.write_bytes(uri, PAGE)

    url = s3_store.storage.presigned_url(uri, 900)

    assert requests.get(url, timeout=30).content == PAGE


def test_without_a_client_of_its_own_s3_presigns_with_sigv4(
    s3_store: ObjectStore, moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = s3_store.uri("enriched/products.report.html")
    s3_store.storage.write_bytes(uri, PAGE)
    for name, value in moto_s3.env.items():
        monkeypatch.setenv(name, value)

    url = Storage().presigned_url(uri, 900)

    assert requests.get(url, timeout=30).content == PAGE
    assert _query(url)["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"


def test_an_s3_client_configured_for_sigv4_presigns_with_the_asked_lifetime(
    s3_store: ObjectStore, moto_s3: MotoS3
) -> None:
    uri = s3_store.uri("enriched/products.report.html")
    s3_store.storage.write_bytes(uri, PAGE)
    signing = Storage(transport_params={"s3": {"client": _sigv4_client(moto_s3)}})

    url = signing.presigned_url(uri, 900)

    assert requests.get(url, timeout=30).content == PAGE
    query = _query(url)
    assert (query["X-Amz-Algorithm"], query["X-Amz-Expires"]) == ("AWS4-HMAC-SHA256", "900")


def test_a_presigned_azure_url_is_a_read_only_sas_that_azurite_checks(azure_store: ObjectStore) -> None:
    uri = azure_store.uri("enriched/products.report.html")
    azure_store.storage.write_bytes(uri, PAGE)

    url = azure_store.storage.presigned_url(uri, 900)
    tampered = url.replace("sp=r", "sp=rw")

    assert requests.get(url, timeout=30).content == PAGE
    assert _query(url)["sp"] == "r"
    assert requests.get(tampered, timeout=30).status_code == 403


def test_a_presigned_gcs_url_is_signed_by_the_service_account_for_the_asked_lifetime(
    gcs_store: ObjectStore, fake_gcs: FakeGcs
) -> None:
    uri = gcs_store.uri("enriched/products.report.html")
    gcs_store.storage.write_bytes(uri, PAGE)
    signing = Storage(transport_params={"gs": {"client": _service_account_client(fake_gcs)}})

    url = signing.presigned_url(uri, 900)

    assert requests.get(url, timeout=30).content == PAGE
    query = _query(url)
    assert (query["X-Goog-Algorithm"], query["X-Goog-Expires"]) == ("GOOG4-RSA-SHA256", "900")
    assert query["X-Goog-Credential"].startswith("signer@test-project.iam.gserviceaccount.com/")


def test_credentials_that_cannot_sign_are_named_in_the_error(gcs_store: ObjectStore) -> None:
    # The store's client has anonymous credentials: nothing to sign with.
    with pytest.raises(StorageError, match=r"cannot presign gs://.*cannot sign"):
        gcs_store.storage.presigned_url(gcs_store.uri("r.html"), 900)


@pytest.mark.parametrize("uri", ["/tmp/report.html", "https://reports.example.com/r.html"])
def test_only_object_store_uris_are_presigned(uri: str) -> None:
    with pytest.raises(StorageError, match=r"only s3://, gs:// and az://"):
        Storage().presigned_url(uri, 900)


@pytest.mark.parametrize("seconds", [0, 7 * 24 * 3600 + 1, 1.5, True])
def test_a_lifetime_outside_one_second_to_seven_days_is_refused(seconds: Any) -> None:
    with pytest.raises(ConfigurationError, match="1 to 604800 seconds"):
        Storage().presigned_url("s3://bucket/r.html", seconds)


def _sigv4_client(server: MotoS3) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=AWS_REGION,
        aws_access_key_id=AWS_TEST_KEY,
        aws_secret_access_key=AWS_TEST_SECRET,
        config=Config(signature_version="s3v4"),
    )


def _service_account_client(server: FakeGcs) -> Any:
    """A GCS client for `server` whose credentials are a fresh service-account key: it signs offline."""
    from google.cloud import storage as gcs
    from google.oauth2 import service_account

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    info = {
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "test-key",
        "private_key": pem.decode(),
        "client_email": "signer@test-project.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",  # never called: signing is local
    }
    credentials = service_account.Credentials.from_service_account_info(info)
    return gcs.Client(
        project="test-project", credentials=credentials, client_options={"api_endpoint": server.endpoint}
    )
