"""What a run produces: row results, run and shard summaries, the billing estimate, the failure policy."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from removebg_provider.errors import FailurePolicyError
from removebg_provider.manifest import RESULT_SCHEMA
from removebg_provider.vocabulary import (
    ERROR_COLUMN,
    FLAGS_COLUMN,
    OUTPUT_KINDS,
    OUTPUT_KINDS_BY_NAME,
    RESULT_COLUMNS,
    STATUS_COLUMN,
    STATUS_TEXT_COLUMN,
)

_FIRST_ERRORS = 5


@dataclass(frozen=True)
class RowResult:
    """The outcome of one manifest row: what becomes its `removebg_*` columns.

    `outputs` maps each output kind stored for the row (`cutout`, `mask`, `whitebg`) to its
    durable URI; `fingerprint` identifies the work (reference, image content and options) for resume;
    `source_fingerprint` identifies the input image's content (see `Storage.fingerprints`).
    """

    id: str
    status_code: int
    status_text: str
    error: str | None = None
    outputs: Mapping[str, str] = field(default_factory=dict)
    width: int | None = None
    height: int | None = None
    request_id: str | None = None
    mode: str | None = None
    attempts: int = 0
    processed_at: datetime | None = None
    fingerprint: str | None = None
    source_fingerprint: str | None = None
    foreground_fraction: float | None = None
    quality_flags: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True for a 2xx status: the row's outputs are stored."""
        return 200 <= self.status_code < 300

    def column_value(self, name: str) -> Any:
        """The value of the RowResult field or output kind a result column shows."""
        if name in OUTPUT_KINDS_BY_NAME:
            return self.outputs.get(name)
        if name == "quality_flags":
            return list(self.quality_flags)
        return getattr(self, name)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict for checkpoints and stored results; outputs under their API field names."""
        data = {name: getattr(self, name) for name in _SCALAR_FIELDS}
        data.update({kind.result_key: self.outputs.get(kind.name) for kind in OUTPUT_KINDS})
        data["processed_at"] = self.processed_at.isoformat() if self.processed_at else None
        data["quality_flags"] = list(self.quality_flags)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RowResult:
        """The RowResult of `to_json`."""
        stamp = data.get("processed_at")
        processed_at = datetime.fromisoformat(stamp) if stamp else None
        if processed_at is not None and processed_at.tzinfo is None:
            # Every stamp is written in UTC; one without its offset is read as UTC too.
            processed_at = processed_at.replace(tzinfo=timezone.utc)
        return cls(
            **{name: data[name] for name in _SCALAR_FIELDS if name in data},
            outputs={kind.name: url for kind in OUTPUT_KINDS if (url := data.get(kind.result_key))},
            processed_at=processed_at,
            quality_flags=tuple(data.get("quality_flags") or ()),
        )


_SCALAR_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(RowResult)
    if f.name not in ("outputs", "processed_at", "quality_flags")
)


# RowResult.to_json as Arrow reads it back, typed: stored results are parsed a file at a time.
ROW_RESULT_JSON_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status_code", pa.int64()),
        ("status_text", pa.string()),
        ("error", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("request_id", pa.string()),
        ("mode", pa.string()),
        ("attempts", pa.int64()),
        ("fingerprint", pa.string()),
        ("source_fingerprint", pa.string()),
        ("foreground_fraction", pa.float64()),
        *((kind.result_key, pa.string()) for kind in OUTPUT_KINDS),
        ("processed_at", pa.string()),
        ("quality_flags", pa.list_(pa.string())),
    ]
)


def result_arrays(rows: Sequence[RowResult]) -> list[pa.Array]:
    """The result columns of `rows`, typed as in RESULT_SCHEMA."""
    return [
        pa.array([row.column_value(shows) for row in rows], type=RESULT_SCHEMA.field(column).type)
        for column, _, shows in RESULT_COLUMNS
    ]


def result_arrays_from_json(results: pa.Table) -> list[pa.Array]:
    """The result columns of `results` (columns of ROW_RESULT_JSON_SCHEMA), typed as in RESULT_SCHEMA.

    What `result_arrays` gives for the same rows as RowResults, without a Python object per row.
    """
    arrays = []
    for column, _, shows in RESULT_COLUMNS:
        kind = OUTPUT_KINDS_BY_NAME.get(shows)
        values = results.column(kind.result_key if kind else shows).combine_chunks()
        if shows == "attempts":
            values = values.fill_null(0)
        elif shows == "quality_flags":
            values = pc.if_else(values.is_null(), pa.scalar([], values.type), values)
        arrays.append(values.cast(RESULT_SCHEMA.field(column).type))
    return arrays


@dataclass(frozen=True)
class BillingEstimate:
    """What a run would send to the API, after resume, the result store and de-duplication.

    `copy_only` rows were answered by the API in an earlier, interrupted attempt: their outputs are
    copied from the stored temporary URLs without a request, so they are not billable. `reused` rows
    have a stored result for the same image content and options (the result store). Rows whose
    image bytes repeat another row's in the same shard are only found when the bytes are read, so
    `billable` counts them: it is an upper bound.
    """

    rows: int
    duplicates: int
    resumed: int
    copy_only: int
    reused: int
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

    def describe(self) -> str:
        """One log line: rows, successes, failures by status and the first errors."""
        where = f"shard {self.shard_index}" if self.shard_index is not None else "run"
        by_status = ", ".join(f"{code}: {count}" for code, count in sorted(self.by_status.items()))
        text = (
            f"{where}: {self.rows} rows, {self.succeeded} succeeded, {self.failed} failed, "
            f"{self.billed_records} billed; by status {{{by_status}}}"
        )
        if self.output_manifest_uri:
            text += f"; enriched manifest {self.output_manifest_uri}, outputs under {self.output_prefix}"
        if self.first_errors:
            text += f"; first errors: {_errors_text(self.first_errors)}"
        return text


class Tally:
    """Running counts of row outcomes, so summaries of huge runs keep no rows in memory."""

    def __init__(self) -> None:
        self.rows = 0
        self.by_status: Counter[int] = Counter()
        self.by_flag: Counter[str] = Counter()
        self.first_errors: list[dict[str, Any]] = []

    def add(self, results: Iterable[RowResult]) -> None:
        rows = list(results)
        self.add_columns(
            pa.array([r.id for r in rows], pa.string()), pa.table(result_arrays(rows), RESULT_SCHEMA)
        )

    def add_columns(self, ids: pa.Array | pa.ChunkedArray, columns: pa.Table) -> None:
        """Count rows given as their ids and their result columns (a table of RESULT_SCHEMA)."""
        self.rows += columns.num_rows
        status = columns.column(STATUS_COLUMN)
        self.by_status.update(dict(zip(*_value_counts(status), strict=True)))
        self.by_flag.update(
            dict(zip(*_value_counts(pc.list_flatten(columns.column(FLAGS_COLUMN))), strict=True))
        )
        wanted = _FIRST_ERRORS - len(self.first_errors)
        if wanted <= 0:
            return
        failed = pc.or_(pc.less(status, 200), pc.greater_equal(status, 300))
        firsts = (
            pa.table(
                {
                    "id": ids,
                    "status_code": status,
                    "error": pc.coalesce(
                        _none_if_empty(columns.column(ERROR_COLUMN)), columns.column(STATUS_TEXT_COLUMN)
                    ),
                }
            )
            .filter(failed)
            .slice(0, wanted)
        )
        self.first_errors += firsts.to_pylist()

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


def summarise(results: Iterable[RowResult], *, billed: int, shard_index: int | None = None) -> RunSummary:
    """The summary of `results`."""
    tally = Tally()
    tally.add(results)
    return tally.summary(billed=billed, shard_index=shard_index)


def enforce_failure_policy(summary: RunSummary, max_failed_fraction: float, what: str) -> None:
    """Raise FailurePolicyError when more than `max_failed_fraction` of the summary's rows failed."""
    if summary.failed_fraction > max_failed_fraction:
        raise FailurePolicyError(
            f"{summary.failed} of {summary.rows} rows failed in {what} "
            f"({summary.failed_fraction:.1%} > max_failed_fraction {max_failed_fraction:.1%}); "
            f"first errors: {_errors_text(summary.first_errors)}",
            summary=summary,
        )


def _none_if_empty(texts: pa.ChunkedArray) -> pa.ChunkedArray:
    # An empty error says no more than none: the status text stands in for both.
    return pc.if_else(pc.equal(texts, ""), pa.scalar(None, pa.string()), texts)


def _value_counts(values: pa.Array | pa.ChunkedArray) -> tuple[list[Any], list[int]]:
    counted = pc.value_counts(values)
    return counted.field("values").to_pylist(), counted.field("counts").to_pylist()


def _errors_text(errors: Iterable[Mapping[str, Any]]) -> str:
    return "; ".join(f"{e['id']}: {e['status_code']} {e['error']}" for e in errors)
