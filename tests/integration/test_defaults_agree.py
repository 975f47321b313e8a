"""`removebg run` at its defaults against `removebg serve` at its defaults: no row is refused as busy.

Both are real processes, as a user starts them; the server's own /stats says whether it ever refused
a request (429) and how many records it billed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import requests
from PIL import Image

from support.serve_process import REPO, TOKEN, serve_process
from support.servers import sample_photo

# Enough rows that the run keeps every one of its default request slots full for a while.
_ROWS = 400


def _manifest(folder: Path) -> str:
    photo = Image.open(io.BytesIO(sample_photo(32, 32))).convert("RGB")
    paths = []
    for index in range(_ROWS):
        photo.putpixel((0, 0), (index % 256, index // 256, 0))
        path = folder / f"p{index:04d}.png"
        photo.save(path, "PNG")
        paths.append(str(path))
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table({"image_url": paths}), manifest)
    return str(manifest)


def test_a_run_at_the_cli_defaults_against_the_server_at_its_defaults_is_never_refused_as_busy(
    tmp_path: Path,
) -> None:
    manifest = _manifest(tmp_path)
    out = tmp_path / "enriched.parquet"
    with serve_process() as server:
        command = [sys.executable, "-m", "removebg_provider", "run", "--endpoint", server.base_url]
        outputs = ["--output-prefix", str(tmp_path / "cutouts"), "--output-manifest", str(out)]
        done = subprocess.run(
            [*command, "--no-progress", manifest, *outputs],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO / "src"), "REMOVEBG_API_TOKEN": TOKEN},
            timeout=1800,
            check=False,
        )
        stats = requests.get(f"{server.base_url}/stats", headers=server.headers, timeout=30).json()

    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["succeeded"] == _ROWS
    assert (stats["requests_rejected"], stats["records_billed"]) == (0, _ROWS)
