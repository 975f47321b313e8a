"""The operators at DAG parse time and after rendering: validation, templates, Assets, wiring, DagBag."""

from __future__ import annotations

import importlib.util
import subprocess
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
from removebg_provider.operators.lineage import RunLineage, dataset_name, operator_lineage, run_lineage
from removebg_provider.operators.links import (
    RemoveBackgroundReportLink,
    check_report_base_url,
    report_link,
    report_url,
)
from removebg_provider.operators.storage_connections import storage_from_connections
from removebg_provider.pipeline import PipelineConfig
from removebg_provider.storage import Storage
from support import REPO_ROOT

ROOT = REPO_ROOT
OPENLINEAGE_MODULES = (
    "airflow.providers.openlineage",
    "airflow.providers.openlineage.extractors",
    "openlineage",
    "openlineage.client",
    "openlineage.client.event_v2",
    "openlineage.client.generated.output_statistics_output_dataset",
)
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
        ("mode", "turbo", "mode must be one of fast, precise"),
        ("image_format", "gif", "image_format must be one of png, jpg, webp"),
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
    with pytest.raises(ConfigurationError, match=r"'plan'.*mode must be one of fast, precise"):
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


def test_storage_without_connections_imports_no_provider_hook() -> None:
    # A fresh interpreter: this test process has imported provider hooks elsewhere already.
    probe = (
        "import sys\n"
        "from removebg_provider.operators.storage_connections import storage_from_connections\n"
        "assert storage_from_connections().transport_params == {}\n"
        "print(sorted(m for m in sys.modules if m.startswith('airflow.providers.') and '.hooks' in m))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_storage_connection_without_its_provider_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Simulation: the Amazon provider is installed for other tests, so its hook module is hidden
    # (a None entry in sys.modules makes importing it raise ImportError).
    monkeypatch.setitem(sys.modules, "airflow.providers.amazon.aws.hooks.s3", None)
    with pytest.raises(ConfigurationError, match=r"airflow-provider-removebg\[amazon\]"):
        storage_from_connections(aws_conn_id="aws_default")


def test_dags_folder_imports_without_errors() -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert "catalog_remove_background" in bag.dag_ids


def test_the_shipped_example_dag_belongs_to_the_dags_folder_file_that_imports_it() -> None:
    from airflow.dag_processing.dagbag import DagBag

    dag_file = ROOT / "dags" / "catalog_remove_background.py"
    bag = DagBag(dag_folder=str(dag_file))

    # Workers parse the DAG again from its file: it must be the one in the dags folder, not the package's.
    assert bag.dags["catalog_remove_background"].fileloc == str(dag_file)


def test_both_whole_run_operators_offer_the_report_link() -> None:
    with _dag():
        whole = RemoveBackgroundOperator(task_id="cut", **URIS)
        merge = MergeEnrichedManifestOperator(task_id="merge", plan_uri="s3://staging/plan.json")
        shard = ProcessManifestShardOperator(task_id="shard", shard={})
    for operator in (whole, merge):
        assert [type(link) for link in operator.operator_extra_links] == [RemoveBackgroundReportLink]
    assert list(shard.operator_extra_links) == []


def test_http_report_links_to_itself() -> None:
    uri = "https://reports.example.com/2024-06-01/products.report.html"
    assert report_url(uri, "https://cdn.example.com/enriched") == uri


def test_stored_report_links_to_its_file_name_under_the_base_url() -> None:
    url = report_url("s3://catalog/enriched/2024-06-01/products.report.html", "https://cdn.example.com/day/")
    assert url == "https://cdn.example.com/day/products.report.html"


@pytest.mark.parametrize("uri", ["s3://catalog/products.report.html", "/data/enriched/products.report.html"])
def test_report_the_browser_cannot_open_gets_no_link_without_a_base_url(uri: str) -> None:
    assert report_url(uri, None) is None


def test_run_without_report_gets_no_link() -> None:
    assert report_url(None, "https://cdn.example.com/day") is None


@pytest.mark.parametrize("operator", [RemoveBackgroundOperator, MergeEnrichedManifestOperator])
def test_report_base_url_that_is_not_http_is_refused_at_parse_time(operator: Any) -> None:
    arguments = URIS if operator is RemoveBackgroundOperator else {"plan_uri": "s3://staging/plan.json"}
    with _dag(), pytest.raises(ConfigurationError, match=r"'cut'.*report_base_url must be an http\(s\) URL"):
        operator(task_id="cut", report_base_url="s3://catalog/enriched", **arguments)


@pytest.mark.parametrize("operator", [RemoveBackgroundOperator, MergeEnrichedManifestOperator])
@pytest.mark.parametrize("seconds", [0, 8 * 24 * 3600, 2.5])
def test_a_report_link_expiry_outside_one_second_to_seven_days_is_refused_at_parse_time(
    operator: Any, seconds: Any
) -> None:
    arguments = URIS if operator is RemoveBackgroundOperator else {"plan_uri": "s3://staging/plan.json"}
    with _dag(), pytest.raises(ConfigurationError, match=r"'cut'.*report_link_expiry: .*1 to 604800 seconds"):
        operator(task_id="cut", report_link_expiry=seconds, **arguments)


def test_the_base_url_wins_over_a_presigned_link() -> None:
    uri = "s3://catalog/enriched/products.report.html"

    link = report_link(uri, "https://cdn.example.com/day", 3600, Storage())

    assert link == "https://cdn.example.com/day/products.report.html"


def test_a_report_that_cannot_be_presigned_gets_no_link_and_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local_report = str(tmp_path / "products.report.html")

    link = report_link(local_report, None, 3600, Storage())

    assert link == ""
    assert f"the report gets no link: cannot presign {local_report}" in caplog.text


def test_rendered_unset_report_base_url_means_no_link() -> None:
    with _dag():
        operator = RemoveBackgroundOperator(task_id="cut", report_base_url="{{ params.base }}", **URIS)
    operator.render_template_fields(_context(params={"base": None}))
    assert operator.report_base_url == "None"
    assert check_report_base_url(operator.report_base_url, operator.task_id) is None


@pytest.mark.parametrize(
    ("uri", "account", "expected"),
    [
        ("s3://catalog/enriched/products.parquet", None, ("s3://catalog", "enriched/products.parquet")),
        ("gs://catalog/cutouts/", None, ("gs://catalog", "cutouts")),
        (
            "azure://catalog/day/products.csv",
            "shopdata",
            ("wasbs://catalog@shopdata.blob.core.windows.net", "day/products.csv"),
        ),
        ("az://catalog/day/products.csv", None, ("wasbs://catalog", "day/products.csv")),
        ("file:///data/products.csv", None, ("file", "/data/products.csv")),
        (
            "https://shop.example.com/feeds/products.csv",
            None,
            ("https://shop.example.com", "/feeds/products.csv"),
        ),
    ],
)
def test_dataset_names_follow_the_openlineage_naming_spec(
    uri: str, account: str | None, expected: tuple[str, str]
) -> None:
    assert dataset_name(uri, account) == expected


def test_relative_local_path_is_an_absolute_file_dataset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert dataset_name("data/products.csv") == ("file", str(tmp_path / "data" / "products.csv"))


def test_azure_lineage_takes_the_account_from_the_connection_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", "DefaultEndpointsProtocol=https;AccountName=shopdata;"
    )
    config = PipelineConfig("azure://in/products.csv", "azure://out/cutouts", "azure://out/enriched.parquet")
    assert run_lineage(config, Storage()).azure_account == "shopdata"


