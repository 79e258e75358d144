"""Score an inspect run against the ground truth of an MVTec-AD-layout root, per product and overall, and
optionally side by side with other runs over the same images.

Output rows are matched to test images (:mod:`eagle.evaluation.ground_truth`) by their path relative to the data
root, so the root may be local or ``s3://`` while the rows carry full URIs. Error rows and rows of images
outside the root's test sets are counted, never scored.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from eagle.config import StorageConfig
from eagle.evaluation import metrics
from eagle.evaluation.comparison import Scored, compare_runs
from eagle.evaluation.decisions import decision_metrics, mean
from eagle.evaluation.ground_truth import Truth, load_ground_truth, read_mask, relative_path
from eagle.expert.artifact import ArtifactError, read_meta
from eagle.expert.regions import decode_gray_png
from eagle.io.runs import read_rows, read_runs

ROW_COLUMNS = ["run_id", "audited_at", "image_uri", "product", "width", "height", "status", "error", "error_stage",
               "expert_score", "threshold", "score_max", "expert_verdict", "confidence", "boxes", "mask_png",
               "anomaly_map_png", "map_max", "mllm_ran", "guided", "answer", "verdict", "explanation",
               "image_attention_share", "mllm_ms", "expert_model_version"]


class EvaluationError(ValueError):
    """Nothing to evaluate: no output rows, no such run, or no test images under the data root."""


@dataclass
class ProductResult:
    """A product's scored rows (ok, matched; each with its truth) and its metrics."""

    product: str
    rows: list[dict[str, Any]]
    truths: list[Truth]
    metrics: dict[str, Any]


@dataclass
class Evaluation:
    """What ``metrics.json`` holds, plus the per-product rows the report draws."""

    run_id: str
    output_uri: str
    data_root: str
    products: dict[str, ProductResult] = field(default_factory=dict)
    overall: dict[str, Any] = field(default_factory=dict)
    comparison: dict[str, Any] | None = None  # compare_runs(), when other runs were named
    chosen_as: str = "given"  # how the run was chosen: given, the latest full run, or the newest rows

    def to_json(self) -> dict[str, Any]:
        doc = {"run_id": self.run_id, "output": self.output_uri, "data": self.data_root, "overall": self.overall,
               "products": {p: r.metrics for p, r in sorted(self.products.items())}}
        return doc | ({"comparison": self.comparison} if self.comparison else {})


@dataclass
class Matched:
    """One run's rows matched to the ground truth: scored (ok) rows by product, and what was not scored."""

    scored: dict[str, Scored] = field(default_factory=lambda: defaultdict(dict))
    errors: Counter = field(default_factory=Counter)
    unmatched: Counter = field(default_factory=Counter)
    missing: Counter = field(default_factory=Counter)


def latest_full_run(output_uri: str, table: pa.Table, cfg: StorageConfig | None = None) -> str | None:
    """The latest run (by start) whose manifest says it ran in full mode and that has rows in `table`; None when
    no manifest says so (manifests from before the mode was recorded)."""
    with_rows = set(pc.unique(table.column("run_id")).to_pylist())
    full = [r.run_id for r in read_runs(output_uri, cfg) if r.mode == "full" and r.run_id in with_rows]
    return full[-1] if full else None


def select_run(table: pa.Table, run_id: str | None) -> tuple[str, pa.Table]:
    """The rows of `run_id`, or of the latest run (the one with the newest ``audited_at``) when it is None."""
    if run_id is None:
        latest = pc.max(table.column("audited_at"))
        run_id = table.filter(pc.equal(table.column("audited_at"), latest)).column("run_id")[0].as_py()
    rows = table.filter(pc.equal(table.column("run_id"), run_id))
    if not rows.num_rows:
        known = sorted(set(table.column("run_id").to_pylist()))
        raise EvaluationError(f"no rows of run {run_id!r}; runs in the output: {', '.join(known)}")
    return run_id, rows


def score_map(row: dict[str, Any]) -> np.ndarray:
    """The stored anomaly map in score units: pixel value v means ``v / 255 * map_max``."""
    return decode_gray_png(row["anomaly_map_png"]).astype(np.float64) * (float(row["map_max"]) / 255.0)


def pixel_counts(rows: list[dict[str, Any]], truths: list[Truth], cfg: StorageConfig | None = None
                 ) -> metrics.PixelCounts:
    """Pixel counts of the rows that have a map and a mask (normal images: an empty mask), masks resized to
    the map with nearest neighbour."""
    usable = [(r, t) for r, t in zip(rows, truths)
              if r["anomaly_map_png"] is not None and r["map_max"] is not None and (t.mask_uri or not t.anomalous)]
    with ThreadPoolExecutor(max_workers=8) as pool:  # masks on S3: overlap the GETs
        masks = pool.map(lambda t: read_mask(t, cfg), [t for _, t in usable])
        counts = metrics.PixelCounts()
        for (row, _), data in zip(usable, masks):
            scores = score_map(row)
            mask = np.zeros(scores.shape, bool)
            if data is not None:
                h, w = scores.shape
                mask = cv2.resize(data.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST) > 0
            counts.add(scores, mask)
    return counts


