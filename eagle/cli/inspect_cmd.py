"""Audit images: expert + (guided) MLLM over local or s3:// inputs, results as Hive-partitioned Parquet.

    python jobs/inspect.py --input s3://bucket/images --model-store s3://bucket/models --output s3://bucket/audit
    ray job submit --working-dir . -- python jobs/inspect.py --config audit.yaml [section.key=value ...]
    python jobs/inspect.py            # no arguments: the embedded offline demo (synthetic data, tiny MLLM)

Exit codes: 0 success (individual bad images are error rows, not failures), 2 bad config or arguments,
3 job-level failure (storage unreachable, error rate above output.max_error_rate).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from eagle.config import ConfigError, deep_merge, load_config, parse_overrides
from eagle.logs import setup_logging

log = logging.getLogger("eagle.inspect")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/inspect.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--input", action="append", default=[], metavar="URI",
                   help="Image prefix (local or s3://, recursive), a manifest (.parquet/.csv with a 'uri' "
                        "column) or an S3 Inventory report's manifest.json. Repeatable.")
    p.add_argument("--model-store", metavar="URI", help="Prefix of fitted expert artifacts (jobs/fit.py).")
    p.add_argument("--output", metavar="URI", help="Output prefix for Parquet results.")
    p.add_argument("--mllm", metavar="none|HUB_ID|PATH", help="MLLM to use; 'none' = expert only.")
    p.add_argument("--route", choices=["all", "uncertain", "not-confident-normal"], help="Routing policy.")
    p.add_argument("--run-id", help="Run id; re-using one resumes that run (only missing images are audited).")
    p.add_argument("--mode", choices=["full", "incremental"], help="full: audit everything listed.")
    p.add_argument("--config", metavar="FILE", help="YAML job config (local or s3://).")
    p.add_argument("--dry-run", action="store_true",
                   help="List and plan only: print per product how many images are listed, already done and "
                        "to audit, then exit (nothing is written).")
    p.add_argument("--demo-dir", default="demo", help="Where the no-argument demo writes (default ./demo).")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="Config overrides.")
    return p.parse_intermixed_args(argv)  # overrides may stand before, between or after flags


def _flag_overrides(args: argparse.Namespace) -> dict:
    out: dict = {}
    manifests = [u for u in args.input if u.lower().endswith((".parquet", ".csv", "manifest.json"))]
    inputs = [u for u in args.input if u not in manifests]
    if len(manifests) > 1:
        raise ConfigError("only one manifest may be given")
    if inputs or manifests:
        out["inputs"] = {**({"uris": inputs} if inputs else {}), **({"manifest": manifests[0]} if manifests else {})}
    if args.model_store:
        out["model_store"] = args.model_store
    if args.output:
        out["output"] = {"uri": args.output}
    if args.mllm:
        out["mllm"] = {"model": args.mllm}
    if args.route:
        out["routing"] = {"policy": args.route}
    if args.run_id:
        out["run_id"] = args.run_id
    if args.mode:
        out["mode"] = args.mode
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    setup_logging()
    args = parse_args(argv)
    if not argv or argv == ["--demo-dir", args.demo_dir]:
        from eagle.testing.demo import run_demo

        return run_demo(args.demo_dir)
    from eagle.pipeline.inspection import JobFailed, run_inspect
    from eagle.pipeline.ray_setup import init_ray

    try:
        overrides = deep_merge(_flag_overrides(args), parse_overrides(args.overrides))
        cfg = load_config(args.config, overrides=overrides)
        init_ray(cfg)
        result = run_inspect(cfg, dry_run=args.dry_run)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except JobFailed as exc:
        log.error("job failed: %s", exc)
        return 3
    if args.dry_run:
        print(f"dry run ({cfg.mode}{', run ' + cfg.run_id if cfg.run_id else ''}): nothing was audited or written")
        print("\n".join(result.lines()))
        return 0
    for line in result.lines():
        log.info("%s", line)
    return 0

