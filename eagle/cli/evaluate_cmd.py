"""Evaluate an inspect run against a dataset's ground truth: metrics.json and a self-contained report.html.

    python jobs/evaluate.py --output s3://plant-a/audit --data s3://plant-a/mvtec-root --out ./eval \
        [--run-id ID] [--compare-run OTHER_ID ...] [--model-store s3://plant-a/models]

--data is a dataset root in any layout anomalib reads (MVTec AD, MVTec AD 2 (test_public), MVTec LOCO, VisA,
BTech, MPDD, folder: eagle/io/layouts.py), detected unless --layout names it: its test split, labels and masks
are the truth.

--compare-run (repeatable) adds a side-by-side table of the runs on the test images all of them scored, the
evaluated run being the baseline: routing policies, or guidance on and off, over the same images. Without
--run-id the latest full run is evaluated (an incremental run holds only the images that changed); the log says
which run and for how many ground-truth test images it has rows.
"""

from __future__ import annotations

import argparse
import logging
import sys

from eagle.cli.exit_codes import JOB_FAILED, OK, USAGE, help_text
from eagle.config import ConfigError
from eagle.evaluation.markup import format_value
from eagle.evaluation.report import write_outputs
from eagle.evaluation.scorecard import EvaluationError, evaluate, load_train_scores, model_version
from eagle.io.layouts import LAYOUTS
from eagle.logs import quiet_job, setup_logging

log = logging.getLogger("eagle.evaluate")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jobs/evaluate.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__ + "\n" + help_text("evaluate"))
    p.add_argument("--output", required=True, metavar="URI", help="Inspect output prefix (Hive-partitioned Parquet).")
    p.add_argument("--data", required=True, metavar="ROOT", help="Dataset root the run audited (any --layout).")
    p.add_argument("--layout", choices=LAYOUTS, help="The dataset layout (default: detected from ROOT).")
    p.add_argument("--run-id", help="Run to evaluate (default: the latest full run, by its manifest); a "
                                    "comparison's baseline.")
    p.add_argument("--compare-run", action="append", default=[], metavar="RUN_ID",
                   help="Another run of the same output to compare with, side by side (repeatable).")
    p.add_argument("--model-store", metavar="URI", help="Expert artifacts, for the training-score histograms.")
    p.add_argument("--out", required=True, metavar="DIR", help="Where metrics.json and report.html go.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_job()
    setup_logging()
    try:
        result = evaluate(args.output, args.data, args.run_id, compare=args.compare_run, layout=args.layout)
        train = {p: load_train_scores(args.model_store, p, model_version(r))
                 for p, r in result.products.items()} if args.model_store else {}
        metrics_uri, report_uri = write_outputs(result, args.out, train)
    except (EvaluationError, ConfigError) as exc:  # ConfigError: no known layout, or anomalib's parser refused
        log.error("%s", exc)
        return USAGE
    except OSError as exc:
        log.error("storage failure: %s", exc)
        return JOB_FAILED
    o = result.overall
    seen, total = o["n_test_images_with_rows"], o["n_test_images"]
    log.log(logging.INFO if seen == total else logging.WARNING,
            "evaluating run %s (%s): it has rows for %d of the %d ground-truth test images%s", result.run_id,
            result.chosen_as, seen, total, "" if seen == total else f"; {total - seen} have none (--run-id picks "
            f"another run)")
    log.info("run %s: %d images scored, %d error rows; image AUROC %s, AUPRO %s, final F1 %s; wrote %s and %s",
             result.run_id, o["n_images"], o["n_errors"], format_value(o["image_auroc"]), format_value(o["aupro"]),
             format_value(o["final"]["f1"]), metrics_uri, report_uri)
    c = o["verdict_change"]
    log.info("MLLM: %d calls, parse rate %s, accuracy %s; fixed %d expert errors, introduced %d; %s ms per image",
             o["mllm"]["calls"], format_value(o["mllm"]["parse_rate"]), format_value(o["mllm"]["accuracy"]),
             c["fixed"], c["introduced"], format_value(o["mllm"]["ms_per_image"]))
    for run, m in (result.comparison or {}).get("runs", {}).items():
        log.info("compared, %d common images: run %s final F1 %s, MLLM calls per image %s",
                 result.comparison["n_common_images"], run, format_value(m["final"]["f1"]),
                 format_value(m["mllm"]["calls_per_image"]))
    return OK
