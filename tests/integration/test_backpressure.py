"""A busy API is waited out, not failed: the pipeline behind a proxy that answers "busy, retry later".

Real parts: the local API server under uvicorn, the fault proxy (tests/support/faults.py) in front
of it, real files. The client's sleep and clock are a FakeClock, so "45 s of busy" passes without
waiting; the proxy stops answering busy once the fake clock has moved that far.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from removebg_provider import pipeline
from removebg_provider.client import RemoveBgClient
from removebg_provider.storage import Storage
from support.fake_time import FakeClock
from support.faults import FaultProxy, FaultRates, start_fault_proxy
from support.runs import distinct_photos_manifest, pipeline_config
from support.servers import LocalApiServer, start_api_server

_ROWS = 40
_BATCH = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server")) as s:
        yield s


class _BusyAtFirst:
    """The client's sleep: each wait advances the fake clock; past `busy_for` seconds the API is free."""

    def __init__(self, proxy: FaultProxy, busy_for: float) -> None:
        self.clock = FakeClock()
        self._proxy = proxy
        self._free_at = self.clock.now() + busy_for

    def sleep(self, seconds: float) -> None:
        self.clock.sleep(seconds)
        if self.clock.now() >= self._free_at:
            self._proxy.set_rates(FaultRates())


# Ids in a column, two requests in flight, no failure policy: the statuses are what is checked.
_RUN = {"id_column": "sku", "max_records_per_request": _BATCH, "concurrency": 2, "max_failed_fraction": 1.0}


def _config(folder: Path) -> pipeline.PipelineConfig:
    return pipeline_config(folder, distinct_photos_manifest(folder, _ROWS)[0], settings=_RUN)


def _statuses(config: pipeline.PipelineConfig) -> list[Any]:
    return [row["removebg_status_code"] for row in pq.read_table(config.output_manifest_uri).to_pylist()]


def test_a_run_that_starts_with_45_seconds_of_busy_answers_finishes_every_row(
    server: LocalApiServer, tmp_path: Path
) -> None:
    config = _config(tmp_path)
    with start_fault_proxy(server.base_url, FaultRates(rate_limited=1.0, retry_after="3")) as proxy:
        busy = _BusyAtFirst(proxy, busy_for=45.0)
        with RemoveBgClient(
            proxy.base_url,
            server.token,
            max_records_per_request=_BATCH,
            concurrency=2,
            max_retries=2,
            sleep=busy.sleep,
            clock=busy.clock.now,
        ) as client:
            pipeline.run(config, client, Storage())

    assert proxy.counters.faults["rate_limited"] >= 15
    assert _statuses(config) == [200] * _ROWS
