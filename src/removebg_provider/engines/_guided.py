"""Fast guided filter: fit edge-aware coefficients at low resolution, apply them at full resolution."""

from __future__ import annotations

import cv2
import numpy as np

# Full-resolution work happens in strips of about this many pixels, so memory stays bounded.
_STRIP_PIXELS = 1 << 20


def guided_coefficients(
    guide_rgb: np.ndarray, mask: np.ndarray, radius: int, eps: float, colour: bool
) -> np.ndarray:
    """Local linear coefficients (H x W x C+1: a per guide channel, then b) mapping the guide to the matte.

    This is He, Sun and Tang's guided filter, stopped before the final product so the coefficients
    can be upsampled (He and Sun's fast guided filter) and applied to the full-resolution guide.
    """
    guide = _guide(guide_rgb, colour)
    size = (2 * radius + 1, 2 * radius + 1)

    def box(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, cv2.CV_32F, size, borderType=cv2.BORDER_REFLECT)

    mean_p = box(mask)
    channels = guide.shape[2]
    mean_i = [box(guide[..., c]) for c in range(channels)]
    cov_ip = [box(guide[..., c] * mask) - mean_i[c] * mean_p for c in range(channels)]
    var = {
        (i, j): box(guide[..., i] * guide[..., j]) - mean_i[i] * mean_i[j] + (eps if i == j else 0.0)
        for i in range(channels)
        for j in range(i, channels)
    }
    a = [cov_ip[0] / var[0, 0]] if channels == 1 else _solve_symmetric_3x3(var, cov_ip)
    b = mean_p - sum(a[c] * mean_i[c] for c in range(channels))
    return np.stack([box(plane.astype(np.float32)) for plane in (*a, b)], axis=-1)


def _solve_symmetric_3x3(m: dict[tuple[int, int], np.ndarray], v: list[np.ndarray]) -> list[np.ndarray]:
    """Per-pixel solution of M x = v for symmetric 3 x 3 M (upper triangle in `m`), by Cramer's rule.

    Written out plane by plane: a batched `np.linalg.solve` over every pixel costs several times more.
    """
    m00, m01, m02, m11, m12, m22 = m[0, 0], m[0, 1], m[0, 2], m[1, 1], m[1, 2], m[2, 2]
    c00 = m11 * m22 - m12 * m12
    c01 = m02 * m12 - m01 * m22
    c02 = m01 * m12 - m02 * m11
    c11 = m00 * m22 - m02 * m02
    c12 = m01 * m02 - m00 * m12
    c22 = m00 * m11 - m01 * m01
    inverse_det = 1.0 / (m00 * c00 + m01 * c01 + m02 * c02)
    return [
        (c00 * v[0] + c01 * v[1] + c02 * v[2]) * inverse_det,
        (c01 * v[0] + c11 * v[1] + c12 * v[2]) * inverse_det,
        (c02 * v[0] + c12 * v[1] + c22 * v[2]) * inverse_det,
    ]


def apply_coefficients(rgb: np.ndarray, coefficients: np.ndarray, colour: bool) -> np.ndarray:
    """Evaluate the upsampled coefficients on the full-resolution guide; return a uint8 matte.

    The guide enters as its uint8 levels and b is taken in alpha levels, so a * level + b is the alpha
    level itself: no full-resolution pixel is scaled to 0..1 and back. Upsampling, products and the
    rounding conversion run in OpenCV, which makes this about twice as fast as the same sums in numpy.
    """
    h, w = rgb.shape[:2]
    ch, cw = coefficients.shape[:2]
    if colour:
        # Multiplied by (R, G, B, 255): the fourth product is b in alpha levels.
        planes = [coefficients]
    else:
        # One plane each: OpenCV's vectorised bilinear warp takes 1, 3 or 4 channels, not 2.
        planes = [np.ascontiguousarray(coefficients[..., 0]), coefficients[..., 1] * np.float32(255)]
    alpha = np.empty((h, w), np.uint8)
    rows = max(1, _STRIP_PIXELS // w)
    nothing = np.zeros((rows, w), np.float32)
    sx, sy = cw / w, ch / h
    for top in range(0, h, rows):
        bottom = min(h, top + rows)
        # Pixel centres of this strip mapped onto the coefficient grid, as `cv2.resize` maps them.
        to_source = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, (top + 0.5) * sy - 0.5]])
        up = [
            cv2.warpAffine(
                plane,
                to_source,
                (w, bottom - top),
                flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                borderMode=cv2.BORDER_REPLICATE,
            )
            for plane in planes
        ]
        strip = rgb[top:bottom]
        if colour:
            products = cv2.multiply(up[0], cv2.cvtColor(strip, cv2.COLOR_RGB2RGBA), dtype=cv2.CV_32F)
            value = products.reshape(-1, 4) @ np.ones(4, np.float32)
            # Adding nothing with a uint8 result: clipping to 0..255 and rounding, in one pass.
            alpha[top:bottom] = cv2.add(
                value.reshape(bottom - top, w), nothing[: bottom - top], dtype=cv2.CV_8U
            )
        else:
            grey = cv2.cvtColor(strip, cv2.COLOR_RGB2GRAY)
            value = cv2.multiply(up[0], grey, dtype=cv2.CV_32F)
            alpha[top:bottom] = cv2.add(value, up[1], dtype=cv2.CV_8U)  # clipped and rounded
    return alpha


def _guide(rgb: np.ndarray, colour: bool) -> np.ndarray:
    if colour:
        return rgb.astype(np.float32) * (1 / 255)
    return (cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) * (1 / 255))[..., None]
