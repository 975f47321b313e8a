"""The result store: finished results keyed by image content and removal options, reused across runs.

A key is a hash of the row's source fingerprint (what identifies the image's content, see
`Storage.fingerprints`) and the options that change the outputs: mode, binary_mask,
white_background, image_format, image_quality. Never the job, shard, row order, manifest name,
output prefix or path spelling: the same image asked the same way is the same key anywhere.

Layout under the store prefix (default `<output_prefix>/_removebg_cache/`):

    entries/<first 2 hex of key>/<key>.json   one object per key, the latest result stored for it

An entry records, for each output, the URI it was written to, that object's version (ETag,
generation, or size + mtime + inode on disk) and the SHA-256 of its bytes. Outputs are named per
record id, so a row whose image changed overwrites the object an older entry points at: an entry is
served only while its outputs are still the recorded version, and an output copied to another
row's URI must still have the recorded bytes. A stale entry is a miss (the image is sent again),
never a stale cutout.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from removebg_provider.errors import StorageError
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.storage import Storage, comparable_uri, join_uri
from removebg_provider.vocabulary import CUTOUT, DEFAULT_IMAGE_FORMAT

log = logging.getLogger(__name__)

# Bumped when the key or the entry changes meaning: older entries then simply miss.
_KEY_VERSION = 1


def result_key(source_fingerprint: str, config: PipelineConfig) -> str:
    """The store key of an image with this content, asked for with `config`'s removal options."""
    parts = {
        "v": _KEY_VERSION,
        "source": source_fingerprint,
        "mode": config.mode,
        "binary_mask": config.binary_mask,
        "white_background": config.white_background,
        "image_format": config.image_format or DEFAULT_IMAGE_FORMAT,
        "image_quality": config.image_quality,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:40]


@dataclass(frozen=True)
class StoredOutput:
    """One output of a stored result: where it was written, that object's version, its bytes' SHA-256."""

    uri: str
    version: str
    sha256: str


@dataclass(frozen=True)
class StoredResult:
    """A finished result as the store keeps it: its outputs and the result fields a reused row shows."""

    key: str
    source_fingerprint: str
    outputs: Mapping[str, StoredOutput]
    stored_at: datetime
    width: int | None = None
    height: int | None = None
    request_id: str | None = None
    mode: str | None = None
    foreground_fraction: float | None = None
    quality_flags: tuple[str, ...] = field(default=())

    def destinations(self, config: PipelineConfig, record_id: str) -> dict[str, str]:
        """The URIs a row with `record_id` gets for this result's outputs, by kind."""
        wanted = config.outputs_for(record_id)
        # A binary-mask answer may carry the mask instead of the cutout: the row gets what was stored.
        return {kind: uri for kind, uri in wanted.items() if kind in self.outputs or kind != CUTOUT.name}

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "source_fingerprint": self.source_fingerprint,
            "outputs": {kind: vars(output) for kind, output in self.outputs.items()},
            "stored_at": self.stored_at.isoformat(),
            "width": self.width,
            "height": self.height,
            "request_id": self.request_id,
            "mode": self.mode,
            "foreground_fraction": self.foreground_fraction,
            "quality_flags": list(self.quality_flags),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoredResult:
        return cls(
            key=data["key"],
            source_fingerprint=data["source_fingerprint"],
            outputs={kind: StoredOutput(**output) for kind, output in data["outputs"].items()},
            stored_at=datetime.fromisoformat(data["stored_at"]),
            width=data.get("width"),
            height=data.get("height"),
            request_id=data.get("request_id"),
            mode=data.get("mode"),
            foreground_fraction=data.get("foreground_fraction"),
            quality_flags=tuple(data.get("quality_flags") or ()),
        )


class ResultStore:
    """Reads, checks, serves and records entries under one store prefix."""

    def __init__(self, prefix: str, storage: Storage) -> None:
        self.prefix = prefix.rstrip("/")
        self.storage = storage

    def entry_uri(self, key: str) -> str:
        """Where the entry of `key` lives."""
        return join_uri(self.prefix, f"entries/{key[:2]}/{key}.json")

    def get(self, key: str) -> StoredResult | None:
        """The entry of `key`, or None when there is none (an unreadable entry is a miss, with a warning)."""
        uri = self.entry_uri(key)
        try:
            if not self.storage.exists(uri):
                return None
            return StoredResult.from_json(json.loads(self.storage.read_bytes(uri)))
        except (StorageError, ValueError, KeyError, TypeError) as exc:
            log.warning("result store entry %s is unreadable, treated as missing: %s", uri, exc)
            return None

    def is_current(self, entry: StoredResult) -> bool:
        """Whether every output of `entry` is still the object version it recorded."""
        try:
            return all(self.storage.version(out.uri) == out.version for out in entry.outputs.values())
        except StorageError as exc:
            log.warning("result store entry %s: cannot check its outputs, not reused: %s", entry.key, exc)
            return False

    def serve(self, entry: StoredResult, destinations: Mapping[str, str]) -> bool:
        """Put `entry`'s outputs at `destinations`; False (a miss) when an output is no longer its bytes.

        An output already at its destination was checked by `is_current`; any other is copied, and
        its bytes must hash to the recorded SHA-256, so an output overwritten since is never copied.
        """
        for kind, destination in destinations.items():
            stored = entry.outputs[kind]
            if comparable_uri(stored.uri) == comparable_uri(destination):
                continue
            try:
                data = self.storage.read_bytes(stored.uri)
                if hashlib.sha256(data).hexdigest() != stored.sha256:
                    return False
                self.storage.write_bytes(destination, data)
            except StorageError as exc:
                log.warning("store entry %s: cannot copy %s, sent again: %s", entry.key, stored.uri, exc)
                return False
        return True

    def record(
        self,
        key: str,
        source_fingerprint: str,
        written: Mapping[str, tuple[str, bytes]],
        fields: Mapping[str, Any],
        stored_at: datetime,
    ) -> None:
        """Store the result of `key`: `written` maps each output kind to (its URI, its bytes).

        A failure only warns: the row's outputs are stored, the next run merely sends it again.
        """
        try:
            outputs = {
                kind: StoredOutput(uri, self._version_of(uri), hashlib.sha256(data).hexdigest())
                for kind, (uri, data) in written.items()
            }
            entry = StoredResult(key, source_fingerprint, outputs, stored_at, **fields)
            self.storage.write_bytes(self.entry_uri(key), json.dumps(entry.to_json()).encode())
        except StorageError as exc:
            log.warning("result store entry %s not written (the image will be sent again): %s", key, exc)

    def _version_of(self, uri: str) -> str:
        version = self.storage.version(uri)
        if version is None:
            raise StorageError(f"{uri} was just written but is missing")
        return version
