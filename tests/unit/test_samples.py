"""Specification of the synthetic studio photo generator."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from removebg_provider.samples import BACKGROUNDS, PRODUCTS, make_product_photo, write_sample_photos


def test_same_seed_gives_identical_photo() -> None:
    first, second = make_product_photo(7, 320, 240), make_product_photo(7, 320, 240)
    assert np.array_equal(first.rgb, second.rgb)
    assert np.array_equal(first.alpha, second.alpha)


def test_different_seeds_give_different_photos() -> None:
    assert not np.array_equal(make_product_photo(1, 320, 240).rgb, make_product_photo(2, 320, 240).rgb)


def test_photo_has_requested_size_and_types() -> None:
    photo = make_product_photo(3, width=320, height=200)
    assert photo.rgb.shape == (200, 320, 3)
    assert photo.rgb.dtype == np.uint8
    assert photo.alpha.shape == (200, 320)
    assert photo.alpha.dtype == np.uint8


@pytest.mark.parametrize("kind", BACKGROUNDS)
def test_requested_background_kind_is_used(kind: str) -> None:
    assert make_product_photo(4, 160, 160, background=kind).background == kind


def test_unknown_background_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown background 'tartan'"):
        make_product_photo(0, 160, 160, background="tartan")


def test_ground_truth_has_soft_edges_and_a_solid_product() -> None:
    alpha = make_product_photo(5, 400, 400, product="box").alpha
    assert np.count_nonzero((alpha > 0) & (alpha < 255)) > 0
    assert np.count_nonzero(alpha == 255) > 0.05 * alpha.size


@pytest.mark.parametrize("product", PRODUCTS)
def test_product_stays_clear_of_the_frame(product: str) -> None:
    alpha = make_product_photo(6, 300, 300, product=product).alpha
    edge = np.concatenate([alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]])
    assert edge.max() == 0


def test_ring_has_a_see_through_hole() -> None:
    alpha = make_product_photo(8, 400, 400, product="ring").alpha
    count, labels = cv2.connectedComponents((alpha < 128).astype(np.uint8), connectivity=4)
    border_labels = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    assert set(range(1, count)) - border_labels


def test_shadow_darkens_only_the_backdrop() -> None:
    lit = make_product_photo(9, 400, 400, background="white", shadow=False)
    shaded = make_product_photo(9, 400, 400, background="white", shadow=True)
    darker = shaded.rgb.astype(int).sum(axis=2) < lit.rgb.astype(int).sum(axis=2) - 30
    assert np.array_equal(lit.alpha, shaded.alpha)
    assert np.count_nonzero(darker & (shaded.alpha == 0)) > 500


def test_jpeg_artefacts_change_pixels_but_not_the_ground_truth() -> None:
    clean = make_product_photo(10, 320, 320)
    compressed = make_product_photo(10, 320, 320, jpeg_quality=60)
    assert np.array_equal(clean.alpha, compressed.alpha)
    assert not np.array_equal(clean.rgb, compressed.rgb)
    assert compressed.jpeg_quality == 60


def test_write_sample_photos_writes_readable_jpegs(tmp_path: Path) -> None:
    paths = write_sample_photos(tmp_path / "photos", count=5, seed=3, size=(240, 180))
    assert len(paths) == 5
    for path in paths:
        assert path.suffix == ".jpg"
        image = cv2.imread(str(path))
        assert image is not None
        assert image.shape == (180, 240, 3)


def test_write_sample_photos_covers_every_background_kind(tmp_path: Path) -> None:
    paths = write_sample_photos(tmp_path, count=len(BACKGROUNDS), size=(120, 120))
    assert {kind for kind in BACKGROUNDS if any(kind in p.name for p in paths)} == set(BACKGROUNDS)
