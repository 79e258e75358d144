"""The evaluation as one self-contained HTML page (figures and thumbnails inline as PNG data URIs, no scripts,
no external styles), plus ``metrics.json``.

Per product: a metric table, score histograms (training scores from the expert artifact, normal and defective
test images, threshold line — the paper's figure), the image ROC curve and a gallery of the worst false
positives and false negatives of the final verdict. Overall: a table of every product and all together, and
all ROC curves in one plot.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from eagle.config import InputConfig, StorageConfig
from eagle.evaluation.metrics import auroc
from eagle.evaluation.scorecard import Evaluation, ProductResult, Truth
from eagle.expert.regions import decode_gray_png
from eagle.io import storage
from eagle.io.images import decode_image

TrainScores = dict[str, tuple[list[float], str] | None]  # product -> (scores, source meta.json URI)
GALLERY_SIZE = 6
THUMB = 192  # longer side of gallery thumbnails, pixels
RED, GREEN = (255, 0, 0), (0, 200, 0)

# (path into a metrics dict, label) in table order.
TABLE_ROWS: list[tuple[str, str]] = [
    ("n_images", "images scored"), ("n_normal", "normal"), ("n_defective", "defective"),
    ("n_errors", "error rows (excluded)"), ("n_unmatched", "rows outside the test set"),
    ("n_missing", "test images without a row"),
    ("image_auroc", "image AUROC (expert score)"), ("fpr_at_threshold", "FPR at threshold (normal images)"),
    ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (FPR ≤ 0.3)"), ("n_pixel_images", "images with map"),
    *[(f"{who}.{k}", f"{who} {k}") for who in ("expert", "final")
      for k in ("precision", "recall", "f1", "accuracy", "tp", "fp", "tn", "fn")],
    ("mllm_calls_per_image", "MLLM calls per image"), ("guided_share", "guided share"),
    ("attention_share.correct", "attention share, correct answers"), ("attention_share.n_correct", "correct answers"),
    ("attention_share.wrong", "attention share, wrong answers"), ("attention_share.n_wrong", "wrong answers"),
]

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
.gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.card { width: 200px; font-size: 0.8em; border: 1px solid #ddd; padding: 4px; }
.card img { max-width: 192px; display: block; }
.muted { color: #777; }
"""


def _lookup(metrics: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        metrics = metrics.get(key) if isinstance(metrics, dict) else None
    return metrics


def format_value(value: Any) -> str:
    """A metric for people: 3 decimals, 'n/a' when undefined."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def metrics_table(columns: dict[str, dict[str, Any]]) -> str:
    """A table with one column per metrics dict (a product, or 'overall') and one row per metric."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in columns)
    body = "".join(f"<tr><td>{html.escape(label)}</td>"
                   + "".join(f"<td>{format_value(_lookup(m, path))}</td>" for m in columns.values()) + "</tr>"
                   for path, label in TABLE_ROWS)
    return f"<table><tr><th>metric</th>{head}</tr>{body}</table>"


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _figure_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return _data_uri(buf.getvalue())


def _labels_scores(result: ProductResult) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([t.anomalous for t in result.truths], bool),
            np.array([r["expert_score"] for r in result.rows], float))


