"""Synthetic studio product photos with exact ground truth, for the demo, tests and benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

BACKGROUNDS: tuple[str, ...] = ("white", "grey", "coloured", "gradient")
PRODUCTS: tuple[str, ...] = ("bottle", "box", "shoe", "ring", "mug")
MATERIALS: tuple[str, ...] = ("matte", "striped", "label", "white", "reflective")

# Drawing with 4 fractional bits gives sub-pixel, anti-aliased outlines.
_SHIFT = 4
_ONE = 1 << _SHIFT


@dataclass(frozen=True)
class SamplePhoto:
    """One synthetic photo: the RGB image, its exact alpha and what it shows."""

    rgb: np.ndarray
    alpha: np.ndarray
    background: str
    product: str
    material: str
    shadow: bool
    jpeg_quality: int | None


def make_product_photo(
    seed: int,
    width: int = 800,
    height: int = 800,
    background: str | None = None,
    *,
    product: str | None = None,
    material: str | None = None,
    shadow: bool | None = None,
    jpeg_quality: int | None = None,
) -> SamplePhoto:
    """Render one studio product photo, fully determined by `seed` and the explicit choices.

    `jpeg_quality` (e.g. 70) passes the image through a JPEG round trip to add block artefacts;
    the ground truth stays exact. Shadows are background in the ground truth.
    """
    rng = np.random.default_rng(seed)
    background = background or str(rng.choice(BACKGROUNDS))
    product = product or str(rng.choice(PRODUCTS))
    material = material or str(rng.choice(MATERIALS, p=[0.3, 0.2, 0.2, 0.15, 0.15]))
    drawn_shadow = bool(rng.random() < 0.6)
    shadow = drawn_shadow if shadow is None else shadow
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; choose one of {', '.join(BACKGROUNDS)}")
    if product not in PRODUCTS:
        raise ValueError(f"unknown product {product!r}; choose one of {', '.join(PRODUCTS)}")
    if material not in MATERIALS:
        raise ValueError(f"unknown material {material!r}; choose one of {', '.join(MATERIALS)}")

    bg = _background(rng, background, height, width)
    alpha_u8 = _SHAPES[product](rng, height, width)
    if rng.random() < 0.3:
        # A slightly defocused product: soft but still exact ground truth.
        alpha_u8 = cv2.GaussianBlur(alpha_u8, (0, 0), max(0.6, 0.0012 * min(height, width)))
    if shadow:
        # A separate stream, so the same seed renders the same scene with or without its shadow.
        bg *= _shadow_factor(np.random.default_rng([seed, 1]), alpha_u8)[..., None]
    fg = _appearance(rng, material, alpha_u8, bg)
    a = (alpha_u8.astype(np.float32) / 255.0)[..., None]
    img = bg * (1.0 - a) + fg * a
    noise_sigma = float(rng.uniform(0.5, 2.5))
    img += rng.standard_normal(img.shape, dtype=np.float32) * noise_sigma
    rgb = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    if jpeg_quality is not None:
        rgb = _jpeg_round_trip(rgb, jpeg_quality)
    return SamplePhoto(rgb, alpha_u8, background, product, material, shadow, jpeg_quality)


def write_sample_photos(
    directory: str | Path, count: int, seed: int = 0, size: tuple[int, int] = (800, 800)
) -> list[Path]:
    """Write `count` sample photos (width, height = `size`) as JPEGs into `directory`; return their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i in range(count):
        photo = make_product_photo(seed + i, size[0], size[1], background=BACKGROUNDS[i % len(BACKGROUNDS)])
        path = out / f"product_{seed + i:04d}_{photo.background}_{photo.product}.jpg"
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(photo.rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92]
        )
        if not ok:
            raise OSError(f"could not encode sample photo {path}")
        path.write_bytes(buf.tobytes())
        paths.append(path)
    return paths


def _background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """A studio backdrop as float32 H x W x 3 in [0, 255], with gentle light fall-off."""
    yy, xx = _grid(h, w)
    if kind == "gradient":
        top, bottom = (
            _flat_colour(rng, str(rng.choice(("white", "grey", "coloured")))),
            _flat_colour(rng, str(rng.choice(("white", "grey", "coloured")))),
        )
        if rng.random() < 0.5:
            angle = rng.uniform(-0.6, 0.6)
            t = np.clip(0.5 + (yy * np.cos(angle) + xx * np.sin(angle)) * 0.5, 0, 1)
        else:
            cy, cx = rng.uniform(-0.3, 0.3, size=2)
            t = np.clip(np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / 1.4, 0, 1)
        t = t * t * (3 - 2 * t)
        bg = top[None, None, :] * (1 - t[..., None]) + bottom[None, None, :] * t[..., None]
    else:
        bg = np.broadcast_to(_flat_colour(rng, kind)[None, None, :], (h, w, 3)).copy()
    cy, cx = rng.uniform(-0.4, 0.4, size=2)
    falloff = 1.0 - rng.uniform(0.0, 0.12) * ((yy - cy) ** 2 + (xx - cx) ** 2) / 2.0
    return (bg * falloff[..., None]).astype(np.float32)


