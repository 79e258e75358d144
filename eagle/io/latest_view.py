"""The `latest` view of a Parquet output: each image's newest result, a success kept over later failures (the
rule eagle.io.results.IcebergStore applies to its `latest` table), as SQL (eagle/io/sql/latest.sql) and as one
compacted Parquet file (`jobs/latest.py`)."""

from __future__ import annotations

from importlib import resources

import duckdb
import pyarrow as pa

from eagle.io import storage
from eagle.io.runs import output_files
from eagle.io.storage import StorageConfig


def latest_sql(output_uri: str) -> str:
    """The view definitions of eagle/io/sql/latest.sql for one output prefix."""
    text = resources.files("eagle.io").joinpath("sql", "latest.sql").read_text()
    return text.replace("${OUTPUT}", output_uri.rstrip("/"))


def latest_table(output_uri: str, cfg: StorageConfig | None = None) -> pa.Table:
    """Run the `latest` view over the output (s3:// through an fsspec filesystem registered with DuckDB)."""
    con = duckdb.connect()
    if not output_files(output_uri, cfg):
        raise FileNotFoundError(f"no Parquet output under {output_uri}")
    if storage.is_remote(output_uri):
        fs, _ = storage.filesystem(output_uri, cfg)
        fs.invalidate_cache()
        con.register_filesystem(fs)
    con.execute(latest_sql(output_uri))
    return con.sql("SELECT * FROM latest ORDER BY product, image_uri").to_arrow_table()


def write_latest(output_uri: str, target_uri: str, cfg: StorageConfig | None = None) -> int:
    """Write the compacted latest table to `target_uri` (one Parquet file); returns its row count."""
    import pyarrow.parquet as pq

    table = latest_table(output_uri, cfg)
    with storage.open_uri(target_uri, "wb", cfg) as fh:
        pq.write_table(table, fh)
    return table.num_rows
