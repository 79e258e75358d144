"""The compacted ledger: one row per image with the keys of its latest result, so that deciding what to audit
costs O(this run's listing), never O(history).

    {output}/_ledger/ledger.pq        image_uri, run_id, image_version, status, error_stage,
                                      expert_model_version, mllm_model, config_hash, product, audited_at
    {output}/_ledger/state.json       which run attempts it holds

After a run writes, its rows are merged in (DuckDB, out of core); a run that crashed before merging is merged
at the start of the next run that finds it (`pending_runs`). A run's rows come from a `Results` store: Parquet
files found by their names (``{run_id}_a…``, see eagle.pipeline.writing; `ParquetResults`) or the Iceberg
audits table (eagle.io.iceberg), so a resume reads only its own run. Reading earlier output never deletes
it: only the *current* run's torn files may be removed (`run_files(..., drop_torn=True)`).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import duckdb
import pyarrow.parquet as pq

from eagle.io import storage
from eagle.io.querying import sql_list, sql_str
from eagle.io.runs import INTERNAL_SUFFIX, LEDGER_DIR, output_files, read_runs
from eagle.io.schema import OUTPUT_SCHEMA
from eagle.io.storage import StorageConfig

log = logging.getLogger(__name__)

LEDGER_COLUMNS = ("image_uri", "run_id", "image_version", "status", "error_stage", "expert_model_version",
                  "mllm_model", "config_hash", "product", "audited_at")
_SQL_TYPES = {"string": "VARCHAR", "bool": "BOOLEAN", "timestamp[us, tz=UTC]": "TIMESTAMPTZ", "float": "FLOAT",
              "int32": "INTEGER", "int64": "BIGINT", "binary": "BLOB"}


class Results(Protocol):
    """Where a job's result rows live (Parquet files or an Iceberg table), as DuckDB SQL over chosen runs."""

    output: str
    storage: StorageConfig | None

    def run_rows_sql(self, con: duckdb.DuckDBPyConnection, run_ids: Sequence[str], columns: Sequence[str],
                     drop_torn: bool = False) -> str: ...


@dataclass
class ParquetResults:
    """Result rows in Hive-partitioned Parquet under `output`; `files` is a listing taken once per plan (None:
    list when asked)."""

    output: str
    storage: StorageConfig | None = None
    files: list[str] | None = None

    def run_rows_sql(self, con: duckdb.DuckDBPyConnection, run_ids: Sequence[str], columns: Sequence[str],
                     drop_torn: bool = False) -> str:
        """SQL for the rows of `run_ids`; torn files of theirs are left out (deleted with `drop_torn`)."""
        files = self.files if self.files is not None else output_files(self.output, self.storage)
        return rows_sql([f for r in run_ids for f in run_files(self.output, r, self.storage, drop_torn, files)],
                        columns)


def empty_sql(columns: Sequence[str]) -> str:
    """SQL for no rows with these output columns, typed as in OUTPUT_SCHEMA."""
    cols = ", ".join(f"NULL::{_SQL_TYPES[str(OUTPUT_SCHEMA.field(c).type)]} AS {c}" for c in columns)
    return f"SELECT {cols} WHERE false"


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


def rows_sql(files: list[str], columns: Sequence[str]) -> str:
    """SQL for `columns` of result files, Hive partition values (product, audit_date) recovered from paths."""
    if not files:
        return empty_sql(columns)
    return (f"SELECT {', '.join(columns)} FROM read_parquet({sql_list(files)}, hive_partitioning = true, "
            f"union_by_name = true, hive_types_autocast = false)")


def ledger_sql(con: duckdb.DuckDBPyConnection, output: str, cfg: StorageConfig | None = None) -> str:
    """SQL for the ledger's rows (an empty relation before the first merge)."""
    uri = _ledger_uri(output)
    return f"SELECT * FROM read_parquet({sql_str(uri)})" if storage.exists(uri, cfg) else empty_sql(LEDGER_COLUMNS)


def read_state(output: str, cfg: StorageConfig | None = None) -> dict[str, Any]:
    """Which run attempts the ledger holds; none when the ledger file is missing (it is then rebuilt)."""
    uri = _state_uri(output)
    if not (storage.exists(uri, cfg) and storage.exists(_ledger_uri(output), cfg)):
        return {"runs": {}}
    return json.loads(storage.read_bytes(uri, cfg))


def pending_runs(output: str, cfg: StorageConfig | None = None) -> dict[str, int]:
    """Run ids (with their attempt count) whose latest attempt the ledger does not hold yet, oldest run first."""
    merged = read_state(output, cfg)["runs"]
    return {i.run_id: i.attempt for i in read_runs(output, cfg) if merged.get(i.run_id, 0) < i.attempt}


def merged_sql(con: duckdb.DuckDBPyConnection, results: Results, runs: dict[str, int]) -> str:
    """SQL for the ledger with the rows of `runs` merged in (latest row per image wins); reads only."""
    cols = ", ".join(LEDGER_COLUMNS)
    ledger = ledger_sql(con, results.output, results.storage)
    if not runs:
        return ledger
    return (f"SELECT {cols} FROM (SELECT {cols} FROM ({ledger}) "
            f"UNION ALL BY NAME SELECT {cols} FROM ({results.run_rows_sql(con, list(runs), LEDGER_COLUMNS)})) "
            f"QUALIFY row_number() OVER (PARTITION BY image_uri ORDER BY audited_at DESC, run_id DESC) = 1")


def merge_runs(con: duckdb.DuckDBPyConnection, results: Results, runs: dict[str, int]) -> None:
    """Merge the rows of `runs` into the ledger (latest row per image wins).
    The new ledger is written whole and then the state, so a crash in between only repeats the merge."""
    if not runs:
        return
    output, cfg = results.output, results.storage
    query = merged_sql(con, results, runs)
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

