"""A whole run in one process, and what it would bill: plan, every shard side by side, merge."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from removebg_provider.client import RemoveBgClient
from removebg_provider.errors import BudgetExceededError, RunStoppedError
from removebg_provider.outputs import OutputCopier
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.pipeline.merging import merge
from removebg_provider.pipeline.planning import Plan, plan
from removebg_provider.pipeline.results import BillingEstimate, RunSummary
from removebg_provider.pipeline.shard import (
    Budget,
    ShardWork,
    check_client_agrees,
    process_shard,
)
from removebg_provider.pipeline.workers import WORKERS_PER_SLOT, BatchWorkers
from removebg_provider.progress import ProgressCallback
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus

_SHARDS_SIDE_BY_SIDE = 2


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

    Two shards are processed side by side, sharing `concurrency` request slots and one set of batch
    workers that takes each shard's batches together, in turn: while one shard's last batches run,
    the next shard is read and its batches queue behind them, so the API stays busy between shards.
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
    """Every shard of `plan_`, two side by side, sharing request slots, batch workers and a budget."""
    concurrency = plan_.config.requests_in_flight
    budget = Budget(plan_.config.max_billable_records)
    slots = threading.Semaphore(concurrency)
    # As many batch workers as the shards side by side would have of their own: while copies are
    # slow (a busy disk syncing every file), more of them overlap the requests. Each may be
    # downloading, so the copier keeps a connection for each.
    workers = _SHARDS_SIDE_BY_SIDE * WORKERS_PER_SLOT * concurrency
    copier = OutputCopier(storage, pool_size=workers)
    try:
        with (
            ThreadPoolExecutor(_SHARDS_SIDE_BY_SIDE, thread_name_prefix="removebg-shard") as shards,
            contextlib.closing(BatchWorkers(workers)) as batches,
        ):
            futures = [
                shards.submit(
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
                )
                for shard in plan_.shards
            ]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in futures:
                if not future.cancelled():
                    future.result()
    finally:
        copier.close()
