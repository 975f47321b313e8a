"""The result store's index: each run's entries in a few Parquet files, joined to the next plan in one pass.

Layout under the store prefix, beside `entries/` and `claims/` (see `store`):

    index/runs/<stamp>-<run id>.json            written by the plan of every run with a store
    index/parts/<run id>/shard-<n>.parquet      the entries one shard of that run stored or served
    index/complete/<stamp>-<run id>.json        written by the run's merge: every shard had its turn

The per-key entries stay the truth; the index only saves their GETs on a daily catalog, where
nearly every row was stored or served yesterday. The plan of a run whose manifest has a fingerprint
column (every key known without reading an image) streams complete runs' parts once, newest run
first, and gives each shard the indexed entries of its rows
(`<staging>/indexed/<run id>/shard-<n>.parquet`). Runs of other catalogs sharing the store, or a
small one-off run, may have completed since this catalog's last run: the plan reads older runs
until those read cover half of its rows (`IndexJoin.write`), skipping runs far larger than its
manifest, whose streaming would cost more than the GETs it saves.

A shard checks an indexed entry as it would a GET's: its key must be the row's and its outputs
still their recorded versions. A row the index lacks, or whose indexed entry is no longer current,
is looked up by GET, so an index older than the entries costs a GET, never a second bill, and
never serves a stale cutout.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from removebg_provider.errors import StorageError
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.pipeline.store import StoredResult, column_fingerprint, result_key
from removebg_provider.storage import Storage, join_uri

log = logging.getLogger(__name__)

_STAMP = "%Y%m%dT%H%M%S%fZ"
_STAMP_LENGTH = len("20260101T000000000000Z")
_PART = re.compile(r"shard-\d{5,}\.parquet")
_KEY = re.compile(r"[0-9a-f]{40}")
# Index rows written per row group and read at a time by the plan: the join holds one batch of
# entries (about 16 MB of JSON), not the index.
_INDEX_BATCH_ROWS = 32_768
# Matches the plan holds before writing them to its spill folder.
_SPILL_BYTES = 16 << 20
INDEX_SCHEMA = pa.schema([("key_prefix", pa.uint64()), ("key", pa.string()), ("entry", pa.string())])
_INDEXED_SCHEMA = pa.schema([("row", pa.int64()), ("entry", pa.string())])
# Complete runs a plan considers, newest first. Once the runs read cover this share of its rows, an
# older run would add at most the rest (on a daily catalog, the few images changed since).
_RUNS_CONSIDERED = 8
_COVERED_SHARE = 0.5
# Index rows a plan streams at most, per row it joins: a run far larger than the manifest (another
# catalog's) would cost more than the GETs it could save.
_ROWS_STREAMED_PER_ROW = 4


def key_prefix(key: str) -> int:
    """A key's first 64 bits: what the plan joins on (the shard then checks the whole key)."""
    return int(key[:16], 16)


def write_part(
    store_prefix: str, run_id: str, shard_index: int, entries: Mapping[str, StoredResult], storage: Storage
) -> None:
    """Index the entries one shard of a run stored or served; a failure only warns (tomorrow GETs them).

    A later try of the shard (a retried task) adds its entries to those of the earlier tries: the
    rows it resumed from their checkpoints were stored or served by them, not looked up again.
    """
    if not entries:
        return
    uri = join_uri(store_prefix, f"index/parts/{run_id}/shard-{shard_index:05d}.parquet")
    texts = _earlier_part(uri, storage)
    texts.update((key, json.dumps(entry.to_json())) for key, entry in entries.items())
    keys = sorted(texts)
    table = pa.table(
        {
            "key_prefix": pa.array([key_prefix(key) for key in keys], pa.uint64()),
            "key": keys,
            "entry": [texts[key] for key in keys],
        },
        schema=INDEX_SCHEMA,
    )
    try:
        with storage.atomic_writer(uri) as stream:
            pq.write_table(table, stream, compression="zstd", row_group_size=_INDEX_BATCH_ROWS)
    except StorageError as exc:
        log.warning(
            "result store index of shard %d not written (the next run reads its entries one by one): %s",
            shard_index,
            exc,
        )


