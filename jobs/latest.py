"""Write the latest verdict per image across all runs as one compacted Parquet file.

    python jobs/latest.py --output s3://plant-a/audit --to s3://plant-a/audit-latest/latest.parquet

The same logic as SQL for ad-hoc use: eagle/io/sql/latest.sql (DuckDB views `audit` and `latest`).
"""

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where jobs/inspect.py would shadow the standard
# library's `inspect` module for every later import: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from eagle.cli.latest_cmd import main

if __name__ == "__main__":
    sys.exit(main())
