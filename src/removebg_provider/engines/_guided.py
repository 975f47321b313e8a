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
    cov_ip = np.stack([box(guide[..., c] * mask) - mean_i[c] * mean_p for c in range(channels)], axis=-1)
    sigma = np.empty((*mask.shape, channels, channels), np.float32)
    for i in range(channels):
        for j in range(i, channels):
            value = box(guide[..., i] * guide[..., j]) - mean_i[i] * mean_i[j]
            sigma[..., i, j] = sigma[..., j, i] = value
    sigma += eps * np.eye(channels, dtype=np.float32)
    a = cov_ip / sigma[..., 0] if channels == 1 else np.linalg.solve(sigma, cov_ip[..., None])[..., 0]
    b = mean_p - (a * np.stack(mean_i, axis=-1)).sum(axis=-1)
    coefficients = np.concatenate([a, b[..., None]], axis=-1).astype(np.float32)
    return np.stack([box(coefficients[..., c]) for c in range(channels + 1)], axis=-1)


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
