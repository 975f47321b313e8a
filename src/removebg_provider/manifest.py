"""Read, validate and write manifests (Parquet, CSV, JSON Lines) in bounded memory."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import IO, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from removebg_provider.errors import ManifestError
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import FLAG_SEPARATOR, RESULT_COLUMNS, ColumnType

ManifestFormat = Literal["parquet", "csv", "jsonl"]
FORMATS: tuple[ManifestFormat, ...] = ("parquet", "csv", "jsonl")
DEFAULT_BATCH_ROWS = 65_536

_ARROW_TYPES: dict[ColumnType, pa.DataType] = {
    "int32": pa.int32(),
    "float32": pa.float32(),
    "string": pa.string(),
    "timestamp": pa.timestamp("us", tz="UTC"),
    "string_list": pa.list_(pa.string()),
}
# The enriched manifest's result columns (vocabulary.RESULT_COLUMNS) as Arrow fields.
RESULT_SCHEMA = pa.schema([(name, _ARROW_TYPES[kind]) for name, kind, _ in RESULT_COLUMNS])

_EXTENSIONS: dict[str, ManifestFormat] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
_CSV_BLOCK_BYTES = 4 << 20
# A CSV header is parsed from the first block of this many bytes, read from at most this many.
_CSV_HEADER_BLOCK_BYTES = 1 << 16
_CSV_HEADER_READ_BYTES = 1 << 20
_JSON_BLOCK_BYTES = 16 << 20


def manifest_format(uri: str, explicit: str | None = None) -> ManifestFormat:
    """The manifest's format: `explicit` when given, else from the URI's extension."""
    if explicit:
        if explicit not in FORMATS:
            raise ManifestError(f"unknown manifest format {explicit!r} for {uri}; use one of {FORMATS}")
        return explicit
    path = uri.split("?", 1)[0].lower()
    for extension, fmt in _EXTENSIONS.items():
        if path.endswith(extension):
            return fmt
    raise ManifestError(
        f"cannot tell the format of manifest {uri} from its extension; name it .parquet, .csv or "
        ".jsonl, or pass manifest_format"
    )


def iter_batches(
    uri: str,
    storage: Storage,
    *,
    fmt: str | None = None,
    columns: Sequence[str] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Stream the manifest at `uri` as record batches of at most `batch_rows` rows.

    CSV columns are read as text, so identifiers such as `00123` keep their leading zeros.
    `columns` limits what is read (the columns must exist). Errors name the manifest.
    """
    resolved = manifest_format(uri, fmt)
    try:
        with storage.open(uri, "rb") as stream:
            if resolved == "parquet":
                yield from _parquet_batches(uri, stream, columns, batch_rows)
            elif resolved == "csv":
                yield from _csv_batches(uri, storage, stream, columns, batch_rows)
            else:
                yield from _jsonl_batches(stream, columns, batch_rows)
    except ManifestError:
        raise
    except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
        raise ManifestError(f"cannot read manifest {uri} as {resolved}: {_first_line(exc)}") from exc


def read_schema(uri: str, storage: Storage, fmt: str | None = None) -> pa.Schema:
    """The manifest's column schema, read from its footer or first block."""
    resolved = manifest_format(uri, fmt)
    if resolved == "parquet":
        try:
            with storage.open(uri, "rb") as stream, pq.ParquetFile(stream, pre_buffer=False) as parquet:
                return parquet.schema_arrow
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ManifestError(f"cannot read manifest {uri} as parquet: {_first_line(exc)}") from exc
    try:
        if resolved == "csv":
            # Every CSV column is read as text: the header is the schema.
            return pa.schema([(name, pa.string()) for name in _csv_header(uri, storage)])
        with storage.open(uri, "rb") as stream:
            first_lines = _whole_lines(stream.read(_JSON_BLOCK_BYTES))
        for batch in _jsonl_batches(pa.BufferReader(first_lines), None, 1):
            return batch.schema
    except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
        raise ManifestError(f"cannot read manifest {uri} as {resolved}: {_first_line(exc)}") from exc
    return _empty_schema(uri, storage, resolved)


def _whole_lines(data: bytes) -> bytes:
    """`data` up to its last line break: the first block of a file, without a line cut in two."""
    end = data.rfind(b"\n")
    return data[: end + 1] if end >= 0 else data


