"""Decode: every kind of bad or odd input gives a clear error or a correct RGB array."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from eagle.io.images import DecodeError, decode_image

LIMIT = 10_000_000


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(h: int = 20, w: int = 30) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_plain_png_round_trip():
    arr = _rgb()
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(arr)), LIMIT), arr)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is a text file, not an image", "not an image"),
    (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "not an image"),
])
def test_not_images(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data, LIMIT)


def test_truncated_png_and_jpeg():
    arr = _rgb(64, 64)
    for fmt in ("PNG", "JPEG"):
        data = _encode(Image.fromarray(arr), fmt)
        with pytest.raises(DecodeError, match="corrupt or truncated"):
            decode_image(data[: len(data) // 2], LIMIT)


def test_decompression_bomb_refused_before_decoding():
    big = _encode(Image.new("L", (5000, 5000)))  # compresses to a few KB, 25 Mpx
    with pytest.raises(DecodeError, match=r"too large: 5000x5000"):
        decode_image(big, max_pixels=10_000_000)


def test_sixteen_bit_grayscale_scaled():
    arr16 = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 256).astype(np.uint16)
    out = decode_image(_encode(Image.fromarray(arr16)), LIMIT)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], np.rint(arr16 / 65535 * 255).astype(np.uint8))


def test_modes_become_rgb():
    arr = _rgb()
    cmyk = decode_image(_encode(Image.fromarray(arr).convert("CMYK"), "JPEG", quality=100), LIMIT)
    assert cmyk.shape == arr.shape and np.abs(cmyk.astype(int) - arr).mean() < 20
    pal = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    np.testing.assert_array_equal(decode_image(_encode(pal), LIMIT), np.asarray(pal.convert("RGB")))
    rgba = np.dstack([arr, np.full(arr.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(decode_image(_encode(Image.fromarray(rgba)), LIMIT), arr)
    gray = decode_image(_encode(Image.fromarray(arr[..., 0])), LIMIT)
    assert all((gray[..., c] == arr[..., 0]).all() for c in range(3))


def test_exif_orientation_applied():
    arr = np.zeros((10, 40, 3), np.uint8)
    arr[:, :5] = 255  # white stripe on the left of a wide image
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    out = decode_image(_encode(img, "JPEG", exif=exif, quality=100), LIMIT)
    assert out.shape[:2] == (40, 10)  # upright: tall
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the stripe is now on top
