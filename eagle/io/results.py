"""Where an inspect run's result rows live: one store per output format, behind one interface (in the manner
of Ray's one datasink per format). `result_store(cfg)` is the only place that reads ``output.format``.

    ParquetStore   Hive-partitioned files under output.uri, ``{run_id}_a{attempt}_{write}_{flush}-{i}.parquet``:
                   a retried write task rewrites its own files; a crash mid-write leaves a torn file
    IcebergStore   the `audits` table, one snapshot per flush (a commit is atomic: nothing torn), and the
                   `latest` table upserted after each run (eagle.io.iceberg: the catalog and the tables)

Every store writes a run's rows (one flush of finished Ray blocks), reads them back as DuckDB SQL (resume, the
summary, the ledger), and merges finished runs into the compacted ledger (eagle.io.ledger). The kept-success
rule — a failure does not replace an earlier success of the same image in `latest` — holds for both: the
Parquet `latest` view applies it when read (eagle/io/sql/latest.sql), the Iceberg store when it upserts.
Reading loads no Ray: only the writes and the Iceberg upsert import it.
"""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from eagle.config import JobConfig
from eagle.config.sections import OutputConfig
from eagle.io import iceberg, ledger, maintenance, storage
from eagle.io.querying import sql_list
from eagle.io.runs import RunInfo, output_files
from eagle.io.schema import OUTPUT_SCHEMA, empty_sql
from eagle.io.storage import StorageConfig

log = logging.getLogger(__name__)


class ResultStore(ABC):
    """A job's result rows in one output format."""

    def __init__(self, out: OutputConfig, cfg: StorageConfig | None = None) -> None:
        self.out, self.storage = out, cfg

    @property
    def output(self) -> str:
        return self.out.uri

    @property
    def commit_rows(self) -> int | None:
        """Rows per stream chunk (whole todo files; the models are loaded again per chunk); None: one chunk."""
        return None

    def check_config(self) -> None:  # noqa: B027 - most formats have nothing to check
        """Raise ConfigError for a mistake in the output config that needs no storage request."""

    @abstractmethod
    def run_rows_sql(self, con: duckdb.DuckDBPyConnection, run_ids: Sequence[str], columns: Sequence[str],
                     drop_torn: bool = False) -> str:
        """SQL for `columns` of the rows of `run_ids`; with `drop_torn` (only the run being resumed), rows a crash
        left unreadable are deleted (their images are audited again)."""

    @abstractmethod
    def write(self, blocks: list[Any], run: RunInfo, flush_id: str, timeout: float | None = None,
              task_options: dict[str, Any] | None = None) -> bool:
        """Write one flush: `blocks` (object refs to Arrow tables of stamped rows) of run attempt `run`.
        `flush_id` names the flush within the attempt; `task_options` are Ray options for a write task. False
        when `timeout` seconds passed first (the write is then abandoned; the resume audits its rows again)."""

    @abstractmethod
    def kept_after_failure(self, run_id: str) -> str:
        """What of run `run_id` is kept after it stopped on a storage error (a phrase for the job's error)."""

    def merge(self, con: duckdb.DuckDBPyConnection, runs: dict[str, int]) -> None:
        """Fold finished run attempts (oldest first) into the compacted ledger, whose state is written last: a
        crash in between repeats the merge (idempotent) at the next start."""
        ledger.merge_runs(con, self, runs)

    @abstractmethod
    def maintain(self, report: maintenance.MaintenanceReport, small_bytes: int, target_bytes: int,
                 snapshot_max_age_s: float, orphan_min_age_s: float, check: Callable[[], None]) -> None:
        """Compact files under `small_bytes` (Parquet: into files of up to `target_bytes`), expire snapshots
        older than `snapshot_max_age_s` (Iceberg), remove orphan files older than `orphan_min_age_s` (Iceberg), all
        into `report`; `check` raises once the output's lease is lost."""


