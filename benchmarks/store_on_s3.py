"""A reused day with its outputs on S3 (moto's server): the requests and the time its served rows cost.

Day 1 sends a catalog of local photos with an `image_md5` column (the store's index then serves
day 2; `--without-fingerprint-column`: each row's entry is read by GET) to the fake API
(benchmarks/_common.py), its cutouts written to a bucket of moto's S3 server on 127.0.0.1. Then the
same catalog runs again, unchanged, under another manifest name: every row is served from the result
store, each in a fresh process, alternating this tree with `--baseline REV` when given. Reported per
day: its wall time, what it billed, and the S3 requests it sent by kind (HEAD, GET, PUT, DELETE,
LIST), per row.

Run: PYTHONPATH=src .venv/bin/python benchmarks/store_on_s3.py [--rows 2000] [--baseline REV] [--repeats 2]
     [--without-fingerprint-column]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from _common import extract_source, fake_api, load_average, machine, random_photos

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.stores import start_moto_s3

_BUCKET = "catalog"


def write_catalog(folder: Path, rows: int) -> None:
    """`rows` local photos and the manifests of both days (the same rows, another name)."""
    paths = random_photos(folder / "photos", rows)
    table = pa.table(
        {
            "sku": [f"SKU-{i:07d}" for i in range(rows)],
            "image_url": paths,
            "image_md5": [f"md5-{i}" for i in range(rows)],
        }
    )
    for day in ("day1", "day2"):
        pq.write_table(table, folder / f"{day}.parquet")


def run_day(
    folder: Path, day: str, endpoint: str, api_url: str, fingerprint_column: str | None
) -> dict[str, Any]:
    """One day's whole `pipeline.run` in this process, its S3 requests counted by kind."""
    import boto3

    from removebg_provider import pipeline
    from removebg_provider.client import RemoveBgClient
    from removebg_provider.storage import Storage

    sent: Counter[str] = Counter()

    def count(request: Any, **_: Any) -> None:
        query = urlsplit(request.url).query
        sent["LIST" if "list-type" in query else request.method] += 1

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.meta.events.register("before-send.s3", count)
    storage = Storage(transport_params={"s3": {"client": client}})
    config = pipeline.PipelineConfig(
        manifest_uri=str(folder / f"{day}.parquet"),
        id_column="sku",
        fingerprint_column=fingerprint_column,
        output_prefix=f"s3://{_BUCKET}/cutouts",
        output_manifest_uri=str(folder / f"{day}.enriched.parquet"),
        staging_prefix=str(folder / "staging"),
        report=False,
        quality_check=False,
    )
    started = time.perf_counter()
    with RemoveBgClient(api_url, "bench", **config.resolved().client_settings()) as api:
        summary = pipeline.run(config, api, storage)
    return {"seconds": time.perf_counter() - started, "billed": summary.billed_records, "requests": sent}


def _day_in_fresh_process(
    source: Path, folder: Path, day: str, endpoint: str, api_url: str, fingerprint_column: str | None
) -> dict[str, Any]:
    completed = subprocess.run(
        [
            sys.executable,
            __file__,
            "--day",
            day,
            "--folder",
            str(folder),
            "--endpoint",
            endpoint,
            "--api",
            api_url,
            *(["--fingerprint-column", fingerprint_column] if fingerprint_column else []),
        ],
        env={**os.environ, "PYTHONPATH": f"{source}{os.pathsep}{Path(__file__).parent}"},
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{day} failed:\n{completed.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--baseline", help="git revision whose day 2 alternates with this tree's")
    parser.add_argument("--repeats", type=int, default=2, help="day-2 runs of each version")
    parser.add_argument(
        "--without-fingerprint-column",
        action="store_true",
        help="leave out the image_md5 column: the store is then read by GET, one entry per row",
    )
    parser.add_argument("--fingerprint-column", help=argparse.SUPPRESS)
    parser.add_argument("--day", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--api", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.day:
        print(json.dumps(run_day(args.folder, args.day, args.endpoint, args.api, args.fingerprint_column)))
        return 0
    random.seed(17)
    print(f"{machine()}; load average {load_average()} before", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix="removebg-s3-day-") as scratch,
        start_moto_s3() as s3,
        fake_api(0.05, 200) as api,
    ):
        folder = Path(scratch)
        os.environ.update(s3.env)
        s3.client().create_bucket(Bucket=_BUCKET)
        write_catalog(folder, args.rows)
        column = None if args.without_fingerprint_column else "image_md5"
        versions = {"this tree": Path(__file__).resolve().parent.parent / "src"}
        if args.baseline:
            versions[f"baseline {args.baseline}"] = extract_source(args.baseline, folder / "baseline")
        day1 = _day_in_fresh_process(versions["this tree"], folder, "day1", s3.endpoint, api.base_url, column)
        print("day 1", json.dumps(day1), flush=True)
        for _ in range(args.repeats):
            for name, source in versions.items():
                day2 = _day_in_fresh_process(source, folder, "day2", s3.endpoint, api.base_url, column)
                per_row = {
                    kind: round(count / args.rows, 3) for kind, count in sorted(day2["requests"].items())
                }
                print(
                    f"day 2, {name}: {day2['seconds']:.1f} s, billed {day2['billed']}, "
                    f"S3 requests per row {per_row}; load {load_average()}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    sys.exit(main())
