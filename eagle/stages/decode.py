"""Read + decode stage (CPU tasks): bytes from storage → validated RGB array, or an error row."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np

from eagle import storage
from eagle.config import JobConfig
from eagle.decode import DecodeError, decode_image
from eagle.stages import Throughput, batch_of, fail, rows_of

OUTPUT_COLUMNS = ["image_uri", "product", "image_version", "image_size_bytes", "content_sha256", "width",
                  "height", "status", "error", "error_stage", "decode_ms", "image"]
_EMPTY = np.zeros((0, 0, 3), np.uint8)
_progress = Throughput("decode")  # per worker process; decode runs as stateless tasks


def read_decode(batch: dict[str, np.ndarray], cfg: JobConfig) -> dict[str, np.ndarray]:
    """Read each image's bytes and decode it; failures become error rows, never exceptions."""
    rows = rows_of(batch)
    batch_start = time.perf_counter()
    for row in rows:
        start = time.perf_counter()
        row.update(status="ok", error=None, error_stage=None, image=_EMPTY, content_sha256=None,
                   width=None, height=None)
        _read_and_decode(row, cfg)
        row["decode_ms"] = (time.perf_counter() - start) * 1000.0
    _progress.add(len(rows), time.perf_counter() - batch_start)
    return batch_of(rows, OUTPUT_COLUMNS)


def _read_and_decode(row: dict[str, Any], cfg: JobConfig) -> None:
    try:
        data = storage.read_bytes(row["image_uri"], cfg.storage)
    except FileNotFoundError:
        return fail(row, "read", "file not found")
    except Exception as exc:  # noqa: BLE001 - any storage failure (after retries) is this image's error
        return fail(row, "read", f"could not read: {type(exc).__name__}: {exc}")
    row["content_sha256"] = hashlib.sha256(data).hexdigest()
    row["image_size_bytes"] = len(data)
    if not row.get("image_version"):
        row["image_version"] = f"sha256:{row['content_sha256']}"
    try:
        image = decode_image(data, cfg.inputs.max_image_pixels)
    except DecodeError as exc:
        return fail(row, "decode", str(exc))
    row.update(image=image, height=int(image.shape[0]), width=int(image.shape[1]))
