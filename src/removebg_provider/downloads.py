"""The HTTP download client of the API's temporary output URLs: pooled, retried, size-capped, verified.

Downloads go through pooled connections that never carry the API token, through the proxy the
environment names (HTTP_PROXY, HTTPS_PROXY, NO_PROXY) if any; transient failures (connection
errors, timeouts, 5xx, short bodies) are retried, gone URLs (403, 404, 410) are not, except a 404
from a URL the API has just answered: object stores may serve a fresh object a moment late.
"""

from __future__ import annotations

import threading
import urllib.request
from typing import Any

import tenacity
import urllib3
from requests.utils import DEFAULT_CA_BUNDLE_PATH

from removebg_provider.errors import CopyError, OutputGoneError
from removebg_provider.storage.sdk_errors import short_error
from removebg_provider.vocabulary import RowStatus


class Downloader:
    """Pooled, retried, size-capped GETs; failures raise CopyError with the row status they earn."""

    def __init__(
        self,
        *,
        pool_size: int = 8,
        timeout: float = 60.0,
        max_attempts: int = 4,
        max_bytes: int = 100 << 20,
    ) -> None:
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.max_bytes = max_bytes
        # urllib3 without requests on top: a third of the CPU per copy went to requests' own
        # layers (sessions, hooks, cookies, environment merging); redirects are followed as
        # requests would, certificates checked against the same bundle.
        self._pool_options: dict[str, Any] = {
            "num_pools": pool_size,
            "maxsize": pool_size,
            "retries": urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=30),
            "ca_certs": DEFAULT_CA_BUNDLE_PATH,
        }
        self._direct = urllib3.PoolManager(**self._pool_options)
        # Read once: scanning os.environ for proxies on every download showed up in profiles.
        self._proxies = urllib.request.getproxies()
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._proxied_lock = threading.Lock()

    def download(self, url: str, *, fresh: bool = False) -> bytes:
        """The bytes at `url`, retried on transient failures.

        `fresh`: the API answered this URL moments ago, so a 404 is retried like a transient failure
        (an object store may not serve a new object yet). A URL still gone raises OutputGoneError.
        """

        def worth_retrying(exc: BaseException) -> bool:
            if isinstance(exc, _GoneDownload):
                return fresh and exc.status == 404
            return isinstance(exc, urllib3.exceptions.HTTPError | _TransientDownload)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=10),
            retry=tenacity.retry_if_exception(worth_retrying),
            reraise=True,
        )
        try:
            return retrying(self._download_once, url)
        except _GoneDownload as exc:
            raise OutputGoneError(RowStatus.OUTPUT_EXPIRED, str(exc)) from exc
        except (urllib3.exceptions.HTTPError, _TransientDownload) as exc:
            raise CopyError(
                RowStatus.BAD_OUTPUT,
                f"cannot download {strip_query(url)} after {self.max_attempts} attempts: {short_error(exc)}",
            ) from exc

    def close(self) -> None:
        """Release pooled connections."""
        self._direct.clear()
        with self._proxied_lock:
            for manager in self._proxied.values():
                manager.clear()

    def _download_once(self, url: str) -> bytes:
        response = self._pool_for(url).request("GET", url, preload_content=False, timeout=self.timeout)
        try:
            if response.status in (403, 404, 410):
                raise _GoneDownload(
                    response.status,
                    f"HTTP {response.status} from {strip_query(url)}: gone (API outputs live 24 hours)",
                )
            if response.status >= 400:
                raise _TransientDownload(f"HTTP {response.status} from {strip_query(url)}")
            data: bytes = response.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise CopyError(
                    RowStatus.BAD_OUTPUT, f"{strip_query(url)} is over the {self.max_bytes}-byte limit"
                )
            expected = response.headers.get("Content-Length")
            if expected is not None and expected.isdigit() and int(expected) != len(data):
                raise _TransientDownload(f"{strip_query(url)} ended after {len(data)} of {expected} bytes")
        except BaseException:
            # The body may be partly unread: this connection must not serve another download.
            response.close()
            raise
        finally:
            response.release_conn()
        if not data:
            raise _TransientDownload(f"{strip_query(url)} returned an empty body")
        return data

    def _pool_for(self, url: str) -> Any:
        if not self._proxies:
            return self._direct
        scheme, _, rest = url.partition("://")
        proxy = self._proxies.get(scheme.lower()) or self._proxies.get("all")
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        if not proxy or urllib.request.proxy_bypass(host):
            return self._direct
        with self._proxied_lock:
            if proxy not in self._proxied:
                self._proxied[proxy] = urllib3.ProxyManager(proxy, **self._pool_options)
            return self._proxied[proxy]


class _GoneDownload(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _TransientDownload(Exception):
    pass


def strip_query(url: str) -> str:
    """The URL without its query string: presigned output URLs carry credentials there."""
    return url.split("?", 1)[0]
