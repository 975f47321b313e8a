"""Factories the pipeline tests share: a manifest of distinct photos, a small run, running it, its bill
and what it wrote (rows, cutouts, `removebg cache` output)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.outputs import OutputCopier
from removebg_provider.storage import Storage, join_uri
from support.servers import LocalApiServer, sample_photo

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


def billed_by_run(
    server: LocalApiServer, config: pipeline.PipelineConfig, storage: Storage | None = None
) -> int:
    """Run `config` against `server` (`run_pipeline`) and return how many records the server billed for it."""
    server.reset_stats()
    run_pipeline(server, config, storage)
    return int(server.stats()["records_billed"])


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


def distinct_photos_manifest(folder: Path, rows: int) -> tuple[str, list[str]]:
    """`rows` distinct 32x32 photos (tiny, so the classic engine is quick) and a manifest naming them."""
    images = folder / "photos"
    images.mkdir(parents=True)
    photo = Image.open(io.BytesIO(sample_photo(32, 32))).convert("RGB")
    paths = []
    for index in range(rows):
        # Distinct bytes: rows with identical bytes would be sent once and share a result.
        photo.putpixel((0, 0), (index % 256, index // 256, 0))
        path = images / f"p{index:05d}.png"
        photo.save(path, "PNG")
        paths.append(str(path))
    ids = [f"sku-{index:05d}" for index in range(rows)]
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table({"sku": ids, "image_url": paths}), manifest)
    return str(manifest), ids


class CopierKilledBeforeCopying(OutputCopier):
    """A real copier whose worker dies (like a killed process) on its first copy: after the API answered."""

    def copy(self, source_url: str, destination_uri: str, ext: str, *, fresh: bool = False) -> bytes:
        raise KeyboardInterrupt("worker killed before copying")


def enriched_rows(config: pipeline.PipelineConfig) -> dict[str, dict[str, object]]:
    """The enriched manifest `config` wrote, row by row, by its `sku` column."""
    return {row["sku"]: row for row in pq.read_table(config.output_manifest_uri).to_pylist()}


def cutout_widths(config: pipeline.PipelineConfig) -> dict[str, int]:
    """The width of each row's cutout, by `sku`: it tells which photo the cutout was made from."""
    widths = {}
    for sku, row in enriched_rows(config).items():
        with Image.open(str(row["removebg_output_url"])) as cutout:
            widths[sku] = cutout.width
    return widths


def removebg_cache(*args: str) -> dict[str, object]:
    """`python -m removebg_provider cache ARGS` as a user runs it: its JSON output."""
    done = subprocess.run(
        [sys.executable, "-m", "removebg_provider", "cache", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found: dict[str, object] = json.loads(done.stdout)
    return found
