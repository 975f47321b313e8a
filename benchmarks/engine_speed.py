"""Measure the classic engine's time per image on one core at 0.25, 1, 4 and 12 MP, against a baseline.

Each engine version runs in its own worker process (one thread), fed the same photos in turn, so both
see the same machine load; `--baseline REV` takes the engine of a git revision (`git archive`) as the
"before". Every photo is matted `--repeats` times per mode; the best wall time of those is that
photo's time (the load on a shared machine only ever adds to it), and the table gives the median
over photos, with CPU seconds beside it. IoU and alpha MAE on the same photos show that both
versions are compared at their own quality; the quality figures proper are `engine_quality.py`'s.

Run: PYTHONPATH=src .venv/bin/python benchmarks/engine_speed.py [--baseline REV] [--photos 6] [--write-doc]
"""

from __future__ import annotations

import os

# One core, pinned before numpy/OpenCV load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from _common import extract_source  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Engine speed"
MODES = ("fast", "precise")
# Seconds per image on one core at 1 MP (issue 19).
GOALS = {"fast": 0.12, "precise": 0.6}
FIRST_SEED = 9000  # apart from the quality sets (1000.., 5000..) and the development set (7000..)
BACKGROUNDS = ("white", "grey", "coloured", "gradient")


@dataclass(frozen=True)
class Timing:
    """One photo matted by one engine version in one mode."""

    version: str
    megapixels: float
    mode: str
    wall: float  # best of the repeats, seconds
    cpu: float  # CPU seconds of that same run
    iou: float
    mae: float


