"""A synthetic inspect output to look at and check the evaluation report with, in seconds and without models.

MVTec-named products are copies of the synthetic ones (:mod:`eagle.testing.synth`), some with long plant-style
file names. Each run's rows are what the pipeline writes, with the expert and the MLLM simulated: an anomaly
map from the ground-truth mask plus noise (regions, verdict and confidence band by the pipeline's own
functions), and MLLM answers right, wrong or unparsed at chosen rates. The expert part depends only on the
image, so runs differ only in routing and guidance, as real runs over the same images would. Not a model of
real accuracy: it makes every part of the report appear (all kinds of errors, fixed and introduced ones,
unparsed answers, an outlier score, long names and explanations).

    python -m eagle.testing.report_sample /tmp/sample [--products 15] [--size 1024]
    python jobs/evaluate.py --output /tmp/sample/audit --data /tmp/sample/data --out /tmp/sample/eval \\
        --compare-run uncertain-unguided --compare-run all-guided
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import shutil
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow.parquet as pq

from eagle.config import RegionsConfig
from eagle.expert.regions import find_regions, png_shape
from eagle.expert.threshold import classify
from eagle.findings import Box, final_verdict
from eagle.io import storage
from eagle.io.runs import RunInfo, manifest_uri
from eagle.io.schema import to_table
from eagle.pipeline.routing import expert_explanation, needs_mllm
from eagle.testing.synth import generate

MVTEC_PRODUCTS = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                  "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
TEXTURES = {"carpet": "marble", "grid": "grid", "leather": "marble", "tile": "marble", "wood": "marble"}
THRESHOLD, SCORE_MAX = 0.5, 0.6
# No spaces or hyphens: a browser may break such names only where the report's CSS allows it.
LONG_NAME = "line3_station07_camera2_20240501T104217123Z_exposure_bracket_{}_historian_export"
LONG_WORD = "plant_a_historian_line3_station07_camera2_20240501T104217_exposure_bracket_raw_frame_000417.tiff"
START = dt.datetime(2026, 5, 4, 8, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Run:
    """One simulated inspect run: routing policy, guidance, and the MLLM's answer rates."""

    run_id: str
    policy: str
    guided: bool
    accuracy: float  # share of parsed answers that are right
    unparsed: float  # share of calls without a clear yes/no


RUNS = (Run("uncertain-guided", "uncertain", True, 0.85, 0.1),
        Run("uncertain-unguided", "uncertain", False, 0.65, 0.15),
        Run("all-guided", "all", True, 0.85, 0.1))

# Expert score ranges by image index in its folder, so every product has each kind of outcome: normal images
# 0-2 confidently anomalous (false positives the "uncertain" policy never asks about), 3-6 in the uncertain band,
# the rest normal; defective images 0 missed, 1 uncertain, the rest found.
NORMAL_SCORES = [(0.62, 0.75)] * 3 + [(THRESHOLD, SCORE_MAX)] * 4
DEFECT_SCORES = [(0.3, 0.48), (THRESHOLD, SCORE_MAX)]


def build_data(root: str, products: Sequence[str], size: int, n_good: int, n_defect: int, seed: int = 0) -> None:
    """An MVTec-layout test set under `root`: each product a copy of the synthetic product it resembles, every
    other product's files renamed to long plant-style names."""
    scratch = os.path.join(root, "_synthetic")
    bases = sorted({TEXTURES.get(p, "nut") for p in products})
    generate(scratch, bases, n_train=0, n_test_good=n_good, n_test_defect=n_defect, size=size, seed=seed)
    for k, product in enumerate(products):
        base = os.path.join(scratch, TEXTURES.get(product, "nut"))
        for split in ("test", "ground_truth"):
            for defect in sorted(os.listdir(os.path.join(base, split))):
                folder = os.path.join(root, product, split, defect)
                os.makedirs(folder, exist_ok=True)
                for name in sorted(os.listdir(os.path.join(base, split, defect))):
                    stem, _, rest = name.partition(".") if split == "test" else name.partition("_mask")
                    new = LONG_NAME.format(stem) if k % 2 else stem
                    shutil.copyfile(os.path.join(base, split, defect, name),
                                    os.path.join(folder, new + ("." + rest if split == "test" else "_mask" + rest)))
    shutil.rmtree(scratch)


def _rng(*keys: str) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(k.encode()) for k in keys])


