"""Decode and validate image bytes into RGB uint8 arrays; every failure is a DecodeError with a clear reason.

Handles what archives contain: EXIF orientation, 16-bit and float images, CMYK, palette, alpha, grayscale;
refuses empty, truncated, non-image and oversized (decompression-bomb) files before decoding pixels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class DecodeError(ValueError):
    """The bytes are not an image we can audit; the message says why."""


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale high-bit-depth or float pixels to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    is_float = np.issubdtype(arr.dtype, np.floating)
    arr = arr.astype(np.float64)
    if is_float and arr.size and arr.max() <= 1.0 and arr.min() >= 0.0:
        scale = 1.0  # float images in 0..1
    else:
        scale = 65535.0 if arr.max(initial=0) > 255 else 255.0
    return np.clip(np.rint(arr / scale * 255.0), 0, 255).astype(np.uint8)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes → (H, W, 3) uint8 RGB, upright per EXIF. Alpha is dropped (pixels kept as stored)."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError(f"image too large: {width}x{height} = {width * height} pixels "
                                  f"(limit inputs.max_image_pixels = {max_pixels})")
            img.load()
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image: the format could not be identified") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"image too large (decompression bomb guard): {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the image
        pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = _to_uint8(np.asarray(img))
        return np.ascontiguousarray(np.stack([arr] * 3, axis=-1))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    arr = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(arr)


def capped(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """`image` downscaled (aspect kept, bicubic) to at most `max_pixels`, or itself when it is that small."""
    h, w = image.shape[:2]
    if h * w <= max_pixels:
        return image
    scale = (max_pixels / (h * w)) ** 0.5
    size = (max(1, int(w * scale)), max(1, int(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
