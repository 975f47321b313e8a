"""Report link and OpenLineage datasets of real `airflow dags test` runs, read from the run's AIRFLOW_HOME.

The catalog DAG runs once per module with `report_base_url` pointing at a real static HTTP server
over its output folder, and OpenLineage's `file` transport writing every event to a JSON-lines
file; a test-only DAG runs RemoveBackgroundOperator alone, without `report_base_url`. The UI's
"Remove-background report" button is built from the serialized DAG's `_operator_extra_links` and
the XCom the worker pushes under the link's `xcom_key` when the task finishes (our `get_link`
runs there, in the task's process); the tests read both from the run's SQLite database.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from removebg_provider.operators.links import RemoveBackgroundReportLink
from removebg_provider.samples import write_sample_photos
from support import REPO_ROOT
from support.servers import LocalApiServer, start_api_server

ROOT = REPO_ROOT
BIN = Path(sys.executable).parent
PHOTOS = 6
LINK_KEY = RemoveBackgroundReportLink().xcom_key
MERGE = "remove_background.merge"
needs_openlineage = pytest.mark.skipif(
    importlib.util.find_spec("airflow.providers.openlineage") is None,
    reason="the OpenLineage provider (extra `openlineage`) is not installed",
)

_SINGLE_TASK_DAG = '''
"""Test-only DAG: the whole manifest in one RemoveBackgroundOperator task."""
from datetime import datetime

from airflow.sdk import DAG

from removebg_provider.operators import RemoveBackgroundOperator

with DAG("single_task_remove_background", schedule=None, start_date=datetime(2024, 1, 1)):
    RemoveBackgroundOperator(
        task_id="remove_background",
        manifest_uri="{{ params.manifest_uri }}",
        output_prefix="{{ params.output_prefix }}",
        output_manifest_uri="{{ params.output_manifest_uri }}",
        id_column="sku",
        removebg_conn_id="removebg_default",
    )
'''


@dataclass(frozen=True)
class FinishedRun:
    """One finished `airflow dags test`: its conf, console output, database and OpenLineage events."""

    dag_id: str
    conf: dict[str, Any]
    output: str
    returncode: int
    database: Path
    lineage_file: Path

    def xcom(self, task_id: str, key: str) -> Any:
        with sqlite3.connect(self.database) as db:
            row = db.execute(
                "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = ?",
                (self.dag_id, task_id, key),
            ).fetchone()
        assert row is not None, f"no XCom {key!r} of {task_id}"
        return json.loads(row[0])

    def serialized_task(self, task_id: str) -> dict[str, Any]:
        with sqlite3.connect(self.database) as db:
            data, compressed = db.execute(
                "SELECT data, data_compressed FROM serialized_dag WHERE dag_id = ?", (self.dag_id,)
            ).fetchone()
        dag = json.loads(data) if data else json.loads(zlib.decompress(compressed))
        tasks = [task.get("__var", task) for task in dag["dag"]["tasks"]]
        return next(task for task in tasks if task["task_id"] == task_id)

    def lineage_event(self, task_id: str, event_type: str) -> dict[str, Any]:
        job = f"{self.dag_id}.{task_id}"
        events = [json.loads(line) for line in self.lineage_file.read_text().splitlines() if line]
        (event,) = [e for e in events if e["job"]["name"] == job and e["eventType"] == event_type]
        return event


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lineage")


@pytest.fixture(scope="module")
def manifest(work: Path) -> Path:
    photos = write_sample_photos(work / "photos", PHOTOS, seed=5, size=(96, 72))
    path = work / "products.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["sku", "image_url"])
        writer.writerows([f"SKU-{index}", str(photo)] for index, photo in enumerate(photos))
    return path


@pytest.fixture(scope="module")
def airflow_home(work: Path) -> Path:
    home = work / "airflow"
    home.mkdir()
    env = _airflow_env(home, ROOT / "dags", None, work / "unused.jsonl")
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True)
    return home


@pytest.fixture(scope="module")
def api_server(work: Path) -> Iterator[LocalApiServer]:
    with start_api_server(work) as server:
        yield server


@pytest.fixture(scope="module")
def static_site(work: Path) -> Iterator[str]:
    """A real static HTTP server over the run's output folder, standing in for a bucket website."""
    site = work / "site"
    site.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


@pytest.fixture(scope="module")
def catalog_run(
    work: Path, manifest: Path, airflow_home: Path, api_server: LocalApiServer, static_site: str
) -> FinishedRun:
    site = work / "site"
    conf = {
        "manifest_uri": str(manifest),
        "output_prefix": str(site / "cutouts"),
        "output_manifest_uri": str(site / "enriched" / "products.parquet"),
        "id_column": "sku",
        "shard_size": 3,
        "report_base_url": f"{static_site}/enriched",
    }
    return _dags_test("catalog_remove_background", conf, airflow_home, ROOT / "dags", api_server, work)