def _flat_colour(rng: np.random.Generator, kind: str) -> np.ndarray:
    if kind == "white":
        return np.clip(rng.uniform(240, 256) + rng.uniform(-3, 3, size=3), 0, 255).astype(np.float32)
    if kind == "grey":
        return np.clip(rng.uniform(120, 215) + rng.uniform(-4, 4, size=3), 0, 255).astype(np.float32)
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(60, 180), rng.uniform(130, 245)]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1] as broadcastable column and row vectors."""
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    return yy, xx


def _placement(rng: np.random.Generator, h: int, w: int, aspect: float) -> tuple[float, float, float, float]:
    """Centre and half-size (cx, cy, half_w, half_h) of a product that stays clear of the frame."""
    fill = rng.uniform(0.35, 0.8)
    half_h = fill * h / 2
    half_w = half_h * aspect
    if half_w > 0.42 * w:
        scale = 0.42 * w / half_w
        half_w, half_h = half_w * scale, half_h * scale
    cx = w / 2 + rng.uniform(-1, 1) * max(0.0, 0.45 * w - half_w)
    cy = h / 2 + rng.uniform(-1, 1) * max(0.0, 0.45 * h - half_h)
    return cx, cy, half_w, half_h


def _fill(mask: np.ndarray, points: np.ndarray, value: int = 255) -> None:
    cv2.fillPoly(mask, [np.round(points * _ONE).astype(np.int32)], value, cv2.LINE_AA, _SHIFT)


def _ellipse(mask: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float, value: int) -> None:
    centre = (round(cx * _ONE), round(cy * _ONE))
    axes = (max(1, round(ax * _ONE)), max(1, round(ay * _ONE)))
    cv2.ellipse(mask, centre, axes, angle, 0, 360, value, -1, cv2.LINE_AA, _SHIFT)


def _bottle(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cx, cy, hw, hh = _placement(rng, h, w, rng.uniform(0.22, 0.45))
    neck = rng.uniform(0.25, 0.45)
    shoulder = rng.uniform(0.15, 0.35)
    t = np.linspace(0, 1, 64)
    # Half-width profile from the top of the neck down to the base.
    neck_end = rng.uniform(0.2, 0.4)
    profile = np.where(
        t < neck_end,
        neck,
        neck + (1 - neck) * np.clip((t - neck_end) / shoulder, 0, 1) ** 0.6,
    )
    ys = cy - hh + 2 * hh * t
    right = np.stack([cx + hw * profile, ys], axis=1)
    left = np.stack([cx - hw * profile, ys], axis=1)[::-1]
    mask = np.zeros((h, w), np.uint8)
    _fill(mask, np.concatenate([right, left]))
    return mask


def _box(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cx, cy, hw, hh = _placement(rng, h, w, rng.uniform(0.5, 1.2))
    depth_x, depth_y = hw * rng.uniform(0.1, 0.35), hh * rng.uniform(0.08, 0.25)
    x0, x1, y0, y1 = cx - hw, cx + hw - depth_x, cy - hh + depth_y, cy + hh
    pts = np.array(
        [
            [x0, y0],
            [x0 + depth_x, y0 - depth_y],
            [x1 + depth_x, y0 - depth_y],
            [x1 + depth_x, y1 - depth_y],
            [x1, y1],
            [x0, y1],
        ]
    )
    mask = np.zeros((h, w), np.uint8)
    _fill(mask, pts)
    return mask


def _shoe(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cx, cy, hw, hh = _placement(rng, h, w, rng.uniform(1.6, 2.4))
    theta = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    radius = np.ones_like(theta)
    for k in range(2, 6):
        radius += rng.uniform(-0.12, 0.12) / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    # A raised heel-and-ankle bump on one side makes the blob read as a shoe.
    radius += 0.35 * np.exp(-((theta - 1.25 * np.pi) ** 2) / 0.15)
    xs = cx + hw * 0.8 * radius * np.cos(theta)
    ys = cy + hh * 0.8 * radius * np.sin(theta)
    mask = np.zeros((h, w), np.uint8)
    _fill(mask, np.stack([xs, ys], axis=1))
    return mask


def _ring(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cx, cy, hw, hh = _placement(rng, h, w, rng.uniform(0.8, 1.25))
    angle = rng.uniform(0, 180)
    inner = rng.uniform(0.4, 0.65)
    mask = np.zeros((h, w), np.uint8)
    _ellipse(mask, cx, cy, hw, hh, angle, 255)
    _ellipse(mask, cx, cy, hw * inner, hh * inner, angle, 0)
    return mask


def _mug(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    cx, cy, hw, hh = _placement(rng, h, w, rng.uniform(0.9, 1.2))
    body_w = hw * 0.7
    mask = np.zeros((h, w), np.uint8)
    handle_cx = cx + body_w * 0.95
    _ellipse(mask, handle_cx, cy, hw * 0.32, hh * 0.42, 0, 255)
    _ellipse(mask, handle_cx, cy, hw * 0.17, hh * 0.25, 0, 0)
    _fill(
        mask,
        np.array(
            [
                [cx - body_w, cy - hh],
                [cx + body_w, cy - hh],
                [cx + body_w * 0.92, cy + hh],
                [cx - body_w * 0.92, cy + hh],
            ]
        ),
    )
    return mask


_SHAPES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "bottle": _bottle,
    "box": _box,
    "shoe": _shoe,
    "ring": _ring,
    "mug": _mug,
}


def _shadow_factor(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """A soft cast shadow, as a multiplicative darkening field (float32 H x W)."""
    h, w = alpha.shape
    # Blurring a small copy keeps large images fast; the shadow is smooth anyway.
    scale = min(1.0, 256 / max(h, w))
    small = cv2.resize(
        alpha, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA
    )
    sh, sw = small.shape
    ys, xs = np.nonzero(small > 127)
    if ys.size == 0:
        return np.ones((h, w), np.float32)
    extent = max(ys.max() - ys.min(), xs.max() - xs.min(), 1)
    dx, dy = rng.uniform(-0.12, 0.12) * extent, rng.uniform(0.02, 0.1) * extent
    squash = rng.uniform(0.4, 1.0)
    bottom = float(ys.max())
    matrix = np.array([[1, 0, dx], [0, squash, bottom * (1 - squash) + dy]], np.float32)
    moved = cv2.warpAffine(small, matrix, (sw, sh)).astype(np.float32) / 255
    cast = cv2.GaussianBlur(moved, (0, 0), max(1.0, rng.uniform(0.03, 0.08) * extent))
    darkness = rng.uniform(0.2, 0.5)
    factor = 1.0 - darkness * np.clip(cast * 1.5, 0, 1)
    return cv2.resize(factor, (w, h), interpolation=cv2.INTER_LINEAR)


def _appearance(rng: np.random.Generator, material: str, alpha: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """The product's own colours (float32 H x W x 3), meaningful where alpha > 0."""
    h, w = alpha.shape
    fg = np.zeros((h, w, 3), np.float32)
    ys, xs = np.nonzero(alpha)
    if ys.size == 0:
        return fg
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    ch, cw = y1 - y0, x1 - x0
    u = np.linspace(-1, 1, cw, dtype=np.float32)[None, :]
    v = np.linspace(-1, 1, ch, dtype=np.float32)[:, None]
    # Studio key light from the upper left, with a cylinder-like fall-off across the product.
    light = (0.78 + 0.22 * np.cos(u * 1.3 + 0.3)) * (1.0 - 0.1 * v)
    base = _product_colour(rng)
    if material == "white":
        # Off-white with soft shading: real white-on-white shots keep a faint outline, and so do these.
        base = np.full(3, rng.uniform(212, 236), np.float32) + rng.uniform(-3, 3, size=3).astype(np.float32)
        light = 0.88 + 0.05 * np.cos(u * 1.5 + 0.3) - 0.03 * v
    crop = base[None, None, :] * light[..., None]
    if material == "striped":
        period = rng.uniform(0.05, 0.2)
        other = _product_colour(rng)
        stripes = (np.sin((u * rng.uniform(-1, 1) + v) / period * np.pi) > 0).astype(np.float32)
        crop = (
            crop * (1 - stripes[..., None]) + (other[None, None, :] * light[..., None]) * stripes[..., None]
        )
    elif material == "label":
        label = (np.abs(u) < rng.uniform(0.5, 0.9)) & (
            np.abs(v - rng.uniform(-0.2, 0.3)) < rng.uniform(0.15, 0.3)
        )
        paper = np.full(3, rng.uniform(200, 250), np.float32)
        crop = np.where(label[..., None], paper[None, None, :] * light[..., None], crop)
    elif material == "reflective":
        # Chrome mirrors the backdrop in broad vertical bands, with dark reflections between them.
        bands = 0.5 + 0.5 * np.sin(u * rng.uniform(4, 9) + rng.uniform(0, 6))
        mirror = bg[y0:y1, x0:x1] * rng.uniform(0.85, 1.0)
        dark = np.full(3, rng.uniform(30, 90), np.float32)[None, None, :]
        crop = mirror * bands[..., None] + dark * (1 - bands[..., None])
    fg[y0:y1, x0:x1] = crop
    return fg


def _product_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(0, 255), rng.uniform(25, 235)]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _jpeg_round_trip(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not JPEG-encode the sample at quality {quality}")
    decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if decoded is None:
        raise ValueError(f"could not JPEG-decode the sample at quality {quality}")
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
