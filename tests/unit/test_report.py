"""The visual QA report: tiles, order, embedded images, contact sheet, bounded reading and the CLI."""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import html
import http.server
import io
import json
import math
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from removebg_provider.cli import report as report_cli
from removebg_provider.errors import ManifestError
from removebg_provider.manifest import RESULT_SCHEMA
from removebg_provider.report import (
    FETCH_TIMEOUT_SECONDS,
    HEADER_HEIGHT,
    MAX_IMAGE_BYTES,
    SHEET_COLUMNS,
    TILE_HEIGHT,
    TILE_WIDTH,
    ReportResult,
    build_report,
)
from removebg_provider.samples import make_product_photo
from removebg_provider.storage import Storage

QUALITY_FIELDS = [
    pa.field("removebg_foreground_fraction", pa.float32()),
    pa.field("removebg_quality_flags", pa.list_(pa.string())),
]
_DATA_URI = re.compile(r'src="data:image/(?:jpeg|png);base64,([A-Za-z0-9+/=]+)"')
_FIGURE = re.compile(r'<figure class="[^"]*" data-row="(\d+)" data-group="(\w+)"')


@dataclass(frozen=True)
class Images:
    """One generated product photo on disk: the original JPEG, its RGBA cutout and its mask JPEG."""

    original: Path
    cutout: Path
    mask: Path


@dataclass(frozen=True)
class SpyStorage(Storage):
    """A spy, not a mock: the real Storage, recording every URI it opens."""

    opened: list[str] = field(default_factory=list)

    def open(self, uri: str, mode: str = "rb") -> IO[Any]:
        self.opened.append(uri)
        return super().open(uri, mode)


@pytest.fixture
def images(tmp_path: Path) -> list[Images]:
    out = tmp_path / "images"
    out.mkdir()
    made = []
    for seed in range(3):
        photo = make_product_photo(seed, 240, 180)
        paths = Images(out / f"p{seed}.jpg", out / f"p{seed}.png", out / f"p{seed}.mask.jpg")
        Image.fromarray(photo.rgb).save(paths.original, quality=90)
        Image.fromarray(np.dstack([photo.rgb, photo.alpha]), "RGBA").save(paths.cutout)
        Image.fromarray(photo.alpha).save(paths.mask, quality=90)
        made.append(paths)
    return made


@pytest.fixture
def http_images(images: list[Images]) -> Iterator[str]:
    """A real HTTP server on a free 127.0.0.1 port serving the generated images' folder."""
    handler = functools.partial(_QuietHandler, directory=str(images[0].original.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _row(
    original: str | None,
    status: int = 200,
    cutout: str | None = None,
    *,
    sku: str,
    mask: str | None = None,
    fraction: float | None = 0.4,
    flags: list[str] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    ok = 200 <= status < 300
    return {
        "image_url": original,
        "sku": sku,
        "removebg_status_code": status,
        "removebg_status_text": "OK" if ok else "not processed",
        "removebg_error": error,
        "removebg_output_url": cutout,
        "removebg_output_url_mask": mask,
        "removebg_foreground_fraction": fraction if ok else None,
        "removebg_quality_flags": (flags or []) if ok else [],
    }


def _schema(with_quality: bool = True) -> pa.Schema:
    quality_names = {field.name for field in QUALITY_FIELDS}
    results = [field for field in RESULT_SCHEMA if field.name not in quality_names]
    base = [pa.field("image_url", pa.string()), pa.field("sku", pa.string()), *results]
    return pa.schema(base + (QUALITY_FIELDS if with_quality else []))


def _write_parquet(path: Path, rows: list[dict[str, Any]], with_quality: bool = True) -> str:
    schema = _schema(with_quality)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k in schema.names} for r in rows], schema)
    pq.write_table(table, path)
    return str(path)


