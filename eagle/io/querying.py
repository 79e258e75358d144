"""DuckDB over listings, earlier output and the ledger: out-of-core joins whose memory stays bounded however
large the history grows (``memory_limit``, spilling to a local temp folder). ``s3://`` goes through the job's
s3fs filesystem registered with DuckDB (its httpfs extension cannot be installed offline)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import duckdb

from eagle.io import storage
from eagle.io.storage import StorageConfig


def connect(cfg: StorageConfig | None = None, memory_limit: str = "1GB", threads: int | None = None
            ) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection that reads local and s3:// paths and spills to disk past `memory_limit`."""
    con = duckdb.connect(config={"memory_limit": memory_limit,
                                 "temp_directory": os.path.join(tempfile.gettempdir(), "eagle-duckdb"),
                                 "threads": threads or max(1, min(4, os.cpu_count() or 1))})
    fs, _ = storage.filesystem("s3://placeholder", cfg)
    con.register_filesystem(fs)
    return con


def sql_str(value: str) -> str:
    """A SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def sql_list(values: Iterable[str]) -> str:
    """A DuckDB list literal of strings, e.g. for ``read_parquet([...])``."""
    return "[" + ", ".join(sql_str(v) for v in values) + "]"
