"""Evaluation: metrics on hand-computed cases, ground truth from the MVTec layout, and jobs/evaluate.py end to end
on a hand-made inspect output next to a synthetic dataset (local, and on S3 in-process)."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from eagle.evaluation.metrics import PixelCounts, aupro, auroc, binary_stats, fpr_at_threshold, pixel_auroc
from eagle.evaluation.report import write_outputs
from eagle.evaluation.scorecard import EvaluationError, evaluate, load_ground_truth, load_train_scores, relative_path
from eagle.io import storage
from eagle.io.schema import to_table
from eagle.testing.synth import generate

# ------------------------------------------------------------------------------------------------ metrics


def test_auroc_perfect_inverted_tied_and_one_class():
    y = np.array([0, 0, 1, 1], bool)
    assert auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auroc(y, [0.1, 0.5, 0.5, 0.9]) == 0.875  # 3 wins + one tie (half) out of 4 pairs
    assert auroc(np.zeros(3, bool), [0.1, 0.2, 0.3]) is None
    assert auroc(np.ones(3, bool), [0.1, 0.2, 0.3]) is None


def test_binary_stats_hand_computed():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 0], bool)
    p = np.array([1, 1, 0, 1, 1, 0, 0, 0], bool)  # tp 2, fn 1, fp 2, tn 3
    stats = binary_stats(y, p)
    assert (stats["tp"], stats["fn"], stats["fp"], stats["tn"]) == (2, 1, 2, 3)
    assert stats["precision"] == pytest.approx(0.5)
    assert stats["recall"] == pytest.approx(2 / 3)
    assert stats["f1"] == pytest.approx(4 / 7)  # 2·tp / (2·tp + fp + fn)
    assert stats["accuracy"] == pytest.approx(5 / 8)
    none = binary_stats(y, np.zeros(8, bool))
    assert none["precision"] is None and none["recall"] == 0 and none["f1"] == 0


def test_fpr_at_threshold_counts_normals_at_or_above_their_threshold():
    anomalous = np.array([0, 0, 0, 0, 1], bool)
    scores = [0.5, 0.5, 0.7, 0.9, 0.0]
    thresholds = [0.5, 0.6, 0.7, 1.0, 0.1]  # per row: reached, not, reached (equal), not
    assert fpr_at_threshold(anomalous, scores, thresholds) == 0.5
    assert fpr_at_threshold(np.ones(2, bool), [1, 2], [0, 0]) is None


def counts(*pairs: tuple[np.ndarray, np.ndarray]) -> PixelCounts:
    out = PixelCounts()
    for score_map, mask in pairs:
        out.add(np.asarray(score_map, float), np.asarray(mask, bool))
    return out


def test_pixel_auroc_on_tiny_maps():
    map1, mask1 = [[0.9, 0.1], [0.4, 0.25]], [[1, 0], [0, 1]]  # defect pixels 0.9 and 0.25
    map2, mask2 = [[0.3, 0.25], [0.0, 0.1]], [[0, 0], [0, 0]]
    # normal pixels: 0.1, 0.4, 0.3, 0.25, 0.0, 0.1. 0.9 beats all 6; 0.25 beats 3 and ties 1 → 9.5 / 12.
    assert pixel_auroc(counts((map1, mask1), (map2, mask2))) == pytest.approx(9.5 / 12)
    assert pixel_auroc(counts((map2, mask2))) is None
    assert pixel_auroc(counts((np.ones((2, 2)), np.ones((2, 2))))) is None


def test_pixel_auroc_equals_auroc_over_all_pixels():
    rng = np.random.default_rng(1)
    maps = [np.round(rng.random((16, 16)), 2) for _ in range(4)]
    masks = [rng.random((16, 16)) > 0.8 for _ in range(4)]
    expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(counts(*zip(maps, masks))) == pytest.approx(expected, abs=1e-12)


def square_mask() -> np.ndarray:
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True
    return mask


def test_aupro_known_cases():
    mask = square_mask()
    assert aupro(counts((mask.astype(float), mask))) == pytest.approx(1.0)
    half = mask.copy()
    half[1, :] = False
    # Curve (fpr, pro): (0, 0) → (0, 0.5) at t=1 → (1, 1) at t=0. PRO at FPR 0.3 is 0.65, so the area is
    # 0.3 · (0.5 + 0.65) / 2 = 0.1725, normalised by 0.3: 0.575.
    assert aupro(counts((half.astype(float), mask))) == pytest.approx(0.575)
    # The same half score spread over two images, one region found and one missed.
    assert aupro(counts((mask.astype(float), mask), (np.zeros((6, 6)), mask))) == pytest.approx(0.575)
    # One region of 4 px (2 at score 2, 2 at 0.5) and 20 normal px (2 at score 1, the rest 0).
    region = np.zeros((4, 6), bool)
    region[0, :4] = True
    scores = np.zeros((4, 6))
    scores[0, :2], scores[0, 2:4], scores[3, :2] = 2.0, 0.5, 1.0
    # Curve: (0, .5) at t=2, (.1, .5) at t=1, (.1, 1) at t=.5, (1, 1) at t=0.
    # Area to 0.3: 0.1 · 0.5 + 0.2 · 1 = 0.25 → 0.25 / 0.3.
    assert aupro(counts((scores, region))) == pytest.approx(0.25 / 0.3)
    assert aupro(counts((np.ones((4, 4)), np.zeros((4, 4), bool)))) is None


def reference_aupro(maps: list[np.ndarray], masks: list[np.ndarray], limit: float = 0.3) -> float:
    """Brute force from the definition: every distinct score as a threshold, regions one by one."""
    regions = []
    for score_map, mask in zip(maps, masks):
        n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        regions += [score_map[labels == k] for k in range(1, n)]
    normal = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    ts = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fpr = np.array([0.0] + [(normal >= t).mean() for t in ts])
    pro = np.array([0.0] + [np.mean([(r >= t).mean() for r in regions]) for t in ts])
    i = int(np.argmax(fpr > limit))  # first point past the limit; the curve ends at (1, 1)
    at_limit = pro[i - 1] + (limit - fpr[i - 1]) * (pro[i] - pro[i - 1]) / (fpr[i] - fpr[i - 1])
    keep = fpr <= limit
    return float(np.trapezoid(np.append(pro[keep], at_limit), np.append(fpr[keep], limit)) / limit)


def test_aupro_matches_brute_force_on_random_maps():
    rng = np.random.default_rng(0)
    masks = [rng.random((12, 12)) > 0.85 for _ in range(3)] + [np.zeros((12, 12), bool)]
    maps = [rng.random((12, 12)) + 0.3 * m for m in masks]
    assert aupro(counts(*zip(maps, masks))) == pytest.approx(reference_aupro(maps, masks), abs=1e-9)


def test_pixel_counts_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        PixelCounts().add(np.zeros((4, 4)), np.zeros((4, 5), bool))


def test_relative_path_across_schemes(tmp_path):
    assert relative_path("s3://b/root/grid/test/good/000.png", "s3://b/root/") == "grid/test/good/000.png"
    assert relative_path(str(tmp_path / "grid/x.png"), f"file://{tmp_path}") == "grid/x.png"
    assert relative_path("s3://b/rootx/grid/x.png", "s3://b/root") is None


# ------------------------------------------------------------------------------------------------ end to end

SIZE, MAP = 64, 32  # image side; stored maps are smaller, so ground-truth masks must be resized to them
NEW = dt.datetime(2026, 5, 2, 12, tzinfo=dt.UTC)
OLD = NEW - dt.timedelta(days=1)


def png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array.astype(np.uint8))[1].tobytes()


def make_row(root: str, rel: str, score: float, *, verdict: str | None = None, answer: str | None = None,
             share: float | None = None, guided: bool = False, with_map: bool = True, run_id: str = "new",
             when: dt.datetime = NEW, mask: np.ndarray | None = None) -> dict[str, Any]:
    """An ok output row for test image `rel`. Its map is the ground truth at 255 with map_max 1 for a
    defective image, and 255 everywhere with map_max 0.1 for a normal one: in score units every defect
    pixel beats every normal pixel (1.0 > 0.1 > 0), in raw PNG values they would tie."""
    product, _, defect, _ = rel.split("/")
    expert = "anomalous" if score >= 0.5 else "normal"
    row = dict(run_id=run_id, audited_at=when, image_uri=storage.join(root, rel), product=product, width=SIZE,
               height=SIZE, status="ok", expert_score=score, threshold=0.5, score_max=0.92,
               threshold_method="k-sigma", expert_verdict=expert, mllm_ran=answer is not None, guided=guided,
               answer=answer, verdict=verdict or expert, explanation=f"explained {rel}", image_attention_share=share,
               expert_model_version="v1", audit_date=when.date().isoformat(), boxes=[])
    if with_map:
        if defect == "good":
            row.update(anomaly_map_png=png(np.full((MAP, MAP), 255)), map_max=0.1)
        else:
            row.update(anomaly_map_png=png(cv2.resize(mask, (MAP, MAP), interpolation=cv2.INTER_NEAREST)), map_max=1.0)
    if mask is not None:
        row.update(mask_png=png(cv2.resize(mask, (MAP, MAP), interpolation=cv2.INTER_NEAREST)),
                   boxes=[{"x1": 8, "y1": 8, "x2": 40, "y2": 40, "score": 1.0}])
    return row


def read_mask(root: str, rel: str) -> np.ndarray:
    product, _, defect, name = rel.split("/")
    data = storage.read_bytes(storage.join(root, product, "ground_truth", defect, name[:-4] + "_mask.png"))
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)


def grid_rows(root: str) -> list[dict[str, Any]]:
    """Grid's new run, constructed so that every metric has a hand-computed value (see test_end_to_end)."""
    m = {d: read_mask(root, f"grid/test/{d}/000.png") for d in ("scratch", "hole", "stain")}
    return [
        make_row(root, "grid/test/good/000.png", 0.1, answer="no", share=0.6),
        make_row(root, "grid/test/good/001.png", 0.2, answer="yes", share=0.4, verdict="anomalous"),  # final FP
        make_row(root, "grid/test/good/002.png", 0.9, answer="no", share=0.8, verdict="normal", guided=True),
        {**make_row(root, "grid/test/good/003.png", 0.0, with_map=False), "status": "error",
         "error": "corrupt or truncated image", "error_stage": "decode", "expert_score": None},
        make_row(root, "grid/test/scratch/000.png", 0.8, answer="no", share=0.1, verdict="normal",
                 mask=m["scratch"]),  # final FN
        make_row(root, "grid/test/hole/000.png", 0.95, with_map=False, mask=m["hole"]),
        make_row(root, "grid/test/stain/000.png", 0.15, mask=m["stain"]),  # expert and final FN
        {**make_row(root, "grid/test/good/000.png", 0.1), "image_uri": "/elsewhere/grid/000.png"},  # unmatched
    ]


