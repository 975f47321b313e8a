"""The result store: finished results keyed by image content and removal options, reused across runs.

A key is a hash of the row's source fingerprint (what identifies the image's content, see
`Storage.fingerprints`) and the options that change the outputs: mode, binary_mask,
white_background, image_format, image_quality. Never the job, shard, row order, manifest name,
output prefix or path spelling: the same image asked the same way is the same key anywhere.

Layout under the store prefix (default `<output_prefix>/_removebg_cache/`):

    entries/<first 2 hex of key>/<key>.json   one object per key, the latest result stored for it
    claims/<first 2 hex of key>/<key>.json    while a run sends that image: who, since when

A run sends an image only after creating its claim with a conditional write (exclusive create on
disk, `If-None-Match: *` on S3, `if_generation_match=0` on GCS, `overwrite=False` on Azure), so
two runs, shard tasks or DAG runs sharing a store never both bill one image: the other waits for
the entry and serves it. A claim is removed once its result is stored (or has failed); one left by
a dead process is taken over after its lease (`CLAIM_LEASE`, recorded in the claim), at once when
that process ran on this host, and at once by the same shard of the same run (a retried task:
Airflow runs one try at a time). A live process writes its claims again with a fresh time every
third of their lease, so work that takes longer than the lease (a slow API, long retries) keeps
its claims and no other run sends, and bills, the same image. Taking a claim over, renewing it,
releasing it and pruning it change only the revision of the claim that was read and judged
(`Storage.replace_if_unchanged`, `delete_if_unchanged`): of runs taking over one dead claim at once
exactly one wins, and a claim taken over in between is never written back or removed. Every claim's
bytes differ (its token and time), so S3's ETag names each write.

An entry records, for each output, the URI it was written to, that object's version (ETag,
generation, or size + mtime + inode on disk) and the SHA-256 of its bytes. Outputs are named per
record id, so a row whose image changed overwrites the object an older entry points at: an entry is
served only while its outputs are still the recorded version, and an output copied to another
row's URI must still have the recorded bytes. A stale entry is a miss (the image is sent again),
never a stale cutout.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from removebg_provider.errors import MissingObjectError, StorageError
from removebg_provider.pipeline.config import PipelineConfig
from removebg_provider.storage import Storage, comparable_uri, join_uri
from removebg_provider.vocabulary import CUTOUT, DEFAULT_IMAGE_FORMAT

log = logging.getLogger(__name__)

# Bumped when the key or the entry changes meaning: older entries then simply miss.
_KEY_VERSION = 1
# How long a claim keeps other runs from sending its image: well over one request with its retries
# and the copy of its outputs. A claim not renewed for this long is taken to be a dead run's.
CLAIM_LEASE = timedelta(minutes=10)
# A held claim is renewed this many times per lease: a renewal may come late by two thirds of it.
_RENEWALS_PER_LEASE = 3
# How often a run waiting for another run's result looks for it: from the first to the last value.
_WAIT_POLL_SECONDS = (0.2, 2.0)
# Stands for the source in a key's text while the rest is made (no option's JSON can hold it).
_SOURCE_MARK = "\0source\0"


def result_key(source_fingerprint: str, config: PipelineConfig) -> str:
    """The store key of an image with this content, asked for with `config`'s removal options."""
    before, after = _key_text_around_source(
        config.mode,
        config.binary_mask,
        config.white_background,
        config.image_format or DEFAULT_IMAGE_FORMAT,
        config.image_quality,
    )
    text = before + json.dumps(source_fingerprint) + after
    return hashlib.sha256(text.encode()).hexdigest()[:40]


@functools.lru_cache(maxsize=16)
def _key_text_around_source(
    mode: str, binary_mask: bool, white_background: bool, image_format: str, image_quality: int | None
) -> tuple[str, str]:
    """The hashed text of a key before and after its source: the options' JSON is made once, not per row.

    A plan computes a key for each of millions of rows; the text is the same as hashing the whole
    dictionary with `json.dumps(..., sort_keys=True)`, so keys stored by earlier versions still match.
    """
    parts = {
        "v": _KEY_VERSION,
        "source": _SOURCE_MARK,
        "mode": mode,
        "binary_mask": binary_mask,
        "white_background": white_background,
        "image_format": image_format,
        "image_quality": image_quality,
    }
    before, after = json.dumps(parts, sort_keys=True).split(json.dumps(_SOURCE_MARK))
    return before, after


