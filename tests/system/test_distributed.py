"""The example DAG scaled out: CeleryExecutor, PostgreSQL, Redis, two workers, one of them lost.

One deployment serves the whole module, started on 127.0.0.1 from packages only (tests/backends.py,
tests/airflow_deployment.py): PostgreSQL as Airflow's metadata database and the Celery result
backend, Redis as the Celery broker (database 0) and as the shared rate limit's store (database 1),
`airflow api-server`, `scheduler`, `dag-processor` and two `airflow celery worker`s, `w1` and `w2`,
each with two task slots and reporting its own host name. The local API server (the real classic
engine, 32 x 32 photos so the engine's cost stays small) counts the removal requests it receives
(`RequestClock`). `catalog_remove_background` is triggered over the REST API three times, in order:

1. **Spread**: 2,000 rows in 8 shards, no rate limit. The shards run on both workers; the enriched
   manifest has every row once; the server billed exactly one record per row.
2. **Shared budget**: the `removebg_default` connection gets `requests_per_minute` and
   `rate_limit_redis_url`; 400 rows in 8 shards on both workers. Counted at the server, the
   requests of all shard tasks together stay within the one budget.
3. **Worker loss**: 400 rows in 8 shards under the same budget. Once a shard task on `w1` has had a
   request answered and is not finished, `w1` and every process under it are SIGKILLed. The
   scheduler notices the silent task instances (heartbeat timeout), Airflow retries them on `w2`,
   and every row still appears exactly once, re-billing at most the requests in flight at the kill.

The settings that make recovery quick are `CELERY_RECOVERY_SETTINGS` (tests/airflow_deployment.py;
docs/deploy.md explains each) plus a cluster policy giving task retries a 5 s delay instead of the
DAG's minute. The worker names, the kill, the retried shards and the billing figures are written to
the terminal as each run ends.
"""

from __future__ import annotations

import csv
import json
import time
from bisect import bisect_right
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from removebg_provider.samples import write_sample_photos
from support import REPO_ROOT
from support.airflow_deployment import AirflowDeployment, TaskInstanceSummary, start_airflow
from support.backends import start_postgres, start_redis
from support.servers import LocalApiServer, RequestClock, start_api_server

pytestmark = pytest.mark.distributed

DAG_ID = "catalog_remove_background"
SHARD_TASK = "remove_background.process_shard"
DAGS_FOLDER = REPO_ROOT / "dags"
WORKERS = ("w1", "w2")
LOST_WORKER, SURVIVING_WORKER = WORKERS
SHARDS = 8
SPREAD_ROWS = 2_000
BUDGET_ROWS = 400
LOSS_ROWS = 400
PHOTO_SIZE = (32, 32)
# The example DAG's shard tasks keep 8 requests in flight, of the pipeline's 10 records each.
CONCURRENCY = 8
RECORDS_PER_REQUEST = 10
# Four shard tasks run at once (the task group's max_active_tis_per_dagrun), 8 pool slots each.
POOL_SLOTS = 64
REQUESTS_PER_MINUTE = 120
# The server counts arrivals, which trail the limiter's grants by each client's time to send: a window
# at the server may hold grants from a little before it. Two seconds of budget cover that slack.
BUDGET_WINDOW_SECONDS = 10.0
ARRIVAL_SLACK_SECONDS = 2.0
RUN_TIMEOUT_SECONDS = 300.0
DAG_PARSE_TIMEOUT_SECONDS = 120.0
KILL_TIMEOUT_SECONDS = 180.0


@dataclass(frozen=True)
class RunOutcome:
    """What one triggered run left behind, plus the logs to explain a failure."""

    state: str
    rows: int
    task_instances: tuple[TaskInstanceSummary, ...]
    enriched_ids: tuple[str, ...]
    statuses: frozenset[int]
    records_billed: int
    request_arrivals: tuple[float, ...]
    seconds: float
    diagnostics: str = field(repr=False)

    @property
    def shards(self) -> list[TaskInstanceSummary]:
        return [ti for ti in self.task_instances if ti.task_id == SHARD_TASK]

    @property
    def expected_ids(self) -> list[str]:
        return [_sku(index) for index in range(self.rows)]


@dataclass(frozen=True)
class WorkerLoss:
    """The worker-loss run, and which shard task instances were running on the killed worker."""

    outcome: RunOutcome
    killed_shards: frozenset[int]
    killed_pids: tuple[int, ...]


