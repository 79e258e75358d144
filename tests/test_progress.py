"""Quiet logs: the one-line progress report, colour codes dropped off a terminal, library deprecations hidden."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

from eagle import logs
from eagle.logs import PlainText
from eagle.pipeline.progress import progress_line, stage_inputs, stage_rows


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


def test_stage_inputs_are_the_object_store_rows_and_bytes_entering_each_stage():
    def op(name, rows, size):
        return SimpleNamespace(name=name, metrics=SimpleNamespace(num_row_inputs_received=rows,
                                                                  bytes_inputs_received=size))

    topology = [op("Input", 0, 0), op("MapBatches(_read_todo)", 4, 100), op("MapBatches(DecodeStage)", 400, 9000),
                op("MapBatches(ExpertStage)", 400, 400 * 150_000),
                op("MapBatches(FinishStage)->MapBatches(StampStage)", 400, 400 * 3000), op("Write", 2, 10)]
    assert stage_inputs(topology) == {"decode": (400, 9000), "expert": (400, 60_000_000),
                                      "finish": (400, 1_200_000)}  # a fused pair counts for its first stage


def test_plain_text_drops_colour_codes():
    sink = io.StringIO()
    PlainText(sink).write("\x1b[36m(MLLMStage pid=1)\x1b[0m loaded\x1b[32m [repeated 2x]\x1b[0m\n")
    assert sink.getvalue() == "(MLLMStage pid=1) loaded [repeated 2x]\n"


def test_a_quiet_job_hides_library_deprecations_but_not_eagles_own(monkeypatch):
    monkeypatch.setattr(logs, "_quiet", False)
    for key in logs.QUIET_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        logs.quiet_job()
        for module in ("timm.models.layers", "anomalib.models", "eagle.pipeline.stages.base"):
            warnings.warn_explicit(f"old API in {module}", FutureWarning, "x.py", 1, module=module)
    assert [str(w.message) for w in seen] == ["old API in eagle.pipeline.stages.base"]  # only eagle's own
    assert os.environ["PYTHONWARNINGS"] == "ignore::DeprecationWarning,ignore::FutureWarning"  # for the workers
    assert isinstance(sys.stderr, PlainText) and logs.ray_logging_level() == logging.WARNING


def test_a_quiet_job_keeps_ray_data_at_warning_whenever_ray_data_is_first_imported():
    """Ray Data configures its loggers on first import; the quiet levels hold even when that import comes after
    `quiet_ray_loggers` in the job's code (a fresh process: nothing imported Ray Data before)."""
    code = ("import logging, eagle.logs as logs; logs._quiet = True; logs.quiet_ray_loggers(); import ray.data; "
            "print(logging.getLogger('ray.data').getEffectiveLevel())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip().splitlines()[-1]) == logging.WARNING
