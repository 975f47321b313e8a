"""Durable progress under the staging prefix: API answers and finished rows per batch, results per shard.

Layout, per shard N: `checkpoints/shard-N/answer-*.jsonl` (an API answer with its temporary URLs,
written before the request slot is released), `checkpoints/shard-N/ckpt-*.jsonl` (finished rows),
`results/shard-N.<run id>.jsonl` (the shard's final results). Each file starts with a header line naming
the run and what it billed. A file cut short (empty, or a torn last line, as a crash mid-write or a
copy from elsewhere can leave) is read as far as it goes, with a warning naming it, never a crash.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from removebg_provider.client import RecordResult
from removebg_provider.manifest import RESULT_SCHEMA
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.pipeline.planning import ShardDescriptor
from removebg_provider.pipeline.results import ROW_RESULT_JSON_SCHEMA, RowResult, result_arrays_from_json
from removebg_provider.storage import Storage, join_uri, unique_name
from removebg_provider.vocabulary import OUTPUT_KINDS, RowStatus

log = logging.getLogger(__name__)

# The API keeps outputs 24 hours; an answer older than this is sent again rather than copied late.
ANSWER_LIFETIME = timedelta(hours=23)
_ANSWER = "answer"
_FAR_FUTURE = datetime.max.replace(tzinfo=timezone.utc)

Key = tuple[str, str]  # (row id, fingerprint of its reference and options)

# A shard's results file after its header: a row number and a RowResult per line.
_STORED_RESULTS_SCHEMA = pa.schema([("row", pa.int64()), *ROW_RESULT_JSON_SCHEMA])
_STORED_RESULTS_PARSING = pa_json.ParseOptions(
    explicit_schema=_STORED_RESULTS_SCHEMA, unexpected_field_behavior="ignore"
)
# What a line must have to be a record: without them it is read line by line, and skipped with a warning.
_REQUIRED = ["row", "id", "status_code", "status_text"]


@dataclass(frozen=True)
class StoredResults:
    """A shard's stored results: its rows as stored and as the manifest shows them, and what it billed.

    `records` has a row number (`row`) and the columns of ROW_RESULT_JSON_SCHEMA per stored row;
    `columns` the same rows' result columns (RESULT_SCHEMA), converted once, when read.
    """

    records: pa.Table
    columns: pa.Table
    billed: int

    @classmethod
    def of(cls, records: pa.Table, billed: int) -> StoredResults:
        """`records` with their result columns; raises pa.ArrowException for a value that fits none."""
        return cls(
            records, pa.Table.from_arrays(result_arrays_from_json(records), schema=RESULT_SCHEMA), billed
        )


@dataclass
class Checkpoints:
    """What earlier attempts left for one shard, by (id, fingerprint), and what this run billed so far.

    Keying by fingerprint means a checkpoint of other work for the same id (another reference or
    other options, from an earlier run) never stands in for this run's work.
    """

    done: dict[Key, RowResult] = field(default_factory=dict)
    answers: dict[Key, tuple[datetime, RecordResult]] = field(default_factory=dict)
    failed_at: dict[Key, datetime] = field(default_factory=dict)
    billed_in_run: int = 0

    def usable_answers(self, now: datetime) -> dict[Key, RecordResult]:
        """Successful API answers whose outputs can still be copied instead of sending the row again.

        An answer is spent once a later final checkpoint records a failure for its row (its copy
        failed, or a resend failed): that row is sent again, so it is never stuck on a dead URL.
        """
        usable: dict[Key, RecordResult] = {}
        for key, (answered_at, answer) in self.answers.items():
            failed_at = self.failed_at.get(key)
            if now - answered_at < ANSWER_LIFETIME and (failed_at is None or failed_at < answered_at):
                usable[key] = answer
        return usable


class ShardStaging:
    """Reads and writes one shard's checkpoints and results for one run."""

    def __init__(self, shard: ShardDescriptor, config: PipelineConfig, run_id: str, storage: Storage) -> None:
        self.shard = shard
        self.run_id = run_id
        self.storage = storage
        self.checkpoint_prefix = join_uri(config.staging, f"checkpoints/shard-{shard.index:05d}")
        # One file per run: two runs of one job at once must not replace each other's results.
        self.results_uri = join_uri(config.staging, f"results/shard-{shard.index:05d}.{run_id}.jsonl")

    def load_checkpoints(self) -> Checkpoints:
        """Everything earlier attempts checkpointed for this shard."""
        found = Checkpoints()
        for uri in self.storage.list_prefix(self.checkpoint_prefix):
            header, *lines = _read_json_lines(self.storage, uri) or [{}]
            if header.get("run_id") == self.run_id:
                found.billed_in_run += int(header.get("billed", 0))
            if header.get("kind") == _ANSWER:
                _add_answers(found, uri, header, lines)
            else:
                _add_finished(found, uri, lines)
        return found

    def write_finished(self, results: list[RowResult]) -> None:
        """Checkpoint rows that reached their final result in this attempt."""
        # A stop is no outcome: a stopped row is not checkpointed, so a stored answer of it stays usable.
        results = [r for r in results if r.status_code != RowStatus.STOPPED]
        if results:
            self._write("ckpt", {"billed": 0, "run_id": self.run_id}, [r.to_json() for r in results])

    def write_answer(self, answers: list[RecordResult], fingerprints: Mapping[str, str], billed: int) -> None:
        """Store the API's answer for a batch, temporary output URLs included, with what it billed."""
        header = {"kind": _ANSWER, "billed": billed, "run_id": self.run_id, "answered_at": now().isoformat()}
        self._write(
            _ANSWER, header, [{"fingerprint": fingerprints[a.id], **answer_to_json(a)} for a in answers]
        )

    def write_results(self, rows: Iterable[int], results: Mapping[int, RowResult], billed: int) -> None:
        """Store the shard's final results (row number -> result) and everything this run billed for it."""
        lines = [json.dumps({"billed": billed, "run_id": self.run_id})]
        lines += [json.dumps({"row": row, **results[row].to_json()}) for row in rows if row in results]
        self.storage.write_bytes(self.results_uri, ("\n".join(lines) + "\n").encode())

    def read_results(self) -> StoredResults:
        """The shard's stored results, if this run wrote them (not an earlier run's).

        Arrow parses a whole file at once; a file it cannot take (a torn line, a line that is not a
        complete record) is read line by line instead, with warnings.
        """
        if not self.storage.exists(self.results_uri):
            return StoredResults.of(_STORED_RESULTS_SCHEMA.empty_table(), 0)
        parsed = _results_at_once(self.storage.read_bytes(self.results_uri))
        if parsed is None:
            return self._read_results_by_line()
        header, stored = parsed
        if header.get("run_id") != self.run_id:
            return StoredResults.of(_STORED_RESULTS_SCHEMA.empty_table(), 0)
        return dataclasses.replace(stored, billed=int(header.get("billed", 0)))

    def _read_results_by_line(self) -> StoredResults:
        header, *lines = _read_json_lines(self.storage, self.results_uri) or [{}]
        if header.get("run_id") != self.run_id:
            return StoredResults.of(_STORED_RESULTS_SCHEMA.empty_table(), 0)
        records: dict[int, dict[str, Any]] = {}
        for data in lines:
            with _unusable_line_warning(self.results_uri):
                record = {"row": data["row"], **RowResult.from_json(data).to_json()}
                # Converted here, line by line: a value that fits no manifest column skips its line.
                result_arrays_from_json(pa.Table.from_pylist([record], schema=_STORED_RESULTS_SCHEMA))
                records[record["row"]] = record
        stored = pa.Table.from_pylist(list(records.values()), schema=_STORED_RESULTS_SCHEMA)
        return StoredResults.of(stored, int(header.get("billed", 0)))

    def _write(self, kind: str, header: Mapping[str, Any], records: list[dict[str, Any]]) -> None:
        uri = join_uri(self.checkpoint_prefix, unique_name(kind) + ".jsonl")
        lines = [json.dumps(header)] + [json.dumps(record) for record in records]
        self.storage.write_bytes(uri, ("\n".join(lines) + "\n").encode())


