"""Read and write objects at any URI smart_open knows, atomically, and name output keys."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import re
import threading
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlparse

import smart_open
import tenacity

from removebg_provider.errors import StorageError

REMOTE_SCHEMES = frozenset({"s3", "gs", "az", "azure", "http", "https"})
OUTPUT_KINDS = ("cutout", "mask", "whitebg")
DEFAULT_OUTPUT_KEY_TEMPLATE = "{id}{suffix}.{ext}"
AZURE_CONNECTION_ENV = "AZURE_STORAGE_CONNECTION_STRING"

# A temporary file per write, unique per process and thread without a syscall, created with the
# process umask like any other file (mkstemp would cost random names, retries and a chmod).
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_TEMPORARY_COUNTER = itertools.count()
_AZURE_SCHEMES = ("az", "azure")
_SUFFIXES = {"cutout": "", "mask": ".mask", "whitebg": ".whitebg"}
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._=+-]+")
_MAX_KEY_ID_LENGTH = 120
_MAGIC = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpg": (b"\xff\xd8\xff",),
    "webp": (b"RIFF",),
}


@dataclass(frozen=True)
class Storage:
    """Object access for every URI scheme the pipeline meets.

    `transport_params` maps a scheme (`s3`, `gs`, `az`, ...) to smart_open transport parameters,
    for example `{"s3": {"client": boto3_client}}`; without them each SDK reads its standard
    environment configuration.
    """

    transport_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    write_attempts: int = 4

    def open(self, uri: str, mode: str = "rb") -> IO[Any]:
        """Open `uri` through smart_open with the scheme's transport parameters."""
        scheme = scheme_of(uri)
        params = dict(self._params(scheme))
        if scheme == "az":
            # smart_open names Azure Blob `azure://`; `az://` is the fsspec/adlfs spelling users know.
            uri = "azure" + uri[len("az") :]
        opened: IO[Any] = smart_open.open(uri, mode, transport_params=params, compression="disable")
        return opened

    def _params(self, scheme: str) -> Mapping[str, Any]:
        if scheme in _AZURE_SCHEMES:
            for alias in _AZURE_SCHEMES:
                if alias in self.transport_params:
                    return self.transport_params[alias]
            connection_string = os.environ.get(AZURE_CONNECTION_ENV)
            # S3 and GCS SDKs read their environment themselves; smart_open needs an Azure client.
            return {"client": _azure_client(connection_string)} if connection_string else {}
        return self.transport_params.get(scheme, {})

    def read_bytes(self, uri: str, limit: int | None = None) -> bytes:
        """Read the whole object at `uri`; raises StorageError when missing or over `limit` bytes."""
        try:
            with self.open(uri, "rb") as stream:
                data: bytes = stream.read(limit + 1 if limit is not None else -1)
        except _storage_errors() as exc:
            raise StorageError(f"cannot read {uri}: {_short(exc)}") from exc
        if limit is not None and len(data) > limit:
            raise StorageError(f"{uri} is larger than the {limit}-byte limit")
        return data

    def exists(self, uri: str) -> bool:
        """Whether an object is at `uri` (a missing object is False; other failures raise)."""
        if scheme_of(uri) == "file":
            return os.path.isfile(local_path(uri))
        try:
            with self.open(uri, "rb"):
                return True
        except _missing_errors():
            return False
        except _storage_errors() as exc:
            if _looks_missing(exc):
                return False
            raise StorageError(f"cannot check {uri}: {_short(exc)}") from exc

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write `data` to `uri` atomically, retrying failed writes before raising StorageError."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.write_attempts),
            wait=tenacity.wait_random_exponential(multiplier=0.2, max=5),
            retry=tenacity.retry_if_exception_type(_storage_errors()),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt, self.atomic_writer(uri) as stream:
                    stream.write(data)
        except _storage_errors() as exc:
            raise StorageError(
                f"cannot write {uri} after {self.write_attempts} attempts: {_short(exc)}"
            ) from exc

    @contextmanager
    def atomic_writer(self, uri: str) -> Iterator[IO[bytes]]:
        """Yield a binary stream whose content appears at `uri` only if the block succeeds.

        Local files go to a temporary sibling that is renamed into place; object stores publish
        an upload only when smart_open closes it cleanly, and abort it on an exception.
        """
        if scheme_of(uri) != "file":
            with self.open(uri, "wb") as stream:
                yield stream
            return
        path = local_path(uri)
        directory, name = os.path.split(os.path.abspath(path))
        temporary = os.path.join(directory, f".{name}.{_temporary_suffix()}")
        try:
            handle = os.open(temporary, _CREATE_NEW, 0o666)
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)
            handle = os.open(temporary, _CREATE_NEW, 0o666)
        try:
            with os.fdopen(handle, "wb") as stream:
                yield stream
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    def list_prefix(self, prefix: str) -> list[str]:
        """URIs of the objects directly under `prefix` (local folders only; others via their SDK)."""
        if scheme_of(prefix) == "file":
            directory = local_path(prefix)
            if not os.path.isdir(directory):
                return []
            return sorted(
                join_uri(prefix, name)
                for name in os.listdir(directory)
                if not name.startswith(".") and os.path.isfile(os.path.join(directory, name))
            )
        return self._list_remote(prefix)

    def _list_remote(self, prefix: str) -> list[str]:
        parsed = urlparse(prefix)
        bucket, folder = parsed.netloc, parsed.path.strip("/")
        key_prefix = f"{folder}/" if folder else ""
        scheme = parsed.scheme
        params = self._params(scheme)
        if scheme == "s3":
            import boto3

            client = params.get("client") or boto3.client("s3")
            keys: list[str] = []
            for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=key_prefix, Delimiter="/"
            ):
                keys.extend(item["Key"] for item in page.get("Contents", []))
        elif scheme == "gs":
            from google.cloud import storage as gcs

            client = params.get("client") or gcs.Client()
            keys = [blob.name for blob in client.list_blobs(bucket, prefix=key_prefix, delimiter="/")]
        elif scheme in _AZURE_SCHEMES:
            if "client" not in params:
                raise StorageError(
                    f"cannot list {prefix}: Azure Blob needs a client (set AZURE_STORAGE_CONNECTION_STRING "
                    "or pass wasb_conn_id)"
                )
            container = params["client"].get_container_client(bucket)
            keys = [blob.name for blob in container.walk_blobs(name_starts_with=key_prefix, delimiter="/")]
            keys = [key for key in keys if not key.endswith("/")]
        else:
            raise StorageError(f"cannot list {prefix}: listing is not supported for {scheme}://")
        return sorted(f"{scheme}://{bucket}/{key}" for key in keys)


