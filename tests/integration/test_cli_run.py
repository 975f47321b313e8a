"""`removebg run` as a user runs it: a subprocess against the real local API server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from removebg_provider.client import DEFAULT_CONCURRENCY, DEFAULT_MAX_RECORDS_PER_REQUEST
from removebg_provider.vocabulary import DEFAULT_MODE
from support.faults import FaultRates, start_fault_proxy
from support.servers import LocalApiServer, sample_photo, start_api_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server"), token="cli-secret-token") as running:
        yield running


def _manifest(folder: Path, references: list[str | None]) -> str:
    path = folder / "manifest.parquet"
    pq.write_table(pa.table({"image_url": references}), path)
    return str(path)


def _photos(folder: Path, count: int) -> list[str | None]:
    paths: list[str | None] = []
    for index in range(count):
        path = folder / f"p{index}.png"
        path.write_bytes(sample_photo(48 + index, 40))
        paths.append(str(path))
    return paths


def _removebg(
    server: LocalApiServer, *args: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REMOVEBG_API_TOKEN": token or server.token or ""}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "removebg_provider",
            "run",
            "--endpoint",
            server.base_url,
            "--no-progress",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_run_exits_zero_and_prints_the_summary(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _photos(tmp_path, 3))
    out = tmp_path / "enriched.parquet"

    done = _removebg(
        server, manifest, "--output-prefix", str(tmp_path / "cutouts"), "--output-manifest", str(out)
    )

    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["rows"], summary["succeeded"], summary["output_manifest_uri"]) == (3, 3, str(out))
    assert pq.read_table(out).num_rows == 3


def test_no_quality_check_leaves_the_quality_columns_empty(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _photos(tmp_path, 2))
    out = tmp_path / "enriched.parquet"

    done = _removebg(
        server,
        manifest,
        "--output-prefix",
        str(tmp_path / "cutouts"),
        "--output-manifest",
        str(out),
        "--no-quality-check",
    )

    assert done.returncode == 0, done.stderr
    assert pq.read_table(out).column("removebg_foreground_fraction").to_pylist() == [None, None]


def test_run_exits_one_when_more_rows_fail_than_allowed(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, [*_photos(tmp_path, 1), None])

    done = _removebg(
        server,
        manifest,
        "--output-prefix",
        str(tmp_path / "c"),
        "--output-manifest",
        str(tmp_path / "e.csv"),
        "--max-failed-fraction",
        "0.1",
    )

    assert done.returncode == 1
    assert "1 of 2 rows failed" in done.stderr
    assert (tmp_path / "e.csv").is_file()


def test_dry_run_reports_billable_records_and_sends_nothing(server: LocalApiServer, tmp_path: Path) -> None:
    server.reset_stats()
    photos = _photos(tmp_path, 4)
    manifest = _manifest(tmp_path, [*photos, photos[0]])

    done = _removebg(
        server,
        manifest,
        "--output-prefix",
        str(tmp_path / "c"),
        "--output-manifest",
        str(tmp_path / "e.parquet"),
        "--dry-run",
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["billable"] == 4
    assert server.stats()["records_billed"] == 0


def test_budget_overrun_exits_three_without_billing(server: LocalApiServer, tmp_path: Path) -> None:
    server.reset_stats()
    manifest = _manifest(tmp_path, _photos(tmp_path, 3))

    done = _removebg(
        server,
        manifest,
        "--output-prefix",
        str(tmp_path / "c"),
        "--output-manifest",
        str(tmp_path / "e.parquet"),
        "--max-billable-records",
        "2",
    )

    assert done.returncode == 3
    assert "max_billable_records=2" in done.stderr
    assert server.stats()["records_billed"] == 0


def test_a_wrong_token_exits_four_and_never_prints_the_token(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _photos(tmp_path, 1))

    done = _removebg(
        server,
        manifest,
        "--output-prefix",
        str(tmp_path / "c"),
        "--output-manifest",
        str(tmp_path / "e.parquet"),
        token="wrong-token-value",
    )

    assert done.returncode == 4
    assert server.base_url in done.stderr
    assert "wrong-token-value" not in done.stdout + done.stderr
    assert "connection" not in done.stderr.lower()


def test_a_missing_column_exits_two_naming_the_manifest(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _photos(tmp_path, 1))

    done = _removebg(
        server,
        manifest,
        "--output-prefix",
        str(tmp_path / "c"),
        "--output-manifest",
        str(tmp_path / "e.parquet"),
        "--image-column",
        "photo",
    )

    assert done.returncode == 2
    assert f"{manifest} has no column 'photo'" in done.stderr


def test_help_documents_every_option() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "removebg_provider", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )

    for option in (
        "--output-prefix",
        "--output-manifest",
        "--endpoint",
        "--mode",
        "--image-column",
        "--id-column",
        "--batch-size",
        "--concurrency",
        "--binary-mask",
        "--white-background",
        "--image-format",
        "--resume",
        "--skip-existing",
        "--no-cache",
        "--cache-prefix",
        "--fingerprint-column",
        "--dry-run",
        "--max-billable-records",
        "--max-failed-fraction",
        "--no-quality-check",
        "REMOVEBG_API_TOKEN",
    ):
        assert option in done.stdout


@pytest.mark.parametrize("command", ["run", "check"])
def test_help_shows_the_api_defaults_without_speaking_of_airflow_connections(command: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "removebg_provider", command, "--help"],
        capture_output=True,
        text=True,
        check=True,
    )

    text = " ".join(done.stdout.split())
    assert "connection" not in text.lower()
    assert f"API endpoint (default: {DEFAULT_MODE})" in text
    assert f"records per API request (default: {DEFAULT_MAX_RECORDS_PER_REQUEST})" in text
    assert f"API requests in flight (default: {DEFAULT_CONCURRENCY})" in text


def _day(server: LocalApiServer, folder: Path, photos: list[str | None], name: str, *flags: str) -> int:
    """One `removebg run` of `photos` as manifest `name` into `folder`'s prefix: the records it billed."""
    manifest = folder / f"{name}.parquet"
    pq.write_table(pa.table({"image_url": photos}), manifest)
    server.reset_stats()
    done = _removebg(
        server,
        str(manifest),
        "--output-prefix",
        str(folder / "cutouts"),
        "--output-manifest",
        str(folder / f"{name}.enriched.parquet"),
        *flags,
    )
    assert done.returncode == 0, done.stderr
    return int(server.stats()["records_billed"])


