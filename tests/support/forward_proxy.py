"""A real forward HTTP proxy on 127.0.0.1 (plain http, absolute-form requests), counting what it relays.

    with start_forward_proxy(username="u", password="p") as proxy:
        RemoveBgClient(server.base_url, proxies={"http": proxy.url_with("u", "p")})
        assert proxy.relayed[0] == ("POST", f"{server.base_url}/removebg/fast/removebg")

With credentials it answers 407 to a request without the matching `Proxy-Authorization`, as
corporate proxies do. It never sees https (no CONNECT): the local API server speaks plain http.
"""

from __future__ import annotations

import base64
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import urllib3

_HOP_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "transfer-encoding", "host"}
)


@dataclass
class ForwardProxy:
    """Where the proxy listens, the credentials it wants (if any), and every (method, URL) it relayed."""

    port: int = 0
    credentials: str | None = None
    relayed: list[tuple[str, str]] = field(default_factory=list)
    refused: int = 0

    def url_with(self, username: str | None = None, password: str | None = None) -> str:
        """The proxy's URL, with user info when given (as a `proxies` value carries it)."""
        user = f"{username}:{password}@" if username is not None else ""
        return f"http://{user}127.0.0.1:{self.port}"


@contextlib.contextmanager
def start_forward_proxy(username: str | None = None, password: str | None = None) -> Iterator[ForwardProxy]:
    """Run a ForwardProxy on a free port until the `with` block ends."""
    proxy = ForwardProxy()
    if username is not None:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        proxy.credentials = f"Basic {token}"
    handler = type("BoundHandler", (_Handler,), {"proxy": proxy, "upstream": urllib3.PoolManager()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    proxy.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    proxy: ForwardProxy
    upstream: urllib3.PoolManager
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read `relayed`, not access logs."""

    def do_GET(self) -> None:
        self._relay()

    def do_POST(self) -> None:
        self._relay()

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))) or None
        if self.proxy.credentials and self.headers.get("Proxy-Authorization") != self.proxy.credentials:
            self.proxy.refused += 1
            self._send(407, {"Proxy-Authenticate": 'Basic realm="test"'}, b"proxy authentication required")
            return
        self.proxy.relayed.append((self.command, self.path))
        headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_HEADERS}
        answer = self.upstream.request(
            self.command, self.path, body=body, headers=headers, redirect=False, decode_content=False
        )
        self._send(answer.status, dict(answer.headers), answer.data)

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in _HOP_HEADERS and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
