"""Merging: the enriched manifest from every shard's stored results, every input row once, then the report."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from removebg_provider.errors import RemoveBgError
from removebg_provider.manifest import RESULT_SCHEMA, ManifestWriter
from removebg_provider.pipeline import store_index
from removebg_provider.pipeline.checkpoints import ShardStaging, StoredResults
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.pipeline.planning import CANONICAL, ID, INTERNAL_COLUMNS, ROW, Plan, read_parquet
from removebg_provider.pipeline.results import (
    RowResult,
    RunSummary,
    Tally,
    enforce_failure_policy,
    result_arrays,
)
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus

log = logging.getLogger(__name__)


def merge(plan_: Plan, storage: Storage) -> RunSummary:
    """Write the enriched manifest: every input row once, in order, with its `removebg_*` columns.

    Rows of a shard that has no stored results get status 504 ("not processed"). The manifest is
    written atomically, then the report is built, then the run-wide failure policy is applied.
    """
    config = plan_.config
    with storage.open(plan_.schema_uri, "rb") as stream:
        input_schema = pq.read_schema(stream)
    kept = [name for name in input_schema.names if name not in RESULT_SCHEMA.names]
    output_schema = pa.schema([input_schema.field(name) for name in kept] + list(RESULT_SCHEMA))
    canonical: dict[str, RowResult] = {}
    canonical_ids = pa.array(sorted(plan_.canonical_ids), pa.string())
    tally = Tally()
    billed = 0
    with ManifestWriter(
        config.output_manifest_uri, storage, output_schema, config.output_manifest_format
    ) as out:
        for shard in plan_.shards:
            table = read_parquet(shard.uri, storage)
            stored = ShardStaging(shard, config, plan_.run_id, storage).read_results()
            billed += stored.billed
            results = _merged_results(table, stored, canonical_ids, canonical, shard.index)
            tally.add_columns(table.column(ID), results)
            columns = [table.column(name) for name in kept] + results.columns
            out.write(
                pa.RecordBatch.from_arrays(
                    [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns],
                    schema=output_schema,
                )
            )
    if config.store_prefix is not None:
        store_index.complete(config.store_prefix, plan_.run_id, plan_.total_rows, storage)
        store_index.forget_indexed(config, storage)
    report_html_uri, report_png_uri = _write_report(config, storage)
    summary = dataclasses.replace(
        tally.summary(billed=billed),
        output_manifest_uri=config.output_manifest_uri,
        output_prefix=config.output_prefix,
        report_html_uri=report_html_uri,
        report_png_uri=report_png_uri,
    )
    log.info("enriched manifest %s written: %s", config.output_manifest_uri, json.dumps(summary.to_dict()))
    enforce_failure_policy(summary, config.max_failed_fraction, config.manifest_uri)
    return summary


def _merged_results(
    table: pa.Table,
    stored: StoredResults,
    canonical_ids: pa.Array,
    canonical: dict[str, RowResult],
    shard_index: int,
) -> pa.Table:
    """The result columns (RESULT_SCHEMA) of a shard's rows, in order, from its stored results.

    A row with a stored result takes it as stored, column by column; the others (rows sharing
    another row's image, rows without a result) are made one by one. Canonical rows' results are
    kept in `canonical` for the rows of later shards that share their image.
    """
    records = stored.records
    position = pc.index_in(table.column(ROW), value_set=records.column("row"))
    shares = table.column(CANONICAL).is_valid()
    made_at = np.flatnonzero(pc.or_(shares, position.is_null()).to_numpy(zero_copy_only=False))
    kept_at = np.flatnonzero(
        pc.and_(pc.is_in(table.column(ID), value_set=canonical_ids), pc.invert(shares)).to_numpy(
            zero_copy_only=False
        )
    )
    lookup: dict[int, int] = {}
    if made_at.size or kept_at.size:
        lookup = dict(zip(records.column("row").to_pylist(), range(records.num_rows), strict=True))
    internal = table.select(list(INTERNAL_COLUMNS))

    def made_row(at: int) -> RowResult:
        return _merged_row(internal.slice(at, 1).to_pylist()[0], records, lookup, canonical, shard_index)

    # Canonical rows first: a row sharing one's image may follow it in this shard.
    canonical.update({internal.column(ID)[at].as_py(): made_row(int(at)) for at in kept_at})
    made = [made_row(int(at)) for at in made_at]
    columns = [column.combine_chunks() for column in stored.columns.take(position).columns]
    if made:
        # Each made row's columns replace its own: taken from behind the stored rows' columns.
        order = np.arange(table.num_rows)
        order[made_at] = table.num_rows + np.arange(len(made))
        columns = [
            pa.concat_arrays([column, extra]).take(pa.array(order))
            for column, extra in zip(columns, result_arrays(made), strict=True)
        ]
    return pa.Table.from_arrays(columns, schema=RESULT_SCHEMA)


def _merged_row(
    row: dict[str, Any],
    records: pa.Table,
    lookup: dict[int, int],
    canonical: dict[str, RowResult],
    shard_index: int,
) -> RowResult:
    if row[CANONICAL] is not None:
        original = canonical.get(row[CANONICAL])
        if original is None:
            return RowResult(
                id=row[ID],
                status_code=RowStatus.NOT_PROCESSED,
                status_text="not processed",
                error=f"the row with the same image ({row[CANONICAL]}) has no result",
            )
        return dataclasses.replace(
            original,
            id=row[ID],
            attempts=0,
            status_text=f"{original.status_text} (same image as {row[CANONICAL]})",
        )
    found = lookup.get(row[ROW])
    if found is not None:
        data = records.slice(found, 1).to_pylist()[0]
        del data["row"]
        return RowResult.from_json(data)
    return RowResult(
        id=row[ID],
        status_code=RowStatus.NOT_PROCESSED,
        status_text="not processed",
        error=f"shard {shard_index} has no stored result for this row (its task did not finish)",
    )


def _write_report(config: PipelineConfig, storage: Storage) -> tuple[str | None, str | None]:
    """Build the run's contact-sheet report next to the enriched manifest; a failure only warns."""
    if not config.report:
        return None, None
    # Imported here: the report's stack (Pillow, Jinja2, the guarded fetch) is half a second of
    # start-up that a run spends before its first request otherwise.
    from removebg_provider import report

    try:
        built = report.build_report(
            config.output_manifest_uri,
            storage,
            sample=config.report_sample,
            image_column=config.image_column,
            id_column=config.id_column,
            manifest_format=config.output_manifest_format,
            allow_private_urls=config.allow_private_urls,
        )
    except RemoveBgError as exc:
        log.warning("the run report was not written: %s", exc)
        return None, None
    log.info("run report: %s and %s", built.html_uri, built.png_uri)
    return built.html_uri, built.png_uri
