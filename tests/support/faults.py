"""A fault-injecting HTTP proxy in front of the local API server, for reliability tests.

The proxy is a real threaded HTTP server on 127.0.0.1. Each POST to the removal endpoint draws one
fate from a seeded RNG: answered normally, or one of the faults below. Faults *before* forwarding
(5xx, 429, a reset) never reach the API server, so nothing is billed; faults *after* forwarding
(a truncated body, a reset, an answer held past the client's timeout) happen once the server has
processed and billed the records, so the client's retry bills them again. The proxy counts both, and
every record id it forwarded. Every record forwarded more than once is a re-bill, and the proxy keeps
its reason: the fault that ended the earlier forwarding (`slow`, `truncated`, `reset_after`: forced),
or `answered` when the earlier forwarding was answered normally and the client sent it again anyway
(its read timeout fired first, as on a loaded machine or against a slow API: an unforced re-bill).

Output URLs in responses are rewritten to point through the proxy, so downloads can fail too
(`expired_download`: a 404 as for an output past its 24 h lifetime, drawn per download;
`gone_downloads_per_record`: the first N downloads of each record's outputs answer 404, as for an
object store that serves a fresh object late). A record sent again after a 404 on its output is a
re-bill forced by that fault (`expired_download`).

`hold_requests(after=n)` lets n more removal requests through, then holds every later one before it
is forwarded (nothing billed) until `release_held()`: a test can freeze a run with a known set of
requests in flight, whatever the machine's speed.

    with start_fault_proxy(server.base_url, FaultRates.uniform(0.2), seed=7) as proxy:
        client = RemoveBgClient(proxy.base_url, token, ...)
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import urllib3

REQUEST_FAULTS_BEFORE = ("server_error", "rate_limited", "reset_before")
REQUEST_FAULTS_AFTER = ("slow", "truncated", "reset_after")
# The fate of a forwarded request that no fault touched: its answer went back to the client intact.
ANSWERED = "answered"

_SERVER_ERRORS = (500, 502, 503)
_HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


@dataclass(frozen=True)
class FaultRates:
    """Probability of each fault per removal request (and per download for `expired_download`).

    `slow_seconds` must exceed the client's read timeout for a slow answer to be a fault;
    `latency` delays every forwarded request (no fault, just a slower API); `echo_authorization`
    makes injected 5xx bodies quote the request's Authorization header, as a careless API might.
    """

    server_error: float = 0.0
    rate_limited: float = 0.0
    reset_before: float = 0.0
    slow: float = 0.0
    truncated: float = 0.0
    reset_after: float = 0.0
    expired_download: float = 0.0
    gone_downloads_per_record: int = 0
    slow_seconds: float = 3.0
    retry_after: str = "1"
    latency: float = 0.0
    echo_authorization: bool = False

    @classmethod
    def uniform(cls, total: float, **overrides: Any) -> FaultRates:
        """`total` spread evenly over the six request faults; `overrides` set any other field."""
        share = total / (len(REQUEST_FAULTS_BEFORE) + len(REQUEST_FAULTS_AFTER))
        rates = {name: share for name in REQUEST_FAULTS_BEFORE + REQUEST_FAULTS_AFTER}
        return cls(**{**rates, **overrides})

    @property
    def request_total(self) -> float:
        return sum(getattr(self, name) for name in REQUEST_FAULTS_BEFORE + REQUEST_FAULTS_AFTER)


@dataclass
class ProxyCounters:
    """What the proxy saw. `forwarded_ids` counts every record id that reached the API server."""

    requests: int = 0
    forwarded_requests: int = 0
    forwarded_records: int = 0
    rebilled_records: int = 0
    downloads: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    forwarded_ids: Counter[str] = field(default_factory=Counter)
    rebills: Counter[str] = field(default_factory=Counter)
    slowest_answer_seconds: float = 0.0
    last_fate: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def unforced_rebills(self) -> int:
        """Records billed again although the API's earlier answer for them was delivered intact."""
        return self.rebills[ANSWERED]


