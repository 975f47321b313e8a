"""Cheap per-cutout quality signals from the alpha channel: foreground share and review flags."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

EMPTY = "empty"
NOTHING_REMOVED = "nothing_removed"
TOUCHES_BORDER = "touches_border"
FRAGMENTED = "fragmented"
TINY_OBJECT = "tiny_object"
UNREADABLE = "unreadable"
FLAGS: tuple[str, ...] = (EMPTY, NOTHING_REMOVED, UNREADABLE, TOUCHES_BORDER, FRAGMENTED, TINY_OBJECT)
EDGES: tuple[str, ...] = ("top", "bottom", "left", "right")

# The pipeline checks many cutouts at once, one per thread. OpenCV's own threads on one cutout only
# spin waiting for work: twice the CPU for a small cutout (0.86 against 0.38 ms at 64 x 48) and
# nothing gained at 1 MP (24 ms either way). Process-wide: an engine served from the same process
# (the tests' API server) runs on one OpenCV thread too, which changes its speed, not its mattes.
cv2.setNumThreads(1)


@dataclass(frozen=True)
class QualityThresholds:
    """When a cutout earns each flag. Shares are of the frame unless said otherwise.

    A pixel is opaque when its alpha is at least `opaque_alpha` (of 255). Shape checks run on
    the alpha reduced (box average) to at most `analysis_size` pixels on its long side, so one
    analysis pixel stands for a block of the original; the foreground fraction itself is exact.

    - `empty`: under `empty_fraction` of the frame is opaque (default 0.2 %). Nothing else is
      checked: there is no object to judge.
    - `nothing_removed`: at least `nothing_removed_fraction` of the frame is opaque (default 97 %).
      Nothing else is checked: such a frame touches every edge by construction.
    - `touches_border`: the object is cut by the frame. An edge counts as touched when opaque
      pixels cover at least `border_share` of the outermost analysis row or column (default 15 %),
      so a corner or a single touching pixel does not count. The bottom edge uses the laxer
      `bottom_border_share` (default 60 %): packshots often stand the product on the bottom of a
      tight crop (a bottle's base, a shoe's sole), which is fine; a kept floor or table, or a
      product cut off below, covers most of the bottom edge. Set it equal to `border_share` to
      judge all edges alike, or above 1 to ignore the bottom edge.
    - `fragmented`: at least `fragmented_pieces` separate opaque pieces (8-connected) each hold
      `min_piece_share` of the opaque area or more (defaults 4 pieces, 1 % each). A pair of shoes
      (2) or a set of three is not flagged; a product split apart or patches of kept background are.
    - `tiny_object`: the largest piece's bounding box covers under `tiny_box_share` of the frame
      (default 2 %, e.g. 14 % x 14 %), although the frame is not empty.
    """

    opaque_alpha: int = 128
    empty_fraction: float = 0.002
    nothing_removed_fraction: float = 0.97
    border_share: float = 0.15
    bottom_border_share: float = 0.6
    fragmented_pieces: int = 4
    min_piece_share: float = 0.01
    tiny_box_share: float = 0.02
    analysis_size: int = 512

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.opaque_alpha <= 255:
            problems.append(f"opaque_alpha must be within 1..255, not {self.opaque_alpha}")
        for name in ("empty_fraction", "nothing_removed_fraction", "min_piece_share", "tiny_box_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be within 0..1, not {getattr(self, name)}")
        for name in ("border_share", "bottom_border_share"):
            if getattr(self, name) <= 0.0:
                problems.append(f"{name} must be above 0, not {getattr(self, name)}")
        if self.fragmented_pieces < 2:
            problems.append(f"fragmented_pieces must be at least 2, not {self.fragmented_pieces}")
        if self.analysis_size < 16:
            problems.append(f"analysis_size must be at least 16, not {self.analysis_size}")
        if problems:
            raise ValueError("invalid quality thresholds: " + "; ".join(problems))


@dataclass(frozen=True)
class QualityReport:
    """The quality signals of one cutout.

    `foreground_fraction` is the opaque share of the frame, None when neither the cutout nor a
    mask carries transparency (a jpg cutout flattened on white). `flags` is empty when nothing
    looks wrong; its names are those in `FLAGS`. `source` says what was measured: "alpha",
    "mask" or None. `touched_edges` and `pieces` explain `touches_border` and `fragmented`.
    """

    foreground_fraction: float | None
    flags: tuple[str, ...] = ()
    source: str | None = None
    touched_edges: tuple[str, ...] = ()
    pieces: int = 0

    @property
    def ok(self) -> bool:
        return not self.flags


DEFAULT_THRESHOLDS = QualityThresholds()


def assess(
    cutout: bytes | None, mask: bytes | None = None, *, thresholds: QualityThresholds = DEFAULT_THRESHOLDS
) -> QualityReport:
    """The quality signals of a cutout, from its mask when there is one, else from its alpha.

    `mask` is the API's mask image (a grayscale JPEG, white = kept). It is preferred because a JPEG
    decodes straight at reduced scale, while a PNG or WEBP cutout must be decoded in full (about
    14 ms per megapixel; see docs/BENCHMARKS.md). Without either there is nothing to measure and
    the report has no fraction and no flags. Undecodable bytes earn the `unreadable` flag instead
    of an exception, so a caller copying outputs never fails on the check itself.
    """
    try:
        alpha: _Alpha | None
        if mask is not None:
            alpha, source = _mask_alpha(mask, thresholds.analysis_size), "mask"
        elif cutout is None:
            return QualityReport(None)
        else:
            alpha, source = _cutout_alpha(cutout, thresholds.analysis_size), "alpha"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return QualityReport(None, (UNREADABLE,))
    if alpha is None:
        return QualityReport(None)
    return _judge(alpha, source, thresholds)


def opaque_fraction(alpha: np.ndarray, opaque_alpha: int = DEFAULT_THRESHOLDS.opaque_alpha) -> float:
    """The share of pixels of an 8-bit alpha array that are at least `opaque_alpha`."""
    return float(np.count_nonzero(alpha >= opaque_alpha)) / alpha.size if alpha.size else 0.0


@dataclass(frozen=True)
class _Alpha:
    fraction: float
    small: np.ndarray


def _cutout_alpha(data: bytes, analysis_size: int) -> _Alpha | None:
    with warnings.catch_warnings():
        # A truncated or odd file is reported as unreadable; PIL's warnings add nothing to that.
        warnings.simplefilter("ignore")
        image: Image.Image = Image.open(io.BytesIO(data))
        if not image.has_transparency_data:
            image.close()
            return None
        if image.mode not in ("RGBA", "LA", "La", "RGBa"):
            image = image.convert("RGBA")
        alpha = image.getchannel("A")
    full = np.asarray(alpha)
    return _Alpha(opaque_fraction(full), _reduced(alpha, analysis_size))


def _mask_alpha(data: bytes, analysis_size: int) -> _Alpha:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data))
        # A JPEG decodes straight at 1/2, 1/4 or 1/8 scale: most of the saving on large masks.
        image.draft("L", (analysis_size, analysis_size))
        gray = image.convert("L")
    small = _reduced(gray, analysis_size)
    return _Alpha(opaque_fraction(small), small)


def _reduced(channel: Image.Image, analysis_size: int) -> np.ndarray:
    factor = math.ceil(max(channel.size) / analysis_size)
    if factor > 1:
        channel = channel.reduce(factor)
    return np.asarray(channel)


def _judge(alpha: _Alpha, source: str, thresholds: QualityThresholds) -> QualityReport:
    fraction = alpha.fraction
    if fraction < thresholds.empty_fraction:
        return QualityReport(fraction, (EMPTY,), source)
    if fraction >= thresholds.nothing_removed_fraction:
        return QualityReport(fraction, (NOTHING_REMOVED,), source)
    opaque = (alpha.small >= thresholds.opaque_alpha).astype(np.uint8)
    flags: list[str] = []
    edges = _touched_edges(opaque, thresholds)
    if edges:
        flags.append(TOUCHES_BORDER)
    # Labels, then areas and the one box needed, by hand: connectedComponentsWithStats computes
    # every piece's statistics and took several times as long as labelling alone.
    count, labels = cv2.connectedComponents(opaque, connectivity=8, ltype=cv2.CV_32S)
    areas = np.bincount(labels.ravel(), minlength=count)[1:]
    total = int(areas.sum())
    pieces = int(np.count_nonzero(areas >= thresholds.min_piece_share * total)) if total else 0
    if pieces >= thresholds.fragmented_pieces:
        flags.append(FRAGMENTED)
    if total:
        largest = labels == 1 + int(np.argmax(areas))
        _, _, width, height = cv2.boundingRect(largest.view(np.uint8))
        box = width * height
        if box < thresholds.tiny_box_share * opaque.size:
            flags.append(TINY_OBJECT)
    return QualityReport(fraction, tuple(flags), source, edges, pieces)


def _touched_edges(opaque: np.ndarray, thresholds: QualityThresholds) -> tuple[str, ...]:
    lines = {"top": opaque[0, :], "bottom": opaque[-1, :], "left": opaque[:, 0], "right": opaque[:, -1]}
    touched = []
    for edge in EDGES:
        needed = thresholds.bottom_border_share if edge == "bottom" else thresholds.border_share
        line = lines[edge]
        if line.size and np.count_nonzero(line) >= needed * line.size:
            touched.append(edge)
    return tuple(touched)
