"""The result store: a daily catalog run bills only new and changed images, and never serves a stale cutout.

Every test runs the real pipeline against the real local API server on 127.0.0.1 and counts the
records the server billed. A photo's width identifies its content: the server's cutout has the
input's size, so a cutout's width tells which photo it was made from.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.errors import ManifestError
from removebg_provider.pipeline.store import ResultStore, StoredResult, result_key
from removebg_provider.storage import Storage
from support.file_server import FileServer, serve_files
from support.runs import billed_by_run, cutout_widths, enriched_rows
from support.servers import LocalApiServer, sample_photo, start_api_server
from support.stores import MotoS3, ObjectStore, StoreServer, fresh_store

_HEIGHT = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture
def s3_store(moto_s3: MotoS3) -> Iterator[ObjectStore]:
    yield from fresh_store(moto_s3)


class _FirstRemovalWaitsForASecond:
    """ASGI middleware: the first removal request waits (at most `seconds`) until a second arrives.

    Two runs started together then overlap for certain: both have looked the store up and found
    nothing before either stores a result, so only a claim can keep them from both billing.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.arrived = 0
        self._app: ASGIApp | None = None

    def wrap(self, app: ASGIApp) -> ASGIApp:
        self._app = app
        return self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._app is not None, "wrap(app) first"
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/removebg/"):
            self.arrived += 1
            deadline = time.monotonic() + self.seconds
            while self.arrived == 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        await self._app(scope, receive, send)


def _photo(path: Path, width: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sample_photo(width, _HEIGHT, "JPEG"))
    return str(path)


def _catalog(folder: Path, count: int) -> dict[str, str]:
    """`count` products, sku -> photo path; product i's photo is 50 + i pixels wide."""
    return {f"sku-{i}": _photo(folder / f"sku-{i}.jpg", 50 + i) for i in range(count)}


def _manifest(path: Path, catalog: Mapping[str, str], **columns: list[object]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"sku": list(catalog), "image_url": list(catalog.values()), **columns}), path)
    return str(path)


def _config(tmp_path: Path, manifest: str, **overrides: object) -> pipeline.PipelineConfig:
    options: dict[str, object] = {
        "manifest_uri": manifest,
        "id_column": "sku",
        "output_prefix": str(tmp_path / "cutouts"),
        "output_manifest_uri": str(tmp_path / "enriched" / (Path(manifest).stem + ".parquet")),
        "shard_size": 4,
        "max_records_per_request": 3,
        "concurrency": 2,
        "report": False,
    }
    options.update(overrides)
    return pipeline.PipelineConfig(**options)  # type: ignore[arg-type]


@contextlib.contextmanager
def _two_photos_served(
    tmp_path: Path, *, etags: bool
) -> Iterator[tuple[FileServer, LocalApiServer, dict[str, str]]]:
    """Two photos on a 127.0.0.1 file server, an API server that may fetch them, and their catalog.

    The photos are 50 and 51 px wide; the catalog maps sku-a and sku-b to their URLs.
    """
    photos = {"a.jpg": sample_photo(50, _HEIGHT, "JPEG"), "b.jpg": sample_photo(51, _HEIGHT, "JPEG")}
    with (
        serve_files(photos, etags=etags) as images,
        start_api_server(tmp_path / "server", allow_private_urls=True) as server,
    ):
        yield images, server, {"sku-a": f"{images.base_url}/a.jpg", "sku-b": f"{images.base_url}/b.jpg"}


def test_day_two_of_a_catalog_bills_exactly_its_changed_and_new_images(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 8)
    billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "day1.parquet", catalog)))
    _photo(Path(catalog["sku-1"]), 90)
    _photo(Path(catalog["sku-5"]), 91)
    catalog["sku-new"] = _photo(tmp_path / "photos" / "sku-new.jpg", 92)
    day2 = _config(tmp_path, _manifest(tmp_path / "day2.parquet", catalog))

    billed = billed_by_run(server, day2)

    widths = cutout_widths(day2)
    assert billed == 3
    assert (widths["sku-1"], widths["sku-5"], widths["sku-new"]) == (90, 91, 92)
    assert widths["sku-0"] == 50
    assert {row["removebg_status_code"] for row in enriched_rows(day2).values()} == {200}


