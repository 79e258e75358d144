"""Compare the expert models and their ensembles on the synthetic set: image AUROC per defect-strength bin, and
FPR / TPR at each expert's own label-free threshold.

Per product, every expert is fitted on train/good through the job's path (`fit_product` into a temporary model
store: labels never seen), then loaded back as the expert stage loads it (`pin` → `load_artifact` →
`Expert.from_artifact` → `ProductExpert`) and scores the held-out test images from their uint8 model inputs.
A single expert's verdict is score >= its artifact's threshold; an ensemble's is combined score >= 1 (scores in
threshold units, `expert.ensemble.combine` max or mean). Labels (labels.csv: defect, strength) are used only here, to
evaluate. Prints a Markdown table. Helpers shared with `calibrate_expert.py` (PatchCore's threshold rules).

    # the table in docs/EXPERT.md (synthetic set in a temp dir; random weights: cost, not accuracy):
    OMP_NUM_THREADS=1 python bench/compare_experts.py
    python bench/compare_experts.py --device cuda --size 256 --backbone wide_resnet50_2 --layers layer2,layer3 \\
        --weights imagenet --epochs 50
    python bench/compare_experts.py --data ROOT        # an existing MVTec-layout root with labels.csv
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from calibrate_expert import load, read_labels  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from eagle.config import RoutingConfig, load_config  # noqa: E402
from eagle.config.sections import EnsembleConfig  # noqa: E402
from eagle.evaluation.routing_efficiency import routing_efficiency  # noqa: E402
from eagle.expert.artifact import load_artifact  # noqa: E402
from eagle.expert.ensemble import ProductExpert, band_of, member_versions, pin  # noqa: E402
from eagle.expert.experts import parse_models  # noqa: E402
from eagle.expert.fitted import Expert  # noqa: E402
from eagle.expert.threshold import classify_in_band  # noqa: E402
from eagle.expert.training import fit_product  # noqa: E402


@dataclass
class Result:
    """One expert (or ensemble) on one product's test images."""

    threshold: float
    fpr: float
    tpr: list[float]  # per strength bin, then all defects
    auroc: list[float]  # the same bins: normal test images against the bin's defects
    pixel_auroc: float
    fit_s: float
    score_max: float
    scores: np.ndarray  # per test image
    good: np.ndarray  # per test image: a normal one
    bands: dict[str, tuple[float, float]]  # routing band (low, high) per policy name (eagle.expert.ensemble.band_of)


def bin_labels(edges: list[float]) -> list[str]:
    lows, highs = [None, *edges], [*edges, None]
    return [f"<{hi:g}" if lo is None else f">={lo:g}" if hi is None else f"{lo:g}-{hi:g}"
            for lo, hi in zip(lows, highs, strict=True)] + ["all"]


