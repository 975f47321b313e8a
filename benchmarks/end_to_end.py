"""A whole `removebg run` process against an API with a fixed latency: its share of the ideal.

This is the run as a user starts it: a fresh `python -m removebg_provider run` process with the
default settings (quality check, result store, QA report on), timed from its start to its exit. The
manifest carries a content fingerprint column (what a catalog export has), so the result store needs
no request per row; its image URLs point at the fake API, which the report may fetch
(`--allow-private-urls`). The ideal is `rows / (concurrency x batch / latency)`: every request slot
busy from the process's first instant to its last. The fake API's first-request and last-answer
times split what is lost into start-up (process start to first request), the requests, and the
wind-down (last answer to exit: copies, merge, report).

`--baseline REV` runs the same jobs with the package of a git revision, alternating with this tree,
so both see the same machine.

Run: PYTHONPATH=src .venv/bin/python benchmarks/end_to_end.py [--baseline REV] [--write-doc]
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from _common import FakeApi, extract_source, fake_api, load_average, machine, write_subsection

ROOT = Path(__file__).resolve().parent.parent
BATCH = 10
# Job lengths (seconds at the ideal rate) and the share of the ideal each should reach (issue 19).
GOALS = {60.0: 0.95, 20.0: 0.90}
TABLE_HEADER = (
    "| concurrency | rows | ideal s | version | seconds | share of ideal | start-up s | wind-down s "
    "| our CPU s | load |\n|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
)


@dataclass(frozen=True)
class Job:
    """A manifest sized to `length` seconds at the ideal rate, in whole rounds of requests."""

    concurrency: int
    length: float
    latency: float

    @property
    def rows(self) -> int:
        return max(1, round(self.length / self.latency)) * self.concurrency * BATCH

    @property
    def ideal_seconds(self) -> float:
        return self.rows * self.latency / (self.concurrency * BATCH)


@dataclass(frozen=True)
class Timing:
    """One whole run of one job by one version."""

    version: str
    job: Job
    seconds: float  # process start to exit
    startup: float  # process start to the fake API's first request
    wind_down: float  # the fake API's last answer to the process's exit
    cpu: float  # user + system CPU seconds of the run's process
    load: float  # 1-minute load average at the start

    @property
    def share(self) -> float:
        return self.job.ideal_seconds / self.seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency", type=float, default=1.4, help="seconds per API request")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[32, 64], help="requests in flight")
    parser.add_argument(
        "--lengths", nargs="+", type=float, default=list(GOALS), help="job lengths, seconds at the ideal rate"
    )
    parser.add_argument("--baseline", help="git revision run alongside this tree, e.g. main")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each job by each version")
    parser.add_argument("--write-doc", action="store_true", help="update docs/BENCHMARKS.md")
    args = parser.parse_args()
    timings: list[Timing] = []
    with tempfile.TemporaryDirectory(prefix="end-to-end-") as scratch:
        versions = {"this tree": ROOT / "src"}
        if args.baseline:
            versions[f"baseline {args.baseline}"] = extract_source(args.baseline, Path(scratch) / "baseline")
        jobs = [Job(c, length, args.latency) for c in args.concurrency for length in args.lengths]
        for _ in range(args.repeats):
            for job in jobs:
                for version, source in versions.items():
                    folder = Path(scratch) / f"run-{len(timings)}"
                    with fake_api(args.latency, 0) as api:
                        timing = measure(api, version, source, job, folder)
                    timings.append(timing)
                    print(_line(timing), file=sys.stderr)
    print("\n".join(_line(timing) for timing in timings))
    if args.write_doc:
        _write_doc(timings, args)
    return 0


def measure(api: FakeApi, version: str, source: Path, job: Job, folder: Path) -> Timing:
    """One `removebg run` of `job`'s rows, in a fresh process using the package under `source`."""
    folder.mkdir(parents=True)
    manifest = folder / "manifest.parquet"
    pq.write_table(
        pa.table(
            {
                "sku": [f"SKU-{index:08d}" for index in range(job.rows)],
                "image_url": [f"{api.base_url}/files/source-{index}.jpg" for index in range(job.rows)],
                "image_md5": [f"{index:032x}" for index in range(job.rows)],
            }
        ),
        manifest,
    )
    command = [
        sys.executable,
        "-m",
        "removebg_provider",
        "run",
        str(manifest),
        "--output-prefix",
        str(folder / "out"),
        "--output-manifest",
        str(folder / "enriched.parquet"),
        "--id-column",
        "sku",
        "--fingerprint-column",
        "image_md5",
        "--allow-private-urls",
        "--endpoint",
        api.base_url,
        "--concurrency",
        str(job.concurrency),
        "--batch-size",
        str(BATCH),
        "--no-progress",
    ]
    environment = {**os.environ, "PYTHONPATH": str(source), "REMOVEBG_API_TOKEN": "bench-token"}
    load = os.getloadavg()[0]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, cwd=folder)
    ended = time.time()
    # Only the run's process ends inside this window: the fake API is reaped after the run.
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = used.ru_utime - children.ru_utime + used.ru_stime - children.ru_stime
    if finished.returncode != 0:
        raise RuntimeError(f"{version}: removebg run exited {finished.returncode}: {finished.stderr[-2000:]}")
    stats = api.stats()
    if stats["records_billed"] != job.rows:
        raise RuntimeError(f"{version}: billed {stats['records_billed']} records for {job.rows} rows")
    return Timing(
        version,
        job,
        ended - started,
        stats["first_request_at"] - started,
        ended - stats["last_answer_at"],
        cpu,
        load,
    )


def _line(timing: Timing) -> str:
    job = timing.job
    return (
        f"| {job.concurrency} | {job.rows:,} | {job.ideal_seconds:.1f} | {timing.version} | "
        f"{timing.seconds:.1f} | **{timing.share:.2f}** | {timing.startup:.2f} | "
        f"{timing.wind_down:.2f} | {timing.cpu:.1f} | {timing.load:.2f} |"
    )


def _write_doc(timings: list[Timing], args: argparse.Namespace) -> None:
    command = (
        "PYTHONPATH=src .venv/bin/python benchmarks/end_to_end.py "
        + shlex.join(sys.argv[1:]).replace("--write-doc", "").strip()
    )
    goals = []
    for concurrency in args.concurrency:
        for length, goal in GOALS.items():
            if length not in args.lengths:
                continue
            best = max(
                t.share
                for t in timings
                if t.version == "this tree" and t.job.concurrency == concurrency and t.job.length == length
            )
            verdict = "met" if best >= goal else "**missed**"
            goals.append(f"concurrency {concurrency}, {length:g} s job >= {goal:.2f}: {verdict} ({best:.2f})")
    body = f"""`{command}` on {machine()}; load average {load_average()} at the end.

A fresh `removebg run` process per job (defaults: quality check, result store and QA report on; a
content fingerprint column; outputs, checkpoints and the enriched manifest on local disk) against the
fake API of benchmarks/_common.py, {args.latency:g} s per request, {BATCH} records per request, a fresh
fake API per run. Ideal = rows x latency / (concurrency x {BATCH}). "Start-up" is the process's start
to its first request; "wind-down" is the last answer to the process's exit (the last copies, the
merge, the report). "Our CPU" is the run process's user + system CPU (the fake API's is not in it).
Versions alternate job by job, so both see the same machine.

{TABLE_HEADER}
{chr(10).join(_line(t) for t in timings)}

Goals (this tree, best run): {"; ".join(goals)}.
"""
    write_subsection("Whole process, as a user runs it", body)


if __name__ == "__main__":
    sys.exit(main())
