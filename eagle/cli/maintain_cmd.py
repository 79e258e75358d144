"""Maintain an inspect output: compact small files (Parquet results; Iceberg `audits` and `latest`), expire old
Iceberg snapshots, remove orphan files. Under the output's lease: it waits for a driver that holds the output
(output.lease_wait_s), then gives up with exit 4 and changes nothing.

    python jobs/maintain.py --config audit.yaml
    python jobs/maintain.py --output s3://plant-a/audit --snapshot-max-age-hours 168

Killed at any point it loses and doubles no row: the next maintenance run or driver finishes or rolls back what
it left (eagle/io/maintenance.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from eagle.cli.effective_config import add_print_config, print_config
from eagle.cli.exit_codes import BUSY, JOB_FAILED, OK, SIGINT, failed, help_text
from eagle.config import ConfigError, JobConfig, load_config, parse_overrides
from eagle.io import maintenance, storage
from eagle.io.lease import LeaseHeld, LeaseLost, OutputLease
from eagle.io.results import result_store
from eagle.logs import quiet_job, setup_logging

log = logging.getLogger("eagle.io.maintenance")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/maintain.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__ + "\n" + help_text("maintain"))
    p.add_argument("--config", help="The audit's YAML config (output, storage, catalog).")
    p.add_argument("--output", metavar="URI", help="Output prefix (overrides output.uri).")
    p.add_argument("--small-file-mb", type=float, default=32,
                   help="Files smaller than this are compacted (default 32).")
    p.add_argument("--target-file-mb", type=float, default=256,
                   help="Parquet: a compacted file holds at most this much (default 256).")
    p.add_argument("--snapshot-max-age-hours", type=float, default=168,
                   help="Iceberg: expire snapshots older than this (default 168, a week; the current one is kept).")
    p.add_argument("--orphan-min-age-hours", type=float, default=24,
                   help="Iceberg: remove unreferenced files only once older than this (default 24).")
    p.add_argument("--summary-json", metavar="URI", help="Also write the report as JSON here.")
    add_print_config(p)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Config overrides, e.g. output.format=iceberg.")
    return p.parse_args(argv)


def maintain(cfg: JobConfig, args: argparse.Namespace) -> maintenance.MaintenanceReport:
    """Every maintenance step, holding the output's lease (LeaseHeld when a driver keeps it)."""
    out, store = cfg.output, cfg.storage
    report = maintenance.MaintenanceReport()
    small = int(args.small_file_mb * (1 << 20))
    with OutputLease(out.uri, "maintenance", out.lease_ttl_s, store, wait_s=out.lease_wait_s) as lease:
        report.finished_interrupted = maintenance.finish_compactions(out.uri, store)
        result_store(cfg).maintain(report, small, int(args.target_file_mb * (1 << 20)),
                                   args.snapshot_max_age_hours * 3600,
                                   args.orphan_min_age_hours * 3600, lease.check)
        lease.check()
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_job()
    setup_logging()
    try:
        overrides = parse_overrides(args.overrides)
        if args.output:
            overrides.setdefault("output", {})["uri"] = args.output
        cfg = load_config(args.config, overrides=overrides)
        if args.print_config:
            return print_config(cfg)
        if not cfg.output.uri:
            raise ConfigError("no output: pass --output PREFIX or set output.uri in the config")
        if not storage.exists(cfg.output.uri, cfg.storage):
            raise ConfigError(f"output {cfg.output.uri} does not exist: check --output (a typo?)")
    except ConfigError as exc:
        return failed(exc, log)
    except Exception as exc:  # noqa: BLE001 - the output store is unreachable
        log.error("job failed: %s", exc)
        return JOB_FAILED
    try:
        report = maintain(cfg, args)
    except LeaseHeld as exc:
        log.error("%s", exc)
        log.error("maintenance changed nothing: the output is busy; run it again once that driver has finished")
        return BUSY
    except LeaseLost as exc:
        log.error("maintenance stopped: %s", exc)
        return JOB_FAILED
    except KeyboardInterrupt:
        log.warning("maintenance interrupted; the next run finishes what it left")
        return SIGINT
    except Exception as exc:  # noqa: BLE001 - storage or catalog failure: nothing is lost (see the module)
        log.error("job failed: %s: %s", type(exc).__name__, exc)
        return JOB_FAILED
    print("\n".join(report.lines()), flush=True)
    if args.summary_json:
        storage.write_bytes(args.summary_json, json.dumps(report.__dict__, indent=2).encode(), cfg.storage)
    return OK
