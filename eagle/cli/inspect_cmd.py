"""Audit images: expert + (guided) MLLM over local or s3:// inputs, results as Hive-partitioned Parquet.

    python jobs/inspect.py --input s3://bucket/images --model-store s3://bucket/models --output s3://bucket/audit
    ray job submit --working-dir . -- python jobs/inspect.py --config audit.yaml [section.key=value ...]
    python jobs/inspect.py            # no arguments: the embedded offline demo (synthetic data, tiny MLLM)

Before Ray starts, the job checks its inputs (each prefix exists and holds images; a manifest has a 'uri'
column), output, model store (an expert of the configured model for at least one listed product), credentials
for s3://, an Iceberg catalog for s3:// output, and MLLM (a local folder, an s3:// prefix, or a hub id in the
local cache; a model over 4 GiB needs a GPU unless --force-cpu-mllm). The summary goes to stdout (and as JSON
to --summary-json); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import TYPE_CHECKING

from eagle.cli.effective_config import add_print_config, print_config
from eagle.cli.exit_codes import OK, SIGTERM, failed, help_text
from eagle.cli.interrupts import catch_signals
from eagle.cli.preflight import StorageUnreachable, check_inspect
from eagle.config import ConfigError, JobConfig, deep_merge, load_config, parse_overrides
from eagle.io import storage
from eagle.io.runs import mllm_family, new_run_id, run_settings
from eagle.logs import quiet_job, setup_logging
from eagle.testing.tiny_mllm import FAMILIES as TINY_FAMILIES

if TYPE_CHECKING:
    from eagle.pipeline.inspection import Summary

log = logging.getLogger("eagle.inspect")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/inspect.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__ + "\n" + help_text("inspect"))
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
    add_print_config(p)
    p.add_argument("--allow-empty", action="store_true",
                   help="An input without images is a normal, empty run (config: inputs.allow_empty); without "
                        "it, exit 2.")
    p.add_argument("--force-cpu-mllm", action="store_true",
                   help="Run an MLLM over 4 GiB on CPU (resources.mllm.num_gpus=0) instead of refusing.")
    p.add_argument("--summary-json", metavar="PATH", help="Also write the run's summary as JSON (local or s3://).")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own detail: progress bars, library warnings, colours.")
    p.add_argument("--demo-dir", default="demo", help="Where the no-argument demo writes (default ./demo).")
    p.add_argument("--demo-mllm", default="qwen2_5_vl", choices=TINY_FAMILIES,
                   help="Which tiny random MLLM family the demo builds and uses (default qwen2_5_vl).")
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
    if args.allow_empty:
        out.setdefault("inputs", {})["allow_empty"] = True
    return out


def resume_command(argv: list[str], run_id: str) -> str:
    """The command line that resumes `run_id`: this one with ``--run-id`` set to it."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--run-id="):
            skip = False
            continue
        if arg == "--run-id":
            skip = True
            continue
        kept.append(arg)
    script = os.path.join("jobs", "inspect.py") if not sys.argv[0].endswith(".py") else sys.argv[0]
    return shlex.join([sys.executable, script, *kept, "--run-id", run_id])


def summary_doc(cfg: JobConfig, final_status: str, summary: Summary | None = None, error: str | None = None
                ) -> dict:
    """What ``--summary-json`` holds: the run's summary (`Summary.as_dict`, its ``status`` being the rows per
    status) with the mode, how the run ended (``final_status``: completed, failed or interrupted, and the
    ``error``), the models (expert and MLLM, routing and guidance) and the config hash."""
    from eagle.config import config_hash

    settings = run_settings(cfg)
    doc = summary.as_dict() if summary is not None else {"run_id": cfg.run_id, "output": cfg.output.uri}
    doc.setdefault("status", {})
    return {**doc, "mode": cfg.mode, "final_status": final_status, **({"error": error} if error else {}),
            "counts_by_status": dict(sorted(doc["status"].items())), "config_hash": config_hash(cfg),
            "models": {"expert": {"model": cfg.expert.model, "ensemble": list(cfg.expert.ensemble.models),
                                  "model_store": cfg.model_store},
                       "mllm": {"model": cfg.mllm.model, "family": mllm_family(cfg.mllm.model),
                                "routing": cfg.routing.policy, "guidance": settings["guidance"]}}}


