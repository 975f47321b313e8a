"""Processing one shard: triage its rows, send the rest in batches, copy the outputs, checkpoint each step."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, wait
from http import HTTPStatus
from typing import Any, NamedTuple

from removebg_provider.client import ImageRecord, RecordResult, RemoveBgClient
from removebg_provider.errors import (
    ApiRequestError,
    ConfigurationError,
    CopyError,
    OutputGoneError,
    StorageError,
    TransientApiError,
)
from removebg_provider.outputs import OutputCopier
from removebg_provider.pipeline import store_index
from removebg_provider.pipeline.budget import Budget
from removebg_provider.pipeline.checkpoints import ShardStaging, now
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.pipeline.lookups import ShardLookups
from removebg_provider.pipeline.planning import (
    CANONICAL,
    ID,
    INTERNAL_COLUMNS,
    REF,
    ROW,
    Plan,
    ShardDescriptor,
    read_parquet,
)
from removebg_provider.pipeline.results import RowResult, RunSummary, enforce_failure_policy, summarise
from removebg_provider.pipeline.store import ResultStore, StoredResult
from removebg_provider.pipeline.workers import WORKERS_PER_SLOT, BatchWorkers
from removebg_provider.progress import Progress, ProgressCallback
from removebg_provider.storage import Storage, comparable_uri, scheme_of
from removebg_provider.vocabulary import CUTOUT, MASK, RowStatus

log = logging.getLogger(__name__)

REUSED_TEXT = "OK (reused from the result store: same image content and options, not sent again)"

Row = dict[str, Any]

STOPPED_TEXT = "not processed: the run was stopped"
STOPPED_ERROR = "not sent: the run was stopped before this row's request; run again to finish it"


def process_shard(
    shard: ShardDescriptor,
    plan_: Plan,
    client: RemoveBgClient,
    storage: Storage,
    *,
    copier: OutputCopier | None = None,
    budget: Budget | None = None,
    on_progress: ProgressCallback | None = None,
    request_slots: threading.Semaphore | None = None,
    batch_workers: BatchWorkers | None = None,
    stop: threading.Event | None = None,
    all_batches_started: Callable[[], None] | None = None,
) -> RunSummary:
    """Remove the backgrounds of one shard's rows, copy the outputs and store the shard's results.

    A batch is checkpointed twice: its API answer (temporary output URLs) as soon as the request
    returns, while the batch still holds its request slot, then its final results once the outputs
    are copied. A retried task sends no request for a row that already succeeded, and copies the
    outputs of a row that was answered but not finished from the stored URLs, without a request.
    Authentication and out-of-credits errors stop the shard at once; every other problem becomes
    the row's status. Raises FailurePolicyError, after storing the results, when more than
    `max_failed_fraction` of the shard's rows failed. `request_slots`, shared by shards processed
    side by side, caps their requests in flight together (`concurrency` when not given), and
    `batch_workers`, shared the same way, run their batches shard after shard (the shard's own
    `WORKERS_PER_SLOT x concurrency` threads when not given). Once `stop` is set no new request
    starts: requests in flight finish and are checkpointed, and the rows not reached get status
    499 (`RowStatus.STOPPED`) in the stored results. `all_batches_started` is called once the last
    of the shard's batches has started, while they may still be copying: a run reads its next shard then.
    """
    config = plan_.config
    check_client_agrees(config, client)
    work = ShardWork.load(shard, plan_, storage)
    owned_copier = copier is None
    copier = copier or OutputCopier(storage, pool_size=WORKERS_PER_SLOT * config.requests_in_flight)
    budget = budget or Budget(config.max_billable_records)
    try:
        results = work.run(
            client,
            copier,
            budget,
            on_progress,
            request_slots,
            batch_workers,
            stop=stop,
            all_batches_started=all_batches_started,
        )
    finally:
        if owned_copier:
            copier.close()
    work.staging.write_results((row[ROW] for row in work.rows), results, work.billed_earlier + work.billed)
    work.lookups.write_index(plan_.run_id, shard.index)
    summary = summarise(results.values(), billed=work.billed, shard_index=shard.index)
    log.info("shard %d done: %s", shard.index, json.dumps(summary.to_dict()))
    enforce_failure_policy(
        summary, config.max_failed_fraction, f"shard {shard.index} of {config.manifest_uri}"
    )
    return summary


def check_client_agrees(config: PipelineConfig, client: RemoveBgClient) -> None:
    """Refuse, before any request, a client whose own settings contradict the run's."""
    batch = config.records_per_request
    if client.mode != config.mode or client.max_records_per_request < batch:
        raise ConfigurationError(
            f"the API client (mode={client.mode}, max_records_per_request={client.max_records_per_request}) "
            f"does not match the run (mode={config.mode}, max_records_per_request={batch}); "
            "build the client with **config.client_settings()"
        )