def _results_at_once(data: bytes) -> tuple[dict[str, Any], StoredResults] | None:
    """A results file (header, then records) parsed by Arrow at once; None if a line needs a closer look."""
    first, _, body = data.partition(b"\n")
    try:
        # Arrow would carry bytes that are not UTF-8 into the manifest; line by line they are replaced.
        body.decode("utf-8")
        header = json.loads(first)
        records = pa_json.read_json(io.BytesIO(body), parse_options=_STORED_RESULTS_PARSING)
        stored = StoredResults.of(records, 0)
    except (ValueError, pa.ArrowException):
        return None
    complete = records.select(_REQUIRED).drop_null().num_rows == records.num_rows
    unique = pc.count_distinct(records.column("row")).as_py() == records.num_rows
    if not isinstance(header, dict) or not complete or not unique:
        return None
    return header, stored


def answer_to_json(answer: RecordResult) -> dict[str, Any]:
    """An API answer as stored: its outputs under their API field names, as RowResult stores them."""
    data = {
        "id": answer.id,
        "status_code": answer.status_code,
        "status_text": answer.status_text,
        "error": answer.error,
        "width": answer.width,
        "height": answer.height,
        "request_id": answer.request_id,
        "attempts": answer.attempts,
    }
    data.update({kind.result_key: answer.outputs.get(kind.name) for kind in OUTPUT_KINDS})
    return data


