"""The weight-free engine: background modelling, graph cut and guided-filter matting with OpenCV."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from removebg_provider.engines import MODES, Mode
from removebg_provider.engines._graph_cut import clean, graph_cut
from removebg_provider.engines._guided import apply_coefficients, guided_coefficients
from removebg_provider.engines._regions import regions

# Rounds of flood-then-refit; each lets the backdrop model follow gradients further inwards.
_ROUNDS = 3
# A shadow's soft outline towards the lit backdrop is at least this long relative to its sharp one.
_SHADOW_FADE_RATIO = 1.0
# Width (working pixels) of the frame looked at around an enclosed region to tell holes from faces.
_HOLE_FRAME = 10
# Share of that frame that must be product (not backdrop or shadow) for the region to be a hole.
_HOLE_FRAMED = 0.7
# Share of a hole's own outline that must be sharp: a chrome band that mirrors the backdrop is also
# enclosed by product, but fades into the darker bands beside it.
_HOLE_SHARP = 0.6
# Share of a hole that must match the backdrop model itself, not only a darker or lighter copy of it:
# a see-through hole shows the backdrop, a pale label on the product is shaded by the product's light.
_HOLE_EXACT = 0.05
# Share of a leftover shadow's edges (against its walls) that must open onto the backdrop outside the
# product: GrabCut's outline usually follows a shadow's dark core, so less than the segment flood needs.
_SHADOW_OPEN = 0.2
# Pixels darker than this factor of the backdrop around them, in its colour, may be shadow; paler ones
# are left to the product, since a white product is a slightly darker copy of a white backdrop too.
_SHADE_FACTOR = 0.8
# Largest share of sharp edges where a dropped region meets the backdrop for it to count as shadow.
_SHADOW_SOFT = 0.75
# Largest share of the first cut that the second may drop as shadow.
_SHADOW_SHARE = 0.4
# Largest step (per channel, 0-255) between neighbouring pixels that the smooth flood still follows.
_FLOOD_STEP = 2.0
# Share of a region's outline that must touch known backdrop before the smooth flood may claim it.
_FLOOD_FADE = 0.6
# How far (fraction of the diagonal) a shadow may reach into a region that is not clearly shadow.
_SHADOW_REACH = 0.02
# Window (working pixels) and fraction of its contrast a pixel step must reach to count as sharp.
_SHARPNESS_WINDOW = 7
_MIN_SHARPNESS = 0.25
# Faint outlines are traced at two scales (Gaussian sigmas, working pixels): a step edge's gradient
# shrinks with the scale, a shadow's wide penumbra keeps it, so their ratio tells them apart.
_FINE_SIGMA = 1.0
_COARSE_SIGMA = 2.5
_MIN_STEP_RATIO = 1.5
# Hysteresis thresholds of the faint-outline tracer, in multiples of the backdrop's gradient noise,
# which is floored so that a noise-free (JPEG-smoothed) backdrop does not make banding an outline.
_TRACE_HIGH = 8.0
_TRACE_LOW = 4.0
# Canny takes 16-bit gradients: a fixed gain keeps the fractional part of faint ones.
_TRACE_GAIN = 16.0
# Precise mode also cuts with the sensitive settings below, which find a white product on a white
# backdrop but take noise and banding for outlines on many photos; a cut keeping less of the frame
# than this (or all but this) is no product.
_MIN_PRODUCT_SHARE = 0.02
# How much more of its outline the sensitive cut must have on image edges to replace the normal one.
_SUPPORT_MARGIN = 0.05
# Precise mode's faint-settings mask differs from the normal one by a few specks on most photos; below
# this share of the frame its cut would follow the same outline, so it is not made.
_FAINT_DIFFERENCE = 0.005


@dataclass(frozen=True)
class Sensitivity:
    """How small a difference from the backdrop counts: floors under the noise-scaled thresholds."""

    min_tolerance: float  # colour distance (levels) within which a pixel matches the backdrop model
    min_edge: float  # gradient (levels per pixel) an edge needs before the sharpness test
    min_gradient_noise: float  # floor of the faint-outline tracer's gradient noise


NORMAL = Sensitivity(min_tolerance=9.0, min_edge=4.0, min_gradient_noise=0.3)
FAINT = Sensitivity(min_tolerance=4.0, min_edge=4.0, min_gradient_noise=0.15)


@dataclass(frozen=True)
class ModeParams:
    """Everything that differs between the modes; the code path is the same."""

    work_pixels: int  # pixel budget of the reduced resolution the mask and the matte's guide run at
    grabcut_iterations: int  # at most: GrabCut stops early once its cut has settled
    cut_band: float  # half-width of the band GrabCut re-decides, as a fraction of sqrt(working area)
    guide_radius: int  # guided-filter window radius, in working-resolution pixels
    guide_eps: float  # guided-filter regulariser: lower follows weaker image edges
    colour_guide: bool  # a colour guide separates edges that are invisible in grey
    recheck: bool  # search again for a missed faint product, and for backdrop left inside the outline


# Both modes cut at the backdrop model's resolution: a finer one measured worse (360k pixels lost
# 0.007 mean IoU on development photos), and so did a coarser one (a 60k-pixel cut lost 0.009 in fast
# and 0.005 in precise, keeping shadows whose penumbra looks sharp at that scale; segmenting at 60k
# too lost shadows and mug handles the same way). A wide band lets GrabCut cut off the penumbra of a
# shadow that the backdrop model left joined to the product, or a mirrored chrome band it took for
# backdrop.
MODE_PARAMS: dict[Mode, ModeParams] = {
    "fast": ModeParams(
        work_pixels=120_000,
        grabcut_iterations=2,
        cut_band=0.1,
        guide_radius=2,
        guide_eps=2e-3,
        colour_guide=False,
        recheck=False,
    ),
    "precise": ModeParams(
        work_pixels=120_000,
        grabcut_iterations=10,
        cut_band=0.1,
        guide_radius=2,
        guide_eps=5e-4,
        colour_guide=True,
        recheck=True,
    ),
}


@dataclass(eq=False)
class _Photo:
    """What every pass reads of the reduced photo, worked out once: precise mode segments it twice.

    `edges` keeps the sharp-edge map of each sensitivity; the gradients behind them are shared.
    """

    rgb: np.ndarray  # the reduced photo, uint8
    img: np.ndarray  # lightly smoothed, float32
    channels: Sequence[np.ndarray]  # `img`'s planes, contiguous: per-pixel colour arithmetic runs on them
    border: np.ndarray
    surface: np.ndarray  # the backdrop model fitted to the border
    noise: float  # colour noise of the backdrop along the border
    _outline_parts: _OutlineParts
    _edges: dict[Sensitivity, np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, rgb: np.ndarray) -> _Photo:
        h, w = rgb.shape[:2]
        levels = cv2.GaussianBlur(rgb, (3, 3), 0)
        img = levels.astype(np.float32)
        border = _border_mask(h, w)
        surface = _fill_in(img, border)
        return cls(
            rgb,
            img,
            cv2.split(img),
            border,
            surface,
            _noise(img, surface, border),
            _OutlineParts.of(levels, img, border),
        )

    def edges(self, sensitivity: Sensitivity) -> np.ndarray:
        """Sharp-edge pixels: product outlines stop the backdrop flood, soft shadow borders do not."""
        if sensitivity not in self._edges:
            self._edges[sensitivity] = self._outline_parts.edges(self.noise, sensitivity)
        return self._edges[sensitivity]


class ClassicEngine:
    """Studio-photo background removal without model weights.

    Takes RGB only (H x W x 3 uint8); callers convert grayscale or RGBA inputs first.
    Memory stays bounded for very large images: the backdrop model, the graph cut and the matte
    fitting run at `work_pixels`, and the full-resolution matte streams over row strips.
    """

    name = "classic"

    def matte(self, rgb: np.ndarray, mode: Mode) -> np.ndarray:
        """Return the alpha matte (H x W uint8, 255 = product) of an RGB studio photo."""
        _check_rgb(rgb)
        if mode not in MODE_PARAMS:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        params = MODE_PARAMS[mode]
        small = _reduce(rgb, params.work_pixels)
        photo = _Photo.of(small)
        mask = _segment(photo, NORMAL)
        foreground = _cut(small, mask, params.grabcut_iterations, params.cut_band)
        if params.recheck:
            foreground = _recheck(photo, mask, foreground, params)
        coefficients = guided_coefficients(
            small, foreground.astype(np.float32), params.guide_radius, params.guide_eps, params.colour_guide
        )
        return apply_coefficients(rgb, coefficients, params.colour_guide)


def _cut(
    small: np.ndarray, mask: np.ndarray, iterations: int, band: float, unsure: np.ndarray | None = None
) -> np.ndarray:
    """GrabCut's refinement of a backdrop-model mask that has both product and backdrop in it."""
    if mask.any() and not mask.all():
        return graph_cut(small, mask, iterations, band, unsure)
    return mask


