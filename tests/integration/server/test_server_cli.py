"""`removebg serve` documents its options and refuses to expose an unauthenticated server."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from removebg_provider.cli import main
from support import REPO_ROOT
from support.serve_process import TOKEN, serve_process
from support.servers import sample_photo_base64

REPO = REPO_ROOT
OPTIONS = [
    "--host",
    "--port",
    "--token",
    "--storage",
    "--public-url",
    "--engine",
    "--model",
    "--workers",
    "--ttl-hours",
    "--max-records",
    "--allow-private-urls",
    "--queue-records",
    "--max-body-mb",
    "--max-image-mb",
    "--max-megapixels",
    "--fetch-timeout",
    "--max-megapixels-in-flight",
    "--max-connections",
    "--header-timeout",
    "--body-timeout",
    "--keep-alive",
]


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])

    text = capsys.readouterr().out
    assert exited.value.code == 0
    assert "REMOVEBG_SERVER_TOKEN" in text
    for option in OPTIONS:
        assert re.search(rf"{option}\b.*\n\s+\S", text), f"{option} is not documented"


def test_binding_a_public_address_without_a_token_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("REMOVEBG_SERVER_TOKEN", raising=False)

    code = main(["serve", "--host", "0.0.0.0", "--storage", str(tmp_path)])

    assert code == 2
    assert "without a token" in caplog.text


def test_invalid_settings_exit_with_a_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = main(["serve", "--token", "t", "--workers", "0", "--storage", str(tmp_path)])

    assert code == 2
    assert "workers must be positive" in caplog.text


def test_serve_runs_with_the_token_from_the_environment(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "REMOVEBG_SERVER_TOKEN": "env-token", "PYTHONPATH": str(REPO / "src")}
    entry_point = "import sys; from removebg_provider.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", entry_point, "serve", "--port", str(port), "--storage", str(tmp_path)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        health = _wait_for_health(process, f"http://127.0.0.1:{port}", {"Authorization": "Token env-token"})
        stats = requests.post(f"http://127.0.0.1:{port}/stats/reset", timeout=10)
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)

    assert health.status_code == 200
    assert stats.status_code == 401
    assert b"env-token" not in output


def test_serve_logs_a_localhost_url_the_official_client_uses_without_calling_ximilar() -> None:
    from ximilar.client import RemoveBGClient

    with serve_process() as server:  # binds 127.0.0.1, the default
        logged = server.wait_for_log(r"serving the Remove Background API on (\S+) ")
        uvicorn_line = server.wait_for_log(r"Uvicorn running on (\S+) ")
        assert logged is not None
        assert uvicorn_line is not None
        port = server.base_url.rsplit(":", 1)[1]
        # With a URL naming 127.0.0.1 the official client would first post the token to
        # api.ximilar.com; this sandbox has no route there, so the call below would fail.
        client = RemoveBGClient(token=TOKEN, endpoint=logged.group(1))
        result = client.removebg_fast([{"_base64": sample_photo_base64(), "_id": "a"}])

    assert logged.group(1) == f"http://localhost:{port}/"
    assert uvicorn_line.group(1) == f"http://localhost:{port}"
    assert result["records"][0]["_status"]["code"] == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_health(
    process: subprocess.Popen[bytes], base_url: str, headers: dict[str, str]
) -> requests.Response:
    deadline = time.monotonic() + 60
    while True:
        try:
            return requests.get(f"{base_url}/health", headers=headers, timeout=2)
        except requests.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
