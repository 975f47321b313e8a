"""Measure the classic engine's matte quality and speed on synthetic photos with exact ground truth.

Run: PYTHONPATH=src .venv/bin/python benchmarks/engine_quality.py [--count 200] [--quick] [--write-doc]
"""

from __future__ import annotations

import os

# One core, pinned before numpy/OpenCV load their thread pools, so ms/MP means "per core".
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from removebg_provider.engines import MODES, Mode, get_engine  # noqa: E402
from removebg_provider.samples import BACKGROUNDS, SamplePhoto, make_product_photo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
PICTURE = ROOT / "docs" / "img" / "engine_worst_cases.png"
GOALS: dict[str, dict[str, float]] = {
    "fast": {"iou": 0.93, "ms_per_mp": 60.0},
    "precise": {"iou": 0.96, "mae": 0.02, "ms_per_mp": 700.0},
}
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3)


@dataclass(frozen=True)
class Case:
    """How one benchmark image is generated."""

    index: int
    seed: int
    width: int
    height: int
    background: str
    jpeg_quality: int | None


@dataclass(frozen=True)
class Score:
    """One engine run on one image."""

    case: Case
    mode: str
    iou: float
    mae: float
    boundary_f: float
    ms: float
    product: str
    material: str
    shadow: bool


def main() -> None:
    """Parse the options, run the benchmark, print (and optionally write) the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200, help="number of synthetic images (default 200)")
    parser.add_argument("--quick", action="store_true", help="small images only (0.3-2 MP), for iterating")
    parser.add_argument("--seed", type=int, default=1000, help="first sample seed")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument(
        "--write-doc", action="store_true", help=f"write the results into {DOC.relative_to(ROOT)}"
    )
    args = parser.parse_args()
    cv2.setNumThreads(1)

    cases = make_cases(args.count, args.seed, max_mp=2.0 if args.quick else 12.0)
    scores, worst = run(cases, args.modes)
    report = render(scores, cases, args)
    print(report)
    if args.write_doc:
        write_picture(worst)
        write_doc(report)
        print(f"wrote {DOC} and {PICTURE}", file=sys.stderr)


def make_cases(count: int, seed: int, max_mp: float) -> list[Case]:
    """A deterministic spread of sizes (log-uniform 0.3 MP to `max_mp`), backgrounds and JPEG artefacts."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        megapixels = math.exp(rng.uniform(math.log(0.3), math.log(max_mp)))
        aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
        width = round(math.sqrt(megapixels * 1e6 * aspect))
        height = round(megapixels * 1e6 / width)
        jpeg = int(rng.integers(55, 92)) if rng.random() < 0.4 else None
        cases.append(Case(i, seed + i, width, height, BACKGROUNDS[i % len(BACKGROUNDS)], jpeg))
    return cases