def _expert(path: str, index: int, image_shape: tuple[int, int], mask: np.ndarray | None, outlier: bool
            ) -> dict[str, Any]:
    """The expert's columns of one image: a score (NORMAL_SCORES, DEFECT_SCORES; one far outlier per product),
    a map at the stored size peaking at the defect (or at a random spot), regions scaled to the image."""
    rng = _rng("expert", path)
    h, w = image_shape
    mh, mw = png_shape(h, w, RegionsConfig().mask_size)
    if mask is not None:
        low, high = DEFECT_SCORES[index] if index < len(DEFECT_SCORES) else (0.65, 1.3)
        blob = cv2.resize(mask.astype(np.float32), (mw, mh), interpolation=cv2.INTER_AREA)
    else:
        low, high = NORMAL_SCORES[index] if index < len(NORMAL_SCORES) else (0.15, 0.48)
        blob = np.zeros((mh, mw), np.float32)
        cv2.circle(blob, (int(rng.integers(mw)), int(rng.integers(mh))), max(2, mw // 40), 1.0, -1)
    score = 6.0 if outlier else float(rng.uniform(low, high))
    noise = cv2.GaussianBlur(rng.random((mh, mw)).astype(np.float32), (0, 0), 3)
    amap = cv2.GaussianBlur(blob, (0, 0), 2) + 0.4 * noise / noise.max()
    regions = find_regions(amap / amap.max() * score)
    verdict, confidence = classify(score, THRESHOLD, SCORE_MAX)
    anomalous = verdict == "anomalous"
    sx, sy = w / mw, h / mh
    boxes = [Box(round(b.x1 * sx), round(b.y1 * sy), round(b.x2 * sx), round(b.y2 * sy), b.score)
             for b in regions.boxes] if anomalous else []
    return dict(expert_score=score, threshold=THRESHOLD, score_max=SCORE_MAX, threshold_method="k-sigma",
                expert_verdict=verdict, confidence=confidence, mask_png=regions.mask_png if anomalous else None,
                anomaly_map_png=regions.map_png, map_max=regions.map_max, expert_model_version="sample",
                boxes=[b.as_dict() for b in boxes], expert_ms=40.0)


def _mllm(row: dict[str, Any], path: str, defect: str, run: Run) -> dict[str, Any]:
    """The MLLM's columns: routed by the run's policy, answering at the run's rates."""
    if not needs_mllm(row["confidence"], run.policy):
        return dict(mllm_ran=False, guided=False, verdict=row["expert_verdict"], explanation_source="expert",
                    explanation=expert_explanation(row, [Box(**b) for b in row["boxes"]]),
                    config_hash=f"cfg-{run.run_id}")
    rng = _rng("mllm", run.run_id, path)
    truth = "no" if defect == "good" else "yes"
    if rng.random() < run.unparsed:
        answer = "unparsed"
    elif rng.random() < run.accuracy:
        answer = truth
    else:
        answer = "yes" if truth == "no" else "no"
    said = {"yes": f"A {defect if defect != 'good' else 'surface mark'} is visible inside the marked region; "
                   "it breaks the regular pattern of the product.", "no": "The product looks normal.",
            "unparsed": "The image shows the product; the answer did not say yes or no."}[answer]
    if rng.random() < 0.3:
        said += f" Compare with {LONG_WORD}."
    share = float(rng.uniform(0.45, 0.8) if run.guided else rng.uniform(0.1, 0.4))
    mllm = dict(mllm_ran=True, guided=run.guided, answer=answer, explanation=said, explanation_source="mllm",
                verdict=final_verdict(answer, row["expert_verdict"]), image_attention_share=share,
                mllm_ms=float(rng.uniform(700, 1100)), mllm_model="sample-mllm", config_hash=f"cfg-{run.run_id}")
    if answer == "unparsed":  # as the pipeline writes it: the raw reply kept, the expert's explanation used
        mllm.update(mllm_reply=said, explanation_source="expert",
                    explanation=expert_explanation(row, [Box(**b) for b in row["boxes"]]))
    return mllm


def simulate_rows(root: str, runs: Sequence[Run] = RUNS) -> list[dict[str, Any]]:
    """Every run's output rows for every test image under `root`, plus one decode error per product and run;
    run k is audited k hours before the first, so the first is the latest."""
    rows = []
    whens = {run.run_id: START - dt.timedelta(hours=k) for k, run in enumerate(runs)}
    for product in sorted(p for p in os.listdir(root) if os.path.isdir(os.path.join(root, p, "test"))):
        defects = sorted(os.listdir(os.path.join(root, product, "test")))
        for defect in defects:
            for index, name in enumerate(sorted(os.listdir(os.path.join(root, product, "test", defect)))):
                path = f"{product}/test/{defect}/{name}"
                image = cv2.imread(os.path.join(root, path), cv2.IMREAD_UNCHANGED)
                mask = None if defect == "good" else cv2.imread(os.path.join(
                    root, product, "ground_truth", defect, name.rsplit(".", 1)[0] + "_mask.png"), 0) > 0
                outlier = defect == next(d for d in defects if d != "good") and index == len(DEFECT_SCORES)
                expert = _expert(path, index, image.shape[:2], mask, outlier)
                for run in runs:
                    row = dict(run_id=run.run_id, audited_at=whens[run.run_id], image_uri=os.path.join(root, path),
                               product=product, width=image.shape[1], height=image.shape[0], status="ok",
                               audit_date=START.date().isoformat(), **expert)
                    rows.append(row | _mllm(row, path, defect, run))
        rows += [dict(run_id=run.run_id, audited_at=whens[run.run_id], product=product, status="error",
                      error_stage="decode", image_uri=os.path.join(root, product, "test", "good", "truncated.png"),
                      error="corrupt or truncated image", audit_date=START.date().isoformat()) for run in runs]
    # coverage: every run also audited two images outside the test set (rows without ground truth) and has no
    # row of the first product's last normal test image
    product = min(r["product"] for r in rows)
    for run in runs:
        ours = [r for r in rows if r["product"] == product and r["run_id"] == run.run_id and r["status"] == "ok"]
        good = [r for r in ours if "/test/good/" in r["image_uri"]]
        rows.remove(max(good, key=lambda r: r["image_uri"]))
        rows += [ours[0] | {"image_uri": os.path.join(root, product, "incoming", f"unlabelled_{k}.png")}
                 for k in range(2)]
    return rows


def write_output(out: str, rows: list[dict[str, Any]]) -> None:
    """Hive-partitioned Parquet as the inspect job writes it (partition columns only in the path)."""
    for product, date in sorted({(r["product"], r["audit_date"]) for r in rows}):
        part = [r for r in rows if (r["product"], r["audit_date"]) == (product, date)]
        runs = "_".join(sorted({r["run_id"] for r in part}))
        buf = io.BytesIO()
        pq.write_table(to_table(part).drop_columns(["product", "audit_date"]), buf)
        storage.write_bytes(storage.join(out, f"product={product}", f"audit_date={date}", f"{runs}_0.parquet"),
                            buf.getvalue())


def write_manifests(out: str, runs: Sequence[Run]) -> None:
    """A run manifest per run, as a completed inspect run leaves it (with its settings: the provenance)."""
    for k, run in enumerate(runs):
        when = (START - dt.timedelta(hours=k)).isoformat()
        info = RunInfo(run_id=run.run_id, started_at=when, audit_date=START.date().isoformat(),
                       config_hash=f"cfg-{run.run_id}", attempts=[when], mode="full", status="completed",
                       settings={"routing": run.policy, "mllm_model": "sample-mllm", "mllm_family": "qwen2_5_vl",
                                 "guidance": run.guided, "expert_model": "patchcore", "expert_ensemble": []})
        storage.write_bytes(manifest_uri(out, run.run_id), json.dumps(asdict(info), indent=2).encode())


def build_sample(out: str, products: Sequence[str] = MVTEC_PRODUCTS, size: int = 512, n_good: int = 12,
                 n_defect: int = 4, runs: Sequence[Run] = RUNS) -> tuple[str, str]:
    """Data under ``{out}/data`` and the runs' rows under ``{out}/audit``; returns (data root, output URI)."""
    data, audit = os.path.join(out, "data"), os.path.join(out, "audit")
    build_data(data, products, size, n_good, n_defect)
    write_output(audit, simulate_rows(data, runs))
    write_manifests(audit, runs)
    return data, audit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eagle.testing.report_sample", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="Folder for data/ and audit/ (created).")
    p.add_argument("--products", type=int, default=len(MVTEC_PRODUCTS), help="How many MVTec product names (≤ 15).")
    p.add_argument("--size", type=int, default=512, help="Image side, pixels.")
    args = p.parse_args(argv)
    data, audit = build_sample(args.out, MVTEC_PRODUCTS[:args.products], args.size)
    print(f"data {data}\noutput {audit} (runs: {', '.join(r.run_id for r in RUNS)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
