"""Output store mechanics: run manifests and attempts, retry-stable file names, the latest-per-image view
and the output schema. Planning over earlier output: tests/test_planning.py."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eagle.io import storage
from eagle.io.history import latest_table, write_latest
from eagle.io.runs import begin_run, end_run, read_runs
from eagle.io.schema import OUTPUT_SCHEMA, to_table
from eagle.pipeline.writing import RunFilenames


def _row(uri: str, run: str, status: str = "ok", version: str = "v1", expert: str = "e1", when: int = 0,
         verdict: str = "normal", product: str = "p", stage: str | None = None) -> dict:
    return {"image_uri": uri, "run_id": run, "status": status, "image_version": version, "error_stage": stage,
            "expert_model_version": expert, "mllm_model": "m", "config_hash": "h", "product": product,
            "verdict": verdict if status == "ok" else None,
            "audited_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=when)}


def _write(base: str, name: str, rows: list[dict], product: str = "p") -> str:
    uri = storage.join(base, f"product={product}", "audit_date=2026-01-01", name)
    table = to_table(rows).drop_columns(["product", "audit_date"])
    with storage.open_uri(uri, "wb") as fh:
        pq.write_table(table, fh)
    return uri


def test_run_manifest_attempts(tmp_path):
    out = str(tmp_path)
    first = begin_run(out, "r1", "h1")
    again = begin_run(out, "r1", "h1")
    assert (first.attempt, again.attempt) == (1, 2)
    assert again.audit_date == first.audit_date and again.started_at == first.started_at


def test_run_manifest_status_and_mode(tmp_path):
    out = str(tmp_path)
    end_run(out, "never-started", "interrupted")  # no manifest: nothing written
    assert not (tmp_path / "_runs").exists()
    assert begin_run(out, "r1", "h", mode="incremental").status == "running"
    end_run(out, "r1", "interrupted")
    assert [(r.run_id, r.mode, r.status) for r in read_runs(out)] == [("r1", "incremental", "interrupted")]
    begin_run(out, "r1", "h")  # the resume: running again, in the mode it runs now
    end_run(out, "r1", "completed")
    (r1,) = read_runs(out)
    assert (r1.attempt, r1.mode, r1.status) == (2, "full", "completed")
    with pytest.raises(ValueError, match="unknown run status"):
        end_run(out, "r1", "done")


def test_filenames_stable_per_task_and_distinct_per_attempt():
    a1, a2 = RunFilenames("r1", 1), RunFilenames("r1", 2)
    assert a1.get_filename_for_task("uuid", 3) == a1.get_filename_for_task("uuid", 3)  # a retried task
    assert a1.get_filename_for_task("uuid", 3) != a1.get_filename_for_task("uuid", 4)
    assert a1.get_filename_for_task("u", 3) != a2.get_filename_for_task("u", 3)
    assert "." not in a1.get_filename_for_task("uuid", 3)


def test_latest_prefers_newest_success(tmp_path):
    out = str(tmp_path / "audit")
    _write(out, "r1.parquet", [_row("a", "r1", when=0, verdict="normal"), _row("b", "r1", when=0)])
    _write(out, "r2.parquet", [_row("a", "r2", when=5, verdict="anomalous"), _row("b", "r2", status="error", when=5),
                               _row("c", "r2", status="error", when=5)])
    table = latest_table(out)
    by_uri = {r["image_uri"]: r for r in table.to_pylist()}
    assert set(by_uri) == {"a", "b", "c"}
    assert by_uri["a"]["run_id"] == "r2" and by_uri["a"]["verdict"] == "anomalous"
    assert by_uri["b"]["run_id"] == "r1" and by_uri["b"]["status"] == "ok"  # a later failure does not hide it
    assert by_uri["c"]["status"] == "error"
    target = str(tmp_path / "latest" / "latest.parquet")
    assert write_latest(out, target) == 3
    assert pq.read_table(target).num_rows == 3


def test_schema_table_round_trip():
    table = to_table([{"image_uri": "x", "boxes": [{"x1": 1, "y1": 2, "x2": 3, "y2": 4, "score": 0.5}]}])
    assert table.schema == OUTPUT_SCHEMA
    assert table.column("boxes").to_pylist()[0][0]["x2"] == 3
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        to_table([{"width": "not a number"}])
