"""The write at the end of the inspect pipeline. Parquet: Hive-partitioned files with names that a retried
write task reproduces, so a retry overwrites its own file instead of adding rows. Iceberg: Ray Data's
`write_iceberg` appends to the `audits` table in one commit per flush (retried tasks' files are never
committed twice), then `update_latest` upserts the run's rows into `latest`.

`write_streaming` bounds what a crash loses: finished rows (blocks out of the last stage) reach storage at least
every ``output.flush_interval_s`` and every ``output.min_rows_per_file`` rows, and on a stop request (SIGTERM,
SIGINT) the rows already finished are written within ``output.stop_grace_s`` while no new ones are awaited."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from ray.data.datasource import FilenameProvider

from eagle.config import JobConfig
from eagle.io import iceberg, storage
from eagle.io.runs import RunInfo
from eagle.io.schema import OUTPUT_SCHEMA
from eagle.pipeline.ray_setup import before_shutdown, ray_options

log = logging.getLogger(__name__)


class RunFilenames(FilenameProvider):
    """``{run_id}_{attempt}_{write_uuid}_{task_index}-{i}.parquet``: stable across task retries."""

    def __init__(self, run_id: str, attempt: int) -> None:
        super().__init__(file_format="parquet")
        self.run_id, self.attempt = run_id, attempt

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"{self.run_id}_a{self.attempt:03d}_{write_uuid}_{task_index:06d}"


def write_output(ds: Any, cfg: JobConfig, run: RunInfo) -> None:
    """Write the stamped rows of this run attempt: under ``output.uri`` partitioned by ``output.partition_by``,
    or appended to the Iceberg `audits` table (created on first use)."""
    if cfg.output.format == "iceberg":
        iceberg.table(cfg.output, iceberg.AUDITS, cfg.storage, create=True)
        ds.write_iceberg(iceberg.identifier(cfg.output, iceberg.AUDITS), catalog_kwargs=_catalog_kwargs(cfg),
                         snapshot_properties={"eagle.run_id": run.run_id, "eagle.attempt": str(run.attempt)})
        return
    fs, path = storage.pyarrow_filesystem(cfg.output.uri, cfg.storage)
    ds.write_parquet(path, filesystem=fs, partition_cols=cfg.output.partition_by,
                     filename_provider=RunFilenames(run.run_id, run.attempt), schema=OUTPUT_SCHEMA,
                     min_rows_per_file=cfg.output.min_rows_per_file)


class Flusher:
    """Finished blocks of a run attempt waiting to be written (object refs only: the rows stay in Ray's object
    store), and when they are due: ``output.min_rows_per_file`` rows, or ``output.flush_interval_s`` since the
    oldest of them finished. Parquet: one Ray task per flush writes one file per partition, named by
    `RunFilenames` (a retried task rewrites its own files). Iceberg: one ``write_iceberg`` (one snapshot)."""

    def __init__(self, cfg: JobConfig, run: RunInfo, before_write: Callable[[], None] = lambda: None) -> None:
        self.cfg, self.run, self.before_write = cfg, run, before_write
        self.refs: list[Any] = []
        self.rows = 0
        self.oldest: float | None = None  # when the oldest waiting block arrived (time.monotonic)
        self.written = 0  # rows written so far
        self.flushes = 0
        self.write_id = uuid.uuid4().hex[:12]  # this stream's writes; with the flush number, a file's name

    def add(self, bundle: Any) -> None:
        """Take the blocks of one RefBundle out of the pipeline's last stage."""
        self.refs.extend(bundle.block_refs)
        self.rows += bundle.num_rows() or 0
        if self.refs and self.oldest is None:
            self.oldest = time.monotonic()

    def seconds_left(self) -> float:
        """Seconds until the waiting rows are due by time (inf when none wait)."""
        if self.oldest is None:
            return float("inf")
        return max(0.0, self.oldest + self.cfg.output.flush_interval_s - time.monotonic())

    def due(self) -> bool:
        return bool(self.refs) and (self.rows >= self.cfg.output.min_rows_per_file or self.seconds_left() <= 0)

    def flush(self, timeout: float | None = None) -> bool:
        """Write the waiting blocks; False when `timeout` seconds passed first (the write is then abandoned:
        a torn file is deleted and its images audited again by the resume)."""
        if not self.refs:
            return True
        import ray

        self.before_write()  # e.g. the output's lease still ours: raises otherwise, and nothing is written
        refs, rows = self.refs, self.rows
        self.refs, self.rows, self.oldest = [], 0, None
        start = time.monotonic()
        if self.cfg.output.format == "iceberg":
            ds = ray.data.from_arrow_refs(refs)
            ds.context.custom_execution_callback_classes = []  # the run's progress line is the pipeline's
            ds.context.enable_progress_bars = False
            write_output(ds, self.cfg, self.run)  # no timeout: Ray Data commits once, at the end
        else:
            name = RunFilenames(self.run.run_id, self.run.attempt).get_filename_for_task(self.write_id,
                                                                                        self.flushes)
            task = ray.remote(_write_parquet).options(**ray_options(self.cfg.resources.decode, actor=False),
                                                      max_retries=3)
            done = task.remote(self.cfg, name, *refs)
            if not ray.wait([done], timeout=timeout)[0]:
                return False
            ray.get(done)
        self.written += rows
        self.flushes += 1
        log.debug("wrote %d finished rows in %.1f s (%d so far)", rows, time.monotonic() - start, self.written)
        return True


