"""Run the real `airflow` command line for tests: a private AIRFLOW_HOME, a DAG folder, a connection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support.servers import LocalApiServer

BIN = Path(sys.executable).parent


def airflow_env(
    home: Path, dags: Path, server: LocalApiServer | None, extra: dict[str, Any] | None = None
) -> dict[str, str]:
    """The environment of an `airflow` subprocess; with `server`, `removebg_default` points at it."""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    if server is not None:
        connection: dict[str, Any] = {
            "conn_type": "removebg",
            "host": server.base_url,
            "password": server.token,
        }
        if extra:
            connection["extra"] = extra
        env["AIRFLOW_CONN_REMOVEBG_DEFAULT"] = json.dumps(connection)
    return env


def migrate(home: Path, dags: Path) -> None:
    """Create the metadata database of `home`."""
    subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"],
        env=airflow_env(home, dags, None),
        check=True,
        capture_output=True,
    )


def dags_test(
    dag_id: str, conf: dict[str, Any], env: dict[str, str], logical_date: str = "2024-06-01"
) -> subprocess.CompletedProcess[str]:
    """`airflow dags test DAG LOGICAL_DATE -c CONF`, its console output in `stdout`."""
    command = [str(BIN / "airflow"), "dags", "test", dag_id, logical_date, "-c", json.dumps(conf)]
    return subprocess.run(
        command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900
    )