def evaluate(expert: ProductExpert, root: str, tests: list[dict], edges: list[float], batch: int,
             fit_s: float, budgets: list[float]) -> Result:
    """Score `tests` from their model inputs as the expert stage does and measure it against the labels."""
    model_input = expert.members[0][1].model_input  # every member takes the same input (`pin` checks it)

    def score(images: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        results = expert.score_inputs([model_input(img) for img in images], [img.shape[:2] for img in images])
        return [(r.score, r.anomaly_map) for r in results]

    return measure(score, root, tests, edges, batch, expert.band.threshold, expert.band.score_max, fit_s,
                   routing_bands(expert, budgets))


def measure(score, root: str, tests: list[dict], edges: list[float], batch: int, thr: float, score_max: float,
            fit_s: float, bands: dict[str, tuple[float, float]]) -> Result:
    """`score(images) -> [(image score, anomaly map at the image's size)]` on `tests`, against the labels."""
    scores, pixel_scores, pixel_truth = [], [], []
    for i in range(0, len(tests), batch):
        chunk = tests[i:i + batch]
        images = [load(root, r["path"]) for r in chunk]
        for row, (image_score, amap) in zip(chunk, score(images), strict=True):
            scores.append(image_score)
            if row["mask_path"]:
                mask = load(root, row["mask_path"])[..., 0] > 127
            else:
                mask = np.zeros(amap.shape, bool)
            pixel_scores.append(amap[::4, ::4].ravel())  # every 4th pixel: plenty for an AUROC
            pixel_truth.append(mask[::4, ::4].ravel())
    scores = np.array(scores)
    good = np.array([r["defect"] == "good" for r in tests])
    strength = np.array([float(r["strength"]) if r["strength"] else np.nan for r in tests])
    bins = [~good & (strength >= lo) & (strength < hi)
            for lo, hi in zip([-np.inf, *edges], [*edges, np.inf], strict=True)] + [~good]
    return Result(threshold=thr, fpr=float((scores[good] >= thr).mean()),
                  tpr=[float((scores[b] >= thr).mean()) if b.any() else np.nan for b in bins],
                  auroc=[roc_auc_score(b[good | b], scores[good | b]) if b.any() else np.nan for b in bins],
                  pixel_auroc=roc_auc_score(np.concatenate(pixel_truth), np.concatenate(pixel_scores)),
                  fit_s=fit_s, score_max=score_max, scores=scores, good=good, bands=bands)


def stock_anomalib(root: str, product: str, cfg, tests: list[dict], edges: list[float], device: str,
                   val_share: float = 0.2) -> Result:
    """anomalib's own PatchCore (`PatchcoreModel`: its embedding, coreset and scoring) on the same features (the
    project's backbone and weights loaded into its feature extractor, the same pre-processing), thresholded as
    anomalib does without defective validation images: the highest score of a held-back normal split."""
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    from eagle.expert.patchcore import PatchCore
    from eagle.expert.training import load_training_images

    start = time.perf_counter()
    ours = PatchCore.from_config(cfg.expert, cfg.storage)
    ref = PatchcoreModel(layers=list(ours.layers), backbone=cfg.expert.backbone, pre_trained=False, num_neighbors=9)
    ref.feature_extractor.load_state_dict(ours.extractor.state_dict())
    ref = ref.to(device)
    _, images = load_training_images(root, product, cfg)
    order = np.random.default_rng(cfg.expert.seed).permutation(len(images))
    n_val = max(1, round(len(images) * val_share))
    val, train = [images[i] for i in order[:n_val]], [images[i] for i in order[n_val:]]
    batch = cfg.resources.expert.batch_size
    ref.train()
    for i in range(0, len(train), batch):
        ref(ours.preprocess(train[i:i + batch]).to(device))
    torch.manual_seed(cfg.expert.seed)
    ref.subsample_embedding(cfg.expert.patchcore.coreset_ratio)
    ref.eval()

    def score(chunk: list[np.ndarray]) -> list[tuple[float, np.ndarray]]:
        with torch.no_grad():
            out = ref(ours.preprocess(chunk).to(device))
        return [(float(s), cv2.resize(m[0].float().cpu().numpy(), (img.shape[1], img.shape[0])))
                for s, m, img in zip(out.pred_score, out.anomaly_map, chunk, strict=True)]

    thr = max(s for i in range(0, len(val), batch) for s, _ in score(val[i:i + batch]))
    return measure(score, root, tests, edges, batch, thr, thr, time.perf_counter() - start, {})


def routing_bands(expert: ProductExpert, budgets: list[float]) -> dict[str, tuple[float, float]]:
    """The borderline band at each budget, learned from the expert's artifacts as the expert stage learns it."""
    metas = [art.meta for art, _ in expert.members]
    return {f"borderline {b:g}": (band.low, band.high) for b in budgets
            for band in [band_of(metas, expert.how, RoutingConfig(policy="borderline", budget=b))]}


BEST_SHARE = 0.3  # the routed share of issue 27's target: the best band of that size bounds every band policy


def routing_rows(r: Result) -> dict[str, dict]:
    """Routing efficiency of every policy on one expert's test scores (eagle.evaluation.routing_efficiency)."""
    rows = [{"expert_score": s, "threshold": r.threshold, "score_max": r.score_max,
             "expert_verdict": "anomalous" if s >= r.threshold else "normal", "confidence": "confident_normal"}
            for s in r.scores]
    table = {(f"best band {BEST_SHARE:g}" if k == "best band" else k): v
             for k, v in routing_efficiency(rows, ~r.good, BEST_SHARE).items() if k not in ("routed", "band")}
    for name, (low, high) in r.bands.items():
        banded = [{**row, "confidence": classify_in_band(row["expert_score"], r.threshold, low, high)[1]}
                  for row in rows]
        table[name] = routing_efficiency(banded, ~r.good)["band"]
    return table


def compare(root: str, product: str, cfg, experts: list[str], ensemble: list[str], combines: list[str],
            edges: list[float], device: str, budgets: list[float], anomalib: bool = False) -> dict[str, Result]:
    """Fit each model of `experts` and `ensemble` for `product`, then evaluate each expert and each ensemble (and
    with `anomalib`, anomalib's stock PatchCore on the same features)."""
    fit_s = {}
    for i, model in enumerate(dict.fromkeys([*experts, *ensemble])):
        fit_s[model] = fit_product(root, product, cfg, device=device, model=model, default=i == 0).seconds
    tests = [r for r in read_labels(root) if r["product"] == product and r["split"] == "test"]
    loaded: dict[str, tuple] = {}

    def product_expert(models: list[str], how: str) -> ProductExpert:
        ensemble = EnsembleConfig(models=models if len(models) > 1 else [])
        expert_cfg = cfg.expert.model_copy(update={"model": models[0], "ensemble": ensemble})
        pinned = pin(cfg.model_store, product, expert_cfg, cfg.storage)
        members = []
        for version in member_versions(pinned):
            if version not in loaded:
                art = load_artifact(cfg.model_store, product, version, storage=cfg.storage)
                loaded[version] = (art, Expert.from_artifact(art, device=device, dtype=cfg.expert.resolved_dtype(device)))
            members.append(loaded[version])
        return ProductExpert(pinned, members, how)

    batch = cfg.resources.expert.batch_size
    results = {model: evaluate(product_expert([model], "max"), root, tests, edges, batch, fit_s[model], budgets)
               for model in experts}
    for how in combines if ensemble else []:
        results[f"{'+'.join(ensemble)} ({how})"] = evaluate(product_expert(ensemble, how), root, tests, edges,
                                                            batch, sum(fit_s[m] for m in ensemble), budgets)
    if anomalib:
        results["anomalib patchcore (stock)"] = stock_anomalib(root, product, cfg, tests, edges, device)
    return results


def pct(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.0%}"


def num(x: float) -> str:
    return "n/a" if np.isnan(x) else f"{x:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="MVTec-layout root with labels.csv (default: generate a synthetic set)")
    p.add_argument("--products", default="grid,marble,nut")
    p.add_argument("--experts", default="patchcore,padim,stfpm", help="Comma-separated models, each on its own.")
    p.add_argument("--ensemble", default="patchcore,padim", help="Models of one ensemble ('' for none).")
    p.add_argument("--combine", default="max,mean", help="expert.ensemble.combine rules to evaluate the ensemble with.")
    p.add_argument("--bins", default="0.3,0.6", help="Edges of the defect-strength bins (labels.csv strength).")
    p.add_argument("--n-train", type=int, default=30)
    p.add_argument("--n-test-good", type=int, default=40)
    p.add_argument("--n-test-defect", type=int, default=8, help="per defect kind (strengths spread over 0-1)")
    p.add_argument("--size", type=int, default=128, help="Synthetic image side, expert.resize and expert.crop.")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--layers", default="layer1,layer2")
    p.add_argument("--weights", default="random")
    p.add_argument("--epochs", type=int, default=20, help="expert.stfpm.epochs")
    p.add_argument("--folds", type=int, default=5, help="threshold.folds (cross-fitted models)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--anomalib", action="store_true",
                   help="Also anomalib's stock PatchCore on the same features, thresholded at the highest score of a "
                        "20%% normal validation split (what anomalib does without defective validation images).")
    p.add_argument("--budgets", default="0.1,0.2,0.3", help="routing.budget values of the borderline policy to "
                   "show in the routing table.")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="Further config overrides.")
    args = p.parse_args()
    experts = parse_models(args.experts)
    ensemble = parse_models(args.ensemble) if args.ensemble.strip() else []
    combines = [c for c in args.combine.split(",") if c]
    edges = [float(e) for e in args.bins.split(",") if e]
    products = args.products.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides=[
            f"expert.backbone={args.backbone}", f"expert.layers=[{args.layers}]", f"expert.weights={args.weights}",
            f"expert.resize={args.size}", f"expert.crop={args.size}", f"expert.stfpm.epochs={args.epochs}",
            f"threshold.folds={args.folds}", f"model_store={os.path.join(tmp, 'store')}", *args.overrides])
        root = args.data
        if root is None:
            from eagle.testing.synth import generate

            root = os.path.join(tmp, "data")
            generate(root, products, n_train=args.n_train, n_test_good=args.n_test_good,
                     n_test_defect=args.n_test_defect, size=args.size, seed=1)
        labels_of, root_name = read_labels(root), args.data or "synthetic set"
        start = time.perf_counter()
        budgets = [float(b) for b in args.budgets.split(",") if b]
        results = {product: compare(root, product, cfg, experts, ensemble, combines, edges, args.device, budgets,
                                    args.anomalib) for product in products}
        seconds = time.perf_counter() - start

    e, t = cfg.expert, cfg.threshold
    labels = bin_labels(edges)
    split = Counter((r["split"], r["defect"] == "good") for r in labels_of if r["product"] in products)
    print(f"\n{e.backbone} {'+'.join(e.layers)} (weights={e.weights}), {args.size}px, threshold {t.method} "
          f"(padim/stfpm: {t.folds}-fold cross-fit), stfpm {e.stfpm.epochs} epochs, {args.device}, "
          f"{torch.get_num_threads()} thread(s); {root_name}, {len(products)} products: {split['train', True]} "
          f"training, {split['test', True]} normal and {split['test', False]} defective test images; strength bins "
          f"{', '.join(labels[:-1])}; {seconds:.0f} s\n")
    print(f"| product | expert | fit s | threshold | FPR | TPR {' | TPR '.join(labels)} "
          f"| AUROC {' | AUROC '.join(labels)} | pixel AUROC |")
    print("|---|---|---:|---:|---:|" + "---:|" * (2 * len(labels) + 1))
    names = list(next(iter(results.values())))
    for name in names:
        for product in products:
            r = results[product][name]
            print(f"| {product} | {name} | {r.fit_s:.0f} | {r.threshold:.4g} | {pct(r.fpr)} "
                  f"| {' | '.join(pct(x) for x in r.tpr)} | {' | '.join(num(x) for x in r.auroc)} "
                  f"| {num(r.pixel_auroc)} |")
        rs = [results[product][name] for product in products]
        if len(rs) > 1:
            print(f"| **mean** | **{name}** | {np.mean([r.fit_s for r in rs]):.0f} | | {pct(np.mean([r.fpr for r in rs]))} "
                  f"| {' | '.join(pct(np.mean(c)) for c in zip(*[r.tpr for r in rs], strict=True))} "
                  f"| {' | '.join(num(np.mean(c)) for c in zip(*[r.auroc for r in rs], strict=True))} "
                  f"| {num(np.mean([r.pixel_auroc for r in rs]))} |")
    print("\nfit s: fit_product with its label-free threshold (an ensemble: its members' sum); threshold: the "
          "artifact's (an ensemble: 1 on the combined score); FPR, TPR: share of normal / defective test images at "
          "or above it; AUROC: normal test images against each bin's defects; pixel AUROC: all test images.")
    print_routing(results, products)


