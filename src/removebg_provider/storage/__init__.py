"""The Storage facade: read and write objects at any URI, atomically, through the backend of its scheme."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import tenacity

from removebg_provider.errors import ConfigurationError, MissingObjectError, StorageError

# Imported for the backends they register: file, s3 and gs; http and https (az and azure below).
from removebg_provider.storage import backends, web  # noqa: F401
from removebg_provider.storage.azure_blob import AZURE_CONNECTION_ENV
from removebg_provider.storage.base import Backend, backend_class
from removebg_provider.storage.sdk_errors import says_missing, short_error, storage_errors
from removebg_provider.storage.uris import comparable_uri, join_uri, local_path, scheme_of, unique_name

__all__ = [
    "AZURE_CONNECTION_ENV",
    "MAX_PRESIGN_SECONDS",
    "Storage",
    "check_presign_seconds",
    "comparable_uri",
    "join_uri",
    "local_path",
    "scheme_of",
    "unique_name",
]

# The longest life S3 (SigV4) and GCS (V4) allow a presigned URL: 7 days.
MAX_PRESIGN_SECONDS = 7 * 24 * 3600


def check_presign_seconds(value: object) -> int:
    """`value` when it is a whole number of seconds a presigned URL may live (1 to 7 days)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PRESIGN_SECONDS:
        raise ConfigurationError(
            f"a presigned URL lives 1 to {MAX_PRESIGN_SECONDS} seconds (7 days), not {value!r}"
        )
    return value


@dataclass(frozen=True)
class Storage:
    """Object access for every URI scheme the pipeline meets.

    `transport_params` maps a scheme (`s3`, `gs`, `az`, ...) to smart_open transport parameters,
    for example `{"s3": {"client": boto3_client}}`; without them each SDK reads its standard
    environment configuration.
    """

    transport_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    write_attempts: int = 4
    _backends: dict[type[Backend], Backend] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def open(self, uri: str, mode: str = "rb") -> IO[Any]:
        """Open `uri` with its scheme's transport parameters."""
        return self._backend(uri).open(uri, mode)

    def read_bytes(self, uri: str, limit: int | None = None) -> bytes:
        """Read the whole object at `uri`; raises StorageError when unreadable or over `limit` bytes.

        MissingObjectError (a StorageError) when nothing is there, so a caller expecting misses
        needs no second request to tell.
        """
        try:
            with self.open(uri, "rb") as stream:
                data: bytes = stream.read(limit + 1 if limit is not None else -1)
        except storage_errors() as exc:
            error = MissingObjectError if says_missing(exc) else StorageError
            raise error(f"cannot read {uri}: {short_error(exc)}") from exc
        if limit is not None and len(data) > limit:
            raise StorageError(f"{uri} is larger than the {limit}-byte limit")
        return data

    def exists(self, uri: str) -> bool:
        """Whether an object is at `uri` (a missing object is False; other failures raise)."""
        return self._backend(uri).exists(uri)

    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write `data` to `uri` atomically, retrying failed writes before raising StorageError."""
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.write_attempts),
            wait=tenacity.wait_random_exponential(multiplier=0.2, max=5),
            retry=tenacity.retry_if_exception_type(storage_errors()),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt, self.atomic_writer(uri, size=len(data)) as stream:
                    stream.write(data)
        except storage_errors() as exc:
            raise StorageError(
                f"cannot write {uri} after {self.write_attempts} attempts: {short_error(exc)}"
            ) from exc

    @contextmanager
    def atomic_writer(self, uri: str, *, size: int | None = None) -> Iterator[IO[bytes]]:
        """Yield a binary stream whose content appears at `uri` only if the block succeeds.

        `size`: how many bytes the block writes, when known (S3 then takes up to 64 MiB in one PUT).
        """
        with self._backend(uri).atomic_writer(uri, size=size) as stream:
            yield stream

    def list_prefix(self, prefix: str) -> list[str]:
        """URIs of the objects directly under `prefix`, sorted."""
        return self._backend(prefix).list_prefix(prefix)

    def create_new(self, uri: str, data: bytes) -> bool:
        """Write `data` to `uri` only if nothing is there (one conditional request); False if something is."""
        return self._backend(uri).create_new(uri, data)

    def delete(self, uri: str) -> None:
        """Remove the object at `uri`; a missing object is not an error."""
        self._backend(uri).delete(uri)

    def read_with_revision(self, uri: str) -> tuple[bytes, str] | None:
        """The bytes at `uri` and a token naming that write of them (None when missing), in one read.

        With `replace_if_unchanged` and `delete_if_unchanged`: read, decide, then change the object
        only if nobody wrote it in between (local files, s3://, gs://, az://).
        """
        return self._backend(uri).read_with_revision(uri)

    def replace_if_unchanged(self, uri: str, data: bytes, revision: str) -> bool:
        """Write `data` at `uri` only if the object is still `revision` (from `read_with_revision`)."""
        return self._backend(uri).replace_if_unchanged(uri, data, revision)

    def delete_if_unchanged(self, uri: str, revision: str) -> bool:
        """Remove the object at `uri` only if it is still `revision` (from `read_with_revision`)."""
        return self._backend(uri).delete_if_unchanged(uri, revision)

    def version(self, uri: str) -> str | None:
        """A token that changes whenever the object at `uri` is written again; None when it is missing."""
        return self._backend(uri).version(uri)

    def presigned_url(self, uri: str, expires_in: int) -> str:
        """An http(s) URL that lets anyone GET the object at `uri` for `expires_in` seconds (1 to 604800).

        s3:// (as the client signs), gs:// (V4, with credentials that can sign) and az:// (a read-only
        SAS signed with the account key); StorageError for other schemes or credentials that cannot sign.
        """
        check_presign_seconds(expires_in)
        return self._backend(uri).presigned_url(uri, expires_in)

    def fingerprints(
        self, uris: Sequence[str], limit: int | None = None, *, allow_private_urls: bool = False
    ) -> dict[str, str | None]:
        """What identifies the content of each object (its scheme's metadata, else a hash of its bytes).

        None for an object that is missing, cannot be described, or (when its bytes are hashed) is
        over `limit` bytes. Each scheme describes its URIs at once, so an object store can answer
        many from one listing. An http(s) URL is asked only at public addresses (None for another,
        with a warning) unless `allow_private_urls`: whoever writes a manifest chooses its URLs.
        """
        found: dict[str, str | None] = {}
        for backend, group in self._by_backend(uris).items():
            found.update(backend.fingerprints(group, limit, allow_private_urls=allow_private_urls))
        return found

    def versions(self, uris: Sequence[str]) -> dict[str, str | None]:
        """`version` of each object, None also for one that cannot be checked (with a warning).

        Each scheme checks its URIs at once, so an object store can answer many from one listing.
        """
        found: dict[str, str | None] = {}
        for backend, group in self._by_backend(uris).items():
            found.update(backend.versions(group))
        return found

    def _by_backend(self, uris: Sequence[str]) -> dict[Backend, list[str]]:
        by_backend: dict[Backend, list[str]] = defaultdict(list)
        for uri in dict.fromkeys(uris):
            by_backend[self._backend(uri)].append(uri)
        return by_backend

    def _backend(self, uri: str) -> Backend:
        kind = backend_class(scheme_of(uri))
        backend = self._backends.get(kind)
        if backend is None:
            # A backend serving several spellings (az://, azure://) takes the parameters given for any.
            params = next(
                (self.transport_params[s] for s in kind.schemes if s in self.transport_params),
                self.transport_params.get(scheme_of(uri), {}),
            )
            backend = self._backends.setdefault(kind, kind(params))
        return backend