def answer_from_json(data: Mapping[str, Any]) -> RecordResult:
    """The RecordResult of `answer_to_json`."""
    return RecordResult(
        id=data["id"],
        status_code=data["status_code"],
        status_text=data["status_text"],
        error=data.get("error"),
        outputs={kind.name: url for kind in OUTPUT_KINDS if (url := data.get(kind.result_key))},
        width=data.get("width"),
        height=data.get("height"),
        request_id=data.get("request_id"),
        attempts=data.get("attempts", 1),
    )


def now() -> datetime:
    """The current UTC time, as every checkpoint records it."""
    return datetime.now(timezone.utc)


def _read_json_lines(storage: Storage, uri: str) -> list[dict[str, Any]]:
    """The JSON objects of a staging file, up to the first line that is not one (a torn write)."""
    text = storage.read_bytes(uri).decode("utf-8", errors="replace")
    records: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            log.warning(
                "%s: line %d is torn or not JSON (a write was cut short); using the %d lines before it",
                uri,
                number,
                len(records),
            )
            break
        records.append(record)
    if not records:
        log.warning("%s is empty (a write was cut short); skipped", uri)
    return records


@contextmanager
def _unusable_line_warning(uri: str) -> Iterator[None]:
    """Skip, with a warning naming the file, a line that is JSON but not a record of ours."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("%s: skipped a line that is not a complete record (%s: %s)", uri, type(exc).__name__, exc)


def _add_answers(
    found: Checkpoints, uri: str, header: Mapping[str, Any], lines: list[dict[str, Any]]
) -> None:
    try:
        answered_at = datetime.fromisoformat(header["answered_at"])
    except (KeyError, TypeError, ValueError):
        log.warning("%s: its header has no answer time; its answers are not used", uri)
        return
    for data in lines:
        with _unusable_line_warning(uri):
            key = (data["id"], data["fingerprint"])
            answer = answer_from_json(data)
            newest = found.answers.get(key)
            if answer.ok and (newest is None or newest[0] < answered_at):
                found.answers[key] = (answered_at, answer)


def _add_finished(found: Checkpoints, uri: str, lines: list[dict[str, Any]]) -> None:
    for data in lines:
        with _unusable_line_warning(uri):
            _add_finished_row(found, RowResult.from_json(data))


def _add_finished_row(found: Checkpoints, row_result: RowResult) -> None:
    if row_result.fingerprint is None:
        return
    key = (row_result.id, row_result.fingerprint)
    if row_result.ok:
        found.done[key] = row_result
    else:
        # A failure without a time cannot be ordered against an answer: it spends them all.
        stamp = row_result.processed_at or _FAR_FUTURE
        found.failed_at[key] = max(stamp, found.failed_at.get(key, stamp))