@pytest.fixture(scope="module")
def single_task_run(
    work: Path, manifest: Path, airflow_home: Path, api_server: LocalApiServer
) -> FinishedRun:
    dags = work / "single-dags"
    dags.mkdir()
    (dags / "single_task_remove_background.py").write_text(_SINGLE_TASK_DAG)
    conf = {
        "manifest_uri": str(manifest),
        "output_prefix": str(work / "single" / "cutouts"),
        "output_manifest_uri": str(work / "single" / "enriched.parquet"),
    }
    return _dags_test("single_task_remove_background", conf, airflow_home, dags, api_server, work)


def test_catalog_run_succeeds(catalog_run: FinishedRun) -> None:
    assert catalog_run.returncode == 0, catalog_run.output[-3000:]
    assert "state=success" in catalog_run.output


def test_merge_summary_xcom_names_the_written_report(catalog_run: FinishedRun) -> None:
    summary = catalog_run.xcom(MERGE, "return_value")
    enriched = Path(catalog_run.conf["output_manifest_uri"])
    assert summary["report_html_uri"] == str(enriched.with_name("products.report.html"))
    assert summary["report_png_uri"] == str(enriched.with_name("products.report.png"))
    assert Path(summary["report_html_uri"]).is_file()


def test_merge_task_declares_the_report_link_to_the_ui(catalog_run: FinishedRun) -> None:
    links = catalog_run.serialized_task(MERGE)["_operator_extra_links"]
    assert links == {"Remove-background report": LINK_KEY}


def test_report_link_is_the_report_under_the_base_url(catalog_run: FinishedRun) -> None:
    expected = f"{catalog_run.conf['report_base_url']}/products.report.html"
    assert catalog_run.xcom(MERGE, LINK_KEY) == expected
    assert catalog_run.xcom(MERGE, "report_url") == expected


def test_report_link_opens_the_report_page(catalog_run: FinishedRun) -> None:
    page = requests.get(catalog_run.xcom(MERGE, LINK_KEY), timeout=10)
    summary = catalog_run.xcom(MERGE, "return_value")
    assert page.status_code == 200
    assert page.content == Path(summary["report_html_uri"]).read_bytes()


@needs_openlineage
def test_merge_lineage_reads_the_manifest_and_writes_the_enriched_manifest_and_cutouts(
    catalog_run: FinishedRun,
) -> None:
    event = catalog_run.lineage_event(MERGE, "COMPLETE")
    conf = catalog_run.conf
    assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [("file", conf["manifest_uri"])]
    assert [(d["namespace"], d["name"]) for d in event["outputs"]] == [
        ("file", conf["output_manifest_uri"]),
        ("file", conf["output_prefix"]),
    ]


@needs_openlineage
def test_merge_lineage_counts_the_enriched_rows(catalog_run: FinishedRun) -> None:
    enriched = catalog_run.lineage_event(MERGE, "COMPLETE")["outputs"][0]
    assert enriched["outputFacets"]["outputStatistics"]["rowCount"] == PHOTOS


@needs_openlineage
def test_single_task_lineage_names_the_same_datasets(single_task_run: FinishedRun) -> None:
    assert single_task_run.returncode == 0, single_task_run.output[-3000:]
    event = single_task_run.lineage_event("remove_background", "COMPLETE")
    conf = single_task_run.conf
    assert [(d["namespace"], d["name"]) for d in event["inputs"]] == [("file", conf["manifest_uri"])]
    assert [(d["namespace"], d["name"]) for d in event["outputs"]] == [
        ("file", conf["output_manifest_uri"]),
        ("file", conf["output_prefix"]),
    ]


def test_local_report_without_base_url_gets_an_empty_link(single_task_run: FinishedRun) -> None:
    summary = single_task_run.xcom("remove_background", "return_value")
    assert Path(summary["report_html_uri"]).is_file()
    assert single_task_run.xcom("remove_background", LINK_KEY) == ""


def test_a_run_without_a_report_link_logs_no_xcom_error(single_task_run: FinishedRun) -> None:
    assert "XCom not found" not in single_task_run.output


def _dags_test(
    dag_id: str, conf: dict[str, Any], home: Path, dags: Path, server: LocalApiServer, work: Path
) -> FinishedRun:
    lineage_file = work / f"{dag_id}.openlineage.jsonl"
    command = [str(BIN / "airflow"), "dags", "test", dag_id, "2024-06-01", "-c", json.dumps(conf)]
    result = subprocess.run(
        command,
        env=_airflow_env(home, dags, server, lineage_file),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=900,
    )
    return FinishedRun(dag_id, conf, result.stdout, result.returncode, home / "airflow.db", lineage_file)


def _airflow_env(home: Path, dags: Path, server: LocalApiServer | None, lineage_file: Path) -> dict[str, str]:
    transport = {"type": "file", "log_file_path": str(lineage_file), "append": True}
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(transport),
    }
    if server is not None:
        connection = {"conn_type": "removebg", "host": server.base_url, "password": server.token}
        env["AIRFLOW_CONN_REMOVEBG_DEFAULT"] = json.dumps(connection)
    return env
