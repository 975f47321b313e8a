"""The manifest pipeline end to end against the real local API server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.errors import (
    BudgetExceededError,
    ConfigurationError,
    FailurePolicyError,
    ManifestError,
)
from removebg_provider.manifest import RESULT_SCHEMA
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus
from support.fake_time import FakeClock
from support.replay_server import echo_ok, serve_replays
from support.runs import CopierKilledBeforeCopying, pipeline_config, run_pipeline
from support.servers import LocalApiServer, sample_photo, start_api_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture
def billed(server: LocalApiServer) -> None:
    server.reset_stats()


FAST_PATH = "/removebg/fast/removebg"


def _photos(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"product-{index}.jpg"
        path.write_bytes(sample_photo(80 + index, 64, "JPEG"))
        paths.append(str(path))
    return paths


def _write_manifest(path: Path, columns: dict[str, list[object]]) -> str:
    table = pa.table(columns)
    if path.suffix == ".csv":
        pa_csv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return str(path)


def _enriched(config: pipeline.PipelineConfig) -> pa.Table:
    if config.output_manifest_uri.endswith(".csv"):
        return pa_csv.read_csv(config.output_manifest_uri)
    return pq.read_table(config.output_manifest_uri)


@pytest.mark.usefixtures("billed")
def test_every_row_appears_once_with_input_columns_first_then_results(
    server: LocalApiServer, tmp_path: Path
) -> None:
    images = _photos(tmp_path / "photos", 10)
    manifest = _write_manifest(
        tmp_path / "m.parquet", {"sku": [f"sku-{i}" for i in range(10)], "image_url": images}
    )
    config = pipeline_config(tmp_path, manifest, id_column="sku")

    summary = run_pipeline(server, config)

    table = _enriched(config)
    assert table.column_names == ["sku", "image_url", *RESULT_SCHEMA.names]
    assert table.column("sku").to_pylist() == [f"sku-{i}" for i in range(10)]
    assert table.column("removebg_status_code").to_pylist() == [200] * 10
    assert summary.rows == 10
    assert summary.succeeded == 10


@pytest.mark.usefixtures("billed")
def test_outputs_are_rgba_png_cutouts_plus_requested_mask_and_white_background(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _write_manifest(tmp_path / "m.csv", {"image_url": _photos(tmp_path / "photos", 3)})
    config = pipeline_config(tmp_path, manifest, binary_mask=True, white_background=True)

    run_pipeline(server, config)

    for row in _enriched(config).to_pylist():
        assert Image.open(row["removebg_output_url"]).mode == "RGBA"
        assert Image.open(row["removebg_output_url_mask"]).format == "JPEG"
        assert Image.open(row["removebg_output_url_whitebg"]).mode == "RGB"
        assert row["removebg_output_url"].startswith(str(tmp_path / "cutouts"))


@pytest.mark.usefixtures("billed")
def test_outputs_not_requested_are_null(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 2)})
    config = pipeline_config(tmp_path, manifest)

    run_pipeline(server, config)

    table = _enriched(config)
    assert table.column("removebg_output_url_mask").null_count == 2
    assert table.column("removebg_output_url_whitebg").null_count == 2


@pytest.mark.usefixtures("billed")
def test_csv_manifest_gives_csv_enriched_manifest_with_text_ids_kept(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.csv"
    images = _photos(tmp_path / "photos", 2)
    manifest.write_text(f"sku,image_url\n00017,{images[0]}\n00018,{images[1]}\n")
    config = pipeline_config(
        tmp_path, str(manifest), id_column="sku", output_manifest_uri=str(tmp_path / "e.csv")
    )

    run_pipeline(server, config)

    text = (tmp_path / "e.csv").read_text()
    assert '"00017"' in text
    assert Path(tmp_path / "cutouts" / "00017.png").is_file()


def test_a_rerun_bills_no_row_that_already_succeeded(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 9)})
    config = pipeline_config(tmp_path, manifest)
    server.reset_stats()

    run_pipeline(server, config)
    run_pipeline(server, config)

    assert server.stats()["records_billed"] == 9


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


def test_an_interrupted_run_resumes_without_billing_finished_batches_again(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 12)})
    config = pipeline_config(tmp_path, manifest, concurrency=1)
    server.reset_stats()
    with (
        pytest.raises(KeyboardInterrupt),
        _CrashAfter(server.base_url, server.token, batches=2) as crashing,
    ):
        pipeline.run(config, crashing, Storage())
    billed_before_crash = server.stats()["records_billed"]

    summary = run_pipeline(server, config)

    assert 0 < billed_before_crash < 12
    assert server.stats()["records_billed"] == 12
    assert summary.succeeded == 12


def _answer_then_die(server: LocalApiServer, config: pipeline.PipelineConfig) -> None:
    """Send every row of a one-shard manifest, then die before any output is copied."""
    storage = Storage()
    planned = pipeline.plan(config, storage)
    assert len(planned.shards) == 1
    with (
        pytest.raises(KeyboardInterrupt),
        RemoveBgClient(server.base_url, server.token) as client,
    ):
        pipeline.process_shard(
            planned.shards[0], planned, client, storage, copier=CopierKilledBeforeCopying(storage)
        )


def _answer_files(config: pipeline.PipelineConfig) -> list[Path]:
    return sorted(Path(config.staging, "checkpoints").glob("shard-*/answer-*.jsonl"))


def test_rows_answered_before_an_interruption_are_finished_by_copying_without_billing_again(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 3)})
    config = pipeline_config(tmp_path, manifest, shard_size=3)
    server.reset_stats()
    _answer_then_die(server, config)
    billed_before = server.stats()["records_billed"]

    summary = run_pipeline(server, config)

    rows = _enriched(config).to_pylist()
    assert billed_before == 3
    assert server.stats()["records_billed"] == 3
    assert (summary.succeeded, summary.billed_records) == (3, 0)
    assert all("copied from an earlier answer" in row["removebg_status_text"] for row in rows)
    assert all(Image.open(row["removebg_output_url"]).mode == "RGBA" for row in rows)


def test_dry_run_counts_answered_but_not_copied_rows_as_copy_only_not_billable(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 5)})
    config = pipeline_config(tmp_path, manifest, shard_size=5, max_records_per_request=5, concurrency=1)
    _answer_then_die(server, config)

    estimate = pipeline.estimate_billing(pipeline.plan(config, Storage()), Storage())

    assert (estimate.copy_only, estimate.billable) == (5, 0)


def test_answered_rows_whose_temporary_outputs_expired_get_410_then_are_sent_again_on_the_next_run(
    tmp_path: Path,
) -> None:
    clock = FakeClock(start=1_000_000.0)
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 3)})
    config = pipeline_config(tmp_path, manifest, shard_size=3, max_failed_fraction=1.0)
    with start_api_server(tmp_path / "server", clock=clock.now) as server:
        _answer_then_die(server, config)
        clock.sleep(25 * 3600)
        server.reset_stats()

        copied = run_pipeline(server, config)
        billed_on_copy = server.stats()["records_billed"]
        codes_after_copy = _enriched(config).column("removebg_status_code").to_pylist()
        resent = run_pipeline(server, config)

        assert billed_on_copy == 0
        assert codes_after_copy == [410, 410, 410]
        assert (copied.succeeded, resent.succeeded) == (0, 3)
        assert server.stats()["records_billed"] == 3


def test_an_answer_older_than_23_hours_is_sent_again_not_copied(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 3)})
    config = pipeline_config(tmp_path, manifest, shard_size=3)
    _answer_then_die(server, config)
    (answer,) = _answer_files(config)
    header, *lines = answer.read_text().splitlines()
    stamp = datetime.now(timezone.utc) - timedelta(hours=23, minutes=1)
    answer.write_text(
        "\n".join([json.dumps({**json.loads(header), "answered_at": stamp.isoformat()}), *lines])
    )
    server.reset_stats()

    summary = run_pipeline(server, config)

    assert (summary.succeeded, summary.billed_records) == (3, 3)
    assert server.stats()["records_billed"] == 3


class _CountingClient(RemoveBgClient):
    """A real client that records the most requests it ever had in flight at once, and their order."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.in_flight = 0
        self.most_in_flight = 0
        self.sent_ids: list[str] = []
        self._lock = threading.Lock()

    def remove_batch(self, records, options=None):  # type: ignore[no-untyped-def]
        with self._lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.sent_ids.extend(record.id for record in records)
        try:
            return super().remove_batch(records, options or pipeline.RemovalOptions())
        finally:
            with self._lock:
                self.in_flight -= 1