def test_the_same_manifest_under_another_file_name_bills_nothing(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 6)
    billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "monday.parquet", catalog)))

    billed = billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "tuesday.parquet", catalog)))

    assert billed == 0


def test_a_reused_row_says_so_with_status_200_and_durable_outputs(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 2)
    first = _config(tmp_path, _manifest(tmp_path / "a.parquet", catalog))
    billed_by_run(server, first)
    second = _config(tmp_path, _manifest(tmp_path / "b.parquet", catalog))

    billed_by_run(server, second)

    row = enriched_rows(second)["sku-0"]
    assert row["removebg_status_code"] == 200
    assert "reused from the result store" in str(row["removebg_status_text"])
    assert row["removebg_attempts"] == 0
    assert row["removebg_output_url"] == enriched_rows(first)["sku-0"]["removebg_output_url"]
    assert row["removebg_source_fingerprint"] == enriched_rows(first)["sku-0"]["removebg_source_fingerprint"]
    assert Path(str(row["removebg_output_url"])).is_file()


def test_a_changed_photo_at_the_same_path_is_sent_again_and_gets_the_new_cutout(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 3)
    config = _config(tmp_path, _manifest(tmp_path / "catalog.parquet", catalog))
    billed_by_run(server, config)
    _photo(Path(catalog["sku-2"]), 99)

    billed = billed_by_run(server, config)

    assert billed == 1
    assert cutout_widths(config)["sku-2"] == 99


def test_a_photo_changed_back_is_never_served_the_cutout_that_overwrote_it(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 1)
    config = _config(tmp_path, _manifest(tmp_path / "catalog.parquet", catalog))
    billed_by_run(server, config)
    _photo(Path(catalog["sku-0"]), 77)
    billed_by_run(server, config)
    _photo(Path(catalog["sku-0"]), 50)

    billed_by_run(server, config)

    assert cutout_widths(config)["sku-0"] == 50


def test_another_product_with_an_earlier_photo_gets_that_photo_s_cutout_not_the_overwriting_one(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 1)
    original = Path(catalog["sku-0"]).read_bytes()
    billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "day1.parquet", catalog)))
    _photo(Path(catalog["sku-0"]), 77)
    billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "day2.parquet", catalog)))
    other = tmp_path / "photos" / "other.jpg"
    other.write_bytes(original)
    day3 = _config(tmp_path, _manifest(tmp_path / "day3.parquet", {**catalog, "sku-other": str(other)}))

    billed_by_run(server, day3)

    assert cutout_widths(day3) == {"sku-0": 77, "sku-other": 50}


def test_reversed_rows_bill_nothing_on_a_rerun(server: LocalApiServer, tmp_path: Path) -> None:
    catalog = _catalog(tmp_path / "photos", 12)
    billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "m.parquet", catalog)))
    reversed_catalog = dict(reversed(catalog.items()))

    billed = billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "m.parquet", reversed_catalog)))

    assert billed == 0


def test_another_shard_size_bills_nothing_on_a_rerun(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "m.parquet", _catalog(tmp_path / "photos", 12))
    billed_by_run(server, _config(tmp_path, manifest, shard_size=4))

    billed = billed_by_run(server, _config(tmp_path, manifest, shard_size=5))

    assert billed == 0