def main() -> None:
    """Parse the options; run as the coordinator, or as a worker when `--worker` is given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[0.25, 1.0, 4.0, 12.0], help="megapixels")
    parser.add_argument("--photos", type=int, default=6, help="photos per size (default 6)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per photo and mode; the best counts")
    parser.add_argument("--baseline", help="git revision whose engine is measured alongside, e.g. main")
    parser.add_argument(
        "--write-doc", action="store_true", help=f"write the section into {DOC.relative_to(ROOT)}"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve_as_worker(args.repeats)
        return
    with tempfile.TemporaryDirectory(prefix="engine-speed-") as scratch:
        sources = {"this tree": ROOT / "src"}
        if args.baseline:
            sources[f"baseline {args.baseline}"] = extract_source(args.baseline, Path(scratch) / "baseline")
        load_before = os.getloadavg()
        timings = run(sources, args, Path(scratch))
        load_after = os.getloadavg()
    report = render(timings, list(sources), args, load_before, load_after)
    print(report)
    if args.write_doc:
        write_doc(report)
        print(f"wrote {DOC}", file=sys.stderr)


def run(sources: dict[str, Path], args: argparse.Namespace, scratch: Path) -> list[Timing]:
    """Render each photo once, then have every version's worker matte it, in turn."""
    from removebg_provider.samples import make_product_photo

    workers = {name: _start_worker(src, args.repeats) for name, src in sources.items()}
    timings: list[Timing] = []
    try:
        for megapixels in args.sizes:
            width = round(math.sqrt(megapixels * 1e6 * 4 / 3))
            height = round(megapixels * 1e6 / width)
            for index in range(args.photos):
                seed = FIRST_SEED + index
                photo = make_product_photo(seed, width, height, BACKGROUNDS[index % len(BACKGROUNDS)])
                path = scratch / f"{seed}-{width}x{height}.npz"
                np.savez(path, rgb=photo.rgb, alpha=photo.alpha)
                for name, worker in workers.items():
                    timings += [
                        Timing(
                            name,
                            megapixels,
                            str(r["mode"]),
                            *(float(r[k]) for k in ("wall", "cpu", "iou", "mae")),
                        )
                        for r in _ask(worker, path)
                    ]
                path.unlink()
                print(
                    f"\r{megapixels:g} MP: {index + 1}/{args.photos} photos",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
            print(file=sys.stderr)
    finally:
        for worker in workers.values():
            if worker.stdin:
                worker.stdin.close()
            worker.wait(timeout=60)
    return timings


def _start_worker(src: Path, repeats: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", "--repeats", str(repeats)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _ask(worker: subprocess.Popen[str], path: Path) -> list[dict[str, float | str]]:
    assert worker.stdin
    assert worker.stdout
    worker.stdin.write(f"{path}\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"an engine worker exited (code {worker.wait()}); see its error output above")
    results: list[dict[str, float | str]] = json.loads(line)
    return results


def serve_as_worker(repeats: int) -> None:
    """Read photo paths from stdin; for each, answer one JSON line with every mode's best run."""
    from removebg_provider.engines import get_engine
    from removebg_provider.samples import make_product_photo

    cv2.setNumThreads(1)
    engine = get_engine("classic")
    # First calls pay for lazy imports and allocator warm-up: not part of any image's time.
    for mode in MODES:
        engine.matte(make_product_photo(0, 160, 120).rgb, mode)  # type: ignore[arg-type]
    for line in sys.stdin:
        stored = np.load(line.strip())
        rgb, truth = stored["rgb"], stored["alpha"]
        results = []
        for mode in MODES:
            best = (math.inf, 0.0)
            for _ in range(repeats):
                wall, cpu = time.perf_counter(), time.process_time()
                alpha = engine.matte(rgb, mode)  # type: ignore[arg-type]
                best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
            pred, gt = alpha >= 128, truth >= 128
            union = np.count_nonzero(pred | gt)
            results.append(
                {
                    "mode": mode,
                    "wall": best[0],
                    "cpu": best[1],
                    "iou": np.count_nonzero(pred & gt) / union if union else 1.0,
                    "mae": float(np.mean(np.abs(alpha.astype(np.float32) - truth))) / 255,
                }
            )
        print(json.dumps(results), flush=True)


def render(
    timings: list[Timing],
    versions: list[str],
    args: argparse.Namespace,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    """The 'Engine speed' section of docs/BENCHMARKS.md, in Markdown."""
    command = "PYTHONPATH=src .venv/bin/python benchmarks/engine_speed.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    lines = [
        SECTION,
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {_machine()}; one thread per engine (cv2.setNumThreads(1), OMP/OPENBLAS/MKL threads = 1). "
        f"Load average {', '.join(f'{x:.2f}' for x in load_before)} before the run, "
        f"{', '.join(f'{x:.2f}' for x in load_after)} after (2 cores, shared with other jobs).",
        "",
        f"{args.photos} photos per size from `removebg_provider.samples` (seeds {FIRST_SEED}.."
        f"{FIRST_SEED + args.photos - 1}, 4:3, backgrounds in turn); each version in its own process, "
        f"fed the same photos in turn; per photo the best wall time of {args.repeats} runs, and the CPU "
        "seconds of that run. Seconds per image: median over the photos (max in brackets).",
        "",
        "| mode | MP | version | s per image (wall) | s per image (CPU) | mean IoU | alpha MAE "
        "| goal at 1 MP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        for megapixels in args.sizes:
            for version in versions:
                rows = [
                    t
                    for t in timings
                    if t.mode == mode and t.megapixels == megapixels and t.version == version
                ]
                wall = float(np.median([t.wall for t in rows]))
                goal = ""
                if megapixels == 1.0 and version == versions[0]:
                    goal = f"<= {GOALS[mode]} s: {'met' if wall <= GOALS[mode] else '**missed**'}"
                lines.append(
                    f"| {mode} | {megapixels:g} | {version} | {wall:.3f} ({max(t.wall for t in rows):.3f}) "
                    f"| {float(np.median([t.cpu for t in rows])):.3f} | {np.mean([t.iou for t in rows]):.4f} "
                    f"| {np.mean([t.mae for t in rows]):.4f} | {goal} |"
                )
    return "\n".join(lines) + "\n"


def write_doc(section: str) -> None:
    """Replace (or add, after the engine quality notes) the 'Engine speed' section."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{SECTION}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    elif "\n## Pipeline throughput" in text:
        text = text.replace("\n## Pipeline throughput", f"\n{section}\n## Pipeline throughput", 1)
    else:
        text = text.rstrip() + "\n\n" + section
    DOC.write_text(text.rstrip() + "\n")


def _machine() -> str:
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        match = re.search(r"^Model name:\s*(.+)$", out, re.M)
        model = match.group(1).strip() if match else model
    except (OSError, subprocess.CalledProcessError):
        pass
    return (
        f"{model}, {os.cpu_count()} logical cores, Python {platform.python_version()}, "
        f"OpenCV {cv2.__version__}, {time.strftime('%Y-%m-%d')}"
    )


if __name__ == "__main__":
    main()
