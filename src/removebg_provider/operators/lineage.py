"""OpenLineage datasets of a run (manifest in; enriched manifest and output prefix out), provider optional."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from removebg_provider.pipeline import PipelineConfig
from removebg_provider.storage import AZURE_CONNECTION_ENV, Storage, local_path, scheme_of

_AZURE_SCHEMES = ("az", "azure")
_BUCKET_SCHEMES = ("s3", "gs")


@dataclass(frozen=True)
class RunLineage:
    """What one task read and wrote; `rows` is the enriched manifest's row count once it is written."""

    manifest_uri: str
    output_manifest_uri: str
    output_prefix: str
    azure_account: str | None = None
    rows: int | None = None


def run_lineage(config: PipelineConfig, storage: Storage) -> RunLineage:
    """The lineage of a run of `config`; the Azure account is looked up only for azure:// URIs."""
    uris = (config.manifest_uri, config.output_manifest_uri, config.output_prefix)
    account = _azure_account(storage) if any(scheme_of(uri) in _AZURE_SCHEMES for uri in uris) else None
    return RunLineage(*uris, azure_account=account)


def operator_lineage(lineage: RunLineage | None) -> Any:
    """The OperatorLineage of a finished run; None when nothing ran or the OpenLineage provider is absent."""
    if lineage is None:
        return None
    try:
        from airflow.providers.openlineage.extractors import OperatorLineage
        from openlineage.client.event_v2 import InputDataset, OutputDataset
        from openlineage.client.generated.output_statistics_output_dataset import (
            OutputStatisticsOutputDatasetFacet,
        )
    except ImportError:
        return None
    manifest_facets: dict[str, Any] = {}
    if lineage.rows is not None:
        manifest_facets["outputStatistics"] = OutputStatisticsOutputDatasetFacet(rowCount=lineage.rows)
    account = lineage.azure_account
    return OperatorLineage(
        inputs=[InputDataset(*dataset_name(lineage.manifest_uri, account))],
        outputs=[
            OutputDataset(*dataset_name(lineage.output_manifest_uri, account), outputFacets=manifest_facets),
            OutputDataset(*dataset_name(lineage.output_prefix, account)),
        ],
    )


def dataset_name(uri: str, azure_account: str | None = None) -> tuple[str, str]:
    """The OpenLineage (namespace, name) of a URI, after the OpenLineage dataset naming spec.

    Local paths: ("file", absolute path); s3 and gs: ("s3://bucket", key); Azure Blob:
    ("wasbs://container@account.blob.core.windows.net", blob), or ("wasbs://container", blob) when
    the account is unknown; other schemes: ("scheme://host", path).
    """
    scheme = scheme_of(uri)
    if scheme == "file":
        return "file", os.path.abspath(local_path(uri))
    parsed = urlparse(uri)
    key = parsed.path.lstrip("/").rstrip("/")
    if scheme in _BUCKET_SCHEMES:
        return f"{scheme}://{parsed.netloc}", key
    if scheme in _AZURE_SCHEMES:
        host = f"{parsed.netloc}@{azure_account}.blob.core.windows.net" if azure_account else parsed.netloc
        return f"wasbs://{host}", key
    return f"{scheme}://{parsed.netloc}", parsed.path


def _azure_account(storage: Storage) -> str | None:
    """The storage account of the task's Azure client, else of AZURE_STORAGE_CONNECTION_STRING."""
    for alias in _AZURE_SCHEMES:
        name = getattr(storage.transport_params.get(alias, {}).get("client"), "account_name", None)
        if isinstance(name, str) and name:
            return name
    settings = os.environ.get(AZURE_CONNECTION_ENV, "")
    fields = dict(part.split("=", 1) for part in settings.split(";") if "=" in part)
    return fields.get("AccountName") or None
