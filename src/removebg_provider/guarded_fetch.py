"""Request a URL someone else chose without letting it reach private networks or exhaust memory or time.

Server-side request forgery is the risk: whoever writes a record's `_url` (for the local server) or a
manifest's image column (for the QA report's tiles and the result store's source fingerprints) could
point it at the metadata service, at localhost,
or at the catalog team's intranet. Each hop is therefore resolved once, *every* address the
name resolves to is checked, and the connection goes to the checked address itself (Host header and
TLS SNI/certificate check still use the name). Re-resolving at connect time would let a DNS-rebinding
name answer "public" to the check and "private" to the connection. Redirects are followed by hand so
each hop is checked the same way.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import certifi

from removebg_provider.errors import FetchRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024

# IPv6 forms that carry an IPv4 address: a NAT64 gateway or a 6to4 relay would deliver a request
# for them to that IPv4 address, so they are judged by it (RFC 6052, RFC 3056, RFC 2765).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")
# Deprecated IPv4-compatible addresses (::a.b.c.d, RFC 4291), the local-use NAT64 prefix (RFC 8215)
# and deprecated site-local addresses (fec0::/10, RFC 3879) have no public use at all; Python's
# ipaddress (3.11) calls them global.
_NEVER_PUBLIC = (
    ipaddress.IPv6Network("::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
    ipaddress.IPv6Network("fec0::/10"),
)


@dataclass(frozen=True)
class FetchLimits:
    """How far one download may go: `timeout_seconds` is the total for all its hops, not per read."""

    max_bytes: int
    timeout_seconds: float
    max_redirects: int


# How far a fetch of an image someone else chose goes unless its caller says otherwise: the QA
# report's tiles and the result store's descriptions of http(s) images.
IMAGE_FETCH_LIMITS = FetchLimits(max_bytes=64 << 20, timeout_seconds=10.0, max_redirects=5)
# `FetchRefused.code` of a host at an address the policy refuses.
NOT_PUBLIC = 403


@dataclass(frozen=True)
class HeadAnswer:
    """What a HEAD request learnt: the final status and headers (names in lower case)."""

    status: int
    headers: dict[str, str]


def is_public_address(address: IPAddress) -> bool:
    """True for globally routable unicast addresses; loopback, private, link-local, reserved etc. are not.

    An IPv6 address that embeds an IPv4 address (IPv4-mapped, NAT64, 6to4, IPv4-translated) is
    public only when the IPv4 address it leads to is.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
        if any(address in network for network in _NEVER_PUBLIC):
            return False
    return address.is_global and not address.is_multicast


def allow_any_address(address: IPAddress) -> bool:
    """The policy of `--allow-private-urls` and `allow_private_urls`: every address may be requested."""
    return True


def fetch_url(url: str, limits: FetchLimits, is_allowed: AddressPolicy = is_public_address) -> bytes:
    """Return the body of `url` (http or https), following redirects, or raise `FetchRefused`."""
    body = bytearray()
    stream_url(url, limits, body.extend, is_allowed)
    return bytes(body)


def stream_url(
    url: str,
    limits: FetchLimits,
    sink: Callable[[bytes], object],
    is_allowed: AddressPolicy = is_public_address,
) -> None:
    """Pass the body of `url` to `sink` chunk by chunk as it arrives, or raise `FetchRefused`.

    `sink` may have seen part of the body when a limit or the deadline cuts it short.
    """
    with _final_answer("GET", url, limits, is_allowed) as (response, watchdog):
        if response.status != 200:
            raise FetchRefused(400, f"fetching {url} failed: the server answered HTTP {response.status}")
        _read_capped(response, url, limits, watchdog, sink)


def head_url(url: str, limits: FetchLimits, is_allowed: AddressPolicy = is_public_address) -> HeadAnswer:
    """The status and headers of a HEAD of `url` (http or https), following redirects; or `FetchRefused`.

    Any status is an answer; only an address `is_allowed` refuses, a failed connection, too many
    redirects or the deadline raise.
    """
    with _final_answer("HEAD", url, limits, is_allowed) as (response, _watchdog):
        return HeadAnswer(response.status, {name.lower(): value for name, value in response.getheaders()})


@contextlib.contextmanager
def _final_answer(
    method: str, url: str, limits: FetchLimits, is_allowed: AddressPolicy
) -> Iterator[tuple[http.client.HTTPResponse, _Watchdog]]:
    """The response to `method` at the end of `url`'s redirects, each hop at a checked address."""
    watchdog = _Watchdog(limits.timeout_seconds)
    try:
        current = url
        for _hop in range(limits.max_redirects + 1):
            connection = _connect(current, is_allowed, watchdog)
            try:
                response = _request(connection, method, current)
                if watchdog.expired:
                    # The deadline's shutdown ends headers as a closed connection would, mid-line:
                    # a cut ETag or Location would pass for the server's own.
                    raise watchdog.failure(url, "while reading", TimeoutError())
                location = response.getheader("Location")
                if response.status in _REDIRECTS and location:
                    current = urljoin(current, location)
                    continue
                yield response, watchdog
                return
            except (http.client.HTTPException, OSError) as error:
                raise watchdog.failure(url, "while reading", error) from error
            finally:
                connection.close()
        raise FetchRefused(400, f"fetching {url} failed: more than {limits.max_redirects} redirects")
    finally:
        watchdog.stop()


