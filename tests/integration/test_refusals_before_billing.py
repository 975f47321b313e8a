"""A run refuses a manifest it could not finish before billing anything, naming it in one line.

Each case was a traceback (exit 1 from `removebg run`) before, some of them only after every row
had been billed. The pipeline raises ManifestError or ConfigurationError; `removebg run` turns
either into exit 2 with that one line (the last test runs the CLI once to show it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from removebg_provider.errors import ConfigurationError, ManifestError
from removebg_provider.vocabulary import FLAG_SEPARATOR
from support.runs import pipeline_config, run_pipeline
from support.servers import LocalApiServer, sample_photo


def _photo(folder: Path) -> str:
    path = folder / "photo.png"
    path.write_bytes(sample_photo(48, 40))
    return str(path)


def _parquet(folder: Path, table: pa.Table) -> str:
    path = folder / "manifest.parquet"
    pq.write_table(table, path)
    return str(path)


def _repeated_column_parquet(folder: Path) -> str:
    return _parquet(folder, pa.table([pa.array([_photo(folder)]), pa.array(["a"])], names=["image_url"] * 2))


def _repeated_column_csv(folder: Path) -> str:
    path = folder / "manifest.csv"
    path.write_text(f"image_url,title,image_url\n{_photo(folder)},shirt,x\n")
    return str(path)


def _binary_references(folder: Path) -> str:
    return _parquet(folder, pa.table({"image_url": pa.array([b"\xff\xfe\xfa"], pa.binary())}))


def _list_references(folder: Path) -> str:
    return _parquet(folder, pa.table({"image_url": pa.array([[_photo(folder), _photo(folder)]])}))


def _object_references(folder: Path) -> str:
    path = folder / "manifest.jsonl"
    path.write_text(json.dumps({"image_url": {"path": _photo(folder)}}) + "\n")
    return str(path)


BAD_MANIFESTS: dict[str, tuple[Callable[[Path], str], str]] = {
    "a column name used twice in Parquet": (
        _repeated_column_parquet,
        "more than one column named 'image_url'",
    ),
    "a column name used twice in CSV": (_repeated_column_csv, "more than one column named 'image_url'"),
    "image references that are not UTF-8": (_binary_references, "holds values that are not text"),
    "image references that are lists": (_list_references, "holds list<"),
    "image references that are JSON objects": (_object_references, "holds struct<"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_manifest_whose_references_cannot_be_read_is_refused_naming_it(
    case: str, api_server: LocalApiServer, tmp_path: Path
) -> None:
    write, problem = BAD_MANIFESTS[case]
    manifest = write(tmp_path)

    with pytest.raises(ManifestError) as refused:
        run_pipeline(api_server, pipeline_config(tmp_path, manifest))

    assert problem in str(refused.value)
    assert manifest in str(refused.value)
    assert "\n" not in str(refused.value)
    assert api_server.stats()["records_billed"] == 0


@pytest.mark.parametrize(
    ("output_name", "column"),
    [("enriched.csv", "attributes"), ("enriched.csv", "variants"), ("enriched.jsonl", "labels")],
)
def test_an_input_column_the_output_format_cannot_hold_is_refused_before_billing(
    output_name: str, column: str, api_server: LocalApiServer, tmp_path: Path
) -> None:
    table = pa.table(
        {
            "image_url": [_photo(tmp_path)],
            "attributes": pa.array([{"colour": "red"}]),
            "variants": pa.array([[{"size": "M"}]]),
            "labels": pa.array([[("en", "shirt")]], pa.map_(pa.string(), pa.string())),
        }
    )
    manifest = _parquet(tmp_path, table.select(["image_url", column]))
    config = pipeline_config(tmp_path, manifest, output_manifest_uri=str(tmp_path / output_name))

    with pytest.raises(ManifestError) as refused:
        run_pipeline(api_server, config)

    assert f"column {column!r}" in str(refused.value)
    assert output_name in str(refused.value)
    assert api_server.stats()["records_billed"] == 0


def test_a_list_of_plain_values_still_goes_to_a_csv_manifest_joined(
    api_server: LocalApiServer, tmp_path: Path
) -> None:
    manifest = _parquet(tmp_path, pa.table({"image_url": [_photo(tmp_path)], "tags": [["red", "cotton"]]}))
    config = pipeline_config(tmp_path, manifest, output_manifest_uri=str(tmp_path / "enriched.csv"))

    run_pipeline(api_server, config)

    assert f"red{FLAG_SEPARATOR}cotton" in (tmp_path / "enriched.csv").read_text()


def test_an_output_manifest_under_a_file_is_refused_before_billing(
    api_server: LocalApiServer, tmp_path: Path
) -> None:
    """A folder that cannot be made: refused even as root, whom a read-only folder would not stop."""
    manifest = _parquet(tmp_path, pa.table({"image_url": [_photo(tmp_path)]}))
    (tmp_path / "exports").write_text("a file, not a folder")
    output_manifest = str(tmp_path / "exports" / "enriched.parquet")

    with pytest.raises(ManifestError) as refused:
        run_pipeline(api_server, pipeline_config(tmp_path, manifest, output_manifest_uri=output_manifest))

    assert f"cannot write the output manifest {output_manifest}" in str(refused.value)
    assert api_server.stats()["records_billed"] == 0


def test_a_report_sample_of_zero_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="report_sample must be at least 1"):
        pipeline_config("/catalog", "/catalog/manifest.parquet", report_sample=0)


def test_removebg_run_exits_two_with_the_one_line(api_server: LocalApiServer, tmp_path: Path) -> None:
    manifest = _repeated_column_csv(tmp_path)

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "removebg_provider",
            "run",
            manifest,
            "--endpoint",
            api_server.base_url,
            "--output-prefix",
            str(tmp_path / "c"),
            "--output-manifest",
            str(tmp_path / "e.parquet"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "REMOVEBG_API_TOKEN": api_server.token or ""},
        timeout=300,
        check=False,
    )

    errors = [line for line in done.stderr.splitlines() if line.startswith("removebg run: error:")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1, done.stderr
    assert f"manifest {manifest} has more than one column named 'image_url'" in errors[0]
    assert api_server.stats()["records_billed"] == 0
