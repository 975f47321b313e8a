"""The result store on a daily catalog run, and source fingerprints from listings on S3, GCS and Azure.

Day 1 sends every photo of a local catalog to the fake API (benchmarks/_common.py); day 2 runs the
same catalog under another manifest name with 1 % of the photos changed. Reported: what day 2
billed, its wall time, the storage operations it made per row, the store's bytes per entry, and the
process's peak RSS. Then, on each store's emulator (moto's S3 server, fake-gcs-server, Azurite),
how many source fingerprints per second come from one folder's listing and from one metadata request
per object.

Run: PYTHONPATH=src .venv/bin/python benchmarks/result_store.py [--rows 5000] [--objects 10000]
     [--write-doc]
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import resource
import shlex
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from _common import fake_api, load_average, machine, random_photos, write_subsection
from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.storage import Storage

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.stores import MotoS3, ObjectStore, StoreServer, start_azurite, start_fake_gcs, start_moto_s3

_COUNTED = (
    "read_bytes",
    "exists",
    "version",
    "write_bytes",
    "create_new",
    "delete",
    "list_prefix",
    "read_with_revision",
    "replace_if_unchanged",
    "delete_if_unchanged",
)


@dataclass(frozen=True)
class CountingStorage(Storage):
    """Storage that counts its calls by method (fingerprints by URI described)."""

    calls: Counter[str] = field(default_factory=Counter, compare=False)

    def __getattribute__(self, name: str) -> Any:
        if name in _COUNTED:
            object.__getattribute__(self, "calls")[name] += 1
        return object.__getattribute__(self, name)

    def fingerprints(
        self, uris: Any, limit: int | None = None, *, allow_private_urls: bool = False
    ) -> dict[str, str | None]:
        self.calls["fingerprints (per image)"] += len(uris)
        return super().fingerprints(uris, limit=limit, allow_private_urls=allow_private_urls)


def _day(api_url: str, folder: Path, photos: list[str], name: str, storage: Storage) -> tuple[float, int]:
    manifest = folder / f"{name}.parquet"
    pq.write_table(
        pa.table({"sku": [f"SKU-{i:07d}" for i in range(len(photos))], "image_url": photos}), manifest
    )
    config = pipeline.PipelineConfig(
        manifest_uri=str(manifest),
        output_prefix=str(folder / "cutouts"),
        output_manifest_uri=str(folder / f"{name}.enriched.parquet"),
        id_column="sku",
        report=False,
        quality_check=False,
    )
    started = time.perf_counter()
    with RemoveBgClient(api_url, "bench", **config.resolved().client_settings()) as client:
        summary = pipeline.run(config, client, storage)
    return time.perf_counter() - started, summary.billed_records


def daily_run(rows: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="removebg-store-") as temporary, fake_api(0.05, 200) as api:
        folder = Path(temporary)
        photos = random_photos(folder / "photos", rows)
        day1_seconds, day1_billed = _day(api.base_url, folder, photos, "day1", Storage())
        for path in random.sample(photos, rows // 100):
            Path(path).write_bytes(random.randbytes(2048))
        counting = CountingStorage()
        day2_seconds, day2_billed = _day(api.base_url, folder, photos, "day2", counting)
        entries = list((folder / "cutouts" / "_removebg_cache" / "entries").rglob("*.json"))
        entry_bytes = sum(entry.stat().st_size for entry in entries) / len(entries)
    return {
        "day1_seconds": day1_seconds,
        "day1_billed": day1_billed,
        "day2_seconds": day2_seconds,
        "day2_billed": day2_billed,
        "calls": dict(counting.calls),
        "entry_bytes": entry_bytes,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def listing_fingerprints(objects: int, log_dir: Path, stores: list[str]) -> dict[str, dict[str, float]]:
    """Fingerprints per second on each store's emulator, from a listing and from a request each."""
    figures = {}
    if "s3" in stores:
        with start_moto_s3() as s3:
            figures["moto S3"] = _fingerprint_rates(s3, objects)
    if "gcs" in stores:
        with start_fake_gcs(log_dir) as gcs:
            figures["fake-gcs-server"] = _fingerprint_rates(gcs, objects)
    if "azure" in stores:
        with start_azurite(log_dir) as azure:
            figures["Azurite"] = _fingerprint_rates(azure, objects)
    return figures