class _Watchdog:
    """Shuts a fetch's sockets down once its total deadline has passed, whatever they are blocked in.

    Socket timeouts bound each read, not the download: a host that sends one byte every 2 s never
    trips a 20 s read timeout and held a fetch (and its thread) for many minutes. A shutdown from
    the timer thread wakes the blocked read, which then sees the end of the stream. The watchdog
    shuts down duplicates of the sockets, kept until `stop`, so it can never act on a descriptor
    number that was closed and reused meanwhile.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        """Seconds left before the deadline; `TimeoutError` once none are left."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no time left")
        return left

    def watch(self, sock: socket.socket) -> None:
        """Shut `sock` down at the deadline (at once if it has passed)."""
        with self._lock:
            duplicate = sock.dup()
            self._sockets.append(duplicate)
            if self.expired:
                _shut_down(duplicate)

    def failure(self, url: str, stage: str, error: Exception) -> FetchRefused:
        """The record's status for `error`: a timeout when the deadline cut it short."""
        if self.expired:
            return FetchRefused(408, f"fetching {url} took longer than {self.seconds:g} s")
        if isinstance(error, TimeoutError):
            return FetchRefused(408, f"fetching {url} timed out {stage}")
        return FetchRefused(400, f"fetching {url} failed {stage}: {error}")

    def stop(self) -> None:
        """Cancel the deadline and release the duplicate sockets."""
        self._timer.cancel()
        with self._lock:
            for duplicate in self._sockets:
                duplicate.close()
            self._sockets.clear()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for duplicate in self._sockets:
                _shut_down(duplicate)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Built at the first https fetch, not at import: loading the CA bundle takes about 50 ms, and
    # every run imports this module through the report whether or not it fetches anything.
    return ssl.create_default_context(cafile=certifi.where())


def _shut_down(sock: socket.socket) -> None:
    # An OSError means it is already disconnected: nothing is left to wake.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _connect(url: str, is_allowed: AddressPolicy, watchdog: _Watchdog) -> http.client.HTTPConnection:
    """An HTTP connection to a checked address of `url`'s host, TLS verified for the host name."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchRefused(400, f"{url} is not an http(s) URL")
    host = parts.hostname
    if not host:
        raise FetchRefused(400, f"{url} has no host name")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:
        raise FetchRefused(400, f"{url} has an invalid port") from error
    unreachable: list[str] = []
    # Like any client, try each address in turn (say ::1, then 127.0.0.1); every one was checked.
    for address in _resolve_checked(host, port, url, is_allowed):
        try:
            sock = socket.create_connection((str(address), port), timeout=watchdog.remaining())
        except OSError as error:
            if watchdog.expired:
                raise watchdog.failure(url, "while connecting", error) from error
            unreachable.append(f"{address}: {error}")
            continue
        try:
            watchdog.watch(sock)
            if parts.scheme == "https":
                sock = _tls_context().wrap_socket(sock, server_hostname=host)
        except OSError as error:
            sock.close()
            raise watchdog.failure(url, "while connecting", error) from error
        # The socket is already connected to the checked address, so http.client never resolves the
        # name itself; its own timeout is unused for the same reason (the socket has one).
        connection = http.client.HTTPConnection(host, port)
        connection.sock = sock
        return connection
    raise FetchRefused(400, f"fetching {url} failed: cannot connect ({'; '.join(unreachable)})")


def _request(connection: http.client.HTTPConnection, method: str, url: str) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    headers = {
        "Host": parts.netloc.rsplit("@", 1)[-1],
        "User-Agent": "removebg-provider",
        "Accept": "image/*,*/*;q=0.5",
        # A compressed body could inflate far past the byte cap inside a single decoded chunk.
        "Accept-Encoding": "identity",
    }
    try:
        connection.request(method, target, headers=headers)
    except (http.client.InvalidURL, UnicodeError) as error:
        # Control characters in the path, or a host name that is not ASCII in the Host header.
        raise FetchRefused(400, f"{url} is not a valid URL: {error}") from error
    return connection.getresponse()


def _resolve_checked(host: str, port: int, url: str, is_allowed: AddressPolicy) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise FetchRefused(400, f"fetching {url} failed: cannot resolve host {host!r}") from error
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
    if not addresses:
        raise FetchRefused(400, f"fetching {url} failed: host {host!r} has no address")
    refused = [address for address in addresses if not is_allowed(address)]
    if refused:
        raise FetchRefused(
            NOT_PUBLIC,
            f"refusing to fetch {url}: {host!r} resolves to {refused[0]}, which is not a public address",
        )
    return addresses


def _read_capped(
    response: http.client.HTTPResponse,
    url: str,
    limits: FetchLimits,
    watchdog: _Watchdog,
    sink: Callable[[bytes], object],
) -> None:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise FetchRefused(413, f"{url} is {declared} bytes; the limit is {limits.max_bytes} bytes")
    size = 0
    while chunk := response.read(_CHUNK):
        size += len(chunk)
        if size > limits.max_bytes:
            raise FetchRefused(413, f"{url} is larger than the limit of {limits.max_bytes} bytes")
        sink(chunk)
    # A body without a length ends when the connection does, which is also what the deadline's
    # shutdown looks like: only a fetch that finished in time has the whole body.
    if watchdog.expired:
        raise watchdog.failure(url, "while reading", TimeoutError())


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _IPV4_TRANSLATED:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None
