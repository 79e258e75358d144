"""One concise progress line per interval while the inspect pipeline streams, in place of Ray Data's progress
blocks (kept behind ``--verbose``): rows out of each stage, images/s and an ETA, from Ray Data's executor; and
at the end, how many bytes per image entered each stage through the object store (`stage_inputs`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("eagle.progress")


def _stage_name(operator: str) -> str | None:
    """"decode" for ``MapBatches(DecodeStage)``; None for an operator that is not a stage."""
    if operator.startswith("MapBatches(") and operator.endswith("Stage)"):
        return operator[len("MapBatches("):-len("Stage)")].lower()
    return None


def stage_rows(topology: Iterable[Any]) -> dict[str, int]:
    """Rows each stage has produced so far, by short stage name ("decode", "expert", ...), in pipeline order.
    Fused operators ("A->B") count as their last stage; operators that are not stages are left out."""
    out: dict[str, int] = {}
    for op in topology:
        if name := _stage_name(op.name.split("->")[-1]):
            out[name] = op.metrics.rows_task_outputs_generated
    return out


def stage_inputs(topology: Iterable[Any]) -> dict[str, tuple[int, int]]:
    """(rows, bytes) that entered each stage through the object store, by short stage name; a fused operator
    ("A->B") counts for its first stage (B's input never leaves the task)."""
    out: dict[str, tuple[int, int]] = {}
    for op in topology:
        if name := _stage_name(op.name.split("->")[0]):
            out[name] = (op.metrics.num_row_inputs_received, op.metrics.bytes_inputs_received)
    return out


def progress_line(rows: dict[str, int], total: int, seconds: float) -> str:
    """``progress: decode 120, expert 100, mllm 40, stamp 32 of 400 images; 1.07 images/s, ETA 5m 39s``: the
    rate and ETA follow the last stage."""
    done = list(rows.values())[-1] if rows else 0
    rate = done / seconds if seconds > 0 else 0.0
    eta = f"ETA {_duration((total - done) / rate)}" if rate > 0 else "ETA unknown"
    counts = ", ".join(f"{name} {n}" for name, n in rows.items())
    return f"progress: {counts} of {total} images; {rate:.2f} images/s, {eta}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def progress_callback(total: int, interval: float = 30.0,
                      traffic: dict[str, list[int]] | None = None) -> type:
    """A Ray Data execution callback class (for ``DataContext.custom_execution_callback_classes``) that logs
    `progress_line` every `interval` seconds and once when the pipeline is through; then it adds each stage's
    `stage_inputs` to `traffic` (stage -> [rows, bytes], summed over the run's executions)."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class ProgressLine(ExecutionCallback):
        def before_execution_starts(self, executor: Any) -> None:
            self.start = self.last = time.monotonic()

        def on_execution_step(self, executor: Any) -> None:
            now = time.monotonic()
            if now - self.last >= interval:
                self.last = now
                log.info("%s", progress_line(stage_rows(executor._topology), total, now - self.start))

        def after_execution_succeeds(self, executor: Any) -> None:
            log.info("%s", progress_line(stage_rows(executor._topology), total, time.monotonic() - self.start))
            if traffic is not None:
                for stage, (rows, size) in stage_inputs(executor._topology).items():
                    seen = traffic.setdefault(stage, [0, 0])
                    seen[0], seen[1] = seen[0] + rows, seen[1] + size

    return ProgressLine