@dataclass
class Deployment:
    """The running deployment, the local API server with its request clock, and the shared photos."""

    airflow: AirflowDeployment
    server: LocalApiServer
    clock: RequestClock
    photos: list[Path]
    work: Path
    rate_limit_redis_url: str
    pytest_config: pytest.Config

    def say(self, line: str) -> None:
        """Write one line of the tier's log to the terminal, past pytest's output capture."""
        capture = self.pytest_config.pluginmanager.get_plugin("capturemanager")
        terminal = self.pytest_config.pluginmanager.get_plugin("terminalreporter")
        with capture.global_and_fixture_disabled():
            terminal.write_line(f"[distributed] {line}")


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Deployment]:
    """PostgreSQL, Redis, the API server, Airflow with two Celery workers; the pool and the DAG ready."""
    started = time.monotonic()
    work = tmp_path_factory.mktemp("distributed")
    clock = RequestClock()
    with (
        # The photos are drawn while the servers start; every run uses a prefix of them.
        ThreadPoolExecutor(max_workers=1) as background,
        start_postgres(work / "postgres") as postgres,
        start_redis(work / "redis") as redis,
        start_api_server(work, wrap_app=clock.wrap, queue_records=400) as server,
    ):
        photos = background.submit(write_sample_photos, work / "photos", SPREAD_ROWS, 11, PHOTO_SIZE)
        database_url = postgres.create_database("airflow")
        extra_env = {
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "REMOVEBG_DEMO_DIR": str(work / "demo"),
        }
        with start_airflow(
            work / "airflow", DAGS_FOLDER, extra_env, database_url, redis.url(0), WORKERS
        ) as airflow:
            airflow.create_pool("removebg_api", POOL_SLOTS)
            airflow.wait_for_dag(DAG_ID, DAG_PARSE_TIMEOUT_SECONDS)
            airflow.unpause(DAG_ID)
            deployment = Deployment(
                airflow=airflow,
                server=server,
                clock=clock,
                photos=photos.result(),
                work=work,
                rate_limit_redis_url=redis.url(1),
                pytest_config=request.config,
            )
            deployment.say(
                f"deployment ready in {time.monotonic() - started:.0f} s: workers {', '.join(WORKERS)}"
            )
            yield deployment


@pytest.fixture(scope="module")
def spread_run(deployment: Deployment) -> RunOutcome:
    """2,000 rows in 8 shards over both workers, no rate limit."""
    _set_connection(deployment, rate_limited=False)
    outcome = _run(deployment, "spread", SPREAD_ROWS)
    hosts = {ti.map_index: ti.hostname for ti in outcome.shards}
    deployment.say(f"spread run: {outcome.state} in {outcome.seconds:.0f} s; shard hosts {hosts}")
    deployment.say(
        f"spread run: {len(outcome.request_arrivals)} requests, at most "
        f"{_most_in_window(outcome.request_arrivals, BUDGET_WINDOW_SECONDS)} in any "
        f"{BUDGET_WINDOW_SECONDS:.0f} s with no budget"
    )
    deployment.say(
        f"spread run: {len(outcome.enriched_ids)} rows written, {outcome.records_billed} records billed"
    )
    return outcome


@pytest.fixture(scope="module")
def budget_run(deployment: Deployment, spread_run: RunOutcome) -> RunOutcome:
    """400 rows in 8 shards over both workers, every request from the one shared budget."""
    _set_connection(deployment, rate_limited=True)
    outcome = _run(deployment, "budget", BUDGET_ROWS)
    deployment.say(
        f"budget run: {outcome.state} in {outcome.seconds:.0f} s; "
        f"{len(outcome.request_arrivals)} requests, at most "
        f"{_most_in_window(outcome.request_arrivals, BUDGET_WINDOW_SECONDS)} in any "
        f"{BUDGET_WINDOW_SECONDS:.0f} s and {_most_in_window(outcome.request_arrivals, 60.0)} in any 60 s "
        f"(budget {REQUESTS_PER_MINUTE}/min); shard hosts {sorted({ti.hostname for ti in outcome.shards})}"
    )
    return outcome


