"""A plain HTTP file server on 127.0.0.1 for download tests: Range requests, and a cut on demand.

    with serve_files({"u2net.onnx": data}, cut_after=1000) as server:
        download(f"{server.base_url}/u2net.onnx", ...)
        assert server.ranges == [None, "bytes=1000-"]

`cut_after=N` makes the first full-body answer announce the whole length, send N bytes and close
the connection, as a dropped link does. `honour_range=False` answers every Range request with the
whole file (200), as some servers and proxies do. `etags=True` answers HEAD requests with an
`ETag` (an MD5 of the file) and records them in `heads`; without it a HEAD gets 501, as a bare
server gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FileServer:
    """What the running server serves and what it saw."""

    base_url: str
    files: dict[str, bytes]
    cut_after: int | None = None
    honour_range: bool = True
    etags: bool = False
    ranges: list[str | None] = field(default_factory=list)  # the Range header of every GET, in order
    heads: list[str] = field(default_factory=list)  # the path of every HEAD, in order


@contextlib.contextmanager
def serve_files(
    files: dict[str, bytes], cut_after: int | None = None, honour_range: bool = True, etags: bool = False
) -> Iterator[FileServer]:
    """Serve `files` (name -> bytes) at http://127.0.0.1:PORT/NAME until the `with` block ends."""
    state = FileServer("", dict(files), cut_after, honour_range, etags)

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            data = state.files.get(self.path.lstrip("/"))
            if not state.etags:
                self.send_error(501)
                return
            state.heads.append(self.path)
            if data is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()

        def do_GET(self) -> None:
            requested = self.headers.get("Range")
            state.ranges.append(requested)
            data = state.files.get(self.path.lstrip("/"))
            if data is None:
                self.send_error(404)
                return
            start = _range_start(requested) if state.honour_range else None
            if start is not None and start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start or 0 :]
            self.send_response(206 if start is not None else 200)
            if start is not None:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state.cut_after is not None:
                cut, state.cut_after = state.cut_after, None
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the tests assert on `ranges`, not on a log."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="file-server")
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=30)


def _range_start(header: str | None) -> int | None:
    found = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(found.group(1)) if found else None
