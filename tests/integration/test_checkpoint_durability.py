"""Staging files cut short (a crash mid-write, a partial copy) are read as far as they go, with a warning.

The empty and torn files are made by the test in the documented staging layout
(`<output-prefix>/_removebg_staging/<job>/checkpoints/shard-N/`, `results/shard-N.<run id>.jsonl`); the runs
are `removebg run` processes or the pipeline's public functions against the real local API server.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus
from support.servers import LocalApiServer, sample_photo, start_api_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server"), token="durable-token") as running:
        yield running


def _catalog(folder: Path, count: int) -> list[str]:
    """`removebg run` arguments for a manifest of `count` distinct photos, one request per run."""
    folder.mkdir()
    paths = []
    for index in range(count):
        path = folder / f"p{index}.png"
        path.write_bytes(sample_photo(48 + index, 40))
        paths.append(str(path))
    pq.write_table(pa.table({"image_url": paths}), folder / "manifest.parquet")
    return [
        str(folder / "manifest.parquet"),
        "--output-prefix",
        str(folder / "cutouts"),
        "--output-manifest",
        str(folder / "enriched.parquet"),
        "--batch-size",
        str(count),
        "--no-report",
        # The result store would serve what the checkpoints lose: these tests are about the checkpoints.
        "--no-cache",
    ]


def _removebg(server: LocalApiServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "removebg_provider",
            "run",
            "--endpoint",
            server.base_url,
            "--no-progress",
            *args,
        ],
        env={**os.environ, "REMOVEBG_API_TOKEN": server.token or ""},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _checkpoint_folder(output_prefix: Path) -> Path:
    (folder,) = output_prefix.glob("_removebg_staging/*/checkpoints/shard-00000")
    return folder


def _statuses(manifest: Path) -> list[int]:
    codes: list[int] = pq.read_table(manifest).column("removebg_status_code").to_pylist()
    return codes


def test_an_empty_checkpoint_in_staging_is_skipped_with_a_warning_naming_it(
    server: LocalApiServer, tmp_path: Path
) -> None:
    arguments = _catalog(tmp_path / "catalog", 3)
    assert _removebg(server, *arguments).returncode == 0
    empty = _checkpoint_folder(tmp_path / "catalog" / "cutouts") / "ckpt-crashed.jsonl"
    empty.write_bytes(b"")
    billed_before = server.stats()["records_billed"]

    rerun = _removebg(server, *arguments)

    assert rerun.returncode == 0, rerun.stderr
    assert f"{empty} is empty" in rerun.stderr
    assert server.stats()["records_billed"] == billed_before
    assert _statuses(tmp_path / "catalog" / "enriched.parquet") == [RowStatus.OK] * 3


def test_a_torn_last_line_is_warned_about_and_the_lines_before_it_are_used(
    server: LocalApiServer, tmp_path: Path
) -> None:
    arguments = _catalog(tmp_path / "catalog", 4)
    assert _removebg(server, *arguments).returncode == 0
    folder = _checkpoint_folder(tmp_path / "catalog" / "cutouts")
    # Only the API's answer is left, its last record cut in half: three rows can be copied from it.
    for finished in folder.glob("ckpt-*.jsonl"):
        finished.unlink()
    (answer,) = folder.glob("answer-*.jsonl")
    text = answer.read_text()
    answer.write_text(text[: text.rstrip("\n").rfind("\n") + 40])
    billed_before = server.stats()["records_billed"]

    rerun = _removebg(server, *arguments)

    assert rerun.returncode == 0, rerun.stderr
    assert f"{answer}: line 5 is torn" in rerun.stderr
    assert server.stats()["records_billed"] == billed_before + 1
    assert _statuses(tmp_path / "catalog" / "enriched.parquet") == [RowStatus.OK] * 4


def _processed_shard(server: LocalApiServer, folder: Path) -> tuple[pipeline.Plan, Path]:
    """A plan of three photos with its one shard processed; the shard's results file."""
    arguments = _catalog(folder, 3)
    config = pipeline.PipelineConfig(
        manifest_uri=arguments[0],
        output_prefix=str(folder / "cutouts"),
        output_manifest_uri=str(folder / "enriched.parquet"),
        report=False,
        max_failed_fraction=1.0,
    )
    planned = pipeline.plan(config, Storage())
    with RemoveBgClient(server.base_url, server.token, **planned.config.client_settings()) as client:
        pipeline.process_shard(planned.shards[0], planned, client, Storage())
    (results,) = (folder / "cutouts").glob("_removebg_staging/*/results/shard-00000.*.jsonl")
    return planned, results


def test_a_torn_shard_results_file_is_merged_as_far_as_it_goes_and_its_lost_rows_get_504(
    server: LocalApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    planned, results = _processed_shard(server, tmp_path / "catalog")
    text = results.read_text()
    results.write_text(text[: text.rstrip("\n").rfind("\n") + 40])

    with caplog.at_level(logging.WARNING):
        summary = pipeline.merge(planned, Storage())

    assert f"{results}: line 4 is torn" in caplog.text
    assert _statuses(tmp_path / "catalog" / "enriched.parquet") == [
        RowStatus.OK,
        RowStatus.OK,
        RowStatus.NOT_PROCESSED,
    ]
    assert summary.rows == 3


@pytest.mark.parametrize(("field", "unusable"), [("width", '"48"'), ("processed_at", '"not a date"')])
def test_a_shard_results_value_that_fits_no_manifest_column_skips_only_its_row(
    server: LocalApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, field: str, unusable: str
) -> None:
    planned, results = _processed_shard(server, tmp_path / "catalog")
    header, first, *others = results.read_text().splitlines()
    record = json.loads(first)
    broken = json.dumps({**record, field: None}).replace(f'"{field}": null', f'"{field}": {unusable}')
    results.write_text("\n".join([header, broken, *others]) + "\n")

    with caplog.at_level(logging.WARNING):
        summary = pipeline.merge(planned, Storage())

    assert f"{results}: skipped a line that is not a complete record" in caplog.text
    assert _statuses(tmp_path / "catalog" / "enriched.parquet") == [
        RowStatus.NOT_PROCESSED,
        RowStatus.OK,
        RowStatus.OK,
    ]
    assert summary.rows == 3


def test_bytes_that_are_not_utf8_in_shard_results_are_replaced_in_a_valid_manifest(
    server: LocalApiServer, tmp_path: Path
) -> None:
    planned, results = _processed_shard(server, tmp_path / "catalog")
    results.write_bytes(results.read_bytes().replace(b'"status_text": "OK"', b'"status_text": "OK \xff"', 1))

    pipeline.merge(planned, Storage())

    enriched = pq.read_table(tmp_path / "catalog" / "enriched.parquet")
    enriched.validate(full=True)
    assert enriched.column("removebg_status_text").to_pylist()[0] == "OK \ufffd"
    assert _statuses(tmp_path / "catalog" / "enriched.parquet") == [RowStatus.OK] * 3


def test_a_shard_results_file_whose_header_is_not_an_object_is_not_this_run_s(
    server: LocalApiServer, tmp_path: Path
) -> None:
    planned, results = _processed_shard(server, tmp_path / "catalog")
    _, *records = results.read_text().splitlines()
    results.write_text("\n".join(["[1, 2]", *records]) + "\n")

    summary = pipeline.merge(planned, Storage())

    assert _statuses(tmp_path / "catalog" / "enriched.parquet") == [RowStatus.NOT_PROCESSED] * 3
    assert summary.rows == 3
