"""One backend class per stored URI scheme beyond the base: local files, S3 and GCS.

Adding a store is one class here with `@register(...)`.
"""

from __future__ import annotations

import datetime
import errno
import itertools
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import IO, Any

from removebg_provider.errors import StorageError
from removebg_provider.storage.base import POOL_CONNECTIONS, Backend, Described, register, unless_changed
from removebg_provider.storage.sdk_errors import (
    error_code,
    looks_missing,
    missing_errors,
    short_error,
    storage_errors,
)
from removebg_provider.storage.uris import (
    bucket_and_folder,
    bucket_and_key,
    folder_of,
    join_uri,
    listed_uri,
    local_path,
)

# A temporary file per write, unique per process and thread without a syscall, created with the
# process umask like any other file (mkstemp would cost random names, retries and a chmod).
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_TEMPORARY_COUNTER = itertools.count()
# The largest write sent to S3 in one PutObject (it takes up to 5 GB; a larger one streams in parts).
_SINGLE_PUT_BYTES = 64 << 20


@register("file")
class LocalBackend(Backend):
    """Plain paths and file:// URIs: writes go to a temporary sibling, fsynced, renamed into place."""

    def open(self, uri: str, mode: str) -> IO[Any]:
        # The built-in open: smart_open adds nothing for a local file, and importing it costs a second.
        return open(local_path(uri), mode)

    def exists(self, uri: str) -> bool:
        return os.path.isfile(local_path(uri))

    def create_new(self, uri: str, data: bytes) -> bool:
        # Written aside, then hard-linked into place: link() refuses an existing name, and the file
        # is whole the moment its name appears. Not fsynced, unlike every other write: an exclusive
        # create arbitrates between live processes (the result store's claims, leases that their
        # holders renew), and after a power loss a claim lost or cut short is one whose lease is over.
        directory, name = os.path.split(os.path.abspath(local_path(uri)))
        aside = os.path.join(directory, f".{name}.{_temporary_suffix()}")
        try:
            try:
                handle = os.open(aside, _CREATE_NEW, 0o666)
            except FileNotFoundError:
                os.makedirs(directory, exist_ok=True)
                handle = os.open(aside, _CREATE_NEW, 0o666)
        except OSError as exc:
            raise StorageError(f"cannot create {uri}: {short_error(exc)}") from exc
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.link(aside, os.path.join(directory, name))
        except FileExistsError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot create {uri}: {short_error(exc)}") from exc
        finally:
            os.unlink(aside)
        return True

    def delete(self, uri: str) -> None:
        try:
            os.unlink(local_path(uri))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot delete {uri}: {short_error(exc)}") from exc

    def read_with_revision(self, uri: str) -> tuple[bytes, str] | None:
        # Every write renames a new file into place, so a file's content never changes: the file
        # that was opened (its inode, with its time and size against a reused number) is the revision.
        try:
            with open(local_path(uri), "rb") as stream:
                return stream.read(), _file_revision(os.fstat(stream.fileno()))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {uri}: {short_error(exc)}") from exc

    def replace_if_unchanged(self, uri: str, data: bytes, revision: str) -> bool:
        with self._unchanged(uri, revision) as unchanged:
            if unchanged:
                with self.atomic_writer(uri) as stream:
                    stream.write(data)
            return unchanged

    def delete_if_unchanged(self, uri: str, revision: str) -> bool:
        with self._unchanged(uri, revision) as unchanged:
            if unchanged:
                self.delete(uri)
            return unchanged

    @contextmanager
    def _unchanged(self, uri: str, revision: str) -> Iterator[bool]:
        """Whether `uri` is still `revision`, held true for the block by a lock on its folder.

        A disk has no compare-and-swap: every conditional change in a folder takes the same
        exclusive lock (flock: other processes, and other threads, which open it anew). Exclusive
        creates need none, as a name that exists is never created.
        """
        import fcntl

        path = local_path(uri)
        lock = os.path.join(os.path.dirname(os.path.abspath(path)), ".lock")
        try:
            handle = _opened_lock(lock)
        except FileNotFoundError:
            yield False
            return
        except OSError as exc:
            raise StorageError(f"cannot lock the folder of {uri}: {short_error(exc)}") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                current = _file_revision(os.stat(path))
            except FileNotFoundError:
                current = None
            yield current == revision
        except OSError as exc:
            raise StorageError(f"cannot change {uri}: {short_error(exc)}") from exc
        finally:
            os.close(handle)

    def fingerprint(self, uri: str, limit: int | None = None) -> str | None:
        # Only a regular file is hashed: a device or a pipe never ends (and is refused when read).
        try:
            if not stat.S_ISREG(os.stat(local_path(uri)).st_mode):
                return None
        except OSError:
            return None
        return super().fingerprint(uri, limit)

    def versions(self, uris: Sequence[str]) -> dict[str, str | None]:
        # A `stat` has no latency to overlap: threads would only contend for the interpreter.
        return {uri: self._checked_version(uri) for uri in uris}

    def version(self, uri: str) -> str | None:
        # A write renames a new file into place: a new inode and modification time, without reading it.
        try:
            found = os.stat(local_path(uri))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot check {uri}: {short_error(exc)}") from exc
        return f"stat:{found.st_size}:{found.st_mtime_ns}:{found.st_ino}"

    @contextmanager
    def atomic_writer(self, uri: str, *, size: int | None = None) -> Iterator[IO[bytes]]:
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


