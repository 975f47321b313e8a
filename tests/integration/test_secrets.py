"""The API token never appears in logs, exceptions, manifests, outputs, staging files or CLI output.

Each test runs with a distinctive token, captures everything the run leaves behind and searches it.
The fault proxy (tests/support/faults.py) plays an API that echoes the Authorization header in its error
bodies, so the client's redaction is exercised and not only the happy path. XCom is covered by the
Airflow operator tests.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient, RetryPolicy
from removebg_provider.errors import RemoveBgError
from removebg_provider.storage import Storage
from support.faults import FaultProxy, FaultRates, start_fault_proxy
from support.runs import pipeline_config
from support.servers import LocalApiServer, sample_photo, start_api_server

TOKEN = "tok-Zq7-SECRET-9f41c2e8b6"
_QUICK = RetryPolicy(max_retries=2, backoff_base=0.01, backoff_cap=0.02, deadline=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server"), token=TOKEN) as running:
        yield running


@pytest.fixture
def echoing_proxy(server: LocalApiServer) -> Iterator[FaultProxy]:
    """An API that fails 30% of requests with a body quoting the token, and expires 10% of downloads."""
    rates = FaultRates(server_error=0.3, expired_download=0.1, echo_authorization=True, retry_after="0")
    with start_fault_proxy(server.base_url, rates, seed=11) as proxy:
        yield proxy


def _manifest(folder: Path, rows: int) -> str:
    paths = []
    for index in range(rows):
        path = folder / f"photo-{index}.jpg"
        path.write_bytes(sample_photo(40 + index, 32, "JPEG"))
        paths.append(str(path))
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table({"image_url": [*paths, None]}), manifest)
    return str(manifest)


def _files_containing_the_token(folder: Path) -> list[str]:
    found = []
    for path in folder.rglob("*"):
        if path.is_file() and TOKEN.encode() in path.read_bytes():
            found.append(str(path))
    return found


def test_the_echoing_api_really_sends_the_token_back(echoing_proxy: FaultProxy) -> None:
    """Guards the other tests: without a real echo, finding no token would prove nothing."""
    echoing_proxy.set_rates(FaultRates(server_error=1.0, echo_authorization=True))

    response = requests.post(
        f"{echoing_proxy.base_url}/removebg/fast/removebg",
        json={"records": []},
        headers={"Authorization": f"Token {TOKEN}"},
        timeout=10,
    )

    assert response.status_code >= 500
    assert TOKEN in response.text


def test_no_log_record_at_any_level_carries_the_token(
    echoing_proxy: FaultProxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "requests", "removebg_provider", "tenacity"):
        caplog.set_level(logging.DEBUG, logger=name)

    with RemoveBgClient(echoing_proxy.base_url, TOKEN, retry_policy=_QUICK) as client:
        summary = pipeline.run(
            pipeline_config(tmp_path, _manifest(tmp_path, 12), max_failed_fraction=1.0), client, Storage()
        )

    assert echoing_proxy.counters.faults["server_error"] > 0
    assert summary.failed > 0
    assert any(record.name.startswith("urllib3") for record in caplog.records)
    leaked = [record for record in caplog.records if TOKEN in _formatted(record)]
    assert leaked == []


def test_row_errors_quote_the_api_without_its_token(echoing_proxy: FaultProxy, tmp_path: Path) -> None:
    echoing_proxy.set_rates(FaultRates(server_error=1.0, echo_authorization=True))
    config = pipeline_config(tmp_path, _manifest(tmp_path, 12), max_failed_fraction=1.0)

    with RemoveBgClient(echoing_proxy.base_url, TOKEN, retry_policy=_QUICK) as client:
        pipeline.run(config, client, Storage())

    errors = pq.read_table(config.output_manifest_uri).column("removebg_error").to_pylist()
    assert any("injected failure for Token ***" in (error or "") for error in errors)
    assert not any(TOKEN in (error or "") for error in errors)


def test_no_file_the_run_writes_carries_the_token(echoing_proxy: FaultProxy, tmp_path: Path) -> None:
    config = pipeline_config(tmp_path, _manifest(tmp_path, 12), max_failed_fraction=1.0)

    with RemoveBgClient(echoing_proxy.base_url, TOKEN, retry_policy=_QUICK) as client:
        summary = pipeline.run(config, client, Storage())

    assert Path(config.output_manifest_uri).is_file()
    assert any(Path(config.staging).rglob("ckpt-*.jsonl"))
    assert _files_containing_the_token(tmp_path) == []
    assert TOKEN not in str(summary.to_dict())


def test_exceptions_that_stop_a_run_do_not_carry_the_token(echoing_proxy: FaultProxy, tmp_path: Path) -> None:
    echoing_proxy.set_rates(FaultRates())
    wrong = TOKEN[::-1]

    with (
        pytest.raises(RemoveBgError) as stopped,
        RemoveBgClient(echoing_proxy.base_url, wrong, retry_policy=_QUICK) as client,
    ):
        pipeline.run(
            pipeline_config(tmp_path, _manifest(tmp_path, 12), max_failed_fraction=1.0), client, Storage()
        )

    text = "".join(traceback.format_exception(stopped.value))
    assert wrong not in text
    assert TOKEN not in text
    assert wrong not in repr(client)


def test_the_cli_prints_no_token_even_when_verbose(echoing_proxy: FaultProxy, tmp_path: Path) -> None:
    echoing_proxy.set_rates(FaultRates(server_error=0.5, echo_authorization=True, retry_after="0"))
    config = pipeline_config(tmp_path, _manifest(tmp_path, 12), max_failed_fraction=1.0)

    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "removebg_provider",
            "-v",
            "run",
            config.manifest_uri,
            "--output-prefix",
            config.output_prefix,
            "--output-manifest",
            config.output_manifest_uri,
            "--endpoint",
            echoing_proxy.base_url,
            "--batch-size",
            "3",
            "--max-retries",
            "1",
            "--max-failed-fraction",
            "1",
        ],
        env={**os.environ, "REMOVEBG_API_TOKEN": TOKEN},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "DEBUG" in completed.stderr
    assert echoing_proxy.counters.faults["server_error"] > 0
    assert TOKEN not in completed.stdout
    assert TOKEN not in completed.stderr
    assert _files_containing_the_token(tmp_path) == []


def _formatted(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += "".join(traceback.format_exception(*record.exc_info))
    return text
