"""GrabCut refinement of a mask's outline band, and the clean-up of a product mask."""

from __future__ import annotations

import math

import cv2
import numpy as np

from removebg_provider.engines._regions import regions

# Pixels GrabCut's k-means fits its first colour models to (a regular sample of the cut's crop).
_MODEL_SAMPLES = 10_000
# Backdrop GrabCut sees beyond the band it re-decides, in band widths: enough for its backdrop colour
# model, and every pixel of the crop costs time in each iteration.
_CUT_MARGIN = 0.25
# GrabCut iterates in rounds of this many iterations, until a round changes at most this share of
# its crop (or the mode's iterations are spent).
_CUT_ROUND = 2
_CUT_SETTLED = 2e-4


def clean(foreground: np.ndarray) -> np.ndarray:
    """Drop specks and thin spurs, keep every sizeable component, fill pinholes."""
    h, w = foreground.shape
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    mask = cv2.morphologyEx(foreground.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    count, labels, areas = regions(mask, connectivity=8)
    if count <= 1:
        return np.zeros((h, w), bool)
    area = areas[1:]
    keep = np.zeros(count, bool)
    keep[1:] = (area >= 0.05 * area.max()) & (area >= max(16, 0.001 * h * w))
    mask = keep[labels]
    holes = ~mask
    _, labels, areas = regions(holes, connectivity=4)
    small = areas < max(4, int(0.0005 * h * w))
    small[0] = False
    return mask | (small[labels] & holes)


def graph_cut(
    rgb: np.ndarray,
    foreground: np.ndarray,
    iterations: int,
    band_share: float,
    unsure: np.ndarray | None = None,
) -> np.ndarray:
    """Re-decide a band around the outline with GrabCut, seeded by the backdrop model's mask.

    `unsure` pixels of the mask are seeded as probable backdrop instead of (probable) product.
    """
    h, w = foreground.shape
    band = max(2, round(band_share * math.sqrt(h * w)))
    # Distances instead of an erosion and a dilation by a disc of radius `band`: the same band, but
    # linear in the pixels rather than in pixels times the disc's area.
    fg8 = foreground.astype(np.uint8)
    inner = cv2.distanceTransform(fg8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) > band
    outer = cv2.distanceTransform(1 - fg8, cv2.DIST_L2, cv2.DIST_MASK_PRECISE) <= band
    mask = np.full((h, w), cv2.GC_BGD, np.uint8)
    mask[outer] = cv2.GC_PR_BGD
    mask[foreground] = cv2.GC_PR_FGD
    mask[inner] = cv2.GC_FGD
    if unsure is not None:
        mask[unsure] = cv2.GC_PR_BGD
    ys, xs = np.nonzero(outer)
    margin = round(_CUT_MARGIN * band)
    y0, y1 = max(0, ys.min() - margin), min(h, ys.max() + margin + 1)
    x0, x1 = max(0, xs.min() - margin), min(w, xs.max() + margin + 1)
    crop = mask[y0:y1, x0:x1].copy()
    if not ((crop == cv2.GC_BGD) | (crop == cv2.GC_PR_BGD)).any():
        return foreground
    image = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    bgd_model, fgd_model = _initial_colour_models(image, crop)
    # Iterations in rounds, stopping once a round leaves the cut (nearly) as it was: most photos
    # settle in two or three, a few keep moving to the last. Each call carries the colour models over,
    # so rounds compute what one call with all the iterations would, up to where they stop.
    done = 0
    while done < iterations:
        before = crop & 1  # GC_FGD and GC_PR_FGD are odd
        rounds = min(_CUT_ROUND, iterations - done)
        cv2.grabCut(image, crop, (0, 0, 1, 1), bgd_model, fgd_model, rounds, cv2.GC_EVAL)
        done += rounds
        if np.count_nonzero((crop & 1) != before) <= _CUT_SETTLED * crop.size:
            break
    result = foreground.copy()
    result[y0:y1, x0:x1] = (crop == cv2.GC_FGD) | (crop == cv2.GC_PR_FGD)
    return clean(result)


def _initial_colour_models(image: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GrabCut's first backdrop and product colour models, fitted to a regular sample of the seeds.

    GrabCut starts its models with k-means over every pixel, which costs more than an iteration; a
    sample of about `_MODEL_SAMPLES` pixels finds the same colour clusters. The sample keeps both
    kinds of seed when the full crop has both.
    """
    stride = max(1, math.isqrt(image.shape[0] * image.shape[1] // _MODEL_SAMPLES))
    sample_image, sample_seeds = image[::stride, ::stride], seeds[::stride, ::stride]
    is_backdrop = (sample_seeds == cv2.GC_BGD) | (sample_seeds == cv2.GC_PR_BGD)
    if is_backdrop.all() or not is_backdrop.any():
        sample_image, sample_seeds = image, seeds
    # K-means draws its first centres from OpenCV's global generator: a fixed seed makes the same
    # photo give the same matte whatever ran before it in the process.
    cv2.setRNGSeed(0)
    bgd_model = np.zeros((1, 65), np.float64)
    fgd_model = np.zeros((1, 65), np.float64)
    cv2.grabCut(
        np.ascontiguousarray(sample_image),
        np.ascontiguousarray(sample_seeds),
        (0, 0, 1, 1),  # ignored with GC_INIT_WITH_MASK
        bgd_model,
        fgd_model,
        0,
        cv2.GC_INIT_WITH_MASK,
    )
    return bgd_model, fgd_model