def all_rows(root: str) -> list[dict[str, Any]]:
    nut = [make_row(root, f"nut/test/good/{i:03d}.png", s) for i, s in enumerate([0.1, 0.2, 0.3, 0.4])]
    old = [make_row(root, r, 1.0 if "good" not in r else 0.0, run_id="old", when=OLD, with_map=False)
           for r in ("grid/test/good/000.png", "grid/test/hole/000.png")]
    return grid_rows(root) + nut + old


def write_output(out: str, rows: list[dict[str, Any]]) -> None:
    """Hive-partitioned Parquet as the inspect job writes it (partition columns only in the path)."""
    keys = sorted({(r["product"], r["audit_date"]) for r in rows})
    for product, date in keys:
        part = [r for r in rows if (r["product"], r["audit_date"]) == (product, date)]
        buf = io.BytesIO()
        pq.write_table(to_table(part).drop_columns(["product", "audit_date"]), buf)
        storage.write_bytes(storage.join(out, f"product={product}", f"audit_date={date}", "run_a000_0.parquet"),
                            buf.getvalue())


def write_artifact(store: str) -> None:
    """The expert artifact's meta.json, as eagle/expert/artifact.py writes it (the tensors are not read)."""
    doc = {"format": "eagle-expert/1", "threshold": {"method": "k-sigma", "value": 0.5, "score_max": 0.92,
                                                     "scores": [0.05, 0.1, 0.12, 0.2, 0.3]}}
    storage.write_bytes(storage.join(store, "grid", "v1", "meta.json"), json.dumps(doc).encode())
    storage.write_bytes(storage.join(store, "grid", "LATEST"), b"v1\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("evaluate")
    data = str(base / "data")
    generate(data, ["grid", "nut"], n_train=1, n_test_good=4, n_test_defect=1, size=SIZE, seed=3)
    write_output(str(base / "audit"), all_rows(data))
    write_artifact(str(base / "models"))
    return base


def test_ground_truth_matches_labels_csv(workspace):
    data = str(workspace / "data")
    truth = load_ground_truth(data)
    with open(workspace / "data" / "labels.csv") as fh:
        tests = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    assert sorted(truth) == sorted(r["path"] for r in tests)
    for r in tests:
        t = truth[r["path"]]
        assert (t.product, t.defect, t.anomalous) == (r["product"], r["defect"], r["defect"] != "good")
        assert t.mask_uri == (storage.join(data, r["mask_path"]) if r["mask_path"] else None)


def section(html: str, ident: str) -> str:
    start = html.index(f'id="{ident}"')
    end = html.find("<section", start)
    return html[start:end if end > 0 else None]


def test_end_to_end(workspace, repo_root):
    out = workspace / "eval"
    cmd = [sys.executable, str(repo_root / "jobs" / "evaluate.py"), "--output", str(workspace / "audit"),
           "--data", str(workspace / "data"), "--model-store", str(workspace / "models"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run_id"] == "new"  # the latest run by audited_at
    grid, nut, overall = metrics["products"]["grid"], metrics["products"]["nut"], metrics["overall"]

    assert (grid["n_images"], grid["n_normal"], grid["n_defective"]) == (6, 3, 3)
    assert (grid["n_errors"], grid["n_unmatched"], grid["n_missing"]) == (1, 1, 0)
    # normals 0.1 0.2 0.9 vs defective 0.8 0.95 0.15: 2 + 3 + 1 of 9 pairs.
    assert grid["image_auroc"] == pytest.approx(6 / 9)
    assert grid["fpr_at_threshold"] == pytest.approx(1 / 3)
    expert, final = grid["expert"], grid["final"]
    assert (expert["tp"], expert["fp"], expert["tn"], expert["fn"]) == (2, 1, 2, 1)
    assert expert["precision"] == expert["recall"] == expert["f1"] == pytest.approx(2 / 3)
    assert expert["accuracy"] == pytest.approx(4 / 6)
    assert (final["tp"], final["fp"], final["tn"], final["fn"]) == (1, 1, 2, 2)
    assert (final["precision"], final["recall"]) == (pytest.approx(1 / 2), pytest.approx(1 / 3))
    assert (final["f1"], final["accuracy"]) == (pytest.approx(2 / 5), pytest.approx(1 / 2))
    # Maps in score units separate defect pixels perfectly; the hole image has no map.
    assert grid["pixel_auroc"] == pytest.approx(1.0) and grid["aupro"] == pytest.approx(1.0)
    assert grid["n_pixel_images"] == 5
    assert grid["mllm_calls"] == 4 and grid["mllm_calls_per_image"] == pytest.approx(4 / 6)
    assert grid["guided_share"] == pytest.approx(1 / 6)
    assert grid["attention_share"] == {"correct": pytest.approx(0.7), "wrong": pytest.approx(0.25),
                                       "n_correct": 2, "n_wrong": 2}

    # nut: normal images only (its defective ones were not audited): undefined, not a crash.
    assert (nut["n_images"], nut["n_missing"]) == (4, 4)
    assert nut["image_auroc"] is None and nut["pixel_auroc"] is None and nut["aupro"] is None
    assert nut["final"]["precision"] is None and nut["fpr_at_threshold"] == 0.0

    assert (overall["n_images"], overall["n_errors"], overall["n_unmatched"]) == (10, 1, 1)
    # pooled: defective 0.8 (beats 6 of 7 normals), 0.95 (7), 0.15 (2) → 15 / 21.
    assert overall["image_auroc"] == pytest.approx(15 / 21)
    assert overall["product_mean"]["image_auroc"] == pytest.approx(6 / 9)

    html = (out / "report.html").read_text()
    for ident in ["overall", "metrics-overall", "roc-overall"] + [f"{k}-{p}" for p in ("grid", "nut")
                                                                  for k in ("product", "metrics", "hist", "roc",
                                                                            "gallery")]:
        assert f'id="{ident}"' in html, ident
    assert "training scores: 5 from" in section(html, "product-grid")
    assert "training scores: not available" in section(html, "product-nut")
    gallery = section(html, "gallery-grid")
    fp, fn = gallery.split("Worst false negatives")
    assert "grid/test/good/001.png" in fp and "grid/test/good/002.png" not in fp
    assert fn.index("grid/test/stain/000.png") < fn.index("grid/test/scratch/000.png")  # lowest score first
    assert "No false positives" in section(html, "gallery-nut")
    sources = re.findall(r'<img[^>]*src="([^"]*)"', html)
    assert len(sources) == 3 + 2 + 2 + 1  # grid: hist, roc, 3 thumbnails; nut: hist, roc; overall roc
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"https?://|<script|<link", html)


def test_explicit_run_and_unknown_run(workspace):
    old = evaluate(str(workspace / "audit"), str(workspace / "data"), run_id="old")
    assert old.run_id == "old" and old.overall["n_images"] == 2 and old.overall["image_auroc"] == 1.0
    with pytest.raises(EvaluationError, match="runs in the output: new, old"):
        evaluate(str(workspace / "audit"), str(workspace / "data"), run_id="nope")


def test_on_s3(s3_bucket, tmp_path):
    data, audit, store, out = (f"{s3_bucket}/{d}" for d in ("data", "audit", "models", "eval"))
    generate(data, ["grid"], n_train=1, n_test_good=4, n_test_defect=1, size=SIZE, seed=3)
    write_output(audit, grid_rows(data))
    write_artifact(store)
    result = evaluate(audit, data)
    train = {"grid": load_train_scores(store, "grid", None)}  # version from LATEST
    assert train["grid"] == ([0.05, 0.1, 0.12, 0.2, 0.3], f"{store}/grid/v1/meta.json")
    metrics_uri, report_uri = write_outputs(result, out, train)
    metrics = json.loads(storage.read_bytes(metrics_uri))
    assert metrics["products"]["grid"]["image_auroc"] == pytest.approx(6 / 9)
    assert metrics["products"]["grid"]["aupro"] == pytest.approx(1.0)
    html = storage.read_bytes(report_uri).decode()
    assert html.count('<div class="card"><img') == 3  # thumbnails read from S3
