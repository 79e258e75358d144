"""MLLM stage (actor pool): route, prompt, guided generation, final verdict and explanation.

Also the place where rows are finalised when no MLLM is configured (`finalize`), so the verdict rule lives
once. The decoded image leaves the pipeline here: output rows never carry pixels.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from eagle.config import JobConfig
from eagle.routing import expert_explanation, final_verdict, needs_mllm
from eagle.schema import COLUMN_NAMES
from eagle.stages import Throughput, batch_of, boxes_of, rows_of

RESULT_COLUMNS = [c for c in COLUMN_NAMES if c not in ("run_id", "audited_at", "audit_date", "eagle_version",
                                                       "config_hash", "boxes")] + ["boxes_json"]


def _finish_without_mllm(row: dict[str, Any]) -> None:
    row.update(mllm_ran=False, guided=False, answer=None, image_attention_share=None)
    if row["status"] == "ok":
        row.update(verdict=row["expert_verdict"], explanation=expert_explanation(row, boxes_of(row)),
                   explanation_source="expert")


def finalize(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """No MLLM configured: the expert's verdict and explanation are final."""
    rows = rows_of(batch)
    for row in rows:
        _finish_without_mllm(row)
    return batch_of(rows, RESULT_COLUMNS)


class MLLMStage:
    """Callable class for ``map_batches(..., compute=ActorPoolStrategy(...))``; loads the model once."""

    def __init__(self, cfg: JobConfig) -> None:
        import torch

        from eagle.mllm import MLLMRunner
        from eagle.threads import configure_threads

        configure_threads(torch)
        self.cfg = cfg
        self._progress = Throughput("mllm")
        self.runner = MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance, device=cfg.resources.mllm.resolved_device())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        rows = rows_of(batch)
        routed = [r for r in rows if r["status"] == "ok" and needs_mllm(r["confidence"], self.cfg.routing.policy)]
        routed_ids = {id(r) for r in routed}
        for row in rows:
            if id(row) not in routed_ids:
                _finish_without_mllm(row)
        size = self.cfg.resources.mllm.batch_size
        for i in range(0, len(routed), size):
            self._generate(routed[i:i + size])
        self._progress.add(len(rows), time.perf_counter() - start)
        return batch_of(rows, RESULT_COLUMNS)

    def _generate(self, chunk: list[dict[str, Any]]) -> None:
        from eagle.mllm import MLLMRequest

        requests = [MLLMRequest(image=r["image"], product=r["product"], expert_verdict=r["expert_verdict"],
                                confidence=r["confidence"], boxes=boxes_of(r))
                    for r in chunk]
        start = time.perf_counter()
        try:
            results = self.runner.run(requests)
        except Exception:  # noqa: BLE001 - retry one by one to isolate a failing prompt
            results = None
        per_image_ms = (time.perf_counter() - start) * 1000.0 / len(chunk)
        for j, row in enumerate(chunk):
            try:
                res = results[j] if results is not None else self.runner.run([requests[j]])[0]
            except Exception as exc:  # noqa: BLE001 - the expert's result stands; the failure is recorded
                _finish_without_mllm(row)
                row.update(error=f"MLLM generation failed, expert verdict kept: {type(exc).__name__}: {exc}",
                           error_stage="mllm")
                continue
            row.update(mllm_ran=True, guided=res.guided, answer=res.answer,
                       image_attention_share=res.image_attention_share,
                       verdict=final_verdict(res.answer, row["expert_verdict"]), mllm_ms=per_image_ms)
            if res.explanation:
                row.update(explanation=res.explanation, explanation_source="mllm")
            else:
                row.update(explanation=expert_explanation(row, boxes_of(row)), explanation_source="expert")
