"""Airflow's kill of a task: `on_kill` stops new requests, the requests in flight finish, the task fails.

Airflow's task runner calls `on_kill` from its SIGTERM handler while `execute` runs; here the test
calls it from its own thread while `execute` runs in another, against the real API server behind
the fault proxy, which holds the requests after the first one so the kill lands mid-run.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from airflow.sdk import BaseOperator

from removebg_provider import pipeline
from removebg_provider.errors import RunStoppedError
from removebg_provider.operators import ProcessManifestShardOperator, RemoveBackgroundOperator
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus
from support.faults import FaultRates, start_fault_proxy
from support.servers import sample_photo, start_api_server

ROWS = 20
BATCH = 2
CONCURRENCY = 2
DEADLINE_SECONDS = 300.0


def _plan(folder: Path) -> pipeline.Plan:
    folder.mkdir()
    paths = []
    for index in range(ROWS):
        path = folder / f"p{index:02d}.png"
        path.write_bytes(sample_photo(48 + index, 40))
        paths.append(str(path))
    pq.write_table(pa.table({"image_url": paths}), folder / "manifest.parquet")
    config = pipeline.PipelineConfig(
        manifest_uri=str(folder / "manifest.parquet"),
        output_prefix=str(folder / "cutouts"),
        output_manifest_uri=str(folder / "enriched.parquet"),
        max_records_per_request=BATCH,
        concurrency=CONCURRENCY,
        report=False,
        max_failed_fraction=1.0,
    )
    return pipeline.plan(config, Storage())


def _wait_for(condition: str, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"no {condition} within {DEADLINE_SECONDS:.0f} s")
        time.sleep(0.05)


class _TaskInstance:
    """Stands in for Airflow's task instance, which exists only inside a task runner: keeps pushed XComs."""

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


@dataclass
class KilledTask:
    raised: list[BaseException]
    billed: int


def _kill_mid_run(task: BaseOperator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KilledTask:
    """Run `task.execute` in a thread against a gated API; call `on_kill` with the first batch done."""
    with (
        start_api_server(tmp_path / "server", token="kill-token") as server,
        start_fault_proxy(server.base_url, FaultRates()) as proxy,
    ):
        host, port = proxy.base_url.removeprefix("http://").split(":")
        connection: dict[str, Any] = {
            "conn_type": "removebg",
            "host": host,
            "port": int(port),
            "schema": "http",
        }
        connection["password"] = "kill-token"
        # A read timeout longer than any hold: a request timed out in the proxy would be billed twice.
        connection["extra"] = {"timeout": [10, 900]}
        monkeypatch.setenv("AIRFLOW_CONN_REMOVEBG_DEFAULT", json.dumps(connection))
        raised: list[BaseException] = []

        def execute() -> None:
            try:
                task.execute({"ti": _TaskInstance()})  # type: ignore[arg-type]
            except BaseException as exc:  # handed to the test thread
                raised.append(exc)

        proxy.hold_requests(after=1)
        worker = threading.Thread(target=execute)
        worker.start()
        try:
            _wait_for("held requests", lambda: proxy.held_requests >= CONCURRENCY)
            task.on_kill()
        finally:
            proxy.release_held()
            worker.join(timeout=DEADLINE_SECONDS)
        return KilledTask(raised, server.stats()["records_billed"])


def test_killing_a_shard_task_stops_new_requests_and_fails_it_with_the_rows_not_reached_stored_as_499(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planned = _plan(tmp_path / "catalog")
    task = ProcessManifestShardOperator(task_id="process_shard", shard=planned.shards[0].to_dict())

    killed = _kill_mid_run(task, tmp_path, monkeypatch)

    statuses = Counter(pipeline.merge(planned, Storage()).by_status)
    assert [type(exc) for exc in killed.raised] == [RunStoppedError]
    assert killed.billed == (1 + CONCURRENCY) * BATCH
    assert statuses == {RowStatus.OK: killed.billed, RowStatus.STOPPED: ROWS - killed.billed}


def test_killing_a_whole_run_task_stops_new_requests_and_writes_the_enriched_manifest_before_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _plan(tmp_path / "catalog").config
    task = RemoveBackgroundOperator(
        task_id="remove_background",
        manifest_uri=config.manifest_uri,
        output_prefix=config.output_prefix,
        output_manifest_uri=config.output_manifest_uri,
        max_records_per_request=BATCH,
        concurrency=CONCURRENCY,
        report=False,
    )

    killed = _kill_mid_run(task, tmp_path, monkeypatch)

    statuses = Counter(pq.read_table(config.output_manifest_uri).column("removebg_status_code").to_pylist())
    assert [type(exc) for exc in killed.raised] == [RunStoppedError]
    assert killed.billed == (1 + CONCURRENCY) * BATCH
    assert statuses == {RowStatus.OK: killed.billed, RowStatus.STOPPED: ROWS - killed.billed}
