"""One concise progress line per interval while the inspect pipeline streams, in place of Ray Data's progress
blocks (kept behind ``--verbose``): rows out of each stage, images/s and an ETA, from Ray Data's executor."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("eagle.progress")


def stage_rows(topology: Iterable[Any]) -> dict[str, int]:
    """Rows each stage has produced so far, by short stage name ("decode", "expert", ...), in pipeline order.
    Fused operators ("A->B") count as their last stage; operators that are not stages are left out."""
    out: dict[str, int] = {}
    for op in topology:
        last = op.name.split("->")[-1]
        if last.startswith("MapBatches(") and last.endswith("Stage)"):
            out[last[len("MapBatches("):-len("Stage)")].lower()] = op.metrics.rows_task_outputs_generated
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


def progress_callback(total: int, interval: float = 30.0) -> type:
    """A Ray Data execution callback class (for ``DataContext.custom_execution_callback_classes``) that logs
    `progress_line` every `interval` seconds and once when the pipeline is through."""
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

    return ProgressLine
