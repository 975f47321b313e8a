"""Stopping a run: `removebg run` with Ctrl-C or SIGTERM, and the pipeline's stop event without the CLI.

The command line runs as a real process against the real API server behind the fault proxy, which
holds every request after the first two before forwarding it: each run is frozen with exactly
`concurrency` requests in flight when the signal is sent, however busy the machine. The server
bills only what the proxy forwards; the tests count the server's bills and the proxy's forwarded
ids, never time.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.errors import RunStoppedError
from removebg_provider.storage import Storage
from removebg_provider.vocabulary import RowStatus
from support.faults import FaultProxy, FaultRates, start_fault_proxy
from support.runs import CopierKilledBeforeCopying
from support.servers import LocalApiServer, sample_photo, start_api_server

ROWS = 60
BATCH = 2
CONCURRENCY = 2
PASSED_REQUESTS = 2
# Generous: a loaded 2-core machine starts Python, pyarrow and a run slowly.
DEADLINE_SECONDS = 300.0


@dataclass
class StoppedRun:
    """One run stopped by a signal while the proxy held its requests, then its rerun."""

    inputs: list[str]
    returncode: int
    stderr: str
    billed_before_signal: int
    billed_by_run: int
    requests_forwarded: int
    enriched: pa.Table
    rerun_returncode: int
    rerun_stderr: str
    billed_by_rerun: int
    forwarded_ids: Counter[str]
    rerun_enriched: pa.Table


class RunProcess:
    """`removebg run` as a child process whose stderr lines are collected as they come."""

    def __init__(self, endpoint: str, token: str, *args: str) -> None:
        self.process = subprocess.Popen(
            _command(endpoint, *args),
            env={**os.environ, "REMOVEBG_API_TOKEN": token},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def wait_for_stderr(self, pattern: str) -> bool:
        """Whether a stderr line matches `pattern` before the process exits or the deadline passes."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if any(re.search(pattern, line) for line in list(self.lines)):
                return True
            if self.process.poll() is not None:
                self._reader.join(timeout=DEADLINE_SECONDS)
                return any(re.search(pattern, line) for line in self.lines)
            time.sleep(0.05)
        return False

    def wait_until(self, condition: str, check: Callable[[], bool]) -> None:
        """Wait while the process runs until `check()` is true; fail naming `condition` otherwise."""
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not check():
            if self.process.poll() is not None:
                pytest.fail(
                    f"removebg run exited ({self.process.returncode}) before {condition}: {self.stderr()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {condition} within {DEADLINE_SECONDS:.0f} s: {self.stderr()}")
            time.sleep(0.05)

    def finish(self) -> int:
        """The exit code, killing the process if it does not exit within the deadline."""
        try:
            return self.process.wait(timeout=DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"removebg run did not exit within {DEADLINE_SECONDS:.0f} s: {self.stderr()}")
        finally:
            self._reader.join(timeout=DEADLINE_SECONDS)

    def kill(self) -> None:
        """Kill the process if it still runs (a failed test must not leave it billing)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stderr(self) -> str:
        return "".join(self.lines)[-3000:]

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)


def _command(endpoint: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "removebg_provider", "run", "--endpoint", endpoint, "--no-progress", *args]


def _catalog(folder: Path) -> list[str]:
    """The run's arguments for a manifest of ROWS distinct photos, three shards of 20."""
    folder.mkdir()
    paths = []
    for index in range(ROWS):
        path = folder / f"p{index:02d}.png"
        path.write_bytes(sample_photo(48 + index, 40))
        paths.append(str(path))
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table({"image_url": paths}), manifest)
    return [
        str(manifest),
        "--output-prefix",
        str(folder / "cutouts"),
        "--output-manifest",
        str(folder / "enriched.parquet"),
        "--batch-size",
        str(BATCH),
        "--concurrency",
        str(CONCURRENCY),
        "--shard-size",
        "20",
        "--no-report",
        # Longer than any hold: a request timed out in the proxy would be retried and billed twice.
        "--timeout",
        "900",
    ]


