"""Measure what the quality check costs per cutout (1 MP and 12 MP), and the report on a large manifest.

Run: PYTHONPATH=src .venv/bin/python benchmarks/quality_cost.py [--repeats 15] [--report-rows 1000000]
"""

from __future__ import annotations

import os

# One core, pinned before numpy/OpenCV load their thread pools, so the numbers mean "per core".
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import functools  # noqa: E402
import io  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from removebg_provider.quality import assess  # noqa: E402
from removebg_provider.samples import make_product_photo  # noqa: E402

cv2.setNumThreads(1)
SIZES = {"1 MP": (1152, 864), "12 MP": (4000, 3000)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per case (default %(default)s)")
    parser.add_argument(
        "--report-rows", type=int, default=0, help="also time `build_report` on a manifest of this many rows"
    )
    args = parser.parse_args()
    print(f"command: PYTHONPATH=src {sys.executable} {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cores, 1 thread used\n")
    print("| cutout | bytes | full decode of the cutout, ms | assess, ms (median) | assess, ms (p90) |")
    print("|---|---|---|---|---|")
    for label, (width, height) in SIZES.items():
        photo = make_product_photo(7, width, height, product="bottle", background="white")
        rgba = np.dstack([photo.rgb, photo.alpha])
        cases = {
            "PNG with alpha": (_encode(rgba, "PNG"), None),
            "WEBP with alpha": (_encode(rgba, "WEBP"), None),
            "JPG + mask JPG": (_encode(photo.rgb, "JPEG"), _encode(photo.alpha, "JPEG")),
        }
        for name, (cutout, mask) in cases.items():
            decode = _median_ms(functools.partial(_full_decode, cutout), args.repeats)
            times = _times_ms(functools.partial(assess, cutout, mask), args.repeats)
            size = len(cutout) + (len(mask) if mask else 0)
            print(
                f"| {label} {name} | {size:,} | {decode:.1f} | {statistics.median(times):.1f} | "
                f"{np.percentile(times, 90):.1f} |"
            )
    if args.report_rows:
        _report_on_large_manifest(args.report_rows)
    return 0


def _report_on_large_manifest(rows: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder)
        photo = make_product_photo(3, 1152, 864)
        original, cutout = directory / "o.jpg", directory / "c.png"
        original.write_bytes(_encode(photo.rgb, "JPEG"))
        cutout.write_bytes(_encode(np.dstack([photo.rgb, photo.alpha]), "PNG"))
        index = np.arange(rows)
        failed = index % 997 == 0
        flag_lists = [["touches_border"] if i % 613 == 1 else [] for i in range(rows)]
        flags = pa.array(flag_lists, pa.list_(pa.string()))
        table = pa.table(
            {
                "image_url": pa.array([f"{original}?v={i}" if i % 2 else str(original) for i in range(rows)]),
                "removebg_status_code": pa.array(np.where(failed, 503, 200).astype(np.int32)),
                "removebg_output_url": pa.array([None if f else str(cutout) for f in failed], pa.string()),
                "removebg_foreground_fraction": pa.array(np.random.default_rng(0).random(rows), pa.float32()),
                "removebg_quality_flags": flags,
            }
        )
        manifest = directory / "big.parquet"
        pq.write_table(table, manifest, row_group_size=65_536)
        del table, flags, flag_lists
        baseline = _child(_IMPORT_ONLY, manifest)
        measured = _child(_BUILD_REPORT, manifest)
        print(
            f"\nbuild_report on {rows:,} rows ({manifest.stat().st_size / 1e6:.1f} MB parquet), "
            f"sample 48, 1 MP images, fresh process: {measured}; "
            f"the same process importing the modules only: {baseline}"
        )


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent into the child.
_PEAK_RSS = """
def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""
_IMPORT_ONLY = (
    _PEAK_RSS
    + """
import removebg_provider.report
print(f"peak RSS {peak_rss_mib():.0f} MiB")
"""
)
_BUILD_REPORT = (
    _PEAK_RSS
    + """
import sys, time
from removebg_provider.report import build_report
from removebg_provider.storage import Storage
started = time.perf_counter()
result = build_report(sys.argv[1], Storage(), sample=48)
seconds = time.perf_counter() - started
print(f"{result.tiles} tiles in {seconds:.1f} s, peak RSS {peak_rss_mib():.0f} MiB")
"""
)


def _child(code: str, manifest: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, str(manifest)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def _full_decode(data: bytes) -> None:
    Image.open(io.BytesIO(data)).load()


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def _times_ms(call: Callable[[], object], repeats: int) -> list[float]:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return times


def _median_ms(call: Callable[[], object], repeats: int) -> float:
    return statistics.median(_times_ms(call, repeats))


if __name__ == "__main__":
    sys.exit(main())
