"""Repeated ids, colliding output keys and shared image references of a whole manifest, in bounded memory.

Planning sees every row once and keeps, per row, 8-byte hashes of its image reference and its id
(and of its output key, for the few ids that are not already safe keys) in numpy arrays: 17 bytes a
row, not a Python string per id, reference and key (Python's own string hashes: stable within the
planning process, the only one that uses them). Sorting the arrays finds every repeated hash. A
hash is only a candidate: repeated ids and colliding keys are confirmed on the strings themselves
in a second look at the candidate rows (`RepeatedIds`), and rows sharing a reference are confirmed
when the shards are cut (`SharedReferences.canonical`), so a hash collision never merges two images
or refuses a good manifest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from removebg_provider.outputs import safe_key_id

_FIRST_ERRORS = 5
# Ids that `safe_key_id` keeps as they are (safe characters, no "..", no "." or "_" at either end,
# at most 120 characters) are their own key; the rest, usually few, are passed through it.
_PLAINLY_SAFE = re.compile(r"(?!.*\.\.)[A-Za-z0-9=+-](?:[A-Za-z0-9._=+-]{0,118}[A-Za-z0-9=+-])?")


class ManifestHashes:
    """Hashes of every row's reference, id and output key, gathered batch by batch."""

    def __init__(self) -> None:
        self._references: list[np.ndarray] = []
        self._has_reference: list[np.ndarray] = []
        self._ids: list[np.ndarray] = []
        self._unsafe_rows: list[np.ndarray] = []
        self._unsafe_keys: list[np.ndarray] = []
        self.rows = 0

    def add(self, references: Sequence[str | None], record_ids: Sequence[str]) -> None:
        """Note the next rows: their image references (None or empty: none) and ids."""
        count = len(record_ids)
        self._references.append(
            np.fromiter((hash(r) if r else 0 for r in references), dtype=np.int64, count=count)
        )
        self._has_reference.append(np.fromiter((bool(r) for r in references), dtype=bool, count=count))
        self._ids.append(np.fromiter(map(hash, record_ids), dtype=np.int64, count=count))
        unsafe = [
            offset for offset, record_id in enumerate(record_ids) if not _PLAINLY_SAFE.fullmatch(record_id)
        ]
        if unsafe:
            self._unsafe_rows.append(np.asarray(unsafe, dtype=np.int64) + self.rows)
            keys = (hash(safe_key_id(record_ids[offset])) for offset in unsafe)
            self._unsafe_keys.append(np.fromiter(keys, dtype=np.int64, count=len(unsafe)))
        self.rows += count

    def finish(self, *, ids_follow_references: bool) -> tuple[SharedReferences, RepeatedIds]:
        """The rows sharing a reference, and the candidate repeated ids and keys.

        `ids_follow_references`: the ids are derived from the references (no id column), so rows
        repeating a reference repeat its id too and take no part in the id checks.
        """
        shared = _shared_references(_joined(self._references), _joined(self._has_reference, bool))
        self._references, self._has_reference = [], []
        ids = _joined(self._ids)
        self._ids = []
        checked: np.ndarray | None = None
        if ids_follow_references and shared.rows.size:
            checked = np.ones(ids.size, dtype=bool)
            checked[shared.rows] = False
        repeated_ids = _repeated(ids if checked is None else ids[checked])
        # Every id that is its own safe key keeps its id's hash; the others take their key's.
        ids[_joined(self._unsafe_rows)] = _joined(self._unsafe_keys)
        repeated_keys = _repeated(ids if checked is None else ids[checked])
        return shared, RepeatedIds(checked, repeated_ids, repeated_keys)