def scheme_of(uri: str) -> str:
    """The URI's scheme, with plain paths and Windows drive letters counted as `file`."""
    parsed = urlparse(uri)
    if len(parsed.scheme) <= 1:
        return "file"
    return parsed.scheme.lower()


def local_path(uri: str) -> str:
    """The filesystem path of a `file://` URI or a plain path."""
    return urlparse(uri).path if uri.startswith("file://") else uri


def join_uri(prefix: str, key: str) -> str:
    """Join a prefix and a relative key with exactly one slash."""
    return f"{prefix.rstrip('/')}/{key.lstrip('/')}"


def safe_key_id(record_id: str) -> str:
    """Make a record id safe as one object-key segment: no separators, `..` or control characters.

    Long ids are shortened with a hash so distinct ids stay distinct; two ids that clean to the
    same key are the caller's to detect (the planner refuses them).
    """
    cleaned = _UNSAFE_KEY_CHARS.sub("_", record_id)
    cleaned = re.sub(r"\.{2,}", "_", cleaned).strip("._") or "_"
    if len(cleaned) > _MAX_KEY_ID_LENGTH:
        digest = hashlib.sha256(record_id.encode()).hexdigest()[:10]
        cleaned = f"{cleaned[: _MAX_KEY_ID_LENGTH - 11]}-{digest}"
    return cleaned


def output_uri(output_prefix: str, record_id: str, kind: str, ext: str, template: str) -> str:
    """The durable URI of one output of one record, from the key template.

    The template may use `{id}` (the key-safe id), `{kind}` (cutout, mask, whitebg),
    `{suffix}` ("", ".mask", ".whitebg") and `{ext}`.
    """
    key = template.format(id=safe_key_id(record_id), kind=kind, suffix=_SUFFIXES[kind], ext=ext)
    if ".." in key.split("/") or key.startswith("/"):
        raise StorageError(f"output key template {template!r} makes an unsafe key {key!r}")
    return join_uri(output_prefix, key)


def looks_like_image(data: bytes, ext: str) -> bool:
    """Whether `data` starts with the signature of an `ext` image (png, jpg or webp)."""
    if ext == "webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return any(data.startswith(magic) for magic in _MAGIC.get(ext, ()))


def _temporary_suffix() -> str:
    return f"{os.getpid()}-{threading.get_ident()}-{next(_TEMPORARY_COUNTER)}.tmp"


def unique_name(prefix: str) -> str:
    """A collision-free object name, for checkpoints written by concurrent workers."""
    return f"{prefix}-{uuid.uuid4().hex}"


@functools.cache
def _azure_client(connection_string: str) -> Any:
    try:
        from azure.storage.blob import BlobServiceClient
    except ImportError as exc:
        raise StorageError(
            f"{AZURE_CONNECTION_ENV} is set but azure-storage-blob is not installed; "
            "pip install 'airflow-provider-removebg[azure]'"
        ) from exc
    return BlobServiceClient.from_connection_string(connection_string)


