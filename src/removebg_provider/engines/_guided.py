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
    """Evaluate the upsampled coefficients on the full-resolution guide; return a uint8 matte."""
    h, w = rgb.shape[:2]
    ch, cw = coefficients.shape[:2]
    channels = coefficients.shape[2] - 1
    alpha = np.empty((h, w), np.uint8)
    map_x = ((np.arange(w, dtype=np.float32) + 0.5) * (cw / w) - 0.5)[None, :]
    rows = max(1, _STRIP_PIXELS // w)
    for top in range(0, h, rows):
        bottom = min(h, top + rows)
        map_y = ((np.arange(top, bottom, dtype=np.float32) + 0.5) * (ch / h) - 0.5)[:, None]
        xs, ys = np.broadcast_to(map_x, (bottom - top, w)), np.broadcast_to(map_y, (bottom - top, w))
        coef = cv2.remap(
            coefficients,
            np.ascontiguousarray(xs),
            np.ascontiguousarray(ys),
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        if coef.ndim == 2:
            coef = coef[..., None]
        guide = _guide(rgb[top:bottom], colour)
        value = coef[..., channels].copy()
        for c in range(channels):
            value += coef[..., c] * guide[..., c]
        alpha[top:bottom] = np.clip(value * 255 + 0.5, 0, 255).astype(np.uint8)
    return alpha


def _guide(rgb: np.ndarray, colour: bool) -> np.ndarray:
    if colour:
        return rgb.astype(np.float32) * (1 / 255)
    return (cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) * (1 / 255))[..., None]
