"""Turn untrusted image bytes into RGB pixels, and a matte into the output files the API promises."""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from removebg_provider.server.errors import RecordRejected

ImageFormat = Literal["png", "jpg", "webp"]

_DATA_URI = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_WHITE = 255.0


@dataclass(frozen=True)
class ImageLimits:
    """The largest input accepted, in encoded bytes and in decoded pixels."""

    max_bytes: int
    max_pixels: int


@dataclass(frozen=True)
class EncodedOutputs:
    """The encoded files of one record; mask and white background only when they were asked for."""

    cutout: bytes
    mask: bytes | None
    whitebg: bytes | None


def decode_base64(data: str, limits: ImageLimits) -> bytes:
    """The bytes of a `_base64` field (a bare string or a `data:image/...;base64,` URI)."""
    # MIME encoders (`base64` on the command line, email libraries) wrap lines every 76 characters:
    # whitespace is no data, so it is dropped; anything else outside the alphabet is still refused.
    payload = _WHITESPACE.sub("", _DATA_URI.sub("", data.strip(), count=1))
    # Base64 grows data by 4/3, so the encoded length tells the size before anything is decoded.
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise RecordRejected(413, f"_base64 image is larger than the limit of {limits.max_bytes} bytes")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RecordRejected(400, f"_base64 is not valid base64: {error}") from error
    if not raw:
        raise RecordRejected(400, "_base64 is empty")
    return raw


def declared_pixels(raw: bytes, limits: ImageLimits) -> int:
    """The pixel count `raw` declares in its header, read without decoding a pixel; 413 over the limits.

    The server reserves this many pixels of its in-flight budget before it calls `decode_image`.
    """
    with _opened(raw, limits) as image:
        width, height = image.size
        return int(width * height)


def decode_image(raw: bytes, limits: ImageLimits) -> np.ndarray:
    """Decode `raw` into H x W x 3 uint8 RGB, upright per EXIF, first frame of an animation.

    The pixel limit is checked on the header's dimensions before any pixel is decoded, so a small file
    that declares a huge canvas (a decompression bomb) costs nothing.
    """
    with _opened(raw, limits) as image:
        try:
            image.seek(0)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
        except (OSError, SyntaxError, ValueError) as error:
            raise _not_an_image() from error


@contextlib.contextmanager
def _opened(raw: bytes, limits: ImageLimits) -> Iterator[Image.Image]:
    """`raw` opened lazily (header only) once its byte size and declared pixel count are within limits."""
    if len(raw) > limits.max_bytes:
        raise RecordRejected(413, f"image is {len(raw)} bytes; the limit is {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit replaces Pillow's global warning, which cannot be set per server.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as error:
        raise RecordRejected(
            413, f"image declares too many pixels to decode safely; the limit is {limits.max_pixels} pixels"
        ) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise _not_an_image() from error
    with image:
        width, height = image.size
        if width * height > limits.max_pixels:
            raise RecordRejected(
                413,
                f"image is {width}x{height} = {width * height} pixels; "
                f"the limit is {limits.max_pixels} pixels",
            )
        yield image


def _not_an_image() -> RecordRejected:
    return RecordRejected(
        415, "data is not an image in a supported format (JPEG, PNG, WebP, GIF, TIFF, BMP...)"
    )


def encode_outputs(
    rgb: np.ndarray,
    alpha: np.ndarray,
    image_format: ImageFormat,
    quality: int,
    binary_mask: bool,
    white_background: bool,
) -> EncodedOutputs:
    """Encode the cutout in `image_format` (jpg is flattened on white) plus the optional jpg extras."""
    on_white = _on_white(rgb, alpha) if image_format == "jpg" or white_background else rgb
    if image_format == "jpg":
        cutout = _encode(Image.fromarray(on_white, "RGB"), "jpg", quality)
    else:
        cutout = _encode(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), image_format, quality)
    mask = None
    if binary_mask:
        binary = np.where(alpha >= 128, 255, 0).astype(np.uint8)
        mask = _encode(Image.fromarray(binary, "L"), "jpg", quality)
    whitebg = _encode(Image.fromarray(on_white, "RGB"), "jpg", quality) if white_background else None
    return EncodedOutputs(cutout=cutout, mask=mask, whitebg=whitebg)


def _to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _wide_grey_to_rgb(np.asarray(image))
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa") or (mode == "RGB" and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        rgba = np.asarray(image)
        return _on_white(rgba[:, :, :3], rgba[:, :, 3])
    # CMYK, YCbCr, LAB, HSV, 1 and L all have a direct conversion.
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def _wide_grey_to_rgb(values: np.ndarray) -> np.ndarray:
    """16-bit or float greyscale: Pillow's own conversion clips instead of scaling, so scale here."""
    grey = values.astype(np.float64)
    if values.dtype.kind == "f":
        top = 1.0 if float(np.nanmax(grey, initial=0.0)) <= 1.0 else 255.0
    else:
        top = 65535.0 if float(grey.max(initial=0.0)) > 255 else 255.0
    scaled = np.clip(np.nan_to_num(grey) * (255.0 / top), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(np.repeat(scaled[:, :, None], 3, axis=2))


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    weight = alpha.astype(np.float32)[:, :, None] / 255.0
    flat = rgb.astype(np.float32) * weight + _WHITE * (1.0 - weight)
    return np.clip(flat.round(), 0, 255).astype(np.uint8)


def _encode(image: Image.Image, image_format: ImageFormat, quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        # Level 4 is close to the default's size at a fraction of its time on multi-megapixel images.
        image.save(buffer, "PNG", compress_level=4)
    elif image_format == "jpg":
        image.save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, "WEBP", quality=quality)
    return buffer.getvalue()
