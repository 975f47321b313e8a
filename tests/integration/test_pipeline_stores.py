"""The manifest pipeline and `removebg run` with manifests, images and outputs in S3, GCS and Azure Blob."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus
from support.replay_server import echo_ok, serve_replays
from support.runs import pipeline_config, run_pipeline
from support.servers import LocalApiServer, sample_photo, start_api_server
from support.stores import MotoS3, ObjectStore, StoreServer

_CLOUD_ENV_PREFIXES = ("AWS_", "AZURE_", "GOOGLE_", "GCLOUD_", "CLOUDSDK_", "STORAGE_EMULATOR_HOST")

# Small batches, few requests in flight: a few photos make several requests.
_STORE_RUN = {"shard_size": 6, "max_records_per_request": 3, "concurrency": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(autouse=True)
def _billing_starts_at_zero(server: LocalApiServer) -> None:
    server.reset_stats()


FAST_PATH = "/removebg/fast/removebg"


def test_the_pipeline_reads_the_manifest_and_images_from_the_store_and_writes_everything_back(
    server: LocalApiServer, object_store: ObjectStore
) -> None:
    images = _put_photos(object_store, 5)
    manifest = _put_manifest(object_store, "in/manifest.parquet", {"sku": list("abcde"), "image_url": images})
    config = pipeline_config(
        object_store.uri(), manifest, id_column="sku", binary_mask=True, settings=_STORE_RUN
    )

    summary = run_pipeline(server, config, object_store.storage)

    rows = _enriched(object_store, config).to_pylist()
    assert summary.succeeded == 5
    assert [row["removebg_status_code"] for row in rows] == [200] * 5
    assert rows[0]["removebg_output_url"] == object_store.uri("cutouts/a.png")
    assert rows[0]["removebg_output_url_mask"] == object_store.uri("cutouts/a.mask.jpg")
    cutout = Image.open(io.BytesIO(object_store.storage.read_bytes(rows[0]["removebg_output_url"])))
    assert (cutout.mode, cutout.size) == ("RGBA", (80, 64))
    assert server.stats()["records_billed"] == 5


def test_object_references_are_sent_to_the_api_as_image_bytes(object_store: ObjectStore) -> None:
    images = _put_photos(object_store, 1)
    config = pipeline_config(
        object_store.uri(),
        _put_manifest(object_store, "in/m.parquet", {"image_url": images}),
        settings=_STORE_RUN,
    )
    with serve_replays() as api:
        api.script(FAST_PATH, echo_ok)
        with RemoveBgClient(api.base_url) as client:
            pipeline.run(dataclasses.replace(config, max_failed_fraction=1.0), client, object_store.storage)

        (sent,) = api.requests_to(FAST_PATH)
    (record,) = sent.json()["records"]
    assert "_url" not in record
    assert base64.b64decode(record["_base64"]) == object_store.storage.read_bytes(images[0])


def test_a_missing_image_object_becomes_an_unreadable_row_not_a_failed_run(
    server: LocalApiServer, object_store: ObjectStore
) -> None:
    images = [*_put_photos(object_store, 1), object_store.uri("photos/never-uploaded.jpg")]
    manifest = _put_manifest(object_store, "in/m.parquet", {"sku": ["ok", "gone"], "image_url": images})
    config = pipeline_config(
        object_store.uri(), manifest, id_column="sku", max_failed_fraction=1.0, settings=_STORE_RUN
    )

    run_pipeline(server, config, object_store.storage)

    codes = {row["sku"]: row["removebg_status_code"] for row in _enriched(object_store, config).to_pylist()}
    assert codes == {"ok": 200, "gone": RowStatus.UNREADABLE_IMAGE}


def test_an_interrupted_run_resumes_from_checkpoints_in_the_store_without_billing_again(
    server: LocalApiServer, object_store: ObjectStore
) -> None:
    manifest = _put_manifest(object_store, "in/m.parquet", {"image_url": _put_photos(object_store, 12)})
    config = pipeline_config(object_store.uri(), manifest, concurrency=1, settings=_STORE_RUN)
    with (
        pytest.raises(KeyboardInterrupt),
        _CrashAfter(server.base_url, server.token, batches=2) as crashing,
    ):
        pipeline.run(config, crashing, object_store.storage)
    checkpoints = [
        uri
        for shard in ("shard-00000", "shard-00001")
        for uri in object_store.storage.list_prefix(f"{config.staging}/checkpoints/{shard}")
    ]

    summary = run_pipeline(server, config, object_store.storage)

    assert len([uri for uri in checkpoints if "/ckpt-" in uri]) == 2
    assert all(uri.startswith(object_store.uri("cutouts/_removebg_staging/")) for uri in checkpoints)
    assert server.stats()["records_billed"] == 12
    assert summary.succeeded == 12


def test_a_rerun_against_the_store_bills_nothing(server: LocalApiServer, object_store: ObjectStore) -> None:
    manifest = _put_manifest(object_store, "in/m.parquet", {"image_url": _put_photos(object_store, 4)})
    config = pipeline_config(object_store.uri(), manifest, settings=_STORE_RUN)
    run_pipeline(server, config, object_store.storage)
    server.reset_stats()

    summary = run_pipeline(server, config, object_store.storage)

    assert server.stats()["records_billed"] == 0
    assert summary.succeeded == 4


def test_a_rerun_on_an_object_store_checks_its_served_cutouts_by_listing_not_one_request_each(
    server: LocalApiServer, object_store: ObjectStore, store_server: StoreServer
) -> None:
    manifest = _put_manifest(object_store, "in/m.parquet", {"image_url": _put_photos(object_store, 20)})
    # One shard of 20 rows; no QA report, which reads the cutouts it shows.
    one_shard = {"shard_size": 20, "max_records_per_request": 10, "concurrency": 2, "report": False}
    config = pipeline_config(object_store.uri(), manifest, settings=one_shard)
    run_pipeline(server, config, object_store.storage)
    server.reset_stats()
    requests_sent: list[str] = []

    summary = run_pipeline(server, config, store_server.counted_storage(requests_sent))

    assert server.stats()["records_billed"] == 0
    assert summary.succeeded == 20
    assert [url for url in requests_sent if urlsplit(url).path.endswith(".png")] == []


def test_the_cli_works_with_only_the_sdk_environment_configuration(
    server: LocalApiServer, object_store: ObjectStore, tmp_path: Path
) -> None:
    images = _put_photos(object_store, 3)
    manifest = _put_manifest(object_store, "in/m.parquet", {"sku": ["x", "y", "z"], "image_url": images})
    output_manifest = object_store.uri("out/enriched.parquet")

    finished = subprocess.run(
        [
            str(Path(sys.executable).with_name("removebg")),
            "run",
            manifest,
            "--output-prefix",
            object_store.uri("cutouts"),
            "--output-manifest",
            output_manifest,
            "--id-column",
            "sku",
            "--endpoint",
            server.base_url,
            "--no-progress",
        ],
        env=_cli_env(object_store, server),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads(finished.stdout)["succeeded"] == 3
    table = _read_table(object_store.storage, output_manifest)
    assert table.column("removebg_output_url").to_pylist() == [
        object_store.uri(f"cutouts/{sku}.png") for sku in "xyz"
    ]
    assert server.stats()["records_billed"] == 3


def test_refused_output_writes_are_retried_then_recorded_as_failed_rows(
    server: LocalApiServer, moto_s3: MotoS3
) -> None:
    store = moto_s3.new_store()
    images = _put_photos(store, 3)
    manifest = _put_manifest(store, "in/m.parquet", {"sku": ["a", "b", "c"], "image_url": images})
    config = pipeline_config(
        store.uri(), manifest, id_column="sku", max_failed_fraction=1.0, settings=_STORE_RUN
    )
    with moto_s3.writes_denied(store.bucket, "cutouts/*.png") as client:
        put_attempts = _count_calls(client, "CreateMultipartUpload", "PutObject")
        storage = Storage(transport_params={"s3": {"client": client}}, write_attempts=2)

        summary = run_pipeline(server, config, storage)

    rows = _enriched(store, config).to_pylist()
    assert summary.failed == 3
    assert {row["removebg_status_code"] for row in rows} == {507}
    assert all(row["removebg_output_url"] is None for row in rows)
    assert "cutouts/a.png" in rows[0]["removebg_error"]
    assert not any(uri.endswith(".png") for uri in store.storage.list_prefix(store.uri("cutouts")))
    assert put_attempts.get(store.uri("cutouts/a.png")) == 2


def test_rows_whose_outputs_were_refused_are_processed_again_once_writes_work(
    server: LocalApiServer, moto_s3: MotoS3
) -> None:
    store = moto_s3.new_store()
    manifest = _put_manifest(store, "in/m.parquet", {"sku": ["a", "b"], "image_url": _put_photos(store, 2)})
    config = pipeline_config(
        store.uri(), manifest, id_column="sku", max_failed_fraction=1.0, settings=_STORE_RUN
    )
    with moto_s3.writes_denied(store.bucket, "cutouts/*.png") as client:
        run_pipeline(server, config, Storage(transport_params={"s3": {"client": client}}, write_attempts=1))
    server.reset_stats()

    summary = run_pipeline(server, config, store.storage)

    assert summary.succeeded == 2
    assert server.stats()["records_billed"] == 2
    assert store.storage.exists(store.uri("cutouts/a.png"))


class _CrashAfter(RemoveBgClient):
    """A real client that dies (like a killed worker) once it has sent `batches` requests."""

    def __init__(self, *args: object, batches: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.remaining = batches

    def remove_batch(self, records, options=None):  # type: ignore[no-untyped-def]
        if self.remaining <= 0:
            raise KeyboardInterrupt("worker killed")
        self.remaining -= 1
        return super().remove_batch(records, options or pipeline.RemovalOptions())


def _put_photos(store: ObjectStore, count: int) -> list[str]:
    uris = []
    for index in range(count):
        uri = store.uri(f"photos/product-{index}.jpg")
        store.storage.write_bytes(uri, sample_photo(80 + index, 64, "JPEG"))
        uris.append(uri)
    return uris


def _put_manifest(store: ObjectStore, key: str, columns: Mapping[str, Sequence[object]]) -> str:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    uri = store.uri(key)
    store.storage.write_bytes(uri, buffer.getvalue())
    return uri


def _enriched(store: ObjectStore, config: pipeline.PipelineConfig) -> pa.Table:
    return _read_table(store.storage, config.output_manifest_uri)


def _read_table(storage: Storage, uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(storage.read_bytes(uri)))


def _cli_env(store: ObjectStore, server: LocalApiServer) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(_CLOUD_ENV_PREFIXES)}
    env.update(store.env)
    env["REMOVEBG_API_TOKEN"] = server.token or ""
    return env


def _count_calls(client: object, *operations: str) -> dict[str, int]:
    """Count the S3 write requests the client sends, by object URI, through botocore's event hooks."""
    counts: dict[str, int] = {}

    def count(params: dict[str, object], **_: object) -> None:
        uri = f"s3://{params['Bucket']}/{params['Key']}"
        counts[uri] = counts.get(uri, 0) + 1

    for operation in operations:
        client.meta.events.register(f"provide-client-params.s3.{operation}", count)  # type: ignore[attr-defined]
    return counts