@pytest.mark.usefixtures("billed")
def test_requests_in_flight_never_exceed_concurrency_while_other_workers_copy(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 12)})
    config = pipeline_config(tmp_path, manifest, shard_size=12, max_records_per_request=1, concurrency=2)

    with _CountingClient(server.base_url, server.token) as client:
        summary = pipeline.run(config, client, Storage())

    assert summary.succeeded == 12
    assert client.most_in_flight == 2


@pytest.mark.usefixtures("billed")
def test_a_run_sends_one_shards_batches_together_then_the_next_shards(
    server: LocalApiServer, tmp_path: Path
) -> None:
    # Shards side by side whose batches took turns would all reach their last, partly idle round
    # together; queued shard after shard, the next shard's batches keep the slots busy instead.
    ids = [f"p{index:02d}" for index in range(24)]
    manifest = _write_manifest(
        tmp_path / "m.parquet", {"sku": ids, "image_url": _photos(tmp_path / "photos", 24)}
    )
    config = pipeline_config(
        tmp_path, manifest, id_column="sku", shard_size=12, max_records_per_request=1, concurrency=1
    )

    with _CountingClient(server.base_url, server.token) as client:
        summary = pipeline.run(config, client, Storage())

    assert summary.succeeded == 24
    shard_of_each_request = [ids.index(sent) // 12 for sent in client.sent_ids]
    turns = sum(1 for before, after in itertools.pairwise(shard_of_each_request) if before != after)
    # One turn from the first shard to the second; the two workers of the one slot may swap the
    # last batch of one shard and the first of the next.
    assert turns <= 3, shard_of_each_request


class _StorageHoldingOutputs(Storage):
    """Local storage whose writes of some rows' cutouts wait until `release` is set (at most 30 s)."""

    def __init__(self, held_ids: set[str], release: threading.Event) -> None:
        super().__init__()
        self.held_ids = held_ids
        self.release = release
        self.released_in_time: list[bool] = []

    def write_bytes(self, uri: str, data: bytes) -> None:
        if Path(uri).name.split(".")[0] in self.held_ids and "/cutouts/" in uri:
            self.released_in_time.append(self.release.wait(timeout=30))
        super().write_bytes(uri, data)


class _ClientNoticing(RemoveBgClient):
    """A real client that sets `noticed` once it sends one of `ids`."""

    def __init__(self, *args: object, ids: set[str], noticed: threading.Event, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ids = ids
        self.noticed = noticed

    def remove_batch(self, records, options=None):  # type: ignore[no-untyped-def]
        if any(record.id in self.ids for record in records):
            self.noticed.set()
        return super().remove_batch(records, options or pipeline.RemovalOptions())


@pytest.mark.usefixtures("billed")
def test_a_run_sends_the_next_shards_requests_while_earlier_shards_still_copy(
    server: LocalApiServer, tmp_path: Path
) -> None:
    # The last copies of the first two shards wait for a request of the third: a run that read
    # its next shard only once an earlier shard was done would leave the API idle here (and the
    # held copies would wait out their 30 s).
    ids = [f"p{index:02d}" for index in range(12)]
    manifest = _write_manifest(
        tmp_path / "m.parquet", {"sku": ids, "image_url": _photos(tmp_path / "photos", 12)}
    )
    config = pipeline_config(
        tmp_path, manifest, id_column="sku", shard_size=4, max_records_per_request=1, concurrency=1
    )
    third_shard_sent = threading.Event()
    storage = _StorageHoldingOutputs({"p03", "p07"}, third_shard_sent)

    with _ClientNoticing(server.base_url, server.token, ids=set(ids[8:]), noticed=third_shard_sent) as client:
        summary = pipeline.run(config, client, storage)

    assert summary.succeeded == 12
    assert storage.released_in_time == [True, True]


@pytest.mark.usefixtures("billed")
def test_rows_with_the_same_image_are_sent_once_and_share_the_result(
    server: LocalApiServer, tmp_path: Path
) -> None:
    images = _photos(tmp_path / "photos", 3)
    manifest = _write_manifest(
        tmp_path / "m.parquet",
        {
            "sku": ["a", "b", "c", "d", "e"],
            "image_url": [images[0], images[1], images[0], images[2], images[0]],
        },
    )
    config = pipeline_config(tmp_path, manifest, id_column="sku")

    summary = run_pipeline(server, config)

    rows = _enriched(config).to_pylist()
    assert server.stats()["records_billed"] == 3
    assert summary.succeeded == 5
    assert rows[2]["removebg_output_url"] == rows[0]["removebg_output_url"]
    assert rows[4]["removebg_output_url"] == rows[0]["removebg_output_url"]


def _same_bytes_manifest(tmp_path: Path) -> str:
    """Five rows, one shard: two photos, each also saved under other names (identical bytes)."""
    first, second = _photos(tmp_path / "photos", 2)
    copies = [tmp_path / "photos" / "copy-a.jpg", tmp_path / "photos" / "copy-b.jpg"]
    copies[0].write_bytes(Path(first).read_bytes())
    copies[1].write_bytes(Path(first).read_bytes())
    references = [first, second, str(copies[0]), str(copies[1]), second]
    return _write_manifest(tmp_path / "m.parquet", {"sku": list("abcde"), "image_url": references})


@pytest.mark.usefixtures("billed")
def test_rows_of_a_shard_with_identical_image_bytes_are_sent_once_and_share_the_result(
    server: LocalApiServer, tmp_path: Path
) -> None:
    # One batch: its rows are read in order, so the first row with the bytes ("a") owns them.
    config = pipeline_config(
        tmp_path, _same_bytes_manifest(tmp_path), id_column="sku", shard_size=5, max_records_per_request=5
    )

    summary = run_pipeline(server, config)

    rows = {row["sku"]: row for row in _enriched(config).to_pylist()}
    assert server.stats()["records_billed"] == 2
    assert (summary.succeeded, summary.billed_records) == (5, 2)
    assert (
        rows["c"]["removebg_output_url"]
        == rows["d"]["removebg_output_url"]
        == rows["a"]["removebg_output_url"]
    )
    assert "same image bytes as a" in rows["c"]["removebg_status_text"]
    assert (rows["c"]["removebg_attempts"], rows["d"]["removebg_attempts"]) == (0, 0)
    assert "same image as b" in rows["e"]["removebg_status_text"]


def test_a_rerun_bills_nothing_for_rows_that_shared_identical_bytes(
    server: LocalApiServer, tmp_path: Path
) -> None:
    config = pipeline_config(tmp_path, _same_bytes_manifest(tmp_path), id_column="sku", shard_size=5)
    run_pipeline(server, config)
    server.reset_stats()

    summary = run_pipeline(server, config)

    assert (summary.succeeded, summary.billed_records) == (5, 0)
    assert server.stats()["records_billed"] == 0


def test_dry_run_counts_billable_records_after_resume_and_duplicates(
    server: LocalApiServer, tmp_path: Path
) -> None:
    images = _photos(tmp_path / "photos", 6)
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": [*images, images[0], None]})
    config = pipeline_config(tmp_path, manifest)
    run_pipeline(
        server,
        pipeline_config(
            tmp_path,
            _write_manifest(tmp_path / "first.parquet", {"image_url": images[:2]}),
            staging_prefix=config.staging,
        ),
    )
    server.reset_stats()

    estimate = pipeline.estimate_billing(pipeline.plan(config, Storage()), Storage())

    assert estimate.to_dict() == {
        "rows": 8,
        "duplicates": 1,
        "resumed": 2,
        "copy_only": 0,
        "reused": 0,
        "without_reference": 1,
        "billable": 4,
    }
    assert server.stats()["records_billed"] == 0


def test_dry_run_after_a_partial_run_counts_only_what_is_left(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 9)})
    # One shard of three batches of 3: whichever request gets through first, it finishes 3 rows.
    config = pipeline_config(tmp_path, manifest, concurrency=1, shard_size=9)
    with pytest.raises(KeyboardInterrupt), _CrashAfter(server.base_url, server.token, batches=1) as crashing:
        pipeline.run(config, crashing, Storage())

    estimate = pipeline.estimate_billing(pipeline.plan(config, Storage()), Storage())

    assert (estimate.resumed, estimate.billable) == (3, 6)


