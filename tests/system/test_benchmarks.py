"""The benchmark scripts still run against the current code, at toy sizes (their figures are not judged)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO_ROOT

ROOT = REPO_ROOT

# Each script with arguments small enough for a test, and a line its report always prints.
# Goal verdicts at these sizes mean nothing, so a script may exit 1 ("goal missed"), never crash.
TOY_RUNS = {
    "scale.py": (["--rows", "2000"], "goal peak RSS <= 1 GiB"),
    "throughput.py": (["--latency", "0.05", "--rounds", "1", "--naive-rows", "2"], "naive loop:"),
    "overhead.py": (["--rows", "200"], "CPU ms/record"),
    "engine_quality.py": (["--count", "2", "--quick"], "| precise |"),
    "engine_speed.py": (
        ["--sizes", "0.05", "--photos", "1", "--repeats", "1", "--baseline", "HEAD"],
        "| precise | 0.05 | baseline HEAD |",
    ),
    "quality_cost.py": (["--repeats", "1"], "12 MP PNG with alpha"),
    "onnx_cost.py": (
        ["--families", "bria", "--sizes", "0.25", "--repeats", "1"],
        "| bria-rmbg (shapes only) |",
    ),
    "result_store.py": (["--rows", "200", "--objects", "100"], "'day2_billed':"),
    "store_scale.py": (["--rows", "500"], "plan + lookup + merge:"),
    "store_on_s3.py": (["--rows", "20", "--baseline", "HEAD", "--repeats", "1"], "day 2, baseline HEAD:"),
    "end_to_end.py": (
        ["--latency", "0.05", "--concurrency", "2", "--lengths", "0.2", "--baseline", "HEAD"],
        "| baseline HEAD |",
    ),
    "cli_startup.py": (["--repeats", "1"], "| `removebg --help` |"),
    "server_attacks.py": (["memory", "--megapixels", "0.3", "--requests", "1", "--records", "2"], "peak RSS"),
}


@pytest.mark.parametrize("script", sorted(TOY_RUNS))
def test_benchmark_script_runs_against_the_current_code(script: str, tmp_path: Path) -> None:
    arguments, report_line = TOY_RUNS[script]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TMPDIR": str(tmp_path)}

    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *arguments],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )

    assert done.returncode in (0, 1), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert report_line in done.stdout