def test_a_second_day_bills_only_its_new_image(server: LocalApiServer, tmp_path: Path) -> None:
    photos = _photos(tmp_path, 4)
    _day(server, tmp_path, photos[:3], "monday")

    billed = _day(server, tmp_path, photos, "tuesday")

    assert billed == 1


def test_a_second_day_bills_exactly_its_changed_and_new_images_and_shows_no_stale_cutout(
    server: LocalApiServer, tmp_path: Path
) -> None:
    photos = _photos(tmp_path, 4)
    _day(server, tmp_path, photos[:3], "monday")
    Path(str(photos[1])).write_bytes(sample_photo(90, 40))

    billed = _day(server, tmp_path, photos, "tuesday")

    rows = pq.read_table(tmp_path / "tuesday.enriched.parquet").to_pylist()
    assert billed == 2
    assert [Image.open(row["removebg_output_url"]).width for row in rows] == [48, 90, 50, 51]


def test_repeating_a_day_bills_nothing(server: LocalApiServer, tmp_path: Path) -> None:
    photos = _photos(tmp_path, 3)
    _day(server, tmp_path, photos, "tuesday")

    billed = _day(server, tmp_path, photos, "tuesday-again")

    assert billed == 0


def test_no_cache_sends_every_image_again(server: LocalApiServer, tmp_path: Path) -> None:
    photos = _photos(tmp_path, 3)
    _day(server, tmp_path, photos, "monday")

    billed = _day(server, tmp_path, photos, "tuesday", "--no-cache")

    assert billed == 3


def test_run_prints_the_json_summary_when_too_many_rows_fail(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, [*_photos(tmp_path, 1), None])
    outputs = ["--output-prefix", str(tmp_path / "c"), "--output-manifest", str(tmp_path / "e.csv")]

    done = _removebg(server, manifest, *outputs, "--max-failed-fraction", "0.1")

    summary = json.loads(done.stdout)
    assert (summary["rows"], summary["failed"], summary["by_status"]) == (2, 1, {"200": 1, "400": 1})


def test_an_api_outage_exits_five_not_one_with_the_summary(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, _photos(tmp_path, 3))
    outputs = ["--output-prefix", str(tmp_path / "c"), "--output-manifest", str(tmp_path / "e.csv")]
    with start_fault_proxy(server.base_url, FaultRates(server_error=1.0)) as proxy:
        outage = LocalApiServer(proxy.base_url, server.token, server.storage_dir)

        done = _removebg(outage, manifest, *outputs, "--max-retries", "0")

    assert done.returncode == 5, done.stderr
    assert json.loads(done.stdout)["by_status"] == {"503": 3}
