"""Plan and merge a 1,000,000-row manifest: wall time and peak memory, each phase in its own process.

Peak memory is the peak RSS (VmHWM) of a fresh subprocess per phase, so one phase's garbage never counts
against the next. Between plan and merge, every shard gets a stored result for every row (as if
processed; written through the pipeline's own result writer, not timed), so merge does its full
work: read each shard and its results, and write the enriched manifest.

Run: .venv/bin/python benchmarks/scale.py [--rows 1000000] [--write-doc]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from _common import machine, url_manifest, write_subsection
from removebg_provider import pipeline
from removebg_provider.pipeline.shard import ShardWork
from removebg_provider.storage import Storage

GOAL_PEAK_BYTES = 1 << 30


def _config(folder: Path) -> pipeline.PipelineConfig:
    return pipeline.PipelineConfig(
        manifest_uri=str(folder / "manifest.parquet"),
        output_prefix=str(folder / "out"),
        output_manifest_uri=str(folder / "enriched.parquet"),
        id_column="sku",
        # The QA report (contact sheet of sample rows) is its own cost, not the pipeline's.
        report=False,
    )


def phase_plan(folder: Path) -> dict[str, float]:
    started = time.perf_counter()
    planned = pipeline.plan(_config(folder), Storage())
    return {"seconds": time.perf_counter() - started, "shards": len(planned.shards)}


def phase_fill(folder: Path) -> dict[str, float]:
    """Store a successful result for every row, as finished shard tasks would (not measured)."""
    storage = Storage()
    config = _config(folder)
    planned = pipeline.load_plan(f"{config.staging}/plan.json", storage)
    stamp = datetime.now(timezone.utc)
    for shard in planned.shards:
        work = ShardWork.load(shard, planned, storage)
        results = {
            row["__removebg_row"]: pipeline.RowResult(
                id=row["__removebg_id"],
                status_code=200,
                status_text="OK",
                outputs={"cutout": config.outputs_for(row["__removebg_id"])["cutout"]},
                width=800,
                height=600,
                request_id="4f7c1e2a-9b1d-4d8e-8f00-123456789abc",
                mode="fast",
                attempts=1,
                processed_at=stamp,
                fingerprint=config.fingerprint(row["__removebg_ref"]),
            )
            for row in work.rows
        }
        work.staging.write_results(results, results, billed=len(results))
    return {}


def phase_merge(folder: Path) -> dict[str, float]:
    storage = Storage()
    planned = pipeline.load_plan(f"{_config(folder).staging}/plan.json", storage)
    started = time.perf_counter()
    summary = pipeline.merge(planned, storage)
    return {"seconds": time.perf_counter() - started, "succeeded": summary.succeeded}


PHASES = {"plan": phase_plan, "fill": phase_fill, "merge": phase_merge}


def run_phase(name: str, folder: Path) -> dict[str, float]:
    """Run one phase in a fresh interpreter; returns its figures plus its peak RSS in bytes."""
    completed = subprocess.run(
        [sys.executable, __file__, "--phase", name, "--folder", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{completed.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--write-doc", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.phase:
        figures = PHASES[args.phase](args.folder)
        figures["peak_rss_bytes"] = peak_rss_bytes()
        print(json.dumps(figures))
        return 0
    command = "PYTHONPATH=src .venv/bin/python benchmarks/scale.py " + shlex.join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="removebg-scale-") as temporary:
        folder = Path(temporary)
        url_manifest(folder / "manifest.parquet", args.rows)
        size = (folder / "manifest.parquet").stat().st_size
        plan = run_phase("plan", folder)
        run_phase("fill", folder)
        merge = run_phase("merge", folder)
        enriched = (folder / "enriched.parquet").stat().st_size
    baseline = _baseline_rss()
    goal_met = max(plan["peak_rss_bytes"], merge["peak_rss_bytes"]) <= GOAL_PEAK_BYTES
    for name, figures in (("plan", plan), ("merge", merge)):
        print(f"{name}: {figures['seconds']:.1f} s, peak RSS {figures['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"interpreter + imports alone: {baseline / 2**20:.0f} MiB")
    print(f"goal peak RSS <= 1 GiB: {'met' if goal_met else 'MISSED'}")
    if args.write_doc:
        write_subsection(
            "A million-row manifest",
            f"""
`{command}` on {machine()}.

A {args.rows:,}-row Parquet manifest ({size / 2**20:.0f} MiB: sku, image URL, title, price), planned
into {int(plan["shards"])} shards, then merged with a stored result for every row into a
{enriched / 2**20:.0f} MiB enriched manifest (QA report off). Each phase runs in a fresh process;
peak RSS is its VmHWM (the interpreter with the package imported is {baseline / 2**20:.0f} MiB of that).

| phase | wall s | peak RSS MiB |
|---|---:|---:|
| plan | {plan["seconds"]:.1f} | {plan["peak_rss_bytes"] / 2**20:.0f} |
| merge | {merge["seconds"]:.1f} | {merge["peak_rss_bytes"] / 2**20:.0f} |

Goal: peak RSS <= 1 GiB in each phase: **{"met" if goal_met else "MISSED"}**.
""",
        )
    return 0 if goal_met else 1


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    VmHWM, not `ru_maxrss`: on Linux a child started by fork+exec inherits its parent's `ru_maxrss`,
    which here would report the manifest generator's memory as the phase's.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _baseline_rss() -> int:
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); import scale; print(scale.peak_rss_bytes())",
            str(Path(__file__).parent),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(completed.stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
