"""Run a real Airflow deployment for a test: api-server, scheduler, dag-processor, maybe Celery workers.

    with start_postgres(tmp / "postgres") as postgres, start_redis(tmp / "redis") as redis:
        database = postgres.create_database("airflow")
        with start_airflow(tmp / "airflow", dags_folder, {}, database, redis.url(0), ("w1", "w2")) as airflow:
            airflow.create_pool("removebg_api", 32)
            airflow.wait_for_dag("catalog_remove_background", timeout=600)
            run_id = airflow.trigger("catalog_remove_background", {"shard_size": 4}, logical_date)
            airflow.unpause("catalog_remove_background")
            state = airflow.wait_for_run("catalog_remove_background", run_id, timeout=900)

Without a broker the LocalExecutor runs the tasks; with one, the CeleryExecutor sends them through
it to `airflow celery worker` processes, one per name in `workers`, each reporting that name as
the host of its task instances (two workers on one machine stand in for two machines). Every
process gets its own session, writes to a log file under AIRFLOW_HOME and is stopped by its pid
when the `with` block ends, however it ends, together with every process it started (task processes
run in process groups of their own). `diagnostics()` gives the tails of those logs and of the task
logs for failure messages. REST calls go through the public API v2 with a JWT from the
SimpleAuthManager's `POST /auth/token`, as a user would.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import requests
from celery import Celery

AIRFLOW = str(Path(sys.executable).parent / "airflow")
ADMIN = "admin"
# On the deployments' PYTHONPATH: the cluster policy (airflow_local_settings) and the workers' host names.
CONFIG_FOLDER = Path(__file__).resolve().parent / "airflow_config"
# What lets a shard task on a lost worker run again elsewhere, and quickly enough for a test;
# docker/compose.yaml sets the same keys with production values (docs/deploy.md explains each).
CELERY_RECOVERY_SETTINGS = {
    # A message is acknowledged when its task ends, so a worker that dies mid-task never loses it.
    "AIRFLOW__CELERY__TASK_ACKS_LATE": "True",
    # A worker reserves no more messages than it has free processes: none wait behind a dying worker.
    "AIRFLOW__CELERY__WORKER_PREFETCH_MULTIPLIER": "1",
    # Redis redelivers an unacknowledged message after this long; longer than any shard task here.
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "600",
    # Task supervisors heartbeat every 5 s; a task silent for 30 s is failed and goes to its retries.
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
}
# Hang guards, not speed checks: on a busy 2-core machine Airflow takes minutes to start.
_STARTUP_SECONDS = 600.0
_STOP_SECONDS = 20.0
_POLL_SECONDS = 1.0
_LOG_TAIL_LINES = 40
_LOG_LINE_CHARS = 600
_FINISHED = frozenset({"success", "failed"})


@dataclass(frozen=True)
class TaskInstanceSummary:
    """One task instance of a run: when it started and ended, how it finished, where, and at which try."""

    task_id: str
    map_index: int
    state: str | None
    start: datetime | None
    end: datetime | None
    try_number: int
    hostname: str | None

    def overlaps(self, other: TaskInstanceSummary) -> bool:
        """Whether both ran and their [start, end] intervals share a moment."""
        if self.start is None or self.end is None or other.start is None or other.end is None:
            return False
        return self.start < other.end and other.start < self.end


class AirflowDeployment:
    """A running deployment: its REST API, with an admin token, its processes and its log files."""

    def __init__(
        self, home: Path, base_url: str, password: str, processes: Mapping[str, subprocess.Popen[bytes]]
    ) -> None:
        self.home = home
        self.base_url = base_url
        self._processes = processes
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

    def put_connection(self, connection_id: str, fields: Mapping[str, Any]) -> None:
        """Create or replace connection `connection_id` (`conn_type`, `host`, `password`, `extra`...)."""
        body = {"connection_id": connection_id, **fields}
        exists = self._session.get(f"{self.base_url}/api/v2/connections/{connection_id}", timeout=30).ok
        if exists:
            self.api("PATCH", f"/connections/{connection_id}", body)
        else:
            self.api("POST", "/connections", body)

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

    def task_instances(self, dag_id: str, run_id: str) -> list[TaskInstanceSummary]:
        """Every task instance of the run (its latest try), mapped ones one per map index."""
        found = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")
        return [
            TaskInstanceSummary(
                task_id=ti["task_id"],
                map_index=ti["map_index"],
                state=ti["state"],
                start=_timestamp(ti["start_date"]),
                end=_timestamp(ti["end_date"]),
                try_number=ti["try_number"],
                hostname=ti["hostname"] or None,
            )
            for ti in found["task_instances"]
        ]

    def kill_worker(self, name: str) -> list[int]:
        """SIGKILL Celery worker `name` and every process under it, as when its machine is lost.

        The worker, its pool processes and their task processes are first stopped (SIGSTOP) until no
        new one appears, so none can start another between the listing and the kill; returns the pids.
        """
        main = psutil.Process(self._processes[f"worker-{name}"].pid)
        frozen: list[psutil.Process] = []
        while True:
            found = [main, *main.children(recursive=True)]
            if {p.pid for p in found} == {p.pid for p in frozen}:
                break
            for process in found:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.suspend()
            frozen = found
        for process in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        return [process.pid for process in frozen]

    def diagnostics(self) -> str:
        """The tails of the process logs and of every task log, for a failure message."""
        return _all_logs(self.home)


@contextlib.contextmanager
def start_airflow(
    home: Path,
    dags_folder: Path,
    extra_env: Mapping[str, str],
    database_url: str,
    broker_url: str | None = None,
    workers: Sequence[str] = (),
) -> Iterator[AirflowDeployment]:
    """Migrate the database at `database_url`, start every process and yield the deployment.

    With `broker_url` the CeleryExecutor sends tasks to one `airflow celery worker` per name in
    `workers` (two at least, to spread anything); without it the LocalExecutor runs them. On any
    exception inside the block the process logs are printed before it propagates.
    """
    home.mkdir(parents=True, exist_ok=True)
    password = secrets.token_urlsafe(16)
    passwords_file = home / "passwords.json"
    passwords_file.write_text(json.dumps({ADMIN: password}))
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = _environment(home, dags_folder, base_url, passwords_file, database_url, broker_url)
    env.update(extra_env)
    _run_logged([AIRFLOW, "db", "migrate"], env, home / "db-migrate.log")
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        processes["api-server"] = _start(
            "api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port)], env, home
        )
        processes["scheduler"] = _start("scheduler", ["scheduler"], env, home)
        processes["dag-processor"] = _start("dag-processor", ["dag-processor"], env, home)
        for name in workers:
            processes[f"worker-{name}"] = _start(
                f"worker-{name}",
                ["celery", "worker", "--celery-hostname", f"{name}@%h", "--skip-serve-logs"],
                {
                    **env,
                    "REMOVEBG_TEST_WORKER_HOSTNAME": name,
                    "AIRFLOW__CORE__HOSTNAME_CALLABLE": "worker_hostname.hostname",
                },
                home,
            )
        _wait_healthy(base_url, processes)
        if broker_url is not None:
            _wait_for_workers(broker_url, workers, processes)
        yield AirflowDeployment(home, base_url, password, processes)
    except BaseException:
        print(_all_logs(home), file=sys.stderr)
        raise
    finally:
        _stop(processes)


def _environment(
    home: Path,
    dags_folder: Path,
    base_url: str,
    passwords_file: Path,
    database_url: str,
    broker_url: str | None,
) -> dict[str, str]:
    # The caller's own Airflow settings must not leak into the deployment.
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CONFIG_FOLDER), env.get("PYTHONPATH")]))
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
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
    if broker_url is None:
        env["AIRFLOW__CORE__EXECUTOR"] = "LocalExecutor"
    else:
        env.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{database_url}",
                **CELERY_RECOVERY_SETTINGS,
            }
        )
    return env


def _start(name: str, arguments: list[str], env: Mapping[str, str], home: Path) -> subprocess.Popen[bytes]:
    """Start `airflow *arguments`, logging to `home`/`name`.log."""
    with (home / f"{name}.log").open("wb") as log:
        # A session of its own puts the process and its children in one group, stopped together.
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
        _check_alive(processes)
        with contextlib.suppress(requests.ConnectionError):
            health = requests.get(f"{base_url}/api/v2/monitor/health", timeout=5)
            if health.ok and _all_healthy(health.json()):
                return
        time.sleep(_POLL_SECONDS)
    raise TimeoutError(f"the deployment at {base_url} was not healthy within {_STARTUP_SECONDS:.0f} s")


def _wait_for_workers(
    broker_url: str, workers: Sequence[str], processes: Mapping[str, subprocess.Popen[bytes]]
) -> None:
    """Wait until every worker answers a Celery ping through the broker, as `celery inspect ping` does."""
    app = Celery(broker=broker_url)
    deadline = time.monotonic() + _STARTUP_SECONDS
    answered: set[str] = set()
    while time.monotonic() < deadline:
        _check_alive(processes)
        replies = app.control.ping(timeout=2.0) or []
        answered = {node.partition("@")[0] for reply in replies for node in reply}
        if set(workers) <= answered:
            return
    raise TimeoutError(
        f"Celery workers {sorted(set(workers) - answered)} did not answer within the startup time"
    )


def _check_alive(processes: Mapping[str, subprocess.Popen[bytes]]) -> None:
    for name, process in processes.items():
        if process.poll() is not None:
            raise RuntimeError(f"airflow {name} exited {process.returncode} during startup")


def _all_healthy(health: dict[str, Any]) -> bool:
    wanted = ("metadatabase", "scheduler", "dag_processor")
    return all((health.get(part) or {}).get("status") == "healthy" for part in wanted)


def _stop(processes: Mapping[str, subprocess.Popen[bytes]]) -> None:
    """Ask every process to stop at once, wait, then SIGKILL what is left of them and their descendants.

    Celery workers get SIGQUIT, Celery's cold shutdown (after a warm SIGTERM they linger for many
    seconds with nothing to run); the other processes' groups get SIGTERM.
    """
    descendants: list[psutil.Process] = []
    for name, process in processes.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            descendants += psutil.Process(process.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            if name.startswith("worker-"):
                process.send_signal(signal.SIGQUIT)
            else:
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_SECONDS
    for process in processes.values():
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    # Children that outlived their parent are still in its group, or (task processes) in groups of their own.
    for process in processes.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for child in descendants:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


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
