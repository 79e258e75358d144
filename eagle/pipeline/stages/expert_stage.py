"""Expert stage (actor pool): expert score, anomaly map, threshold verdict, confidence band, regions; each
product's expert is one model or an ensemble (`eagle.expert.ensemble`).

It receives the model-ready copies the decode tasks made (`expert_input`) and the original sizes; masks and
maps come out at the original resolution.

Each actor keeps a bounded LRU cache of per-product experts, loaded on first use from the model store at the
artifact version the driver pinned for this run (so a run never mixes versions, even if LATEST moves).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from eagle.config import JobConfig
from eagle.pipeline.stages.base import Row, Stage, describe, fail, set_boxes


class ExpertStage(Stage):
    """Scores each image with its product's expert and derives verdict, confidence, boxes, mask and map."""

    name = "expert"
    sized_by = "expert"
    actor = True
    requires = ("product", "status", "expert_input", "width", "height")
    produces = ("expert_score", "threshold", "score_max", "threshold_method", "expert_verdict", "confidence",
                "band_low", "band_high", "boxes_json", "mask_png", "anomaly_map_png", "map_max", "expert_model_version",
                "expert_members_json", "expert_ms", "status", "error", "error_stage")  # the last three: a row it fails
    drops = ("expert_input",)

    def __init__(self, cfg: JobConfig, versions: dict[str, str]) -> None:
        import torch

        from eagle.pipeline.ray_setup import configure_threads

        super().__init__(cfg)
        configure_threads(torch)
        self.versions = versions  # product -> artifact version, pinned once by the driver
        self.device = self.sizing.resolved_device()
        if self.device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True  # every input is crop x crop: cuDNN picks the fastest kernels
        self._cache: OrderedDict[str, Any] = OrderedDict()

    def _expert(self, product: str) -> Any:
        """The product's `ProductExpert` (one model or an ensemble), via the LRU cache."""
        from eagle.expert.artifact import load_artifact
        from eagle.expert.ensemble import ProductExpert, band_of, member_versions
        from eagle.expert.fitted import Expert

        if product in self._cache:
            self._cache.move_to_end(product)
            return self._cache[product]
        pinned = self.versions[product]
        arts = [load_artifact(self.cfg.model_store, product, version, storage=self.cfg.storage)
                for version in member_versions(pinned)]
        dtype = self.cfg.expert.resolved_dtype(self.device)
        how = self.cfg.expert.ensemble.combine
        band = band_of([art.meta for art in arts], how, self.cfg.routing, self.cfg.confidence)
        entry = ProductExpert(pinned, [(art, Expert.from_artifact(art, device=self.device, dtype=dtype,
                                                                       search=self.cfg.expert.patchcore.search))
                                       for art in arts], how, band)
        self._cache[product] = entry
        while len(self._cache) > self.cfg.expert.cache_size:
            self._cache.popitem(last=False)
        return entry

    def process(self, rows: list[Row]) -> None:
        by_product: dict[str, list[Row]] = {}
        for row in rows:
            if row["product"] not in self.versions:
                fail(row, "expert", f"no fitted expert for product {row['product']!r} in model store "
                                    f"{self.cfg.model_store} (run jobs/fit.py for it)")
            else:
                by_product.setdefault(row["product"], []).append(row)
        for product, group in by_product.items():
            try:
                expert = self._expert(product)
            except Exception as exc:  # noqa: BLE001 - a broken artifact fails its product's rows, not the job
                for row in group:
                    fail(row, "expert", f"could not load expert for {product!r}: {describe(exc)}")
                continue
            self.in_chunks(
                group, self.sizing.batch_size,
                run=lambda chunk, expert=expert: expert.score_inputs(
                    [r["expert_input"] for r in chunk], [(int(r["height"]), int(r["width"])) for r in chunk]),
                apply=lambda row, result, ms, expert=expert: self._fill(row, expert, result, ms),
                failed=lambda row, exc: fail(row, "expert", f"scoring failed: {describe(exc)}"))

    def _fill(self, row: Row, expert: Any, result: Any, ms: float) -> None:
        from eagle.expert.regions import find_regions

        band = expert.band
        verdict, confidence = band.classify(result.score)
        regions = find_regions(result.anomaly_map, self.cfg.regions)
        # regions of anomalous verdicts, and of normal ones in the unsure band: where the MLLM should look
        with_regions = verdict == "anomalous" or confidence == "uncertain"
        row.update(
            expert_score=float(result.score),
            threshold=band.threshold,
            score_max=band.score_max,
            threshold_method=band.method,
            expert_verdict=verdict,
            confidence=confidence,
            band_low=band.low,
            band_high=band.high,
            mask_png=regions.mask_png if with_regions else None,
            anomaly_map_png=regions.map_png,
            map_max=regions.map_max,
            expert_model_version=expert.version,
            expert_members_json=json.dumps(result.members),
            expert_ms=ms,
        )
        set_boxes(row, regions.boxes if with_regions else [])
