"""Plan, store lookup, shard tasks and merge of a big daily catalog against yesterday's result store.

The manifest has a fingerprint column (`image_md5`), so nothing is read to describe an image. The
store is filled as yesterday's run would have left it (`phase_store`): an entry per row in its index,
each pointing at that row's cutout under the output prefix, and, in the default layout, the entry as
a file too (written here directly, in the store's own formats, not timed). Today 1 % of the rows
carry a new `image_md5`. Each timed phase runs in a fresh process (peak RSS = its VmHWM):

- plan: `pipeline.plan` of today's manifest, with its join to the store's index;
- lookup: every shard's triage against the store (`ShardWork.classify_counts`, what the shard tasks
  and `--dry-run` do first): source fingerprints from the column, the indexed entry (or an entry
  GET) and one version check per row; it must find 99 % reused and 1 % to send;
- shards: every shard task in full (`pipeline.process_shard`): the lookup again, then the reused rows
  served (checkpoints, results), the 1 % sent to a fake API without latency, the index parts; a
  day's shard work is this phase, of which the lookup is a part;
- merge: `pipeline.merge`, with a stored result for every row (written beforehand, not timed).

Run: PYTHONPATH=src .venv/bin/python benchmarks/store_scale.py [--rows 100000]
     [--phases plan,lookup,shards,merge] [--store-layout entries|index|index-only]
     [--folder DIR] [--write-doc]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from _common import fake_api, load_average, machine, write_subsection
from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.pipeline import store_index
from removebg_provider.pipeline.shard import ShardWork
from removebg_provider.pipeline.store import (
    ResultStore,
    StoredOutput,
    StoredResult,
    column_fingerprint,
    result_key,
)
from removebg_provider.storage import Storage
from scale import peak_rss_bytes

GOAL_PEAK_BYTES = 1 << 30
CHANGED_EVERY = 100
# Yesterday's shards, as the index holds them: one file per shard of this many rows.
_ROWS_PER_INDEX_PART = 100_000


def _config(folder: Path) -> pipeline.PipelineConfig:
    return pipeline.PipelineConfig(
        manifest_uri=str(folder / "today.parquet"),
        output_prefix=str(folder / "out"),
        output_manifest_uri=str(folder / "today.enriched.parquet"),
        id_column="sku",
        fingerprint_column="image_md5",
        report=False,
        quality_check=False,
    )


def _md5(index: int, changed: bool) -> str:
    return hashlib.md5(f"{index}:{int(changed)}".encode()).hexdigest()


def write_manifest(folder: Path, rows: int) -> None:
    """Today's manifest, written in slices so the generator's memory stays small."""
    schema = pa.schema([("sku", pa.string()), ("image_url", pa.string()), ("image_md5", pa.string())])
    with pq.ParquetWriter(folder / "today.parquet", schema, compression="zstd") as writer:
        for start in range(0, rows, 500_000):
            indices = range(start, min(rows, start + 500_000))
            writer.write_table(
                pa.table(
                    {
                        "sku": [f"SKU-{i:08d}" for i in indices],
                        "image_url": [f"https://cdn.example.test/catalog/{i:08d}/front.jpg" for i in indices],
                        "image_md5": [_md5(i, i % CHANGED_EVERY == 0) for i in indices],
                    },
                    schema=schema,
                )
            )


def phase_store(folder: Path, rows: int, layout: str = "entries") -> dict[str, float]:
    """Yesterday's store, all with yesterday's image_md5 (not timed), as `layout` says.

    - `entries`: an entry per row in yesterday's index (as its shards and merge write it) and as a
      file, and a cutout per row;
    - `index`: the same without the entry files (ten million files need more inodes than this disk has);
    - `index-only`: the index alone, for the plan (the lookup would find no cutout current).

    The cutouts are empty files: the lookup checks their version (a `stat`), never their bytes, and
    ten million 4 KiB blocks would not fit this disk.
    """
    config = _config(folder).resolved()
    storage = Storage()
    assert config.store_prefix is not None
    store = ResultStore(config.store_prefix, storage, holder="yesterday")
    stamp = datetime.now(timezone.utc)
    sha = hashlib.sha256(b"").hexdigest()
    made: set[str] = set()
    part: dict[str, StoredResult] = {}
    started = time.perf_counter()
    for index in range(rows):
        sku = f"SKU-{index:08d}"
        reference = f"https://cdn.example.test/catalog/{index:08d}/front.jpg"
        source = column_fingerprint(reference, _md5(index, False))
        key = result_key(source, config)
        cutout = config.outputs_for(sku)["cutout"]
        entry_path = store.entry_uri(key)
        for path in (os.path.dirname(cutout), os.path.dirname(entry_path)):
            if path not in made:
                os.makedirs(path, exist_ok=True)
                made.add(path)
        if layout == "index-only":
            version = "stat:0:0:0"
        else:
            os.close(os.open(cutout, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644))
            version = storage.version(cutout) or ""
        entry = StoredResult(key, source, {"cutout": StoredOutput(cutout, version, sha)}, stamp, 800, 600)
        if layout == "entries":
            Path(entry_path).write_text(json.dumps(entry.to_json()))
        part[key] = entry
        if len(part) == _ROWS_PER_INDEX_PART or index == rows - 1:
            store_index.write_part(
                config.store_prefix, "yesterday", index // _ROWS_PER_INDEX_PART, part, storage
            )
            part = {}
    store_index.complete(config.store_prefix, "yesterday", rows, storage)
    return {"seconds": time.perf_counter() - started}


def phase_plan(folder: Path, rows: int) -> dict[str, float]:
    started = time.perf_counter()
    planned = pipeline.plan(_config(folder), Storage())
    return {"seconds": time.perf_counter() - started, "shards": len(planned.shards)}


def phase_lookup(folder: Path, rows: int) -> dict[str, float]:
    storage = Storage()
    planned = pipeline.load_plan(f"{_config(folder).resolved().staging}/plan.json", storage)
    counts: Counter[str] = Counter()
    started = time.perf_counter()
    for shard in planned.shards:
        counts.update(ShardWork.load(shard, planned, storage).classify_counts())
    seconds = time.perf_counter() - started
    expected_todo = -(-rows // CHANGED_EVERY)
    if counts["todo"] != expected_todo or counts["reused"] != rows - expected_todo:
        raise AssertionError(f"lookup found {dict(counts)}, expected {expected_todo} to send")
    return {"seconds": seconds, "reused": counts["reused"], "todo": counts["todo"]}


def phase_shards(folder: Path, rows: int) -> dict[str, float]:
    """Every shard task in turn, as the mapped tasks run them: the lookup, the reused rows served
    (their checkpoints and results), the changed 1 % sent to a fake API without latency (their
    cutouts, entries and claims) and each shard's index part."""
    storage = Storage()
    planned = pipeline.load_plan(f"{_config(folder).resolved().staging}/plan.json", storage)
    billed = 0
    with (
        fake_api(0.0, 0) as api,
        RemoveBgClient(api.base_url, "bench-token", **planned.config.client_settings()) as client,
    ):
        started = time.perf_counter()
        for shard in planned.shards:
            billed += pipeline.process_shard(shard, planned, client, storage).billed_records
        seconds = time.perf_counter() - started
    if billed != -(-rows // CHANGED_EVERY):
        raise AssertionError(f"the shards billed {billed} records, expected {-(-rows // CHANGED_EVERY)}")
    return {"seconds": seconds, "billed": billed}


def phase_fill(folder: Path, rows: int) -> dict[str, float]:
    """A stored result for every row, as finished shard tasks leave them (not timed)."""
    storage = Storage()
    config = _config(folder).resolved()
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
                mode="fast",
                attempts=0,
                processed_at=stamp,
            )
            for row in work.rows
        }
        work.staging.write_results(results, results, billed=0)
    return {}