class ParquetStore(ResultStore):
    """Result rows as Hive-partitioned Parquet under ``output.uri``, partitioned by ``output.partition_by``.
    `files`: the output's listing taken once per plan (None: listed when asked)."""

    def __init__(self, out: OutputConfig, cfg: StorageConfig | None = None, files: list[str] | None = None) -> None:
        super().__init__(out, cfg)
        self.files = files

    def run_rows_sql(self, con: duckdb.DuckDBPyConnection, run_ids: Sequence[str], columns: Sequence[str],
                     drop_torn: bool = False) -> str:
        files = self.files if self.files is not None else output_files(self.output, self.storage)
        return rows_sql([f for r in run_ids for f in run_files(self.output, r, self.storage, drop_torn, files)],
                        columns)

    def write(self, blocks: list[Any], run: RunInfo, flush_id: str, timeout: float | None = None,
              task_options: dict[str, Any] | None = None) -> bool:
        """One Ray task writes the flush, one file per partition; a retried task rewrites its own files."""
        import ray

        task = ray.remote(_write_parquet).options(**(task_options or {}), max_retries=3)
        done = task.remote(self.out, self.storage, file_stem(run.run_id, run.attempt, flush_id), *blocks)
        if not ray.wait([done], timeout=timeout)[0]:
            return False
        ray.get(done)
        return True

    def kept_after_failure(self, run_id: str) -> str:
        try:
            return f"{len(run_files(self.output, run_id, self.storage))} result file(s) of this run were written " \
                   f"and are kept"
        except Exception:  # noqa: BLE001 - the store is failing: say what is known
            return "result files this run wrote before the failure are kept"

    def maintain(self, report: maintenance.MaintenanceReport, small_bytes: int, target_bytes: int,
                 snapshot_max_age_s: float, orphan_min_age_s: float, check: Callable[[], None]) -> None:
        before, after, rows = maintenance.compact_parquet(self.output, self.storage, small_bytes,
                                                          target_bytes, check)
        report.parquet_files, report.parquet_rows = (before, after), (rows, rows)
        report.orphans_removed += maintenance.remove_parquet_orphans(self.output, self.storage)


def file_stem(run_id: str, attempt: int, flush_id: str) -> str:
    """The name of a flush's files, up to ``-{i}.parquet``: stable across task retries; found by its run id."""
    return f"{run_id}_a{attempt:03d}_{flush_id}"


def _write_parquet(out: OutputConfig, cfg: StorageConfig | None, name: str, *tables: pa.Table) -> int:
    """One flush: the tables' rows as Hive-partitioned Parquet under ``out.uri``, one file per partition
    (``{name}-{i}.parquet``), as Ray Data's Parquet writer lays them out."""
    import pyarrow.dataset as pads

    parts = [t.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA) for t in tables if t.num_rows]
    if not parts:
        return 0
    table = pa.concat_tables(parts)
    fs, path = storage.pyarrow_filesystem(out.uri, cfg)
    pads.write_dataset(table, base_dir=path, filesystem=fs, format="parquet",
                       basename_template=f"{name}-{{i}}.parquet", partitioning=out.partition_by or None,
                       partitioning_flavor="hive", existing_data_behavior="overwrite_or_ignore", create_dir=True)
    return table.num_rows


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


