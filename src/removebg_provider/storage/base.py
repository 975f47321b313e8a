"""What every storage backend does, and the registry that picks one per URI scheme.

A scheme without a registered backend goes through `Backend` itself, i.e. smart_open as it is (which
refuses schemes it has no transport for).
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import IO, Any, ClassVar, NamedTuple, TypeVar
from urllib.parse import urlparse

from removebg_provider.errors import StorageError
from removebg_provider.storage.sdk_errors import looks_missing, missing_errors, short_error, storage_errors
from removebg_provider.storage.uris import listed_uri

log = logging.getLogger(__name__)

_BackendType = TypeVar("_BackendType", bound="type[Backend]")
# Objects described side by side when a scheme has no listing to describe many at once.
_DESCRIBE_WORKERS = 8
_HASH_CHUNK = 1 << 20
# A shard with at least this many images in one folder lists the folder instead of describing each.
LISTING_MIN_OBJECTS = 16
# A listing reads at most this many objects per object asked for (and at least a page's worth): the
# objects asked may be a few spread over a large folder, where describing each costs far less.
LISTED_PER_ASKED = 20
_LISTED_AT_LEAST = 1000
# Connections an object store's client keeps. The SDKs (boto3, google-cloud-storage, azure-core)
# keep 10; a run's copy workers, store lookups and claims use many more at once, and every connection
# past the pool is opened, used once and dropped with a warning.
POOL_CONNECTIONS = 64


class Backend:
    """Objects at URIs smart_open knows; subclasses add what their scheme does better or differently.

    `params` are the scheme's smart_open transport parameters, e.g. `{"client": boto3_client}`.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    # Whether the scheme's listings describe content and versions (`list_described`).
    lists_fingerprints: ClassVar[bool] = False
    # Whether `list_described` yields keys in code point (UTF-8 byte) order, so a listing may stop
    # at the first key past the range; otherwise it stops once every key asked for was seen.
    lists_in_code_point_order: ClassVar[bool] = True

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = params

    def open(self, uri: str, mode: str) -> IO[Any]:
        """Open `uri` through smart_open with this backend's transport parameters."""
        return self._smart_open(uri, mode)

    def _smart_open(self, uri: str, mode: str, **transport: Any) -> IO[Any]:
        """`open`, with `transport` added to the transport parameters."""
        # Imported at the first open that needs it: smart_open imports every cloud SDK installed
        # (about a second), which a run on local files never needs.
        import smart_open

        opened: IO[Any] = smart_open.open(
            uri, mode, transport_params={**self.transport_params(), **transport}, compression="disable"
        )
        return opened

    def transport_params(self) -> dict[str, Any]:
        """The smart_open transport parameters of an open."""
        return dict(self.params)

    def exists(self, uri: str) -> bool:
        """Whether an object is at `uri` (a missing object is False; other failures raise)."""
        try:
            with self.open(uri, "rb"):
                return True
        except missing_errors():
            return False
        except storage_errors() as exc:
            if looks_missing(exc):
                return False
            raise StorageError(f"cannot check {uri}: {short_error(exc)}") from exc

    @contextmanager
    def atomic_writer(self, uri: str, *, size: int | None = None) -> Iterator[IO[bytes]]:
        """Object stores publish an upload only when smart_open closes it cleanly, and abort it otherwise.

        S3 completes a multipart upload (or puts a single part) on close and aborts it on error; GCS
        finalizes its resumable upload on close and deletes it on error; Azure commits the block list
        on close and never on error. A reader therefore sees the whole object or the previous one.

        `size`: how many bytes the block writes, when the caller knows (a scheme may then write them
        in fewer requests).
        """
        with self.open(uri, "wb") as stream:
            yield stream

    def list_prefix(self, prefix: str) -> list[str]:
        """URIs of the objects directly under `prefix`."""
        raise StorageError(f"cannot list {prefix}: listing is not supported for {urlparse(prefix).scheme}://")

    def create_new(self, uri: str, data: bytes) -> bool:
        """Write `data` to `uri` only if no object is there, in one conditional request; False if one is.

        Two writers racing for one URI: exactly one gets True. A scheme without conditional writes
        raises StorageError rather than pretend.
        """
        scheme = urlparse(uri).scheme
        raise StorageError(f"cannot create {uri} exclusively: {scheme}:// has no conditional write")

    def delete(self, uri: str) -> None:
        """Remove the object at `uri`; a missing object is not an error."""
        raise StorageError(f"cannot delete {uri}: not supported for {urlparse(uri).scheme}://")

    def read_with_revision(self, uri: str) -> tuple[bytes, str] | None:
        """The bytes at `uri` and a token naming that very write of them; None when nothing is there.

        The token is what `replace_if_unchanged` and `delete_if_unchanged` compare against: an
        object written again since gets another, except on S3, whose token is the ETag (the bytes'
        MD5): there the very same bytes written again count as unchanged.
        """
        raise StorageError(f"cannot read {uri} with its revision: {urlparse(uri).scheme}:// has none")

    def replace_if_unchanged(self, uri: str, data: bytes, revision: str) -> bool:
        """Write `data` at `uri` only if the object there is still `revision`; False when it changed or went.

        Two writers replacing one revision: at most one gets True.
        """
        raise StorageError(
            f"cannot replace {uri} conditionally: {urlparse(uri).scheme}:// has no conditional write"
        )

    def delete_if_unchanged(self, uri: str, revision: str) -> bool:
        """Remove the object at `uri` only if it is still `revision`; False when it changed or went."""
        raise StorageError(
            f"cannot delete {uri} conditionally: {urlparse(uri).scheme}:// has no conditional write"
        )

    def fingerprint(self, uri: str, limit: int | None = None) -> str | None:
        """What identifies the content at `uri`, None when there is no object: here a hash of its bytes.

        None too for an object over `limit` bytes: it is never sent, so it needs no fingerprint.

        Schemes whose metadata identifies the content (an ETag, an MD5, a generation) override this
        so that nothing is downloaded; a metadata value that names one object's version, not its
        bytes, carries the URI with it, so two objects never share it.
        """
        digest = hashlib.blake2b(digest_size=16)
        size = 0
        try:
            with self.open(uri, "rb") as stream:
                for chunk in iter(lambda: stream.read(_HASH_CHUNK), b""):
                    digest.update(chunk)
                    size += len(chunk)
                    if limit is not None and size > limit:
                        return None
        except missing_errors():
            return None
        except storage_errors() as exc:
            if looks_missing(exc):
                return None
            raise StorageError(f"cannot read {uri}: {short_error(exc)}") from exc
        return f"blake2b:{digest.hexdigest()}"

    def version(self, uri: str) -> str | None:
        """A token that changes whenever the object at `uri` is written again; None when it is missing."""
        return self.fingerprint(uri)

    def presigned_url(self, uri: str, expires_in: int) -> str:
        """An http(s) URL that lets anyone GET the object at `uri` for `expires_in` seconds."""
        raise StorageError(f"cannot presign {uri}: only s3://, gs:// and az:// objects get presigned URLs")

    def fingerprints(
        self, uris: Sequence[str], limit: int | None = None, *, allow_private_urls: bool = False
    ) -> dict[str, str | None]:
        """`fingerprint` of each URI (None also for one that cannot be described).

        Where the scheme lists objects, a folder holding many of `uris` is described by one listing
        over their range of keys (`_listed`); every other object is described on its own, side by
        side. `allow_private_urls` concerns only schemes whose URI names the host to ask (http(s));
        the others reach the store they are configured for.
        """

        def described(uri: str) -> str | None:
            # An object that cannot be described is sent without one: reading it reports the problem.
            try:
                return self.fingerprint(uri, limit)
            except StorageError:
                return None

        return self._described_many(uris, "fingerprint", described)

    def versions(self, uris: Sequence[str]) -> dict[str, str | None]:
        """`version` of each URI, None also for one that cannot be checked (with a warning).

        Listed as `fingerprints` are: on an object store, the outputs of a shard's rows in one
        folder cost a listing, not a request each.
        """
        return self._described_many(uris, "version", self._checked_version)

    def _checked_version(self, uri: str) -> str | None:
        try:
            return self.version(uri)
        except StorageError as exc:
            log.warning("cannot check %s, taken as changed: %s", uri, exc)
            return None

    def _described_many(
        self, uris: Sequence[str], what: str, describe: Callable[[str], str | None]
    ) -> dict[str, str | None]:
        """`what` ("fingerprint" or "version") of each URI: from listings where they pay, else `describe`."""
        by_folder: dict[str, list[str]] = defaultdict(list)
        for uri in uris:
            by_folder[uri.rsplit("/", 1)[0]].append(uri)
        found: dict[str, str | None] = {}
        alone: list[str] = []
        for members in by_folder.values():
            many = self.lists_fingerprints and len(members) >= LISTING_MIN_OBJECTS
            listed = self._listed(members, what) if many else None
            if listed is None:
                alone += members
            else:
                found.update(listed[0])
                alone += listed[1]
        return found | described_side_by_side(alone, describe)

    def list_described(self, first: str, last: str) -> Iterator[tuple[str, Described]]:
        """(URI, fingerprint and version) of the objects in `first`'s folder, in key order, from URI
        `first` or before.

        What `fingerprint` and `version` give, from a listing; the caller stops past URI `last`.
        Only for a scheme that `lists_fingerprints`.
        """
        raise NotImplementedError

    def _listed(self, uris: Sequence[str], what: str) -> tuple[dict[str, str | None], list[str]] | None:
        """`what` of `uris` (one folder) from one listing, and the URIs it left to describe one by one.

        None when the listing fails. A listing that reads `LISTED_PER_ASKED` objects per URI asked
        without finding them all stops: the rest are few among many, cheaper described one by one.
        """
        spellings: dict[str, list[str]] = defaultdict(list)
        for uri in uris:
            spellings[listed_uri(uri)].append(uri)
        first, last = min(spellings), max(spellings)
        found: dict[str, str | None] = dict.fromkeys(uris)
        unseen = set(spellings)
        budget = max(_LISTED_AT_LEAST, LISTED_PER_ASKED * len(spellings))
        # A store that cannot be reached, or often a role that may read objects but not list the
        # bucket: each object is then described on its own, and says what is wrong.
        failures: tuple[type[BaseException], ...] = (StorageError, *storage_errors())
        try:
            for read, (at, description) in enumerate(self.list_described(first, last), start=1):
                if self.lists_in_code_point_order and at > last:
                    break
                for uri in spellings.get(at, ()):
                    found[uri] = getattr(description, what)
                unseen.discard(at)
                if not unseen:
                    break
                if read >= budget:
                    log.info(
                        "listing %s: %d of its objects asked for are spread over more than %d others, "
                        "described one by one",
                        first.rsplit("/", 1)[0],
                        len(unseen),
                        read,
                    )
                    return found, [uri for spelling in unseen for uri in spellings[spelling]]
        except failures as exc:
            log.warning("cannot list %s, its objects are described one by one: %s", uris[0], short_error(exc))
            return None
        return found, []


class Described(NamedTuple):
    """What a listing tells of an object: what identifies its content, and its version."""

    fingerprint: str
    version: str


def unless_changed(
    uri: str, action: str, request: Callable[[], Any], changed: tuple[type[BaseException], ...]
) -> bool:
    """Send a conditional `request`; False when the store raises one of `changed`.

    `changed` are the errors that mean the condition failed (another revision is there, or none, or
    one is there at all for a create); any other is a StorageError naming `action` and `uri`.
    """
    try:
        request()
    except changed:
        return False
    except storage_errors() as exc:
        raise StorageError(f"cannot {action} {uri}: {short_error(exc)}") from exc
    return True


def described_side_by_side(
    uris: Sequence[str], describe: Callable[[str], str | None]
) -> dict[str, str | None]:
    """`describe` of each URI, several at once: each is a request (or a file read) that mostly waits."""
    if len(uris) <= 2:
        # Not worth a pool's threads (an entry's cutout and mask, checked one by one).
        return {uri: describe(uri) for uri in uris}
    with ThreadPoolExecutor(_DESCRIBE_WORKERS, thread_name_prefix="removebg-describe") as pool:
        return dict(zip(uris, pool.map(describe, uris), strict=True))


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
