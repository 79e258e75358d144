"""MLLM stage (actor pool): route, prompt, guided generation, final verdict and explanation.

Rows the routing policy does not send to the MLLM keep the expert's verdict (`finish_with_expert`). No pixels
reach this stage: it re-reads the routed images from storage (checked against the content hash the decode task
recorded) and caps them at the processor's pixel budget (``mllm.max_pixels``, for the families that have one)
before the model sees them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from eagle.config import JobConfig
from eagle.findings import final_verdict
from eagle.io import storage
from eagle.io.images import capped, decode_image
from eagle.pipeline.routing import expert_explanation, finish_with_expert, needs_mllm
from eagle.pipeline.stages.base import Row, Stage, boxes_of, describe

# What a row says about the MLLM; shared with FinishStage so both paths give rows the same columns.
MLLM_COLUMNS = ("mllm_ran", "guided", "answer", "verdict", "explanation", "explanation_source", "mllm_reply",
                "image_attention_share", "mllm_ms")
NOT_ASKED = {"mllm_ran": False, "guided": False}
DECISION_INPUTS = ("product", "status", "expert_verdict", "expert_score", "threshold", "confidence", "boxes_json",
                   "width", "height")


class MLLMStage(Stage):
    """Asks the MLLM about the routed rows in batches of ``resources.mllm.batch_size``; loads the model once."""

    name = "mllm"
    resources = "mllm"
    actor = True
    requires = (*DECISION_INPUTS, "image_uri", "content_sha256")
    produces = MLLM_COLUMNS
    defaults = NOT_ASKED

    def __init__(self, cfg: JobConfig) -> None:
        import torch

        from eagle.mllm.runner import MLLMRunner
        from eagle.pipeline.ray_setup import configure_threads

        super().__init__(cfg)
        configure_threads(torch)
        self.runner = MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance, device=cfg.resources.mllm.resolved_device())

    def process(self, rows: list[Row]) -> None:
        routed = []
        for row in rows:
            if needs_mllm(row["confidence"], self.cfg.routing.policy):
                routed.append(row)
            else:
                finish_with_expert(row, boxes_of(row))
        self.in_chunks(routed, self.cfg.resources.mllm.batch_size, run=self._generate, apply=self._answer,
                       failed=self._failed)

    def _generate(self, chunk: list[Row]) -> list[Any]:
        from eagle.mllm.runner import MLLMRequest

        return self.runner.run([MLLMRequest(image=self._pixels(r), product=r["product"],
                                            expert_verdict=r["expert_verdict"], confidence=r["confidence"],
                                            boxes=boxes_of(r)) for r in chunk])

    def _pixels(self, row: Row) -> np.ndarray:
        """The row's image as the MLLM sees it: read again, the same bytes as decoded, within the pixel budget."""
        data = storage.read_bytes(row["image_uri"], self.cfg.storage)
        if hashlib.sha256(data).hexdigest() != row["content_sha256"]:
            raise ValueError(f"{row['image_uri']} changed since it was decoded for the expert")
        image = decode_image(data, self.cfg.inputs.max_image_pixels)
        # within the processor's pixel budget where the family has one; others tile the image themselves
        if self.runner.family.uses_pixel_budget:
            image = capped(image, self.cfg.mllm.max_pixels)
        return np.require(image, requirements="W")  # processors hand it to torch.from_numpy, which wants it writable

    def _answer(self, row: Row, res: Any, ms: float) -> None:
        row.update(mllm_ran=True, guided=res.guided, answer=res.answer, mllm_ms=ms,
                   image_attention_share=res.image_attention_share,
                   verdict=final_verdict(res.answer, row["expert_verdict"]))
        if res.answer == "unparsed":  # the reply is kept as is, never passed off as an explanation
            row.update(explanation=expert_explanation(row, boxes_of(row)), explanation_source="expert",
                       mllm_reply=res.raw_text)
        elif res.explanation:
            row.update(explanation=res.explanation, explanation_source="mllm")
        else:
            row.update(explanation=expert_explanation(row, boxes_of(row)), explanation_source="expert")

    @staticmethod
    def _failed(row: Row, exc: BaseException) -> None:
        """The expert's result stands; the failure is recorded (the row stays 'ok')."""
        finish_with_expert(row, boxes_of(row))
        row.update(error=f"MLLM generation failed, expert verdict kept: {describe(exc)}", error_stage="mllm")