# GCS: how many times a read with its generation is tried while the object keeps being written.
_REVISION_READS = 3
# What S3 answers a conditional write that lost: 412 (another object is there), 409 (a concurrent
# conditional write to the same key won).
_CHANGED_CODES = ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


class _OneClientBackend(Backend):
    """A store reached through an SDK client: the one given as `client`, else one made at first use.

    That one client serves every thread and every object smart_open opens: a client is slow to make
    (credentials, an access token, a connection pool) and its creation is not thread-safe.
    """

    def __init__(self, params: Mapping[str, Any]) -> None:
        super().__init__(params)
        self._client_lock = threading.Lock()
        self._default_client: Any = None

    def transport_params(self) -> dict[str, Any]:
        # Without a client smart_open builds one for every object it opens.
        return {**self.params, "client": self._client()}

    def _client(self) -> Any:
        if "client" in self.params:
            return self.params["client"]
        with self._client_lock:
            if self._default_client is None:
                self._default_client = self._new_client()
            return self._default_client

    def _new_client(self) -> Any:
        """The client of this store from the environment's configuration, pooling `POOL_CONNECTIONS`."""
        raise NotImplementedError


@register("s3")
class S3Backend(_OneClientBackend):
    """Amazon S3 and compatible stores, through boto3 (the given client, else the environment's)."""

    lists_fingerprints = True

    @contextmanager
    def atomic_writer(self, uri: str, *, size: int | None = None) -> Iterator[IO[bytes]]:
        # Most of a run's writes are small and in hand (a cutout, an entry, a checkpoint): one
        # PutObject through smart_open's single-part writer (its own key parsing; nothing is put
        # when the block fails) instead of a multipart upload's three requests. Not when the
        # transport parameters give `client_kwargs` (encryption, ACLs): smart_open applies those
        # per kind of request, and they were written for the multipart upload.
        single = size is not None and size <= _SINGLE_PUT_BYTES and "client_kwargs" not in self.params
        opened = self._smart_open(uri, "wb", multipart_upload=False) if single else self.open(uri, "wb")
        with opened as stream:
            yield stream

    def list_prefix(self, prefix: str) -> list[str]:
        bucket, key_prefix = bucket_and_folder(prefix)
        keys: list[str] = []
        for page in (
            self._client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=key_prefix, Delimiter="/")
        ):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(f"s3://{bucket}/{key}" for key in keys)

    def create_new(self, uri: str, data: bytes) -> bool:
        bucket, key = bucket_and_key(uri)
        try:
            self._client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except storage_errors() as exc:
            # 412: the object exists; 409: a concurrent conditional write to the same key won.
            if error_code(exc) in _CHANGED_CODES:
                return False
            raise StorageError(f"cannot create {uri}: {short_error(exc)}") from exc
        return True

    def delete(self, uri: str) -> None:
        bucket, key = bucket_and_key(uri)
        try:
            self._client().delete_object(Bucket=bucket, Key=key)
        except storage_errors() as exc:
            raise StorageError(f"cannot delete {uri}: {short_error(exc)}") from exc

    def read_with_revision(self, uri: str) -> tuple[bytes, str] | None:
        bucket, key = bucket_and_key(uri)
        try:
            answer = self._client().get_object(Bucket=bucket, Key=key)
            return answer["Body"].read(), str(answer["ETag"])
        except storage_errors() as exc:
            if looks_missing(exc):
                return None
            raise StorageError(f"cannot read {uri}: {short_error(exc)}") from exc

    def replace_if_unchanged(self, uri: str, data: bytes, revision: str) -> bool:
        bucket, key = bucket_and_key(uri)
        return self._unless_changed(
            uri,
            "replace",
            lambda: self._client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=revision),
        )

    def delete_if_unchanged(self, uri: str, revision: str) -> bool:
        # Conditional deletes need s3:GetObject besides s3:DeleteObject (as a run's role has).
        bucket, key = bucket_and_key(uri)
        return self._unless_changed(
            uri, "delete", lambda: self._client().delete_object(Bucket=bucket, Key=key, IfMatch=revision)
        )

    @staticmethod
    def _unless_changed(uri: str, action: str, request: Callable[[], Any]) -> bool:
        try:
            request()
        except storage_errors() as exc:
            # 412: another revision is there; 409: a concurrent write won; 404: it went.
            if error_code(exc) in (*_CHANGED_CODES, "NoSuchKey", "404"):
                return False
            raise StorageError(f"cannot {action} {uri}: {short_error(exc)}") from exc
        return True

    def fingerprint(self, uri: str, limit: int | None = None) -> str | None:
        # An ETag is the content's MD5 (or, for a multipart upload, the MD5 of its parts' MD5s).
        bucket, key = bucket_and_key(uri)
        try:
            head = self._client().head_object(Bucket=bucket, Key=key)
        except storage_errors() as exc:
            if looks_missing(exc):
                return None
            raise StorageError(f"cannot check {uri}: {short_error(exc)}") from exc
        return _s3_fingerprint(head["ETag"], head["ContentLength"])

    def presigned_url(self, uri: str, expires_in: int) -> str:
        # Signed as the client is configured: the storage's own client signs with SigV4 (below); a
        # client given in the transport parameters signs as its Config says.
        bucket, key = bucket_and_key(uri)
        try:
            url: str = self._client().generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_in
            )
        except storage_errors() as exc:
            raise StorageError(f"cannot presign {uri}: {short_error(exc)}") from exc
        return url

    def list_described(self, first: str, last: str) -> Iterator[tuple[str, Described]]:
        bucket, key = bucket_and_key(first)
        # StartAfter is exclusive: any key just below `first` (here its own prefix) starts the listing at it.
        pages = (
            self._client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=folder_of(key), Delimiter="/", StartAfter=key[:-1])
        )
        for page in pages:
            for item in page.get("Contents", []):
                # An S3 object's version is its fingerprint (`Backend.version`).
                fingerprint = _s3_fingerprint(item["ETag"], item["Size"])
                yield f"s3://{bucket}/{item['Key']}", Described(fingerprint, fingerprint)

    def _new_client(self) -> Any:
        import boto3
        from botocore.config import Config

        # SigV4 for presigned URLs: boto3 would otherwise sign them with SigV2 where S3 still
        # accepts it, which AWS deprecated and regions opened since 2014 refuse.
        return boto3.client(
            "s3", config=Config(max_pool_connections=POOL_CONNECTIONS, signature_version="s3v4")
        )


