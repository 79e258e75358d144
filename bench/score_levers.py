"""PatchCore's image score and threshold rules, judged on one set of patch-distance maps per product: how much
each lever can give before it is built into the expert.

Per product, the training and test images are embedded once (the expert's backbone, layers and size) and three
sets of nearest-neighbour patch-distance maps are taken against coreset memory banks:

* test images against the bank of all training images (what the expert stage scores);
* each training image against that bank without its own rows (TGPS, the threshold's training scores: only its
  unselected patches in the `tgps` rule, all of them in `tgps-full`);
* each training image against a bank fitted on the other folds (`oof`, 5 folds, as cross-fitted models do).

Each image-score aggregation (max; mean of the top k patches; max of the map blurred by a Gaussian of sigma
patches) is then applied to all three, and the table gives, mean over products: image AUROC, the TPR at the
threshold that lets 5% of the normal test images through (labels used: the best any threshold rule could do at
FPR 5%), and FPR / TPR at label-free k-sigma thresholds from each source of training scores. The image score here
is the largest patch distance, without anomalib's re-weighting (`compare_experts.py` gives the expert's own).

    python bench/heldout.py /tmp/heldout
    OMP_NUM_THREADS=2 python bench/score_levers.py --data /tmp/heldout --products brick,gravel,grass --size 320
    OMP_NUM_THREADS=2 python bench/score_levers.py --data /tmp/heldout --size 320 expert.patchcore.coreset_ratio=0.25
    OMP_NUM_THREADS=2 python bench/score_levers.py --data /tmp/heldout --size 224 --feature-norm channel
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from calibrate_expert import load, read_labels  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from eagle.config import load_config  # noqa: E402
from eagle.expert.coreset import greedy_coreset  # noqa: E402
from eagle.expert.patchcore import PatchCore  # noqa: E402
from eagle.expert.search import MemoryBank  # noqa: E402
from eagle.expert.training import load_training_images  # noqa: E402

FOLDS = 5
K_SIGMA = (2.0, 2.5, 3.0)
AGGREGATIONS = {"max": lambda m: m.max(), **{f"top{k}": (lambda m, k=k: np.sort(m, None)[-k:].mean()) for k in (5, 20)},
                **{f"blur{s}": (lambda m, s=s: gaussian_filter(m, s).max()) for s in (1, 2)}}


def normalise(train_e: torch.Tensor, test_e: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch features as they are (`none`), each channel standardised to the training patches (`channel`), or
    each patch scaled to unit length (`unit`)."""
    if how == "channel":
        flat = train_e.reshape(-1, train_e.shape[-1])
        mean, std = flat.mean(0), flat.std(0) + 1e-6
        return (train_e - mean) / std, (test_e - mean) / std
    if how == "unit":
        return torch.nn.functional.normalize(train_e, dim=-1), torch.nn.functional.normalize(test_e, dim=-1)
    return train_e, test_e


