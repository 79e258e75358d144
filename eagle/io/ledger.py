"""The compacted ledger: one row per image with the keys of its latest result, so that deciding what to audit
costs O(this run's listing), never O(history).

    {output}/_ledger/ledger.pq        image_uri, run_id, image_version, status, error_stage,
                                      expert_model_version, mllm_model, config_hash, product, audited_at
    {output}/_ledger/state.json       which run attempts it holds

After a run writes, its rows are merged in (DuckDB, out of core); a run that crashed before merging is merged
at the start of the next run that finds it (`pending_runs`). A run's rows come from the output's result store
(eagle.io.results), which reads only that run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow.parquet as pq

from eagle.io import storage
from eagle.io.querying import sql_str
from eagle.io.runs import INTERNAL_SUFFIX, LEDGER_DIR, read_runs
from eagle.io.schema import empty_sql
from eagle.io.storage import StorageConfig

if TYPE_CHECKING:
    from eagle.io.results import ResultStore

log = logging.getLogger(__name__)

LEDGER_COLUMNS = ("image_uri", "run_id", "image_version", "status", "error_stage", "expert_model_version",
                  "mllm_model", "config_hash", "product", "audited_at")


def _ledger_uri(output: str) -> str:
    return storage.join(output, LEDGER_DIR, f"ledger{INTERNAL_SUFFIX}")


def _state_uri(output: str) -> str:
    return storage.join(output, LEDGER_DIR, "state.json")


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


def merged_sql(con: duckdb.DuckDBPyConnection, store: ResultStore, runs: dict[str, int]) -> str:
    """SQL for the ledger with the rows of `runs` merged in (latest row per image wins); reads only."""
    cols = ", ".join(LEDGER_COLUMNS)
    ledger = ledger_sql(con, store.output, store.storage)
    if not runs:
        return ledger
    return (f"SELECT {cols} FROM (SELECT {cols} FROM ({ledger}) "
            f"UNION ALL BY NAME SELECT {cols} FROM ({store.run_rows_sql(con, list(runs), LEDGER_COLUMNS)})) "
            f"QUALIFY row_number() OVER (PARTITION BY image_uri ORDER BY audited_at DESC, run_id DESC) = 1")


def merge_runs(con: duckdb.DuckDBPyConnection, store: ResultStore, runs: dict[str, int]) -> None:
    """Merge the rows of `runs` into the ledger (latest row per image wins).
    The new ledger is written whole and then the state, so a crash in between only repeats the merge."""
    if not runs:
        return
    output, cfg = store.output, store.storage
    query = merged_sql(con, store, runs)
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

