"""`removebg cache stats` and `removebg cache prune` as a user runs them, on a store filled by real runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.storage import Storage
from support.runs import removebg_cache
from support.servers import LocalApiServer, sample_photo, start_api_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server")) as running:
        yield running


def _photos(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"p{index}.jpg"
        path.write_bytes(sample_photo(40 + index, 32, "JPEG"))
        paths.append(str(path))
    return paths


def _billed(server: LocalApiServer, tmp_path: Path, photos: list[str], name: str) -> int:
    """One run of `photos` (manifest `name`) into tmp_path's prefix: the records the server billed."""
    manifest = tmp_path / f"{name}.parquet"
    pq.write_table(pa.table({"image_url": photos}), manifest)
    config = pipeline.PipelineConfig(
        manifest_uri=str(manifest),
        output_prefix=str(tmp_path / "cutouts"),
        output_manifest_uri=str(tmp_path / f"{name}.enriched.parquet"),
        report=False,
    )
    server.reset_stats()
    with RemoveBgClient(server.base_url, server.token, **config.resolved().client_settings()) as client:
        pipeline.run(config, client, Storage())
    return int(server.stats()["records_billed"])


def _store(tmp_path: Path) -> str:
    return str(tmp_path / "cutouts" / "_removebg_cache")


def test_stats_counts_one_entry_per_image_stored(server: LocalApiServer, tmp_path: Path) -> None:
    _billed(server, tmp_path, _photos(tmp_path / "photos", 3), "monday")

    stats = removebg_cache("stats", _store(tmp_path))

    assert (stats["entries"], stats["claims"]) == (3, 0)


def test_prune_removes_only_entries_whose_outputs_were_overwritten(
    server: LocalApiServer, tmp_path: Path
) -> None:
    photos = _photos(tmp_path / "photos", 3)
    _billed(server, tmp_path, photos, "monday")
    Path(photos[0]).write_bytes(sample_photo(90, 32, "JPEG"))
    _billed(server, tmp_path, photos, "tuesday")

    pruned = removebg_cache("prune", _store(tmp_path), "--older-than", "0")

    assert (pruned["entries_examined"], pruned["entries_removed"]) == (4, 1)
    assert _billed(server, tmp_path, photos, "wednesday") == 0


def test_prune_even_if_current_removes_entries_that_could_still_be_served(
    server: LocalApiServer, tmp_path: Path
) -> None:
    photos = _photos(tmp_path / "photos", 2)
    _billed(server, tmp_path, photos, "monday")

    pruned = removebg_cache("prune", _store(tmp_path), "--older-than", "0", "--even-if-current")

    assert pruned["entries_removed"] == 2
    assert _billed(server, tmp_path, photos, "tuesday") == 2


def test_prune_keeps_entries_younger_than_older_than(server: LocalApiServer, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "photos", 2)
    _billed(server, tmp_path, photos, "monday")

    pruned = removebg_cache("prune", _store(tmp_path), "--older-than", "1", "--even-if-current")

    assert pruned["entries_removed"] == 0
