"""A catalogue of hostile and broken inputs, each run through the real pipeline and server.

Every input is generated here; nothing is downloaded. docs/RELIABILITY.md tables the same cases with
the behaviour these tests enforce. Image-level cases share one pipeline run (one manifest row per
case, the case name as its id) and are checked one test per case; manifest- and request-level cases
each get their own run.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from removebg_provider import pipeline
from removebg_provider.client import ImageRecord, RemoveBgClient
from removebg_provider.errors import AuthenticationError, ManifestError
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus
from support.runs import pipeline_config, run_pipeline
from support.servers import LocalApiServer, sample_photo, start_api_server

_PIPELINE_MAX_IMAGE_BYTES = 400_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server")) as running:
        yield running


def _encoded(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb() -> bytes:
    """A 100 kB-scale promise in 100 bytes: a PNG header declaring 100,000 x 100,000 pixels."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def _sixty_megapixels() -> bytes:
    """A real, fully decodable 8,000 x 7,500 image (bilevel, so it is cheap to make and small on disk)."""
    return _encoded(Image.new("1", (8000, 7500), 1), "PNG")


def _exif_rotated() -> bytes:
    """Stored 60 wide x 40 high with EXIF orientation 6: the photo is upright at 40 x 60."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(Image.open(io.BytesIO(sample_photo(60, 40))).convert("RGB"), "JPEG", exif=exif)


def _animated_gif() -> bytes:
    frames = [Image.open(io.BytesIO(sample_photo(48, 36))).convert("P") for _ in range(3)]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _sixteen_bit_png() -> bytes:
    ramp = (np.arange(48 * 36, dtype=np.uint32).reshape(36, 48) * 37).astype(np.uint16)
    return _encoded(Image.fromarray(ramp), "PNG")


def _noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return _encoded(Image.fromarray(pixels, "RGB"), "PNG", compress_level=0)


@dataclass(frozen=True)
class ImageCase:
    """One manifest row: an id, a reference (a file made from `data`, or a literal), what must happen."""

    name: str
    status: int
    data: Callable[[], bytes] | None = None
    reference: str | None = None
    record_id: str | None = None
    size: tuple[int, int] | None = None
    suffix: str = ".jpg"


IMAGE_CASES = [
    ImageCase("ordinary_photo", 200, lambda: sample_photo(64, 48, "JPEG"), size=(64, 48)),
    ImageCase("not_an_image", 415, lambda: b"this is a price list, not a picture\n" * 20),
    ImageCase("truncated_jpeg", 415, lambda: sample_photo(64, 48, "JPEG")[:300]),
    ImageCase("sixteen_bit_png", 200, _sixteen_bit_png, size=(48, 36), suffix=".png"),
    ImageCase(
        "cmyk_jpeg",
        200,
        lambda: _encoded(Image.open(io.BytesIO(sample_photo(50, 40))).convert("CMYK"), "JPEG"),
        size=(50, 40),
    ),
    ImageCase("animated_gif", 200, _animated_gif, size=(48, 36), suffix=".gif"),
    ImageCase("exif_rotated_jpeg", 200, _exif_rotated, size=(40, 60)),
    ImageCase("one_pixel_image", 422, lambda: _encoded(Image.new("RGB", (1, 1)), "PNG"), suffix=".png"),
    ImageCase("decompression_bomb", 413, _bomb, suffix=".png"),
    ImageCase("sixty_megapixel_image", 413, _sixty_megapixels, suffix=".png"),
    ImageCase(
        "image_over_the_pipeline_byte_limit",
        RowStatus.UNREADABLE_IMAGE,
        lambda: _noise_png(400),
        suffix=".png",
    ),
    ImageCase("empty_file", RowStatus.UNREADABLE_IMAGE, lambda: b""),
    ImageCase("missing_file", RowStatus.UNREADABLE_IMAGE, reference="{folder}/no-such-photo.jpg"),
    ImageCase("directory_as_image", RowStatus.UNREADABLE_IMAGE, reference="{folder}"),
    ImageCase("null_reference", RowStatus.NO_REFERENCE, reference=None),
    ImageCase("empty_reference", RowStatus.NO_REFERENCE, reference=""),
    ImageCase("whitespace_reference", RowStatus.NO_REFERENCE, reference="   \t "),
    ImageCase("loopback_url_sent_to_the_server", 403, reference="http://127.0.0.1:9/admin.png"),
    ImageCase("cloud_metadata_url_sent_to_the_server", 403, reference="http://169.254.169.254/latest/"),
    ImageCase("private_network_url_sent_to_the_server", 403, reference="http://10.0.0.7/photo.jpg"),
    ImageCase("file_url_of_a_non_image_is_read_locally", 415, reference="file://{folder}/not_an_image.jpg"),
    ImageCase(
        "id_with_dot_dot_segments",
        200,
        lambda: sample_photo(40, 30),
        record_id="../../../etc/cron.d/x",
        size=(40, 30),
    ),
    ImageCase("id_that_is_only_dots", 200, lambda: sample_photo(41, 30), record_id="..", size=(41, 30)),
    ImageCase(
        "id_with_control_characters",
        200,
        lambda: sample_photo(42, 30),
        record_id="line\nbreak\ttab\x00nul",
        size=(42, 30),
    ),
    ImageCase("very_long_id", 200, lambda: sample_photo(43, 30), record_id="x" * 5000, size=(43, 30)),
    ImageCase("absolute_path_id", 200, lambda: sample_photo(44, 30), record_id="/etc/passwd", size=(44, 30)),
]


@dataclass(frozen=True)
class CatalogueRun:
    rows: dict[str, dict[str, Any]]
    output_prefix: Path


@pytest.fixture(scope="module")
def catalogue(server: LocalApiServer, tmp_path_factory: pytest.TempPathFactory) -> CatalogueRun:
    folder = tmp_path_factory.mktemp("hostile")
    ids: list[str] = []
    references: list[str | None] = []
    for case in IMAGE_CASES:
        if case.data is not None:
            path = folder / f"{case.name}{case.suffix}"
            path.write_bytes(case.data())
            reference: str | None = str(path)
        else:
            reference = case.reference.format(folder=folder) if case.reference is not None else None
        ids.append(case.record_id or case.name)
        references.append(reference)
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table({"sku": ids, "image_url": references}), manifest)
    config = pipeline_config(
        folder, str(manifest), max_image_bytes=_PIPELINE_MAX_IMAGE_BYTES, max_failed_fraction=1.0
    )
    run_pipeline(server, config)
    enriched = pq.read_table(config.output_manifest_uri).to_pylist()
    by_case = {case.name: row for case, row in zip(IMAGE_CASES, enriched, strict=True)}
    return CatalogueRun(rows=by_case, output_prefix=Path(config.output_prefix))


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[case.name for case in IMAGE_CASES])
def test_hostile_image_gets_its_documented_row_status(catalogue: CatalogueRun, case: ImageCase) -> None:
    row = catalogue.rows[case.name]

    assert row["removebg_status_code"] == case.status, row["removebg_error"]
    assert (row["removebg_error"] is None) == (case.status == 200)


@pytest.mark.parametrize(
    "case", [c for c in IMAGE_CASES if c.status == 200], ids=[c.name for c in IMAGE_CASES if c.status == 200]
)
def test_accepted_hostile_image_gives_an_upright_cutout_inside_the_output_prefix(
    catalogue: CatalogueRun, case: ImageCase
) -> None:
    row = catalogue.rows[case.name]
    output = Path(row["removebg_output_url"])

    assert output.resolve().parent == catalogue.output_prefix.resolve()
    with Image.open(output) as cutout:
        assert (cutout.mode, cutout.size) == ("RGBA", case.size)
    assert (row["removebg_width"], row["removebg_height"]) == case.size


# --- manifests that cannot be planned --------------------------------------------------------------


def _write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


def _valid_parquet_bytes() -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"image_url": [f"https://cdn.example.test/{i}.jpg" for i in range(500)]}), buffer)
    return buffer.getvalue()


MANIFEST_CASES: dict[str, tuple[str, bytes, str, dict[str, Any]]] = {
    # name: (file name, content, error pattern, config overrides)
    "broken_parquet": ("m.parquet", b"PAR1\x00\x01garbage" * 50, r"cannot read manifest .*m\.parquet", {}),
    "truncated_parquet": (
        "m.parquet",
        _valid_parquet_bytes()[:-200],
        r"cannot read manifest .*m\.parquet",
        {},
    ),
    "zero_byte_csv": ("m.csv", b"", r"cannot read manifest .*m\.csv as csv: Empty CSV file", {}),
    "jsonl_with_a_broken_line": (
        "m.jsonl",
        b'{"image_url": "a.jpg"}\n{"image_url": "b.jpg"\n{"image_url": "c.jpg"}\n',
        r"cannot read manifest .*m\.jsonl",
        {},
    ),
    "csv_without_the_image_column": ("m.csv", b"sku,url\n1,a.jpg\n", r"has no column 'image_url'", {}),
    "duplicate_ids": (
        "m.csv",
        b"sku,image_url\na,1.jpg\nb,2.jpg\na,3.jpg\n",
        r"duplicate ids in column 'sku': 'a'",
        {"id_column": "sku"},
    ),
    "empty_id": (
        "m.csv",
        b"sku,image_url\na,1.jpg\n,2.jpg\n",
        r"row 1 has an empty id",
        {"id_column": "sku"},
    ),
    "ids_that_collide_once_made_safe": (
        "m.csv",
        b"sku,image_url\na/b,1.jpg\na?b,2.jpg\n",
        r"same output key",
        {"id_column": "sku"},
    ),
    "csv_that_is_not_utf8": (
        "m.csv",
        "sku,image_url\ncaf\u00e9,caf\u00e9.jpg\n".encode("latin-1"),
        r"cannot read manifest .*m\.csv",
        {"id_column": "sku"},
    ),
}


@pytest.mark.parametrize("name", list(MANIFEST_CASES))
def test_broken_manifest_is_refused_before_any_request_naming_the_file(
    server: LocalApiServer, tmp_path: Path, name: str
) -> None:
    file_name, content, pattern, overrides = MANIFEST_CASES[name]
    config = pipeline_config(
        tmp_path, _write(tmp_path / file_name, content), **overrides, max_failed_fraction=1.0
    )
    server.reset_stats()

    with pytest.raises(ManifestError, match=pattern):
        run_pipeline(server, config)

    assert server.stats()["requests"] == 0


# --- manifests that are odd but valid --------------------------------------------------------------


def test_csv_with_bom_and_embedded_newlines_runs_every_row(server: LocalApiServer, tmp_path: Path) -> None:
    first, second = tmp_path / "a.jpg", tmp_path / "b.jpg"
    first.write_bytes(sample_photo(40, 30, "JPEG"))
    second.write_bytes(sample_photo(41, 30, "JPEG"))
    text = f'sku,note,image_url\r\n1,"two\nlines, and a comma",{first}\r\n2,"say ""hi""",{second}\r\n'
    config = pipeline_config(
        tmp_path,
        _write(tmp_path / "m.csv", b"\xef\xbb\xbf" + text.encode()),
        id_column="sku",
        max_failed_fraction=1.0,
    )

    run_pipeline(server, config)

    rows = pq.read_table(config.output_manifest_uri).to_pylist()
    assert [(row["sku"], row["note"]) for row in rows] == [
        ("1", "two\nlines, and a comma"),
        ("2", 'say "hi"'),
    ]
    assert [row["removebg_status_code"] for row in rows] == [200, 200]