@pytest.mark.usefixtures("billed")
def test_budget_stops_before_any_request_when_the_run_would_pass_it(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 5)})
    config = pipeline_config(tmp_path, manifest, max_billable_records=4)

    with pytest.raises(BudgetExceededError, match="needs 5 billable records"):
        run_pipeline(server, config)

    assert server.stats()["records_billed"] == 0


@pytest.mark.usefixtures("billed")
def test_skip_existing_keeps_existing_outputs_without_sending_them(
    server: LocalApiServer, tmp_path: Path
) -> None:
    images = _photos(tmp_path / "photos", 4)
    first = pipeline_config(tmp_path, _write_manifest(tmp_path / "day1.parquet", {"image_url": images[:3]}))
    run_pipeline(server, first)
    server.reset_stats()
    second = pipeline_config(
        tmp_path,
        _write_manifest(tmp_path / "day2.parquet", {"image_url": images}),
        output_manifest_uri=str(tmp_path / "day2-enriched.parquet"),
        skip_existing=True,
        resume=False,
    )

    run_pipeline(server, second)

    rows = _enriched(second).to_pylist()
    assert server.stats()["records_billed"] == 1
    assert [row["removebg_status_code"] for row in rows] == [200] * 4
    assert rows[0]["removebg_output_url"] == _enriched(first).to_pylist()[0]["removebg_output_url"]
    assert rows[0]["removebg_attempts"] == 0