def _stop_and_rerun(tmp_path: Path, signum: signal.Signals) -> StoppedRun:
    with (
        start_api_server(tmp_path / "server", token="signal-token") as server,
        start_fault_proxy(server.base_url, FaultRates()) as proxy,
    ):
        arguments = _catalog(tmp_path / "catalog")
        proxy.hold_requests(after=PASSED_REQUESTS)
        run = RunProcess(proxy.base_url, "signal-token", *arguments)
        try:
            billed_before, returncode = _signal_while_held(run, server, proxy, signum)
        except BaseException:
            run.kill()
            raise
        finally:
            proxy.release_held()
        billed_by_run = server.stats()["records_billed"]
        requests_forwarded = proxy.counters.forwarded_requests
        enriched = pq.read_table(tmp_path / "catalog" / "enriched.parquet")
        rerun = subprocess.run(
            _command(proxy.base_url, *arguments),
            env={**os.environ, "REMOVEBG_API_TOKEN": "signal-token"},
            capture_output=True,
            text=True,
            timeout=DEADLINE_SECONDS,
            check=False,
        )
        return StoppedRun(
            returncode=returncode,
            stderr=run.stderr(),
            billed_before_signal=billed_before,
            billed_by_run=billed_by_run,
            inputs=pq.read_table(arguments[0]).column("image_url").to_pylist(),
            requests_forwarded=requests_forwarded,
            enriched=enriched,
            rerun_returncode=rerun.returncode,
            rerun_stderr=rerun.stderr[-3000:],
            billed_by_rerun=server.stats()["records_billed"] - billed_by_run,
            forwarded_ids=Counter(proxy.counters.forwarded_ids),
            rerun_enriched=pq.read_table(tmp_path / "catalog" / "enriched.parquet"),
        )


def _signal_while_held(
    run: RunProcess, server: LocalApiServer, proxy: FaultProxy, signum: signal.Signals
) -> tuple[int, int]:
    """Signal the run once `concurrency` requests wait in the proxy; release them once it has the signal."""
    run.wait_until(f"{CONCURRENCY} requests held in the proxy", lambda: proxy.held_requests >= CONCURRENCY)
    billed_before = server.stats()["records_billed"]
    run.process.send_signal(signum)
    assert run.wait_for_stderr(f"{signum.name} received"), run.stderr()
    proxy.release_held()
    return billed_before, run.finish()


@pytest.fixture(scope="module")
def after_ctrl_c(tmp_path_factory: pytest.TempPathFactory) -> StoppedRun:
    return _stop_and_rerun(tmp_path_factory.mktemp("sigint"), signal.SIGINT)


def test_ctrl_c_sends_no_new_request_only_the_requests_in_flight_finish(after_ctrl_c: StoppedRun) -> None:
    in_flight = CONCURRENCY * BATCH

    assert after_ctrl_c.billed_before_signal == PASSED_REQUESTS * BATCH
    assert after_ctrl_c.billed_by_run == after_ctrl_c.billed_before_signal + in_flight
    assert after_ctrl_c.requests_forwarded == PASSED_REQUESTS + CONCURRENCY


def test_ctrl_c_exits_130(after_ctrl_c: StoppedRun) -> None:
    assert after_ctrl_c.returncode == 130, after_ctrl_c.stderr


def test_a_stopped_run_lists_every_row_once_and_marks_the_rows_not_reached_499(
    after_ctrl_c: StoppedRun,
) -> None:
    table = after_ctrl_c.enriched
    statuses = Counter(table.column("removebg_status_code").to_pylist())
    stopped_texts = {
        text
        for text, code in zip(
            table.column("removebg_status_text").to_pylist(),
            table.column("removebg_status_code").to_pylist(),
            strict=True,
        )
        if code == RowStatus.STOPPED
    }

    assert table.column("image_url").to_pylist() == after_ctrl_c.inputs
    assert statuses == {
        RowStatus.OK: after_ctrl_c.billed_by_run,
        RowStatus.STOPPED: ROWS - after_ctrl_c.billed_by_run,
    }
    assert stopped_texts == {"not processed: the run was stopped"}


def test_a_rerun_after_ctrl_c_bills_exactly_the_rows_not_done(after_ctrl_c: StoppedRun) -> None:
    assert after_ctrl_c.rerun_returncode == 0, after_ctrl_c.rerun_stderr
    assert after_ctrl_c.billed_by_rerun == ROWS - after_ctrl_c.billed_by_run
    assert sorted(after_ctrl_c.forwarded_ids.values()) == [1] * ROWS
    assert after_ctrl_c.rerun_enriched.column("removebg_status_code").to_pylist() == [RowStatus.OK] * ROWS


def test_sigterm_stops_the_run_like_ctrl_c_and_exits_143(tmp_path: Path) -> None:
    stopped = _stop_and_rerun(tmp_path, signal.SIGTERM)

    assert stopped.returncode == 143, stopped.stderr
    assert stopped.billed_by_run == (PASSED_REQUESTS + CONCURRENCY) * BATCH, stopped.stderr
    assert stopped.rerun_returncode == 0, stopped.rerun_stderr
    assert sorted(stopped.forwarded_ids.values()) == [1] * ROWS, stopped.rerun_stderr


