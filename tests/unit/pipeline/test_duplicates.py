"""Repeated ids, colliding keys and shared references found from hashes, confirmed on the strings."""

from __future__ import annotations

import numpy as np

from removebg_provider.pipeline.duplicates import ManifestHashes, SharedReferences


def _scan(
    batches: list[tuple[list[str | None], list[str]]], *, ids_follow_references: bool = False
) -> tuple[ManifestHashes, SharedReferences, list[str], list[str]]:
    hashes = ManifestHashes()
    starts = []
    for references, ids in batches:
        starts.append(hashes.rows)
        hashes.add(references, ids)
    shared, repeated = hashes.finish(ids_follow_references=ids_follow_references)
    named = repeated.confirm(zip(starts, [ids for _, ids in batches], strict=True))
    return hashes, shared, *named


def test_rows_repeating_a_reference_name_the_first_row_with_it_across_batches() -> None:
    batches: list[tuple[list[str | None], list[str]]] = [
        (["a.jpg", "b.jpg", None], ["1", "2", "3"]),
        (["b.jpg", "c.jpg", "a.jpg", "b.jpg"], ["4", "5", "6", "7"]),
    ]
    _, shared, _, _ = _scan(batches)

    canonical = [shared.canonical(0, *batches[0]), shared.canonical(3, *batches[1])]

    assert canonical == [[None, None, None], ["2", None, "1", "2"]]
    assert (shared.duplicate_rows, shared.canonical_ids) == (3, {"1", "2"})


def test_rows_without_a_reference_share_nothing() -> None:
    batch: list[str | None] = [None, "", None]
    _, shared, _, _ = _scan([(batch, ["1", "2", "3"])])

    assert shared.canonical(0, batch, ["1", "2", "3"]) == [None, None, None]


def test_repeated_ids_are_named_in_the_order_they_repeat() -> None:
    _, _, repeated, _ = _scan([(["1", "2", "3"], ["a", "b", "a"]), (["4", "5"], ["c", "b"])])

    assert repeated == ["a", "b"]


def test_ids_that_become_one_output_key_are_named_with_that_key() -> None:
    _, _, repeated, collisions = _scan([(["1", "2", "3"], ["a/b", "x", "a_b"])])

    assert (repeated, collisions) == ([], ["'a/b' and 'a_b' -> 'a_b'"])


def test_a_manifest_without_repeats_needs_no_second_look() -> None:
    hashes = ManifestHashes()
    hashes.add([f"{i}.jpg" for i in range(1000)], [f"SKU-{i}" for i in range(1000)])

    _, repeated = hashes.finish(ids_follow_references=False)

    assert not repeated.any


def test_ids_derived_from_a_repeated_reference_are_not_repeated_ids() -> None:
    _, _, repeated, collisions = _scan(
        [(["a.jpg", "a.jpg", "b.jpg"], ["a-1f", "a-1f", "b-2e"])], ids_follow_references=True
    )

    assert (repeated, collisions) == ([], [])


def test_a_row_whose_reference_only_shares_a_hash_with_an_earlier_one_is_its_own_image() -> None:
    # A 64-bit hash collision cannot be produced on purpose: the grouping it would give is built by hand.
    shared = SharedReferences(rows=np.array([1]), first_rows=np.array([0]))

    assert shared.canonical(0, ["a.jpg", "b.jpg"], ["1", "2"]) == [None, None]
    assert shared.duplicate_rows == 0


def test_an_id_whose_safe_key_is_another_id_is_named_with_it() -> None:
    _, _, repeated, collisions = _scan([(["1", "2", "3"], ["_a", "SKU_1.b", "a"])])

    assert (repeated, collisions) == ([], ["'_a' and 'a' -> 'a'"])
