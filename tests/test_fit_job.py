"""jobs/fit.py end to end: a subprocess on a tiny synthetic root, Ray tasks, artifacts in a local S3 store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eagle.expert.artifact import load_artifact
from eagle.expert.detector import Expert


@pytest.mark.slow
def test_fit_job_end_to_end(tmp_path: Path, s3_bucket: str, repo_root: Path):
    from eagle.testing.synth import generate

    generate(str(tmp_path), products=("grid", "nut"), n_train=5, n_test_good=1, n_test_defect=1, size=64)
    store = f"{s3_bucket}/models"
    cmd = [sys.executable, "jobs/fit.py", "--data", str(tmp_path), "--model-store", store,
           "--products", "grid,nut,absent", "--backbone", "resnet18", "--weights", "random",
           "--threshold-method", "mad", "--coreset-ratio", "0.2",
           "expert.resize=64", "expert.crop=64", "threshold.min_unselected_patches=4", "ray.num_cpus=4",
           "--summary-json", str(tmp_path / "fit.json")]
    proc = subprocess.run(cmd, cwd=repo_root, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert proc.returncode == 1, proc.stderr[-3000:]  # 'absent' has no images: reported, others still fitted
    assert "FAILED:" in lines["absent"] and "no training images" in " ".join(lines["absent"])
    for product in ("grid", "nut"):
        images, patches, coreset, method = lines[product][1:5]
        assert (int(images), int(patches), int(coreset), method) == (5, 5 * 64, int(5 * 64 * 0.2), "mad")
        art = load_artifact(store, product)
        assert art.version == lines[product][-1] and art.meta["expert"]["backbone"] == "resnet18"
        assert art.threshold == pytest.approx(float(lines[product][5]), abs=1e-4)
    summary = json.loads((tmp_path / "fit.json").read_text())
    assert summary["grid"]["version"] == lines["grid"][-1] and "no training images" in summary["absent"]["error"]
    for product in ("grid", "nut"):  # an empty uncertain band is reported with the setting that widens it
        empty = summary[product]["threshold"] >= summary[product]["score_max"]
        assert (f"{product}: threshold" in proc.stderr and "confidence.high_factor=" in proc.stderr) == empty
    grid = load_artifact(store, "grid")
    assert Expert.from_artifact(grid).score([np.zeros((64, 64, 3), np.uint8)])[0].score > 0
