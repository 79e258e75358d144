"""Regions from synthetic anomaly maps: boxes where the blobs are, merging, ordering, tiny ones dropped, PNGs."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from eagle.config import RegionsConfig
from eagle.expert.regions import decode_map_png, find_regions, png_shape


def blob_map(shape: tuple[int, int], blobs: list[tuple[int, int, int, float]]) -> np.ndarray:
    """Background 1.0 plus square plateaus (y, x, half-size, height)."""
    amap = np.ones(shape, np.float32)
    for y, x, r, h in blobs:
        amap[y - r:y + r, x - r:x + r] = h
    return amap


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_boxes_where_the_blobs_are_ordered_by_peak():
    amap = blob_map((200, 300), [(50, 50, 10, 4.0), (150, 250, 15, 5.0), (100, 150, 8, 4.5)])
    reg = find_regions(amap, RegionsConfig(merge_gap=0.0))
    assert [(b.x1, b.y1, b.x2, b.y2) for b in reg.boxes] == [(235, 135, 265, 165), (142, 92, 158, 108),
                                                             (40, 40, 60, 60)]
    assert [b.score for b in reg.boxes] == [5.0, 4.5, 4.0]
    assert reg.mask.shape == (200, 300) and reg.mask.sum() == 30 * 30 + 16 * 16 + 20 * 20


def test_at_most_max_boxes_keep_the_highest():
    blobs = [(30, 30 + 60 * i, 8, 5.0 + i / 4) for i in range(4)]
    reg = find_regions(blob_map((100, 260), blobs), RegionsConfig(max_boxes=3, merge_gap=0.0))
    assert [b.score for b in reg.boxes] == [5.75, 5.5, 5.25]


def test_near_boxes_merge_and_far_ones_do_not():
    amap = blob_map((200, 200), [(50, 50, 10, 5.0), (50, 68, 5, 4.0), (150, 150, 10, 4.5)])  # gap of 3 px
    merged = find_regions(amap, RegionsConfig(merge_gap=0.02))  # 4 px
    assert [(b.x1, b.y1, b.x2, b.y2, b.score) for b in merged.boxes] == [(40, 40, 73, 60, 5.0),
                                                                         (140, 140, 160, 160, 4.5)]
    apart = find_regions(amap, RegionsConfig(merge_gap=0.0))
    assert len(apart.boxes) == 3


def test_tiny_contours_dropped():
    amap = blob_map((200, 200), [(100, 100, 12, 5.0), (20, 20, 1, 6.0)])  # 2x2 px spike: 0.01% of the image
    reg = find_regions(amap, RegionsConfig(min_area=0.001))
    assert [(b.x1, b.y1, b.x2, b.y2) for b in reg.boxes] == [(88, 88, 112, 112)]
    assert not reg.mask[19:21, 19:21].any()


def test_flat_map_has_no_regions():
    reg = find_regions(np.full((40, 50), 2.0, np.float32))
    assert reg.boxes == [] and not reg.mask.any()
    assert decode_png(reg.mask_png).shape == (40, 50)


def test_mask_png_decodes_to_the_mask_and_is_downscaled():
    amap = blob_map((120, 160), [(60, 80, 20, 3.0)])
    reg = find_regions(amap, RegionsConfig(mask_size=256))
    assert np.array_equal(decode_png(reg.mask_png) > 0, reg.mask)
    small = find_regions(blob_map((600, 800), [(300, 400, 100, 3.0)]), RegionsConfig(mask_size=200))
    decoded = decode_png(small.mask_png) > 0
    assert decoded.shape == png_shape(600, 800, 200) == (150, 200)
    assert decoded[50:100, 75:125].all() and decoded.sum() == 50 * 50


def test_map_png_recovers_score_units():
    rng = np.random.default_rng(0)
    amap = (rng.random((64, 96)) * 7).astype(np.float32)
    reg = find_regions(amap)
    assert reg.map_max == float(amap.max())
    decoded = decode_map_png(reg.map_png)
    assert decoded.shape == amap.shape
    assert np.abs(decoded - amap).max() <= amap.max() / 255 / 2 + 1e-6
