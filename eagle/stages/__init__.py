"""Ray Data stages: each module pairs a batch UDF with the map_batches arguments it runs under.

Batches are dicts of column → numpy array (Ray's "numpy" batch format). Rows that already failed pass
through every later stage untouched, so each input image leaves the pipeline as exactly one row.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

from eagle.types import Box

log = logging.getLogger("eagle.progress")


def rows_of(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Column batch → list of row dicts."""
    n = len(next(iter(batch.values()))) if batch else 0
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def batch_of(rows: list[dict[str, Any]], columns: list[str]) -> dict[str, np.ndarray]:
    """List of row dicts → column batch (object arrays, so ragged images and nested lists survive)."""
    out: dict[str, np.ndarray] = {}
    for col in columns:
        arr = np.empty(len(rows), dtype=object)
        arr[:] = [r.get(col) for r in rows]
        out[col] = arr
    return out


def boxes_of(row: dict[str, Any]) -> list[Box]:
    """The row's boxes. Between stages they travel as a JSON string: Ray's numpy batches mangle ragged
    lists of dicts (an empty list comes back as an empty array, a missing one as NaN)."""
    text = row.get("boxes_json")
    return [Box(**b) for b in json.loads(text)] if isinstance(text, str) else []


def set_boxes(row: dict[str, Any], boxes: list[Box]) -> None:
    row["boxes_json"] = json.dumps([b.as_dict() for b in boxes])


def fail(row: dict[str, Any], stage: str, message: str) -> None:
    """Mark a row as an error of `stage` (first error wins)."""
    if row.get("status") != "error":
        row.update(status="error", error=message[:2000], error_stage=stage)


class Throughput:
    """Logs a stage's images/s every `interval` seconds from the worker (Ray forwards it to the driver log)."""

    def __init__(self, stage: str, interval: float = 30.0) -> None:
        self.stage, self.interval = stage, interval
        self.count, self.busy = 0, 0.0
        self._last = time.monotonic()

    def add(self, images: int, seconds: float) -> None:
        self.count += images
        self.busy += seconds
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.info("%s worker %d: %d images, %.2f images/s while busy", self.stage, os.getpid(), self.count,
                     self.count / self.busy if self.busy else 0.0)
