"""Several expert models through the jobs: jobs/fit.py --expert padim,patchcore writes both and the pointers; an
inspect job over products fitted with different experts writes every image once, each by its product's expert;
an ensemble's verdict is the combination rule applied to its members' scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eagle.config import load_config
from eagle.expert.artifact import DEFAULT_POINTER, load_artifact

pytestmark = pytest.mark.slow

TINY = {"backbone": "resnet18", "layers": ["layer1", "layer2"], "weights": "random", "resize": 72, "crop": 64,
        "stfpm": {"epochs": 2}}


def test_fit_job_fits_several_experts(tmp_path: Path, repo_root: Path):
    from eagle.testing.synth import generate

    generate(str(tmp_path / "data"), products=("grid", "nut"), n_train=4, n_test_good=1, n_test_defect=1, size=64)
    store = tmp_path / "models"
    cmd = [sys.executable, "jobs/fit.py", "--data", str(tmp_path / "data"), "--model-store", str(store),
           "--expert", "padim,patchcore", "--backbone", "resnet18", "--weights", "random",
           "expert.layers=[layer1,layer2]", "expert.resize=64", "expert.crop=64", "threshold.folds=2",
           "threshold.min_unselected_patches=4", "ray.num_cpus=4", "--summary-json", str(tmp_path / "fit.json")]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()[1:] if line.strip()]
    assert sorted((r[0], r[-2]) for r in rows) == [("grid", "padim"), ("grid", "patchcore"), ("nut", "padim"),
                                                   ("nut", "patchcore")]
    for product, *_, model, version in rows:
        art = load_artifact(str(store), product, model=model)
        assert art.version == version and art.meta.get("model", "patchcore") == model
        assert (store / product / f"{DEFAULT_POINTER}.{model}").read_text().strip() == version
        if model == "padim":  # the first model listed is the default expert
            assert (store / product / DEFAULT_POINTER).read_text().strip() == version
    summary = json.loads((tmp_path / "fit.json").read_text())
    assert summary["grid"]["model"] == "padim" and summary["experts"]["patchcore"]["nut"]["model"] == "patchcore"


def test_inspect_mixes_products_fitted_with_different_experts_and_ensembles(tmp_path: Path, ray_local: str):
    from e2e import output_rows

    from eagle.expert.training import fit_product
    from eagle.io.inputs import list_inputs
    from eagle.pipeline.inspection import run_inspect
    from eagle.testing.synth import generate

    data = str(tmp_path / "data")
    generate(data, products=("grid", "nut"), n_train=4, n_test_good=2, n_test_defect=1, size=64, seed=2)
    overrides = {
        "inputs": {"uris": [data], "exclude": ["*/ground_truth/*", "*/train/*"]},
        "model_store": str(tmp_path / "models"),
        "output": {"uri": str(tmp_path / "audit")},
        "expert": TINY,
        "threshold": {"folds": 2, "min_unselected_patches": 4},
        "mllm": {"model": "none"},
        "resources": {"expert": {"batch_size": 4}, "decode": {"batch_size": 4}},
    }
    cfg = load_config(overrides=overrides)
    versions = {"grid": fit_product(data, "grid", cfg, model="stfpm").version,  # grid only has an STFPM
                "nut": fit_product(data, "nut", cfg, model="patchcore").version}
    run_inspect(load_config(overrides={**overrides, "run_id": "mixed"}))  # expert.model: auto
    rows = output_rows(cfg, "run_id = 'mixed'")
    listed = list_inputs(cfg.inputs, cfg.storage).column("image_uri").to_pylist()
    assert sorted(r["image_uri"] for r in rows) == sorted(listed)  # exactly once each
    assert all(r["status"] == "ok" and r["expert_model_version"] == versions[r["product"]] for r in rows), rows
    grid_threshold = load_artifact(cfg.model_store, "grid").threshold
    assert all(r["threshold"] == pytest.approx(grid_threshold, rel=1e-6) for r in rows if r["product"] == "grid")
    # a named model that a product lacks: its images become error rows, the others are audited
    run_inspect(load_config(overrides={**overrides, "run_id": "named", "expert": {**TINY, "model": "patchcore"}}))
    named = output_rows(cfg, "run_id = 'named'")
    assert len(named) == len(listed)
    for row in named:
        if row["product"] == "grid":
            assert row["status"] == "error" and "no fitted expert" in row["error"], row
        else:
            assert row["status"] == "ok" and row["expert_model_version"] == versions["nut"], row

    # an ensemble of each product's patchcore and stfpm: verdicts follow max(score / threshold) of the members
    fit_product(data, "grid", cfg, model="patchcore", default=False)
    fit_product(data, "nut", cfg, model="stfpm", default=False)
    run_inspect(load_config(overrides={**overrides, "run_id": "ensemble",
                                       "expert": {**TINY, "ensemble": {"models": ["patchcore", "stfpm"]}}}))
    rows = output_rows(cfg, "run_id = 'ensemble'")
    assert sorted(r["image_uri"] for r in rows) == sorted(listed)  # exactly once each
    for row in rows:
        members = row["expert_members"]
        assert row["status"] == "ok" and [m["model"] for m in members] == ["patchcore", "stfpm"], row
        assert row["expert_model_version"] == "+".join(f"{m['model']}:{m['version']}" for m in members)
        by_hand = max(m["score"] / m["threshold"] for m in members)
        assert row["expert_score"] == pytest.approx(by_hand, rel=1e-5) and row["threshold"] == 1.0
        assert row["expert_verdict"] == ("anomalous" if row["expert_score"] >= 1 else "normal")
    single = output_rows(cfg, "run_id = 'mixed'")
    assert all(len(r["expert_members"]) == 1 for r in single)  # one expert: one member, its own score
