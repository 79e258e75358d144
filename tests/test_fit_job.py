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
from eagle.expert.fitted import Expert


@pytest.mark.slow
def test_fit_job_end_to_end(tmp_path: Path, s3_bucket: str, repo_root: Path):
    from eagle.testing.synth import generate

    generate(str(tmp_path), products=("grid", "nut"), n_train=5, n_test_good=1, n_test_defect=1, size=64)
    (tmp_path / "absent" / "train" / "good").mkdir(parents=True)  # a product folder without images: not one
    store = f"{s3_bucket}/models"
    cmd = [sys.executable, "jobs/fit.py", "--data", str(tmp_path), "--model-store", store,
           "--products", "grid,nut", "--backbone", "resnet18", "--weights", "random",
           "--threshold-method", "mad", "--coreset-ratio", "0.2",
           "expert.resize=64", "expert.crop=64", "threshold.min_unselected_patches=4", "ray.num_cpus=4",
           "routing.policy=uncertain",  # the policy that uses the band: its advice is printed
           "--summary-json", str(tmp_path / "fit.json")]
    proc = subprocess.run(cmd, cwd=repo_root, env=dict(os.environ), capture_output=True, text=True, timeout=600)
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert proc.returncode == 0, proc.stderr[-3000:]  # 'absent' (no images) is no product: --products absent
    assert "absent" not in lines  # is a mistake before Ray (tests/test_cli_checks.py)
    for product in ("grid", "nut"):
        images, patches, coreset, method = lines[product][1:5]
        assert (int(images), int(patches), int(coreset), method) == (5, 5 * 64, int(5 * 64 * 0.2), "mad")
        art = load_artifact(store, product)
        assert art.version == lines[product][-1] and art.meta["expert"]["backbone"] == "resnet18"
        assert art.threshold == pytest.approx(float(lines[product][5]), abs=1e-4)
    summary = json.loads((tmp_path / "fit.json").read_text())
    assert summary["grid"]["version"] == lines["grid"][-1] and "absent" not in summary
    for product in ("grid", "nut"):  # an empty uncertain band is reported with the setting that widens it
        empty = summary[product]["threshold"] >= summary[product]["score_max"]
        assert (f"{product}: threshold" in proc.stderr and "confidence.high_factor=" in proc.stderr) == empty
    grid = load_artifact(store, "grid")
    assert Expert.from_artifact(grid).score([np.zeros((64, 64, 3), np.uint8)])[0].score > 0


@pytest.mark.slow
def test_fit_job_behind_a_faulty_store_lands_artifacts_whole_or_not_at_all(s3_server, s3_bucket, ray_local,
                                                                          repo_root: Path):
    import ray
    from faulty_proxy import FaultyProxy

    from eagle.io import storage
    from eagle.testing.synth import generate

    data = f"{s3_bucket}/data"
    generate(data, products=("grid", "nut"), n_train=5, n_test_good=1, n_test_defect=1, size=64)
    store = f"{s3_bucket}/models"

    def fit(proxy: FaultyProxy, coreset_ratio: float, *extra: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "jobs/fit.py", "--data", data, "--model-store", store, "--products", "grid,nut",
               "--backbone", "resnet18", "--weights", "random", "--coreset-ratio", str(coreset_ratio),
               "expert.resize=64", "expert.crop=64",
               "threshold.min_unselected_patches=4", f"storage.endpoint_url={proxy.url}",
               f"ray.address={ray.get_runtime_context().gcs_address}", *extra]
        return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=600)

    # one in three of every request method fails (a fit makes few): training images, artifact files, LATEST
    with FaultyProxy(s3_server, every=3) as proxy:
        proc = fit(proxy, 0.1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proxy.faults and {"GET", "PUT"} <= set(proxy.by_method), proxy.by_method
    assert "storage retries (failed requests, retried): read " in proc.stderr
    first = {p: load_artifact(store, p).version for p in ("grid", "nut")}  # complete: content checks pass
    nut_files = sorted(f.uri for f in storage.list_files(f"{store}/nut"))

    # every write under nut/ fails for good while a changed setting makes a new version
    with FaultyProxy(s3_server, every=1, methods={"PUT", "POST", "DELETE"}, kinds=("slowdown", "reset"),
                     paths=r"/models/nut/") as proxy:
        proc = fit(proxy, 0.3, "storage.max_attempts=2")
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "FAILED" in lines["nut"] and "/models/nut/" in lines["nut"], lines["nut"]  # names the object
    assert load_artifact(store, "nut").version == first["nut"]  # LATEST still names the complete old version
    assert sorted(f.uri for f in storage.list_files(f"{store}/nut")) == nut_files  # nothing half-written
    assert load_artifact(store, "grid").version != first["grid"]  # the healthy product moved on
