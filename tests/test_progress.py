"""Quiet logs: the one-line progress report, and colour codes dropped off a terminal."""

from __future__ import annotations

import io
from types import SimpleNamespace

from eagle.logs import PlainText
from eagle.pipeline.progress import progress_line, stage_rows


def _op(name: str, rows: int) -> SimpleNamespace:
    return SimpleNamespace(name=name, metrics=SimpleNamespace(rows_task_outputs_generated=rows))


def test_progress_line_counts_rows_per_stage_and_estimates_the_rest():
    topology = [_op("Input", 0), _op("MapBatches(_read_todo)", 400),
                _op("MapBatches(DecodeStage)->MapBatches(ExpertStage)", 120), _op("MapBatches(MLLMStage)", 60),
                _op("MapBatches(StampStage)", 50), _op("Write", 2)]  # Ray's topology: a dict keyed by operator
    rows = stage_rows(topology)
    assert rows == {"expert": 120, "mllm": 60, "stamp": 50}
    assert progress_line(rows, 400, 100.0) == ("progress: expert 120, mllm 60, stamp 50 of 400 images; "
                                               "0.50 images/s, ETA 11m 40s")
    assert progress_line({"expert": 0}, 10, 30.0).endswith("0.00 images/s, ETA unknown")


def test_plain_text_drops_colour_codes():
    sink = io.StringIO()
    PlainText(sink).write("\x1b[36m(MLLMStage pid=1)\x1b[0m loaded\x1b[32m [repeated 2x]\x1b[0m\n")
    assert sink.getvalue() == "(MLLMStage pid=1) loaded [repeated 2x]\n"