def group_metrics(rows: list[dict[str, Any]], truths: list[Truth], pixels: metrics.PixelCounts) -> dict[str, Any]:
    """Every metric of one group of scored rows (a product, or all of them pooled)."""
    return decision_metrics(rows, truths) | {"pixel_auroc": metrics.pixel_auroc(pixels),
                                             "aupro": metrics.aupro(pixels), "n_pixel_images": pixels.images}


def match_rows(table: pa.Table, truth: dict[str, Truth], data_root: str) -> Matched:
    """Match a run's rows to test images; of several rows of one image the newest counts."""
    matched, seen = Matched(), set()
    for row in sorted(table.to_pylist(), key=lambda r: r["audited_at"], reverse=True):
        t = truth.get(relative_path(row["image_uri"], data_root) or "")
        if t:
            seen.add(t.path)
        if row["status"] != "ok":
            matched.errors[t.product if t else row["product"]] += 1
        elif t is None:
            matched.unmatched[row["product"]] += 1
        else:
            matched.scored[t.product].setdefault(t.path, (row, t))
    matched.missing.update(t.product for t in truth.values() if t.path not in seen)
    return matched


def evaluate(output_uri: str, data_root: str, run_id: str | None = None, cfg: StorageConfig | None = None,
             compare: Sequence[str] = (), layout: str | None = None) -> Evaluation:
    """Metrics of one run of an inspect output against the data root's ground truth; with `compare`, also
    :func:`compare_runs` of that run (the baseline) and the named ones. `layout`: the data root's
    (`eagle.io.layouts`; None: detected)."""
    table = read_rows(output_uri, ROW_COLUMNS, cfg)
    if not table.num_rows:
        raise EvaluationError(f"no output rows under {output_uri}")
    chosen_as = "given"
    if run_id is None:
        run_id = latest_full_run(output_uri, table, cfg)
        chosen_as = "the latest full run" if run_id else "the run with the newest rows (no manifest says full)"
    run_id, run_rows = select_run(table, run_id)
    truth = load_ground_truth(data_root, cfg, layout)
    if not truth:
        raise EvaluationError(f"no test images under {data_root} (expected {{product}}/test/{{defect}}/*)")
    matched = match_rows(run_rows, truth, data_root)
    result = Evaluation(run_id, output_uri, data_root, chosen_as=chosen_as)
    all_rows, all_truths, all_pixels = [], [], metrics.PixelCounts()
    for product in sorted(set(matched.scored) | set(matched.errors) | set(matched.unmatched)):
        pairs = list(matched.scored[product].values())
        rows, truths = [r for r, _ in pairs], [t for _, t in pairs]
        pixels = pixel_counts(rows, truths, cfg)
        m = group_metrics(rows, truths, pixels)
        m.update(n_errors=matched.errors[product], n_unmatched=matched.unmatched[product],
                 n_missing=matched.missing[product])
        result.products[product] = ProductResult(product, rows, truths, m)
        all_rows += rows
        all_truths += truths
        all_pixels = all_pixels.merge(pixels)
    overall = group_metrics(all_rows, all_truths, all_pixels)
    overall.update(n_errors=sum(matched.errors.values()), n_unmatched=sum(matched.unmatched.values()),
                   n_missing=sum(matched.missing[p] for p in result.products),
                   n_test_images=len(truth), n_test_images_with_rows=len(truth) - sum(matched.missing.values()),
                   product_mean={k: mean(r.metrics[k] for r in result.products.values() if r.metrics[k] is not None)
                                 for k in ("image_auroc", "pixel_auroc", "aupro")})
    result.overall = overall
    others = [r for r in dict.fromkeys(compare) if r != run_id]
    if others:
        runs = {run_id: _flat(matched)} | {r: _flat(match_rows(select_run(table, r)[1], truth, data_root))
                                           for r in others}
        result.comparison = compare_runs(runs)
        if not result.comparison["n_common_images"]:
            raise EvaluationError(f"runs {', '.join(runs)} have no scored test image in common")
    return result


def _flat(matched: Matched) -> Scored:
    return {path: pair for scored in matched.scored.values() for path, pair in scored.items()}


def load_train_scores(model_store: str, product: str, version: str | None,
                      cfg: StorageConfig | None = None) -> tuple[list[float], str] | None:
    """A product's training scores and the file they came from: ``threshold.scores`` of the expert artifact
    (the current version when None); None when there is no such artifact. The memory bank is not read."""
    try:
        meta = read_meta(model_store, product, version or "latest", cfg)
    except ArtifactError:
        return None
    scores = meta.get("threshold", {}).get("scores")
    return ([float(v) for v in scores], meta["uri"]) if scores else None


def model_version(result: ProductResult) -> str | None:
    """The expert artifact version most of a product's rows were scored with."""
    versions = Counter(r["expert_model_version"] for r in result.rows if r["expert_model_version"])
    return versions.most_common(1)[0][0] if versions else None