def _earlier_part(uri: str, storage: Storage) -> dict[str, str]:
    """The entries (as JSON, by key) an earlier try of a shard indexed at `uri`; none if unreadable."""
    try:
        if not storage.exists(uri):
            return {}
        with storage.open(uri, "rb") as stream, pq.ParquetFile(stream) as part:
            if not _has_index_columns(part.schema_arrow):
                return {}
            table = part.read(columns=["key", "entry"], use_threads=False).drop_null()
    except (StorageError, pa.ArrowException, OSError, ValueError) as exc:
        log.warning("result store index %s of an earlier try is unreadable, written anew: %s", uri, exc)
        return {}
    found = zip(table.column("key").to_pylist(), table.column("entry").to_pylist(), strict=True)
    # Only keys as `result_key` makes them: the key prefix is read from the first 16 hex digits.
    return {key: entry for key, entry in found if _KEY.fullmatch(key)}


def register(store_prefix: str, run_id: str, storage: Storage) -> None:
    """Note a run that may write index parts, dated, so that `prune` finds them even if it never completes."""
    try:
        storage.write_bytes(_run_uri(store_prefix, "runs", run_id), json.dumps({"run_id": run_id}).encode())
    except StorageError as exc:
        log.warning("result store run %s not registered (its index may outlive prune): %s", run_id, exc)


def complete(store_prefix: str, run_id: str, rows: int, storage: Storage) -> None:
    """Mark a run's index complete (its merge: every shard had its turn), so the next plan reads it.

    `rows`: the run's manifest rows, at most its entries: what reading its parts would cost a plan.
    """
    parts = [
        uri for uri in storage.list_prefix(_parts_folder(store_prefix, run_id)) if uri.endswith(".parquet")
    ]
    if not parts:
        return
    body = {"run_id": run_id, "rows": rows, "parts": sorted(_name(uri) for uri in parts)}
    try:
        storage.write_bytes(_run_uri(store_prefix, "complete", run_id), json.dumps(body).encode())
    except StorageError as exc:
        log.warning(
            "result store index of run %s not marked complete (the next run reads entries one by one): %s",
            run_id,
            exc,
        )


@dataclass(frozen=True)
class IndexedRun:
    """One complete run's index: its parts, and its manifest's rows if its marker says (older ones don't)."""

    run_id: str
    parts: tuple[str, ...]
    rows: int | None


