"""The operators at DAG parse time and after rendering: validation, templates, Assets, wiring, DagBag."""

from __future__ import annotations

import importlib.util
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import DAG, Asset, TriggerRule

from removebg_provider.errors import ConfigurationError
from removebg_provider.operators import (
    MergeEnrichedManifestOperator,
    PlanManifestShardsOperator,
    ProcessManifestShardOperator,
    RemoveBackgroundOperator,
    remove_background_task_group,
)
from removebg_provider.operators._storage import storage_from_connections

ROOT = Path(__file__).resolve().parents[1]
URIS = {
    "manifest_uri": "s3://catalog/{{ ds }}/products.parquet",
    "output_prefix": "s3://cutouts/{{ ds }}",
    "output_manifest_uri": "s3://catalog/{{ ds }}/enriched.parquet",
}


def _dag() -> DAG:
    return DAG("operators_under_test", schedule=None, start_date=datetime(2024, 1, 1))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("mode", "turbo", "mode must be 'fast' or 'precise'"),
        ("image_format", "gif", "image_format must be png, jpg or webp"),
        ("shard_size", -5, "shard_size must be at least 1"),
        ("max_failed_fraction", 1.5, "max_failed_fraction must be within 0..1"),
        ("binary_mask", "maybe", "binary_mask='maybe' is not a valid bool"),
    ],
)
def test_bad_literal_option_is_refused_at_parse_time_naming_the_task(
    option: str, value: Any, message: str
) -> None:
    with _dag(), pytest.raises(ConfigurationError, match="'cut_backgrounds'") as refused:
        RemoveBackgroundOperator(task_id="cut_backgrounds", **URIS, **{option: value})
    assert message in str(refused.value)


def test_templated_option_is_not_judged_at_parse_time() -> None:
    with _dag():
        operator = PlanManifestShardsOperator(task_id="plan", mode="{{ params.mode }}", **URIS)
    assert operator.mode == "{{ params.mode }}"


def test_templated_option_is_refused_once_rendered() -> None:
    with _dag():
        operator = PlanManifestShardsOperator(task_id="plan", mode="{{ params.mode }}", **URIS)
    operator.render_template_fields(_context(params={"mode": "turbo"}))
    with pytest.raises(ConfigurationError, match=r"'plan'.*mode must be 'fast' or 'precise'"):
        operator.pipeline_config()


def test_every_uri_is_rendered() -> None:
    with _dag():
        operator = RemoveBackgroundOperator(
            task_id="cut", staging_prefix="s3://staging/{{ ds }}", outlets=[], **URIS
        )
    operator.render_template_fields(_context())
    config = operator.pipeline_config()
    assert config.manifest_uri == "s3://catalog/2024-06-01/products.parquet"
    assert config.output_prefix == "s3://cutouts/2024-06-01"
    assert config.output_manifest_uri == "s3://catalog/2024-06-01/enriched.parquet"
    assert config.staging_prefix == "s3://staging/2024-06-01"


def test_rendered_options_become_typed_values() -> None:
    with _dag():
        operator = PlanManifestShardsOperator(
            task_id="plan",
            binary_mask="{{ params.mask }}",
            shard_size="{{ params.size }}",
            id_column="{{ params.id_column }}",
            max_failed_fraction="{{ params.fraction }}",
            **URIS,
        )
    params = {"mask": True, "size": 250, "id_column": None, "fraction": 0.2}
    operator.render_template_fields(_context(params=params))
    config = operator.pipeline_config()
    assert (config.binary_mask, config.shard_size, config.id_column, config.max_failed_fraction) == (
        True,
        250,
        None,
        0.2,
    )


def test_shard_and_merge_operators_render_their_inputs() -> None:
    with _dag():
        plan_uri = "s3://staging/{{ ds }}/plan.json"
        shard = ProcessManifestShardOperator(task_id="shard", shard={"plan_uri": plan_uri})
        merge = MergeEnrichedManifestOperator(task_id="merge", plan_uri=plan_uri)
    shard.render_template_fields(_context())
    merge.render_template_fields(_context())
    assert shard.shard == {"plan_uri": "s3://staging/2024-06-01/plan.json"}
    assert merge.plan_uri == "s3://staging/2024-06-01/plan.json"


def test_literal_output_manifest_is_the_outlet_asset() -> None:
    with _dag():
        operator = RemoveBackgroundOperator(
            task_id="cut",
            manifest_uri="s3://catalog/products.parquet",
            output_prefix="s3://cutouts",
            output_manifest_uri="s3://catalog/enriched.parquet",
        )
    assert operator.outlets == [Asset(uri="s3://catalog/enriched.parquet")]


def test_templated_output_manifest_gets_no_guessed_asset() -> None:
    with _dag():
        operator = RemoveBackgroundOperator(task_id="cut", **URIS)
    assert operator.outlets == []


def test_task_group_maps_shards_between_plan_and_merge() -> None:
    with _dag() as dag:
        remove_background_task_group(**URIS, pool="removebg_api", concurrency=6)
    plan = dag.get_task("remove_background.plan")
    shards = dag.get_task("remove_background.process_shard")
    merge = dag.get_task("remove_background.merge")
    assert plan.downstream_task_ids == {shards.task_id, merge.task_id}
    assert merge.upstream_task_ids == {plan.task_id, shards.task_id}
    assert merge.trigger_rule == TriggerRule.ALL_DONE
    assert shards.partial_kwargs["pool"] == "removebg_api"
    assert shards.partial_kwargs["pool_slots"] == 6
    assert shards.partial_kwargs["max_active_tis_per_dagrun"] == 4


def test_storage_without_connections_imports_no_provider() -> None:
    storage = storage_from_connections()
    assert storage.transport_params == {}
    assert not any(name.startswith("airflow.providers.amazon") for name in sys.modules)


@pytest.mark.skipif(
    importlib.util.find_spec("airflow.providers.amazon") is not None,
    reason="the Amazon provider is installed",
)
def test_storage_connection_without_its_provider_names_the_extra_to_install() -> None:
    with pytest.raises(ConfigurationError, match=r"airflow-provider-removebg\[amazon\]"):
        storage_from_connections(aws_conn_id="aws_default")


def test_dags_folder_imports_without_errors() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert "catalog_remove_background" in bag.dag_ids


def _context(params: dict[str, Any] | None = None) -> Any:
    return {"ds": "2024-06-01", "params": params or {}}
