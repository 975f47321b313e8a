"""Durable outputs: their object keys, image sniffing, and copying an API answer's images into storage."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping

from removebg_provider.downloads import Downloader, strip_query
from removebg_provider.errors import CopyError, StorageError
from removebg_provider.storage import Storage, join_uri
from removebg_provider.vocabulary import OUTPUT_KINDS_BY_NAME, RowStatus

DEFAULT_OUTPUT_KEY_TEMPLATE = "{id}{suffix}.{ext}"

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._=+-]+")
_MAX_KEY_ID_LENGTH = 120
_MAGIC = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpg": (b"\xff\xd8\xff",),
    "webp": (b"RIFF",),
}


def safe_key_id(record_id: str) -> str:
    """Make a record id safe as one object-key segment: no separators, `..` or control characters.

    Keys are ASCII. An id with other characters (`café`, `赤いシャツ`) keeps its ASCII part and gets a
    hash of its NFC form, so distinct ids stay distinct keys; so do long ids. Two ASCII ids that clean
    to the same key are the caller's to detect (the planner refuses them).
    """
    normalized = unicodedata.normalize("NFC", record_id)
    cleaned = _UNSAFE_KEY_CHARS.sub("_", normalized)
    cleaned = re.sub(r"\.{2,}", "_", cleaned).strip("._") or "_"
    if len(cleaned) > _MAX_KEY_ID_LENGTH or not normalized.isascii():
        digest = hashlib.sha256(normalized.encode()).hexdigest()[:10]
        cleaned = f"{cleaned[: _MAX_KEY_ID_LENGTH - 11]}-{digest}"
    return cleaned


def output_uri(output_prefix: str, record_id: str, kind: str, ext: str, template: str) -> str:
    """The durable URI of one output of one record, from the key template.

    The template may use `{id}` (the key-safe id), `{kind}` (cutout, mask, whitebg),
    `{suffix}` ("", ".mask", ".whitebg") and `{ext}`.
    """
    suffix = OUTPUT_KINDS_BY_NAME[kind].key_suffix
    key = template.format(id=safe_key_id(record_id), kind=kind, suffix=suffix, ext=ext)
    if ".." in key.split("/") or key.startswith("/"):
        raise StorageError(f"output key template {template!r} makes an unsafe key {key!r}")
    return join_uri(output_prefix, key)


def looks_like_image(data: bytes, ext: str) -> bool:
    """Whether `data` starts with the signature of an `ext` image (png, jpg or webp)."""
    if ext == "webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return any(data.startswith(magic) for magic in _MAGIC.get(ext, ()))


class OutputCopier:
    """Copies API outputs from their temporary URLs into durable storage, each verified as an image."""

    def __init__(self, storage: Storage, downloader: Downloader | None = None, *, pool_size: int = 8) -> None:
        self.storage = storage
        self.downloader = downloader or Downloader(pool_size=pool_size)

    def copy(self, source_url: str, destination_uri: str, ext: str, *, fresh: bool = False) -> bytes:
        """Copy one output and return its bytes; raises CopyError with the row status it earns.

        `fresh` (the API has just answered `source_url`): a 404 is retried before OutputGoneError.
        """
        data = self.downloader.download(source_url, fresh=fresh)
        if not looks_like_image(data, ext):
            raise CopyError(
                RowStatus.BAD_OUTPUT, f"the API output at {strip_query(source_url)} is not a {ext} image"
            )
        try:
            self.storage.write_bytes(destination_uri, data)
        except StorageError as exc:
            raise CopyError(RowStatus.OUTPUT_NOT_WRITTEN, str(exc)) from exc
        return data

    def copy_answer(
        self, sources: Mapping[str, str | None], destinations: Mapping[str, str], *, fresh: bool = False
    ) -> dict[str, bytes]:
        """Copy every output kind of `destinations` from its temporary URL in `sources`; bytes by kind.

        Raises CopyError for the first kind that is missing from the answer or cannot be copied
        (OutputGoneError when its URL is gone: a fresh answer's record is worth requesting again).
        """
        copied: dict[str, bytes] = {}
        for kind, destination in destinations.items():
            source = sources.get(kind)
            if not source:
                raise CopyError(RowStatus.BAD_OUTPUT, f"the API returned no {kind} URL", "output missing")
            copied[kind] = self.copy(source, destination, destination.rsplit(".", 1)[-1], fresh=fresh)
        return copied

    def close(self) -> None:
        """Release pooled connections."""
        self.downloader.close()
