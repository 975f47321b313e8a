"""One owner per setting, under `airflow dags test`: task option > connection extra > default.

`mode`, `max_records_per_request` and `concurrency` can be set on the task and on the `removebg`
connection. The connection here says `max_records_per_request: 2` and `mode: precise`; the task
sets `max_records_per_request=4` and leaves `mode` unset.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
import pytest

from removebg_provider.samples import write_sample_photos
from support.airflow_cli import airflow_env, dags_test, migrate
from support.servers import start_api_server

PHOTOS = 8
TASK_BATCH = 4
CONNECTION_EXTRA = {"max_records_per_request": 2, "mode": "precise"}

_DAG = f"""
from datetime import datetime

from airflow.sdk import DAG

from removebg_provider.operators import RemoveBackgroundOperator

with DAG("settings_under_test", schedule=None, start_date=datetime(2024, 1, 1)):
    RemoveBackgroundOperator(
        task_id="cut",
        manifest_uri="{{{{ params.manifest_uri }}}}",
        output_prefix="{{{{ params.output_prefix }}}}",
        output_manifest_uri="{{{{ params.output_manifest_uri }}}}",
        max_records_per_request={TASK_BATCH},
        report=False,
        outlets=[],
    )
"""


@dataclass(frozen=True)
class _Run:
    output: str
    requests: int
    rows: list[dict[str, Any]]


@pytest.fixture(scope="module")
def settings_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Run]:
    work = tmp_path_factory.mktemp("settings")
    dags = work / "dags"
    dags.mkdir()
    (dags / "settings_under_test.py").write_text(_DAG)
    photos = write_sample_photos(work / "photos", PHOTOS, seed=3, size=(96, 72))
    manifest = work / "products.csv"
    manifest.write_text("image_url\n" + "".join(f"{photo}\n" for photo in photos))
    migrate(work / "home", dags)
    with start_api_server(work) as server:
        conf = {
            "manifest_uri": str(manifest),
            "output_prefix": str(work / "cutouts"),
            "output_manifest_uri": str(work / "enriched.parquet"),
        }
        done = dags_test(
            "settings_under_test", conf, airflow_env(work / "home", dags, server, CONNECTION_EXTRA)
        )
        yield _Run(
            done.stdout, server.stats()["requests"], pq.read_table(conf["output_manifest_uri"]).to_pylist()
        )


def test_a_task_option_wins_over_the_connection_extra(settings_run: _Run) -> None:
    assert "state=success" in settings_run.output, settings_run.output[-3000:]
    assert settings_run.requests == PHOTOS // TASK_BATCH


def test_a_setting_the_task_leaves_unset_comes_from_the_connection(settings_run: _Run) -> None:
    assert [row["removebg_mode"] for row in settings_run.rows] == ["precise"] * PHOTOS
    assert [row["removebg_status_code"] for row in settings_run.rows] == [200] * PHOTOS