@pytest.fixture
def small_run(tmp_path: Path, images: list[Images]) -> list[dict[str, Any]]:
    """Seven rows: three fine, two flagged, two failed (one of them with a missing original)."""
    a, b, c = images
    return [
        _row(str(a.original), 200, str(a.cutout), sku="fine-0"),
        _row(str(b.original), 503, sku="failed-1", error="API unavailable after 5 retries"),
        _row(str(b.original), 200, str(b.cutout), sku="flagged-2", flags=["touches_border"]),
        _row(f"file://{c.original}", 200, str(c.cutout), sku="fine-3"),
        _row(str(c.original), 200, str(c.cutout), sku="flagged-4", fraction=0.001, flags=["empty"]),
        _row(str(tmp_path / "gone.jpg"), 422, sku="failed-5", error="cannot read gone.jpg"),
        _row(str(a.original), 200, str(a.cutout), sku="fine-6", mask=str(a.mask)),
    ]


def _figures(html: str) -> list[tuple[int, str]]:
    return [(int(row), group) for row, group in _FIGURE.findall(html)]


def test_small_manifest_gets_one_tile_per_row(tmp_path: Path, small_run: list[dict[str, Any]]) -> None:
    manifest = _write_parquet(tmp_path / "out.parquet", small_run)

    result = build_report(manifest, Storage(), id_column="sku")

    assert result.tiles == 7
    assert result.rows == 7
    assert len(_figures(Path(result.html_uri).read_text())) == 7


def test_flagged_then_failed_rows_come_first(tmp_path: Path, small_run: list[dict[str, Any]]) -> None:
    manifest = _write_parquet(tmp_path / "out.parquet", small_run)

    result = build_report(manifest, Storage(), id_column="sku")

    assert _figures(Path(result.html_uri).read_text()) == [
        (2, "flagged"),
        (4, "flagged"),
        (1, "failed"),
        (5, "failed"),
        (0, "sample"),
        (3, "sample"),
        (6, "sample"),
    ]


def test_every_embedded_image_decodes(tmp_path: Path, small_run: list[dict[str, Any]]) -> None:
    manifest = _write_parquet(tmp_path / "out.parquet", small_run)

    result = build_report(manifest, Storage(), id_column="sku")

    payloads = _DATA_URI.findall(Path(result.html_uri).read_text())
    assert len(payloads) == 3 * result.tiles
    for payload in payloads:
        with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
            image.load()
            assert image.size[0] > 0


def test_contact_sheet_has_a_grid_of_the_tiles(tmp_path: Path, small_run: list[dict[str, Any]]) -> None:
    manifest = _write_parquet(tmp_path / "out.parquet", small_run)

    result = build_report(manifest, Storage(), id_column="sku")

    with Image.open(result.png_uri) as sheet:
        assert sheet.format == "PNG"
        assert sheet.size == (
            SHEET_COLUMNS * TILE_WIDTH,
            HEADER_HEIGHT + math.ceil(result.tiles / SHEET_COLUMNS) * TILE_HEIGHT,
        )


def test_report_is_written_next_to_the_manifest_by_default(
    tmp_path: Path, small_run: list[dict[str, Any]]
) -> None:
    manifest = _write_parquet(tmp_path / "enriched.parquet", small_run)

    result = build_report(manifest, Storage())

    assert result.html_uri == str(tmp_path / "enriched.report.html")
    assert result.png_uri == str(tmp_path / "enriched.report.png")
    assert Path(result.html_uri).is_file()
    assert Path(result.png_uri).is_file()


def test_out_prefix_names_both_files(tmp_path: Path, small_run: list[dict[str, Any]]) -> None:
    manifest = _write_parquet(tmp_path / "enriched.parquet", small_run)

    result = build_report(manifest, Storage(), out_prefix=f"file://{tmp_path}/qa/run-7")

    assert (tmp_path / "qa" / "run-7.html").is_file()
    assert (tmp_path / "qa" / "run-7.png").is_file()
    assert result.html_uri == f"file://{tmp_path}/qa/run-7.html"


def test_header_counts_rows_by_status_and_flag(tmp_path: Path, small_run: list[dict[str, Any]]) -> None:
    manifest = _write_parquet(tmp_path / "out.parquet", small_run)

    result = build_report(manifest, Storage())

    assert result.by_status == {200: 5, 422: 1, 503: 1}
    assert result.by_flag == {"touches_border": 1, "empty": 1}
    page = Path(result.html_uri).read_text()
    assert "<tr><td>503</td><td>1</td></tr>" in page
    assert "<tr><td>touches_border</td><td>1</td></tr>" in page
    assert "7 rows: 2 failed, 2 flagged, 3 fine" in page