def _recheck(photo: _Photo, mask: np.ndarray, foreground: np.ndarray, params: ModeParams) -> np.ndarray:
    """Precise mode's second opinions on a cut: a faint product missed, a shadow kept, backdrop inside."""
    small = photo.rgb
    faint = _segment(photo, FAINT)
    differs = np.count_nonzero(faint != mask) > _FAINT_DIFFERENCE * mask.size
    second = _cut(small, faint, params.grabcut_iterations, params.cut_band) if differs else foreground
    if _MIN_PRODUCT_SHARE <= second.mean() <= 1 - _MIN_PRODUCT_SHARE:
        # The cut whose outline runs along image edges wins: a faint product's outline missed in part
        # leaves the first cut's border crossing smooth surface, while the faint settings' noise and
        # banding blobs run off the edges they came from.
        edges = photo.edges(FAINT)
        if (
            not _MIN_PRODUCT_SHARE <= foreground.mean() <= 1 - _MIN_PRODUCT_SHARE
            or _outline_support(second, edges) > _outline_support(foreground, edges) + _SUPPORT_MARGIN
        ):
            mask, foreground = faint, second
    if not foreground.any() or foreground.all():
        return foreground
    tolerance = max(NORMAL.min_tolerance, 3.5 * photo.noise)
    barrier = photo.edges(NORMAL)
    foreground = _without_shadow(photo, mask, foreground, barrier, tolerance, params)
    return foreground & ~_backdrop_left_in(photo, foreground, barrier, tolerance)


