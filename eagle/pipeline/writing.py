"""The write at the end of the inspect pipeline: Hive-partitioned Parquet with file names that a retried
write task reproduces, so a retry overwrites its own file instead of adding rows."""

from __future__ import annotations

from typing import Any

from ray.data.datasource import FilenameProvider

from eagle.config import JobConfig
from eagle.io import storage
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
    """Write the stamped rows of this run attempt under ``output.uri``, partitioned by ``output.partition_by``."""
    fs, path = storage.pyarrow_filesystem(cfg.output.uri, cfg.storage)
    ds.write_parquet(path, filesystem=fs, partition_cols=cfg.output.partition_by,
                     filename_provider=RunFilenames(run.run_id, run.attempt), schema=OUTPUT_SCHEMA,
                     min_rows_per_file=cfg.output.min_rows_per_file)
