"""Measure `removebg serve` under two denial-of-service attacks: pixel bombs and half-open connections.

    python benchmarks/server_attacks.py memory       # 4 parallel requests x 10 PNGs declaring 49 MP
    python benchmarks/server_attacks.py connections  # 2,000 half-open sockets against a 1,024-file limit

Each run starts its own `removebg serve` on a free 127.0.0.1 port with default settings (only the
flags every version has), so the same command measures any checkout (`PYTHONPATH=<checkout>/src`).
`memory` reports the server's resident memory after a warm-up request and its peak (VmHWM from
/proc) over the attack, and how `/health` answered meanwhile; `--kill-above-mb` stops a server that
grows past it, so a measurement cannot take the machine down. `connections` keeps the half-open
sockets open (reopening any the server closes), counts the sockets the server holds, and times
`/health` on fresh connections meanwhile.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
from PIL import Image

TOKEN = "attack-bench"
HEADERS = {"Authorization": f"Token {TOKEN}"}
PARTIAL_REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Never-Ends: "


@dataclass
class Server:
    """A running `removebg serve` process."""

    base_url: str
    process: subprocess.Popen[bytes]

    def status(self, field_name: str) -> int:
        """A /proc/<pid>/status field in KiB (VmRSS, VmHWM) or as a count."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1])
        raise KeyError(field_name)

    def open_sockets(self) -> int:
        count = 0
        for entry in Path(f"/proc/{self.process.pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                count += os.readlink(entry).startswith("socket:")
        return count


@dataclass
class HealthProbes:
    """`/health` answers on fresh connections: latencies of the ones that answered, and failures."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    def probe(self, base_url: str, timeout: float) -> None:
        started = time.perf_counter()
        try:
            ok = requests.get(f"{base_url}/health", timeout=timeout).status_code == 200
        except requests.RequestException:
            ok = False
        if ok:
            self.latencies.append(time.perf_counter() - started)
        else:
            self.failures += 1

    def summary(self) -> str:
        if not self.latencies:
            return f"/health: 0 answered, {self.failures} failed"
        ms = sorted(latency * 1000 for latency in self.latencies)
        return (
            f"/health: {len(ms)} answered, {self.failures} failed; latency median "
            f"{statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    attacks = parser.add_subparsers(dest="attack", required=True)
    memory = attacks.add_parser("memory", help="parallel requests of small PNGs that declare huge images")
    memory.add_argument("--megapixels", type=float, default=49.0, help="pixels each PNG declares")
    memory.add_argument("--requests", type=int, default=4)
    memory.add_argument("--records", type=int, default=10, help="records per request")
    memory.add_argument("--kill-above-mb", type=float, default=10_000.0)
    memory.add_argument("serve_options", nargs="*", help="extra `removebg serve` options, after --")
    connections = attacks.add_parser("connections", help="half-open sockets that never finish a request")
    connections.add_argument("--connections", type=int, default=2000)
    connections.add_argument("--nofile", type=int, default=1024, help="the server's open-file limit")
    connections.add_argument("--seconds", type=float, default=30.0, help="how long the attack lasts")
    connections.add_argument("serve_options", nargs="*", help="extra `removebg serve` options, after --")
    arguments = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if arguments.attack == "memory":
        return _memory_attack(arguments)
    return _connection_attack(arguments)


def _memory_attack(arguments: argparse.Namespace) -> int:
    side = int((arguments.megapixels * 1e6) ** 0.5)
    png = _single_colour_png(side)
    body = json.dumps(
        {
            "records": [
                {"_id": f"bomb-{n}", "_base64": base64.b64encode(png).decode()}
                for n in range(arguments.records)
            ]
        }
    )
    print(
        f"attack: {arguments.requests} parallel requests x {arguments.records} PNGs of {len(png):,} bytes, "
        f"each declaring {side}x{side} = {side * side / 1e6:.1f} MP"
    )
    with _serve(arguments.serve_options) as server:
        _warm_up(server)
        baseline_kib = server.status("VmRSS")
        peak = {"kib": baseline_kib, "killed": False}
        done = threading.Event()
        health = HealthProbes()

        def watch() -> None:
            while not done.wait(0.2):
                with contextlib.suppress(OSError, KeyError):
                    peak["kib"] = max(peak["kib"], server.status("VmRSS"))
                if peak["kib"] > arguments.kill_above_mb * 1024:
                    peak["killed"] = True
                    server.process.kill()
                    return

        def probe_health() -> None:
            while not done.wait(1.0):
                health.probe(server.base_url, timeout=10)

        watchers = [
            threading.Thread(target=watch, daemon=True),
            threading.Thread(target=probe_health, daemon=True),
        ]
        for watcher in watchers:
            watcher.start()
        started = time.monotonic()
        with ThreadPoolExecutor(arguments.requests) as pool:
            answers = list(pool.map(lambda _: _post(server, body), range(arguments.requests)))
        elapsed = time.monotonic() - started
        done.set()
        for watcher in watchers:
            watcher.join()
        high_water = peak["kib"] if peak["killed"] else max(peak["kib"], server.status("VmHWM"))
    codes = sorted({code for answer in answers for code in answer})
    print(f"server RSS after warm-up: {baseline_kib / 1024:.0f} MiB")
    print(
        f"server peak RSS (VmHWM) during the attack: {high_water / 1024:.0f} MiB"
        + (" (killed at the --kill-above-mb limit)" if peak["killed"] else "")
    )
    print(f"attack took {elapsed:.0f} s; record status codes: {codes}")
    print(health.summary())
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


def _connection_attack(arguments: argparse.Namespace) -> int:
    # The attacker needs room for its own sockets.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, arguments.connections + 256), hard))
    with _serve(arguments.serve_options, nofile=arguments.nofile) as server:
        health = HealthProbes()
        held: list[int] = []
        sockets: list[socket.socket | None] = [None] * arguments.connections
        host, port = server.base_url.removeprefix("http://").split(":")
        opened = refused = 0
        deadline = time.monotonic() + arguments.seconds
        next_probe = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for index, sock in enumerate(sockets):
                if sock is not None and not _closed(sock):
                    continue
                if sock is not None:
                    sock.close()
                sockets[index] = _half_open(host, int(port))
                opened += 1
                refused += sockets[index] is None
            if time.monotonic() >= next_probe:
                held.append(server.open_sockets())
                health.probe(server.base_url, timeout=5)
                next_probe = time.monotonic() + 1.0
            time.sleep(0.05)
        for sock in sockets:
            if sock is not None:
                sock.close()
        print(
            f"attack: {arguments.connections} half-open sockets kept open for {arguments.seconds:.0f} s "
            f"(server open-file limit {arguments.nofile}); {opened} opened, {refused} failed to connect"
        )
        print(f"sockets the server held: median {statistics.median(held):.0f}, max {max(held)}")
        print(health.summary())
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


@contextlib.contextmanager
def _serve(options: list[str], nofile: int | None = None) -> Iterator[Server]:
    port = _free_port()
    entry_point = "import sys; from removebg_provider.cli import main; sys.exit(main())"
    with tempfile.TemporaryDirectory() as storage:
        Path(storage).chmod(0o700)
        command = [
            sys.executable,
            "-c",
            entry_point,
            "serve",
            "--port",
            str(port),
            "--storage",
            storage,
            *options,
        ]
        env = {**os.environ, "REMOVEBG_SERVER_TOKEN": TOKEN}

        def limit_files() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limit_files
        )
        server = Server(f"http://127.0.0.1:{port}", process)
        try:
            _wait_healthy(server)
            yield server
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _single_colour_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (side, side), 1).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _warm_up(server: Server) -> None:
    """One ordinary record first, so the engine's one-time costs (imports, JIT) are in the baseline."""
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (230, 230, 230)).save(buffer, "PNG")
    body = json.dumps({"records": [{"_base64": base64.b64encode(buffer.getvalue()).decode()}]})
    _post(server, body)


def _post(server: Server, body: str) -> list[int]:
    response = requests.post(
        f"{server.base_url}/removebg/fast/removebg",
        data=body,
        headers={**HEADERS, "Content-Type": "application/json"},
        timeout=3600,
    )
    if response.status_code != 200:
        return [response.status_code]
    return [record["_status"]["code"] for record in response.json()["records"]]


def _half_open(host: str, port: int) -> socket.socket | None:
    try:
        sock = socket.create_connection((host, port), timeout=1)
        sock.sendall(PARTIAL_REQUEST)
    except OSError:
        return None
    sock.setblocking(False)
    return sock


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError("removebg serve exited during startup")
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("removebg serve did not answer /health")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


if __name__ == "__main__":
    sys.exit(main())
