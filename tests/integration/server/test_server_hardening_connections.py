"""Half-open connections cannot hold the server: they time out, and at the limit they make room."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import requests

from support.servers import LocalApiServer, sample_photo_base64, start_api_server

HALF_OPEN = 300
WAIT_SECONDS = 60.0
PARTIAL_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Never-Ends: "


@contextlib.contextmanager
def half_open_connections(server: LocalApiServer, count: int) -> Iterator[list[socket.socket]]:
    """`count` sockets that each sent part of a request head and then nothing more."""
    address = urlsplit(server.base_url)
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection((address.hostname, address.port), timeout=WAIT_SECONDS)
            sockets.append(sock)
            # The server may already have closed it to make room; that is what is being tested.
            with contextlib.suppress(ConnectionError):
                sock.sendall(PARTIAL_REQUEST)
            sock.setblocking(False)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed `sock` (end of stream or reset); never blocks."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def wait_until_closed(sockets: list[socket.socket], how_many: int) -> int:
    """Wait (with a generous deadline) until at least `how_many` of `sockets` are closed; return the count."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        closed = sum(closed_by_server(sock) for sock in sockets)
        if closed >= how_many or time.monotonic() > deadline:
            return closed
        time.sleep(0.1)


def test_connections_that_never_finish_their_request_head_are_closed_after_the_header_timeout(
    tmp_path: Path,
) -> None:
    with (
        start_api_server(tmp_path, header_timeout_seconds=1.0) as server,
        half_open_connections(server, HALF_OPEN) as sockets,
    ):
        health = requests.get(f"{server.base_url}/health", timeout=WAIT_SECONDS)
        closed = wait_until_closed(sockets, HALF_OPEN)

    assert health.status_code == 200
    assert closed == HALF_OPEN


def test_at_the_connection_limit_a_new_connection_replaces_the_longest_waiting_half_open_one(
    tmp_path: Path,
) -> None:
    limit = 20
    settings: dict[str, Any] = {"max_connections": limit, "header_timeout_seconds": 3600.0}
    with (
        start_api_server(tmp_path, **settings) as server,
        half_open_connections(server, HALF_OPEN) as sockets,
    ):
        health = requests.get(f"{server.base_url}/health", timeout=WAIT_SECONDS)
        closed = wait_until_closed(sockets, HALF_OPEN - limit + 1)
        oldest_closed = all(closed_by_server(sock) for sock in sockets[: HALF_OPEN - limit])

    assert health.status_code == 200
    assert closed == HALF_OPEN - limit + 1
    assert oldest_closed


class GatedEngine:
    """Holds its image until the test opens the gate: the real engines cannot pause on cue."""

    name = "gated"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def matte(self, rgb: np.ndarray, mode: str) -> np.ndarray:
        self.entered.set()
        self.gate.wait(timeout=WAIT_SECONDS)
        return np.full(rgb.shape[:2], 255, np.uint8)


def test_a_request_in_progress_is_never_closed_to_make_room(tmp_path: Path) -> None:
    engine = GatedEngine()
    settings: dict[str, Any] = {"max_connections": 3, "header_timeout_seconds": 3600.0}
    with start_api_server(tmp_path, engine=engine, **settings) as server, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            requests.post,
            f"{server.base_url}/removebg/fast/removebg",
            json={"records": [{"_base64": sample_photo_base64()}]},
            headers=server.auth_headers(),
            timeout=WAIT_SECONDS,
        )
        assert engine.entered.wait(WAIT_SECONDS)
        with half_open_connections(server, 50):
            health = requests.get(f"{server.base_url}/health", timeout=WAIT_SECONDS)
        engine.gate.set()
        answer = pending.result(timeout=WAIT_SECONDS)

    assert health.status_code == 200
    assert answer.status_code == 200
    assert answer.json()["records"][0]["_status"]["code"] == 200


def test_a_request_body_that_never_completes_is_answered_408_and_closed(tmp_path: Path) -> None:
    with start_api_server(tmp_path, body_timeout_seconds=1.0) as server:
        address = urlsplit(server.base_url)
        head = (
            "POST /removebg/fast/removebg HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Token {server.token}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n"
        )
        with socket.create_connection((address.hostname, address.port), timeout=WAIT_SECONDS) as sock:
            sock.sendall(head.encode() + b'{"records": [')
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        stats = server.stats()

    assert answer.startswith(b"HTTP/1.1 408")
    assert b"did not arrive within 1 s" in answer
    assert stats["requests_rejected"] == 1
