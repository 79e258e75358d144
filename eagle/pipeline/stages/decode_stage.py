"""Read + decode stage (CPU tasks): bytes from storage → validated RGB array, or an error row."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from eagle.io import storage
from eagle.io.images import DecodeError, decode_image
from eagle.pipeline.stages.base import Row, Stage, describe, fail

_EMPTY = np.zeros((0, 0, 3), np.uint8)


class DecodeStage(Stage):
    """Reads each listed image and decodes it; failures become error rows, never exceptions."""

    name = "decode"
    resources = "decode"
    requires = ("image_uri", "product", "image_version", "image_size_bytes")
    produces = ("content_sha256", "width", "height", "status", "error", "error_stage", "decode_ms", "image")

    def process(self, rows: list[Row]) -> None:
        for row in rows:
            start = time.perf_counter()
            row.update(status="ok", error=None, error_stage=None, image=_EMPTY, content_sha256=None,
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
        row.update(image=image, height=int(image.shape[0]), width=int(image.shape[1]))
