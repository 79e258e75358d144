"""Score an inspect run against the ground truth of an MVTec-AD-layout root, per product and overall.

Labels come from folder names (``{product}/test/good`` normal, any other ``test/{defect}`` defective), masks
from ``{product}/ground_truth/{defect}/{stem}_mask.png``. Output rows are matched to test images by their path
relative to the data root, so the root may be local or ``s3://`` while the rows carry full URIs. Error rows
and rows of images outside the root's test sets are counted, never scored.
"""

from __future__ import annotations

import posixpath
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from eagle.config import IMAGE_EXTENSIONS, StorageConfig
from eagle.evaluation import metrics
from eagle.expert.artifact import ArtifactError, read_meta
from eagle.expert.regions import decode_gray_png
from eagle.io import storage
from eagle.io.runs import read_rows

ROW_COLUMNS = ["run_id", "audited_at", "image_uri", "product", "width", "height", "status", "error",
               "expert_score", "threshold", "score_max", "expert_verdict", "boxes", "mask_png", "anomaly_map_png",
               "map_max", "mllm_ran", "guided", "answer", "verdict", "explanation", "image_attention_share",
               "expert_model_version"]
NORMAL = "good"


class EvaluationError(ValueError):
    """Nothing to evaluate: no output rows, no such run, or no test images under the data root."""


@dataclass(frozen=True)
class Truth:
    """One test image of the data root."""

    path: str  # relative to the root: {product}/test/{defect}/{name}
    product: str
    defect: str
    mask_uri: str | None  # None for normal images and defective ones without a mask file

    @property
    def anomalous(self) -> bool:
        return self.defect != NORMAL


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

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "output": self.output_uri, "data": self.data_root, "overall": self.overall,
                "products": {p: r.metrics for p, r in sorted(self.products.items())}}


def relative_path(uri: str, root: str) -> str | None:
    """`uri`'s path below `root` (schemes stripped, so local paths, ``file://`` and ``s3://`` all work)."""
    base, path = storage.strip_scheme(root).rstrip("/"), storage.strip_scheme(uri)
    return path[len(base) + 1:] if path.startswith(base + "/") else None


def load_ground_truth(root: str, cfg: StorageConfig | None = None) -> dict[str, Truth]:
    """Every test image under an MVTec-AD-layout root, by path relative to the root."""
    files = [relative_path(f.uri, root) for f in storage.list_files(root, IMAGE_EXTENSIONS, cfg)]
    masks = {p for p in files if p and p.split("/")[1:2] == ["ground_truth"]}
    truths = {}
    for path in files:
        parts = path.split("/") if path else []
        if len(parts) != 4 or parts[1] != "test":
            continue
        product, _, defect, name = parts
        mask = f"{product}/ground_truth/{defect}/{posixpath.splitext(name)[0]}_mask.png"
        has_mask = defect != NORMAL and mask in masks
        truths[path] = Truth(path, product, defect, storage.join(root, mask) if has_mask else None)
    return truths


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
        masks = pool.map(lambda t: t.mask_uri and storage.read_bytes(t.mask_uri, cfg), [t for _, t in usable])
        counts = metrics.PixelCounts()
        for (row, _), data in zip(usable, masks):
            scores = score_map(row)
            mask = np.zeros(scores.shape, bool)
            if data:
                h, w = scores.shape
                mask = cv2.resize(decode_gray_png(data), (w, h), interpolation=cv2.INTER_NEAREST) > 0
            counts.add(scores, mask)
    return counts


def _flags(rows: Iterable[dict[str, Any]], key: str, value: Any = True) -> np.ndarray:
    return np.array([r[key] == value for r in rows], bool)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def attention_by_correctness(rows: list[dict[str, Any]], anomalous: np.ndarray) -> dict[str, Any]:
    """Mean image-attention share inside the expert's region for correct and for wrong MLLM answers."""
    shares: dict[bool, list[float]] = {True: [], False: []}
    for row, truth in zip(rows, anomalous):
        share = row["image_attention_share"]
        if row["answer"] in ("yes", "no") and share is not None and np.isfinite(share):
            shares[(row["answer"] == "yes") == truth].append(share)
    return {"correct": _mean(shares[True]), "wrong": _mean(shares[False]),
            "n_correct": len(shares[True]), "n_wrong": len(shares[False])}


