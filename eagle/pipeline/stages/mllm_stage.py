"""MLLM stage (the run's MLLM actors, `eagle.pipeline.mllm_pool`): prompt, guided generation, final verdict and
explanation for the rows the finish stage routed to it, and only those.

No pixels reach this stage: it re-reads the routed images from storage (checked against the content hash the
decode task recorded) and caps them at the processor's pixel budget (``mllm.max_pixels``, for the families that
have one) before the model sees them.
"""

from __future__ import annotations

import hashlib
import pickle
from typing import Any

import numpy as np

from eagle.config import JobConfig
from eagle.findings import final_verdict
from eagle.io import storage
from eagle.io.images import capped, decode_image
from eagle.pipeline.remote_errors import remote_message
from eagle.pipeline.routing import expert_explanation, finish_with_expert
from eagle.pipeline.stages.base import Batch, Row, Stage, boxes_of

# What a row says about the MLLM; shared with FinishStage so both paths give rows the same columns.
MLLM_COLUMNS = ("mllm_ran", "guided", "answer", "verdict", "explanation", "explanation_source", "mllm_reply",
                "image_attention_share", "mllm_ms")
# ... of a row the MLLM did not answer for (its verdict and explanation are the expert's: `finish_with_expert`)
NOT_ASKED = {"mllm_ran": False, "guided": False, "answer": None, "mllm_reply": None, "image_attention_share": None,
             "mllm_ms": None}
DECISION_INPUTS = ("product", "status", "expert_verdict", "expert_score", "threshold", "confidence", "boxes_json",
                   "width", "height")


class MLLMStage(Stage):
    """Asks the MLLM about every row it is given, in batches of ``resources.mllm.batch_size``; loads the model
    once. Runs as a Ray actor that finish tasks call (`answer`)."""

    name = "mllm"
    sized_by = "mllm"
    # image_uri and content_sha256 to re-read the image; error and error_stage are kept, or set by a failed call
    requires = (*DECISION_INPUTS, "image_uri", "content_sha256", "error", "error_stage")
    produces = (*MLLM_COLUMNS, "error", "error_stage")
    defaults = NOT_ASKED

    def __init__(self, cfg: JobConfig) -> None:
        import torch

        from eagle.mllm.runner import MLLMRunner
        from eagle.pipeline.ray_setup import configure_threads

        super().__init__(cfg)
        configure_threads(torch)
        self.runner = MLLMRunner(cfg.mllm, cfg.prompts, cfg.guidance, device=self.sizing.resolved_device())
        self.received = [0, 0]  # rows and bytes this actor was sent

    def ready(self) -> bool:
        """Answers once the model is loaded (the driver waits for it before images flow)."""
        return True

    def answer(self, batch: Batch) -> Batch:
        """The routed rows of one finish task, answered (the actor method finish tasks call)."""
        self.received[0] += len(batch["image_uri"])
        self.received[1] += len(pickle.dumps(batch, protocol=5))  # its size in transit (nothing is unpickled)
        return self(batch)

    def traffic(self) -> tuple[int, int]:
        """(rows, bytes) sent to this actor so far."""
        return self.received[0], self.received[1]

    def process(self, rows: list[Row]) -> None:
        # batches cut from the rows sorted by estimated prompt length pad less (rows are filled in place)
        self.in_chunks(sorted(rows, key=self._prompt_tokens), self.sizing.batch_size,
                       run=self._generate, apply=self._answer, failed=failed_mllm)

    def _prompt_tokens(self, row: Row) -> int:
        from eagle.mllm.runner import estimated_tokens

        boxed = self.cfg.prompts.use_expert and row["expert_verdict"] == "anomalous" and bool(boxes_of(row))
        return estimated_tokens(int(row["height"]), int(row["width"]), 1 + boxed + self.cfg.prompts.few_shot,
                                self.cfg.mllm.max_pixels)

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
        return image

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



def failed_mllm(row: Row, exc: BaseException) -> None:
    """The expert's result stands; the MLLM's failure is recorded (the row stays 'ok')."""
    finish_with_expert(row, boxes_of(row))
    row.update(error=f"MLLM generation failed, expert verdict kept: {type(exc).__name__}: {remote_message(exc)}"[:2000],
               error_stage="mllm")
