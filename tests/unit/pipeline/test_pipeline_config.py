"""PipelineConfig: the one owner of the pipeline's settings, and the precedence of the shared ones."""

from __future__ import annotations

import re

import pytest

from removebg_provider.client import DEFAULT_CONCURRENCY, DEFAULT_MAX_RECORDS_PER_REQUEST
from removebg_provider.errors import ConfigurationError
from removebg_provider.pipeline import PipelineConfig

URIS = {"manifest_uri": "m.csv", "output_prefix": "out", "output_manifest_uri": "enriched.parquet"}


def test_a_task_option_wins_over_the_connection_extra() -> None:
    config = PipelineConfig(**URIS, max_records_per_request=4, mode="fast")

    resolved = config.resolved({"max_records_per_request": 2, "mode": "precise"})

    assert (resolved.max_records_per_request, resolved.mode) == (4, "fast")


def test_an_option_the_task_leaves_unset_comes_from_the_connection() -> None:
    resolved = PipelineConfig(**URIS).resolved({"mode": "precise", "concurrency": 3})

    assert (resolved.mode, resolved.concurrency) == ("precise", 3)


def test_an_option_neither_sets_takes_its_default() -> None:
    resolved = PipelineConfig(**URIS).resolved({})

    assert (resolved.mode, resolved.max_records_per_request, resolved.concurrency) == (
        "fast",
        DEFAULT_MAX_RECORDS_PER_REQUEST,
        DEFAULT_CONCURRENCY,
    )


def test_the_client_settings_are_those_of_the_resolved_config() -> None:
    resolved = PipelineConfig(**URIS, concurrency=5).resolved({"max_records_per_request": 2})

    assert resolved.client_settings() == {"mode": "fast", "max_records_per_request": 2, "concurrency": 5}


def test_an_unresolved_config_gives_no_client_settings() -> None:
    with pytest.raises(ConfigurationError, match="resolve"):
        PipelineConfig(**URIS).client_settings()


def test_rendered_strings_become_the_types_of_their_fields() -> None:
    config = PipelineConfig.from_options(
        {
            **URIS,
            "binary_mask": "true",
            "shard_size": "250",
            "id_column": "None",
            "max_failed_fraction": "0.2",
        }
    )

    assert (config.binary_mask, config.shard_size, config.id_column, config.max_failed_fraction) == (
        True,
        250,
        None,
        0.2,
    )


def test_a_bad_value_is_refused_naming_the_setting() -> None:
    with pytest.raises(ConfigurationError, match="concurrency must be at least 1"):
        PipelineConfig(**URIS, concurrency=0)


@pytest.mark.parametrize(
    ("setting", "prefix", "message"),
    [
        ("output_prefix", "s3://catalog//cutouts", "empty folder name right after its bucket"),
        ("cache_prefix", "s3://catalog///cache", "empty folder name right after its bucket"),
        ("staging_prefix", "az://catalog/staging?v=1", "holds '?' or '#'"),
        ("output_prefix", "gs://catalog/cutouts#today", "holds '?' or '#'"),
        ("output_prefix", "s3:catalog/cutouts", "names no bucket"),
    ],
)
def test_an_object_store_prefix_that_clients_would_read_as_different_keys_is_refused(
    setting: str, prefix: str, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f"{setting} {prefix} ")) as refused:
        PipelineConfig(**{**URIS, setting: prefix})

    assert message in str(refused.value)


@pytest.mark.parametrize(
    "prefix",
    ["s3://catalog/daily//cutouts", "s3://catalog//", "gs://catalog//cutouts", "az://catalog//cutouts"],
)
def test_an_object_store_prefix_every_client_reads_as_one_key_prefix_is_accepted(prefix: str) -> None:
    config = PipelineConfig(**{**URIS, "output_prefix": prefix})

    assert config.output_prefix == prefix


def test_an_output_key_template_with_a_query_or_fragment_character_is_refused_for_an_object_store() -> None:
    with pytest.raises(ConfigurationError, match=re.escape("output_key_template '{id}#{kind}.{ext}' holds")):
        PipelineConfig(
            **{**URIS, "output_prefix": "s3://catalog/cutouts"}, output_key_template="{id}#{kind}.{ext}"
        )


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{kind}.{ext}", "must use {id}"),
        ("{id}.jpg", "gives two outputs of a row one key"),
        ("../{id}{suffix}.{ext}", "unsafe key"),
        ("{id}-{foo}.{ext}", "uses ['foo']"),
        ("{id}{suffix}.{", "is not a valid template"),
    ],
)
def test_an_output_key_template_that_cannot_name_each_output_apart_is_refused(
    template: str, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        PipelineConfig(**URIS, output_key_template=template, binary_mask=True)