def histogram_figure(result: ProductResult, train: tuple[list[float], str] | None) -> str:
    """Score histograms (density) of training, normal-test and defective-test images, threshold and score_max."""
    anomalous, scores = _labels_scores(result)
    series = [("training", np.asarray(train[0]) if train else np.array([]), "tab:gray"),
              ("test normal", scores[~anomalous], "tab:blue"), ("test defective", scores[anomalous], "tab:orange")]
    series = [s for s in series if s[1].size]
    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.add_subplot()
    if series:
        edges = np.histogram_bin_edges(np.concatenate([s[1] for s in series]), bins=30)
        for label, values, colour in series:
            ax.hist(values, bins=edges, density=True, alpha=0.5, color=colour, label=f"{label} (n={values.size})")
    for key, style, name in (("threshold", "--", "threshold"), ("score_max", ":", "score_max")):
        for value in sorted({r[key] for r in result.rows if r[key] is not None}):
            ax.axvline(value, color="red", linestyle=style, label=f"{name} {value:.3g}")
    ax.set(xlabel="expert score", ylabel="density", title=f"{result.product}: expert scores")
    ax.legend(fontsize=7)
    return _figure_uri(fig)


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> str:
    """Image ROC curves of (labels, scores) per name; a name with one class only is listed as undefined."""
    fig = Figure(figsize=(4, 3.6))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#bbb", linewidth=0.8)
    undefined = []
    for name, (anomalous, scores) in curves.items():
        area = auroc(anomalous, scores)
        if area is None:
            undefined.append(name)
            continue
        fpr, tpr, _ = roc_curve(anomalous, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {area:.3f})")
    if undefined:
        ax.text(0.03, 0.97, "AUROC undefined (one class): " + ", ".join(undefined), ha="left", va="top",
                fontsize=7)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.02))
    if len(undefined) < len(curves):
        ax.legend(fontsize=7, loc="lower right")
    return _figure_uri(fig)


def _png_gray(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """An 8-bit PNG resized (nearest) to ``(width, height)`` as a boolean mask."""
    return cv2.resize(decode_gray_png(data), size, interpolation=cv2.INTER_NEAREST) > 0


def thumbnail(row: dict[str, Any], truth: Truth, cfg: StorageConfig | None = None) -> str:
    """The image, its longer side scaled to THUMB, with the expert's mask and boxes in red and the
    ground-truth outline in green, as a PNG data URI."""
    image = decode_image(storage.read_bytes(row["image_uri"], cfg), InputConfig().max_image_pixels)
    h, w = image.shape[:2]
    scale = THUMB / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    thumb = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if row["mask_png"]:
        mask = _png_gray(row["mask_png"], size)
        thumb[mask] = (0.55 * thumb[mask] + 0.45 * np.array(RED)).astype(np.uint8)
    sx, sy = size[0] / (row["width"] or w), size[1] / (row["height"] or h)
    for box in row["boxes"] or []:
        cv2.rectangle(thumb, (round(box["x1"] * sx), round(box["y1"] * sy)),
                      (round(box["x2"] * sx), round(box["y2"] * sy)), RED, 2)
    if truth.mask_uri:
        outline = _png_gray(storage.read_bytes(truth.mask_uri, cfg), size).astype(np.uint8)
        contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(thumb, contours, -1, GREEN, 1)
    return _data_uri(cv2.imencode(".png", cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR))[1].tobytes())


def worst_errors(result: ProductResult, n: int = GALLERY_SIZE) -> dict[str, list[tuple[dict[str, Any], Truth]]]:
    """False positives by descending and false negatives by ascending expert score (final verdict)."""
    pairs = list(zip(result.rows, result.truths))
    fp = [p for p in pairs if not p[1].anomalous and p[0]["verdict"] == "anomalous"]
    fn = [p for p in pairs if p[1].anomalous and p[0]["verdict"] != "anomalous"]
    return {"false positives": sorted(fp, key=lambda p: -p[0]["expert_score"])[:n],
            "false negatives": sorted(fn, key=lambda p: p[0]["expert_score"])[:n]}


def _card(row: dict[str, Any], truth: Truth, cfg: StorageConfig | None) -> str:
    try:
        picture = f'<img alt="{html.escape(truth.path)}" src="{thumbnail(row, truth, cfg)}">'
    except (OSError, ValueError) as exc:  # a missing or undecodable image must not cost the report
        picture = f'<p class="muted">image unavailable: {html.escape(str(exc))}</p>'
    answer = row["answer"] or "not asked"
    lines = [f"<b>{html.escape(truth.path)}</b>", f"truth: {html.escape(truth.defect)}",
             f"score {row['expert_score']:.4g} (threshold {format_value(row['threshold'])})",
             f"expert: {html.escape(str(row['expert_verdict']))}, MLLM: {html.escape(answer)}, "
             f"final: {html.escape(str(row['verdict']))}", html.escape(row["explanation"] or "")]
    return f'<div class="card">{picture}{"<br>".join(lines)}</div>'


