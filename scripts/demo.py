"""`make demo`: run the catalog DAG end to end on generated photos against the local API server.

Generates synthetic studio product photos under .work/demo, serves some of them over a loopback
HTTP server, starts `removebg serve` on a free port with a demo token, runs
`airflow dags test catalog_remove_background` (SQLite AIRFLOW_HOME in .work/airflow) and prints the
counts, the enriched manifest and where the cutouts are. The servers are stopped on every exit.
Run it again: finished images are resumed from their checkpoints and billed once.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType

import pyarrow.parquet as pq

from removebg_provider.samples import write_sample_photos

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".work"
DEMO_DIR = WORK / "demo"
AIRFLOW_HOME = WORK / "airflow"
BIN = Path(sys.executable).parent
DAG_ID = "catalog_remove_background"
DEMO_TOKEN = "demo-token"
PHOTOS = 24
SEED = 2024
PHOTO_SIZE = (640, 640)
SHARD_SIZE = 8
PHOTO_PORT = 48765
_STARTUP_SECONDS = 60.0


def main() -> int:
    """Run the demo; the exit code is the DAG run's (0 when the run succeeded)."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    ds = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    photos = write_sample_photos(DEMO_DIR / "photos", PHOTOS, seed=SEED, size=PHOTO_SIZE)
    with ExitStack() as servers:
        photo_url = servers.enter_context(_photo_server(DEMO_DIR / "photos"))
        api_url = servers.enter_context(_api_server())
        manifest = _write_manifest(DEMO_DIR / "manifests" / ds / "products.csv", photos, photo_url)
        conf: dict[str, str | int | bool] = {
            "manifest_uri": str(manifest),
            "output_prefix": str(DEMO_DIR / "cutouts" / ds),
            "output_manifest_uri": str(DEMO_DIR / "enriched" / ds / "products.parquet"),
            "shard_size": SHARD_SIZE,
            # Half the photos come from the demo's photo server on 127.0.0.1.
            "allow_private_urls": True,
        }
        code = _run_dag(api_url, ds, conf)
        billed = _json(f"{api_url}/stats", {"Authorization": f"Token {DEMO_TOKEN}"}).get("records_billed")
    _print_result(conf, code, billed)
    return code


def _write_manifest(path: Path, photos: list[Path], photo_url: str) -> Path:
    """Half the rows point at files on disk, half at the photo server; one at a missing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["sku", "title", "image_url"])
        for index, photo in enumerate(photos):
            reference = str(photo) if index % 2 == 0 else f"{photo_url}/{photo.name}"
            writer.writerow([f"SKU-{index:04d}", photo.stem.replace("_", " "), reference])
        # A discontinued product whose photo is gone: the run reports it as a failed row (422).
        writer.writerow(["SKU-9999", "discontinued product", str(photo.parent / "missing.jpg")])
    return path


def _run_dag(api_url: str, ds: str, conf: dict[str, str | int | bool]) -> int:
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "REMOVEBG_DEMO_DIR": str(DEMO_DIR),
        "AIRFLOW_CONN_REMOVEBG_DEFAULT": json.dumps(
            {"conn_type": "removebg", "host": api_url, "password": DEMO_TOKEN}
        ),
    }
    AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
    _step("preparing the Airflow database in .work/airflow")
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    _step(f"airflow dags test {DAG_ID} {ds}")
    command = [str(BIN / "airflow"), "dags", "test", DAG_ID, ds, "-c", json.dumps(conf)]
    log_path = WORK / "demo-dags-test.log"
    with log_path.open("w") as log:
        returncode = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    text = log_path.read_text()
    for line in text.splitlines():
        message = _removebg_message(line)
        if message and (" rows (" in message or message.startswith(("shard ", "run:", "planned "))):
            print("   ", message if len(message) <= 200 else message[:197] + "...")
    print(f"    full log: {log_path}")
    succeeded = f"DagRun Finished: dag_id={DAG_ID}" in text and "state=success" in text
    return returncode or int(not succeeded)


def _removebg_message(line: str) -> str | None:
    """The message of a task-log line written by this package's loggers, without stamp and logger."""
    if "[removebg_provider." not in line or "] " not in line:
        return None
    return line.split("] ", 1)[1].rsplit(" [removebg_provider.", 1)[0].strip()


def _print_result(conf: dict[str, str | int], code: int, billed: int | None) -> None:
    enriched = Path(str(conf["output_manifest_uri"]))
    if not enriched.exists():
        _step(f"the DAG run wrote no enriched manifest (exit {code}); see .work/demo-dags-test.log")
        return
    table = pq.read_table(enriched, columns=["sku", "removebg_status_code", "removebg_error"]).to_pylist()
    statuses = Counter(row["removebg_status_code"] for row in table)
    ok = sum(count for status, count in statuses.items() if 200 <= status < 300)
    _step("done" if code == 0 else f"the DAG run failed (exit {code})")
    print(f"    rows: {len(table)}, succeeded: {ok}, failed: {len(table) - ok}, by status: {dict(statuses)}")
    for row in table:
        if row["removebg_status_code"] >= 300:
            print(f"    failed row {row['sku']}: {row['removebg_error']}")
    print(f"    records billed by the local server this run: {billed}")
    print(f"    enriched manifest: {enriched}")
    print(f"    cutouts: {conf['output_prefix']}")


@contextmanager
def _photo_server(directory: Path) -> Iterator[str]:
    # A stable port keeps the photo URLs, and so the resume fingerprints, the same across runs.
    port = _free_port(PHOTO_PORT)
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    command += ["--directory", str(directory)]
    with _process(command, os.environ.copy(), f"http://127.0.0.1:{port}/", "photo server") as url:
        yield url.rstrip("/")


@contextmanager
def _api_server() -> Iterator[str]:
    port = _free_port()
    command = [
        str(BIN / "removebg"),
        "serve",
        "--port",
        str(port),
        "--allow-private-urls",
        "--storage",
        str(WORK / "server-files"),
    ]
    env = {**os.environ, "REMOVEBG_SERVER_TOKEN": DEMO_TOKEN}
    with _process(command, env, f"http://127.0.0.1:{port}/health", "local API server"):
        yield f"http://localhost:{port}"


@contextmanager
def _process(command: list[str], env: dict[str, str], ready_url: str, name: str) -> Iterator[str]:
    WORK.mkdir(parents=True, exist_ok=True)
    log_path = WORK / f"demo-{name.replace(' ', '-')}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_for(ready_url, process, name, log_path)
            _step(f"{name} started, answering {ready_url}")
            yield ready_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for(url: str, process: subprocess.Popen[bytes], name: str, log_path: Path) -> None:
    deadline = time.monotonic() + _STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {name} exited during startup; see {log_path}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the {name} did not answer {url} within {_STARTUP_SECONDS:.0f} s; see {log_path}")


def _json(url: str, headers: dict[str, str]) -> dict[str, int]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        data: dict[str, int] = json.load(response)
    return data


def _free_port(preferred: int = 0) -> int:
    """`preferred` when it is free, else any free loopback port."""
    for candidate in (preferred, 0):
        with socket.socket() as sock:
            # Like http.server, so a port left in TIME_WAIT by the previous run counts as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port: int = sock.getsockname()[1]
            return port
    raise OSError("no free loopback port")


def _step(message: str) -> None:
    print(f"==> {message}", flush=True)


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds through the `finally` blocks, so the servers stop as on Ctrl-C.
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
