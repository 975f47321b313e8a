"""Factories the pipeline tests share: a small run's configuration, and that run against an API."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.storage import Storage, join_uri
from support.servers import LocalApiServer

# Small shards and batches, so a dozen rows already make several of each.
SMALL_RUN: dict[str, Any] = {"shard_size": 4, "max_records_per_request": 3, "concurrency": 3}


def pipeline_config(
    root: Path | str, manifest: str, settings: Mapping[str, Any] = SMALL_RUN, **overrides: Any
) -> pipeline.PipelineConfig:
    """A run of `manifest` writing `cutouts/` and `enriched.parquet` under `root` (a folder or a bucket URI).

    `settings` are a test module's usual fields (small shards and batches by default); `overrides`
    replace any field for one test.
    """
    options: dict[str, Any] = {
        "manifest_uri": manifest,
        "output_prefix": join_uri(str(root), "cutouts"),
        "output_manifest_uri": join_uri(str(root), "enriched.parquet"),
        **settings,
    }
    options.update(overrides)
    return pipeline.PipelineConfig(**options)


def run_pipeline(
    server: LocalApiServer, config: pipeline.PipelineConfig, storage: Storage | None = None
) -> pipeline.RunSummary:
    """`pipeline.run` of `config` against `server`, with the client the config's settings describe."""
    return run_through(server.base_url, server.token, config, storage)


def run_through(
    base_url: str,
    token: str | None,
    config: pipeline.PipelineConfig,
    storage: Storage | None = None,
    **client_options: Any,
) -> pipeline.RunSummary:
    """`pipeline.run` of `config` against the API at `base_url` (a server or a proxy in front of one)."""
    settings = config.resolved().client_settings() | client_options
    with RemoveBgClient(base_url, token, **settings) as client:
        return pipeline.run(config, client, storage or Storage())
