"""Plan shards, process a shard, merge results: the manifest pipeline, resumable, without Airflow."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from removebg_provider import quality, report
from removebg_provider.client import ImageRecord, RecordResult, RemovalOptions, RemoveBgClient
from removebg_provider.errors import (
    ApiRequestError,
    BudgetExceededError,
    FailurePolicyError,
    ManifestError,
    RemoveBgError,
    StorageError,
    TransientApiError,
)
from removebg_provider.manifest import (
    RESULT_SCHEMA,
    ManifestWriter,
    derive_id,
    iter_batches,
    read_schema,
    require_columns,
)
from removebg_provider.progress import Progress, ProgressCallback
from removebg_provider.storage import (
    DEFAULT_OUTPUT_KEY_TEMPLATE,
    CopyError,
    OutputCopier,
    Storage,
    join_uri,
    output_uri,
    safe_key_id,
    scheme_of,
    unique_name,
)

log = logging.getLogger(__name__)

STATUS_OK = 200
STATUS_NO_REFERENCE = 400
STATUS_BUDGET_REACHED = 402
STATUS_UNREADABLE_IMAGE = 422
STATUS_API_UNAVAILABLE = 503
STATUS_NOT_PROCESSED = 504

DEFAULT_MAX_MAP_LENGTH = 1024
_ROW = "__removebg_row"
_ID = "__removebg_id"
_REF = "__removebg_ref"
_CANONICAL = "__removebg_canonical"
_INTERNAL_COLUMNS = (_ROW, _ID, _REF, _CANONICAL)
_ANSWER = "answer"
_IMAGE_EXTENSIONS = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}
_FIRST_ERRORS = 5
_SHARDS_SIDE_BY_SIDE = 2
# A worker releases its request slot before copying outputs; twice as many workers as slots keep
# every slot busy while the other half copies.
_WORKERS_PER_SLOT = 2
# The API keeps outputs 24 hours; an answer older than this is sent again rather than copied late.
_ANSWER_LIFETIME = timedelta(hours=23)
_FAR_FUTURE = datetime.max.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that decides what a run produces; stored with the plan so every task agrees.

    `output_key_template` may use `{id}`, `{kind}`, `{suffix}` and `{ext}`. `staging_prefix`
    defaults to a folder under `output_prefix` named after the manifest and output manifest, so a
    rerun of the same job finds its checkpoints. `quality_check` decodes every cutout (or its mask)
    for the foreground fraction and quality flags; turning it off saves that decode (about 1 ms per
    0.1 MP PNG cutout, see docs/BENCHMARKS.md) and leaves both columns empty.
    """

    manifest_uri: str
    output_prefix: str
    output_manifest_uri: str
    staging_prefix: str | None = None
    manifest_format: str | None = None
    output_manifest_format: str | None = None
    image_column: str = "image_url"
    id_column: str | None = None
    mode: str = "fast"
    binary_mask: bool = False
    white_background: bool = False
    image_format: str | None = None
    image_quality: int | None = None
    output_key_template: str = DEFAULT_OUTPUT_KEY_TEMPLATE
    shard_size: int = 1000
    max_map_length: int = DEFAULT_MAX_MAP_LENGTH
    max_records_per_request: int = 10
    concurrency: int = 8
    resume: bool = True
    skip_existing: bool = False
    max_billable_records: int | None = None
    max_failed_fraction: float = 0.05
    max_image_bytes: int = 20 << 20
    quality_check: bool = True
    report: bool = True
    report_sample: int = 48

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("fast", "precise"):
            problems.append(f"mode must be 'fast' or 'precise', not {self.mode!r}")
        if self.image_format is not None and self.image_format not in _IMAGE_EXTENSIONS:
            problems.append(f"image_format must be png, jpg or webp, not {self.image_format!r}")
        if self.image_quality is not None and not 1 <= self.image_quality <= 100:
            problems.append(f"image_quality must be within 1..100, not {self.image_quality}")
        for name in ("shard_size", "max_map_length", "max_records_per_request", "concurrency"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            problems.append(f"max_failed_fraction must be within 0..1, not {self.max_failed_fraction}")
        if self.max_billable_records is not None and self.max_billable_records < 0:
            problems.append("max_billable_records must not be negative")
        for name in ("manifest_uri", "output_prefix", "output_manifest_uri", "image_column"):
            if not getattr(self, name):
                problems.append(f"{name} must not be empty")
        if problems:
            raise ValueError("invalid pipeline configuration: " + "; ".join(problems))

    @property
    def staging(self) -> str:
        """Where shards, checkpoints and per-shard results live."""
        if self.staging_prefix:
            return self.staging_prefix.rstrip("/")
        job = hashlib.sha256(f"{self.manifest_uri}\n{self.output_manifest_uri}".encode()).hexdigest()[:16]
        return join_uri(self.output_prefix, f"_removebg_staging/{job}")

    @property
    def cutout_ext(self) -> str:
        return _IMAGE_EXTENSIONS[self.image_format or "png"]

    @property
    def options(self) -> RemovalOptions:
        return RemovalOptions(
            binary_mask=self.binary_mask,
            white_background=self.white_background,
            image_format=self.image_format,
            image_quality=self.image_quality,
        )

    def outputs_for(self, record_id: str) -> dict[str, str]:
        """The durable URIs this run writes for `record_id`, by kind."""
        kinds = {"cutout": self.cutout_ext}
        if self.binary_mask:
            kinds["mask"] = "jpg"
        if self.white_background:
            kinds["whitebg"] = "jpg"
        return {
            kind: output_uri(self.output_prefix, record_id, kind, ext, self.output_key_template)
            for kind, ext in kinds.items()
        }

    def fingerprint(self, reference: str) -> str:
        """Identifies the work done for one image reference, so resume never reuses other work."""
        parts = (
            reference,
            self.mode,
            self.binary_mask,
            self.white_background,
            self.image_format,
            self.image_quality,
            self.output_prefix,
            self.output_key_template,
        )
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class ShardDescriptor:
    """A small, JSON-able handle on one shard: what goes through XCom."""

    plan_uri: str
    index: int
    uri: str
    rows: int
    first_row: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardDescriptor:
        return cls(**data)


@dataclass(frozen=True)
class Plan:
    """The shards of one manifest, with the configuration every task of the run shares."""

    uri: str
    config: PipelineConfig
    shards: tuple[ShardDescriptor, ...]
    total_rows: int
    duplicate_rows: int
    canonical_ids: frozenset[str]
    schema_uri: str
    run_id: str


@dataclass(frozen=True)
class RowResult:
    """The outcome of one manifest row: what becomes its `removebg_*` columns."""

    id: str
    status_code: int
    status_text: str
    error: str | None = None
    output_url: str | None = None
    output_url_mask: str | None = None
    output_url_whitebg: str | None = None
    width: int | None = None
    height: int | None = None
    request_id: str | None = None
    mode: str | None = None
    attempts: int = 0
    processed_at: datetime | None = None
    fingerprint: str | None = None
    foreground_fraction: float | None = None
    quality_flags: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300

    def to_json(self) -> dict[str, Any]:
        # Built by hand: dataclasses.asdict deep-copies every field and showed up in profiles.
        data = {field.name: getattr(self, field.name) for field in _ROW_RESULT_FIELDS}
        data["processed_at"] = self.processed_at.isoformat() if self.processed_at else None
        data["quality_flags"] = list(self.quality_flags)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RowResult:
        stamp = data.get("processed_at")
        return cls(
            **{
                **data,
                "processed_at": datetime.fromisoformat(stamp) if stamp else None,
                "quality_flags": tuple(data.get("quality_flags") or ()),
            }
        )


_ROW_RESULT_FIELDS = dataclasses.fields(RowResult)


@dataclass(frozen=True)
class BillingEstimate:
    """What a run would send to the API, after resume, skip-existing and de-duplication.

    `copy_only` rows were answered by the API in an earlier, interrupted attempt: their outputs are
    copied from the stored temporary URLs without a request, so they are not billable. Rows whose
    image bytes repeat another row's in the same shard are only found when the bytes are read, so
    `billable` counts them: it is an upper bound.
    """

    rows: int
    duplicates: int
    resumed: int
    copy_only: int
    existing: int
    without_reference: int
    billable: int

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunSummary:
    """Counts and pointers for one shard or one whole run; JSON-able for XCom and the CLI."""

    rows: int
    succeeded: int
    failed: int
    billed_records: int
    by_status: dict[int, int]
    first_errors: tuple[dict[str, Any], ...]
    by_flag: dict[str, int] = field(default_factory=dict)
    output_manifest_uri: str | None = None
    output_prefix: str | None = None
    shard_index: int | None = None
    report_html_uri: str | None = None
    report_png_uri: str | None = None

    @property
    def failed_fraction(self) -> float:
        return self.failed / self.rows if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["by_status"] = {str(code): count for code, count in sorted(self.by_status.items())}
        data["first_errors"] = list(self.first_errors)
        data["failed_fraction"] = round(self.failed_fraction, 6)
        return data


class Budget:
    """A thread-safe cap on the records one process may send to the API."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, count: int) -> bool:
        with self._lock:
            if self.limit is not None and self.used + count > self.limit:
                return False
            self.used += count
            return True


def plan(config: PipelineConfig, storage: Storage) -> Plan:
    """Validate the manifest and split it into shards under the staging prefix.

    Fails fast, naming the manifest, on a missing column, duplicate or colliding ids, or an
    unreadable file. Rows whose image reference repeats an earlier row's are marked as its
    duplicates: they are sent once and share the result.
    """
    schema = read_schema(config.manifest_uri, storage, config.manifest_format)
    wanted = [config.image_column] + ([config.id_column] if config.id_column else [])
    require_columns(config.manifest_uri, schema, wanted)
    total_rows, canonical_ids, duplicate_rows = _validate_ids(config, storage)

    shard_size = max(config.shard_size, -(-total_rows // config.max_map_length))
    staging = config.staging
    schema_uri = join_uri(staging, "schema.parquet")
    with storage.atomic_writer(schema_uri) as stream:
        pq.write_table(schema.empty_table(), stream)

    plan_uri = join_uri(staging, "plan.json")
    shards: list[ShardDescriptor] = []
    for index, table in enumerate(_shard_tables(config, storage, shard_size)):
        shard_uri = join_uri(staging, f"shards/shard-{index:05d}.parquet")
        with storage.atomic_writer(shard_uri) as stream:
            pq.write_table(table, stream, compression="zstd")
        first_row = int(table.column(_ROW)[0].as_py())
        shards.append(ShardDescriptor(plan_uri, index, shard_uri, table.num_rows, first_row))

    result = Plan(
        plan_uri,
        config,
        tuple(shards),
        total_rows,
        duplicate_rows,
        frozenset(canonical_ids),
        schema_uri,
        run_id=uuid.uuid4().hex,
    )
    storage.write_bytes(plan_uri, json.dumps(_plan_to_json(result)).encode())
    log.info(
        "planned %s: %d rows in %d shards of up to %d rows; %d duplicate image references share a result",
        config.manifest_uri,
        total_rows,
        len(shards),
        shard_size,
        duplicate_rows,
    )
    return result


def load_plan(plan_uri: str, storage: Storage) -> Plan:
    """Read back the plan written by `plan`, as every mapped task does."""
    try:
        data = json.loads(storage.read_bytes(plan_uri))
    except (StorageError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read the run plan {plan_uri}: {exc}") from exc
    return Plan(
        uri=plan_uri,
        config=PipelineConfig.from_dict(data["config"]),
        shards=tuple(ShardDescriptor.from_dict(shard) for shard in data["shards"]),
        total_rows=data["total_rows"],
        duplicate_rows=data["duplicate_rows"],
        canonical_ids=frozenset(data["canonical_ids"]),
        schema_uri=data["schema_uri"],
        run_id=data["run_id"],
    )


def estimate_billing(plan_: Plan, storage: Storage) -> BillingEstimate:
    """Count the records a run of `plan_` would bill, without calling the API."""
    counts: Counter[str] = Counter()
    for shard in plan_.shards:
        work = _ShardWork.load(shard, plan_, storage)
        counts.update(work.classify_counts())
    return BillingEstimate(
        rows=plan_.total_rows,
        duplicates=plan_.duplicate_rows,
        resumed=counts["resumed"],
        copy_only=counts["copy_only"],
        existing=counts["existing"],
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
            f"(after {estimate.resumed} resumed, {estimate.existing} existing and {estimate.duplicates} "
            f"duplicate rows), over max_billable_records={limit}; nothing was sent"
        )
    return estimate


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
) -> RunSummary:
    """Remove the backgrounds of one shard's rows, copy the outputs and store the shard's results.

    A batch is checkpointed twice: its API answer (temporary output URLs) as soon as the request
    returns, while the batch still holds its request slot, then its final results once the outputs
    are copied. A retried task sends no request for a row that already succeeded, and copies the
    outputs of a row that was answered but not finished from the stored URLs, without a request.
    Authentication and out-of-credits errors stop the shard at once; every other problem becomes
    the row's status. Raises FailurePolicyError, after storing the results, when more than
    `max_failed_fraction` of the shard's rows failed. `request_slots`, shared by shards processed
    side by side, caps their requests in flight together (`concurrency` when not given).
    """
    config = plan_.config
    work = _ShardWork.load(shard, plan_, storage)
    owned_copier = copier is None
    copier = copier or OutputCopier(storage, pool_size=_WORKERS_PER_SLOT * config.concurrency)
    budget = budget or Budget(config.max_billable_records)
    try:
        results = work.run(client, copier, budget, on_progress, request_slots)
    finally:
        if owned_copier:
            copier.close()
    _write_shard_results(shard, plan_, storage, work.rows, results, work.billed_earlier + work.billed)
    summary = _summarise(results.values(), billed=work.billed, shard_index=shard.index)
    log.info("shard %d done: %s", shard.index, json.dumps(summary.to_dict()))
    _enforce_failure_policy(summary, config, f"shard {shard.index} of {config.manifest_uri}")
    return summary


def merge(plan_: Plan, storage: Storage) -> RunSummary:
    """Write the enriched manifest: every input row once, in order, with its `removebg_*` columns.

    Rows of a shard that has no stored results get status 504 ("not processed"). The manifest is
    written atomically, then the run-wide failure policy is applied.
    """
    config = plan_.config
    with storage.open(plan_.schema_uri, "rb") as stream:
        input_schema = pq.read_schema(stream)
    kept = [name for name in input_schema.names if name not in RESULT_SCHEMA.names]
    output_schema = pa.schema([input_schema.field(name) for name in kept] + list(RESULT_SCHEMA))
    canonical: dict[str, RowResult] = {}
    tally = _Tally()
    billed = 0
    with ManifestWriter(
        config.output_manifest_uri, storage, output_schema, config.output_manifest_format
    ) as out:
        for shard in plan_.shards:
            table = _read_parquet(shard.uri, storage)
            stored = _read_shard_results(shard, plan_, storage)
            billed += stored.billed
            rows: list[RowResult] = []
            for row in table.select(list(_INTERNAL_COLUMNS)).to_pylist():
                row_result = _merged_row(row, stored.results, canonical, shard.index)
                if row[_ID] in plan_.canonical_ids and row[_CANONICAL] is None:
                    canonical[row[_ID]] = row_result
                rows.append(row_result)
            tally.add(rows)
            columns = [table.column(name) for name in kept] + _result_arrays(rows)
            out.write(
                pa.RecordBatch.from_arrays(
                    [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns],
                    schema=output_schema,
                )
            )
    report_html_uri, report_png_uri = _write_report(config, storage)
    summary = dataclasses.replace(
        tally.summary(billed=billed),
        output_manifest_uri=config.output_manifest_uri,
        output_prefix=config.output_prefix,
        report_html_uri=report_html_uri,
        report_png_uri=report_png_uri,
    )
    log.info("enriched manifest %s written: %s", config.output_manifest_uri, json.dumps(summary.to_dict()))
    _enforce_failure_policy(summary, config, config.manifest_uri)
    return summary


def _write_report(config: PipelineConfig, storage: Storage) -> tuple[str | None, str | None]:
    """Build the run's contact-sheet report next to the enriched manifest; a failure only warns."""
    if not config.report:
        return None, None
    try:
        built = report.build_report(
            config.output_manifest_uri,
            storage,
            sample=config.report_sample,
            image_column=config.image_column,
            id_column=config.id_column,
            manifest_format=config.output_manifest_format,
        )
    except RemoveBgError as exc:
        log.warning("the run report was not written: %s", exc)
        return None, None
    log.info("run report: %s and %s", built.html_uri, built.png_uri)
    return built.html_uri, built.png_uri


def run(
    config: PipelineConfig,
    client: RemoveBgClient,
    storage: Storage,
    *,
    on_progress: ProgressCallback | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> RunSummary:
    """Plan, process every shard and merge: the whole pipeline in one process (the CLI's path).

    Two shards are processed side by side, sharing `concurrency` request slots, so the API stays
    busy while one shard drains its last batches. The failure policy is applied once, run-wide.
    """
    plan_ = plan(config, storage)
    check_budget(plan_, storage)
    if on_plan is not None:
        on_plan(plan_)
    budget = Budget(config.max_billable_records)
    slots = threading.Semaphore(config.concurrency)
    copier = OutputCopier(storage, pool_size=_WORKERS_PER_SLOT * config.concurrency)
    relaxed = dataclasses.replace(plan_, config=dataclasses.replace(config, max_failed_fraction=1.0))
    try:
        with ThreadPoolExecutor(_SHARDS_SIDE_BY_SIDE, thread_name_prefix="removebg-shard") as shards:
            futures = [
                shards.submit(
                    process_shard,
                    shard,
                    relaxed,
                    client,
                    storage,
                    copier=copier,
                    budget=budget,
                    on_progress=on_progress,
                    request_slots=slots,
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
    return merge(plan_, storage)


@dataclass
class _StoredResults:
    results: dict[int, RowResult] = field(default_factory=dict)
    billed: int = 0


class _ShardWork:
    """The rows of one shard and what each still needs."""

    def __init__(
        self,
        shard: ShardDescriptor,
        plan_: Plan,
        storage: Storage,
        rows: list[dict[str, Any]],
        checkpoints: _Checkpoints,
    ) -> None:
        self.shard = shard
        self.config = plan_.config
        self.run_id = plan_.run_id
        self.storage = storage
        self.rows = rows
        self.prior = checkpoints.done if self.config.resume else {}
        self.answers = checkpoints.usable_answers(_now()) if self.config.resume else {}
        self.billed_earlier = checkpoints.billed_in_run
        self.billed = 0
        self._billed_lock = threading.Lock()
        # Image bytes read by this shard's workers: digest -> (id, row) of the first row to read them,
        # and each later row with the same bytes -> that owner. Later rows are not sent.
        self._byte_owners: dict[bytes, tuple[str, int]] = {}
        self._byte_duplicates: dict[int, tuple[str, int]] = {}
        self._owners_lock = threading.Lock()

    @classmethod
    def load(cls, shard: ShardDescriptor, plan_: Plan, storage: Storage) -> _ShardWork:
        table = _read_parquet(shard.uri, storage, columns=list(_INTERNAL_COLUMNS))
        return cls(shard, plan_, storage, table.to_pylist(), _load_checkpoints(shard, plan_, storage))

    def classify(self) -> Iterator[tuple[str, dict[str, Any], RowResult | None]]:
        """Each row with its class: duplicate, without_reference, resumed, existing, copy_only or todo."""
        for row in self.rows:
            reference = row[_REF]
            if row[_CANONICAL] is not None:
                yield "duplicate", row, None
            elif not reference:
                yield (
                    "without_reference",
                    row,
                    self._failed(
                        row, STATUS_NO_REFERENCE, f"no image reference in column {self.config.image_column!r}"
                    ),
                )
            elif (resumed := self._resumable(row)) is not None:
                yield "resumed", row, resumed
            elif self.config.skip_existing and self._outputs_exist(row[_ID]):
                yield "existing", row, self._existing(row)
            elif (row[_ID], self.config.fingerprint(reference)) in self.answers:
                yield "copy_only", row, None
            else:
                yield "todo", row, None

    def classify_counts(self) -> Counter[str]:
        return Counter(kind for kind, _, _ in self.classify())

    def run(
        self,
        client: RemoveBgClient,
        copier: OutputCopier,
        budget: Budget,
        on_progress: ProgressCallback | None,
        request_slots: threading.Semaphore | None,
    ) -> dict[int, RowResult]:
        results: dict[int, RowResult] = {}
        todo: list[dict[str, Any]] = []
        copy_only: list[dict[str, Any]] = []
        for kind, row, row_result in self.classify():
            if kind == "todo":
                todo.append(row)
            elif kind == "copy_only":
                copy_only.append(row)
            elif row_result is not None:
                results[row[_ROW]] = row_result
        progress = Progress(len(todo) + len(copy_only), f"shard {self.shard.index}", on_progress)
        if on_progress is not None and results:
            on_progress(len(results), 0, len(todo) + len(copy_only))
        log.info(
            "shard %d: %d rows, %d to send, %d to copy from an earlier answer without a request, "
            "%d already done or not sendable",
            self.shard.index,
            len(self.rows),
            len(todo),
            len(copy_only),
            len(results),
        )
        size = self.config.max_records_per_request
        to_copy = [copy_only[i : i + size] for i in range(0, len(copy_only), size)]
        to_send = [todo[i : i + size] for i in range(0, len(todo), size)]
        slots = request_slots or threading.Semaphore(self.config.concurrency)
        workers = _WORKERS_PER_SLOT * self.config.concurrency
        with ThreadPoolExecutor(workers, thread_name_prefix="removebg") as pool:
            # Answered rows first: their temporary URLs are the ones closest to expiring.
            futures: list[Future[list[RowResult | None]]] = [
                pool.submit(self._copy_answered, batch, copier, progress) for batch in to_copy
            ] + [
                pool.submit(self._process_batch, batch, client, copier, budget, progress, slots)
                for batch in to_send
            ]
            batches = to_copy + to_send
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for batch, future in zip(batches, futures, strict=True):
                if future.cancelled():
                    continue
                for row, row_result in zip(batch, future.result(), strict=True):
                    if row_result is not None:
                        results[row[_ROW]] = row_result
        self._share_owner_results(results)
        return results

    def _share_owner_results(self, results: dict[int, RowResult]) -> None:
        """Give each row whose bytes repeat an earlier row's that row's result, and checkpoint it."""
        if not self._byte_duplicates:
            return
        rows = {row[_ROW]: row for row in self.rows}
        shared: list[RowResult] = []
        for row_number, (owner_id, owner_row) in self._byte_duplicates.items():
            owner = results[owner_row]
            row = rows[row_number]
            results[row_number] = dataclasses.replace(
                owner,
                id=row[_ID],
                status_text=f"{owner.status_text} (same image bytes as {owner_id})",
                attempts=0,
                fingerprint=self.config.fingerprint(row[_REF]),
            )
            shared.append(results[row_number])
        self._checkpoint(shared)
        log.info(
            "shard %d: %d rows shared the result of a row with identical bytes", self.shard.index, len(shared)
        )

    def _process_batch(
        self,
        batch: list[dict[str, Any]],
        client: RemoveBgClient,
        copier: OutputCopier,
        budget: Budget,
        progress: Progress,
        request_slots: threading.Semaphore,
    ) -> list[RowResult | None]:
        """Send a batch and copy its outputs; None for rows whose bytes an earlier row owns."""
        outcomes: dict[str, RowResult] = {}
        records: list[ImageRecord] = []
        for row in batch:
            record = self._record(row)
            if isinstance(record, RowResult):
                outcomes[row[_ID]] = record
            elif not self._repeats_earlier_bytes(row, record):
                records.append(record)
        if records and not budget.reserve(len(records)):
            for record in records:
                outcomes[record.id] = self._failed_by_id(
                    record.id,
                    STATUS_BUDGET_REACHED,
                    f"not processed: max_billable_records={budget.limit} reached",
                )
            records = []
        api_results: list[RecordResult] = []
        if records:
            with request_slots:
                api_results, billed = self._call_api(records, client)
                if billed:
                    # Durable before the slot is released: only requests holding a slot can be
                    # billed without a checkpoint, so a kill re-bills at most concurrency x batch.
                    self._checkpoint_answer(batch, api_results, billed)
                    with self._billed_lock:
                        self.billed += billed
        for api_result in api_results:
            outcomes[api_result.id] = self._copy_outputs(api_result, copier)
        return self._finish(batch, outcomes, progress)

    def _repeats_earlier_bytes(self, row: dict[str, Any], record: ImageRecord) -> bool:
        if record.data is None:
            return False
        digest = hashlib.blake2b(record.data, digest_size=16).digest()
        with self._owners_lock:
            owner = self._byte_owners.setdefault(digest, (row[_ID], row[_ROW]))
            if owner[1] == row[_ROW]:
                return False
            self._byte_duplicates[row[_ROW]] = owner
            return True

    def _copy_answered(
        self, batch: list[dict[str, Any]], copier: OutputCopier, progress: Progress
    ) -> list[RowResult | None]:
        """Finish rows the API answered in an interrupted attempt, from the stored temporary URLs."""
        outcomes: dict[str, RowResult] = {}
        for row in batch:
            copied = self._copy_outputs(self.answers[(row[_ID], self.config.fingerprint(row[_REF]))], copier)
            if copied.ok:
                text = f"{copied.status_text} (outputs copied from an earlier answer, not sent again)"
                copied = dataclasses.replace(copied, status_text=text)
            outcomes[row[_ID]] = copied
        return self._finish(batch, outcomes, progress)

    def _finish(
        self, batch: list[dict[str, Any]], outcomes: dict[str, RowResult], progress: Progress
    ) -> list[RowResult | None]:
        stamped = {
            row[_ID]: dataclasses.replace(outcomes[row[_ID]], fingerprint=self.config.fingerprint(row[_REF]))
            for row in batch
            if row[_ID] in outcomes
        }
        self._checkpoint(list(stamped.values()))
        progress.advance(len(batch), sum(1 for r in stamped.values() if not r.ok))
        return [stamped.get(row[_ID]) for row in batch]

    def _call_api(self, records: list[ImageRecord], client: RemoveBgClient) -> tuple[list[RecordResult], int]:
        """The API's answer for each record, and how many records the API billed for it."""
        try:
            return client.remove_batch(records, self.config.options), len(records)
        except TransientApiError as exc:
            failures = [
                RecordResult.failure(record.id, STATUS_API_UNAVAILABLE, "API unavailable", str(exc))
                for record in records
            ]
            return failures, 0
        except ApiRequestError as exc:
            if exc.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE and len(records) > 1:
                # One oversized image must not sink its batch mates on every rerun: send each alone.
                alone = [self._call_api([record], client) for record in records]
                answers = [answer for answered, _ in alone for answer in answered]
                return answers, sum(billed for _, billed in alone)
            code = exc.status_code
            failures = [
                RecordResult.failure(record.id, code, "request rejected by the API", str(exc))
                for record in records
            ]
            return failures, 0

    def _record(self, row: dict[str, Any]) -> ImageRecord | RowResult:
        reference: str = row[_REF]
        if scheme_of(reference) in ("http", "https"):
            return ImageRecord(id=row[_ID], url=reference)
        try:
            data = self.storage.read_bytes(reference, limit=self.config.max_image_bytes)
        except StorageError as exc:
            return self._failed(row, STATUS_UNREADABLE_IMAGE, str(exc))
        if not data:
            return self._failed(row, STATUS_UNREADABLE_IMAGE, f"{reference} is empty")
        return ImageRecord(id=row[_ID], data=data)

    def _copy_outputs(self, api_result: RecordResult, copier: OutputCopier) -> RowResult:
        base = RowResult(
            id=api_result.id,
            status_code=api_result.status_code,
            status_text=api_result.status_text,
            error=api_result.error,
            width=api_result.width,
            height=api_result.height,
            request_id=api_result.request_id,
            mode=self.config.mode,
            attempts=api_result.attempts,
            processed_at=_now(),
        )
        if not api_result.ok:
            return base
        sources = {
            "cutout": api_result.output_url,
            "mask": api_result.output_url_mask,
            "whitebg": api_result.output_url_whitebg,
        }
        copied: dict[str, str] = {}
        data: dict[str, bytes] = {}
        for kind, destination in self.config.outputs_for(api_result.id).items():
            source = sources[kind]
            if not source:
                return dataclasses.replace(
                    base,
                    status_code=502,
                    status_text="output missing",
                    error=f"the API returned no {kind} URL",
                )
            try:
                data[kind] = copier.copy(source, destination, destination.rsplit(".", 1)[-1])
            except CopyError as exc:
                return dataclasses.replace(
                    base, status_code=exc.status_code, status_text="output copy failed", error=str(exc)
                )
            copied[kind] = destination
        copied_result = dataclasses.replace(
            base,
            output_url=copied.get("cutout"),
            output_url_mask=copied.get("mask"),
            output_url_whitebg=copied.get("whitebg"),
        )
        if not self.config.quality_check:
            return copied_result
        verdict = quality.assess(data["cutout"], data.get("mask"))
        return dataclasses.replace(
            copied_result, foreground_fraction=verdict.foreground_fraction, quality_flags=verdict.flags
        )

    def _checkpoint(self, results: list[RowResult]) -> None:
        if not results:
            return
        uri = join_uri(_checkpoint_prefix(self.shard, self.config), unique_name("ckpt") + ".jsonl")
        header = {"billed": 0, "run_id": self.run_id}
        lines = [json.dumps(header)] + [json.dumps(r.to_json()) for r in results]
        self.storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())

    def _checkpoint_answer(
        self, batch: list[dict[str, Any]], answers: list[RecordResult], billed: int
    ) -> None:
        """Store the API's answer for a batch, temporary output URLs included, with what it billed."""
        fingerprints = {row[_ID]: self.config.fingerprint(row[_REF]) for row in batch}
        uri = join_uri(_checkpoint_prefix(self.shard, self.config), unique_name("answer") + ".jsonl")
        header = {"kind": _ANSWER, "billed": billed, "run_id": self.run_id, "answered_at": _now().isoformat()}
        lines = [json.dumps(header)] + [
            json.dumps({"fingerprint": fingerprints[a.id], **dataclasses.asdict(a)}) for a in answers
        ]
        self.storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())

    def _resumable(self, row: dict[str, Any]) -> RowResult | None:
        previous = self.prior.get((row[_ID], self.config.fingerprint(row[_REF])))
        if previous is None:
            return None
        recorded = {
            "cutout": previous.output_url,
            "mask": previous.output_url_mask,
            "whitebg": previous.output_url_whitebg,
        }
        # The fingerprint fixes the output kinds and keys; a row that shared the result of a row
        # with identical bytes records that row's outputs, so only their existence is checked.
        for kind in self.config.outputs_for(row[_ID]):
            uri = recorded[kind]
            if uri is None or not self.storage.exists(uri):
                return None
        return previous

    def _outputs_exist(self, record_id: str) -> bool:
        return all(self.storage.exists(uri) for uri in self.config.outputs_for(record_id).values())

    def _existing(self, row: dict[str, Any]) -> RowResult:
        outputs = self.config.outputs_for(row[_ID])
        return RowResult(
            id=row[_ID],
            status_code=STATUS_OK,
            status_text="OK (existing output kept, not sent again)",
            output_url=outputs.get("cutout"),
            output_url_mask=outputs.get("mask"),
            output_url_whitebg=outputs.get("whitebg"),
            mode=self.config.mode,
            attempts=0,
            processed_at=_now(),
            fingerprint=self.config.fingerprint(row[_REF]),
        )

    def _failed(self, row: dict[str, Any], code: int, error: str) -> RowResult:
        return self._failed_by_id(row[_ID], code, error)

    def _failed_by_id(self, record_id: str, code: int, error: str) -> RowResult:
        return RowResult(
            id=record_id,
            status_code=code,
            status_text="not processed",
            error=error,
            mode=self.config.mode,
            attempts=0,
            processed_at=_now(),
        )


def _merged_row(
    row: dict[str, Any], stored: dict[int, RowResult], canonical: dict[str, RowResult], shard_index: int
) -> RowResult:
    if row[_CANONICAL] is not None:
        original = canonical.get(row[_CANONICAL])
        if original is None:
            return RowResult(
                id=row[_ID],
                status_code=STATUS_NOT_PROCESSED,
                status_text="not processed",
                error=f"the row with the same image ({row[_CANONICAL]}) has no result",
            )
        return dataclasses.replace(
            original,
            id=row[_ID],
            attempts=0,
            status_text=f"{original.status_text} (same image as {row[_CANONICAL]})",
        )
    found = stored.get(row[_ROW])
    if found is not None:
        return found
    return RowResult(
        id=row[_ID],
        status_code=STATUS_NOT_PROCESSED,
        status_text="not processed",
        error=f"shard {shard_index} has no stored result for this row (its task did not finish)",
    )


def _result_arrays(rows: Sequence[RowResult]) -> list[pa.Array]:
    values: dict[str, list[Any]] = {name: [] for name in RESULT_SCHEMA.names}
    for r in rows:
        values["removebg_status_code"].append(r.status_code)
        values["removebg_status_text"].append(r.status_text)
        values["removebg_error"].append(r.error)
        values["removebg_output_url"].append(r.output_url)
        values["removebg_output_url_mask"].append(r.output_url_mask)
        values["removebg_output_url_whitebg"].append(r.output_url_whitebg)
        values["removebg_width"].append(r.width)
        values["removebg_height"].append(r.height)
        values["removebg_request_id"].append(r.request_id)
        values["removebg_mode"].append(r.mode)
        values["removebg_attempts"].append(r.attempts)
        values["removebg_processed_at"].append(r.processed_at)
        values["removebg_foreground_fraction"].append(r.foreground_fraction)
        values["removebg_quality_flags"].append(list(r.quality_flags))
    return [pa.array(values[f.name], type=f.type) for f in RESULT_SCHEMA]


def _validate_ids(config: PipelineConfig, storage: Storage) -> tuple[int, set[str], int]:
    """One pass over the id and image columns: count rows, refuse bad ids, find duplicate images."""
    columns = [config.image_column] + ([config.id_column] if config.id_column else [])
    seen_ids: set[str] = set()
    keys: dict[str, str] = {}
    duplicates: list[str] = []
    collisions: list[str] = []
    first_rows = _FirstRows()
    canonical_ids: set[str] = set()
    duplicate_rows = 0
    total = 0
    for batch in iter_batches(config.manifest_uri, storage, fmt=config.manifest_format, columns=columns):
        references = _as_text(batch.column(config.image_column))
        ids = _as_text(batch.column(config.id_column)) if config.id_column else None
        for offset, reference in enumerate(references):
            row = total + offset
            record_id = ids[offset] if ids is not None else derive_id(reference, row)
            if not record_id:
                raise ManifestError(
                    f"manifest {config.manifest_uri} row {row} has an empty id in column {config.id_column!r}"
                )
            canonical = first_rows.canonical(reference, record_id, row)
            if canonical is not None:
                duplicate_rows += 1
                canonical_ids.add(canonical)
            if ids is None and canonical is not None:
                continue
            if record_id in seen_ids:
                if len(duplicates) < _FIRST_ERRORS:
                    duplicates.append(record_id)
                continue
            seen_ids.add(record_id)
            key = safe_key_id(record_id)
            other = keys.setdefault(key, record_id)
            if other != record_id and len(collisions) < _FIRST_ERRORS:
                collisions.append(f"{other!r} and {record_id!r} -> {key!r}")
        total += batch.num_rows
    if duplicates:
        raise ManifestError(
            f"manifest {config.manifest_uri} has duplicate ids in column {config.id_column!r}: "
            f"{', '.join(repr(d) for d in duplicates)}; ids must be unique"
        )
    if collisions:
        raise ManifestError(
            f"manifest {config.manifest_uri} has ids that become the same output key once made safe: "
            f"{'; '.join(collisions)}"
        )
    return total, canonical_ids, duplicate_rows


def _shard_tables(config: PipelineConfig, storage: Storage, shard_size: int) -> Iterator[pa.Table]:
    """The manifest with the internal columns added, cut into tables of `shard_size` rows."""
    first_rows = _FirstRows()
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    row = 0
    for batch in iter_batches(config.manifest_uri, storage, fmt=config.manifest_format):
        references = _as_text(batch.column(config.image_column))
        ids = _as_text(batch.column(config.id_column)) if config.id_column else None
        record_ids: list[str] = []
        canonical: list[str | None] = []
        for offset, reference in enumerate(references):
            record_id = ids[offset] if ids is not None else derive_id(reference, row + offset)
            assert record_id is not None
            record_ids.append(record_id)
            canonical.append(first_rows.canonical(reference, record_id, row + offset))
        extra = [
            pa.array(range(row, row + batch.num_rows), type=pa.int64()),
            pa.array(record_ids, type=pa.string()),
            pa.array(references, type=pa.string()),
            pa.array(canonical, type=pa.string()),
        ]
        batch = pa.RecordBatch.from_arrays(
            list(batch.columns) + extra, names=list(batch.schema.names) + list(_INTERNAL_COLUMNS)
        )
        row += batch.num_rows
        while batch.num_rows:
            take = min(shard_size - pending_rows, batch.num_rows)
            pending.append(batch.slice(0, take))
            pending_rows += take
            batch = batch.slice(take)
            if pending_rows == shard_size:
                yield pa.Table.from_batches(pending)
                pending, pending_rows = [], 0
    if pending_rows:
        yield pa.Table.from_batches(pending)


class _FirstRows:
    """Remembers the first row of every image reference, in 16-byte digests to stay small."""

    def __init__(self) -> None:
        self._first: dict[bytes, tuple[str, int]] = {}

    def canonical(self, reference: str | None, record_id: str, row: int) -> str | None:
        """The id of the earlier row with the same reference, or None when this row is the first."""
        if not reference:
            return None
        digest = hashlib.blake2b(reference.encode(), digest_size=16).digest()
        first_id, first_row = self._first.setdefault(digest, (record_id, row))
        return first_id if first_row != row else None


def _as_text(column: pa.Array | pa.ChunkedArray) -> list[str | None]:
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = column.cast(pa.string())
    return [value.strip() if isinstance(value, str) else value for value in column.to_pylist()]


def _checkpoint_prefix(shard: ShardDescriptor, config: PipelineConfig) -> str:
    return join_uri(config.staging, f"checkpoints/shard-{shard.index:05d}")


def _results_uri(shard: ShardDescriptor, config: PipelineConfig) -> str:
    return join_uri(config.staging, f"results/shard-{shard.index:05d}.jsonl")


@dataclass
class _Checkpoints:
    """What earlier attempts left for one shard, by (id, fingerprint), and what this run billed so far.

    Keying by fingerprint means a checkpoint of other work for the same id (another reference or
    other options, from an earlier run) never stands in for this run's work.
    """

    done: dict[tuple[str, str], RowResult] = field(default_factory=dict)
    answers: dict[tuple[str, str], tuple[datetime, RecordResult]] = field(default_factory=dict)
    failed_at: dict[tuple[str, str], datetime] = field(default_factory=dict)
    billed_in_run: int = 0

    def usable_answers(self, now: datetime) -> dict[tuple[str, str], RecordResult]:
        """Successful API answers whose outputs can still be copied instead of sending the row again.

        An answer is spent once a later final checkpoint records a failure for its row (its copy
        failed, or a resend failed): that row is sent again, so it is never stuck on a dead URL.
        """
        usable: dict[tuple[str, str], RecordResult] = {}
        for key, (answered_at, answer) in self.answers.items():
            failed_at = self.failed_at.get(key)
            if now - answered_at < _ANSWER_LIFETIME and (failed_at is None or failed_at < answered_at):
                usable[key] = answer
        return usable


def _load_checkpoints(shard: ShardDescriptor, plan_: Plan, storage: Storage) -> _Checkpoints:
    found = _Checkpoints()
    for uri in storage.list_prefix(_checkpoint_prefix(shard, plan_.config)):
        header_line, *lines = storage.read_bytes(uri).decode().splitlines()
        header = json.loads(header_line)
        if header.get("run_id") == plan_.run_id:
            found.billed_in_run += header["billed"]
        if header.get("kind") == _ANSWER:
            answered_at = datetime.fromisoformat(header["answered_at"])
            for line in lines:
                data = json.loads(line)
                key = (data["id"], data.pop("fingerprint"))
                answer = RecordResult(**data)
                newest = found.answers.get(key)
                if answer.ok and (newest is None or newest[0] < answered_at):
                    found.answers[key] = (answered_at, answer)
            continue
        for line in lines:
            row_result = RowResult.from_json(json.loads(line))
            if row_result.fingerprint is None:
                continue
            key = (row_result.id, row_result.fingerprint)
            if row_result.ok:
                found.done[key] = row_result
            else:
                # A failure without a time cannot be ordered against an answer: it spends them all.
                stamp = row_result.processed_at or _FAR_FUTURE
                found.failed_at[key] = max(stamp, found.failed_at.get(key, stamp))
    return found


def _write_shard_results(
    shard: ShardDescriptor,
    plan_: Plan,
    storage: Storage,
    rows: list[dict[str, Any]],
    results: dict[int, RowResult],
    billed: int,
) -> None:
    lines = [json.dumps({"billed": billed, "run_id": plan_.run_id})]
    lines += [
        json.dumps({"row": row[_ROW], **results[row[_ROW]].to_json()}) for row in rows if row[_ROW] in results
    ]
    storage.write_bytes(_results_uri(shard, plan_.config), ("\n".join(lines) + "\n").encode())


def _read_shard_results(shard: ShardDescriptor, plan_: Plan, storage: Storage) -> _StoredResults:
    """The shard's stored results, if this run wrote them (an earlier run's file does not count)."""
    uri = _results_uri(shard, plan_.config)
    if not storage.exists(uri):
        return _StoredResults()
    lines = storage.read_bytes(uri).decode().splitlines()
    header = json.loads(lines[0])
    if header.get("run_id") != plan_.run_id:
        return _StoredResults()
    stored = _StoredResults(billed=header["billed"])
    for line in lines[1:]:
        data = json.loads(line)
        row = data.pop("row")
        stored.results[row] = RowResult.from_json(data)
    return stored


def _read_parquet(uri: str, storage: Storage, columns: list[str] | None = None) -> pa.Table:
    # Shards are small: read whole into an Arrow-owned buffer and decoded synchronously. Arrow's
    # dataset reader (pq.read_table) finishes futures on its own threads; one releasing a buffer of
    # Python bytes while the interpreter shuts down aborts the process.
    sink = pa.BufferOutputStream()
    sink.write(storage.read_bytes(uri))
    with pq.ParquetFile(pa.BufferReader(sink.getvalue())) as parquet:
        return parquet.read(columns=columns, use_threads=False)


def _plan_to_json(plan_: Plan) -> dict[str, Any]:
    return {
        "config": plan_.config.to_dict(),
        "shards": [shard.to_dict() for shard in plan_.shards],
        "total_rows": plan_.total_rows,
        "duplicate_rows": plan_.duplicate_rows,
        "canonical_ids": sorted(plan_.canonical_ids),
        "schema_uri": plan_.schema_uri,
        "run_id": plan_.run_id,
    }


class _Tally:
    """Running counts of row outcomes, so summaries of huge runs keep no rows in memory."""

    def __init__(self) -> None:
        self.rows = 0
        self.by_status: Counter[int] = Counter()
        self.by_flag: Counter[str] = Counter()
        self.first_errors: list[dict[str, Any]] = []

    def add(self, results: Iterable[RowResult]) -> None:
        for r in results:
            self.rows += 1
            self.by_status[r.status_code] += 1
            self.by_flag.update(r.quality_flags)
            if not r.ok and len(self.first_errors) < _FIRST_ERRORS:
                self.first_errors.append(
                    {"id": r.id, "status_code": r.status_code, "error": r.error or r.status_text}
                )

    def summary(self, *, billed: int, shard_index: int | None = None) -> RunSummary:
        succeeded = sum(count for code, count in self.by_status.items() if 200 <= code < 300)
        return RunSummary(
            rows=self.rows,
            succeeded=succeeded,
            failed=self.rows - succeeded,
            billed_records=billed,
            by_status=dict(self.by_status),
            first_errors=tuple(self.first_errors),
            by_flag=dict(self.by_flag),
            shard_index=shard_index,
        )


def _summarise(results: Iterable[RowResult], *, billed: int, shard_index: int | None = None) -> RunSummary:
    tally = _Tally()
    tally.add(results)
    return tally.summary(billed=billed, shard_index=shard_index)


def _enforce_failure_policy(summary: RunSummary, config: PipelineConfig, what: str) -> None:
    if summary.failed_fraction > config.max_failed_fraction:
        errors = "; ".join(f"{e['id']}: {e['status_code']} {e['error']}" for e in summary.first_errors)
        raise FailurePolicyError(
            f"{summary.failed} of {summary.rows} rows failed in {what} "
            f"({summary.failed_fraction:.1%} > max_failed_fraction {config.max_failed_fraction:.1%}); "
            f"first errors: {errors}",
            summary=summary,
        )


def _now() -> datetime:
    return datetime.now(timezone.utc)
