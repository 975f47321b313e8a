"""Row results in their three forms: RowResult, its JSON, and the enriched manifest's columns."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from removebg_provider.pipeline.results import (
    ROW_RESULT_JSON_SCHEMA,
    RowResult,
    Tally,
    result_arrays,
    result_arrays_from_json,
)

_RESULTS = [
    RowResult(
        id="sku-1",
        status_code=200,
        status_text="OK",
        outputs={"cutout": "s3://b/sku-1.png", "mask": "s3://b/sku-1.mask.png"},
        width=800,
        height=600,
        request_id="r-1",
        mode="precise",
        attempts=2,
        processed_at=datetime(2026, 11, 28, 20, 1, 2, 345678, tzinfo=timezone.utc),
        fingerprint="fp",
        source_fingerprint="md5:abc:12",
        foreground_fraction=0.3137,
        quality_flags=("tiny", "edge"),
    ),
    RowResult(id="sku-2", status_code=504, status_text="not processed", error=""),
    RowResult(id="sku-3", status_code=410, status_text="gone", error="the output URL expired"),
]


def test_the_json_schema_names_every_field_a_row_result_writes() -> None:
    assert set(ROW_RESULT_JSON_SCHEMA.names) == set(_RESULTS[0].to_json())


def test_columns_from_stored_json_equal_the_columns_of_the_row_results() -> None:
    stored = pa.Table.from_pylist([r.to_json() for r in _RESULTS], schema=ROW_RESULT_JSON_SCHEMA)

    assert result_arrays_from_json(stored) == result_arrays(_RESULTS)


def test_a_tally_counts_statuses_flags_and_the_first_errors_in_order() -> None:
    tally = Tally()

    tally.add(_RESULTS)

    summary = tally.summary(billed=1)
    assert (summary.rows, summary.succeeded, summary.failed) == (3, 1, 2)
    assert summary.by_status == {200: 1, 504: 1, 410: 1}
    assert summary.by_flag == {"tiny": 1, "edge": 1}
    assert summary.first_errors == (
        {"id": "sku-2", "status_code": 504, "error": "not processed"},
        {"id": "sku-3", "status_code": 410, "error": "the output URL expired"},
    )
