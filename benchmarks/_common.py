"""Shared benchmark parts: a fake Ximilar-compatible API in its own process, manifests, machine facts.

The fake API answers `POST /removebg/{mode}/removebg` after `--latency` seconds (an asyncio sleep, so
any number of requests wait at once) with one output per record, served by `GET /files/{name}`: a real
RGBA cutout PNG of `--cutout` pixels (a rendered product on a transparent background, so the quality
check decodes it as it would the API's), padded to `--output-bytes` with a private ancillary chunk
when it encodes smaller. It runs in a separate process so its CPU is not counted as ours;
`FakeApi.cpu_seconds` reads that CPU, to tell the machine's share from ours.

Serve it by hand: `python benchmarks/_common.py --port 8790 --latency 1.4 --output-bytes 200 --cutout 64x48`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import os
import platform
import random
import socket
import subprocess
import sys
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import requests
from PIL import Image

from removebg_provider.samples import make_product_photo

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
SECTION = "## Pipeline throughput"
SECTION_INTRO = (
    "Our own code around the API: how close to the API's limit it runs, what it costs per record, "
    "and how it scales to a million rows. Each figure comes with the command that produced it; rerun "
    "them on your machine to compare."
)


@dataclass(frozen=True)
class FakeApi:
    """A running fake API process."""

    base_url: str
    latency: float
    output_bytes: int
    cutout: tuple[int, int]
    pid: int

    def stats(self) -> dict[str, float]:
        """Requests and records billed; after a request, `first_request_at` and `last_answer_at` (Unix)."""
        counters: dict[str, float] = requests.get(f"{self.base_url}/stats", timeout=10).json()
        return counters

    def cpu_seconds(self) -> float:
        """User + system CPU the fake API process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def fake_api(latency: float, output_bytes: int, cutout: tuple[int, int] = (64, 48)) -> Iterator[FakeApi]:
    """Start the fake API in a subprocess on a free 127.0.0.1 port; stop it after the block."""
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--port",
            str(port),
            "--latency",
            str(latency),
            "--output-bytes",
            str(output_bytes),
            "--cutout",
            f"{cutout[0]}x{cutout[1]}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    api = FakeApi(f"http://127.0.0.1:{port}", latency, output_bytes, cutout, process.pid)
    try:
        _wait_healthy(api.base_url, process)
        yield api
    finally:
        process.terminate()
        process.wait(timeout=10)


def random_photos(folder: Path, rows: int) -> list[str]:
    """`rows` files of 2 KiB of random bytes in a new `folder`, each a distinct image to the store."""
    folder.mkdir(parents=True)
    paths = []
    for index in range(rows):
        path = folder / f"p{index:07d}.jpg"
        path.write_bytes(random.randbytes(2048))
        paths.append(str(path))
    return paths


def url_manifest(path: Path, rows: int, extra_columns: bool = True) -> str:
    """A Parquet manifest of `rows` CDN-style image URLs (the fake API never fetches them)."""
    columns: dict[str, list[object]] = {
        "sku": [f"SKU-{index:08d}" for index in range(rows)],
        "image_url": [f"https://cdn.example.test/catalog/{index:08d}/front.jpg" for index in range(rows)],
    }
    if extra_columns:
        columns["title"] = [f"Product {index}" for index in range(rows)]
        columns["price"] = [float(index % 1000) + 0.99 for index in range(rows)]
    pq.write_table(pa.table(columns), path)
    return str(path)


def cutout_png(width: int, height: int, size: int = 0) -> bytes:
    """A real RGBA cutout PNG of a rendered product, padded to `size` bytes if it encodes smaller."""
    photo = make_product_photo(0, width, height, background="white", product="mug")
    rgb = np.where(photo.alpha[..., None] > 0, photo.rgb, 0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([rgb, photo.alpha])).save(buffer, "PNG")
    png = buffer.getvalue()
    padding = size - len(png) - 12
    if padding <= 0:
        return png
    # A private, ancillary, safe-to-copy chunk: every decoder skips it.
    kind, body = b"paDd", b"\0" * padding
    chunk = len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
    return png[:-12] + chunk + png[-12:]


def extract_source(revision: str, target: Path) -> Path:
    """The `src` tree of a git revision, unpacked under `target`: the "before" of a same-run comparison."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "src"],
        capture_output=True,
        check=True,
    ).stdout
    target.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target / "src"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, to read every measurement against."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def machine() -> str:
    """CPU model, core count, Python and date: the line every result carries."""
    model = "unknown CPU"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    return (
        f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}"
    )


def write_subsection(title: str, body: str) -> None:
    """Put `### title` + `body` under the "Pipeline throughput" section of docs/BENCHMARKS.md.

    Other sections (the engine's) and the other subsections are kept; this one is replaced in place.
    """
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{SECTION_INTRO}\n"
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end == -1 else end + 1
    parts = [part.strip("\n") for part in text[start:end].split("\n### ")]
    block = f"{title}\n\n{body.strip()}"
    titles = [part.split("\n", 1)[0].strip() for part in parts]
    if title in titles[1:]:
        parts[titles.index(title, 1)] = block
    else:
        parts.append(block)
    DOC.write_text(text[:start] + "\n\n### ".join(parts) + "\n" + ("\n" + text[end:] if text[end:] else ""))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(base_url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"the fake API exited: {process.stderr.read().decode() if process.stderr else ''}"
            )
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{base_url}/stats", timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"the fake API at {base_url} did not start")


def _serve(port: int, latency: float, output_bytes: int, cutout: tuple[int, int]) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    output = cutout_png(*cutout, size=output_bytes)
    counters: dict[str, float] = {"requests": 0, "records_billed": 0}

    async def removebg(request: Request) -> JSONResponse:
        body = await request.json()
        # Wall-clock times, so a benchmark can tell its process's start-up and wind-down from the API's.
        counters.setdefault("first_request_at", time.time())
        counters["requests"] += 1
        counters["records_billed"] += len(body["records"])
        await asyncio.sleep(latency)
        counters["last_answer_at"] = time.time()
        base = str(request.base_url).rstrip("/")
        records = [
            {
                "_id": record["_id"],
                "_status": {"code": 200, "text": "OK", "request_id": "bench"},
                "_output_url": f"{base}/files/{index}.png",
                "_width": 800,
                "_height": 600,
            }
            for index, record in enumerate(body["records"])
        ]
        return JSONResponse(
            {"records": records, "status": {"code": 200, "text": "OK", "request_id": "bench"}}
        )

    async def files(_request: Request) -> Response:
        return Response(output, media_type="image/png")

    async def stats(_request: Request) -> JSONResponse:
        return JSONResponse(counters)

    app = Starlette(
        routes=[
            Route("/removebg/{mode}/removebg", removebg, methods=["POST"]),
            Route("/files/{name}", files),
            Route("/stats", stats),
        ]
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=1.4)
    parser.add_argument("--output-bytes", type=int, default=200)
    parser.add_argument("--cutout", default="64x48", help="cutout pixels, WIDTHxHEIGHT")
    arguments = parser.parse_args()
    width, height = (int(side) for side in arguments.cutout.split("x"))
    _serve(arguments.port, arguments.latency, arguments.output_bytes, (width, height))
