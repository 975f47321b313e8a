"""The result store's index: a catalog with a fingerprint column is looked up in one pass, never stale.

Every test runs the real pipeline against the real local API server on 127.0.0.1 and counts the
records the server billed. Removing the store's per-key entries (`entries/`) after a run leaves
only its index: a row then served without a request was found through the index. A photo's width
identifies its content: the server's cutout has the input's size.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.errors import FailurePolicyError
from removebg_provider.storage import Storage
from support.runs import billed_by_run, cutout_widths, enriched_rows, removebg_cache
from support.servers import LocalApiServer, sample_photo, start_api_server
from support.stores import ObjectStore, StoreServer

_HEIGHT = 40
# The columns of an index part, as `removebg run` writes them.
INDEX_TYPES = (("key_prefix", pa.uint64()), ("key", pa.string()), ("entry", pa.string()))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server")) as running:
        yield running


class _Catalog:
    """Products with photos on local disk and an `image_md5` column, run day after day into one prefix."""

    def __init__(
        self, folder: Path, count: int, output_prefix: str | None = None, cache_prefix: str | None = None
    ) -> None:
        self.folder = folder
        self.output_prefix = output_prefix or str(folder / "cutouts")
        self.cache_prefix = cache_prefix
        self.photos: dict[str, str] = {}
        self.md5: dict[str, str] = {}
        for index in range(count):
            self.change(f"sku-{index}", 50 + index)

    def change(self, sku: str, width: int) -> None:
        """Give `sku` a new photo `width` pixels wide, at the same path, and a new `image_md5`."""
        path = self.folder / "photos" / f"{sku}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(sample_photo(width, _HEIGHT, "JPEG"))
        self.photos[sku] = str(path)
        self.md5[sku] = f"md5-of-{width}"

    def config(self, day: str, skus: list[str] | None = None) -> pipeline.PipelineConfig:
        """The run of `day`: the whole catalog, or only `skus`."""
        manifest = self.folder / f"{day}.parquet"
        skus = skus or list(self.photos)
        columns = {
            "sku": skus,
            "image_url": [self.photos[s] for s in skus],
            "image_md5": [self.md5[s] for s in skus],
        }
        pq.write_table(pa.table(columns), manifest)
        return pipeline.PipelineConfig(
            manifest_uri=str(manifest),
            id_column="sku",
            fingerprint_column="image_md5",
            output_prefix=self.output_prefix,
            cache_prefix=self.cache_prefix,
            output_manifest_uri=str(self.folder / f"{day}.enriched.parquet"),
            shard_size=4,
            max_records_per_request=3,
            concurrency=2,
            report=False,
        )

    @property
    def store(self) -> Path:
        return Path(self.cache_prefix or Path(self.output_prefix) / "_removebg_cache")


def _handed_to_shards(plan: pipeline.Plan) -> list[Path]:
    """The indexed entries a plan handed its shards, in its staging prefix."""
    return [path for path in Path(plan.config.staging).rglob("*.parquet") if "indexed" in path.parts]


def _forget_entries(store: Path) -> None:
    """Remove the store's per-key entries: only its index is left."""
    shutil.rmtree(store / "entries")


def test_day_two_serves_its_unchanged_rows_from_the_index_without_reading_their_entries(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 10)
    billed_by_run(server, catalog.config("monday"))
    _forget_entries(catalog.store)
    catalog.change("sku-3", 93)

    tuesday = catalog.config("tuesday")

    billed = billed_by_run(server, tuesday)

    rows = enriched_rows(tuesday)
    assert billed == 1
    assert {row["removebg_status_code"] for row in rows.values()} == {200}
    assert "reused from the result store" in str(rows["sku-0"]["removebg_status_text"])
    assert cutout_widths(tuesday)["sku-3"] == 93


def test_repeating_a_day_served_from_the_index_bills_nothing(server: LocalApiServer, tmp_path: Path) -> None:
    catalog = _Catalog(tmp_path, 6)
    billed_by_run(server, catalog.config("monday"))
    billed_by_run(server, catalog.config("tuesday"))
    _forget_entries(catalog.store)

    assert billed_by_run(server, catalog.config("tuesday-again")) == 0


def test_an_indexed_entry_whose_cutout_was_overwritten_since_is_not_served(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 4)
    monday = catalog.config("monday")
    billed_by_run(server, monday)
    cutout = Path(str(enriched_rows(monday)["sku-2"]["removebg_output_url"]))
    Image.new("RGBA", (7, 7)).save(cutout)

    tuesday = catalog.config("tuesday")

    billed = billed_by_run(server, tuesday)

    assert billed == 1
    assert cutout_widths(tuesday)["sku-2"] == 52


