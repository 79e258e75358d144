"""Anomalous regions from an anomaly map: binary mask, up to N boxes, and compact PNGs of mask and map.

As EAGLE does it: threshold the map, min-max normalised, at ``level`` (about 2/3) of its range, drop
connected regions smaller than ``min_area`` of the image, merge boxes that overlap or lie within ``merge_gap``
of each other, order by peak score and keep ``max_boxes``. Regions are relative to the image's own peak, so
they are only meaningful where the expert's verdict is anomalous.

PNG resolution: both PNGs keep the map's aspect ratio with the longer side at ``mask_size`` (never
upscaled); overlay them on the original with a plain resize. ``map_png`` is 8-bit grey: pixel value v stands
for the score ``v / 255 * map_max`` (``map_max`` = the map's maximum, also stored in the PNG's text chunk
``map_max``; :func:`decode_map_png` recovers score units).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, PngImagePlugin
from scipy import ndimage

from eagle.config import RegionsConfig
from eagle.findings import Box

MAP_MAX_KEY = "map_max"


@dataclass(frozen=True)
class Regions:
    """mask: bool (H, W) at the map's size; boxes: best first; PNGs as described in the module docstring."""

    mask: np.ndarray
    boxes: list[Box]
    mask_png: bytes
    map_png: bytes
    map_max: float


def png_shape(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(h, w) with the longer side at most `max_side`, aspect ratio kept."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _png(array: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if array.shape[:2] == shape:
        return array
    return cv2.resize(array, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def encode_mask_png(mask: np.ndarray, max_side: int) -> bytes:
    """8-bit PNG, 255 inside the mask, downscaled by area with a majority vote per output pixel."""
    small = _resize(mask.astype(np.float32), png_shape(*mask.shape, max_side)) >= 0.5
    return _png(small.astype(np.uint8) * 255)


def encode_map_png(anomaly_map: np.ndarray, max_side: int) -> tuple[bytes, float]:
    """8-bit PNG of the map scaled by its maximum, and that maximum (negative scores clip to 0)."""
    peak = float(np.max(anomaly_map))
    small = _resize(np.clip(anomaly_map, 0, None).astype(np.float32), png_shape(*anomaly_map.shape, max_side))
    scaled = np.rint(small / peak * 255) if peak > 0 else np.zeros_like(small)
    return _png(np.clip(scaled, 0, 255).astype(np.uint8), {MAP_MAX_KEY: repr(peak)}), peak


def decode_gray_png(data: bytes) -> np.ndarray:
    """An 8-bit grayscale PNG (a stored mask or map, a ground-truth mask) as a (h, w) uint8 array."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError("not a decodable PNG")
    return image


def decode_map_png(data: bytes) -> np.ndarray:
    """A map PNG back in score units (float32), using the ``map_max`` stored in it."""
    peak = float(Image.open(io.BytesIO(data)).text[MAP_MAX_KEY])
    return decode_gray_png(data).astype(np.float32) / 255 * peak


def _merge(boxes: list[list[float]], gap: float) -> list[list[float]]:
    """Union boxes [x1, y1, x2, y2, peak] that overlap or are closer than `gap` pixels, until none are."""
    boxes = [b[:] for b in boxes]
    merged = True
    while merged:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] - gap <= b[2] and b[0] - gap <= a[2] and a[1] - gap <= b[3] and b[1] - gap <= a[3]:
                    boxes[i] = [min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]), max(a[4], b[4])]
                    del boxes[j]
                    merged = True
                    break
            if merged:
                break
    return boxes


def find_regions(anomaly_map: np.ndarray, cfg: RegionsConfig | None = None) -> Regions:
    """Mask, boxes (in map pixels, x2/y2 exclusive, score = peak map value inside) and PNGs for one map."""
    cfg = cfg or RegionsConfig()
    amap = np.asarray(anomaly_map, dtype=np.float32)
    height, width = amap.shape
    lo, hi = float(amap.min()), float(amap.max())
    mask = np.zeros((height, width), dtype=bool)
    boxes: list[Box] = []
    if hi > lo:
        binary = ((amap - lo) >= cfg.level * (hi - lo)).astype(np.uint8)
        count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        min_pixels = max(1, cfg.min_area * height * width)
        keep = [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] >= min_pixels]
        if keep:
            mask = np.isin(labels, keep)
            peaks = ndimage.maximum(amap, labels, index=keep)
            raw = [[stats[i, cv2.CC_STAT_LEFT], stats[i, cv2.CC_STAT_TOP],
                    stats[i, cv2.CC_STAT_LEFT] + stats[i, cv2.CC_STAT_WIDTH],
                    stats[i, cv2.CC_STAT_TOP] + stats[i, cv2.CC_STAT_HEIGHT], float(p)]
                   for i, p in zip(keep, peaks, strict=True)]
            merged = sorted(_merge(raw, cfg.merge_gap * max(height, width)), key=lambda b: -b[4])
            boxes = [Box(int(b[0]), int(b[1]), int(b[2]), int(b[3]), float(b[4])) for b in merged[:cfg.max_boxes]]
    map_png, map_max = encode_map_png(amap, cfg.mask_size)
    return Regions(mask=mask, boxes=boxes, mask_png=encode_mask_png(mask, cfg.mask_size), map_png=map_png,
                   map_max=map_max)