def require_columns(uri: str, schema: pa.Schema, columns: Sequence[str]) -> None:
    """Raise ManifestError naming the manifest when a column name repeats or any of `columns` is missing."""
    repeated = sorted({name for name in schema.names if schema.names.count(name) > 1})
    if repeated:
        raise ManifestError(
            f"manifest {uri} has more than one column named {', '.join(repr(n) for n in repeated)}; "
            "give every column its own name"
        )
    missing = [name for name in columns if name not in schema.names]
    if missing:
        raise ManifestError(
            f"manifest {uri} has no column {', '.join(repr(m) for m in missing)}; "
            f"its columns are {schema.names}"
        )


def require_text_columns(uri: str, schema: pa.Schema, columns: Sequence[str]) -> None:
    """Raise ManifestError naming the manifest when any of `columns` holds nested values (lists,
    structs, maps) where one text (or a number) per row is needed: image references, ids."""
    for name in columns:
        kind = schema.field(name).type
        if pa.types.is_nested(kind):
            raise ManifestError(
                f"column {name!r} of manifest {uri} holds {kind} values; it must hold text (or numbers)"
            )


def require_representable(uri: str, schema: pa.Schema, fmt: str | None = None) -> None:
    """Raise ManifestError when a manifest in `uri`'s format could not hold or give back `schema`'s columns.

    CSV has no nested values (lists of plain values are written joined, as text); JSON Lines
    writes a map column as a list of pairs that reads back as something else.
    """
    resolved = manifest_format(uri, fmt)
    if resolved == "parquet":
        return
    for item in schema:
        kind = item.type
        if resolved == "csv" and pa.types.is_nested(kind) and not _is_plain_list(kind):
            raise ManifestError(
                f"column {item.name!r} ({kind}) cannot be written to the CSV manifest {uri}; "
                "write a .parquet manifest instead"
            )
        if resolved == "jsonl" and (pa.types.is_map(kind) or _holds_map(kind)):
            raise ManifestError(
                f"column {item.name!r} ({kind}) cannot be read back from the JSON Lines manifest {uri}; "
                "write a .parquet manifest instead"
            )


def _is_plain_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) and not pa.types.is_nested(kind.value_type)


def _holds_map(kind: pa.DataType) -> bool:
    return any(
        pa.types.is_map(kind.field(i).type) or _holds_map(kind.field(i).type) for i in range(kind.num_fields)
    )


class ManifestWriter:
    """Writes record batches to a manifest that appears at its URI only when fully written."""

    def __init__(self, uri: str, storage: Storage, schema: pa.Schema, fmt: str | None = None) -> None:
        self.uri = uri
        self.format = manifest_format(uri, fmt)
        self.schema = schema
        self.rows = 0
        self._storage = storage
        self._context: Any = None
        self._stream: IO[bytes] | None = None
        self._writer: pq.ParquetWriter | pa_csv.CSVWriter | None = None

    def __enter__(self) -> ManifestWriter:
        self._context = self._storage.atomic_writer(self.uri)
        self._stream = self._context.__enter__()
        if self.format == "parquet":
            self._writer = pq.ParquetWriter(self._stream, self.schema, compression="zstd")
        elif self.format == "csv":
            self._writer = pa_csv.CSVWriter(self._stream, _csv_schema(self.schema))
        return self

    def write(self, batch: pa.RecordBatch) -> None:
        """Append `batch` (which must have the writer's schema).

        CSV joins list cells with ';' and defuses text a spreadsheet would run as a formula (see
        `_without_formulas`).
        """
        if self.format == "csv":
            batch = _without_formulas(_joined_lists(batch))
        if self._writer is not None:
            self._writer.write_batch(batch)
        else:
            assert self._stream is not None
            lines = "".join(json.dumps(row, default=str) + "\n" for row in batch.to_pylist())
            self._stream.write(lines.encode())
        self.rows += batch.num_rows

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            self._context.__exit__(exc_type, exc, traceback)


def derive_id(reference: str | None, row: int) -> str:
    """A stable, readable id for a row without an id column: the file name plus a hash of the reference.

    Rows without a reference get an id from their row number, so they still appear in the output.
    """
    if not reference:
        return f"row-{row}"
    stem = reference.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:48] or "image"
    return f"{stem}-{hashlib.sha256(reference.encode()).hexdigest()[:12]}"