def _write_summary(args: argparse.Namespace, cfg: JobConfig, doc: dict) -> None:
    if not args.summary_json:
        return
    try:
        storage.write_bytes(args.summary_json, json.dumps(doc, indent=2).encode(), cfg.storage)
    except Exception as exc:  # noqa: BLE001 - a failed run's summary must not hide why it failed
        if doc["final_status"] == "completed":
            raise
        log.error("could not write --summary-json %s: %s", args.summary_json, exc)


def _report(summary: Summary, args: argparse.Namespace, cfg: JobConfig) -> None:
    """The summary on stdout (for schedulers and people), and as JSON when asked."""
    print("\n".join(summary.lines()), flush=True)
    _write_summary(args, cfg, summary_doc(cfg, "completed", summary))


def _demo_only(argv: list[str], args: argparse.Namespace) -> bool:
    """No arguments but the demo's own options (--demo-dir, --demo-mllm, each followed by its value)."""
    given = {"--demo-dir": args.demo_dir, "--demo-mllm": args.demo_mllm}
    return sorted(argv) == sorted(x for flag, value in given.items() if flag in argv for x in (flag, value))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    quiet_job(args.verbose)
    setup_logging()
    if _demo_only(argv, args):
        from eagle.testing.demo import run_demo

        return run_demo(args.demo_dir, args.demo_mllm)
    try:
        overrides = deep_merge(_flag_overrides(args), parse_overrides(args.overrides))
        cfg = load_config(args.config, overrides=overrides)
        if args.print_config:
            return print_config(cfg)
        check_inspect(cfg, force_cpu_mllm=args.force_cpu_mllm)
    except (ConfigError, StorageUnreachable) as exc:
        return failed(exc, log)
    if not args.dry_run and not cfg.run_id:
        cfg.run_id = new_run_id()  # known up front, so an interrupted run can say how to resume it
    signals = catch_signals()
    from eagle.pipeline.inspection import JobFailed, run_inspect
    from eagle.pipeline.ray_setup import RayUnavailable, init_ray, shutdown_ray

    try:
        # The output's lease is taken before Ray starts (a second driver is refused in a second, not after Ray's
        # start); a dry run plans in this process and starts no Ray at all.
        result = run_inspect(cfg, dry_run=args.dry_run, verbose=args.verbose, stop=signals,
                             connect=None if args.dry_run else lambda: init_ray(cfg))
    except (ConfigError, RayUnavailable) as exc:
        return failed(exc, log)
    except JobFailed as exc:
        code = failed(exc, log)
        if not args.dry_run:
            _write_summary(args, cfg, summary_doc(cfg, "failed", error=str(exc)))
        return code
    except KeyboardInterrupt:
        name = "SIGTERM" if signals.exit_code() == SIGTERM else "SIGINT"
        if args.dry_run:
            log.warning("dry run interrupted by %s; nothing was written", name)
            return signals.exit_code()
        # said before Ray stops (a local Ray takes a second or two): `ray job stop` SIGKILLs 3 s after SIGTERM
        log.warning("run %s interrupted by %s; its manifest says interrupted. Resume it (only images without a "
                    "row of this run are audited) with:", cfg.run_id, name)
        print(resume_command(argv, cfg.run_id), file=sys.stderr, flush=True)
        _write_summary(args, cfg, summary_doc(cfg, "interrupted", error=f"interrupted by {name}"))
        return signals.exit_code()
    finally:
        try:
            shutdown_ray()
        except KeyboardInterrupt:  # another signal while Ray stops: the job's outcome is decided already
            pass
    if args.dry_run:
        print(f"dry run ({cfg.mode}{', run ' + cfg.run_id if cfg.run_id else ''}): nothing was audited or written")
        print("\n".join(result.lines()))
        return OK
    _report(result, args, cfg)
    return OK
