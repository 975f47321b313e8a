"""An output URL that answers 404 right after the API's answer is retried, then its record is requested again.

Real parts: the local API server under uvicorn, the fault proxy (tests/support/faults.py) in front of
it answering 404 to the first downloads of each record's outputs, real files. The server's /stats
counts what was billed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.downloads import Downloader
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus
from support.faults import FaultRates, start_fault_proxy
from support.runs import distinct_photos_manifest, pipeline_config
from support.servers import LocalApiServer, start_api_server

_ROWS = 10
_BATCH = 5
# Every download attempt of one output: a record whose first this-many downloads fail has its
# first answer's URL gone for good, and its second answer's URL fine.
_ATTEMPTS = Downloader().max_attempts


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server")) as s:
        yield s


# Ids in a column, two requests in flight, no failure policy: the statuses are what is checked.
_RUN = {"id_column": "sku", "max_records_per_request": _BATCH, "concurrency": 2, "max_failed_fraction": 1.0}


def _config(folder: Path) -> pipeline.PipelineConfig:
    return pipeline_config(folder, distinct_photos_manifest(folder, _ROWS)[0], settings=_RUN)


def _run_with_gone_downloads(
    server: LocalApiServer, folder: Path, gone: int
) -> tuple[pipeline.RunSummary, list[Any], int]:
    config = _config(folder)
    server.reset_stats()
    with (
        start_fault_proxy(server.base_url, FaultRates(gone_downloads_per_record=gone)) as proxy,
        RemoveBgClient(proxy.base_url, server.token, max_records_per_request=_BATCH, concurrency=2) as client,
    ):
        summary = pipeline.run(config, client, Storage())
    statuses = [row["removebg_status_code"] for row in pq.read_table(config.output_manifest_uri).to_pylist()]
    return summary, statuses, server.stats()["records_billed"]


def test_a_fresh_output_url_that_answers_404_at_first_is_copied_on_a_retry_without_a_new_request(
    server: LocalApiServer, tmp_path: Path
) -> None:
    summary, statuses, billed = _run_with_gone_downloads(server, tmp_path, gone=1)

    assert (statuses, billed, summary.billed_records) == ([200] * _ROWS, _ROWS, _ROWS)


def test_a_fresh_output_url_gone_after_its_retries_is_requested_again_once_and_counted_as_billed(
    server: LocalApiServer, tmp_path: Path
) -> None:
    summary, statuses, billed = _run_with_gone_downloads(server, tmp_path, gone=_ATTEMPTS)

    assert (statuses, billed, summary.billed_records) == ([200] * _ROWS, 2 * _ROWS, 2 * _ROWS)


def test_an_output_url_gone_again_after_the_second_request_gives_its_row_410(
    server: LocalApiServer, tmp_path: Path
) -> None:
    summary, statuses, billed = _run_with_gone_downloads(server, tmp_path, gone=2 * _ATTEMPTS)

    assert statuses == [RowStatus.OUTPUT_EXPIRED] * _ROWS
    assert (billed, summary.billed_records) == (2 * _ROWS, 2 * _ROWS)
