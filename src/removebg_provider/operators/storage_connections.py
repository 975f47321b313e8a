"""Turn optional Airflow storage connections into the pipeline's Storage, importing providers lazily."""

from __future__ import annotations

import importlib
from typing import Any

from removebg_provider.errors import ConfigurationError
from removebg_provider.storage import Storage


def storage_from_connections(
    aws_conn_id: str | None = None,
    gcp_conn_id: str | None = None,
    wasb_conn_id: str | None = None,
) -> Storage:
    """A Storage whose s3/gs/azure clients come from the official provider hooks of the given connections.

    A store without a connection id uses its SDK's standard environment configuration; the provider
    package is imported only when its connection id is set.
    """
    params: dict[str, dict[str, Any]] = {}
    if aws_conn_id:
        s3_hook = _hook_class("airflow.providers.amazon.aws.hooks.s3", "S3Hook", "aws_conn_id", "amazon")
        params["s3"] = {"client": s3_hook(aws_conn_id=aws_conn_id).get_conn()}
    if gcp_conn_id:
        gcs_hook = _hook_class("airflow.providers.google.cloud.hooks.gcs", "GCSHook", "gcp_conn_id", "google")
        params["gs"] = {"client": gcs_hook(gcp_conn_id=gcp_conn_id).get_conn()}
    if wasb_conn_id:
        wasb_hook = _hook_class(
            "airflow.providers.microsoft.azure.hooks.wasb", "WasbHook", "wasb_conn_id", "microsoft-azure"
        )
        # Storage serves az:// and azure:// alike from either key.
        params["azure"] = {"client": wasb_hook(wasb_conn_id=wasb_conn_id).get_conn()}
    return Storage(transport_params=params)


def _hook_class(module: str, name: str, argument: str, extra: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        # An installed provider can fail to import too (a dependency clash): show why.
        raise ConfigurationError(
            f"{argument} is set but {name} cannot be imported ({exc}); install its provider package "
            f"with: pip install 'airflow-provider-removebg[{extra}]'"
        ) from exc
