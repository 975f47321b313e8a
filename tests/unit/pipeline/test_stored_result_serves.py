"""Which rows a stored result may serve: every output the run gives a row, save a binary-mask run's cutout."""

from __future__ import annotations

from datetime import datetime, timezone

from removebg_provider import pipeline
from removebg_provider.pipeline.store import StoredOutput, StoredResult


def _config(**options: bool) -> pipeline.PipelineConfig:
    return pipeline.PipelineConfig(
        manifest_uri="catalog.parquet",
        id_column="sku",
        output_prefix="/cutouts",
        output_manifest_uri="catalog.enriched.parquet",
        **options,
    )


def _stored(*kinds: str) -> StoredResult:
    outputs = {kind: StoredOutput(f"/cutouts/sku-1.{kind}", "v1", "0" * 64) for kind in kinds}
    return StoredResult("k" * 40, "column:1", outputs, datetime.now(timezone.utc))


def test_a_binary_mask_result_carrying_only_the_mask_serves_the_mask() -> None:
    config = _config(binary_mask=True)
    stored = _stored("mask")

    assert stored.serves(config)
    assert set(stored.destinations(config, "sku-2")) == {"mask"}


def test_a_binary_mask_result_without_its_mask_serves_no_row() -> None:
    assert not _stored("cutout").serves(_config(binary_mask=True))


def test_a_result_without_a_cutout_serves_no_row_of_a_run_without_a_mask() -> None:
    assert not _stored().serves(_config())
    assert not _stored("whitebg").serves(_config(white_background=True))


def test_a_result_with_every_output_serves_them_all() -> None:
    config = _config(binary_mask=True, white_background=True)
    stored = _stored("cutout", "mask", "whitebg")

    assert stored.serves(config)
    assert set(stored.destinations(config, "sku-2")) == {"cutout", "mask", "whitebg"}