def recent_runs(store_prefix: str, storage: Storage) -> list[IndexedRun]:
    """Complete runs a plan may read, newest first: at most `_RUNS_CONSIDERED`, unreadable ones skipped."""
    completed = list(_listed(store_prefix, "complete", storage).items())
    runs: list[IndexedRun] = []
    for marker, run_id in reversed(completed[-_RUNS_CONSIDERED:]):
        try:
            body = json.loads(storage.read_bytes(marker))
            names, rows = body["parts"], body.get("rows")
            if not isinstance(names, list):
                raise TypeError(f"its parts are {type(names).__name__}, not a list")
        except (StorageError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("result store index %s is unreadable, entries are read one by one: %s", marker, exc)
            continue
        folder = _parts_folder(store_prefix, run_id)
        parts = tuple(join_uri(folder, name) for name in names if _PART.fullmatch(str(name)))
        if parts:
            runs.append(IndexedRun(run_id, parts, rows if isinstance(rows, int) and rows >= 0 else None))
    return runs


def indexed_uri(config: PipelineConfig, shard_index: int) -> str:
    """Where the plan puts the indexed entries of one shard's rows.

    One place per job, not per run: a plan or a merge removes what an earlier run of the job left
    there. A shard finding another plan's file (two runs of one job at once) checks each entry's
    whole key, so it only reads some rows by GET.
    """
    return join_uri(config.staging, f"indexed/shard-{shard_index:05d}.parquet")


def forget_indexed(config: PipelineConfig, storage: Storage) -> None:
    """Remove the indexed entries handed to a job's shards (a new plan replaces them; a merge is done)."""
    try:
        for uri in storage.list_prefix(join_uri(config.staging, "indexed/")):
            storage.delete(uri)
    except StorageError as exc:
        log.warning("indexed entries not removed from the staging prefix %s: %s", config.staging, exc)


class IndexJoin:
    """The plan's side: each sendable row's key prefix, then complete runs' indexes streamed past them once.

    It holds 12 bytes per row (a key's first 64 bits and its row number) in arrays made once for
    the whole manifest, sorted in place: a ten-million-row manifest costs 120 MB and, while sorting,
    80 MB more.
    """

    def __init__(self, config: PipelineConfig, runs: list[IndexedRun], total_rows: int) -> None:
        """`runs`: complete runs, newest first (`recent_runs`); a row takes the newest run's entry."""
        self.config = config
        self.runs = runs
        self._prefixes = np.empty(total_rows, dtype=np.uint64)
        self._rows = np.empty(total_rows, dtype=np.uint32 if total_rows < 2**32 else np.int64)
        self._count = 0
        # Shards are cut from the manifest in order: the first row of each tells a row's shard.
        self._first_rows: list[int] = []

    def add_shard(
        self,
        shard_index: int,
        rows: list[int],
        references: list[str | None],
        values: list[str | None],
        duplicate_of: list[str | None],
    ) -> None:
        """Note the key of each row of the next shard that the store would look up: one with a
        reference and a fingerprint value that is not a duplicate of an earlier row's reference."""
        if shard_index != len(self._first_rows) or not rows:
            raise ValueError(f"shard {shard_index} is not the next shard of the plan, or has no row")
        self._first_rows.append(rows[0])
        prefixes: list[int] = []
        numbers: list[int] = []
        for row, reference, value, duplicate in zip(rows, references, values, duplicate_of, strict=True):
            if reference and value and duplicate is None:
                prefixes.append(key_prefix(result_key(column_fingerprint(reference, value), self.config)))
                numbers.append(row)
        end = self._count + len(numbers)
        self._prefixes[self._count : end] = prefixes
        self._rows[self._count : end] = numbers
        self._count = end

    def write(self, storage: Storage) -> int:
        """Give each shard the indexed entries of its rows (`indexed_uri`); how many rows got one.

        Runs are read newest first until they cover `_COVERED_SHARE` of the rows; a run of known
        size that would take the rows streamed past `_ROWS_STREAMED_PER_ROW` per row is skipped.
        """
        if not self._count:
            return 0
        prefixes, rows = self._prefixes[: self._count], self._rows[: self._count]
        order = np.argsort(prefixes)
        prefixes.sort()
        rows = rows[order]
        del order
        first_rows = np.array(self._first_rows)
        # Which sorted positions a run read earlier (a newer one) already gave an entry.
        matched_at = np.zeros(self._count, dtype=bool)
        matched = streamed = 0
        budget = _ROWS_STREAMED_PER_ROW * self._count
        with tempfile.TemporaryDirectory(prefix="removebg-indexed-") as folder:
            spill = _Spill(Path(folder))
            for run in self.runs:
                if matched >= _COVERED_SHARE * self._count:
                    break
                if run.rows is not None and streamed + run.rows > budget:
                    log.info(
                        "result store index of run %s (%d rows) skipped: far larger than this manifest",
                        run.run_id,
                        run.rows,
                    )
                    continue
                before = matched
                for batch in self._index_batches(run, storage):
                    streamed += batch.num_rows
                    which, at = _matches(prefixes, batch.column(0).to_numpy())
                    fresh = ~matched_at[at]
                    which, at = which[fresh], at[fresh]
                    if not len(at):
                        continue
                    matched_at[at] = True
                    matched += len(at)
                    found = rows[at]
                    shards = np.searchsorted(first_rows, found, side="right") - 1
                    spill.add(
                        shards,
                        pa.table(
                            {"row": found.astype(np.int64), "entry": batch.column(2).take(pa.array(which))}
                        ),
                    )
                log.info("result store index of run %s: entries for %d rows", run.run_id, matched - before)
            for shard_index, table in spill.by_shard():
                with storage.atomic_writer(indexed_uri(self.config, shard_index)) as stream:
                    pq.write_table(table, stream, compression="zstd")
        return matched

    def _index_batches(self, run: IndexedRun, storage: Storage) -> Iterator[pa.RecordBatch]:
        for uri in run.parts:
            try:
                with storage.open(uri, "rb") as stream, pq.ParquetFile(stream) as index:
                    if not _has_index_columns(index.schema_arrow):
                        # Another version's layout, or a hand's: the join would misread it.
                        raise ValueError(f"its columns are {index.schema_arrow}, not {INDEX_SCHEMA}")
                    for batch in index.iter_batches(
                        batch_size=_INDEX_BATCH_ROWS, columns=INDEX_SCHEMA.names, use_threads=False
                    ):
                        # A row without a key prefix or an entry points nowhere.
                        yield batch.drop_null()
            except (StorageError, pa.ArrowException, OSError, ValueError) as exc:
                log.warning(
                    "result store index %s is unreadable, its entries are read one by one: %s", uri, exc
                )


def _matches(prefixes: np.ndarray, batch_prefixes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each match of a batch's key prefixes in the sorted `prefixes`: (its batch row, its sorted position).

    A prefix may stand for several rows (the same image under several ids): each gets it.
    """
    first = np.searchsorted(prefixes, batch_prefixes, side="left")
    counts = np.searchsorted(prefixes, batch_prefixes, side="right") - first
    which = np.repeat(np.arange(len(counts)), counts)
    at = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
    return which, at


class _Spill:
    """The plan's matches on local disk, grouped by shard; a bounded amount of them in memory.

    Each flush writes one Arrow IPC file, sorted by shard, with one record batch per shard, so a
    shard's matches are read back batch by batch without reading the rest.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._tables: list[pa.Table] = []
        self._shards: list[np.ndarray] = []
        self._bytes = 0
        self._files = 0
        # Shard -> (spill file, record batch) of each flush that held matches of that shard.
        self._batches: dict[int, list[tuple[Path, int]]] = {}

    def add(self, shards: np.ndarray, table: pa.Table) -> None:
        """Keep `table`'s matches (one per row, of shard `shards[i]`); flushed once large enough."""
        self._tables.append(table)
        self._shards.append(shards)
        self._bytes += table.nbytes
        if self._bytes >= _SPILL_BYTES:
            self._flush()

    def by_shard(self) -> Iterator[tuple[int, pa.Table]]:
        """Each shard with its matches, shard after shard."""
        self._flush()
        readers: dict[Path, pa.ipc.RecordBatchFileReader] = {}
        for shard_index in sorted(self._batches):
            batches = []
            for path, number in self._batches[shard_index]:
                if path not in readers:
                    readers[path] = pa.ipc.open_file(pa.OSFile(str(path)))
                batches.append(readers[path].get_batch(number))
            yield shard_index, pa.Table.from_batches(batches, schema=_INDEXED_SCHEMA)

    def _flush(self) -> None:
        if not self._tables:
            return
        shards = np.concatenate(self._shards)
        order = np.argsort(shards, kind="stable")
        table = pa.concat_tables(self._tables).take(pa.array(order)).combine_chunks()
        shards = shards[order]
        self._tables, self._shards, self._bytes = [], [], 0
        path = self.folder / f"{self._files:06d}.arrow"
        self._files += 1
        starts = np.r_[0, np.flatnonzero(np.diff(shards)) + 1]
        stops = np.r_[starts[1:], len(shards)]
        written = 0
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, _INDEXED_SCHEMA) as writer:
            for start, stop in zip(starts, stops, strict=True):
                for batch in table.slice(start, stop - start).to_batches():
                    writer.write_batch(batch)
                    self._batches.setdefault(int(shards[start]), []).append((path, written))
                    written += 1


def _has_index_columns(schema: pa.Schema) -> bool:
    """Whether a part has the index's columns with their types (`INDEX_SCHEMA`)."""
    return all(
        schema.get_field_index(field.name) >= 0 and schema.field(field.name).type == field.type
        for field in INDEX_SCHEMA
    )


def files(store_prefix: str, storage: Storage) -> list[str]:
    """Every file of the index: the runs' registrations, their parts and the completion markers."""
    runs = _listed(store_prefix, "runs", storage)
    completed = _listed(store_prefix, "complete", storage)
    # A run that a prune overtook (its registration removed while it ran) is found by its marker.
    run_ids = dict.fromkeys([*runs.values(), *completed.values()])
    parts = [uri for run_id in run_ids for uri in storage.list_prefix(_parts_folder(store_prefix, run_id))]
    return list(runs) + parts + list(completed)


def prune(
    store_prefix: str, storage: Storage, older_than: timedelta, *, even_if_current: bool = False
) -> int:
    """Remove the index files of runs registered more than `older_than` ago; how many went.

    The newest complete run's files are kept unless `even_if_current` (its entries would otherwise
    be read one by one tomorrow): with it, their images are billed again when met, as the entries'.
    A run whose registration an earlier prune removed while it ran is dated by its completion.
    """
    cutoff = _stamp(datetime.now(timezone.utc) - older_than)
    completed = _listed(store_prefix, "complete", storage)
    registered = _listed(store_prefix, "runs", storage)
    kept = set() if even_if_current else set(list(completed.values())[-1:])
    started = {run_id: _name(uri)[:_STAMP_LENGTH] for uri, run_id in completed.items()}
    started.update({run_id: _name(uri)[:_STAMP_LENGTH] for uri, run_id in registered.items()})
    gone = {run_id for run_id, stamp in started.items() if stamp < cutoff and run_id not in kept}
    doomed = [uri for run_id in gone for uri in storage.list_prefix(_parts_folder(store_prefix, run_id))]
    doomed += [uri for uri, run_id in completed.items() if run_id in gone]
    doomed += [uri for uri, run_id in registered.items() if run_id in gone]
    for uri in doomed:
        storage.delete(uri)
    return len(doomed)


def _run_uri(store_prefix: str, kind: str, run_id: str) -> str:
    return join_uri(store_prefix, f"index/{kind}/{_stamp()}-{run_id}.json")


def _parts_folder(store_prefix: str, run_id: str) -> str:
    return join_uri(store_prefix, f"index/parts/{run_id}/")


def _listed(store_prefix: str, kind: str, storage: Storage) -> dict[str, str]:
    """The `index/<kind>/` files (runs or complete), oldest first, with the run each names."""
    found = storage.list_prefix(join_uri(store_prefix, f"index/{kind}/"))
    listed = sorted((uri for uri in found if uri.endswith(".json")), key=_name)
    return {uri: _name(uri)[_STAMP_LENGTH + 1 : -len(".json")] for uri in listed}


def _name(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def _is_part(uri: str) -> bool:
    """Whether `uri` names a part as a shard writes it (a marker cannot point the plan anywhere else)."""
    return _PART.fullmatch(_name(uri)) is not None


def _stamp(when: datetime | None = None) -> str:
    return (when or datetime.now(timezone.utc)).strftime(_STAMP)
