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
from eagle.io.runs import RunInfo, mllm_family, read_rows, read_runs

ROW_COLUMNS = ["run_id", "audited_at", "image_uri", "product", "width", "height", "status", "error", "error_stage",
               "expert_score", "threshold", "score_max", "expert_verdict", "confidence", "boxes", "mask_png",
               "anomaly_map_png", "map_max", "mllm_ran", "guided", "answer", "verdict", "explanation",
               "image_attention_share", "mllm_ms", "expert_model_version", "explanation_source", "mllm_reply",
               "mllm_model", "config_hash"]


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
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)  # run -> run_provenance(), this run first

    def to_json(self) -> dict[str, Any]:
        doc = {"run_id": self.run_id, "chosen_as": self.chosen_as, "output": self.output_uri, "data": self.data_root,
               "provenance": self.provenance, "overall": self.overall,
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


def infer_routing(asked: set[str], not_asked: set[str]) -> str | None:
    """The routing policy the rows show (which expert confidence bands were sent to the MLLM), None when they
    do not tell (no call at all, or bands both asked and not)."""
    if not asked or asked & not_asked:
        return None
    if "confident_normal" in asked:
        return "all"
    return "not-confident-normal" if "confident_anomalous" in asked else "uncertain"


def _distinct(rows: pa.Table, column: str) -> list[Any]:
    return sorted(v for v in pc.unique(rows.column(column)).to_pylist() if v not in (None, ""))


def _expert_models(versions: list[str]) -> str:
    """Expert models from the rows' ``expert_model_version``: an ensemble's 'model:version+…' names its
    members; a single model's content hash is shown as such."""
    models = sorted({part.split(":", 1)[0] for v in versions if ":" in v for part in v.split("+")})
    if models:
        return "ensemble " + " + ".join(models)
    return f"{len(versions)} artifact version{'s' if len(versions) != 1 else ''}" if versions else "n/a"


def run_provenance(rows: pa.Table, info: RunInfo | None) -> dict[str, Any]:
    """What produced one run's rows: routing policy, MLLM model and family, guidance, expert models, config
    hash, mode and status; from the run manifest's settings where it has them, else read off the rows
    (``source`` says which)."""
    settings = info.settings if info else {}
    ok = rows.filter(pc.equal(rows.column("status"), "ok"))
    ran = ok.column("mllm_ran").fill_null(False)
    asked, not_asked = set(_distinct(ok.filter(ran), "confidence")), set(_distinct(ok.filter(pc.invert(ran)),
                                                                                   "confidence"))
    models = _distinct(ok, "mllm_model")
    model = settings.get("mllm_model") or ", ".join(models) or None
    expert = settings.get("expert_ensemble") or settings.get("expert_model")
    hashes = _distinct(rows, "config_hash")
    return {
        "routing": settings.get("routing") or infer_routing(asked, not_asked) or ("none" if not model else "unknown"),
        "mllm_model": model,
        "mllm_family": settings.get("mllm_family") or (mllm_family(models[0]) if models else None),
        "guidance": settings["guidance"] if "guidance" in settings else bool(pc.any(ok.column("guided")).as_py()),
        "expert": (" + ".join(expert) if isinstance(expert, list) else expert or "") + (" · " if expert else "")
        + _expert_models(_distinct(ok, "expert_model_version")),
        "config_hash": ", ".join(hashes) or "n/a", "mode": info.mode if info else "unknown",
        "status": info.status if info else "unknown", "source": "run manifest" if settings else "rows",
    }


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
    manifests = {r.run_id: r for r in read_runs(output_uri, cfg)}
    result.provenance = {run_id: run_provenance(run_rows, manifests.get(run_id))}
    result.provenance |= {r: run_provenance(select_run(table, r)[1], manifests.get(r)) for r in others}
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