class ShardWork:
    """The rows of one shard and what each still needs."""

    def __init__(self, shard: ShardDescriptor, plan_: Plan, storage: Storage, rows: list[Row]) -> None:
        self.shard = shard
        self.config = plan_.config
        self.storage = storage
        self.rows = rows
        self.staging = ShardStaging(shard, plan_.config, plan_.run_id, storage)
        checkpoints = self.staging.load_checkpoints()
        self.prior = checkpoints.done if self.config.resume else {}
        self.answers = checkpoints.usable_answers(now()) if self.config.resume else {}
        self.billed_earlier = checkpoints.billed_in_run
        prefix, holder = plan_.config.store_prefix, f"{plan_.run_id}/shard-{shard.index}"
        self.store = ResultStore(prefix, storage, holder) if prefix else None
        # Only a plan with a fingerprint column joins the index (`store_index`): no other shard looks.
        indexed = (
            store_index.indexed_uri(plan_.config, shard.index) if plan_.config.fingerprint_column else None
        )
        self.lookups = ShardLookups(rows, plan_.config, storage, self.store, indexed)
        self.billed = 0
        self._billed_lock = threading.Lock()
        # Image bytes read by this shard's workers: digest -> (id, row) of the first row to read them,
        # and each later row with the same bytes -> that owner. Later rows are not sent.
        self._byte_owners: dict[bytes, tuple[str, int]] = {}
        self._byte_duplicates: dict[int, tuple[str, int]] = {}
        self._owners_lock = threading.Lock()
        # Set by the caller of `run` to stop new requests (signals, Airflow's on_kill).
        self._stop = threading.Event()

    @classmethod
    def load(cls, shard: ShardDescriptor, plan_: Plan, storage: Storage) -> ShardWork:
        """The shard's rows (internal columns only) with what earlier attempts checkpointed."""
        table = read_parquet(shard.uri, storage, columns=list(INTERNAL_COLUMNS))
        return cls(shard, plan_, storage, table.to_pylist())

    def classify(self) -> Iterator[tuple[str, Row, RowResult | None]]:
        """Each row with its class: duplicate, without_reference, resumed, reused, copy_only or todo."""
        stored = self.lookups.stored_results()
        for row in self.rows:
            reference = row[REF]
            if row[CANONICAL] is not None:
                yield "duplicate", row, None
            elif not reference:
                error = f"no image reference in column {self.config.image_column!r}"
                yield "without_reference", row, self._failed(row[ID], RowStatus.NO_REFERENCE, error)
            elif (resumed := self._resumable(row)) is not None:
                yield "resumed", row, resumed
            elif row[ROW] in stored:
                yield "reused", row, None
            elif self._key(row) in self.answers:
                yield "copy_only", row, None
            else:
                yield "todo", row, None

    def classify_counts(self) -> Counter[str]:
        """How many rows fall in each class of `classify`."""
        return Counter(kind for kind, _, _ in self.classify())

    def run(
        self,
        client: RemoveBgClient,
        copier: OutputCopier,
        budget: Budget,
        on_progress: ProgressCallback | None,
        request_slots: threading.Semaphore | None,
        batch_workers: BatchWorkers | None = None,
        *,
        stop: threading.Event | None = None,
        all_batches_started: Callable[[], None] | None = None,
    ) -> dict[int, RowResult]:
        """Finish every row that still needs work; results by row number (499 for rows `stop` kept back).

        `all_batches_started` is called once the last of the shard's batches has started.
        """
        results: dict[int, RowResult] = {}
        todo: list[Row] = []
        copy_only: list[Row] = []
        reused: list[Row] = []
        for kind, row, row_result in self.classify():
            if kind == "todo":
                todo.append(row)
            elif kind == "copy_only":
                copy_only.append(row)
            elif kind == "reused":
                reused.append(row)
            elif row_result is not None:
                results[row[ROW]] = row_result
        pending_rows = len(todo) + len(copy_only) + len(reused)
        progress = Progress(pending_rows, f"shard {self.shard.index}", on_progress)
        if on_progress is not None and results:
            on_progress(len(results), 0, pending_rows)
        log.info(
            "shard %d: %d rows, %d to send, %d to copy from an earlier answer without a request, "
            "%d reused from the result store, %d already done or not sendable",
            self.shard.index,
            len(self.rows),
            len(todo),
            len(copy_only),
            len(reused),
            len(results),
        )
        size = self.config.records_per_request
        concurrency = self.config.requests_in_flight
        stored = self.lookups.stored_results()
        to_copy = [copy_only[i : i + size] for i in range(0, len(copy_only), size)]
        # Served rows cost no request and are not checkpointed: each worker takes a share of them (at
        # least a request's worth), not a request's worth at a time.
        reuse_size = max(size, -(-len(reused) // (WORKERS_PER_SLOT * concurrency)))
        to_reuse = [reused[i : i + reuse_size] for i in range(0, len(reused), reuse_size)]
        to_send = [todo[i : i + size] for i in range(0, len(todo), size)]
        slots = request_slots or threading.Semaphore(concurrency)
        self._stop = stop or threading.Event()
        workers = batch_workers or BatchWorkers(WORKERS_PER_SLOT * concurrency)
        try:
            # Answered rows first: their temporary URLs are the ones closest to expiring.
            sending = (client, copier, budget, progress, slots)
            futures = workers.queue(
                [functools.partial(self._copy_answered, batch, copier, progress) for batch in to_copy]
                + [functools.partial(self._reuse_batch, batch, stored, *sending) for batch in to_reuse]
                + [functools.partial(self._process_batch, batch, *sending) for batch in to_send],
                all_started=all_batches_started,
            )
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            # The batches already running finish before the shard returns, in a shared pool too.
            wait(pending)
            for batch, future in zip(to_copy + to_reuse + to_send, futures, strict=True):
                if future.cancelled():
                    continue
                for row, row_result in zip(batch, future.result(), strict=True):
                    if row_result is not None:
                        results[row[ROW]] = row_result
        finally:
            if batch_workers is None:
                workers.close()
        self._share_owner_results(results)
        return results

    def _key(self, row: Row) -> tuple[str, str]:
        return row[ID], self.lookups.fingerprint(row)

    def _share_owner_results(self, results: dict[int, RowResult]) -> None:
        """Give each row whose bytes repeat an earlier row's that row's result, and checkpoint it."""
        if not self._byte_duplicates:
            return
        rows = {row[ROW]: row for row in self.rows}
        shared: list[RowResult] = []
        for row_number, (owner_id, owner_row) in self._byte_duplicates.items():
            owner = results[owner_row]
            row = rows[row_number]
            results[row_number] = dataclasses.replace(
                owner,
                id=row[ID],
                status_text=f"{owner.status_text} (same image bytes as {owner_id})",
                attempts=0,
                fingerprint=self.lookups.fingerprint(row),
                source_fingerprint=self.lookups.sources.get(row[ROW]),
            )
            shared.append(results[row_number])
        self.staging.write_finished(shared)
        log.info(
            "shard %d: %d rows shared the result of a row with identical bytes", self.shard.index, len(shared)
        )

    def _process_batch(
        self,
        batch: list[Row],
        client: RemoveBgClient,
        copier: OutputCopier,
        budget: Budget,
        progress: Progress,
        request_slots: threading.Semaphore,
    ) -> list[RowResult | None]:
        """Send a batch and copy its outputs; None for rows whose bytes an earlier row owns.

        With a result store, each image is claimed first. An image another run is sending is not
        sent but waited for, then served from the store; one stored since this shard looked is served.
        """
        if self.store is None:
            return self._send_batch(batch, client, copier, budget, progress, request_slots)
        args = (client, copier, budget, progress, request_slots)
        mine, elsewhere = self.lookups.claim(batch)
        by_id: dict[str, RowResult | None] = {}
        try:
            # Another run may have stored an image since this shard looked: serve it instead.
            now_stored = {
                row[ROW]: entry
                for row in mine
                if row[ROW] in self.lookups.sources and (entry := self.lookups.current_entry(row)) is not None
            }
            served, stale = self._serve_stored(
                [r for r in mine if r[ROW] in now_stored], now_stored, progress
            )
            by_id.update(served)
            to_send = [row for row in mine if row[ROW] not in now_stored] + stale
            if to_send:
                by_id.update(zip(_ids(to_send), self._send_batch(to_send, *args), strict=True))
        finally:
            for row in mine:
                if row[ROW] in self.lookups.sources:
                    self.store.release(self.lookups.store_key(row))
        if elsewhere:
            by_id.update(zip(_ids(elsewhere), self._after_other_runs(elsewhere, *args), strict=True))
        return [by_id.get(row[ID]) for row in batch]

    def _after_other_runs(
        self,
        rows: list[Row],
        client: RemoveBgClient,
        copier: OutputCopier,
        budget: Budget,
        progress: Progress,
        request_slots: threading.Semaphore,
    ) -> list[RowResult | None]:
        """Wait for the results other runs are storing for `rows`; rows they gave up on are processed here."""
        assert self.store is not None
        args = (client, copier, budget, progress, request_slots)
        log.info(
            "shard %d: %d images are being sent by another run; waiting for them", self.shard.index, len(rows)
        )
        found = {row[ROW]: self.store.wait_for(self.lookups.store_key(row)) for row in rows}
        stored = {number: entry for number, entry in found.items() if entry is not None}
        served = [row for row in rows if row[ROW] in stored]
        again = [row for row in rows if row[ROW] not in stored]
        by_id, stale = self._serve_stored(served, stored, progress)
        again += stale
        if again:
            by_id.update(zip(_ids(again), self._process_batch(again, *args), strict=True))
        return [by_id.get(row[ID]) for row in rows]

    def _send_batch(
        self,
        batch: list[Row],
        client: RemoveBgClient,
        copier: OutputCopier,
        budget: Budget,
        progress: Progress,
        request_slots: threading.Semaphore,
    ) -> list[RowResult | None]:
        """Send a batch and copy its outputs; None for rows whose bytes an earlier row owns."""
        outcomes: dict[str, RowResult] = {}
        if self._stop.is_set():
            return self._stopped(batch, outcomes, progress)
        records: list[ImageRecord] = []
        for row in batch:
            record = self._record(row)
            if isinstance(record, RowResult):
                outcomes[row[ID]] = record
            elif not self._repeats_earlier_bytes(row, record):
                records.append(record)
        if records and not budget.reserve(len(records)):
            error = f"not processed: max_billable_records={budget.limit} reached"
            for record in records:
                outcomes[record.id] = self._failed(record.id, RowStatus.BUDGET_REACHED, error)
            records = []
        fingerprints = {row[ID]: self.lookups.fingerprint(row) for row in batch}
        api_results = self._send(records, client, request_slots, fingerprints) if records else []
        if api_results is None:
            return self._stopped(batch, outcomes, progress)
        sent = {record.id: record for record in records}
        rows = {row[ID]: row for row in batch}
        for api_result in api_results:
            answered = _Answered(api_result, sent[api_result.id], rows[api_result.id])
            outcomes[api_result.id] = self._copy_fresh(
                answered, client, copier, budget, request_slots, fingerprints
            )
        return self._finish(batch, outcomes, progress)

    def _send(
        self,
        records: list[ImageRecord],
        client: RemoveBgClient,
        request_slots: threading.Semaphore,
        fingerprints: dict[str, str],
    ) -> list[RecordResult] | None:
        """One request's answers, checkpointed and counted as billed before its slot is released.

        None when the run was stopped while the request waited for its slot.
        """
        with request_slots:
            # Checked again once a slot is free: batches wait here while the requests before them run.
            if self._stop.is_set():
                return None
            api_results, billed = self._call_api(records, client)
            if billed:
                # Durable before the slot is released: only requests holding a slot can be
                # billed without a checkpoint, so a kill re-bills at most concurrency x batch.
                self.staging.write_answer(api_results, fingerprints, billed)
                with self._billed_lock:
                    self.billed += billed
        return api_results

    def _copy_fresh(
        self,
        answered: _Answered,
        client: RemoveBgClient,
        copier: OutputCopier,
        budget: Budget,
        request_slots: threading.Semaphore,
        fingerprints: dict[str, str],
    ) -> RowResult:
        """Copy a just-answered record's outputs; if a URL is gone even after retries, request it once more.

        The second request is billed (and counted), so it happens once per row at most; a URL gone
        again gives the row 410.
        """
        api_result, record, row = answered
        try:
            return self._copy_outputs(api_result, copier, row, fresh=True)
        except OutputGoneError as exc:
            gone = exc
        if not budget.reserve(1):
            return self._copy_failed(api_result, gone)
        log.warning("%s; requesting record %s once more", gone, api_result.id)
        answered_again = self._send([record], client, request_slots, fingerprints)
        if answered_again is None:
            return self._copy_failed(api_result, gone)
        (again,) = answered_again
        try:
            return self._copy_outputs(again, copier, row, fresh=True)
        except OutputGoneError as gone_again:
            return self._copy_failed(again, gone_again, "output URL gone twice, requested again once")

    def _reuse_batch(
        self,
        batch: list[Row],
        stored: Mapping[int, StoredResult],
        client: RemoveBgClient,
        copier: OutputCopier,
        budget: Budget,
        progress: Progress,
        request_slots: threading.Semaphore,
    ) -> list[RowResult | None]:
        """Rows found in the store: served without a request; rows whose stored outputs changed are sent."""
        by_id, stale = self._serve_stored(batch, stored, progress)
        size = self.config.records_per_request
        for start in range(0, len(stale), size):
            resent = stale[start : start + size]
            sent = self._process_batch(resent, client, copier, budget, progress, request_slots)
            by_id.update(zip(_ids(resent), sent, strict=True))
        return [by_id.get(row[ID]) for row in batch]

    def _serve_stored(
        self, batch: list[Row], stored: Mapping[int, StoredResult], progress: Progress
    ) -> tuple[dict[str, RowResult | None], list[Row]]:
        """Results of the rows whose stored outputs could be put in place, and the rows whose could not."""
        assert self.store is not None
        outcomes: dict[str, RowResult] = {}
        stale: list[Row] = []
        for row in batch:
            entry = stored[row[ROW]]
            destinations = entry.destinations(self.config, row[ID])
            if self.store.serve(entry, destinations):
                outcomes[row[ID]] = self._reused(row, entry, destinations)
                self.lookups.served(entry)
            else:
                stale.append(row)
        # Not checkpointed: a later try of the shard finds them in the store again, without a request.
        progress.advance(len(outcomes), 0)
        return dict(outcomes), stale

    def _reused(self, row: Row, entry: StoredResult, destinations: dict[str, str]) -> RowResult:
        return RowResult(
            id=row[ID],
            status_code=RowStatus.OK,
            status_text=REUSED_TEXT,
            outputs=destinations,
            width=entry.width,
            height=entry.height,
            request_id=entry.request_id,
            mode=entry.mode,
            attempts=0,
            processed_at=now(),
            foreground_fraction=entry.foreground_fraction,
            quality_flags=entry.quality_flags,
            fingerprint=self.lookups.fingerprint(row),
            source_fingerprint=self.lookups.sources.get(row[ROW]),
        )

    def _repeats_earlier_bytes(self, row: Row, record: ImageRecord) -> bool:
        if record.data is None:
            return False
        digest = hashlib.blake2b(record.data, digest_size=16).digest()
        with self._owners_lock:
            owner = self._byte_owners.setdefault(digest, (row[ID], row[ROW]))
            if owner[1] == row[ROW]:
                return False
            self._byte_duplicates[row[ROW]] = owner
            return True

    def _copy_answered(
        self, batch: list[Row], copier: OutputCopier, progress: Progress
    ) -> list[RowResult | None]:
        """Finish rows the API answered in an interrupted attempt, from the stored temporary URLs."""
        outcomes: dict[str, RowResult] = {}
        if self._stop.is_set():
            return self._stopped(batch, outcomes, progress)
        for row in batch:
            copied = self._copy_outputs(self.answers[self._key(row)], copier, row)
            if copied.ok:
                text = f"{copied.status_text} (outputs copied from an earlier answer, not sent again)"
                copied = dataclasses.replace(copied, status_text=text)
            outcomes[row[ID]] = copied
        return self._finish(batch, outcomes, progress)

    def _finish(
        self, batch: list[Row], outcomes: dict[str, RowResult], progress: Progress
    ) -> list[RowResult | None]:
        stamped = {
            row[ID]: dataclasses.replace(
                outcomes[row[ID]],
                fingerprint=self.lookups.fingerprint(row),
                source_fingerprint=self.lookups.sources.get(row[ROW]),
            )
            for row in batch
            if row[ID] in outcomes
        }
        self.staging.write_finished(list(stamped.values()))
        progress.advance(len(batch), sum(1 for r in stamped.values() if not r.ok))
        return [stamped.get(row[ID]) for row in batch]

    def _stopped(
        self, batch: list[Row], outcomes: dict[str, RowResult], progress: Progress
    ) -> list[RowResult | None]:
        """Finish a batch a stop kept from its request: rows without an outcome yet get 499."""
        for row in batch:
            if row[ID] not in outcomes:
                outcomes[row[ID]] = dataclasses.replace(
                    self._failed(row[ID], RowStatus.STOPPED, STOPPED_ERROR), status_text=STOPPED_TEXT
                )
        return self._finish(batch, outcomes, progress)

    def _call_api(self, records: list[ImageRecord], client: RemoveBgClient) -> tuple[list[RecordResult], int]:
        """The API's answer for each record, and how many records the API billed for it."""
        try:
            return client.remove_batch(records, self.config.options), len(records)
        except TransientApiError as exc:
            failures = [
                RecordResult.failure(record.id, RowStatus.API_UNAVAILABLE, "API unavailable", str(exc))
                for record in records
            ]
            return failures, 0
        except ApiRequestError as exc:
            if exc.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE and len(records) > 1:
                # One oversized image must not sink its batch mates on every rerun: send each alone.
                alone = [self._call_api_unless_stopped(record, client) for record in records]
                answers = [answer for answered, _ in alone for answer in answered]
                return answers, sum(billed for _, billed in alone)
            failures = [
                RecordResult.failure(record.id, exc.status_code, "request rejected by the API", str(exc))
                for record in records
            ]
            return failures, 0

    def _call_api_unless_stopped(
        self, record: ImageRecord, client: RemoveBgClient
    ) -> tuple[list[RecordResult], int]:
        if self._stop.is_set():
            return [
                RecordResult.failure(record.id, RowStatus.STOPPED, STOPPED_TEXT, STOPPED_ERROR, attempts=0)
            ], 0
        return self._call_api([record], client)

    def _record(self, row: Row) -> ImageRecord | RowResult:
        reference: str = row[REF]
        if scheme_of(reference) in ("http", "https"):
            return ImageRecord(id=row[ID], url=reference)
        try:
            data = self.storage.read_bytes(reference, limit=self.config.max_image_bytes)
        except StorageError as exc:
            return self._failed(row[ID], RowStatus.UNREADABLE_IMAGE, str(exc))
        if not data:
            return self._failed(row[ID], RowStatus.UNREADABLE_IMAGE, f"{reference} is empty")
        return ImageRecord(id=row[ID], data=data)

    def _copy_outputs(
        self, api_result: RecordResult, copier: OutputCopier, row: Row, *, fresh: bool = False
    ) -> RowResult:
        """The row result of an API answer: its outputs copied into storage, checked, kept in the store.

        `fresh` (the API has just answered): a gone output URL raises OutputGoneError instead.
        """
        base = self._answered(api_result)
        if not api_result.ok:
            return base
        destinations = self.config.outputs_for(api_result.id)
        if MASK.name in destinations and CUTOUT.name not in api_result.outputs:
            # Ximilar's current documentation: a binary-mask request returns the mask instead of the cutout.
            del destinations[CUTOUT.name]
        try:
            data = copier.copy_answer(api_result.outputs, destinations, fresh=fresh)
        except CopyError as exc:
            if fresh and isinstance(exc, OutputGoneError):
                raise
            return self._copy_failed(api_result, exc)
        copied = dataclasses.replace(base, outputs=destinations)
        if self.config.quality_check:
            # Imported at the first copy (OpenCV and Pillow, 0.1 s), not before the first request.
            from removebg_provider import quality

            verdict = quality.assess(data.get(CUTOUT.name), data.get(MASK.name))
            copied = dataclasses.replace(
                copied, foreground_fraction=verdict.foreground_fraction, quality_flags=verdict.flags
            )
        self.lookups.keep(row, copied, {kind: (uri, data[kind]) for kind, uri in destinations.items()})
        return copied

    def _copy_failed(self, api_result: RecordResult, exc: CopyError, why: str | None = None) -> RowResult:
        text = f"{exc.status_text} ({why})" if why else exc.status_text
        return dataclasses.replace(
            self._answered(api_result), status_code=exc.status_code, status_text=text, error=str(exc)
        )

    def _answered(self, api_result: RecordResult) -> RowResult:
        return RowResult(
            id=api_result.id,
            status_code=api_result.status_code,
            status_text=api_result.status_text,
            error=api_result.error,
            width=api_result.width,
            height=api_result.height,
            request_id=api_result.request_id,
            mode=self.config.mode,
            attempts=api_result.attempts,
            processed_at=now(),
        )

    def _resumable(self, row: Row) -> RowResult | None:
        previous = self.prior.get(self._key(row))
        if previous is None or not previous.outputs:
            return None
        if self.store is not None:
            # A checkpoint cannot tell that a later run overwrote its outputs (an image changed and
            # changed back): the store's entry, checked against the outputs' versions, can.
            entry = self.lookups.stored_results().get(row[ROW])
            stored = {kind: comparable_uri(out.uri) for kind, out in entry.outputs.items()} if entry else None
            checkpointed = {kind: comparable_uri(uri) for kind, uri in previous.outputs.items()}
            return previous if stored == checkpointed else None
        # The fingerprint fixes the output kinds and keys; a row that shared the result of a row
        # with identical bytes records that row's outputs, so only their existence is checked.
        if not all(self.storage.exists(uri) for uri in previous.outputs.values()):
            return None
        return previous

    def _failed(self, record_id: str, code: int, error: str) -> RowResult:
        return RowResult(
            id=record_id,
            status_code=code,
            status_text="not processed",
            error=error,
            mode=self.config.mode,
            attempts=0,
            processed_at=now(),
        )


def _ids(rows: list[Row]) -> list[str]:
    return [row[ID] for row in rows]


class _Answered(NamedTuple):
    """A record the API has just answered: its answer, what was sent, and its row."""

    result: RecordResult
    record: ImageRecord
    row: Row
