"""Routing policies: MLLM calls per image and agreement of final verdicts, `all` vs `not-confident-normal` vs
`uncertain`, on one synthetic set with the same fitted experts (one Ray job per policy).

The MLLM is the tiny RANDOM Qwen2.5-VL: its answers are noise, so agreement here checks the machinery
(routing, the verdict rule, batch-composition invariance of answers), not which policy judges better. With
real weights the disagreement between policies is exactly the MLLM overruling the expert on images the
cheaper policy does not route. Prints two tables.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 python bench/bench_routing.py
    python bench/bench_routing.py --good 16 --defect 8
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections import Counter
from itertools import combinations

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_pipeline import job_config, prepare  # noqa: E402

POLICIES = ("all", "not-confident-normal", "uncertain")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=12)
    p.add_argument("--good", type=int, default=8, help="normal test images per product")
    p.add_argument("--defect", type=int, default=4, help="test images per product and defect kind")
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--mllm-batch", type=int, default=4)
    p.add_argument("--low-factor", type=float, default=1.0,
                   help="confidence.low_factor: < 1 widens the unsure band below the threshold (EAGLE: 1.0)")
    p.add_argument("--root", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    from eagle.io.runs import read_rows
    from eagle.pipeline.inspection import run_inspect

    torch.set_num_threads(1)
    tmp = None if args.root else tempfile.TemporaryDirectory()
    root = args.root or tmp.name
    prepare(root, args.train, args.good, args.defect, args.size)
    runs, seconds = {}, {}
    cols = ["image_uri", "confidence", "expert_verdict", "mllm_ran", "answer", "verdict", "status"]
    for policy in POLICIES:
        cfg = job_config(root, f"route-{policy}", route=policy, mllm_batch=args.mllm_batch,
                         extra={"confidence": {"low_factor": args.low_factor}})
        shutil.rmtree(cfg.output.uri, ignore_errors=True)  # a rerun with --root must not resume the old run
        seconds[policy] = run_inspect(cfg).seconds
        runs[policy] = {r["image_uri"]: r for r in read_rows(cfg.output.uri, cols, cfg.storage).to_pylist()}
    uris = sorted(runs["all"])
    n = len(uris)
    truth = {u: "normal" if "/test/good/" in u else "anomalous" for u in uris}
    bands = Counter(runs["all"][u]["confidence"] for u in uris)

    print(f"\n{n} synthetic test images {args.size}x{args.size} ({sum(v == 'anomalous' for v in truth.values())} "
          f"defective), experts resnet18 random weights, tiny RANDOM Qwen2.5-VL (answers are noise); "
          f"confidence.low_factor {args.low_factor}; expert bands: {dict(sorted(bands.items()))}")
    print(f"\n{'policy':22s} {'MLLM calls':>10s} {'per image':>9s} {'answers yes/no/other':>21s} "
          f"{'final = expert':>14s} {'acc. vs labels':>14s} {'job s':>7s}")
    expert_acc = sum(runs["all"][u]["expert_verdict"] == truth[u] for u in uris) / n
    for policy in POLICIES:
        rows = runs[policy]
        ran = [u for u in uris if rows[u]["mllm_ran"]]
        ans = Counter(rows[u]["answer"] for u in ran)
        split = f'{ans["yes"]}/{ans["no"]}/{len(ran) - ans["yes"] - ans["no"]}'
        same = sum(rows[u]["verdict"] == rows[u]["expert_verdict"] for u in uris) / n
        acc = sum(rows[u]["verdict"] == truth[u] for u in uris) / n
        print(f"{policy:22s} {len(ran):10d} {len(ran) / n:9.2f} {split:>21s} "
              f"{same:14.1%} {acc:14.1%} {seconds[policy]:7.1f}")
    print(f"{'expert alone':22s} {0:10d} {0:9.2f} {'':>21s} {1:14.1%} {expert_acc:14.1%}")

    print(f"\n{'policies':46s} {'final verdicts agree':>20s} {'both asked MLLM':>15s} {'same answer':>11s}")
    for a, b in combinations(POLICIES, 2):
        agree = sum(runs[a][u]["verdict"] == runs[b][u]["verdict"] for u in uris) / n
        both = [u for u in uris if runs[a][u]["mllm_ran"] and runs[b][u]["mllm_ran"]]
        same = sum(runs[a][u]["answer"] == runs[b][u]["answer"] for u in both) / len(both) if both else float("nan")
        print(f"{a + ' vs ' + b:46s} {agree:20.1%} {len(both):15d} {same:11.1%}")
    print("same answer: the MLLM's parsed answer for an image it saw in both runs (batches differ between "
          "policies, so this checks that an answer does not depend on its batch-mates)")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