def test_text_from_the_manifest_is_escaped_in_the_page(tmp_path: Path, images: list[Images]) -> None:
    script = '<script>alert("x")</script>'
    rows = [
        _row(str(images[0].original), 200, str(images[0].cutout), sku=f"sku{script}", flags=[f"odd{script}"]),
        _row(
            str(tmp_path / "gone<img src=x onerror=alert(1)>.jpg"), 422, sku="failed", error=f"bad {script}"
        ),
    ]
    manifest = _write_parquet(tmp_path / "run<b>.parquet", rows)

    page = Path(build_report(manifest, Storage(), id_column="sku").html_uri).read_text()

    assert "<script>" not in page
    assert "<img src=x" not in page
    assert "<b>." not in page
    # the id, the flag (in the caption and the table of flags) and the error
    assert page.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") == 4
    assert "gone&lt;img src=x onerror=alert(1)&gt;.jpg" in page
    assert "removebg report: " + html.escape(manifest) in page


def test_histogram_counts_every_known_fraction(tmp_path: Path, small_run: list[dict[str, Any]]) -> None:
    manifest = _write_parquet(tmp_path / "out.parquet", small_run)

    page = Path(build_report(manifest, Storage()).html_uri).read_text()

    assert "foreground fraction (5 rows, 2 without)" in page
    assert "0.40-0.45: 4 rows" in page
    assert "0.00-0.05: 1 rows" in page


def test_unreachable_original_becomes_a_placeholder_that_says_so(
    tmp_path: Path, small_run: list[dict[str, Any]]
) -> None:
    manifest = _write_parquet(tmp_path / "out.parquet", small_run)

    page = Path(build_report(manifest, Storage(), id_column="sku").html_uri).read_text()

    figure = page.split('data-row="5"', 1)[1].split("</figure>", 1)[0]
    assert "original unavailable" in figure
    assert len(_DATA_URI.findall(figure)) == 3


