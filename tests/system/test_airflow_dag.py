"""The catalog DAG under `airflow dags test`: enriched manifest, billing, logs, retries, parity with the CLI.

Each `airflow dags test` is a real subprocess with its own SQLite AIRFLOW_HOME, the connection from
an environment variable and the real local API server (tests/support/servers.py). One DAG run is shared by
the tests that only inspect its results.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image

from removebg_provider.samples import write_sample_photos
from support import REPO_ROOT
from support.airflow_cli import airflow_env, dags_test, migrate
from support.servers import LocalApiServer, sample_photo, start_api_server

ROOT = REPO_ROOT
BIN = Path(sys.executable).parent
PHOTOS = 20
VOLATILE = {"removebg_processed_at", "removebg_request_id"}
OUTPUT_COLUMNS = ("removebg_output_url", "removebg_output_url_mask", "removebg_output_url_whitebg")

_FLAKY_DAG = '''
"""Test-only DAG: the shard operator dies after its first batch on the first try of shard 0."""
from datetime import datetime, timedelta

from airflow.sdk import DAG, TriggerRule

from removebg_provider.client import RemoveBgClient
from removebg_provider.operators import (
    MergeEnrichedManifestOperator,
    PlanManifestShardsOperator,
    ProcessManifestShardOperator,
)


class CrashAfterFirstBatch(ProcessManifestShardOperator):
    def execute(self, context):
        if context["ti"].try_number == 1 and self.shard["index"] == 0:
            original = RemoveBgClient.remove_batch
            calls = []

            def remove_batch(client, records, options=None):
                calls.append(len(records))
                if len(calls) > 1:
                    raise RuntimeError("injected worker crash after the first batch")
                return original(client, records, options)

            # Every task of `airflow dags test` runs in one process: patch only for this try.
            RemoveBgClient.remove_batch = remove_batch
            try:
                return super().execute(context)
            finally:
                RemoveBgClient.remove_batch = original
        return super().execute(context)


with DAG("flaky_remove_background", schedule=None, start_date=datetime(2024, 1, 1),
         default_args={"retries": 1, "retry_delay": timedelta(seconds=1)}):
    plan = PlanManifestShardsOperator(
        task_id="plan",
        manifest_uri="{{ params.manifest_uri }}",
        output_prefix="{{ params.output_prefix }}",
        output_manifest_uri="{{ params.output_manifest_uri }}",
        id_column="sku",
        shard_size=4,
        max_records_per_request=1,
        concurrency=1,
    )
    shards = CrashAfterFirstBatch.partial(task_id="process_shard").expand(shard=plan.output)
    shards >> MergeEnrichedManifestOperator(
        task_id="merge", plan_uri=plan.output["plan_uri"], trigger_rule=TriggerRule.ALL_DONE
    )
'''


@dataclass(frozen=True)
class DagRun:
    """One finished `airflow dags test`: its conf, console output and the server it used."""

    conf: dict[str, Any]
    output: str
    returncode: int
    server: LocalApiServer
    manifest_rows: list[dict[str, str]]

    def enriched(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = pq.read_table(self.conf["output_manifest_uri"]).to_pylist()
        return rows


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_sample_photos(tmp_path_factory.mktemp("photos"), PHOTOS, seed=11, size=(160, 120))


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> Path:
    path = tmp_path_factory.mktemp("manifest") / "products.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["sku", "image_url"])
        for index, photo in enumerate(photos):
            writer.writerow([f"SKU-{index:03d}", str(photo)])
        writer.writerow(["SKU-GONE", str(photos[0].parent / "missing.jpg")])
    return path


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("airflow")
    migrate(home, ROOT / "dags")
    return home


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory: pytest.TempPathFactory, airflow_home: Path, manifest: Path) -> Iterator[DagRun]:
    work = tmp_path_factory.mktemp("dag-run")
    with start_api_server(work) as server:
        conf = {
            "manifest_uri": str(manifest),
            "output_prefix": str(work / "cutouts"),
            "output_manifest_uri": str(work / "enriched" / "products.parquet"),
            "id_column": "sku",
            "shard_size": 6,
        }
        env = airflow_env(airflow_home, ROOT / "dags", server)
        result = dags_test("catalog_remove_background", conf, env)
        with manifest.open() as stream:
            rows = list(csv.DictReader(stream))
        yield DagRun(conf, result.stdout, result.returncode, server, rows)


def test_dag_run_succeeds_within_the_failure_policy(dag_run: DagRun) -> None:
    assert dag_run.returncode == 0, dag_run.output[-3000:]
    assert "state=success" in dag_run.output


def test_enriched_manifest_has_every_input_row_once_in_order(dag_run: DagRun) -> None:
    enriched = dag_run.enriched()
    assert [row["sku"] for row in enriched] == [row["sku"] for row in dag_run.manifest_rows]
    assert {"removebg_status_code", "removebg_error", "removebg_output_url"} <= set(enriched[0])


def test_only_the_missing_image_fails_with_422(dag_run: DagRun) -> None:
    statuses = {row["sku"]: row["removebg_status_code"] for row in dag_run.enriched()}
    assert statuses.pop("SKU-GONE") == 422
    assert set(statuses.values()) == {200}


def test_cutouts_exist_under_the_output_prefix(dag_run: DagRun) -> None:
    cutouts = [row["removebg_output_url"] for row in dag_run.enriched() if row["removebg_status_code"] == 200]
    assert len(cutouts) == PHOTOS
    for uri in cutouts:
        assert uri.startswith(dag_run.conf["output_prefix"])
        assert Path(uri).read_bytes().startswith(b"\x89PNG")


def test_each_image_is_billed_once(dag_run: DagRun) -> None:
    assert dag_run.server.stats()["records_billed"] == PHOTOS


def test_task_log_shows_progress_and_the_failed_rows(dag_run: DagRun) -> None:
    assert "rows (100%)" in dag_run.output
    assert "ETA" in dag_run.output
    assert "run: 21 rows, 20 succeeded, 1 failed" in dag_run.output
    assert "first errors: SKU-GONE: 422" in dag_run.output


def test_cli_writes_the_same_enriched_manifest_as_the_dag(
    dag_run: DagRun, manifest: Path, tmp_path: Path
) -> None:
    with start_api_server(tmp_path) as server:
        prefix, enriched = tmp_path / "cutouts", tmp_path / "enriched.parquet"
        command = [
            str(BIN / "removebg"), "run", str(manifest), "--output-prefix", str(prefix),
            "--output-manifest", str(enriched), "--id-column", "sku", "--endpoint", server.base_url,
            "--no-progress",
        ]  # fmt: skip
        env = {**os.environ, "REMOVEBG_API_TOKEN": server.token or ""}
        subprocess.run(command, env=env, check=True, capture_output=True)
    from_cli = _comparable(pq.read_table(enriched).to_pylist(), str(prefix))
    from_dag = _comparable(dag_run.enriched(), dag_run.conf["output_prefix"])
    assert from_cli == from_dag


def test_retried_shard_resumes_without_billing_finished_batches(
    tmp_path: Path, airflow_home: Path, manifest: Path
) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "flaky_remove_background.py").write_text(_FLAKY_DAG)
    with start_api_server(tmp_path) as server:
        conf = {
            "manifest_uri": str(manifest),
            "output_prefix": str(tmp_path / "cutouts"),
            "output_manifest_uri": str(tmp_path / "enriched.parquet"),
        }
        result = dags_test("flaky_remove_background", conf, airflow_env(airflow_home, dags, server))
        billed = server.stats()["records_billed"]
    assert "injected worker crash after the first batch" in result.stdout
    assert "state=success" in result.stdout, result.stdout[-3000:]
    assert billed == PHOTOS
    statuses = [row["removebg_status_code"] for row in pq.read_table(conf["output_manifest_uri"]).to_pylist()]
    assert statuses.count(200) == PHOTOS


def test_the_dag_bills_the_changed_and_new_images_of_day_two_into_its_dated_prefix_and_day_three_nothing(
    tmp_path: Path, airflow_home: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(6):
        (photos / f"p{index}.jpg").write_bytes(sample_photo(60 + index, 40, "JPEG"))
    _daily_manifest(tmp_path / "manifests" / "2024-06-01" / "products.csv", photos, 6)
    _daily_manifest(tmp_path / "manifests" / "2024-06-02" / "products.csv", photos, 7)
    # Day three: the catalog of day two, unchanged.
    _daily_manifest(tmp_path / "manifests" / "2024-06-03" / "products.csv", photos, 7)
    conf = {
        "manifest_uri": str(tmp_path / "manifests" / "{{ ds }}" / "products.csv"),
        "output_prefix": str(tmp_path / "cutouts" / "{{ ds }}"),
        "output_manifest_uri": str(tmp_path / "enriched" / "{{ ds }}.parquet"),
        "id_column": "sku",
        "cache_prefix": str(tmp_path / "removebg_cache"),
    }
    with start_api_server(tmp_path / "server") as server:
        env = airflow_env(airflow_home, ROOT / "dags", server)
        dags_test("catalog_remove_background", conf, env, logical_date="2024-06-01")
        (photos / "p2.jpg").write_bytes(sample_photo(99, 40, "JPEG"))
        (photos / "p6.jpg").write_bytes(sample_photo(98, 40, "JPEG"))
        server.reset_stats()
        result = dags_test("catalog_remove_background", conf, env, logical_date="2024-06-02")
        billed = server.stats()["records_billed"]
        server.reset_stats()
        day_three = dags_test("catalog_remove_background", conf, env, logical_date="2024-06-03")
        billed_on_day_three = server.stats()["records_billed"]

    assert "state=success" in result.stdout, result.stdout[-3000:]
    assert "state=success" in day_three.stdout, day_three.stdout[-3000:]
    assert (billed, billed_on_day_three) == (2, 0)
    rows = {
        row["sku"]: row for row in pq.read_table(tmp_path / "enriched" / "2024-06-02.parquet").to_pylist()
    }
    assert {row["removebg_status_code"] for row in rows.values()} == {200}
    assert rows["SKU-0"]["removebg_output_url"] == str(tmp_path / "cutouts" / "2024-06-02" / "SKU-0.png")
    widths = {sku: Image.open(row["removebg_output_url"]).width for sku, row in rows.items()}
    assert (widths["SKU-0"], widths["SKU-2"], widths["SKU-6"]) == (60, 99, 98)


def _daily_manifest(path: Path, photos: Path, count: int) -> None:
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["sku", "image_url"])
        for index in range(count):
            writer.writerow([f"SKU-{index}", str(photos / f"p{index}.jpg")])


def _comparable(rows: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """Rows without per-call values, with output URIs relative to their run's prefix."""
    comparable = []
    for row in rows:
        kept = {key: value for key, value in row.items() if key not in VOLATILE}
        for column in OUTPUT_COLUMNS:
            if kept.get(column):
                kept[column] = os.path.relpath(kept[column], prefix)
        comparable.append(kept)
    return comparable
