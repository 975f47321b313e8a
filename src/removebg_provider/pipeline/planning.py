"""Planning: validate the manifest, cut it into shards under the staging prefix, and read the plan back."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from removebg_provider.errors import ConfigurationError, ManifestError, StorageError
from removebg_provider.manifest import (
    RESULT_SCHEMA,
    derive_id,
    iter_batches,
    read_schema,
    require_columns,
    require_representable,
    require_text_columns,
)
from removebg_provider.pipeline import store_index
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.pipeline.duplicates import ManifestHashes, SharedReferences
from removebg_provider.storage import Storage, comparable_uri, join_uri, local_path, scheme_of

log = logging.getLogger(__name__)

# Internal columns every shard carries beside the input's own: row number, id, reference, the id of
# the earlier row with the same reference (None for the first), and the catalog's own fingerprint of
# the image (`fingerprint_column`, as text; None without one).
ROW = "__removebg_row"
ID = "__removebg_id"
REF = "__removebg_ref"
CANONICAL = "__removebg_canonical"
SOURCE = "__removebg_source"
INTERNAL_COLUMNS = (ROW, ID, REF, CANONICAL, SOURCE)
_FIRST_ERRORS = 5


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

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "shards": [shard.to_dict() for shard in self.shards],
            "total_rows": self.total_rows,
            "duplicate_rows": self.duplicate_rows,
            "canonical_ids": sorted(self.canonical_ids),
            "schema_uri": self.schema_uri,
            "run_id": self.run_id,
        }


def plan(config: PipelineConfig, storage: Storage) -> Plan:
    """Validate the manifest and split it into shards under the staging prefix.

    Fails fast, naming the manifest, on a missing column, duplicate or colliding ids, or an
    unreadable file. Rows whose image reference repeats an earlier row's are marked as its
    duplicates: they are sent once and share the result. A config whose connection-level settings
    are unset takes their defaults (`PipelineConfig.resolved`).
    """
    config = config.resolved()
    schema = read_schema(config.manifest_uri, storage, config.manifest_format)
    wanted = [config.image_column] + [name for name in (config.id_column, config.fingerprint_column) if name]
    require_columns(config.manifest_uri, schema, wanted)
    require_text_columns(config.manifest_uri, schema, wanted)
    replaced = [name for name in schema.names if name in RESULT_SCHEMA.names]
    if replaced:
        # An enriched manifest fed back in (the daily catalog run) is expected; silently is not.
        log.warning(
            "%s already has result columns %s (an earlier run's?): this run's results replace them",
            config.manifest_uri,
            ", ".join(replaced),
        )
    require_representable(config.output_manifest_uri, schema)
    _require_writable(config.output_manifest_uri)
    total_rows, shared = _validate_ids(config, storage)

    shard_size = max(config.shard_size, -(-total_rows // config.max_map_length))
    staging = config.staging
    schema_uri = join_uri(staging, "schema.parquet")
    with storage.atomic_writer(schema_uri) as stream:
        pq.write_table(schema.empty_table(), stream)

    plan_uri = join_uri(staging, "plan.json")
    run_id = uuid.uuid4().hex
    if config.store_prefix is not None:
        store_index.register(config.store_prefix, run_id, storage)
    join = _index_join(config, storage, total_rows)
    shards: list[ShardDescriptor] = []
    for index, table in enumerate(_shard_tables(config, storage, shard_size, shared)):
        shard_uri = join_uri(staging, f"shards/shard-{index:05d}.parquet")
        with storage.atomic_writer(shard_uri) as stream:
            pq.write_table(table, stream, compression="zstd")
        first_row = int(table.column(ROW)[0].as_py())
        shards.append(ShardDescriptor(plan_uri, index, shard_uri, table.num_rows, first_row))
        if join is not None:
            join.add_shard(index, *(table.column(name).to_pylist() for name in (ROW, REF, SOURCE, CANONICAL)))
    if join is not None:
        indexed = join.write(storage)
        log.info("result store index: %d of %d rows have an indexed entry to check", indexed, total_rows)

    result = Plan(
        plan_uri,
        config,
        tuple(shards),
        total_rows,
        shared.duplicate_rows,
        frozenset(shared.canonical_ids),
        schema_uri,
        run_id=run_id,
    )
    storage.write_bytes(plan_uri, json.dumps(result.to_json()).encode())
    log.info(
        "planned %s: %d rows in %d shards of up to %d rows; %d duplicate image references share a result",
        config.manifest_uri,
        total_rows,
        len(shards),
        shard_size,
        shared.duplicate_rows,
    )
    return result


def _index_join(config: PipelineConfig, storage: Storage, total_rows: int) -> store_index.IndexJoin | None:
    """The join of the result store's index to this manifest, when it can be made without reading images.

    Only a fingerprint column gives every row's key from the manifest alone; other rows' keys need
    their images described, which the shards do.
    """
    if config.store_prefix is None or not config.fingerprint_column:
        return None
    # What an earlier plan of this job handed its shards is not this plan's.
    store_index.forget_indexed(config, storage)
    runs = store_index.recent_runs(config.store_prefix, storage)
    return store_index.IndexJoin(config, runs, total_rows) if runs else None


def load_plan(plan_uri: str, storage: Storage) -> Plan:
    """Read back the plan written by `plan`, as every mapped task does."""
    try:
        data = json.loads(storage.read_bytes(plan_uri))
    except (StorageError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read the run plan {plan_uri}: {exc}") from exc
    config = PipelineConfig.from_dict(data["config"])
    if not config.is_resolved:
        raise ConfigurationError(
            f"the run plan {plan_uri} was written by another version; plan the run again"
        )
    return Plan(
        uri=plan_uri,
        config=config,
        shards=tuple(ShardDescriptor.from_dict(shard) for shard in data["shards"]),
        total_rows=data["total_rows"],
        duplicate_rows=data["duplicate_rows"],
        canonical_ids=frozenset(data["canonical_ids"]),
        schema_uri=data["schema_uri"],
        run_id=data["run_id"],
    )


def read_parquet(uri: str, storage: Storage, columns: list[str] | None = None) -> pa.Table:
    """A whole (small) Parquet object, decoded in the calling thread."""
    # Shards are small: read whole into an Arrow-owned buffer and decoded synchronously. Arrow's
    # dataset reader (pq.read_table) finishes futures on its own threads; one releasing a buffer of
    # Python bytes while the interpreter shuts down aborts the process.
    sink = pa.BufferOutputStream()
    sink.write(storage.read_bytes(uri))
    with pq.ParquetFile(pa.BufferReader(sink.getvalue())) as parquet:
        return parquet.read(columns=columns, use_threads=False)


def _validate_ids(config: PipelineConfig, storage: Storage) -> tuple[int, SharedReferences]:
    """One pass over the id and image columns: count rows, refuse bad ids, find duplicate images.

    Only hashes are kept per row (`ManifestHashes`); a second look at the ids, made only when a
    hash repeats, confirms and names the repeated ids and colliding keys.
    """
    hashes = ManifestHashes()
    inputs_under_outputs = _InputsUnderOutputs(config.output_prefix)
    for start, references, record_ids in _id_batches(config, storage):
        for offset, record_id in enumerate(record_ids):
            if not record_id:
                raise ManifestError(
                    f"manifest {config.manifest_uri} row {start + offset} has an empty id in column "
                    f"{config.id_column!r}"
                )
        for reference in references:
            inputs_under_outputs.note(reference)
        hashes.add(references, record_ids)
    shared, repeated = hashes.finish(ids_follow_references=config.id_column is None)
    duplicates, collisions = (
        repeated.confirm((start, ids) for start, _, ids in _id_batches(config, storage))
        if repeated.any
        else ([], [])
    )
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
    overwritten = inputs_under_outputs.overwritten(
        config, (record_id for _, _, ids in _id_batches(config, storage) for record_id in ids)
    )
    if overwritten:
        raise ManifestError(
            f"manifest {config.manifest_uri}: outputs under {config.output_prefix} would overwrite input "
            f"images ({', '.join(overwritten)}); choose another output prefix or key template"
        )
    return hashes.rows, shared


def _id_batches(
    config: PipelineConfig, storage: Storage
) -> Iterator[tuple[int, list[str | None], list[str]]]:
    """The manifest's image references and ids (derived when there is no id column), batch by batch.

    Yields (first row of the batch, references, ids); an empty id is an empty string.
    """
    columns = [config.image_column] + ([config.id_column] if config.id_column else [])
    start = 0
    for batch in iter_batches(config.manifest_uri, storage, fmt=config.manifest_format, columns=columns):
        references = _as_text(batch, config.image_column, config.manifest_uri)
        if config.id_column:
            ids = [value or "" for value in _as_text(batch, config.id_column, config.manifest_uri)]
        else:
            ids = [derive_id(reference, start + offset) for offset, reference in enumerate(references)]
        yield start, references, ids
        start += batch.num_rows


def _require_writable(uri: str) -> None:
    """Refuse, before anything is billed, a local output manifest whose folder cannot be made or written.

    Object stores are not probed: that would take a write of its own; their permissions show at
    the first staging write, which also comes before any request.
    """
    if scheme_of(uri) != "file":
        return
    path = os.path.abspath(local_path(uri))
    if os.path.isdir(path):
        raise ManifestError(f"cannot write the output manifest {uri}: it is a folder")
    folder = os.path.dirname(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
        raise ManifestError(f"cannot write the output manifest {uri}: {folder} is not a writable folder")


class _InputsUnderOutputs:
    """Input images that lie under the output prefix: the only ones an output could overwrite."""

    def __init__(self, output_prefix: str) -> None:
        self._prefix = comparable_uri(output_prefix).rstrip("/") + "/"
        # An absolute reference without the prefix's last segment cannot lie under it: most rows
        # are ruled out by one substring test instead of a normalisation.
        self._last_segment = self._prefix.rstrip("/").rsplit("/", 1)[-1]
        self._found: set[str] = set()

    def note(self, reference: str | None) -> None:
        if not reference:
            return
        absolute = reference.startswith("/") or "://" in reference
        if absolute and self._last_segment not in reference:
            return
        if (spelled := comparable_uri(reference)).startswith(self._prefix):
            self._found.add(spelled)

    def overwritten(self, config: PipelineConfig, ids: Iterable[str]) -> list[str]:
        """The first few inputs some row's output would be written over (`ids` read only if any lie there)."""
        if not self._found:
            return []
        hits: set[str] = set()
        for record_id in ids:
            outputs = config.outputs_for(record_id).values()
            hits.update(uri for uri in outputs if comparable_uri(uri) in self._found)
            if len(hits) >= _FIRST_ERRORS:
                break
        return sorted(hits)[:_FIRST_ERRORS]


