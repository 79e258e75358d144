"""Finish stage (CPU tasks), when no MLLM is configured: the expert's verdict and explanation are final."""

from __future__ import annotations

from eagle.pipeline.routing import finish_with_expert
from eagle.pipeline.stages.base import Row, Stage, boxes_of
from eagle.pipeline.stages.mllm_stage import DECISION_INPUTS, MLLM_COLUMNS, NOT_ASKED


class FinishStage(Stage):
    """Gives every row the MLLM stage's columns as 'not asked', with the expert's verdict."""

    name = "finish"
    resources = "decode"
    requires = DECISION_INPUTS
    produces = MLLM_COLUMNS
    defaults = NOT_ASKED

    def process(self, rows: list[Row]) -> None:
        for row in rows:
            finish_with_expert(row, boxes_of(row))