@register("gs")
class GcsBackend(_OneClientBackend):
    """Google Cloud Storage, through google-cloud-storage (the given client, else the environment's)."""

    lists_fingerprints = True

    def list_prefix(self, prefix: str) -> list[str]:
        bucket, key_prefix = bucket_and_folder(prefix)
        blobs = self._client().list_blobs(bucket, prefix=key_prefix, delimiter="/")
        return sorted(f"gs://{bucket}/{blob.name}" for blob in blobs)

    def fingerprint(self, uri: str, limit: int | None = None) -> str | None:
        blob = self._blob(uri)
        return None if blob is None else _gcs_fingerprint(listed_uri(uri), blob)

    def list_described(self, first: str, last: str) -> Iterator[tuple[str, Described]]:
        bucket, first_key = bucket_and_key(first)
        # The listing starts at `first` on the server; the caller stops reading it past `last`.
        blobs = self._client().list_blobs(
            bucket, prefix=folder_of(first_key), delimiter="/", start_offset=first_key
        )
        for blob in blobs:
            uri = f"gs://{bucket}/{blob.name}"
            yield uri, Described(_gcs_fingerprint(uri, blob), _gcs_version(blob))

    def version(self, uri: str) -> str | None:
        blob = self._blob(uri)
        return None if blob is None else _gcs_version(blob)

    def create_new(self, uri: str, data: bytes) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        upload = self._new_blob(uri).upload_from_string
        return unless_changed(
            uri, "create", lambda: upload(data, if_generation_match=0), (PreconditionFailed,)
        )

    def delete(self, uri: str) -> None:
        try:
            self._new_blob(uri).delete()
        except missing_errors():
            pass
        except storage_errors() as exc:
            raise StorageError(f"cannot delete {uri}: {short_error(exc)}") from exc

    def read_with_revision(self, uri: str) -> tuple[bytes, str] | None:
        from google.api_core.exceptions import PreconditionFailed

        changed: tuple[type[BaseException], ...] = (PreconditionFailed, *missing_errors())
        # The generation comes with the metadata and the download must be that generation: written
        # again in between, both are read once more.
        for _attempt in range(_REVISION_READS):
            blob = self._blob(uri)
            if blob is None:
                return None
            try:
                return blob.download_as_bytes(if_generation_match=blob.generation), str(blob.generation)
            except changed:
                continue
            except storage_errors() as exc:
                raise StorageError(f"cannot read {uri}: {short_error(exc)}") from exc
        raise StorageError(f"cannot read {uri}: written again at every one of {_REVISION_READS} reads")

    def replace_if_unchanged(self, uri: str, data: bytes, revision: str) -> bool:
        return self._unless_changed(
            uri,
            "replace",
            lambda: self._new_blob(uri).upload_from_string(data, if_generation_match=int(revision)),
        )

    def delete_if_unchanged(self, uri: str, revision: str) -> bool:
        return self._unless_changed(
            uri, "delete", lambda: self._new_blob(uri).delete(if_generation_match=int(revision))
        )

    @staticmethod
    def _unless_changed(uri: str, action: str, request: Callable[[], Any]) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        return unless_changed(uri, action, request, (PreconditionFailed, *missing_errors()))

    def presigned_url(self, uri: str, expires_in: int) -> str:
        try:
            url: str = self._new_blob(uri).generate_signed_url(
                version="v4", expiration=datetime.timedelta(seconds=expires_in), method="GET"
            )
        except AttributeError as exc:  # google-auth's answer for credentials holding no private key
            raise StorageError(
                f"cannot presign {uri}: the Google credentials cannot sign (use a service account key)"
            ) from exc
        except storage_errors() as exc:
            raise StorageError(f"cannot presign {uri}: {short_error(exc)}") from exc
        return url

    def _new_blob(self, uri: str) -> Any:
        bucket, key = bucket_and_key(uri)
        return self._client().bucket(bucket).blob(key)

    def _blob(self, uri: str) -> Any:
        bucket, key = bucket_and_key(uri)
        try:
            return self._client().bucket(bucket).get_blob(key)
        except storage_errors() as exc:
            raise StorageError(f"cannot check {uri}: {short_error(exc)}") from exc

    def _new_client(self) -> Any:
        from google.cloud import storage as gcs
        from requests.adapters import HTTPAdapter

        # One client keeps its credentials' access token between calls; `_http` is its session.
        client = gcs.Client()
        pooled = HTTPAdapter(pool_maxsize=POOL_CONNECTIONS)
        client._http.mount("https://", pooled)
        client._http.mount("http://", pooled)
        # Under mutual TLS google-auth had mounted an adapter carrying the workload's certificate,
        # which the pool just replaced: mounted again, it keeps the pool's size.
        client._http.configure_mtls_channel()
        return client


def _gcs_fingerprint(uri: str, blob: Any) -> str:
    # The MD5 names the content; a composite object has none, and its generation names one version.
    if blob.md5_hash:
        return f"md5:{blob.md5_hash}:{blob.size}"
    return f"generation:{uri}:{blob.generation}"


def _gcs_version(blob: Any) -> str:
    return f"generation:{blob.generation}"


def _s3_fingerprint(etag: str, size: int) -> str:
    return "etag:" + etag.strip('"') + f":{size}"


def _opened_lock(lock: str) -> int:
    """A descriptor of the lock file `lock`, created readable and writable by all the umask allows."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError as denied:
        # Made by another user who shares the store (root's `cache prune`, say): flock needs only a
        # descriptor, and reading is enough for one. A folder this user cannot write and without a
        # lock yet is the permission problem it is, not a claim that changed.
        try:
            return os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            raise denied from None


def _file_revision(found: os.stat_result) -> str:
    return f"{found.st_dev}:{found.st_ino}:{found.st_mtime_ns}:{found.st_size}"


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
