"""Calibrate the label-free thresholds on the synthetic set: FPR/TPR at each threshold, image and pixel AUROC.

Per product: fit once on train/good (labels never seen), then put each threshold rule on the same training
scores and score the held-out test images. Labels (labels.csv) are used only here, to evaluate. "clear" =
defects with strength >= --clear (labels.csv), "all" = every defect. Prints a Markdown table. The other expert
models and ensembles, each at its own threshold: `compare_experts.py` (which reuses `read_labels` and `load`).

    # the table in docs/EXPERT.md (a synthetic set in a temp dir; random weights work best shallow):
    OMP_NUM_THREADS=1 python bench/calibrate_expert.py --backbone resnet18 expert.layers=[layer1,layer2] expert.crop=256
    python bench/calibrate_expert.py --data ROOT        # an existing MVTec-layout root with labels.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from eagle.config import ThresholdConfig, load_config  # noqa: E402
from eagle.expert.fitted import Expert  # noqa: E402
from eagle.expert.patchcore import PatchCore  # noqa: E402
from eagle.expert.threshold import threshold_value  # noqa: E402
from eagle.expert.training import load_training_images  # noqa: E402
from eagle.io.images import decode_image  # noqa: E402
from eagle.io.storage import join, read_bytes  # noqa: E402

METHODS = ("k-sigma", "mad", "quantile", "evt")


def read_labels(root: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(read_bytes(join(root, "labels.csv")).decode())))


def load(root: str, rel: str) -> np.ndarray:
    return decode_image(read_bytes(join(root, rel)), 10**9)


def evaluate(root: str, product: str, cfg, clear: float) -> tuple[list[dict], dict]:
    """Rows of (method, threshold, FPR, TPR clear, TPR all) and the product's AUROCs."""
    start = time.perf_counter()
    _, train = load_training_images(root, product, cfg)
    fit = PatchCore.fit(train, cfg)
    expert = Expert(PatchCore.from_config(cfg.expert, tensors=fit.tensors))
    tests = [r for r in read_labels(root) if r["product"] == product and r["split"] == "test"]
    scores, pixel_scores, pixel_truth = [], [], []
    for i in range(0, len(tests), 8):
        chunk = tests[i:i + 8]
        for row, res in zip(chunk, expert.score([load(root, r["path"]) for r in chunk]), strict=True):
            scores.append(res.score)
            mask = load(root, row["mask_path"])[..., 0] > 127 if row["mask_path"] else \
                np.zeros(res.anomaly_map.shape, bool)
            pixel_scores.append(res.anomaly_map[::4, ::4].ravel())  # every 4th pixel: plenty for an AUROC
            pixel_truth.append(mask[::4, ::4].ravel())
    scores = np.array(scores)
    defect = np.array([r["defect"] != "good" for r in tests])
    strong = np.array([r["defect"] != "good" and float(r["strength"]) >= clear for r in tests])
    good = ~defect
    rows = []
    for method in METHODS:
        rule = ThresholdConfig(**{**cfg.threshold.model_dump(), "method": method})
        thr = threshold_value(fit.threshold.scores, rule)
        rows.append({"method": method, "threshold": thr, "fpr": float((scores[good] >= thr).mean()),
                     "tpr_clear": float((scores[strong] >= thr).mean()),
                     "tpr_all": float((scores[defect] >= thr).mean())})
    aurocs = {"auroc_all": roc_auc_score(defect, scores),
              "auroc_clear": roc_auc_score(defect[good | strong], scores[good | strong]),
              "pixel_auroc": roc_auc_score(np.concatenate(pixel_truth), np.concatenate(pixel_scores)),
              "score_max": fit.threshold.score_max, "n_good": int(good.sum()), "n_clear": int(strong.sum()),
              "n_defect": int(defect.sum()), "seconds": time.perf_counter() - start}
    return rows, aurocs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="MVTec-layout root with labels.csv (default: generate a synthetic set)")
    p.add_argument("--products", default="grid,marble,nut")
    p.add_argument("--n-train", type=int, default=30)
    p.add_argument("--n-test-good", type=int, default=40)
    p.add_argument("--n-test-defect", type=int, default=8, help="per defect kind")
    p.add_argument("--clear", type=float, default=0.5, help="strength from which a defect counts as clearly visible")
    p.add_argument("--backbone", default=None)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args()
    cfg = load_config(overrides=["expert.weights=random", *args.overrides,
                                 *([f"expert.backbone={args.backbone}"] if args.backbone else [])])
    products = args.products.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None:
            from eagle.testing.synth import generate

            root = tmp
            generate(root, products, n_train=args.n_train, n_test_good=args.n_test_good,
                     n_test_defect=args.n_test_defect, seed=1)
        results = {product: evaluate(root, product, cfg, args.clear) for product in products}

    e = cfg.expert
    print(f"\n{e.backbone} {'+'.join(e.layers)} (weights={e.weights}, seed {e.seed}), scoring {e.patchcore.scoring}, "
          f"coreset {e.patchcore.coreset_ratio}, {torch.get_num_threads()} CPU thread(s); clear = strength >= {args.clear}\n")
    print("| product | method | threshold | FPR (normal) | TPR clear | TPR all | image AUROC clear / all "
          "| pixel AUROC |")
    print("|---|---|---|---|---|---|---|---|")
    for product, (rows, au) in results.items():
        for row in rows:
            print(f"| {product} | {row['method']} | {row['threshold']:.4f} | {row['fpr']:.1%} "
                  f"| {row['tpr_clear']:.1%} | {row['tpr_all']:.1%} | {au['auroc_clear']:.3f} / {au['auroc_all']:.3f} "
                  f"| {au['pixel_auroc']:.3f} |")
    for product, (_, au) in results.items():
        print(f"{product}: {au['n_good']} normal, {au['n_clear']} clear of {au['n_defect']} defective test images, "
              f"score_max {au['score_max']:.4f}, {au['seconds']:.0f} s")


if __name__ == "__main__":
    main()
