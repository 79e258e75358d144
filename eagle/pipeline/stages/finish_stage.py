"""Finish stage (CPU tasks): where the stream splits and joins again around the MLLM.

Rows the routing policy does not send to the MLLM keep the expert's verdict (`finish_with_expert`); the routed
rows of the batch go to the run's MLLM actors (`eagle.pipeline.mllm_pool`) and come back answered, and the
batch leaves whole. With no MLLM configured every row keeps the expert's verdict.
"""

from __future__ import annotations

from typing import Any

from eagle.pipeline.routing import finish_with_expert, needs_mllm
from eagle.pipeline.stages.base import Row, Stage, batch_of, boxes_of, rows_of
from eagle.pipeline.stages.mllm_stage import NOT_ASKED, MLLMStage, failed_mllm


class FinishStage(Stage):
    """Routes each row: the MLLM pool answers the routed ones, the expert's verdict is final for the rest."""

    name = "finish"
    sized_by = "finish"
    requires = MLLMStage.requires  # what the routed rows carry to the MLLM
    produces = MLLMStage.produces
    defaults = NOT_ASKED

    def __init__(self, cfg: Any, pool: Any = None) -> None:
        super().__init__(cfg)
        self.pool = pool  # an MLLMPool (or anything with `ask(batch) -> batch`), None without an MLLM

    def process(self, rows: list[Row]) -> None:
        routed = []
        for row in rows:
            if self.pool is not None and needs_mllm(row["confidence"], self.cfg.routing.policy):
                routed.append(row)
            else:
                finish_with_expert(row, boxes_of(row))
        if not routed:
            return
        from ray.exceptions import RayActorError

        sent = batch_of(routed, MLLMStage.requires)
        try:
            answered = rows_of(self.pool.ask(sent))
        except RayActorError as exc:  # the actor died for good: the expert's verdict stands (any other error
            for row in routed:  # is a bug in the MLLM stage and fails the task, as it would in a Ray Data stage)
                failed_mllm(row, exc)
            return
        for row, answer in zip(routed, answered, strict=True):
            row.update({k: answer[k] for k in MLLMStage.produces})
