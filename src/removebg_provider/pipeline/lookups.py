"""A shard's side of the result store: source fingerprints, stored results, claims, keeping results."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa

from removebg_provider.errors import StorageError
from removebg_provider.pipeline import store_index
from removebg_provider.pipeline.checkpoints import now
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.pipeline.planning import CANONICAL, REF, ROW, SOURCE, read_parquet
from removebg_provider.pipeline.results import RowResult
from removebg_provider.pipeline.store import ResultStore, StoredResult, column_fingerprint, result_key
from removebg_provider.storage import Storage, scheme_of

log = logging.getLogger(__name__)

Row = dict[str, Any]
# Store lookups in flight at once per shard: each is one small GET and a version check per output.
_LOOKUP_WORKERS = 8


class ShardLookups:
    """What the result store knows of one shard's rows; fingerprints and entries are found on first use."""

    def __init__(
        self,
        rows: list[Row],
        config: PipelineConfig,
        storage: Storage,
        store: ResultStore | None,
        indexed_uri: str | None = None,
    ) -> None:
        """`indexed_uri`: the entries the plan found for these rows in the store's index (`store_index`)."""
        self.rows = rows
        self.config = config
        self.storage = storage
        self.store = store
        self.indexed_uri = indexed_uri
        self._sources: dict[int, str] | None = None
        self._stored: dict[int, StoredResult] | None = None
        self._indexed: dict[int, str] = {}
        # The entries this shard stored or served, by key: tomorrow's index.
        self.kept: dict[str, StoredResult] = {}

    def fingerprint(self, row: Row) -> str:
        """The checkpoint key's fingerprint of `row`: its reference, the run's options and its source."""
        return self.config.fingerprint(row[REF], self.sources.get(row[ROW]))

    @property
    def sources(self) -> dict[int, str]:
        """Each sendable row's source fingerprint, by row number (rows that have one), found on first use."""
        if self._sources is None:
            self._sources = self._source_fingerprints()
        return self._sources

    def _source_fingerprints(self) -> dict[int, str]:
        """What identifies each sendable row's image: the catalog's column, else the store's metadata."""
        found: dict[int, str] = {}
        to_describe: dict[int, str] = {}
        for row in self.rows:
            if row[CANONICAL] is not None or not row[REF]:
                continue
            if row[SOURCE]:
                found[row[ROW]] = column_fingerprint(row[REF], row[SOURCE])
            elif self.store is not None:
                # Without a store a fingerprint only sharpens the in-run resume key; not worth a HEAD
                # (or reading a file) per row on every run.
                to_describe[row[ROW]] = row[REF]
        described = self.storage.fingerprints(
            list(to_describe.values()),
            limit=self.config.max_image_bytes,
            allow_private_urls=self.config.allow_private_urls,
        )
        for row_number, reference in to_describe.items():
            if (fingerprint := described.get(reference)) is not None:
                found[row_number] = fingerprint
        return found

    def stored_results(self) -> dict[int, StoredResult]:
        """Rows (by number) whose image and options have a current entry in the result store."""
        if self._stored is not None:
            return self._stored
        candidates = [row for row in self.rows if row[ROW] in self.sources] if self.store else []
        if candidates and self.indexed_uri is not None:
            self._indexed = self._read_indexed(self.indexed_uri)
        # The index's entries first; a row without one, or whose one is no longer current, by GET.
        # Each time the outputs are checked together (`ResultStore.current`): on an object store
        # the outputs in one folder cost one listing, not a HEAD each.
        self._stored = self._current(self._indexed_entries(candidates))
        rest = [row for row in candidates if row[ROW] not in self._stored]
        self._stored.update(self._current(self._entries_by_get(rest)))
        return self._stored

    def _indexed_entries(self, candidates: list[Row]) -> dict[int, StoredResult]:
        """The indexed entries of `candidates`, by row: only a hint, the whole key must be the row's
        (the plan joined on 64 bits)."""
        if not self._indexed:
            return {}
        found = ((row[ROW], self._indexed_entry(row, self.store_key(row))) for row in candidates)
        return {row: entry for row, entry in found if entry is not None}

    def _entries_by_get(self, rows: list[Row]) -> dict[int, StoredResult]:
        """The store's own entries of `rows` it holds, by row; side by side on an object store."""
        if not rows:
            return {}
        read = self._read_entry
        if self._on_local_disk():
            # A local read has no latency to overlap: threads would only contend for the interpreter.
            entries = [read(row) for row in rows]
        else:
            with ThreadPoolExecutor(_LOOKUP_WORKERS, thread_name_prefix="removebg-lookup") as pool:
                entries = list(pool.map(read, rows))
        return {row[ROW]: entry for row, entry in zip(rows, entries, strict=True) if entry is not None}

    def _current(self, entries: dict[int, StoredResult]) -> dict[int, StoredResult]:
        """Those of `entries` (by row) that serve this run and whose outputs are their recorded versions."""
        serving = {row: entry for row, entry in entries.items() if entry.serves(self.config)}
        if not serving:
            return {}
        assert self.store is not None
        current = self.store.current(list(serving.values()))
        return {row: entry for (row, entry), ok in zip(serving.items(), current, strict=True) if ok}

    def _read_indexed(self, uri: str) -> dict[int, str]:
        """The entries the plan found in the index for this shard's rows; none if it wrote none."""
        try:
            if not self.storage.exists(uri):
                return {}
            table = read_parquet(uri, self.storage, columns=["row", "entry"])
        except (StorageError, pa.ArrowException) as exc:
            # A hint only: every row is then looked up by GET.
            log.warning("indexed entries %s are unreadable, entries are read one by one: %s", uri, exc)
            return {}
        return dict(zip(table.column("row").to_pylist(), table.column("entry").to_pylist(), strict=True))

    def _on_local_disk(self) -> bool:
        assert self.store is not None
        return scheme_of(self.store.prefix) == "file" and scheme_of(self.config.output_prefix) == "file"

    def store_key(self, row: Row) -> str:
        """The result store's key of `row`: its source fingerprint and the run's removal options."""
        return result_key(self.sources[row[ROW]], self.config)

    def current_entry(self, row: Row) -> StoredResult | None:
        """The stored result of `row`'s image and options, if its outputs are still what it recorded.

        The entry the index gave this row is checked first; without one, or when it is not current,
        the store's own entry is read.
        """
        indexed = self._indexed_entry(row, self.store_key(row))
        if indexed is not None and self._servable(indexed):
            return indexed
        entry = self._read_entry(row)
        return entry if entry is not None and self._servable(entry) else None

    def _read_entry(self, row: Row) -> StoredResult | None:
        """The store's own entry of `row`, current or not."""
        assert self.store is not None
        return self.store.get(self.store_key(row))

    def _indexed_entry(self, row: Row, key: str) -> StoredResult | None:
        text = self._indexed.get(row[ROW])
        if text is None:
            return None
        try:
            entry = StoredResult.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError):
            return None
        # The plan joined on the key's first 64 bits: the whole key must be this row's.
        return entry if entry.key == key else None

    def _servable(self, entry: StoredResult) -> bool:
        assert self.store is not None
        return entry.serves(self.config) and self.store.is_current(entry)

    def served(self, entry: StoredResult) -> None:
        """Note an entry this shard served, for the store's index."""
        self.kept[entry.key] = entry

    def write_index(self, run_id: str, shard_index: int) -> None:
        """Index the entries this shard stored or served (`store_index`), for the next run's plan."""
        if self.store is not None:
            store_index.write_part(self.store.prefix, run_id, shard_index, self.kept, self.storage)

    def claim(self, batch: list[Row]) -> tuple[list[Row], list[Row]]:
        """The rows this run may send (claimed, or without a fingerprint) and those another run is sending."""
        assert self.store is not None
        mine: list[Row] = []
        elsewhere: list[Row] = []
        for row in batch:
            if row[ROW] not in self.sources or self.store.claim(self.store_key(row)):
                mine.append(row)
            else:
                elsewhere.append(row)
        return mine, elsewhere

    def keep(self, row: Row, result: RowResult, written: dict[str, tuple[str, bytes]]) -> None:
        """Keep a finished result in the result store, under its image's content and the run's options."""
        source = self.sources.get(row[ROW])
        if self.store is None or source is None:
            return
        fields = {
            "width": result.width,
            "height": result.height,
            "request_id": result.request_id,
            "mode": result.mode,
            "foreground_fraction": result.foreground_fraction,
            "quality_flags": result.quality_flags,
        }
        key = result_key(source, self.config)
        entry = self.store.record(key, source, written, fields, result.processed_at or now())
        if entry is not None:
            self.kept[key] = entry
