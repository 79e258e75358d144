"""Write the latest verdict per image across all runs as one compacted Parquet file.

    python jobs/latest.py --output s3://plant-a/audit --to s3://plant-a/audit-latest/latest.parquet

The same logic as SQL for ad-hoc use: eagle/io/sql/latest.sql (DuckDB views `audit` and `latest`).
"""

from __future__ import annotations

import argparse
import logging

from eagle.cli.exit_codes import OK, USAGE, help_text
from eagle.io.latest_view import write_latest
from eagle.logs import quiet_job, setup_logging

log = logging.getLogger("eagle.io.latest_view")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs/latest.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__ + "\n" + help_text("latest"))
    p.add_argument("--output", required=True, metavar="URI", help="Inspect output prefix.")
    p.add_argument("--to", required=True, metavar="URI", help="Target Parquet file (outside the output prefix).")
    args = p.parse_args(argv)
    quiet_job()
    setup_logging()
    if args.to.rstrip("/").startswith(args.output.rstrip("/") + "/"):
        log.error("--to must lie outside --output, or later runs would read it as audit rows")
        return USAGE
    n = write_latest(args.output, args.to)
    log.info("wrote %d rows (latest per image) to %s", n, args.to)
    return OK