@pytest.mark.usefixtures("billed")
def test_per_image_problems_become_row_statuses(server: LocalApiServer, tmp_path: Path) -> None:
    good = _photos(tmp_path / "photos", 2)
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is not a picture")
    manifest = _write_manifest(
        tmp_path / "m.parquet",
        {
            "sku": ["ok1", "none", "empty", "missing", "garbage", "ok2"],
            "image_url": [good[0], None, "", str(tmp_path / "nope.jpg"), str(not_an_image), good[1]],
        },
    )
    config = pipeline_config(tmp_path, manifest, id_column="sku", max_failed_fraction=1.0)

    run_pipeline(server, config)

    codes = {row["sku"]: row["removebg_status_code"] for row in _enriched(config).to_pylist()}
    assert codes["ok1"] == codes["ok2"] == 200
    assert codes["none"] == codes["empty"] == RowStatus.NO_REFERENCE
    assert codes["missing"] == RowStatus.UNREADABLE_IMAGE
    assert 400 <= codes["garbage"] < 500


@pytest.mark.usefixtures("billed")
def test_too_many_failed_rows_fail_the_run_after_writing_the_whole_manifest(
    server: LocalApiServer, tmp_path: Path
) -> None:
    good = _photos(tmp_path / "photos", 2)
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": [good[0], None, None, good[1]]})
    config = pipeline_config(tmp_path, manifest, max_failed_fraction=0.25)

    with pytest.raises(FailurePolicyError, match=r"2 of 4 rows failed.*no image reference"):
        run_pipeline(server, config)

    assert _enriched(config).num_rows == 4


