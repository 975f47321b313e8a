"""Run a real Airflow deployment (api-server, scheduler, dag-processor; LocalExecutor) for a test.

    with start_airflow(tmp_path / "airflow", dags_folder, {"AIRFLOW_CONN_X": "..."}) as airflow:
        airflow.create_pool("removebg_api", 32)
        airflow.wait_for_dag("catalog_remove_background")
        run_id = airflow.trigger("catalog_remove_background", {"shard_size": 4})
        airflow.unpause("catalog_remove_background")
        state = airflow.wait_for_run("catalog_remove_background", run_id, timeout=900)

Every process gets its own session (process group), is stopped by its pid when the `with` block
ends, however it ends, and writes to a log file under AIRFLOW_HOME; `diagnostics()` gives the
tails of those logs and of the task logs for failure messages. The REST calls go through the
public API v2 with a JWT from the SimpleAuthManager's `POST /auth/token`, as a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests

AIRFLOW = str(Path(sys.executable).parent / "airflow")
ADMIN = "admin"
# Hang guards, not speed checks: on a busy 2-core machine Airflow takes minutes to start.
_STARTUP_SECONDS = 600.0
_STOP_SECONDS = 20.0
_POLL_SECONDS = 1.0
_LOG_TAIL_LINES = 40
_LOG_LINE_CHARS = 600
_FINISHED = frozenset({"success", "failed"})


@dataclass(frozen=True)
class TaskInstanceTimes:
    """When one task instance of a run started and ended, and how it finished."""

    task_id: str
    map_index: int
    state: str | None
    start: datetime | None
    end: datetime | None
    try_number: int

    def overlaps(self, other: TaskInstanceTimes) -> bool:
        """Whether both ran and their [start, end] intervals share a moment."""
        if self.start is None or self.end is None or other.start is None or other.end is None:
            return False
        return self.start < other.end and other.start < self.end


class AirflowDeployment:
    """A running deployment: its REST API, with an admin token, and its log files."""

    def __init__(self, home: Path, base_url: str, password: str) -> None:
        self.home = home
        self.base_url = base_url
        self._session = requests.Session()
        response = self._session.post(
            f"{base_url}/auth/token", json={"username": ADMIN, "password": password}, timeout=30
        )
        response.raise_for_status()
        self._session.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def api(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        """Call `/api/v2{path}` and return the decoded JSON; an HTTP error raises with the answer."""
        response = self._session.request(method, f"{self.base_url}/api/v2{path}", json=body, timeout=30)
        if not response.ok:
            raise RuntimeError(f"{method} /api/v2{path} answered {response.status_code}: {response.text}")
        return response.json() if response.content else None

    def create_pool(self, name: str, slots: int) -> None:
        self.api("POST", "/pools", {"name": name, "slots": slots, "description": "created by the test"})

    def wait_for_dag(self, dag_id: str, timeout: float) -> None:
        """Wait until the dag-processor has stored `dag_id`; an import error fails at once, with its text."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            errors = self.api("GET", "/importErrors")["import_errors"]
            if errors:
                raise RuntimeError(f"the dag-processor could not import: {json.dumps(errors, indent=1)}")
            response = self._session.get(f"{self.base_url}/api/v2/dags/{dag_id}", timeout=30)
            if response.ok:
                return
            time.sleep(_POLL_SECONDS)
        raise TimeoutError(f"the dag-processor did not store DAG {dag_id} within {timeout:.0f} s")

    def trigger(self, dag_id: str, conf: Mapping[str, Any], logical_date: datetime) -> str:
        """Create a manual run of `dag_id`, with `conf` as its params; return its run id."""
        body = {"logical_date": logical_date.isoformat(), "conf": dict(conf)}
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", body)
        run_id: str = run["dag_run_id"]
        return run_id

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> str:
        """Poll the run until it succeeded or failed; its final state, or TimeoutError after `timeout` s."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"]
            if state in _FINISHED:
                return str(state)
            time.sleep(_POLL_SECONDS)
        raise TimeoutError(f"run {run_id} of {dag_id} was still {state} after {timeout:.0f} s")

    def task_instances(self, dag_id: str, run_id: str) -> list[TaskInstanceTimes]:
        """Every task instance of the run, mapped ones one per map index."""
        found = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")
        return [
            TaskInstanceTimes(
                task_id=ti["task_id"],
                map_index=ti["map_index"],
                state=ti["state"],
                start=_timestamp(ti["start_date"]),
                end=_timestamp(ti["end_date"]),
                try_number=ti["try_number"],
            )
            for ti in found["task_instances"]
        ]

    def diagnostics(self) -> str:
        """The tails of the process logs and of every task log, for a failure message."""
        return _all_logs(self.home)


@contextlib.contextmanager
def start_airflow(home: Path, dags_folder: Path, extra_env: Mapping[str, str]) -> Iterator[AirflowDeployment]:
    """Migrate a SQLite database in `home`, start the three processes and yield the deployment.

    On any exception inside the block the process logs are printed before it propagates.
    """
    home.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    passwords_file = home / "passwords.json"
    passwords_file.write_text(json.dumps({ADMIN: password}))
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = _environment(home, dags_folder, base_url, passwords_file, extra_env)
    _run_logged([AIRFLOW, "db", "migrate"], env, home / "db-migrate.log")
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        processes["api-server"] = _start(
            ["api-server", "--host", "127.0.0.1", "--port", str(port)], env, home
        )
        processes["scheduler"] = _start(["scheduler"], env, home)
        processes["dag-processor"] = _start(["dag-processor"], env, home)
        _wait_healthy(base_url, processes)
        yield AirflowDeployment(home, base_url, password)
    except BaseException:
        print(_all_logs(home), file=sys.stderr)
        raise
    finally:
        for process in processes.values():
            _stop(process)


def _environment(
    home: Path, dags_folder: Path, base_url: str, passwords_file: Path, extra_env: Mapping[str, str]
) -> dict[str, str]:
    # The caller's own Airflow settings must not leak into the deployment.
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{base_url}/execution/",
            "AIRFLOW__API__BASE_URL": base_url,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
            # Every process signs or checks the task and user JWTs with this one secret.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        }
    )
    env.update(extra_env)
    return env


def _start(arguments: list[str], env: dict[str, str], home: Path) -> subprocess.Popen[bytes]:
    """Start `airflow *arguments`, logging to `home`/<subcommand>.log."""
    with (home / f"{arguments[0]}.log").open("wb") as log:
        # A session of its own puts the process and its workers in one group, stopped together.
        return subprocess.Popen(
            [AIRFLOW, *arguments], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _run_logged(command: list[str], env: dict[str, str], log_path: Path) -> None:
    with log_path.open("wb") as log:
        result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[1:])} exited {result.returncode}:\n{_tail(log_path)}")


def _wait_healthy(base_url: str, processes: Mapping[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + _STARTUP_SECONDS
    while time.monotonic() < deadline:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"airflow {name} exited {process.returncode} during startup")
        with contextlib.suppress(requests.ConnectionError):
            health = requests.get(f"{base_url}/api/v2/monitor/health", timeout=5)
            if health.ok and _all_healthy(health.json()):
                return
        time.sleep(_POLL_SECONDS)
    raise TimeoutError(f"the deployment at {base_url} was not healthy within {_STARTUP_SECONDS:.0f} s")


def _all_healthy(health: dict[str, Any]) -> bool:
    wanted = ("metadatabase", "scheduler", "dag_processor")
    return all((health.get(part) or {}).get("status") == "healthy" for part in wanted)


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # Workers that outlived their parent are still in its group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _all_logs(home: Path) -> str:
    logs = sorted(home.glob("*.log")) + sorted((home / "logs").rglob("*.log"))
    return "\n".join(_tail(path) for path in logs)


def _tail(path: Path) -> str:
    tail = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
    lines = [line[:_LOG_LINE_CHARS] for line in tail]
    return f"----- {path} (last {len(lines)} lines) -----\n" + "\n".join(lines)


def _timestamp(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