def test_a_relative_spelling_of_the_manifest_and_photos_bills_nothing_on_a_rerun(
    server: LocalApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = _catalog(tmp_path / "photos", 4)
    manifest = _manifest(tmp_path / "m" / "x.parquet", catalog)
    billed_by_run(server, _config(tmp_path, manifest))
    monkeypatch.chdir(tmp_path)
    relative = {sku: "./" + os.path.relpath(path, tmp_path) for sku, path in catalog.items()}
    _manifest(tmp_path / "m" / "x.parquet", relative)

    billed = billed_by_run(server, _config(tmp_path, "./m/x.parquet", output_prefix="./cutouts"))

    assert billed == 0


def test_a_trailing_slash_on_the_output_prefix_bills_nothing_on_a_rerun(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path / "m.parquet", _catalog(tmp_path / "photos", 4))
    billed_by_run(server, _config(tmp_path, manifest))

    billed = billed_by_run(server, _config(tmp_path, manifest, output_prefix=f"{tmp_path / 'cutouts'}/"))

    assert billed == 0


def test_an_unwritable_output_manifest_is_refused_before_billing_and_the_corrected_run_bills_each_image_once(
    server: LocalApiServer, tmp_path: Path
) -> None:
    """Before: everything billed, then the write failed, and the corrected run billed it all again."""
    manifest = _manifest(tmp_path / "m.parquet", _catalog(tmp_path / "photos", 4))
    (tmp_path / "a-file").write_text("not a folder")
    unwritable = _config(tmp_path, manifest, output_manifest_uri=str(tmp_path / "a-file" / "e.parquet"))
    with pytest.raises(ManifestError, match="cannot write the output manifest"):
        billed_by_run(server, unwritable)

    billed = billed_by_run(server, _config(tmp_path, manifest))

    assert billed == 4


def test_without_the_cache_every_row_is_sent_again(server: LocalApiServer, tmp_path: Path) -> None:
    catalog = _catalog(tmp_path / "photos", 3)
    billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "a.parquet", catalog)))

    billed = billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "b.parquet", catalog), cache=False))

    assert billed == 3


def test_other_removal_options_are_another_result_and_are_sent(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 2)
    billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "a.parquet", catalog)))

    billed = billed_by_run(
        server, _config(tmp_path, _manifest(tmp_path / "b.parquet", catalog), binary_mask=True)
    )

    assert billed == 2


def test_a_fingerprint_column_value_that_changed_sends_the_row_again(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 3)
    day1 = _manifest(tmp_path / "day1.parquet", catalog, image_md5=["a", "b", "c"])
    billed_by_run(server, _config(tmp_path, day1, fingerprint_column="image_md5"))
    day2 = _manifest(tmp_path / "day2.parquet", catalog, image_md5=["a", "b2", "c"])

    billed = billed_by_run(server, _config(tmp_path, day2, fingerprint_column="image_md5"))

    assert billed == 1


def test_a_fingerprint_column_is_trusted_instead_of_the_image_bytes(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 2)
    updated = ["2024-06-01", "2024-06-01"]
    billed_by_run(
        server, _config(tmp_path, _manifest(tmp_path / "a.parquet", catalog, image_updated_at=updated))
    )
    _photo(Path(catalog["sku-0"]), 88)
    day2 = _config(
        tmp_path,
        _manifest(tmp_path / "b.parquet", catalog, image_updated_at=updated),
        fingerprint_column="image_updated_at",
    )

    billed = billed_by_run(server, day2)

    assert billed == 2
    assert cutout_widths(day2)["sku-0"] == 88


def test_one_cache_prefix_serves_runs_writing_to_dated_output_prefixes(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _manifest(tmp_path / "m.parquet", _catalog(tmp_path / "photos", 3))
    shared = str(tmp_path / "store")
    billed_by_run(
        server, _config(tmp_path, manifest, output_prefix=str(tmp_path / "2024-06-01"), cache_prefix=shared)
    )
    day2 = _config(
        tmp_path,
        manifest,
        output_prefix=str(tmp_path / "2024-06-02"),
        output_manifest_uri=str(tmp_path / "e2.parquet"),
        cache_prefix=shared,
    )

    billed = billed_by_run(server, day2)

    rows = enriched_rows(day2)
    assert billed == 0
    assert rows["sku-1"]["removebg_output_url"] == str(tmp_path / "2024-06-02" / "sku-1.png")
    assert cutout_widths(day2) == {"sku-0": 50, "sku-1": 51, "sku-2": 52}


def test_skip_existing_sends_a_product_whose_photo_changed_at_the_same_path(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 3)
    billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "day1.parquet", catalog)))
    _photo(Path(catalog["sku-0"]), 95)
    with pytest.warns(FutureWarning, match="skip_existing is deprecated"):
        day2 = _config(tmp_path, _manifest(tmp_path / "day2.parquet", catalog), skip_existing=True)

    billed = billed_by_run(server, day2)

    assert billed == 1
    assert cutout_widths(day2)["sku-0"] == 95