def _write_parquet(cfg: JobConfig, name: str, *tables: pa.Table) -> int:
    """One flush: the tables' rows as Hive-partitioned Parquet under ``output.uri``, one file per partition
    (``{name}-{i}.parquet``), as Ray Data's Parquet writer lays them out."""
    import pyarrow.dataset as pads

    parts = [t.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA) for t in tables if t.num_rows]
    if not parts:
        return 0
    table = pa.concat_tables(parts)
    fs, path = storage.pyarrow_filesystem(cfg.output.uri, cfg.storage)
    pads.write_dataset(table, base_dir=path, filesystem=fs, format="parquet",
                       basename_template=f"{name}-{{i}}.parquet", partitioning=cfg.output.partition_by or None,
                       partitioning_flavor="hive", existing_data_behavior="overwrite_or_ignore", create_dir=True)
    return table.num_rows


_END = object()


def write_streaming(ds: Any, cfg: JobConfig, run: RunInfo, stop: threading.Event | None = None,
                    before_write: Callable[[], None] = lambda: None) -> bool:
    """Stream `ds` (the stamped rows) to storage as `Flusher` says, calling `before_write` before each write;
    returns False when `stop` was set: then the rows already finished were written within
    ``output.stop_grace_s`` (what did not make it is audited again by the resume) and no more are awaited. A
    pipeline error is raised here."""
    results: queue.Queue = queue.Queue()
    # what ds.iter_internal_ref_bundles() does, keeping the executor: a stop shuts it down before Ray stops
    executor = ds._create_executor()

    def pull() -> None:  # Ray Data's iterator blocks; the flush clock and the stop request must not wait on it
        try:
            for bundle in ds._build_bundle_iterator(executor):
                results.put(bundle)
            results.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread, raised there
            results.put(exc)

    puller = threading.Thread(target=pull, name="eagle-results", daemon=True)
    puller.start()

    def stop_pipeline() -> None:  # its thread reports to Ray's stats actor as it ends: before Ray stops
        executor.shutdown(force=True)
        puller.join(timeout=5)

    flusher = Flusher(cfg, run, before_write)
    try:
        while True:
            if stop is not None and stop.is_set():
                executor._callbacks = []  # no progress line after the stop: the resume command is the last line
                _flush_on_stop(flusher, results, cfg.output.stop_grace_s)
                break
            try:
                item = results.get(timeout=min(0.25, flusher.seconds_left()))
            except queue.Empty:
                item = None
            if item is _END:
                flusher.flush()
                return True
            if isinstance(item, BaseException):
                raise item
            if item is not None:
                flusher.add(item)
            if flusher.due():
                flusher.flush()
    except BaseException:
        before_shutdown(stop_pipeline)
        raise
    # no new work: the pipeline stops before Ray does (`shutdown_ray`), once the run is marked interrupted
    before_shutdown(stop_pipeline)
    return False


def _flush_on_stop(flusher: Flusher, results: queue.Queue, grace_s: float) -> None:
    """Write the rows already finished (waiting, or queued by the pipeline) within `grace_s` seconds."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            item = results.get_nowait()
        except queue.Empty:
            break
        if item is not _END and not isinstance(item, BaseException):
            flusher.add(item)
    if not flusher.refs:
        return
    rows = flusher.rows
    try:
        if flusher.cfg.output.format == "iceberg":  # Ray Data's write cannot be bounded: a thread that may lag
            writer = threading.Thread(target=flusher.flush, name="eagle-last-flush", daemon=True)
            writer.start()
            writer.join(max(0.0, deadline - time.monotonic()))
            written = not writer.is_alive()
        else:
            written = flusher.flush(timeout=max(0.0, deadline - time.monotonic()))
    except Exception as exc:  # noqa: BLE001 - stopping anyway: the resume redoes them
        log.warning("stopping: writing %d finished rows failed (%s); the resume audits them again", rows, exc)
        return
    if written:
        log.info("stopping: wrote the %d rows already finished", rows)
    else:
        log.warning("stopping: %d finished rows were not written within output.stop_grace_s=%g s; the resume "
                    "audits them again", rows, grace_s)


def update_latest(cfg: JobConfig, run_id: str) -> None:
    """Upsert one run's rows from `audits` into `latest` by image_uri (Ray Data's copy-on-write upsert: the
    rows are read and written on the cluster; the driver holds only their image_uri keys), except failures of
    images that `latest` holds a success for. Idempotent, so a crash before the ledger records the run just
    repeats it."""
    import ray
    from ray.data import SaveMode
    from ray.data.expressions import col

    audits = iceberg.table(cfg.output, iceberg.AUDITS, cfg.storage)
    if audits is None or audits.current_snapshot() is None:
        return
    latest = iceberg.table(cfg.output, iceberg.LATEST, cfg.storage, create=True)
    mine = col("run_id") == run_id
    kept = iceberg.successes_kept(cfg.output, run_id, cfg.storage)
    rows = ray.data.read_iceberg(table_identifier=iceberg.identifier(cfg.output, iceberg.AUDITS),
                                 catalog_kwargs=_catalog_kwargs(cfg)
                                 ).filter(expr=mine & col("image_uri").not_in(kept) if kept else mine)
    # Ray's upsert scans the table's current snapshot, which a new table does not have yet: append then
    first = latest.current_snapshot() is None
    rows.write_iceberg(iceberg.identifier(cfg.output, iceberg.LATEST), catalog_kwargs=_catalog_kwargs(cfg),
                       mode=SaveMode.APPEND if first else SaveMode.UPSERT,
                       upsert_kwargs=None if first else {"join_cols": ["image_uri"]},
                       snapshot_properties={"eagle.run_id": run_id})


def _catalog_kwargs(cfg: JobConfig) -> dict[str, str]:
    return {"name": iceberg.CATALOG_NAME, **iceberg.catalog_properties(cfg.output, cfg.storage)}
