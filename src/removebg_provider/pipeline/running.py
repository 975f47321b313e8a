"""A whole run in one process, and what it would bill: plan, every shard (two queued at a time), merge."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from removebg_provider.client import RemoveBgClient
from removebg_provider.errors import BudgetExceededError, RunStoppedError
from removebg_provider.outputs import OutputCopier
from removebg_provider.pipeline.budget import Budget
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.pipeline.merging import merge
from removebg_provider.pipeline.planning import Plan, plan
from removebg_provider.pipeline.results import BillingEstimate, RunSummary
from removebg_provider.pipeline.shard import (
    ShardWork,
    check_client_agrees,
    process_shard,
)
from removebg_provider.pipeline.workers import WORKERS_PER_SLOT, BatchWorkers
from removebg_provider.progress import ProgressCallback
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus

# Shards whose batches wait in the batch workers' queue at once: while one shard's batches are
# being taken, the next shard's are queued behind them.
_SHARDS_QUEUED = 2
# Shards alive at once: a shard whose batches have all started still copies, then writes its
# results; each holds its rows and results in memory.
_SHARDS_ALIVE = 8


def estimate_billing(plan_: Plan, storage: Storage) -> BillingEstimate:
    """Count the records a run of `plan_` would bill, without calling the API."""
    counts: Counter[str] = Counter()
    for shard in plan_.shards:
        counts.update(ShardWork.load(shard, plan_, storage).classify_counts())
    return BillingEstimate(
        rows=plan_.total_rows,
        duplicates=plan_.duplicate_rows,
        resumed=counts["resumed"],
        copy_only=counts["copy_only"],
        reused=counts["reused"],
        without_reference=counts["without_reference"],
        billable=counts["todo"],
    )


def check_budget(plan_: Plan, storage: Storage) -> BillingEstimate | None:
    """Raise BudgetExceededError before any request when the run would pass `max_billable_records`."""
    limit = plan_.config.max_billable_records
    if limit is None:
        return None
    estimate = estimate_billing(plan_, storage)
    if estimate.billable > limit:
        raise BudgetExceededError(
            f"{plan_.config.manifest_uri} needs {estimate.billable} billable records "
            f"(after {estimate.resumed} resumed, {estimate.reused} reused from the result store and "
            f"{estimate.duplicates} duplicate rows), over max_billable_records={limit}; nothing was sent"
        )
    return estimate


def run(
    config: PipelineConfig,
    client: RemoveBgClient,
    storage: Storage,
    *,
    on_progress: ProgressCallback | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    stop: threading.Event | None = None,
) -> RunSummary:
    """Plan, process every shard and merge: the whole pipeline in one process (the CLI's path).

    Shards share `concurrency` request slots and one set of batch workers that takes each shard's
    batches together, in turn. Two shards' batches are queued at a time, and the next shard is read
    as soon as the last batch of an earlier one has started, while that shard is still copying its
    outputs: the queue never runs dry between shards, so the API stays busy to the last round.
    The failure policy is applied once, run-wide.
    Connection-level settings the config leaves unset are taken from the client's.

    Setting `stop` (from a signal handler, another thread, Airflow's `on_kill`) stops the run
    gracefully: no new request starts, the requests in flight finish and are checkpointed, and the
    enriched manifest is written with every row once (rows not reached: status 499); then
    RunStoppedError is raised with its summary. A rerun resumes without billing the finished rows.
    """
    config = config.resolved(
        {
            "mode": client.mode,
            "max_records_per_request": client.max_records_per_request,
            "concurrency": client.concurrency,
        }
    )
    check_client_agrees(config, client)
    plan_ = plan(config, storage)
    check_budget(plan_, storage)
    stop = stop or threading.Event()
    if on_plan is not None:
        on_plan(plan_)
    # Stopped rows are not failures, nor are failed ones until every shard is done: the failure
    # policy is applied to the whole run's summary.
    relaxed = dataclasses.replace(plan_, config=dataclasses.replace(plan_.config, max_failed_fraction=1.0))
    _process_shards(relaxed, client, storage, on_progress, stop)
    if not stop.is_set():
        return merge(plan_, storage)
    summary = merge(relaxed, storage)
    raise RunStoppedError(
        f"the run of {config.manifest_uri} was stopped: {summary.succeeded} of {summary.rows} rows done, "
        f"{summary.by_status.get(RowStatus.STOPPED, 0)} not reached (status {RowStatus.STOPPED:d}); "
        f"enriched manifest {config.output_manifest_uri}; "
        "run again to finish: finished rows are not billed again",
        summary=summary,
    )


def _process_shards(
    plan_: Plan,
    client: RemoveBgClient,
    storage: Storage,
    on_progress: ProgressCallback | None,
    stop: threading.Event,
) -> None:
    """Every shard of `plan_`, sharing request slots, batch workers and a budget, two shards queued.

    Raises the first failure in plan order, once every shard started has ended; no shard starts
    after a failure.
    """
    concurrency = plan_.config.requests_in_flight
    budget = Budget(plan_.config.max_billable_records)
    slots = threading.Semaphore(concurrency)
    # As many batch workers as the queued shards would have of their own: while copies are slow (a
    # busy disk syncing every file), more of them overlap the requests. Each may be downloading, so
    # the copier keeps a connection for each.
    workers = _SHARDS_QUEUED * WORKERS_PER_SLOT * concurrency
    copier = OutputCopier(storage, pool_size=workers)
    queued, alive = threading.Semaphore(_SHARDS_QUEUED), threading.Semaphore(_SHARDS_ALIVE)
    failed = threading.Event()
    futures: list[Future[RunSummary]] = []
    try:
        # The shards' pool closes first: every shard started ends before the batch workers stop.
        with (
            contextlib.closing(BatchWorkers(workers)) as batches,
            ThreadPoolExecutor(_SHARDS_ALIVE, thread_name_prefix="removebg-shard") as shards,
        ):
            for shard in plan_.shards:
                alive.acquire()
                queued.acquire()
                place = _Place(queued)
                if failed.is_set():
                    place.give_back()
                    alive.release()
                    break
                future = shards.submit(
                    process_shard,
                    shard,
                    plan_,
                    client,
                    storage,
                    copier=copier,
                    budget=budget,
                    on_progress=on_progress,
                    request_slots=slots,
                    batch_workers=batches,
                    stop=stop,
                    all_batches_started=place.give_back,
                )
                future.add_done_callback(functools.partial(_shard_ended, place, alive, failed))
                futures.append(future)
        for future in futures:
            future.result()
    finally:
        copier.close()


def _shard_ended(
    place: _Place, alive: threading.Semaphore, failed: threading.Event, future: Future[RunSummary]
) -> None:
    # Failure is marked before the places are given back, so no shard is started after it.
    if future.exception() is not None:
        failed.set()
    place.give_back()
    alive.release()


class _Place:
    """A place taken from a semaphore, given back once however often it is given back."""

    def __init__(self, semaphore: threading.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = True
        self._lock = threading.Lock()

    def give_back(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._semaphore.release()