def _fingerprint_rates(server: StoreServer, objects: int) -> dict[str, float]:
    # A bucket of its own, left for the emulator to drop when it stops (GCS refuses to delete a
    # bucket of more than 256 objects in one call).
    store = server.new_store()
    uris = [store.uri(f"photos/p{index:07d}.jpg") for index in range(objects)]
    _put_all(server, store, uris)
    started = time.perf_counter()
    listed = store.storage.fingerprints(uris)
    listing_seconds = time.perf_counter() - started
    assert sum(value is not None for value in listed.values()) == objects
    sample = uris[:: max(1, objects // 500)][:500]
    started = time.perf_counter()
    # Fewer than the listing threshold per call: one metadata request each (8 side by side).
    for start in range(0, len(sample), 8):
        store.storage.fingerprints(sample[start : start + 8])
    head_seconds = time.perf_counter() - started
    return {"listing_per_second": objects / listing_seconds, "head_per_second": len(sample) / head_seconds}


def _put_all(server: StoreServer, store: ObjectStore, uris: list[str]) -> None:
    if isinstance(server, MotoS3):
        # moto's server runs in this process: its backend takes the objects directly, about 100 times
        # faster than through its HTTP server (100,000 PUTs take it over half an hour). The
        # listings measured still go through the server.
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for uri in uris:
            key = uri.split("/", 3)[3]
            backend.put_object(store.bucket, key, uri.encode())
        return
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda uri: store.storage.write_bytes(uri, uri.encode()), uris))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--objects", type=int, default=10000, help="objects in each store's listed folder")
    parser.add_argument("--stores", default="s3,gcs,azure", help="emulators whose listings are measured")
    parser.add_argument("--skip-daily", action="store_true", help="measure the listings only")
    parser.add_argument("--write-doc", action="store_true", help="update docs/BENCHMARKS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    random.seed(13)
    command = "PYTHONPATH=src .venv/bin/python benchmarks/result_store.py " + shlex.join(sys.argv[1:])
    if args.skip_daily and args.write_doc:
        parser.error("--write-doc needs the daily run: leave out --skip-daily")
    load_before = load_average()
    daily = None if args.skip_daily else daily_run(args.rows)
    with tempfile.TemporaryDirectory(prefix="removebg-emulators-") as log_dir:
        rates = listing_fingerprints(args.objects, Path(log_dir), args.stores.split(","))
    load_after = load_average()
    if daily is None:
        print(f"{machine()}; load average {load_before} before, {load_after} after", rates, sep="\n")
        return 0
    per_row = {name: count / args.rows for name, count in sorted(daily["calls"].items())}
    print(daily, rates, per_row, sep="\n")
    if args.write_doc:
        calls = ", ".join(f"{name} {value:.2f}" for name, value in per_row.items())
        rows = "\n".join(
            f"| {store} | {rate['listing_per_second']:,.0f} | {rate['head_per_second']:,.0f} |"
            for store, rate in rates.items()
        )
        write_subsection(
            "An incremental day: the result store",
            f"""
`{command}` on {machine()}; load average {load_before} before, {load_after} after.

Day 1: {args.rows:,} local photos (2 KiB each) sent to the fake API (0.05 s per request),
{daily["day1_billed"]:,} billed in {daily["day1_seconds"]:.1f} s. Day 2: the same catalog under another
manifest name, 1 % of the photos rewritten: **{daily["day2_billed"]:,} billed** in
{daily["day2_seconds"]:.1f} s ({daily["day2_seconds"] / args.rows * 1000:.2f} ms per row, one process,
two shards side by side).

Storage calls of day 2 per row: {calls}. An entry is {daily["entry_bytes"]:.0f} bytes; peak RSS of the
whole benchmark process {daily["peak_rss_mib"]:.0f} MiB.

Source fingerprints per second, {args.objects:,} objects in one folder, each store's emulator on
127.0.0.1 (their speed, not the cloud's: the ratio is what carries over):

| store | from the folder's listing | one metadata request each (8 in flight) |
|---|---:|---:|
{rows}
""",
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    sys.exit(main())