def test_a_second_ctrl_c_aborts_without_waiting_for_the_requests_in_flight(tmp_path: Path) -> None:
    with (
        start_api_server(tmp_path / "server", token="signal-token") as server,
        start_fault_proxy(server.base_url, FaultRates()) as proxy,
    ):
        proxy.hold_requests(after=0)
        run = RunProcess(proxy.base_url, "signal-token", *_catalog(tmp_path / "catalog"))
        try:
            run.wait_until("requests held in the proxy", lambda: proxy.held_requests >= CONCURRENCY)
            run.process.send_signal(signal.SIGINT)
            assert run.wait_for_stderr("SIGINT received"), run.stderr()
            run.process.send_signal(signal.SIGINT)
            # The held requests are never answered while the process runs: only an abort ends it.
            returncode = run.finish()
        except BaseException:
            run.kill()
            raise
        finally:
            proxy.release_held()

    assert returncode == 130
    assert "SIGINT again: aborting now" in run.stderr()
    assert not (tmp_path / "catalog" / "enriched.parquet").exists()


# The core without the command line: the stop event is the whole interface.


def _photos(folder: Path, count: int) -> list[str]:
    folder.mkdir()
    paths = []
    for index in range(count):
        path = folder / f"p{index}.png"
        path.write_bytes(sample_photo(48 + index, 40))
        paths.append(str(path))
    return paths


def _config(folder: Path, photos: list[str]) -> pipeline.PipelineConfig:
    """One request for all `photos`; outputs and the enriched manifest under `folder`."""
    pq.write_table(pa.table({"image_url": photos}), folder / "manifest.parquet")
    return pipeline.PipelineConfig(
        manifest_uri=str(folder / "manifest.parquet"),
        output_prefix=str(folder / "cutouts"),
        output_manifest_uri=str(folder / "enriched.parquet"),
        max_records_per_request=len(photos),
        report=False,
    )


def test_a_run_whose_stop_is_set_sends_nothing_and_lists_every_row_as_stopped(
    api_server: LocalApiServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, _photos(tmp_path / "photos", 3))
    stop = threading.Event()
    stop.set()

    with (
        RemoveBgClient(api_server.base_url, api_server.token) as client,
        pytest.raises(RunStoppedError) as raised,
    ):
        pipeline.run(config, client, Storage(), stop=stop)

    assert api_server.stats()["records_billed"] == 0
    assert raised.value.summary.by_status == {RowStatus.STOPPED: 3}
    assert _statuses(config) == [RowStatus.STOPPED] * 3


def test_a_stop_keeps_earlier_answers_usable_so_the_rerun_copies_them_without_billing(
    api_server: LocalApiServer, tmp_path: Path
) -> None:
    config = _config(tmp_path, _photos(tmp_path / "photos", 3))
    storage = Storage()
    planned = pipeline.plan(config, storage)
    with RemoveBgClient(api_server.base_url, api_server.token) as client:
        with pytest.raises(KeyboardInterrupt):
            pipeline.process_shard(
                planned.shards[0], planned, client, storage, copier=CopierKilledBeforeCopying(storage)
            )
        stop = threading.Event()
        stop.set()
        with pytest.raises(RunStoppedError):
            pipeline.run(config, client, storage, stop=stop)

        summary = pipeline.run(config, client, storage)

    assert api_server.stats()["records_billed"] == 3
    assert (summary.succeeded, summary.billed_records) == (3, 0)


def _statuses(config: pipeline.PipelineConfig) -> list[int]:
    codes: list[int] = pq.read_table(config.output_manifest_uri).column("removebg_status_code").to_pylist()
    return codes


def _noise_photo(path: Path, seed: int) -> str:
    """About 40 kB of PNG: one fits a 64 kB request body, two do not."""
    pixels = np.random.default_rng(seed).integers(0, 256, (110, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, "PNG")
    return str(path)


def test_a_stop_while_a_refused_batch_is_resent_record_by_record_sends_no_further_record(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path, [_noise_photo(tmp_path / f"noise{seed}.png", seed) for seed in range(2)])
    stop = threading.Event()
    raised: list[BaseException] = []
    with (
        start_api_server(tmp_path / "server", token="split-token", max_body_bytes=64 * 1024) as server,
        start_fault_proxy(server.base_url, FaultRates()) as proxy,
    ):
        # The batch passes (and is refused with 413, unbilled); its first record alone is held.
        proxy.hold_requests(after=1)

        def run() -> None:
            with RemoveBgClient(
                proxy.base_url, "split-token", timeout=(10, 900), max_records_per_request=2
            ) as client:
                try:
                    pipeline.run(config, client, Storage(), stop=stop)
                except RunStoppedError as exc:
                    raised.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        try:
            deadline = time.monotonic() + DEADLINE_SECONDS
            while proxy.held_requests < 1 and time.monotonic() < deadline and worker.is_alive():
                time.sleep(0.05)
            stop.set()
        finally:
            proxy.release_held()
            worker.join(timeout=DEADLINE_SECONDS)
        billed = server.stats()["records_billed"]

    assert [type(exc) for exc in raised] == [RunStoppedError]
    assert billed == 1
    assert _statuses(config) == [RowStatus.OK, RowStatus.STOPPED]