def test_text_a_spreadsheet_would_run_as_a_formula_is_defused_in_an_enriched_csv(
    server: LocalApiServer, tmp_path: Path
) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes(sample_photo(40, 30, "JPEG"))
    titles = ['=HYPERLINK("https://evil.example","sale")', "@SUM(A1:A9)", "-A12 red", "-5", "+1.5", "plain"]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"title": titles, "image_url": [str(photo)] * len(titles)}), manifest)
    enriched = tmp_path / "enriched.csv"
    config = pipeline_config(tmp_path, str(manifest), output_manifest_uri=str(enriched))

    run_pipeline(server, config)

    written = pa_csv.read_csv(
        enriched, convert_options=pa_csv.ConvertOptions(column_types={"title": pa.string()})
    )
    assert written.column("title").to_pylist() == [
        '\'=HYPERLINK("https://evil.example","sale")',
        "'@SUM(A1:A9)",
        "'-A12 red",
        "-5",
        "+1.5",
        "plain",
    ]


def test_result_columns_already_in_the_input_are_replaced_with_a_warning(
    server: LocalApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    photo = tmp_path / "a.jpg"
    photo.write_bytes(sample_photo(40, 30, "JPEG"))
    manifest = tmp_path / "yesterday-enriched.parquet"
    pq.write_table(pa.table({"image_url": [str(photo)], "removebg_status_code": [504]}), manifest)
    config = pipeline_config(tmp_path, str(manifest))

    with caplog.at_level(logging.WARNING, logger="removebg_provider"):
        run_pipeline(server, config)

    assert pq.read_table(config.output_manifest_uri).column("removebg_status_code").to_pylist() == [200]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("removebg_status_code" in message and str(manifest) in message for message in warnings)


def test_numbers_in_the_image_and_id_columns_are_read_as_text(server: LocalApiServer, tmp_path: Path) -> None:
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"sku": [17, 18], "image_url": [123, 456]}), manifest)
    config = pipeline_config(tmp_path, str(manifest), id_column="sku", max_failed_fraction=1.0)

    run_pipeline(server, config)

    rows = pq.read_table(config.output_manifest_uri).to_pylist()
    assert [row["removebg_status_code"] for row in rows] == [RowStatus.UNREADABLE_IMAGE] * 2
    assert "123" in rows[0]["removebg_error"]