def _csv_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([pa.field(f.name, pa.string()) if pa.types.is_list(f.type) else f for f in schema])


def _joined_lists(batch: pa.RecordBatch) -> pa.RecordBatch:
    columns = [
        pc.binary_join(column, FLAG_SEPARATOR) if pa.types.is_list(column.type) else column
        for column in batch.columns
    ]
    return pa.RecordBatch.from_arrays(columns, schema=_csv_schema(batch.schema))


# A spreadsheet opening the CSV runs a cell starting with one of these as a formula (CSV injection);
# a leading apostrophe makes it text. Signed numbers are left alone: they are numbers, not formulas.
_FORMULA_START = r"^[=+\-@\t\r]"
_SIGNED_NUMBER = r"^[+-]?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$"


def _without_formulas(batch: pa.RecordBatch) -> pa.RecordBatch:
    columns = []
    for column in batch.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            risky = pc.and_(
                pc.match_substring_regex(column, _FORMULA_START),
                pc.invert(pc.match_substring_regex(column, _SIGNED_NUMBER)),
            )
            defused = pc.binary_join_element_wise("'", column, "")
            column = pc.if_else(pc.fill_null(risky, False), defused, column)
        columns.append(column)
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


def _parquet_batches(
    uri: str, stream: IO[bytes], columns: Sequence[str] | None, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    # Every reader here decodes in the calling thread, not Arrow's pool: pool threads release
    # buffers of the Python file object, and one doing so while the interpreter shuts down aborts
    # the process ("terminate called without an active exception").
    with pq.ParquetFile(stream, pre_buffer=False) as parquet:
        if columns is not None:
            require_columns(uri, parquet.schema_arrow, columns)
        yield from parquet.iter_batches(
            batch_size=batch_rows, columns=list(columns) if columns else None, use_threads=False
        )


def _csv_batches(
    uri: str,
    storage: Storage,
    stream: IO[bytes],
    columns: Sequence[str] | None,
    batch_rows: int,
) -> Iterator[pa.RecordBatch]:
    names = _csv_header(uri, storage)
    with pa_csv.open_csv(
        stream,
        read_options=pa_csv.ReadOptions(block_size=_CSV_BLOCK_BYTES, use_threads=False),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            include_columns=list(columns) if columns else None,
            strings_can_be_null=True,
        ),
    ) as reader:
        yield from _rebatch(reader, batch_rows)


def _csv_header(uri: str, storage: Storage) -> list[str]:
    # Parsed from the file's first bytes in memory, not from the Python stream: a reader left with a
    # read ahead of a Python file in Arrow's I/O thread can abort the interpreter at exit.
    with storage.open(uri, "rb") as stream:
        first_bytes = stream.read(_CSV_HEADER_READ_BYTES)
    with pa_csv.open_csv(
        pa.BufferReader(first_bytes),
        read_options=pa_csv.ReadOptions(block_size=_CSV_HEADER_BLOCK_BYTES, use_threads=False),
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
    ) as head:
        return list(head.schema.names)


def _jsonl_batches(
    stream: IO[bytes] | pa.NativeFile, columns: Sequence[str] | None, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    with pa_json.open_json(
        stream, read_options=pa_json.ReadOptions(block_size=_JSON_BLOCK_BYTES, use_threads=False)
    ) as reader:
        for batch in _rebatch(reader, batch_rows):
            yield batch.select(list(columns)) if columns else batch


def _rebatch(reader: Any, batch_rows: int) -> Iterator[pa.RecordBatch]:
    for batch in reader:
        for offset in range(0, batch.num_rows, batch_rows):
            yield batch.slice(offset, batch_rows)


def _empty_schema(uri: str, storage: Storage, fmt: ManifestFormat) -> pa.Schema:
    if fmt == "csv":
        try:
            return pa.schema([(name, pa.string()) for name in _csv_header(uri, storage)])
        except pa.ArrowInvalid:
            pass
    with storage.open(uri, "rb") as stream:
        if stream.read(1):
            raise ManifestError(f"manifest {uri} has content but no readable rows")
    return pa.schema([])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