def test_dry_run_counts_rows_the_store_would_serve_as_reused_not_billable(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 4)
    billed_by_run(server, _config(tmp_path, _manifest(tmp_path / "a.parquet", catalog)))
    catalog["sku-new"] = _photo(tmp_path / "photos" / "sku-new.jpg", 70)
    config = _config(tmp_path, _manifest(tmp_path / "b.parquet", catalog))

    estimate = pipeline.estimate_billing(pipeline.plan(config, Storage()), Storage())

    assert (estimate.reused, estimate.billable) == (4, 1)


def test_the_store_on_s3_serves_a_renamed_manifest_without_billing(
    server: LocalApiServer, s3_store: ObjectStore
) -> None:
    catalog = {}
    for i in range(20):
        uri = s3_store.uri(f"photos/sku-{i}.jpg")
        s3_store.storage.write_bytes(uri, sample_photo(50 + i, _HEIGHT, "JPEG"))
        catalog[f"sku-{i}"] = uri

    def config(name: str) -> pipeline.PipelineConfig:
        manifest = s3_store.uri(f"manifests/{name}.parquet")
        table = pa.table({"sku": list(catalog), "image_url": list(catalog.values())})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        s3_store.storage.write_bytes(manifest, sink.getvalue().to_pybytes())
        return dataclasses.replace(
            _config(Path("unused"), manifest, output_prefix=s3_store.uri("cutouts")),
            output_manifest_uri=s3_store.uri(f"enriched/{name}.parquet"),
            shard_size=20,
        )

    first = billed_by_run(server, config("monday"), s3_store.storage)
    s3_store.storage.write_bytes(catalog["sku-3"], sample_photo(97, _HEIGHT, "JPEG"))

    second = billed_by_run(server, config("tuesday"), s3_store.storage)

    assert (first, second) == (20, 1)


def _two_runs_at_once(
    tmp_path: Path, make_config: object, storage: Storage, count: int
) -> tuple[int, list[int]]:
    """Run the config twice side by side against a server holding the first request: (billed, succeeded)."""
    gate = _FirstRemovalWaitsForASecond(seconds=10)
    with start_api_server(tmp_path / "server", wrap_app=gate.wrap) as server:
        config = make_config()  # type: ignore[operator]

        def run(_: int) -> pipeline.RunSummary:
            with RemoveBgClient(
                server.base_url, server.token, **config.resolved().client_settings()
            ) as client:
                return pipeline.run(config, client, storage)

        with ThreadPoolExecutor(2) as pool:
            summaries = list(pool.map(run, range(2)))
        return int(server.stats()["records_billed"]), [summary.succeeded for summary in summaries]


def test_two_runs_of_one_manifest_at_once_bill_each_image_once_and_both_finish_every_row(
    tmp_path: Path,
) -> None:
    manifest = _manifest(tmp_path / "m.parquet", _catalog(tmp_path / "photos", 6))

    billed, succeeded = _two_runs_at_once(
        tmp_path, lambda: _config(tmp_path, manifest, shard_size=6, max_records_per_request=6), Storage(), 6
    )

    assert (billed, succeeded) == (6, [6, 6])


def test_two_runs_at_once_over_a_store_on_s3_bill_each_image_once(
    s3_store: ObjectStore, tmp_path: Path
) -> None:
    catalog = {}
    for i in range(4):
        catalog[f"sku-{i}"] = s3_store.uri(f"photos/sku-{i}.jpg")
        s3_store.storage.write_bytes(catalog[f"sku-{i}"], sample_photo(50 + i, _HEIGHT, "JPEG"))
    manifest = _manifest(tmp_path / "m.parquet", catalog)

    def config() -> pipeline.PipelineConfig:
        return _config(
            tmp_path, manifest, shard_size=4, max_records_per_request=4, cache_prefix=s3_store.uri("store")
        )

    billed, succeeded = _two_runs_at_once(tmp_path, config, s3_store.storage, 4)

    assert (billed, succeeded) == (4, [4, 4])


