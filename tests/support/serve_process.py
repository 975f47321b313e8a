"""Run `removebg serve` as its own process, for tests that need the command line or the process itself.

    with serve_process("--workers", "2") as server:
        requests.get(f"{server.base_url}/health", headers=server.headers)
        server.status_kib("VmHWM")

Most tests use the in-process server of `servers.py`; this is for what only a separate process shows:
its startup log, its exit code, its own memory.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]
TOKEN = "process-token"
WAIT_SECONDS = 120.0
_ENTRY_POINT = "import sys; from removebg_provider.cli import main; sys.exit(main())"


@dataclass
class ServeProcess:
    """A running `removebg serve`: where it listens, its token header, and what it has logged so far."""

    base_url: str
    process: subprocess.Popen[str]
    headers: dict[str, str]
    log_lines: list[str] = field(default_factory=list)

    def wait_for_log(self, pattern: str) -> re.Match[str] | None:
        """The first log line matching `pattern`, waiting for it as long as the process runs."""
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline:
            for line in list(self.log_lines):
                if match := re.search(pattern, line):
                    return match
            if self.process.poll() is not None:
                return None
            time.sleep(0.05)
        return None

    def status_kib(self, name: str) -> int:
        """A memory field of /proc/<pid>/status (VmRSS, VmHWM...) in KiB."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1])
        raise KeyError(name)


@contextlib.contextmanager
def serve_process(*options: str) -> Iterator[ServeProcess]:
    """Start `removebg serve` on a free port with a token, wait for /health, stop it with Ctrl-C after."""
    port = free_port()
    process = subprocess.Popen(
        serve_command("--port", str(port), *options),
        env=serve_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = ServeProcess(f"http://127.0.0.1:{port}", process, {"Authorization": f"Token {TOKEN}"})
    reader = threading.Thread(target=_collect, args=(process, server.log_lines), daemon=True)
    reader.start()
    try:
        _wait_for_health(server)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=WAIT_SECONDS)


def run_serve_until_exit(*options: str) -> subprocess.CompletedProcess[str] | None:
    """Run `removebg serve`, which is expected to exit on its own; None if it started serving instead."""
    try:
        return subprocess.run(
            serve_command("--port", str(free_port()), *options),
            env=serve_env(),
            capture_output=True,
            text=True,
            timeout=WAIT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None


def serve_command(*options: str) -> list[str]:
    return [sys.executable, "-c", _ENTRY_POINT, "serve", *options]


def serve_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "REMOVEBG_SERVER_TOKEN": TOKEN}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _collect(process: subprocess.Popen[str], lines: list[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)


def _wait_for_health(server: ServeProcess) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"removebg serve exited during startup: {''.join(server.log_lines)[-2000:]}")
        with contextlib.suppress(requests.ConnectionError, requests.Timeout):
            if requests.get(f"{server.base_url}/health", timeout=10).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"removebg serve did not answer /health within {WAIT_SECONDS:.0f} s")