def test_a_reference_with_an_unknown_scheme_fails_only_its_row(
    server: LocalApiServer, tmp_path: Path
) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(sample_photo(40, 30, "JPEG"))
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_url": [str(good), "gopher://catalog.example.test/photo.jpg"]}), manifest)
    config = pipeline_config(tmp_path, str(manifest), max_failed_fraction=1.0)

    run_pipeline(server, config)

    codes = [row["removebg_status_code"] for row in pq.read_table(config.output_manifest_uri).to_pylist()]
    assert codes == [200, RowStatus.UNREADABLE_IMAGE]


# --- requests the server refuses as a whole --------------------------------------------------------


def _oversized_batch_run(tmp_path: Path) -> tuple[list[int], int]:
    """A batch of a small photo and a 120 kB image sent to a server that takes 64 kB bodies."""
    big, small = tmp_path / "big.png", tmp_path / "small.jpg"
    big.write_bytes(_noise_png(200))
    small.write_bytes(sample_photo(40, 30, "JPEG"))
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_url": [str(small), str(big)]}), manifest)
    config = pipeline_config(tmp_path, str(manifest), max_records_per_request=2, max_failed_fraction=1.0)
    with start_api_server(tmp_path / "srv", max_body_bytes=64 * 1024) as small_server:
        run_pipeline(small_server, config)
        billed = small_server.stats()["records_billed"]
    rows = pq.read_table(config.output_manifest_uri).to_pylist()
    return [row["removebg_status_code"] for row in rows], billed