@pytest.fixture(scope="module")
def worker_loss_run(deployment: Deployment, budget_run: RunOutcome) -> WorkerLoss:
    """400 rows in 8 shards; w1 and everything under it SIGKILLed while one of its shards is mid-way."""
    _set_connection(deployment, rate_limited=True)
    run = _start_run(deployment, "loss", LOSS_ROWS)
    killed_shards = _wait_for_shard_mid_way(deployment, run, LOST_WORKER)
    killed_pids = deployment.airflow.kill_worker(LOST_WORKER)
    deployment.say(
        f"worker loss: SIGKILLed {LOST_WORKER} ({len(killed_pids)} processes) while it ran shards "
        f"{sorted(killed_shards)}; {deployment.server.stats()['records_billed']} records billed so far"
    )
    outcome = _finish_run(deployment, run)
    retried = {ti.map_index: (ti.try_number, ti.hostname) for ti in outcome.shards if ti.try_number > 1}
    deployment.say(
        f"worker loss: {outcome.state} in {outcome.seconds:.0f} s; retried shards (try, host) {retried}"
    )
    deployment.say(
        f"worker loss: {len(outcome.enriched_ids)} rows written, {outcome.records_billed} records billed "
        f"({outcome.records_billed - outcome.rows} billed again)"
    )
    return WorkerLoss(outcome, frozenset(killed_shards), tuple(killed_pids))


def test_run_over_two_workers_succeeds(spread_run: RunOutcome) -> None:
    assert spread_run.state == "success", spread_run.diagnostics


def test_shard_tasks_run_on_both_workers(spread_run: RunOutcome) -> None:
    assert len(spread_run.shards) == SHARDS, spread_run.diagnostics
    assert {ti.hostname for ti in spread_run.shards} == set(WORKERS), spread_run.diagnostics


def test_enriched_manifest_has_every_row_exactly_once(spread_run: RunOutcome) -> None:
    assert sorted(spread_run.enriched_ids) == spread_run.expected_ids, spread_run.diagnostics
    assert spread_run.statuses == {200}, spread_run.diagnostics


def test_each_row_is_billed_once(spread_run: RunOutcome) -> None:
    assert spread_run.records_billed == SPREAD_ROWS, spread_run.diagnostics


def test_rate_limited_run_spreads_over_both_workers_and_writes_every_row(budget_run: RunOutcome) -> None:
    assert budget_run.state == "success", budget_run.diagnostics
    assert {ti.hostname for ti in budget_run.shards} == set(WORKERS), budget_run.diagnostics
    assert sorted(budget_run.enriched_ids) == budget_run.expected_ids, budget_run.diagnostics


def test_shard_tasks_on_all_workers_share_one_request_budget(budget_run: RunOutcome) -> None:
    arrivals = budget_run.request_arrivals
    allowed = REQUESTS_PER_MINUTE / 60 * (BUDGET_WINDOW_SECONDS + ARRIVAL_SLACK_SECONDS)
    # Without a shared budget this run's requests would not need a second window at all.
    assert len(arrivals) > allowed
    assert _most_in_window(arrivals, BUDGET_WINDOW_SECONDS) <= allowed


def test_run_survives_the_loss_of_a_worker(worker_loss_run: WorkerLoss) -> None:
    assert worker_loss_run.outcome.state == "success", worker_loss_run.outcome.diagnostics


def test_shards_of_the_lost_worker_are_retried_on_the_other(worker_loss_run: WorkerLoss) -> None:
    outcome = worker_loss_run.outcome
    killed = [ti for ti in outcome.shards if ti.map_index in worker_loss_run.killed_shards]
    assert killed, outcome.diagnostics
    assert {(ti.state, ti.hostname) for ti in killed} == {("success", SURVIVING_WORKER)}, outcome.diagnostics
    assert all(ti.try_number >= 2 for ti in killed), outcome.diagnostics


def test_every_row_appears_exactly_once_after_the_worker_loss(worker_loss_run: WorkerLoss) -> None:
    outcome = worker_loss_run.outcome
    assert sorted(outcome.enriched_ids) == outcome.expected_ids, outcome.diagnostics
    assert outcome.statuses == {200}, outcome.diagnostics


def test_rebilling_stays_within_the_requests_in_flight_at_the_kill(worker_loss_run: WorkerLoss) -> None:
    outcome = worker_loss_run.outcome
    in_flight_at_most = len(worker_loss_run.killed_shards) * CONCURRENCY * RECORDS_PER_REQUEST
    assert outcome.rows <= outcome.records_billed <= outcome.rows + in_flight_at_most, outcome.diagnostics


def test_the_budget_holds_through_the_worker_loss(worker_loss_run: WorkerLoss) -> None:
    allowed = REQUESTS_PER_MINUTE / 60 * (BUDGET_WINDOW_SECONDS + ARRIVAL_SLACK_SECONDS)
    assert _most_in_window(worker_loss_run.outcome.request_arrivals, BUDGET_WINDOW_SECONDS) <= allowed


@dataclass(frozen=True)
class _StartedRun:
    name: str
    rows: int
    run_id: str
    output_prefix: Path
    enriched: Path
    triggered_at: float