def run(cases: list[Case], modes: list[str]) -> tuple[list[Score], list[tuple[float, str, np.ndarray]]]:
    """Score every mode on every case; keep thumbnails of the worst results per mode."""
    engine = get_engine("classic")
    scores: list[Score] = []
    worst: list[tuple[float, str, np.ndarray]] = []
    started = time.perf_counter()
    for done, case in enumerate(cases, 1):
        photo = make_product_photo(
            case.seed, case.width, case.height, case.background, jpeg_quality=case.jpeg_quality
        )
        for mode in modes:
            mode_t: Mode = "fast" if mode == "fast" else "precise"
            t0 = time.perf_counter()
            alpha = engine.matte(photo.rgb, mode_t)
            ms = (time.perf_counter() - t0) * 1000
            score = measure(photo, alpha, case, mode, ms)
            scores.append(score)
            worst.append((score.iou, mode, _triptych(photo, alpha)))
            worst.sort(key=lambda item: item[0])
            del worst[8:]
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (len(cases) - done)
        print(
            f"\r{done}/{len(cases)} images, {done / elapsed:.2f} img/s, ETA {eta:.0f} s",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    return scores, worst


def measure(photo: SamplePhoto, alpha: np.ndarray, case: Case, mode: str, ms: float) -> Score:
    """IoU at alpha 128, mean absolute alpha error in [0, 1], and boundary F-measure."""
    pred, truth = alpha >= 128, photo.alpha >= 128
    union = np.count_nonzero(pred | truth)
    iou = np.count_nonzero(pred & truth) / union if union else 1.0
    mae = float(np.mean(np.abs(alpha.astype(np.float32) - photo.alpha.astype(np.float32)))) / 255
    return Score(
        case, mode, iou, mae, boundary_f_measure(pred, truth), ms, photo.product, photo.material, photo.shadow
    )


def boundary_f_measure(pred: np.ndarray, truth: np.ndarray) -> float:
    """F-measure of outline pixels matched within 0.8% of the image diagonal (the DAVIS convention)."""
    tolerance = max(1.0, 0.008 * math.hypot(*pred.shape))
    pred_edge, truth_edge = _outline(pred), _outline(truth)
    if not pred_edge.any() and not truth_edge.any():
        return 1.0
    if not pred_edge.any() or not truth_edge.any():
        return 0.0
    to_truth = cv2.distanceTransform((~truth_edge).astype(np.uint8), cv2.DIST_L2, 3)
    to_pred = cv2.distanceTransform((~pred_edge).astype(np.uint8), cv2.DIST_L2, 3)
    precision = float(np.mean(to_truth[pred_edge] <= tolerance))
    recall = float(np.mean(to_pred[truth_edge] <= tolerance))
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _outline(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.uint8)
    return (m - cv2.erode(m, np.ones((3, 3), np.uint8))).astype(bool)


def _triptych(photo: SamplePhoto, alpha: np.ndarray) -> np.ndarray:
    """Input, predicted matte and ground truth side by side, 240 px high."""
    h, w = alpha.shape
    size = (max(1, round(240 * w / h)), 240)
    parts = [
        cv2.resize(photo.rgb, size, interpolation=cv2.INTER_AREA),
        cv2.cvtColor(cv2.resize(alpha, size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2RGB),
        cv2.cvtColor(cv2.resize(photo.alpha, size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2RGB),
    ]
    gap = np.full((240, 4, 3), 255, np.uint8)
    return np.concatenate([parts[0], gap, parts[1], gap, parts[2]], axis=1)


def render(scores: list[Score], cases: list[Case], args: argparse.Namespace) -> str:
    """The 'Engine quality' section of docs/BENCHMARKS.md, in Markdown."""
    total_mp = sum(c.width * c.height for c in cases) / 1e6
    sizes = [c.width * c.height / 1e6 for c in cases]
    command = "PYTHONPATH=src .venv/bin/python benchmarks/engine_quality.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    lines = [
        "## Engine quality",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {_cpu_model()}, {os.cpu_count()} logical cores, Python {platform.python_version()}, "
        f"OpenCV {cv2.__version__}; one thread (cv2.setNumThreads(1), OMP/OPENBLAS/MKL/NUMBA threads = 1). "
        f"Load average when finished: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
        "(the 2 cores were shared with other jobs, so timings are pessimistic).",
        "",
        f"Data: {len(cases)} synthetic studio photos from `removebg_provider.samples` (seeds {args.seed}.."
        f"{args.seed + len(cases) - 1}), {min(sizes):.2f} to {max(sizes):.2f} MP ({total_mp:.0f} MP in all), "
        f"backgrounds {', '.join(BACKGROUNDS)} in equal shares, "
        f"{sum(c.jpeg_quality is not None for c in cases)} with JPEG artefacts (quality 55-91), "
        f"{sum(s.shadow for s in scores if s.mode == scores[0].mode)} with cast shadows.",
        "",
        "| mode | mean IoU | median IoU | IoU >= 0.9 | alpha MAE | boundary F | ms/MP (all pixels) "
        "| ms/MP (median image) | goal | met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in sorted({s.mode for s in scores}, key=list(MODES).index):
        rows = [s for s in scores if s.mode == mode]
        iou = float(np.mean([s.iou for s in rows]))
        median_iou = float(np.median([s.iou for s in rows]))
        good = float(np.mean([s.iou >= 0.9 for s in rows]))
        mae = float(np.mean([s.mae for s in rows]))
        bf = float(np.mean([s.boundary_f for s in rows]))
        ms_mp = sum(s.ms for s in rows) / total_mp
        median = float(np.median([s.ms / (s.case.width * s.case.height / 1e6) for s in rows]))
        goal = GOALS[mode]
        met = iou >= goal["iou"] and mae <= goal.get("mae", 1.0) and ms_mp <= goal["ms_per_mp"]
        goal_text = (
            f"IoU >= {goal['iou']}"
            + (f", MAE <= {goal['mae']}" if "mae" in goal else "")
            + (f", <= {goal['ms_per_mp']:.0f} ms/MP")
        )
        lines.append(
            f"| {mode} | {iou:.4f} | {median_iou:.4f} | {good:.0%} | {mae:.4f} | {bf:.4f} | {ms_mp:.1f} "
            f"| {median:.1f} | {goal_text} | "
            f"{'yes' if met else '**no**'} |"
        )
    lines += [
        "",
        "Mean IoU by group (fast / precise):",
        "",
        "| group | images | " + " | ".join(sorted({s.mode for s in scores}, key=list(MODES).index)) + " |",
        "|---|---|" + "---|" * len({s.mode for s in scores}),
    ]
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        groups[f"background {s.case.background}"][s.mode].append(s.iou)
        groups[f"product {s.product}"][s.mode].append(s.iou)
        groups[f"material {s.material}"][s.mode].append(s.iou)
        groups["with shadow" if s.shadow else "no shadow"][s.mode].append(s.iou)
        groups["JPEG artefacts" if s.case.jpeg_quality else "no JPEG artefacts"][s.mode].append(s.iou)
        groups["< 1 MP" if s.case.width * s.case.height < 1e6 else ">= 1 MP"][s.mode].append(s.iou)
    for name in sorted(groups):
        per_mode = groups[name]
        n = len(next(iter(per_mode.values())))
        values = " | ".join(f"{np.mean(per_mode[m]):.4f}" for m in sorted(per_mode, key=list(MODES).index))
        lines.append(f"| {name} | {n} | {values} |")
    lines += ["", f"Worst cases (input, matte, ground truth): ![worst cases](img/{PICTURE.name})", ""]
    return "\n".join(lines)


def write_picture(worst: list[tuple[float, str, np.ndarray]]) -> None:
    """Stack the worst triptychs into one PNG, each labelled with its mode and IoU."""
    width = max(t.shape[1] for _, _, t in worst)
    rows = []
    for iou, mode, tile in worst:
        row = np.full((240, width, 3), 255, np.uint8)
        row[:, : tile.shape[1]] = tile
        cv2.putText(row, f"{mode} IoU {iou:.3f}", (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 0, 0), 2)
        rows.append(row)
        rows.append(np.full((6, width, 3), 255, np.uint8))
    PICTURE.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(PICTURE), cv2.cvtColor(np.concatenate(rows), cv2.COLOR_RGB2BGR))


def write_doc(section: str) -> None:
    """Replace (or add) the 'Engine quality' section, leaving other sections alone."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
    pattern = re.compile(r"^## Engine quality\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text.rstrip() + "\n")


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    match = re.search(r"^Model name:\s*(.+)$", out, re.M)
    return match.group(1).strip() if match else "unknown CPU"


if __name__ == "__main__":
    main()