def test_an_oversized_image_fails_alone_with_413_not_its_batch_mates(tmp_path: Path) -> None:
    """A 413 for a batch is retried record by record, so only the oversized image fails."""
    codes, billed = _oversized_batch_run(tmp_path)

    assert codes == [200, 413]
    assert billed == 1


def test_more_records_than_the_server_takes_fail_their_batch_with_400(tmp_path: Path) -> None:
    paths = []
    for index in range(3):
        path = tmp_path / f"p{index}.jpg"
        path.write_bytes(sample_photo(40 + index, 30, "JPEG"))
        paths.append(str(path))
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_url": paths}), manifest)
    config = pipeline_config(tmp_path, str(manifest), max_records_per_request=3, max_failed_fraction=1.0)
    with start_api_server(tmp_path / "srv", max_records=2) as strict_server:
        run_pipeline(strict_server, config)

    rows = pq.read_table(config.output_manifest_uri).to_pylist()
    assert [row["removebg_status_code"] for row in rows] == [400] * 3
    assert "at most 2 per request" in rows[0]["removebg_error"]


def test_a_wrong_token_stops_the_run_before_anything_is_billed(
    server: LocalApiServer, tmp_path: Path
) -> None:
    photo = tmp_path / "p.jpg"
    photo.write_bytes(sample_photo(40, 30, "JPEG"))
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_url": [str(photo), None]}), manifest)
    config = pipeline_config(tmp_path, str(manifest), max_failed_fraction=1.0)
    server.reset_stats()

    with (
        pytest.raises(AuthenticationError, match="refused the token") as refused,
        RemoveBgClient(server.base_url, "wrong-token-4c1d") as client,
    ):
        pipeline.run(config, client, Storage())

    assert "wrong-token-4c1d" not in str(refused.value)
    assert server.stats()["records_billed"] == 0
    assert not os.path.exists(config.output_manifest_uri)


def test_a_file_url_sent_to_the_server_is_refused_for_that_record(server: LocalApiServer) -> None:
    with RemoveBgClient(server.base_url, server.token) as client:
        results = client.remove_batch(
            [
                ImageRecord(id="passwd", url="file:///etc/passwd"),
                ImageRecord(id="ok", data=sample_photo(40, 30)),
            ]
        )

    assert [result.status_code for result in results] == [400, 200]
    assert "not an http(s) URL" in (results[0].error or results[0].status_text)