@pytest.mark.skipif(
    importlib.util.find_spec("airflow.providers.openlineage") is None,
    reason="the OpenLineage provider (extra `openlineage`) is not installed",
)
def test_lineage_names_the_manifest_as_input_and_the_outputs() -> None:
    lineage = operator_lineage(_RUN_LINEAGE)
    assert [(d.namespace, d.name) for d in lineage.inputs] == [("s3://catalog", "day/products.csv")]
    assert [(d.namespace, d.name) for d in lineage.outputs] == [
        ("s3://catalog", "day/enriched.parquet"),
        ("s3://cutouts", "day"),
    ]
    assert lineage.outputs[0].outputFacets["outputStatistics"].rowCount == 12


def test_lineage_without_the_openlineage_provider_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulation: the provider is installed in the test environment, so its modules are hidden
    # (a None entry in sys.modules makes importing them raise ImportError).
    for name in OPENLINEAGE_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    assert operator_lineage(_RUN_LINEAGE) is None


def test_operator_that_has_not_run_has_no_lineage() -> None:
    with _dag():
        operator = MergeEnrichedManifestOperator(task_id="merge", plan_uri="s3://staging/plan.json")
    assert operator.get_openlineage_facets_on_complete(task_instance=None) is None


_RUN_LINEAGE = RunLineage(
    "s3://catalog/day/products.csv", "s3://catalog/day/enriched.parquet", "s3://cutouts/day/", rows=12
)


def _context(params: dict[str, Any] | None = None) -> Any:
    return {"ds": "2024-06-01", "params": params or {}}
