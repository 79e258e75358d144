"""Expert stage (actor pool): PatchCore score, anomaly map, threshold verdict, confidence band, regions.

Each actor keeps a bounded LRU cache of per-product experts, loaded on first use from the model store at the
artifact version the driver pinned for this run (so a run never mixes versions, even if LATEST moves).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

import numpy as np

from eagle.config import JobConfig
from eagle.stages import Throughput, batch_of, fail, rows_of, set_boxes
from eagle.stages.decode import OUTPUT_COLUMNS as DECODE_COLUMNS

EXPERT_COLUMNS = ["expert_score", "threshold", "score_max", "threshold_method", "expert_verdict", "confidence",
                  "boxes_json", "mask_png", "anomaly_map_png", "map_max", "expert_model_version", "expert_ms"]
OUTPUT_COLUMNS = DECODE_COLUMNS + EXPERT_COLUMNS


class ExpertStage:
    """Callable class for ``map_batches(..., compute=ActorPoolStrategy(...))``."""

    def __init__(self, cfg: JobConfig, versions: dict[str, str]) -> None:
        import torch

        from eagle.threads import configure_threads

        configure_threads(torch)
        self.cfg = cfg
        self.versions = versions  # product -> artifact version, resolved once by the driver
        self.device = cfg.resources.expert.resolved_device()
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._progress = Throughput("expert")

    def _expert(self, product: str) -> tuple[Any, Any]:
        """(artifact, Expert) for a product, via the LRU cache."""
        from eagle.expert import Expert, load_artifact

        if product in self._cache:
            self._cache.move_to_end(product)
            return self._cache[product]
        art = load_artifact(self.cfg.model_store, product, self.versions[product], storage=self.cfg.storage)
        entry = (art, Expert.from_artifact(art, device=self.device, dtype=self.cfg.expert.dtype))
        self._cache[product] = entry
        while len(self._cache) > self.cfg.expert.cache_size:
            self._cache.popitem(last=False)
        return entry

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        rows = rows_of(batch)
        by_product: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row["status"] != "ok":
                continue
            if row["product"] not in self.versions:
                fail(row, "expert", f"no fitted expert for product {row['product']!r} in model store "
                                    f"{self.cfg.model_store} (run jobs/fit.py for it)")
                continue
            by_product.setdefault(row["product"], []).append(row)
        for product, group in by_product.items():
            self._score_group(product, group)
        self._progress.add(len(rows), time.perf_counter() - start)
        return batch_of(rows, OUTPUT_COLUMNS)

    def _score_group(self, product: str, group: list[dict[str, Any]]) -> None:
        try:
            art, expert = self._expert(product)
        except Exception as exc:  # noqa: BLE001 - a broken artifact fails its product's rows, not the job
            for row in group:
                fail(row, "expert", f"could not load expert for {product!r}: {type(exc).__name__}: {exc}")
            return
        size = self.cfg.resources.expert.batch_size
        for i in range(0, len(group), size):
            chunk = group[i:i + size]
            start = time.perf_counter()
            try:
                results = expert.score([row["image"] for row in chunk])
            except Exception:  # noqa: BLE001 - isolate the image that breaks the batch
                results = None
            per_image_ms = (time.perf_counter() - start) * 1000.0 / len(chunk)
            for j, row in enumerate(chunk):
                try:
                    result = results[j] if results is not None else expert.score([row["image"]])[0]
                    self._fill(row, art, result)
                    row["expert_ms"] = per_image_ms
                except Exception as exc:  # noqa: BLE001
                    fail(row, "expert", f"scoring failed: {type(exc).__name__}: {exc}")

    def _fill(self, row: dict[str, Any], art: Any, result: Any) -> None:
        from eagle.expert import classify
        from eagle.regions import find_regions

        verdict, confidence = classify(result.score, art.threshold, art.score_max, self.cfg.confidence)
        regions = find_regions(result.anomaly_map, self.cfg.regions)
        anomalous = verdict == "anomalous"
        row.update(
            expert_score=float(result.score),
            threshold=float(art.threshold),
            score_max=float(art.score_max),
            threshold_method=art.meta["threshold"]["method"],
            expert_verdict=verdict,
            confidence=confidence,
            mask_png=regions.mask_png if anomalous else None,
            anomaly_map_png=regions.map_png,
            map_max=regions.map_max,
            expert_model_version=art.version,
        )
        set_boxes(row, regions.boxes if anomalous else [])