def phase_merge(folder: Path, rows: int) -> dict[str, float]:
    storage = Storage()
    planned = pipeline.load_plan(f"{_config(folder).resolved().staging}/plan.json", storage)
    started = time.perf_counter()
    summary = pipeline.merge(planned, storage)
    return {"seconds": time.perf_counter() - started, "succeeded": summary.succeeded}


PHASES = {
    "store": phase_store,
    "plan": phase_plan,
    "lookup": phase_lookup,
    "shards": phase_shards,
    "fill": phase_fill,
    "merge": phase_merge,
}
TIMED = ("plan", "lookup", "shards", "merge")


def run_phase(name: str, folder: Path, rows: int, *options: str) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its figures plus its peak RSS in bytes."""
    completed = subprocess.run(
        [sys.executable, __file__, "--phase", name, "--folder", str(folder), "--rows", str(rows), *options],
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{completed.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    print(name, json.dumps(figures), flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--phases", default="plan,lookup,merge", help="timed phases to run, comma-separated")
    parser.add_argument("--folder", type=Path, help="work here (kept) instead of a temporary folder")
    parser.add_argument(
        "--store-layout",
        choices=("entries", "index", "index-only"),
        default="entries",
        help="yesterday's store: entries as files and in the index (default), in the index only, or the "
        "index without cutouts (plan only)",
    )
    parser.add_argument("--write-doc", action="store_true", help="update docs/BENCHMARKS.md")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.phase:
        if args.phase == "store":
            figures = phase_store(args.folder, args.rows, args.store_layout)
        else:
            figures = PHASES[args.phase](args.folder, args.rows)
        figures["peak_rss_bytes"] = peak_rss_bytes()
        print(json.dumps(figures))
        return 0
    wanted = [name for name in args.phases.split(",") if name]
    command = "PYTHONPATH=src .venv/bin/python benchmarks/store_scale.py " + shlex.join(sys.argv[1:])
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="removebg-store-scale-", dir=args.folder) as temporary:
        folder = Path(temporary)
        write_manifest(folder, args.rows)
        if args.store_layout == "index-only" and wanted != ["plan"]:
            parser.error("--store-layout index-only measures the plan alone: --phases plan")
        layout = ["--store-layout", args.store_layout]
        needs_store = "lookup" in wanted or "shards" in wanted or args.store_layout == "index-only"
        store = run_phase("store", folder, args.rows, *layout) if needs_store else {"seconds": 0.0}
        # Lookup and merge need a plan; merge needs every shard's results.
        needed = {"plan", *wanted, *(["fill"] if "merge" in wanted else [])}
        figures = {name: run_phase(name, folder, args.rows) for name in PHASES if name in needed - {"store"}}
    load_after = load_average()
    timed = [name for name in TIMED if name in wanted]
    peak = max(figures[name]["peak_rss_bytes"] for name in timed)
    # The shards phase does the lookup again: a day is plan, shard tasks and merge.
    day = [name for name in timed if not (name == "lookup" and "shards" in timed)]
    total = sum(figures[name]["seconds"] for name in day)
    lines = "\n".join(
        f"| {name} | {figures[name]['seconds']:.1f} | {figures[name]['peak_rss_bytes'] / 2**20:.0f} |"
        for name in timed
    )
    print(
        f"{' + '.join(day)}: {total:.1f} s, peak RSS {peak / 2**20:.0f} MiB; "
        f"load {load_before} -> {load_after}"
    )
    if args.write_doc:
        write_subsection(
            f"Against yesterday's result store: {args.rows:,} rows",
            f"""
`{command}` on {machine()}; load average {load_before} before, {load_after} after.

{args.rows:,} rows with a fingerprint column, 1 % of them changed since yesterday; yesterday's store
is laid out as `{args.store_layout}` (see `phase_store`) on local disk (filled in
{store["seconds"]:.0f} s, not counted).
Each phase in a fresh process; peak RSS is its VmHWM.

| phase | wall s | peak RSS MiB |
|---|---:|---:|
{lines}

{" + ".join(day).capitalize()}: {total:.1f} s; the largest peak {peak / 2**20:.0f} MiB (goal: 1 GiB).
""",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
