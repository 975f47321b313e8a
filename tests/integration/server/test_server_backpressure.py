"""Engine work runs off the event loop on `workers` threads, and a full queue answers 429, not a crash.

These tests need to hold the engine mid-image, which the real engines cannot do on cue, so they use a
gated engine (a stand-in that waits for the test) instead of the classic one.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests

from support.servers import LocalApiServer, sample_photo_base64, start_api_server

WAIT_SECONDS = 30


class GatedEngine:
    """Signals when it starts an image, then holds it until the test opens the gate."""

    name = "gated"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def matte(self, rgb: np.ndarray, mode: str) -> np.ndarray:
        self.entered.set()
        self.gate.wait(timeout=WAIT_SECONDS)
        return np.full(rgb.shape[:2], 255, np.uint8)


class RendezvousEngine:
    """Finishes only when `parties` images are inside the engine at the same time."""

    name = "rendezvous"

    def __init__(self, parties: int) -> None:
        self.barrier = threading.Barrier(parties, timeout=WAIT_SECONDS)

    def matte(self, rgb: np.ndarray, mode: str) -> np.ndarray:
        self.barrier.wait()
        return np.full(rgb.shape[:2], 255, np.uint8)


def post_one(server: LocalApiServer) -> requests.Response:
    return requests.post(
        f"{server.base_url}/removebg/fast/removebg",
        json={"records": [{"_base64": sample_photo_base64()}]},
        headers=server.auth_headers(),
        timeout=60,
    )


def start_blocked_request(
    server: LocalApiServer, engine: GatedEngine, pool: ThreadPoolExecutor
) -> Future[requests.Response]:
    pending = pool.submit(post_one, server)
    assert engine.entered.wait(timeout=WAIT_SECONDS)
    return pending


def test_a_full_queue_answers_429_with_retry_after(tmp_path: Path) -> None:
    engine = GatedEngine()
    settings: dict[str, Any] = {"max_records": 1, "queue_records": 1, "workers": 1, "retry_after_seconds": 7}
    with start_api_server(tmp_path, engine=engine, **settings) as server, ThreadPoolExecutor(1) as pool:
        pending = start_blocked_request(server, engine, pool)
        throttled = post_one(server)
        engine.gate.set()
        first = pending.result(timeout=WAIT_SECONDS)
        stats = server.stats()

    assert throttled.status_code == 429
    assert throttled.headers["Retry-After"] == "7"
    assert throttled.json()["status"]["code"] == 429
    assert first.status_code == 200
    assert stats["records_billed"] == 1
    assert stats["requests_rejected"] == 1


def test_the_queue_admits_again_once_a_batch_finishes(tmp_path: Path) -> None:
    engine = GatedEngine()
    settings: dict[str, Any] = {"max_records": 1, "queue_records": 1, "workers": 1}
    with start_api_server(tmp_path, engine=engine, **settings) as server, ThreadPoolExecutor(1) as pool:
        pending = start_blocked_request(server, engine, pool)
        engine.gate.set()
        pending.result(timeout=WAIT_SECONDS)
        again = post_one(server)

    assert again.status_code == 200


def test_health_answers_while_a_batch_is_in_the_engine(tmp_path: Path) -> None:
    engine = GatedEngine()
    with start_api_server(tmp_path, engine=engine, workers=1) as server, ThreadPoolExecutor(1) as pool:
        pending = start_blocked_request(server, engine, pool)
        health = requests.get(f"{server.base_url}/health", timeout=WAIT_SECONDS)
        engine.gate.set()
        pending.result(timeout=WAIT_SECONDS)

    assert health.status_code == 200
    assert health.json()["queue"]["admitted_records"] == 1


def test_workers_run_records_in_parallel(tmp_path: Path) -> None:
    with start_api_server(tmp_path, engine=RendezvousEngine(parties=2), workers=2) as server:
        body = {"records": [{"_base64": sample_photo_base64()}, {"_base64": sample_photo_base64()}]}
        response = requests.post(
            f"{server.base_url}/removebg/fast/removebg", json=body, headers=server.auth_headers(), timeout=60
        )

    assert [record["_status"]["code"] for record in response.json()["records"]] == [200, 200]