def group_metrics(rows: list[dict[str, Any]], truths: list[Truth], pixels: metrics.PixelCounts) -> dict[str, Any]:
    """Every metric of one group of scored rows (a product, or all of them)."""
    anomalous = np.array([t.anomalous for t in truths], bool)
    scores = np.array([r["expert_score"] for r in rows], float)
    thresholds = np.array([r["threshold"] for r in rows], float)
    mllm = _flags(rows, "mllm_ran")
    return {
        "n_images": len(rows), "n_normal": int((~anomalous).sum()), "n_defective": int(anomalous.sum()),
        "image_auroc": metrics.auroc(anomalous, scores),
        "fpr_at_threshold": metrics.fpr_at_threshold(anomalous, scores, thresholds),
        "expert": metrics.binary_stats(anomalous, _flags(rows, "expert_verdict", "anomalous")),
        "final": metrics.binary_stats(anomalous, _flags(rows, "verdict", "anomalous")),
        "pixel_auroc": metrics.pixel_auroc(pixels), "aupro": metrics.aupro(pixels), "n_pixel_images": pixels.images,
        "mllm_calls": int(mllm.sum()), "mllm_calls_per_image": _mean(mllm),
        "guided_share": _mean(_flags(rows, "guided")),
        "attention_share": attention_by_correctness(rows, anomalous),
    }


def evaluate(output_uri: str, data_root: str, run_id: str | None = None,
             cfg: StorageConfig | None = None) -> Evaluation:
    """Metrics of one run of an inspect output against the data root's ground truth."""
    table = read_rows(output_uri, ROW_COLUMNS, cfg)
    if not table.num_rows:
        raise EvaluationError(f"no output rows under {output_uri}")
    run_id, table = select_run(table, run_id)
    truth = load_ground_truth(data_root, cfg)
    if not truth:
        raise EvaluationError(f"no test images under {data_root} (expected {{product}}/test/{{defect}}/*)")
    latest_first = sorted(table.to_pylist(), key=lambda r: r["audited_at"], reverse=True)
    errors, unmatched, seen = Counter(), Counter(), set()
    scored: dict[str, dict[str, tuple[dict[str, Any], Truth]]] = defaultdict(dict)
    for row in latest_first:
        t = truth.get(relative_path(row["image_uri"], data_root) or "")
        if t:
            seen.add(t.path)
        if row["status"] != "ok":
            errors[t.product if t else row["product"]] += 1
        elif t is None:
            unmatched[row["product"]] += 1
        else:
            scored[t.product].setdefault(t.path, (row, t))  # a duplicate row of one image: the newest counts
    missing = Counter(t.product for t in truth.values() if t.path not in seen)
    result = Evaluation(run_id, output_uri, data_root)
    all_rows, all_truths, all_pixels = [], [], metrics.PixelCounts()
    for product in sorted(set(scored) | set(errors) | set(unmatched)):
        pairs = list(scored[product].values())
        rows, truths = [r for r, _ in pairs], [t for _, t in pairs]
        pixels = pixel_counts(rows, truths, cfg)
        m = group_metrics(rows, truths, pixels)
        m.update(n_errors=errors[product], n_unmatched=unmatched[product], n_missing=missing[product])
        result.products[product] = ProductResult(product, rows, truths, m)
        all_rows += rows
        all_truths += truths
        all_pixels = all_pixels.merge(pixels)
    overall = group_metrics(all_rows, all_truths, all_pixels)
    overall.update(n_errors=sum(errors.values()), n_unmatched=sum(unmatched.values()),
                   n_missing=sum(missing[p] for p in result.products),
                   product_mean={k: _mean(r.metrics[k] for r in result.products.values()
                                          if r.metrics[k] is not None)
                                 for k in ("image_auroc", "pixel_auroc", "aupro")})
    result.overall = overall
    return result


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