@functools.cache
def _storage_errors() -> tuple[type[BaseException], ...]:
    """What the object-store SDKs raise for a failed read or write; they do not all use OSError."""
    # smart_open raises NotImplementedError for a scheme it has no transport for.
    errors: list[type[BaseException]] = [OSError, ValueError, NotImplementedError]
    try:
        import botocore.exceptions

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    except ImportError:
        pass
    try:
        import google.api_core.exceptions

        errors.append(google.api_core.exceptions.GoogleAPIError)
    except ImportError:
        pass
    try:
        import azure.core.exceptions

        errors.append(azure.core.exceptions.AzureError)
    except ImportError:
        pass
    return tuple(errors)


@functools.cache
def _missing_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [FileNotFoundError]
    try:
        import google.api_core.exceptions

        errors.append(google.api_core.exceptions.NotFound)
    except ImportError:
        pass
    try:
        import azure.core.exceptions

        errors.append(azure.core.exceptions.ResourceNotFoundError)
    except ImportError:
        pass
    return tuple(errors)


def _looks_missing(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        marker in text for marker in ("404", "not found", "nosuchkey", "does not exist", "blobnotfound")
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class CopyError(StorageError):
    """An output could not be copied; `status_code` is the row status it earns."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class OutputCopier:
    """Copies API outputs from their temporary URLs into durable storage, verified.

    Downloads go through pooled connections that never carry the API token, through the proxy the
    environment names (HTTP_PROXY, HTTPS_PROXY, NO_PROXY) if any; transient failures (connection
    errors, timeouts, 5xx) are retried, expired URLs (403, 404, 410) are not.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        pool_size: int = 8,
        timeout: float = 60.0,
        max_attempts: int = 4,
        max_bytes: int = 100 << 20,
    ) -> None:
        import urllib3
        from requests.utils import DEFAULT_CA_BUNDLE_PATH

        self.storage = storage
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

    def copy(self, source_url: str, destination_uri: str, ext: str) -> bytes:
        """Copy one output and return its bytes; raises CopyError with the row status it earns."""
        data = self.download(source_url)
        if not looks_like_image(data, ext):
            raise CopyError(502, f"the API output at {_strip_query(source_url)} is not a {ext} image")
        try:
            self.storage.write_bytes(destination_uri, data)
        except StorageError as exc:
            raise CopyError(507, str(exc)) from exc
        return data

    def download(self, url: str) -> bytes:
        """The bytes at a temporary output URL, retried on transient failures."""
        import urllib3

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=10),
            retry=tenacity.retry_if_exception_type((urllib3.exceptions.HTTPError, _TransientDownload)),
            reraise=True,
        )
        try:
            return retrying(self._download_once, url)
        except _ExpiredDownload as exc:
            raise CopyError(410, str(exc)) from exc
        except (urllib3.exceptions.HTTPError, _TransientDownload) as exc:
            raise CopyError(
                502, f"cannot download {_strip_query(url)} after {self.max_attempts} attempts: {_short(exc)}"
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
                raise _ExpiredDownload(
                    f"the API output {_strip_query(url)} is gone (HTTP {response.status}); "
                    "temporary outputs live 24 hours"
                )
            if response.status >= 400:
                raise _TransientDownload(f"HTTP {response.status} from {_strip_query(url)}")
            data: bytes = response.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise CopyError(502, f"{_strip_query(url)} is over the {self.max_bytes}-byte limit")
            expected = response.headers.get("Content-Length")
            if expected is not None and expected.isdigit() and int(expected) != len(data):
                raise _TransientDownload(f"{_strip_query(url)} ended after {len(data)} of {expected} bytes")
        except BaseException:
            # The body may be partly unread: this connection must not serve another download.
            response.close()
            raise
        finally:
            response.release_conn()
        if not data:
            raise _TransientDownload(f"{_strip_query(url)} returned an empty body")
        return data

    def _pool_for(self, url: str) -> Any:
        if not self._proxies:
            return self._direct
        scheme, _, rest = url.partition("://")
        proxy = self._proxies.get(scheme.lower()) or self._proxies.get("all")
        host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
        if not proxy or urllib.request.proxy_bypass(host):
            return self._direct
        import urllib3

        with self._proxied_lock:
            if proxy not in self._proxied:
                self._proxied[proxy] = urllib3.ProxyManager(proxy, **self._pool_options)
            return self._proxied[proxy]


class _ExpiredDownload(Exception):
    pass


class _TransientDownload(Exception):
    pass


def _strip_query(url: str) -> str:
    # Presigned output URLs carry credentials in their query string.
    return url.split("?", 1)[0]