def maps(model: PatchCore, train: list[np.ndarray], test: list[np.ndarray], ratio: float, projection: int,
         seed: int, feature_norm: str = "none") -> dict[str, np.ndarray]:
    """Patch-distance maps (N, h, w) of the test images, TGPS and out-of-fold training maps, and which training
    patches the coreset kept."""
    def embed(images: list[np.ndarray]) -> torch.Tensor:
        return torch.cat([model.embed(model.preprocess(images[i:i + 8])) for i in range(0, len(images), 8)])

    def bank_of(flat: torch.Tensor) -> tuple[MemoryBank, torch.Tensor]:
        kept = greedy_coreset(flat, max(1, int(flat.shape[0] * ratio)), projection, seed=seed)
        return MemoryBank(flat[kept]), kept

    def nearest(bank: MemoryBank, query: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        return bank.search(query.reshape(-1, query.shape[-1]), 1, exclude)[0][:, 0]

    train_e, test_e = normalise(embed(train), embed(test), feature_norm)
    n, h, w, d = train_e.shape
    bank, kept = bank_of(train_e.reshape(-1, d))
    source, selected = kept // (h * w), torch.zeros(n * h * w, dtype=torch.bool)
    selected[kept] = True
    tgps = torch.stack([nearest(bank, train_e[i], source == i) for i in range(n)])
    oof = torch.zeros(n, h * w)
    folds = np.arange(n) % FOLDS
    for f in range(FOLDS):
        held = np.flatnonzero(folds == f)
        fold_bank, _ = bank_of(train_e[np.flatnonzero(folds != f)].reshape(-1, d))
        oof[held] = nearest(fold_bank, train_e[held]).reshape(len(held), -1)
    return {"test": nearest(bank, test_e).reshape(len(test), h, w).numpy(), "tgps": tgps.reshape(n, h, w).numpy(),
            "oof": oof.reshape(n, h, w).numpy(), "selected": selected.reshape(n, h, w).numpy()}


def levers(m: dict[str, np.ndarray], good: np.ndarray) -> dict[str, dict[str, float]]:
    """Per aggregation: AUROC, TPR at FPR 5% (labels) and (FPR, TPR) at each label-free rule."""
    out = {}
    for name, agg in AGGREGATIONS.items():
        score = np.array([agg(x) for x in m["test"]])
        sources = {"oof": np.array([agg(x) for x in m["oof"]]), "tgps-full": np.array([agg(x) for x in m["tgps"]])}
        if name == "max":
            sources["tgps"] = np.array([x[~kept].max() for x, kept in zip(m["tgps"], m["selected"])])
        row = {"AUROC": roc_auc_score(~good, score), "TPR@FPR5%": (score[~good] > np.quantile(score[good], 0.95)).mean()}
        for source, train in sources.items():
            for k in K_SIGMA:
                threshold = train.mean() + k * train.std(ddof=1)
                row[f"{source} k{k:g}"] = ((score[good] >= threshold).mean(), (score[~good] >= threshold).mean())
        out[name] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="MVTec-layout root with labels.csv (bench/heldout.py)")
    p.add_argument("--products", default="brick,gravel,grass")
    p.add_argument("--size", type=int, default=320, help="expert.resize and expert.crop")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--layers", default="blocks.2,blocks.4")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--feature-norm", choices=("none", "channel", "unit"), default="none",
                   help="A trial: patch features standardised per channel or scaled to unit length before the search.")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="Further config overrides, e.g. expert.patchcore.coreset_ratio=0.25.")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(overrides=[f"expert.backbone={args.backbone}", f"expert.layers=[{args.layers}]",
                                 f"expert.weights={args.weights}", f"expert.resize={args.size}",
                                 f"expert.crop={args.size}", *args.overrides])
    opts, labels, per_product = cfg.expert.patchcore, read_labels(args.data), []
    for product in args.products.split(","):
        start = time.perf_counter()
        _, train = load_training_images(args.data, product, cfg)
        tests = [r for r in labels if r["product"] == product and r["split"] == "test"]
        m = maps(PatchCore.from_config(cfg.expert), train, [load(args.data, r["path"]) for r in tests],
                 opts.coreset_ratio, opts.coreset_projection_dim, cfg.expert.seed, args.feature_norm)
        good, kinds = np.array([r["defect"] == "good" for r in tests]), np.array([r["defect"] for r in tests])
        per_product.append(levers(m, good))
        score = m["test"].reshape(len(tests), -1).max(1)
        per_kind = ", ".join(f"{k} {roc_auc_score(~good[good | (kinds == k)], score[good | (kinds == k)]):.2f}"
                             for k in dict.fromkeys(kinds[~good]))
        print(f"{product}: {time.perf_counter() - start:.0f} s, AUROC (max) {per_product[-1]['max']['AUROC']:.3f}; "
              f"per defect kind against the normal images: {per_kind}", flush=True)
    columns = list(per_product[0]["max"])
    print("\n| aggregation | " + " | ".join(c if c.startswith(("AUROC", "TPR")) else f"{c} FPR / TPR" for c in columns)
          + " |\n|---|" + "---:|" * len(columns))
    for name in AGGREGATIONS:
        cells = []
        for c in columns:
            values = [r[name].get(c) for r in per_product]
            if values[0] is None:
                cells.append("")
            elif isinstance(values[0], tuple):
                cells.append(f"{np.mean([v[0] for v in values]):.0%} / {np.mean([v[1] for v in values]):.0%}")
            else:
                cells.append(f"{np.mean(values):.3f}" if c == "AUROC" else f"{np.mean(values):.0%}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
