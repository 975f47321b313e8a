"""Start the real local API server on a free 127.0.0.1 port for a test, and stop it afterwards.

Any test that needs a Ximilar-compatible endpoint uses this:

    with start_api_server(tmp_path) as server:
        client = Client(server.base_url, server.token)
        ...
        assert server.stats()["records_billed"] == 3

`settings` are `ServerSettings` fields (max_records=2, allow_private_urls=True, ...). `engine` replaces
the configured engine with any object that has `name` and `matte(rgb, mode)`; `clock` replaces
`time.time` for output-file expiry; `wrap_app` wraps the ASGI app, e.g. in a `RequestClock` that
records when each removal request arrives; `tls` (see `tls.py`) serves https with a private CA.
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
import uvicorn
from PIL import Image
from starlette.types import ASGIApp, Receive, Scope, Send

from removebg_provider.engines import Engine
from removebg_provider.server import ServerSettings, create_app
from removebg_provider.server.connections import server_config
from removebg_provider.server.files import Clock
from support.tls import ServerTls

# A hang guard: a busy 2-core machine starts uvicorn slowly.
_STARTUP_TIMEOUT_SECONDS = 180.0


@dataclass(frozen=True)
class LocalApiServer:
    """A running server: where it listens, the token it wants, and where its output files live."""

    base_url: str
    token: str | None
    storage_dir: Path

    def stats(self) -> dict[str, int]:
        """The server's `GET /stats` counters (requests, records billed/ok/failed...), authenticated."""
        response = requests.get(f"{self.base_url}/stats", headers=self.auth_headers(), timeout=10)
        response.raise_for_status()
        counters: dict[str, int] = response.json()
        return counters

    def reset_stats(self) -> None:
        """Zero the counters (`POST /stats/reset`, authenticated)."""
        response = requests.post(f"{self.base_url}/stats/reset", headers=self.auth_headers(), timeout=10)
        response.raise_for_status()

    def auth_headers(self) -> dict[str, str]:
        """The `Authorization` header this server accepts (none when auth is off)."""
        return {"Authorization": f"Token {self.token}"} if self.token else {}


@contextlib.contextmanager
def start_api_server(
    tmp_path: Path,
    *,
    token: str | None = "test-token",
    engine: Engine | None = None,
    clock: Clock = time.time,
    wrap_app: Callable[[ASGIApp], ASGIApp] | None = None,
    tls: ServerTls | None = None,
    **settings: Any,
) -> Iterator[LocalApiServer]:
    """Run uvicorn with the app in a background thread until the `with` block ends."""
    storage_dir = Path(settings.pop("storage_dir", tmp_path / "removebg-server-files"))
    config = ServerSettings(storage_dir=storage_dir, token=token, **settings)
    app: ASGIApp = create_app(config, engine=engine, clock=clock)
    if wrap_app is not None:
        app = wrap_app(app)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    tls_options = tls.uvicorn_options() if tls else {}
    server = uvicorn.Server(server_config(app, config, log_level="warning", lifespan="on", **tls_options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="api-server")
    thread.start()
    base_url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base_url, thread, tls)
        yield LocalApiServer(base_url=base_url, token=token, storage_dir=storage_dir)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


class RequestClock:
    """ASGI middleware that records when each removal request (`POST /removebg/...`) arrives.

    `arrivals` are `time.monotonic()` readings in arrival order; a counting proxy in the server's
    own process, so the counts are the server's, not the clients'.
    """

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self._app: ASGIApp | None = None

    def wrap(self, app: ASGIApp) -> ASGIApp:
        self._app = app
        return self

    def clear(self) -> None:
        self.arrivals.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._app is not None, "RequestClock.wrap(app) first"
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith("/removebg/"):
            self.arrivals.append(time.monotonic())
        await self._app(scope, receive, send)


def _wait_until_healthy(base_url: str, thread: threading.Thread, tls: ServerTls | None = None) -> None:
    trust: dict[str, Any] = {}
    if tls is not None:
        trust = {"verify": str(tls.certificates.ca), "cert": tls.certificates.client_pair}
    deadline = time.monotonic() + _STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError(f"the API server thread died during startup ({base_url})")
        try:
            if requests.get(f"{base_url}/health", timeout=10, **trust).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or too busy to answer: a loaded machine is no error
        time.sleep(0.02)
    raise RuntimeError(f"the API server at {base_url} did not answer /health in {_STARTUP_TIMEOUT_SECONDS} s")


def sample_photo(width: int = 96, height: int = 64, image_format: str = "PNG") -> bytes:
    """A synthetic studio product photo: a dark rounded product on a light, slightly graded backdrop."""
    ys, xs = np.mgrid[0:height, 0:width]
    backdrop = 235 - (ys * 10 // max(height, 1))
    pixels = np.repeat(backdrop[:, :, None], 3, axis=2).astype(np.uint8)
    inside = ((xs - width / 2) / (width / 4)) ** 2 + ((ys - height / 2) / (height / 3)) ** 2 <= 1.0
    pixels[inside] = (40, 70, 160)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, image_format)
    return buffer.getvalue()


def sample_photo_base64(width: int = 96, height: int = 64, image_format: str = "PNG") -> str:
    """`sample_photo` as the `_base64` field of a record."""
    return base64.b64encode(sample_photo(width, height, image_format)).decode("ascii")
