"""Per-cutout quality signals: each flag on an image built to earn it, and none on a good cutout."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from removebg_provider.quality import (
    EMPTY,
    FRAGMENTED,
    NOTHING_REMOVED,
    TINY_OBJECT,
    TOUCHES_BORDER,
    UNREADABLE,
    QualityThresholds,
    assess,
)

H, W = 600, 800


def _alpha() -> np.ndarray:
    return np.zeros((H, W), np.uint8)


def _product(
    alpha: np.ndarray, cx: int = W // 2, cy: int = H // 2, ax: int = 200, ay: int = 220
) -> np.ndarray:
    cv2.ellipse(alpha, (cx, cy), (ax, ay), 0, 0, 360, 255, -1, cv2.LINE_AA)
    return alpha


def _png(alpha: np.ndarray, fmt: str = "PNG") -> bytes:
    rgb = np.full((*alpha.shape, 3), (30, 90, 160), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(buffer, fmt)
    return buffer.getvalue()


def _jpeg(gray_or_rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray_or_rgb).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_well_framed_product_earns_no_flags() -> None:
    report = assess(_png(_product(_alpha())))

    assert report.flags == ()
    assert report.ok
    assert report.source == "alpha"
    assert report.foreground_fraction == pytest.approx(np.pi * 200 * 220 / (H * W), rel=0.02)


def test_foreground_fraction_counts_pixels_at_least_half_opaque() -> None:
    alpha = _alpha()
    alpha[:, : W // 4] = 128
    alpha[:, W // 4 : W // 2] = 127

    assert assess(_png(alpha)).foreground_fraction == pytest.approx(0.25)


def test_transparent_cutout_is_empty() -> None:
    alpha = _alpha()
    alpha[10:13, 10:13] = 255

    assert assess(_png(alpha)).flags == (EMPTY,)


def test_opaque_cutout_is_nothing_removed() -> None:
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:5, :5] = 0

    report = assess(_png(alpha))

    assert report.flags == (NOTHING_REMOVED,)
    assert report.foreground_fraction == pytest.approx(1.0, abs=1e-3)


def test_product_cut_by_the_side_of_the_frame_touches_border() -> None:
    report = assess(_png(_product(_alpha(), cx=40)))

    assert report.flags == (TOUCHES_BORDER,)
    assert report.touched_edges == ("left",)


def test_single_point_touching_the_frame_is_not_a_border_cut() -> None:
    alpha = _product(_alpha())
    cv2.line(alpha, (W // 2, H // 2), (W // 2, 0), 255, 3)

    assert assess(_png(alpha)).flags == ()


def test_product_standing_on_the_bottom_edge_is_not_a_border_cut() -> None:
    alpha = _alpha()
    # A bottle in a tight crop: its base (a third of the width) rests on the bottom edge.
    cv2.rectangle(alpha, (W // 3, 150), (2 * W // 3, H - 1), 255, -1)
    cv2.rectangle(alpha, (W // 2 - 40, 40), (W // 2 + 40, 150), 255, -1)

    assert assess(_png(alpha)).flags == ()


def test_kept_floor_across_the_bottom_edge_touches_border() -> None:
    alpha = _product(_alpha())
    alpha[H - 60 :, :] = 255

    report = assess(_png(alpha))

    assert TOUCHES_BORDER in report.flags
    assert report.touched_edges == ("bottom",)


def test_bottom_edge_can_be_judged_like_the_others() -> None:
    alpha = _alpha()
    cv2.rectangle(alpha, (W // 3, 150), (2 * W // 3, H - 1), 255, -1)
    strict = QualityThresholds(bottom_border_share=0.15)

    assert assess(_png(alpha), thresholds=strict).touched_edges == ("bottom",)


def test_many_separate_pieces_are_fragmented() -> None:
    alpha = _alpha()
    for cx in (100, 250, 400, 550, 700):
        cv2.circle(alpha, (cx, H // 2), 60, 255, -1)

    report = assess(_png(alpha))

    assert report.flags == (FRAGMENTED,)
    assert report.pieces == 5


def test_pair_of_shoes_is_not_fragmented() -> None:
    alpha = _alpha()
    cv2.ellipse(alpha, (250, 300), (140, 70), 0, 0, 360, 255, -1)
    cv2.ellipse(alpha, (560, 300), (140, 70), 0, 0, 360, 255, -1)

    report = assess(_png(alpha))

    assert report.flags == ()
    assert report.pieces == 2


def test_specks_beside_the_product_do_not_count_as_pieces() -> None:
    alpha = _product(_alpha())
    for x in range(20, 200, 30):
        alpha[20:22, x : x + 2] = 255

    assert assess(_png(alpha)).pieces == 1


def test_small_object_in_a_large_frame_is_tiny() -> None:
    alpha = _alpha()
    cv2.rectangle(alpha, (380, 280), (430, 330), 255, -1)

    assert assess(_png(alpha)).flags == (TINY_OBJECT,)


def test_jpg_cutout_without_mask_has_no_fraction_and_no_flags() -> None:
    report = assess(_jpeg(np.full((H, W, 3), 255, np.uint8)))

    assert report.foreground_fraction is None
    assert report.flags == ()
    assert report.source is None


def test_jpg_cutout_is_judged_by_its_binary_mask() -> None:
    mask = _product(_alpha(), cx=40)

    report = assess(_jpeg(np.full((H, W, 3), 255, np.uint8)), mask=_jpeg(mask))

    assert report.source == "mask"
    assert report.flags == (TOUCHES_BORDER,)
    assert report.foreground_fraction == pytest.approx(float(np.mean(mask >= 128)), abs=0.01)


def test_the_mask_wins_over_the_cutout_alpha_because_it_decodes_at_reduced_size() -> None:
    report = assess(_png(_product(_alpha())), mask=_jpeg(np.zeros((H, W), np.uint8)))

    assert report.source == "mask"
    assert report.flags == (EMPTY,)


def test_webp_cutout_with_alpha_is_assessed() -> None:
    report = assess(_png(_product(_alpha(), cx=40), fmt="WEBP"))

    assert report.flags == (TOUCHES_BORDER,)


def test_palette_png_with_transparency_is_assessed() -> None:
    image = Image.fromarray(np.dstack([np.zeros((H, W, 3), np.uint8), _product(_alpha())]), "RGBA")
    buffer = io.BytesIO()
    image.quantize(colors=4, method=Image.Quantize.FASTOCTREE).save(buffer, "PNG")

    report = assess(buffer.getvalue())

    assert report.source == "alpha"
    assert report.foreground_fraction == pytest.approx(np.pi * 200 * 220 / (H * W), rel=0.05)


def test_undecodable_bytes_are_flagged_unreadable() -> None:
    report = assess(b"\x89PNG\r\n\x1a\nnot really a png")

    assert report.flags == (UNREADABLE,)
    assert report.foreground_fraction is None


def test_shape_checks_hold_at_a_small_analysis_size() -> None:
    coarse = QualityThresholds(analysis_size=64)

    assert assess(_png(_product(_alpha(), cx=40)), thresholds=coarse).touched_edges == ("left",)
    assert assess(_png(_product(_alpha())), thresholds=coarse).flags == ()


def test_thresholds_are_configurable() -> None:
    alpha = _alpha()
    cv2.rectangle(alpha, (380, 280), (430, 330), 255, -1)

    assert assess(_png(alpha), thresholds=QualityThresholds(tiny_box_share=0.001)).flags == ()


def test_invalid_thresholds_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="fragmented_pieces"):
        QualityThresholds(fragmented_pieces=1)
