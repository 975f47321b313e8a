"""Download a record's `_url` without letting it reach private networks or exhaust memory or time.

Server-side request forgery is the risk: a caller could point `_url` at the metadata service, at
localhost, or at the catalog team's intranet. Each hop is therefore resolved once, *every* address the
name resolves to is checked, and the connection goes to the checked address itself (Host header and
TLS SNI/certificate check still use the name). Re-resolving at connect time would let a DNS-rebinding
name answer "public" to the check and "private" to the connection. Redirects are followed by hand so
each hop is checked the same way.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import certifi
import urllib3
from urllib3.exceptions import ConnectTimeoutError, HTTPError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError

from removebg_provider.server.errors import RecordRejected

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressPolicy = Callable[[IPAddress], bool]

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class FetchLimits:
    """How far one download may go."""

    max_bytes: int
    timeout_seconds: float
    max_redirects: int


def is_public_address(address: IPAddress) -> bool:
    """True for globally routable unicast addresses; loopback, private, link-local, reserved etc. are not."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


def allow_any_address(address: IPAddress) -> bool:
    """The policy of `--allow-private-urls`: every address may be fetched."""
    return True


def fetch_url(url: str, limits: FetchLimits, is_allowed: AddressPolicy = is_public_address) -> bytes:
    """Return the body of `url` (http or https), following redirects, or raise `RecordRejected`."""
    deadline = time.monotonic() + limits.timeout_seconds
    current = url
    for _hop in range(limits.max_redirects + 1):
        response = _open(current, limits, is_allowed)
        try:
            if response.status in _REDIRECTS and response.headers.get("Location"):
                current = urljoin(current, response.headers["Location"])
                continue
            if response.status != 200:
                raise RecordRejected(
                    400, f"fetching _url {url} failed: the server answered HTTP {response.status}"
                )
            return _read_capped(response, url, limits, deadline)
        except Urllib3TimeoutError as error:
            raise RecordRejected(408, f"fetching _url {url} timed out: {error}") from error
        except HTTPError as error:
            raise RecordRejected(400, f"fetching _url {url} failed while reading: {error}") from error
        finally:
            response.release_conn()
    raise RecordRejected(400, f"fetching _url {url} failed: more than {limits.max_redirects} redirects")


def _open(url: str, limits: FetchLimits, is_allowed: AddressPolicy) -> urllib3.BaseHTTPResponse:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RecordRejected(400, f"_url {url} is not an http(s) URL")
    host = parts.hostname
    if not host:
        raise RecordRejected(400, f"_url {url} has no host name")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:
        raise RecordRejected(400, f"_url {url} has an invalid port") from error
    target = parts.path or "/"
    if parts.query:
        target = f"{target}?{parts.query}"
    headers = {
        "Host": parts.netloc.rsplit("@", 1)[-1],
        "User-Agent": "removebg-local-server",
        "Accept": "image/*,*/*;q=0.5",
        # A compressed body could inflate far past the byte cap inside a single decoded chunk.
        "Accept-Encoding": "identity",
    }
    unreachable: list[str] = []
    # Like any client, try each address in turn (say ::1, then 127.0.0.1); every one was checked.
    for address in _resolve_checked(host, port, url, is_allowed):
        pool = _pool(parts.scheme, address, port, host, limits.timeout_seconds)
        try:
            return pool.urlopen(
                "GET", target, headers=headers, redirect=False, retries=False, preload_content=False
            )
        except ConnectTimeoutError as error:
            unreachable.append(f"{address}: {error}")
        except Urllib3TimeoutError as error:
            raise RecordRejected(408, f"fetching _url {url} timed out: {error}") from error
        except (HTTPError, OSError) as error:
            raise RecordRejected(400, f"fetching _url {url} failed: {error}") from error
    raise RecordRejected(400, f"fetching _url {url} failed: cannot connect ({'; '.join(unreachable)})")


def _pool(
    scheme: str, address: IPAddress, port: int, host: str, timeout_seconds: float
) -> urllib3.HTTPConnectionPool:
    """A pool that connects to `address` itself, never re-resolving `host`, but verifies TLS for `host`."""
    timeout = urllib3.Timeout(connect=timeout_seconds, read=timeout_seconds)
    if scheme == "https":
        return urllib3.HTTPSConnectionPool(
            str(address),
            port,
            timeout=timeout,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
            server_hostname=host,
            assert_hostname=host,
        )
    return urllib3.HTTPConnectionPool(str(address), port, timeout=timeout, retries=False)


def _resolve_checked(host: str, port: int, url: str, is_allowed: AddressPolicy) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise RecordRejected(400, f"fetching _url {url} failed: cannot resolve host {host!r}") from error
    addresses = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos))
    if not addresses:
        raise RecordRejected(400, f"fetching _url {url} failed: host {host!r} has no address")
    refused = [address for address in addresses if not is_allowed(address)]
    if refused:
        raise RecordRejected(
            403,
            f"refusing to fetch _url {url}: {host!r} resolves to {refused[0]}, which is not a public "
            "address (start the server with --allow-private-urls to permit this)",
        )
    return addresses


def _read_capped(response: urllib3.BaseHTTPResponse, url: str, limits: FetchLimits, deadline: float) -> bytes:
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
        raise RecordRejected(413, f"_url {url} is {declared} bytes; the limit is {limits.max_bytes} bytes")
    body = bytearray()
    for chunk in response.stream(_CHUNK):
        body += chunk
        if len(body) > limits.max_bytes:
            raise RecordRejected(413, f"_url {url} is larger than the limit of {limits.max_bytes} bytes")
        # The read timeout is per socket read; this bounds a server that drips bytes forever.
        if time.monotonic() > deadline:
            raise RecordRejected(408, f"fetching _url {url} took longer than {limits.timeout_seconds:g} s")
    return bytes(body)