class SharedReferences:
    """Rows whose image reference repeats an earlier row's, each with that earlier (first) row."""

    def __init__(self, rows: np.ndarray, first_rows: np.ndarray) -> None:
        # Sorted by row: each batch of the second pass finds its rows by binary search.
        self.rows = rows
        self.first_rows = first_rows
        self._firsts_needed = np.unique(first_rows)
        self._firsts: dict[int, tuple[str, str]] = {}
        self.duplicate_rows = 0
        self.canonical_ids: set[str] = set()

    def canonical(self, start: int, references: Sequence[str | None], ids: Sequence[str]) -> list[str | None]:
        """For the next rows, from row `start` on, in order: the id of the first row with the same reference.

        None for a row that is the first with its reference. Rows must come in manifest order.
        """
        end = start + len(ids)
        low, high = np.searchsorted(self._firsts_needed, [start, end])
        for row in self._firsts_needed[low:high].tolist():
            reference = references[row - start]
            assert reference is not None
            self._firsts[row] = (ids[row - start], reference)
        found: list[str | None] = [None] * len(ids)
        low, high = np.searchsorted(self.rows, [start, end])
        for row, first in zip(self.rows[low:high].tolist(), self.first_rows[low:high].tolist(), strict=True):
            first_id, first_reference = self._firsts[first]
            if references[row - start] == first_reference:
                # Else two references share a hash: the row is its own image, sent on its own.
                found[row - start] = first_id
                self.duplicate_rows += 1
                self.canonical_ids.add(first_id)
        return found


class RepeatedIds:
    """Candidate repeated ids and colliding output keys, by hash; confirmed on the rows themselves."""

    def __init__(self, checked: np.ndarray | None, ids: np.ndarray, keys: np.ndarray) -> None:
        self._checked = checked
        self._ids = set(ids.tolist())
        self._keys = set(keys.tolist())

    @property
    def any(self) -> bool:
        """Whether some id or key hash repeats: only then is a second look needed."""
        return bool(self._ids or self._keys)

    def confirm(self, batches: Iterable[tuple[int, Sequence[str]]]) -> tuple[list[str], list[str]]:
        """The first repeated ids (in order of repetition) and key collisions, from a second look at the ids.

        `batches` yields (first row, ids) in manifest order.
        """
        seen: set[str] = set()
        keys: dict[str, str] = {}
        repeated: list[str] = []
        collisions: list[str] = []
        for start, ids in batches:
            for offset, record_id in enumerate(ids):
                if self._checked is not None and not self._checked[start + offset]:
                    continue
                if hash(record_id) in self._ids:
                    if record_id in seen:
                        if len(repeated) < _FIRST_ERRORS:
                            repeated.append(record_id)
                        continue
                    seen.add(record_id)
                key = record_id if _PLAINLY_SAFE.fullmatch(record_id) else safe_key_id(record_id)
                if hash(key) in self._keys:
                    other = keys.setdefault(key, record_id)
                    if other != record_id and len(collisions) < _FIRST_ERRORS:
                        collisions.append(f"{other!r} and {record_id!r} -> {key!r}")
        return repeated, collisions


def _joined(parts: list[np.ndarray], dtype: type = np.int64) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def _repeated(hashes: np.ndarray) -> np.ndarray:
    """The hashes that occur more than once."""
    ordered = np.sort(hashes)
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]])


def _shared_references(hashes: np.ndarray, present: np.ndarray) -> SharedReferences:
    """Group the rows with a reference by its hash: every row after the first of its group shares it."""
    order = np.argsort(hashes, kind="stable")
    if not present.all():
        order = order[present[order]]
    ordered = hashes[order]
    count = ordered.size
    starts_group = np.empty(count, dtype=bool)
    starts_group[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts_group[1:])
    del ordered
    repeats = np.flatnonzero(~starts_group)
    if not repeats.size:
        empty = np.empty(0, dtype=np.int64)
        return SharedReferences(empty, empty)
    # For every sorted position, the position where its group starts (a stable sort: its first row).
    group_start = np.maximum.accumulate(np.where(starts_group, np.arange(count), 0))
    rows, first_rows = order[repeats], order[group_start[repeats]]
    by_row = np.argsort(rows, kind="stable")
    return SharedReferences(rows[by_row], first_rows[by_row])
