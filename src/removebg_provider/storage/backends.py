"""One backend class per URI scheme, registered by scheme: how each store opens, checks, writes and lists.

A scheme without a registered backend goes through `Backend` itself, i.e. smart_open as it is (which
refuses schemes it has no transport for). Adding a store is one class here with `@register(...)`.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import IO, Any, ClassVar, TypeVar
from urllib.parse import urlparse

import smart_open

from removebg_provider.errors import StorageError
from removebg_provider.storage.uris import join_uri, local_path

AZURE_CONNECTION_ENV = "AZURE_STORAGE_CONNECTION_STRING"

# A temporary file per write, unique per process and thread without a syscall, created with the
# process umask like any other file (mkstemp would cost random names, retries and a chmod).
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_TEMPORARY_COUNTER = itertools.count()

_BackendType = TypeVar("_BackendType", bound="type[Backend]")


class Backend:
    """Objects at URIs smart_open knows; subclasses add what their scheme does better or differently.

    `params` are the scheme's smart_open transport parameters, e.g. `{"client": boto3_client}`.
    """

    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params

    def open(self, uri: str, mode: str) -> IO[Any]:
        """Open `uri` through smart_open with this backend's transport parameters."""
        opened: IO[Any] = smart_open.open(
            uri, mode, transport_params=dict(self.params), compression="disable"
        )
        return opened

    def exists(self, uri: str) -> bool:
        """Whether an object is at `uri` (a missing object is False; other failures raise)."""
        try:
            with self.open(uri, "rb"):
                return True
        except missing_errors():
            return False
        except storage_errors() as exc:
            if _looks_missing(exc):
                return False
            raise StorageError(f"cannot check {uri}: {short_error(exc)}") from exc

    @contextmanager
    def atomic_writer(self, uri: str) -> Iterator[IO[bytes]]:
        """Object stores publish an upload only when smart_open closes it cleanly, and abort it otherwise.

        S3 completes a multipart upload (or puts a single part) on close and aborts it on error; GCS
        finalizes its resumable upload on close and deletes it on error; Azure commits the block list
        on close and never on error. A reader therefore sees the whole object or the previous one.
        """
        with self.open(uri, "wb") as stream:
            yield stream

    def list_prefix(self, prefix: str) -> list[str]:
        """URIs of the objects directly under `prefix`."""
        raise StorageError(f"cannot list {prefix}: listing is not supported for {urlparse(prefix).scheme}://")


_REGISTRY: dict[str, type[Backend]] = {}


def register(*schemes: str) -> Callable[[_BackendType], _BackendType]:
    """Class decorator: the backend serves `schemes`."""

    def add(backend: _BackendType) -> _BackendType:
        backend.schemes = schemes
        for scheme in schemes:
            _REGISTRY[scheme] = backend
        return backend

    return add


def backend_class(scheme: str) -> type[Backend]:
    """The backend registered for `scheme`, or plain smart_open for any other."""
    return _REGISTRY.get(scheme, Backend)


@register("file")
class LocalBackend(Backend):
    """Plain paths and file:// URIs: writes go to a temporary sibling, fsynced, renamed into place."""

    def open(self, uri: str, mode: str) -> IO[Any]:
        return super().open(local_path(uri), mode)

    def exists(self, uri: str) -> bool:
        return os.path.isfile(local_path(uri))

    @contextmanager
    def atomic_writer(self, uri: str) -> Iterator[IO[bytes]]:
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
                stream.flush()
                # On disk before the name points at it: after a crash or power loss the name holds
                # the whole new content or the old one, never an empty or torn file.
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
        _fsync_directory(directory)

    def list_prefix(self, prefix: str) -> list[str]:
        directory = local_path(prefix)
        if not os.path.isdir(directory):
            return []
        return sorted(
            join_uri(prefix, name)
            for name in os.listdir(directory)
            if not name.startswith(".") and os.path.isfile(os.path.join(directory, name))
        )


@register("s3")
class S3Backend(Backend):
    """Amazon S3 and compatible stores, through boto3 (the given client, else the environment's)."""

    def list_prefix(self, prefix: str) -> list[str]:
        import boto3

        bucket, key_prefix = _bucket_and_folder(prefix)
        client = self.params.get("client") or boto3.client("s3")
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=key_prefix, Delimiter="/"
        ):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(f"s3://{bucket}/{key}" for key in keys)


@register("gs")
class GcsBackend(Backend):
    """Google Cloud Storage, through google-cloud-storage (the given client, else the environment's)."""

    def list_prefix(self, prefix: str) -> list[str]:
        from google.cloud import storage as gcs

        bucket, key_prefix = _bucket_and_folder(prefix)
        client = self.params.get("client") or gcs.Client()
        blobs = client.list_blobs(bucket, prefix=key_prefix, delimiter="/")
        return sorted(f"gs://{bucket}/{blob.name}" for blob in blobs)


@register("az", "azure")
class AzureBackend(Backend):
    """Azure Blob Storage. `az://` is the fsspec/adlfs spelling users know; smart_open calls it `azure://`.

    S3 and GCS SDKs read their environment themselves; smart_open needs an Azure client, made from
    AZURE_STORAGE_CONNECTION_STRING when no client is given.
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        connection_string = os.environ.get(AZURE_CONNECTION_ENV)
        if "client" not in params and connection_string:
            params = {**params, "client": _azure_client(connection_string)}
        super().__init__(params)

    def open(self, uri: str, mode: str) -> IO[Any]:
        if uri.startswith("az://"):
            uri = "azure" + uri[len("az") :]
        return super().open(uri, mode)

    def list_prefix(self, prefix: str) -> list[str]:
        if "client" not in self.params:
            raise StorageError(
                f"cannot list {prefix}: Azure Blob needs a client (set {AZURE_CONNECTION_ENV} "
                "or pass wasb_conn_id)"
            )
        bucket, key_prefix = _bucket_and_folder(prefix)
        container = self.params["client"].get_container_client(bucket)
        names = [blob.name for blob in container.walk_blobs(name_starts_with=key_prefix, delimiter="/")]
        scheme = urlparse(prefix).scheme
        return sorted(f"{scheme}://{bucket}/{name}" for name in names if not name.endswith("/"))


def _bucket_and_folder(prefix: str) -> tuple[str, str]:
    parsed = urlparse(prefix)
    folder = parsed.path.strip("/")
    return parsed.netloc, f"{folder}/" if folder else ""


def _fsync_directory(directory: str) -> None:
    """Make a rename in `directory` durable (POSIX); filesystems that cannot sync a folder are skipped."""
    if os.name != "posix":
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(handle)


def _temporary_suffix() -> str:
    return f"{os.getpid()}-{threading.get_ident()}-{next(_TEMPORARY_COUNTER)}.tmp"


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
def storage_errors() -> tuple[type[BaseException], ...]:
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
def missing_errors() -> tuple[type[BaseException], ...]:
    """What the SDKs raise for an object that is not there."""
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


def short_error(exc: BaseException) -> str:
    """An SDK error in at most 300 characters, for messages that name the object."""
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
