"""The pipeline under a flaky API, a killed worker and a flaky store: no row lost, nothing paid twice.

Real parts throughout: the local API server under uvicorn, the fault proxy (tests/support/faults.py) as a real
HTTP server in front of it, real files, and `removebg run` as a subprocess for the kill test. The
only injected fault that is not real I/O is the failing store (see `_FlakyStorage`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow.parquet as pq
import pytest

from removebg_provider import pipeline
from removebg_provider.client import RetryPolicy
from removebg_provider.errors import StorageError
from removebg_provider.outputs import looks_like_image
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus
from support.faults import ANSWERED, FaultRates, start_fault_proxy
from support.runs import distinct_photos_manifest, pipeline_config, run_through
from support.servers import LocalApiServer, start_api_server

_FAST_RETRIES = RetryPolicy(max_retries=4, backoff_base=0.01, backoff_cap=0.05, deadline=240)
# Under 20% faults, one retry lets a few requests fail for good: rows for the rerun to finish.
_ONE_RETRY = RetryPolicy(max_retries=1, backoff_base=0.01, backoff_cap=0.05, deadline=240)
# The read timeout leaves a wide margin over an ordinary answer of the local server (a batch of ten
# 32x32 photos) even on an overloaded machine: at a load average of 14 on 2 cores one took 18 s.
# An injected `slow` answer comes after it.
_READ_TIMEOUT = 30.0
_SLOW_ANSWER = _READ_TIMEOUT + 2.0
_BATCH = 10
_CONCURRENCY = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    # The queue holds every record the pipeline can have in flight, so the server itself never sheds
    # load with a 429: every 429 in these tests is one the proxy injected and counted.
    with start_api_server(tmp_path_factory.mktemp("server"), queue_records=4 * _CONCURRENCY * _BATCH) as s:
        yield s


def _rows(config: pipeline.PipelineConfig) -> list[dict[str, Any]]:
    return pq.read_table(config.output_manifest_uri).to_pylist()


def _failed_ids(config: pipeline.PipelineConfig) -> set[str]:
    return {row["sku"] for row in _rows(config) if row["removebg_status_code"] != 200}


def _assert_every_ok_row_has_its_image(config: pipeline.PipelineConfig) -> None:
    for row in _rows(config):
        if row["removebg_status_code"] == 200:
            assert looks_like_image(Path(row["removebg_output_url"]).read_bytes(), "png"), row["sku"]
        else:
            assert row["removebg_output_url"] is None, row["sku"]


@dataclass
class _FaultedRun:
    ids: list[str]
    config: pipeline.PipelineConfig
    faults: dict[str, int]
    rows_first: list[dict[str, Any]]
    billed_first: int
    forwarded_records_first: int
    rebilled_first: int
    rebills_first: dict[str, int]
    slowest_answer_first: float
    forwarded_first: set[str]
    billed_rerun: int = 0
    forwarded_rerun: dict[str, int] = field(default_factory=dict)

    @property
    def failed_first(self) -> set[str]:
        return {row["sku"] for row in self.rows_first if row["removebg_status_code"] != 200}


@pytest.fixture(scope="module")
def faulted(server: LocalApiServer, tmp_path_factory: pytest.TempPathFactory) -> _FaultedRun:
    """2,000 rows through a 20% request fault rate and 3% expired downloads, then a fault-free rerun."""
    folder = tmp_path_factory.mktemp("faulted")
    manifest, ids = distinct_photos_manifest(folder, 2000)
    config = pipeline_config(folder, manifest, settings=_FAULT_RUN)
    rates = FaultRates.uniform(0.20, expired_download=0.03, slow_seconds=_SLOW_ANSWER, retry_after="0.1")
    server.reset_stats()
    with start_fault_proxy(server.base_url, rates, seed=20) as proxy:
        run_through(proxy.base_url, server.token, config, **(_FAULT_CLIENT | {"retry_policy": _ONE_RETRY}))
        run = _FaultedRun(
            ids=ids,
            config=config,
            faults=dict(proxy.counters.faults),
            rows_first=_rows(config),
            billed_first=server.stats()["records_billed"],
            forwarded_records_first=proxy.counters.forwarded_records,
            rebilled_first=proxy.counters.rebilled_records,
            rebills_first=dict(proxy.counters.rebills),
            slowest_answer_first=proxy.counters.slowest_answer_seconds,
            forwarded_first=set(proxy.counters.forwarded_ids),
        )
        proxy.set_rates(FaultRates())
        proxy.reset_counters()
        server.reset_stats()
        run_through(proxy.base_url, server.token, config, **_FAULT_CLIENT)
        run.billed_rerun = server.stats()["records_billed"]
        run.forwarded_rerun = dict(proxy.counters.forwarded_ids)
    return run


def test_faults_of_every_kind_were_injected(faulted: _FaultedRun) -> None:
    kinds = {"server_error", "rate_limited", "reset_before", "slow", "truncated", "reset_after"}
    assert kinds | {"expired_download"} <= set(faulted.faults)


def test_under_faults_every_row_appears_exactly_once_with_a_final_status(faulted: _FaultedRun) -> None:
    rows = faulted.rows_first

    assert [row["sku"] for row in rows] == faulted.ids
    assert all(row["removebg_status_code"] is not None for row in rows)
    assert RowStatus.NOT_PROCESSED not in {row["removebg_status_code"] for row in rows}


def test_under_faults_the_bill_is_rows_plus_only_the_retries_that_faults_after_forwarding_forced(
    faulted: _FaultedRun,
) -> None:
    """Billed records = distinct rows sent + re-bills, and every re-bill was forced by a fault.

    A fault before forwarding (5xx, 429, reset) never reaches the API: it bills nothing. A fault after
    forwarding (truncated body, reset, answer past the client timeout) comes after the server billed
    the request's records, so the client's retry bills them once more. The proxy counts each re-bill
    from the server's side with the fate of the earlier forwarding; `answered` would be a re-bill of
    a record whose answer was delivered intact (the client's read timeout fired first): real money
    against the real API, and none may happen.
    """
    sent = len(faulted.forwarded_first)
    forced = {reason: count for reason, count in faulted.rebills_first.items() if reason != ANSWERED}

    assert sent == len(faulted.ids)
    assert faulted.billed_first == faulted.forwarded_records_first
    assert faulted.billed_first == sent + sum(faulted.rebills_first.values())
    assert faulted.rebills_first.get(ANSWERED, 0) == 0, (
        f"re-bills {faulted.rebills_first}; slowest answer {faulted.slowest_answer_first:.1f}s "
        f"against a {_READ_TIMEOUT}s read timeout"
    )
    assert 0 < sum(forced.values()) <= faulted.rebilled_first


def test_under_faults_a_row_is_never_marked_done_without_its_image(faulted: _FaultedRun) -> None:
    for row in faulted.rows_first:
        if row["removebg_status_code"] == 200:
            assert looks_like_image(Path(row["removebg_output_url"]).read_bytes(), "png"), row["sku"]
        else:
            assert row["removebg_output_url"] is None, row["sku"]


def test_under_faults_an_output_url_answering_404_is_retried_or_requested_again_not_failed(
    faulted: _FaultedRun,
) -> None:
    codes = {row["removebg_status_code"] for row in faulted.rows_first}

    assert faulted.faults["expired_download"] > 0
    assert codes <= {200, RowStatus.API_UNAVAILABLE}


def test_a_rerun_after_faults_sends_exactly_the_rows_that_failed(faulted: _FaultedRun) -> None:
    assert faulted.failed_first, "the faults left no failed row to retry; lower the retries"
    assert set(faulted.forwarded_rerun) == faulted.failed_first
    assert all(count == 1 for count in faulted.forwarded_rerun.values())
    assert faulted.billed_rerun == len(faulted.failed_first)


def test_a_rerun_after_faults_completes_every_row(faulted: _FaultedRun) -> None:
    assert _failed_ids(faulted.config) == set()
    _assert_every_ok_row_has_its_image(faulted.config)


# --- a worker killed with SIGKILL -------------------------------------------------------------------


def _checkpointed_ok_ids(config: pipeline.PipelineConfig) -> set[str]:
    """Ids the durable checkpoints record as succeeded or answered: what a rerun must never send again.

    Final checkpoints (`ckpt-*`) hold finished rows; answer checkpoints (`answer-*`) hold the API's
    answer for a batch, written before its request slot is released and before any output is copied.
    """
    done: set[str] = set()
    for pattern in ("shard-*/ckpt-*.jsonl", "shard-*/answer-*.jsonl"):
        for path in Path(config.staging, "checkpoints").glob(pattern):
            for line in path.read_text().splitlines()[1:]:
                result = json.loads(line)
                if 200 <= result["status_code"] < 300:
                    done.add(result["id"])
    return done


# Ids in a column, shards of 500, and no failure policy: the faults decide which rows fail.
_FAULT_RUN = {
    "id_column": "sku",
    "shard_size": 500,
    "max_records_per_request": _BATCH,
    "concurrency": _CONCURRENCY,
    "max_failed_fraction": 1.0,
}
_FAULT_CLIENT: dict[str, Any] = {"timeout": (5.0, _READ_TIMEOUT), "retry_policy": _FAST_RETRIES}


def _removebg_run(base_url: str, token: str, config: pipeline.PipelineConfig) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "removebg_provider",
            "run",
            config.manifest_uri,
            "--output-prefix",
            config.output_prefix,
            "--output-manifest",
            config.output_manifest_uri,
            "--id-column",
            "sku",
            "--endpoint",
            base_url,
            "--batch-size",
            str(_BATCH),
            "--concurrency",
            str(_CONCURRENCY),
            "--shard-size",
            str(config.shard_size),
            "--max-failed-fraction",
            "1",
            "--no-progress",
        ],
        env={**os.environ, "REMOVEBG_API_TOKEN": token},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_billed(server: LocalApiServer, process: subprocess.Popen[str], threshold: int) -> None:
    deadline = time.monotonic() + 120
    while server.stats()["records_billed"] < threshold:
        if process.poll() is not None:
            pytest.fail(f"the run ended before the kill: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail("the run billed too slowly to be killed mid-way")
        time.sleep(0.005)


def test_a_run_killed_with_sigkill_resumes_without_billing_any_checkpointed_record_again(
    server: LocalApiServer, tmp_path: Path
) -> None:
    """Billed over both runs <= rows + concurrency x batch size.

    A batch's API answer is checkpointed before its request slot is released, and there are
    `concurrency` slots (shared by the shards processed side by side), so only the records of the
    requests in flight at the kill (at most concurrency x batch) can be billed without being durable;
    only those can be billed again. A record whose answer or success was checkpointed before the kill
    is never sent again: the rerun copies an answered record's outputs from the stored URLs.
    """
    rows = 400
    manifest, ids = distinct_photos_manifest(tmp_path, rows)
    config = pipeline_config(tmp_path, manifest, shard_size=100, settings=_FAULT_RUN)
    assert server.token is not None
    server.reset_stats()
    # A slower API (50 ms a request) keeps the run going long enough to be killed in the middle.
    with start_fault_proxy(server.base_url, FaultRates(latency=0.05)) as proxy:
        process = _removebg_run(proxy.base_url, server.token, config)
        try:
            _wait_for_billed(server, process, rows // 3)
        finally:
            process.send_signal(signal.SIGKILL)
            process.communicate(timeout=30)
        # Requests in flight at the kill still reach the server; count them with the killed run.
        proxy.wait_idle()
        done_before_kill = _checkpointed_ok_ids(config)
        forwarded_before_kill = proxy.counters.forwarded_ids
        proxy.reset_counters()

        rerun = _removebg_run(proxy.base_url, server.token, config)
        stdout, stderr = rerun.communicate(timeout=300)

    assert process.returncode == -signal.SIGKILL
    assert rerun.returncode == 0, stderr[-2000:]
    assert json.loads(stdout)["succeeded"] == rows
    assert 0 < len(done_before_kill) < rows
    assert not done_before_kill & set(proxy.counters.forwarded_ids)
    assert set(forwarded_before_kill) | set(proxy.counters.forwarded_ids) == set(ids)
    billed = server.stats()["records_billed"]
    assert billed == sum(forwarded_before_kill.values()) + sum(proxy.counters.forwarded_ids.values())
    assert billed <= rows + _CONCURRENCY * _BATCH
    _assert_every_ok_row_has_its_image(config)


# --- a flaky store ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FlakyStorage(Storage):
    """Local storage whose writes under `flaky_prefix` fail with OSError at a seeded rate.

    This is the one injected fault that is not real I/O: a real disk or bucket cannot be made to
    fail on demand, so the failure is raised where the real one would surface, in `atomic_writer`.
    """

    flaky_prefix: str = ""
    failure_rate: float = 0.0
    seed: int = 0
    failures: list[str] = field(default_factory=list, compare=False)
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rng", random.Random(self.seed))

    @contextmanager
    def atomic_writer(self, uri: str, *, size: int | None = None) -> Iterator[IO[bytes]]:
        if uri.startswith(self.flaky_prefix) and self._rng.random() < self.failure_rate:
            self.failures.append(uri)
            raise OSError(28, "No space left on device (injected)", uri)
        with super().atomic_writer(uri, size=size) as stream:
            yield stream


def test_failed_output_writes_are_retried_or_reported_507_and_never_marked_done(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest, ids = distinct_photos_manifest(tmp_path, 200)
    config = pipeline_config(tmp_path, manifest, settings=_FAULT_RUN)
    storage = _FlakyStorage(
        flaky_prefix=config.output_prefix + "/sku-", failure_rate=0.4, seed=3, write_attempts=2
    )

    run_through(server.base_url, server.token, config, storage, **_FAULT_CLIENT)

    codes = [row["removebg_status_code"] for row in _rows(config)]
    assert [row["sku"] for row in _rows(config)] == ids
    assert set(codes) == {200, 507}
    _assert_every_ok_row_has_its_image(config)


def test_rows_reported_507_succeed_on_a_rerun_with_a_healthy_store(
    server: LocalApiServer, tmp_path: Path
) -> None:
    manifest, _ = distinct_photos_manifest(tmp_path, 100)
    config = pipeline_config(tmp_path, manifest, settings=_FAULT_RUN)
    flaky = _FlakyStorage(
        flaky_prefix=config.output_prefix + "/sku-", failure_rate=0.5, seed=4, write_attempts=1
    )
    run_through(server.base_url, server.token, config, flaky, **_FAULT_CLIENT)
    failed = _failed_ids(config)
    server.reset_stats()

    run_through(server.base_url, server.token, config, **_FAULT_CLIENT)

    assert failed
    assert server.stats()["records_billed"] == len(failed)
    assert _failed_ids(config) == set()


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_a_rerun_finishes_it(
    server: LocalApiServer, tmp_path: Path
) -> None:
    """A checkpoint write that fails (after its retries) stops the run with a StorageError naming the
    object. Only a failed answer checkpoint leaves a batch billed but not durable, so the rerun bills
    that batch's records again; after a failed final checkpoint the rerun copies the outputs from the
    stored answer and bills nothing."""
    manifest, ids = distinct_photos_manifest(tmp_path, 100)
    config = pipeline_config(tmp_path, manifest, concurrency=1, settings=_FAULT_RUN)
    flaky = _FlakyStorage(
        flaky_prefix=config.staging + "/checkpoints/", failure_rate=0.3, seed=5, write_attempts=1
    )
    server.reset_stats()

    with pytest.raises(StorageError, match="checkpoints/shard-"):
        run_through(server.base_url, server.token, config, flaky, **_FAULT_CLIENT)
    summary = run_through(server.base_url, server.token, config, **_FAULT_CLIENT)

    failed_answers = [uri for uri in flaky.failures if "/answer-" in uri]
    assert summary.succeeded == len(ids)
    assert server.stats()["records_billed"] <= len(ids) + len(failed_answers) * _BATCH
