"""Write synthetic product photos and a day's manifest under a prefix (s3://, gs://, az:// or a folder).

In the compose deployment (see docs/deploy.md):

    docker compose -f docker/compose.yaml run --rm airflow-cli \
        python /opt/removebg/seed_demo.py s3://catalog/demo --date 2025-01-15 --photos 200

writes `<prefix>/photos/*.jpg` and `<prefix>/manifests/<date>/products.csv` (columns sku, title,
image_url), the layout the example DAG reads when REMOVEBG_DEMO_DIR is `<prefix>`. Object-store
credentials come from each SDK's environment (AWS_* for S3).
"""

from __future__ import annotations

import argparse
import csv
import io
import tempfile
from datetime import date
from pathlib import Path

from removebg_provider.samples import write_sample_photos
from removebg_provider.storage import Storage, join_uri


def seed(prefix: str, day: str, photos: int, seed: int = 2024, size: int = 640) -> str:
    """Upload `photos` sample photos and the manifest listing them; return the manifest's URI."""
    storage = Storage()
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["sku", "title", "image_url"])
    with tempfile.TemporaryDirectory() as scratch:
        for index, path in enumerate(write_sample_photos(scratch, photos, seed=seed, size=(size, size))):
            uri = join_uri(prefix, f"photos/{path.name}")
            storage.write_bytes(uri, Path(path).read_bytes())
            writer.writerow([f"SKU-{index:05d}", path.stem.replace("_", " "), uri])
            print(f"\rphotos uploaded: {index + 1}/{photos}", end="", flush=True)
    print()
    manifest = join_uri(prefix, f"manifests/{day}/products.csv")
    storage.write_bytes(manifest, buffer.getvalue().encode())
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", help="where photos/ and manifests/ go, e.g. s3://catalog/demo")
    parser.add_argument(
        "--date", default=date.today().isoformat(), help="the manifest's day (default: today)"
    )
    parser.add_argument("--photos", type=int, default=100, help="how many photos (default: 100)")
    parser.add_argument(
        "--size", type=int, default=640, help="photo width and height in pixels (default: 640)"
    )
    args = parser.parse_args(argv)
    print(f"manifest written: {seed(args.prefix, args.date, args.photos, size=args.size)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
