"""A scripted HTTP server on 127.0.0.1 that answers each request with the next reply queued for its path.

Tests queue replies per path, run the client against `server.base_url`, then read what the client
sent from `server.requests`:

    server.script("/removebg/fast/removebg", Reply(503), Reply(200, {"records": [...]}))

A reply can also misbehave on the wire: wait before answering (`delay`), announce a longer body than
it sends and hang up (`truncate_to`), or reset the connection without answering (`reset`). A path
with nothing left to answer gets HTTP 418 so an unexpected extra request fails its test loudly.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One scripted answer: status, body (JSON-encoded unless bytes), headers and wire misbehaviour."""

    status: int = 200
    body: Any = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    truncate_to: int | None = None
    reset: bool = False

    def encoded_body(self) -> bytes:
        """The body as bytes: raw bytes as given, anything else as JSON."""
        return self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()


@dataclass(frozen=True)
class CapturedRequest:
    """What the client sent."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The request body decoded as JSON."""
        return json.loads(self.body)


Responder = Reply | Callable[[CapturedRequest], Reply]


class ReplayServer:
    """Holds the per-path reply queues and every request received, in arrival order."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.requests: list[CapturedRequest] = []
        self._queues: dict[str, deque[Responder]] = defaultdict(deque)
        self._lock = threading.Lock()

    def script(self, path: str, *replies: Responder) -> None:
        """Queue replies for `path`; a callable builds its reply from the request it answers."""
        with self._lock:
            self._queues[path].extend(replies)

    def requests_to(self, path: str) -> list[CapturedRequest]:
        """The requests received for `path`."""
        with self._lock:
            return [request for request in self.requests if request.path == path]

    def _answer(self, request: CapturedRequest) -> Reply:
        with self._lock:
            self.requests.append(request)
            queue = self._queues[request.path]
            responder = queue.popleft() if queue else None
        if responder is None:
            return Reply(
                418, f"replay server: no scripted reply for {request.method} {request.path}".encode()
            )
        return responder if isinstance(responder, Reply) else responder(request)


def ok_record(record_id: str, **fields: Any) -> dict[str, Any]:
    """A successful response record for `record_id`, shaped like the API's documented example."""
    return {
        "_status": {"code": 200, "text": "OK", "request_id": f"req-{record_id}"},
        "_id": record_id,
        "_width": 640,
        "_height": 480,
        "_output_url": f"https://files.example/{record_id}.png",
        **fields,
    }


def api_body(*records: Any, code: int = 200, text: str = "OK", **status: Any) -> dict[str, Any]:
    """A whole response body: the records plus the request-level status and statistics."""
    return {
        "records": list(records),
        "status": {"code": code, "text": text, "request_id": "req-batch", **status},
        "statistics": {"processing time": 0.01},
    }


def echo_ok(request: CapturedRequest) -> Reply:
    """Answer every record of the request as processed, in the order sent."""
    return Reply(200, api_body(*(ok_record(item["_id"]) for item in request.json()["records"])))


@contextmanager
def serve_replays() -> Iterator[ReplayServer]:
    """Run a ReplayServer on a free port until the `with` block ends."""
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    replay = ReplayServer(f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.replay = replay
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="replay-server"
    )
    thread.start()
    try:
        yield replay
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    replay: ReplayServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Broken pipes are what some tests provoke on purpose; they are not worth a traceback."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _QuietServer

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean; the captured requests are the record."""

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        request = CapturedRequest(self.command, self.path, dict(self.headers.items()), body)
        reply = self.server.replay._answer(request)
        if reply.delay:
            time.sleep(reply.delay)
        if reply.reset:
            self._reset_connection()
            return
        payload = reply.encoded_body()
        self.send_response(reply.status)
        headers = {"Content-Type": "application/json", **reply.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        if reply.truncate_to is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if reply.truncate_to is None:
            self.wfile.write(payload)
            return
        self.wfile.write(payload[: reply.truncate_to])
        self.wfile.flush()
        self.close_connection = True

    def _reset_connection(self) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of an orderly FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True