def test_missing_image_column_is_a_clear_error_naming_the_manifest(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"url": ["a.jpg"]})

    with pytest.raises(ManifestError, match=r"m\.parquet has no column 'image_url'"):
        pipeline.plan(pipeline_config(tmp_path, manifest), Storage())


def test_duplicate_ids_are_refused_and_listed(tmp_path: Path) -> None:
    manifest = _write_manifest(
        tmp_path / "m.parquet", {"sku": ["a", "b", "a", "c", "b"], "image_url": ["1", "2", "3", "4", "5"]}
    )

    with pytest.raises(ManifestError, match=r"duplicate ids in column 'sku': 'a', 'b'"):
        pipeline.plan(pipeline_config(tmp_path, manifest, id_column="sku"), Storage())


def test_ids_that_collide_once_made_safe_are_refused(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"sku": ["a/b", "a_b"], "image_url": ["1", "2"]})

    with pytest.raises(ManifestError, match="same output key"):
        pipeline.plan(pipeline_config(tmp_path, manifest, id_column="sku"), Storage())


@pytest.mark.usefixtures("billed")
def test_unsafe_ids_write_inside_the_output_prefix(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _write_manifest(
        tmp_path / "m.parquet", {"sku": ["../../etc/passwd"], "image_url": _photos(tmp_path / "photos", 1)}
    )
    config = pipeline_config(tmp_path, manifest, id_column="sku")

    run_pipeline(server, config)

    output = Path(_enriched(config).column("removebg_output_url")[0].as_py())
    assert output.resolve().parent == (tmp_path / "cutouts").resolve()


def test_unreadable_manifest_is_a_clear_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")

    with pytest.raises(ManifestError, match=r"broken\.parquet"):
        pipeline.plan(pipeline_config(tmp_path, str(broken)), Storage())


def test_unknown_manifest_format_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"cannot tell the format of manifest .*m\.xlsx"):
        pipeline.plan(pipeline_config(tmp_path, str(tmp_path / "m.xlsx")), Storage())