def test_an_image_claimed_by_a_process_that_died_is_sent_without_waiting_for_the_lease(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 2)
    config = _config(tmp_path, _manifest(tmp_path / "m.parquet", catalog)).resolved()
    source = Storage().fingerprints([catalog["sku-0"]])[catalog["sku-0"]]
    assert source is not None
    key = result_key(source, config)
    claim = (
        "from removebg_provider.pipeline.store import ResultStore\n"
        "from removebg_provider.storage import Storage\n"
        f"assert ResultStore({config.store_prefix!r}, Storage(), 'a dead run').claim({key!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", claim], check=True, env=env)
    assert Path(ResultStore(str(config.store_prefix), Storage(), "probe").claim_uri(key)).is_file()

    billed = billed_by_run(server, config)

    assert billed == 2


def test_an_image_url_whose_body_changed_is_sent_again_and_an_unchanged_one_is_not(tmp_path: Path) -> None:
    # This file server answers no HEAD (501), so the fingerprint falls back to a hash of the body.
    # It listens on 127.0.0.1: the run may describe its images only when private URLs are allowed.
    with _two_photos_served(tmp_path, etags=False) as (images, server, catalog):
        day1 = _manifest(tmp_path / "day1.parquet", catalog)
        billed_by_run(server, _config(tmp_path, day1, allow_private_urls=True))
        images.files["a.jpg"] = sample_photo(80, _HEIGHT, "JPEG")
        day2 = _config(tmp_path, _manifest(tmp_path / "day2.parquet", catalog), allow_private_urls=True)

        billed = billed_by_run(server, day2)

    assert billed == 1
    assert cutout_widths(day2) == {"sku-a": 80, "sku-b": 51}


def test_an_image_url_is_described_by_the_etag_of_a_head_request_when_the_server_gives_one(
    tmp_path: Path,
) -> None:
    with _two_photos_served(tmp_path, etags=True) as (images, server, catalog):
        day1 = _manifest(tmp_path / "day1.parquet", catalog)
        billed_by_run(server, _config(tmp_path, day1, allow_private_urls=True))
        images.files["b.jpg"] = sample_photo(81, _HEIGHT, "JPEG")
        day2 = _config(tmp_path, _manifest(tmp_path / "day2.parquet", catalog), allow_private_urls=True)

        billed = billed_by_run(server, day2)

    assert billed == 1
    assert sorted(images.heads) == ["/a.jpg", "/a.jpg", "/b.jpg", "/b.jpg"]
    assert str(enriched_rows(day2)["sku-a"]["removebg_source_fingerprint"]).startswith("etag:")
    assert cutout_widths(day2) == {"sku-a": 50, "sku-b": 81}


def test_image_urls_at_private_addresses_are_not_requested_by_the_run_unless_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The image host listens on 127.0.0.1, as the metadata service or an intranet host would be
    # reachable from a worker. The local API server may fetch it (its own rule is tested elsewhere);
    # the run itself must not send it a HEAD or a GET to describe the images.
    with _two_photos_served(tmp_path, etags=True) as (images, server, catalog):
        config = _config(tmp_path, _manifest(tmp_path / "day1.parquet", catalog))

        billed = billed_by_run(server, config)

    assert billed == 2
    assert images.heads == []
    # One GET per image: the API server's fetch, none from the run.
    assert len(images.ranges) == 2
    rows = enriched_rows(config)
    assert {sku: row["removebg_status_code"] for sku, row in rows.items()} == {"sku-a": 200, "sku-b": 200}
    assert all(row["removebg_source_fingerprint"] is None for row in rows.values())
    assert "2 image URL(s) not described" in caplog.text