def _inside(total: dict[str, int], kind: str) -> str:
    caught, of = total[f"{kind}_routed"], total[kind]
    return f"{caught}/{of} ({pct(caught / of) if of else 'n/a'})"


def print_routing(results: dict[str, dict[str, Result]], products: list[str]) -> None:
    """Per expert, pooled over products: what each routing policy would send to the MLLM, and which of the
    expert's errors that set holds."""
    print("\n| expert | policy | routed | errors inside | false alarms inside | missed defects inside |")
    print("|---|---|---:|---:|---:|---:|")
    for name in next(iter(results.values())):
        if not results[products[0]][name].bands:  # the stock baseline has no artifact to learn a band from
            continue
        tables = [routing_rows(results[product][name]) for product in products]
        for policy in tables[0]:
            total = {k: sum(t[policy][k] for t in tables) for k in ("routed", "errors", "errors_routed",
                                                                    "false_alarms", "false_alarms_routed",
                                                                    "missed_defects", "missed_defects_routed")}
            n = sum(len(results[product][name].scores) for product in products)
            print(f"| {name} | {policy} | {pct(total['routed'] / n)} | {_inside(total, 'errors')} "
                  f"| {_inside(total, 'false_alarms')} | {_inside(total, 'missed_defects')} |")
    print("\nPooled over the products: routed = share of test images the policy sends to the MLLM; inside = the "
          "expert's errors (at its own threshold) that are in that set. borderline b: the band learned from the "
          "training images' label-free scores to hold b of the normal images; near-threshold: score/threshold in "
          f"[0.9, 1.1); best band {BEST_SHARE:g}: the most errors a band of {BEST_SHARE:.0%} of each product's images "
          "could hold (labels used: an upper bound); uncertain: EAGLE's band; not-confident-normal: every anomalous verdict.")


if __name__ == "__main__":
    main()