def test_an_empty_manifest_succeeds_with_zero_rows(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = tmp_path / "empty.csv"
    manifest.write_text("image_url,sku\n")
    config = pipeline_config(tmp_path, str(manifest))

    summary = run_pipeline(server, config)

    assert summary.rows == 0
    assert _enriched(config).num_rows == 0


def test_plan_never_makes_more_shards_than_max_map_length(tmp_path: Path) -> None:
    manifest = _write_manifest(
        tmp_path / "m.parquet", {"image_url": [f"https://x.test/{i}.jpg" for i in range(50)]}
    )

    planned = pipeline.plan(pipeline_config(tmp_path, manifest, shard_size=2, max_map_length=7), Storage())

    assert len(planned.shards) <= 7
    assert sum(shard.rows for shard in planned.shards) == 50


def test_shard_descriptors_are_small_json_values(tmp_path: Path) -> None:
    manifest = _write_manifest(
        tmp_path / "m.parquet", {"image_url": [f"https://x.test/{i}.jpg" for i in range(9)]}
    )

    planned = pipeline.plan(pipeline_config(tmp_path, manifest), Storage())

    descriptor = planned.shards[0].to_dict()
    assert set(descriptor) == {"plan_uri", "index", "uri", "rows", "first_row"}
    assert pipeline.ShardDescriptor.from_dict(descriptor) == planned.shards[0]


def test_a_failed_enriched_manifest_write_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "enriched.parquet"
    storage = Storage()

    def write_half_then_fail() -> None:
        with storage.atomic_writer(str(target)) as stream:
            stream.write(b"partial")
            raise RuntimeError("disk went away")

    with pytest.raises(RuntimeError):
        write_half_then_fail()

    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("billed")
def test_progress_is_logged_with_rate_and_eta(
    server: LocalApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 4)})
    caplog.set_level(logging.INFO, logger="removebg_provider.progress")

    run_pipeline(server, pipeline_config(tmp_path, manifest))

    assert any("rows/s" in message and "ETA" in message for message in caplog.messages)


def test_http_references_go_to_the_api_as_urls(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": ["https://cdn.example.test/a.jpg"]})
    with serve_replays() as api:
        api.script(FAST_PATH, echo_ok)
        with RemoveBgClient(api.base_url) as client:
            pipeline.run(pipeline_config(tmp_path, manifest, max_failed_fraction=1.0), client, Storage())

        (sent,) = api.requests_to(FAST_PATH)
    (record,) = sent.json()["records"]
    assert record["_url"] == "https://cdn.example.test/a.jpg"
    assert "_base64" not in record


def test_enriched_manifest_round_trips_through_json_lines(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    images = _photos(tmp_path / "photos", 2)
    manifest.write_text(
        "".join(f'{{"image_url": "{path}", "price": {i}.5}}\n' for i, path in enumerate(images))
    )
    config = pipeline_config(tmp_path, str(manifest), output_manifest_uri=str(tmp_path / "e.jsonl"))

    run_pipeline(server, config)

    lines = (tmp_path / "e.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert '"price": 0.5' in lines[0]
    assert '"removebg_status_code": 200' in lines[0]


def test_output_cutouts_are_real_images_of_the_input_size(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 1)})
    config = pipeline_config(tmp_path, manifest)

    run_pipeline(server, config)

    row = _enriched(config).to_pylist()[0]
    with Image.open(io.BytesIO(Path(row["removebg_output_url"]).read_bytes())) as cutout:
        assert cutout.size == (row["removebg_width"], row["removebg_height"]) == (80, 64)


@pytest.mark.usefixtures("billed")
def test_every_cutout_gets_a_foreground_fraction_and_quality_flags(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 3)})
    config = pipeline_config(tmp_path, manifest)

    summary = run_pipeline(server, config)

    table = _enriched(config)
    fractions = table.column("removebg_foreground_fraction").to_pylist()
    assert all(0.05 < fraction < 0.95 for fraction in fractions)
    assert table.column("removebg_quality_flags").to_pylist() == [[], [], []]
    assert summary.by_flag == {}