def gallery(result: ProductResult, cfg: StorageConfig | None = None) -> str:
    parts = []
    with ThreadPoolExecutor(max_workers=8) as pool:  # thumbnails read from S3: overlap the GETs
        for title, pairs in worst_errors(result).items():
            cards = list(pool.map(lambda p: _card(*p, cfg), pairs))
            body = f'<div class="gallery">{"".join(cards)}</div>' if cards else f'<p class="muted">No {title}.</p>'
            parts.append(f"<h3>Worst {title}</h3>{body}")
    return "".join(parts)


def _figure(ident: str, uri: str, caption: str) -> str:
    return (f'<figure id="{ident}"><img alt="{html.escape(caption)}" src="{uri}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def product_section(result: ProductResult, train: tuple[list[float], str] | None,
                    cfg: StorageConfig | None = None) -> str:
    p = html.escape(result.product)
    source = (f"training scores: {len(train[0])} from {train[1]}" if train
              else "training scores: not available (no --model-store, or no artifact with scores)")
    return (f'<section id="product-{p}"><h2>{p}</h2>'
            f'<div id="metrics-{p}">{metrics_table({result.product: result.metrics})}</div>'
            + _figure(f"hist-{p}", histogram_figure(result, train), f"Score histograms; {source}")
            + _figure(f"roc-{p}", roc_figure({result.product: _labels_scores(result)}, f"{result.product}: ROC"),
                      "Image ROC of the expert score")
            + f'<div id="gallery-{p}"><p class="muted">Red: expert mask and boxes; green: ground-truth outline. '
              f"Errors of the final verdict.</p>{gallery(result, cfg)}</div></section>")


def render(evaluation: Evaluation, train: TrainScores, cfg: StorageConfig | None = None) -> str:
    """The whole report page."""
    columns = {p: r.metrics for p, r in sorted(evaluation.products.items())} | {"overall": evaluation.overall}
    curves = {p: _labels_scores(r) for p, r in sorted(evaluation.products.items())}
    means = ", ".join(f"{k} {format_value(v)}" for k, v in evaluation.overall["product_mean"].items())
    header = (f"<h1>EAGLE audit evaluation</h1><p>run <b>{html.escape(evaluation.run_id)}</b> · output "
              f"{html.escape(evaluation.output_uri)} · data {html.escape(evaluation.data_root)} · generated "
              f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC</p>")
    overall = (f'<section id="overall"><h2>Overall</h2><p>Mean over products: {html.escape(means)}</p>'
               f'<div id="metrics-overall">{metrics_table(columns)}</div>'
               + _figure("roc-overall", roc_figure(curves, "Image ROC per product"), "Image ROC per product")
               + "</section>")
    sections = "".join(product_section(r, train.get(p), cfg) for p, r in sorted(evaluation.products.items()))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>EAGLE evaluation '
            f"{html.escape(evaluation.run_id)}</title><style>{CSS}</style></head><body>{header}{overall}"
            f"{sections}</body></html>")


def write_outputs(evaluation: Evaluation, out: str, train: TrainScores,
                  cfg: StorageConfig | None = None) -> tuple[str, str]:
    """Write ``metrics.json`` and ``report.html`` under `out` (local or s3://); returns their URIs."""
    metrics_uri, report_uri = storage.join(out, "metrics.json"), storage.join(out, "report.html")
    storage.write_bytes(metrics_uri, json.dumps(evaluation.to_json(), indent=2, allow_nan=False).encode(), cfg)
    storage.write_bytes(report_uri, render(evaluation, train, cfg).encode(), cfg)
    return metrics_uri, report_uri
