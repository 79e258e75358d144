"""Routing policy 'borderline' through a whole inspect job, with real ImageNet features (EfficientNet-Lite0): the MLLM is asked about exactly the images in the
band around the threshold (both sides), the band is the one learned from the artifact's training scores, a
routed normal verdict gets the borderline prompt, and the routing-efficiency table of `jobs/evaluate.py`
matches a recount of the output Parquet with DuckDB."""

from __future__ import annotations

import csv
from pathlib import Path

import duckdb
import numpy as np
import pytest

from eagle.config import load_config

pytestmark = pytest.mark.slow

REAL = {"backbone": "tf_efficientnet_lite0", "weights": "imagenet", "resize": 128, "crop": 128}  # ImageNet, offline
BUDGET = 0.25


@pytest.fixture(scope="module")
def borderline_run(tmp_path_factory: pytest.TempPathFactory, ray_local: str, tiny_qwen25vl: str) -> dict:
    from eagle.expert.training import fit_product
    from eagle.pipeline.inspection import run_inspect
    from eagle.testing.synth import generate

    base = tmp_path_factory.mktemp("routing")
    data = str(base / "data")
    generate(data, products=("grid", "nut"), n_train=16, n_test_good=8, n_test_defect=4, size=128, seed=5)
    overrides = {
        "inputs": {"uris": [data], "exclude": ["*/ground_truth/*", "*/train/*"]},
        "model_store": str(base / "models"), "output": {"uri": str(base / "audit")}, "run_id": "borderline",
        "expert": REAL, "threshold": {"min_unselected_patches": 4},
        "routing": {"policy": "borderline", "budget": BUDGET},
        "mllm": {"model": tiny_qwen25vl, "dtype": "float32", "max_new_tokens": 4},
        "resources": {"expert": {"batch_size": 8}, "decode": {"batch_size": 8}, "mllm": {"batch_size": 4}},
    }
    cfg = load_config(overrides=overrides)
    versions = {p: fit_product(data, p, cfg).version for p in ("grid", "nut")}
    run_inspect(cfg)
    return {"cfg": cfg, "data": data, "base": base, "versions": versions}


def _rows(cfg) -> list[dict]:
    from e2e import output_rows

    return output_rows(cfg, "run_id = 'borderline'")


def test_the_mllm_sees_exactly_the_learned_band_on_both_sides(borderline_run):
    from eagle.expert.artifact import load_artifact
    from eagle.expert.ensemble import band_of

    cfg, data = borderline_run["cfg"], borderline_run["data"]
    rows = _rows(cfg)
    tests = [r for r in csv.DictReader(open(Path(data) / "labels.csv")) if r["split"] == "test"]
    assert sorted(r["image_uri"] for r in rows) == sorted(f"{data}/{t['path']}" for t in tests)
    assert all(r["status"] == "ok" for r in rows)
    for product in ("grid", "nut"):
        band = band_of([load_artifact(cfg.model_store, product).meta], "max", cfg.routing)
        mine = [r for r in rows if r["product"] == product]
        assert all(r["band_low"] == pytest.approx(band.low, rel=1e-6) and
                   r["band_high"] == pytest.approx(band.high, rel=1e-6) for r in mine)
        for r in mine:
            inside = band.low <= r["expert_score"] < band.high
            assert r["mllm_ran"] == inside == (r["confidence"] == "uncertain"), r
    routed = [r for r in rows if r["mllm_ran"]]
    assert routed and len(routed) < len(rows)
    # normal verdicts are routed too (the side where missed defects are), with the regions to look at
    normal_routed = [r for r in routed if r["expert_verdict"] == "normal"]
    assert normal_routed and all(r["boxes"] for r in normal_routed)
    assert all(not r["boxes"] for r in rows if r["confidence"] == "confident_normal")


def test_near_threshold_missed_defects_are_routed_and_the_budget_holds(borderline_run):
    cfg, data = borderline_run["cfg"], borderline_run["data"]
    labels = {r["path"]: r for r in csv.DictReader(open(Path(data) / "labels.csv"))}
    rows = _rows(cfg)
    defective = {r["image_uri"]: labels[str(Path(r["image_uri"]).relative_to(data))]["defect"] != "good"
                 for r in rows}
    missed = [r for r in rows if defective[r["image_uri"]] and r["expert_verdict"] == "normal"]
    near = [r for r in missed if r["expert_score"] >= r["band_low"]]
    assert near, "the synthetic set has faint defects the expert misses just under its threshold"
    assert all(r["mllm_ran"] for r in near)
    # the band holds BUDGET of the training images; on normal test images it stays near it
    normals = [r for r in rows if not defective[r["image_uri"]]]
    share = np.mean([r["mllm_ran"] for r in normals])
    assert share <= BUDGET + 2 * np.sqrt(BUDGET / len(normals)), share


def test_the_routing_table_matches_a_duckdb_recount(borderline_run):
    from eagle.evaluation.scorecard import evaluate

    cfg, data = borderline_run["cfg"], borderline_run["data"]
    m = evaluate(cfg.output.uri, data, run_id="borderline").overall["routing"]
    con = duckdb.connect()
    con.sql(f"CREATE VIEW labels AS SELECT * FROM read_csv('{data}/labels.csv', all_varchar = true)")
    con.sql(f"CREATE VIEW out AS SELECT * FROM read_parquet('{cfg.output.uri}/**/*.parquet', "
            "hive_partitioning = true) WHERE run_id = 'borderline' AND status = 'ok'")
    rules = {"routed": "mllm_ran", "band": "confidence = 'uncertain'", "all": "true",
             "not-confident-normal": "expert_score >= threshold",
             "uncertain": "expert_score >= threshold AND expert_score < score_max",
             "near-threshold": "expert_score / threshold >= 0.9 AND expert_score / threshold < 1.1"}
    for policy, rule in rules.items():
        routed, errors, false_alarms, missed = con.execute(f"""
            SELECT count(*) FILTER ({rule}),
                   count(*) FILTER (({rule}) AND (expert_verdict = 'anomalous') <> (l.defect <> 'good')),
                   count(*) FILTER (({rule}) AND expert_verdict = 'anomalous' AND l.defect = 'good'),
                   count(*) FILTER (({rule}) AND expert_verdict = 'normal' AND l.defect <> 'good')
            FROM out JOIN labels l ON out.image_uri = '{data}/' || l.path""").fetchone()
        got = m[policy]
        assert (got["routed"], got["errors_routed"], got["false_alarms_routed"], got["missed_defects_routed"]) == \
            (routed, errors, false_alarms, missed), policy
    # the best band: of all runs of as many images as were routed, adjacent in score / threshold, the most errors
    size = m["routed"]["routed"]
    most = con.execute(f"""
        WITH r AS (SELECT expert_score / threshold AS ratio,
                          ((expert_verdict = 'anomalous') <> (l.defect <> 'good'))::INT AS wrong
                   FROM out JOIN labels l ON out.image_uri = '{data}/' || l.path),
             w AS (SELECT sum(wrong) OVER win AS errors, count(*) OVER win AS n FROM r
                   WINDOW win AS (ORDER BY ratio ROWS BETWEEN CURRENT ROW AND {size - 1} FOLLOWING))
        SELECT max(errors) FROM w WHERE n = {size}""").fetchone()[0]
    assert (m["best band"]["routed"], m["best band"]["errors_routed"]) == (size, most)
    assert m["best band"]["errors_routed"] >= m["routed"]["errors_routed"]  # no band of that size does better