@pytest.mark.usefixtures("billed")
def test_without_the_quality_check_cutouts_are_stored_with_empty_quality_columns(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 2)})
    config = pipeline_config(tmp_path, manifest, quality_check=False, report=False)

    summary = run_pipeline(server, config)

    table = _enriched(config)
    assert summary.succeeded == 2
    assert all(Path(uri).is_file() for uri in table.column("removebg_output_url").to_pylist())
    assert table.column("removebg_foreground_fraction").to_pylist() == [None, None]
    assert table.column("removebg_quality_flags").to_pylist() == [[], []]


@pytest.mark.usefixtures("billed")
def test_a_contact_sheet_report_is_written_next_to_the_enriched_manifest(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 2)})
    config = pipeline_config(tmp_path, manifest)

    summary = run_pipeline(server, config)

    assert summary.report_html_uri == str(tmp_path / "enriched.report.html")
    assert Path(summary.report_html_uri).read_text().count("data:image/") >= 2
    assert Image.open(str(summary.report_png_uri)).format == "PNG"


@pytest.mark.usefixtures("billed")
def test_csv_enriched_manifests_join_quality_flags_with_semicolons(
    server: LocalApiServer, tmp_path: Path
) -> None:
    photo = tmp_path / "full.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photo)
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": [str(photo)]})
    config = pipeline_config(tmp_path, manifest, output_manifest_uri=str(tmp_path / "e.csv"))

    run_pipeline(server, config)

    flags = pa_csv.read_csv(tmp_path / "e.csv").column("removebg_quality_flags").to_pylist()[0]
    assert isinstance(flags, str)
    assert flags


def test_the_summary_counts_records_billed_by_this_run_only(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 5)})
    config = pipeline_config(tmp_path, manifest)
    first = run_pipeline(server, config)

    second = run_pipeline(server, config)

    assert (first.billed_records, second.billed_records) == (5, 0)


def test_resume_finds_this_reference_among_checkpoints_of_other_references(
    server: LocalApiServer, tmp_path: Path
) -> None:
    photos = _photos(tmp_path / "photos", 3)
    moved = [str(Path(photo).with_name(f"moved-{Path(photo).name}")) for photo in photos]
    for old, new in zip(photos, moved, strict=True):
        Path(new).write_bytes(Path(old).read_bytes())
    ids = ["a", "b", "c"]
    config = pipeline_config(
        tmp_path, _write_manifest(tmp_path / "m.parquet", {"sku": ids, "image_url": photos}), id_column="sku"
    )
    run_pipeline(server, config)
    run_pipeline(
        server,
        dataclasses.replace(
            config, manifest_uri=_write_manifest(tmp_path / "m.parquet", {"sku": ids, "image_url": moved})
        ),
    )
    server.reset_stats()

    run_pipeline(server, config)

    assert server.stats()["records_billed"] == 0


def test_outputs_that_would_overwrite_input_images_are_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    photos = _photos(tmp_path / "photos", 2)
    manifest = _write_manifest(tmp_path / "m.parquet", {"sku": ["product-0", "b"], "image_url": photos})
    config = pipeline_config(tmp_path, manifest, id_column="sku", output_prefix=str(tmp_path / "photos"))
    config = dataclasses.replace(config, output_key_template="{id}{suffix}.jpg")

    with pytest.raises(ManifestError, match="would overwrite input images"):
        pipeline.plan(config, Storage())
    assert [Path(p).read_bytes()[:2] for p in photos] == [b"\xff\xd8"] * 2


def test_the_input_manifest_is_never_the_output_manifest(tmp_path: Path) -> None:
    manifest = _write_manifest(tmp_path / "m.parquet", {"image_url": _photos(tmp_path / "photos", 1)})

    with pytest.raises(ConfigurationError, match="is the input manifest"):
        pipeline_config(tmp_path, manifest, output_manifest_uri=f"{tmp_path}/./m.parquet")
