"""Stamp stage (CPU tasks, whole blocks): run-level columns and the output schema, right before the write."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pyarrow as pa

from eagle.config import JobConfig
from eagle.io.schema import to_table
from eagle.pipeline.stages.base import Row, Stage, boxes_of

RUN_COLUMNS = ("run_id", "audit_date", "config_hash", "eagle_version", "mllm_model")


class StampStage(Stage):
    """Adds the run's columns and `audited_at`, turns the boxes and expert members JSON into the schema's lists
    of structs."""

    name = "stamp"
    sized_by = "decode"
    whole_blocks = True
    skip_failed = False  # error rows are stamped too
    requires = ("image_uri", "status", "boxes_json")
    produces = (*RUN_COLUMNS, "audited_at", "boxes", "expert_members")
    drops = ("boxes_json", "expert_members_json")

    def __init__(self, cfg: JobConfig, stamp: dict[str, Any]) -> None:
        super().__init__(cfg)
        missing = set(RUN_COLUMNS) - set(stamp)
        if missing:
            raise ValueError(f"stamp lacks {sorted(missing)}")
        self.stamp = stamp

    def process(self, rows: list[Row]) -> None:
        now = dt.datetime.now(dt.UTC)
        for row in rows:
            row.update(self.stamp, audited_at=now)
            row["boxes"] = [b.as_dict() for b in boxes_of(row)]
            members = row.get("expert_members_json")
            row["expert_members"] = json.loads(members) if isinstance(members, str) else None

    def emit(self, rows: list[Row], columns: list[str]) -> pa.Table:
        return to_table(rows)  # exactly the output schema: columns not in it (e.g. bookkeeping) are left out
