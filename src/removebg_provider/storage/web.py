"""The backend of images at http(s) URLs: read-only, described under the address rules of `guarded_fetch`."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from removebg_provider.errors import FetchRefused
from removebg_provider.guarded_fetch import (
    IMAGE_FETCH_LIMITS,
    NOT_PUBLIC,
    AddressPolicy,
    FetchLimits,
    allow_any_address,
    head_url,
    is_public_address,
    stream_url,
)
from removebg_provider.storage.base import Backend, described_side_by_side, register

log = logging.getLogger(__name__)

# An http(s) image's description: a HEAD within the QA report's limits; a body (a server without
# validators) within 30 s, of at most the caller's limit. A host slower than that is left to the
# API's own fetch.
_BODY_SECONDS = 30.0
# An http(s) URL in an error's text, up to a space or the colon that ends the URL's mention.
_URL_IN_TEXT = re.compile(r"https?://\S+?(?=:?(?:\s|$))")


@register("http", "https")
class HttpBackend(Backend):
    """Images at http(s) URLs, read-only; described by a HEAD's validators when the server gives them.

    Every request goes through `guarded_fetch`, as the local server's `_url` fetches do: the
    manifest's author chooses the URL, so only public addresses are asked unless private URLs are
    allowed, each redirect hop is checked, and a deadline bounds the whole request.
    """

    def fingerprint(self, uri: str, limit: int | None = None) -> str | None:
        try:
            return self._described(uri, limit, is_public_address)
        except FetchRefused:
            return None

    def fingerprints(
        self, uris: Sequence[str], limit: int | None = None, *, allow_private_urls: bool = False
    ) -> dict[str, str | None]:
        policy = allow_any_address if allow_private_urls else is_public_address
        refused: list[str] = []
        failed: list[str] = []

        def described(uri: str) -> str | None:
            try:
                return self._described(uri, limit, policy)
            except FetchRefused as exc:
                # Logged without the user info and query of its URLs: a password or a signature,
                # in the manifest's URL or in a redirect's (a presigned URL the host made).
                message = _URL_IN_TEXT.sub(lambda found: _shown(found[0]), str(exc).replace(uri, _shown(uri)))
                (refused if exc.code == NOT_PUBLIC else failed).append(message)
                return None

        found = described_side_by_side(uris, described)
        # Rows without a fingerprint are sent on every run, billed each time: say so once per call.
        if refused:
            log.warning(
                "%d image URL(s) not described, sent without the result store (allow private URLs to "
                "describe them); first: %s",
                len(refused),
                refused[0],
            )
        if failed:
            log.warning(
                "%d image URL(s) could not be described, sent without the result store; first: %s",
                len(failed),
                failed[0],
            )
        return found

    def _described(self, uri: str, limit: int | None, policy: AddressPolicy) -> str | None:
        """The fingerprint of `uri`, None when its server says it is gone; else `FetchRefused` says why."""
        head = head_url(uri, IMAGE_FETCH_LIMITS, policy)
        etag = head.headers.get("etag")
        answered = head.status < 400
        if answered and etag:
            return f"etag:{uri}:{etag}"
        modified, length = head.headers.get("last-modified"), head.headers.get("content-length")
        if answered and modified and length:
            return f"modified:{uri}:{modified}:{length}"
        if head.status in (404, 410):
            # The API's own fetch reports it as the row's status.
            return None
        # No validators: only the body says what the image is, and only for this URL: the API fetches
        # it again, and its server may answer the API with other bytes than it answered this GET.
        digest = hashlib.blake2b(digest_size=16)
        stream_url(uri, _body_limits(limit), digest.update, policy)
        return f"body:{uri}:{digest.hexdigest()}"


def _shown(uri: str) -> str:
    """`uri` without its user info and query, for a log line."""
    parts = urlsplit(uri)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _body_limits(limit: int | None) -> FetchLimits:
    max_bytes = limit if limit is not None else IMAGE_FETCH_LIMITS.max_bytes
    return dataclasses.replace(IMAGE_FETCH_LIMITS, max_bytes=max_bytes, timeout_seconds=_BODY_SECONDS)