def _shard_tables(
    config: PipelineConfig, storage: Storage, shard_size: int, shared: SharedReferences
) -> Iterator[pa.Table]:
    """The manifest with the internal columns added, cut into tables of `shard_size` rows."""
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    row = 0
    for batch in iter_batches(config.manifest_uri, storage, fmt=config.manifest_format):
        references = _as_text(batch, config.image_column, config.manifest_uri)
        ids = _as_text(batch, config.id_column, config.manifest_uri) if config.id_column else None
        sources = (
            _as_text(batch, config.fingerprint_column, config.manifest_uri)
            if config.fingerprint_column
            else [None] * batch.num_rows
        )
        record_ids = [
            (ids[offset] or "") if ids is not None else derive_id(reference, row + offset)
            for offset, reference in enumerate(references)
        ]
        extra = [
            pa.array(range(row, row + batch.num_rows), type=pa.int64()),
            pa.array(record_ids, type=pa.string()),
            pa.array(references, type=pa.string()),
            pa.array(shared.canonical(row, references, record_ids), type=pa.string()),
            pa.array([source or None for source in sources], type=pa.string()),
        ]
        batch = pa.RecordBatch.from_arrays(
            list(batch.columns) + extra, names=list(batch.schema.names) + list(INTERNAL_COLUMNS)
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


def _as_text(batch: pa.RecordBatch, name: str, uri: str) -> list[str | None]:
    column = batch.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        try:
            column = column.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            reason = str(exc).splitlines()[0]
            problem = f"column {name!r} of manifest {uri} holds values that are not text: {reason}"
            raise ManifestError(problem) from exc
    return [value.strip() if isinstance(value, str) else value for value in column.to_pylist()]
