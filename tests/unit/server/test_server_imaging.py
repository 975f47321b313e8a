"""Untrusted image bytes decode to upright RGB, whatever their mode, and oversized ones are refused early."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from removebg_provider.server.errors import RecordRejected
from removebg_provider.server.imaging import ImageLimits, decode_base64, decode_image, encode_outputs

LIMITS = ImageLimits(max_bytes=5_000_000, max_pixels=1_000_000)


def encoded(image: Image.Image, image_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display needs a 90 degree clockwise turn

    rgb = decode_image(encoded(image, "JPEG", exif=exif), LIMITS)

    assert rgb.shape == (40, 20, 3)


def test_cmyk_jpeg_becomes_rgb() -> None:
    image = Image.new("CMYK", (10, 8), (0, 255, 255, 0))

    rgb = decode_image(encoded(image, "JPEG"), LIMITS)

    assert rgb.shape == (8, 10, 3)
    assert rgb[4, 5, 0] > 200
    assert rgb[4, 5, 1] < 60


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    grey = np.full((6, 7), 32768, dtype=np.uint16)
    image = Image.fromarray(grey)

    rgb = decode_image(encoded(image, "PNG"), LIMITS)

    assert rgb.dtype == np.uint8
    assert abs(int(rgb[3, 3, 0]) - 128) <= 1


def test_palette_image_with_transparency_is_flattened_on_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0

    rgb = decode_image(encoded(image, "PNG", transparency=0), LIMITS)

    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[1, 1].tolist() == [255, 0, 0]


def test_greyscale_becomes_three_equal_channels() -> None:
    rgb = decode_image(encoded(Image.new("L", (5, 5), 90), "PNG"), LIMITS)

    assert rgb[2, 2].tolist() == [90, 90, 90]


def test_rgba_is_flattened_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((2, 2), (0, 0, 255, 255))

    rgb = decode_image(encoded(image, "PNG"), LIMITS)

    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[2, 2].tolist() == [0, 0, 255]


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)

    rgb = decode_image(buffer.getvalue(), LIMITS)

    assert rgb[3, 3].tolist() == [255, 0, 0]


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = _png_header_only(width=3000, height=3000)

    with pytest.raises(RecordRejected) as refused:
        decode_image(bomb, LIMITS)

    assert refused.value.code == 413
    assert "3000x3000" in refused.value.message


def test_a_bomb_beyond_pillows_own_limit_is_refused_the_same_way() -> None:
    bomb = _png_header_only(width=100_000, height=100_000)

    with pytest.raises(RecordRejected) as refused:
        decode_image(bomb, LIMITS)

    assert refused.value.code == 413
    assert "too many pixels" in refused.value.message


def test_bytes_over_the_limit_are_refused() -> None:
    with pytest.raises(RecordRejected) as refused:
        decode_image(b"\0" * 101, ImageLimits(max_bytes=100, max_pixels=100))

    assert refused.value.code == 413


def test_oversized_base64_is_refused_before_decoding() -> None:
    with pytest.raises(RecordRejected) as refused:
        decode_base64("A" * 4000, ImageLimits(max_bytes=1000, max_pixels=100))

    assert refused.value.code == 413


def test_truncated_image_is_reported_as_not_an_image() -> None:
    truncated = encoded(Image.new("RGB", (50, 50), (1, 2, 3)), "PNG")[:60]

    with pytest.raises(RecordRejected) as refused:
        decode_image(truncated, LIMITS)

    assert refused.value.code == 415


def test_webp_cutout_keeps_its_alpha() -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    alpha = np.zeros((4, 4), np.uint8)
    alpha[1:3, 1:3] = 255

    outputs = encode_outputs(rgb, alpha, "webp", 100, binary_mask=False, white_background=False)

    cutout = Image.open(io.BytesIO(outputs.cutout))
    assert cutout.mode == "RGBA"
    assert outputs.mask is None
    assert outputs.whitebg is None


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge canvas but carries almost no data, like a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 100))
        + chunk(b"IEND", b"")
    )


def test_mime_base64_with_line_breaks_decodes_to_the_same_bytes() -> None:
    photo = encoded(Image.new("RGB", (64, 48), (200, 30, 30)), "PNG")

    wrapped = base64.encodebytes(photo).decode()  # MIME: a line break every 76 characters

    assert "\n" in wrapped.strip()
    assert decode_base64(wrapped, ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20)) == photo


def test_base64_with_characters_outside_its_alphabet_is_still_refused() -> None:
    with pytest.raises(RecordRejected) as refused:
        decode_base64("iVBORw0K*GgoAAAA", ImageLimits(max_bytes=1 << 20, max_pixels=1 << 20))

    assert refused.value.code == 400
