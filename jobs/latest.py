"""Write the latest verdict per image across all runs as one compacted Parquet file.

    python jobs/latest.py --output s3://plant-a/audit --to s3://plant-a/audit-latest/latest.parquet

The same logic as SQL for ad-hoc use: eagle/sql/latest.sql (DuckDB views `audit` and `latest`).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path, where jobs/inspect.py would shadow the standard
# library's `inspect` module for every later import: take the folder off the path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import logging  # noqa: E402

from eagle.latest import write_latest  # noqa: E402
from eagle.logs import setup_logging  # noqa: E402

log = logging.getLogger("eagle.latest")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs/latest.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, metavar="URI", help="Inspect output prefix.")
    p.add_argument("--to", required=True, metavar="URI", help="Target Parquet file (outside the output prefix).")
    args = p.parse_args(argv)
    setup_logging()
    if args.to.rstrip("/").startswith(args.output.rstrip("/") + "/"):
        log.error("--to must lie outside --output, or later runs would read it as audit rows")
        return 2
    n = write_latest(args.output, args.to)
    log.info("wrote %d rows (latest per image) to %s", n, args.to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
