"""What differs between MLLM families: processor options and where each image's tokens sit in the image.

Everything else (Auto* loading, chat template, image-token runs of `processor.image_token_id`, guidance) is the
same code for every family. A family's `layout` says, for one image, which part of the image each of its
tokens shows, as a list of `Piece`s in token order:

- Qwen2.5-VL / Qwen3-VL: one grid, `image_grid_thw / merge_size` (rows x cols of 28 or 32 px cells).
- InternVL3: one grid per tile (side = sqrt(image_seq_length)); the image is resized to cols x rows tiles
  chosen by `get_optimal_tiled_canvas` and cut row-major, and a thumbnail of the whole image follows when
  there is more than one tile.
- LLaVA-OneVision (anyres, every image on its own since the runner passes images flat): the base crop of the
  whole image (side x side), then the unpadded high-resolution grid of the whole image with one newline token
  after each row. Newline tokens show no place in the image; they count in neither side of the share.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from eagle.config import MLLMConfig

WHOLE = (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class Piece:
    """A rows x cols grid of image tokens (row-major) showing `window` (y0, x0, y1, x1, fractions) of the image;
    `newline`: one token with no place in the image after each row."""

    rows: int
    cols: int
    window: tuple[float, float, float, float] = WHOLE
    newline: bool = False

    @property
    def tokens(self) -> int:
        return self.rows * (self.cols + self.newline)


Layout = list[Piece]


def layout_coverage(region: np.ndarray, layout: Sequence[Piece]) -> np.ndarray:
    """Per image token, the share of the pixels it shows that lie in `region` ((H, W) in [0, 1] at image size);
    NaN for tokens with no place in the image. Length: the layout's token count."""
    h, w = region.shape
    parts = []
    for p in layout:
        y0, x0, y1, x1 = p.window
        top, left = min(int(y0 * h), h - 1), min(int(x0 * w), w - 1)
        crop = region[top:max(round(y1 * h), top + 1), left:max(round(x1 * w), left + 1)]
        cells = cv2.resize(crop, (p.cols, p.rows), interpolation=cv2.INTER_AREA).reshape(p.rows, p.cols)
        if p.newline:
            cells = np.concatenate([cells, np.full((p.rows, 1), np.nan, np.float32)], axis=1)
        parts.append(cells.reshape(-1))
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------- families
def _qwen_layouts(processor: Any, batch: Mapping[str, Any], sizes: Sequence[tuple[int, int]]) -> list[Layout]:
    merge = processor.image_processor.merge_size
    return [[Piece(h // merge, w // merge)] for _, h, w in batch["image_grid_thw"].tolist()]


def _internvl_layouts(processor: Any, batch: Mapping[str, Any], sizes: Sequence[tuple[int, int]]) -> list[Layout]:
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    ip = processor.image_processor
    # the options as the processor merges them: InternVLProcessor turns crop_to_patches on by default
    options = {name: getattr(ip, name) for name in ("crop_to_patches", "min_patches", "max_patches", "size")}
    options.update(processor._merge_kwargs()["images_kwargs"])
    size = options["size"]
    tile = (size["height"], size["width"]) if isinstance(size, dict) else (size.height, size.width)
    side = math.isqrt(processor.image_seq_length)
    layouts = []
    for h, w in sizes:
        crop = options["crop_to_patches"] and options["max_patches"] > 1
        cols, rows = (get_optimal_tiled_canvas((h, w), tile, options["min_patches"], options["max_patches"])
                      if crop else (1, 1))
        tiles = [Piece(side, side, (r / rows, c / cols, (r + 1) / rows, (c + 1) / cols))
                 for r in range(rows) for c in range(cols)]
        layouts.append(tiles + [Piece(side, side)] if len(tiles) > 1 else [Piece(side, side)])
    return layouts


def _llava_onevision_layouts(processor: Any, batch: Mapping[str, Any],
                             sizes: Sequence[tuple[int, int]]) -> list[Layout]:
    from transformers.image_processing_utils import select_best_resolution

    side = math.isqrt(processor.num_image_tokens)
    crop_h, crop_w = batch["pixel_values"].shape[-2:]
    layouts = []
    for h, w in sizes:
        best_h, best_w = select_best_resolution([h, w], processor.image_processor.image_grid_pinpoints)
        count, rows = processor._get_unpadded_features(h, w, side, side, best_h // crop_h, best_w // crop_w)
        layouts.append([Piece(side, side), Piece(rows, count // rows, newline=True)])
    return layouts


def _pixel_budget(mllm: MLLMConfig) -> dict[str, Any]:
    return {"size": {"shortest_edge": mllm.min_pixels, "longest_edge": mllm.max_pixels}}


def _checkpoint_defaults(mllm: MLLMConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Family:
    """processor_kwargs: extra processor call options from the config; layouts: per image of a processed batch
    (images in order, their original (h, w)), its token layout; uses_pixel_budget: whether the processor
    resizes to ``mllm.min_pixels``..``mllm.max_pixels`` (so a larger image can be capped before it travels)."""

    name: str
    processor_kwargs: Callable[[MLLMConfig], dict[str, Any]]
    layouts: Callable[[Any, Mapping[str, Any], Sequence[tuple[int, int]]], list[Layout]]
    uses_pixel_budget: bool = False


_QWEN = Family("Qwen-VL", _pixel_budget, _qwen_layouts, uses_pixel_budget=True)
FAMILIES: dict[str, Family] = {  # by the checkpoint's config.model_type
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "internvl": Family("InternVL3", _checkpoint_defaults, _internvl_layouts),
    "llava_onevision": Family("LLaVA-OneVision", _checkpoint_defaults, _llava_onevision_layouts),
}


def family_for(model_type: str) -> Family:
    """The family of a checkpoint's `config.model_type`; ValueError for one the guided path does not know."""
    if model_type not in FAMILIES:
        raise ValueError(f"MLLM family {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
