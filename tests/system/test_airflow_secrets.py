"""The API token of a real `airflow dags test` run appears in no XCom value, task log or file it wrote.

The local API server (tests/support/servers.py) and the `removebg_default` connection share a distinctive
token. The manifest has one missing image, so the run goes through successful rows, a failed row
and a failed task (the merge's failure policy), whose traceback is logged too. `airflow dags test`
runs the tasks in its own process and writes their logs to its console; files under
AIRFLOW_HOME/logs are searched as well, in case a configuration writes them.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from removebg_provider.samples import write_sample_photos
from support import REPO_ROOT
from support.servers import start_api_server

ROOT = REPO_ROOT
BIN = Path(sys.executable).parent
PHOTOS = 5
TOKEN = f"rbg-secret-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class FinishedRun:
    """One finished `airflow dags test`: its console, AIRFLOW_HOME and output folder."""

    output: str
    home: Path
    outputs: Path

    def xcom_values(self) -> list[tuple[str, str, str]]:
        """(task_id, key, stored JSON value) of every XCom of the run."""
        with sqlite3.connect(self.home / "airflow.db") as db:
            rows: list[tuple[str, str, str]] = db.execute("SELECT task_id, key, value FROM xcom").fetchall()
        return rows

    def task_logs(self) -> list[tuple[str, str]]:
        """(where, text) of the console output and of every file under AIRFLOW_HOME/logs."""
        files = sorted(path for path in (self.home / "logs").rglob("*") if path.is_file())
        return [("console", self.output)] + [(str(path), path.read_text(errors="replace")) for path in files]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FinishedRun]:
    work = tmp_path_factory.mktemp("secrets")
    photos = write_sample_photos(work / "photos", PHOTOS, seed=9, size=(96, 72))
    manifest = work / "products.csv"
    with manifest.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["sku", "image_url"])
        writer.writerows([f"SKU-{index}", str(photo)] for index, photo in enumerate(photos))
        writer.writerow(["SKU-GONE", str(work / "photos" / "missing.jpg")])
    home, outputs = work / "airflow", work / "outputs"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    with start_api_server(work, token=TOKEN) as server:
        connection = {"conn_type": "removebg", "host": server.base_url, "password": TOKEN}
        conf: dict[str, Any] = {
            "manifest_uri": str(manifest),
            "output_prefix": str(outputs / "cutouts"),
            "output_manifest_uri": str(outputs / "enriched" / "products.parquet"),
            "id_column": "sku",
            "shard_size": 3,
            "report_base_url": "https://reports.example.test/{{ ds }}",
        }
        command = [
            str(BIN / "airflow"), "dags", "test", "catalog_remove_background", "2024-06-01",
            "-c", json.dumps(conf),
        ]  # fmt: skip
        result = subprocess.run(
            command,
            env={**env, "AIRFLOW_CONN_REMOVEBG_DEFAULT": json.dumps(connection)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
        yield FinishedRun(result.stdout, home, outputs)


def test_run_used_the_token_and_went_through_successes_failures_and_a_failed_task(
    finished_run: FinishedRun,
) -> None:
    shards = [json.loads(value) for task, key, value in finished_run.xcom_values() if key == "return_value"]
    shard_summaries = [summary for summary in shards if isinstance(summary, dict)]
    assert sum(summary["succeeded"] for summary in shard_summaries) == PHOTOS
    assert sum(summary["failed"] for summary in shard_summaries) == 1
    assert "FailurePolicyError" in finished_run.output


def test_token_is_in_no_xcom_value(finished_run: FinishedRun) -> None:
    values = finished_run.xcom_values()
    assert values
    leaking = [(task, key) for task, key, value in values if TOKEN in value]
    assert leaking == []


def test_token_is_in_no_task_log(finished_run: FinishedRun) -> None:
    logs = finished_run.task_logs()
    assert "SKU-GONE: 422" in logs[0][1]
    assert [where for where, text in logs if TOKEN in text] == []


def test_token_is_in_no_file_the_run_wrote(finished_run: FinishedRun) -> None:
    written = [path for root in (finished_run.home, finished_run.outputs) for path in root.rglob("*")]
    files = [path for path in written if path.is_file()]
    assert any(path.name == "products.parquet" for path in files)
    assert [str(path) for path in files if TOKEN.encode() in path.read_bytes()] == []


def test_a_run_that_breaks_the_failure_policy_still_links_its_report(finished_run: FinishedRun) -> None:
    links = [json.loads(value) for task, key, value in finished_run.xcom_values() if key == "report_url"]

    assert links == ["https://reports.example.test/2024-06-01/products.report.html"]