def test_an_image_url_described_by_its_body_is_another_image_than_the_same_bytes_elsewhere(
    tmp_path: Path,
) -> None:
    # The run hashes what it GETs, but the API fetches the URL again: its server may answer the API
    # with other bytes. What the hash vouches for is that URL, never a file with those bytes.
    photo = sample_photo(50, _HEIGHT, "JPEG")
    local = tmp_path / "a.jpg"
    local.write_bytes(photo)
    with serve_files({"a.jpg": photo}) as images:
        url = f"{images.base_url}/a.jpg"

        found = Storage().fingerprints([url, str(local)], allow_private_urls=True)

    assert found[url] is not None
    assert found[str(local)] is not None
    assert found[url] != found[str(local)]


def test_a_warning_about_an_image_url_shows_neither_its_password_nor_its_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "http://catalog:hunter2@127.0.0.1:9/photos/a.jpg?X-Amz-Signature=feedface"

    found = Storage().fingerprints([url])

    assert found == {url: None}
    assert "127.0.0.1:9/photos/a.jpg" in caplog.text
    assert "hunter2" not in caplog.text
    assert "feedface" not in caplog.text


def test_a_warning_about_an_image_url_shows_no_query_of_the_url_it_redirected_to(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The host redirects to a presigned URL (the signature is the host's secret) that cannot be reached.
    unreachable = socket.socket()
    unreachable.bind(("127.0.0.1", 0))
    dead_port = unreachable.getsockname()[1]
    unreachable.close()

    class RedirectToPresigned(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{dead_port}/a.jpg?X-Amz-Signature=feedface")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), RedirectToPresigned)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/photos/a.jpg"

        found = Storage().fingerprints([url], allow_private_urls=True)
    finally:
        server.shutdown()
        server.server_close()

    assert found == {url: None}
    assert f"127.0.0.1:{dead_port}/a.jpg" in caplog.text
    assert "feedface" not in caplog.text


def test_a_key_the_store_does_not_hold_costs_one_request_on_each_object_store(
    object_store: ObjectStore, store_server: StoreServer
) -> None:
    requests_sent: list[str] = []
    store = ResultStore(object_store.uri("cache"), store_server.counted_storage(requests_sent), "probe")

    found = store.get("cd" * 20)

    assert found is None
    # Only those naming the entry: google-cloud-storage also fetches the bucket's metadata once.
    assert len([url for url in requests_sent if "cd" * 20 in url]) == 1


def test_a_stored_entry_whose_output_has_no_recorded_version_is_not_current(tmp_path: Path) -> None:
    # A store entry planted by hand, pointing at a URL whose version cannot be read (none at all):
    # serving it would copy whatever that URL gives.
    store = ResultStore(str(tmp_path / "store"), Storage(), "probe")
    planted = StoredResult.from_json(
        {
            "key": "ef" * 20,
            "source_fingerprint": "column:planted",
            "outputs": {
                "cutout": {"uri": "http://127.0.0.1:9/latest/meta-data", "version": None, "sha256": ""}
            },
            "stored_at": "2026-01-01T00:00:00+00:00",
        }
    )

    assert store.is_current(planted) is False


def test_a_device_or_an_oversized_image_gets_no_fingerprint_and_fails_alone_with_422(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _catalog(tmp_path / "photos", 1)
    big = tmp_path / "photos" / "big.jpg"
    big.write_bytes(sample_photo(50, _HEIGHT, "JPEG") + b"\0" * 200_000)
    catalog.update({"sku-device": "/dev/zero", "sku-big": str(big)})
    config = _config(
        tmp_path, _manifest(tmp_path / "m.parquet", catalog), max_image_bytes=100_000, max_failed_fraction=1.0
    )

    billed_by_run(server, config)

    rows = enriched_rows(config)
    assert {sku: row["removebg_status_code"] for sku, row in rows.items()} == {
        "sku-0": 200,
        "sku-device": 422,
        "sku-big": 422,
    }
    assert rows["sku-device"]["removebg_source_fingerprint"] is None
    assert rows["sku-big"]["removebg_source_fingerprint"] is None
