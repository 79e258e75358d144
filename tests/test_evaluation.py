"""Evaluation: metrics on hand-computed cases, ground truth from the MVTec layout, and jobs/evaluate.py end to end
on a hand-made inspect output next to a synthetic dataset (local, and on S3 in-process), two runs compared."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from eagle.evaluation.comparison import compare_runs
from eagle.evaluation.decisions import decision_metrics
from eagle.evaluation.ground_truth import Truth, load_ground_truth, relative_path
from eagle.evaluation.metrics import (
    PixelCounts,
    answer_stats,
    aupro,
    auroc,
    binary_stats,
    fpr_at_threshold,
    pixel_auroc,
    verdict_change,
)
from eagle.evaluation.report import write_outputs
from eagle.evaluation.scorecard import EvaluationError, evaluate, load_train_scores
from eagle.expert.threshold import classify
from eagle.io import storage
from eagle.io.runs import RunInfo
from eagle.testing.report_sample import write_output
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


def test_verdict_change_sorts_images_by_who_was_right():
    truth = np.array([1, 1, 1, 0, 0, 0, 1], bool)
    expert = np.array([1, 0, 1, 1, 0, 0, 0], bool)
    final = np.array([1, 1, 0, 0, 1, 0, 0], bool)
    # image: 0 both right, 1 fixed (miss caught), 2 introduced (hit dropped), 3 fixed (false alarm cleared),
    # 4 introduced (false alarm added), 5 both right, 6 both wrong
    assert verdict_change(truth, expert, final) == {"both_right": 2, "fixed": 2, "introduced": 2, "both_wrong": 1}
    assert verdict_change(truth[:0], expert[:0], final[:0]) == {"both_right": 0, "fixed": 0, "introduced": 0,
                                                                "both_wrong": 0}


def test_answer_stats_count_unparsed_answers_apart():
    truth = np.array([1, 1, 0, 0, 1], bool)
    stats = answer_stats(truth, ["yes", "no", "no", "unparsed", None])  # right, wrong, right, -, - (None: unparsed)
    assert stats == {"calls": 5, "yes": 1, "no": 2, "unparsed": 2, "correct": 2, "wrong": 1,
                     "parse_rate": pytest.approx(3 / 5), "accuracy": pytest.approx(2 / 3)}
    # The demo: asked 7 times, no answer parsed. Accuracy is undefined, not 0; the parse rate says why.
    demo = answer_stats(np.ones(7, bool), ["unparsed"] * 7)
    assert (demo["unparsed"], demo["parse_rate"], demo["accuracy"], demo["wrong"]) == (7, 0.0, None, 0)
    assert answer_stats(np.zeros(0, bool), [])["parse_rate"] is None


A, N = "anomalous", "normal"


def decision_row(expert: str, final: str, answer: str | None = None, guided: bool = False,
                 confidence: str = "confident_normal", ms: float | None = None) -> dict[str, Any]:
    """Just the columns decision_metrics reads."""
    return dict(expert_score=0.5, threshold=0.5, expert_verdict=expert, verdict=final, mllm_ran=answer is not None,
                guided=guided, answer=answer, confidence=confidence, mllm_ms=ms, image_attention_share=None,
                error_stage=None)


def truth_of(path: str) -> Truth:
    product, _, defect, _ = path.split("/")
    return Truth(path, product, defect, None)


def test_decision_metrics_per_defect_splits_and_cost():
    cases = [  # (truth path, row)
        ("p/test/scratch/0.png", decision_row(A, A, confidence="confident_anomalous")),  # found, not asked
        ("p/test/scratch/1.png", decision_row(N, A, "yes", True, "uncertain", 300.0)),  # miss fixed, guided
        ("p/test/scratch/2.png", decision_row(N, N)),  # missed
        ("p/test/hole/0.png", decision_row(A, N, "no", False, "uncertain", 100.0)),  # hit dropped, unguided
        ("p/test/hole/1.png", decision_row(A, A, "unparsed", True, "confident_anomalous", 200.0)),  # kept
        ("p/test/good/0.png", decision_row(A, N, "no", True, "uncertain", 400.0)),  # false alarm cleared
    ]
    m = decision_metrics([r for _, r in cases], [truth_of(p) for p, _ in cases])
    assert m["per_defect"] == {
        "hole": {"n": 2, "expert_recall": 1.0, "final_recall": 0.5, "fixed": 0, "introduced": 1},
        "scratch": {"n": 3, "expert_recall": pytest.approx(1 / 3), "final_recall": pytest.approx(2 / 3),
                    "fixed": 1, "introduced": 0},
    }
    change = m["verdict_change"]
    assert (change["both_right"], change["fixed"], change["introduced"], change["both_wrong"]) == (2, 2, 1, 1)
    assert change["by_confidence"] == {
        "confident_normal": {"both_right": 0, "fixed": 0, "introduced": 0, "both_wrong": 1},
        "uncertain": {"both_right": 0, "fixed": 2, "introduced": 1, "both_wrong": 0},
        "confident_anomalous": {"both_right": 2, "fixed": 0, "introduced": 0, "both_wrong": 0}}
    assert change["by_guidance"] == {
        "guided": {"both_right": 1, "fixed": 2, "introduced": 0, "both_wrong": 0},
        "unguided": {"both_right": 0, "fixed": 0, "introduced": 1, "both_wrong": 0},
        "not asked": {"both_right": 1, "fixed": 0, "introduced": 0, "both_wrong": 1}}
    mllm = m["mllm"]
    # 4 calls: yes (right), no (wrong: hole), unparsed, no (right: good) → 3 parsed, 2 right.
    assert (mllm["calls"], mllm["unparsed"], mllm["correct"], mllm["wrong"]) == (4, 1, 2, 1)
    assert mllm["parse_rate"] == pytest.approx(3 / 4) and mllm["accuracy"] == pytest.approx(2 / 3)
    assert mllm["expert_accuracy_on_asked"] == pytest.approx(2 / 4)  # right on hole/0 and hole/1
    assert mllm["calls_per_image"] == pytest.approx(4 / 6) and mllm["guided_share"] == pytest.approx(3 / 4)
    assert mllm["ms_per_image"] == pytest.approx(1000 / 6) and mllm["ms_per_call"] == pytest.approx(250)


def test_compare_runs_on_common_images_paired_with_the_baseline():
    paths = ["p/test/good/0.png", "p/test/good/1.png", "p/test/hole/0.png", "p/test/hole/1.png"]

    def run(finals: list[str], asked: list[bool]) -> dict[str, tuple[dict[str, Any], Truth]]:
        return {p: (decision_row(A, f, "yes" if (a and f == A) else "no" if a else None), truth_of(p))
                for p, f, a in zip(paths, finals, asked)}

    baseline = run([A, N, A, N], [False, True, False, True])  # right: good/1, hole/0
    guided = run([N, N, A, A], [True, True, False, True])  # right: all four
    guided.pop("p/test/good/0.png")  # not scored: the comparison leaves this image out for every run
    guided["p/test/extra/9.png"] = (decision_row(A, A), truth_of("p/test/extra/9.png"))  # only in this run
    c = compare_runs({"base": baseline, "guided": guided})
    assert c["baseline"] == "base" and c["n_common_images"] == 3 and c["n_scored"] == {"base": 4, "guided": 4}
    assert c["runs"]["base"]["final"]["accuracy"] == pytest.approx(2 / 3)
    assert c["runs"]["guided"]["final"]["accuracy"] == 1.0
    assert c["runs"]["guided"]["verdict_change"]["fixed"] == 1  # good/1: the expert's false alarm
    assert c["runs"]["base"]["mllm"]["calls"] == 2 and c["runs"]["guided"]["mllm"]["calls"] == 2
    assert c["paired_with_baseline"] == {"guided": {"better": 1, "worse": 0}}  # hole/1


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
    """An ok output row for test image `rel` (verdict and band from the score, threshold 0.5, score_max 0.92; an
    MLLM call takes 100 ms). Its map is the ground truth at 255 with map_max 1 for a
    defective image, and 255 everywhere with map_max 0.1 for a normal one: in score units every defect
    pixel beats every normal pixel (1.0 > 0.1 > 0), in raw PNG values they would tie."""
    product, _, defect, _ = rel.split("/")
    expert, confidence = classify(score, 0.5, 0.92)
    row = dict(run_id=run_id, audited_at=when, image_uri=storage.join(root, rel), product=product, width=SIZE,
               height=SIZE, status="ok", expert_score=score, threshold=0.5, score_max=0.92,
               threshold_method="k-sigma", expert_verdict=expert, confidence=confidence, mllm_ran=answer is not None,
               guided=guided, answer=answer, verdict=verdict or expert, explanation=f"explained {rel}",
               image_attention_share=share, mllm_ms=100.0 if answer else None, expert_model_version="v1",
               audit_date=when.date().isoformat(), boxes=[])
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
        make_row(root, "grid/test/hole/000.png", 0.95, answer="unparsed", with_map=False, mask=m["hole"]),
        make_row(root, "grid/test/stain/000.png", 0.15, mask=m["stain"]),  # expert and final FN
        {**make_row(root, "grid/test/good/000.png", 0.1), "image_uri": "/elsewhere/grid/000.png"},  # unmatched
    ]


def all_rows(root: str) -> list[dict[str, Any]]:
    nut = [make_row(root, f"nut/test/good/{i:03d}.png", s) for i, s in enumerate([0.1, 0.2, 0.3, 0.4])]
    old = [make_row(root, r, 1.0 if "good" not in r else 0.0, run_id="old", when=OLD, with_map=False)
           for r in ("grid/test/good/000.png", "grid/test/hole/000.png")]
    return grid_rows(root) + nut + old


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
    """From the element with id `ident` to the next section or product."""
    start = html.index(f'id="{ident}"')
    ends = [i for i in (html.find("<section", start), html.find('<details class="product"', start)) if i > 0]
    return html[start:min(ends) if ends else None]


def galleries(html: str) -> dict[str, list[str]]:
    """Gallery title -> the image paths of its cards, in order."""
    parts = re.split(r"<h3>(.*?)(?: <span class=\"count\">.*?</span>)?</h3>", html)[1:]
    return {title: re.findall(r'<p class="path">(.*?)</p>', body) for title, body in zip(parts[::2], parts[1::2])
            if title != "Examples"}


def test_end_to_end(workspace, repo_root):
    out = workspace / "eval"
    cmd = [sys.executable, str(repo_root / "jobs" / "evaluate.py"), "--output", str(workspace / "audit"),
           "--data", str(workspace / "data"), "--model-store", str(workspace / "models"), "--out", str(out),
           "--compare-run", "old"]
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
    mllm = grid["mllm"]
    # asked: good/000 no (right), good/001 yes (wrong), good/002 no (right, guided), scratch no (wrong), hole unparsed
    assert (mllm["calls"], mllm["yes"], mllm["no"], mllm["unparsed"], mllm["correct"], mllm["wrong"]) == (5, 1, 3, 1, 2, 2)
    assert mllm["parse_rate"] == pytest.approx(4 / 5) and mllm["accuracy"] == pytest.approx(2 / 4)
    assert mllm["expert_accuracy_on_asked"] == pytest.approx(4 / 5)  # wrong only on good/002
    assert mllm["expert_accuracy_on_answered"] == pytest.approx(3 / 4)  # the same without hole (unparsed)
    assert mllm["calls_per_image"] == pytest.approx(5 / 6) and mllm["guided_share"] == pytest.approx(1 / 5)
    assert mllm["ms_per_image"] == pytest.approx(500 / 6) and mllm["ms_per_call"] == pytest.approx(100)
    assert mllm["attention_share"] == {"correct": pytest.approx(0.7), "wrong": pytest.approx(0.25),
                                       "n_correct": 2, "n_wrong": 2}
    none = {"both_right": 0, "fixed": 0, "introduced": 0, "both_wrong": 0}
    change = grid["verdict_change"]
    assert (change["both_right"], change["fixed"], change["introduced"], change["both_wrong"]) == (2, 1, 2, 1)
    assert change["by_confidence"] == {  # bands by score: < 0.5, [0.5, 0.92), >= 0.92
        "confident_normal": none | {"both_right": 1, "introduced": 1, "both_wrong": 1},  # good/000, 001, stain
        "uncertain": none | {"fixed": 1, "introduced": 1},  # good/002, scratch
        "confident_anomalous": none | {"both_right": 1}}  # hole
    assert change["by_guidance"] == {"guided": none | {"fixed": 1},
                                     "unguided": none | {"both_right": 2, "introduced": 2},
                                     "not asked": none | {"both_wrong": 1}}
    assert grid["per_defect"] == {
        "hole": {"n": 1, "expert_recall": 1.0, "final_recall": 1.0, "fixed": 0, "introduced": 0},
        "scratch": {"n": 1, "expert_recall": 1.0, "final_recall": 0.0, "fixed": 0, "introduced": 1},
        "stain": {"n": 1, "expert_recall": 0.0, "final_recall": 0.0, "fixed": 0, "introduced": 0}}
    # Routing: the expert's errors are good/002 (false alarm, 0.9) and stain (missed, 0.15); policies on the scores.
    routing = {name: (r["routed"], r["errors_routed"], r["false_alarms_routed"], r["missed_defects_routed"])
               for name, r in grid["routing"].items()}
    assert routing == {"routed": (5, 1, 1, 0),  # asked: good/000-002, scratch, hole
                       "band": (2, 1, 1, 0),  # uncertain: good/002, scratch
                       "all": (6, 2, 1, 1), "not-confident-normal": (3, 1, 1, 0), "uncertain": (2, 1, 1, 0),
                       "near-threshold": (0, 0, 0, 0),  # no score in [0.45, 0.55)
                       "best band": (5, 2, 1, 1)}  # 5 images as routed: all but the top score (hole), both errors
    assert grid["routing"]["all"]["routed_share"] == 1.0 and grid["routing"]["band"]["routed_share"] == 2 / 6
    assert (grid["routing"]["all"]["errors"], grid["routing"]["all"]["missed_defects_routed_share"]) == (2, 1.0)
    assert grid["routing"]["routed"]["missed_defects_routed_share"] == 0.0

    # nut: normal images only (its defective ones were not audited): undefined, not a crash.
    assert (nut["n_images"], nut["n_missing"]) == (4, 4)
    assert nut["image_auroc"] is None and nut["pixel_auroc"] is None and nut["aupro"] is None
    assert nut["final"]["precision"] is None and nut["fpr_at_threshold"] == 0.0

    assert (overall["n_images"], overall["n_errors"], overall["n_unmatched"]) == (10, 1, 1)
    # pooled: defective 0.8 (beats 6 of 7 normals), 0.95 (7), 0.15 (2) → 15 / 21.
    assert overall["image_auroc"] == pytest.approx(15 / 21)
    assert overall["product_mean"]["image_auroc"] == pytest.approx(6 / 9)
    assert overall["per_defect"] == grid["per_defect"]  # nut has no defective image scored
    assert overall["verdict_change"]["both_right"] == 2 + 4  # nut's four normals, right and not asked

    # --compare-run old: the old run scored grid/good/000 and grid/hole/000, both right as in the new run.
    comparison = metrics["comparison"]
    assert (comparison["baseline"], comparison["n_common_images"]) == ("new", 2)
    assert comparison["n_scored"] == {"new": 10, "old": 2}
    assert comparison["runs"]["old"]["final"]["accuracy"] == comparison["runs"]["new"]["final"]["accuracy"] == 1.0
    assert comparison["paired_with_baseline"] == {"old": {"better": 0, "worse": 0}}

    html = (out / "report.html").read_text()
    idents = ["contents", "summary", "key-figures", "changes-overall", "metrics-overall", "roc-overall", "comparison",
              "changes-runs"] + [f"{k}-{p}" for p in ("grid", "nut") for k in ("product", "metrics", "hist", "roc",
                                                                                "gallery")]
    for ident in idents:
        assert f'id="{ident}"' in html, ident
    assert html.index('id="summary"') < html.index('id="comparison"') < html.index('id="product-grid"')
    assert "training scores: 5 from" in section(html, "product-grid")
    assert "training scores: not available" in section(html, "product-nut")
    assert galleries(section(html, "gallery-grid")) == {
        "Errors introduced by the MLLM": ["grid/test/scratch/000.png", "grid/test/good/001.png"],  # surest first
        "False positives the expert made too": [],
        "False negatives the expert made too": ["grid/test/stain/000.png"],
        "Errors fixed by the MLLM": ["grid/test/good/002.png"],
        "Correct: defects found closest to the threshold": ["grid/test/hole/000.png"],
        "Correct: normal images scored highest": ["grid/test/good/000.png"]}
    nut_gallery = section(html, "gallery-nut")
    assert galleries(nut_gallery)["Correct: normal images scored highest"] == ["nut/test/good/003.png",
                                                                               "nut/test/good/002.png"]
    assert "No false positives" in nut_gallery
    assert re.findall(r'<span class="count">\((\d+ of \d+) shown\)', section(html, "gallery-grid")) == [
        "2 of 2", "0 of 0", "1 of 1", "1 of 1", "1 of 1", "1 of 1"]
    assert galleries(section(html, "introduced"))["Errors the MLLM introduced"] == [
        "grid/test/scratch/000.png", "grid/test/good/001.png"]
    first = re.search(r'<h1 class="verdict bad" id="verdict">(.*?)</h1>', html)[1]
    assert first.startswith("Verdict: the MLLM made it worse: net -1 errors (fixed 1, introduced 2) · accuracy "
                            "0.800 → 0.700")
    sources = re.findall(r'<img[^>]*src="([^"]*)"', html)
    pngs = [s for s in sources if s.startswith("data:image/png;base64,")]
    jpegs = [s for s in sources if s.startswith("data:image/jpeg;base64,")]
    assert len(pngs) == 3 + 2 + 2  # summary: 2×2 grid, ROC; comparison: 2×2 grid; per product: histogram, ROC
    # cards: picture, map (the hole image has none) and crop: grid 6 + 5 + 6, nut 2 + 2 + 2
    assert len(jpegs) == 17 + 6 + 6 and len(sources) == len(pngs) + len(jpegs)
    for src in pngs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for src in jpegs:
        assert base64.b64decode(src.split(",", 1)[1])[:3] == b"\xff\xd8\xff"
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
    # pictures read from S3: grid's 6 cards and the summary's 2 introduced errors
    assert html.count('<article class="card"') == 6 + 2 and "image unavailable" not in html


def test_without_run_id_the_latest_full_run_is_evaluated_and_the_log_says_so(workspace, tmp_path, repo_root):
    audit = tmp_path / "audit"
    shutil.copytree(workspace / "audit", audit)
    for run_id, mode, started in (("old", "full", "2026-01-01T00:00:00"), ("new", "incremental", "2026-02-01")):
        info = RunInfo(run_id, started, started[:10], "h", [started], mode=mode, status="completed")
        storage.write_bytes(str(audit / "_runs" / f"{run_id}.json"), json.dumps(asdict(info)).encode())
    result = evaluate(str(audit), str(workspace / "data"))
    assert (result.run_id, result.chosen_as) == ("old", "the latest full run")
    total = len(load_ground_truth(str(workspace / "data")))
    assert result.overall["n_test_images"] == total
    proc = subprocess.run([sys.executable, str(repo_root / "jobs" / "evaluate.py"), "--output", str(audit),
                           "--data", str(workspace / "data"), "--out", str(tmp_path / "eval")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    seen = result.overall["n_test_images_with_rows"]
    assert f"evaluating run old (the latest full run): it has rows for {seen} of the {total} ground-truth" \
        in proc.stderr


def test_provenance_read_off_the_rows_when_no_manifest_says():
    from eagle.evaluation.scorecard import infer_routing

    assert infer_routing({"uncertain"}, {"confident_normal", "confident_anomalous"}) == "uncertain"
    assert infer_routing({"uncertain", "confident_anomalous"}, {"confident_normal"}) == "not-confident-normal"
    assert infer_routing({"uncertain", "confident_normal", "confident_anomalous"}, set()) == "all"
    assert infer_routing(set(), {"uncertain"}) is None  # no call: the rows do not tell
    assert infer_routing({"uncertain"}, {"uncertain"}) is None  # some asked, some not: not a policy


def test_the_best_band_is_the_window_of_scores_that_holds_the_most_errors():
    """`best_band` against every window of the same size, counted one by one; images without a threshold stay out."""
    from eagle.evaluation.routing_efficiency import best_band

    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        ratios = rng.choice(np.linspace(0.5, 1.5, 7), n)  # ties on purpose
        ratios[rng.random(n) < 0.1] = np.nan
        wrong = rng.random(n) < 0.3
        size = int(rng.integers(1, n + 1))
        inside = best_band(ratios, wrong, size)
        known = np.flatnonzero(~np.isnan(ratios))
        order = known[np.argsort(ratios[known], kind="stable")]
        windows = [order[i:i + size] for i in range(max(1, len(order) - size + 1))]
        assert inside.sum() == min(size, len(order)) and not inside[np.isnan(ratios)].any()
        assert wrong[inside].sum() == max(wrong[w].sum() for w in windows)
        assert any(set(np.flatnonzero(inside)) == set(w) for w in windows)  # adjacent in the ranking: a band