def test_http_originals_on_private_addresses_are_fetched_when_allowed_and_dead_links_become_placeholders(
    tmp_path: Path, images: list[Images], http_images: str
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    rows = [
        _row(f"{http_images}/{images[0].original.name}", 200, str(images[0].cutout), sku="served"),
        _row(f"{http_images}/missing.jpg", 200, str(images[1].cutout), sku="not-found"),
        _row(f"http://127.0.0.1:{closed_port}/x.jpg", 200, str(images[2].cutout), sku="refused"),
    ]
    manifest = _write_parquet(tmp_path / "out.parquet", rows)

    page = _page(build_report(manifest, Storage(), id_column="sku", allow_private_urls=True))

    tiles = _tiles_by_id(page)
    assert "unavailable" not in tiles["served"]
    assert "original unavailable: fetching it failed: the server answered HTTP 404" in tiles["not-found"]
    assert "original unavailable: fetching it failed: cannot connect" in tiles["refused"]


def test_an_http_original_on_a_loopback_address_is_not_fetched_by_default(
    tmp_path: Path, images: list[Images]
) -> None:
    with _image_host(_CountingHandler) as (base_url, requests_seen):
        rows = [_row(f"{base_url}/secret.jpg", 200, str(images[0].cutout), sku="internal")]
        page = _page(build_report(_write_parquet(tmp_path / "out.parquet", rows), Storage(), id_column="sku"))

    assert requests_seen == []
    assert "which is not a public address (allow private URLs for the report to fetch it)" in html.unescape(
        _tiles_by_id(page)["internal"]
    )


def test_an_http_original_that_drips_its_bytes_is_cut_off_at_the_fetch_deadline(
    tmp_path: Path, images: list[Images]
) -> None:
    with _image_host(_DrippingHandler) as (base_url, _):
        rows = [_row(f"{base_url}/slow.jpg", 200, str(images[0].cutout), sku="drip")]
        manifest = _write_parquet(tmp_path / "out.parquet", rows)
        page = _page(build_report(manifest, Storage(), id_column="sku", allow_private_urls=True))

    assert f"took longer than {FETCH_TIMEOUT_SECONDS:g} s" in _tiles_by_id(page)["drip"]


def test_an_http_original_larger_than_the_byte_cap_is_not_read(tmp_path: Path, images: list[Images]) -> None:
    with _image_host(_HugeHandler) as (base_url, _):
        rows = [_row(f"{base_url}/huge.jpg", 200, str(images[0].cutout), sku="huge")]
        manifest = _write_parquet(tmp_path / "out.parquet", rows)
        page = _page(build_report(manifest, Storage(), id_column="sku", allow_private_urls=True))

    assert f"the limit is {MAX_IMAGE_BYTES} bytes" in _tiles_by_id(page)["huge"]


def test_cli_fetches_private_http_originals_only_with_allow_private_urls(
    tmp_path: Path, images: list[Images], http_images: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [_row(f"{http_images}/{images[0].original.name}", 200, str(images[0].cutout), sku="lan")]
    manifest = _write_parquet(tmp_path / "out.parquet", rows)
    pages = {}
    for name, extra in (("default", []), ("allowed", ["--allow-private-urls"])):
        out = str(tmp_path / name)
        args = _cli().parse_args(["report", manifest, "--out", out, "--id-column", "sku", *extra])
        assert args.handler(args) == 0
        pages[name] = Path(json.loads(capsys.readouterr().out)["html"]).read_text()

    assert "original unavailable" in _tiles_by_id(pages["default"])["lan"]
    assert "unavailable" not in _tiles_by_id(pages["allowed"])["lan"]


def test_manifest_without_quality_columns_still_reports(
    tmp_path: Path, small_run: list[dict[str, Any]]
) -> None:
    manifest = _write_parquet(tmp_path / "old.parquet", small_run, with_quality=False)

    result = build_report(manifest, Storage())

    assert result.tiles == 7
    assert result.by_flag == {}
    assert [group for _, group in _figures(Path(result.html_uri).read_text())][:2] == ["failed", "failed"]


def test_csv_manifest_with_joined_flags_reports_them(tmp_path: Path, small_run: list[dict[str, Any]]) -> None:
    for row in small_run:
        row["removebg_quality_flags"] = ";".join(row["removebg_quality_flags"])
    table = pa.Table.from_pylist(small_run)
    pa_csv.write_csv(table, tmp_path / "out.csv")

    result = build_report(str(tmp_path / "out.csv"), Storage(), id_column="sku")

    assert result.by_flag == {"touches_border": 1, "empty": 1}
    assert result.by_status == {200: 5, 422: 1, 503: 1}
    assert [group for _, group in _figures(Path(result.html_uri).read_text())][:2] == ["flagged", "flagged"]


def test_ids_are_derived_like_the_pipeline_when_there_is_no_id_column(
    tmp_path: Path, small_run: list[dict[str, Any]]
) -> None:
    from removebg_provider.manifest import derive_id

    manifest = _write_parquet(tmp_path / "out.parquet", small_run)

    page = Path(build_report(manifest, Storage()).html_uri).read_text()

    assert f"<b>#0 {derive_id(small_run[0]['image_url'], 0)}</b>" in page


def test_failed_and_flagged_rows_share_a_small_sample_evenly(tmp_path: Path, images: list[Images]) -> None:
    a = images[0]
    rows = [_row(str(a.original), 503, sku=f"failed-{i}") for i in range(10)]
    rows += [
        _row(str(a.original), 200, str(a.cutout), sku=f"flagged-{i}", flags=["fragmented"]) for i in range(10)
    ]
    rows += [_row(str(a.original), 200, str(a.cutout), sku=f"fine-{i}") for i in range(10)]
    manifest = _write_parquet(tmp_path / "out.parquet", rows)

    result = build_report(manifest, Storage(), sample=6)

    groups = [group for _, group in _figures(Path(result.html_uri).read_text())]
    assert groups == ["flagged"] * 3 + ["failed"] * 3


def test_same_seed_picks_the_same_sample(tmp_path: Path, images: list[Images]) -> None:
    a = images[0]
    rows = [_row(str(a.original), 200, str(a.cutout), sku=f"fine-{i}") for i in range(40)]
    manifest = _write_parquet(tmp_path / "out.parquet", rows)

    def shown(seed: int, name: str) -> list[tuple[int, str]]:
        out = f"{tmp_path}/{name}"
        return _figures(
            Path(build_report(manifest, Storage(), sample=5, seed=seed, out_prefix=out).html_uri).read_text()
        )

    first, again, other = shown(1, "a"), shown(1, "b"), shown(2, "c")
    assert first == again
    assert first != other


def test_large_manifest_fetches_only_the_shown_tiles_images(tmp_path: Path, images: list[Images]) -> None:
    rows = 200_000
    a, b = images[0], images[1]
    index = np.arange(rows)
    failed = index % 1000 == 7
    flagged = (index % 777 == 5) & ~failed
    status = np.where(failed, 503, 200).astype(np.int32)
    flags = pa.array([["touches_border"] if f else [] for f in flagged], pa.list_(pa.string()))
    table = pa.table(
        {
            "image_url": pa.array(np.where(index % 2 == 0, str(a.original), str(b.original))),
            "removebg_status_code": pa.array(status),
            "removebg_output_url": pa.array([None if f else str(a.cutout) for f in failed], pa.string()),
            "removebg_foreground_fraction": pa.array(
                np.where(failed, np.nan, 0.4), pa.float32(), from_pandas=True
            ),
            "removebg_quality_flags": flags,
        }
    )
    manifest = str(tmp_path / "big.parquet")
    pq.write_table(table, manifest)
    storage = SpyStorage()

    result = build_report(manifest, storage, sample=24)

    groups = [group for _, group in _figures(Path(result.html_uri).read_text())]
    image_reads = [uri for uri in storage.opened if uri != manifest]
    expected = sum(1 if group == "failed" else 2 for group in groups)
    assert result.rows == rows
    assert result.tiles == 24
    assert len(image_reads) == expected
    assert result.by_status == {200: rows - int(failed.sum()), 503: int(failed.sum())}


def test_not_an_enriched_manifest_is_refused_naming_it(tmp_path: Path) -> None:
    manifest = tmp_path / "input.parquet"
    pq.write_table(pa.table({"image_url": ["a.jpg"]}), manifest)

    with pytest.raises(ManifestError, match=r"input\.parquet.*removebg_status_code"):
        build_report(str(manifest), Storage())


def test_cli_prints_the_report_uris(
    tmp_path: Path, small_run: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _write_parquet(tmp_path / "out.parquet", small_run)
    args = _cli().parse_args(["report", manifest, "--out", str(tmp_path / "qa"), "--sample", "3"])

    assert args.handler(args) == 0

    printed = capsys.readouterr().out
    assert f'"html": "{tmp_path}/qa.html"' in printed
    assert f'"png": "{tmp_path}/qa.png"' in printed
    assert '"tiles": 3' in printed


def test_cli_reports_an_unreadable_manifest_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _cli().parse_args(["report", str(tmp_path / "missing.parquet")])

    assert args.handler(args) == 2
    assert "missing.parquet" in capsys.readouterr().err


def test_cli_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _cli().parse_args(["report", "--help"])

    help_text = capsys.readouterr().out
    for option in ("--out", "--sample", "--seed", "--image-column", "--id-column", "--manifest-format"):
        assert option in help_text


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="removebg")
    report_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _page(result: ReportResult) -> str:
    return Path(result.html_uri).read_text()


def _tiles_by_id(page: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r"<b>#\d+ ([\w-]+)</b>.*?</figcaption>", page)}


@contextlib.contextmanager
def _image_host(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on a free 127.0.0.1 port; yields its URL and the paths it was asked for."""
    requests_seen: list[str] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests_seen = requests_seen  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests_seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _CountingHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.requests_seen.append(self.path)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _DrippingHandler(_CountingHandler):
    """Answers 200 and then one byte a second, for longer than the report's fetch deadline."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        for _ in range(int(FETCH_TIMEOUT_SECONDS) * 3):
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return
            time.sleep(1)


class _HugeHandler(_CountingHandler):
    """Declares a body one byte over the report's cap (and never sends it)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(MAX_IMAGE_BYTES + 1))
        self.end_headers()