class IcebergStore(ResultStore):
    """Result rows in the Iceberg `audits` table, and the newest per image in `latest` (eagle.io.iceberg).

    A run's own rows (resume, its summary, the ledger merge) come from a pyiceberg scan filtered on run_id,
    copied into a DuckDB temp table (out of core). Cost follows this run: the scan reads the manifests (one
    entry per data file, not per row) and opens only data files whose run_id bounds match, i.e. this run's,
    reading just the asked columns. A commit is atomic, so a run has no torn files to drop: a crashed attempt
    committed nothing and its images are redone."""

    @property
    def commit_rows(self) -> int | None:
        return self.out.commit_rows

    def check_config(self) -> None:
        if storage.is_remote(self.output):
            iceberg.catalog_properties(self.out, self.storage)  # no catalog for an s3:// warehouse: ConfigError

    def run_rows_sql(self, con: duckdb.DuckDBPyConnection, run_ids: Sequence[str], columns: Sequence[str],
                     drop_torn: bool = False) -> str:
        from pyiceberg.expressions import In

        audits = iceberg.table(self.out, iceberg.AUDITS, self.storage)
        if audits is None or audits.current_snapshot() is None or not run_ids:
            return empty_sql(columns)
        reader = audits.scan(row_filter=In("run_id", set(run_ids)), selected_fields=tuple(columns)
                             ).to_arrow_batch_reader()
        name = f"run_rows_{uuid.uuid4().hex[:8]}"
        con.register(f"{name}_scan", reader)
        con.execute(f"CREATE TEMP TABLE {name} AS SELECT * FROM {name}_scan")
        con.unregister(f"{name}_scan")
        return f"SELECT * FROM {name}"

    def write(self, blocks: list[Any], run: RunInfo, flush_id: str, timeout: float | None = None,
              task_options: dict[str, Any] | None = None) -> bool:
        """One ``write_iceberg`` (one snapshot) on the cluster. Ray Data's write cannot be bounded: with a
        `timeout` it runs in a thread that may lag behind, abandoned."""
        if timeout is None:
            self._append(blocks, run)
            return True
        failed: list[BaseException] = []

        def append() -> None:
            try:
                self._append(blocks, run)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                failed.append(exc)

        writer = threading.Thread(target=append, name="eagle-iceberg-write", daemon=True)
        writer.start()
        writer.join(timeout)
        if failed:
            raise failed[0]
        return not writer.is_alive()

    def _append(self, blocks: list[Any], run: RunInfo) -> None:
        import ray

        ds = ray.data.from_arrow_refs(blocks)
        ds.context.custom_execution_callback_classes = []  # the run's progress line is the pipeline's
        ds.context.enable_progress_bars = False
        iceberg.table(self.out, iceberg.AUDITS, self.storage, create=True)
        ds.write_iceberg(iceberg.identifier(self.out, iceberg.AUDITS), catalog_kwargs=self._catalog_kwargs(),
                         snapshot_properties={"eagle.run_id": run.run_id, "eagle.attempt": str(run.attempt)})

    def kept_after_failure(self, run_id: str) -> str:
        return "chunks this run committed before the failure are kept"

    def merge(self, con: duckdb.DuckDBPyConnection, runs: dict[str, int]) -> None:
        """Upsert each run into `latest`, then fold the runs into the ledger (see `ResultStore.merge`)."""
        for run_id in runs:
            self._upsert_latest(run_id)
        super().merge(con, runs)

    def _upsert_latest(self, run_id: str) -> None:
        """Upsert one run's rows from `audits` into `latest` by image_uri (Ray Data's copy-on-write upsert: the
        rows are read and written on the cluster; the driver holds only their image_uri keys), except failures of
        images that `latest` holds a success for. Idempotent, so a crash before the ledger records the run just
        repeats it."""
        import ray
        from ray.data import SaveMode
        from ray.data.expressions import col

        audits = iceberg.table(self.out, iceberg.AUDITS, self.storage)
        if audits is None or audits.current_snapshot() is None:
            return
        latest = iceberg.table(self.out, iceberg.LATEST, self.storage, create=True)
        mine = col("run_id") == run_id
        kept = self._successes_kept(run_id)
        rows = ray.data.read_iceberg(table_identifier=iceberg.identifier(self.out, iceberg.AUDITS),
                                     catalog_kwargs=self._catalog_kwargs()
                                     ).filter(expr=mine & col("image_uri").not_in(kept) if kept else mine)
        # Ray's upsert scans the table's current snapshot, which a new table does not have yet: append then
        first = latest.current_snapshot() is None
        rows.write_iceberg(iceberg.identifier(self.out, iceberg.LATEST), catalog_kwargs=self._catalog_kwargs(),
                           mode=SaveMode.APPEND if first else SaveMode.UPSERT,
                           upsert_kwargs=None if first else {"join_cols": ["image_uri"]},
                           snapshot_properties={"eagle.run_id": run_id})

    def _successes_kept(self, run_id: str) -> list[str]:
        """Images that failed in run `run_id` but have a success in `latest`, which keeps it. Costs this run's
        error rows (usually few): their URIs are held and looked up in `latest`."""
        from pyiceberg.expressions import And, EqualTo, In

        audits = iceberg.table(self.out, iceberg.AUDITS, self.storage)
        latest = iceberg.table(self.out, iceberg.LATEST, self.storage)
        if audits is None or latest is None or latest.current_snapshot() is None:
            return []
        failed = audits.scan(row_filter=And(EqualTo("run_id", run_id), EqualTo("status", "error")),
                             selected_fields=("image_uri",)).to_arrow().column("image_uri").to_pylist()
        if not failed:
            return []
        kept = latest.scan(row_filter=And(In("image_uri", set(failed)), EqualTo("status", "ok")),
                           selected_fields=("image_uri",)).to_arrow()
        return kept.column("image_uri").to_pylist()

    def _catalog_kwargs(self) -> dict[str, str]:
        return {"name": iceberg.CATALOG_NAME, **iceberg.catalog_properties(self.out, self.storage)}

    def maintain(self, report: maintenance.MaintenanceReport, small_bytes: int, target_bytes: int,
                 snapshot_max_age_s: float, orphan_min_age_s: float, check: Callable[[], None]) -> None:
        report.orphans_removed += maintenance.remove_parquet_orphans(self.output, self.storage)
        for name in (iceberg.AUDITS, iceberg.LATEST):
            report.iceberg_files[name] = maintenance.compact_iceberg(self.out, self.storage, name,
                                                                     small_bytes, check)
            cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=snapshot_max_age_s)  # after the compaction
            report.snapshots[name] = maintenance.expire_snapshots(self.out, self.storage, name, cutoff, check)
            report.orphans_removed += maintenance.remove_iceberg_orphans(
                self.out, self.storage, name, orphan_min_age_s, check)


def result_store(cfg: JobConfig, listed: bool = False) -> ResultStore:
    """The output's result store; `listed`: a Parquet output is listed once now instead of on each use."""
    if cfg.output.format == "iceberg":
        return IcebergStore(cfg.output, cfg.storage)
    return ParquetStore(cfg.output, cfg.storage, output_files(cfg.output.uri, cfg.storage) if listed else None)
