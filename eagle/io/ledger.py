"""The compacted ledger: one row per image with the keys of its latest result, so that deciding what to audit
costs O(this run's listing), never O(history).

    {output}/_ledger/ledger.pq        image_uri, run_id, image_version, status, error_stage,
                                      expert_model_version, mllm_model, config_hash, product, audited_at
    {output}/_ledger/state.json       which run attempts it holds

After a run writes, its rows are merged in (DuckDB, out of core); a run that crashed before merging is merged
at the start of the next run that finds it (`refresh`). A run's own files are found by their names
(``{run_id}_a…``, see eagle.pipeline.writing), so a resume reads only its own run. Reading earlier output
never deletes it: only the *current* run's torn files may be removed (`run_files(..., drop_torn=True)`).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from typing import Any

import duckdb
import pyarrow.parquet as pq

from eagle.io import storage
from eagle.io.querying import sql_list, sql_str
from eagle.io.runs import INTERNAL_SUFFIX, LEDGER_DIR, output_files, read_runs
from eagle.io.storage import StorageConfig

log = logging.getLogger(__name__)

LEDGER_COLUMNS = ("image_uri", "run_id", "image_version", "status", "error_stage", "expert_model_version",
                  "mllm_model", "config_hash", "product", "audited_at")
_EMPTY = ("SELECT NULL::VARCHAR AS image_uri, NULL::VARCHAR AS run_id, NULL::VARCHAR AS image_version, "
          "NULL::VARCHAR AS status, NULL::VARCHAR AS error_stage, NULL::VARCHAR AS expert_model_version, "
          "NULL::VARCHAR AS mllm_model, NULL::VARCHAR AS config_hash, NULL::VARCHAR AS product, "
          "NULL::TIMESTAMPTZ AS audited_at WHERE false")


def _ledger_uri(output: str) -> str:
    return storage.join(output, LEDGER_DIR, f"ledger{INTERNAL_SUFFIX}")


def _state_uri(output: str) -> str:
    return storage.join(output, LEDGER_DIR, "state.json")


def run_files(output: str, run_id: str, cfg: StorageConfig | None = None, drop_torn: bool = False,
              files: list[str] | None = None) -> list[str]:
    """The readable result files of one run. A torn file (a crash mid-write) is left out with a warning;
    with `drop_torn` (only for the run being resumed, which then redoes its images) it is also deleted. A
    storage error raises OSError: nothing is deleted on a transient failure."""
    prefix = f"{run_id}_a"
    mine = [u for u in (output_files(output, cfg) if files is None else files)
            if posixpath.basename(u).startswith(prefix)]
    good = []
    for uri in mine:
        fs, path = storage.pyarrow_filesystem(uri, cfg)
        try:
            pq.read_metadata(path, filesystem=fs)
        except Exception as exc:  # noqa: BLE001 - sorted out below: torn file or storage failure
            if not _is_torn(exc):  # a storage failure (after retries): fail the plan, delete nothing
                raise OSError(f"cannot read output file {uri}: {exc}") from exc
            if drop_torn:
                log.warning("deleting torn output file %s of run %s (%s); its images are audited again",
                            uri, run_id, exc)
                storage.remove(uri, cfg)
            else:
                log.warning("skipping torn output file %s of run %s (%s)", uri, run_id, exc)
            continue
        good.append(uri)
    return good


def _is_torn(exc: Exception) -> bool:
    """A file that exists but is not valid Parquet (as opposed to a storage error, which is retried later)."""
    text = str(exc)
    return any(s in text for s in ("Parquet magic bytes not found", "Couldn't deserialize thrift",
                                   "Invalid Parquet", "file size", "is too small", "Parquet file size is 0"))


def rows_sql(files: list[str]) -> str:
    """SQL for the rows of result files, Hive partition values (product, audit_date) recovered from paths."""
    if not files:
        return _EMPTY
    return (f"SELECT * FROM read_parquet({sql_list(files)}, hive_partitioning = true, union_by_name = true, "
            f"hive_types_autocast = false)")


def ledger_sql(con: duckdb.DuckDBPyConnection, output: str, cfg: StorageConfig | None = None) -> str:
    """SQL for the ledger's rows (an empty relation before the first merge)."""
    uri = _ledger_uri(output)
    return f"SELECT * FROM read_parquet({sql_str(uri)})" if storage.exists(uri, cfg) else _EMPTY


def read_state(output: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """Which run attempts the ledger holds; none when the ledger file is missing (it is then rebuilt)."""
    uri = _state_uri(output)
    if not (storage.exists(uri, cfg) and storage.exists(_ledger_uri(output), cfg)):
        return {"runs": {}}
    return json.loads(storage.read_bytes(uri, cfg))


def pending_runs(output: str, cfg: StorageConfig | None = None) -> dict[str, int]:
    """Run ids (with their attempt count) whose latest attempt the ledger does not hold yet."""
    merged = read_state(output, cfg)["runs"]
    out = {}
    for info in read_runs(output, cfg):
        if merged.get(info.run_id, 0) < info.attempt:
            out[info.run_id] = info.attempt
    return out


def merge_runs(con: duckdb.DuckDBPyConnection, output: str, runs: dict[str, int],
               cfg: StorageConfig | None = None, files: list[str] | None = None) -> None:
    """Merge the rows of `runs` into the ledger (latest row per image wins).
    The new ledger is written whole and then the state, so a crash in between only repeats the merge."""
    if not runs:
        return
    files = output_files(output, cfg) if files is None else files
    run_rows = [f for r in runs for f in run_files(output, r, cfg, files=files)]
    cols = ", ".join(LEDGER_COLUMNS)
    query = (f"SELECT {cols} FROM (SELECT {cols} FROM ({ledger_sql(con, output, cfg)}) "
             f"UNION ALL BY NAME SELECT {cols} FROM ({rows_sql(run_rows)})) "
             f"QUALIFY row_number() OVER (PARTITION BY image_uri ORDER BY audited_at DESC, run_id DESC) = 1")
    with tempfile.TemporaryDirectory(prefix="eagle-ledger-") as tmp:
        local = os.path.join(tmp, f"ledger{INTERNAL_SUFFIX}")
        con.execute(f"COPY ({query}) TO {sql_str(local)} (FORMAT parquet, COMPRESSION zstd)")
        count = pq.read_metadata(local).num_rows
        fs, path = storage.filesystem(_ledger_uri(output), cfg)
        if not storage.is_remote(output):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fs.put_file(local, path)
    state = read_state(output, cfg)
    state["runs"].update(runs)
    storage.write_bytes(_state_uri(output), json.dumps(state, indent=1, sort_keys=True).encode(), cfg)
    log.info("ledger: merged %d run(s) %s, %d images", len(runs), sorted(runs), count)


def refresh(con: duckdb.DuckDBPyConnection, output: str, cfg: StorageConfig | None = None,
            files: list[str] | None = None) -> None:
    """Merge every run attempt the ledger does not hold yet (a run that crashed before its own merge)."""
    pending = pending_runs(output, cfg)
    if pending:
        merge_runs(con, output, pending, cfg, files)