def _outline_support(mask: np.ndarray, edges: np.ndarray) -> float:
    """Share of the mask's outline that lies on (within two pixels of) an image edge."""
    ring = np.ones((3, 3), np.uint8)
    outline = mask & ~cv2.erode(mask.astype(np.uint8), ring).astype(bool)
    if not outline.any():
        return 0.0
    near = cv2.dilate(edges.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    return float(np.mean(near[outline]))


def _without_shadow(
    photo: _Photo,
    mask: np.ndarray,
    foreground: np.ndarray,
    barrier: np.ndarray,
    tolerance: float,
    params: ModeParams,
) -> np.ndarray:
    """The cut again with the shadow-coloured part of the mask left to GrabCut as probable backdrop.

    GrabCut keeps a shadow that the backdrop model joined to the product: seeded as product, the
    shadow's colours enter the product's colour model. Seeding every clearly darker copy of the
    backdrop as backdrop instead removes such a shadow, but also a grey product on a paler backdrop.
    The two are told apart by what the second cut drops: a shadow fades into the backdrop, so few of
    its edges towards the backdrop are sharp; a product's outline is sharp nearly all round.
    """
    factor, off_axis = _scaled_copy(photo.channels, cv2.split(_backdrop_around(photo.img, mask)))
    shade = mask & (factor > 0.35) & (factor < _SHADE_FACTOR) & (off_axis < tolerance * tolerance)
    if not shade.any():
        return foreground
    unshaded = _cut(photo.rgb, mask, params.grabcut_iterations, params.cut_band, unsure=shade)
    dropped = foreground & ~unshaded
    rim = cv2.dilate(dropped.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~foreground
    if not rim.any() or np.mean(barrier[rim]) >= _SHADOW_SOFT:
        return foreground
    # A defocused grey product has a soft outline too; it is the bulk of the mask, not a fringe of it.
    if np.count_nonzero(dropped) > _SHADOW_SHARE * np.count_nonzero(foreground):
        return foreground
    return unshaded


def _backdrop_around(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The backdrop interpolated into the mask from all around it (which follows gradients and shadows)."""
    known = cv2.erode((~mask).astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    return _push_pull(img * known[..., None], known.astype(np.float32))


def segment(rgb: np.ndarray, sensitivity: Sensitivity = NORMAL) -> np.ndarray:
    """Boolean foreground mask of a (small) studio photo: everything the backdrop cannot explain.

    The backdrop is modelled locally, by smoothly filling in the colours of pixels already known to be
    backdrop (at first only the border). A pixel is backdrop when it matches that model, or is a darker
    copy of it (a cast shadow), and is reachable from the border without crossing a sharp edge:
    products have sharp outlines, shadows do not. Each round refits the model to the unshadowed
    backdrop found so far, so gradients and vignettes are followed inwards; the last round also
    accepts enclosed see-through holes. A spotlight whose colour no border-fitted model predicts (the
    centre of a radial gradient) is then added by a flood that follows smooth change from the border.
    """
    return _segment(_Photo.of(rgb), sensitivity)


def _segment(photo: _Photo, sensitivity: Sensitivity) -> np.ndarray:
    """`segment` of a photo already worked out, so precise mode's two sensitivities share the work."""
    img, border, surface = photo.img, photo.border, photo.surface
    barrier = photo.edges(sensitivity)
    tolerance = max(sensitivity.min_tolerance, 3.5 * photo.noise)
    background = border
    for final in [False] * (_ROUNDS - 1) + [True]:
        background, lit = _flood_backdrop(photo.channels, surface, tolerance, barrier, border, holes=final)
        if final or not lit.any():
            break
        surface = _fill_in(img, lit)
    background |= _smooth_backdrop(img, barrier, border, background)
    return clean(~background)


def _check_rgb(rgb: np.ndarray) -> None:
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        shape = getattr(rgb, "shape", None)
        dtype = getattr(rgb, "dtype", type(rgb).__name__)
        raise ValueError(
            f"engines take RGB images as H x W x 3 uint8 arrays, got shape {shape} dtype {dtype}; "
            "convert grayscale or RGBA images to RGB before calling matte()"
        )
    if rgb.shape[0] < 8 or rgb.shape[1] < 8:
        raise ValueError(f"image of {rgb.shape[1]}x{rgb.shape[0]} pixels is too small; need at least 8x8")


def _reduce(rgb: np.ndarray, pixels: int) -> np.ndarray:
    """The image shrunk (never enlarged) to about `pixels` pixels."""
    h, w = rgb.shape[:2]
    scale = min(1.0, math.sqrt(pixels / (h * w)))
    if scale >= 1.0:
        return rgb
    size = (max(8, round(w * scale)), max(8, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _border_mask(h: int, w: int) -> np.ndarray:
    band = max(2, round(0.02 * min(h, w)))
    mask = np.zeros((h, w), bool)
    mask[:band] = mask[-band:] = True
    mask[:, :band] = mask[:, -band:] = True
    return mask


def _fill_in(img: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Smooth backdrop colour everywhere, interpolated from `known` pixels (normalised convolution).

    Runs on a quarter-size copy: the backdrop is smooth, and this keeps the wide blur cheap.
    """
    h, w = known.shape
    small_size = (max(4, w // 4), max(4, h // 4))
    weight = cv2.resize(known.astype(np.float32), small_size, interpolation=cv2.INTER_AREA)
    colour = cv2.resize(img * known[..., None], small_size, interpolation=cv2.INTER_AREA)
    sigma = 0.04 * math.hypot(*small_size)
    weight_b = cv2.GaussianBlur(weight, (0, 0), sigma)
    colour_b = cv2.GaussianBlur(colour, (0, 0), sigma)
    # Far from every known pixel the local estimate is undefined: continue the backdrop from the
    # nearest known pixels, so a gradient carries on into the middle of a large product or its hole.
    trust = np.clip(weight_b / 0.02, 0, 1)[..., None]
    local = colour_b / np.maximum(weight_b, 1e-6)[..., None]
    filled = local * trust + _push_pull(colour_b, weight_b) * (1 - trust)
    return cv2.resize(filled, (w, h), interpolation=cv2.INTER_LINEAR)


def _push_pull(colour: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Colour everywhere from weighted samples: coarser levels fill gaps, finer ones keep detail."""
    levels = [(colour, weight)]
    while min(levels[-1][1].shape) > 2 and levels[-1][1].min() <= 1e-4:
        c, wt = levels[-1]
        size = (max(1, wt.shape[1] // 2), max(1, wt.shape[0] // 2))
        levels.append(
            (
                cv2.resize(c, size, interpolation=cv2.INTER_AREA),
                cv2.resize(wt, size, interpolation=cv2.INTER_AREA),
            )
        )
    c, wt = levels[-1]
    total = max(float(wt.sum()), 1e-6)
    filled = np.where(
        wt[..., None] > 1e-4, c / np.maximum(wt, 1e-6)[..., None], c.reshape(-1, 3).sum(axis=0) / total
    ).astype(np.float32)
    for c, wt in reversed(levels[:-1]):
        coarse = cv2.resize(filled, (wt.shape[1], wt.shape[0]), interpolation=cv2.INTER_LINEAR)
        share = np.clip(wt / 0.02, 0, 1)[..., None]
        filled = c / np.maximum(wt, 1e-6)[..., None] * share + coarse * (1 - share)
    return filled


def _noise(img: np.ndarray, surface: np.ndarray, sample: np.ndarray) -> float:
    """Robust noise level (colour distance) of the backdrop pixels in `sample`."""
    residual = np.linalg.norm(img[sample] - surface[sample], axis=1)
    return float(1.4826 * np.median(residual))


@dataclass(frozen=True)
class _OutlineParts:
    """The parts of edge finding that no sensitivity changes, so both sensitivities share them."""

    magnitude: np.ndarray  # gradient strength: the larger of the grey and the strongest channel's
    sharp: np.ndarray  # where a step climbs enough of its local contrast to be an outline, not a penumbra
    step_dx: np.ndarray  # fine-scale gradient of the strongest channel (int16, x `_TRACE_GAIN`), 0 off steps
    step_dy: np.ndarray
    step_noise: float  # median fine-scale gradient along the border

    @classmethod
    def of(cls, levels: np.ndarray, img: np.ndarray, border: np.ndarray) -> _OutlineParts:
        """`img` is `levels` (uint8) as float32: filters whose results are whole-level sums or extremes
        give the same numbers from `levels`, faster."""
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3) / 8
        gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3) / 8
        # Colour edges matter too: a red product on a same-brightness green backdrop has no grey edge.
        colour = (
            np.maximum(
                _channel_max(np.abs(cv2.Sobel(levels, cv2.CV_32F, 1, 0, ksize=3))),
                _channel_max(np.abs(cv2.Sobel(levels, cv2.CV_32F, 0, 1, ksize=3))),
            )
            / 8
        )
        magnitude = np.maximum(np.sqrt(gx * gx + gy * gy), colour)
        # Sharpness: a step edge climbs most of its local contrast within a pixel or two, a shadow's
        # penumbra spreads the same contrast over many pixels.
        window = np.ones((_SHARPNESS_WINDOW, _SHARPNESS_WINDOW), np.uint8)
        contrast = _channel_max(cv2.dilate(levels, window) - cv2.erode(levels, window)).astype(np.float32)
        step_dx, step_dy, step_noise = _step_gradients(img, border)
        return cls(magnitude, magnitude >= _MIN_SHARPNESS * contrast, step_dx, step_dy, step_noise)

    def edges(self, noise: float, sensitivity: Sensitivity) -> np.ndarray:
        """Sharp-edge pixels at a sensitivity: sharp steps above the noise, and faint linked outlines."""
        edges = (self.magnitude > max(sensitivity.min_edge, 2.5 * noise)) & self.sharp
        edges |= self._faint_outlines(sensitivity.min_gradient_noise)
        # Thickening closes one-pixel gaps in faint outlines, which would otherwise let the flood leak in.
        return cv2.dilate(edges.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)

    def _faint_outlines(self, min_noise: float) -> np.ndarray:
        """Thin, linked step edges too faint for the contrast test: a white product on a white backdrop.

        Canny's hysteresis follows an outline through its faintest stretches as long as they join a
        clearer part, and ignores isolated noise; it runs on smoothed gradients with every step that
        is not much sharper at the fine scale than at the coarse one (a shadow's penumbra) zeroed out.
        """
        noise = max(self.step_noise, min_noise)
        low, high = _TRACE_LOW * noise * _TRACE_GAIN, _TRACE_HIGH * noise * _TRACE_GAIN
        return cv2.Canny(self.step_dx, self.step_dy, low, high, L2gradient=True) > 0


def _step_gradients(img: np.ndarray, border: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Canny's input for faint outlines: the fine-scale gradient where it is a step, and its border noise."""
    fine_x, fine_y = _gradients(img, _FINE_SIGMA)
    fine = fine_x * fine_x + fine_y * fine_y
    # Per pixel, the channel that changes most (the first of equals), with its direction, as in
    # colour Canny; picked plane by plane, which is several times faster than argmax over channels.
    second = fine[..., 1] > fine[..., 0]
    third = fine[..., 2] > np.maximum(fine[..., 0], fine[..., 1])
    gx = np.where(third, fine_x[..., 2], np.where(second, fine_x[..., 1], fine_x[..., 0]))
    gy = np.where(third, fine_y[..., 2], np.where(second, fine_y[..., 1], fine_y[..., 0]))
    magnitude = np.sqrt(_channel_max(fine))
    coarse_x, coarse_y = _gradients(img, _COARSE_SIGMA)
    coarse = np.sqrt(_channel_max(coarse_x * coarse_x + coarse_y * coarse_y))
    step = magnitude >= _MIN_STEP_RATIO * coarse
    dx = np.round(np.where(step, gx, 0) * _TRACE_GAIN).astype(np.int16)
    dy = np.round(np.where(step, gy, 0) * _TRACE_GAIN).astype(np.int16)
    return dx, dy, float(np.median(magnitude[border]))


def _gradients(img: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel x and y derivatives (levels per pixel) of the image smoothed at `sigma`."""
    smooth = cv2.GaussianBlur(img, (0, 0), sigma)
    return cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3) / 8, cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3) / 8


def _flood_backdrop(
    channels: Sequence[np.ndarray],
    surface: np.ndarray,
    tolerance: float,
    barrier: np.ndarray,
    border: np.ndarray,
    holes: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Backdrop pixels, and the unshadowed part of them that the backdrop model may learn from."""
    h, w = barrier.shape
    model = cv2.split(surface)
    exact = _distance2(channels, model) < tolerance * tolerance
    # A shadow darkens the backdrop by a factor: the pixel is a scaled copy of the surface colour.
    factor, off_axis2 = _scaled_copy(channels, model)
    off_axis = np.sqrt(off_axis2)
    # Scaled copies of the backdrop: darker is a cast shadow, brighter a spotlight the model missed.
    scaled = (factor > 0.35) & (factor < 1.8) & (off_axis < tolerance * (0.6 + 0.4 * np.minimum(factor, 1.0)))
    scaled &= ~exact

    count, labels = cv2.connectedComponents((exact & ~barrier).astype(np.uint8), connectivity=4)
    is_lit = np.zeros(count, bool)
    is_lit[np.unique(labels[border & exact & ~barrier])] = True
    is_lit[0] = False
    lit = is_lit[labels]
    # A shadow or light spot fades into lit backdrop along most of its outline; a product region that
    # merely looks like a scaled backdrop (grey on grey) is walled off by its sharp outline instead.
    count, shade = cv2.connectedComponents((scaled & ~barrier).astype(np.uint8), connectivity=4)
    ring = np.ones((3, 3), np.uint8)
    near_lit = np.bincount(shade[cv2.dilate(lit.astype(np.uint8), ring).astype(bool)], minlength=count)
    near_wall = np.bincount(shade[cv2.dilate(barrier.astype(np.uint8), ring).astype(bool)], minlength=count)
    is_soft = (near_lit > 0) & (near_lit >= _SHADOW_FADE_RATIO * near_wall)
    is_soft[0] = False
    soft = is_soft[shade]
    # Enclosed regions that look like (possibly lighter or darker) backdrop are see-through holes,
    # such as a ring's centre, when large enough and framed by product. Only the last round looks for
    # them, so a misjudged hole cannot teach the backdrop model the product's colour.
    hole = np.zeros_like(lit)
    if holes:
        _, labels, areas = regions((exact | scaled) & ~barrier & ~lit & ~soft, connectivity=4)
        candidates = areas >= max(12, int(0.002 * h * w))
        candidates[0] = False
        for index in np.flatnonzero(candidates):
            region = labels == index
            if (
                not (border & region).any()
                and np.mean(exact[region]) >= _HOLE_EXACT
                and _is_hole(region, lit | soft, barrier)
            ):
                hole |= region
    lit |= hole
    # Walled-off shadow-coloured regions still give up their part near lit backdrop: a shadow inside a
    # ring's hole, or the penumbra of a shadow merged with a grey product through a gap in its outline.
    walled = (shade > 0) & ~soft
    backdrop = lit | soft
    reach = max(2, round(_SHADOW_REACH * math.hypot(h, w)))
    for _ in range(reach):
        grown = walled & cv2.dilate(backdrop.astype(np.uint8), ring).astype(bool) & ~backdrop
        if not grown.any():
            break
        backdrop |= grown
    learn = lit | (soft & (factor > 1.0))
    # Outline pixels of backdrop colour next to the backdrop belong to it.
    grow = exact & barrier
    for _ in range(2):
        backdrop |= grow & cv2.dilate(backdrop.astype(np.uint8), ring).astype(bool)
    return backdrop, learn


def _smooth_backdrop(
    img: np.ndarray, barrier: np.ndarray, border: np.ndarray, known: np.ndarray
) -> np.ndarray:
    """Regions the colour model missed but that the border reaches through smooth change alone.

    A flood in floating-range mode compares each pixel with its neighbour, not with a model, so it
    follows a gradient of any colour; sharp edges stop it. It may still slip into a product through a
    gap in its outline, so a region it adds must fade into the known backdrop along most of its
    outline, as a spotlight does, not touch it only at a gap.
    """
    h, w = barrier.shape
    smooth = cv2.GaussianBlur(img, (5, 5), 0)
    mask = np.zeros((h + 2, w + 2), np.uint8)
    mask[1:-1, 1:-1] = barrier
    step = (_FLOOD_STEP,) * 3
    flags = 4 | cv2.FLOODFILL_MASK_ONLY | (2 << 8)
    ys, xs = np.nonzero(border)
    # Every third border pixel is seed enough: each fill takes all of its connected smooth region.
    ys, xs = ys[::3] + 1, xs[::3] + 1
    # Seeds in order, skipping those a fill has reached: after each fill the rest are checked at once,
    # as most of the border goes with the first few fills.
    while True:
        free = mask[ys, xs] == 0
        ys, xs = ys[free], xs[free]
        if not ys.size:
            break
        cv2.floodFill(smooth, mask, (int(xs[0]) - 1, int(ys[0]) - 1), 0, step, step, flags)
    extra = (mask[1:-1, 1:-1] == 2) & ~known
    count, labels = cv2.connectedComponents(extra.astype(np.uint8), connectivity=4)
    ring = np.ones((3, 3), np.uint8)
    near_known = np.bincount(labels[cv2.dilate(known.astype(np.uint8), ring).astype(bool)], minlength=count)
    outline = np.bincount(labels[cv2.dilate((~extra).astype(np.uint8), ring).astype(bool)], minlength=count)
    fades = near_known >= _FLOOD_FADE * outline
    fades[0] = False
    return fades[labels]


def _is_hole(whole: np.ndarray, backdrop: np.ndarray, barrier: np.ndarray) -> bool:
    """Whether an enclosed backdrop-coloured region is see-through (a ring's centre) or product surface.

    A hole is framed by product: its outline is sharp nearly all round, and just beyond it lies neither
    backdrop reached from the border nor shadow. A pale product's face has backdrop or shadow just
    beyond its outline; a chrome band that mirrors the backdrop fades into the darker bands beside it.
    """
    h, w = whole.shape
    reach = _HOLE_FRAME + 2
    ys, xs = np.nonzero(whole)
    y0, y1 = max(0, int(ys.min()) - reach), min(h, int(ys.max()) + 1 + reach)
    x0, x1 = max(0, int(xs.min()) - reach), min(w, int(xs.max()) + 1 + reach)
    region = whole[y0:y1, x0:x1].astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach + 1, 2 * reach + 1))
    frame = cv2.dilate(region, kernel).astype(bool) & ~region.astype(bool) & ~barrier[y0:y1, x0:x1]
    if not frame.any():
        return False
    edge = cv2.dilate(region, np.ones((3, 3), np.uint8)).astype(bool) & ~region.astype(bool)
    if np.mean(barrier[y0:y1, x0:x1][edge]) < _HOLE_SHARP:
        return False
    return bool(np.mean(~backdrop[y0:y1, x0:x1][frame]) >= _HOLE_FRAMED)


def _backdrop_left_in(
    photo: _Photo, foreground: np.ndarray, barrier: np.ndarray, tolerance: float
) -> np.ndarray:
    """Backdrop still inside a finished mask: see-through holes and the rest of attached cast shadows.

    `segment` models the backdrop from the image border, so across a gradient it mispredicts the middle
    of a ring. Here the backdrop is interpolated from all around the finished outline instead, which
    follows a gradient, and also a shadow, right up to the product.
    """
    expected = cv2.split(_backdrop_around(photo.img, foreground))
    matches = _distance2(photo.channels, expected) < tolerance * tolerance
    rest = _shadow_rest(photo.channels, expected, foreground, barrier, tolerance)
    # A shadow's rest is a fringe of the mask; a chrome product mirroring the backdrop is a darker copy
    # of it too, and opens onto it wherever its outline is soft, but it is the bulk of the mask.
    if np.count_nonzero(rest) > _SHADOW_SHARE * np.count_nonzero(foreground):
        rest[:] = False
    left = _see_through(foreground, barrier, matches) | rest
    # Outline pixels of backdrop colour next to what was found go with it.
    grow = barrier & foreground & matches
    ring = np.ones((3, 3), np.uint8)
    for _ in range(2):
        left |= grow & cv2.dilate(left.astype(np.uint8), ring).astype(bool)
    return left


def _see_through(foreground: np.ndarray, barrier: np.ndarray, matches: np.ndarray) -> np.ndarray:
    """Faces enclosed by the product, walled by sharp edges, whose typical pixel matches the backdrop.

    Most of the face must match, not a few pixels: a pale label can match the backdrop in a stripe of
    its shading, but a see-through hole matches nearly all over.
    """
    h, w = foreground.shape
    count, labels, areas = regions(foreground & ~barrier, connectivity=4)
    outside = cv2.dilate((~foreground).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    enclosed = areas >= max(12, int(0.002 * h * w))
    enclosed[np.unique(labels[outside])] = False
    enclosed[0] = False
    matching = np.bincount(labels.ravel(), weights=matches.ravel(), minlength=count) / np.maximum(areas, 1)
    return (enclosed & (matching > 0.5))[labels]


def _shadow_rest(
    channels: Sequence[np.ndarray],
    expected: Sequence[np.ndarray],
    foreground: np.ndarray,
    barrier: np.ndarray,
    tolerance: float,
) -> np.ndarray:
    """Regions of the mask that are a darker copy of the backdrop and open onto it: a shadow's rest.

    GrabCut's outline tends to follow a shadow's dark core, which leaves part of the shadow inside. Such
    a region joins the backdrop outside the mask (or runs out of the picture) along a good part of its
    edges; a product face is walled off by its outline nearly all round.
    """
    h, w = foreground.shape
    factor, off_axis = _scaled_copy(channels, expected)
    shade = (factor > 0.35) & (factor < 1.05) & (off_axis < tolerance * tolerance)
    count, labels, areas = regions(foreground & ~barrier & shade, connectivity=4)
    ring = np.ones((3, 3), np.uint8)
    frame = np.zeros((h, w), bool)
    frame[0] = frame[-1] = True
    frame[:, 0] = frame[:, -1] = True
    opening = (cv2.dilate((~foreground).astype(np.uint8), ring).astype(bool) & ~foreground) | frame
    near_open = np.bincount(labels[opening], minlength=count)
    near_wall = np.bincount(labels[cv2.dilate(barrier.astype(np.uint8), ring).astype(bool)], minlength=count)
    rest = (near_open > 0) & (near_open >= _SHADOW_OPEN * near_wall)
    rest &= areas >= max(12, int(0.002 * h * w))
    rest[0] = False
    return rest[labels]


def _distance2(pixel: Sequence[np.ndarray], model: Sequence[np.ndarray]) -> np.ndarray:
    """Squared colour distance of each pixel from the model, from their channel planes."""
    diff = [p - m for p, m in zip(pixel, model, strict=True)]
    return _dot(diff, diff)


def _scaled_copy(pixel: Sequence[np.ndarray], model: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel as a scaled copy of the model colour: the scale, and the squared distance off it."""
    factor = _dot(pixel, model) / np.maximum(_dot(model, model), 1.0)
    off = [p - factor * m for p, m in zip(pixel, model, strict=True)]
    return factor, _dot(off, off)


def _dot(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> np.ndarray:
    """Per-pixel dot product of two colour images given as channel planes.

    Contiguous planes: the same sums over strided H x W x 3 channels take two to three times as long.
    """
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _channel_max(a: np.ndarray) -> np.ndarray:
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])
