"""Merging: the enriched manifest from every shard's stored results, every input row once, then the report."""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from removebg_provider.errors import RemoveBgError
from removebg_provider.manifest import RESULT_SCHEMA, ManifestWriter
from removebg_provider.pipeline.checkpoints import ShardStaging
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
    tally = Tally()
    billed = 0
    with ManifestWriter(
        config.output_manifest_uri, storage, output_schema, config.output_manifest_format
    ) as out:
        for shard in plan_.shards:
            table = read_parquet(shard.uri, storage)
            stored, shard_billed = ShardStaging(shard, config, plan_.run_id, storage).read_results()
            billed += shard_billed
            rows: list[RowResult] = []
            for row in table.select(list(INTERNAL_COLUMNS)).to_pylist():
                row_result = _merged_row(row, stored, canonical, shard.index)
                if row[ID] in plan_.canonical_ids and row[CANONICAL] is None:
                    canonical[row[ID]] = row_result
                rows.append(row_result)
            tally.add(rows)
            columns = [table.column(name) for name in kept] + result_arrays(rows)
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
    enforce_failure_policy(summary, config.max_failed_fraction, config.manifest_uri)
    return summary


def _merged_row(
    row: dict[str, Any], stored: dict[int, RowResult], canonical: dict[str, RowResult], shard_index: int
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
    found = stored.get(row[ROW])
    if found is not None:
        return found
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
            allow_private_urls=config.report_private_urls,
        )
    except RemoveBgError as exc:
        log.warning("the run report was not written: %s", exc)
        return None, None
    log.info("run report: %s and %s", built.html_uri, built.png_uri)
    return built.html_uri, built.png_uri
