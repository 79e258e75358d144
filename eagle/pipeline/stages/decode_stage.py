"""Read + decode stage (CPU tasks): bytes from storage → validated RGB array → the expert's model input, or an
error row.

Pixels move once and small: the decoded image never leaves this task. What travels on is the expert's input
(resized and cropped as the product's artifact says, uint8: crop x crop x 3, ~150 KB at 224) and the original
size the anomaly maps come back at; the MLLM re-reads the few images routed to it (`MLLMStage`).
"""

from __future__ import annotations

import hashlib
import time
from functools import lru_cache
from typing import Any

import numpy as np

from eagle.config import JobConfig
from eagle.io import storage
from eagle.io.images import DecodeError, decode_image
from eagle.pipeline.stages.base import Row, Stage, describe, fail

_EMPTY = np.zeros((0, 0, 3), np.uint8)


class DecodeStage(Stage):
    """Reads each listed image and decodes it; failures become error rows, never exceptions."""

    name = "decode"
    sized_by = "decode"
    requires = ("image_uri", "product", "image_version", "image_size_bytes")
    produces = ("content_sha256", "width", "height", "status", "error", "error_stage", "decode_ms", "expert_input",
                "image_size_bytes", "image_version")  # the last two: the size read, a content token if none

    def __init__(self, cfg: JobConfig, input_sizes: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__(cfg)
        self.input_sizes = input_sizes or {}  # product -> (resize, crop) of its pinned expert

    def process(self, rows: list[Row]) -> None:
        for row in rows:
            start = time.perf_counter()
            row.update(status="ok", error=None, error_stage=None, expert_input=_EMPTY, content_sha256=None,
                       width=None, height=None)
            self._read_and_decode(row)
            row["decode_ms"] = (time.perf_counter() - start) * 1000.0

    def _read_and_decode(self, row: Row) -> None:
        try:
            data = storage.read_bytes(row["image_uri"], self.cfg.storage)
        except FileNotFoundError:
            return fail(row, "read", "file not found")
        except Exception as exc:  # noqa: BLE001 - any storage failure (after retries) is this image's error
            return fail(row, "read", f"could not read: {describe(exc)}")
        row["content_sha256"] = hashlib.sha256(data).hexdigest()
        row["image_size_bytes"] = len(data)
        if not row.get("image_version"):
            row["image_version"] = f"sha256:{row['content_sha256']}"
        try:
            image = decode_image(data, self.cfg.inputs.max_image_pixels)
        except DecodeError as exc:
            return fail(row, "decode", str(exc))
        row.update(height=int(image.shape[0]), width=int(image.shape[1]))
        if row["product"] in self.input_sizes:  # else the expert stage reports the missing expert
            row["expert_input"] = _preprocessor(*self.input_sizes[row["product"]]).model_input(image)


@lru_cache(maxsize=8)
def _preprocessor(resize: int, crop: int) -> Any:
    from eagle.expert.preprocess import PreProcessor

    return PreProcessor(resize, crop)


def model_input_sizes(metas: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[int, int]]:
    """(resize, crop) of each product's pinned expert, from its artifacts' metadata (`pinned_metas`, read once by
    the driver before the run)."""
    from eagle.expert.ensemble import input_size

    return {product: input_size(product_metas) for product, product_metas in metas.items()}