def _run(deployment: Deployment, name: str, rows: int) -> RunOutcome:
    return _finish_run(deployment, _start_run(deployment, name, rows))


def _start_run(deployment: Deployment, name: str, rows: int) -> _StartedRun:
    """Write the run's manifest, zero the server's counters and trigger the DAG over REST."""
    folder = deployment.work / name
    folder.mkdir()
    manifest = _write_manifest(folder / "manifest.csv", deployment.photos[:rows])
    output_prefix, enriched = folder / "cutouts", folder / "enriched" / "products.parquet"
    conf = {
        "manifest_uri": str(manifest),
        "output_prefix": str(output_prefix),
        "output_manifest_uri": str(enriched),
        "shard_size": rows // SHARDS,
        # Every run here counts what it bills: a result store shared with the earlier runs of the
        # same photos would serve them all without a request.
        "cache_prefix": str(folder / "result-store"),
    }
    deployment.server.reset_stats()
    deployment.clock.clear()
    # The UI's trigger form sends a logical date too: the DAG's templates read `ds`.
    run_id = deployment.airflow.trigger(DAG_ID, conf, datetime.now(timezone.utc))
    return _StartedRun(name, rows, run_id, output_prefix, enriched, time.monotonic())


def _finish_run(deployment: Deployment, run: _StartedRun) -> RunOutcome:
    airflow = deployment.airflow
    state = airflow.wait_for_run(DAG_ID, run.run_id, RUN_TIMEOUT_SECONDS)
    table = pq.read_table(run.enriched).to_pylist() if run.enriched.exists() else []
    return RunOutcome(
        state=state,
        rows=run.rows,
        task_instances=tuple(airflow.task_instances(DAG_ID, run.run_id)),
        enriched_ids=tuple(str(row["sku"]) for row in table),
        statuses=frozenset(int(row["removebg_status_code"]) for row in table),
        records_billed=deployment.server.stats()["records_billed"],
        request_arrivals=tuple(deployment.clock.arrivals),
        seconds=time.monotonic() - run.triggered_at,
        diagnostics=airflow.diagnostics(),
    )


def _set_connection(deployment: Deployment, *, rate_limited: bool) -> None:
    """The `removebg_default` connection, stored through the REST API, with or without the shared budget."""
    extra = (
        {"requests_per_minute": REQUESTS_PER_MINUTE, "rate_limit_redis_url": deployment.rate_limit_redis_url}
        if rate_limited
        else {}
    )
    deployment.airflow.put_connection(
        "removebg_default",
        {
            "conn_type": "removebg",
            "host": deployment.server.base_url,
            "password": deployment.server.token,
            "extra": json.dumps(extra),
        },
    )


def _wait_for_shard_mid_way(deployment: Deployment, run: _StartedRun, worker: str) -> set[int]:
    """Wait until a shard task on `worker` has a request answered and its results not yet written.

    Returns the map indexes of every shard task then running on `worker`. A shard's progress is read
    from its checkpoints under the staging prefix (README: staging layout).
    """
    deadline = time.monotonic() + KILL_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        running = {
            ti.map_index
            for ti in deployment.airflow.task_instances(DAG_ID, run.run_id)
            if ti.task_id == SHARD_TASK and ti.state == "running" and ti.hostname == worker
        }
        if any(_is_mid_way(run.output_prefix, shard) for shard in running):
            return running
        time.sleep(0.5)
    raise TimeoutError(
        f"no shard task on {worker} was mid-way within {KILL_TIMEOUT_SECONDS:.0f} s\n"
        + deployment.airflow.diagnostics()
    )


def _is_mid_way(output_prefix: Path, shard: int) -> bool:
    staging = output_prefix / "_removebg_staging"
    answered = any(staging.glob(f"*/checkpoints/shard-{shard:05d}/answer-*.jsonl"))
    finished = any(staging.glob(f"*/results/shard-{shard:05d}.*.jsonl"))
    return answered and not finished


def _most_in_window(times: tuple[float, ...], seconds: float) -> int:
    """The largest number of `times` inside any window [t, t + seconds)."""
    ordered = sorted(times)
    return max(
        (bisect_right(ordered, start + seconds, lo=i) - i for i, start in enumerate(ordered)), default=0
    )


def _write_manifest(path: Path, photos: list[Path]) -> Path:
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["sku", "image_url"])
        for index, photo in enumerate(photos):
            writer.writerow([_sku(index), str(photo)])
    return path


def _sku(index: int) -> str:
    return f"SKU-{index:05d}"