def test_day_two_finds_its_rows_in_the_index_though_another_catalog_sharing_the_store_ran_since(
    server: LocalApiServer, tmp_path: Path
) -> None:
    shared = str(tmp_path / "shared-cache")
    shoes = _Catalog(tmp_path / "shoes", 8, cache_prefix=shared)
    bags = _Catalog(tmp_path / "bags", 5, cache_prefix=shared)
    billed_by_run(server, shoes.config("monday"))
    billed_by_run(server, bags.config("monday"))
    _forget_entries(shoes.store)
    shoes.change("sku-2", 92)

    tuesday = shoes.config("tuesday")

    billed = billed_by_run(server, tuesday)

    assert billed == 1
    assert cutout_widths(tuesday)["sku-2"] == 92


def test_day_two_finds_its_rows_in_the_index_though_a_one_off_run_of_a_few_of_them_ran_since(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 8)
    billed_by_run(server, catalog.config("monday"))
    billed_by_run(server, catalog.config("retouch", skus=["sku-0", "sku-1"]))
    _forget_entries(catalog.store)

    assert billed_by_run(server, catalog.config("tuesday")) == 0


def test_the_index_of_a_run_far_larger_than_the_manifest_is_not_read(
    server: LocalApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared = str(tmp_path / "shared-cache")
    small = _Catalog(tmp_path / "small", 2, cache_prefix=shared)
    large = _Catalog(tmp_path / "large", 12, cache_prefix=shared)
    billed_by_run(server, small.config("monday"))
    billed_by_run(server, large.config("monday"))
    _forget_entries(small.store)

    with caplog.at_level(logging.INFO, logger="removebg_provider"):
        billed = billed_by_run(server, small.config("tuesday"))

    assert billed == 0
    assert "(12 rows) skipped: far larger than this manifest" in caplog.text


def test_rows_whose_stored_cutouts_were_all_overwritten_are_sent_again_a_request_s_worth_at_a_time(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 24)
    one_shard = {"shard_size": 24, "concurrency": 1}
    monday = dataclasses.replace(catalog.config("monday"), **one_shard)
    billed_by_run(server, monday)
    for row in enriched_rows(monday).values():
        Image.new("RGBA", (7, 7)).save(Path(str(row["removebg_output_url"])))

    tuesday = dataclasses.replace(catalog.config("tuesday"), **one_shard)

    billed = billed_by_run(server, tuesday)

    assert billed == 24
    assert sorted(cutout_widths(tuesday).values()) == list(range(50, 74))


def test_results_stored_by_a_run_that_stopped_before_its_merge_are_served_though_the_index_predates_them(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 6)
    billed_by_run(server, catalog.config("monday"))
    catalog.change("sku-1", 91)
    stopped = pipeline.plan(catalog.config("tuesday"), Storage())
    server.reset_stats()
    with RemoveBgClient(server.base_url, server.token, **stopped.config.client_settings()) as client:
        for shard in stopped.shards:
            pipeline.process_shard(shard, stopped, client, Storage())
    assert server.stats()["records_billed"] == 1

    again = catalog.config("tuesday-again")

    billed = billed_by_run(server, again)

    assert billed == 0
    assert cutout_widths(again)["sku-1"] == 91


def test_unreadable_indexed_entries_handed_to_a_shard_are_skipped_with_a_warning_and_bill_nothing(
    server: LocalApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = _Catalog(tmp_path, 6)
    billed_by_run(server, catalog.config("monday"))
    tuesday = pipeline.plan(catalog.config("tuesday"), Storage())
    handed = _handed_to_shards(tuesday)
    assert handed
    for path in handed:
        path.write_bytes(b"not parquet")
    server.reset_stats()

    settings = tuesday.config.client_settings()
    with (
        caplog.at_level(logging.WARNING, logger="removebg_provider"),
        RemoveBgClient(server.base_url, server.token, **settings) as client,
    ):
        for shard in tuesday.shards:
            pipeline.process_shard(shard, tuesday, client, Storage())

    assert server.stats()["records_billed"] == 0
    assert "are unreadable, entries are read one by one" in caplog.text


def test_a_finished_run_leaves_no_indexed_entries_of_an_unfinished_run_of_its_job_in_staging(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 8)
    billed_by_run(server, catalog.config("monday"))
    unfinished = pipeline.plan(catalog.config("tuesday"), Storage())
    assert _handed_to_shards(unfinished)

    billed_by_run(server, catalog.config("tuesday"))

    assert not _handed_to_shards(unfinished)


def test_a_retried_shard_keeps_in_the_index_the_rows_its_first_try_served(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 4)
    billed_by_run(server, catalog.config("monday"))
    catalog.change("sku-1", 91)
    catalog.change("sku-2", 92)
    tuesday = pipeline.plan(catalog.config("tuesday"), Storage())
    assert len(tuesday.shards) == 1
    with RemoveBgClient(server.base_url, server.token, **tuesday.config.client_settings()) as client:
        # The first try serves the unchanged rows, may send nothing, and fails; its task is retried.
        with pytest.raises(FailurePolicyError):
            pipeline.process_shard(tuesday.shards[0], tuesday, client, Storage(), budget=pipeline.Budget(0))
        pipeline.process_shard(tuesday.shards[0], tuesday, client, Storage())
    pipeline.merge(tuesday, Storage())
    _forget_entries(catalog.store)

    assert billed_by_run(server, catalog.config("wednesday")) == 0


def test_a_hand_made_index_part_where_a_shard_writes_its_own_is_replaced_without_failing_the_shard(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 4)
    billed_by_run(server, catalog.config("monday"))
    tuesday = pipeline.plan(catalog.config("tuesday"), Storage())
    part = catalog.store / "index" / "parts" / tuesday.run_id / "shard-00000.parquet"
    part.parent.mkdir(parents=True)
    hand_made = {"key_prefix": [1], "key": ["not a key"], "entry": ["{}"]}
    pq.write_table(pa.table(hand_made, schema=pa.schema(INDEX_TYPES)), part)
    with RemoveBgClient(server.base_url, server.token, **tuesday.config.client_settings()) as client:
        pipeline.process_shard(tuesday.shards[0], tuesday, client, Storage())
    pipeline.merge(tuesday, Storage())
    _forget_entries(catalog.store)

    assert billed_by_run(server, catalog.config("wednesday")) == 0


def test_an_unreadable_index_file_is_skipped_with_a_warning_and_bills_nothing(
    server: LocalApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = _Catalog(tmp_path, 6)
    billed_by_run(server, catalog.config("monday"))
    for part in (catalog.store / "index").rglob("*.parquet"):
        part.write_bytes(b"not parquet")

    with caplog.at_level(logging.WARNING, logger="removebg_provider"):
        billed = billed_by_run(server, catalog.config("tuesday"))

    assert billed == 0
    assert "is unreadable, its entries are read one by one" in caplog.text


def test_an_index_marker_that_names_no_files_is_skipped_and_bills_nothing(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 4)
    billed_by_run(server, catalog.config("monday"))
    for marker in (catalog.store / "index" / "complete").iterdir():
        marker.write_text(json.dumps({"run_id": "0" * 32, "parts": ["missing.parquet"]}))

    assert billed_by_run(server, catalog.config("tuesday")) == 0


def test_the_index_serves_day_two_on_each_object_store(
    server: LocalApiServer, object_store: ObjectStore, tmp_path: Path
) -> None:
    storage = object_store.storage
    catalog = _Catalog(tmp_path, 6, output_prefix=object_store.uri("cutouts"))
    billed_by_run(server, catalog.config("monday"), storage)
    entries = [
        uri
        for group in range(256)
        for uri in storage.list_prefix(object_store.uri(f"cutouts/_removebg_cache/entries/{group:02x}/"))
    ]
    assert len(entries) == 6
    for uri in entries:
        storage.delete(uri)
    catalog.change("sku-4", 94)

    assert billed_by_run(server, catalog.config("tuesday"), storage) == 1


def test_day_two_on_an_object_store_checks_its_served_cutouts_by_listing_not_one_request_each(
    server: LocalApiServer, object_store: ObjectStore, store_server: StoreServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 20, output_prefix=object_store.uri("cutouts"))
    one_shard = {"shard_size": 20, "max_records_per_request": 10}
    billed_by_run(server, dataclasses.replace(catalog.config("monday"), **one_shard), object_store.storage)
    tuesday = dataclasses.replace(catalog.config("tuesday"), **one_shard)
    requests_sent: list[str] = []

    billed = billed_by_run(server, tuesday, store_server.counted_storage(requests_sent))

    rows = enriched_rows(tuesday)
    assert billed == 0
    assert len(rows) == 20
    assert all("reused from the result store" in str(row["removebg_status_text"]) for row in rows.values())
    assert [url for url in requests_sent if ".png" in urlsplit(url).path] == []


def _index_files_after_a_run_overtaken_by_a_prune(server: LocalApiServer, catalog: _Catalog) -> list[Path]:
    """Run a day whose registration a prune removes while its shards run; the index files left on disk."""
    billed_by_run(server, catalog.config("monday"))
    tuesday = pipeline.plan(catalog.config("tuesday"), Storage())
    removebg_cache("prune", str(catalog.store), "--older-than", "0")
    with RemoveBgClient(server.base_url, server.token, **tuesday.config.client_settings()) as client:
        for shard in tuesday.shards:
            pipeline.process_shard(shard, tuesday, client, Storage())
    pipeline.merge(tuesday, Storage())
    return [path for path in (catalog.store / "index").rglob("*") if path.is_file()]


def test_stats_counts_the_index_files_of_a_run_that_a_prune_overtook(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 6)
    on_disk = _index_files_after_a_run_overtaken_by_a_prune(server, catalog)

    assert removebg_cache("stats", str(catalog.store))["index_files"] == len(on_disk)


def test_prune_removes_the_index_files_of_a_run_that_an_earlier_prune_overtook(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 6)
    _index_files_after_a_run_overtaken_by_a_prune(server, catalog)

    removebg_cache("prune", str(catalog.store), "--older-than", "0", "--even-if-current")

    assert [path for path in (catalog.store / "index").rglob("*") if path.is_file()] == []


def test_prune_keeps_the_newest_complete_index_and_removes_older_ones(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 6)
    billed_by_run(server, catalog.config("monday"))
    monday_files = removebg_cache("stats", str(catalog.store))["index_files"]
    billed_by_run(server, catalog.config("tuesday"))

    pruned = removebg_cache("prune", str(catalog.store), "--older-than", "0")

    assert pruned["index_files_removed"] == monday_files
    _forget_entries(catalog.store)
    assert billed_by_run(server, catalog.config("wednesday")) == 0


def test_prune_even_if_current_removes_the_newest_index_too_and_its_images_are_billed_again(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 3)
    billed_by_run(server, catalog.config("monday"))

    indexed = removebg_cache("stats", str(catalog.store))["index_files"]

    pruned = removebg_cache("prune", str(catalog.store), "--older-than", "0", "--even-if-current")

    assert pruned["index_files_removed"] == indexed
    assert removebg_cache("stats", str(catalog.store))["index_files"] == 0
    assert billed_by_run(server, catalog.config("tuesday")) == 3


def _rewrite_index_parts(store: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    """Replace every index part of the store by `change` of it, as another version or a hostile hand might."""
    parts = sorted((store / "index" / "parts").rglob("*.parquet"))
    assert parts
    for part in parts:
        pq.write_table(change(pq.read_table(part)), part)


def test_an_index_file_in_another_layout_is_skipped_with_a_warning_and_bills_nothing(
    server: LocalApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    catalog = _Catalog(tmp_path, 4)
    billed_by_run(server, catalog.config("monday"))
    _rewrite_index_parts(catalog.store, lambda part: part.set_column(0, "key_prefix", part.column("key")))

    with caplog.at_level(logging.WARNING, logger="removebg_provider"):
        billed = billed_by_run(server, catalog.config("tuesday"))

    assert billed == 0
    assert "its entries are read one by one" in caplog.text


def test_index_rows_without_a_key_prefix_are_skipped_and_bill_nothing(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 4)
    billed_by_run(server, catalog.config("monday"))
    _rewrite_index_parts(
        catalog.store, lambda part: part.set_column(0, "key_prefix", pa.nulls(part.num_rows, pa.uint64()))
    )

    assert billed_by_run(server, catalog.config("tuesday")) == 0


def test_an_index_marker_whose_parts_are_not_a_list_is_skipped_and_bills_nothing(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 4)
    billed_by_run(server, catalog.config("monday"))
    for marker in (catalog.store / "index" / "complete").iterdir():
        marker.write_text(json.dumps({"run_id": "0" * 32, "parts": 5}))

    assert billed_by_run(server, catalog.config("tuesday")) == 0


def test_an_indexed_entry_without_outputs_costs_a_get_and_every_row_keeps_its_cutout(
    server: LocalApiServer, tmp_path: Path
) -> None:
    catalog = _Catalog(tmp_path, 4)
    billed_by_run(server, catalog.config("monday"))

    def hollow(part: pa.Table) -> pa.Table:
        entries = [json.dumps({**json.loads(text), "outputs": {}}) for text in part["entry"].to_pylist()]
        return part.set_column(2, "entry", pa.array(entries, pa.string()))

    _rewrite_index_parts(catalog.store, hollow)
    tuesday = catalog.config("tuesday")

    billed = billed_by_run(server, tuesday)

    assert billed == 0
    assert cutout_widths(tuesday) == {f"sku-{index}": 50 + index for index in range(4)}