class FaultProxy:
    """The running proxy: its base URL, its (changeable) fault rates and its counters."""

    def __init__(self, upstream: str, rates: FaultRates, seed: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.rates = rates
        self.counters = ProxyCounters()
        self.base_url = ""
        self._seed = seed
        self._rngs: dict[tuple[str, ...], random.Random] = {}
        self._lock = threading.Lock()
        self._active = 0
        self._output_records: dict[str, str] = {}
        self._downloads_per_record: Counter[str] = Counter()
        self._expired_paths: set[str] = set()
        self._pool = urllib3.PoolManager(maxsize=128, retries=False, timeout=urllib3.Timeout(total=120))
        self._gate = threading.Event()
        self._gate.set()
        self._passes_left: int | None = None
        self.held_requests = 0

    def hold_requests(self, after: int) -> None:
        """Let `after` more removal requests through, then hold each later one before forwarding it."""
        with self._lock:
            self._passes_left = after
            self._gate.clear()

    def release_held(self) -> None:
        """Forward the held requests and every later one."""
        with self._lock:
            self._passes_left = None
            self._gate.set()

    def pass_gate(self) -> None:
        """Return when this removal request may be forwarded (at once unless requests are held)."""
        with self._lock:
            if self._passes_left is None:
                return
            if self._passes_left > 0:
                self._passes_left -= 1
                return
            self.held_requests += 1
        self._gate.wait()

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until no removal request is inside the proxy (e.g. after the client was killed)."""
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._active:
            raise TimeoutError(f"{self._active} request(s) still in the proxy after {timeout} s")

    def set_rates(self, rates: FaultRates) -> None:
        """Change the faults for the requests that arrive from now on."""
        with self._lock:
            self.rates = rates

    def reset_counters(self) -> None:
        with self._lock:
            self.counters = ProxyCounters()

    def draw(self, kinds: tuple[str, ...]) -> str | None:
        """The fault this request gets (one of `kinds`), or None; one seeded draw per request.

        Each set of kinds draws from its own seeded stream, so removal requests see the same
        faults in the same order however the pipeline interleaves them with downloads.
        """
        with self._lock:
            rng = self._rngs.setdefault(kinds, random.Random(f"{self._seed}:{','.join(kinds)}"))
            roll = rng.random()
            rates = self.rates
        edge = 0.0
        for kind in kinds:
            edge += getattr(rates, kind)
            if roll < edge:
                return kind
        return None

    def enter(self, delta: int) -> None:
        with self._lock:
            self._active += delta

    def record(self, **changes: int) -> None:
        with self._lock:
            for name, amount in changes.items():
                setattr(self.counters, name, getattr(self.counters, name) + amount)

    def record_fault(self, kind: str) -> None:
        with self._lock:
            self.counters.faults[kind] += 1

    def record_forwarded(self, ids: list[str], fate: str, upstream_seconds: float) -> None:
        """Count a request the API server billed; a record seen before is a re-bill, with its reason."""
        with self._lock:
            counters = self.counters
            counters.forwarded_requests += 1
            counters.forwarded_records += len(ids)
            counters.forwarded_ids.update(ids)
            counters.slowest_answer_seconds = max(counters.slowest_answer_seconds, upstream_seconds)
            for record_id in ids:
                earlier = counters.last_fate.get(record_id)
                if earlier is not None:
                    counters.rebills[earlier] += 1
                counters.last_fate[record_id] = fate

    def note_output(self, path: str, record_id: str) -> None:
        """Remember which record an output file path belongs to."""
        with self._lock:
            self._output_records[path] = record_id

    def download_is_gone(self, path: str) -> bool:
        """Whether this download of `path` answers 404; a 404 makes sending its record again forced."""
        with self._lock:
            record_id = self._output_records.get(path)
            if record_id is not None:
                self._downloads_per_record[record_id] += 1
            rates = self.rates
            gone = record_id is not None and self._downloads_per_record[record_id] <= (
                rates.gone_downloads_per_record
            )
        if not gone and self.draw(("expired_download",)) is None:
            return False
        with self._lock:
            self.counters.faults["expired_download"] += 1
            if record_id is not None and path not in self._expired_paths:
                self._expired_paths.add(path)
                self.counters.last_fate[record_id] = "expired_download"
                self.counters.rebilled_records += 1
        return True

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        return self._pool.request(
            method, f"{self.upstream}{path}", body=body, headers=headers, preload_content=True, redirect=False
        )


@contextlib.contextmanager
def start_fault_proxy(upstream: str, rates: FaultRates, seed: int = 0) -> Iterator[FaultProxy]:
    """Run a FaultProxy for `upstream` on a free 127.0.0.1 port until the `with` block ends."""
    proxy = FaultProxy(upstream, rates, seed)
    handler = type("BoundHandler", (_Handler,), {"proxy": proxy})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    proxy.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    proxy: FaultProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the tests read counters, not access logs."""

    def do_GET(self) -> None:
        if self.path.startswith("/files/"):
            self.proxy.record(downloads=1)
            if self.proxy.download_is_gone(self.path):
                self._send_json(404, {"status": {"code": 404, "text": "Not Found"}})
                return
        upstream = self.proxy.forward("GET", self.path, self._forward_headers(), None)
        self._send(upstream.status, dict(upstream.headers), upstream.data)

    def do_POST(self) -> None:
        self.proxy.enter(1)
        try:
            self._post()
        finally:
            self.proxy.enter(-1)

    def _post(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.proxy.record(requests=1)
        if not self.path.endswith("/removebg"):
            upstream = self.proxy.forward("POST", self.path, self._forward_headers(), body)
            self._send(upstream.status, dict(upstream.headers), upstream.data)
            return
        self.proxy.pass_gate()
        fault = self.proxy.draw(REQUEST_FAULTS_BEFORE + REQUEST_FAULTS_AFTER)
        if fault is not None:
            self.proxy.record_fault(fault)
        if fault == "server_error":
            code = _SERVER_ERRORS[self.proxy.counters.requests % len(_SERVER_ERRORS)]
            text = "injected failure"
            if self.proxy.rates.echo_authorization:
                text += f" for {self.headers.get('Authorization')}"
            self._send_json(code, {"status": {"code": code, "text": text}})
            return
        if fault == "rate_limited":
            self._send_json(
                429,
                {"status": {"code": 429, "text": "Too Many Requests"}},
                {"Retry-After": self.proxy.rates.retry_after},
            )
            return
        if fault == "reset_before":
            self._reset()
            return
        if self.proxy.rates.latency:
            time.sleep(self.proxy.rates.latency)
        ids = _record_ids(body)
        started = time.monotonic()
        upstream = self.proxy.forward("POST", self.path, self._forward_headers(), body)
        fate = fault if fault in REQUEST_FAULTS_AFTER else ANSWERED
        self.proxy.record_forwarded(ids, fate, time.monotonic() - started)
        answer = self._rewrite_output_urls(upstream.data)
        if fault in REQUEST_FAULTS_AFTER:
            self.proxy.record(rebilled_records=len(ids))
        if fault == "reset_after":
            self._reset()
            return
        if fault == "slow":
            time.sleep(self.proxy.rates.slow_seconds)
        if fault == "truncated":
            self._send_truncated(upstream.status, answer)
            return
        self._send(upstream.status, dict(upstream.headers), answer)

    def _forward_headers(self) -> dict[str, str]:
        return {name: value for name, value in self.headers.items() if name.lower() not in _HOP_HEADERS}

    def _rewrite_output_urls(self, data: bytes) -> bytes:
        try:
            document = json.loads(data)
        except ValueError:
            return data
        for record in document.get("records", []) if isinstance(document, dict) else []:
            for key, value in list(record.items()):
                if key.startswith("_output_url") and isinstance(value, str):
                    record[key] = value.replace(self.proxy.upstream, self.proxy.base_url, 1)
                    self.proxy.note_output(urlsplit(record[key]).path, str(record.get("_id")))
        return json.dumps(document).encode()

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        with contextlib.suppress(OSError):
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() not in _HOP_HEADERS:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _send_json(
        self, status: int, document: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self._send(
            status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(document).encode()
        )

    def _send_truncated(self, status: int, body: bytes) -> None:
        with contextlib.suppress(OSError):
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
        self._reset()

    def _reset(self) -> None:
        # SO_LINGER with a zero timeout makes close() send a TCP RST instead of a FIN.
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.close()


def _record_ids(body: bytes) -> list[str]:
    try:
        records = json.loads(body).get("records", [])
    except (ValueError, AttributeError):
        return []
    return [str(record.get("_id")) for record in records if isinstance(record, dict)]
