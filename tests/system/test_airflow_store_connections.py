"""Airflow storage connections through the official provider hooks, against real S3 and Azure Blob emulators.

Each connection is an `AIRFLOW_CONN_<ID>` environment variable pointing the provider's hook at
moto (tests/support/stores.py) or Azurite; every cloud SDK variable (AWS_*, AZURE_*, ...) is removed first,
so the connection is the only way the client can find the emulator. The pipeline then reads the
manifest and images from the bucket and writes the cutouts and the enriched manifest back, checked
through an independent client. The last test runs RemoveBackgroundOperator with `aws_conn_id`
under a real `airflow dags test`; its report, in the bucket, is linked through a presigned URL.

The Google provider is not installed by the dev extra (it pulls in ray, litellm and about a hundred
other packages, 1.3 GB), so the `gcp_conn_id` test stands a small GCSHook in for the provider's
(the one mock here, named as such in that test) whose client is a real one for fake-gcs-server.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from removebg_provider.operators.storage_connections import storage_from_connections
from support.runs import pipeline_config, run_pipeline
from support.servers import LocalApiServer, sample_photo, start_api_server
from support.stores import (
    AWS_REGION,
    AWS_TEST_KEY,
    AWS_TEST_SECRET,
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    AzuriteBlob,
    FakeGcs,
    MotoS3,
    ObjectStore,
    fresh_store,
)

BIN = Path(sys.executable).parent
PHOTOS = 4
_CLOUD_ENV_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_", "STORAGE_EMULATOR_HOST")

_DAG = '''
"""Test-only DAG: one RemoveBackgroundOperator whose S3 client comes from the `catalog_s3` connection."""
from datetime import datetime

from airflow.sdk import DAG

from removebg_provider.operators import RemoveBackgroundOperator

with DAG("remove_background_in_s3", schedule=None, start_date=datetime(2024, 1, 1)):
    RemoveBackgroundOperator(
        task_id="remove_background",
        manifest_uri="{{ params.manifest_uri }}",
        output_prefix="{{ params.output_prefix }}",
        output_manifest_uri="{{ params.output_manifest_uri }}",
        id_column="sku",
        max_records_per_request=2,
        concurrency=2,
        aws_conn_id="catalog_s3",
        report_link_expiry=3600,
    )
'''

# Small batches, few requests in flight: a few photos make several requests.
_STORE_RUN = {"id_column": "sku", "max_records_per_request": 2, "concurrency": 2}


@pytest.fixture(autouse=True)
def _no_cloud_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(_CLOUD_ENV_PREFIXES):
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture
def s3_bucket(moto_s3: MotoS3) -> Iterator[ObjectStore]:
    yield from fresh_store(moto_s3)


@pytest.fixture
def gcs_bucket(fake_gcs: FakeGcs) -> Iterator[ObjectStore]:
    yield from fresh_store(fake_gcs)


@pytest.fixture
def azure_container(azurite: AzuriteBlob) -> Iterator[ObjectStore]:
    yield from fresh_store(azurite)


def test_aws_connection_gives_the_pipeline_its_s3_client(
    moto_s3: MotoS3, s3_bucket: ObjectStore, server: LocalApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CATALOG_S3", json.dumps(_aws_connection(moto_s3)))
    manifest = _put_catalog(s3_bucket)

    storage = storage_from_connections(aws_conn_id="catalog_s3")
    summary = run_pipeline(
        server,
        pipeline_config(
            s3_bucket.uri(),
            manifest,
            settings=_STORE_RUN,
            output_manifest_uri=s3_bucket.uri("out/enriched.parquet"),
        ),
        storage,
    )

    assert summary.succeeded == PHOTOS
    _assert_outputs_written(s3_bucket)


def test_gcp_connection_gives_the_pipeline_the_hooks_gcs_client(
    fake_gcs: FakeGcs, gcs_bucket: ObjectStore, server: LocalApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Mock: the Google provider is not installed (1.3 GB), so this GCSHook stands in for it. It has
    # the provider's interface (GCSHook(gcp_conn_id=...).get_conn() -> google.cloud.storage.Client)
    # and hands out a real client for fake-gcs-server; what is tested is our wiring of that client.
    opened: list[str] = []

    class GCSHook:
        def __init__(self, gcp_conn_id: str) -> None:
            opened.append(gcp_conn_id)

        def get_conn(self) -> Any:
            return fake_gcs.client()

    hooks = types.ModuleType("airflow.providers.google.cloud.hooks.gcs")
    hooks.GCSHook = GCSHook  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, hooks.__name__, hooks)
    manifest = _put_catalog(gcs_bucket)

    storage = storage_from_connections(gcp_conn_id="catalog_gcs")
    summary = run_pipeline(
        server,
        pipeline_config(
            gcs_bucket.uri(),
            manifest,
            settings=_STORE_RUN,
            output_manifest_uri=gcs_bucket.uri("out/enriched.parquet"),
        ),
        storage,
    )

    assert opened == ["catalog_gcs"]
    assert summary.succeeded == PHOTOS
    _assert_outputs_written(gcs_bucket)


@pytest.mark.parametrize("form", ["connection_string", "account_key_and_host"])
def test_wasb_connection_gives_the_pipeline_its_blob_client(
    form: str,
    azurite: AzuriteBlob,
    azure_container: ObjectStore,
    server: LocalApiServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CATALOG_BLOB", json.dumps(_wasb_connection(azurite, form)))
    manifest = _put_catalog(azure_container)

    storage = storage_from_connections(wasb_conn_id="catalog_blob")
    summary = run_pipeline(
        server,
        pipeline_config(
            azure_container.uri(),
            manifest,
            settings=_STORE_RUN,
            output_manifest_uri=azure_container.uri("out/enriched.parquet"),
        ),
        storage,
    )

    assert summary.succeeded == PHOTOS
    _assert_outputs_written(azure_container)


def test_wasb_connection_serves_both_azure_spellings(
    azurite: AzuriteBlob, azure_container: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = _wasb_connection(azurite, "connection_string")
    monkeypatch.setenv("AIRFLOW_CONN_CATALOG_BLOB", json.dumps(connection))
    storage = storage_from_connections(wasb_conn_id="catalog_blob")

    storage.write_bytes(f"azure://{azure_container.bucket}/in/note.txt", b"written as azure://")

    assert storage.read_bytes(azure_container.uri("in/note.txt")) == b"written as azure://"
    assert storage.list_prefix(f"azure://{azure_container.bucket}/in") == [
        f"azure://{azure_container.bucket}/in/note.txt"
    ]


def test_operator_with_aws_conn_id_runs_a_manifest_in_s3_under_airflow_dags_test(
    moto_s3: MotoS3, s3_bucket: ObjectStore, server: LocalApiServer, tmp_path: Path
) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "remove_background_in_s3.py").write_text(_DAG)
    manifest = _put_catalog(s3_bucket)
    conf = {
        "manifest_uri": manifest,
        "output_prefix": s3_bucket.uri("cutouts"),
        "output_manifest_uri": s3_bucket.uri("out/enriched.parquet"),
    }
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW_CONN_CATALOG_S3": json.dumps(_aws_connection(moto_s3)),
        "AIRFLOW_CONN_REMOVEBG_DEFAULT": json.dumps(
            {"conn_type": "removebg", "host": server.base_url, "password": server.token}
        ),
    }
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)

    command = [str(BIN / "airflow"), "dags", "test", "remove_background_in_s3", "2024-06-01"]
    result = subprocess.run(
        [*command, "-c", json.dumps(conf)],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=900,
    )

    assert "state=success" in result.stdout, result.stdout[-3000:]
    assert f"run: {PHOTOS} rows, {PHOTOS} succeeded, 0 failed" in result.stdout
    _assert_outputs_written(s3_bucket)
    link = _report_link(tmp_path / "airflow" / "airflow.db")
    assert link.startswith(f"{moto_s3.endpoint}/{s3_bucket.bucket}/out/enriched.report.html?")
    assert requests.get(link, timeout=30).content.startswith(b"<!doctype html>")


def _report_link(database: Path) -> str:
    """The `report_url` XCom the task pushed, read from the Airflow database `airflow dags test` used."""
    with sqlite3.connect(database) as db:
        (value,) = db.execute("SELECT value FROM xcom WHERE key = 'report_url'").fetchone()
    link: str = json.loads(value)
    return link


def _aws_connection(moto: MotoS3) -> dict[str, Any]:
    return {
        "conn_type": "aws",
        "login": AWS_TEST_KEY,
        "password": AWS_TEST_SECRET,
        "extra": {"endpoint_url": moto.endpoint, "region_name": AWS_REGION},
    }


def _wasb_connection(azurite: AzuriteBlob, form: str) -> dict[str, Any]:
    if form == "connection_string":
        return {"conn_type": "wasb", "extra": {"connection_string": azurite.connection_string}}
    return {
        "conn_type": "wasb",
        "login": AZURITE_ACCOUNT,
        "password": AZURITE_KEY,
        "host": f"{azurite.endpoint}/{AZURITE_ACCOUNT}",
    }


def _put_catalog(store: ObjectStore) -> str:
    """Photos and a Parquet manifest naming them, written through the store's own client."""
    images = []
    for index in range(PHOTOS):
        uri = store.uri(f"photos/product-{index}.jpg")
        store.storage.write_bytes(uri, sample_photo(80 + index, 64, "JPEG"))
        images.append(uri)
    skus = [f"SKU-{index}" for index in range(PHOTOS)]
    buffer = io.BytesIO()
    pq.write_table(pa.table({"sku": skus, "image_url": images}), buffer)
    manifest = store.uri("in/manifest.parquet")
    store.storage.write_bytes(manifest, buffer.getvalue())
    return manifest


def _assert_outputs_written(store: ObjectStore) -> None:
    """The enriched manifest and every cutout are in the bucket, read back through the store's own client."""
    enriched = pq.read_table(io.BytesIO(store.storage.read_bytes(store.uri("out/enriched.parquet"))))
    rows: list[Mapping[str, Any]] = enriched.to_pylist()
    assert [row["removebg_status_code"] for row in rows] == [200] * PHOTOS
    assert [row["removebg_output_url"] for row in rows] == [
        store.uri(f"cutouts/SKU-{index}.png") for index in range(PHOTOS)
    ]
    for row in rows:
        assert store.storage.read_bytes(row["removebg_output_url"]).startswith(b"\x89PNG")