def column_fingerprint(reference: str, value: str) -> str:
    """The source fingerprint of an image a catalog column describes (`fingerprint_column`)."""
    # A catalog value such as a date names a version of this reference, not its bytes.
    spelled = f"{comparable_uri(reference)}\n{value}"
    return "column:" + hashlib.sha256(spelled.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class StoreStats:
    """What a store holds: entries (finished results) and claims (images being sent, or left by dead runs)."""

    entries: int
    claims: int

    def to_dict(self) -> dict[str, int]:
        return {"entries": self.entries, "claims": self.claims}


@dataclass(frozen=True)
class PruneReport:
    """What `ResultStore.prune` looked at and removed."""

    entries_examined: int
    entries_removed: int
    claims_removed: int

    def to_dict(self) -> dict[str, int]:
        return {
            "entries_examined": self.entries_examined,
            "entries_removed": self.entries_removed,
            "claims_removed": self.claims_removed,
        }


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
        served = self._served_kinds(config)
        return {kind: uri for kind, uri in config.outputs_for(record_id).items() if kind in served}

    def serves(self, config: PipelineConfig) -> bool:
        """Whether this result holds every output a run with `config` gives a row."""
        return set(self._served_kinds(config)) <= set(self.outputs)

    def _served_kinds(self, config: PipelineConfig) -> tuple[str, ...]:
        # A binary-mask answer may carry the mask instead of the cutout: the row gets what was stored.
        # Any other run's result holds its cutout (an entry without one would serve a row nothing).
        return tuple(
            kind
            for kind in config.output_kinds
            if kind in self.outputs or kind != CUTOUT.name or not config.binary_mask
        )

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

    def __init__(self, prefix: str, storage: Storage, holder: str, *, lease: timedelta = CLAIM_LEASE) -> None:
        """`holder` names the work claiming images (a run's shard): its later tries take its claims over.

        `lease`: how long this process's claims stay valid without a renewal (they are renewed
        while held).
        """
        self.prefix = prefix.rstrip("/")
        self.storage = storage
        self.lease = lease
        self._claimant = {
            "holder": holder,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": uuid.uuid4().hex,
            "lease_seconds": lease.total_seconds(),
        }
        # Claims this process holds, renewed by one thread while there are any.
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None
        # Set when the last held claim is released: the renewer ends at once instead of at its next turn.
        self._none_held = threading.Event()

    def entry_uri(self, key: str) -> str:
        """Where the entry of `key` lives."""
        return join_uri(self.prefix, f"entries/{key[:2]}/{key}.json")

    def claim_uri(self, key: str) -> str:
        """Where the claim of `key` lives while a run sends its image."""
        return join_uri(self.prefix, f"claims/{key[:2]}/{key}.json")

    def claim(self, key: str) -> bool:
        """Take `key` for this process before sending its image; False while another live run holds it.

        A claim taken is renewed until it is released. A store whose scheme has no conditional
        write cannot arbitrate: the image is sent, as it would be without a store, with a warning.
        """
        taken = self._take(key)
        if taken:
            self._hold(key)
        return taken

    def _take(self, key: str) -> bool:
        uri = self.claim_uri(key)
        body = self._claim_body()
        try:
            if self.storage.create_new(uri, body):
                return True
            found = self._claim_at(uri)
            if found is None:
                # Released in between.
                return self.storage.create_new(uri, body)
            held, revision = found
            if held.get("token") == self._claimant["token"]:
                # Already ours (a row sent again after its stored outputs proved stale).
                return True
            if held.get("holder") != self._claimant["holder"] and not _abandoned(held):
                return False
            log.warning("result store claim %s was left by a dead run (%s); taking it over", uri, held)
            # Replaced only if it is still the dead run's: of runs taking it over at once, one wins.
            return self._replace_claim(uri, body, revision)
        except StorageError as exc:
            log.warning("result store claim %s not taken, the image is sent unguarded: %s", uri, exc)
            return True

    def release(self, key: str) -> None:
        """Give `key` back once its result is stored or has failed (only this process's own claim)."""
        uri = self.claim_uri(key)
        # Renewals run under this lock, over the claims held: once `key` is out of them, none writes
        # it back, so the claim is deleted outside the lock, without holding up other claims.
        with self._held_lock:
            self._held.discard(key)
            if not self._held:
                self._none_held.set()
        try:
            found = self._claim_at(uri)
            if found is not None and found[0].get("token") == self._claimant["token"]:
                # Only our write of it: one that another run took over in between stays.
                self.storage.delete_if_unchanged(uri, found[1])
        except StorageError as exc:
            log.warning("result store claim %s not released (it expires after %s): %s", uri, self.lease, exc)

    def _claim_body(self) -> bytes:
        return json.dumps({**self._claimant, "claimed_at": _now().isoformat()}).encode()

    def _hold(self, key: str) -> None:
        with self._held_lock:
            self._held.add(key)
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._keep_renewing, name="removebg-claim-renewal", daemon=True
                )
                self._renewer.start()

    def _keep_renewing(self) -> None:
        """Write every held claim again with a fresh time, every third of the lease; end once none is held."""
        interval = self.lease.total_seconds() / _RENEWALS_PER_LEASE
        while True:
            emptied = self._none_held.wait(interval)
            with self._held_lock:
                self._none_held.clear()
                if not self._held:
                    self._renewer = None
                    return
                if emptied:
                    # Every claim held now was taken since the last release emptied the set: fresh.
                    continue
                for key in sorted(self._held):
                    self._renew(key)

    def _renew(self, key: str) -> None:
        uri = self.claim_uri(key)
        try:
            found = self._claim_at(uri)
            held = found[0] if found is not None else None
            # Written again only if it is still the write we read, so a takeover in between stays.
            if (
                found is not None
                and found[0].get("token") == self._claimant["token"]
                and self._replace_claim(uri, self._claim_body(), found[1])
            ):
                return
        except StorageError as exc:
            log.warning(
                "result store claim %s not renewed (tried again in %s): %s",
                uri,
                self.lease / _RENEWALS_PER_LEASE,
                exc,
            )
            return
        # Gone, or taken over after a renewal came later than the lease: nothing left to renew.
        log.warning("result store claim %s is no longer this run's: %s", uri, held)
        self._held.discard(key)

    def _replace_claim(self, uri: str, body: bytes, revision: str) -> bool:
        """Write this process's claim `body` over `revision`; True also when an earlier try of it landed.

        An SDK tries a request again when its answer is lost: if the first try landed, the next finds
        another revision (this one's) and fails, though the claim is this process's.
        """
        if self.storage.replace_if_unchanged(uri, body, revision):
            return True
        found = self._claim_at(uri)
        return found is not None and found[0].get("token") == self._claimant["token"]

    def wait_for(self, key: str) -> StoredResult | None:
        """The result another run is storing for `key`, once it is there; None when that run gave up.

        Waits while the claim is held and alive; returns None when the claim is released or
        abandoned without a current entry, so the caller claims and sends the image itself.
        """
        pause = _WAIT_POLL_SECONDS[0]
        while True:
            entry = self.get(key)
            if entry is not None and self.is_current(entry):
                return entry
            try:
                found = self._claim_at(self.claim_uri(key))
            except StorageError:
                found = None
            if found is None or _abandoned(found[0]):
                # The entry may have landed between the two reads.
                entry = self.get(key)
                return entry if entry is not None and self.is_current(entry) else None
            time.sleep(pause)
            pause = min(pause * 2, _WAIT_POLL_SECONDS[1])

    def stats(self) -> StoreStats:
        """How many entries and claims the store holds (one listing per key group, nothing read)."""
        return StoreStats(len(self._listed("entries")), len(self._listed("claims")))

    def prune(self, older_than: timedelta, *, even_if_current: bool = False) -> PruneReport:
        """Remove entries stored more than `older_than` ago that can no longer be served, and dead claims.

        An entry whose outputs were overwritten or deleted can never be served again: removing it
        costs nothing. With `even_if_current`, old entries that could still be served are removed
        too; their images are then sent (and billed) again by the next run that meets them.
        """
        cutoff = _now() - older_than
        examined = removed = 0
        for uri in self._listed("entries"):
            examined += 1
            try:
                entry = StoredResult.from_json(json.loads(self.storage.read_bytes(uri)))
            except (StorageError, ValueError, KeyError, TypeError):
                entry = None
            if entry is None or (
                entry.stored_at < cutoff and (even_if_current or not self.is_current(entry))
            ):
                self.storage.delete(uri)
                removed += 1
        dead_claims = 0
        for uri in self._listed("claims"):
            found = self._claim_at(uri)
            # Only the dead run's write: a run that took the claim over in between keeps it.
            if found is not None and _abandoned(found[0]) and self.storage.delete_if_unchanged(uri, found[1]):
                dead_claims += 1
        return PruneReport(examined, removed, dead_claims)

    def _listed(self, kind: str) -> list[str]:
        return [
            uri
            for group in range(256)
            for uri in self.storage.list_prefix(join_uri(self.prefix, f"{kind}/{group:02x}"))
            if uri.endswith(".json")
        ]

    def _claim_at(self, uri: str) -> tuple[dict[str, Any], str] | None:
        """The claim at `uri` and the revision it was read at; None when there is none."""
        found = self.storage.read_with_revision(uri)
        if found is None:
            return None
        data, revision = found
        try:
            held = json.loads(data)
        except ValueError:
            held = None
        if not isinstance(held, dict):
            # A torn claim (a store without atomic writes) names nobody: it is abandoned.
            held = {"claimed_at": datetime.min.replace(tzinfo=timezone.utc).isoformat()}
        return held, revision

    def get(self, key: str) -> StoredResult | None:
        """The entry of `key`, or None when there is none (an unreadable entry is a miss, with a warning)."""
        uri = self.entry_uri(key)
        try:
            # One GET, a hit or a miss; only a read that fails otherwise costs a check.
            return StoredResult.from_json(json.loads(self.storage.read_bytes(uri)))
        except MissingObjectError:
            return None
        except StorageError as exc:
            if self._exists(uri):
                log.warning("result store entry %s is unreadable, treated as missing: %s", uri, exc)
            return None
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("result store entry %s is unreadable, treated as missing: %s", uri, exc)
            return None

    def _exists(self, uri: str) -> bool:
        try:
            return self.storage.exists(uri)
        except StorageError:
            return True

    def is_current(self, entry: StoredResult) -> bool:
        """Whether every output of `entry` is still the object version it recorded."""
        return self.current([entry])[0]

    def current(self, entries: Sequence[StoredResult]) -> list[bool]:
        """`is_current` of each entry, their outputs checked together: on an object store, those in one
        folder cost one listing, not a request each."""
        # An entry records a version for each output; one without (not written by a run) is no
        # proof, and its outputs are not even looked at.
        provable = [all(out.version is not None for out in entry.outputs.values()) for entry in entries]
        checked = [entry for entry, ok in zip(entries, provable, strict=True) if ok]
        uris = [out.uri for entry in checked for out in entry.outputs.values()]
        try:
            versions = self.storage.versions(uris)
        except StorageError as exc:
            log.warning("result store: cannot check %d outputs, their entries not reused: %s", len(uris), exc)
            return [False] * len(entries)
        return [
            ok and all(out.version == versions[out.uri] for out in entry.outputs.values())
            for entry, ok in zip(entries, provable, strict=True)
        ]

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
    ) -> StoredResult | None:
        """Store the result of `key`, and return its entry: `written` maps each kind to (its URI, its bytes).

        A failure only warns (and returns None): the row's outputs are stored, the next run merely
        sends it again.
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
            return None
        return entry

    def _version_of(self, uri: str) -> str:
        version = self.storage.version(uri)
        if version is None:
            raise StorageError(f"{uri} was just written but is missing")
        return version


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _abandoned(claim: Mapping[str, Any]) -> bool:
    """Whether a claim's run is gone: its lease ran out unrenewed, or its process on this host has ended.

    A claim that cannot be judged (no time, a time without a zone, a lease or a pid out of range)
    was not written by a run of this code and names nobody, as a torn one: abandoned.
    """
    lease = claim.get("lease_seconds")
    try:
        age = _now() - datetime.fromisoformat(claim["claimed_at"])
        expired = age > (timedelta(seconds=lease) if isinstance(lease, (int, float)) else CLAIM_LEASE)
    except (KeyError, TypeError, ValueError, OverflowError):
        return True
    if expired:
        return True
    if claim.get("host") != socket.gethostname() or not isinstance(claim.get("pid"), int):
        return False
    try:
        os.kill(claim["pid"], 0)
    except (ProcessLookupError, OverflowError):
        return True
    except PermissionError:
        # Alive, under another user.
        return False
    return False
