"""The write at the end of the inspect pipeline. Parquet: Hive-partitioned files with names that a retried
write task reproduces, so a retry overwrites its own file instead of adding rows. Iceberg: Ray Data's
`write_iceberg` appends to the `audits` table in one commit per run attempt (retried tasks' files are never
committed twice), then `update_latest` upserts the run's rows into `latest`."""

from __future__ import annotations

from typing import Any

from ray.data.datasource import FilenameProvider

from eagle.config import JobConfig
from eagle.io import iceberg, storage
from eagle.io.runs import RunInfo
from eagle.io.schema import OUTPUT_SCHEMA


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
