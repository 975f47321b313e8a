"""Reading and writing manifests: formats, streaming, errors that name the manifest."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from removebg_provider.errors import ManifestError
from removebg_provider.manifest import ManifestWriter, iter_batches, manifest_format, read_schema
from removebg_provider.storage import Storage

STORAGE = Storage()


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/day/manifest.parquet", "parquet"),
        ("/data/m.PQ", "parquet"),
        ("gs://b/m.csv", "csv"),
        ("az://c/m.jsonl", "jsonl"),
        ("https://host/m.ndjson?sig=abc", "jsonl"),
    ],
)
def test_format_follows_the_extension(uri: str, expected: str) -> None:
    assert manifest_format(uri) == expected


def test_an_explicit_format_overrides_the_extension() -> None:
    assert manifest_format("s3://bucket/export", "csv") == "csv"


def test_an_unknown_explicit_format_is_refused() -> None:
    with pytest.raises(ManifestError, match="unknown manifest format 'xlsx'"):
        manifest_format("m.bin", "xlsx")


def test_csv_with_bom_and_embedded_newlines_reads_every_row(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes('\ufeffsku,title,image_url\n1,"two\nlines",a.jpg\n2,plain,b.jpg\n'.encode())

    rows = [row for batch in iter_batches(str(path), STORAGE) for row in batch.to_pylist()]

    assert rows == [
        {"sku": "1", "title": "two\nlines", "image_url": "a.jpg"},
        {"sku": "2", "title": "plain", "image_url": "b.jpg"},
    ]


def test_csv_columns_are_read_as_text_to_keep_leading_zeros(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("sku,image_url\n000123,a.jpg\n")

    batch = next(iter_batches(str(path), STORAGE))

    assert batch.column("sku").to_pylist() == ["000123"]


def test_batches_are_bounded_in_rows(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_url": [f"{i}.jpg" for i in range(1000)]}), path)

    sizes = [batch.num_rows for batch in iter_batches(str(path), STORAGE, batch_rows=300)]

    assert sizes == [300, 300, 300, 100]


def test_only_the_requested_columns_are_read(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_url": ["a"], "blob": [b"x" * 100]}), path)

    batch = next(iter_batches(str(path), STORAGE, columns=["image_url"]))

    assert batch.schema.names == ["image_url"]


def test_json_lines_are_read_with_their_types(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"image_url": "a.jpg", "price": 1.5}\n{"image_url": "b.jpg", "price": 2}\n')

    batch = next(iter_batches(str(path), STORAGE))

    assert batch.column("price").to_pylist() == [1.5, 2.0]


def test_a_missing_manifest_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"cannot read manifest .*absent\.csv"):
        list(iter_batches(str(tmp_path / "absent.csv"), STORAGE))


def test_a_header_only_csv_has_a_schema_and_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("image_url,sku\n")

    assert read_schema(str(path), STORAGE).names == ["image_url", "sku"]
    assert sum(batch.num_rows for batch in iter_batches(str(path), STORAGE)) == 0


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_written_manifests_read_back_identically(tmp_path: Path, suffix: str) -> None:
    table = pa.table({"image_url": ["a.jpg", "b.jpg"], "status": pa.array([200, 422], pa.int32())})
    path = tmp_path / f"out{suffix}"

    with ManifestWriter(str(path), STORAGE, table.schema) as writer:
        for batch in table.to_batches():
            writer.write(batch)

    rows = [row for batch in iter_batches(str(path), STORAGE) for row in batch.to_pylist()]
    assert [(row["image_url"], int(row["status"])) for row in rows] == [("a.jpg", 200), ("b.jpg", 422)]


def test_a_writer_that_fails_midway_leaves_nothing_at_the_uri(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    table = pa.table({"image_url": ["a.jpg"]})

    def write_then_fail() -> None:
        with ManifestWriter(str(path), STORAGE, table.schema) as writer:
            writer.write(table.to_batches()[0])
            raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError):
        write_then_fail()

    assert not path.exists()
    assert list(tmp_path.iterdir()) == []
